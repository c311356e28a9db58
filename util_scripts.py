"""Utility scripts for trained runs: fake images, interpolation and training videos, and quality
metrics over every snapshot. To run one, uncomment its line in config.py and launch train.py."""

import bisect
import os
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
import tfutil
import train
from tf_compat import tf

METRIC_CLASS_NAMES = {
    'swd': 'metrics.sliced_wasserstein.API',
    'fid': 'metrics.frechet_inception_distance.API',
    'is': 'metrics.inception_score.API',
    'msssim': 'metrics.ms_ssim.API',
}
MAX_VIDEO_SIZE = (1920, 1080)  # Training-video frames are halved until they fit.


def progress(iterable=None, **kwargs):
    """A tqdm bar on the terminal only: the run's log.txt gets no carriage-return updates."""
    return tqdm(iterable, file=sys.__stderr__, dynamic_ncols=True, **kwargs)


def load_gs(run_id, snapshot):
    network_pkl = misc.locate_network_pkl(run_id, snapshot)
    print('Loading network from "%s"...' % network_pkl)
    _G, _D, Gs = misc.load_pkl(network_pkl)
    return network_pkl, Gs


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


def mark_done(result_subdir):
    open(os.path.join(result_subdir, '_done.txt'), 'wt').close()

# ----------------------------------------------------------------------------
# Random images or image grids from a trained network.


def generate_fake_images(run_id, snapshot=None, grid_size=[1, 1], num_pngs=1, image_shrink=1, png_prefix=None,
                         random_seed=1000, minibatch_size=8):
    network_pkl, Gs = load_gs(run_id, snapshot)
    if png_prefix is None:
        png_prefix = misc.get_id_string_for_network_pkl(network_pkl) + '-'
    random_state = np.random.RandomState(random_seed)
    result_subdir = misc.create_result_subdir(config.result_dir, config.desc)
    for png_idx in progress(range(num_pngs), desc='Generating PNGs'):
        latents = misc.random_latents(int(np.prod(grid_size)), Gs, random_state=random_state)
        images = generate_images(Gs, latents, minibatch_size, image_shrink)
        png = os.path.join(result_subdir, '%s%06d.png' % (png_prefix, png_idx))
        misc.save_image_grid(images, png, drange=[0, 255], grid_size=grid_size)
    mark_done(result_subdir)
    return result_subdir

# ----------------------------------------------------------------------------
# MP4 video of a random walk in latent space.


def smooth_latent_walk(num_frames, num_images, latent_shape, smoothing_frames, random_state):
    """[frame, image, *latent_shape] latents: white noise smoothed over time by a Gaussian
    (wrapping around, so the video loops), rescaled to unit variance like fresh latents."""
    latents = random_state.randn(num_frames, num_images, *latent_shape).astype(np.float32)
    sigma = [smoothing_frames] + [0] * (1 + len(latent_shape))
    latents = scipy.ndimage.gaussian_filter(latents, sigma, mode='wrap')
    return latents / np.sqrt(np.mean(np.square(latents)))


def generate_interpolation_video(run_id, snapshot=None, grid_size=[1, 1], image_shrink=1, image_zoom=1,
                                 duration_sec=60.0, smoothing_sec=1.0, mp4=None, mp4_fps=30, mp4_codec='libx264',
                                 mp4_bitrate='16M', random_seed=1000, minibatch_size=8):
    network_pkl, Gs = load_gs(run_id, snapshot)
    if mp4 is None:
        mp4 = misc.get_id_string_for_network_pkl(network_pkl) + '-lerp.mp4'
    num_frames = int(np.rint(duration_sec * mp4_fps))
    all_latents = smooth_latent_walk(num_frames, int(np.prod(grid_size)), Gs.input_shape[1:],
                                     smoothing_sec * mp4_fps, np.random.RandomState(random_seed))

    def make_frame(t):
        frame_idx = int(np.clip(np.round(t * mp4_fps), 0, num_frames - 1))
        images = generate_images(Gs, all_latents[frame_idx], minibatch_size, image_shrink)
        grid = misc.create_image_grid(images, grid_size).transpose(1, 2, 0)  # HWC
        grid = grid.repeat(image_zoom, axis=0).repeat(image_zoom, axis=1)  # Nearest-neighbour zoom.
        return grid.repeat(3, axis=2) if grid.shape[2] == 1 else grid  # Grayscale -> RGB.

    result_subdir = misc.create_result_subdir(config.result_dir, config.desc)
    write_video(make_frame, duration_sec, os.path.join(result_subdir, mp4), mp4_fps, mp4_codec, mp4_bitrate)
    mark_done(result_subdir)
    return result_subdir

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
    src_result_subdir = misc.locate_result_subdir(run_id)
    if mp4 is None:
        mp4 = os.path.basename(src_result_subdir) + '-train.mp4'
    snaps = parse_training_log(src_result_subdir)
    times = [snap[0] for snap in snaps]
    num_frames = int(np.rint(duration_sec * mp4_fps))
    image_cache = {}

    def make_frame(t):
        # The last frame shows the last tick; time_warp > 1 spends more of the video on early
        # training, where the most changes.
        fraction = np.clip(np.round(t * mp4_fps) / max(num_frames - 1, 1), 0.0, 1.0)
        wallclock = (fraction ** time_warp) * times[-1]
        _, png, kimg, lod = snaps[max(bisect.bisect(times, wallclock) - 1, 0)]
        if png not in image_cache:
            image_cache.clear()
            image_cache[png] = load_video_image(png)
        return draw_labels(image_cache[png], 'lod %.2f' % lod, misc.format_time(wallclock), '%.0f kimg' % kimg)

    result_subdir = misc.create_result_subdir(config.result_dir, config.desc)
    write_video(make_frame, duration_sec, os.path.join(result_subdir, mp4), mp4_fps, mp4_codec, mp4_bitrate)
    mark_done(result_subdir)
    return result_subdir

# ----------------------------------------------------------------------------
# Quality metrics for every snapshot of a run.


class MetricTable:
    """The metric table, printed and appended to the log file row by row."""

    def __init__(self, log_file, metric_objs):
        self.log_file = log_file
        self.metric_objs = metric_objs

    def write_line(self, line):
        print(line)
        with open(self.log_file, 'at', encoding='utf-8') as log:
            log.write(line + '\n')

    def write_header(self):
        names, rules = '%-10s%-12s' % ('Snapshot', 'Time_eval'), '%-10s%-12s' % ('---', '---')
        for obj in self.metric_objs:
            for name, fmt in zip(obj.get_metric_names(), obj.get_metric_formatting()):
                names += '%-*s' % (len(fmt % 0), name)
                rules += '%-*s' % (len(fmt % 0), '---')
        self.write_line(names)
        self.write_line(rules)

    def write_row(self, title, seconds, results):
        line = '%-10s%-12s' % (title, misc.format_time(seconds))
        for obj, values in zip(self.metric_objs, results):
            for value, fmt in zip(values, obj.get_metric_formatting()):
                line += fmt % value
        self.write_line(line)


def init_metric(name, image_shape, num_images, minibatch_size):
    class_name = METRIC_CLASS_NAMES.get(name, name)
    print('Initializing %s...' % class_name)
    obj = tfutil.import_obj(class_name)(num_images=num_images, image_shape=image_shape, image_dtype=np.uint8,
                                        minibatch_size=minibatch_size)
    obj.begin('warmup')  # As the original: settles graphs and allocations before anything is timed.
    for _ in range(10):
        obj.feed('warmup', np.random.randint(0, 256, size=[minibatch_size] + image_shape, dtype=np.uint8))
    obj.end('warmup')
    return obj


def evaluate_pass(metric_objs, mode, num_images, minibatch_size, get_images, desc):
    """Feeds num_images from get_images(begin, end) to every metric; their results and the time."""
    time_begin = time.time()
    for obj in metric_objs:
        obj.begin(mode)
    with progress(total=num_images, desc=desc, unit='img', leave=False) as bar:
        for begin in range(0, num_images, minibatch_size):
            end = min(begin + minibatch_size, num_images)
            images = get_images(begin, end)
            if images.shape[1] == 1:
                images = np.tile(images, [1, 3, 1, 1])  # Grayscale -> RGB.
            for obj in metric_objs:
                obj.feed(mode, images)
            bar.update(end - begin)
    return [obj.end(mode) for obj in metric_objs], time.time() - time_begin


def mirror_randomly(images):
    """Each image flipped left-right with probability 1/2, as mirror_augment trains."""
    flip = np.random.rand(images.shape[0]) < 0.5
    return np.where(flip[:, None, None, None], images[..., ::-1], images)


def evaluate_metrics(run_id, log, metrics, num_images, real_passes, minibatch_size=None):
    result_subdir = misc.locate_result_subdir(run_id)
    snapshot_pkls = misc.list_network_pkls(result_subdir, include_final=False)
    if not snapshot_pkls:
        raise IOError('No network-snapshot-*.pkl in "%s"' % result_subdir)
    log_file = os.path.join(result_subdir, log)
    print('Logging output to', log_file)

    dataset_obj, mirror_augment = misc.load_dataset_for_result_subdir(result_subdir)
    if minibatch_size is None:
        minibatch_size = int(np.clip(8192 // dataset_obj.shape[1], 4, 256))
    image_shape = [3] + list(dataset_obj.shape[1:])
    metric_objs = [init_metric(name, image_shape, num_images, minibatch_size) for name in metrics]
    table = MetricTable(log_file, metric_objs)
    table.write_header()

    # Reals at full resolution; their labels condition the fakes.
    labels = np.zeros([num_images, dataset_obj.label_size], np.float32)

    def get_reals(begin, end):
        images, labels[begin:end] = dataset_obj.get_minibatch_np(end - begin)
        return mirror_randomly(images) if mirror_augment else images

    for title, mode in [('Reals', 'reals'), ('Reals2', 'fakes')][:real_passes]:
        results, seconds = evaluate_pass(metric_objs, mode, num_images, minibatch_size, get_reals, title)
        table.write_row(title, seconds, results)
    if hasattr(dataset_obj, 'close'):
        dataset_obj.close()

    # Snapshots, newest first as in the original; each in its own graph and session.
    session_config = train.session_config(config.tf_config, config.num_gpus)
    for snapshot_pkl in reversed(snapshot_pkls):
        with tf.Graph().as_default(), tfutil.create_session(session_config) as session, session.as_default():
            _G, _D, Gs = misc.load_pkl(snapshot_pkl)

            def get_fakes(begin, end):
                latents = misc.random_latents(end - begin, Gs)
                return generate_images(Gs, latents, end - begin, labels=labels[begin:end])

            kimg = misc.snapshot_kimg(snapshot_pkl)
            results, seconds = evaluate_pass(metric_objs, 'fakes', num_images, minibatch_size, get_fakes,
                                             'Snapshot %d' % kimg)
        table.write_row('%d' % kimg, seconds, results)
