"""Checks of a training setup that run before any TensorFlow graph is built, so that a mistake in
config.py fails in seconds with a message that says what to fix (not after an hour of graph
building). `validate_training_setup()` raises ConfigError, whose message names the problem."""

import os
import runpy
import shutil
import sys
import tempfile

import numpy as np

import config
import misc


class ConfigError(Exception):
    """A training setup that cannot work; the message says what to change in config.py."""


SNAPSHOTS_OF_DISK_SPACE = 3     # Free space wanted: this many snapshots plus their optimizer state.


def load_config_file(path):
    """Replace the contents of the `config` module (which every module shares) with another file's."""
    namespace = runpy.run_path(path)
    for name in [n for n in vars(config) if not n.startswith('__')]:
        delattr(config, name)
    for name, value in namespace.items():
        if not name.startswith('__'):
            setattr(config, name, value)
    config.__file__ = os.path.abspath(path)


def preflight(argv):
    """`python train.py [config]` calls this before TensorFlow is imported (which alone can take
    10+ s on a busy machine): a training config with a mistake fails within a second or two."""
    try:
        if len(argv) == 2:
            load_config_file(argv[1])
        if train_func(config) != 'train.train_progressive_gan':
            return      # Utility scripts check their own arguments.
        train = dict(config.train)
        os.environ.update(getattr(config, 'env', {}))
        validate_training_setup(train.get('resume_run_id'), train.get('resume_snapshot'), gpu_counter=count_gpus_without_tf)
    except ConfigError as error:
        sys.exit('Configuration error: %s' % error)


def train_func(cfg):
    """The name of the function config.train asks train.py to run."""
    train = getattr(cfg, 'train', None)
    func = train.get('func') if isinstance(train, dict) else None
    if not func:
        raise ConfigError("config.train does not say what to run: add func='train.train_progressive_gan' to "
                          "train = EasyDict(...) in config.py to train, or the name of a utility script, "
                          "e.g. func='util_scripts.generate_fake_images'")
    return func


def count_gpus_without_tf():
    """NVIDIA GPUs the driver lists, limited by CUDA_VISIBLE_DEVICES; 0 without a driver."""
    try:
        count = len(os.listdir('/proc/driver/nvidia/gpus'))
    except OSError:
        return 0
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    if visible is not None:
        entries = []
        for entry in visible.split(','):
            if not entry.strip() or entry.strip().startswith('-'):
                break
            entries.append(entry)
        count = min(count, len(entries))
    return count


def count_gpus_tf():
    import tfutil
    return tfutil.num_gpus_available()


def validate_training_setup(resume_run_id=None, resume_snapshot=None, cfg=None, gpu_counter=count_gpus_tf):
    """Every check below, cheapest first; raises ConfigError on the first problem found."""
    cfg = cfg if cfg is not None else config
    num_gpus = getattr(cfg, 'num_gpus', 1)
    dataset_kwargs = dict(getattr(cfg, 'dataset', {}))
    sched_kwargs = dict(getattr(cfg, 'sched', {}))
    check_resolution(dataset_kwargs)
    check_minibatch_sizes(sched_kwargs, num_gpus)
    check_gpus(num_gpus, gpu_counter())
    check_resume(resume_run_id, resume_snapshot)
    check_result_dir(cfg.result_dir)
    check_dataset(dataset_kwargs, getattr(cfg, 'data_dir', None))
    if dataset_kwargs.get('resolution') is None and 'tfrecord_dir' in dataset_kwargs:
        dataset_kwargs['resolution'] = tfrecord_resolution(os.path.join(getattr(cfg, 'data_dir', None) or '', dataset_kwargs['tfrecord_dir']))
    check_disk_space(cfg.result_dir, dataset_kwargs, dict(getattr(cfg, 'G', {})), dict(getattr(cfg, 'D', {})))


def tfrecord_resolution(folder):
    """The largest resolution of dataset_tool's NAME-rXX.tfrecords files (XX = log2), or None."""
    import re
    found = [int(m.group(1)) for m in (re.search(r'-r(\d+)\.tfrecords$', n) for n in os.listdir(folder)) if m]
    return 2 ** max(found) if found else None


def check_resolution(dataset_kwargs):
    resolution = dataset_kwargs.get('resolution')
    if resolution is None:
        return      # TFRecord datasets take theirs from the files (always a power of two there).
    try:
        ok = int(resolution) == resolution and resolution >= 4 and (int(resolution) & (int(resolution) - 1)) == 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError('dataset.resolution must be a power of two >= 4 (4, 8, 16, ..., 1024), not %r' % (resolution,))


def check_minibatch_sizes(sched_kwargs, num_gpus):
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise ConfigError('num_gpus must be a positive integer, not %r' % (num_gpus,))
    sizes = [('sched.minibatch_base', sched_kwargs.get('minibatch_base', 16))]
    sizes += [('sched.minibatch_dict[%r]' % res, size) for res, size in sorted(sched_kwargs.get('minibatch_dict', {}).items())]
    bad = ['%s = %r' % (name, size) for name, size in sizes if not isinstance(size, (int, np.integer)) or size % num_gpus != 0 or size < num_gpus]
    if bad:
        raise ConfigError('Minibatch sizes must be multiples of num_gpus = %d (each GPU gets an equal share): %s' % (
            num_gpus, ', '.join(bad)))


def check_gpus(num_gpus, available):
    if available >= 1 and num_gpus > available:
        raise ConfigError('The config asks for num_gpus = %d but this machine has %d GPU%s (check the preset line in '
                          'config.py and CUDA_VISIBLE_DEVICES)' % (num_gpus, available, '' if available == 1 else 's'))
    # Without any GPU, num_gpus > 1 runs on virtual CPU devices (train.session_config): allowed.


def check_resume(resume_run_id, resume_snapshot):
    if resume_run_id is None or resume_run_id == 'latest':
        return      # 'latest' with nothing to resume starts from scratch (snapshots.locate_resume_pkl).
    try:
        misc.locate_network_pkl(resume_run_id, resume_snapshot)
    except IOError as error:
        raise ConfigError('resume_run_id=%r, resume_snapshot=%r cannot be found: %s' % (
            resume_run_id, resume_snapshot, error)) from None


def check_result_dir(result_dir):
    try:
        os.makedirs(result_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=result_dir, prefix='.write-test-'):
            pass
    except OSError as error:
        raise ConfigError('Result dir "%s" is not writable (%s); set result_dir in config.py to a folder you can '
                          'write to' % (os.path.abspath(result_dir), error.strerror or error)) from None


def check_dataset(dataset_kwargs, data_dir):
    class_name = dataset_kwargs.get('class_name', 'dataset.TFRecordDataset')
    if class_name.endswith('SyntheticDataset'):
        return
    if 'tfrecord_dir' not in dataset_kwargs:
        raise ConfigError('dataset.tfrecord_dir is missing: name the dataset folder (relative to data_dir)')
    folder = dataset_kwargs['tfrecord_dir']
    if data_dir is not None:
        folder = os.path.join(data_dir, folder)
    if 'class_name' not in dataset_kwargs and os.path.isdir(folder):
        class_name = guessed_dataset_class(folder, dataset_kwargs)
    if class_name.endswith('WSIDataset'):
        import wsi
        wsi_ext = dataset_kwargs.get('wsi_ext', '.svs')
        if dataset_kwargs.get('create_demo'):
            return      # An empty or missing folder gets the demo slides.
        if not os.path.isdir(folder):
            raise ConfigError('Slide folder "%s" does not exist (dataset.tfrecord_dir = %r under data_dir = %r)' % (
                os.path.abspath(folder), dataset_kwargs['tfrecord_dir'], data_dir))
        if not wsi.find_slides(folder, wsi_ext, dataset_kwargs.get('recursive', False)):
            present = sorted({os.path.splitext(name)[1].lower() for name in os.listdir(folder)} - {''})
            raise ConfigError('No slides with extension %s in "%s" (extensions there: %s); set dataset.wsi_ext' % (
                wsi_ext, os.path.abspath(folder), ', '.join(present) or 'no files'))
        return
    if not os.path.isdir(folder):
        raise ConfigError('Dataset folder "%s" does not exist (dataset.tfrecord_dir = %r under data_dir = %r)' % (
            os.path.abspath(folder), dataset_kwargs['tfrecord_dir'], data_dir))
    if not any(name.endswith('.tfrecords') for name in os.listdir(folder)):
        raise ConfigError('No *.tfrecords files in dataset folder "%s"; make them with dataset_tool.py, or use '
                          'class_name="dataset.WSIDataset" for a folder of slides' % os.path.abspath(folder))


def guessed_dataset_class(folder, dataset_kwargs):
    """What load_dataset makes of a dataset line without class_name (the fork's); ConfigError when
    the folder holds neither TFRecords nor slides."""
    import wsi
    try:
        return wsi.guess_dataset_class(folder, dataset_kwargs.get('wsi_ext', '.svs'),
                                       dataset_kwargs.get('recursive', False))
    except wsi.NoUsableSlidesError as error:
        raise ConfigError(str(error)) from None


def estimate_snapshot_bytes(dataset_kwargs, G_kwargs, D_kwargs):
    """Bytes of one network-snapshot pkl (G, D, Gs) plus its optimizer state (two Adam slots per
    trainable), from the feature-map settings, without building the networks. Counts the weights
    of networks.G_paper / D_paper with fused_scale (biases and labels are too few to matter)."""
    resolution = int(dataset_kwargs.get('resolution') or 1024)     # TFRecord: unknown before reading; assume large.
    channels = int(dataset_kwargs.get('num_channels', 3))
    res_log2 = int(np.log2(max(resolution, 4)))

    def nf_func(kwargs):
        base, decay, fmax = kwargs.get('fmap_base', 8192), kwargs.get('fmap_decay', 1.0), kwargs.get('fmap_max', 512)
        return lambda stage: min(int(base / (2.0 ** (stage * decay))), fmax)

    # G: 4x4 Dense latent -> 16 * nf(1) and 3x3 Conv; per doubling a 3x3 Conv0_up nf(r-2) -> nf(r-1)
    # and a 3x3 Conv1; a 1x1 ToRGB per resolution.
    nf = nf_func(G_kwargs)
    latent = G_kwargs.get('latent_size') or nf(0)
    g = latent * nf(1) * 16 + 9 * nf(1) ** 2 + nf(1) * channels
    for res in range(3, res_log2 + 1):
        g += 9 * nf(res - 1) * nf(res - 2) + 9 * nf(res - 1) ** 2 + nf(res - 1) * channels
    # D: a 1x1 FromRGB per resolution; per doubling a 3x3 Conv0 and a 3x3 Conv1_down nf(r-1) -> nf(r-2);
    # at 4x4 a 3x3 Conv over nf(1) + 1 maps (the minibatch-stddev map), Dense0 to nf(0), Dense1 to 1 score.
    nf = nf_func(D_kwargs)
    d = channels * nf(1) + 9 * (nf(1) + 1) * nf(1) + nf(1) * 16 * nf(0) + nf(0)
    for res in range(3, res_log2 + 1):
        d += channels * nf(res - 1) + 9 * nf(res - 1) ** 2 + 9 * nf(res - 1) * nf(res - 2)
    pickled = 2 * g + d         # G, D and Gs.
    adam_slots = 2 * (g + d)    # Two moments per weight of G and D.
    return 4 * (pickled + adam_slots)       # float32.


def check_disk_space(result_dir, dataset_kwargs, G_kwargs, D_kwargs):
    need = SNAPSHOTS_OF_DISK_SPACE * estimate_snapshot_bytes(dataset_kwargs, G_kwargs, D_kwargs)
    free = shutil.disk_usage(result_dir).free
    if free < need:
        raise ConfigError('Not enough free disk space under "%s" for %d network snapshots: %s free, about %s needed '
                          '(%s per snapshot with its optimizer state); free some space or choose another result_dir' % (
                              os.path.abspath(result_dir), SNAPSHOTS_OF_DISK_SPACE, _bytes(free), _bytes(need),
                              _bytes(need // SNAPSHOTS_OF_DISK_SPACE)))


def _bytes(n):
    for unit in ['B', 'KB', 'MB', 'GB', 'TB', 'PB']:
        if n < 1024 or unit == 'PB':
            return '%.1f %s' % (n, unit)
        n /= 1024.0
