"""Average MS-SSIM (Wang et al. 2003) between pairs of images: a measure of diversity, lower
is more diverse. Computed by `tf.image.ssim_multiscale` (11x11 Gaussian, sigma 1.5, K1 0.01,
K2 0.03, 2x2 average downsampling, per channel then averaged over channels).

The standard five scales need images of at least 11 * 2**4 = 176 pixels: the 11x11 filter
must fit the coarsest scale. Smaller images keep the finest scales that fit (64 px: 3 scales,
128 px: 4) and their standard weights, rescaled to the sum of all five, so identical images
still score 1 and each kept scale keeps its relative weight. Values at small sizes are
therefore comparable with each other but not with 5-scale values.
"""
import numpy as np

import metrics
from tf_compat import tf

STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al., finest first.
FILTER_SIZE = 11


def power_factors_for_size(size):
    """MS-SSIM weights for square images of `size` pixels (see the module docstring)."""
    scale_sizes = [-(-size // 2**k) for k in range(len(STANDARD_WEIGHTS))]  # Odd sizes are padded.
    num_scales = sum(s >= FILTER_SIZE for s in scale_sizes)
    if num_scales == 0:
        raise ValueError('MS-SSIM needs images of at least %d pixels, got %d'
                         % (FILTER_SIZE, size))
    weights = np.array(STANDARD_WEIGHTS[:num_scales])
    return tuple(weights * (sum(STANDARD_WEIGHTS) / weights.sum()))


class MSSSIM:
    """MS-SSIM per pair of NCHW uint8 images, in its own graph and session."""

    def __init__(self, image_shape):
        channels, height, width = image_shape
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images_a = tf.placeholder(tf.uint8, [None, channels, height, width])
            self.images_b = tf.placeholder(tf.uint8, [None, channels, height, width])
            nhwc = [tf.cast(tf.transpose(x, [0, 2, 3, 1]), tf.float32)
                    for x in (self.images_a, self.images_b)]
            self.scores = tf.image.ssim_multiscale(
                *nhwc, max_val=255.0, filter_size=FILTER_SIZE,
                power_factors=power_factors_for_size(min(height, width)))
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
