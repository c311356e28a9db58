"""Multi-node training (cluster.py) with real processes on 127.0.0.1, ports chosen free at run time:
two nodes step like one process with two devices, a two-node run trains through two LODs with only
the chief writing, and a node killed mid-run stops the other, which names it; both then resume."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import cluster
import misc
import patch_sampler
import tfutil
from survival_helpers import log_text, resumed_from, snapshots, wait_for
from tf_compat import tf
from train_helpers import REPO, run_dirs, write_config

STEPS, SHARE = 5, 4      # Training steps compared; images per device.
OVERFLOW_STEP = 2       # Its D step gets non-finite gradients on one node only.
NET_KWARGS = dict(num_channels=3, resolution=8, label_size=0, fmap_base=32, fmap_max=16)
ENV = dict(os.environ, PYTHONPATH=REPO)


def free_ports(count):
    """Ports that are free on 127.0.0.1 right now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(('127.0.0.1', 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(addresses, index):
    return json.dumps({'cluster': {'worker': addresses}, 'task': {'type': 'worker', 'index': index}})


def addresses(count):
    return ['127.0.0.1:%d' % port for port in free_ports(count)]

# ----------------------------------------------------------------------------
# TF_CONFIG.


def test_tf_config_is_read_and_bad_ones_are_named():
    assert cluster.nodes_from_environment({}) is None
    assert cluster.nodes_from_environment({'TF_CONFIG': tf_config(['a:1'], 0)}) is None     # one node: an ordinary run
    assert cluster.nodes_from_environment({'TF_CONFIG': tf_config(['a:1', 'b:2'], 1)}) == (['a:1', 'b:2'], 1)
    with_chief = {'cluster': {'chief': ['c:1'], 'worker': ['a:1', 'b:2']}, 'task': {'type': 'worker', 'index': 0}}
    assert cluster.parse_tf_config(json.dumps(with_chief)) == (['c:1', 'a:1', 'b:2'], 1)
    for text, complaint in [('{"cluster": ', 'not valid JSON'),
                            (tf_config(['a:1', 'b:2'], 2), 'task.index 2'),
                            (json.dumps({'cluster': {'worker': ['a:1'], 'ps': ['p:1']}, 'task': {'type': 'worker'}}), 'ps'),
                            (tf_config(['a:1', 'a:1'], 0), 'twice'),
                            (tf_config(['a'], 0), 'host:port')]:
        with pytest.raises(cluster.ClusterConfigError, match=complaint):
            cluster.parse_tf_config(text)


def test_minibatches_are_split_over_all_gpus_of_all_nodes(tmp_path, monkeypatch):
    import checks
    monkeypatch.setenv('TF_CONFIG', tf_config(['127.0.0.1:1', '127.0.0.1:2', '127.0.0.1:3'], 1))
    checks.check_minibatch_sizes({'minibatch_base': 12}, 2, checks.cluster_nodes())
    with pytest.raises(checks.ConfigError, match=r'num_gpus x nodes = 2 x 3 = 6.*minibatch_base = 8'):
        checks.check_minibatch_sizes({'minibatch_base': 8}, 2, checks.cluster_nodes())
    assert not checks.is_chief()


def test_each_node_samples_its_own_patches_from_a_fixed_dataset_seed(tmp_path, monkeypatch, mask_cache):
    import config
    import train
    from conftest import write_slide
    os.makedirs(tmp_path / 'slides')
    write_slide(str(tmp_path / 'slides' / 'a.svs'))
    monkeypatch.setattr(config, 'dataset', dict(tfrecord_dir='slides', seed=5))

    def patches(node):
        seed = train._dataset_kwargs(node)['seed']
        with patch_sampler.PatchSampler(str(tmp_path / 'slides'), resolution=16, downsample=4, seed=seed, num_threads=1,
                              mask_cache_dir=mask_cache, log=lambda message: None) as sampler:
            return sampler.sample(0, 8)[0]

    chief, other = (cluster.Node(['127.0.0.1:1', '127.0.0.1:2'], index) for index in (0, 1))
    assert np.array_equal(patches(chief), patches(chief))     # each node's stream repeats,
    assert not np.array_equal(patches(chief), patches(other))     # but differs from the other node's
    assert train._dataset_kwargs(cluster.LocalNode())['seed'] == 5     # one machine: the seed as configured


def test_a_share_of_one_image_per_gpu_is_pointed_out(capsys):
    import checks
    sched = {'minibatch_base': 32, 'minibatch_dict': {4: 64}, 'max_minibatch_per_gpu': {256: 16, 512: 1}}
    checks.warn_about_one_image_per_gpu(sched, {}, 1024, 32)     # 4 nodes of 8 GPUs
    said = capsys.readouterr().out
    assert 'at resolution 8, 16, 32, 64, 128, 256, 512, 1024 each of the 32 GPUs gets one image' in said
    checks.warn_about_one_image_per_gpu(sched, {}, 1024, 8)
    assert 'at resolution 512 each of the 8 GPUs' in capsys.readouterr().out    # capped to one at 512 only
    checks.warn_about_one_image_per_gpu(sched, {'mbstd_group_size': 0}, 1024, 32)
    checks.warn_about_one_image_per_gpu({'minibatch_base': 64}, {}, 1024, 32)
    assert capsys.readouterr().out == ''

def test_a_utility_script_with_tf_config_set_is_refused_before_tensorflow_loads(tmp_path):
    cfg = write_config(tmp_path / 'run.py', str(tmp_path / 'results'), dict(class_name='dataset.SyntheticDataset'),
                       train=dict(func='util_scripts.generate_fake_images', run_id=0))
    env = dict(ENV, TF_CONFIG=tf_config(['127.0.0.1:1', '127.0.0.1:2'], 1))
    result = subprocess.run([sys.executable, 'train.py', cfg], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert 'TF_CONFIG describes 2 nodes, but util_scripts.generate_fake_images runs on one machine' in result.stderr
    assert 'tensorflow' not in (result.stdout + result.stderr).lower().replace('tf_config', '')

# ----------------------------------------------------------------------------
# Two nodes with one device each step like one process with two devices.


@pytest.fixture(scope='module')
def start(tmp_path_factory):
    """Start values of G, D and a Gs unlike G, a minibatch for four towers, and each step's draws."""
    rng = np.random.default_rng(0)
    values = {}
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        G = tfutil.Network('G', func='networks.G_paper', latent_size=16, **NET_KWARGS)
        D = tfutil.Network('D', func='networks.D_paper', mbstd_group_size=0, **NET_KWARGS)
        for net in (G, D):
            values.update({'%s/%s' % (net.name, name): value for name, value in zip(net.vars, tfutil.run(list(net.vars.values())))})
    for name in G.vars:
        noise = np.float32(0.1) * rng.standard_normal(np.shape(values['G/' + name])).astype(np.float32)
        values['Gs/' + name] = values['G/' + name] + noise
    minibatch = 2 * SHARE
    values['reals'] = rng.integers(0, 256, [minibatch, 3, 8, 8]).astype(np.uint8)
    for step in range(STEPS):
        values['G_latents/%d' % step] = rng.standard_normal([minibatch, 16]).astype(np.float32)
        values['D_latents/%d' % step] = rng.standard_normal([minibatch, 16]).astype(np.float32)
        values['mixing/%d' % step] = rng.uniform(size=[minibatch, 1, 1, 1]).astype(np.float32)
    values['D_latents/%d' % OVERFLOW_STEP][-1] = np.nan     # Only the second node's share: every node must skip.
    path = str(tmp_path_factory.mktemp('cluster') / 'start.npz')
    np.savez(path, share=SHARE, steps=STEPS, **values)
    return path


def run_steps(start, out, devices, fp16, node_addresses=None, index=None):
    command = [sys.executable, 'tests/cluster_steps.py', start, out, str(devices)]
    command += [','.join(node_addresses), str(index)] if node_addresses else []
    command += ['--fp16'] if fp16 else []
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    output = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, output[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize('fp16', [False, True], ids=['fp32', 'fp16'])
def test_two_nodes_step_like_one_process_with_two_devices(start, tmp_path, fp16):
    nodes = addresses(2)
    procs = [run_steps(start, str(tmp_path / 'single.npz'), 2, fp16)]
    procs += [run_steps(start, str(tmp_path / ('node%d.npz' % i)), 1, fp16, nodes, i) for i in range(2)]
    for proc in procs:
        finish(proc)
    one = dict(np.load(tmp_path / 'single.npz'))
    begun = dict(np.load(start))
    moved = 0
    for index in range(2):
        node = dict(np.load(tmp_path / ('node%d.npz' % index)))
        for name, value in one.items():
            if name.startswith(('G/', 'D/', 'Gs/')):
                np.testing.assert_allclose(node[name], value, rtol=0, atol=1e-5, err_msg='node %d %s' % (index, name))
                moved += np.abs(value - begun[name]).max() > 1e-4
        np.testing.assert_allclose(node['reports'], one['reports'], rtol=1e-5, atol=1e-5)  # mean losses of all towers
        assert np.isnan(node['reports'][2 * OVERFLOW_STEP]) and np.isfinite(np.delete(node['reports'], 2 * OVERFLOW_STEP)).all()
        scales = {name: value for name, value in node.items() if name.startswith('loss_scale/')}
        assert len(scales) == (2 if fp16 else 0)    # G's and D's, on the node's one device
        for name, value in scales.items():
            assert abs(value - one[name]) <= 1e-5, (name, value, one[name])
        if fp16:    # Each finite step raised the scale by 0.0005; the overflow lowered D's by 1.
            assert abs(scales['loss_scale/TrainG/LossScalingVars/loss_scaling_var:0'] - (8 + STEPS * 0.0005)) < 1e-4
            assert abs(scales['loss_scale/TrainD/LossScalingVars/loss_scaling_var:0'] - (7 + (STEPS - 1) * 0.0005)) < 1e-4
    assert moved >= 40, 'the steps hardly changed the parameters'

# ----------------------------------------------------------------------------
# train.py on two nodes.


def write_cluster_config(tmp_path, data8, results, timeout, total_kimg=1.5):
    cfg = write_config(tmp_path / 'run.py', results, dict(tfrecord_dir=data8), desc='nodes',
                       train=dict(total_kimg=total_kimg, resume_run_id='latest', network_snapshot_ticks=1),
                       sched=dict(lod_training_kimg=0.5, lod_transition_kimg=0.5, tick_kimg_base=0.25, minibatch_base=8))
    with open(cfg, 'at') as file:
        file.write('cluster = EasyDict(timeout=%r, startup_timeout=120)\n' % timeout)
    return cfg


def start_nodes(cfg, tmp_path, tag):
    """train.py on each of two nodes; returns ([Popen], [output file], [address])."""
    nodes = addresses(2)
    procs, logs = [], []
    for index in range(2):
        logs.append(str(tmp_path / ('%s-node%d.txt' % (tag, index))))
        env = dict(ENV, TF_CONFIG=tf_config(nodes, index))
        with open(logs[-1], 'wb') as log:
            procs.append(subprocess.Popen([sys.executable, 'train.py', cfg], cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs, logs, nodes


def read(path):
    with open(path, encoding='utf-8', errors='replace') as file:
        return file.read()


def load_in_fresh_process(pkl):
    code = ('import sys, numpy as np, misc, tfutil; tfutil.init_tf(); G, D, Gs = misc.load_pkl(sys.argv[1]); '
            'print(Gs.run(np.zeros([2] + Gs.input_shape[1:], np.float32), np.zeros([2, 0], np.float32)).shape)')
    result = subprocess.run([sys.executable, '-c', code, pkl], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()[-4:]


@pytest.mark.slow
def test_two_node_run_trains_through_two_lods_and_only_the_chief_writes(data8, tmp_path):
    results = str(tmp_path / 'results')
    cfg = write_cluster_config(tmp_path, data8, results, timeout=60)
    procs, logs, nodes = start_nodes(cfg, tmp_path, 'run')
    for proc, log in zip(procs, logs):
        proc.wait(timeout=600)
        assert proc.returncode == 0, read(log)[-4000:]
    [run_dir] = run_dirs(results)      # One run: the other node made no folder of its own.
    assert os.path.isfile(os.path.join(run_dir, '_training-done.txt'))
    chief_log = log_text(run_dir)
    chief_ticks = [(tick.kimg, tick.lod, tick.minibatch) for tick in misc.read_tick_lines(run_dir)]
    lods = [lod for _, lod, _ in chief_ticks]
    assert lods[0] == 1.0 and lods[-1] == 0.0 and any(0 < lod < 1 for lod in lods), lods
    worker_ticks = [(tick.kimg, tick.lod, tick.minibatch) for tick in map(misc.parse_tick_line, read(logs[1]).splitlines())
                    if tick is not None]
    assert worker_ticks == chief_ticks      # The same schedule on both nodes, tick by tick.
    assert chief_log.count('sec/kimg by node: node 0') == len(lods)     # The other node's speed, every tick.
    assert 'Training done on node 1' not in chief_log     # The worker's own output stays on its console.
    worker = read(logs[1])
    assert 'Training done on node 1 (%s)' % nodes[1] in worker
    assert 'Setting up result dir' not in worker and 'Setting up result dir' in read(logs[0])
    assert len(glob.glob(os.path.join(run_dir, 'events.out.tfevents.*'))) == 1
    assert load_in_fresh_process(os.path.join(run_dir, 'network-final.pkl')) == ['(2,', '3,', '8,', '8)']


def kill_mid_run(data8, tmp_path, victim, timeout=20):
    """Two nodes train; after the chief's first snapshot `victim` is killed. Checks that the other
    stops, non-zero, in bounded time, naming the victim; returns (config, results dir)."""
    results = str(tmp_path / 'results')
    cfg = write_cluster_config(tmp_path, data8, results, timeout=timeout, total_kimg=1.0)
    procs, logs, nodes = start_nodes(cfg, tmp_path, 'first')
    survivor = procs[1 - victim]
    try:
        assert wait_for(lambda: any(snapshots(d) for d in run_dirs(results)), 300, procs[0]), read(logs[0])[-3000:]
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.time()
        survivor.wait(timeout=120)
        stopped_after = time.time() - killed_at
        print('node %d stopped %.1f s after node %d was killed' % (1 - victim, stopped_after, victim))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    said = read(logs[1 - victim])
    assert survivor.returncode not in (0, None), said[-3000:]
    assert stopped_after < timeout + 20, (stopped_after, said[-3000:])
    assert re.search(r'Node %d[^.]* \(%s\) cannot be reached' % (victim, re.escape(nodes[victim])), said), said[-3000:]
    return cfg, results


@pytest.mark.slow
def test_a_node_whose_chief_never_starts_gives_up_after_the_startup_timeout(data8, tmp_path):
    cfg = write_cluster_config(tmp_path, data8, str(tmp_path / 'results'), timeout=5)
    with open(cfg, 'at') as file:
        file.write('cluster.startup_timeout = 5\n')
    nodes = addresses(2)
    env = dict(ENV, TF_CONFIG=tf_config(nodes, 1))
    started = time.time()
    result = subprocess.run([sys.executable, 'train.py', cfg], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    said = result.stdout + result.stderr
    waited = time.time() - started
    print('node 1 gave up %.1f s after it started' % waited)
    assert result.returncode != 0 and waited < 120, said[-3000:]
    assert re.search(r'Node 0, the chief \(%s\) cannot be reached' % re.escape(nodes[0]), said), said[-3000:]
    assert 'during start-up' in said and not os.path.exists(tmp_path / 'results')


@pytest.mark.slow
def test_a_killed_chief_stops_the_other_node_which_names_it(data8, tmp_path):
    kill_mid_run(data8, tmp_path, victim=0)


@pytest.mark.slow
def test_a_killed_node_stops_the_chief_which_names_it_and_both_resume(data8, tmp_path):
    cfg, results = kill_mid_run(data8, tmp_path, victim=1)
    [first_run] = run_dirs(results)
    newest = snapshots(first_run)[-1]

    procs, logs, _ = start_nodes(cfg, tmp_path, 'again')      # The same command on both nodes, new ports.
    for proc, log in zip(procs, logs):
        proc.wait(timeout=600)
        assert proc.returncode == 0, read(log)[-4000:]
    second_run = run_dirs(results)[-1]
    assert second_run != first_run and os.path.isfile(os.path.join(second_run, '_training-done.txt'))
    loaded, exact_kimg = resumed_from(second_run)
    assert os.path.samefile(loaded, newest) and exact_kimg is not None and exact_kimg > 0
    assert 'Loading networks from "%s"' % loaded in read(logs[1])    # The worker loaded the chief's choice.


@pytest.mark.slow
def test_sigterm_on_one_node_stops_both_at_the_same_step(data8, tmp_path):
    results = str(tmp_path / 'results')
    cfg = write_cluster_config(tmp_path, data8, results, timeout=60, total_kimg=10)
    procs, logs, nodes = start_nodes(cfg, tmp_path, 'term')
    try:
        assert wait_for(lambda: any(snapshots(d) for d in run_dirs(results)), 300, procs[0]), read(logs[0])[-3000:]
        procs[1].send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [143, 143], [read(log)[-2000:] for log in logs]
    said = [read(log) for log in logs]
    stopped_at = [re.search(r'SIGTERM on node 1 \(%s\) at kimg ([\d.]+)' % re.escape(nodes[1]), text) for text in said]
    assert all(stopped_at), said[0][-2000:]
    assert stopped_at[0].group(1) == stopped_at[1].group(1)
    [run_dir] = run_dirs(results)
    written = json.load(open(os.path.join(run_dir, 'resume-state.json')))
    assert '%.3f' % written['kimg'] == stopped_at[0].group(1)    # The chief's snapshot of the very step they stopped at.
