"""Colour and warp augmentation of image minibatches inside the TensorFlow graph.

WSIDataset(augment=p) has train.py apply `augment_minibatch` to the reals on each GPU, so the
augmentation costs the slide readers (CPU threads, the usual bottleneck) nothing and runs on
the device beside the networks. Per image, with probability p:
  - a hue shift in HSV of up to +-HUE_SHIFT_MAX of the colour circle;
  - a gamma on CIE L* in LAB (sRGB, D65) with a* and b* kept, log-gamma uniform in
    +-LIGHTNESS_GAMMA_LOG_MAX;
  - a piecewise-affine warp: a WARP_GRID x WARP_GRID mesh over the image whose nodes move by
    random displacements of up to WARP_MAX_SHIFT of the image size, each mesh triangle mapped
    affinely; sampled bilinearly, with mirrored borders.
The result is float32: nothing is rounded before the networks see it.
"""

import numpy as np

from tf_compat import tf

HUE_SHIFT_MAX = 16 / 360
LIGHTNESS_GAMMA_LOG_MAX = 0.25
WARP_GRID = 4
WARP_MAX_SHIFT = 0.03

# sRGB (linear) <-> CIE XYZ, D65 white, XYZ scaled by the white point so white is (1, 1, 1).
_WHITE = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZ = (np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]]) / _WHITE[:, None]).astype(np.float32)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ.astype(np.float64)).astype(np.float32)
_LAB_DELTA = 6 / 29


def augment_minibatch(images, probability, drange=(0, 255)):
    """images: NCHW RGB in dynamic range `drange` (any dtype) -> float32 NCHW in the same range,
    each image augmented with the given probability (a Python float or a scalar tensor)."""
    with tf.name_scope('Augment'):
        lo, hi = float(drange[0]), float(drange[1])
        x = tf.transpose(tf.cast(images, tf.float32), [0, 2, 3, 1])
        x = tf.clip_by_value((x - lo) / (hi - lo), 0.0, 1.0)
        count = tf.shape(x)[0]
        y = shift_hue(x, tf.random_uniform([count], -HUE_SHIFT_MAX, HUE_SHIFT_MAX))
        y = lightness_gamma(y, tf.exp(tf.random_uniform([count], -LIGHTNESS_GAMMA_LOG_MAX, LIGHTNESS_GAMMA_LOG_MAX)))
        y = random_warp(y)
        chosen = tf.random_uniform([count]) < probability
        x = tf.where(chosen, y, x)          # rank-1 condition picks whole images
        return tf.transpose(x * (hi - lo) + lo, [0, 3, 1, 2])


def shift_hue(rgb, shift):
    """NHWC RGB in [0, 1]; shift [N] in fractions of the colour circle, added to HSV hue."""
    hsv = tf.image.rgb_to_hsv(rgb)
    hue, saturation, value = tf.unstack(hsv, axis=-1)
    hue = tf.floormod(hue + shift[:, None, None], 1.0)
    return tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1))


def lightness_gamma(rgb, gamma):
    """NHWC sRGB in [0, 1]; L* -> 100 * (L* / 100) ** gamma[n] with a* and b* kept.

    With a* and b* fixed, f(X) and f(Z) move by the same amount as f(Y) = (L* + 16) / 116, so
    the round trip needs no explicit a* and b*."""
    f_xyz = _lab_f(_apply_matrix(_srgb_to_linear(rgb), _RGB_TO_XYZ))
    lightness = tf.maximum(116 * f_xyz[..., 1:2] - 16, 0.0)
    new_lightness = 100 * tf.pow(lightness / 100, gamma[:, None, None, None])
    f_xyz += (new_lightness - lightness) / 116
    linear = tf.clip_by_value(_apply_matrix(_lab_f_inverse(f_xyz), _XYZ_TO_RGB), 0.0, 1.0)
    return _linear_to_srgb(linear)


def random_warp(images):
    """NHWC images, each warped piecewise-affinely by its own random mesh (module docstring)."""
    shape = tf.shape(images)
    count, height, width = shape[0], shape[1], shape[2]
    max_shift = WARP_MAX_SHIFT * tf.cast(height, tf.float32)
    node_shifts = tf.random_uniform([count, WARP_GRID, WARP_GRID, 2], -1.0, 1.0) * max_shift
    ys, xs = tf.meshgrid(tf.range(height), tf.range(width), indexing='ij')
    xs, ys = tf.cast(xs, tf.float32), tf.cast(ys, tf.float32)
    field = piecewise_affine_field(node_shifts, xs, ys)
    return sample_bilinear(images, xs[None] + field[..., 0], ys[None] + field[..., 1])


def piecewise_affine_field(node_shifts, xs, ys):
    """Displacements [N, H, W, 2] at pixels (xs, ys) [H, W], interpolated from node_shifts
    [N, G, G, 2] given at a regular G x G mesh spanning the image corner to corner, each cell
    cut into two triangles along its anti-diagonal: affine inside every triangle, continuous
    across edges (skimage's PiecewiseAffineTransform on that mesh)."""
    grid = int(node_shifts.shape[1])
    cells = grid - 1
    gx = xs * cells / tf.maximum(tf.reduce_max(xs), 1.0)     # mesh coordinates of each pixel
    gy = ys * cells / tf.maximum(tf.reduce_max(ys), 1.0)
    col = tf.minimum(tf.floor(gx), cells - 1)
    row = tf.minimum(tf.floor(gy), cells - 1)
    u, v = (gx - col)[..., None], (gy - row)[..., None]
    nodes = tf.reshape(node_shifts, [-1, grid * grid, 2])
    first = tf.cast(row * grid + col, tf.int32)

    def node(down, right):
        return tf.gather(nodes, first + down * grid + right, axis=1)

    top_left, top_right, bottom_left, bottom_right = node(0, 0), node(0, 1), node(1, 0), node(1, 1)
    upper = top_left + u * (top_right - top_left) + v * (bottom_left - top_left)
    lower = bottom_right + (1 - u) * (bottom_left - bottom_right) + (1 - v) * (top_right - bottom_right)
    return tf.where(tf.broadcast_to(u + v <= 1, tf.shape(upper)), upper, lower)


def sample_bilinear(images, x, y):
    """images NHWC sampled at pixel coordinates x, y [N, H', W'] (bilinear; outside the image
    the coordinates are mirrored about the edge pixels, as OpenCV's BORDER_REFLECT_101)."""
    shape = tf.shape(images)
    count, height, width = shape[0], shape[1], shape[2]
    x0, fx = _corner_and_fraction(x, width)
    y0, fy = _corner_and_fraction(y, height)
    flat = tf.reshape(images, [-1, shape[3]])
    row0 = (tf.range(count)[:, None, None] * height + y0) * width

    def pick(dy, dx):
        return tf.gather(flat, row0 + dy * width + x0 + dx)

    fx, fy = fx[..., None], fy[..., None]
    top = pick(0, 0) * (1 - fx) + pick(0, 1) * fx
    bottom = pick(1, 0) * (1 - fx) + pick(1, 1) * fx
    return top * (1 - fy) + bottom * fy


def _corner_and_fraction(coord, size):
    """The left/top neighbour (so that it and the next one are inside) and the weight of the
    next one, for coordinates mirrored into [0, size - 1]."""
    last = tf.cast(size - 1, tf.float32)
    coord = tf.abs(coord)                                  # mirror about pixel 0
    coord = last - tf.abs(last - coord)                    # mirror about the last pixel
    coord = tf.clip_by_value(coord, 0.0, last)             # displacements over a whole image
    corner = tf.minimum(tf.cast(tf.floor(coord), tf.int32), size - 2)
    return corner, coord - tf.cast(corner, tf.float32)


def _apply_matrix(pixels, matrix):
    return tf.tensordot(pixels, tf.constant(matrix.T), axes=1)


def _srgb_to_linear(c):
    return tf.where(c <= 0.04045, c / 12.92, tf.pow((tf.maximum(c, 0.04045) + 0.055) / 1.055, 2.4))


def _linear_to_srgb(c):
    return tf.where(c <= 0.0031308, c * 12.92, 1.055 * tf.pow(tf.maximum(c, 0.0031308), 1 / 2.4) - 0.055)


def _lab_f(t):
    return tf.where(t > _LAB_DELTA ** 3, tf.pow(tf.maximum(t, _LAB_DELTA ** 3), 1 / 3),
                    t / (3 * _LAB_DELTA ** 2) + 4 / 29)


def _lab_f_inverse(f):
    return tf.where(f > _LAB_DELTA, f ** 3, 3 * _LAB_DELTA ** 2 * (f - 4 / 29))
