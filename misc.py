"""Helpers without TensorFlow graph code: pickles, images, logging, result directories."""

import collections
import glob
import hashlib
import io
import json
import os
import pickle
import re
import runpy
import shutil
import sys

import numpy as np
import PIL.Image

import config

# ----------------------------------------------------------------------------
# Pickles. Snapshots are written to a temporary name, flushed to disk and renamed, so a crash
# never leaves a truncated pickle under the final name.


def load_pkl(filename, allow_unknown_source=None):
    """Load a network pickle without trusting it: unpickler.RestrictedUnpickler admits only numpy
    arrays, tfutil.Network, config.EasyDict and builtin containers, and networks source embedded
    in the file runs only when it is not recognised as this project's and allow_unknown_source is
    true (None: the environment variable WSI_PROGAN_ALLOW_PICKLE_CODE=1 decides). For files you
    trust, pickle.load does the same without the checks."""
    import unpickler
    return unpickler.load_network_pkl(filename, allow_unknown_source)


def save_pkl(obj, filename):
    """Write atomically; returns the SHA-256 of the bytes written (resume-state.json records it)."""
    data = pkl_bytes(obj)
    atomic_write_bytes(filename, data)
    return hashlib.sha256(data).hexdigest()


def pkl_bytes(obj):
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def file_sha256(filename):
    digest = hashlib.sha256()
    with open(filename, 'rb') as file:
        for block in iter(lambda: file.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(filename, data):
    tmp_name = '%s.tmp-%d' % (filename, os.getpid())
    try:
        with open(tmp_name, 'wb') as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, filename)
        _fsync_dir(os.path.dirname(os.path.abspath(filename)))
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def _fsync_dir(dirname):
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# Resume state: resume-state.json beside the snapshots names the snapshot it belongs to (with
# the SHA-256 of its bytes), the exact progress (images shown, wall time, tick, LOD), the
# numpy random state, and the .npz holding the optimizer state (Adam slots, loss scaling).
# Its top level describes the newest snapshot and is written just before that pickle; 'previous'
# holds the one before, so the newest pickle on disk always has its entry, even when a kill falls
# between the json and the pickle (snapshot names repeat when ticks are shorter than 1 kimg).
# Older snapshots resume as before: kimg from the name, time from the log.

RESUME_STATE_FILE = 'resume-state.json'


def optimizer_state_name(cur_nimg):
    return 'optimizer-state-%09d.npz' % cur_nimg


def save_npz(filename, arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(filename, buffer.getvalue())


def save_resume_state(result_subdir, state):
    """Write resume-state.json atomically (after its snapshot and optimizer state are on disk)."""
    data = json.dumps(state, indent=1, sort_keys=True).encode('utf-8')
    atomic_write_bytes(os.path.join(result_subdir, RESUME_STATE_FILE), data)


def read_resume_state(result_subdir):
    try:
        with open(os.path.join(result_subdir, RESUME_STATE_FILE), 'rt', encoding='utf-8') as file:
            state = json.load(file)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def resume_state_entries(state):
    """The newest snapshot's entry, then the older ones."""
    if state is None:
        return []
    newest = {k: v for k, v in state.items() if k != 'previous'}
    return [newest] + list(state.get('previous', []))


def load_resume_state(network_pkl):
    """The resume state saved with this very pickle (same name and bytes), or None."""
    entries = resume_state_entries(read_resume_state(os.path.dirname(network_pkl)))
    entries = [e for e in entries if e.get('snapshot') == os.path.basename(network_pkl)]
    if not entries:
        return None
    sha256 = file_sha256(network_pkl)
    for entry in entries:
        if entry.get('snapshot_sha256') == sha256:
            return entry
    return None


def encode_random_state(state):
    kind, keys, pos, has_gauss, cached_gaussian = state
    return [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached_gaussian)]


def decode_random_state(state):
    kind, keys, pos, has_gauss, cached_gaussian = state
    return (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian)


# ----------------------------------------------------------------------------
# Images.


def adjust_dynamic_range(data, drange_in, drange_out):
    """Map data linearly from drange_in to drange_out (numpy arrays and TF tensors alike)."""
    if drange_in != drange_out:
        scale = (np.float32(drange_out[1]) - np.float32(drange_out[0])) / (
            np.float32(drange_in[1]) - np.float32(drange_in[0]))
        bias = np.float32(drange_out[0]) - np.float32(drange_in[0]) * scale
        data = data * scale + bias
    return data


def create_image_grid(images, grid_size=None):
    """Tile NCHW (or NHW) images into one CHW image, row by row."""
    assert images.ndim == 3 or images.ndim == 4
    num, img_w, img_h = images.shape[0], images.shape[-1], images.shape[-2]
    if grid_size is not None:
        grid_w, grid_h = tuple(grid_size)
    else:
        grid_w = max(int(np.ceil(np.sqrt(num))), 1)
        grid_h = max((num - 1) // grid_w + 1, 1)
    grid = np.zeros(list(images.shape[1:-2]) + [grid_h * img_h, grid_w * img_w], dtype=images.dtype)
    for idx in range(min(num, grid_w * grid_h)):
        x = (idx % grid_w) * img_w
        y = (idx // grid_w) * img_h
        grid[..., y:y + img_h, x:x + img_w] = images[idx]
    return grid


def convert_to_pil_image(image, drange=[0, 1]):
    """A CHW (or HW) image in drange as a PIL image."""
    assert image.ndim == 2 or image.ndim == 3
    if image.ndim == 3:
        if image.shape[0] == 1:
            image = image[0]
        else:
            image = image.transpose(1, 2, 0)
    image = adjust_dynamic_range(image, drange, [0, 255])
    image = np.rint(image).clip(0, 255).astype(np.uint8)
    return PIL.Image.fromarray(image, 'RGB' if image.ndim == 3 else 'L')


def save_image(image, filename, drange=[0, 1], quality=95):
    img = convert_to_pil_image(image, drange)
    if '.jpg' in filename:
        img.save(filename, 'JPEG', quality=quality, optimize=True)
    else:
        img.save(filename)


def save_image_grid(images, filename, drange=[0, 1], grid_size=None):
    convert_to_pil_image(create_image_grid(images, grid_size), drange).save(filename)


# ----------------------------------------------------------------------------
# Logging: everything printed also goes to log.txt of the run.


class OutputLogger:
    def __init__(self):
        self.file = None
        self.buffer = io.StringIO()

    def set_log_file(self, filename, mode='wt'):
        assert self.file is None
        self.file = open(filename, mode, encoding='utf-8')
        if self.buffer is not None:
            self.file.write(self.buffer.getvalue())
            self.buffer = None

    def write(self, data):
        if self.file is not None:
            self.file.write(data)
            self.file.flush()
        if self.buffer is not None:
            self.buffer.write(data)

    def flush(self):
        if self.file is not None:
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class TeeOutputStream:
    def __init__(self, child_streams, autoflush=False):
        self.child_streams = child_streams
        self.autoflush = autoflush

    def write(self, data):
        for stream in self.child_streams:
            stream.write(data)
        if self.autoflush:
            self.flush()

    def flush(self):
        for stream in self.child_streams:
            stream.flush()

    def isatty(self):
        return False


output_logger = None


def init_output_logging():
    """Start buffering stdout/stderr so that set_output_log_file() can save all of it."""
    global output_logger
    if output_logger is None:
        output_logger = OutputLogger()
        sys.stdout = TeeOutputStream([sys.stdout, output_logger], autoflush=True)
        sys.stderr = TeeOutputStream([sys.stderr, output_logger], autoflush=True)


def set_output_log_file(filename, mode='wt'):
    if output_logger is not None:
        output_logger.set_log_file(filename, mode)


# ----------------------------------------------------------------------------
# Result directories: results/NNN-desc/.


def create_result_subdir(result_dir, desc):
    """Make the next numbered run directory. Runs starting at once never share a directory nor a
    number (also with different descs): the number is chosen and the directory made under an
    exclusive lock on result_dir, and mkdir refuses an existing name."""
    os.makedirs(result_dir, exist_ok=True)
    with _result_dir_lock(result_dir):
        while True:
            run_id = max(existing_run_ids(result_dir), default=-1) + 1
            result_subdir = os.path.join(result_dir, '%03d-%s' % (run_id, desc))
            try:
                os.mkdir(result_subdir)
                break
            except FileExistsError:
                continue
    set_output_log_file(os.path.join(result_subdir, 'log.txt'))
    config_file = getattr(config, '__file__', None)
    if config_file and os.path.isfile(config_file):
        shutil.copyfile(config_file, os.path.join(result_subdir, 'config.py'))
    return result_subdir


class _result_dir_lock:
    """An exclusive flock on result_dir itself (POSIX; no lock file among the runs). Where that is
    not available, mkdir alone still keeps names apart."""

    def __init__(self, result_dir):
        self.result_dir = result_dir
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
            self.fd = os.open(self.result_dir, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)       # Closing releases the lock.
            self.fd = None


def existing_run_ids(result_dir):
    ids = []
    for name in os.listdir(result_dir) if os.path.isdir(result_dir) else []:
        match = re.match(r'^(\d+)-', name)
        if match and os.path.isdir(os.path.join(result_dir, name)):
            ids.append(int(match.group(1)))
    return ids


def format_time(seconds):
    s = int(np.rint(seconds))
    if s < 60:
        return '%ds' % s
    if s < 60 * 60:
        return '%dm %02ds' % (s // 60, s % 60)
    if s < 24 * 60 * 60:
        return '%dh %02dm %02ds' % (s // (60 * 60), (s // 60) % 60, s % 60)
    return '%dd %02dh %02dm' % (s // (24 * 60 * 60), (s // (60 * 60)) % 24, (s // 60) % 60)


def locate_result_subdir(run_id_or_result_subdir):
    """A run directory from a directory path, a run id (23 or '023'), or 'latest'."""
    if isinstance(run_id_or_result_subdir, str) and os.path.isdir(run_id_or_result_subdir):
        return run_id_or_result_subdir
    if run_id_or_result_subdir == 'latest':
        return _latest_run_with_snapshot()
    searchdirs = ['', 'results', 'networks']
    for searchdir in searchdirs:
        base = config.result_dir if searchdir == '' else os.path.join(config.result_dir, searchdir)
        pattern = os.path.join(base, str(run_id_or_result_subdir))
        if os.path.isdir(pattern):
            return pattern
        if isinstance(run_id_or_result_subdir, int) or str(run_id_or_result_subdir).isdigit():
            prefix = '%03d' % int(run_id_or_result_subdir)
            dirs = sorted(glob.glob(os.path.join(base, prefix + '-*')))
            dirs = [d for d in dirs if os.path.isdir(d)]
            if len(dirs) == 1:
                return dirs[0]
    raise IOError('Cannot locate result subdir for run %r under "%s"; runs there: %s' % (
        run_id_or_result_subdir, config.result_dir, ', '.join(list_runs()) or 'none'))


def list_runs():
    if not os.path.isdir(config.result_dir):
        return []
    return sorted(name for name in os.listdir(config.result_dir) if re.match(r'^\d+-', name))


def _latest_run_with_snapshot():
    for name in sorted(list_runs(), key=lambda n: int(n.split('-')[0]), reverse=True):
        subdir = os.path.join(config.result_dir, name)
        if list_network_pkls(subdir):
            return subdir
    raise NoRunToResume('resume_run_id="latest": no run with a network snapshot under "%s"' % config.result_dir)


class NoRunToResume(IOError):
    """resume_run_id='latest' and no run has a snapshot yet."""


def list_network_pkls(run_id_or_result_subdir, include_final=True):
    """The run's snapshots, oldest first (network-final.pkl last if asked for)."""
    result_subdir = locate_result_subdir(run_id_or_result_subdir)
    pkls = sorted(glob.glob(os.path.join(result_subdir, 'network-snapshot-*.pkl')))
    if include_final:
        final = os.path.join(result_subdir, 'network-final.pkl')
        if os.path.isfile(final):
            pkls.append(final)
    return pkls


def locate_network_pkl(run_id_or_result_subdir_or_network_pkl, snapshot_or_network_pkl=None):
    """A network pickle from a pkl path, or a run plus a snapshot (kimg index, path, or None = latest)."""
    for candidate in [snapshot_or_network_pkl, run_id_or_result_subdir_or_network_pkl]:
        if isinstance(candidate, str) and os.path.isfile(candidate):
            return candidate
    pkls = list_network_pkls(run_id_or_result_subdir_or_network_pkl)
    if len(pkls) >= 1 and snapshot_or_network_pkl is None:
        return pkls[-1]
    for pkl in pkls:
        try:
            name = os.path.splitext(os.path.basename(pkl))[0]
            if int(name.split('-')[-1]) == snapshot_or_network_pkl:
                return pkl
        except ValueError:
            pass
    raise IOError('Cannot locate network pkl for run %r, snapshot %r; snapshots there: %s' % (
        run_id_or_result_subdir_or_network_pkl, snapshot_or_network_pkl,
        ', '.join(os.path.basename(p) for p in pkls) or 'none'))


def snapshot_kimg(network_pkl):
    """The kimg a pickle was saved at: from a snapshot's name (network-snapshot-001657.pkl -> 1657),
    or for network-final.pkl from the last tick of its run's log; None if neither tells."""
    match = re.search(r'network-snapshot-(\d+)\.pkl$', os.path.basename(network_pkl))
    if match:
        return int(match.group(1))
    if os.path.basename(network_pkl) == 'network-final.pkl':
        ticks = read_tick_lines(os.path.dirname(network_pkl))
        return ticks[-1].kimg if ticks else None
    return None


# ----------------------------------------------------------------------------
# The tick line: the one line of progress a run prints per tick. train.py writes it through
# format_tick_line; resuming, the training video and the tests read it back through
# parse_tick_line, so its layout is defined in this one place.

TickLine = collections.namedtuple('TickLine', 'tick kimg lod minibatch total_sec sec_per_tick sec_per_kimg maintenance_sec')

_TICK_FORMAT = ('tick %-5d kimg %-8.1f lod %-5.2f minibatch %-4d time %-12s sec/tick %-7.1f sec/kimg %-7.2f '
                'maintenance %.1f')
_TICK_PATTERN = re.compile(r'^tick\s+(\d+)\s+kimg\s+([\d.]+)\s+lod\s+([\d.]+)\s+minibatch\s+(\d+)\s+'
                           r'time\s+(.+?)\s+sec/tick\s+([\d.]+)\s+sec/kimg\s+([\d.]+)\s+maintenance\s+([\d.]+)')


def format_tick_line(tick):
    """The printed line for a TickLine (times in seconds; total_sec shown as format_time does)."""
    return _TICK_FORMAT % (tick.tick, tick.kimg, tick.lod, tick.minibatch, format_time(tick.total_sec),
                           tick.sec_per_tick, tick.sec_per_kimg, tick.maintenance_sec)


def parse_tick_line(line):
    """The TickLine a printed line holds, or None for any other line. Values are as printed
    (kimg to 0.1, total time to the second)."""
    match = _TICK_PATTERN.match(line)
    if match is None:
        return None
    tick, kimg, lod, minibatch, total, per_tick, per_kimg, maintenance = match.groups()
    return TickLine(int(tick), float(kimg), float(lod), int(minibatch), parse_time(total),
                    float(per_tick), float(per_kimg), float(maintenance))


def read_tick_lines(result_subdir):
    """Every tick of the run's log.txt, oldest first (empty when there is no log)."""
    log_file = os.path.join(result_subdir, 'log.txt')
    if not os.path.isfile(log_file):
        return []
    with open(log_file, 'rt', encoding='utf-8', errors='replace') as file:
        return [tick for tick in map(parse_tick_line, file) if tick is not None]


def get_id_string_for_network_pkl(network_pkl):
    p = network_pkl.replace('.pkl', '').replace('\\', '/').split('/')
    return '-'.join(p[max(len(p) - 2, 0):])


def resume_time_from_log(result_subdir, kimg):
    """Training time in seconds at the last tick up to `kimg` (snapshot names round kimg down)."""
    times = [tick.total_sec for tick in read_tick_lines(result_subdir) if tick.kimg < kimg + 1]
    return times[-1] if times else None


def parse_time(text):
    """Inverse of format_time."""
    units = {'d': 86400, 'h': 3600, 'm': 60, 's': 1}
    return float(sum(int(num) * units[unit] for num, unit in re.findall(r'(\d+)([dhms])', text)))


# ----------------------------------------------------------------------------
# Networks and datasets of earlier runs.


def random_latents(num_latents, G, random_state=None):
    shape = [num_latents] + G.input_shape[1:]
    rnd = random_state if random_state is not None else np.random
    return rnd.randn(*shape).astype(np.float32)


def parse_config_for_previous_run(run_id):
    """The dataset and train blocks a previous run was started with, from its saved config.py."""
    config_file = os.path.join(locate_result_subdir(run_id), 'config.py')
    if not os.path.isfile(config_file):
        return dict()
    namespace = runpy.run_path(config_file)
    return {name: namespace[name] for name in ['dataset', 'train', 'data_dir'] if name in namespace}


def load_dataset_for_result_subdir(result_subdir):
    """(dataset, mirror_augment) as the run at result_subdir trained with."""
    import dataset
    cfg = parse_config_for_previous_run(result_subdir)
    dataset_kwargs = dict(cfg.get('dataset', {}), verbose=True)
    mirror_augment = cfg.get('train', {}).get('mirror_augment', False)
    data_dir = cfg.get('data_dir', config.data_dir)
    return dataset.load_dataset(data_dir=data_dir, **dataset_kwargs), mirror_augment
