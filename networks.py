"""G_paper and D_paper: the progressive GAN networks of Karras et al. (2018).

At their boundary the networks speak NCHW, as the pickles and notebooks expect (latents in and
images out for G; images in and scores out for D). Inside, every layer works on NHWC tensors:
TensorFlow's CPU kernels only accept NHWC, and one layout for every device means the tests run
what the GPUs run. Variable names, shapes and initial values reproduce the original's layout
(DESIGN.md 2b), so that its pickles load here.

Only numpy and TensorFlow are imported: this file's text is stored in every network pickle and
must stand on its own when a pickle is rebuilt from it.
"""

import numpy as np
import tensorflow.compat.v1 as tf

# ----------------------------------------------------------------------------
# Boundary layout, blending and lazy choices.


def nchw_to_nhwc(x):
    return tf.transpose(x, [0, 2, 3, 1])


def nhwc_to_nchw(x):
    return tf.transpose(x, [0, 3, 1, 2])


def lerp(a, b, t):
    """Linear interpolation: a at t = 0, b at t = 1."""
    return a + (b - a) * t


def lerp_clip(a, b, t):
    """lerp with t held to [0, 1], so that outside a fade one end is used alone."""
    step = b - a
    return a + step * tf.clip_by_value(t, 0.0, 1.0)


def cset(cur_lambda, new_cond, new_lambda):
    """Put a new case in front of a lazy choice: the builder returned gives new_lambda's output
    where new_cond holds and cur_lambda's otherwise. Only the graph of the taken branch runs."""
    def choose():
        return tf.cond(new_cond, new_lambda, cur_lambda)
    return choose


# ----------------------------------------------------------------------------
# Argument checks (plain Python values a caller can get wrong).


def _check_kernel(kernel):
    if not (kernel >= 1 and kernel % 2 == 1):
        raise ValueError('kernel must be a positive odd size (same padding centres it), got %r' % (kernel,))


def _check_factor(factor):
    if not (isinstance(factor, int) and factor >= 1):
        raise ValueError('the scaling factor must be a positive int, got %r' % (factor,))


def _resolution_log2(resolution):
    exponent = int(np.log2(resolution))
    if resolution != 2 ** exponent or resolution < 4:
        raise ValueError('resolution must be a power of two of at least 4, got %r' % (resolution,))
    return exponent


def _chosen_structure(structure, is_template_graph):
    """The template graph must create every variable, which only 'linear' does; elsewhere
    'recursive' builds just the blocks the current LOD shows."""
    if structure is None:
        return 'linear' if is_template_graph else 'recursive'
    if structure not in ('linear', 'recursive'):
        raise ValueError("structure must be 'linear', 'recursive' or None (automatic), got %r" % (structure,))
    return structure


def _check_lod_sized(lod_sized, structure):
    if lod_sized and structure != 'recursive':
        raise ValueError("lod_sized images need structure='recursive' (or None): the %r structure works on "
                         "full-resolution images (for training: train.full_resolution_graph = True in config.py)"
                         % (structure,))


def _feature_maps(fmap_base, fmap_decay, fmap_max):
    """nf(stage): the layer width of a stage, divided by 2**fmap_decay per doubling of the
    resolution and capped at fmap_max."""
    def nf(stage):
        width = fmap_base / 2.0 ** (stage * fmap_decay)
        return min(int(width), fmap_max)
    return nf


def _lod_input(dtype):
    """The network's current level of detail: a variable that training sets, never trains."""
    lod = tf.get_variable('lod', initializer=np.float32(0.0), trainable=False)
    return tf.cast(lod, dtype)


def _resolution_scope(res):
    return '%dx%d' % (2 ** res, 2 ** res)


def _shape(x):
    return x.shape.as_list()


def _channels(x):
    return _shape(x)[-1]


# ----------------------------------------------------------------------------
# Layers. Tensors are NHWC (or [N, features]); the layers create their variables in the
# caller's variable scope, named 'weight' and 'bias'.


def _normal_weight(shape, stddev):
    initializer = tf.initializers.random_normal(mean=0.0, stddev=stddev)
    return tf.get_variable('weight', shape=shape, initializer=initializer)


def get_weight(shape, gain=np.sqrt(2), use_wscale=False, fan_in=None):
    """A layer's weight with He's standard deviation gain / sqrt(fan_in).

    With use_wscale (equalized learning rate) the variable holds unit-normal values and the graph
    multiplies them by that deviation, so every layer learns at the same pace under Adam."""
    if fan_in is None:
        fan_in = np.prod(shape[:-1])       # Every axis but the output one feeds each output.
    he_std = gain / np.sqrt(fan_in)
    if not use_wscale:
        return _normal_weight(shape, he_std)
    runtime_scale = tf.constant(np.float32(he_std), name='wscale')
    return _normal_weight(shape, 1.0) * runtime_scale


def _flatten_channels_first(x):
    """[N, H, W, C] to [N, C*H*W] in channel-major order: the order the original's dense
    weights were trained on."""
    x = nhwc_to_nchw(x)
    return tf.reshape(x, [-1, int(np.prod(_shape(x)[1:]))])


def dense(x, fmaps, gain=np.sqrt(2), use_wscale=False):
    if x.shape.ndims > 2:
        x = _flatten_channels_first(x)
    w = get_weight([_channels(x), fmaps], gain=gain, use_wscale=use_wscale)
    return tf.matmul(x, tf.cast(w, x.dtype))


def conv2d(x, fmaps, kernel, gain=np.sqrt(2), use_wscale=False):
    _check_kernel(kernel)
    w = get_weight([kernel, kernel, _channels(x), fmaps], gain=gain, use_wscale=use_wscale)
    return tf.nn.conv2d(x, tf.cast(w, x.dtype), strides=[1, 1, 1, 1], padding='SAME')


def apply_bias(x):
    """A learned offset per channel (the last axis, so it broadcasts as is), starting at zero."""
    bias = tf.get_variable('bias', shape=[_channels(x)], initializer=tf.initializers.zeros())
    return x + tf.cast(bias, x.dtype)


def leaky_relu(x, alpha=0.2):
    with tf.name_scope('LeakyRelu'):
        # A constant of x's own dtype, so that fp16 graphs stay fp16.
        slope = tf.constant(alpha, dtype=x.dtype, name='alpha')
        return tf.maximum(x * slope, x)


def upscale2d(x, factor=2):
    """Nearest-neighbour upscaling: each pixel becomes a factor x factor square."""
    _check_factor(factor)
    if factor == 1:
        return x
    with tf.variable_scope('Upscale2D'):
        _, height, width, channels = _shape(x)
        pixels = tf.reshape(x, [-1, height, 1, width, 1, channels])
        squares = tf.tile(pixels, [1, 1, factor, 1, factor, 1])
        return tf.reshape(squares, [-1, height * factor, width * factor, channels])


def downscale2d(x, factor=2):
    """Box-filter downscaling: the mean of each factor x factor square."""
    _check_factor(factor)
    if factor == 1:
        return x
    with tf.variable_scope('Downscale2D'):
        window = [1, factor, factor, 1]
        return tf.nn.avg_pool(x, ksize=window, strides=window, padding='VALID')


def fused_kernel(w):
    """The kernel that does 2x nearest upscaling and a k x k convolution in one stride-2
    transposed convolution (or, times 1/4, a convolution and 2x2 averaging in one stride-2
    convolution): the (k+1) x (k+1) sum of the kernel at its four one-pixel offsets."""
    padded = tf.pad(w, [[1, 1], [1, 1], [0, 0], [0, 0]])
    size = _shape(padded)[0] - 1
    offsets = [(1, 1), (0, 1), (1, 0), (0, 0)]
    return tf.add_n([padded[dy:dy + size, dx:dx + size] for dy, dx in offsets])


def upscale2d_conv2d(x, fmaps, kernel, gain=np.sqrt(2), use_wscale=False):
    _check_kernel(kernel)
    _, height, width, channels = _shape(x)
    # conv2d_transpose takes its filter as [k, k, out, in]; the fan-in is still k*k*in.
    w = get_weight([kernel, kernel, fmaps, channels], gain=gain, use_wscale=use_wscale,
                   fan_in=kernel * kernel * channels)
    w = tf.cast(fused_kernel(w), x.dtype)
    batch = tf.shape(x)[0]
    doubled = [batch, 2 * height, 2 * width, fmaps]
    return tf.nn.conv2d_transpose(x, w, doubled, strides=[1, 2, 2, 1], padding='SAME')


def conv2d_downscale2d(x, fmaps, kernel, gain=np.sqrt(2), use_wscale=False):
    _check_kernel(kernel)
    w = get_weight([kernel, kernel, _channels(x), fmaps], gain=gain, use_wscale=use_wscale)
    quarter_sum = fused_kernel(w) * 0.25          # 2x2 averaging folded into the kernel.
    return tf.nn.conv2d(x, tf.cast(quarter_sum, x.dtype), strides=[1, 2, 2, 1], padding='SAME')


def pixel_norm(x, epsilon=1e-8):
    """Scale each pixel's feature vector to unit root-mean-square."""
    with tf.variable_scope('PixelNorm'):
        mean_square = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
        return x * tf.rsqrt(mean_square + epsilon)


def batch_norm(x, epsilon=1e-8):
    """Normalise each feature map over the minibatch and the pixels (no learned parameters)."""
    with tf.variable_scope('BatchNorm'):
        mean, variance = tf.nn.moments(tf.cast(x, tf.float32), axes=[0, 1, 2], keepdims=True)
        centred = x - tf.cast(mean, x.dtype)
        return centred * tf.cast(tf.rsqrt(variance + epsilon), x.dtype)


def minibatch_stddev_layer(x, group_size=4):
    """One more feature map: how much the samples of a group differ, averaged into one number
    per group. It lets D see a lack of variety in what G makes.

    Groups have min(group_size, N) members, and sample n belongs to group n mod (N / members)."""
    with tf.variable_scope('MinibatchStddev'):
        members = tf.minimum(group_size, tf.shape(x)[0])
        _, height, width, channels = _shape(x)
        groups = tf.reshape(x, [members, -1, height, width, channels])     # Axis 0: a group's members.
        groups = tf.cast(groups, tf.float32)
        deviations = groups - tf.reduce_mean(groups, axis=0, keepdims=True)
        variance = tf.reduce_mean(tf.square(deviations), axis=0)
        stddev = tf.sqrt(variance + 1e-8)
        per_group = tf.reduce_mean(stddev, axis=[1, 2, 3], keepdims=True)  # [groups, 1, 1, 1]
        feature = tf.tile(tf.cast(per_group, x.dtype), [members, height, width, 1])
        return tf.concat([x, feature], axis=-1)


# ----------------------------------------------------------------------------
# Generator.


def G_paper(
        latents_in,                     # [minibatch, latent_size]
        labels_in,                      # [minibatch, label_size]
        num_channels=1,
        resolution=32,
        label_size=0,
        fmap_base=8192,                 # Layer widths: min(fmap_base / 2**(stage*fmap_decay), fmap_max).
        fmap_decay=1.0,
        fmap_max=512,
        latent_size=None,               # None: min(fmap_base, fmap_max).
        normalize_latents=True,         # Pixel-normalise the latent vector first?
        use_wscale=True,                # Equalized learning rate?
        use_pixelnorm=True,             # Pixel-normalise the features after every layer?
        pixelnorm_epsilon=1e-8,
        use_leakyrelu=True,             # False: plain ReLU.
        dtype='float32',
        fused_scale=True,               # Upscale and convolve in one transposed convolution?
        structure=None,                 # 'linear', 'recursive', or None to choose.
        is_template_graph=False,        # True while tfutil.Network builds its template graph.
        lod_sized=False,                # Images at the current LOD's own size instead of enlarged to full size?
        **_kwargs):
    """Images [minibatch, num_channels, resolution, resolution] from latents and labels; with
    lod_sized, [minibatch, num_channels, s, s] at s = resolution / 2**floor(lod) (training's
    native path: the same pixels without the enlargement, 'recursive' structure only).

    Block res (2 .. log2(resolution)) makes 2**res pixels square images; the variable 'lod'
    says how many of the finest blocks are not shown yet, and a fractional lod fades the
    finest shown block in over the upscaled output of the one before."""
    res_log2 = _resolution_log2(resolution)
    nf = _feature_maps(fmap_base, fmap_decay, fmap_max)
    if latent_size is None:
        latent_size = nf(0)
    structure = _chosen_structure(structure, is_template_graph)
    _check_lod_sized(lod_sized, structure)
    activation = leaky_relu if use_leakyrelu else tf.nn.relu

    def normalize(x):
        return pixel_norm(x, epsilon=pixelnorm_epsilon) if use_pixelnorm else x

    def layer(x, fmaps, conv=conv2d):
        """3x3 convolution (conv2d or upscale2d_conv2d), bias, activation, normalisation."""
        features = apply_bias(conv(x, fmaps=fmaps, kernel=3, use_wscale=use_wscale))
        return normalize(activation(features))

    for inputs, width in [(latents_in, latent_size), (labels_in, label_size)]:
        inputs.set_shape([None, width])
    code = tf.cast(tf.concat([latents_in, labels_in], axis=1), dtype)
    lod_in = _lod_input(dtype)

    def first_block(code):
        if normalize_latents:
            code = pixel_norm(code, epsilon=pixelnorm_epsilon)
        with tf.variable_scope('Dense'):
            # A quarter of the usual gain, as in the paper's first (Theano) implementation.
            x = dense(code, fmaps=16 * nf(1), gain=np.sqrt(2) / 4, use_wscale=use_wscale)
            x = nchw_to_nhwc(tf.reshape(x, [-1, nf(1), 4, 4]))    # The original's weights fill NCHW.
            x = normalize(activation(apply_bias(x)))
        with tf.variable_scope('Conv'):
            return layer(x, nf(1))

    def doubling_block(x, res):
        width = nf(res - 1)
        if fused_scale:
            with tf.variable_scope('Conv0_up'):
                x = layer(x, width, conv=upscale2d_conv2d)
        else:
            x = upscale2d(x)
            with tf.variable_scope('Conv0'):
                x = layer(x, width)
        with tf.variable_scope('Conv1'):
            return layer(x, width)

    def block(x, res):
        with tf.variable_scope(_resolution_scope(res)):
            return first_block(x) if res == 2 else doubling_block(x, res)

    def to_rgb(x, res):
        with tf.variable_scope('ToRGB_lod%d' % (res_log2 - res)):
            rgb = conv2d(x, num_channels, 1, gain=1, use_wscale=use_wscale)
            return apply_bias(rgb)

    def linear():
        """Every block and every LOD's image, blended by clipped lerps (the template graph)."""
        x = block(code, 2)
        images = to_rgb(x, 2)
        for res in range(3, res_log2 + 1):
            x = block(x, res)
            finer, coarser = to_rgb(x, res), upscale2d(images)
            lod = res_log2 - res
            with tf.variable_scope('Grow_lod%d' % lod):
                images = lerp_clip(finer, coarser, lod_in - lod)
        return images

    def from_block(x, res):
        """Full-resolution images from block res (at lod = res_log2 - res) and the finer ones
        the current lod shows, behind tf.cond so that unused blocks never run."""
        lod = res_log2 - res
        y = block(x, res)

        def to_output_size(images):
            return images if lod_sized else upscale2d(images, 2 ** lod)

        def shown_alone():
            return to_output_size(to_rgb(y, res))

        def fading_in():
            return to_output_size(lerp(to_rgb(y, res), upscale2d(to_rgb(x, res - 1)), lod_in - lod))

        output = shown_alone
        if res > 2:
            output = cset(output, lod_in > lod, fading_in)
        if lod > 0:
            output = cset(output, lod_in < lod, lambda: from_block(y, res + 1))
        return output()

    images = linear() if structure == 'linear' else from_block(code, 2)
    return tf.identity(nhwc_to_nchw(images), name='images_out')


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
        mbstd_group_size=4,             # Group size of the minibatch-stddev layer, 0: none.
        dtype='float32',
        fused_scale=True,               # Convolve and downscale in one strided convolution?
        structure=None,
        is_template_graph=False,
        lod_sized=False,                # Images at the current LOD's own size instead of full size?
        **_kwargs):
    """(scores [minibatch, 1], label logits [minibatch, label_size]) for images in NCHW: at full
    resolution, or with lod_sized at resolution / 2**floor(lod) ('recursive' structure only).

    The mirror of G_paper: block res halves 2**res pixels square features, and 'lod' says at
    which resolution the images enter (through a 1x1 from-RGB convolution); a fractional lod
    fades the finest block in over the downscaled image's direct path."""
    res_log2 = _resolution_log2(resolution)
    nf = _feature_maps(fmap_base, fmap_decay, fmap_max)
    structure = _chosen_structure(structure, is_template_graph)
    _check_lod_sized(lod_sized, structure)

    def layer(x, fmaps, conv=conv2d):
        """3x3 convolution (conv2d or conv2d_downscale2d), bias, optional batch norm, activation."""
        features = apply_bias(conv(x, fmaps=fmaps, kernel=3, use_wscale=use_wscale))
        if use_batchnorm:
            features = batch_norm(features)
        return leaky_relu(features)

    if lod_sized:
        # Each LOD's branch below reshapes the images to its own size; a static size would make the
        # other branches' reshapes fail as the graph is built, so it is left unknown here.
        images_in = tf.placeholder_with_default(images_in, [None, num_channels, None, None])
    else:
        images_in.set_shape([None, num_channels, resolution, resolution])
    images = nchw_to_nhwc(tf.cast(images_in, dtype))
    lod_in = _lod_input(dtype)

    def from_rgb(image, res):
        with tf.variable_scope('FromRGB_lod%d' % (res_log2 - res)):
            features = conv2d(image, nf(res - 1), 1, use_wscale=use_wscale)
            return leaky_relu(apply_bias(features))

    def halving_block(x, res):
        with tf.variable_scope('Conv0'):
            x = layer(x, nf(res - 1))
        if fused_scale:
            with tf.variable_scope('Conv1_down'):
                return layer(x, nf(res - 2), conv=conv2d_downscale2d)
        with tf.variable_scope('Conv1'):
            x = layer(x, nf(res - 2))
        return downscale2d(x)

    def last_block(x):
        if mbstd_group_size > 1:
            x = minibatch_stddev_layer(x, group_size=mbstd_group_size)
        with tf.variable_scope('Conv'):
            x = layer(x, nf(1))
        with tf.variable_scope('Dense0'):
            x = leaky_relu(apply_bias(dense(x, nf(0), use_wscale=use_wscale)))
        with tf.variable_scope('Dense1'):
            return apply_bias(dense(x, 1 + label_size, gain=1, use_wscale=use_wscale))

    def block(x, res):
        with tf.variable_scope(_resolution_scope(res)):
            return last_block(x) if res == 2 else halving_block(x, res)

    def linear():
        """Every block and every LOD's direct path, blended by clipped lerps (the template graph)."""
        image = images
        x = from_rgb(image, res_log2)
        for res in range(res_log2, 2, -1):
            x = block(x, res)
            image = downscale2d(image)
            direct = from_rgb(image, res - 1)
            lod = res_log2 - res
            with tf.variable_scope('Grow_lod%d' % lod):
                x = lerp_clip(x, direct, lod_in - lod)
        return block(x, 2)

    def into_block(res):
        """The output of block res (at lod = res_log2 - res), fed from the finer blocks the current
        lod shows or from the image itself, behind tf.cond so that unused blocks never run."""
        lod = res_log2 - res

        def image_sized(image_res):
            """The image at 2**image_res pixels square. A lod_sized image enters at the block
            of lod floor(lod), this one, so it comes at 2**res."""
            if lod_sized:
                return downscale2d(tf.reshape(images, [-1, 2 ** res, 2 ** res, num_channels]), 2 ** (res - image_res))
            return downscale2d(images, 2 ** (res_log2 - image_res))

        def image_enters_here():
            return from_rgb(image_sized(res), res)

        block_input = image_enters_here
        if lod > 0:
            block_input = cset(block_input, lod_in < lod, lambda: into_block(res + 1))
        x = block(block_input(), res)
        if res == 2:
            return x

        def fading_in():
            direct = from_rgb(image_sized(res - 1), res - 1)
            return lerp(x, direct, lod_in - lod)

        return cset(lambda: x, lod_in > lod, fading_in)()

    outputs = linear() if structure == 'linear' else into_block(2)
    # Column 0 is the critic's score, the others are the AC-GAN label logits.
    score = tf.identity(outputs[:, :1], name='scores_out')
    label_logits = tf.identity(outputs[:, 1:], name='labels_out')
    return score, label_logits
