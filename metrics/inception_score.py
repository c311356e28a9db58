"""Inception Score (Salimans et al. 2016) with the standard Inception graph, as computed by
the reference openai/improved-gan code: 10 splits, mean and standard deviation."""
import numpy as np
import scipy.special

import metrics
from metrics.frechet_inception_distance import InceptionNet


def inception_score(probs, splits=10):
    """Mean and standard deviation over `splits` parts of exp(E[KL(p(y|x) || p(y))])."""
    probs = np.float64(probs)
    bounds = [i * len(probs) // splits for i in range(splits + 1)]  # The reference's split.
    scores = []
    for part in (probs[a:b] for a, b in zip(bounds[:-1], bounds[1:])):
        p_y = np.mean(part, axis=0, keepdims=True)
        kl = np.sum(scipy.special.rel_entr(part, p_y), axis=1)  # 0 log 0 = 0, not NaN.
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


class API:
    def __init__(self, num_images, image_shape, image_dtype, minibatch_size):
        self.inception = InceptionNet(image_shape)
        self.probs = []

    def get_metric_names(self):
        return ['IS_mean', 'IS_std']

    def get_metric_formatting(self):
        return ['%-10.4f', '%-10.4f']

    def begin(self, mode):
        metrics.check_mode(mode)
        self.probs = []

    def feed(self, mode, minibatch):
        self.probs.append(self.inception.run(minibatch, self.inception.softmax))

    def end(self, mode):
        probs = np.concatenate(self.probs)
        self.probs = []
        return list(inception_score(probs))
