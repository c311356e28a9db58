"""Worker processes for the slide work that threads cannot spread over cores: tissue masks and
patch reading hold the GIL for much of each step (numpy, OpenCV set-up, Python bookkeeping).

Each worker is a fresh interpreter running this file, so it imports only what its calls need
(never TensorFlow, never the trainer's main script), joined to its parent by a private socket pair.
Requests and replies are pickled messages on that socket; bulk data (patches, the cohort's
sampling index) lives in shared memory that both sides map (SharedBuffer), so it is never copied
through the socket. Lifetime follows the parent: a worker exits when its socket reaches end of file,
which the kernel causes as soon as the parent dies, SIGKILL included. Workers ignore SIGINT and
SIGTERM, so a signal sent to the whole process group (Ctrl-C, SLURM) leaves them serving while the
trainer writes its last snapshot; the trainer then closes them.
"""

import array
import collections
import itertools
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import traceback

import numpy as np

_HEADER = struct.Struct('!II')      # payload bytes, descriptors sent with it
_MAX_FDS = 4


class WorkerError(RuntimeError):
    """A worker died, or raised an error that cannot be sent back as itself (one that can is
    raised in the parent as it was, with the worker's traceback in a note)."""


# ----------------------------------------------------------------------------------------------
# Shared memory.

class SharedBuffer:
    """Shared memory that other processes map through its file descriptor: an anonymous memfd
    (gone with its last user, so a crash leaks nothing) or, where there is no memfd, an unlinked
    temporary file. `key` names it in messages; workers cache their mappings by key."""

    _keys = itertools.count()

    def __init__(self, nbytes):
        self.nbytes = max(int(nbytes), 1)
        self.key = (os.getpid(), next(SharedBuffer._keys))
        if hasattr(os, 'memfd_create'):
            self.fd = os.memfd_create('wsi-progan', os.MFD_CLOEXEC)
        else:
            import tempfile
            handle, path = tempfile.mkstemp(prefix='wsi-progan-')
            os.unlink(path)
            self.fd = handle
        os.ftruncate(self.fd, self.nbytes)
        self.map = mmap.mmap(self.fd, self.nbytes)

    def array(self, dtype, shape, offset=0):
        return np.ndarray(shape, dtype, buffer=self.map, offset=offset)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                self.map.close()
            except BufferError:     # a numpy view still uses it; the mapping goes with the view
                pass


class Mapped:
    """A worker's view of a parent's SharedBuffer (same key and size)."""

    def __init__(self, key, nbytes, fd):
        self.key, self.nbytes = key, nbytes
        try:
            self.map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)

    def array(self, dtype, shape, offset=0):
        return np.ndarray(shape, dtype, buffer=self.map, offset=offset)


# ----------------------------------------------------------------------------------------------
# Messages: a header (payload size, descriptor count), the descriptors as SCM_RIGHTS with it,
# then the pickled payload.

def send(sock, message, fds=()):
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = _HEADER.pack(len(payload), len(fds))
    if fds:
        sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))])
        sock.sendall(payload)
    else:
        sock.sendall(header + payload)


def receive(sock):
    """(message, received descriptors), or (None, []) at end of file."""
    header, fds = _receive_header(sock)
    if header is None:
        return None, []
    size, _count = _HEADER.unpack(header)
    payload = bytearray(size)
    view, got = memoryview(payload), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None, []
        got += n
    return pickle.loads(payload), fds


def _receive_header(sock):
    data, fds = b'', []
    ancillary = socket.CMSG_SPACE(_MAX_FDS * array.array('i').itemsize)
    while len(data) < _HEADER.size:
        chunk, cmsgs, _flags, _addr = sock.recvmsg(_HEADER.size - len(data), ancillary)
        for level, kind, raw in cmsgs:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array('i', raw[:len(raw) - len(raw) % 4]).tolist()
        if not chunk:
            return None, []
        data += chunk
    return data, fds


# ----------------------------------------------------------------------------------------------
# The parent's side.

class Worker:
    """One worker process. call() sends a request; result() waits for the oldest one's reply."""

    def __init__(self, index, name):
        self.index, self.name = index, name
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent_end
        with child_end:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), str(child_end.fileno())],
                pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL, env=_worker_environment())
        self.pending = 0
        self.mapped = set()

    def call(self, function, *args, **kwargs):
        self._send(('call', function, args, kwargs))
        self.pending += 1

    def share(self, buffer):
        """Let the worker map buffer (once; later calls are free)."""
        if buffer.key not in self.mapped:
            self._send(('map', buffer.key, buffer.nbytes), fds=[buffer.fd])
            self.mapped.add(buffer.key)

    def forget(self, buffer):
        if buffer.key in self.mapped:
            self.mapped.discard(buffer.key)
            self._send(('unmap', buffer.key))

    def result(self):
        """The reply to the oldest pending call; WorkerError when it raised or the worker died."""
        try:
            message, _fds = receive(self.sock)
        except (ConnectionError, OSError):
            message = None
        self.pending -= 1
        if message is None:
            raise WorkerError(f'{self.name} (pid {self.process.pid}) died{self._exit_status()}')
        status, value, trace = message
        if status == 'ok':
            return value
        if value is None:
            raise WorkerError(f'{self.name} (pid {self.process.pid}) failed:\n{trace}')
        value.add_note(f'(raised in {self.name}, pid {self.process.pid}:\n{trace})')
        raise value

    def _send(self, message, fds=()):
        try:
            send(self.sock, message, fds)
        except (BrokenPipeError, ConnectionError) as e:
            raise WorkerError(f'{self.name} (pid {self.process.pid}) is gone{self._exit_status()} ({e})') from None

    def _exit_status(self):
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return ''
        if code < 0:
            return f' (killed by signal {signal.Signals(-code).name}; out of memory?)'
        return f' (exit code {code})'

    def close(self, timeout=10):
        """Ask the worker to stop and reap it; kill it if it does not go within timeout seconds."""
        try:
            self.sock.shutdown(socket.SHUT_WR)      # end of file: the worker's loop ends
        except OSError:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.sock.close()


def _worker_environment():
    """The parent's environment with numerical libraries held to one thread each: the workers
    themselves are the parallelism. (Running this file puts the project folder first on the
    worker's import path, so it imports the project's modules by name as the parent does.)"""
    env = dict(os.environ)
    for name in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
        env.setdefault(name, '1')
    return env


class LocalWorker:
    """A Worker served in this process, call by call: for debugging (breakpoints work) and for
    tests that patch functions. Errors come back as they were raised."""

    def __init__(self, name):
        self.name = name
        self.replies = collections.deque()

    def call(self, function, *args, **kwargs):
        try:
            self.replies.append((True, function(*args, **kwargs)))
        except Exception as e:
            self.replies.append((False, e))

    def result(self):
        ok, value = self.replies.popleft()
        if not ok:
            raise value
        return value

    def share(self, buffer):
        _mapped[buffer.key] = buffer

    def forget(self, buffer):
        _mapped.pop(buffer.key, None)

    def close(self):
        self.replies.clear()


class WorkerPool:
    """count worker processes, started at once (each takes a fraction of a second to start);
    count=0 serves the calls in this process instead."""

    def __init__(self, count, name='worker'):
        if int(count) == 0:
            self.workers = [LocalWorker(f'{name} (in this process)')]
        else:
            self.workers = [Worker(i, f'{name} process {i}') for i in range(int(count))]

    def __len__(self):
        return len(self.workers)

    def broadcast(self, function, *args, **kwargs):
        """function(*args, **kwargs) in every worker; their results in worker order."""
        for worker in self.workers:
            worker.call(function, *args, **kwargs)
        return [worker.result() for worker in self.workers]

    def map(self, function, items, progress=None, in_flight=4):
        """function(item) for each item, spread over the workers with a few calls queued on
        each; results in item order. progress(count) is called as results arrive."""
        results = [None] * len(items)
        queues = [collections.deque() for _ in self.workers]
        todo = iter(enumerate(items))
        for index, item in itertools.islice(todo, in_flight * len(self.workers)):
            self.workers[index % len(self.workers)].call(function, item)
            queues[index % len(self.workers)].append(index)
        while any(queues):
            for worker, queue in zip(self.workers, queues):
                if queue:
                    results[queue.popleft()] = worker.result()
                    if progress:
                        progress(1)
                    for index, item in itertools.islice(todo, 1):
                        worker.call(function, item)
                        queue.append(index)
        return results

    def close(self):
        for worker in self.workers:
            worker.close()


def map_with_progress(function, items, pool=None, num_workers=None, desc=None, unit='item', progress=True):
    """[function(item) for item in items] with a progress bar: in pool's workers when given; else
    in num_workers new worker processes (default one per core), or in this process when that
    would be one worker or there is one item. function must be picklable (module level)."""
    from tqdm import tqdm
    num_workers = min(num_workers or os.cpu_count() or 1, len(items))
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        if pool is not None:
            return pool.map(function, items, bar.update)
        if num_workers <= 1:
            return [_advance(bar, function(item)) for item in items]
        own = WorkerPool(num_workers, name=desc or 'worker')
        try:
            return own.map(function, items, bar.update)
        finally:
            own.close()


def _advance(bar, result):
    bar.update(1)
    return result


# ----------------------------------------------------------------------------------------------
# The worker's side.

_mapped = {}


def mapped(key):
    """This worker's mapping of the parent's SharedBuffer with that key."""
    return _mapped[key]


def serve(fd):
    """Answer the parent's requests until its end of the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    while True:
        try:
            message, fds = receive(sock)
        except (ConnectionError, OSError):
            return
        if message is None:
            return
        kind = message[0]
        if kind == 'map':
            _, key, nbytes = message
            _mapped[key] = Mapped(key, nbytes, fds[0])
        elif kind == 'unmap':
            _mapped.pop(message[1], None)
        else:
            _, function, args, kwargs = message
            try:
                reply = ('ok', function(*args, **kwargs), None)
            except Exception as e:
                reply = ('error', e if _picklable(e) else None, traceback.format_exc())
            try:
                send(sock, reply)
            except (ConnectionError, OSError):
                return


def _picklable(error):
    """Whether error survives the trip to the parent (so it is raised there as itself)."""
    try:
        return isinstance(pickle.loads(pickle.dumps(error)), type(error))
    except Exception:
        return False


if __name__ == '__main__':
    import worker_pool      # the module under its own name, whose _mapped the callees see
    worker_pool.serve(int(sys.argv[1]))
