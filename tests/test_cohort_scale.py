"""The slide path at cohort scale: the compact tissue index draws exactly as the list of tissue
pixels did, reader processes live and die with the trainer, a low open-files limit is no limit on
the cohort, and slide overviews stay bounded."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import scipy.stats

import patch_sampler
import worker_pool
import wsi
from conftest import write_slide
from train_helpers import REPO, run_dirs, write_config


# ----------------------------------------------------------------------------------------------
# The tissue index.

def blob_mask(rng, height=300, width=400):
    """A random mask with blobs, holes, single pixels, and runs touching both edges."""
    mask = (rng.random((height // 10, width // 10)) < 0.45).astype(np.uint8)
    mask = np.kron(mask, np.ones((10, 10), np.uint8))
    mask[rng.random(mask.shape) < 0.01] ^= 1
    mask[5, :] = 1
    mask[6, :] = 0
    mask[:, 0] = 1
    return mask


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_tissue_runs_hold_the_mask_and_draw_the_same_pixels_as_a_pixel_list(seed):
    mask = blob_mask(np.random.default_rng(seed))
    runs = wsi.TissueRuns.from_mask(mask)
    pixels = np.flatnonzero(mask)           # what the sampler kept before: every tissue pixel's index
    assert runs.count == len(pixels)
    assert np.array_equal(runs.mask(), mask)
    assert [runs.pixel(k) for k in range(len(pixels))] == pixels.tolist()   # k-th draw maps alike
    assert runs.nbytes * 10 < pixels.nbytes


def test_empty_and_full_masks():
    empty = wsi.TissueRuns.from_mask(np.zeros((5, 7), np.uint8))
    assert empty.count == 0 and not empty.mask().any()
    full = wsi.TissueRuns.from_mask(np.ones((5, 7), np.uint8))
    assert full.count == 35 and len(full.starts) == 5 and full.mask().all()


def recorded_centres(monkeypatch):
    centres = []
    real_read_patch = wsi.read_patch

    def recording(handle, centre, field_of_view, size):
        centres.append(centre)
        return real_read_patch(handle, centre, field_of_view, size)
    monkeypatch.setattr(wsi, 'read_patch', recording)
    return centres


def test_patch_centres_are_uniform_over_the_tissue_cells_of_the_mask(tmp_path, mask_cache, monkeypatch):
    """Chi-square over 8x8 blocks of mask pixels: each block is drawn in proportion to its tissue
    pixels, over two tissue boxes of different sizes and shapes."""
    write_slide(tmp_path / 's.svs', 2048, 1536, tissue_boxes=[(200, 200, 900, 700), (1100, 300, 1900, 1400)])
    centres = recorded_centres(monkeypatch)
    with patch_sampler.PatchSampler(str(tmp_path), resolution=16, downsample=4, seed=7, num_readers=0,
                                    mask_cache_dir=mask_cache, log=lambda m: None) as sampler:
        sampler.sample(0, 6000)
        slide = sampler.slides[0]
        mask = slide.mask()
    xy = np.array(centres)
    cells = (xy[:, 1] // slide.mask_scale[1] // 8).astype(int), (xy[:, 0] // slide.mask_scale[0] // 8).astype(int)
    blocks = mask[:mask.shape[0] // 8 * 8, :mask.shape[1] // 8 * 8]
    tissue_per_cell = blocks.reshape(blocks.shape[0] // 8, 8, blocks.shape[1] // 8, 8).sum(axis=(1, 3))
    observed = np.zeros_like(tissue_per_cell)
    inside = (cells[0] < observed.shape[0]) & (cells[1] < observed.shape[1])
    np.add.at(observed, (cells[0][inside], cells[1][inside]), 1)
    assert observed[tissue_per_cell == 0].sum() == 0, 'a centre outside the tissue'
    used = tissue_per_cell > 0
    expected = tissue_per_cell[used] / tissue_per_cell[used].sum() * observed[used].sum()
    assert scipy.stats.chisquare(observed[used], expected).pvalue > 1e-3


def test_the_slides_tissue_lives_in_one_shared_table(tmp_path, mask_cache):
    for i in range(3):
        write_slide(tmp_path / f's{i}.svs', seed=i)
    with patch_sampler.PatchSampler(str(tmp_path), resolution=16, downsample=4, num_readers=1,
                                    mask_cache_dir=mask_cache, log=lambda m: None) as sampler:
        buffer = sampler._table.buffer.map
        for slide in sampler.slides:
            assert np.shares_memory(slide.tissue.starts, np.frombuffer(buffer, np.uint8))
            assert slide.tissue.nbytes < 64 << 10 < 8 * slide.tissue.count    # a pixel list: 8 bytes a pixel
        assert sampler.sample(1, 8)[0].shape == (8, 3, 8, 8)


# ----------------------------------------------------------------------------------------------
# Reader processes live and die with the trainer.

TRAINER = '''
import sys, psutil
import patch_sampler
sampler = patch_sampler.PatchSampler(sys.argv[1], resolution=16, downsample=4, num_readers=2, mask_cache_dir=sys.argv[2],
                                     log=lambda m: None)
print(' '.join(str(c.pid) for c in psutil.Process().children()), flush=True)
feed = sampler.batches(0, 64)
while True:
    next(feed)
'''


def with_repo_on_path():
    return {**os.environ, 'PYTHONPATH': REPO}


def start_trainer(tmp_path, mask_cache):
    (tmp_path / 'slides').mkdir()
    for i in range(2):
        write_slide(tmp_path / 'slides' / f's{i}.svs', seed=i)
    script = tmp_path / 'trainer.py'
    script.write_text(textwrap.dedent(TRAINER))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / 'slides'), mask_cache], cwd=REPO,
                            env=with_repo_on_path(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    readers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(readers) == 2, readers
    time.sleep(1.0)     # reading
    return proc, readers


def gone_within(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize('signum', [signal.SIGKILL, signal.SIGTERM], ids=['SIGKILL', 'SIGTERM'])
def test_readers_exit_when_the_trainer_dies(tmp_path, mask_cache, signum):
    proc, readers = start_trainer(tmp_path, mask_cache)
    assert all(psutil.pid_exists(pid) for pid in readers)
    if signum == signal.SIGKILL:
        os.kill(proc.pid, signum)       # the trainer alone, as the out-of-memory killer does
    else:
        os.killpg(proc.pid, signum)     # the whole group, as SLURM does: readers ignore it, the trainer ends
    proc.wait(timeout=30)
    assert gone_within(readers, 10), 'reader processes outlived the trainer'


def test_a_dead_reader_is_named(tmp_path, mask_cache):
    write_slide(tmp_path / 's.svs')
    with patch_sampler.PatchSampler(str(tmp_path), resolution=16, downsample=4, num_readers=2,
                                    mask_cache_dir=mask_cache, log=lambda m: None) as sampler:
        victim = sampler._pool.workers[1].process
        victim.kill()
        victim.wait()
        with pytest.raises(worker_pool.WorkerError, match=rf'slide reader process 1 \(pid {victim.pid}\) '
                                                           r'(died|is gone).*SIGKILL'):
            sampler.sample(0, 8)


def test_an_error_in_a_reader_comes_back_as_itself(tmp_path, mask_cache):
    write_slide(tmp_path / 'case 1.svs')
    (tmp_path / 'rois').mkdir()
    (tmp_path / 'rois' / 'case 1.geojson').write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(ValueError, match='case 1.geojson: not valid GeoJSON') as raised:
        patch_sampler.PatchSampler(str(tmp_path), resolution=16, downsample=4, num_readers=2, roi_dir=str(tmp_path / 'rois'),
                                   mask_cache_dir=mask_cache, log=lambda m: None)
    assert 'raised in slide reader process' in ''.join(getattr(raised.value, '__notes__', []))


# ----------------------------------------------------------------------------------------------
# Many slides.

MANY_SLIDES = '''
import resource, sys
import numpy as np
import patch_sampler
print('open files limit', resource.getrlimit(resource.RLIMIT_NOFILE), flush=True)
with patch_sampler.PatchSampler(sys.argv[1], resolution=16, downsample=4, num_readers=2, mask_cache_dir=sys.argv[2],
                                log=print) as sampler:
    for _ in range(8):
        images, _ = sampler.sample(0, 256)
        assert images.shape == (256, 3, 16, 16) and np.ptp(images.reshape(256, -1), axis=1).min() > 0
    print('slides', len(sampler.slides), 'patches', sampler.patches_read)
'''


def test_a_cohort_larger_than_the_open_files_limit(tmp_path, mask_cache):
    import resource
    folder = tmp_path / 'slides'
    folder.mkdir()
    for i in range(200):
        write_slide(folder / f's{i:03d}.svs', 512, 384, tissue_boxes=[(64, 48, 448, 336)], seed=i)
    script = tmp_path / 'many.py'
    script.write_text(MANY_SLIDES)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), mask_cache], cwd=REPO, env=with_repo_on_path(), capture_output=True,
        text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'open files limit (64, 64)' in result.stdout
    assert 'slides 200 patches 2048' in result.stdout


def test_a_large_cohort_pictures_a_sample_and_the_command_pictures_all(tmp_path, mask_cache):
    import dataset_tool
    folder = tmp_path / 'slides'
    folder.mkdir()
    for i in range(patch_sampler.MAX_OVERVIEWS + 6):
        write_slide(folder / f's{i:03d}.svs', 512, 384, tissue_boxes=[(64, 48, 448, 336)], seed=i)
    with patch_sampler.PatchSampler(str(folder), resolution=16, downsample=4, num_readers=2,
                                    mask_cache_dir=mask_cache, log=lambda m: None) as sampler:
        pictured = sampler.write_overview(str(tmp_path / 'run'))
    assert len(pictured) == patch_sampler.MAX_OVERVIEWS == len(set(pictured))
    assert pictured[0].endswith('overview-000-s000.svs.png') and pictured[-1].endswith('-s069.svs.png')
    paths = dataset_tool.slide_overviews(str(folder), str(tmp_path / 'all'), resolution=16, downsample=4,
                                         mask_cache_dir=mask_cache)
    assert len(paths) == len(os.listdir(tmp_path / 'all')) == patch_sampler.MAX_OVERVIEWS + 6


# ----------------------------------------------------------------------------------------------
# A real training run: SIGTERM to its process group, then resume.

@pytest.mark.slow
def test_sigterm_to_a_training_run_leaves_a_snapshot_no_readers_and_a_resume_without_overviews(tmp_path, mask_cache):
    slides = tmp_path / 'slides'
    slides.mkdir()
    for i in range(2):
        write_slide(slides / f's{i}.svs', seed=i)
    results = tmp_path / 'results'
    dataset = dict(class_name='dataset.WSIDataset', tfrecord_dir=str(slides), resolution=8, downsample=8,
                   mask_cache_dir=mask_cache, num_readers=2)
    config = write_config(tmp_path / 'run.py', results, dataset, train=dict(total_kimg=1000, resume_run_id='latest'))
    proc = subprocess.Popen([sys.executable, 'train.py', config], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    readers, output = [], []
    for line in proc.stdout:
        output.append(line)
        readers = readers or [c.pid for c in psutil.Process(proc.pid).children()]
        if line.startswith('tick 1 '):
            break
    os.killpg(proc.pid, signal.SIGTERM)
    output += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, ''.join(output)[-3000:]
    assert len(readers) == 2 and gone_within(readers, 10), 'reader processes outlived the trainer'
    [first] = run_dirs(results)
    assert sorted(os.listdir(os.path.join(first, 'slide-overviews'))) == ['overview-000-s0.svs.png',
                                                                        'overview-001-s1.svs.png']
    snapshots = [n for n in os.listdir(first) if n.startswith('network-snapshot-')]
    assert snapshots, 'SIGTERM left no snapshot'

    write_config(tmp_path / 'run.py', results, dataset, train=dict(total_kimg=1.0, resume_run_id='latest'))
    resumed = subprocess.run([sys.executable, 'train.py', config], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    second = [d for d in run_dirs(results) if d != first]
    assert second and not os.path.exists(os.path.join(second[0], 'slide-overviews'))
