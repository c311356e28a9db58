"""Training on several machines: one `python train.py` per node, joined into one run.

The cluster is described the way TensorFlow's own tools describe it, by the TF_CONFIG environment
variable: {"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker",
"index": 1}} (a separate "chief" list is accepted too and comes first). Node 0 is the chief.

Each node builds the same training graph for its own GPUs and runs it in a session of its own
TensorFlow server (between-graph replication). What ties the nodes together are collective
all-reduce ops over TensorFlow's gRPC runtime: the optimizer sums each step's gradients across
nodes, the step reports (mean loss, stop requests) are summed, and at start-up the chief's
weights and its choice of snapshot are handed to everyone. Collectives match up across processes
by their keys, so every node must create them with the same keys in the same order: they are made
only here, numbered in creation order, and train.py creates them in the same order on every node.

A node that dies would leave the others waiting forever, so every collective run has a deadline:
the op's own timeout, backed by a watchdog thread for the waits the op timeout does not cover
(e.g. asking a dead chief for step numbers, which TensorFlow retries without end). Either way the
node stops with a message that names the nodes it cannot reach.

TF_CONFIG is parsed without TensorFlow, so that checks.py can look at it before TF loads.
"""

import contextlib
import json
import os
import socket
import sys
import threading
import time

import numpy as np

TF_CONFIG = 'TF_CONFIG'
_GROUP_KEY = 1                  # All nodes form a single collective group.
_WATCHDOG_GRACE = 10.0          # Seconds the watchdog waits beyond an op's own timeout.
_PROBE_TIMEOUT = 3.0            # Seconds to wait for a TCP connection to a node's server.


class ClusterConfigError(ValueError):
    """TF_CONFIG does not describe a cluster this program can train on."""


def nodes_from_environment(environ=None):
    """(addresses of all nodes, chief first; this node's index) from TF_CONFIG, or None when it
    is unset or describes a single node."""
    text = (os.environ if environ is None else environ).get(TF_CONFIG, '').strip()
    if not text:
        return None
    addresses, index = parse_tf_config(text)
    return None if len(addresses) == 1 else (addresses, index)


def parse_tf_config(text):
    """Validate TF_CONFIG's JSON; returns (addresses, index of this node)."""
    try:
        spec = json.loads(text)
    except ValueError as error:
        raise ClusterConfigError('TF_CONFIG is not valid JSON (%s): %.200s' % (error, text)) from None
    if not isinstance(spec, dict) or not isinstance(spec.get('cluster'), dict) or not isinstance(spec.get('task'), dict):
        raise ClusterConfigError('TF_CONFIG must be {"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
                                 '"worker", "index": N}}, not %.200s' % text)
    jobs = spec['cluster']
    unknown = sorted(set(jobs) - {'chief', 'worker'})
    if unknown:
        raise ClusterConfigError('TF_CONFIG lists %s jobs; training uses only "worker" (and optionally one "chief"): '
                                 'every node trains, there are no parameter servers or evaluators' % ', '.join(unknown))
    chief, workers = _addresses(jobs, 'chief'), _addresses(jobs, 'worker')
    if len(chief) > 1:
        raise ClusterConfigError('TF_CONFIG lists %d chiefs; there can be one at most' % len(chief))
    addresses = chief + workers
    if not addresses:
        raise ClusterConfigError('TF_CONFIG lists no nodes: give cluster.worker a list of "host:port"')
    if len(set(addresses)) != len(addresses):
        raise ClusterConfigError('TF_CONFIG lists an address twice: %s' % ', '.join(addresses))
    return addresses, _task_index(spec['task'], chief, workers)


def _addresses(jobs, job):
    listed = jobs.get(job, [])
    if not isinstance(listed, list) or not all(isinstance(a, str) and a.rpartition(':')[2].isdigit() for a in listed):
        raise ClusterConfigError('TF_CONFIG cluster.%s must be a list of "host:port" strings, not %r' % (job, listed))
    return listed


def _task_index(task, chief, workers):
    kind, index = task.get('type'), task.get('index', 0)
    members = {'chief': chief, 'worker': workers}.get(kind)
    if members is None:
        raise ClusterConfigError('TF_CONFIG task.type must be "worker" or "chief", not %r' % (kind,))
    if not isinstance(index, int) or not 0 <= index < len(members):
        raise ClusterConfigError('TF_CONFIG task.index %r is not one of the %d %s entries' % (index, len(members), kind))
    return index + (len(chief) if kind == 'worker' else 0)


# ----------------------------------------------------------------------------
# This process's place in the run.


def node_from_environment(settings):
    """This process's node: a Node when TF_CONFIG describes several machines, else a LocalNode.
    `settings` is config.cluster: timeout and startup_timeout in seconds."""
    found = nodes_from_environment()
    if found is None:
        return LocalNode()
    unknown = sorted(set(settings) - {'timeout', 'startup_timeout'})
    if unknown:
        raise ClusterConfigError('config.cluster has no setting %s (it knows timeout and startup_timeout)' % ', '.join(unknown))
    return Node(*found, **settings)


_this_node = None


def this_node():
    """The node this process is (set by train.py at start-up); a LocalNode until then."""
    return _this_node or LocalNode()


def set_this_node(node):
    global _this_node
    _this_node = node


class LocalNode:
    """The single machine of an ordinary run: every cross-node operation is the identity."""
    count = 1
    index = 0
    is_chief = True

    def describe(self, index=None):
        return 'this machine'

    def seed(self, base_seed):
        return base_seed

    def session_fields(self):
        return {}

    def start_server(self, config_proto):
        return ''       # The session runs in this process.

    def all_reduce_sum(self, tensors, timeout=None):
        return list(tensors)

    def run(self, fetches, feed_dict=None, what='a training step', timeout=None):
        import tfutil
        return tfutil.run(fetches, feed_dict)

    def share_from_chief(self, value):
        return value

    def broadcast_from_chief(self, variables):
        pass

    def gather(self, values):
        return np.array([values], np.float64)

    def barrier(self, what):
        pass


class Node(LocalNode):
    """One node of a multi-node run (see the module docstring)."""

    def __init__(self, addresses, index, timeout=300.0, startup_timeout=1800.0):
        self.addresses = list(addresses)
        self.index = index
        self.count = len(self.addresses)
        self.is_chief = index == 0
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout)
        self.server = None
        self._next_instance_key = 1
        self._gather_ops = {}   # number of values => (placeholder, summed)
        self._watchdog = _Watchdog(self._give_up)

    def describe(self, index=None):
        index = self.index if index is None else index
        return 'node %d%s (%s)' % (index, ', the chief' if index == 0 else '', self.addresses[index])

    def seed(self, base_seed):
        """The chief keeps the configured seed; every other node derives its own from it, so each
        samples different patches and latents (the weights come from the chief anyway)."""
        if base_seed is None or self.is_chief:
            return base_seed
        return int(np.random.SeedSequence([base_seed, self.index]).generate_state(1)[0] >> 1)

    def session_fields(self):
        """Session settings a node needs: a leader for the collectives, and a view limited to its own
        devices, so that ops without a device land here and not on another node."""
        return {'experimental.collective_group_leader': '/job:worker/replica:0/task:0',
                'device_filters': ['/job:worker/task:%d' % self.index],
                'graph_options.place_pruned_graph': False}     # Distributed sessions ignore it, with a warning.

    def start_server(self, config_proto):
        """Start this node's TensorFlow server; returns the session target."""
        from tf_compat import tf
        cluster_spec = tf.train.ClusterSpec({'worker': self.addresses})
        self.server = tf.distribute.Server(cluster_spec, job_name='worker', task_index=self.index, config=config_proto)
        return self.server.target

    # Graph building. Keys are handed out in creation order; see the module docstring.

    def _collective_sum(self, tensor, timeout):
        from tensorflow.python.ops import collective_ops
        key = self._next_instance_key
        self._next_instance_key += 1
        return collective_ops.all_reduce(tensor, self.count, _GROUP_KEY, key, merge_op='Add', final_op='Id',
                                         timeout=timeout)

    def all_reduce_sum(self, tensors, timeout=None):
        """Each tensor summed over all nodes, in one collective: the float32 tensors are packed
        into one vector, so a step pays the network round trips once, not once per variable."""
        from tf_compat import tf
        tensors = list(tensors)
        with tf.name_scope('SumAcrossNodes'):
            flat = [tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors]
            sizes = [int(np.prod(t.shape.as_list())) for t in tensors]
            total = self._collective_sum(tf.concat(flat, axis=0), timeout or self.timeout)
            parts = tf.split(total, sizes) if len(sizes) > 1 else [total]
            return [tf.cast(tf.reshape(part, tf.shape(t)), t.dtype) for part, t in zip(parts, tensors)]

    # Running collectives, each under a deadline.

    def run(self, fetches, feed_dict=None, what='a training step', timeout=None):
        """tfutil.run for fetches that include collectives: a node that does not answer stops this
        one with NodeLost (or, when TensorFlow itself would wait forever, the watchdog exits)."""
        import tfutil
        from tf_compat import tf
        timeout = timeout or self.timeout
        with self._watchdog.guard(timeout + _WATCHDOG_GRACE, what):
            try:
                return tfutil.run(fetches, feed_dict)
            except tf.errors.DeadlineExceededError as error:
                raise NodeLost(self.lost_nodes_message('no answer from the other nodes within %.0f s' % timeout,
                                                       what)) from error
            except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError) as error:
                raise NodeLost(self.lost_nodes_message('the connection to another node broke', what)) from error

    def _give_up(self, what, seconds):
        """The watchdog fired: the main thread is stuck inside TensorFlow. Say why, then exit at once
        (the snapshots on disk are complete: every file is written atomically)."""
        sys.stderr.write('\n%s\n' % self.lost_nodes_message('no answer from the other nodes within %.0f s' % seconds,
                                                             what))
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)

    def lost_nodes_message(self, problem, what):
        unreachable = self._unreachable_nodes()
        if unreachable:
            lost = '; '.join('%s cannot be reached (%s)' % (self.describe(index), reason) for index, reason in unreachable)
            lost = lost[0].upper() + lost[1:]
        else:
            lost = 'Every other node still accepts connections, so one of them is stuck or much slower'
        return ('Training stopped on %s: %s during %s. %s. Once every node is back, start the same command on all '
                'of them; with train.resume_run_id = "latest" the run resumes from the chief\'s newest snapshot.' % (
                    self.describe(), problem, what, lost))

    def _unreachable_nodes(self, attempts=3):
        """[(index, reason)] of the nodes whose server refuses or ignores a connection. A node that has
        just died may take a moment to stop listening, so an all-clear is checked again."""
        for attempt in range(attempts):
            if attempt:
                time.sleep(1.0)
            found = [(index, reason) for index, reason in self._probe_others() if reason]
            if found:
                return found
        return []

    def _probe_others(self):
        """(index, None when its server accepts a TCP connection, else the reason) per other node."""
        found = []
        for index, address in enumerate(self.addresses):
            if index != self.index:
                host, _, port = address.rpartition(':')
                try:
                    socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT).close()
                    found.append((index, None))
                except OSError as error:
                    found.append((index, error.strerror or str(error) or type(error).__name__))
        return found

    # Start-up: the chief's decisions and weights, handed to every node.

    def share_from_chief(self, value):
        """The chief's `value` (anything JSON can hold) on every node; the others' values are ignored."""
        payload = np.frombuffer(json.dumps(value).encode('utf-8'), np.uint8) if self.is_chief else np.zeros(0, np.uint8)
        length = self._run_sum(np.float32([len(payload)]), 'start-up (waiting for every node to start)')
        buffer = np.zeros(int(length[0]), np.float32)
        buffer[:len(payload)] = payload
        received = self._run_sum(buffer, 'start-up (sharing the chief\'s plan)')
        return json.loads(received.astype(np.uint8).tobytes().decode('utf-8'))

    def _run_sum(self, array, what):
        """Sum a numpy float32 array over all nodes now, with a new collective."""
        from tf_compat import tf
        with tf.name_scope('NodeStartup'):
            summed = self.all_reduce_sum([tf.constant(array)], self.startup_timeout)[0]
        return self.run(summed, what=what, timeout=self.startup_timeout)

    def broadcast_from_chief(self, variables):
        """Give every node the chief's values of `variables` (float32 ones: weights, optimizer state)."""
        from tf_compat import tf
        odd = [var.name for var in variables if var.dtype.base_dtype != tf.float32]
        if odd:
            raise TypeError('broadcast_from_chief handles float32 variables only, not %s' % ', '.join(odd))
        keep = 1.0 if self.is_chief else 0.0
        with tf.name_scope('BroadcastFromChief'):
            chiefs = self.all_reduce_sum([var * keep for var in variables], self.startup_timeout)
            assign = tf.group(*[tf.assign(var, value) for var, value in zip(variables, chiefs)])
        self.run(assign, what='start-up (copying the chief\'s weights)', timeout=self.startup_timeout)

    # Tick boundaries.

    def gather(self, values, what='the end of a tick'):
        """Every node's `values` (a list of numbers of the same length on every node): a
        [nodes, len(values)] array, row i from node i."""
        from tf_compat import tf
        if len(values) not in self._gather_ops:
            with tf.name_scope('GatherFromNodes'):
                rows = tf.placeholder(tf.float32, [self.count, len(values)])
                self._gather_ops[len(values)] = rows, self.all_reduce_sum([rows])[0]
        rows, summed = self._gather_ops[len(values)]
        mine = np.zeros([self.count, len(values)], np.float32)
        mine[self.index] = values
        return self.run(summed, {rows: mine}, what=what).astype(np.float64)

    def barrier(self, what):
        """Wait until every node gets here (e.g. while the chief writes a snapshot): any collective
        returns only once all nodes have joined it."""
        self.gather([0.0], what)


class _Watchdog:
    """One thread that calls fire(what, seconds) when a guarded block outlasts its deadline: the
    steps' hot path only sets and clears the deadline."""

    def __init__(self, fire):
        self._fire = fire
        self._changed = threading.Condition()
        self._armed = None      # (deadline, what, seconds) while a block is guarded
        threading.Thread(target=self._watch, name='cluster-watchdog', daemon=True).start()

    @contextlib.contextmanager
    def guard(self, seconds, what):
        with self._changed:
            self._armed = (time.monotonic() + seconds, what, seconds)
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._armed = None

    def _watch(self):
        while True:
            with self._changed:
                while self._armed is None or self._armed[0] > time.monotonic():
                    self._changed.wait(None if self._armed is None else self._armed[0] - time.monotonic())
                _, what, seconds = self._armed
            self._fire(what, seconds)       # Outside the lock: it probes the other nodes, then exits.


class NodeLost(RuntimeError):
    """Another node died or cannot be reached. train.py turns it into a clean exit with the message."""

