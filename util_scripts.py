"""Tools run on a trained run instead of training: PNGs and latent-walk videos from a snapshot's
generator, a video of the fakes grids over a run, and quality metrics of every snapshot.
config.py picks one with a `train = EasyDict(func='util_scripts...', ...)` line; train.py runs it."""

import bisect
import contextlib
import os
import pathlib
import sys
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import scipy.ndimage
from moviepy import VideoClip
from tqdm import tqdm

import config
import misc
import snapshots
import tfutil
import train
from tf_compat import tf

METRIC_MODULES = {      # The names config.py uses for the metrics -> their module in metrics/.
    'swd': 'sliced_wasserstein',
    'fid': 'frechet_inception_distance',
    'is': 'inception_score',
    'msssim': 'ms_ssim',
}
MAX_VIDEO_SIZE = (1920, 1080)  # Training-video frames are halved until they fit.
WARMUP_MINIBATCHES = 10
REAL_PASSES = [('Reals', 'reals'), ('Reals2', 'fakes')]     # (row title, metric mode) of each pass over reals


def progress(iterable=None, **kwargs):
    """A tqdm bar on the terminal only: the run's log.txt gets no carriage-return updates."""
    return tqdm(iterable, file=sys.__stderr__, dynamic_ncols=True, **kwargs)


def load_gs(run_id, snapshot):
    """(pickle path, Gs) of a run's snapshot; snapshot None means its latest."""
    network_pkl = misc.locate_network_pkl(run_id, snapshot)
    print('Loading networks from "%s"...' % network_pkl)
    *_, Gs = misc.load_pkl(network_pkl)
    return network_pkl, Gs


def output_dir():
    """A new numbered directory under config.result_dir for what the script makes."""
    return misc.create_result_subdir(config.result_dir, config.desc)


def mark_done(result_subdir):
    pathlib.Path(result_subdir, '_done.txt').touch()


def generate_images(Gs, latents, minibatch_size, image_shrink=1, labels=None):
    """NCHW uint8 images from Gs; labels default to all zeros (no class) for conditional networks."""
    if labels is None:
        labels = np.zeros([latents.shape[0]] + Gs.input_shapes[1][1:], np.float32)
    return Gs.run(latents, labels, minibatch_size=minibatch_size, num_gpus=config.num_gpus,
                  out_mul=127.5, out_add=127.5, out_shrink=image_shrink, out_dtype=np.uint8)


def write_video(make_frame, duration_sec, filename, mp4_fps, mp4_codec, mp4_bitrate):
    """An MP4 of make_frame(t) (HWC uint8 RGB), written by the ffmpeg that imageio-ffmpeg ships."""
    clip = VideoClip(frame_function=make_frame, duration=duration_sec)  # Calls make_frame(0) for the size.
    # Our own bar rather than moviepy's, which would print its updates into log.txt.
    with progress(total=int(duration_sec * mp4_fps), desc=os.path.basename(filename), unit='frame') as bar:
        def counted_frame(t):
            bar.update(1)
            return make_frame(t)
        clip.frame_function = counted_frame
        clip.write_videofile(filename, fps=mp4_fps, codec=mp4_codec, bitrate=mp4_bitrate, audio=False, logger=None)


def frame_index(t, fps, num_frames):
    """The frame moviepy means by time t (it asks for times; the scripts render whole frames)."""
    return int(np.clip(np.round(t * fps), 0, num_frames - 1))


# ----------------------------------------------------------------------------
# Random images or image grids from a trained network.


def generate_fake_images(run_id, snapshot=None, grid_size=[1, 1], num_pngs=1, image_shrink=1, png_prefix=None,
                         random_seed=1000, minibatch_size=8):
    """num_pngs PNGs of grid_size images each; the same random_seed gives the same images."""
    network_pkl, Gs = load_gs(run_id, snapshot)
    prefix = png_prefix if png_prefix is not None else misc.get_id_string_for_network_pkl(network_pkl) + '-'
    latent_rng = np.random.RandomState(random_seed)
    images_per_png = int(np.prod(grid_size))
    out_dir = output_dir()
    for index in progress(range(num_pngs), desc='Generating PNGs'):
        latents = misc.random_latents(images_per_png, Gs, random_state=latent_rng)
        png = os.path.join(out_dir, '%s%06d.png' % (prefix, index))
        misc.save_image_grid(generate_images(Gs, latents, minibatch_size, image_shrink), png, drange=[0, 255],
                             grid_size=grid_size)
    mark_done(out_dir)
    return out_dir

# ----------------------------------------------------------------------------
# MP4 video of a random walk in latent space.


def smooth_latent_walk(num_frames, num_images, latent_shape, smoothing_frames, random_state):
    """[frame, image, *latent_shape] latents: white noise smoothed over time by a Gaussian
    (wrapping around, so the video loops), rescaled to unit variance like fresh latents."""
    latents = random_state.randn(num_frames, num_images, *latent_shape).astype(np.float32)
    sigma = [smoothing_frames] + [0] * (1 + len(latent_shape))
    latents = scipy.ndimage.gaussian_filter(latents, sigma, mode='wrap')
    return latents / np.sqrt(np.mean(np.square(latents)))


def grid_frame(images, grid_size, zoom):
    """An RGB video frame (HWC) of the images' grid, enlarged zoom times by repeating pixels."""
    frame = misc.create_image_grid(images, grid_size).transpose(1, 2, 0)
    frame = frame.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return frame.repeat(3, axis=2) if frame.shape[2] == 1 else frame


def generate_interpolation_video(run_id, snapshot=None, grid_size=[1, 1], image_shrink=1, image_zoom=1,
                                 duration_sec=60.0, smoothing_sec=1.0, mp4=None, mp4_fps=30, mp4_codec='libx264',
                                 mp4_bitrate='16M', random_seed=1000, minibatch_size=8):
    """A looping video of a grid of images whose latents wander smoothly (see smooth_latent_walk)."""
    network_pkl, Gs = load_gs(run_id, snapshot)
    if mp4 is None:
        mp4 = misc.get_id_string_for_network_pkl(network_pkl) + '-lerp.mp4'
    frame_count = int(np.rint(duration_sec * mp4_fps))
    walk = smooth_latent_walk(frame_count, int(np.prod(grid_size)), Gs.input_shape[1:], smoothing_sec * mp4_fps,
                              np.random.RandomState(random_seed))

    def make_frame(t):
        latents = walk[frame_index(t, mp4_fps, frame_count)]
        return grid_frame(generate_images(Gs, latents, minibatch_size, image_shrink), grid_size, image_zoom)

    out_dir = output_dir()
    write_video(make_frame, duration_sec, os.path.join(out_dir, mp4), mp4_fps, mp4_codec, mp4_bitrate)
    mark_done(out_dir)
    return out_dir

# ----------------------------------------------------------------------------
# MP4 video of a run's training progress, from its log.txt and fakes*.png.


def parse_training_log(result_subdir):
    """[(seconds, fakes png, kimg, lod)] for every tick of log.txt whose image grid exists."""
    snaps = []
    for tick in misc.read_tick_lines(result_subdir):
        png = os.path.join(result_subdir, 'fakes%06d.png' % int(np.floor(tick.kimg)))
        if os.path.isfile(png):
            snaps.append((tick.total_sec, png, tick.kimg, tick.lod))
    if not snaps:
        raise IOError('No tick with a fakes*.png in "%s": nothing to make a training video of'
                      % os.path.join(result_subdir, 'log.txt'))
    return snaps


def load_video_image(png):
    """An HWC uint8 RGB image, halved until it fits MAX_VIDEO_SIZE."""
    img = np.asarray(PIL.Image.open(png).convert('RGB'))
    while img.shape[1] > MAX_VIDEO_SIZE[0] or img.shape[0] > MAX_VIDEO_SIZE[1]:
        h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
        img = img[:h, :w].astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        img = np.rint(img).astype(np.uint8)
    return img


def draw_labels(img, left, centre, right):
    """The image with three labels along its bottom edge, white with a dark outline."""
    pil = PIL.Image.fromarray(img)
    draw = PIL.ImageDraw.Draw(pil)
    size = min(32, max(8, img.shape[0] // 8))  # The original's 32 px, less on small grids.
    font = PIL.ImageFont.load_default(size=size)  # Ships with Pillow: no system font needed.
    margin = size // 2
    for text, x, anchor in [(left, margin, 'ls'), (centre, img.shape[1] // 2, 'ms'),
                            (right, img.shape[1] - margin, 'rs')]:
        draw.text((x, img.shape[0] - margin), text, font=font, anchor=anchor, fill=(255, 255, 255),
                  stroke_width=max(1, size // 10), stroke_fill=(0, 0, 0))
    return np.asarray(pil)


def generate_training_video(run_id, duration_sec=20.0, time_warp=1.5, mp4=None, mp4_fps=30, mp4_codec='libx264',
                            mp4_bitrate='16M'):
    """The run's fakes grids in the order of training, labelled with LOD, time and kimg."""
    run_dir = misc.locate_result_subdir(run_id)
    if mp4 is None:
        mp4 = os.path.basename(run_dir) + '-train.mp4'
    snaps = parse_training_log(run_dir)
    tick_seconds = [snap[0] for snap in snaps]
    frame_count = int(np.rint(duration_sec * mp4_fps))
    last_image = {}     # One decoded grid: consecutive frames mostly show the same one.

    def make_frame(t):
        # The video's last frame is the run's last tick; time_warp > 1 gives early training, where
        # the grids change most, more of the video.
        progress_fraction = frame_index(t, mp4_fps, frame_count) / max(frame_count - 1, 1)
        run_seconds = progress_fraction ** time_warp * tick_seconds[-1]
        _, png, kimg, lod = snaps[max(bisect.bisect(tick_seconds, run_seconds) - 1, 0)]
        if png not in last_image:
            last_image.clear()
            last_image[png] = load_video_image(png)
        return draw_labels(last_image[png], 'lod %.2f' % lod, misc.format_time(run_seconds), '%.0f kimg' % kimg)

    out_dir = output_dir()
    write_video(make_frame, duration_sec, os.path.join(out_dir, mp4), mp4_fps, mp4_codec, mp4_bitrate)
    mark_done(out_dir)
    return out_dir

# ----------------------------------------------------------------------------
# Quality metrics for every snapshot of a run.


class MetricTable:
    """The metric table: a header, then one row per evaluation, each printed (evaluate_metrics logs
    what is printed). Columns are as wide as each metric's format makes its values."""
    LEADING_COLUMNS = '%-10s%-12s'     # Snapshot, Time_eval

    def __init__(self, metric_objs):
        self.metric_objs = metric_objs
        self.formats = [fmt for obj in metric_objs for fmt in obj.get_metric_formatting()]

    def write_line(self, line):
        print(line)

    def write_header(self):
        names = [name for obj in self.metric_objs for name in obj.get_metric_names()]
        widths = [len(fmt % 0) for fmt in self.formats]
        self.write_line(self.LEADING_COLUMNS % ('Snapshot', 'Time_eval')
                        + ''.join('%-*s' % (width, name) for width, name in zip(widths, names)))
        self.write_line(self.LEADING_COLUMNS % ('---', '---') + ''.join('%-*s' % (width, '---') for width in widths))

    def write_row(self, title, seconds, results):
        values = [value for metric_values in results for value in metric_values]
        self.write_line(self.LEADING_COLUMNS % (title, misc.format_time(seconds))
                        + ''.join(fmt % value for fmt, value in zip(self.formats, values)))


def metric_class_name(name):
    if name in METRIC_MODULES:
        return 'metrics.%s.API' % METRIC_MODULES[name]
    if '.' not in name:
        raise ValueError('Unknown metric %r: use %s, or the dotted name of a metric API class'
                         % (name, ', '.join(repr(short) for short in METRIC_MODULES)))
    return name


def init_metric(name, image_shape, num_images, minibatch_size):
    """The metric's API object, already fed WARMUP_MINIBATCHES of noise: as in the original, so
    that building graphs and allocating buffers is not part of any timing."""
    class_name = metric_class_name(name)
    print('Setting up metric %s...' % class_name)
    metric = tfutil.import_obj(class_name)(num_images=num_images, image_shape=image_shape, image_dtype=np.uint8,
                                           minibatch_size=minibatch_size)
    metric.begin('warmup')
    for _ in range(WARMUP_MINIBATCHES):
        metric.feed('warmup', np.random.randint(0, 256, size=[minibatch_size] + image_shape, dtype=np.uint8))
    metric.end('warmup')
    return metric


def minibatch_ranges(total, size):
    """(begin, end) of consecutive minibatches over total items; the last may be smaller."""
    return [(begin, min(begin + size, total)) for begin in range(0, total, size)]


def evaluate_pass(metric_objs, mode, num_images, minibatch_size, get_images, desc):
    """Feeds num_images from get_images(begin, end) to every metric; their results and the time."""
    start = time.time()
    for metric in metric_objs:
        metric.begin(mode)
    with progress(total=num_images, desc=desc, unit='img', leave=False) as bar:
        for begin, end in minibatch_ranges(num_images, minibatch_size):
            images = get_images(begin, end)
            if images.shape[1] == 1:
                images = images.repeat(3, axis=1)   # The metrics expect RGB.
            for metric in metric_objs:
                metric.feed(mode, images)
            bar.update(end - begin)
    return [metric.end(mode) for metric in metric_objs], time.time() - start


def mirror_randomly(images):
    """Each image flipped left-right with probability 1/2, as mirror_augment trains."""
    flip = np.random.rand(images.shape[0]) < 0.5
    return np.where(flip[:, None, None, None], images[..., ::-1], images)


def evaluate_reals(dataset_obj, mirror_augment, table, num_images, minibatch_size, real_passes):
    """Rows 'Reals' (the reference set against itself) and, with real_passes 2, 'Reals2' (fresh reals
    against it: how close the metric gets without any generator). Returns the labels of the last
    pass's reals, which the fakes are conditioned on."""
    if real_passes not in (0, 1, 2):
        raise ValueError('real_passes must be 1 (reals) or 2 (reals, then more reals against them), not %r'
                         % (real_passes,))
    labels = np.zeros([num_images, dataset_obj.label_size], np.float32)

    def get_reals(begin, end):
        images, batch_labels = dataset_obj.get_minibatch_np(end - begin)   # Full resolution.
        labels[begin:end] = batch_labels
        return mirror_randomly(images) if mirror_augment else images

    for title, mode in REAL_PASSES[:real_passes]:
        results, seconds = evaluate_pass(table.metric_objs, mode, num_images, minibatch_size, get_reals, title)
        table.write_row(title, seconds, results)
    return labels


def evaluate_snapshot(snapshot_pkl, labels, table, num_images, minibatch_size):
    """The row of one snapshot's fakes, made in a graph and session of their own."""
    session_config = train.session_config(config.tf_config, config.num_gpus)
    kimg = snapshots.snapshot_kimg(snapshot_pkl)
    with tf.Graph().as_default(), tfutil.create_session(session_config) as session, session.as_default():
        *_, Gs = misc.load_pkl(snapshot_pkl)

        def get_fakes(begin, end):
            count = end - begin
            return generate_images(Gs, misc.random_latents(count, Gs), count, labels=labels[begin:end])

        results, seconds = evaluate_pass(table.metric_objs, 'fakes', num_images, minibatch_size, get_fakes,
                                         'Snapshot %d' % kimg)
    table.write_row('%d' % kimg, seconds, results)


@contextlib.contextmanager
def output_appended_to(log_file):
    """Within the block, everything printed to stdout and stderr is also appended to log_file."""
    with open(log_file, 'at', encoding='utf-8') as log:
        console = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = [misc.TeeOutputStream([stream, log], autoflush=True) for stream in console]
        try:
            yield
        finally:
            sys.stdout, sys.stderr = console


def evaluate_metrics(run_id, log, metrics, num_images, real_passes, minibatch_size=None):
    """Appends to the run's `log` file a table of the metrics for its reals and every snapshot, and
    everything else printed on the way, as the original does. Runs of the original ProGAN and of
    the WSI-ProGAN fork (config.txt instead of config.py) are read too."""
    run_dir = misc.locate_result_subdir(run_id)
    snapshot_pkls = misc.list_network_pkls(run_dir, include_final=False)
    if not snapshot_pkls:
        raise IOError('No network-snapshot-*.pkl in "%s"' % run_dir)
    log_file = os.path.join(run_dir, log)
    print('Logging output to', log_file)
    with output_appended_to(log_file):
        evaluate_run(run_dir, snapshot_pkls, metrics, num_images, real_passes, minibatch_size)


def evaluate_run(run_dir, snapshot_pkls, metrics, num_images, real_passes, minibatch_size):
    """The metric table of evaluate_metrics: header, the reals' rows, then a row per snapshot."""
    dataset_obj, mirror_augment = misc.load_dataset_for_result_subdir(run_dir)
    if minibatch_size is None:
        minibatch_size = int(np.clip(8192 // dataset_obj.shape[1], 4, 256))    # Smaller for larger images.
    image_shape = [3] + list(dataset_obj.shape[1:])
    table = MetricTable([init_metric(name, image_shape, num_images, minibatch_size) for name in metrics])
    table.write_header()
    labels = evaluate_reals(dataset_obj, mirror_augment, table, num_images, minibatch_size, real_passes)
    dataset_obj.close()
    for snapshot_pkl in reversed(snapshot_pkls):    # Newest first, as the original.
        evaluate_snapshot(snapshot_pkl, labels, table, num_images, minibatch_size)
