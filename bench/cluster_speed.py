"""Step time of two nodes on this machine (two processes joined by TF_CONFIG-style collectives over
127.0.0.1) against one process with two devices, on the same training graph and global minibatch:
the price of running between-graph instead of in-graph, and where it goes.

    python bench/cluster_speed.py [--resolution 32] [--minibatch 16] [--steps 40]

Each setup runs the real train.build_training_graph on synthetic reals (zeros: no data loading in
the figures) at LOD 0 with the networks of the cpu-demo preset and times `--steps` D+G step pairs
after a warm-up; the nodes also time the collectives of a step on their own. Every process runs
each op on one thread, two ops at a time, so both setups keep the same two cores busy.

On one machine the "network" is the loopback device: the figures show the fixed costs of the
distributed runtime (gRPC, the step's rendezvous, packing), not a real link; README "Training on
several machines" estimates the link a cluster needs.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cluster  # noqa: E402
import config  # noqa: E402
import dataset  # noqa: E402
import tfutil  # noqa: E402
import train  # noqa: E402
from tf_compat import tf  # noqa: E402

NETS = dict(fmap_base=256, fmap_max=64)
WARMUP = 5


def measure(args, devices, node):
    """{seconds per D+G step pair, and for a node the packed all-reduce of D's gradients alone}."""
    config.num_gpus = devices
    config.random_seed = 1000
    config.tf_config = {'intra_op_parallelism_threads': 1, 'inter_op_parallelism_threads': 2}
    train.start_tensorflow(node)
    kwargs = dict(num_channels=3, resolution=args.resolution, label_size=0, **NETS)
    G = tfutil.Network('G', func='networks.G_paper', latent_size=64, **kwargs)
    D = tfutil.Network('D', func='networks.D_paper', **kwargs)
    Gs = G.clone('Gs')
    share = args.minibatch // node.count
    training_set = dataset.SyntheticDataset(resolution=args.resolution, num_channels=3)
    graph = train.build_training_graph(G, D, Gs, training_set, devices, node=node)
    tfutil.init_uninited_vars()
    training_set.configure(share, 0)
    node.broadcast_from_chief(train.trained_variables(G, D, Gs, graph))
    feed = {graph.lod_in: 0.0, graph.lrate_in: 0.001, graph.minibatch_in: share, graph.signal_in: 0}
    D_step, G_step = [graph.D_train_op, graph.Gs_update_op, graph.D_report], [graph.G_train_op, graph.G_report]
    figures = {'step_pair': timed(lambda: (node.run(D_step, feed), node.run(G_step, feed)), args.steps)}
    if node.count > 1:
        with tf.device(tfutil.device_names(1)[0]):
            summed = node.all_reduce_sum([tf.zeros_like(var) for var in D.trainables.values()])
            report = node.all_reduce_sum([tf.zeros([1 + node.count])])[0]     # the size of a step's report
        figures['all_reduce_D'] = timed(lambda: node.run(summed), args.steps)
        figures['all_reduce_report'] = timed(lambda: node.run(report), args.steps)
        figures['D_megabytes'] = 4e-6 * sum(int(np.prod(var.shape.as_list())) for var in D.trainables.values())
    return figures


def timed(function, repeats):
    for _ in range(WARMUP):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def free_addresses(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(('127.0.0.1', 0))
    found = ['127.0.0.1:%d' % sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return found


def run_setups(args):
    """Run the single process, then the two nodes, each in fresh processes; their JSON figures."""
    script = os.path.abspath(__file__)
    common = ['--resolution', str(args.resolution), '--minibatch', str(args.minibatch), '--steps', str(args.steps)]
    single = subprocess.run([sys.executable, script, '--as', 'single'] + common, capture_output=True, text=True)
    nodes = free_addresses(2)
    procs = [subprocess.Popen([sys.executable, script, '--as', 'node', '--nodes', ','.join(nodes), '--index', str(i)]
                              + common, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [proc.communicate() for proc in procs]
    results = []
    for name, (stdout, stderr), code in [('single', (single.stdout, single.stderr), single.returncode)] + \
            [('node %d' % i, out, proc.returncode) for i, (out, proc) in enumerate(zip(outputs, procs))]:
        if code != 0:
            sys.exit('%s failed:\n%s' % (name, stderr[-3000:]))
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def report(args, single, node0):
    pair_single, pair_nodes = single['step_pair'], node0['step_pair']
    print('Resolution %d, global minibatch %d, %d D+G step pairs after %d warm-up; D\'s gradients %.1f MB in fp32'
          % (args.resolution, args.minibatch, args.steps, WARMUP, node0['D_megabytes']))
    print('%-36s %12s %10s' % ('setup', 'ms per pair', 'ratio'))
    print('%-36s %12.1f %10.2f' % ('1 process, 2 devices (in-graph)', 1e3 * pair_single, 1.0))
    print('%-36s %12.1f %10.2f' % ('2 nodes, 1 device each (between)', 1e3 * pair_nodes, pair_nodes / pair_single))
    overhead = pair_nodes - pair_single
    # A D step and a G step each all-reduce one network's gradients and a step report.
    gradients, reports = 2 * node0['all_reduce_D'], 2 * node0['all_reduce_report']
    print('overhead per pair: %.1f ms (%.0f%%), of which, each timed on its own:' % (
        1e3 * overhead, 100 * overhead / pair_single))
    print('  2 packed gradient all-reduces  %6.1f ms  (%.1f ms each, %.0f MB/s)' % (
        1e3 * gradients, 1e3 * node0['all_reduce_D'], node0['D_megabytes'] / node0['all_reduce_D']))
    print('  2 step-report all-reduces      %6.1f ms  (the round-trip latency of a collective)' % (1e3 * reports))
    print('  the rest                       %6.1f ms  (distributed session steps, copies; negative = overlap)' % (
        1e3 * (overhead - gradients - reports)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--resolution', type=int, default=32)
    parser.add_argument('--minibatch', type=int, default=16)
    parser.add_argument('--steps', type=int, default=40)
    parser.add_argument('--as', dest='role', choices=['single', 'node'], help=argparse.SUPPRESS)
    parser.add_argument('--nodes', help=argparse.SUPPRESS)
    parser.add_argument('--index', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == 'single':
        print(json.dumps(measure(args, 2, cluster.LocalNode())))
    elif args.role == 'node':
        print(json.dumps(measure(args, 1, cluster.Node(args.nodes.split(','), args.index, timeout=120))))
    else:
        single, node0, _ = run_setups(args)
        report(args, single, node0)


if __name__ == '__main__':
    main()
