"""`python tests/pause_in_write.py PREFIX config.py` runs `python train.py config.py`, except that
the first atomic write of a file whose name starts with PREFIX, once the run has a complete
network pickle, stops half-way: half the bytes are in the temporary file, "PAUSED <path>" is
printed, and the process waits to be killed. tests/test_cleanup.py uses it to land a SIGKILL
inside each kind of write."""

import builtins
import glob
import os
import runpy
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import misc  # noqa: E402


class _HalfThenWait:
    """A file opened for writing whose write() stores half the data, then waits forever."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[:len(data) // 2])
        self.file.flush()
        os.fsync(self.file.fileno())
        print('PAUSED %s' % self.file.name, flush=True)
        while True:
            time.sleep(60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def pausing_open(prefix):
    def open_(path, mode='r', *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        name = os.path.basename(path)
        run_has_pickle = glob.glob(os.path.join(os.path.dirname(path), 'network-*.pkl'))
        if 'w' in mode and misc.PARTIAL_MARK in name and name.startswith(prefix) and run_has_pickle:
            return _HalfThenWait(file)
        return file
    return open_


if __name__ == '__main__':
    prefix, config_file = sys.argv[1:]
    misc.open = pausing_open(prefix)        # misc.atomic_write_bytes looks `open` up in misc first.
    os.chdir(REPO)
    sys.argv = ['train.py', config_file]
    runpy.run_path(os.path.join(REPO, 'train.py'), run_name='__main__')
