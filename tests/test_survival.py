"""Training that survives (issue 6): kills at random moments and restarts by the same command,
SIGTERM snapshots, optimizer state carried across a resume, config mistakes that fail in seconds,
result dirs that never collide."""

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import checks
import misc
import tfutil
from snapshots import file_sha256, load_resume_state
from survival_helpers import SCHED, log_text, resume_state, resumed_from, snapshots, start_train, wait_for
from train_helpers import REPO, run_dirs, run_train, tick_lines, write_config



@pytest.fixture(scope='module')
def session():
    tfutil.init_tf()
    return tfutil.tf.get_default_session()


def load_all_snapshots(result_dir, session):
    """Every network-*.pkl under a final name must load completely (no truncated pickles)."""
    paths = [p for d in run_dirs(result_dir) for p in snapshots(d)]
    for path in paths:
        G, D, Gs = misc.load_pkl(path)
        assert Gs.find_var('lod') is not None
    return paths


# ----------------------------------------------------------------------------
# SIGKILL at random moments, restarted by the very same command.


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_same_command_finishes(data8, tmp_path, session):
    results = str(tmp_path / 'results')
    cfg = write_config(tmp_path / 'run.py', results, dict(tfrecord_dir=data8), desc='preempt',
                       train=dict(total_kimg=2.5, resume_run_id='latest'), sched=SCHED)
    rnd = random.Random(6)
    kills = 0
    for attempt in range(4):
        before = set(run_dirs(results))
        proc = start_train(cfg, tmp_path / ('out%d.txt' % attempt))
        try:
            # This run's first snapshot, then a random moment (tick boundaries take ~1 s here).
            assert wait_for(lambda: any(snapshots(d) for d in set(run_dirs(results)) - before), 300, proc), \
                open(tmp_path / ('out%d.txt' % attempt)).read()[-3000:]
            time.sleep(rnd.uniform(0.0, 2.5))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        load_all_snapshots(results, session)
        if proc.returncode == 0:
            break
    assert kills >= 3
    if not any(os.path.isfile(os.path.join(d, '_training-done.txt')) for d in run_dirs(results)):
        run_train(cfg)      # The same command once more finishes the job.

    dirs = run_dirs(results)
    done = [d for d in dirs if os.path.isfile(os.path.join(d, '_training-done.txt'))]
    assert done == [dirs[-1]]
    assert not [n for n in os.listdir(dirs[-1]) if '.tmp' in n]
    # The very first start found nothing to resume and said so.
    assert 'no run with a network snapshot' in log_text(dirs[0]) and 'starting from scratch' in log_text(dirs[0])
    assert len(load_all_snapshots(results, session)) >= 4
    for d in dirs:      # resume-state.json is never torn, and the newest pickle of a run has its exact entry.
        if snapshots(d):
            pkl = misc.list_network_pkls(d)[-1]
            entry = load_resume_state(pkl)
            assert entry is not None and entry['snapshot'] == os.path.basename(pkl), pkl

    # kimg carries on: each restart resumes from the newest snapshot of an earlier run, at a kimg at
    # least that of the previous restart, and its ticks continue from there.
    last_resume = 0.0
    for i, d in enumerate(dirs):
        pkl, exact = resumed_from(d)
        ticks = [k for k, _ in tick_lines(d)]
        if pkl is None:
            assert i == 0, 'run %s started from scratch although snapshots existed' % d
            resume = 0.0
        else:
            source = os.path.dirname(pkl)
            assert source in dirs[:i]
            assert exact is not None, 'run %s resumed without its resume state' % d
            resume = exact
            assert resume == load_resume_state(pkl)['kimg']
            assert resume >= last_resume
            assert resume <= max(k for k, _ in tick_lines(source)) + 0.05
        assert ticks == sorted(ticks) and all(k > resume for k in ticks)
        last_resume = resume
    assert tick_lines(dirs[-1])[-1][0] == pytest.approx(2.5, abs=0.06)


# ----------------------------------------------------------------------------
# SIGTERM / Ctrl-C: finish the step, snapshot the current kimg, exit 143 / 130.


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_sigterm_writes_a_loadable_snapshot_of_the_current_kimg(data8, tmp_path, session, signum):
    results = str(tmp_path / 'results')
    cfg = write_config(tmp_path / 'run.py', results, dict(tfrecord_dir=data8), desc='term',
                       train=dict(total_kimg=50, network_snapshot_ticks=1000, image_snapshot_ticks=1000), sched=SCHED)
    proc = start_train(cfg, tmp_path / 'out.txt')
    try:
        assert wait_for(lambda: run_dirs(results) and len(tick_lines(run_dirs(results)[0])) >= 2, 300, proc)
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [run_dir] = run_dirs(results)
    ticks = tick_lines(run_dir)
    state = resume_state(run_dir)
    # No regular snapshot was due: the one there is SIGTERM's, at the kimg reached after the last tick.
    assert [os.path.basename(p) for p in snapshots(run_dir)] == [state['snapshot']]
    assert state['tick'] == len(ticks)
    assert ticks[-1][0] - 0.05 <= state['kimg'] < ticks[-1][0] + 0.05 + 0.25 + 0.032
    assert state['cur_nimg'] % 8 == 0       # Whole D+G steps (minibatch 8) only.
    assert '%s at kimg %.3f (tick %d' % (signal.Signals(signum).name, state['kimg'], state['tick']) in log_text(run_dir)
    assert state['snapshot'] == 'network-snapshot-%06d.pkl' % (state['cur_nimg'] // 1000)
    G, D, Gs = misc.load_pkl(os.path.join(run_dir, state['snapshot']))
    assert file_sha256(os.path.join(run_dir, state['snapshot'])) == state['snapshot_sha256']
    assert not os.path.isfile(os.path.join(run_dir, '_training-done.txt'))


# ----------------------------------------------------------------------------
# Losses that stay non-finite stop the run; the last good snapshot stays as it was.


@pytest.mark.slow
def test_persistent_nan_stops_the_run_and_keeps_the_last_good_snapshot(data8, tmp_path, session):
    results = str(tmp_path / 'results')
    cfg = append(write_config(tmp_path / 'nan.py', results, dict(tfrecord_dir=data8), desc='nan',
                              train=dict(total_kimg=5, max_nonfinite_ticks=2), sched=SCHED),
                 "D_loss = EasyDict(func='tests.survival_losses.D_nan_when_fading')\n")
    start = time.time()
    result = subprocess.run([sys.executable, 'train.py', cfg], cwd=REPO, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    [run_dir] = run_dirs(results)
    ticks = tick_lines(run_dir)
    # Ticks 1-2 train at lod 1 (good); from tick 3 on D is NaN: ticks 3 and 4 are tolerated, tick 5 stops.
    assert len(ticks) == 5 and ticks[1][1] == 1.0 and ticks[2][1] < 1.0
    assert output.count('D loss non-finite in all 32 steps; steps were skipped') == 3 and 'Traceback' not in output
    assert 'Training stopped at kimg 1.280' in output and 'max_nonfinite_ticks=2' in output
    assert 'The last good snapshot is network-snapshot-000000.pkl' in output
    # Only the good snapshot (tick 2, kimg 0.512) exists, with its exact state; nothing final.
    assert [os.path.basename(p) for p in snapshots(run_dir)] == ['network-snapshot-000000.pkl']
    entry = load_resume_state(snapshots(run_dir)[0])
    assert entry is not None and entry['cur_nimg'] == 512 and entry['tick'] == 2
    G, D, Gs = misc.load_pkl(snapshots(run_dir)[0])
    values = tfutil.run(list(D.vars.values()))
    assert all(np.isfinite(v).all() for v in values)
    assert not os.path.isfile(os.path.join(run_dir, '_training-done.txt'))
    assert time.time() - start < 300


# ----------------------------------------------------------------------------
# Resuming inside the same LOD phase restores the Adam slots and loss scaling; a new phase resets
# the slots (loss scaling carries on). Two resumed runs start at once: distinct result dirs.


def append(path, text):
    with open(path, 'at') as file:
        file.write(text)
    return path


def npz(path):
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


@pytest.mark.slow
def test_resume_in_the_same_lod_phase_restores_optimizer_state(data8, tmp_path, session):
    results = str(tmp_path / 'results')
    loss_scaling = 'G_opt.use_loss_scaling = True\nD_opt.use_loss_scaling = True\n'
    sched = dict(SCHED, lod_training_kimg=2.0, lod_transition_kimg=2.0)   # 0.5 kimg: mid-way through the 4x4 phase.
    first = append(write_config(tmp_path / 'first.py', results, dict(tfrecord_dir=data8), desc='first',
                                train=dict(total_kimg=0.5), sched=sched), loss_scaling)
    run_train(first)
    [first_dir] = run_dirs(results)
    saved_state = resume_state(first_dir)
    assert saved_state['snapshot'] == 'network-final.pkl' and saved_state['lod'] == 1.0
    saved = npz(os.path.join(first_dir, saved_state['optimizer_state']))
    ls_names = [name for name in saved if 'LossScalingVars' in name]
    slot_names = [name for name in saved if name.startswith(('G/', 'D/'))]
    assert len(ls_names) == 2 and len(slot_names) >= 40
    assert all(saved[name] > 64.0 for name in ls_names)        # Moved from loss_scaling_init by the steps taken.
    assert sum(float(np.abs(saved[name]).sum()) for name in slot_names) > 0

    # Resumed with total_kimg already reached: no step runs, so the final state is the starting state.
    same = append(write_config(tmp_path / 'same.py', results, dict(tfrecord_dir=data8), desc='same',
                               train=dict(total_kimg=0.5, resume_run_id=first_dir), sched=sched), loss_scaling)
    other = append(write_config(tmp_path / 'other.py', results, dict(tfrecord_dir=data8), desc='newphase',
                                train=dict(total_kimg=0.5, resume_run_id=first_dir),
                                sched=dict(sched, lod_training_kimg=0.5)), loss_scaling)    # Fading in at 0.512 kimg.
    procs = [start_train(cfg, tmp_path / ('out-%d.txt' % i)) for i, cfg in enumerate([same, other])]
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, open(tmp_path / ('out-%d.txt' % i)).read()[-3000:]
    dirs = run_dirs(results)
    assert len(dirs) == 3 and len({os.path.basename(d).split('-')[0] for d in dirs}) == 3
    [same_dir] = [d for d in dirs if d.endswith('-same')]
    [other_dir] = [d for d in dirs if d.endswith('-newphase')]
    assert 'Adam slots and loss scaling' in log_text(same_dir)
    assert 'loss scaling only: new LOD phase' in log_text(other_dir)

    restored = npz(os.path.join(same_dir, resume_state(same_dir)['optimizer_state']))
    assert sorted(restored) == sorted(saved)
    for name in saved:
        np.testing.assert_array_equal(restored[name], saved[name], err_msg=name)
    assert resume_state(same_dir)['cur_nimg'] == saved_state['cur_nimg']
    assert resume_state(same_dir)['tick'] == saved_state['tick']

    reset = npz(os.path.join(other_dir, resume_state(other_dir)['optimizer_state']))
    for name in ls_names:
        assert reset[name] == saved[name]
    for name in slot_names:
        assert not reset[name].any(), name

    # G, D and Gs come back exactly as saved.
    before = misc.load_pkl(os.path.join(first_dir, 'network-final.pkl'))
    before = [dict(zip(net.vars.keys(), tfutil.run(list(net.vars.values())))) for net in before]
    after = misc.load_pkl(os.path.join(same_dir, 'network-final.pkl'))
    after = [dict(zip(net.vars.keys(), tfutil.run(list(net.vars.values())))) for net in after]
    for net_before, net_after in zip(before, after):
        assert sorted(net_before) == sorted(net_after)
        for name in net_before:
            np.testing.assert_array_equal(net_before[name], net_after[name], err_msg=name)


# ----------------------------------------------------------------------------
# Result directories: numbers are claimed atomically, also with different descs at the same moment.


def _claim_worker(result_dir, desc, barrier, queue, repeats):
    barrier.wait()
    queue.put([misc.create_result_subdir(result_dir, '%s-%d' % (desc, i)) for i in range(repeats)])


def test_result_dirs_started_at_once_never_share_a_number(tmp_path):
    ctx = multiprocessing.get_context('fork')
    count, repeats = 8, 10
    barrier, queue = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_claim_worker, args=(str(tmp_path), 'desc%d' % i, barrier, queue, repeats))
             for i in range(count)]
    for proc in procs:
        proc.start()
    made = [d for _ in procs for d in queue.get(timeout=60)]
    for proc in procs:
        proc.join()
    numbers = sorted(int(os.path.basename(d).split('-')[0]) for d in made)
    assert numbers == list(range(count * repeats))      # Each number once, none skipped.


# ----------------------------------------------------------------------------
# Config mistakes: each its own message, within 10 seconds of `python train.py config`.


def fails_fast(cfg, *expected):
    start = time.time()
    result = subprocess.run([sys.executable, 'train.py', str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.time() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    for text in expected:
        assert text in output, output[-3000:]
    assert elapsed < 10.0, 'took %.1f s' % elapsed
    assert 'Building TensorFlow graph' not in output
    return output


def test_config_mistakes_fail_within_seconds_with_their_own_message(data8, tmp_path):
    results = str(tmp_path / 'results')
    os.makedirs(os.path.join(results, '000-first'))
    os.makedirs(os.path.join(results, '001-second'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'notes.txt').write_text('no slides here')

    def cfg(name, dataset=None, **kwargs):
        return write_config(tmp_path / (name + '.py'), kwargs.pop('result_dir', results),
                            dataset or dict(tfrecord_dir=data8), **kwargs)

    fails_fast(cfg('nodata', dict(tfrecord_dir=str(tmp_path / 'missing'))), 'Dataset folder', 'does not exist')
    fails_fast(cfg('norecords', dict(tfrecord_dir=str(empty))), 'holds neither *.tfrecords files',
               'nor slides with extension .svs')    # Without class_name either would do.
    fails_fast(cfg('noslidedir', dict(class_name='dataset.WSIDataset', tfrecord_dir=str(tmp_path / 'missing'),
                                      wsi_ext='.svs', resolution=16)), 'Slide folder', 'does not exist')
    fails_fast(cfg('noslides', dict(class_name='dataset.WSIDataset', tfrecord_dir=str(empty), wsi_ext='.svs',
                                    resolution=16)), 'No slides with extension .svs', 'extensions there: .txt')
    fails_fast(cfg('resolution', dict(class_name='dataset.SyntheticDataset', resolution=48)),
               'power of two >= 4', '48')
    fails_fast(cfg('minibatch', num_gpus=2, sched=dict(minibatch_base=8, minibatch_dict={4: 7})),
               'multiples of num_gpus = 2', 'sched.minibatch_dict[4] = 7')
    fails_fast(cfg('resume', train=dict(resume_run_id=42)), 'resume_run_id=42', '000-first, 001-second')
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    fails_fast(cfg('notwritable', result_dir=str(blocker / 'results')), 'is not writable')
    huge = dict(fmap_base=1 << 20, fmap_max=1 << 20)
    fails_fast(cfg('disk', dict(class_name='dataset.SyntheticDataset', resolution=1024), G=huge, D=huge),
               'Not enough free disk space', 'per snapshot')
    assert sorted(os.listdir(results)) == ['000-first', '001-second']     # No run was started.


def test_gpu_count_check(tmp_path):
    start = time.time()
    cfg = types.SimpleNamespace(num_gpus=4, dataset=dict(class_name='dataset.SyntheticDataset', resolution=8),
                                sched=dict(minibatch_base=16), result_dir=str(tmp_path), data_dir='',
                                G=dict(fmap_base=64), D=dict(fmap_base=64))
    with pytest.raises(checks.ConfigError, match='num_gpus = 4 but this machine has 2 GPUs'):
        checks.validate_training_setup(cfg=cfg, gpu_counter=lambda: 2)
    checks.validate_training_setup(cfg=cfg, gpu_counter=lambda: 4)
    checks.validate_training_setup(cfg=cfg, gpu_counter=lambda: 0)     # GPU-less: virtual CPU devices.
    assert time.time() - start < 10.0


def test_sigterm_with_bad_losses_before_the_first_snapshot_says_there_is_none_yet(capsys):
    import train
    run = types.SimpleNamespace(
        stop_request=(signal.SIGTERM, 0), node=types.SimpleNamespace(count=1, is_chief=True),
        train_start_time=time.time(), cur_nimg=96, cur_tick=0, writer=None,
        health=types.SimpleNamespace(current_tick_bad=lambda: True), summary_log=types.SimpleNamespace(close=lambda: None))
    run._last_snapshot = types.MethodType(train._TrainingRun._last_snapshot, run)
    with pytest.raises(SystemExit) as exited:
        train._TrainingRun._snapshot_and_exit(run)
    assert exited.value.code == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert 'SIGTERM at kimg 0.096: losses are not finite, so no snapshot is written; the last good one is none yet ' \
           '(this run has written no snapshot)' in out and 'None' not in out
