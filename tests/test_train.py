"""train.py end to end: a real run in a fresh process leaves every result file, and a resumed run
continues from its snapshot with the right kimg, LOD, time and Gs."""

import glob
import os

import numpy as np
import PIL.Image
import pytest

import dataset_tool
from tf_compat import tf
from train_helpers import run_dirs, run_train, tick_lines, write_config

pytestmark = pytest.mark.slow


def shapes_images(count, resolution, seed):
    """Coloured rectangles and discs on a light background, NCHW uint8."""
    rnd = np.random.RandomState(seed)
    yy, xx = np.mgrid[:resolution, :resolution]
    images = np.empty([count, 3, resolution, resolution], np.uint8)
    for i in range(count):
        image = np.full([3, resolution, resolution], 230, np.float32)
        for _ in range(2):
            colour = rnd.uniform(0, 255, 3)[:, None, None]
            cx, cy = rnd.uniform(0.2, 0.8, 2) * resolution
            r = rnd.uniform(0.15, 0.3) * resolution
            inside = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2) if rnd.rand() < 0.5 else \
                ((abs(xx - cx) < r) & (abs(yy - cy) < r))
            image = np.where(inside[None], colour, image)
        images[i] = image.clip(0, 255).astype(np.uint8)
    return images


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'shapes16')
    dataset_tool.write_tfrecords(path, shapes_images(256, 16, seed=0))
    return path


def event_tags(run_dir):
    tags = set()
    for event_file in glob.glob(os.path.join(run_dir, 'events.out.tfevents.*')):
        for event in tf.train.summary_iterator(event_file):
            tags.update(value.tag for value in event.summary.value)
    return tags


SCHEDULE = dict(lod_training_kimg=1, lod_transition_kimg=1, tick_kimg_base=1, minibatch_base=8)


def test_training_leaves_results_and_resume_continues(shapes_dir, tmp_path):
    results = tmp_path / 'results'
    first = write_config(tmp_path / 'first.py', results, dict(tfrecord_dir=shapes_dir), desc='first',
                         train=dict(total_kimg=4), sched=SCHEDULE)
    run_train(first)
    [run_dir] = run_dirs(results)
    names = set(os.listdir(run_dir))
    assert {'log.txt', 'config.py', 'reals.png', 'fakes000000.png', 'fakes000004.png', 'network-final.pkl',
            '_training-done.txt', 'network-snapshot-000002.pkl', 'network-snapshot-000004.pkl'} <= names
    assert not [n for n in names if '.tmp' in n]
    assert 'reals-augmented.png' not in names       # TFRecords have no augmentation of their own
    ticks = tick_lines(run_dir)
    assert [round(k) for k, _ in ticks] == [1, 2, 3, 4]
    # 4x4, then 8x8, then fading into 16x16 (the lod printed is the one of the tick's last minibatches).
    assert ticks[0][1] == 2.0 and ticks[1][1] == 1.0 and 0.9 < ticks[2][1] <= 1.0 and ticks[3][1] < 0.1
    tags = event_tags(run_dir)
    for prefix in ['Loss/', 'Progress/', 'Timing/', 'TrainG/', 'TrainD/']:
        assert any(tag.startswith(prefix) for tag in tags), prefix
    assert {'Loss/real_scores', 'Loss/mixed_norms', 'Progress/kimg', 'Timing/sec_per_kimg',
            'TrainD/overflow_frequency'} <= tags

    # Resume from the kimg-2 snapshot: kimg and time from the snapshot and the log.
    resumed = write_config(tmp_path / 'resumed.py', results, dict(tfrecord_dir=shapes_dir), desc='resumed',
                           train=dict(total_kimg=4, resume_run_id=run_dir, resume_snapshot=2), sched=SCHEDULE)
    output = run_train(resumed).stdout
    assert 'Resuming at kimg 2.0' in output
    resumed_dir = [d for d in run_dirs(results) if d.endswith('resumed')][0]
    ticks = tick_lines(resumed_dir)
    assert [round(k) for k, _ in ticks] == [3, 4]
    assert ticks[0][1] == 1.0 and ticks[1][1] < 0.1
    # Gs comes back as saved: its first image grid is the one the first run drew at kimg 2.
    grid_before = np.asarray(PIL.Image.open(os.path.join(run_dir, 'fakes000002.png')))
    grid_after = np.asarray(PIL.Image.open(os.path.join(resumed_dir, 'fakes000002.png')))
    assert np.array_equal(grid_before, grid_after)
    assert not np.array_equal(grid_before, np.asarray(PIL.Image.open(os.path.join(run_dir, 'fakes000000.png'))))
    # Wall-clock time carries on from the first run's log instead of restarting at zero.
    with open(os.path.join(resumed_dir, 'log.txt'), encoding='utf-8') as file:
        assert 'time 0s' not in file.read().split('Training...')[1].splitlines()[1]


def test_resume_latest_finds_the_newest_run_with_a_snapshot(shapes_dir, tmp_path):
    results = tmp_path / 'results'
    first = write_config(tmp_path / 'first.py', results, dict(tfrecord_dir=shapes_dir), desc='first',
                         train=dict(total_kimg=1), sched=SCHEDULE)
    run_train(first)
    os.makedirs(os.path.join(str(results), '007-empty'))     # A newer run without snapshots is passed over.
    latest = write_config(tmp_path / 'latest.py', results, dict(tfrecord_dir=shapes_dir), desc='latest',
                          train=dict(total_kimg=2, resume_run_id='latest'), sched=SCHEDULE)
    output = run_train(latest).stdout
    assert '000-first' in output.split('Loading networks from')[1].splitlines()[0]
    assert 'Resuming at kimg 1.0' in output
    [latest_dir] = [d for d in run_dirs(results) if d.endswith('latest')]
    assert os.path.basename(latest_dir).startswith('008-')
    assert [round(k) for k, _ in tick_lines(latest_dir)] == [2]
