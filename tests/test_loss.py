"""loss.py against a numpy reference written from the papers (WGAN-GP: Gulrajani et al. 2017; drift
term: Karras et al. 2018; AC-GAN: Odena et al. 2017), on tiny dense networks (tests/tiny_nets.py)
whose random latents and mixing factors are fed, so both sides see the same numbers. Gradients
of the reference come from central finite differences in float64."""

import numpy as np
import pytest

import loss
import tfutil
from tf_compat import tf
from tiny_nets import random_draws

N, C, R, LATENT = 4, 3, 4, 4
PAPER_WEIGHTS = dict(gp=10.0, drift=0.001, labels=1.0)    # λ, ε_drift, AC-GAN weight; target norm 1


# ----------------------------------------------------------------------------------------------
# The numpy reference, float64, parameters as {local variable name: array}.

def reference_G(params, latents, labels):
    inputs = np.concatenate([latents, labels], axis=1)
    return (inputs @ params['Dense/weight'] + params['Dense/bias']).reshape(-1, C, R, R)


def reference_D(params, images):
    """(scores [n], label logits [n, L], d score / d images [n, C, R, R])."""
    flat = images.reshape(len(images), -1)
    hidden = np.tanh(flat @ params['Hidden/weight'] + params['Hidden/bias'])
    out = hidden @ params['Out/weight'] + params['Out/bias']
    score_grad = ((1 - hidden ** 2) * params['Out/weight'][:, 0]) @ params['Hidden/weight'].T
    return out[:, 0], out[:, 1:], score_grad.reshape(images.shape)


def cross_entropy(labels, logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -(labels * log_softmax).sum(axis=1)


def reference_D_terms(D_params, G_params, reals, labels, latents, mixing):
    """Per-sample terms of the discriminator loss."""
    fakes = reference_G(G_params, latents, labels)
    real_scores, real_logits, _ = reference_D(D_params, reals)
    fake_scores, fake_logits, _ = reference_D(D_params, fakes)
    t = mixing.reshape(-1, 1, 1, 1)
    _, _, mixed_grads = reference_D(D_params, (1 - t) * reals + t * fakes)
    norms = np.sqrt((mixed_grads ** 2).sum(axis=(1, 2, 3)))
    terms = dict(wgan=fake_scores - real_scores, gp=(norms - 1) ** 2, drift=real_scores ** 2)
    if labels.shape[1]:
        terms['labels'] = cross_entropy(labels, real_logits) + cross_entropy(labels, fake_logits)
    return terms


def reference_G_terms(D_params, G_params, labels, latents):
    fake_scores, fake_logits, _ = reference_D(D_params, reference_G(G_params, latents, labels))
    terms = dict(wgan=-fake_scores)
    if labels.shape[1]:
        terms['labels'] = cross_entropy(labels, fake_logits)
    return terms


def weighted_sum(terms, weights):
    return sum(value * weights.get(name, 1.0) for name, value in terms.items())


def finite_difference_gradients(function, params, step=1e-6):
    """d function(params) / d params[name] for every name, by central differences."""
    grads = {}
    for name, value in params.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            shifted = {**params, name: value.copy()}
            shifted[name][index] = value[index] + step
            above = function(shifted)
            shifted[name][index] = value[index] - step
            grad[index] = (above - function(shifted)) / (2 * step)
        grads[name] = grad
    return grads


# ----------------------------------------------------------------------------------------------
# The graph side.

class FixedLabels:
    """All the losses ask of a training set: labels for the fakes, fixed here."""

    def __init__(self, labels):
        self.labels = labels

    def get_random_labels_tf(self, minibatch_size):
        return tf.constant(self.labels)


def set_params(net, rng, scale):
    """Random float32 parameters, returned in float64 for the reference."""
    params = {}
    for name, var in net.trainables.items():
        value = (rng.standard_normal(tfutil.shape_to_list(var.shape)) * scale).astype(np.float32)
        net.set_var(name, value)
        params[name] = value.astype(np.float64)
    return params


def random_one_hot(rng, label_size):
    """[N, label_size] one-hot rows (no columns without labels)."""
    labels = np.zeros([N, label_size], np.float32)
    if label_size:
        labels[np.arange(N), rng.integers(label_size, size=N)] = 1
    return labels


@pytest.fixture(params=[0, 3], ids=['no-labels', 'labels'])
def setup(request, tf_session):
    label_size = request.param
    rng = np.random.default_rng(10 + label_size)
    G = tfutil.Network('G', func='tiny_nets.tiny_G', num_channels=C, resolution=R, label_size=label_size,
                       latent_size=LATENT)
    D = tfutil.Network('D', func='tiny_nets.tiny_D', num_channels=C, resolution=R, label_size=label_size)
    data = dict(
        G=G, D=D, G_params=set_params(G, rng, 0.5), D_params=set_params(D, rng, 0.15),
        reals=rng.uniform(-1, 1, [N, C, R, R]).astype(np.float32),
        labels=random_one_hot(rng, label_size),
        latents=rng.standard_normal([N, LATENT]).astype(np.float32),
        mixing=np.array([0.1, 0.35, 0.6, 0.9], np.float32))
    data['D_params']['Out/weight'] *= 5     # scores of a few units: the drift term counts
    D.set_var('Out/weight', data['D_params']['Out/weight'].astype(np.float32))
    return data


def run_D_loss(s, **weights):
    opt = tfutil.Optimizer(name='TrainD')
    d_loss, (latents, mixing) = random_draws(lambda: loss.D_wgangp_acgan(
        s['G'], s['D'], opt, FixedLabels(s['labels']), N, tf.constant(s['reals']), tf.constant(s['labels']), **weights))
    grads = tf.gradients(tf.reduce_sum(d_loss), list(s['D'].trainables.values()))
    tfutil.init_uninited_vars()
    feed = {latents: s['latents'], mixing: s['mixing'].reshape(N, 1, 1, 1)}
    value, grad_values = tfutil.run([d_loss, grads], feed)
    return value, dict(zip(s['D'].trainables, grad_values))


def run_G_loss(s, **weights):
    opt = tfutil.Optimizer(name='TrainG')
    g_loss, (latents,) = random_draws(lambda: loss.G_wgan_acgan(s['G'], s['D'], opt, FixedLabels(s['labels']), N,
                                                                **weights))
    grads = tf.gradients(tf.reduce_sum(g_loss), list(s['G'].trainables.values()))
    tfutil.init_uninited_vars()
    value, grad_values = tfutil.run([g_loss, grads], {latents: s['latents']})
    return value, dict(zip(s['G'].trainables, grad_values))


def assert_close(got, want, what):
    """Within 1e-5 of the largest magnitude in `want` (at least 1e-5): float32 sums of terms
    of a few hundred carry errors of that order even where they cancel to a small result."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()), err_msg=what)


# ----------------------------------------------------------------------------------------------
# The tests.

def test_D_loss_with_the_default_weights_and_its_gradients(setup):
    s = setup
    value, grads = run_D_loss(s)
    reference = lambda D_params: weighted_sum(
        reference_D_terms(D_params, s['G_params'], s['reals'], s['labels'], s['latents'], s['mixing']), PAPER_WEIGHTS)
    assert value.shape == (N, 1)
    assert_close(value[:, 0], reference(s['D_params']), 'D loss')
    terms = reference_D_terms(s['D_params'], s['G_params'], s['reals'], s['labels'], s['latents'], s['mixing'])
    assert np.abs(terms['drift'] * PAPER_WEIGHTS['drift']).max() > 1e-3, 'the drift term is too small to check'
    expected = finite_difference_gradients(lambda p: reference(p).sum(), s['D_params'])
    for name in expected:
        assert_close(grads[name], expected[name], 'd D loss / d ' + name)


@pytest.mark.parametrize('term', ['wgan', 'gp', 'drift', 'labels'])
def test_each_D_loss_term_alone(setup, term):
    s = setup     # Without labels the 'labels' case checks that its weight leaves the loss alone.
    weights = {name: 0.0 for name in PAPER_WEIGHTS}     # the critic term has no weight of its own
    if term != 'wgan':
        weights[term] = 2.5
    value, grads = run_D_loss(s, wgan_lambda=weights['gp'], wgan_epsilon=weights['drift'],
                              cond_weight=weights['labels'])
    reference = lambda D_params: weighted_sum(
        reference_D_terms(D_params, s['G_params'], s['reals'], s['labels'], s['latents'], s['mixing']), weights)
    assert_close(value[:, 0], reference(s['D_params']), term)
    expected = finite_difference_gradients(lambda p: reference(p).sum(), s['D_params'])
    for name in expected:
        assert_close(grads[name], expected[name], f'd {term} / d {name}')


@pytest.mark.parametrize('cond_weight', [None, 0.0, 2.5])
def test_G_loss_and_its_gradients(setup, cond_weight):
    s = setup
    weights = {} if cond_weight is None else dict(cond_weight=cond_weight)
    value, grads = run_G_loss(s, **weights)
    label_weight = PAPER_WEIGHTS['labels'] if cond_weight is None else cond_weight
    reference = lambda G_params: weighted_sum(reference_G_terms(s['D_params'], G_params, s['labels'], s['latents']),
                                              dict(labels=label_weight))
    assert value.shape == (N, 1)
    assert_close(value[:, 0], reference(s['G_params']), 'G loss')
    expected = finite_difference_gradients(lambda p: reference(p).sum(), s['G_params'])
    for name in expected:
        assert_close(grads[name], expected[name], 'd G loss / d ' + name)
