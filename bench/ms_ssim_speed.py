"""MS-SSIM: seconds for --pairs image pairs at --size px with metrics/ms_ssim.py, against
tf.image.ssim_multiscale (what the metric used before: product over scales per channel, then the
channel mean; small images keep fewer scales) on the same pairs in the same run. Then the mean
value of both on --value-pairs pairs of 64-px patches of the demo slides (overlapping ones, and
unrelated ones as a diverse generator's would be), read by OpenSlide: how far the formulas are apart.

  python bench/ms_ssim_speed.py [--pairs 20000] [--size 256] [--minibatch 100] [--value-pairs 500]

The timed pairs are one minibatch of random smooth images fed again and again (20k distinct
pairs of 256-px images would not fit in memory); the work per pair does not depend on the pixels.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import scipy.ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import wsi  # noqa: E402
from metrics import ms_ssim  # noqa: E402
from tf_compat import tf  # noqa: E402

STANDARD_WEIGHTS = ms_ssim.STANDARD_WEIGHTS


class TFImageMSSSIM:
    """The baseline: tf.image.ssim_multiscale with the scales that fit (weights rescaled to sum as
    all five do), the way the metric computed it before."""

    def __init__(self, size):
        scale_sizes = [size >> k for k in range(5)]
        weights = np.array(STANDARD_WEIGHTS[:sum(s >= 11 for s in scale_sizes)])
        weights *= sum(STANDARD_WEIGHTS) / weights.sum()
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.a = tf.placeholder(tf.uint8, [None, 3, size, size])
            self.b = tf.placeholder(tf.uint8, [None, 3, size, size])
            nhwc = [tf.cast(tf.transpose(x, [0, 2, 3, 1]), tf.float32) for x in (self.a, self.b)]
            self.scores = tf.image.ssim_multiscale(*nhwc, max_val=255.0, power_factors=tuple(weights))
        self.sess = tf.Session(graph=self.graph)

    def __call__(self, a, b):
        return self.sess.run(self.scores, {self.a: a, self.b: b})


def smooth_pairs(count, size, seed=0):
    noise = np.random.RandomState(seed).randn(2, count, 3, size, size).astype(np.float32)
    return np.uint8(np.clip(128 + 600 * scipy.ndimage.gaussian_filter(noise, [0, 0, 0, 1.5, 1.5]), 0, 255))


def seconds_for(score_fn, a, b, total_pairs):
    score_fn(a, b)  # Graph set-up and first-run allocations are not timed.
    start = time.time()
    for _ in range(-(-total_pairs // len(a))):
        score_fn(a, b)
    return time.time() - start


def demo_slide_pairs(count, overlapping, size=64):
    """count pairs of patches of the demo slides: the second shifted by a quarter patch, or
    (not overlapping) taken from anywhere else on a slide."""
    import openslide
    rng = np.random.RandomState(0)
    with tempfile.TemporaryDirectory() as folder:
        slides = [openslide.OpenSlide(p) for p in wsi.create_demo_slides(folder, log=lambda _: None)]
        pairs = []
        for index in range(count):
            slide = slides[index % len(slides)]
            width, height = slide.dimensions
            corners = rng.randint(0, [width - 2 * size, height - 2 * size], size=[2, 2])
            if overlapping:
                corners[1] = corners[0] + [size // 4, size // 8]
            pairs.append([np.asarray(slide.read_region(tuple(int(c) for c in corner), 0, (size, size)).convert('RGB'))
                          for corner in corners])
        for slide in slides:
            slide.close()
    pairs = np.array(pairs).transpose(1, 0, 4, 2, 3)
    return pairs[0], pairs[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', type=int, default=20000)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--minibatch', type=int, default=100, help='pairs per call')
    parser.add_argument('--value-pairs', type=int, default=500)
    args = parser.parse_args()

    a, b = smooth_pairs(args.minibatch, args.size)
    for name, score_fn in [('metrics/ms_ssim.py', ms_ssim.MSSSIM([3, args.size, args.size])),
                           ('tf.image.ssim_multiscale', TFImageMSSSIM(args.size))]:
        seconds = seconds_for(score_fn, a, b, args.pairs)
        print('%-26s %d pairs of %d px: %7.1f s (%.0f pairs/s)' % (name, args.pairs, args.size, seconds,
                                                                    args.pairs / seconds))

    for overlapping, kind in [(True, 'overlapping'), (False, 'unrelated')]:
        a, b = demo_slide_pairs(args.value_pairs, overlapping)
        ours, before = ms_ssim.MSSSIM([3, 64, 64])(a, b), TFImageMSSSIM(64)(a, b)
        print('Mean MS-SSIM of %d pairs of %s 64-px demo-slide patches: metrics/ms_ssim.py %.4f, '
              'tf.image.ssim_multiscale %.4f' % (args.value_pairs, kind, ours.mean(), before.mean()))


if __name__ == '__main__':
    main()
