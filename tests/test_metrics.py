"""Tests for metrics/: SWD, MS-SSIM, FID and IS (the Inception graph replaced by a small
stand-in graph with the same tensor names)."""
import http.server
import io
import os
import sys
import tarfile
import threading
import types

import cv2
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.signal
import scipy.stats

import metrics
from metrics import frechet_inception_distance as fid
from metrics import inception_score
from metrics import ms_ssim
from metrics import sliced_wasserstein as swd
from tf_compat import tf

# ----------------------------------------------------------------------------------------------
# Test images: two stains (a fine and a coarse texture) in Beer-Lambert optical density.

HEMATOXYLIN = np.float32([0.65, 0.70, 0.29])
EOSIN = np.float32([0.07, 0.99, 0.11])


def stained_images(num, size, seed, stains=(HEMATOXYLIN, EOSIN)):
    """NCHW uint8 images: stains[0] on a fine texture, stains[1] on a coarse one."""
    rng = np.random.RandomState(seed)
    fine = scipy.ndimage.gaussian_filter(rng.randn(num, size, size), [0, 1, 1])
    coarse = scipy.ndimage.gaussian_filter(rng.randn(num, size, size), [0, 4, 4])
    density = (np.maximum(fine * 8, 0)[:, None] * stains[0][:, None, None]
               + np.maximum(coarse * 8 + 0.3, 0)[:, None] * stains[1][:, None, None])
    return np.uint8(np.clip(255 * np.exp(-density), 0, 255))


def run_api(api_class, reals, fakes, minibatch_size=None):
    """The metric values of `fakes` against `reals`, fed in minibatches as evaluate_metrics does."""
    minibatch_size = minibatch_size or len(reals)
    api = api_class(len(reals), list(reals.shape[1:]), np.uint8, minibatch_size)
    for mode, images in [('reals', reals), ('fakes', fakes)]:
        api.begin(mode)
        for begin in range(0, len(images), minibatch_size):
            api.feed(mode, images[begin: begin + minibatch_size])
        values = api.end(mode)
    return values

# ----------------------------------------------------------------------------------------------
# Sliced Wasserstein distance.


def opencv_laplacian_pyramid(image_chw, num_levels):
    """Laplacian pyramid of one CHW image with cv2.pyrDown/pyrUp, finest level first."""
    gauss, levels = image_chw.transpose(1, 2, 0).astype(np.float32), []
    for _ in range(num_levels - 1):
        down = cv2.pyrDown(gauss)
        levels.append(gauss - cv2.pyrUp(down))
        gauss = down
    return [level.transpose(2, 0, 1) for level in levels + [gauss]]


def test_laplacian_pyramid_matches_opencv():
    images = stained_images(2, 32, seed=0)
    levels = swd.laplacian_pyramid(images, 3)
    assert [level.shape for level in levels] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    for n in range(2):
        for ours, expected in zip(levels, opencv_laplacian_pyramid(images[n], 3)):
            np.testing.assert_allclose(ours[n], expected, atol=1e-3)


def test_pyramid_steps_match_opencv_on_odd_shapes():
    images = np.random.RandomState(0).rand(2, 3, 10, 14).astype(np.float32) * 255
    for n in range(2):
        image = images[n].transpose(1, 2, 0)
        np.testing.assert_allclose(swd.pyr_down(images)[n], cv2.pyrDown(image).transpose(2, 0, 1),
                                   atol=1e-3)
        np.testing.assert_allclose(swd.pyr_up(images)[n], cv2.pyrUp(image).transpose(2, 0, 1),
                                   atol=1e-3)


def test_random_descriptors_are_the_neighbourhoods_at_the_drawn_centres():
    images = np.random.RandomState(0).rand(3, 2, 12, 10).astype(np.float32)
    desc = swd.random_descriptors(images, 5, 4, np.random.RandomState(7))
    rng = np.random.RandomState(7)  # The same draws: all centre rows, then all columns.
    ys, xs = rng.randint(2, 10, size=12), rng.randint(2, 8, size=12)
    assert desc.shape == (12, 2, 5, 5)
    for k, (y, x) in enumerate(zip(ys, xs)):
        np.testing.assert_array_equal(desc[k], images[k // 4, :, y - 2: y + 3, x - 2: x + 3])


def test_sliced_wasserstein_is_the_mean_1d_wasserstein_distance_over_random_directions():
    rng = np.random.RandomState(0)
    a = rng.randn(300, 6).astype(np.float32)
    b = (rng.randn(300, 6) * 1.5 + 0.3).astype(np.float32)
    ours = swd.sliced_wasserstein(a, b, 3, 5, np.random.RandomState(1))
    dirs = np.random.RandomState(1).randn(15, 6)  # The same 3 repeats of 5 directions.
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    expected = np.mean([scipy.stats.wasserstein_distance(a @ d, b @ d) for d in dirs])
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


def reference_swd(reals, fakes, seed, num_levels):
    """The paper's SWD written directly: OpenCV's pyramid, a loop over neighbourhoods and
    scipy's 1-D Wasserstein distance per direction, in float64. Draws random numbers in the
    API's order: per level the centre rows then columns of the reals, then of the fakes, then
    per level and repeat 128 directions."""
    rng = np.random.RandomState(seed)

    def descriptors(images):
        pyramids = [opencv_laplacian_pyramid(image, num_levels) for image in images]
        result = []
        for level in map(np.stack, zip(*pyramids)):
            n, _, h, w = level.shape
            ys, xs = rng.randint(3, h - 3, size=n * 128), rng.randint(3, w - 3, size=n * 128)
            d = np.stack([level[k // 128, :, y - 3: y + 4, x - 3: x + 4]
                          for k, (y, x) in enumerate(zip(ys, xs))]).astype(np.float64)
            d = (d - d.mean(axis=(0, 2, 3), keepdims=True)) / d.std(axis=(0, 2, 3), keepdims=True)
            result.append(d.reshape(len(d), -1))
        return result

    real_desc, fake_desc = descriptors(reals), descriptors(fakes)
    dists = []
    for a, b in zip(real_desc, fake_desc):
        dirs = rng.randn(4 * 128, a.shape[1])  # 4 repeats of 128 directions.
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        dists.append(1e3 * np.mean([scipy.stats.wasserstein_distance(a @ d, b @ d) for d in dirs]))
    return dists + [np.mean(dists)]


def test_swd_matches_the_direct_reference():
    reals, fakes = stained_images(6, 32, seed=0), stained_images(6, 32, seed=1)
    api = swd.API(6, [3, 32, 32], np.uint8, 6, random_seed=5)
    assert api.get_metric_names() == ['SWDx1e3_32', 'SWDx1e3_16', 'SWDx1e3_avg']
    api.begin('reals')
    api.feed('reals', reals)
    assert api.end('reals') == [0.0, 0.0, 0.0]
    api.begin('fakes')
    api.feed('fakes', fakes)
    np.testing.assert_allclose(api.end('fakes'), reference_swd(reals, fakes, 5, 2), rtol=1e-3)


def test_swd_of_a_set_against_itself_is_small_and_a_colour_shift_is_not():
    images = stained_images(128, 32, seed=0)
    same = run_api(swd.API, images, images, minibatch_size=32)
    other_sample = run_api(swd.API, images, stained_images(128, 32, seed=1), minibatch_size=32)
    stains_swapped = stained_images(128, 32, seed=0, stains=(EOSIN, HEMATOXYLIN))
    shifted = run_api(swd.API, images, stains_swapped, minibatch_size=32)
    # Only the random choice of neighbourhoods separates a set from itself.
    assert same[-1] < 20
    assert shifted[-1] > 3 * same[-1]
    assert shifted[-1] > 2 * other_sample[-1]

# ----------------------------------------------------------------------------------------------
# MS-SSIM.


def original_window(size, sigma):
    """The 2-D Gaussian on a size x size grid of pixel centres (half-integer offsets when even)."""
    offset = 0.0 if size % 2 else 0.5
    coords = np.arange(-(size // 2), size - size // 2) + offset
    x, y = np.meshgrid(coords, coords)
    g = np.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def reference_msssim(a, b):
    """The original ProGAN's MS-SSIM of one pair of HWC images, written out in float64: at each
    scale SSIM and CS are averaged over valid positions and channels together; the window shrinks
    to the scale (with sigma in proportion) when the scale is under 11 px; 2x2 block means between
    scales; clipped at 0, then weighted."""
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = np.float64(a), np.float64(b)
    ssims, css = [], []
    for scale in range(5):
        if scale:
            x, y = [v.reshape(v.shape[0] // 2, 2, v.shape[1] // 2, 2, -1).mean(axis=(1, 3)) for v in (x, y)]
        size = min(11, x.shape[0], x.shape[1])
        window = original_window(size, 1.5 * size / 11)

        def blur(v):
            return np.stack([scipy.signal.fftconvolve(v[..., c], window, mode='valid') for c in range(v.shape[2])], -1)
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        cs = (2 * cxy + c2) / (vx + vy + c2)
        ssims.append(max(np.mean((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs), 0))
        css.append(max(np.mean(cs), 0))
    return np.prod(np.power(css[:4], weights[:4])) * ssims[4] ** weights[4]


def slide_patch_pairs(slide_path, size, count):
    """count pairs of overlapping patches (shifted by a quarter patch) read by OpenSlide at level 0."""
    import openslide
    rng = np.random.RandomState(size)
    pairs = []
    with openslide.OpenSlide(slide_path) as slide:
        for _ in range(count):
            x, y = rng.randint(300, 1600 - size), rng.randint(300, 1100 - size)
            shift = size // 4
            pair = [np.asarray(slide.read_region((x + dx, y + dy), 0, (size, size)).convert('RGB'))
                    for dx, dy in [(0, 0), (shift, shift // 2)]]
            pairs.append([p.transpose(2, 0, 1) for p in pair])
    return np.array(pairs)


def random_pairs(size, count, seed):
    """Smooth random images, the second of each pair partly the first: values across (0, 1)."""
    rng = np.random.RandomState(seed)
    noise = scipy.ndimage.gaussian_filter(rng.randn(count, 2, 3, size, size), [0, 0, 0, 1.5, 1.5])
    images = np.clip(128 + 600 * noise, 0, 255)
    mix = np.linspace(0.2, 0.9, count)[:, None, None, None]
    images[:, 1] = mix * images[:, 0] + (1 - mix) * images[:, 1]
    return np.uint8(images)


@pytest.fixture(scope='module')
def tissue_slide(tmp_path_factory):
    from conftest import write_slide
    return write_slide(tmp_path_factory.mktemp('msssim') / 'tissue.svs', width=2048, height=1536)


@pytest.mark.parametrize('size', [32, 64, 128, 256])
def test_ms_ssim_matches_the_original_formula_on_slide_and_random_pairs(size, tissue_slide):
    pairs = np.concatenate([slide_patch_pairs(tissue_slide, size, 3), random_pairs(size, 4, seed=size)])
    ours = ms_ssim.MSSSIM([3, size, size])(pairs[:, 0], pairs[:, 1])
    expected = [reference_msssim(a.transpose(1, 2, 0), b.transpose(1, 2, 0)) for a, b in pairs]
    assert np.ptp(expected) > 0.3  # Pairs from alike to unlike: the comparison covers the range.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_ms_ssim_refuses_sizes_it_cannot_halve_four_times():
    with pytest.raises(ValueError, match='multiples of 16, got 24x24'):
        ms_ssim.MSSSIM([3, 24, 24])
    with pytest.raises(ValueError, match='multiples of 16, got 8x8'):
        ms_ssim.MSSSIM([3, 8, 8])


def test_ms_ssim_of_identical_pairs_is_one_and_of_independent_noise_near_zero():
    images = stained_images(8, 64, seed=0)
    api = ms_ssim.API(16, [3, 64, 64], np.uint8, 16)
    api.begin('fakes')
    api.feed('fakes', np.repeat(images, 2, axis=0))  # Pairs (0, 0), (1, 1), ...
    assert api.end('fakes')[0] == pytest.approx(1.0, abs=1e-5)
    noise = np.random.RandomState(0).randint(0, 256, size=[33, 3, 64, 64], dtype=np.uint8)
    api.begin('fakes')
    api.feed('fakes', noise[:17])  # An odd one out is left unpaired.
    api.feed('fakes', noise[17:])
    assert api.num_pairs == 16
    assert 0 <= api.end('fakes')[0] < 0.05

# ----------------------------------------------------------------------------------------------
# Frechet distance and Inception Score formulas.


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # Covariances sharing eigenvectors: the closed form is
    # |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 over their eigenvalues.
    rng = np.random.RandomState(0)
    q, _ = np.linalg.qr(rng.randn(6, 6))
    a, b = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    mu1, mu2 = rng.randn(6), rng.randn(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    distance = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert distance == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_general_pair_matches_the_trace_formula():
    rng = np.random.RandomState(1)
    m1, m2 = rng.randn(5, 5), rng.randn(5, 5)
    s1, s2 = m1 @ m1.T + np.eye(5), m2 @ m2.T + np.eye(5)
    root1 = scipy.linalg.sqrtm(s1).real
    expected = np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(root1 @ s2 @ root1).real)
    assert fid.frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expected)


def test_frechet_distance_of_rank_deficient_statistics_is_finite():
    features = np.random.RandomState(0).randn(5, 20)  # Fewer samples than features.
    sigma = np.cov(features, rowvar=False)
    distance = fid.frechet_distance(features.mean(0), sigma, features.mean(0), sigma)
    assert np.isfinite(distance) and abs(distance) < 1e-3


def test_inception_score_of_confident_uniform_predictions_is_the_number_of_classes():
    probs = np.zeros([100, 5], np.float32)  # Exact zeros, as float32 softmax can give.
    probs[np.arange(100), np.arange(100) % 5] = 1.0
    mean, std = inception_score.inception_score(probs, splits=10)
    assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    blurry = np.full([100, 5], 0.2)
    assert inception_score.inception_score(blurry)[0] == pytest.approx(1.0)

# ----------------------------------------------------------------------------------------------
# FID and IS through a stand-in for the Inception graph.

STANDIN_SIZE, STANDIN_FEATURES, STANDIN_CLASSES = 16, 16, 7


class StandIn:
    """Weights of a small graph with the Inception graph's tensor names, and its forward pass
    in numpy: a per-pixel layer with ReLU, a weighted spatial average (so that an image
    transposed or flipped gives other features), then softmax logits."""

    def __init__(self, seed=0):
        rng = np.random.RandomState(seed)
        self.pixel_weights = rng.randn(3, STANDIN_FEATURES).astype(np.float32)
        self.pixel_bias = rng.randn(STANDIN_FEATURES).astype(np.float32) * 0.1
        self.spatial_weights = rng.rand(STANDIN_SIZE, STANDIN_SIZE, 1).astype(np.float32)
        self.softmax_weights = rng.randn(STANDIN_FEATURES, STANDIN_CLASSES).astype(np.float32) * 3
        self.softmax_bias = rng.randn(STANDIN_CLASSES).astype(np.float32)  # Must be ignored.

    def features(self, nchw):
        pixels = (np.float64(nchw).transpose(0, 2, 3, 1) - 128) / 128
        hidden = np.maximum(pixels @ self.pixel_weights + self.pixel_bias, 0)
        return np.sum(hidden * self.spatial_weights, axis=(1, 2))

    def probabilities(self, nchw):
        logits = self.features(nchw) @ self.softmax_weights
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    def write_graph(self, directory):
        """Saves the graph as `classify_image_graph_def.pb`: one decoded JPEG, `Cast`,
        `ExpandDims`, a resize (to 16x16 here, 299x299 in the real graph), `pool_3` of
        shape [1, 1, 1, F], a `pool_3/_reshape` fixed to batch 1 as in the real graph,
        `softmax/logits/MatMul`, the bias and `softmax`."""
        with tf.Graph().as_default() as graph:
            image = tf.placeholder(tf.uint8, [None, None, 3], name='DecodeJpeg')
            batch = tf.expand_dims(tf.cast(image, tf.float32), 0, name='ExpandDims')
            resized = tf.image.resize_bilinear(batch, [STANDIN_SIZE] * 2, name='ResizeBilinear')
            x = (resized - 128.0) / 128.0
            kernel = tf.constant(self.pixel_weights[None, None])
            x = tf.nn.relu(tf.nn.conv2d(x, kernel, [1, 1, 1, 1], 'VALID') + self.pixel_bias)
            pool3 = tf.reduce_sum(x * self.spatial_weights, axis=[1, 2], keepdims=True,
                                  name='pool_3')
            flat = tf.reshape(pool3, [1, STANDIN_FEATURES], name='pool_3/_reshape')
            logits = tf.matmul(flat, tf.constant(self.softmax_weights),
                               name='softmax/logits/MatMul')
            tf.nn.softmax(logits + self.softmax_bias, name='softmax')
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, metrics.INCEPTION_FILE), 'wb') as f:
            f.write(graph.as_graph_def().SerializeToString())


@pytest.fixture
def inception_dirs(tmp_path, monkeypatch):
    """Empty config, environment and cache directories for the Inception graph, and no
    network: the download URL points at a closed local port."""
    dirs = types.SimpleNamespace(config=tmp_path / 'config', env=tmp_path / 'env',
                                 cache=tmp_path / 'cache')
    monkeypatch.setitem(sys.modules, 'config',
                        types.SimpleNamespace(inception_dir=str(dirs.config)))
    monkeypatch.setenv(metrics.INCEPTION_ENV_VAR, str(dirs.env))
    monkeypatch.setattr(metrics, 'INCEPTION_CACHE_DIR', str(dirs.cache))
    monkeypatch.setattr(metrics, 'INCEPTION_URL', 'http://127.0.0.1:9/inception.tgz')
    monkeypatch.setattr(metrics, '_download_error', None)
    return dirs


def test_the_graph_is_found_in_config_then_environment_then_cache(inception_dirs):
    StandIn().write_graph(inception_dirs.cache)
    assert metrics.find_inception_graph() == str(inception_dirs.cache / metrics.INCEPTION_FILE)
    StandIn().write_graph(inception_dirs.env)
    assert metrics.find_inception_graph() == str(inception_dirs.env / metrics.INCEPTION_FILE)
    StandIn().write_graph(inception_dirs.config)
    assert metrics.find_inception_graph() == str(inception_dirs.config / metrics.INCEPTION_FILE)


def test_missing_graph_offline_gives_one_clear_message(inception_dirs, monkeypatch):
    target = inception_dirs.config / metrics.INCEPTION_FILE
    with pytest.raises(metrics.InceptionGraphMissing) as error:
        fid.API(10, [3, 16, 16], np.uint8, 10)
    message = str(error.value)
    advice = 'Put classify_image_graph_def.pb (from %s) at %s' % (metrics.INCEPTION_URL, target)
    assert advice in message
    assert 'Connection refused' in message and metrics.INCEPTION_ENV_VAR in message
    assert not target.exists()
    # The network is tried once per process: later calls fail at once with the same advice.
    urlopen_calls = []
    monkeypatch.setattr(metrics.urllib.request, 'urlopen',
                        lambda *args, **kwargs: urlopen_calls.append(args))
    with pytest.raises(metrics.InceptionGraphMissing, match='Connection refused'):
        metrics.find_inception_graph()
    assert urlopen_calls == []


def test_the_graph_is_downloaded_once_into_the_first_directory(inception_dirs, tmp_path,
                                                               monkeypatch):
    source = tmp_path / 'source'
    StandIn().write_graph(source)
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode='w:gz') as tar:
        tar.add(source / metrics.INCEPTION_FILE, arcname=metrics.INCEPTION_FILE)
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(tgz.getvalue())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(metrics, 'INCEPTION_URL',
                            'http://127.0.0.1:%d/inception-2015-12-05.tgz' % server.server_port)
        path = metrics.find_inception_graph()
        assert path == str(inception_dirs.config / metrics.INCEPTION_FILE)
        assert metrics.find_inception_graph() == path
    finally:
        server.shutdown()
    assert requests == ['/inception-2015-12-05.tgz']
    assert open(path, 'rb').read() == (source / metrics.INCEPTION_FILE).read_bytes()
    assert os.listdir(inception_dirs.config) == [metrics.INCEPTION_FILE]  # No leftovers.


def test_fid_and_is_run_end_to_end_on_the_standin_graph(inception_dirs):
    standin = StandIn()
    standin.write_graph(inception_dirs.env)
    reals = stained_images(40, 16, seed=0)
    fakes = stained_images(40, 16, seed=1, stains=(EOSIN, HEMATOXYLIN))
    # Minibatches of 20 (two runs of the graph each, with max_batch 12) as evaluate_metrics feeds.
    api = fid.API(40, [3, 16, 16], np.uint8, 20)
    api.inception.max_batch = 12
    assert api.get_metric_names() == ['FID']
    for mode, images in [('reals', reals), ('fakes', fakes)]:
        api.begin(mode)
        api.feed(mode, images[:20])
        api.feed(mode, images[20:])
        value = api.end(mode)
        if mode == 'reals':
            assert value == [pytest.approx(0.0, abs=1e-6)]
    real_features, fake_features = standin.features(reals), standin.features(fakes)
    expected = fid.frechet_distance(real_features.mean(0), np.cov(real_features, rowvar=False),
                                    fake_features.mean(0), np.cov(fake_features, rowvar=False))
    assert expected > 0.1
    assert value[0] == pytest.approx(expected, rel=1e-4)

    scores = run_api(inception_score.API, reals, fakes, minibatch_size=20)
    expected = inception_score.inception_score(standin.probabilities(fakes))
    assert 1.2 < expected[0] < STANDIN_CLASSES
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="one of warmup, reals, fakes, not 'real'"):
        swd.API(16, [3, 32, 32], np.uint8, 16).begin('real')
