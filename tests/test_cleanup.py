"""Runs that clean up after themselves (issue 11): stale temporary files of killed writes are
removed at the next start, a finished run is not started again, old snapshots can be pruned, the
disk check counts the whole run, bad values fail before TensorFlow loads, and a full disk stops
the run with a message that names the newest good snapshot."""

import glob
import os
import re
import signal
import subprocess
import sys
import time
import types

import PIL.Image
import pytest

import checks
import config
import misc
import snapshots
from survival_helpers import SCHED, log_text, wait_for
from train_helpers import REPO, run_dirs, run_train, write_config



def partial_files(folder):
    return sorted(glob.glob(os.path.join(str(folder), '**', '*' + misc.PARTIAL_MARK + '*'), recursive=True))


def train_py(cfg, *wrapper, timeout=600):
    """`python train.py cfg` (or a wrapper script in front of it) in a fresh process."""
    command = [sys.executable] + (list(wrapper) if wrapper else ['train.py']) + [str(cfg)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------
# Stale temporary files: which ones a start removes.


def dead_pid():
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_stale_partial_files_are_those_of_dead_writers_or_older_than_the_newest_pickle(tmp_path):
    def touch(name, mtime):
        path = tmp_path / name
        path.write_bytes(b'x' * 1000)
        os.utime(path, (mtime, mtime))
        return name

    now = time.time()
    dead = touch('network-snapshot-000010.pkl%s%d' % (misc.PARTIAL_MARK, dead_pid()), now)
    reused = touch('optimizer-state-000010000.npz%s%d' % (misc.PARTIAL_MARK, os.getpid()), now - 100)
    touch('network-snapshot-000009.pkl', now - 50)
    writing = touch('resume-state.json%s%d' % (misc.PARTIAL_MARK, os.getpid()), now)    # A live writer, still busy.
    removed, freed = misc.remove_stale_partial_files(str(tmp_path))
    assert sorted(removed) == sorted([dead, reused]) and freed == 2000
    assert sorted(os.listdir(tmp_path)) == sorted(['network-snapshot-000009.pkl', writing])


def test_latest_tidies_the_run_it_resumes_and_the_later_ones_that_died_before_a_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(config, 'result_dir', str(tmp_path))
    for name, has_pickle in [('000-old', True), ('001-source', True), ('002-died', False), ('003-died', False)]:
        (tmp_path / name).mkdir()
        if has_pickle:
            (tmp_path / name / 'network-snapshot-000001.pkl').write_bytes(b'pickle')
    assert snapshots.runs_to_tidy('latest') == [str(tmp_path / name) for name in ['001-source', '002-died', '003-died']]
    assert snapshots.runs_to_tidy(str(tmp_path / '000-old')) == [str(tmp_path / '000-old')]
    assert snapshots.runs_to_tidy(None) == []


# ----------------------------------------------------------------------------
# SIGKILL inside each kind of write, then the same command again: no temporary file stays. The
# last start finishes the run; starting it once more says it is finished and creates nothing.

WRITE_KINDS = ['optimizer-state', 'resume-state.json', 'network-snapshot', 'fakes']


@pytest.fixture(scope='module')
def killed_mid_write(data8, tmp_path_factory):
    """Four starts of one preemptible job, each SIGKILLed half-way through a different kind of
    atomic write, then a fifth that finishes. Returns (config, results, [(kind, temp file,
    output of the start after the kill)])."""
    tmp_path = tmp_path_factory.mktemp('killed')
    results = str(tmp_path / 'results')
    cfg = write_config(tmp_path / 'run.py', results, dict(tfrecord_dir=data8), desc='killed', sched=SCHED,
                       train=dict(total_kimg=2.5, resume_run_id='latest'))
    killed = []
    for kind in WRITE_KINDS:
        out_path = tmp_path / ('out-%s.txt' % kind)
        with open(out_path, 'wb') as out:
            proc = subprocess.Popen([sys.executable, 'tests/pause_in_write.py', kind, cfg], cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            paused = wait_for(lambda: 'PAUSED ' in out_path.read_text(errors='replace'), 300, proc)
            assert paused, out_path.read_text(errors='replace')[-3000:]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        [partial] = re.findall(r'^PAUSED (.+)$', out_path.read_text(errors='replace'), re.M)
        assert os.path.isfile(partial) and os.path.basename(partial).startswith(kind)
        killed.append((kind, partial, out_path))
    finished = train_py(cfg)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return cfg, results, killed, finished.stdout


@pytest.mark.slow
def test_sigkill_during_each_kind_of_write_leaves_no_temporary_file_after_a_restart(killed_mid_write):
    cfg, results, killed, last_output = killed_mid_write
    outputs = [out.read_text(errors='replace') for _, _, out in killed[1:]] + [last_output]
    for (kind, partial, _), output in zip(killed, outputs):
        assert not os.path.exists(partial), kind
        assert 'temporary file (' in output and os.path.basename(partial) in output, output[-3000:]
    assert partial_files(results) == []
    dirs = run_dirs(results)
    assert len(dirs) == 5 and os.path.isfile(os.path.join(dirs[-1], '_training-done.txt'))


@pytest.mark.slow
def test_latest_on_a_finished_run_exits_0_and_creates_nothing(killed_mid_write):
    cfg, results, _, _ = killed_mid_write
    before = sorted(os.listdir(results))
    files_before = {d: sorted(os.listdir(d)) for d in run_dirs(results)}
    start = time.time()
    again = train_py(cfg, timeout=60)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert 'Training is finished' in output and os.path.join(run_dirs(results)[-1], 'network-final.pkl') in output
    assert time.time() - start < 10.0 and 'Initializing TensorFlow' not in output
    assert sorted(os.listdir(results)) == before
    assert {d: sorted(os.listdir(d)) for d in run_dirs(results)} == files_before


# ----------------------------------------------------------------------------
# network_snapshot_keep.


def write_snapshot_files(run_dir, kimgs):
    for kimg in kimgs:
        (run_dir / ('network-snapshot-%06d.pkl' % kimg)).write_bytes(b'pickle %d' % kimg)


def test_network_snapshot_keep_keeps_the_newest_and_the_one_resume_state_names(tmp_path):
    write_snapshot_files(tmp_path, [0, 10, 20, 30, 40])
    (tmp_path / 'network-final.pkl').write_bytes(b'final')
    snapshots.save_resume_state(str(tmp_path), dict(snapshot='network-snapshot-000040.pkl', previous=[]))
    snapshots.remove_old_snapshots(str(tmp_path), 2)
    assert sorted(p.name for p in tmp_path.glob('network-*.pkl')) == [
        'network-final.pkl', 'network-snapshot-000030.pkl', 'network-snapshot-000040.pkl']
    # A run that went back in kimg (resumed from an older snapshot) names an older pickle as its newest.
    snapshots.save_resume_state(str(tmp_path), dict(snapshot='network-snapshot-000030.pkl', previous=[]))
    write_snapshot_files(tmp_path, [50, 60])
    snapshots.remove_old_snapshots(str(tmp_path), 1)
    assert sorted(p.name for p in tmp_path.glob('network-*.pkl')) == [
        'network-final.pkl', 'network-snapshot-000030.pkl', 'network-snapshot-000060.pkl']


# ----------------------------------------------------------------------------
# The disk check counts every snapshot the run writes (or keeps), on a real 20 MB disk.


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs mounted for the test (needs root, as this machine's test runs have)."""
    mount_point = tmp_path / 'disk'
    mount_point.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=20m', 'tmpfs', str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(['umount', '-l', str(mount_point)], check=True)


def demo_setup(result_dir, **train):
    """The cpu-demo preset of config.py: 2.5-kimg ticks, a snapshot every 4 ticks, 32-px patches."""
    return types.SimpleNamespace(
        num_gpus=1, result_dir=str(result_dir), data_dir='',
        dataset=dict(class_name='dataset.SyntheticDataset', resolution=32),
        train=dict(func='train.train_progressive_gan', total_kimg=40, network_snapshot_ticks=4, **train),
        G=dict(func='networks.G_paper', fmap_base=256, fmap_max=64, latent_size=64),
        D=dict(func='networks.D_paper', fmap_base=256, fmap_max=64),
        sched=dict(lod_training_kimg=5, lod_transition_kimg=5, minibatch_base=16, tick_kimg_base=2.5, tick_kimg_dict={}))


def test_disk_check_counts_every_snapshot_of_the_run(small_disk, capsys):
    # 40 kimg in ticks of 2.5 kimg is 16 ticks: snapshots at ticks 4, 8, 12 and 16, plus network-final.pkl.
    pkl_bytes, optimizer_bytes = checks.estimate_snapshot_bytes(dict(resolution=32), demo_setup('').G, demo_setup('').D)
    assert 5 * pkl_bytes + 3 * optimizer_bytes > 20 << 20 > 3 * (pkl_bytes + optimizer_bytes)
    with pytest.raises(checks.ConfigError) as failure:
        checks.validate_training_setup(cfg=demo_setup(small_disk), gpu_counter=lambda: 0)
    message = str(failure.value)
    assert 'Not enough free disk space' in message and 'the run writes 5 network snapshots over total_kimg = 40' in message
    assert 'about %.1f MB in all' % ((5 * pkl_bytes + 3 * optimizer_bytes) / 2.0 ** 20) in message
    assert 'network_snapshot_keep' in message

    # Keeping the newest 2, at most 3 are on disk at once: that fits, and the check says how much it needs.
    checks.validate_training_setup(cfg=demo_setup(small_disk, network_snapshot_keep=2), gpu_counter=lambda: 0,
                                   report=True)
    assert 'at most 3 kept at once' in capsys.readouterr().out


def test_snapshot_count_follows_the_tick_length_of_each_resolution():
    # 4x4 for 2 kimg in 2-kimg ticks (ticks at 0 and 2 start at 4x4: the fade's first instant is
    # still lod 1), then 1-kimg ticks at 8x8 from kimg 4 to 10: 2 + 6 ticks, a snapshot every 2, plus the final.
    sched = dict(lod_initial_resolution=4, lod_training_kimg=2, lod_transition_kimg=2, tick_kimg_base=1,
                 tick_kimg_dict={4: 2})
    assert checks.planned_snapshots(dict(total_kimg=10, network_snapshot_ticks=2), sched, 8) == 8 // 2 + 1
    assert checks.planned_snapshots(dict(total_kimg=10, network_snapshot_ticks=1), dict(sched, tick_kimg_dict={}), 8) == 11


# ----------------------------------------------------------------------------
# Bad values: each fails with its own message in about a second, and TensorFlow is never imported
# (`python -X importtime` lists every module the process imports).


def fails_before_tensorflow(cfg, *expected):
    start = time.time()
    result = subprocess.run([sys.executable, '-X', 'importtime', 'train.py', str(cfg)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    elapsed = time.time() - start
    imported = re.findall(r'^import time:.*\|\s+(\S+)$', result.stderr, re.M)
    messages = result.stdout + '\n'.join(line for line in result.stderr.splitlines() if not line.startswith('import time:'))
    assert result.returncode == 1, messages[-3000:]
    assert 'Configuration error' in messages and 'Traceback' not in messages, messages[-3000:]
    for text in expected:
        assert text in messages, messages[-3000:]
    assert imported and not [name for name in imported if name.split('.')[0] == 'tensorflow']
    assert elapsed < 10.0, 'took %.1f s' % elapsed      # About 0.5 s on an idle machine; loaded ones vary.


@pytest.fixture(scope='module')
def slides(tmp_path_factory):
    from conftest import write_slide
    folder = tmp_path_factory.mktemp('slides')
    write_slide(folder / 'slide.tif', 1024, 768)
    return str(folder)


@pytest.fixture(scope='module')
def tfrecords(tmp_path_factory):
    """A folder as dataset_tool names its files; no check before TensorFlow reads inside them."""
    folder = tmp_path_factory.mktemp('tfrecords')
    (folder / 'data-r03.tfrecords').write_bytes(b'')
    return str(folder)


def wsi_dataset(**kwargs):
    return dict(dict(class_name='dataset.WSIDataset', tfrecord_dir='{slides}', wsi_ext='.tif', resolution=32), **kwargs)


BAD_VALUES = {
    'total_kimg negative': (dict(train=dict(total_kimg=-5)), 'train.total_kimg must be a positive number', '-5'),
    'total_kimg a string': (dict(train=dict(total_kimg='8')), "not '8' (a string: remove the quotes)"),
    'downsample zero': (dict(dataset=wsi_dataset(downsample=0)), 'dataset.downsample must be a positive number', 'not 0'),
    'downsample negative': (dict(dataset=wsi_dataset(downsample=-4)), 'dataset.downsample', 'not -4'),
    'resolution negative': (dict(dataset=wsi_dataset(downsample=4) | dict(resolution=-32)), 'dataset.resolution', '-32'),
    'minibatch zero': (dict(sched=dict(minibatch_base=0)), 'Minibatch sizes must be positive', 'sched.minibatch_base = 0'),
    'minibatch cap negative': (dict(sched=dict(max_minibatch_per_gpu={8: -2})), 'sched.max_minibatch_per_gpu[8] = -2'),
    'WSIDataset argument': (dict(dataset=wsi_dataset(downsampel=4)),
                            'dataset.downsampel is not an argument of dataset.WSIDataset; did you mean dataset.downsample?'),
    'TFRecordDataset argument': (dict(dataset=dict(tfrecord_dir='{tfrecords}', shuffle_mbb=16)),
                                 'dataset.shuffle_mbb is not an argument of dataset.TFRecordDataset; did you mean dataset.shuffle_mb?'),
    'dataset class': (dict(dataset=wsi_dataset(class_name='dataset.WSIDatset')),
                      "dataset.class_name = 'dataset.WSIDatset': dataset.py defines no WSIDatset; did you mean dataset.WSIDataset?"),
    'G function': (dict(G=dict(func='networks.G_papr')), 'networks.py defines no G_papr; did you mean networks.G_paper?'),
    'loss module': (dict(loss='loss_.D_wgangp_acgan'), 'there is no module loss_; did you mean loss?'),
    'train argument': (dict(train=dict(total_kimgs=5)), 'train.total_kimgs is not an argument of train.train_progressive_gan',
                       'did you mean train.total_kimg?'),
    'label_file missing': (dict(dataset=wsi_dataset(label_file='labels.csv')),
                           "dataset.label_file = 'labels.csv' is not a file", '"{slides}/labels.csv"'),
}


@pytest.mark.parametrize('case', sorted(BAD_VALUES))
def test_bad_values_fail_in_seconds_before_tensorflow_loads(case, slides, tfrecords, tmp_path):
    """Each config is right but for the one value, so without its check training would start."""
    changes, *expected = BAD_VALUES[case]
    changes = dict(changes)
    dataset = changes.pop('dataset', dict(class_name='dataset.SyntheticDataset', resolution=8))
    if 'tfrecord_dir' in dataset:
        dataset['tfrecord_dir'] = dataset['tfrecord_dir'].format(slides=slides, tfrecords=tfrecords)
    loss_func = changes.pop('loss', None)
    cfg = write_config(tmp_path / 'bad.py', tmp_path / 'results', dataset, **changes)
    if loss_func:
        with open(cfg, 'at') as file:
            file.write('D_loss = EasyDict(func=%r)\n' % loss_func)
    fails_before_tensorflow(cfg, *[text.format(slides=slides, tfrecords=tfrecords) for text in expected])
    assert not os.path.isdir(tmp_path / 'results') or os.listdir(tmp_path / 'results') == []


# ----------------------------------------------------------------------------
# A full disk mid-run (a real 20 MB tmpfs, filled up once the run has its first snapshot).


def fill_up(folder):
    """Write a file into `folder` until the disk is full; returns its path."""
    path = os.path.join(str(folder), 'filler')
    with open(path, 'wb') as file:
        try:
            while True:
                file.write(b'\0' * (64 << 10))
                file.flush()
        except OSError:
            pass
    return path


@pytest.mark.slow
def test_full_disk_stops_with_the_newest_good_snapshot_and_the_resume_command(data8, small_disk, tmp_path):
    results = str(small_disk / 'results')
    cfg = write_config(tmp_path / 'full.py', results, dict(tfrecord_dir=data8), desc='full', sched=SCHED,
                       train=dict(total_kimg=2.0, resume_run_id='latest', network_snapshot_keep=1))
    out_path = tmp_path / 'out.txt'
    with open(out_path, 'wb') as out:
        proc = subprocess.Popen([sys.executable, 'train.py', cfg], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: run_dirs(results) and glob.glob(os.path.join(run_dirs(results)[0], 'network-*.pkl')),
                        300, proc), out_path.read_text(errors='replace')[-3000:]
        filler = fill_up(small_disk)
        assert proc.wait(timeout=300) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = out_path.read_text(errors='replace')
    [run_dir] = run_dirs(results)
    assert 'Traceback' not in output, output[-3000:]
    assert 'No space left on device' in output and 'nothing half-written is left' in output
    newest = misc.list_network_pkls(run_dir)[-1]
    assert snapshots.load_resume_state(newest) is not None      # Complete, with its exact resume state.
    assert 'The newest good snapshot is %s.' % newest in output
    assert 'the same command resumes from it: python train.py %s' % cfg in output
    stopped = re.search(r'Training stopped at kimg [\d.]+: writing (\S+) failed', output)
    assert stopped and os.path.dirname(stopped.group(1)) == run_dir, output[-3000:]
    assert partial_files(small_disk) == []
    for png in glob.glob(os.path.join(run_dir, '*.png')):
        PIL.Image.open(png).load()      # Every image there is whole (a name that repeats keeps its last good one).

    # Once there is space, the command given resumes from that snapshot. Its ticks (every 0.256
    # kimg up to 2.048) write snapshots named 000000, 000001 and 000002, of which it keeps the newest.
    os.remove(filler)
    resumed = run_train(cfg)
    assert resumed.returncode == 0
    resumed_dir = run_dirs(results)[-1]
    assert 'Loading networks from "%s"' % newest in log_text(resumed_dir)
    assert [os.path.basename(p) for p in misc.list_network_pkls(resumed_dir)] == [
        'network-snapshot-000002.pkl', 'network-final.pkl']
