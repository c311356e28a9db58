"""Training speed on this machine: sec/kimg per resolution for fp32 under the BENCHMARK schedule's
phases, graph-construction time, and the framework's training step against the bare G+D
forward/backward work of the same graph (the loop's own overhead).

    python bench/train_speed.py [--resolution 64] [--kimg 1.0]

Synthetic data (zeros) takes data loading out of the figures; the networks are the CPU demo
preset's. The headline ratio is printed last.
"""

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import dataset  # noqa: E402
import tfutil  # noqa: E402
import train  # noqa: E402
from tf_compat import tf  # noqa: E402

NETS = dict(fmap_base=256, fmap_max=64)
MINIBATCH = 16
REPEATS = 4      # train.minibatch_repeats: minibatches between schedule updates.


def build(resolution):
    config.num_gpus = 1
    config.G_opt = config.EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8)
    config.D_opt = config.EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8)
    config.G_loss = config.EasyDict(func='loss.G_wgan_acgan')
    config.D_loss = config.EasyDict(func='loss.D_wgangp_acgan')
    start = time.time()
    training_set = dataset.SyntheticDataset(resolution=resolution, num_channels=3)
    G = tfutil.Network('G', func='networks.G_paper', num_channels=3, resolution=resolution, label_size=0,
                       latent_size=64, **NETS)
    D = tfutil.Network('D', func='networks.D_paper', num_channels=3, resolution=resolution, label_size=0, **NETS)
    Gs = G.clone('Gs')
    graph = train.build_training_graph(G, D, Gs, training_set, num_gpus=1)
    (G_loss, G_net), = graph.G_losses
    (D_loss, D_net), = graph.D_losses
    # The bare work: forward and backward passes of the same losses, nothing applied or recorded.
    graph.bare_G = tf.gradients(tf.reduce_mean(G_loss), list(G_net.trainables.values()))
    graph.bare_D = tf.gradients(tf.reduce_mean(D_loss), list(D_net.trainables.values()))
    graph.build_sec = time.time() - start
    return training_set, graph


def framework_steps(training_set, graph, sched_kwargs, kimg, minibatch_count):
    """What train_progressive_gan does per minibatch: schedule, configure, D step + Gs update, G step."""
    nimg = int(kimg * 1000)
    for _ in range(0, minibatch_count, REPEATS):
        sched = train.TrainingSchedule(nimg, training_set, num_gpus=1, **sched_kwargs)
        training_set.configure(sched.minibatch, sched.lod)
        for _ in range(REPEATS):
            tfutil.run([graph.D_train_op, graph.Gs_update_op],
                       {graph.lod_in: sched.lod, graph.lrate_in: sched.D_lrate, graph.minibatch_in: sched.minibatch})
            tfutil.run([graph.G_train_op],
                       {graph.lod_in: sched.lod, graph.lrate_in: sched.G_lrate, graph.minibatch_in: sched.minibatch})
            nimg += sched.minibatch


def bare_steps(graph, lod, minibatch_count):
    feed = {graph.lod_in: lod, graph.minibatch_in: MINIBATCH}
    for _ in range(minibatch_count):
        tfutil.run(graph.bare_D, feed)
        tfutil.run(graph.bare_G, feed)


def timed(func, *args):
    start = time.time()
    func(*args)
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--resolution', type=int, default=64)
    parser.add_argument('--kimg', type=float, default=1.0, help='kimg timed per resolution and mode')
    args = parser.parse_args()

    tfutil.init_tf()
    training_set, graph = build(args.resolution)
    # The BENCHMARK line of config.py: 3 kimg per phase from 4x4, ticks of 1 kimg.
    sched_kwargs = dict(lod_initial_resolution=4, lod_training_kimg=3, lod_transition_kimg=3, minibatch_base=MINIBATCH,
                        tick_kimg_base=1, tick_kimg_dict={})
    minibatches = max(REPEATS, int(round(args.kimg * 1000 / MINIBATCH / REPEATS)) * REPEATS)
    print('Graph construction (G, D, Gs, losses, optimizers): %.1f s' % graph.build_sec)
    print('%-10s %-10s %14s %14s %10s' % ('resolution', 'phase kimg', 'sec/kimg loop', 'sec/kimg bare', 'loop/bare'))
    total_loop = total_bare = 0.0
    for level in range(training_set.resolution_log2 - 1):
        phase_kimg = level * 6.0       # The stable (not fading) part of each phase.
        sched = train.TrainingSchedule(phase_kimg * 1000, training_set, num_gpus=1, **sched_kwargs)
        framework_steps(training_set, graph, sched_kwargs, phase_kimg, REPEATS)     # Warm up this LOD.
        bare_steps(graph, sched.lod, REPEATS)
        loop_sec = bare_sec = 0.0
        for _ in range(2):     # Alternate, so that load from elsewhere hits both alike.
            loop_sec += timed(framework_steps, training_set, graph, sched_kwargs, phase_kimg, minibatches // 2)
            bare_sec += timed(bare_steps, graph, sched.lod, minibatches // 2)
        kimg_done = minibatches * MINIBATCH / 1000.0
        total_loop += loop_sec
        total_bare += bare_sec
        print('%-10s %-10s %14.2f %14.2f %10.3f' % ('%dx%d' % (sched.resolution, sched.resolution), phase_kimg,
                                                   loop_sec / kimg_done, bare_sec / kimg_done, loop_sec / bare_sec))
    print('Training step overhead over the bare G+D forward/backward work: loop/bare = %.3f (%+.1f%%)' % (
        total_loop / total_bare, (total_loop / total_bare - 1) * 100))


if __name__ == '__main__':
    main()
