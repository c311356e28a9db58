"""Files that several training nodes write into shared storage at once: the tissue-mask cache and
the demo slides. Each node is a real process; "other hosts" are processes that share a folder and,
as machines of a cluster can, the same PID and thread ident."""

import errno
import json
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import openslide
import pytest

import dataset
import wsi
from conftest import slide_image, write_slide
from train_helpers import REPO

SMALL_DEMO_SLIDES = [(name, width // 8, height // 8, factor, blobs)
                     for name, width, height, factor, blobs in wsi.DEMO_SLIDES]
DEMO_NAMES = sorted(name for name, *_ in wsi.DEMO_SLIDES)


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

    nodes = start_nodes(3, 'masks', cache_dir, tmp_path / 'expected.npz', go, 6)
    start_together(nodes, go)
    runs = [json.loads(out) for out in finish(nodes)]

    assert max(run['start'] for run in runs) < min(run['end'] for run in runs), 'the nodes did not run at once'
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


def refuse_hard_link(source, target):
    raise PermissionError(errno.EPERM, 'Operation not permitted', target)


@pytest.mark.parametrize('hard_links', [True, False])
def test_a_slide_written_without_replacing_keeps_the_first_copy(tmp_path, monkeypatch, hard_links):
    if not hard_links:          # as on FAT or some SMB mounts
        monkeypatch.setattr(os, 'link', refuse_hard_link)
    path = str(tmp_path / 'slide.tif')
    wsi.write_pyramidal_tiff(path, slide_image(512, 384, [(100, 100, 300, 300)]), replace=False)
    first = open(path, 'rb').read()
    wsi.write_pyramidal_tiff(path, slide_image(512, 384, [(200, 50, 500, 350)]), replace=False)
    assert open(path, 'rb').read() == first and temp_files(tmp_path) == []
    with openslide.OpenSlide(path) as slide:
        assert slide.dimensions == (512, 384)


def test_nodes_creating_the_demo_slides_at_once_write_each_one_whole(tmp_path):
    reference = wsi.create_demo_slides(str(tmp_path / 'alone'), slides=SMALL_DEMO_SLIDES, log=lambda message: None)
    folder, go = tmp_path / 'shared', tmp_path / 'go'
    nodes = start_nodes(2, 'demo', folder, json.dumps(SMALL_DEMO_SLIDES), go)
    start_together(nodes, go)
    sizes_seen = {name: set() for name in DEMO_NAMES}
    while any(node.poll() is None for node in nodes):      # what a third node listing the folder would find
        for name in DEMO_NAMES:
            if os.path.exists(folder / name):
                sizes_seen[name].add(os.path.getsize(folder / name))
        time.sleep(0.001)
    finish(nodes)

    assert sorted(os.listdir(folder)) == DEMO_NAMES
    for path in reference:
        written = folder / os.path.basename(path)
        assert written.read_bytes() == open(path, 'rb').read()
        assert sizes_seen[written.name] <= {os.path.getsize(path)}, 'a half-written slide was visible'
        with openslide.OpenSlide(str(written)) as slide:
            assert slide.level_count >= 2


def test_a_folder_with_some_demo_slides_and_nothing_else_gets_the_missing_ones(tmp_path, mask_cache, capsys):
    folder = tmp_path / 'demo-wsi'
    folder.mkdir()
    present = write_slide(folder / 'demo-aperio-small.svs', width=1024, height=768)
    present_stat = os.stat(present)
    wsi_set = dataset.WSIDataset(str(folder), wsi_ext=['.svs', '.tif'], resolution=32, downsample=8,
                                 create_demo=True, mask_cache_dir=mask_cache, num_threads=1)
    wsi_set.close()
    assert f'Creating demo slides in "{folder}"' in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == DEMO_NAMES
    assert len(wsi_set.sampler.slide_paths) == 3
    assert os.stat(present).st_ino == present_stat.st_ino and os.stat(present).st_mtime_ns == present_stat.st_mtime_ns
    for name, width, height, *_ in wsi.DEMO_SLIDES:
        if name != 'demo-aperio-small.svs':
            with openslide.OpenSlide(str(folder / name)) as slide:
                assert slide.dimensions == (width, height)

    dataset.WSIDataset(str(folder), wsi_ext=['.svs', '.tif'], resolution=32, downsample=8, create_demo=True,
                       mask_cache_dir=mask_cache, num_threads=1).close()
    assert 'Creating demo slides' not in capsys.readouterr().out


def test_demo_slides_are_wanted_only_where_no_other_slides_are(tmp_path):
    folder = tmp_path / 'slides'
    assert wsi.demo_slides_wanted(str(folder))                  # not there yet
    folder.mkdir()
    assert wsi.demo_slides_wanted(str(folder), ['.svs', '.tif'])
    (folder / 'demo-generic.tif').write_bytes(b'')
    assert wsi.demo_slides_wanted(str(folder), ['.svs', '.tif'])
    for name in DEMO_NAMES:
        (folder / name).write_bytes(b'')
    assert not wsi.demo_slides_wanted(str(folder), ['.svs', '.tif'])
    os.remove(folder / 'demo-aperio-large.svs')
    (folder / 'mine.tif').write_bytes(b'')
    assert not wsi.demo_slides_wanted(str(folder), ['.svs', '.tif'])
    assert wsi.demo_slides_wanted(str(folder), '.svs')           # mine.tif is no slide of this dataset
    (folder / 'sub').mkdir()
    (folder / 'sub' / 'mine.svs').write_bytes(b'')
    assert wsi.demo_slides_wanted(str(folder), '.svs', recursive=False)
    assert not wsi.demo_slides_wanted(str(folder), '.svs', recursive=True)
