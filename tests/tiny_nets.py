"""Tiny dense networks with the call signatures of G_paper and D_paper, small enough to mirror in
numpy, a way to pin the random draws a graph makes, and a training set of fixed reals. tfutil.Network imports a build function
by module and name, hence a module of their own.

Both networks work on flat NCHW images of num_channels x resolution x resolution:
  tiny_G: images = reshape([latents, labels] @ weight + bias)
  tiny_D: hidden = tanh(images @ Hidden/weight + Hidden/bias),
          [score, label logits...] = hidden @ Out/weight + Out/bias
tanh rather than a ReLU keeps the reference smooth, so finite differences are exact enough."""

from tf_compat import tf

RANDOM_OP_TYPES = {'RandomStandardNormal', 'RandomUniform', 'RandomUniformInt', 'TruncatedNormal'}


def _dense(x, fan_out, name):
    with tf.variable_scope(name):
        weight = tf.get_variable('weight', [x.shape.as_list()[1], fan_out], initializer=tf.initializers.random_normal())
        bias = tf.get_variable('bias', [fan_out], initializer=tf.initializers.zeros())
        return tf.matmul(x, weight) + bias


def _declare_shape(placeholder, *item_shape):
    """Give an input its per-item shape: Network reads input_shapes (the losses, the latent size)
    off its placeholders, and the dense layers need a known width."""
    placeholder.set_shape((None,) + item_shape)


def tiny_G(latents_in, labels_in, num_channels=3, resolution=4, label_size=0, latent_size=4, **_kwargs):
    _declare_shape(latents_in, latent_size)
    _declare_shape(labels_in, label_size)
    flat = _dense(tf.concat([latents_in, labels_in], axis=1), num_channels * resolution ** 2, 'Dense')
    return tf.reshape(flat, [-1, num_channels, resolution, resolution], name='images_out')


def tiny_D(images_in, num_channels=3, resolution=4, label_size=0, hidden_size=8, **_kwargs):
    _declare_shape(images_in, num_channels, resolution, resolution)
    hidden = tf.tanh(_dense(tf.reshape(images_in, [-1, num_channels * resolution ** 2]), hidden_size, 'Hidden'))
    out = _dense(hidden, 1 + label_size, 'Out')
    return tf.identity(out[:, :1], name='scores_out'), tf.identity(out[:, 1:], name='labels_out')


def random_draws(build):
    """(build()'s result, the tensors of the random draws it made, in creation order).

    Each draw is the value a tf.random_* call returns (the op named like the call, after its
    scaling), so feeding it replaces the draw with chosen numbers. Variable initializers, which
    only run when a variable is (re)set, are left out."""
    graph = tf.get_default_graph()
    known = {op.name for op in graph.get_operations()}
    result = build()
    draws = [op for op in graph.get_operations() if op.name not in known and op.type in RANDOM_OP_TYPES
             and '/Initializer/' not in op.name]     # new networks' variables start random too
    return result, [graph.get_tensor_by_name(op.name.rsplit('/', 1)[0] + ':0') for op in draws]


class FixedMinibatch:
    """A training set that always gives the same reals, without labels."""

    def __init__(self, reals):
        self.reals = reals
        self.dynamic_range = [0, 255]
        self.label_size = 0

    def get_minibatch_tf(self):
        return tf.constant(self.reals), tf.zeros([len(self.reals), 0])

    def get_random_labels_tf(self, minibatch_size):
        return tf.zeros([minibatch_size, 0])
