"""A discriminator loss that goes bad on purpose, for tests/test_survival.py (used from a config as
'tests.survival_losses.D_nan_when_fading')."""

import numpy as np

import loss
from tf_compat import tf


def D_nan_when_fading(G, D, opt, training_set, minibatch_size, reals, labels, **kwargs):
    """D_wgangp_acgan, but NaN whenever the LOD is below 1 (the fade into 8x8 and after): every D
    step from then on is non-finite, as when a run has diverged."""
    value = loss.D_wgangp_acgan(G, D, opt, training_set, minibatch_size, reals, labels, **kwargs)
    lod = tf.identity(D.find_var('lod'))
    return value + tf.where(lod < 0.999, np.float32(np.nan), np.float32(0.0))
