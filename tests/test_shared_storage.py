"""Files that several training nodes write into shared storage at once: the tissue-mask cache. Each node is a real process; "other hosts" are processes that share a folder and,
as machines of a cluster can, the same PID and thread ident."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import openslide
import pytest

import wsi
from conftest import write_slide
from train_helpers import REPO

def start_nodes(count, kind, *args):
    """count processes of tests/shared_storage_nodes.py, each waiting for its go file."""
    command = [sys.executable, '-m', 'tests.shared_storage_nodes', kind, *map(str, args)]
    return [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(count)]


def start_together(nodes, go):
    """Touch go once every node has said it is ready (one that failed instead shows in finish)."""
    for node in nodes:
        node.stdout.readline()
    go.touch()


def finish(nodes, timeout=120):
    """stdout of each node; fails with a node's stderr if it failed."""
    outputs = []
    for node in nodes:
        out, err = node.communicate(timeout=timeout)
        assert node.returncode == 0, err
        outputs.append(out)
    return outputs


def temp_files(folder):
    return [name for name in os.listdir(folder) if name.endswith('.tmp')]


def test_nodes_with_equal_pid_and_thread_share_a_mask_cache_safely(tmp_path):
    slides = [write_slide(tmp_path / f'slide{i}.svs', width=1024, height=768, seed=i,
                          tissue_boxes=[(100 + 200 * i, 100, 600 + 200 * i, 600)]) for i in range(3)]
    expected = {}
    for path in slides:                        # each mask computed alone, in a cache of its own
        with openslide.OpenSlide(path) as handle:
            expected[path], _ = wsi.load_or_build_mask(handle, path, str(tmp_path / 'alone'))
    assert len({mask.tobytes() for mask in expected.values()}) == len(slides)
    np.savez(tmp_path / 'expected.npz', paths=slides, masks=[expected[path] for path in slides])
    cache_dir, go = tmp_path / 'shared-cache', tmp_path / 'go'

    nodes = start_nodes(3, 'masks', cache_dir, tmp_path / 'expected.npz', go, 2.5)
    start_together(nodes, go)
    runs = [json.loads(out) for out in finish(nodes)]

    assert all(run['rounds'] >= 3 for run in runs), runs
    assert max(run['start'] for run in runs) < min(run['end'] for run in runs) - 1.5, 'the nodes hardly overlapped'
    assert sorted(os.listdir(cache_dir)) == sorted(os.path.basename(wsi.mask_cache_path(p, cache_dir)) for p in slides)
    for path in slides:
        assert np.array_equal(wsi.read_png(wsi.mask_cache_path(path, cache_dir), cv2.IMREAD_GRAYSCALE), expected[path])


@pytest.mark.parametrize('cached', [b'', 'first half'])
def test_an_unreadable_cached_mask_is_rebuilt(tmp_path, mask_cache, cached):
    path = write_slide(tmp_path / 'slide.svs', width=1024, height=768)
    with openslide.OpenSlide(path) as handle:
        mask, _ = wsi.load_or_build_mask(handle, path, mask_cache)
        cache_path = wsi.mask_cache_path(path, mask_cache)
        complete = open(cache_path, 'rb').read()
        with open(cache_path, 'wb') as file:
            file.write(complete[:len(complete) // 2] if cached == 'first half' else cached)
        again, warning = wsi.load_or_build_mask(handle, path, mask_cache)
    assert warning is None and np.array_equal(again, mask)
    assert open(cache_path, 'rb').read() == complete
    assert temp_files(mask_cache) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / 'picture.png'
    wsi.write_png(str(path), np.zeros((4, 4), np.uint8))
    before = path.read_bytes()
    with pytest.raises(OSError, match='disk full'):
        with wsi.atomic_output(str(path)) as file:
            file.write(b'half a PNG')
            raise OSError('disk full')
    assert path.read_bytes() == before and temp_files(tmp_path) == []
