"""Helpers without TensorFlow graph code: pickles, images, logging, result directories, the tick line."""

import ast
import collections
import glob
import hashlib
import io
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


def load_pkl(filename, allow_unknown_source=None, trusted_sources=()):
    """Load a network pickle without trusting it: unpickler.RestrictedUnpickler admits only numpy
    arrays, tfutil.Network, config.EasyDict and builtin containers, within a memory budget, and
    networks source embedded in the file that is not one we know runs only when
    allow_unknown_source is true (None: the environment variable WSI_PROGAN_ALLOW_PICKLE_CODE=1
    decides); trusted_sources are fingerprints of sources you reviewed (see legacy.py). For files
    you wrote yourself, pickle.load does the same without the checks on globals and memory."""
    import unpickler
    return unpickler.load_network_pkl(filename, allow_unknown_source, trusted_sources)


def save_pkl(obj, filename):
    """Write atomically; returns the SHA-256 of the bytes written (resume-state.json records it)."""
    data = pkl_bytes(obj)
    atomic_write_bytes(filename, data)
    return hashlib.sha256(data).hexdigest()


def pkl_bytes(obj):
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def atomic_write_bytes(filename, data):
    """Write `data` to a temporary file beside `filename`, sync it and rename it into place: other
    processes, and the disk after a crash, see the old file or the complete new one."""
    partial = '%s%s%d' % (filename, PARTIAL_MARK, os.getpid())
    try:
        with open(partial, 'wb') as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, filename)
        _fsync_dir(os.path.dirname(os.path.abspath(filename)))
    except OSError as error:
        error.filename = filename       # write() and fsync() name no file; the message should.
        raise
    finally:
        if os.path.exists(partial):
            os.remove(partial)


PARTIAL_MARK = '.tmp-'      # A file being written is named <final name>.tmp-<PID of the writer>.


def remove_stale_partial_files(run_dir):
    """Remove the temporary files that writers killed mid-write left in run_dir (a SIGKILL skips
    atomic_write_bytes' cleanup). Stale means the writing process is gone, or the file is older
    than the run's newest complete network pickle (the PID may have been reused since). Returns
    (names removed, bytes freed)."""
    folder = glob.escape(run_dir)
    newest_pkl = max((os.path.getmtime(path) for path in glob.glob(os.path.join(folder, 'network-*.pkl'))), default=None)
    removed, freed = [], 0
    for path in glob.glob(os.path.join(folder, '*' + PARTIAL_MARK + '*')):
        pid = re.search(re.escape(PARTIAL_MARK) + r'(\d+)$', path)
        if pid is None:
            continue
        try:
            stat = os.stat(path)
            if _process_alive(int(pid.group(1))) and (newest_pkl is None or stat.st_mtime >= newest_pkl):
                continue
            os.remove(path)
        except FileNotFoundError:       # Its writer finished (or cleaned up) meanwhile.
            continue
        removed.append(os.path.basename(path))
        freed += stat.st_size
    return removed, freed


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # Alive, but someone else's.
        return True
    return True


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
# Images.


def adjust_dynamic_range(data, drange_in, drange_out):
    """Map data linearly from drange_in to drange_out (numpy arrays and TF tensors alike). The
    factors are float32 so that TF tensors keep their dtype."""
    if drange_in == drange_out:
        return data
    low_in, high_in = np.float32(drange_in[0]), np.float32(drange_in[1])
    low_out, high_out = np.float32(drange_out[0]), np.float32(drange_out[1])
    scale = (high_out - low_out) / (high_in - low_in)
    offset = low_out - low_in * scale
    return data * scale + offset


def create_image_grid(images, grid_size=None):
    """Tile N images (NCHW or NHW) into one (CHW or HW) image, row by row, left to right. Without a
    grid_size the grid is as square as possible; cells without an image stay zero."""
    if images.ndim not in (3, 4):
        raise ValueError('create_image_grid takes NCHW or NHW images, not an array of shape %s' % (images.shape,))
    count = images.shape[0]
    cell_h, cell_w = images.shape[-2:]
    columns, rows = tuple(grid_size) if grid_size is not None else _square_grid(count)
    canvas = np.zeros(list(images.shape[1:-2]) + [rows * cell_h, columns * cell_w], dtype=images.dtype)
    for index, image in enumerate(images[:columns * rows]):
        top, left = (index // columns) * cell_h, (index % columns) * cell_w
        canvas[..., top:top + cell_h, left:left + cell_w] = image
    return canvas


def _square_grid(count):
    columns = max(int(np.ceil(np.sqrt(count))), 1)
    rows = max((count + columns - 1) // columns, 1)
    return columns, rows


def convert_to_pil_image(image, drange=[0, 1]):
    """A CHW (or HW) image in drange as a PIL image; one channel gives a greyscale image."""
    if image.ndim not in (2, 3):
        raise ValueError('convert_to_pil_image takes a CHW or HW image, not an array of shape %s' % (image.shape,))
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else np.transpose(image, [1, 2, 0])    # PIL wants HWC.
    pixels = np.clip(np.rint(adjust_dynamic_range(image, drange, [0, 255])), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels, 'RGB' if pixels.ndim == 3 else 'L')


def save_image(image, filename, drange=[0, 1], quality=95):
    """Save one CHW image; the format follows the file name (JPEG at `quality` for .jpg)."""
    pil_image = convert_to_pil_image(image, drange)
    if '.jpg' in filename:
        pil_image.save(filename, 'JPEG', quality=quality, optimize=True)
    else:
        pil_image.save(filename)


def save_image_grid(images, filename, drange=[0, 1], grid_size=None):
    """Save the images as one grid image, atomically (the format follows the file name)."""
    encoded = io.BytesIO()
    pil_image = convert_to_pil_image(create_image_grid(images, grid_size), drange)
    pil_image.save(encoded, PIL.Image.registered_extensions()[os.path.splitext(filename)[1].lower()])
    atomic_write_bytes(filename, encoded.getvalue())


# ----------------------------------------------------------------------------
# Logging: everything printed also goes to log.txt of the run. Output before the run directory
# exists is kept in memory and written at the top of log.txt once it does.


class OutputLogger:
    def __init__(self):
        self.file = None
        self.buffer = io.StringIO()     # Until set_log_file; then None.

    def set_log_file(self, filename, mode='wt'):
        if self.file is not None:
            raise RuntimeError('The output log already goes to %s' % self.file.name)
        self.file = open(filename, mode, encoding='utf-8')
        if self.buffer is not None:
            self.file.write(self.buffer.getvalue())
            self.buffer = None

    def write(self, data):
        self._to_file(lambda file: (file.write(data), file.flush()))
        if self.buffer is not None:
            self.buffer.write(data)

    def flush(self):
        self._to_file(lambda file: file.flush())

    def _to_file(self, action):
        """Apply action to the log file, if any. When that fails (e.g. a full disk) logging stops
        and the console, which gets the same output, carries on."""
        if self.file is None:
            return
        try:
            action(self.file)
        except OSError as error:
            sys.__stderr__.write('\nWriting %s failed (%s); output from here on is not logged\n' % (
                self.file.name, error.strerror or error))
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class TeeOutputStream:
    """A stream that writes everything to several streams (the console and the OutputLogger)."""

    def __init__(self, child_streams, autoflush=False):
        self.child_streams = child_streams
        self.autoflush = autoflush

    def write(self, data):
        for target in self.child_streams:
            target.write(data)
        if self.autoflush:
            self.flush()

    def flush(self):
        for target in self.child_streams:
            target.flush()

    def isatty(self):
        return False


output_logger = None


def init_output_logging():
    """Start buffering stdout/stderr so that set_output_log_file() can save all of it."""
    global output_logger
    if output_logger is not None:
        return
    output_logger = OutputLogger()
    console_out, console_err = sys.stdout, sys.stderr
    sys.stdout = TeeOutputStream([console_out, output_logger], autoflush=True)
    sys.stderr = TeeOutputStream([console_err, output_logger], autoflush=True)


def set_output_log_file(filename, mode='wt'):
    """Send the logged output (so far and from now on) to `filename`; no-op without init_output_logging."""
    if output_logger is None:
        return
    output_logger.set_log_file(filename, mode)


# ----------------------------------------------------------------------------
# Result directories: results/NNN-desc/.


def create_result_subdir(result_dir, desc):
    """Make the next numbered run directory. Runs starting at once never share a directory nor a
    number (also with different descs): the number is chosen and the directory made under an
    exclusive lock on result_dir, and mkdir refuses an existing name."""
    os.makedirs(result_dir, exist_ok=True)
    with _result_dir_lock(result_dir):
        run_dir = _make_next_run_dir(result_dir, desc)
    set_output_log_file(os.path.join(run_dir, 'log.txt'))
    config_file = getattr(config, '__file__', None)
    if config_file and os.path.isfile(config_file):
        shutil.copyfile(config_file, os.path.join(run_dir, 'config.py'))     # What this run was started with.
    return run_dir


def _make_next_run_dir(result_dir, desc):
    while True:
        number = max(existing_run_ids(result_dir), default=-1) + 1
        run_dir = os.path.join(result_dir, '%03d-%s' % (number, desc))
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:     # Taken by a process that does not hold the lock; try the next number.
            continue


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
    """The numbers of the run directories (NNN-desc) in result_dir."""
    if not os.path.isdir(result_dir):
        return []
    numbers = []
    for name in os.listdir(result_dir):
        prefix = re.match(r'^(\d+)-', name)
        if prefix and os.path.isdir(os.path.join(result_dir, name)):
            numbers.append(int(prefix.group(1)))
    return numbers


def format_time(seconds):
    """A duration as the tick line shows it: '42s', '3m 05s', '2h 03m 05s', '1d 02h 03m'."""
    total = int(np.rint(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if total < 60:
        return '%ds' % total
    if total < 3600:
        return '%dm %02ds' % (minutes, secs)
    if total < 86400:
        return '%dh %02dm %02ds' % (hours, minutes, secs)
    return '%dd %02dh %02dm' % (days, hours, minutes)


def parse_time(text):
    """Inverse of format_time."""
    units = {'d': 86400, 'h': 3600, 'm': 60, 's': 1}
    return float(sum(int(num) * units[unit] for num, unit in re.findall(r'(\d+)([dhms])', text)))


def locate_result_subdir(run_id_or_result_subdir):
    """A run directory from a directory path or a run id (23 or '023'), looked up under
    config.result_dir and its subfolders results/ and networks/."""
    run = run_id_or_result_subdir
    if isinstance(run, str) and os.path.isdir(run):
        return run
    for base in [config.result_dir, os.path.join(config.result_dir, 'results'), os.path.join(config.result_dir, 'networks')]:
        found = _run_dir_in(base, run)
        if found is not None:
            return found
    raise IOError('Cannot locate result subdir for run %r under "%s"; runs there: %s' % (
        run, config.result_dir, ', '.join(list_runs()) or 'none'))


def _run_dir_in(base, run):
    """The directory named `run` in base, or the only NNN-* directory there for a run number."""
    named = os.path.join(base, str(run))
    if os.path.isdir(named):
        return named
    if isinstance(run, int) or str(run).isdigit():
        numbered = [d for d in sorted(glob.glob(os.path.join(base, '%03d-*' % int(run)))) if os.path.isdir(d)]
        if len(numbered) == 1:
            return numbered[0]
    return None


def list_runs(result_dir=None):
    """Names of the NNN-desc entries in result_dir (default config.result_dir), sorted."""
    result_dir = config.result_dir if result_dir is None else result_dir
    if not os.path.isdir(result_dir):
        return []
    return sorted(name for name in os.listdir(result_dir) if re.match(r'^\d+-', name))


def list_network_pkls(run_id_or_result_subdir, include_final=True):
    """The run's snapshots, oldest first (network-final.pkl last if asked for)."""
    run_dir = locate_result_subdir(run_id_or_result_subdir)
    found = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))
    final = os.path.join(run_dir, 'network-final.pkl')
    if include_final and os.path.isfile(final):
        found.append(final)
    return found


def locate_network_pkl(run_id_or_result_subdir_or_network_pkl, snapshot_or_network_pkl=None):
    """A network pickle from a pkl path, or a run plus a snapshot (kimg index, path, or None = latest)."""
    run, snapshot = run_id_or_result_subdir_or_network_pkl, snapshot_or_network_pkl
    for given in [snapshot, run]:
        if isinstance(given, str) and os.path.isfile(given):
            return given
    candidates = list_network_pkls(run)
    if snapshot is None and candidates:
        return candidates[-1]
    for path in candidates:
        if _pkl_number(path) == snapshot:
            return path
    raise IOError('Cannot locate network pkl for run %r, snapshot %r; snapshots there: %s' % (
        run, snapshot, ', '.join(os.path.basename(path) for path in candidates) or 'none'))


def _pkl_number(path):
    """The number a pickle's name ends with (network-snapshot-000140.pkl -> 140), or None."""
    last_part = os.path.splitext(os.path.basename(path))[0].rsplit('-', 1)[-1]
    try:
        return int(last_part)
    except ValueError:
        return None


def get_id_string_for_network_pkl(network_pkl):
    """'<run dir>-<pickle name>' (e.g. '023-demo-network-final'), for naming files made from it."""
    parts = network_pkl.replace('.pkl', '').replace('\\', '/').split('/')
    return '-'.join(parts[-2:])


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


# ----------------------------------------------------------------------------
# The schedule's LOD and minibatch, for train.TrainingSchedule and for the pre-flight checks
# (which count a run's ticks and GPU shares before TensorFlow loads).


def lod_at(kimg, resolution_log2, initial_resolution, stable_kimg, fade_kimg):
    """The LOD after `kimg`: one level less per completed phase, minus the part of the current
    phase's fade already done; never below 0 (full resolution)."""
    phase_kimg = stable_kimg + fade_kimg
    phases_done = int(np.floor(kimg / phase_kimg)) if phase_kimg > 0 else 0
    kimg_into_phase = kimg - phases_done * phase_kimg
    lod = resolution_log2 - np.floor(np.log2(initial_resolution)) - phases_done
    if fade_kimg > 0:
        lod -= max(kimg_into_phase - stable_kimg, 0.0) / fade_kimg
    return max(lod, 0.0)


def minibatch_size(wanted, num_gpus, max_per_gpu):
    """`wanted` rounded down to equal shares per GPU, capped at max_per_gpu per GPU if given."""
    size = wanted - wanted % num_gpus
    return size if max_per_gpu is None else min(size, max_per_gpu * num_gpus)


# ----------------------------------------------------------------------------
# Networks and datasets of earlier runs.


def random_latents(num_latents, G, random_state=None):
    shape = [num_latents] + G.input_shape[1:]
    rnd = random_state if random_state is not None else np.random
    return rnd.randn(*shape).astype(np.float32)


def parse_config_for_previous_run(run_id):
    """The dataset and train blocks a previous run was started with: from its saved config.py, or
    from the config.txt that the original ProGAN and the WSI-ProGAN fork write instead."""
    run_dir = locate_result_subdir(run_id)
    config_file = os.path.join(run_dir, 'config.py')
    if os.path.isfile(config_file):
        namespace = runpy.run_path(config_file)
        return {name: namespace[name] for name in ['dataset', 'train', 'data_dir'] if name in namespace}
    config_txt = os.path.join(run_dir, 'config.txt')
    return _parse_config_txt(config_txt) if os.path.isfile(config_txt) else dict()


def _parse_config_txt(config_txt):
    """dataset and train of a config.txt: a `name = value` line per setting, the dicts printed as
    Python literals, so they are read without running anything."""
    parsed = {}
    with open(config_txt, 'rt', encoding='utf-8') as file:
        for line in file:
            name, equals, value = line.partition(' = ')
            if equals and name in ('dataset', 'train'):
                try:
                    parsed[name] = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    raise ValueError('%s: the %s line is not a Python dict literal: %s'
                                     % (config_txt, name, value.strip())) from None
    return parsed


def load_dataset_for_result_subdir(result_subdir):
    """(dataset, mirror_augment) as the run at result_subdir trained with, TFRecords read in file
    order (shuffle_mb=0) as the original reads its reals for the metrics; slides ignore it."""
    import dataset
    cfg = parse_config_for_previous_run(result_subdir)
    if 'dataset' not in cfg:
        raise IOError('No dataset line in a config.py or config.txt of "%s": the run does not say what it trained on'
                      % result_subdir)
    dataset_kwargs = dict(cfg['dataset'], verbose=True)
    if not (dataset_kwargs.get('class_name') or '').endswith('SyntheticDataset'):
        dataset_kwargs['shuffle_mb'] = 0
    mirror_augment = cfg.get('train', {}).get('mirror_augment', False)
    data_dir = cfg.get('data_dir', config.data_dir)
    return dataset.load_dataset(data_dir=data_dir, **dataset_kwargs), mirror_augment
