import threading

import cv2
import numpy as np
import pytest

# ----------------------------------------------------------------------------------------------
# Whole-slide fixtures: small real pyramidal TIFFs written with wsi.write_pyramidal_tiff.

BACKGROUND = (242, 239, 244)


def tissue_texture(height, width, tint=(1.0, 1.0, 1.0)):
    """Darkened scikit-image immunohistochemistry texture, tiled, optionally tinted."""
    import skimage.data
    texture = skimage.data.immunohistochemistry()
    reps = (height // texture.shape[0] + 1, width // texture.shape[1] + 1, 1)
    tiled = np.tile(texture, reps)[:height, :width].astype(np.float32) * 0.8
    return (tiled * np.float32(tint)).clip(0, 255).astype(np.uint8)


def slide_image(width, height, tissue_boxes=(), tint=(1.0, 1.0, 1.0), seed=0):
    """Near-white background with pixel noise and uneven illumination (as scanned glass has),
    textured tissue in each (x0, y0, x1, y1) box."""
    rng = np.random.default_rng(seed)
    illumination = cv2.resize(rng.normal(0, 3, (8, 8)).astype(np.float32), (width, height),
                              interpolation=cv2.INTER_CUBIC)[..., None]
    image = np.float32(BACKGROUND) + illumination + rng.normal(0, 2, (height, width, 3)).astype(np.float32)
    image = image.clip(0, 255).astype(np.uint8)
    for x0, y0, x1, y1 in tissue_boxes:
        image[y0:y1, x0:x1] = tissue_texture(y1 - y0, x1 - x0, tint)
    return image


def write_slide(path, width=2048, height=1536, tissue_boxes=None, tint=(1.0, 1.0, 1.0), seed=0,
                level_factor=2, aperio=None):
    """A tiled JPEG pyramid at `path`; tissue defaults to the central half of the slide."""
    import wsi
    if tissue_boxes is None:
        tissue_boxes = [(width // 4, height // 4, 3 * width // 4, 3 * height // 4)]
    aperio = str(path).lower().endswith('.svs') if aperio is None else aperio
    wsi.write_pyramidal_tiff(str(path), slide_image(width, height, tissue_boxes, tint, seed),
                             aperio=aperio, level_factor=level_factor)
    return str(path)


def corrupt_tiles(path, from_level=0):
    """Overwrite the JPEG header of every tile in pyramid levels (TIFF pages) from_level on."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        offsets = [o for page in tif.pages[from_level:] for o in page.dataoffsets]
    with open(path, 'r+b') as f:
        for offset in offsets:
            f.seek(offset)
            f.write(b'\0' * 16)


def whiten_tiles(path, from_level=0, tile=256):
    """Replace every tile of the levels from_level on with a plain white JPEG (written over the
    start of each tile; libjpeg stops at its end-of-image marker), as a scanner fault would."""
    import tifffile
    ok, white = cv2.imencode('.jpg', np.full((tile, tile, 3), 255, np.uint8))
    with tifffile.TiffFile(path) as tif:
        tiles = [(o, n) for page in tif.pages[from_level:] for o, n in zip(page.dataoffsets, page.databytecounts)]
    assert all(len(white) <= n for _, n in tiles), 'a tile is smaller than the white one'
    with open(path, 'r+b') as f:
        for offset, _ in tiles:
            f.seek(offset)
            f.write(white.tobytes())


def run_with_timeout(function, seconds):
    """function()'s result; fails the test if it takes longer than `seconds` (a hang)."""
    outcome = {}

    def target():
        try:
            outcome['result'] = function()
        except BaseException as e:
            outcome['error'] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f'did not finish within {seconds} s'
    if 'error' in outcome:
        raise outcome['error']
    return outcome['result']


@pytest.fixture
def mask_cache(tmp_path):
    return str(tmp_path / 'mask-cache')


@pytest.fixture
def messages():
    """A list to pass as `log=messages.append`, for asserting on warnings."""
    return []


# ----------------------------------------------------------------------------------------------
# TensorFlow fixtures: every test gets its own graph and default session.

@pytest.fixture
def tf_session():
    import tfutil
    from tf_compat import tf
    with tf.Graph().as_default(), tfutil.create_session().as_default() as session:
        yield session


@pytest.fixture
def tf_session_2cpu():
    """A session with two virtual CPU devices, standing in for two GPUs."""
    import tfutil
    from tf_compat import tf
    with tf.Graph().as_default(), tfutil.create_session({'device_count.CPU': 2}).as_default() as session:
        yield session


@pytest.fixture(scope='module')
def data8(tmp_path_factory):
    """64 noise images of 8x8 as TFRecords, for short training runs in a subprocess."""
    import dataset_tool
    path = str(tmp_path_factory.mktemp('data') / 'noise8')
    rnd = np.random.RandomState(0)
    dataset_tool.write_tfrecords(path, rnd.randint(0, 256, (64, 3, 8, 8)).astype(np.uint8))
    return path
