"""G_paper / D_paper: the original's variable layout, NCHW element order, structures and LOD blending."""

import numpy as np
import pytest

import tfutil

# At R = 64 with fmap_base 512, fmap_max 64: nf = 64, 64, 64, 64, 32, 16 for stages 0..5 (DESIGN 2b).
SMALL_64 = dict(num_channels=3, resolution=64, label_size=0, fmap_base=512, fmap_max=64)

EXPECTED_G_64 = {
    '4x4/Dense/weight': [64, 1024], '4x4/Dense/bias': [64],
    '4x4/Conv/weight': [3, 3, 64, 64], '4x4/Conv/bias': [64],
    'ToRGB_lod4/weight': [1, 1, 64, 3], 'ToRGB_lod4/bias': [3],
    '8x8/Conv0_up/weight': [3, 3, 64, 64], '8x8/Conv0_up/bias': [64],
    '8x8/Conv1/weight': [3, 3, 64, 64], '8x8/Conv1/bias': [64],
    'ToRGB_lod3/weight': [1, 1, 64, 3], 'ToRGB_lod3/bias': [3],
    '16x16/Conv0_up/weight': [3, 3, 64, 64], '16x16/Conv0_up/bias': [64],
    '16x16/Conv1/weight': [3, 3, 64, 64], '16x16/Conv1/bias': [64],
    'ToRGB_lod2/weight': [1, 1, 64, 3], 'ToRGB_lod2/bias': [3],
    '32x32/Conv0_up/weight': [3, 3, 32, 64], '32x32/Conv0_up/bias': [32],
    '32x32/Conv1/weight': [3, 3, 32, 32], '32x32/Conv1/bias': [32],
    'ToRGB_lod1/weight': [1, 1, 32, 3], 'ToRGB_lod1/bias': [3],
    '64x64/Conv0_up/weight': [3, 3, 16, 32], '64x64/Conv0_up/bias': [16],
    '64x64/Conv1/weight': [3, 3, 16, 16], '64x64/Conv1/bias': [16],
    'ToRGB_lod0/weight': [1, 1, 16, 3], 'ToRGB_lod0/bias': [3],
    'lod': [],
}

EXPECTED_D_64 = {
    'FromRGB_lod0/weight': [1, 1, 3, 16], 'FromRGB_lod0/bias': [16],
    '64x64/Conv0/weight': [3, 3, 16, 16], '64x64/Conv0/bias': [16],
    '64x64/Conv1_down/weight': [3, 3, 16, 32], '64x64/Conv1_down/bias': [32],
    'FromRGB_lod1/weight': [1, 1, 3, 32], 'FromRGB_lod1/bias': [32],
    '32x32/Conv0/weight': [3, 3, 32, 32], '32x32/Conv0/bias': [32],
    '32x32/Conv1_down/weight': [3, 3, 32, 64], '32x32/Conv1_down/bias': [64],
    'FromRGB_lod2/weight': [1, 1, 3, 64], 'FromRGB_lod2/bias': [64],
    '16x16/Conv0/weight': [3, 3, 64, 64], '16x16/Conv0/bias': [64],
    '16x16/Conv1_down/weight': [3, 3, 64, 64], '16x16/Conv1_down/bias': [64],
    'FromRGB_lod3/weight': [1, 1, 3, 64], 'FromRGB_lod3/bias': [64],
    '8x8/Conv0/weight': [3, 3, 64, 64], '8x8/Conv0/bias': [64],
    '8x8/Conv1_down/weight': [3, 3, 64, 64], '8x8/Conv1_down/bias': [64],
    'FromRGB_lod4/weight': [1, 1, 3, 64], 'FromRGB_lod4/bias': [64],
    '4x4/Conv/weight': [3, 3, 65, 64], '4x4/Conv/bias': [64],
    '4x4/Dense0/weight': [1024, 64], '4x4/Dense0/bias': [64],
    '4x4/Dense1/weight': [64, 1], '4x4/Dense1/bias': [1],
    'lod': [],
}


def var_shapes(net):
    return {name: tfutil.shape_to_list(var.shape) for name, var in net.vars.items()}


def test_fused_layout_matches_the_original(tf_session):
    G = tfutil.Network('G', func='networks.G_paper', latent_size=64, **SMALL_64)
    D = tfutil.Network('D', func='networks.D_paper', **SMALL_64)
    assert var_shapes(G) == EXPECTED_G_64
    assert var_shapes(D) == EXPECTED_D_64
    assert set(G.trainables) == set(EXPECTED_G_64) - {'lod'}


def test_unfused_layout_and_labels(tf_session):
    kwargs = dict(SMALL_64, resolution=16, label_size=5, fused_scale=False)
    G = tfutil.Network('G', func='networks.G_paper', latent_size=64, **kwargs)
    D = tfutil.Network('D', func='networks.D_paper', mbstd_group_size=0, **kwargs)
    g, d = var_shapes(G), var_shapes(D)
    assert g['4x4/Dense/weight'] == [64 + 5, 1024]
    assert g['16x16/Conv0/weight'] == [3, 3, 64, 64] and '16x16/Conv0_up/weight' not in g
    assert d['16x16/Conv1/weight'] == [3, 3, 64, 64] and '16x16/Conv1_down/weight' not in d
    assert d['4x4/Conv/weight'] == [3, 3, 64, 64]     # No minibatch-stddev channel.
    assert d['4x4/Dense1/weight'] == [64, 1 + 5]


def plain_net_kwargs(resolution):
    return dict(num_channels=3, resolution=resolution, label_size=0, fmap_base=16, fmap_max=8, use_wscale=False)


def identity_kernel(size, channels_in, channels_out):
    w = np.zeros([size, size, channels_in, channels_out], np.float32)
    for c in range(min(channels_in, channels_out)):
        w[size // 2, size // 2, c, c] = 1.0
    return w


def test_generator_reshapes_dense_output_in_nchw_order(tf_session):
    G = tfutil.Network('G', func='networks.G_paper', latent_size=4, normalize_latents=False,
                       use_pixelnorm=False, **plain_net_kwargs(4))
    nf = 8
    dense = np.zeros([4, nf * 16], np.float32)
    dense[0] = np.arange(nf * 16) + 1.0          # Dense output j = j + 1 for latent e0.
    G.set_var('4x4/Dense/weight', dense)
    G.set_var('4x4/Conv/weight', identity_kernel(3, nf, nf))
    G.set_var('ToRGB_lod0/weight', identity_kernel(1, nf, 3))
    out = G.run(np.eye(4, dtype=np.float32)[:1], np.zeros([1, 0], np.float32))
    c, y, x = np.meshgrid(np.arange(3), np.arange(4), np.arange(4), indexing='ij')
    np.testing.assert_allclose(out[0], c * 16 + y * 4 + x + 1.0, rtol=1e-6)


@pytest.mark.parametrize('c, y, x', [(1, 2, 3), (2, 0, 1), (0, 3, 0)])
def test_discriminator_flattens_in_nchw_order(tf_session, c, y, x):
    D = tfutil.Network('D', func='networks.D_paper', mbstd_group_size=0, **plain_net_kwargs(4))
    nf = 8
    D.set_var('FromRGB_lod0/weight', identity_kernel(1, 3, nf))
    D.set_var('4x4/Conv/weight', identity_kernel(3, nf, nf))
    dense0 = np.zeros([nf * 16, nf], np.float32)
    dense0[c * 16 + y * 4 + x, 0] = 1.0
    D.set_var('4x4/Dense0/weight', dense0)
    dense1 = np.zeros([nf, 1], np.float32)
    dense1[0, 0] = 1.0
    D.set_var('4x4/Dense1/weight', dense1)
    images = (np.arange(3 * 16, dtype=np.float32).reshape(1, 3, 4, 4) + 1.0)
    scores, _ = D.run(images)
    assert scores[0, 0] == pytest.approx(images[0, c, y, x])


SMALL_16 = dict(num_channels=3, resolution=16, label_size=2, fmap_base=64, fmap_max=16)
LODS = [0.0, 0.25, 0.5, 1.0, 1.75, 2.0]


def set_lod(net, lod):
    net.set_var('lod', np.float32(lod))


@pytest.mark.parametrize('fused', [True, False])
def test_linear_and_recursive_structures_agree(tf_session, fused):
    G = tfutil.Network('G', func='networks.G_paper', latent_size=16, fused_scale=fused, **SMALL_16)
    D = tfutil.Network('D', func='networks.D_paper', fused_scale=fused, **SMALL_16)
    rnd = np.random.RandomState(1)
    latents = rnd.randn(4, 16).astype(np.float32)
    labels = np.eye(2, dtype=np.float32)[rnd.randint(2, size=4)]
    images = rnd.randn(4, 3, 16, 16).astype(np.float32)
    outputs = {}
    for lod in LODS:
        set_lod(G, lod)
        set_lod(D, lod)
        for structure in ['linear', 'recursive']:
            fakes = G.run(latents, labels, structure=structure)
            scores, label_logits = D.run(images, structure=structure)
            outputs[lod, structure] = (fakes, scores, label_logits)
    for lod in LODS:
        for linear, recursive in zip(outputs[lod, 'linear'], outputs[lod, 'recursive']):
            np.testing.assert_allclose(linear, recursive, rtol=1e-4, atol=1e-5)
    # The LOD really changes the output (or this test would compare constants).
    assert np.abs(outputs[0.0, 'linear'][0] - outputs[2.0, 'linear'][0]).max() > 1e-3


def test_lod_blending_is_continuous(tf_session):
    G = tfutil.Network('G', func='networks.G_paper', latent_size=16, **SMALL_16)
    D = tfutil.Network('D', func='networks.D_paper', **SMALL_16)
    rnd = np.random.RandomState(2)
    latents = rnd.randn(4, 16).astype(np.float32)
    labels = np.eye(2, dtype=np.float32)[rnd.randint(2, size=4)]
    images = rnd.randn(4, 3, 16, 16).astype(np.float32)

    def outputs_at(lod):
        set_lod(G, lod)
        set_lod(D, lod)
        return G.run(latents, labels), D.run(images)[0]

    for boundary in [1.0, 2.0]:
        below, above = outputs_at(boundary - 1e-4), outputs_at(boundary + 1e-4)
        far = outputs_at(boundary - 0.5)
        for b, a, f in zip(below, above, far):
            jump = np.abs(a - b).max()
            assert jump < 1e-2 * max(np.abs(f - b).max(), 1e-3)
    # Halfway through a fade the output is the mean of its two ends (linear blend).
    g1, d1 = outputs_at(1.0)
    g2, d2 = outputs_at(2.0)
    g15, d15 = outputs_at(1.5)
    np.testing.assert_allclose(g15, (g1 + g2) / 2, atol=1e-4)


def he_constant(name, shape):
    """The paper's per-layer weight scale gain / sqrt(fan_in): gain 1 for the linear outputs
    (to-RGB, D's last dense layer), sqrt(2) / 4 for G's first dense layer (from the Theano
    original), sqrt(2) elsewhere. A fused upscale kernel is stored [k, k, out, in]."""
    if name.startswith('ToRGB') or name == '4x4/Dense1/weight':
        gain = 1.0
    elif name == '4x4/Dense/weight':
        gain = np.sqrt(2) / 4
    else:
        gain = np.sqrt(2)
    fan_in = np.prod(shape[:2]) * shape[3] if 'Conv0_up' in name else np.prod(shape[:-1])
    return gain / np.sqrt(fan_in)


def with_weights_prescaled(net, plain):
    """Give `plain` (use_wscale=False) net's variables with each weight times its He constant."""
    for name, value in zip(net.vars, tfutil.run(list(net.vars.values()))):
        plain.set_var(name, value * he_constant(name, value.shape) if name.endswith('/weight') else value)


def test_pixelnorm_and_wscale_switches_change_the_network(tf_session):
    base = dict(latent_size=16, **SMALL_16)
    G = tfutil.Network('G', func='networks.G_paper', **base)
    G_nopn = tfutil.Network('Gnopn', func='networks.G_paper', use_pixelnorm=False, **base)
    G_nopn.copy_vars_from(G)
    latents = np.random.RandomState(3).randn(2, 16).astype(np.float32) * 5
    labels = np.zeros([2, 2], np.float32)
    assert np.abs(G.run(latents, labels) - G_nopn.run(latents, labels)).max() > 1e-4

    # Equalized learning rate: a network with use_wscale scales each weight by its He constant
    # at run time, so it equals a plain network holding the scaled weights.
    rnd = np.random.RandomState(4)
    images = rnd.randn(4, 3, 16, 16).astype(np.float32)
    labels = np.eye(2, dtype=np.float32)[rnd.randint(2, size=4)]
    latents = rnd.randn(4, 16).astype(np.float32)
    D = tfutil.Network('D', func='networks.D_paper', **SMALL_16)
    for net in (G, D):
        net.set_var('lod', np.float32(0.5))    # two to-RGB / from-RGB layers in use
    G_plain = tfutil.Network('Gplain', func='networks.G_paper', use_wscale=False, **base)
    D_plain = tfutil.Network('Dplain', func='networks.D_paper', use_wscale=False, **SMALL_16)
    with_weights_prescaled(G, G_plain)
    with_weights_prescaled(D, D_plain)
    np.testing.assert_allclose(G_plain.run(latents, labels), G.run(latents, labels), rtol=1e-4, atol=1e-5)
    for plain, scaled in zip(D_plain.run(images), D.run(images)):
        np.testing.assert_allclose(plain, scaled, rtol=1e-4, atol=1e-5)
    G_unscaled = tfutil.Network('Gunscaled', func='networks.G_paper', use_wscale=False, **base)
    G_unscaled.copy_vars_from(G)
    assert np.abs(G_unscaled.run(latents, labels) - G.run(latents, labels)).max() > 1e-2, 'wscale made no difference'
