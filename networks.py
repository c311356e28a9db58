"""G_paper and D_paper: the progressive GAN networks of Karras et al. (2018).

Public tensors are NCHW as in the original (latents in, images out; images in, scores out), but
everything inside computes in NHWC: TensorFlow's CPU kernels accept only NHWC, and one layout on
every device means the tests exercise what GPUs run. Variable names, shapes and initialisation
follow the original exactly, so that its pickles load here.

This module is standalone (numpy and TensorFlow only): its source is embedded in every pickle.
"""

import numpy as np
import tensorflow.compat.v1 as tf

# ----------------------------------------------------------------------------
# Layout and blending helpers.


def nchw_to_nhwc(x):
    return tf.transpose(x, [0, 2, 3, 1])


def nhwc_to_nchw(x):
    return tf.transpose(x, [0, 3, 1, 2])


def lerp(a, b, t):
    return a + (b - a) * t


def lerp_clip(a, b, t):
    return a + (b - a) * tf.clip_by_value(t, 0.0, 1.0)


def cset(cur_lambda, new_cond, new_lambda):
    """Chain a conditional: new_lambda when new_cond holds, else whatever cur_lambda gives."""
    return lambda: tf.cond(new_cond, new_lambda, cur_lambda)


# ----------------------------------------------------------------------------
# Layers (NHWC). Weights are stored N(0,1) and scaled at run time when use_wscale is on
# (equalized learning rate), or initialised with He's std otherwise.


def get_weight(shape, gain=np.sqrt(2), use_wscale=False, fan_in=None):
    if fan_in is None:
        fan_in = np.prod(shape[:-1])
    std = gain / np.sqrt(fan_in)
    if use_wscale:
        wscale = tf.constant(np.float32(std), name='wscale')
        return tf.get_variable('weight', shape=shape, initializer=tf.initializers.random_normal()) * wscale
    return tf.get_variable('weight', shape=shape, initializer=tf.initializers.random_normal(0, std))


def dense(x, fmaps, gain=np.sqrt(2), use_wscale=False):
    if len(x.shape) > 2:
        # The original flattens NCHW tensors: keep that element order for its weights.
        x = nhwc_to_nchw(x)
        x = tf.reshape(x, [-1, int(np.prod(x.shape.as_list()[1:]))])
    w = get_weight([x.shape.as_list()[1], fmaps], gain=gain, use_wscale=use_wscale)
    return tf.matmul(x, tf.cast(w, x.dtype))


def conv2d(x, fmaps, kernel, gain=np.sqrt(2), use_wscale=False):
    assert kernel >= 1 and kernel % 2 == 1
    w = get_weight([kernel, kernel, x.shape.as_list()[3], fmaps], gain=gain, use_wscale=use_wscale)
    return tf.nn.conv2d(x, tf.cast(w, x.dtype), strides=[1, 1, 1, 1], padding='SAME')


def apply_bias(x):
    b = tf.get_variable('bias', shape=[x.shape.as_list()[-1]], initializer=tf.initializers.zeros())
    return x + tf.cast(b, x.dtype)


def leaky_relu(x, alpha=0.2):
    with tf.name_scope('LeakyRelu'):
        alpha = tf.constant(alpha, dtype=x.dtype, name='alpha')
        return tf.maximum(x * alpha, x)


def upscale2d(x, factor=2):
    """Nearest-neighbour upscaling."""
    assert isinstance(factor, int) and factor >= 1
    if factor == 1:
        return x
    with tf.variable_scope('Upscale2D'):
        _, h, w, c = x.shape.as_list()
        x = tf.reshape(x, [-1, h, 1, w, 1, c])
        x = tf.tile(x, [1, 1, factor, 1, factor, 1])
        return tf.reshape(x, [-1, h * factor, w * factor, c])


def downscale2d(x, factor=2):
    """Box-filter downscaling."""
    assert isinstance(factor, int) and factor >= 1
    if factor == 1:
        return x
    with tf.variable_scope('Downscale2D'):
        ksize = [1, factor, factor, 1]
        return tf.nn.avg_pool(x, ksize=ksize, strides=ksize, padding='VALID')


def fused_kernel(w):
    """A 3x3 kernel zero-padded to 5x5 with its four one-pixel shifts summed: the 4x4 kernel of
    'upscale then conv' (or 'conv then downscale') as one strided convolution."""
    w = tf.pad(w, [[1, 1], [1, 1], [0, 0], [0, 0]], mode='CONSTANT')
    return tf.add_n([w[1:, 1:], w[:-1, 1:], w[1:, :-1], w[:-1, :-1]])


def upscale2d_conv2d(x, fmaps, kernel, gain=np.sqrt(2), use_wscale=False):
    assert kernel >= 1 and kernel % 2 == 1
    in_channels = x.shape.as_list()[3]
    # Stored in the conv2d_transpose filter layout [k, k, out, in].
    w = get_weight([kernel, kernel, fmaps, in_channels], gain=gain, use_wscale=use_wscale,
                   fan_in=(kernel ** 2) * in_channels)
    w = tf.cast(fused_kernel(w), x.dtype)
    _, h, wd, _ = x.shape.as_list()
    output_shape = [tf.shape(x)[0], h * 2, wd * 2, fmaps]
    return tf.nn.conv2d_transpose(x, w, output_shape, strides=[1, 2, 2, 1], padding='SAME')


def conv2d_downscale2d(x, fmaps, kernel, gain=np.sqrt(2), use_wscale=False):
    assert kernel >= 1 and kernel % 2 == 1
    w = get_weight([kernel, kernel, x.shape.as_list()[3], fmaps], gain=gain, use_wscale=use_wscale)
    w = tf.cast(fused_kernel(w) * 0.25, x.dtype)
    return tf.nn.conv2d(x, w, strides=[1, 2, 2, 1], padding='SAME')


def pixel_norm(x, epsilon=1e-8):
    with tf.variable_scope('PixelNorm'):
        return x * tf.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + epsilon)


def batch_norm(x, epsilon=1e-8):
    """Normalise each feature map over the minibatch and pixels (no learned parameters)."""
    with tf.variable_scope('BatchNorm'):
        mean, var = tf.nn.moments(tf.cast(x, tf.float32), axes=[0, 1, 2], keep_dims=True)
        return (x - tf.cast(mean, x.dtype)) * tf.cast(tf.rsqrt(var + epsilon), x.dtype)


def minibatch_stddev_layer(x, group_size=4):
    """Append the average stddev over groups of samples as one more feature map.

    Sample n falls in group n mod (N / G), as in the original."""
    with tf.variable_scope('MinibatchStddev'):
        group_size = tf.minimum(group_size, tf.shape(x)[0])
        _, h, w, c = x.shape.as_list()
        y = tf.reshape(x, [group_size, -1, h, w, c])                # [GMHWC]
        y = tf.cast(y, tf.float32)
        y -= tf.reduce_mean(y, axis=0, keepdims=True)
        y = tf.reduce_mean(tf.square(y), axis=0)                    # [MHWC] variance over group
        y = tf.sqrt(y + 1e-8)
        y = tf.reduce_mean(y, axis=[1, 2, 3], keepdims=True)        # [M111]
        y = tf.cast(y, x.dtype)
        y = tf.tile(y, [group_size, h, w, 1])                       # [NHW1]
        return tf.concat([x, y], axis=3)


# ----------------------------------------------------------------------------
# Generator.


def G_paper(
        latents_in,                     # [minibatch, latent_size]
        labels_in,                      # [minibatch, label_size]
        num_channels=1,
        resolution=32,
        label_size=0,
        fmap_base=8192,                 # Feature maps: min(fmap_base / 2**(stage*fmap_decay), fmap_max).
        fmap_decay=1.0,
        fmap_max=512,
        latent_size=None,               # None = min(fmap_base, fmap_max).
        normalize_latents=True,         # Pixelwise-normalise the latent vector?
        use_wscale=True,                # Equalized learning rate?
        use_pixelnorm=True,             # Pixelwise feature normalisation?
        pixelnorm_epsilon=1e-8,
        use_leakyrelu=True,             # False = ReLU.
        dtype='float32',
        fused_scale=True,               # Upscale and convolve as one transposed convolution?
        structure=None,                 # 'linear' (simple), 'recursive' (efficient), None = auto.
        is_template_graph=False,        # True when building the Network's template graph.
        **_kwargs):
    resolution_log2 = int(np.log2(resolution))
    assert resolution == 2 ** resolution_log2 and resolution >= 4

    def nf(stage):
        return min(int(fmap_base / (2.0 ** (stage * fmap_decay))), fmap_max)

    def PN(x):
        return pixel_norm(x, epsilon=pixelnorm_epsilon) if use_pixelnorm else x

    if latent_size is None:
        latent_size = nf(0)
    if structure is None:
        structure = 'linear' if is_template_graph else 'recursive'
    act = leaky_relu if use_leakyrelu else tf.nn.relu

    latents_in.set_shape([None, latent_size])
    labels_in.set_shape([None, label_size])
    combo_in = tf.cast(tf.concat([latents_in, labels_in], axis=1), dtype)
    lod_in = tf.cast(tf.get_variable('lod', initializer=np.float32(0.0), trainable=False), dtype)

    def block(x, res):      # res = 2..resolution_log2
        with tf.variable_scope('%dx%d' % (2 ** res, 2 ** res)):
            if res == 2:
                if normalize_latents:
                    x = pixel_norm(x, epsilon=pixelnorm_epsilon)
                with tf.variable_scope('Dense'):
                    # Gain sqrt(2)/4 matches the original Theano implementation.
                    x = dense(x, fmaps=nf(res - 1) * 16, gain=np.sqrt(2) / 4, use_wscale=use_wscale)
                    x = nchw_to_nhwc(tf.reshape(x, [-1, nf(res - 1), 4, 4]))
                    x = PN(act(apply_bias(x)))
                with tf.variable_scope('Conv'):
                    x = PN(act(apply_bias(conv2d(x, fmaps=nf(res - 1), kernel=3, use_wscale=use_wscale))))
            else:
                if fused_scale:
                    with tf.variable_scope('Conv0_up'):
                        x = PN(act(apply_bias(upscale2d_conv2d(x, fmaps=nf(res - 1), kernel=3, use_wscale=use_wscale))))
                else:
                    x = upscale2d(x)
                    with tf.variable_scope('Conv0'):
                        x = PN(act(apply_bias(conv2d(x, fmaps=nf(res - 1), kernel=3, use_wscale=use_wscale))))
                with tf.variable_scope('Conv1'):
                    x = PN(act(apply_bias(conv2d(x, fmaps=nf(res - 1), kernel=3, use_wscale=use_wscale))))
            return x

    def torgb(x, res):
        with tf.variable_scope('ToRGB_lod%d' % (resolution_log2 - res)):
            return apply_bias(conv2d(x, fmaps=num_channels, kernel=1, gain=1, use_wscale=use_wscale))

    if structure == 'linear':
        x = block(combo_in, 2)
        images_out = torgb(x, 2)
        for res in range(3, resolution_log2 + 1):
            lod = resolution_log2 - res
            x = block(x, res)
            img = torgb(x, res)
            images_out = upscale2d(images_out)
            with tf.variable_scope('Grow_lod%d' % lod):
                images_out = lerp_clip(img, images_out, lod_in - lod)

    elif structure == 'recursive':
        # Only the blocks the current LOD needs are evaluated.
        def grow(x, res, lod):
            y = block(x, res)
            img = lambda: upscale2d(torgb(y, res), 2 ** lod)
            if res > 2:
                img = cset(img, (lod_in > lod), lambda: upscale2d(
                    lerp(torgb(y, res), upscale2d(torgb(x, res - 1)), lod_in - lod), 2 ** lod))
            if lod > 0:
                img = cset(img, (lod_in < lod), lambda: grow(y, res + 1, lod - 1))
            return img()
        images_out = grow(combo_in, 2, resolution_log2 - 2)
    else:
        raise ValueError('Unknown structure %r' % structure)

    assert images_out.dtype == tf.as_dtype(dtype)
    return tf.identity(nhwc_to_nchw(images_out), name='images_out')


# ----------------------------------------------------------------------------
# Discriminator.


def D_paper(
        images_in,                      # [minibatch, channel, height, width]; labels are an output (AC-GAN).
        num_channels=1,
        resolution=32,
        label_size=0,
        fmap_base=8192,
        fmap_decay=1.0,
        fmap_max=512,
        use_wscale=True,
        use_batchnorm=False,            # Normalise D's features over the minibatch?
        mbstd_group_size=4,             # Group size of the minibatch-stddev layer, 0 = off.
        dtype='float32',
        fused_scale=True,               # Convolve and downscale as one strided convolution?
        structure=None,
        is_template_graph=False,
        **_kwargs):
    resolution_log2 = int(np.log2(resolution))
    assert resolution == 2 ** resolution_log2 and resolution >= 4

    def nf(stage):
        return min(int(fmap_base / (2.0 ** (stage * fmap_decay))), fmap_max)

    def BN(x):
        return batch_norm(x) if use_batchnorm else x

    if structure is None:
        structure = 'linear' if is_template_graph else 'recursive'
    act = leaky_relu

    images_in.set_shape([None, num_channels, resolution, resolution])
    images_in = nchw_to_nhwc(tf.cast(images_in, dtype))
    lod_in = tf.cast(tf.get_variable('lod', initializer=np.float32(0.0), trainable=False), dtype)

    def fromrgb(x, res):
        with tf.variable_scope('FromRGB_lod%d' % (resolution_log2 - res)):
            return act(apply_bias(conv2d(x, fmaps=nf(res - 1), kernel=1, use_wscale=use_wscale)))

    def block(x, res):
        with tf.variable_scope('%dx%d' % (2 ** res, 2 ** res)):
            if res >= 3:
                with tf.variable_scope('Conv0'):
                    x = act(BN(apply_bias(conv2d(x, fmaps=nf(res - 1), kernel=3, use_wscale=use_wscale))))
                if fused_scale:
                    with tf.variable_scope('Conv1_down'):
                        x = act(BN(apply_bias(conv2d_downscale2d(x, fmaps=nf(res - 2), kernel=3, use_wscale=use_wscale))))
                else:
                    with tf.variable_scope('Conv1'):
                        x = act(BN(apply_bias(conv2d(x, fmaps=nf(res - 2), kernel=3, use_wscale=use_wscale))))
                    x = downscale2d(x)
            else:
                if mbstd_group_size > 1:
                    x = minibatch_stddev_layer(x, mbstd_group_size)
                with tf.variable_scope('Conv'):
                    x = act(BN(apply_bias(conv2d(x, fmaps=nf(res - 1), kernel=3, use_wscale=use_wscale))))
                with tf.variable_scope('Dense0'):
                    x = act(apply_bias(dense(x, fmaps=nf(res - 2), use_wscale=use_wscale)))
                with tf.variable_scope('Dense1'):
                    x = apply_bias(dense(x, fmaps=1 + label_size, gain=1, use_wscale=use_wscale))
            return x

    if structure == 'linear':
        img = images_in
        x = fromrgb(img, resolution_log2)
        for res in range(resolution_log2, 2, -1):
            lod = resolution_log2 - res
            x = block(x, res)
            img = downscale2d(img)
            y = fromrgb(img, res - 1)
            with tf.variable_scope('Grow_lod%d' % lod):
                x = lerp_clip(x, y, lod_in - lod)
        combo_out = block(x, 2)

    elif structure == 'recursive':
        def grow(res, lod):
            x = lambda: fromrgb(downscale2d(images_in, 2 ** lod), res)
            if lod > 0:
                x = cset(x, (lod_in < lod), lambda: grow(res + 1, lod - 1))
            x = block(x(), res)
            y = lambda: x
            if res > 2:
                y = cset(y, (lod_in > lod), lambda: lerp(
                    x, fromrgb(downscale2d(images_in, 2 ** (lod + 1)), res - 1), lod_in - lod))
            return y()
        combo_out = grow(2, resolution_log2 - 2)
    else:
        raise ValueError('Unknown structure %r' % structure)

    assert combo_out.dtype == tf.as_dtype(dtype)
    scores_out = tf.identity(combo_out[:, :1], name='scores_out')
    labels_out = tf.identity(combo_out[:, 1:], name='labels_out')
    return scores_out, labels_out
