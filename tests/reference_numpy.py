"""An independent numpy implementation of the ProGAN forward pass (G_paper / D_paper of Karras et
al. 2018), for checking networks loaded from pickles against the weights they hold.

Written from the paper's definitions and the layout in DESIGN.md 2b, in NCHW and float64, with no
TensorFlow and nothing shared with networks.py: dense and convolution layers with equalized
learning rate, the fused upscale (a stride-2 transposed convolution with the 4x4 summed kernel,
filter layout [k, k, out, in]) and fused downscale (a stride-2 convolution with the summed kernel
times 0.25), nearest upscaling and box downscaling, pixel norm, leaky ReLU, minibatch stddev
(sample n in group n mod (N/G)), LOD blending, to-RGB and from-RGB.

Also the variable layout of both networks (names and shapes in creation order), to build legacy
pickles without TensorFlow.
"""

import numpy as np

SQRT2 = np.sqrt(2.0)

# ----------------------------------------------------------------------------
# Layout.


def nf(stage, fmap_base, fmap_decay, fmap_max):
    return min(int(fmap_base / (2.0 ** (stage * fmap_decay))), fmap_max)


def g_layout(resolution, num_channels, label_size, fmap_base=8192, fmap_decay=1.0, fmap_max=512,
             latent_size=None, fused_scale=True, **_):
    """[(name, shape)] of G_paper's variables in the order the original creates them."""
    f = lambda stage: nf(stage, fmap_base, fmap_decay, fmap_max)
    latent_size = f(0) if latent_size is None else latent_size
    rlog2 = int(np.log2(resolution))
    layout = [('lod', [])]
    layout += [('4x4/Dense/weight', [latent_size + label_size, f(1) * 16]), ('4x4/Dense/bias', [f(1)]),
               ('4x4/Conv/weight', [3, 3, f(1), f(1)]), ('4x4/Conv/bias', [f(1)]),
               ('ToRGB_lod%d/weight' % (rlog2 - 2), [1, 1, f(1), num_channels]),
               ('ToRGB_lod%d/bias' % (rlog2 - 2), [num_channels])]
    for res in range(3, rlog2 + 1):
        r = '%dx%d' % (2 ** res, 2 ** res)
        if fused_scale:
            layout.append((r + '/Conv0_up/weight', [3, 3, f(res - 1), f(res - 2)]))
        else:
            layout.append((r + '/Conv0/weight', [3, 3, f(res - 2), f(res - 1)]))
        layout.append((r + ('/Conv0_up/bias' if fused_scale else '/Conv0/bias'), [f(res - 1)]))
        layout += [(r + '/Conv1/weight', [3, 3, f(res - 1), f(res - 1)]), (r + '/Conv1/bias', [f(res - 1)]),
                   ('ToRGB_lod%d/weight' % (rlog2 - res), [1, 1, f(res - 1), num_channels]),
                   ('ToRGB_lod%d/bias' % (rlog2 - res), [num_channels])]
    return layout


def d_layout(resolution, num_channels, label_size, fmap_base=8192, fmap_decay=1.0, fmap_max=512,
             mbstd_group_size=4, fused_scale=True, **_):
    """[(name, shape)] of D_paper's variables in the order the original creates them."""
    f = lambda stage: nf(stage, fmap_base, fmap_decay, fmap_max)
    rlog2 = int(np.log2(resolution))
    layout = [('lod', []), ('FromRGB_lod0/weight', [1, 1, num_channels, f(rlog2 - 1)]),
              ('FromRGB_lod0/bias', [f(rlog2 - 1)])]
    for res in range(rlog2, 2, -1):
        r = '%dx%d' % (2 ** res, 2 ** res)
        conv1 = '/Conv1_down' if fused_scale else '/Conv1'
        layout += [(r + '/Conv0/weight', [3, 3, f(res - 1), f(res - 1)]), (r + '/Conv0/bias', [f(res - 1)]),
                   (r + conv1 + '/weight', [3, 3, f(res - 1), f(res - 2)]), (r + conv1 + '/bias', [f(res - 2)]),
                   ('FromRGB_lod%d/weight' % (rlog2 - res + 1), [1, 1, num_channels, f(res - 2)]),
                   ('FromRGB_lod%d/bias' % (rlog2 - res + 1), [f(res - 2)])]
    mbstd = 1 if mbstd_group_size > 1 else 0
    layout += [('4x4/Conv/weight', [3, 3, f(1) + mbstd, f(1)]), ('4x4/Conv/bias', [f(1)]),
               ('4x4/Dense0/weight', [f(1) * 16, f(0)]), ('4x4/Dense0/bias', [f(0)]),
               ('4x4/Dense1/weight', [f(0), 1 + label_size]), ('4x4/Dense1/bias', [1 + label_size])]
    return layout


def random_variables(layout, rng, lod=0.0):
    """Weights N(0, 1) as stored with equalized learning rate, biases small and non-zero."""
    variables = []
    for name, shape in layout:
        if name == 'lod':
            value = np.float32(lod)
            value = np.array(value, dtype=np.float32)
        elif name.endswith('/bias'):
            value = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        variables.append((name, value))
    return variables


# ----------------------------------------------------------------------------
# Layers, NCHW, float64.


def wscale(gain, fan_in):
    return gain / np.sqrt(fan_in)


def dense(x, w, gain=SQRT2):
    x = x.reshape(x.shape[0], -1)                        # NCHW order, as the original flattens.
    return x @ (w * wscale(gain, w.shape[0]))


def bias(x, b):
    return x + (b.reshape(1, -1, 1, 1) if x.ndim == 4 else b.reshape(1, -1))


def conv2d(x, w, gain=SQRT2):
    """Stride-1 'SAME' cross-correlation with w [k, k, in, out]."""
    k = w.shape[0]
    w = w * wscale(gain, k * k * w.shape[2])
    p = k // 2
    n, c, h, wd = x.shape
    xp = np.pad(x, [(0, 0), (0, 0), (p, p), (p, p)])
    out = np.zeros((n, w.shape[3], h, wd))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum('nchw,co->nohw', xp[:, :, dy:dy + h, dx:dx + wd], w[dy, dx])
    return out


def summed_kernel(w):
    """3x3 -> 4x4: zero-pad to 5x5 and add its four one-pixel shifts."""
    w = np.pad(w, [(1, 1), (1, 1), (0, 0), (0, 0)])
    return w[1:, 1:] + w[:-1, 1:] + w[1:, :-1] + w[:-1, :-1]


def upscale2d_conv2d(x, w, gain=SQRT2):
    """The fused upscale: w is [k, k, out, in] with fan-in k*k*in; the transposed convolution of
    stride 2 ('SAME', output 2H x 2W) with the 4x4 summed kernel. Each input pixel i scatters into
    output rows 2i + t - 1 for kernel taps t = 0..3 (the padding of the 'SAME' stride-2
    convolution it transposes is one pixel on each side)."""
    k, _, out_c, in_c = w.shape
    kernel = summed_kernel(w * wscale(gain, k * k * in_c))      # [4, 4, out, in]
    n, c, h, wd = x.shape
    assert c == in_c
    out = np.zeros((n, out_c, 2 * h + 4, 2 * wd + 4))            # Margin for the taps that fall outside.
    for ty in range(4):
        for tx in range(4):
            contrib = np.einsum('nchw,oc->nohw', x, kernel[ty, tx])
            # Output row 2i + ty - 1, shifted by the margin of 2.
            out[:, :, ty + 1:ty + 1 + 2 * h:2, tx + 1:tx + 1 + 2 * wd:2] += contrib
    return out[:, :, 2:2 + 2 * h, 2:2 + 2 * wd]


def conv2d_downscale2d(x, w, gain=SQRT2):
    """The fused downscale: a stride-2 'SAME' convolution (one pixel of padding on each side)
    with the 4x4 summed kernel times 0.25; w is [k, k, in, out]."""
    k, _, in_c, out_c = w.shape
    kernel = summed_kernel(w * wscale(gain, k * k * in_c)) * 0.25
    n, c, h, wd = x.shape
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    out = np.zeros((n, out_c, h // 2, wd // 2))
    for ty in range(4):
        for tx in range(4):
            out += np.einsum('nchw,co->nohw', xp[:, :, ty:ty + h:2, tx:tx + wd:2][:, :, :h // 2, :wd // 2],
                             kernel[ty, tx])
    return out


def upscale2d(x, factor=2):
    return x.repeat(factor, axis=2).repeat(factor, axis=3)


def downscale2d(x, factor=2):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))


def pixel_norm(x, epsilon=1e-8):
    return x / np.sqrt(np.mean(x ** 2, axis=1, keepdims=True) + epsilon)


def leaky_relu(x, alpha=0.2):
    return np.where(x >= 0, x, x * alpha)


def minibatch_stddev(x, group_size=4):
    """One more feature map: for each group, the mean over channels and pixels of the stddev over
    the group's samples; sample n belongs to group n mod (N / G)."""
    n = x.shape[0]
    g = min(group_size, n)
    m = n // g
    stat = np.zeros(n)
    for group in range(m):
        members = [i for i in range(n) if i % m == group]
        assert len(members) == g
        std = np.sqrt(np.var(x[members], axis=0) + 1e-8)
        stat[members] = std.mean()
    feature = np.broadcast_to(stat.reshape(n, 1, 1, 1), (n, 1) + x.shape[2:])
    return np.concatenate([x, feature], axis=1)


def lerp_clip(a, b, t):
    return a + (b - a) * np.clip(t, 0.0, 1.0)


# ----------------------------------------------------------------------------
# Networks.


def generator(variables, latents, labels, lod, resolution, label_size=0, fused_scale=True,
              normalize_latents=True, use_pixelnorm=True, pixelnorm_epsilon=1e-8, **_):
    """Images [N, C, R, R] of G_paper with the given variables at `lod`."""
    v = {name: np.asarray(value, np.float64) for name, value in variables}
    rlog2 = int(np.log2(resolution))
    pn = (lambda t: pixel_norm(t, pixelnorm_epsilon)) if use_pixelnorm else (lambda t: t)
    x = np.concatenate([latents, labels], axis=1).astype(np.float64)
    if normalize_latents:
        x = pixel_norm(x, pixelnorm_epsilon)
    w = v['4x4/Dense/weight']
    x = dense(x, w, gain=SQRT2 / 4).reshape(x.shape[0], w.shape[1] // 16, 4, 4)
    x = pn(leaky_relu(bias(x, v['4x4/Dense/bias'])))
    x = pn(leaky_relu(bias(conv2d(x, v['4x4/Conv/weight']), v['4x4/Conv/bias'])))

    def torgb(x, res):
        k = rlog2 - res
        return bias(conv2d(x, v['ToRGB_lod%d/weight' % k], gain=1.0), v['ToRGB_lod%d/bias' % k])

    images = torgb(x, 2)
    for res in range(3, rlog2 + 1):
        r = '%dx%d/' % (2 ** res, 2 ** res)
        if fused_scale:
            x = upscale2d_conv2d(x, v[r + 'Conv0_up/weight'])
            x = pn(leaky_relu(bias(x, v[r + 'Conv0_up/bias'])))
        else:
            x = pn(leaky_relu(bias(conv2d(upscale2d(x), v[r + 'Conv0/weight']), v[r + 'Conv0/bias'])))
        x = pn(leaky_relu(bias(conv2d(x, v[r + 'Conv1/weight']), v[r + 'Conv1/bias'])))
        images = lerp_clip(torgb(x, res), upscale2d(images), lod - (rlog2 - res))
    return images


def discriminator(variables, images, lod, resolution, label_size=0, fused_scale=True, mbstd_group_size=4, **_):
    """(scores [N, 1], label logits [N, label_size]) of D_paper with the given variables at `lod`."""
    v = {name: np.asarray(value, np.float64) for name, value in variables}
    rlog2 = int(np.log2(resolution))

    def fromrgb(img, res):
        k = rlog2 - res
        return leaky_relu(bias(conv2d(img, v['FromRGB_lod%d/weight' % k]), v['FromRGB_lod%d/bias' % k]))

    img = np.asarray(images, np.float64)
    x = fromrgb(img, rlog2)
    for res in range(rlog2, 2, -1):
        r = '%dx%d/' % (2 ** res, 2 ** res)
        x = leaky_relu(bias(conv2d(x, v[r + 'Conv0/weight']), v[r + 'Conv0/bias']))
        if fused_scale:
            x = leaky_relu(bias(conv2d_downscale2d(x, v[r + 'Conv1_down/weight']), v[r + 'Conv1_down/bias']))
        else:
            x = downscale2d(leaky_relu(bias(conv2d(x, v[r + 'Conv1/weight']), v[r + 'Conv1/bias'])))
        img = downscale2d(img)
        x = lerp_clip(x, fromrgb(img, res - 1), lod - (rlog2 - res))
    if mbstd_group_size > 1:
        x = minibatch_stddev(x, mbstd_group_size)
    x = leaky_relu(bias(conv2d(x, v['4x4/Conv/weight']), v['4x4/Conv/bias']))
    x = leaky_relu(bias(dense(x, v['4x4/Dense0/weight']), v['4x4/Dense0/bias']))
    x = bias(dense(x, v['4x4/Dense1/weight'], gain=1.0), v['4x4/Dense1/bias'])
    return x[:, :1], x[:, 1:]
