"""Memory and graph size through every phase of a progressive run on the native training graph:
after each phase (stable part, then fade) of a 256-px net, the process's resident memory, the
number of ops in the graph and the seconds the phase's steps took, in two passes through all
phases. The graph is built once and serves every phase; the second pass shows whether memory or
step time grow as the phases change.

    python bench/phase_memory.py [--resolution 256] [--steps 8] [--rounds 2]
"""

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
import tfutil  # noqa: E402
from tf_compat import tf  # noqa: E402

from train_speed import MINIBATCH, SCHED, build, framework_steps  # noqa: E402


def resident_mb():
    with open('/proc/self/status') as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith('VmRSS:'))
    return kb / 1024.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--resolution', type=int, default=256)
    parser.add_argument('--steps', type=int, default=8, help='minibatches per part of each phase (a multiple of 4)')
    parser.add_argument('--rounds', type=int, default=2, help='passes through all phases (later ones show any growth)')
    args = parser.parse_args()
    tfutil.init_tf()
    training_set, graph, build_sec = build(args.resolution, full_resolution=False)
    ops = len(tf.get_default_graph().get_operations())     # The first configure() adds its few setter ops.
    print('Graph built once in %.1f s: %d ops, RSS %.0f MB' % (build_sec, ops, resident_mb()))
    print('%-6s %-10s %10s %10s %8s %8s' % ('round', 'resolution', 'stable s', 'fade s', 'ops', 'RSS MB'))
    phase_kimg = SCHED['lod_training_kimg'] + SCHED['lod_transition_kimg']
    for round_index, level in itertools.product(range(args.rounds), range(training_set.resolution_log2 - 1)):
        seconds = []
        for kimg in (level * phase_kimg, level * phase_kimg + SCHED['lod_training_kimg'] + 1.5):
            start = time.time()
            framework_steps(training_set, graph, kimg, args.steps)
            seconds.append(time.time() - start)
        side = train.TrainingSchedule(level * phase_kimg * 1000, training_set, num_gpus=1, **SCHED).resolution
        print('%-6d %-10s %10.2f %10.2f %8d %8.0f' % (round_index + 1, '%dx%d' % (side, side), seconds[0], seconds[1],
                                                 len(tf.get_default_graph().get_operations()), resident_mb()))
    print('%d minibatches of %d per column; fade s: while the next resolution fades in (the last phase stays at LOD 0)'
          % (args.steps, MINIBATCH))


if __name__ == '__main__':
    main()
