"""train.build_training_graph with two towers on two virtual CPU devices: one step of it equals one
step of the one-tower graph on the same minibatch (the random latents and mixing factors fed, split
between the towers as the minibatch is), the Gs moving average follows G_smoothing, and each
tower's ops sit on its own device."""

import numpy as np
import pytest

import tfutil
import train
from tf_compat import tf
from tiny_nets import FixedMinibatch, random_draws

NET_KWARGS = dict(num_channels=3, resolution=8, label_size=0, fmap_base=32, fmap_max=16)
MINIBATCH, LATENT, LOD, LRATE, G_SMOOTHING = 8, 16, 0.5, 0.001, 0.9


def build(num_gpus, start):
    """Networks holding the start values and the training graph; the fed draws per tower."""
    G = tfutil.Network('G', func='networks.G_paper', latent_size=LATENT, **NET_KWARGS)
    D = tfutil.Network('D', func='networks.D_paper', mbstd_group_size=0, **NET_KWARGS)   # groups span towers
    Gs = G.clone('Gs')
    for net in (G, D, Gs):
        tfutil.set_vars({net.vars[name]: value for name, value in start[net.name].items()})
    graph, draws = random_draws(lambda: train.build_training_graph(
        G, D, Gs, FixedMinibatch(start['reals']), num_gpus, drange_net=[-1, 1], G_smoothing=G_SMOOTHING))
    tfutil.init_uninited_vars()
    return (G, D, Gs), graph, draws


def draw_feed(draws, num_gpus, start):
    """Each tower draws G's latents, then D's latents and mixing factors, for its share."""
    assert len(draws) == 3 * num_gpus, [d.name for d in draws]
    values = [np.split(start[name], num_gpus) for name in ('G_latents', 'D_latents', 'mixing')]
    return {draw: values[i % 3][i // 3] for i, draw in enumerate(draws)}


def one_step(num_gpus, start):
    """G, D and Gs trainables after one D step (with the Gs update) and one G step."""
    with tf.Graph().as_default(), tfutil.create_session({'device_count.CPU': 2}).as_default():
        nets, graph, draws = build(num_gpus, start)
        feed = draw_feed(draws, num_gpus, start)
        feed.update({graph.lod_in: LOD, graph.lrate_in: LRATE, graph.minibatch_in: MINIBATCH})
        tfutil.run([graph.D_train_op, graph.Gs_update_op], feed)
        tfutil.run(graph.G_train_op, feed)
        return {net.name: dict(zip(net.trainables, tfutil.run(list(net.trainables.values())))) for net in nets}


@pytest.fixture(scope='module')
def start():
    """Start values of G, D and a Gs unlike G (as after training), a minibatch, the draws."""
    rng = np.random.default_rng(0)
    values = {}
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        G = tfutil.Network('G', func='networks.G_paper', latent_size=LATENT, **NET_KWARGS)
        D = tfutil.Network('D', func='networks.D_paper', mbstd_group_size=0, **NET_KWARGS)
        for net in (G, D):
            values[net.name] = dict(zip(net.vars, tfutil.run(list(net.vars.values()))))
    values['Gs'] = {name: value + np.float32(0.1) * rng.standard_normal(value.shape).astype(np.float32)
                    for name, value in values['G'].items()}
    values['reals'] = rng.integers(0, 256, [MINIBATCH, 3, 8, 8]).astype(np.uint8)
    values['G_latents'] = rng.standard_normal([MINIBATCH, LATENT]).astype(np.float32)
    values['D_latents'] = rng.standard_normal([MINIBATCH, LATENT]).astype(np.float32)
    values['mixing'] = rng.uniform(size=[MINIBATCH, 1, 1, 1]).astype(np.float32)
    return values


def test_two_towers_step_like_one(start):
    one, two = one_step(1, start), one_step(2, start)
    moved = 0
    for net in ('G', 'D', 'Gs'):
        for name in one[net]:
            np.testing.assert_allclose(two[net][name], one[net][name], rtol=0, atol=1e-5, err_msg=f'{net} {name}')
            moved += np.abs(one[net][name] - start[net][name]).max() > 1e-4
    assert moved >= 20, 'the step hardly changed the parameters'
    # Gs moved towards G as it was before its step: Gs <- G + G_smoothing * (Gs - G).
    for name, value in one['Gs'].items():
        expected = start['G'][name] + G_SMOOTHING * (start['Gs'][name] - start['G'][name])
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg='Gs ' + name)


def test_each_tower_sits_on_its_device(start):
    with tf.Graph().as_default(), tfutil.create_session({'device_count.CPU': 2}).as_default():
        build(2, start)
        ops = tf.get_default_graph().get_operations()
        for tower in (0, 1):
            tower_ops = [op for op in ops if op.name.startswith(f'GPU{tower}/')]
            for part in ('ProcessReals', 'G_loss', 'D_loss'):
                assert any(op.name.startswith(f'GPU{tower}/{part}/') for op in tower_ops), (tower, part)
            placed = [op for op in tower_ops if not colocated_with_another_op(op)]
            elsewhere = [(op.name, op.device) for op in placed if not op.device.lower().endswith(f'cpu:{tower}')]
            assert not elsewhere, elsewhere[:5]
            if tower == 1:    # its own copies of the networks' variables, checked above
                assert any(op.type.startswith('Variable') for op in tower_ops)


def colocated_with_another_op(op):
    """True for ops TF places with another (a variable's assign or read): they follow it."""
    return op.colocation_groups() != [('loc:@' + op.name).encode()]
