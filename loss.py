"""Loss functions: WGAN-GP with drift term (Gulrajani et al. 2017; Karras et al. 2018), plus the
AC-GAN label terms when the dataset has labels.

Each loss is one value per sample, shaped [minibatch, 1] like D's scores; the optimizer takes
their mean. The summaries under Loss/ are the TensorBoard tags the training logs show.
"""

import numpy as np

import tfutil
from tf_compat import tf


def fp32(*values):
    """The values cast to float32 (the losses are computed in fp32 even when the networks run in
    fp16). Takes tensors, or one tuple of them such as a network's outputs; gives back a single
    tensor for a single value, else a tuple."""
    tensors = values[0] if len(values) == 1 and isinstance(values[0], tuple) else values
    cast = tuple(tf.cast(tensor, tf.float32) for tensor in tensors)
    return cast[0] if len(cast) == 1 else cast


def _random_latents(G, minibatch_size):
    """Unit-normal latent vectors of the width G takes."""
    latent_shape = G.input_shapes[0][1:]
    return tf.random_normal([minibatch_size] + latent_shape)


def _judge(D, images, lod_sized):
    """D's (scores, label logits) for the images, in fp32."""
    return fp32(D.get_output_for(images, is_training=True, lod_sized=lod_sized))


def _uses_labels(D):
    label_logits_shape = D.output_shapes[1]
    return label_logits_shape[1] > 0


def _label_penalty(labels, logits):
    """How badly the label logits predict the labels: cross-entropy, one value per sample."""
    return tf.nn.softmax_cross_entropy_with_logits_v2(labels=labels, logits=logits)


def _per_sample(values):
    """[minibatch] to [minibatch, 1], the shape of the scores the loss terms add to."""
    return values[:, np.newaxis]


def G_wgan_acgan(G, D, opt, training_set, minibatch_size, cond_weight=1.0,
                 lod_sized=False):   # Networks at the current LOD's own image size (training's native path)?
    """G's loss: minus the critic's score of its images, plus (with labels) the AC-GAN penalty
    for images whose labels D cannot tell."""
    latents = _random_latents(G, minibatch_size)
    asked_labels = training_set.get_random_labels_tf(minibatch_size)
    fakes = G.get_output_for(latents, asked_labels, is_training=True, lod_sized=lod_sized)
    fake_scores, fake_logits = _judge(D, fakes, lod_sized)
    loss = -fake_scores
    if _uses_labels(D):
        with tf.name_scope('LabelPenalty'):
            penalty = _label_penalty(asked_labels, fake_logits)
        loss += _per_sample(penalty) * cond_weight
    return loss


def _gradient_penalty(D, opt, reals, fakes, minibatch_size, target_norm, lod_sized):
    """(|grad of D's score| - target_norm)**2 per sample, at a random point on the line between
    each real image and a fake one: WGAN-GP's soft 1-Lipschitz constraint."""
    position = tf.random_uniform([minibatch_size, 1, 1, 1], 0.0, 1.0, dtype=fakes.dtype)
    between = tfutil.lerp(tf.cast(reals, fakes.dtype), fakes, position)
    scores, _ = _judge(D, between, lod_sized)
    scores = tfutil.autosummary('Loss/mixed_scores', scores)
    # Scaled as the main loss is, so that fp16 gradients neither underflow nor overflow.
    scaled_total = opt.apply_loss_scaling(tf.reduce_sum(scores))
    scaled_grads = tf.gradients(scaled_total, [between])[0]
    grads = opt.undo_loss_scaling(fp32(scaled_grads))
    norms = tf.sqrt(tf.reduce_sum(tf.square(grads), axis=[1, 2, 3])) / _enlargement(D, between)
    norms = tfutil.autosummary('Loss/mixed_norms', norms)
    return tf.square(norms - target_norm)


def _enlargement(D, images):
    """How many times smaller than D's full resolution the images are (1 at full resolution).

    The penalty is defined on full-resolution images. Enlarging an image by f (nearest) spreads
    each pixel's gradient over f x f pixels at 1/f**2 each, which divides the L2 norm by f; so
    the norm of a smaller image's gradient is divided by f to be the same number."""
    full_width = D.input_shapes[0][3]
    return full_width / tf.cast(tf.shape(images)[3], tf.float32)


def D_wgangp_acgan(G, D, opt, training_set, minibatch_size, reals, labels,
                   wgan_lambda=10.0,     # Weight of the gradient penalty.
                   wgan_epsilon=0.001,   # Weight of the drift term that keeps real scores near 0.
                   wgan_target=1.0,      # Target gradient norm.
                   cond_weight=1.0,      # Weight of the AC-GAN label terms.
                   lod_sized=False):     # Networks at the current LOD's own image size (training's native path)?
    """D's loss: the fake score minus the real score, the gradient penalty, the drift term and
    (with labels) the AC-GAN penalties on both the reals and the fakes."""
    latents = _random_latents(G, minibatch_size)
    fakes = G.get_output_for(latents, labels, is_training=True, lod_sized=lod_sized)
    real_scores, real_logits = _judge(D, reals, lod_sized)
    fake_scores, fake_logits = _judge(D, fakes, lod_sized)
    real_scores = tfutil.autosummary('Loss/real_scores', real_scores)
    fake_scores = tfutil.autosummary('Loss/fake_scores', fake_scores)
    loss = fake_scores - real_scores

    with tf.name_scope('GradientPenalty'):
        penalty = _gradient_penalty(D, opt, reals, fakes, minibatch_size, wgan_target, lod_sized)
    # Divided by the target squared, so that the penalty's scale does not depend on the target.
    loss += _per_sample(penalty) * (wgan_lambda / (wgan_target ** 2))

    with tf.name_scope('EpsilonPenalty'):
        drift = tfutil.autosummary('Loss/epsilon_penalty', tf.square(real_scores))
    loss += drift * wgan_epsilon

    if _uses_labels(D):
        with tf.name_scope('LabelPenalty'):
            on_reals = _label_penalty(labels, real_logits)
            on_fakes = _label_penalty(labels, fake_logits)
            on_reals = tfutil.autosummary('Loss/label_penalty_reals', on_reals)
            on_fakes = tfutil.autosummary('Loss/label_penalty_fakes', on_fakes)
        loss += _per_sample(on_reals + on_fakes) * cond_weight
    return loss
