"""util_scripts.py on a small run made by the tests: two snapshots of small 16x16 networks, a
log.txt with tick lines, fakes*.png grids, and a dataset (TFRecords or whole-slide images)."""

import os
import sys

import imageio.v3 as iio
import numpy as np
import PIL.Image
import pytest
import scipy.ndimage

import config
import dataset_tool
import legacy
import misc
import tfutil
import util_scripts
from conftest import write_slide
from tf_compat import tf
from train_helpers import write_config

RESOLUTION = 16
NET_KWARGS = dict(num_channels=3, resolution=RESOLUTION, label_size=0, fmap_base=64, fmap_max=32)
TICKS = [(0.5, 1.00, 20), (1.0, 0.50, 45), (2.0, 0.00, 130)]  # (kimg, lod, seconds)
FAKES_GRID = (64, 32)  # Width and height of the fakes*.png grids.


def smooth_images(count, seed):
    """NCHW uint8 smooth random colour images."""
    noise = np.random.RandomState(seed).randn(count, 3, RESOLUTION, RESOLUTION)
    return np.uint8(np.clip(128 + 400 * scipy.ndimage.gaussian_filter(noise, [0, 0, 2, 2]), 0, 255))


def write_tick_log(run_dir):
    with open(os.path.join(run_dir, 'log.txt'), 'wt') as log:
        log.write('Training...\n')
        for tick, (kimg, lod, seconds) in enumerate(TICKS, 1):  # The line train.py prints.
            line = misc.format_tick_line(misc.TickLine(tick=tick, kimg=kimg, lod=lod, minibatch=16, total_sec=seconds,
                                                       sec_per_tick=1.0, sec_per_kimg=1.0, maintenance_sec=0.1))
            log.write(line + '\n')


def write_fakes(run_dir):
    """One plain grid per tick, each a different grey, and the initial one (no tick: unused)."""
    for kimg, shade in [(0, 0), (0.5, 60), (1.0, 120), (2.0, 180)]:
        grid = np.full([FAKES_GRID[1], FAKES_GRID[0], 3], shade, np.uint8)
        PIL.Image.fromarray(grid).save(os.path.join(run_dir, 'fakes%06d.png' % int(kimg)))


def make_run(root, dataset_kwargs):
    """A run directory in root/results with two snapshots of different networks."""
    results = str(root / 'results')
    run_dir = misc.create_result_subdir(results, 'small')
    write_config(os.path.join(run_dir, 'config.py'), results, dataset_kwargs)
    write_tick_log(run_dir)
    write_fakes(run_dir)
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        G = tfutil.Network('G', func='networks.G_paper', latent_size=32, **NET_KWARGS)
        D = tfutil.Network('D', func='networks.D_paper', **NET_KWARGS)
        Gs = G.clone('Gs')
        for kimg in [0, 1]:
            misc.save_pkl((G, D, Gs), os.path.join(run_dir, 'network-snapshot-%06d.pkl' % kimg))
            Gs.reset_trainables()  # The next snapshot generates other images.
    return results, run_dir


@pytest.fixture(scope='module')
def tfrecord_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('tfrecord_run')
    tfrecord_dir = str(root / 'smooth16')
    dataset_tool.write_tfrecords(tfrecord_dir, smooth_images(64, seed=0))
    return make_run(root, dict(tfrecord_dir=tfrecord_dir))


@pytest.fixture(scope='module')
def wsi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('wsi_run')
    slide_dir = root / 'slides'
    slide_dir.mkdir()
    write_slide(slide_dir / 'a.svs', width=1024, height=768)
    return make_run(root, dict(class_name='dataset.WSIDataset', tfrecord_dir=str(slide_dir), wsi_ext='.svs',
                               resolution=RESOLUTION, downsample=4, mask_cache_dir=str(root / 'masks')))


def use_results(monkeypatch, results):
    """Point config at a run's results dir, as train.py would for a utility script."""
    monkeypatch.setattr(config, 'result_dir', results)
    monkeypatch.setattr(config, 'desc', 'util')
    monkeypatch.setattr(config, 'num_gpus', 1)


@pytest.fixture
def run(tfrecord_run, monkeypatch, tf_session):
    """The TFRecord run's directory, config pointing at its results dir, and a session."""
    results, run_dir = tfrecord_run
    use_results(monkeypatch, results)
    return run_dir


def run_id(run_dir):
    return int(os.path.basename(run_dir).split('-')[0])


def pngs_in(result_subdir):
    return sorted(name for name in os.listdir(result_subdir) if name.endswith('.png'))


def read_video(path):
    """[frame, height, width, 3] uint8, decoded by the ffmpeg that imageio-ffmpeg ships."""
    return np.stack(list(iio.imiter(path, plugin='FFMPEG')))

# ----------------------------------------------------------------------------
# Fake images.


def test_generate_fake_images_writes_grids_and_repeats_with_the_same_seed(run):
    first = util_scripts.generate_fake_images(run_id(run), snapshot=1, grid_size=[3, 2], num_pngs=3, random_seed=5)
    prefix = os.path.basename(run) + '-network-snapshot-000001-'
    assert pngs_in(first) == [prefix + '%06d.png' % i for i in range(3)]
    images = [np.asarray(PIL.Image.open(os.path.join(first, name))) for name in pngs_in(first)]
    assert all(image.shape == (2 * RESOLUTION, 3 * RESOLUTION, 3) for image in images)
    assert not np.array_equal(images[0], images[1])  # Fresh latents for every PNG.
    assert os.path.isfile(os.path.join(first, '_done.txt'))

    again = util_scripts.generate_fake_images(run_id(run), snapshot=1, grid_size=[3, 2], num_pngs=3, random_seed=5)
    other = util_scripts.generate_fake_images(run_id(run), snapshot=1, grid_size=[3, 2], num_pngs=1, random_seed=6)
    assert again != first
    for name, image in zip(pngs_in(again), images):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(os.path.join(again, name))), image)
    assert not np.array_equal(np.asarray(PIL.Image.open(os.path.join(other, pngs_in(other)[0]))), images[0])


def test_generate_fake_images_shrinks_and_names(run):
    result = util_scripts.generate_fake_images(run_id(run), num_pngs=2, image_shrink=2, png_prefix='x-')
    assert pngs_in(result) == ['x-000000.png', 'x-000001.png']
    assert PIL.Image.open(os.path.join(result, 'x-000000.png')).size == (RESOLUTION // 2, RESOLUTION // 2)

# ----------------------------------------------------------------------------
# Videos.


def test_smooth_latent_walk_has_unit_variance_and_loops():
    walk = util_scripts.smooth_latent_walk(200, 2, [8], smoothing_frames=10, random_state=np.random.RandomState(0))
    assert walk.shape == (200, 2, 8) and walk.dtype == np.float32
    assert np.mean(np.square(walk)) == pytest.approx(1.0, rel=1e-5)
    steps = np.abs(np.diff(walk, axis=0, append=walk[:1]))  # Including last -> first.
    assert steps.max() < 0.5 * np.abs(walk).max()


def test_interpolation_video_has_the_requested_frames(run):
    result = util_scripts.generate_interpolation_video(run_id(run), grid_size=[2, 1], image_zoom=3, duration_sec=1.5,
                                                       smoothing_sec=0.2, mp4_fps=10, mp4='walk.mp4')
    frames = read_video(os.path.join(result, 'walk.mp4'))
    assert frames.shape == (15, 3 * RESOLUTION, 2 * 3 * RESOLUTION, 3)
    assert np.abs(np.float32(frames[0]) - frames[-1]).mean() > 1  # The walk moves.


def test_training_video_shows_the_grids_with_labels(run):
    result = util_scripts.generate_training_video(run_id(run), duration_sec=2.0, time_warp=1.0, mp4_fps=10)
    frames = read_video(os.path.join(result, os.path.basename(run) + '-train.mp4'))
    assert frames.shape == (20, FAKES_GRID[1], FAKES_GRID[0], 3)
    # Frame i shows wall clock i / 19 * 130 s: the first tick's grid (20 s) up to frame 6, the
    # second's (45 s) up to frame 18, the last tick's (130 s) in the last frame.
    top = np.float32(frames[:, :FAKES_GRID[1] // 2]).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(top[[0, 6, 7, 18, 19]], [60, 60, 120, 120, 180], atol=4)
    bottom = np.float32(frames[:, -FAKES_GRID[1] // 4:])
    assert np.all(bottom.std(axis=(1, 2, 3)) > 10)  # Labels on every frame.


def test_labels_are_white_with_dark_outlines_along_the_bottom():
    grey = np.full([64, 128, 3], 128, np.uint8)
    labelled = util_scripts.draw_labels(grey, 'lod 1.00', '1m 05s', '12 kimg')
    assert labelled.shape == grey.shape
    np.testing.assert_array_equal(labelled[:40], grey[:40])
    assert labelled[40:].max() > 200 and labelled[40:].min() < 30
    other = util_scripts.draw_labels(grey, 'lod 0.50', '1m 05s', '12 kimg')
    assert not np.array_equal(labelled[:, :40], other[:, :40])  # The left label is lod's.


def test_parse_training_log_pairs_ticks_with_their_grids(run):
    snaps = util_scripts.parse_training_log(run)
    assert [(t, os.path.basename(png), kimg, lod) for t, png, kimg, lod in snaps] == [
        (20, 'fakes000000.png', 0.5, 1.0), (45, 'fakes000001.png', 1.0, 0.5), (130, 'fakes000002.png', 2.0, 0.0)]

# ----------------------------------------------------------------------------
# Metrics.


def test_metric_names_map_to_their_modules_and_unknown_ones_are_named():
    assert util_scripts.metric_class_name('fid') == 'metrics.frechet_inception_distance.API'
    assert util_scripts.metric_class_name('my_metrics.API') == 'my_metrics.API'
    with pytest.raises(ValueError, match="Unknown metric 'ssim': use 'swd', 'fid', 'is', 'msssim'"):
        util_scripts.metric_class_name('ssim')


def metric_rows(log_file):
    """The table's rows, split into columns: from its header on, without other lines the run printed."""
    with open(log_file) as log:
        lines = log.read().splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith('Snapshot '))
    return [line.split() for line in lines[header:] if not line.startswith('RecordingMetric')]


@pytest.mark.parametrize('which_run', ['tfrecord_run', 'wsi_run'])
def test_evaluate_metrics_writes_a_row_per_snapshot(which_run, request, monkeypatch, tf_session):
    results, run_dir = request.getfixturevalue(which_run)
    use_results(monkeypatch, results)
    util_scripts.evaluate_metrics(run_id(run_dir), log='metric-test.txt', metrics=['swd', 'msssim'],
                                  num_images=48, real_passes=2, minibatch_size=16)
    rows = metric_rows(os.path.join(run_dir, 'metric-test.txt'))
    assert rows[0] == ['Snapshot', 'Time_eval', 'SWDx1e3_16', 'SWDx1e3_avg', 'MS-SSIM']
    assert [row[0] for row in rows[1:]] == ['---', 'Reals', 'Reals2', '1', '0']
    values = {row[0]: [float(v) for v in row[-3:]] for row in rows[2:]}  # Time_eval may hold spaces.
    assert values['Reals'][:2] == [0.0, 0.0]  # The reals against themselves.
    assert 0 < values['Reals2'][1] < min(values['1'][1], values['0'][1])  # Reals are closest to reals.
    assert all(0 <= v[2] <= 1 for v in values.values())
    assert values['1'] != values['0']


class RecordingMetric:
    """A metric API that keeps what it is fed in each mode, and says so on stderr."""
    fed = {}

    def __init__(self, num_images, image_shape, image_dtype, minibatch_size):
        pass

    def get_metric_names(self):
        return ['Fed']

    def get_metric_formatting(self):
        return ['%-6d']

    def begin(self, mode):
        RecordingMetric.fed[mode] = []

    def feed(self, mode, minibatch):
        RecordingMetric.fed[mode].append(minibatch)

    def end(self, mode):
        print('RecordingMetric saw %s' % mode, file=sys.stderr)
        return [sum(len(images) for images in RecordingMetric.fed[mode])]


ORIGINAL_SNAPSHOT_KIMGS = [140, 280]


@pytest.fixture(scope='module')
def original_run(tmp_path_factory):
    """A run directory as the original ProGAN leaves it: config.txt (a `name = str(value)` line per
    setting), log.txt, its snapshot names with original-layout pickles, network-final.pkl; the
    TFRecords it names hold images in a known order."""
    from test_legacy_pickles import make_networks, write_legacy_pickle
    root = tmp_path_factory.mktemp('original_run')
    images = smooth_images(40, seed=3)
    dataset_tool.write_tfrecords(str(root / 'smooth16'), images)
    run_dir = root / 'results' / '000-pgan-smooth16-preset-v2-1gpu-fp32'
    run_dir.mkdir(parents=True)
    settings = dict(data_dir='datasets', result_dir='results', random_seed=1000, desc='pgan-smooth16-preset-v2-1gpu-fp32',
                    num_gpus=1, dataset={'tfrecord_dir': str(root / 'smooth16')},
                    train={'func': 'train.train_progressive_gan', 'mirror_augment': False, 'total_kimg': 12000},
                    env={'TF_CPP_MIN_LOG_LEVEL': '1'}, sched={'minibatch_base': 4})
    (run_dir / 'config.txt').write_text(''.join('%s = %s\n' % (k, v) for k, v in sorted(settings.items())))
    (run_dir / 'log.txt').write_text('Training...\n')
    for seed, name in enumerate(['network-snapshot-%06d.pkl' % kimg for kimg in ORIGINAL_SNAPSHOT_KIMGS]
                                + ['network-final.pkl']):
        states, _ = make_networks(seed=seed, label_size=0)
        write_legacy_pickle(str(run_dir / name), states)
    return str(root / 'results'), str(run_dir), images


def test_evaluate_metrics_reads_a_run_of_the_original_and_logs_all_it_prints(original_run, monkeypatch, tf_session):
    results, run_dir, images = original_run
    use_results(monkeypatch, results)
    # The pickles hold our stand-in for the original's networks.py (tests/fixtures), which a user
    # would have to vouch for; the original's own source is known without this.
    from test_legacy_pickles import FIXTURE_FINGERPRINT
    monkeypatch.setenv(legacy.TRUSTED_SOURCES_ENV, FIXTURE_FINGERPRINT)
    util_scripts.evaluate_metrics(0, log='metric-original.txt', metrics=['test_util_scripts.RecordingMetric', 'msssim'],
                                  num_images=24, real_passes=1, minibatch_size=8)
    rows = metric_rows(os.path.join(run_dir, 'metric-original.txt'))
    with open(os.path.join(run_dir, 'metric-original.txt')) as log:
        lines = log.read().splitlines()
    assert rows[0] == ['Snapshot', 'Time_eval', 'Fed', 'MS-SSIM']
    assert [row[0] for row in rows[1:]] == ['---', 'Reals'] + [str(k) for k in reversed(ORIGINAL_SNAPSHOT_KIMGS)]
    assert all(row[-2] == '24' for row in rows[2:])
    # Everything printed reached the log, stderr included, not only the table.
    assert any(line.startswith('Streaming data using dataset.TFRecordDataset') for line in lines)
    assert any(line.startswith('Setting up metric metrics.ms_ssim.API') for line in lines)
    assert [line for line in lines if line.startswith('RecordingMetric saw')] == [
        'RecordingMetric saw %s' % mode for mode in ['warmup', 'reals', 'fakes', 'fakes']]
    # The reals are the first images of the TFRecords, in file order.
    np.testing.assert_array_equal(np.concatenate(RecordingMetric.fed['reals']), images[:24])


def test_a_config_txt_line_that_is_not_a_literal_is_named(tmp_path):
    (tmp_path / 'config.txt').write_text("dataset = {'tfrecord_dir': os.getcwd()}\n")
    with pytest.raises(ValueError, match=r"config\.txt: the dataset line is not a Python dict literal"):
        misc.parse_config_for_previous_run(str(tmp_path))

