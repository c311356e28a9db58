"""Average MS-SSIM (Wang et al. 2003) between pairs of images: a measure of diversity, lower
is more diverse. The formula is the one the original ProGAN reports, so published numbers compare:

- at each of the five scales, SSIM and the contrast-structure term CS of a pair are averaged over
  all valid filter positions and all channels together (one number per pair and scale);
- the Gaussian window is 11 px with sigma 1.5, except where a scale is smaller than 11 px: there the
  window shrinks to the scale's size and sigma shrinks with it (size * 1.5 / 11), so all five scales
  are kept even for small images (a 64-px image has scales of 64, 32, 16, 8 and 4 px);
- between scales the images are halved by averaging 2x2 blocks;
- negative SSIM and CS values are clipped to 0 before they are raised to the standard weights, and
  the score of a pair is prod(CS_1..4 ** w_1..4) * SSIM_5 ** w_5.

Computed in TensorFlow (separable depthwise convolutions), float32 on values centred on zero so
that the variances do not lose their digits to the squared means.
"""
import numpy as np

import metrics
from tf_compat import tf

STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al., finest scale first.
FILTER_SIZE = 11
FILTER_SIGMA = 1.5
K1, K2 = 0.01, 0.03
MAX_VAL = 255.0


def gaussian_taps(size, sigma):
    """The normalised 1-D Gaussian whose outer product is the 2-D window. Taps sit at the pixel
    centres of a window of `size` pixels, so an even size has no tap at 0."""
    positions = np.arange(size) - (size - 1) / 2
    taps = np.exp(-positions ** 2 / (2 * sigma ** 2))
    return taps / taps.sum()


def window_for_scale(height, width):
    """(size, sigma) of the window at a scale of height x width pixels."""
    size = min(FILTER_SIZE, height, width)
    return size, size * FILTER_SIGMA / FILTER_SIZE


def check_image_size(height, width):
    divisor = 2 ** (len(STANDARD_WEIGHTS) - 1)
    if height % divisor or width % divisor or min(height, width) < divisor:
        raise ValueError('MS-SSIM halves the images %d times: their sides must be multiples of %d, got %dx%d'
                         % (len(STANDARD_WEIGHTS) - 1, divisor, width, height))


def gaussian_filter_valid(images, size, sigma):
    """NHWC images filtered channel by channel with the 2-D Gaussian window, 'valid' positions only."""
    taps = gaussian_taps(size, sigma).astype(np.float32)
    channels = images.shape.as_list()[-1]
    vertical = np.tile(taps.reshape(size, 1, 1, 1), [1, 1, channels, 1])
    horizontal = np.tile(taps.reshape(1, size, 1, 1), [1, 1, channels, 1])
    images = tf.nn.depthwise_conv2d(images, vertical, [1, 1, 1, 1], 'VALID')
    return tf.nn.depthwise_conv2d(images, horizontal, [1, 1, 1, 1], 'VALID')


def ssim_and_cs(a, b):
    """Per pair: SSIM and CS averaged over positions and channels. a, b: NHWC float32, centred on 0
    by subtracting MAX_VAL / 2 (variances and covariance do not change; the means get it back)."""
    _, height, width, _ = a.shape.as_list()
    size, sigma = window_for_scale(height, width)
    filtered = gaussian_filter_valid(tf.concat([a, b, a * a, b * b, a * b], axis=3), size, sigma)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = tf.split(filtered, 5, axis=3)
    var_a = mean_aa - tf.square(mean_a)
    var_b = mean_bb - tf.square(mean_b)
    cov = mean_ab - mean_a * mean_b
    mu_a, mu_b = mean_a + MAX_VAL / 2, mean_b + MAX_VAL / 2
    c1, c2 = (K1 * MAX_VAL) ** 2, (K2 * MAX_VAL) ** 2
    cs_map = (2 * cov + c2) / (var_a + var_b + c2)
    ssim_map = (2 * mu_a * mu_b + c1) / (tf.square(mu_a) + tf.square(mu_b) + c1) * cs_map
    return tf.reduce_mean(ssim_map, axis=[1, 2, 3]), tf.reduce_mean(cs_map, axis=[1, 2, 3])


def ms_ssim_graph(a, b):
    """MS-SSIM per pair of NHWC float32 images in [0, 255] (see the module docstring)."""
    a, b = a - MAX_VAL / 2, b - MAX_VAL / 2
    score = 1.0
    for scale, weight in enumerate(STANDARD_WEIGHTS):
        ssim, cs = ssim_and_cs(a, b)
        coarsest = scale == len(STANDARD_WEIGHTS) - 1
        score *= tf.pow(tf.maximum(ssim if coarsest else cs, 0.0), weight)
        if not coarsest:
            a, b = [tf.nn.avg_pool2d(x, 2, 2, 'VALID') for x in (a, b)]
    return score


class MSSSIM:
    """MS-SSIM per pair of NCHW uint8 images, in its own graph and session."""

    def __init__(self, image_shape):
        channels, height, width = image_shape
        check_image_size(height, width)
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images_a = tf.placeholder(tf.uint8, [None, channels, height, width])
            self.images_b = tf.placeholder(tf.uint8, [None, channels, height, width])
            nhwc = [tf.cast(tf.transpose(x, [0, 2, 3, 1]), tf.float32) for x in (self.images_a, self.images_b)]
            self.scores = ms_ssim_graph(*nhwc)
        self.sess = tf.Session(graph=self.graph)

    def __call__(self, images_a, images_b):
        return self.sess.run(self.scores, {self.images_a: images_a, self.images_b: images_b})


class API:
    def __init__(self, num_images, image_shape, image_dtype, minibatch_size):
        self.msssim = MSSSIM(image_shape)
        self.sum = 0.0
        self.num_pairs = 0

    def get_metric_names(self):
        return ['MS-SSIM']

    def get_metric_formatting(self):
        return ['%-10.4f']

    def begin(self, mode):
        metrics.check_mode(mode)
        self.sum = 0.0
        self.num_pairs = 0

    def feed(self, mode, minibatch):
        # Consecutive images of a random minibatch form random pairs; an odd one out is left.
        num_pairs = len(minibatch) // 2
        scores = self.msssim(minibatch[0: 2 * num_pairs: 2], minibatch[1: 2 * num_pairs: 2])
        self.sum += float(np.sum(scores))
        self.num_pairs += num_pairs

    def end(self, mode):
        return [self.sum / self.num_pairs]
