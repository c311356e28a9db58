"""train.process_reals against a numpy reference: the dynamic-range map, the mirror (its random
draw fed, so which images flip is chosen), the fade towards the next coarser LOD at a fractional
LOD, and the nearest-neighbour upscaling to the networks' resolution."""

import numpy as np
import pytest

import tfutil
import train
from tf_compat import tf
from tiny_nets import random_draws

DRANGE_DATA, DRANGE_NET = [0, 255], [-1, 1]


def reference(images, lod, flip):
    """What the networks should see of uint8 NCHW images taken at LOD floor(lod)."""
    x = images.astype(np.float64) / 255 * 2 - 1
    x = np.where(flip[:, None, None, None], x[..., ::-1], x)
    n, c, h, w = x.shape
    coarser = x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5)).repeat(2, axis=2).repeat(2, axis=3)
    fade = lod - np.floor(lod)      # 0: this LOD as it is; towards 1: the coarser one
    x = (1 - fade) * x + fade * coarser
    factor = 2 ** int(np.floor(lod))
    return x.repeat(factor, axis=2).repeat(factor, axis=3)


def images_at(lod, count=4, resolution=16, seed=0):
    size = resolution >> int(np.floor(lod))
    return np.random.default_rng(seed).integers(0, 256, [count, 3, size, size]).astype(np.uint8)


@pytest.mark.parametrize('lod', [0.0, 0.3, 1.0, 1.75, 2.0, 2.5])
@pytest.mark.parametrize('mirror', ['off', 'on-none-flipped', 'on-some-flipped'])
def test_process_reals_matches_the_reference(tf_session, lod, mirror):
    images = images_at(lod)
    reals = tf.placeholder(tf.uint8, [None, 3, None, None])
    lod_in = tf.placeholder(tf.float32, [])
    out, draws = random_draws(lambda: train.process_reals(reals, lod_in, mirror != 'off', DRANGE_DATA, DRANGE_NET))
    feed = {reals: images, lod_in: lod}
    flip = np.zeros(len(images), bool)
    if mirror != 'off':
        (mirror_draw,) = draws
        uniform = np.array([0.1, 0.45, 0.55, 0.9] if mirror == 'on-some-flipped' else [0.0, 0.2, 0.3, 0.49], np.float32)
        feed[mirror_draw] = uniform.reshape(-1, 1, 1, 1)
        flip = uniform >= 0.5     # probability one half
    else:
        assert not draws
    got = tfutil.run(out, feed)
    assert got.shape == (4, 3, 16, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(images, lod, flip), rtol=0, atol=1e-6)


def test_mirror_flips_about_half_of_the_images(tf_session):
    images = images_at(0, count=2000, resolution=4, seed=1)
    tf.set_random_seed(3)
    out = tfutil.run(train.process_reals(tf.constant(images), 0.0, True, DRANGE_DATA, DRANGE_NET))
    straight = np.abs(out - reference(images, 0.0, np.zeros(len(images), bool))).max(axis=(1, 2, 3)) < 1e-6
    flipped = np.abs(out - reference(images, 0.0, np.ones(len(images), bool))).max(axis=(1, 2, 3)) < 1e-6
    assert (straight | flipped).all()
    assert 0.45 < flipped.mean() < 0.55
