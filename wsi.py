"""Whole-slide images: finding slides, slide labels, tissue masks and their cache, inspection,
annotated regions, reading patches, and the demo-slide maker. No TensorFlow here; the sampler
that reads random tissue patches in reader processes is patch_sampler.py.
"""

import bisect
import collections
import contextlib
import csv
import ctypes
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import sys
import threading
import uuid

import cv2
import numpy as np
import openslide
import openslide.lowlevel
import tifffile

import worker_pool

MASK_MAX_SIZE = 2000          # long side of the thumbnail a tissue mask is computed on
MASK_BLUR_SIGMA = 2.0         # thumbnail pixels
MASK_ERODE_SIZE = 5           # thumbnail pixels; keeps patch centres off the tissue edge
MIN_TISSUE_CONTRAST = 20      # grey levels between background and tissue, else Otsu split noise
MIN_TISSUE_SATURATION_GAP = 20
MASK_ALGORITHM_VERSION = 1    # part of the cache key: bump when the mask recipe changes

MAX_CONSECUTIVE_FAILURES = 5  # failed reads in a row before a slide is dropped
MAX_ATTEMPTS_PER_PATCH = 50
BLANK_PEAK_TO_PEAK = 10       # a read region this flat is a failed read, not tissue
BLANK_CHECK_SAMPLES = 32      # per side: the blank check looks at this grid of a read region
MAX_PROBLEM_DETAILS_PER_TICK = 1000   # lines kept for read-problems.txt between two tick reports
STAIN_FIT_PATCHES = 16        # per slide, to fit its stain normalisation
STAIN_FIT_SIZE = 256          # patch side those are read at (the LOD-0 field of view)
MPP_PLAUSIBLE = (0.05, 10.0)  # um/px microscopes produce; a value outside is a unit mix-up, not a scale
MIN_FIELD_OF_VIEW = 16        # level-0 px per patch side: 4 per pixel of the coarsest (4x4) patch


class NoUsableSlidesError(ValueError):
    pass


class BlankRegionError(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Finding slides, labels.

def find_slides(slide_dir, wsi_ext='.svs', recursive=False):
    """Sorted paths of files in slide_dir whose extension is wsi_ext (str or list, any case)."""
    if not os.path.isdir(slide_dir):
        raise NoUsableSlidesError(f'Slide folder does not exist: {slide_dir}')
    exts = [wsi_ext] if isinstance(wsi_ext, str) else list(wsi_ext)
    exts = tuple(e.lower() if e.startswith('.') else '.' + e.lower() for e in exts)
    paths = []
    for root, _dirs, files in os.walk(slide_dir):
        paths += [os.path.join(root, f) for f in files if f.lower().endswith(exts)]
        if not recursive:
            break
    return collapse_dicom_series(sorted(paths))


def is_dicom_file(path):
    """Whether a file carries DICOM's marker ('DICM' after the 128-byte preamble)."""
    try:
        with open(path, 'rb') as f:
            f.seek(128)
            return f.read(4) == b'DICM'
    except OSError:
        return False


def dicom_series_uid(path):
    """The SeriesInstanceUID of a DICOM file (its header only), or None when it has none or does not parse."""
    import pydicom
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=['SeriesInstanceUID'])
    except (pydicom.errors.InvalidDicomError, OSError, ValueError):
        return None
    return str(header.get('SeriesInstanceUID', '')) or None


def collapse_dicom_series(paths):
    """paths with the files of one DICOM WSI (one series in one folder: OpenSlide opens the whole
    slide from any of them) reduced to the first; other files as they are."""
    seen, kept = set(), []
    for path in paths:
        series = dicom_series_uid(path) if is_dicom_file(path) else None
        key = (os.path.dirname(path), series)
        if series is None or key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def slide_name(path):
    """The name labels and region files give a slide: its file name, or for a DICOM WSI its
    folder's name when that folder holds this series only, else its SeriesInstanceUID."""
    series = dicom_series_uid(path) if is_dicom_file(path) else None
    if series is None:
        return os.path.basename(path)
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.basename(folder) if _series_in_folder(folder) == {series} else series


def _series_in_folder(folder):
    """The SeriesInstanceUIDs of the DICOM files in a folder, remembered per folder state."""
    return _series_in_folder_state(folder, os.stat(folder).st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _series_in_folder_state(folder, _mtime_ns):
    paths = [os.path.join(folder, name) for name in os.listdir(folder)]
    return {dicom_series_uid(p) for p in paths if os.path.isfile(p) and is_dicom_file(p)}


def guess_dataset_class(folder, wsi_ext='.svs', recursive=False):
    """The dataset class for a config line without class_name (the WSI-ProGAN fork's): TFRecords
    when the folder holds *.tfrecords files, whole-slide images when it holds slides and no TFRecords."""
    if not os.path.isdir(folder):
        raise NoUsableSlidesError(f'Dataset folder does not exist: {os.path.abspath(folder)}')
    if any(name.endswith('.tfrecords') for name in os.listdir(folder)):
        return 'dataset.TFRecordDataset'
    if find_slides(folder, wsi_ext, recursive):
        return 'dataset.WSIDataset'
    raise NoUsableSlidesError(
        f'Dataset folder {os.path.abspath(folder)} holds neither *.tfrecords files (make them with dataset_tool.py) '
        f'nor slides with extension {wsi_ext} (set dataset.wsi_ext to your slides\' extension)')


def slide_classes(slide_paths, slide_dir, label_file):
    """Class index per slide (-1 = no label) and the class names, from a CSV (see assign_classes)
    or the WSI-ProGAN fork's .npy (see read_label_npy)."""
    if label_file.lower().endswith('.npy'):
        return read_label_npy(label_file, slide_paths)
    return assign_classes(slide_paths, slide_dir, read_label_csv(label_file))


def read_label_npy(label_file, slide_paths):
    """The fork's labels: one row per slide, the slides sorted by file name; a row is a one-hot
    vector (2-D array) or a class index (1-D integer array). Classes are named '0', '1', ..."""
    labels = np.load(label_file, allow_pickle=False)
    if labels.ndim == 2 and labels.size and np.all((labels == 0) | (labels == 1)) and np.all(labels.sum(axis=1) == 1):
        classes, num_classes = labels.argmax(axis=1), labels.shape[1]
    elif labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) and labels.size and labels.min() >= 0:
        classes, num_classes = labels, int(labels.max()) + 1
    else:
        raise ValueError(f'{label_file}: a .npy label file holds one-hot rows or non-negative class indices, one per '
                         f'slide; got an array of shape {labels.shape} and dtype {labels.dtype}')
    if len(classes) != len(slide_paths):
        raise ValueError(f'{label_file} has {len(classes)} rows but there are {len(slide_paths)} slides: it needs one '
                         f'row per slide, in the order of their sorted file names')
    by_name = sorted(range(len(slide_paths)), key=lambda i: (os.path.basename(slide_paths[i]), slide_paths[i]))
    indices = np.empty(len(slide_paths), np.int64)
    indices[by_name] = classes
    return indices, [str(k) for k in range(num_classes)]


SLIDE_COLUMNS = ('slide_id', 'slide', 'filename', 'file')     # header names a label sheet's slide column may have
CLASS_COLUMNS = ('label', 'class', 'target')


@dataclasses.dataclass
class LabelSheet:
    """(slide name, class) rows of a label CSV, and how the slide name was found (for messages)."""
    path: str
    rows: list
    slide_column: str
    header_read: bool       # False: a first row naming no slide is taken for a header and skipped


def read_label_csv(label_file):
    """The rows of a label CSV. With a header naming a slide column (SLIDE_COLUMNS) and a class
    column (CLASS_COLUMNS), those two are read and others (CLAM's case_id, a pandas index) are
    ignored; otherwise column 0 is the slide and column 1 the class, and a header row of other
    names is skipped later because it names no slide."""
    try:
        with open(label_file, newline='', encoding='utf-8-sig') as f:
            rows = [r for r in csv.reader(f) if r and any(field.strip() for field in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f'{label_file}: not a UTF-8 CSV of slide names and classes ({e})') from None
    header = [name.strip().lower() for name in rows[0]] if rows else []
    slide_at, class_at = _column_of(header, SLIDE_COLUMNS), _column_of(header, CLASS_COLUMNS)
    if (slide_at is None) != (class_at is None):
        missing = 'slide' if slide_at is None else 'class'
        names = SLIDE_COLUMNS if slide_at is None else CLASS_COLUMNS
        raise ValueError(f'{label_file}: its header {rows[0]} has no {missing} column; name it one of {", ".join(names)}')
    if slide_at is None:
        slide_at, class_at, described, header_read = 0, 1, 'column 0 (no slide_id/label header)', False
    else:
        rows, described, header_read = rows[1:], f'column {slide_at} ({header[slide_at]!r})', True
    short = [r for r in rows if len(r) <= max(slide_at, class_at)]
    if short:
        raise ValueError(f'{label_file}: every row needs a slide name and a class, got {short[0]}')
    return LabelSheet(label_file, [(r[slide_at].strip(), r[class_at].strip()) for r in rows], described, header_read)


def _column_of(header, names):
    """Index of the first of `names` in a lower-cased header row, or None."""
    return next((header.index(name) for name in names if name in header), None)


def assign_classes(slide_paths, slide_dir, sheet):
    """Class index per slide (-1 = no label) and the sorted class names. A slide is named in
    the CSV by its path relative to slide_dir, its file name, its file name without extension,
    or for a DICOM slide its series name (see slide_name). The first row is a header when it
    names no slide. A sheet naming none of the slides is an error that shows how it was read."""
    keys = {}
    for i, path in enumerate(slide_paths):
        for key in slide_keys(path, slide_dir):
            keys.setdefault(key, i)
    rows = sheet.rows
    if not sheet.header_read and rows and rows[0][0] not in keys:
        rows = rows[1:]
    class_names = sorted({c for _, c in rows})
    class_of = {c: k for k, c in enumerate(class_names)}
    indices = np.full(len(slide_paths), -1, np.int64)
    for name, cls in rows:
        if name in keys:
            indices[keys[name]] = class_of[cls]
    if rows and slide_paths and (indices < 0).all():
        raise ValueError(f'{sheet.path}: names none of the {len(slide_paths)} slides in {slide_dir}. The slide name was '
                         f'read from {sheet.slide_column}, e.g. {rows[0][0]!r} in row {list(rows[0])}; slides here are '
                         f'named like {slide_name(slide_paths[0])!r} (with or without extension)')
    return indices, class_names


def slide_keys(path, slide_dir):
    """The names a label sheet or region file may give a slide."""
    name = os.path.basename(path)
    return (os.path.relpath(path, slide_dir), name, os.path.splitext(name)[0], slide_name(path))


# ----------------------------------------------------------------------------------------------
# Tissue masks and their cache.

def default_mask_cache_dir():
    root = os.environ.get('WSI_PROGAN_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'wsi-progan')
    return os.path.join(root, 'masks')


def mask_cache_path(slide_path, cache_dir):
    """Cache file for a slide's mask, keyed by absolute path, size and mtime so a replaced
    slide gets a new mask."""
    st = os.stat(slide_path)
    key = f'{os.path.abspath(slide_path)}\0{st.st_size}\0{st.st_mtime_ns}\0{MASK_ALGORITHM_VERSION}'
    return os.path.join(cache_dir, hashlib.sha1(key.encode('utf-8', 'surrogateescape')).hexdigest() + '.png')


def compute_tissue_mask(thumbnail_rgb):
    """uint8 0/1 mask: blurred grey thumbnail darker than its Otsu threshold, eroded; all zero
    when the two Otsu classes differ too little in brightness and saturation to be tissue."""
    grey = cv2.cvtColor(thumbnail_rgb, cv2.COLOR_RGB2GRAY)
    grey = cv2.GaussianBlur(grey, (0, 0), MASK_BLUR_SIGMA)
    threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    tissue = grey < threshold
    if not tissue.any() or tissue.all():
        return np.zeros(grey.shape, np.uint8)
    saturation = cv2.cvtColor(thumbnail_rgb, cv2.COLOR_RGB2HSV)[..., 1]
    contrast = grey[~tissue].mean() - grey[tissue].mean()
    saturation_gap = saturation[tissue].mean() - saturation[~tissue].mean()
    if contrast < MIN_TISSUE_CONTRAST and saturation_gap < MIN_TISSUE_SATURATION_GAP:
        return np.zeros(grey.shape, np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (MASK_ERODE_SIZE, MASK_ERODE_SIZE))
    return cv2.erode(tissue.astype(np.uint8), kernel)


@contextlib.contextmanager
def atomic_output(path, replace=True):
    """A binary file to write path's content into, such that path holds either nothing (or its
    old file) or the complete new one, even with writers on several hosts of a shared file
    system. The file is created exclusively under a random name beside path (PIDs and thread
    idents repeat from host to host), synced, and renamed to path when the block ends; it is
    removed when the block raises. replace=False keeps a file another writer put at path first
    and drops this one: on NFS, replacing a file under a reader on another host breaks its reads."""
    tmp = f'{path}.{uuid.uuid4().hex}.tmp'
    f = open(tmp, 'xb')
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())    # so a crash just after the rename cannot leave an empty file
        if replace:
            os.replace(tmp, path)
        else:
            _publish_unless_present(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _publish_unless_present(tmp, path):
    try:
        os.link(tmp, path)          # fails when path exists, atomically, on NFS too
    except FileExistsError:
        pass
    except OSError:                 # a file system without hard links (FAT, some SMB mounts)
        if not os.path.exists(path):
            os.replace(tmp, path)


def write_png(path, image):
    """PNG written through atomic_output (any path encoding)."""
    ok, buf = cv2.imencode('.png', image)
    with atomic_output(path) as f:
        f.write(buf.tobytes())


def read_png(path, flags=cv2.IMREAD_UNCHANGED):
    with open(path, 'rb') as f:
        return cv2.imdecode(np.frombuffer(f.read(), np.uint8), flags)


def read_cached_mask(cache_path):
    """The mask cached at cache_path, or None when there is none or it does not decode: gone
    since it was listed (another node rebuilding it, or a stale NFS handle), empty, or cut
    short (an older version could publish another host's half-written file)."""
    try:
        return read_png(cache_path, cv2.IMREAD_GRAYSCALE)
    except (OSError, cv2.error):    # cv2.error: an empty file
        return None


def slide_thumbnail(handle, max_size, strip_pixels=1 << 24):
    """RGB thumbnail whose long side is max_size, read from the best level in strips of at
    most strip_pixels pixels (OpenSlide's get_thumbnail reads the whole level at once: gigabytes
    for a slide without a pyramid)."""
    width, height = handle.dimensions
    scale = max_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    level = handle.get_best_level_for_downsample(1 / scale)
    level_width, level_height = handle.level_dimensions[level]
    level_downsample = handle.level_downsamples[level]
    rows_per_strip = max(1, strip_pixels // level_width)
    strips = []
    for top in range(0, level_height, rows_per_strip):
        rows = min(rows_per_strip, level_height - top)
        rgb = composite_on_white(np.asarray(handle.read_region((0, round(top * level_downsample)), level, (level_width, rows))))
        strip_height = max(1, round(rows * size[1] / level_height))
        strips.append(cv2.resize(rgb, (size[0], strip_height), interpolation=cv2.INTER_AREA))
    return cv2.resize(np.concatenate(strips), size, interpolation=cv2.INTER_AREA)


def load_or_build_mask(handle, slide_path, cache_dir):
    """(mask, cache warning or None): from the cache when it holds a readable mask, else computed
    and cached."""
    cache_path = mask_cache_path(slide_path, cache_dir)
    mask = read_cached_mask(cache_path)
    if mask is not None:
        return mask, None
    thumbnail = slide_thumbnail(handle, MASK_MAX_SIZE)
    mask = compute_tissue_mask(thumbnail)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        write_png(cache_path, mask)
        return mask, None
    except OSError as e:
        return mask, f'could not cache its mask in {cache_dir} ({e})'


class TissueRuns:
    """The tissue pixels of a mask, kept as runs along its rows: `starts` holds the flat index of
    each run's first pixel, `ends` the count of tissue pixels up to and including the run. A
    draw is uniform over tissue pixels, as a list of every pixel's index would give, at 8 bytes
    a run instead of 8 bytes a pixel (a slide's mask has a few runs per row)."""

    def __init__(self, starts, ends, shape):
        self.starts, self.ends, self.shape = starts, ends, tuple(shape)

    @classmethod
    def from_mask(cls, mask):
        height, width = mask.shape
        if mask.size >= 2 ** 31:
            raise ValueError(f'a {width}x{height} mask is too large to index')
        edges = np.diff(np.pad(mask.astype(bool).view(np.int8), ((0, 0), (1, 1))), axis=1)
        rows, first = np.nonzero(edges == 1)        # row-major order, so runs come sorted
        last = np.nonzero(edges == -1)[1]
        starts = (rows * width + first).astype(np.int32)
        ends = np.cumsum(last - first, dtype=np.int64).astype(np.int32)
        return cls(starts, ends, mask.shape)

    @property
    def count(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def nbytes(self):
        return self.starts.nbytes + self.ends.nbytes

    def pixel(self, k):
        """Flat mask index of the k-th tissue pixel (0 <= k < count), in row-major order."""
        run = bisect.bisect_right(self.ends, k)
        before = int(self.ends[run - 1]) if run else 0
        return int(self.starts[run]) + k - before

    def mask(self):
        flat = np.zeros(self.shape[0] * self.shape[1], np.int8)
        lengths = np.diff(self.ends, prepend=0)
        np.add.at(flat, self.starts, 1)
        ends = self.starts.astype(np.int64) + lengths
        np.add.at(flat, ends[ends < flat.size], -1)
        return np.cumsum(flat, dtype=np.int8).astype(np.uint8).reshape(self.shape)

    def within(self, keep):
        """The runs of the pixels that are tissue here and non-zero in keep (same shape)."""
        return TissueRuns.from_mask(self.mask() & (keep > 0))


def random_centre(tissue, mask_scale, rng):
    """Level-0 (x, y) of a tissue pixel drawn uniformly, jittered within that pixel."""
    y, x = divmod(tissue.pixel(int(rng.integers(tissue.count))), tissue.shape[1])
    return (x + rng.random()) * mask_scale[0], (y + rng.random()) * mask_scale[1]


# ----------------------------------------------------------------------------------------------
# Slide inspection.

@dataclasses.dataclass
class SlideInfo:
    path: str
    problem: str = None             # why the slide is unusable, None if usable
    warning: str = None             # usable, but worth telling
    vendor: str = ''
    mpp: float = None
    level_dimensions: tuple = ()
    level_downsamples: tuple = ()
    tissue_fraction: float = 0.0
    mask_shape: tuple = (0, 0)
    tissue: TissueRuns = None       # the tissue pixels of the mask
    mask_scale: tuple = (1.0, 1.0)  # level-0 pixels per mask pixel (x, y)
    class_index: int = -1
    field_of_view: float = None     # level-0 pixels a patch covers (from MPP when patch size is in um)
    region: object = None           # shapely geometry of the annotated regions sampled, None = all tissue

    @property
    def dimensions(self):
        return self.level_dimensions[0]

    @property
    def tissue_area(self):
        return self.tissue.count * self.mask_scale[0] * self.mask_scale[1]

    def mask(self):
        return self.tissue.mask()

    def random_centre(self, rng):
        return random_centre(self.tissue, self.mask_scale, rng)


def inspect_slide(path, mask_cache_dir=None, min_tissue_fraction=0.01, field_of_view=None, patch_um=None,
                  default_mpp=None):
    """Open a slide, load or build its tissue mask, and say whether it is usable and why not.
    field_of_view: level-0 pixels a patch covers; or patch_um: micrometres it covers, turned into
    level-0 pixels by the slide's MPP (default_mpp when it has none). A smaller slide is unusable."""
    info = SlideInfo(path)
    try:
        handle = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as e:
        info.problem = f'OpenSlide cannot open it ({type(e).__name__}: {e})'
        return info
    try:
        props = handle.properties
        info.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, '')
        info.mpp, info.warning = plausible_mpp(props.get(openslide.PROPERTY_NAME_MPP_X))
        info.level_dimensions = tuple(handle.level_dimensions)
        info.level_downsamples = tuple(handle.level_downsamples)
        info.field_of_view, info.problem = scaled_field_of_view(info.mpp, field_of_view, patch_um, default_mpp)
        width, height = info.dimensions
        if info.problem is None and info.field_of_view is not None and min(width, height) < info.field_of_view:
            info.problem = (f'slide is {width}x{height} px, smaller than the {info.field_of_view:g}-px '
                            f'field of view of a patch at every LOD')
        if info.problem:
            return info
        mask, cache_warning = load_or_build_mask(handle, path, mask_cache_dir or default_mask_cache_dir())
        info.warning = '; '.join(w for w in (info.warning, cache_warning) if w) or None
    except (openslide.OpenSlideError, OSError) as e:
        info.problem = f'reading it failed ({type(e).__name__}: {e})'
        return info
    finally:
        handle.close()
    info.mask_shape = mask.shape
    info.tissue = TissueRuns.from_mask(mask)
    info.tissue_fraction = info.tissue.count / mask.size
    info.mask_scale = (width / mask.shape[1], height / mask.shape[0])
    if info.tissue_fraction == 0:
        info.problem = 'no tissue found (background only)'
    elif info.tissue_fraction < min_tissue_fraction:
        info.problem = f'tissue covers {info.tissue_fraction:.2%} of it, below min_tissue_fraction {min_tissue_fraction:.2%}'
    return info


def plausible_mpp(recorded):
    """(MPP in um/px or None, warning or None) from a slide's recorded MPP property (a string or
    None). A value no microscope produces is treated as missing, with a warning: a generic TIFF
    from a general image tool records its resolution in dpi, and 72 dpi reads as 352.8 um/px."""
    if recorded is None:
        return None, None
    try:
        mpp = float(recorded)
    except ValueError:
        return None, f'its MPP {recorded!r} is not a number; it is treated as having no MPP'
    low, high = MPP_PLAUSIBLE
    if low <= mpp <= high:
        return mpp, None
    return None, (f'its metadata give {mpp:.4g} um/px, outside the {low:g}-{high:g} um/px microscopes produce '
                  f'(likely resolution tags in dpi, as general image tools write them); it is treated as having '
                  f'no MPP, so default_mpp applies')


def scaled_field_of_view(mpp, field_of_view=None, patch_um=None, default_mpp=None):
    """(level-0 pixels a patch covers, problem or None): field_of_view as given, or patch_um
    divided by the slide's MPP (or default_mpp when the slide records none). A field of view
    under MIN_FIELD_OF_VIEW pixels would stretch a few pixels over a whole patch: a problem."""
    if patch_um is not None:
        mpp = mpp or default_mpp
        if not mpp:
            return None, ('its metadata give no microns per pixel (MPP), needed for patch_um: '
                          'set default_mpp, or give downsample instead of patch_um')
        field_of_view = patch_um / mpp
    if field_of_view is not None and field_of_view < MIN_FIELD_OF_VIEW:
        return field_of_view, (f'a patch would cover {field_of_view:.3g} level-0 pixels a side, under the '
                               f'{MIN_FIELD_OF_VIEW} that give each pixel of the coarsest 4x4 patch real detail')
    return field_of_view, None


def inspect_slides(paths, mask_cache_dir=None, min_tissue_fraction=0.01, field_of_view=None,
                   num_workers=None, progress=True, patch_um=None, default_mpp=None, pool=None):
    """inspect_slide over many slides, in worker processes (pool's, or num_workers of their own,
    one per core by default), with a progress bar."""
    job = functools.partial(inspect_slide, mask_cache_dir=mask_cache_dir, min_tissue_fraction=min_tissue_fraction,
                            field_of_view=field_of_view, patch_um=patch_um, default_mpp=default_mpp)
    return worker_pool.map_with_progress(job, list(paths), pool, num_workers, 'Tissue masks', 'slide', progress)


def mixed_magnification_warning(infos, tolerance=0.1):
    """A warning when the slides' MPPs differ by more than `tolerance` (relative), which under
    `downsample` means patches of different physical sizes; else None."""
    mpps = sorted({round(i.mpp, 4) for i in infos if i.mpp})
    if len(mpps) < 2 or mpps[-1] <= mpps[0] * (1 + tolerance):
        return None
    return (f'the slides mix magnifications (MPP {", ".join(f"{m:g}" for m in mpps)} um/px): under downsample '
            f'their patches cover different physical fields of view; give patch_um instead')


# ----------------------------------------------------------------------------------------------
# Annotated regions (QuPath GeoJSON exports).

ROI_EXTENSIONS = ('.geojson', '.json')
REGION_OBJECT_TYPES = ('annotation', '')    # QuPath objectType of regions; '' = no objectType
MAX_REGION_FILE_BYTES = 1 << 30   # a QuPath export with a million cells is a few hundred MB


def roi_path(slide_path, roi_dir):
    """Where a slide's region file is written by default: roi_dir/<name without extension>.geojson."""
    return os.path.join(roi_dir, os.path.splitext(os.path.basename(slide_path))[0] + '.geojson')


def roi_candidates(slide_path, roi_dir):
    """The names a slide's region file may have in roi_dir: QuPath export scripts name it after the
    image with or without its extension ('case 12.geojson', 'case 12.svs.geojson'), as .geojson or
    .json; a DICOM slide also after its series name."""
    name = os.path.basename(slide_path)
    stems = dict.fromkeys([os.path.splitext(name)[0], name, slide_name(slide_path)])
    return [os.path.join(roi_dir, stem + ext) for stem in stems for ext in ROI_EXTENSIONS]


def find_roi_file(slide_path, roi_dir):
    """The slide's region file in roi_dir, or None; two candidates at once are an error."""
    found = [path for path in roi_candidates(slide_path, roi_dir) if os.path.isfile(path)]
    if len(found) > 1:
        raise ValueError(f'{slide_path} has {len(found)} region files: {" and ".join(found)}; keep one')
    return found[0] if found else None


def similar_roi_files(slide_path, roi_dir):
    """Files in roi_dir whose names come close to the slide's (for a 'no file' message)."""
    names = os.listdir(roi_dir) if os.path.isdir(roi_dir) else []
    wanted = os.path.splitext(os.path.basename(slide_path))[0]
    stems = {os.path.splitext(name)[0]: name for name in names}
    return [stems[s] for s in difflib.get_close_matches(wanted, list(stems), n=3, cutoff=0.6)]


def feature_class(feature):
    """A GeoJSON feature's class name as QuPath exports it (properties.classification.name;
    older exports: classification as a string, or properties.name), '' when it has none."""
    props = feature.get('properties') or {}
    classification = props.get('classification')
    if isinstance(classification, dict):
        return str(classification.get('name') or '')
    return str(classification or props.get('name') or '')


def check_roi_labels(labels):
    """roi_labels is None or a collection of class names. A plain string is refused: `name in
    'Tumor'` would also take 'Tum' and unclassified regions ('')."""
    if isinstance(labels, (str, bytes)):
        raise ValueError(f'roi_labels must be a list of class names, got the string {labels!r}: write [{labels!r}]')
    if labels is not None and not all(isinstance(label, str) for label in labels):
        raise ValueError(f'roi_labels must be a list of class names (strings), got {labels!r}')


@dataclasses.dataclass
class RegionFile:
    """What load_regions makes of a region file: the region, and what it skipped or repaired."""
    region: object = None                           # shapely geometry, None when no polygon qualifies
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)   # objectType -> count
    repaired: list = dataclasses.field(default_factory=list)    # 'feature N: why' per repaired geometry

    def notes(self):
        """One line on skipped objects and repaired geometries, or ''."""
        notes = []
        if self.skipped:
            counts = ', '.join(f'{n} {kind}' for kind, n in sorted(self.skipped.items()))
            notes.append(f'skipped {counts} object(s) (roi_detections=True takes them as regions)')
        if self.repaired:
            notes.append(f'repaired invalid geometry of {"; ".join(self.repaired)}')
        return '; '.join(notes)


def read_regions(path, labels=None, detections=False):
    """RegionFile of a GeoJSON FeatureCollection or list of Features: the union (shapely, level-0
    pixels) of its Polygon and MultiPolygon features, only annotation objects unless detections
    (cells, detections, tiles too), only those whose class is in labels when given. Invalid
    polygons are repaired with make_valid and reported; what cannot be read is refused."""
    import shapely.ops
    check_roi_labels(labels)
    features = _read_features(path)
    result, shapes = RegionFile(), []
    for index, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise ValueError(f'{path}: feature {index} is a {type(feature).__name__}, not a GeoJSON Feature object')
        geometry = feature.get('geometry')
        if not isinstance(geometry, (dict, type(None))):
            raise ValueError(f'{path}: feature {index} has a geometry that is a {type(geometry).__name__}, not an object')
        if not geometry or geometry.get('type') not in ('Polygon', 'MultiPolygon'):
            continue
        kind = _object_type(path, index, feature)
        if kind not in REGION_OBJECT_TYPES and not detections:
            result.skipped[kind] += 1
            continue
        if labels is not None and feature_class(feature) not in labels:
            continue
        shapes.append(_polygon_of(path, index, geometry, result.repaired))
    region = shapely.ops.unary_union(shapes) if shapes else None
    result.region = region if region is not None and region.area > 0 else None
    return result


def load_regions(path, labels=None, detections=False):
    """The region of read_regions alone: a shapely geometry, None when no polygon qualifies."""
    return read_regions(path, labels, detections).region


def _read_features(path):
    """The list of features of a GeoJSON file, refused with a message when it is too large, not
    JSON, nested beyond what the parser takes, or not a FeatureCollection / list of Features."""
    size = os.path.getsize(path)
    if size > MAX_REGION_FILE_BYTES:
        raise ValueError(f'{path}: {size / 2**20:.0f} MB, more than the {MAX_REGION_FILE_BYTES / 2**20:.0f} MB a region '
                         f'file may have; export only the annotations (not cells or detections)')
    with open(path, encoding='utf-8') as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f'{path}: not valid GeoJSON ({e}); export annotations from QuPath as GeoJSON') from None
        except RecursionError:
            raise ValueError(f'{path}: nested too deeply to be GeoJSON; export annotations from QuPath as GeoJSON') from None
    if isinstance(data, dict):
        features = data.get('features', [data] if data.get('type') == 'Feature' else None)
    else:
        features = data
    if not isinstance(features, list):
        raise ValueError(f'{path}: expected a GeoJSON FeatureCollection or a list of Features')
    return features


def _object_type(path, index, feature):
    """A feature's QuPath objectType ('annotation', 'cell', 'detection', ...), '' when it has none."""
    props = feature.get('properties') or {}
    if not isinstance(props, dict):
        raise ValueError(f'{path}: feature {index} has properties that are a {type(props).__name__}, not an object')
    kind = props.get('objectType') or feature.get('objectType') or ''
    return str(kind).lower()


def _polygon_of(path, index, geometry, repaired):
    """A valid shapely geometry of a Polygon / MultiPolygon GeoJSON geometry; an invalid one
    (self-intersecting, say) is repaired with make_valid and noted in repaired; unreadable or
    non-finite coordinates are refused naming the file and the feature."""
    import shapely.geometry
    import shapely.validation
    try:
        shape = shapely.geometry.shape(geometry)
        coordinates = shapely.get_coordinates(shape)
    except (ValueError, TypeError, AttributeError, IndexError, RecursionError,
            shapely.errors.ShapelyError) as e:
        raise ValueError(f'{path}: feature {index} has a {geometry.get("type")} that cannot be read ({e})') from None
    if not np.isfinite(coordinates).all():
        raise ValueError(f'{path}: feature {index} has coordinates that are not finite numbers (NaN or infinity)')
    if shape.is_valid:
        return shape
    repaired.append(f'feature {index} ({shapely.validation.explain_validity(shape)})')
    return shapely.validation.make_valid(shape)


def polygons_of(geometry):
    """The polygons in a shapely geometry (Polygon, MultiPolygon or a collection)."""
    if geometry.geom_type == 'Polygon':
        return [geometry]
    return [p for part in getattr(geometry, 'geoms', []) for p in polygons_of(part)]


def rasterise_regions(region, mask_shape, mask_scale):
    """uint8 0/1 mask of the mask pixels lying wholly inside region (holes stay 0): the region is
    shrunk by two pixel diagonals first, so a patch centre jittered within a marked pixel stays
    inside it."""
    raster = np.zeros(mask_shape, np.uint8)
    shrunk = region.buffer(-2 * float(np.hypot(*mask_scale)))   # 2x: rounding and edge pixels
    scale = np.array(mask_scale)
    for polygon in polygons_of(shrunk):
        rings = [polygon.exterior, *polygon.interiors]
        cv2.fillPoly(raster, [np.round(np.asarray(r.coords)[:, :2] / scale - 0.5).astype(np.int32) for r in rings], 1)
    return raster


def restrict_to_regions(info, roi_dir, labels=None, whole_tissue_without_file=False, detections=False):
    """Limit a usable slide's patch centres to its annotated regions (its file in roi_dir, see
    roi_candidates), or say why it is left out."""
    check_roi_labels(labels)
    path = find_roi_file(info.path, roi_dir)
    if path is None:
        if not whole_tissue_without_file:
            close = similar_roi_files(info.path, roi_dir)
            hint = f'; files with similar names there: {", ".join(close)}' if close else ''
            info.problem = (f'no annotation file {roi_path(info.path, roi_dir)} (nor .json, nor named with the slide\'s '
                            f'extension){hint} (roi_missing="tissue" samples its whole tissue instead)')
        return
    regions = read_regions(path, labels, detections)
    notes = regions.notes()
    if notes:
        info.warning = '; '.join(w for w in (info.warning, f'{path}: {notes}') if w)
    wanted = f' of class {", ".join(labels)}' if labels is not None else ''
    if regions.region is None:
        info.problem = f'{path} has no polygon{wanted}' + (f' ({notes})' if notes else '')
        return
    if not regions.region.intersects(shapely_box(info.dimensions)):
        x0, y0, x1, y1 = regions.region.bounds
        info.problem = (f'its regions in {path} ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) lie outside the slide\'s '
                        f'{info.dimensions[0]}x{info.dimensions[1]} level-0 pixels (exported from another image?)')
        return
    info.region = regions.region
    info.tissue = info.tissue.within(rasterise_regions(info.region, info.mask_shape, info.mask_scale))
    if info.tissue.count == 0:
        info.problem = f'its regions{wanted} in {path} hold no tissue'


def shapely_box(dimensions):
    import shapely.geometry
    return shapely.geometry.box(0, 0, *dimensions)


# ----------------------------------------------------------------------------------------------
# Reading patches.

def clamp_top_left(centre, field_of_view, slide_size):
    """Top-left corner of a field_of_view window centred near `centre`, moved inside the slide."""
    return tuple(int(min(max(round(c - field_of_view / 2), 0), size - field_of_view))
                 for c, size in zip(centre, slide_size))


def snap_to_level_grid(top_left, level_downsample, field_of_view, slide_size):
    """Move a level-0 corner by at most half a level pixel onto a whole pixel of the read level:
    OpenSlide resamples a region placed at a fractional level position, which makes a 512-px
    read about 5x slower. (Exact only where the level downsample is an integer.)"""
    snapped = []
    for x, size in zip(top_left, slide_size):
        level_x = round(x / level_downsample)
        if level_x * level_downsample > size - field_of_view:
            level_x = int((size - field_of_view) // level_downsample)
        snapped.append(int(level_x * level_downsample))
    return tuple(snapped)


def slide_geometry(handle):
    """(dimensions, level_downsamples) of an open slide, read once per handle: each access to
    OpenSlide's properties makes fresh ctypes calls, a third of the time of a 32-px patch read
    and a GIL hand-over each between reader threads."""
    geometry = getattr(handle, '_wsi_geometry', None)
    if geometry is None:
        geometry = handle._wsi_geometry = (handle.dimensions, handle.level_downsamples)
    return geometry


def read_patch(handle, centre, field_of_view, size):
    """HWC uint8 RGB patch (contiguous) of size x size covering field_of_view level-0 pixels
    around centre, read from the best pyramid level, composited onto white, resized with
    INTER_AREA."""
    downsample = field_of_view / size
    # Slack for level downsamples like 4.0003 from odd level sizes, which would otherwise
    # push the read to the next finer (4x larger) level.
    level = handle.get_best_level_for_downsample(downsample * 1.01)
    dimensions, level_downsamples = slide_geometry(handle)
    read_size = max(1, round(field_of_view / level_downsamples[level]))
    top_left = clamp_top_left(centre, field_of_view, dimensions)
    top_left = snap_to_level_grid(top_left, level_downsamples[level], field_of_view, dimensions)
    rgb = read_region_rgb(handle, top_left, level, read_size)
    step = max(1, read_size // BLANK_CHECK_SAMPLES)   # subsampled: flat stays flat; a tiny read is looked at whole
    if np.ptp(rgb[::step, ::step]) < BLANK_PEAK_TO_PEAK:
        raise BlankRegionError(f'blank region at {top_left} level {level}')
    if read_size != size:
        interpolation = cv2.INTER_AREA if read_size > size else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, (size, size), interpolation=interpolation)
    return rgb


try:   # openslide_read_region straight into a numpy buffer: see read_region_rgb
    _openslide_read_region = openslide.lowlevel._read_region if sys.byteorder == 'little' else None
except AttributeError:
    _openslide_read_region = None
_read_buffers = threading.local()
# Regions read per path, 'direct' (the ctypes call) or 'public' (OpenSlide.read_region): a
# missing private call falls back silently, so this is how a test or a benchmark sees which ran.
# Unlocked, so exact only when one thread reads.
region_reads = collections.Counter()


def read_region_rgb(handle, top_left, level, read_size):
    """Contiguous RGB uint8 [read_size, read_size, 3] of a region composited onto white.

    Calls openslide_read_region directly into a per-thread numpy buffer of OpenSlide's
    premultiplied ARGB words (BGRA bytes on a little-endian machine) and converts with OpenCV.
    OpenSlide.read_region's PIL image plus np.asarray costs about 1.4 ms more per 512-px
    region, mostly inside Pillow with the GIL held, which serialises reader threads. Falls
    back to the public API for other handle types or openslide-python versions."""
    osr = getattr(handle, '_osr', None)
    if _openslide_read_region is None or osr is None:
        region_reads['public'] += 1
        return np.ascontiguousarray(composite_on_white(
            np.asarray(handle.read_region(top_left, level, (read_size, read_size)))))
    region_reads['direct'] += 1
    words = read_size * read_size
    buffer = getattr(_read_buffers, 'buffer', None)
    if buffer is None or buffer.size < words:
        buffer = _read_buffers.buffer = np.empty(words, np.uint32)
    _openslide_read_region(osr, buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                           top_left[0], top_left[1], level, read_size, read_size)
    bgra = buffer[:words].view(np.uint8).reshape(read_size, read_size, 4)
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    alpha = bgra[..., 3]
    if alpha.min() < 255:   # premultiplied: over white is colour + (255 - alpha)
        cv2.add(rgb, cv2.cvtColor(255 - alpha, cv2.COLOR_GRAY2RGB), dst=rgb)
    return rgb


def composite_on_white(rgba):
    """RGB (a view when opaque, which is the common case: no copy) of straight-alpha RGBA
    (as OpenSlide.read_region gives) over white."""
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return rgba[..., :3]
    a = alpha[..., None].astype(np.float32) / 255
    return (rgba[..., :3] * a + 255 * (1 - a) + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing slides: pyramidal tiled JPEG TIFFs, and the demo slides.

def _jpeg_tiles(rgb, tile, quality):
    """JPEG bytes of each tile, row by row, edge tiles padded with white. cv2 encodes YCbCr
    4:2:0 JPEG; tifffile tags such tiles Photometric=YCbCr with that subsampling, which
    OpenSlide decodes correctly (tagged Photometric=RGB, it shows wrong colours)."""
    height, width = rgb.shape[:2]
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = rgb[y:y + tile, x:x + tile]
            if block.shape[:2] != (tile, tile):
                block = cv2.copyMakeBorder(block, 0, tile - block.shape[0], 0, tile - block.shape[1],
                                           cv2.BORDER_CONSTANT, value=(255, 255, 255))
            ok, buf = cv2.imencode('.jpg', cv2.cvtColor(block, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
            yield buf.tobytes()


def write_pyramidal_tiff(path, rgb, tile=256, aperio=False, mpp=0.25, app_mag=40, level_factor=2,
                         quality=90, min_level_size=None, replace=True):
    """Tiled JPEG pyramid OpenSlide opens: aperio=True writes an Aperio .svs-style description
    (vendor 'aperio', with MPP), otherwise a generic tiled TIFF. Levels shrink by level_factor
    until the long side is <= min_level_size (default: the tile size). Written through
    atomic_output; replace=False keeps a slide already at path."""
    min_level_size = min_level_size or tile
    levels = [np.ascontiguousarray(rgb)]
    while max(levels[-1].shape[:2]) > min_level_size and min(levels[-1].shape[:2]) >= 2 * level_factor:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // level_factor, h // level_factor), interpolation=cv2.INTER_AREA))
    height, width = rgb.shape[:2]
    description = (f'Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) '
                   f'JPEG/RGB Q={quality}|AppMag = {app_mag}|MPP = {mpp}') if aperio else None
    with atomic_output(path, replace) as f, tifffile.TiffWriter(f) as tif:
        for i, level in enumerate(levels):
            tif.write(_jpeg_tiles(level, tile, quality), shape=level.shape, dtype=np.uint8, tile=(tile, tile),
                      compression='jpeg', photometric='rgb', subfiletype=0 if i == 0 else 1,
                      description=description if i == 0 else None, metadata=None)


DEMO_SLIDES = [  # file name, width, height, level factor, number of tissue blobs
    ('demo-aperio-large.svs', 6144, 4096, 4, 4),
    ('demo-aperio-small.svs', 3072, 2048, 2, 2),
    ('demo-generic.tif', 4096, 3072, 2, 3),
]


def demo_tissue_image(width, height, rng, num_blobs=3, background=(242, 239, 244)):
    """Near-white background with smooth random tissue blobs textured from scikit-image's
    immunohistochemistry image (randomly flipped/rotated 512-px tiles)."""
    import skimage.data
    texture = skimage.data.immunohistochemistry()
    tile = texture.shape[0]
    canvas = np.empty((height + tile, width + tile, 3), np.uint8)
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            canvas[y:y + tile, x:x + tile] = np.rot90(texture, rng.integers(4))[:, ::rng.choice([1, -1])]
    texture = (canvas[:height, :width] * np.float32(0.85)).astype(np.uint8)  # pale stain reads as tissue
    alpha = cv2.resize(_blob_field(width // 32, height // 32, rng, num_blobs), (width, height),
                       interpolation=cv2.INTER_CUBIC).clip(0, 1)
    noise = rng.normal(0, 1.5, (height // 4, width // 4, 3)).astype(np.float32)
    plain = (np.float32(background) + cv2.resize(noise, (width, height))).clip(0, 255).astype(np.uint8)
    return cv2.blendLinear(texture, plain, alpha, 1 - alpha)


def _blob_field(width, height, rng, num_blobs):
    """float32 in [0, 1]: a few random ellipses with wobbly edges, soft at the boundary."""
    field = np.zeros((height, width), np.float32)
    for _ in range(num_blobs):
        centre = (int(rng.uniform(0.2, 0.8) * width), int(rng.uniform(0.2, 0.8) * height))
        axes = (int(rng.uniform(0.12, 0.3) * width), int(rng.uniform(0.12, 0.3) * height))
        cv2.ellipse(field, centre, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    wobble = cv2.GaussianBlur(rng.normal(0, 1, field.shape).astype(np.float32), (0, 0), 3) * 6
    field = cv2.GaussianBlur(field, (0, 0), 2) + wobble * 0.3
    return ((field - 0.5) * 4 + 0.5).clip(0, 1)


def create_demo_slides(out_dir, seed=1000, log=print, keep_existing=False, slides=DEMO_SLIDES):
    """Write the demo slides into out_dir; returns their paths. Their images come in turn from one
    generator seeded with seed, so every writer writes the same bytes. keep_existing=True writes
    only the ones missing and never replaces one: for nodes of a multi-node run sharing out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name, width, height, level_factor, num_blobs in slides:
        path = os.path.join(out_dir, name)
        rgb = demo_tissue_image(width, height, rng, num_blobs)    # also when kept: later slides draw after it
        if not (keep_existing and os.path.exists(path)):
            write_pyramidal_tiff(path, rgb, aperio=name.endswith('.svs'), level_factor=level_factor,
                                 replace=not keep_existing)
            log(f'Wrote {path} ({width}x{height})')
        paths.append(path)
    return paths


def demo_slides_wanted(folder, wsi_ext='.svs', recursive=False, slides=DEMO_SLIDES):
    """Whether a dataset with create_demo should write demo slides into folder: it holds no slides
    but demo slides and lacks some of them (none written yet, or another node still writing)."""
    if not os.path.isdir(folder):
        return True
    names = [name for name, *_ in slides]
    if any(os.path.relpath(path, folder) not in names for path in find_slides(folder, wsi_ext, recursive)):
        return False
    return not all(os.path.exists(os.path.join(folder, name)) for name in names)
