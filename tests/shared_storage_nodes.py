"""`python -m tests.shared_storage_nodes KIND ARGS...` (from the repository root) plays one node of
a multi-node run for tests/test_shared_storage.py: it prints "ready", waits for a go file, then
writes into a shared folder as a training node would, with os.getpid and threading.get_ident
returning the same numbers as on every other "host"."""

import contextlib
import json
import os
import sys
import threading
import time

import numpy as np
import openslide

import wsi


@contextlib.contextmanager
def numbered_like_every_other_host():
    real = os.getpid, threading.get_ident
    os.getpid, threading.get_ident = (lambda: 4242), (lambda: 77)
    try:
        yield
    finally:
        os.getpid, threading.get_ident = real    # threading's shutdown needs the real ident


class NetworkLatencyFile:
    """A file whose write() first waits as long as a write to a network file system may: it
    widens the window in which two writers of one file overlap, as NFS does."""

    def __init__(self, file, latency):
        self.file, self.latency = file, latency

    def write(self, data):
        time.sleep(self.latency)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@contextlib.contextmanager
def writes_over_a_network(module, latency=0.05):
    """Files module opens for writing are NetworkLatencyFiles."""
    def network_open(file, mode='r', *args, **kwargs):
        opened = open(file, mode, *args, **kwargs)
        return opened if 'r' in mode else NetworkLatencyFile(opened, latency)
    module.open = network_open
    try:
        yield
    finally:
        del module.open


def wait_for(go):
    print('ready', flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)


def mask_node(cache_dir, expected_file, go, rounds):
    """`rounds` rounds over the slides in expected_file: every other round rebuilds their cached
    masks, the rounds between read them back (this node's or another's); prints when it ran."""
    with np.load(expected_file) as saved:
        expected = dict(zip(saved['paths'], saved['masks']))
    handles = {path: openslide.OpenSlide(path) for path in expected}
    wait_for(go)
    start = time.time()
    with writes_over_a_network(wsi):
        for round_ in range(int(rounds)):
            for path, mask in expected.items():
                if round_ % 2 == 0:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(wsi.mask_cache_path(path, cache_dir))
                got, warning = wsi.load_or_build_mask(handles[path], path, cache_dir)
                assert warning is None, warning
                assert np.array_equal(got, mask), f'round {round_}: a wrong mask for {path}'
    print(json.dumps(dict(start=start, end=time.time())))


def demo_node(folder, slides, go):
    """What dataset.WSIDataset does with create_demo=True, for the demo slides `slides` (JSON)."""
    slides = [tuple(spec) for spec in json.loads(slides)]
    wait_for(go)
    if wsi.demo_slides_wanted(folder, ['.svs', '.tif'], slides=slides):
        wsi.create_demo_slides(folder, keep_existing=True, slides=slides, log=lambda message: None)


if __name__ == '__main__':
    kind, *args = sys.argv[1:]
    with numbered_like_every_other_host():
        {'masks': mask_node, 'demo': demo_node}[kind](*args)
