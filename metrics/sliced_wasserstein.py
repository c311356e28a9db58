"""Multi-scale sliced Wasserstein distance of the ProGAN paper (Karras et al. 2018, app. D).

Each image is decomposed into a Laplacian pyramid from its full resolution down to 16x16.
From each level, 128 random 7x7 neighbourhoods per image become descriptors of 7*7*3
values; each level's descriptor set is normalised per colour channel to zero mean and unit
standard deviation. The SWD between the real and the fake set of a level is the mean
absolute difference of their sorted projections onto 512 random unit directions, drawn as
4 repeats of 128 directions (as the original code does; the paper's "512 projections").
Values are reported x1e3 per level, finest first, and averaged over the levels.
"""
import numpy as np
import scipy.ndimage

import metrics

NHOOD_SIZE = 7
NHOODS_PER_IMAGE = 128
DIR_REPEATS = 4
DIRS_PER_REPEAT = 128
MIN_RESOLUTION = 16

# The 5-tap binomial filter of cv2.pyrDown/pyrUp, applied separably along rows and columns.
_BINOMIAL = np.float32([1, 4, 6, 4, 1]) / 16


def _blur(images, axis, weights):
    # 'mirror' reflects without repeating the edge pixel, as OpenCV's default border does.
    return scipy.ndimage.convolve1d(images, weights, axis=axis, mode='mirror')


def pyr_down(images):
    """Blur and halve NCHW float32 images (cv2.pyrDown per channel)."""
    images = _blur(images, 2, _BINOMIAL)[:, :, ::2, :]
    return _blur(images, 3, _BINOMIAL)[:, :, :, ::2]


def pyr_up(images):
    """Double NCHW float32 images: zero insertion, then the pyrDown blur with 4x its gain
    (2x per axis) (cv2.pyrUp per channel)."""
    n, c, h, w = images.shape
    up = np.zeros([n, c, h * 2, w], np.float32)
    up[:, :, ::2, :] = images
    up = _blur(up, 2, _BINOMIAL * 2)
    out = np.zeros([n, c, h * 2, w * 2], np.float32)
    out[:, :, :, ::2] = up
    return _blur(out, 3, _BINOMIAL * 2)


def laplacian_pyramid(images, num_levels):
    """Band-pass levels, finest first, then the low-pass residual as the last level."""
    levels = [np.float32(images)]
    for _ in range(1, num_levels):
        levels.append(pyr_down(levels[-1]))
        levels[-2] -= pyr_up(levels[-1])
    return levels


def random_descriptors(images, nhood_size, nhoods_per_image, rng):
    """[N * nhoods_per_image, C, nhood_size, nhood_size] neighbourhoods of NCHW images,
    at random centres that keep each neighbourhood inside its image."""
    n, c, h, w = images.shape
    r = nhood_size // 2
    count = n * nhoods_per_image
    # Gather through flat indices (centre + fixed offsets): much faster than broadcasting
    # four index arrays.
    image_idx = np.repeat(np.arange(n), nhoods_per_image)
    centres = (image_idx * c * h + rng.randint(r, h - r, size=count)) * w \
        + rng.randint(r, w - r, size=count)
    dy, dx = np.mgrid[-r: r + 1, -r: r + 1]
    offsets = (np.arange(c)[:, None, None] * h + dy) * w + dx
    flat_idx = centres[:, None, None, None] + offsets
    return np.take(images.reshape(-1), flat_idx)


def normalize_descriptors(desc):
    """Zero mean and unit std per channel over the whole set; flattened to [N, C*H*W]."""
    all_but_channels = (0, 2, 3)
    centred = desc - np.mean(desc, axis=all_but_channels, keepdims=True)
    centred /= np.std(centred, axis=all_but_channels, keepdims=True)
    return centred.reshape(len(centred), -1)


def random_directions(dims, count, rng):
    """[count, dims] float32 unit vectors, uniformly distributed on the sphere."""
    dirs = rng.randn(count, dims)
    dirs /= np.sqrt(np.sum(np.square(dirs), axis=1, keepdims=True))
    return dirs.astype(np.float32)


def sliced_wasserstein(a, b, dir_repeats, dirs_per_repeat, rng):
    """SWD between two equally large float32 descriptor sets [N, D]: the mean over random
    unit directions of the mean |sorted projection of a - sorted projection of b|."""
    assert a.ndim == 2 and a.shape == b.shape
    # [direction, descriptor], so that each direction sorts a contiguous row; reused across
    # repeats because fresh arrays of this size cost noticeable page faults.
    proj_a = np.empty([dirs_per_repeat, len(a)], np.float32)
    proj_b = np.empty_like(proj_a)
    results = []
    for _ in range(dir_repeats):
        dirs = random_directions(a.shape[1], dirs_per_repeat, rng)
        np.matmul(dirs, a.T, out=proj_a)
        np.matmul(dirs, b.T, out=proj_b)
        proj_a.sort(axis=1)
        proj_b.sort(axis=1)
        proj_a -= proj_b
        results.append(np.mean(np.abs(proj_a, out=proj_a), dtype=np.float64))
    return float(np.mean(results))


def pyramid_resolutions(resolution):
    resolutions = []
    while resolution >= MIN_RESOLUTION:
        resolutions.append(resolution)
        resolution //= 2
    return resolutions


class API:
    def __init__(self, num_images, image_shape, image_dtype, minibatch_size, random_seed=123):
        self.resolutions = pyramid_resolutions(image_shape[1])
        # A column per pyramid level, finest first, and their average.
        self.metric_names = ['SWDx1e3_%d' % size for size in self.resolutions] + ['SWDx1e3_avg']
        self.rng = np.random.RandomState(random_seed)
        self.descriptors = [[] for _ in self.resolutions]
        self.desc_real = None

    def get_metric_names(self):
        return list(self.metric_names)

    def get_metric_formatting(self):
        return ['%-13.4f' for _ in self.metric_names]

    def begin(self, mode):
        metrics.check_mode(mode)
        self.descriptors = [[] for _ in self.resolutions]

    def feed(self, mode, minibatch):
        levels = laplacian_pyramid(minibatch, len(self.resolutions))
        for descriptors, level in zip(self.descriptors, levels):
            descriptors.append(random_descriptors(level, NHOOD_SIZE, NHOODS_PER_IMAGE, self.rng))

    def end(self, mode):
        desc = [normalize_descriptors(np.concatenate(d)) for d in self.descriptors]
        self.descriptors = [[] for _ in self.resolutions]
        if mode in ['warmup', 'reals']:
            # Against itself the distance is exactly 0: skip the projections.
            self.desc_real = desc
            return [0.0] * len(self.metric_names)
        dist = [sliced_wasserstein(real, fake, DIR_REPEATS, DIRS_PER_REPEAT, self.rng) * 1e3
                for real, fake in zip(self.desc_real, desc)]
        return dist + [float(np.mean(dist))]
