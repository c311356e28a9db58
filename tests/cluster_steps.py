"""Run a few training steps of train.build_training_graph in this process, as one node of a
multi-node run or as a single process with several devices, and save the resulting variables.

    python tests/cluster_steps.py START.npz OUT.npz DEVICES [ADDRESSES INDEX] [--fp16]

START.npz holds the start values of G, D and Gs, the global minibatch of reals, and per step the
random draws of the whole minibatch (G's latents, D's latents, the mixing factors). Each tower
takes its slice of the minibatch and of the draws by its global index (node index x DEVICES +
device), so any split of the work over nodes and devices sees the same numbers. A node other than
the chief starts from its own random weights: the chief's arrive by broadcast_from_chief.
"""

import sys

import numpy as np

import cluster
import config
import tfutil
import train
from tiny_nets import FixedMinibatch, random_draws

NET_KWARGS = dict(num_channels=3, resolution=8, label_size=0, fmap_base=32, fmap_max=16)
LATENT, LOD, LRATE, G_SMOOTHING = 16, 0.5, 0.002, 0.9
DRAW_NAMES = ('G_latents', 'D_latents', 'mixing')    # In the order each tower makes them.


def configure(devices, fp16):
    config.num_gpus = devices
    config.tf_config = {}
    config.random_seed = 1000
    opt = dict(beta1=0.0, beta2=0.99, epsilon=1e-8)
    if fp16:
        opt.update(use_loss_scaling=True, loss_scaling_init=8.0)     # Low enough that most steps apply.
    config.G_opt, config.D_opt = dict(opt), dict(opt)


def build_networks(start, fp16, is_chief):
    dtype = 'float16' if fp16 else 'float32'
    G = tfutil.Network('G', func='networks.G_paper', latent_size=LATENT, dtype=dtype, **NET_KWARGS)
    D = tfutil.Network('D', func='networks.D_paper', mbstd_group_size=0, dtype=dtype, **NET_KWARGS)
    Gs = G.clone('Gs')
    if is_chief:
        for net in (G, D, Gs):
            tfutil.set_vars({net.vars[name]: start['%s/%s' % (net.name, name)] for name in net.vars})
    return G, D, Gs


def step_feed(start, step, draws, first_tower, devices):
    """The draws of this process's towers at `step`: tower t takes share first_tower + t."""
    towers = start['reals'].shape[0] // start['share']
    feed = {}
    for tower in range(devices):
        for kind, draw in zip(DRAW_NAMES, draws[3 * tower:3 * tower + 3]):
            feed[draw] = np.split(start['%s/%d' % (kind, step)], towers)[first_tower + tower]
    return feed


def main(start_npz, out_npz, devices, addresses=None, index=0, fp16=False):
    start = dict(np.load(start_npz))
    configure(devices, fp16)
    node = cluster.Node(addresses.split(','), index, timeout=60, startup_timeout=120) if addresses else cluster.LocalNode()
    train.start_tensorflow(node)
    G, D, Gs = build_networks(start, fp16, node.is_chief)
    share = int(start['share'])
    mine = start['reals'][node.index * devices * share:(node.index + 1) * devices * share]
    graph, draws = random_draws(lambda: train.build_training_graph(
        G, D, Gs, FixedMinibatch(mine), devices, drange_net=[-1, 1], G_smoothing=G_SMOOTHING, node=node))
    assert len(draws) == 3 * devices, [draw.name for draw in draws]
    tfutil.init_uninited_vars()
    node.broadcast_from_chief(train.trained_variables(G, D, Gs, graph))
    schedule = {graph.lod_in: LOD, graph.lrate_in: LRATE, graph.minibatch_in: len(mine), graph.signal_in: 0}
    reports = []
    for step in range(int(start['steps'])):
        feed = {**schedule, **step_feed(start, step, draws, node.index * devices, devices)}
        reports.append(node.run([graph.D_train_op, graph.Gs_update_op, graph.D_report], feed)[-1][0])
        reports.append(node.run([graph.G_train_op, graph.G_report], feed)[-1][0])
    saved = {'%s/%s' % (net.name, name): value for net in (G, D, Gs) for name, value in
             zip(net.vars, tfutil.run(list(net.vars.values())))}
    loss_scales = [var for var in graph.G_opt.variables() + graph.D_opt.variables() if 'LossScalingVars' in var.name]
    saved.update({'loss_scale/' + var.name: value for var, value in zip(loss_scales, tfutil.run(loss_scales))})
    np.savez(out_npz, reports=np.array(reports), **saved)


if __name__ == '__main__':
    args = [arg for arg in sys.argv[1:] if arg != '--fp16']
    main(args[0], args[1], int(args[2]), *(args[3:4] + [int(a) for a in args[4:5]]), fp16='--fp16' in sys.argv)
