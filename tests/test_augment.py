"""augment.py: the in-graph colour and warp augmentation, checked against scikit-image's HSV and
LAB conversions, on coordinate images for the warp, and in WSIDataset's training graph."""

import numpy as np
import pytest
import skimage.color
import skimage.data

import augment
import dataset
import tfutil
import train
from conftest import write_slide
from tf_compat import tf


def colour_chart():
    """float32 [1, 64, 64, 3] in [0, 1]: hues all round the circle at several saturations and
    brightnesses, above a strip of stained tissue (the immunohistochemistry image)."""
    hue = np.tile(np.linspace(0, 1, 64, endpoint=False), (32, 1))
    saturation = np.repeat(np.linspace(0.35, 0.9, 8), 4)[:, None].repeat(64, 1)
    value = np.tile(np.linspace(0.45, 0.85, 4), 8)[:, None].repeat(64, 1)
    chart = skimage.color.hsv2rgb(np.dstack([hue, saturation, value]))
    tissue = skimage.data.immunohistochemistry()[:256:8, :512:8] / 255.0
    return np.concatenate([chart, tissue])[None].astype(np.float32)


def run_on(function, images, *args):
    return tfutil.run(function(tf.constant(images), *[tf.constant(np.float32(a)) for a in args]))


def test_hue_shift_matches_scikit_image_hsv(tf_session):
    chart = colour_chart()
    hsv = skimage.color.rgb2hsv(chart[0])
    for shift in (-augment.HUE_SHIFT_MAX, 0.01, augment.HUE_SHIFT_MAX):
        out = run_on(augment.shift_hue, chart, [shift])
        expected = skimage.color.hsv2rgb(np.dstack([(hsv[..., 0] + shift) % 1, hsv[..., 1], hsv[..., 2]]))
        assert np.abs(out[0] - expected).max() < 1e-4, shift
        assert np.abs(out[0] - chart[0]).mean() > 0.005       # it did move
    assert np.abs(run_on(augment.shift_hue, chart, [0.0]) - chart).max() < 1e-5


def test_lightness_gamma_matches_scikit_image_lab_with_chroma_kept(tf_session):
    chart = colour_chart()
    lab = skimage.color.rgb2lab(chart[0])
    for log_gamma in (-augment.LIGHTNESS_GAMMA_LOG_MAX, 0.1, augment.LIGHTNESS_GAMMA_LOG_MAX):
        gamma = np.exp(log_gamma)
        out = run_on(augment.lightness_gamma, chart, [gamma])
        relit = np.dstack([100 * (lab[..., :1] / 100) ** gamma, lab[..., 1:]])
        expected = skimage.color.lab2rgb(relit)
        assert np.abs(out[0] - expected).max() < 2e-3, log_gamma
        lightness_change = skimage.color.rgb2lab(out[0])[..., 0] - lab[..., 0]
        assert np.sign(-log_gamma) * lightness_change.mean() > 3   # gamma < 1 brightens
    assert np.abs(run_on(augment.lightness_gamma, chart, [1.0]) - chart).max() < 1e-4


def affine_fit_residual(values, xs, ys):
    """Largest deviation of values from their least-squares plane a + b x + c y."""
    design = np.stack([np.ones_like(xs), xs, ys], axis=1)
    coefficients = np.linalg.lstsq(design, values, rcond=None)[0]
    return np.abs(design @ coefficients - values).max()


def test_warp_is_a_bounded_non_rigid_piecewise_affine_displacement_of_each_image(tf_session):
    # A coordinate image (channel 0 = x, 1 = y) shows where each output pixel was taken from:
    # bilinear sampling of a linear ramp is exact.
    count, size = 4, 128
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    coords = np.tile(np.dstack([x, y, np.full_like(x, 7)])[None], (count, 1, 1, 1))
    tf.set_random_seed(1)
    out = tfutil.run(augment.random_warp(tf.constant(coords)))
    assert out.shape == coords.shape
    max_shift = augment.WARP_MAX_SHIFT * size
    inner = slice(int(max_shift) + 1, size - int(max_shift) - 1)   # away from the mirrored border
    dx = (out[..., 0] - x)[:, inner, inner]
    dy = (out[..., 1] - y)[:, inner, inner]
    assert np.allclose(out[..., 2], 7)
    assert np.abs(dx).max() <= max_shift + 1e-3 and np.abs(dy).max() <= max_shift + 1e-3
    for i in range(count):
        assert np.abs(dx[i]).mean() > 0.3 and np.abs(dy[i]).mean() > 0.3, 'no displacement'
        assert dx[i].std() > 0.3 and dy[i].std() > 0.3, 'a rigid shift, not a warp'
    assert np.abs(np.diff(dx, axis=2)).max() < 0.5 and np.abs(np.diff(dy, axis=1)).max() < 0.5, 'not smooth'
    assert np.abs(dx[0] - dx[1]).mean() > 0.3, 'the same field for two images'
    # Piecewise affine: exactly affine inside each triangle of the centre mesh cell, not across them.
    cells = augment.WARP_GRID - 1
    u, v = x * cells / (size - 1) - 1, y * cells / (size - 1) - 1     # position inside cell (1, 1)
    inside = (u > 0.02) & (v > 0.02) & (u < 0.98) & (v < 0.98)
    for image in range(count):
        field = out[image, ..., 0] - x
        halves = [inside & (u + v < 0.97), inside & (u + v > 1.03)]
        for half in halves:
            assert affine_fit_residual(field[half], x[half], y[half]) < 2e-3
        assert affine_fit_residual(field[inside], x[inside], y[inside]) > 0.05, 'one affine map over the cell'
    # Sources stay inside the image: the border is mirrored, not padded.
    assert out[..., :2].min() >= 0 and out[..., :2].max() <= size - 1


def test_augment_minibatch_honours_the_probability_and_the_dynamic_range(tf_session):
    rng = np.random.default_rng(0)
    chart = (colour_chart()[0, ::8, ::8] * 255).astype(np.uint8).transpose(2, 0, 1)   # [3, 8, 8]
    images = np.tile(chart[None], (400, 1, 1, 1))
    images[:, :, :, :4] = rng.integers(0, 256, (400, 3, 8, 4))
    tf.set_random_seed(2)
    placeholder = tf.placeholder(tf.uint8, [None, 3, 8, 8])
    probability = tf.placeholder(tf.float32, [])
    augmented = augment.augment_minibatch(placeholder, probability)
    for p, low, high in ((0.0, 0.0, 0.0), (0.3, 0.22, 0.38), (1.0, 1.0, 1.0)):
        out = tfutil.run(augmented, {placeholder: images, probability: p})
        assert out.dtype == np.float32 and out.shape == images.shape
        assert out.min() >= 0 and out.max() <= 255
        changed = np.abs(out - images).reshape(400, -1).max(axis=1) > 1e-3
        assert low <= changed.mean() <= high, (p, changed.mean())
        assert np.abs(out - images).reshape(400, -1).max(axis=1)[~changed].max(initial=0) < 1e-3
    in_range = augment.augment_minibatch(tf.constant(images[:8] / 127.5 - 1, tf.float32), 1.0, drange=[-1, 1])
    out = tfutil.run(in_range)
    assert -1 <= out.min() < -0.2 and 0.2 < out.max() <= 1


def scope_boundary(prefix):
    """(tensors the ops under name scope `prefix` take from outside it, tensors of theirs used outside)."""
    ops = tf.get_default_graph().get_operations()
    inside = {op for op in ops if op.name.startswith(prefix)}
    taken = {t for op in inside for t in op.inputs if t.op not in inside}
    given = {t for op in inside for t in op.outputs if any(c not in inside for c in t.consumers())}
    return taken, given


def test_training_graph_augments_on_each_device(tf_session_2cpu, tmp_path):
    slides = tmp_path / 'slides'
    slides.mkdir()
    write_slide(slides / 's.tif', width=1024, height=768)
    wsi_set = dataset.WSIDataset(str(slides), wsi_ext='.tif', resolution=8, downsample=8, augment=1.0,
                                 mask_cache_dir=str(tmp_path / 'masks'))
    plain = wsi_set.get_minibatch_np(8)[0]
    assert plain.dtype == np.uint8, 'numpy minibatches (snapshot grids, metrics) stay unaugmented'
    net_kwargs = dict(num_channels=3, resolution=8, label_size=0, fmap_base=32, fmap_max=16)
    G = tfutil.Network('G', func='networks.G_paper', latent_size=16, **net_kwargs)
    D = tfutil.Network('D', func='networks.D_paper', **net_kwargs)
    train.build_training_graph(G, D, G.clone('Gs'), wsi_set, num_gpus=2)
    wsi_set.configure(8, 0)
    for tower in (0, 1):
        scope = f'GPU{tower}/Augment/'
        ops = [op for op in tf.get_default_graph().get_operations() if op.name.startswith(scope)]
        assert ops and all(op.device.lower().endswith(f'cpu:{tower}') for op in ops), tower
        (images,), (augmented,) = scope_boundary(scope)
        before, after = tfutil.run([images, augmented])     # this tower's half of one minibatch
        assert before.shape == after.shape == (4, 3, 8, 8) and after.dtype == np.float32
        assert (np.abs(after - before).reshape(4, -1).max(axis=1) > 1).all(), 'an image went through unaugmented'
    wsi_set.augment = 0.0
    reals = tf.placeholder(tf.uint8, [None, 3, 8, 8])
    assert train.augment_reals(wsi_set, reals) is reals
    assert train.augment_reals(dataset.SyntheticDataset(resolution=8, num_channels=3), reals) is reals
    wsi_set.close()


@pytest.mark.parametrize('size', [4, 8])
def test_smallest_lods_survive_the_warp(tf_session, size):
    images = np.random.default_rng(1).integers(0, 256, (2, 3, size, size)).astype(np.uint8)
    out = tfutil.run(augment.augment_minibatch(tf.constant(images), 1.0))
    assert out.shape == images.shape and np.isfinite(out).all()
