"""Training speed on this machine, per phase of a progressive run (fp32, the stable part of each
phase), for three graphs measured side by side in one run:

  native    the training graph at each LOD's own image size (the default);
  full-res  the same networks with every image at full resolution (train.full_resolution_graph);
  alone     a network built at that phase's resolution only, at its LOD 0: what the phase's
            work costs without any larger network around it.

plus graph-construction time and, on the native graph, the framework's training step against the
bare G+D forward/backward work of the same graph (the loop's own overhead).

    python bench/train_speed.py [--resolution 512] [--kimg 0.128]

Synthetic data (zeros) takes data loading out of the figures; the networks are small (fmap_base
256, fmap_max 64). Targets: the 4x4 phase costs at most 1.5x the 4x4-alone network, and no phase
of the native graph is slower than full resolution.
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
# The BENCHMARK line of config.py: 3 kimg per phase from 4x4, ticks of 1 kimg.
SCHED = dict(lod_initial_resolution=4, lod_training_kimg=3, lod_transition_kimg=3, minibatch_base=MINIBATCH,
             tick_kimg_base=1, tick_kimg_dict={})


class Built:
    """A training graph in a graph and session of its own; `with built:` makes them the default."""

    def __init__(self, resolution, full_resolution):
        self.tf_graph = tf.Graph()
        with self.tf_graph.as_default():
            self.session = tfutil.create_session()
        with self:
            self.training_set, self.graph, self.build_sec = build(resolution, full_resolution)

    def __enter__(self):
        self._contexts = [self.tf_graph.as_default(), self.session.as_default()]
        for context in self._contexts:
            context.__enter__()

    def __exit__(self, *exc):
        for context in reversed(self._contexts):
            context.__exit__(*exc)

    def close(self):
        self.session.close()


def build(resolution, full_resolution):
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
    graph = train.build_training_graph(G, D, Gs, training_set, num_gpus=1, full_resolution=full_resolution)
    (G_loss, G_net), = graph.G_losses
    (D_loss, D_net), = graph.D_losses
    # The bare work: forward and backward passes of the same losses, nothing applied or recorded.
    graph.bare_G = tf.gradients(tf.reduce_mean(G_loss), list(G_net.trainables.values()))
    graph.bare_D = tf.gradients(tf.reduce_mean(D_loss), list(D_net.trainables.values()))
    tfutil.init_uninited_vars()
    return training_set, graph, time.time() - start


def framework_steps(training_set, graph, kimg, minibatch_count):
    """What train_progressive_gan does per minibatch: schedule, configure, D step + Gs update, G step."""
    nimg = int(kimg * 1000)
    for _ in range(0, minibatch_count, REPEATS):
        sched = train.TrainingSchedule(nimg, training_set, num_gpus=1, **SCHED)
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


def timed(built, func, *args):
    with built:
        start = time.time()
        func(*args)
        return time.time() - start


def stable_kimg(level):
    """Progress (kimg) in the stable part of the phase that trains 2**(level + 2) pixels."""
    return level * (SCHED['lod_training_kimg'] + SCHED['lod_transition_kimg'])


def time_phase(native, full, alone, level, minibatches):
    """sec per minibatch of the phase's loop on each graph, and of the native graph's bare work.
    Warmed up first; then measured in two alternating halves, so that load from elsewhere hits all alike."""
    kimg = stable_kimg(level)
    lod = train.TrainingSchedule(kimg * 1000, native.training_set, num_gpus=1, **SCHED).lod
    runs = {
        'native': (native, framework_steps, native.training_set, native.graph, kimg),
        'bare': (native, bare_steps, native.graph, lod),
        'full-res': (full, framework_steps, full.training_set, full.graph, kimg),
        'alone': (alone, framework_steps, alone.training_set, alone.graph, kimg),   # its last phase: LOD 0
    }
    for built, func, *args in runs.values():
        timed(built, func, *args, REPEATS)
    seconds = dict.fromkeys(runs, 0.0)
    for _ in range(2):
        for name, (built, func, *args) in runs.items():
            seconds[name] += timed(built, func, *args, minibatches // 2)
    return {name: sec / minibatches for name, sec in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--resolution', type=int, default=512)
    parser.add_argument('--kimg', type=float, default=0.128, help='kimg timed per phase and graph')
    args = parser.parse_args()

    tfutil.init_tf()
    native, full = Built(args.resolution, False), Built(args.resolution, True)
    print('Graph construction (G, D, Gs, losses, optimizers) of the %d-px net: native %.1f s, full-res %.1f s' % (
        args.resolution, native.build_sec, full.build_sec))
    minibatches = max(REPEATS, int(round(args.kimg * 1000 / MINIBATCH / REPEATS)) * REPEATS)
    per_kimg = 1000.0 / MINIBATCH
    print('sec/kimg per phase:')
    print('%-10s %9s %9s %9s %13s %14s %10s' % ('resolution', 'native', 'full-res', 'alone', 'native/alone',
                                                 'native/full-res', 'loop/bare'))
    total_loop = total_bare = 0.0
    for level in range(native.training_set.resolution_log2 - 1):
        side = 2 ** (level + 2)
        alone = Built(side, False)
        sec = time_phase(native, full, alone, level, minibatches)
        alone.close()
        total_loop += sec['native']
        total_bare += sec['bare']
        print('%-10s %9.2f %9.2f %9.2f %13.2f %14.2f %10.3f' % (
            '%dx%d' % (side, side), sec['native'] * per_kimg, sec['full-res'] * per_kimg, sec['alone'] * per_kimg,
            sec['native'] / sec['alone'], sec['native'] / sec['full-res'], sec['native'] / sec['bare']))
    print('Training step overhead over the bare G+D forward/backward work: loop/bare = %.3f (%+.1f%%)' % (
        total_loop / total_bare, (total_loop / total_bare - 1) * 100))


if __name__ == '__main__':
    main()
