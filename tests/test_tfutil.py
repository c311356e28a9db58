"""tfutil: pickling in a fresh process, multi-device gradient sums, fp16 loss scaling, overflow
skipping, autosummaries read back from the event file."""

import ast
import glob
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import misc
import tfutil
from tf_compat import tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET_KWARGS = dict(num_channels=3, resolution=16, label_size=3, fmap_base=64, fmap_max=16)


def build_networks():
    G = tfutil.Network('G', func='networks.G_paper', latent_size=16, **NET_KWARGS)
    D = tfutil.Network('D', func='networks.D_paper', **NET_KWARGS)
    Gs = G.clone('Gs')
    # Make Gs differ from G, as a trained moving average does.
    Gs.set_var('4x4/Conv/bias', np.full([16], 0.25, np.float32))
    Gs.set_var('lod', np.float32(0.5))
    return G, D, Gs


def test_pickle_round_trip_in_a_fresh_process(tf_session, tmp_path):
    G, D, Gs = build_networks()
    rnd = np.random.RandomState(5)
    latents = rnd.randn(8, 16).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[rnd.randint(3, size=8)]
    expected_fakes = Gs.run(latents, labels)
    expected_scores, expected_label_logits = D.run(expected_fakes)
    pkl = str(tmp_path / 'network-snapshot-000123.pkl')
    misc.save_pkl((G, D, Gs), pkl)
    np.savez(str(tmp_path / 'io.npz'), latents=latents, labels=labels)

    script = textwrap.dedent('''
        import pickle, sys
        import numpy as np
        import tfutil
        from tf_compat import tf
        tfutil.init_tf()
        G, D, Gs = pickle.load(open(sys.argv[1], 'rb'))
        io = np.load(sys.argv[2])
        fakes = Gs.run(io['latents'], io['labels'])
        # Inside a larger graph: G's output fed to D, evaluated in one session run.
        latents_in = tf.constant(io['latents'])
        fakes_expr = Gs.get_output_for(latents_in, tf.constant(io['labels']))
        scores_expr, label_logits_expr = D.get_output_for(fakes_expr)
        graph_fakes, scores, label_logits = tfutil.run([fakes_expr, scores_expr, label_logits_expr])
        np.savez(sys.argv[3], fakes=fakes, graph_fakes=graph_fakes, scores=scores, label_logits=label_logits,
                 names=np.array(list(Gs.vars)), static=np.array(repr(sorted(Gs.static_kwargs.items()))))
    ''')
    out = str(tmp_path / 'out.npz')
    subprocess.run([sys.executable, '-c', script, pkl, str(tmp_path / 'io.npz'), out],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    result = np.load(out)
    assert result["fakes"].shape == (8, 3, 16, 16) and result['fakes'].dtype == np.float32
    np.testing.assert_allclose(result['fakes'], expected_fakes, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result['graph_fakes'], expected_fakes, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result['scores'], expected_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result['label_logits'], expected_label_logits, rtol=1e-4, atol=1e-5)
    assert list(result['names']) == list(Gs.vars)
    assert str(result['static']) == repr(sorted(Gs.static_kwargs.items()))


def test_snapshot_is_written_atomically(tf_session, tmp_path, monkeypatch):
    G, D, Gs = build_networks()
    pkl = str(tmp_path / 'network-snapshot-000001.pkl')
    misc.save_pkl((G, D, Gs), pkl)
    good = open(pkl, 'rb').read()

    def broken_dumps(*args, **kwargs):
        raise RuntimeError('simulated crash while pickling')
    monkeypatch.setattr(pickle, 'dumps', broken_dumps)
    with pytest.raises(RuntimeError):
        misc.save_pkl((G, D, Gs), pkl)
    assert open(pkl, 'rb').read() == good
    assert os.listdir(str(tmp_path)) == ['network-snapshot-000001.pkl']


# ----------------------------------------------------------------------------
# Optimizer.


def scalar_loss(G, D, latents, labels, reals):
    """A deterministic WGAN-like loss pair (no random mixing), per tower."""
    fakes = G.get_output_for(latents, labels)
    fake_scores, _ = D.get_output_for(fakes)
    real_scores, _ = D.get_output_for(reals)
    G_loss = tf.reduce_mean(-fake_scores)
    D_loss = tf.reduce_mean(fake_scores - real_scores + 0.01 * tf.square(real_scores))
    return G_loss, D_loss


def one_step(num_towers, tf_optimizer, learning_rate, inputs):
    """Parameter values after one G and one D step with the minibatch split over num_towers."""
    with tf.Graph().as_default(), tfutil.create_session({'device_count.CPU': 2}).as_default():
        tf.set_random_seed(1)
        kwargs = dict(NET_KWARGS, label_size=0)
        G = tfutil.Network('G', func='networks.G_paper', latent_size=16, **kwargs)
        D = tfutil.Network('D', func='networks.D_paper', mbstd_group_size=0, **kwargs)
        G.set_var('lod', np.float32(0.5))
        D.set_var('lod', np.float32(0.5))
        for net, values in [(G, inputs['G_init']), (D, inputs['D_init'])]:
            tfutil.set_vars({net.vars[name]: value for name, value in values.items()})
        G_opt = tfutil.Optimizer(name='TrainG', tf_optimizer=tf_optimizer, learning_rate=learning_rate)
        D_opt = tfutil.Optimizer(name='TrainD', tf_optimizer=tf_optimizer, learning_rate=learning_rate)
        split = [np.split(inputs[k], num_towers) for k in ['latents', 'labels', 'reals']]
        for tower, device in enumerate(tfutil.device_names(num_towers)):
            with tf.device(device):
                G_t = G if tower == 0 else G.clone('G_shadow')
                D_t = D if tower == 0 else D.clone('D_shadow')
                G_loss, D_loss = scalar_loss(G_t, D_t, *[tf.constant(s[tower]) for s in split])
                G_opt.register_gradients(G_loss, G_t.trainables)
                D_opt.register_gradients(D_loss, D_t.trainables)
        tfutil.run([G_opt.apply_updates(), D_opt.apply_updates()])
        return {name: value for name, value in zip(G.trainables, tfutil.run(list(G.trainables.values())))}, \
               {name: value for name, value in zip(D.trainables, tfutil.run(list(D.trainables.values())))}


@pytest.mark.parametrize('tf_optimizer, learning_rate', [('tf.train.GradientDescentOptimizer', 0.1),
                                                         ('tf.train.AdamOptimizer', 0.001)])
def test_two_towers_give_the_same_update_as_one(tf_optimizer, learning_rate):
    rnd = np.random.RandomState(0)
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        kwargs = dict(NET_KWARGS, label_size=0)
        G = tfutil.Network('G', func='networks.G_paper', latent_size=16, **kwargs)
        D = tfutil.Network('D', func='networks.D_paper', mbstd_group_size=0, **kwargs)
        init = {'G_init': dict(zip(G.vars, tfutil.run(list(G.vars.values())))),
                'D_init': dict(zip(D.vars, tfutil.run(list(D.vars.values()))))}
    inputs = dict(init, latents=rnd.randn(8, 16).astype(np.float32),
                  labels=np.zeros([8, 0], np.float32),
                  reals=rnd.randn(8, 3, 16, 16).astype(np.float32))
    G1, D1 = one_step(1, tf_optimizer, learning_rate, inputs)
    G2, D2 = one_step(2, tf_optimizer, learning_rate, inputs)
    moved = 0
    for one, two, start in [(G1, G2, inputs['G_init']), (D1, D2, inputs['D_init'])]:
        for name in one:
            np.testing.assert_allclose(two[name], one[name], atol=1e-5, rtol=0, err_msg=name)
            moved += np.abs(one[name] - start[name]).max() > 1e-4   # Ten times the tolerance.
    assert moved >= 10     # The step really changed the parameters.


def test_nonfinite_gradients_are_skipped_and_lower_the_loss_scale(tf_session):
    D = tfutil.Network('D', func='networks.D_paper', **dict(NET_KWARGS, label_size=0))
    poison = tf.placeholder(tf.float32, [])
    scores, _ = D.get_output_for(tf.constant(np.random.RandomState(1).randn(4, 3, 16, 16).astype(np.float32)))
    opt = tfutil.Optimizer(name='TrainD', learning_rate=0.01, use_loss_scaling=True, loss_scaling_init=10.0,
                           loss_scaling_inc=0.5, loss_scaling_dec=2.0)
    opt.register_gradients(tf.reduce_mean(scores) * poison, D.trainables)
    train_op = opt.apply_updates()
    ls_var = opt.get_loss_scaling_var(scores.device)
    before = D.get_var('4x4/Dense1/weight')

    tfutil.run(train_op, {poison: np.float32(np.nan)})
    assert np.array_equal(D.get_var('4x4/Dense1/weight'), before)       # Skipped.
    assert tfutil.run(ls_var) == pytest.approx(8.0)                      # Lowered by loss_scaling_dec.

    tfutil.run(train_op, {poison: np.float32(1.0)})
    assert not np.array_equal(D.get_var('4x4/Dense1/weight'), before)   # Applied.
    assert tfutil.run(ls_var) == pytest.approx(8.5)


@pytest.mark.slow
def test_fp16_trains_with_loss_scaling(tf_session):
    import loss
    import dataset
    kwargs = dict(NET_KWARGS, label_size=0, resolution=8, dtype='float16')
    G = tfutil.Network('G', func='networks.G_paper', latent_size=16, pixelnorm_epsilon=1e-4, **kwargs)
    D = tfutil.Network('D', func='networks.D_paper', **kwargs)
    training_set = dataset.SyntheticDataset(resolution=8, num_channels=3)
    reals = tf.constant(np.random.RandomState(2).uniform(-1, 1, [8, 3, 8, 8]).astype(np.float32))
    G_opt = tfutil.Optimizer(name='TrainG', learning_rate=0.001, use_loss_scaling=True, beta1=0.0, beta2=0.99)
    D_opt = tfutil.Optimizer(name='TrainD', learning_rate=0.001, use_loss_scaling=True, beta1=0.0, beta2=0.99)
    G_loss = loss.G_wgan_acgan(G, D, G_opt, training_set, 8)
    D_loss = loss.D_wgangp_acgan(G, D, D_opt, training_set, 8, reals, tf.zeros([8, 0]))
    G_opt.register_gradients(tf.reduce_mean(G_loss), G.trainables)
    D_opt.register_gradients(tf.reduce_mean(D_loss), D.trainables)
    G_train, D_train = G_opt.apply_updates(), D_opt.apply_updates()
    ls_var = D_opt.get_loss_scaling_var(D_loss.device)
    before = D.get_var('4x4/Dense0/weight')
    assert G.output_templates[0].dtype == tf.float16

    losses = []
    for _ in range(80):
        _, _, d_loss = tfutil.run([D_train, G_train, tf.reduce_mean(D_loss)])
        losses.append(d_loss)
    # The original start (2**64) overflows fp16: early steps are skipped, the scale comes down...
    assert tfutil.run(ls_var) < 64.0 - 10
    # ...until steps go through and train.
    assert not np.array_equal(D.get_var('4x4/Dense0/weight'), before)
    assert all(np.isfinite(v).all() for v in tfutil.run(list(D.trainables.values()) + list(G.trainables.values())))
    assert np.isfinite(losses[-10:]).all()


def test_autosummaries_average_per_flush_and_reach_the_event_file(tf_session, tmp_path):
    x = tf.placeholder(tf.float32, [None])
    op = tfutil.autosummary('Loss/x', x)
    writer = tf.summary.FileWriter(str(tmp_path))
    tfutil.run(op, {x: [1.0, 2.0, 3.0]})
    tfutil.run(op, {x: [6.0]})
    tfutil.autosummary('Progress/kimg', 7.5)
    tfutil.save_summaries(writer, 100)
    tfutil.run(op, {x: [10.0, np.inf]})     # A non-finite batch is left out of the average.
    tfutil.run(op, {x: [4.0]})
    tfutil.autosummary('Progress/kimg', 9.0)
    tfutil.save_summaries(writer, 200)
    writer.close()
    values = {}
    for event_file in glob.glob(str(tmp_path / 'events.out.tfevents.*')):
        for event in tf.train.summary_iterator(event_file):
            for value in event.summary.value:
                values[(value.tag, event.step)] = value.simple_value
    assert values[('Loss/x', 100)] == pytest.approx(3.0)
    assert values[('Progress/kimg', 100)] == pytest.approx(7.5)
    assert values[('Progress/kimg', 200)] == pytest.approx(9.0)
    assert values[('Loss/x', 200)] == pytest.approx(4.0)


# ----------------------------------------------------------------------------
# Unpickling changes no global state.


def test_unpickling_leaves_numpy_random_state_alone(tf_session, tmp_path):
    pkl = str(tmp_path / 'network-snapshot-000001.pkl')
    misc.save_pkl(build_networks(), pkl)
    script = textwrap.dedent('''
        import pickle, sys
        import numpy as np
        import config, tfutil       # A program with a config, as train.py and the notebooks are.
        from tf_compat import tf
        np.random.seed(7)
        before = np.random.get_state()
        with open(sys.argv[1], 'rb') as f:
            G, D, Gs = pickle.load(f)
        after = np.random.get_state()
        same = before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
        print('numpy state unchanged:', same)
        print('graph seed:', tf.get_default_graph().seed)
        print('output shape:', Gs.run(np.zeros([2, 16], np.float32), np.zeros([2, 3], np.float32)).shape)
    ''')
    proc = subprocess.run([sys.executable, '-c', script, pkl], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'numpy state unchanged: True' in proc.stdout
    assert 'graph seed: None' in proc.stdout
    assert 'output shape: (2, 3, 16, 16)' in proc.stdout     # A default session was made to run it.


# ----------------------------------------------------------------------------
# Import by name.


def test_import_by_name_says_what_is_missing():
    import networks
    assert tfutil.import_obj('networks.G_paper') is networks.G_paper
    assert tfutil.import_obj('tf.train.AdamOptimizer') is tf.train.AdamOptimizer
    with pytest.raises(AttributeError, match='module networks has no attribute G_papr'):
        tfutil.import_obj('networks.G_papr')
    with pytest.raises(AttributeError, match='module tf.train has no attribute AdamOptimzer'):
        tfutil.import_obj('tf.train.AdamOptimzer')
    with pytest.raises(ImportError, match='no module named netwrks'):
        tfutil.import_obj('netwrks.G_paper')
    with pytest.raises(ImportError, match='dotted name'):
        tfutil.import_obj('G_paper')
    with pytest.raises(TypeError, match='func is missing'):
        tfutil.call_func_by_name(latents_in=None)
    with pytest.raises(AttributeError, match='module networks has no attribute D_papr'):
        tfutil.Network('D', func='networks.D_papr')


# ----------------------------------------------------------------------------
# print_layers.


def channels_last_net(images_in, **_kwargs):
    """A network in the shape of ours: NCHW outside, NHWC inside, transposes named at will."""
    images_in.set_shape([None, 3, 8, 8])
    with tf.name_scope('ToChannelsLast'):
        x = tf.transpose(images_in, [0, 2, 3, 1])
    with tf.variable_scope('Conv'):
        w = tf.get_variable('weight', shape=[3, 3, 3, 5], initializer=tf.initializers.random_normal())
        x = tf.nn.conv2d(x, w, strides=[1, 1, 1, 1], padding='SAME')
    with tf.name_scope('ToChannelsFirst'):
        x = tf.transpose(x, [0, 3, 1, 2])
    return tf.identity(x, name='images_out')


def printed_rows(net, capsys):
    net.print_layers()
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line.split(None, 1)[1] for line in lines[3:] if line.strip() and line[0] != '-'}


def test_print_layers_shows_nchw_shapes_and_no_layout_transposes(tf_session, capsys):
    net = tfutil.Network('Tiny', func='test_tfutil.channels_last_net')
    rows = printed_rows(net, capsys)
    assert list(rows) == ['images_in', 'Conv', 'images_out', 'Total']
    assert rows['images_in'].split() == ['-', '(?,', '3,', '8,', '8)', '-']
    assert rows['Conv'].split() == ['135', '(?,', '5,', '8,', '8)', '(3,', '3,', '3,', '5)']
    assert rows['images_out'].split() == ['-', '(?,', '5,', '8,', '8)', '-']
    assert rows['Total'].split() == ['135']

    G, D, _ = build_networks()
    rows = printed_rows(G, capsys)
    assert not any('transpose' in name.lower() for name in rows)
    assert '(?, 16, 4, 4)' in rows['4x4/Dense'] and '(?, 16, 4, 4)' in rows['4x4/Conv']
    assert '(?, 3, 4, 4)' in rows['ToRGB_lod2'] and '(?, 8, 16, 16)' in rows['16x16/Conv1']
    assert '(?, 3, 16, 16)' in rows['Grow_lod0'] and '(?, 3, 16, 16)' in rows['images_out']
    assert rows['Total'].split() == [str(sum(int(np.prod(v.shape.as_list())) for v in G.trainables.values()))]
    rows = printed_rows(D, capsys)
    assert not any('transpose' in name.lower() for name in rows)
    assert '(?, 3, 16, 16)' in rows['images_in'] and '(?, 8, 16, 16)' in rows['FromRGB_lod0']
    assert '(?, 1, 4, 4)' in rows['4x4/MinibatchStddev'] and '(?, 4)' in rows['4x4/Dense1']


# ----------------------------------------------------------------------------
# Imports run one way.


def project_imports(module_name):
    """The project modules `module_name` imports, anywhere in its code (functions included)."""
    project = {os.path.splitext(f)[0] for f in os.listdir(REPO) if f.endswith('.py')}
    with open(os.path.join(REPO, module_name + '.py'), encoding='utf-8') as file:
        tree = ast.parse(file.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names & project


def test_legacy_imports_only_downward():
    """legacy.py sits below tfutil: it may reach TensorFlow and the local networks, nothing that
    imports it back (tests/test_imports.py checks the whole graph for cycles)."""
    assert project_imports('legacy') <= {'tf_compat', 'networks'}
    assert project_imports('networks') == set()
