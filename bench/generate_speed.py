"""Images per second from Gs.run at the demo resolution, against a bare session.run of the same
output in the same run, and the time the multi-scale SWD takes for 8k images.

  python bench/generate_speed.py [--resolution 64] [--minibatch 64] [--seconds 3] [--swd-images 8192]

Gs is config.py's generator (config.G: the CPU demo preset's feature maps) at --resolution.
  Gs.run:       Gs.run(latents, labels, minibatch_size, out_mul=127.5, out_add=127.5, out_dtype=uint8),
                the way util_scripts and the metrics generate;
  session.run:  one session.run per minibatch of the same network output, scaled, rounded and cast
                to uint8 in the graph, fed from preallocated arrays: what Gs.run costs at the least.
SWD: --swd-images generated images as fakes against as many smooth random images as reals, fed
in minibatches as evaluate_metrics does; its sorting floor is the time numpy needs to sort the
projections alone (levels x 512 directions x 2 sets of images*128 values), in CPU seconds.
"""

import argparse
import os
import sys
import time

import numpy as np
import scipy.ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import tfutil  # noqa: E402
from metrics import sliced_wasserstein  # noqa: E402
from tf_compat import tf  # noqa: E402


def build_gs(resolution):
    return tfutil.Network('Gs', num_channels=3, resolution=resolution, label_size=0, **config.G)


def bare_output(Gs):
    """The output tensor Gs.run evaluates, built directly: placeholders in, uint8 out."""
    latents_in = tf.placeholder(tf.float32, [None] + Gs.input_shape[1:])
    labels_in = tf.placeholder(tf.float32, [None] + Gs.input_shapes[1][1:])
    images = Gs.get_output_for(latents_in, labels_in)
    return latents_in, labels_in, tf.saturate_cast(tf.round(images * 127.5 + 127.5), tf.uint8)


def interleaved_rates(producers, seconds, rounds=4):
    """Images per wall-clock second and per CPU second of each producer (a callable returning how
    many images it made), in interleaved rounds so that load from other processes hits all alike."""
    for produce in producers.values():
        produce()  # Warm-up: graph optimisation, allocations.
    totals = {name: [0, 0.0, 0.0] for name in producers}
    for _ in range(rounds):
        for name, produce in producers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            count = 0
            while time.perf_counter() - start < seconds / rounds:
                count += produce()
            totals[name][0] += count
            totals[name][1] += time.perf_counter() - start
            totals[name][2] += time.process_time() - start_cpu
    return {name: (count / wall, count / cpu) for name, (count, wall, cpu) in totals.items()}


def generation_rates(Gs, minibatch, seconds):
    latents = np.random.RandomState(0).randn(minibatch, *Gs.input_shape[1:]).astype(np.float32)
    labels = np.zeros([minibatch] + Gs.input_shapes[1][1:], np.float32)
    latents_in, labels_in, output = bare_output(Gs)
    session = tf.get_default_session()

    def gs_run():
        Gs.run(latents, labels, minibatch_size=minibatch, out_mul=127.5, out_add=127.5, out_dtype=np.uint8)
        return minibatch

    def session_run():
        session.run(output, {latents_in: latents, labels_in: labels})
        return minibatch

    return interleaved_rates({'Gs.run': gs_run, 'session.run': session_run}, seconds)


def smooth_images(count, resolution, random_state):
    noise = random_state.randn(count, 3, resolution, resolution).astype(np.float32)
    return np.uint8(np.clip(128 + 400 * scipy.ndimage.gaussian_filter(noise, [0, 0, 2, 2]), 0, 255))


class Stopwatch:
    """Wall-clock and CPU seconds (all threads of this process) of named phases."""

    def __init__(self):
        self.phases = {}

    def start(self):
        self._start = (time.perf_counter(), time.process_time())

    def stop(self, name):
        self.phases[name] = (time.perf_counter() - self._start[0], time.process_time() - self._start[1])


def swd_times(Gs, num_images, minibatch, resolution):
    """(wall, CPU) seconds of each phase (generating the fakes, feeding and ending each pass), and
    the SWD values."""
    random_state = np.random.RandomState(1)
    watch = Stopwatch()
    watch.start()
    latents = random_state.randn(num_images, *Gs.input_shape[1:]).astype(np.float32)
    fakes = Gs.run(latents, np.zeros([num_images, 0], np.float32), minibatch_size=minibatch,
                   out_mul=127.5, out_add=127.5, out_dtype=np.uint8)
    watch.stop('generate fakes')
    reals = smooth_images(num_images, resolution, random_state)
    swd = sliced_wasserstein.API(num_images, [3, resolution, resolution], np.uint8, minibatch)
    for mode, images in [('reals', reals), ('fakes', fakes)]:
        swd.begin(mode)
        watch.start()
        for begin in range(0, num_images, minibatch):
            swd.feed(mode, images[begin: begin + minibatch])
        watch.stop('feed %s' % mode)
        watch.start()
        values = swd.end(mode)
        watch.stop('end %s' % mode)
    return watch.phases, dict(zip(swd.get_metric_names(), values))


def sort_floor(num_images, num_levels):
    """CPU seconds numpy needs to sort the SWD projections alone, measured on one repeat's array
    (CPU time: robust to load from other processes)."""
    projections = np.random.RandomState(2).randn(sliced_wasserstein.DIRS_PER_REPEAT,
                                                 num_images * sliced_wasserstein.NHOODS_PER_IMAGE)
    projections = projections.astype(np.float32)
    start = time.process_time()
    projections.sort(axis=1)
    return (time.process_time() - start) * sliced_wasserstein.DIR_REPEATS * 2 * num_levels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--resolution', type=int, default=64)
    parser.add_argument('--minibatch', type=int, default=64)
    parser.add_argument('--seconds', type=float, default=3.0, help='measuring time per generator variant')
    parser.add_argument('--swd-images', type=int, default=8192)
    args = parser.parse_args()

    tfutil.init_tf()
    Gs = build_gs(args.resolution)
    print('Gs: %s at %dx%d, %s; minibatch %d; %d cores, load average %.1f' % (
        config.G['func'], args.resolution, args.resolution,
        ', '.join('%s=%s' % kv for kv in config.G.items() if kv[0] != 'func'),
        args.minibatch, os.cpu_count(), os.getloadavg()[0]))
    rates = generation_rates(Gs, args.minibatch, args.seconds)
    print()
    print('%-14s %12s %14s' % ('generator', 'images/s', 'images/CPU-s'))
    for name, (wall, cpu) in rates.items():
        print('%-14s %12.1f %14.1f' % (name, wall, cpu))

    phases, values = swd_times(Gs, args.swd_images, args.minibatch, args.resolution)
    num_levels = len(values) - 1
    floor = sort_floor(args.swd_images, num_levels)
    swd_phases = [times for name, times in phases.items() if name != 'generate fakes']
    phases['SWD total'] = tuple(map(sum, zip(*swd_phases)))
    print()
    print('SWD of %d images at %dx%d (%d levels)' % (args.swd_images, args.resolution, args.resolution, num_levels))
    print('  %-16s %8s %8s' % ('', 'wall s', 'CPU s'))
    for name, (wall, cpu) in phases.items():
        print('  %-16s %8.1f %8.1f' % (name, wall, cpu))
    print('  %-16s %8s %8.1f' % ('sorting floor', '', floor))
    print('  values: ' + ', '.join('%s %.2f' % kv for kv in values.items()))
    print('Load average after: %.1f' % os.getloadavg()[0])
    print()
    gs_rate, bare_rate = rates['Gs.run'][0], rates['session.run'][0]
    swd_wall, swd_cpu = phases['SWD total']
    print('Gs.run %.0f images/s at %d px = %.2fx bare session.run (%.0f/s); SWD of %d images %.0f s wall, '
          '%.0f CPU-s = %.1fx the CPU its sorts alone need' % (gs_rate, args.resolution, gs_rate / bare_rate,
                                                                bare_rate, args.swd_images, swd_wall, swd_cpu,
                                                                swd_cpu / floor))


if __name__ == '__main__':
    main()
