"""Frechet Inception Distance (Heusel et al. 2017) on the pool_3 features of the standard
Inception graph, as computed by the reference TTUR code."""
import numpy as np
import scipy.linalg

import metrics
from tf_compat import tf


class InceptionNet:
    """The 2015-12-05 Inception classification graph in its own graph and session, fed
    NCHW uint8 RGB images of any size (the graph resizes them to 299x299 itself, right after
    `ExpandDims`)."""

    def __init__(self, image_shape, max_batch=50):
        self.max_batch = max_batch  # Inception activations of large batches need many GB.
        self.graph = tf.Graph()
        with self.graph.as_default():
            with open(metrics.find_inception_graph(), 'rb') as f:
                graph_def = tf.GraphDef.FromString(f.read())
            # The graph's own input is one JPEG; a batched placeholder replaces the output
            # of its `ExpandDims` (a graph's input shape cannot be patched after import).
            self.images = tf.placeholder(tf.float32, [None, image_shape[1], image_shape[2], 3])
            tf.import_graph_def(graph_def, input_map={'ExpandDims:0': self.images}, name='')
            pool3 = self.graph.get_tensor_by_name('pool_3:0')
            self.features = tf.reshape(pool3, [-1, pool3.shape[-1]])
            # As in the reference Inception Score code (openai/improved-gan): logits from
            # pool_3 and the softmax weights, without the bias, so scores stay comparable
            # with published ones. `pool_3/_reshape` in the graph is fixed to batch 1.
            weights = self.graph.get_operation_by_name('softmax/logits/MatMul').inputs[1]
            self.softmax = tf.nn.softmax(tf.matmul(self.features, weights))
        self.sess = tf.Session(graph=self.graph)

    def run(self, minibatch, output):
        """Evaluates `output` (`self.features` or `self.softmax`) for NCHW uint8 images."""
        images = np.asarray(minibatch).transpose(0, 2, 3, 1)
        return np.concatenate([
            self.sess.run(output, {self.images: images[i: i + self.max_batch]})
            for i in range(0, len(images), self.max_batch)])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64."""
    mu1, mu2 = np.float64(mu1), np.float64(mu2)
    sigma1, sigma2 = np.float64(sigma1), np.float64(sigma2)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than features): regularise as TTUR does.
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; large ones mean the statistics are broken.
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError('FID: sqrtm(sigma1 @ sigma2) has an imaginary component of %g'
                             % max_imag)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class API:
    def __init__(self, num_images, image_shape, image_dtype, minibatch_size):
        self.inception = InceptionNet(image_shape)
        self.activations = []
        self.mu_real = self.sigma_real = None

    def get_metric_names(self):
        return ['FID']

    def get_metric_formatting(self):
        return ['%-10.4f']

    def begin(self, mode):
        metrics.check_mode(mode)
        self.activations = []

    def feed(self, mode, minibatch):
        self.activations.append(self.inception.run(minibatch, self.inception.features))

    def end(self, mode):
        act = np.concatenate(self.activations).astype(np.float64)
        self.activations = []
        mu, sigma = np.mean(act, axis=0), np.cov(act, rowvar=False)
        if mode in ['warmup', 'reals']:
            self.mu_real, self.sigma_real = mu, sigma
        return [frechet_distance(mu, sigma, self.mu_real, self.sigma_real)]
