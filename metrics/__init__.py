"""Quality metrics for generated images, and where the Inception graph of FID and IS lives.

Every metric module has an `API` class with the shape the original ProGAN code used:
`API(num_images, image_shape, image_dtype, minibatch_size)`, `get_metric_names()`,
`get_metric_formatting()`, `begin(mode)`, `feed(mode, minibatch)`, `end(mode)`, where mode is
'warmup', 'reals' or 'fakes' and minibatches are NCHW uint8 in [0, 255].
"""
import os
import shutil
import tarfile
import tempfile
import urllib.request

INCEPTION_FILE = 'classify_image_graph_def.pb'
INCEPTION_URL = 'https://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz'
INCEPTION_ENV_VAR = 'WSI_PROGAN_INCEPTION_DIR'
INCEPTION_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'wsi-progan', 'inception')
DOWNLOAD_TIMEOUT_SEC = 30

_download_error = None  # Set after a failed download, so a process tries the network only once.


MODES = ('warmup', 'reals', 'fakes')


def check_mode(mode):
    """The modes every metric's begin/feed/end know; another is a caller's mistake."""
    if mode not in MODES:
        raise ValueError('Metric mode must be one of %s, not %r' % (', '.join(MODES), mode))


class InceptionGraphMissing(FileNotFoundError):
    pass


def inception_dirs():
    """Directories searched for the Inception graph, in order: config.inception_dir, the
    environment variable, the user cache."""
    try:
        import config
        config_dir = getattr(config, 'inception_dir', None)
    except ImportError:
        config_dir = None
    dirs = [config_dir, os.environ.get(INCEPTION_ENV_VAR), INCEPTION_CACHE_DIR]
    return [os.path.expanduser(d) for d in dirs if d]


def find_inception_graph():
    """Path of `classify_image_graph_def.pb`; downloads it into the first directory of
    `inception_dirs()` when no directory has it."""
    dirs = inception_dirs()
    for d in dirs:
        path = os.path.join(d, INCEPTION_FILE)
        if os.path.isfile(path):
            return path
    target = os.path.join(dirs[0], INCEPTION_FILE)
    _download_inception_graph(target)
    return target


def _download_inception_graph(target):
    global _download_error
    if _download_error is None:
        try:
            print('Downloading the Inception graph from %s ...' % INCEPTION_URL)
            _download_and_extract(target)
            return
        except Exception as e:  # Offline, proxy, disk: all end in the same advice.
            _download_error = '%s: %s' % (type(e).__name__, e)
    raise InceptionGraphMissing(
        'The Inception graph for FID/IS is missing and could not be downloaded (%s). '
        'Put %s (from %s) at %s, or point config.inception_dir or the environment variable '
        '%s at a directory that holds it.'
        % (_download_error, INCEPTION_FILE, INCEPTION_URL, target, INCEPTION_ENV_VAR))


def _download_and_extract(target):
    # Write to a temporary name and rename, so an interrupted download never leaves a
    # truncated graph behind.
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        tgz = os.path.join(tmp, 'inception.tgz')
        with urllib.request.urlopen(INCEPTION_URL, timeout=DOWNLOAD_TIMEOUT_SEC) as response, \
                open(tgz, 'wb') as f:
            shutil.copyfileobj(response, f)
        with tarfile.open(tgz, 'r:gz') as tar:
            tar.extract(INCEPTION_FILE, tmp, filter='data')
        os.replace(os.path.join(tmp, INCEPTION_FILE), target)
