"""The training graph at each LOD's own image size (the default) against the full-resolution one
(train.full_resolution_graph): on the same reals, labels, latents and mixing factors, with random
weights on a 32-px net with labels, both give the same G and D losses (gradient penalty and drift
term included), the same gradient for every variable, and the same parameters after a training
step with Adam (config.py's settings), with one tower and with two on virtual CPU devices."""

import numpy as np
import pytest

import config
import tfutil
import train
from tf_compat import tf
from tiny_nets import random_draws

NET_KWARGS = dict(num_channels=3, resolution=32, label_size=3, fmap_base=64, fmap_max=16)
MINIBATCH, LATENT, LRATE = 8, 16, 0.001
LODS = [0.0, 0.4, 1.0, 1.5, 2.0, 3.0]      # 3: the lowest LOD of a 32-px net (4x4)
RELATIVE = 1e-5


class FedMinibatch:
    """A training set whose reals, labels and random labels are placeholders, fed at each LOD's size."""
    dynamic_range = [0, 255]
    label_size = NET_KWARGS['label_size']

    def __init__(self):
        self.reals = tf.placeholder(tf.uint8, [None, 3, None, None], name='reals')
        self.labels = tf.placeholder(tf.float32, [None, self.label_size], name='labels')
        self.random_labels = tf.placeholder(tf.float32, [None, self.label_size], name='random_labels')

    def get_minibatch_tf(self):
        return self.reals, self.labels

    def get_random_labels_tf(self, minibatch_size):
        return self.random_labels[:minibatch_size]


def networks():
    G = tfutil.Network('G', func='networks.G_paper', latent_size=LATENT, **NET_KWARGS)
    D = tfutil.Network('D', func='networks.D_paper', **NET_KWARGS)
    return G, D, G.clone('Gs')


@pytest.fixture(scope='module')
def start():
    """Random start values of G and D, and for each LOD a minibatch at its size with its draws."""
    rng = np.random.default_rng(0)
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        values = {net.name: dict(zip(net.vars, tfutil.run(list(net.vars.values())))) for net in networks()[:2]}
    # Random weights give D input gradients of norm near 0, where the penalty hardly depends on the
    # norm's scale; a 10x larger output layer brings them near the target 1.
    values['D']['4x4/Dense1/weight'] *= 10
    one_hot = np.eye(NET_KWARGS['label_size'], dtype=np.float32)
    for lod in LODS:
        size = NET_KWARGS['resolution'] >> int(np.floor(lod))
        values[lod] = dict(
            reals=rng.integers(0, 256, [MINIBATCH, 3, size, size]).astype(np.uint8),
            labels=one_hot[rng.integers(0, 3, MINIBATCH)], random_labels=one_hot[rng.integers(0, 3, MINIBATCH)],
            G_latents=rng.standard_normal([MINIBATCH, LATENT]).astype(np.float32),
            D_latents=rng.standard_normal([MINIBATCH, LATENT]).astype(np.float32),
            mixing=rng.uniform(size=[MINIBATCH, 1, 1, 1]).astype(np.float32))
    return values


def run_at_each_lod(full_resolution, num_gpus, start):
    """{lod: {name: value}}: the losses and gradients (one tower) and the trainables after one
    D step (with the Gs update) and one G step, each LOD from the same start."""
    results = {}
    with tf.Graph().as_default(), tfutil.create_session({'device_count.CPU': 2}).as_default():
        G, D, Gs = networks()
        training_set = FedMinibatch()
        graph, draws = random_draws(lambda: train.build_training_graph(
            G, D, Gs, training_set, num_gpus, full_resolution=full_resolution))
        assert len(draws) == 3 * num_gpus, [d.name for d in draws]     # per tower: G latents, D latents, mixing
        (G_loss, _), (D_loss, _) = graph.G_losses[0], graph.D_losses[0]
        gradients = {'G_grad ' + name: grad for name, grad in zip(G.trainables, tf.gradients(
            tf.reduce_mean(G_loss), list(G.trainables.values())))}
        gradients.update({'D_grad ' + name: grad for name, grad in zip(D.trainables, tf.gradients(
            tf.reduce_mean(D_loss), list(D.trainables.values())))})
        tfutil.init_uninited_vars()
        shadows = [net for _, net in graph.G_losses[1:] + graph.D_losses[1:]]   # the other towers' copies
        for lod in LODS:
            at_lod = start[lod]
            for net in (G, D, Gs, *shadows):
                tfutil.set_vars({net.vars[name]: value for name, value in start[net.name[:1]].items()})
            graph.G_opt.reset_optimizer_state()
            graph.D_opt.reset_optimizer_state()
            feed = {training_set.reals: at_lod['reals'], training_set.labels: at_lod['labels'],
                    training_set.random_labels: at_lod['random_labels'][:MINIBATCH // num_gpus],
                    graph.lod_in: lod, graph.lrate_in: LRATE, graph.minibatch_in: MINIBATCH}
            shares = [np.split(at_lod[name], num_gpus) for name in ('G_latents', 'D_latents', 'mixing')]
            feed.update({draw: shares[i % 3][i // 3] for i, draw in enumerate(draws)})
            if num_gpus == 1:
                results[lod] = tfutil.run({'G_loss': G_loss, 'D_loss': D_loss, **gradients}, feed)
            else:
                results[lod] = {}
            tfutil.run([graph.D_train_op, graph.Gs_update_op], feed)
            tfutil.run(graph.G_train_op, feed)
            for net in (G, D, Gs):
                results[lod].update({net.name + ' ' + name: value for name, value in
                                     zip(net.trainables, tfutil.run(list(net.trainables.values())))})
    return results


def assert_same(native, full, start, lod):
    """Every value within RELATIVE of the full-resolution graph's, relative to its largest
    magnitude. A parameter after the step may also differ by a thousandth of the step Adam takes
    (about LRATE): where a gradient is near epsilon, its rounding shows in the step (biases start
    at 0, so their own magnitude is no scale for that)."""
    assert native.keys() == full.keys()
    for name in native:
        scale = np.abs(full[name]).max()
        error = np.abs(native[name] - full[name]).max()
        step_rounding = 1e-3 * LRATE if name.split()[0] in ('G', 'D', 'Gs') else 0.0
        assert error <= RELATIVE * scale + step_rounding, f'lod {lod}, {name}: off by {error:.3g} of {scale:.3g}'
    moved = [name for name in native if name.startswith(('G ', 'D ')) and not np.allclose(
        native[name], start[name[0]][name[2:]], rtol=0, atol=1e-5)]
    assert len(moved) >= 10, f'lod {lod}: the step hardly changed the parameters'


def check_equivalence(num_gpus, start):
    native = run_at_each_lod(False, num_gpus, start)
    full = run_at_each_lod(True, num_gpus, start)
    for lod in LODS:
        assert_same(native[lod], full[lod], start, lod)
    if num_gpus == 1:
        for lod in LODS:       # Losses that tell the LODs apart: the comparison above has teeth.
            assert np.abs(full[lod]['D_loss']).max() > 0
        assert len({round(float(full[lod]['D_loss'].mean()), 4) for lod in LODS}) == len(LODS)


@pytest.mark.slow
def test_native_graph_gives_the_full_resolution_losses_gradients_and_step(start):
    check_equivalence(1, start)


@pytest.mark.slow
def test_native_graph_steps_like_the_full_resolution_one_on_two_towers(start):
    check_equivalence(2, start)


@pytest.mark.parametrize('lod', [0.0, 0.5, 1.0, 1.5, 2.0])
def test_lod_sized_networks_see_and_give_the_full_resolution_pixels(tf_session, lod):
    """G's LOD-sized images, enlarged, are its full-resolution ones; D scores LOD-sized images as
    their enlargement (a 16-px net with labels, random weights)."""
    kwargs = dict(NET_KWARGS, resolution=16)
    G = tfutil.Network('G', func='networks.G_paper', latent_size=LATENT, **kwargs)
    D = tfutil.Network('D', func='networks.D_paper', **kwargs)
    for net in (G, D):
        net.set_var('lod', lod)
    rng = np.random.default_rng(1)
    latents = tf.constant(rng.standard_normal([4, LATENT]).astype(np.float32))
    labels = tf.constant(np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])
    factor = 2 ** int(np.floor(lod))
    small = rng.standard_normal([4, 3, 16 // factor, 16 // factor]).astype(np.float32)
    fakes_small, fakes_full, scores_small, scores_full = tfutil.run([
        G.get_output_for(latents, labels, lod_sized=True), G.get_output_for(latents, labels),
        D.get_output_for(tf.constant(small), lod_sized=True),
        D.get_output_for(tf.constant(small.repeat(factor, axis=2).repeat(factor, axis=3)))])
    assert fakes_small.shape == small.shape
    np.testing.assert_allclose(fakes_small.repeat(factor, axis=2).repeat(factor, axis=3), fakes_full, rtol=0, atol=1e-5)
    for small_out, full_out in zip(scores_small, scores_full):
        np.testing.assert_allclose(small_out, full_out, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fp16_loss_scaling_trains_the_native_graph(monkeypatch):
    """fp16 networks with dynamic loss scaling on the native graph at a 4x4 LOD of an 8-px net: the
    too-large start scale comes down and the steps then train, all values finite."""
    scaling = config.EasyDict(config.G_opt, use_loss_scaling=True)
    monkeypatch.setattr(config, 'G_opt', scaling)
    monkeypatch.setattr(config, 'D_opt', scaling)
    kwargs = dict(NET_KWARGS, resolution=8, dtype='float16')
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        G = tfutil.Network('G', func='networks.G_paper', latent_size=LATENT, pixelnorm_epsilon=1e-4, **kwargs)
        D = tfutil.Network('D', func='networks.D_paper', **kwargs)
        training_set = FedMinibatch()
        graph = train.build_training_graph(G, D, G.clone('Gs'), training_set, 1)
        tfutil.init_uninited_vars()
        rng = np.random.default_rng(2)
        feed = {training_set.reals: rng.integers(0, 256, [MINIBATCH, 3, 4, 4]).astype(np.uint8),
                training_set.labels: np.eye(3, dtype=np.float32)[rng.integers(0, 3, MINIBATCH)],
                training_set.random_labels: np.eye(3, dtype=np.float32)[rng.integers(0, 3, MINIBATCH)],
                graph.lod_in: 1.0, graph.lrate_in: LRATE, graph.minibatch_in: MINIBATCH}
        before = D.get_var('4x4/Dense0/weight')
        losses = [tfutil.run([graph.D_train_op, graph.G_train_op, graph.D_loss_mean], feed)[-1] for _ in range(80)]
        assert tfutil.run(graph.D_opt.get_loss_scaling_var(graph.D_losses[0][0].device)) < 64.0 - 10
        assert not np.array_equal(D.get_var('4x4/Dense0/weight'), before)
        assert all(np.isfinite(v).all() for v in tfutil.run(list(D.trainables.values()) + list(G.trainables.values())))
        assert np.isfinite(losses[-10:]).all()
