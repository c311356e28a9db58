"""Checks of a training setup that run before any TensorFlow graph is built, so that a mistake in
config.py fails in seconds with a message that says what to fix (not after an hour of graph
building). `validate_training_setup()` raises ConfigError, whose message names the problem.

Nothing here imports TensorFlow: function and class names in config.py, and the arguments they
take, are looked up in their modules' source (ast), which works for modules that import it too."""

import ast
import difflib
import importlib.util
import math
import os
import runpy
import shutil
import sys
import tempfile

import numpy as np

import cluster
import config
import misc
import snapshots


class ConfigError(Exception):
    """A training setup that cannot work; the message says what to change in config.py."""


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
        nodes = cluster_nodes()
        if train_func(config) != 'train.train_progressive_gan':
            if nodes > 1:
                raise ConfigError('TF_CONFIG describes %d nodes, but %s runs on one machine: unset TF_CONFIG to run it'
                                  % (nodes, train_func(config)))
            check_utility_run(dict(config.train))
            return      # Utility scripts check their other arguments themselves.
        train = dict(config.train)
        os.environ.update(getattr(config, 'env', {}))
        validate_training_setup(train.get('resume_run_id'), train.get('resume_snapshot'), gpu_counter=count_gpus_without_tf)
    except ConfigError as error:
        sys.exit('Configuration error: %s' % error)
    if finished_run(train.get('resume_run_id'), train.get('total_kimg', _train_default('total_kimg'))):
        sys.exit(0)


def check_utility_run(train_kwargs):
    """A utility script's run_id must name a run (or be a .pkl file): checked here, because the
    script would find out only after TensorFlow has loaded, in a traceback. The WSI-ProGAN fork's
    config.py ships with an active generate_fake_images line naming run 10."""
    run_id = train_kwargs.get('run_id')
    if run_id is None or (isinstance(run_id, str) and os.path.isfile(run_id)):
        return
    try:
        misc.locate_result_subdir(run_id)
    except IOError as error:
        raise ConfigError('train.run_id = %r (for %s) names no run: %s. Comment that line out to train, or name an '
                          'existing run' % (run_id, train_kwargs.get('func'), error)) from None


def finished_run(resume_run_id, total_kimg):
    """With resume_run_id='latest', a restarted job whose work is done: the network-final.pkl that
    already reached total_kimg (after saying so), else None."""
    final = snapshots.finished_latest_run(total_kimg) if resume_run_id == 'latest' else None
    if final is not None:
        print('Training is finished: %s reached total_kimg = %g, so resume_run_id="latest" has nothing to do and no '
              'new run is started. Raise train.total_kimg to train further.' % (final, total_kimg))
    return final


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


def validate_training_setup(resume_run_id=None, resume_snapshot=None, cfg=None, gpu_counter=count_gpus_tf, report=False):
    """Every check below, cheapest first; raises ConfigError on the first problem found. On the
    way, stale temporary files of the run to resume are removed, so that the disk check sees
    their space as free. With report=True the disk check says how much space the run needs."""
    cfg = cfg if cfg is not None else config
    num_gpus = getattr(cfg, 'num_gpus', 1)
    nodes = cluster_nodes()
    dataset_kwargs = dict(getattr(cfg, 'dataset', {}))
    sched_kwargs = dict(getattr(cfg, 'sched', {}))
    train_kwargs = dict(getattr(cfg, 'train', {}))
    check_train_lengths(train_kwargs)
    check_resolution(dataset_kwargs)
    check_downsample(dataset_kwargs)
    check_minibatch_sizes(sched_kwargs, num_gpus, nodes)
    check_tick_lengths(sched_kwargs)
    check_names(cfg)
    check_gpus(num_gpus, gpu_counter())
    check_resume(resume_run_id, resume_snapshot)
    if is_chief():
        check_result_dir(cfg.result_dir)    # The only node that writes there.
    check_dataset(dataset_kwargs, getattr(cfg, 'data_dir', None))
    check_label_file(dataset_kwargs, getattr(cfg, 'data_dir', None))
    if dataset_kwargs.get('resolution') is None and 'tfrecord_dir' in dataset_kwargs:
        dataset_kwargs['resolution'] = tfrecord_resolution(os.path.join(getattr(cfg, 'data_dir', None) or '', dataset_kwargs['tfrecord_dir']))
    if report:
        warn_about_one_image_per_gpu(sched_kwargs, dict(getattr(cfg, 'D', {})), dataset_kwargs.get('resolution'),
                                     num_gpus * nodes)
    if not is_chief():
        return      # Only the chief writes; it also tidies and checks the space.
    remove_stale_partial_files(resume_run_id, resume_snapshot)
    check_disk_space(cfg.result_dir, dataset_kwargs, dict(getattr(cfg, 'G', {})), dict(getattr(cfg, 'D', {})),
                     train_kwargs, sched_kwargs, report)


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


def _positive_number(value):
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return is_number and math.isfinite(value) and value > 0


def _positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def check_train_lengths(train_kwargs):
    """total_kimg, the snapshot intervals and network_snapshot_keep: numbers of the right kind."""
    total_kimg = train_kwargs.get('total_kimg', _train_default('total_kimg'))
    if not _positive_number(total_kimg):
        raise ConfigError('train.total_kimg must be a positive number of thousands of images (e.g. 12000), not %r%s' % (
            total_kimg, ' (a string: remove the quotes)' if isinstance(total_kimg, str) else ''))
    for name in ['image_snapshot_ticks', 'network_snapshot_ticks']:
        if not _positive_int(train_kwargs.get(name, 1)):
            raise ConfigError('train.%s must be a positive whole number of ticks, not %r' % (name, train_kwargs[name]))
    keep = train_kwargs.get('network_snapshot_keep')
    if keep is not None and not _positive_int(keep):
        raise ConfigError('train.network_snapshot_keep must be None (keep every snapshot) or how many of the newest '
                          'to keep (1 or more), not %r' % (keep,))


def check_downsample(dataset_kwargs):
    downsample = dataset_kwargs.get('downsample')
    if downsample is not None and not _positive_number(downsample):
        raise ConfigError('dataset.downsample must be a positive number of slide pixels per patch pixel (1 = full '
                          'magnification, 4 = a quarter of it), not %r' % (downsample,))


def check_tick_lengths(sched_kwargs):
    lengths = [('sched.tick_kimg_base', sched_kwargs.get('tick_kimg_base', 1))]
    lengths += [('sched.tick_kimg_dict[%r]' % res, kimg) for res, kimg in sorted(sched_kwargs.get('tick_kimg_dict', {}).items())]
    bad = ['%s = %r' % (name, kimg) for name, kimg in lengths if not _positive_number(kimg)]
    if bad:
        raise ConfigError('Tick lengths must be positive numbers of kimg: %s' % ', '.join(bad))


def cluster_nodes():
    """How many nodes TF_CONFIG joins into this run (1 without it)."""
    try:
        found = cluster.nodes_from_environment()
    except cluster.ClusterConfigError as error:
        raise ConfigError(str(error)) from None
    return 1 if found is None else len(found[0])


def is_chief():
    found = cluster.nodes_from_environment()
    return found is None or found[1] == 0


def check_minibatch_sizes(sched_kwargs, num_gpus, nodes=1):
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise ConfigError('num_gpus must be a positive integer, not %r' % (num_gpus,))
    devices, device_text = num_gpus * nodes, 'num_gpus = %d' % num_gpus
    if nodes > 1:
        device_text = 'num_gpus x nodes = %d x %d = %d' % (num_gpus, nodes, devices)
    caps = [('sched.max_minibatch_per_gpu[%r]' % res, size) for res, size in sorted(sched_kwargs.get('max_minibatch_per_gpu', {}).items())]
    sizes = [('sched.minibatch_base', sched_kwargs.get('minibatch_base', 16))]
    sizes += [('sched.minibatch_dict[%r]' % res, size) for res, size in sorted(sched_kwargs.get('minibatch_dict', {}).items())]
    not_positive = ['%s = %r' % (name, size) for name, size in sizes + caps if not _positive_int(size)]
    if not_positive:
        raise ConfigError('Minibatch sizes must be positive whole numbers: %s' % ', '.join(not_positive))
    bad = ['%s = %r' % (name, size) for name, size in sizes if not isinstance(size, (int, np.integer)) or size % devices != 0 or size < devices]
    if bad:
        raise ConfigError('Minibatch sizes must be multiples of %s (each GPU gets an equal share): %s' % (
            device_text, ', '.join(bad)))


def warn_about_one_image_per_gpu(sched_kwargs, D_kwargs, resolution, devices):
    """D compares the standard deviation over groups of images within each GPU's share; a share of
    one image gives it nothing to compare (the feature is 0). Legal, but worth a line."""
    if resolution is None or D_kwargs.get('mbstd_group_size', 4) <= 1:
        return
    lonely = []
    for res in (2 ** k for k in range(2, int(np.log2(resolution)) + 1)):
        wanted = sched_kwargs.get('minibatch_dict', {}).get(res, sched_kwargs.get('minibatch_base', 16))
        if misc.minibatch_size(wanted, devices, sched_kwargs.get('max_minibatch_per_gpu', {}).get(res)) == devices:
            lonely.append(res)
    if lonely:
        print('Warning: at resolution %s each of the %d GPUs gets one image per step, so D\'s minibatch-stddev '
              'feature is 0 there; larger minibatches or fewer GPUs keep it' % (', '.join(map(str, lonely)), devices))


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


def dataset_folder(dataset_kwargs, data_dir):
    folder = dataset_kwargs['tfrecord_dir']
    return folder if data_dir is None else os.path.join(data_dir, folder)


def dataset_class_name(dataset_kwargs, data_dir):
    """The dataset class a dataset line makes: its class_name, else what load_dataset picks for the
    folder (the fork's lines), else TFRecordDataset as the original's lines mean."""
    if 'class_name' in dataset_kwargs:
        return dataset_kwargs['class_name']
    if 'tfrecord_dir' in dataset_kwargs and os.path.isdir(dataset_folder(dataset_kwargs, data_dir)):
        return guessed_dataset_class(dataset_folder(dataset_kwargs, data_dir), dataset_kwargs)
    return 'dataset.TFRecordDataset'


def check_dataset(dataset_kwargs, data_dir):
    class_name = dataset_class_name(dataset_kwargs, data_dir)
    if class_name.endswith('SyntheticDataset'):
        return
    if 'tfrecord_dir' not in dataset_kwargs:
        raise ConfigError('dataset.tfrecord_dir is missing: name the dataset folder (relative to data_dir)')
    folder = dataset_folder(dataset_kwargs, data_dir)
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
    """(bytes of one network pkl (G, D, Gs), bytes of its optimizer state (two Adam slots per
    trainable)), from the feature-map settings, without building the networks. Counts the weights
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
    return 4 * pickled, 4 * adam_slots      # float32.


def planned_snapshots(train_kwargs, sched_kwargs, resolution):
    """How many network pickles a run from scratch writes: one every network_snapshot_ticks ticks
    until total_kimg, with ticks as long as the schedule makes them at each resolution, plus
    network-final.pkl."""
    sched = dict(_schedule_defaults(), **sched_kwargs)
    res_log2 = int(np.log2(resolution))
    total_kimg = train_kwargs.get('total_kimg', _train_default('total_kimg'))
    kimg, ticks = 0.0, 0
    while kimg < total_kimg:
        lod = misc.lod_at(kimg, res_log2, sched['lod_initial_resolution'], sched['lod_training_kimg'],
                          sched['lod_transition_kimg'])
        kimg += sched['tick_kimg_dict'].get(2 ** (res_log2 - int(np.floor(lod))), sched['tick_kimg_base'])
        ticks += 1
    return ticks // train_kwargs.get('network_snapshot_ticks', _train_default('network_snapshot_ticks')) + 1


def check_disk_space(result_dir, dataset_kwargs, G_kwargs, D_kwargs, train_kwargs, sched_kwargs, report=False):
    """Free space for every snapshot the run keeps (the newest network_snapshot_keep + the one being
    written, or all of them) and three optimizer-state files (the two resume-state.json names and
    the one being written)."""
    pkl_bytes, optimizer_bytes = estimate_snapshot_bytes(dataset_kwargs, G_kwargs, D_kwargs)
    written = planned_snapshots(train_kwargs, sched_kwargs, int(dataset_kwargs.get('resolution') or 1024))
    keep = train_kwargs.get('network_snapshot_keep')
    kept = written if keep is None else min(written, keep + 1)
    need = kept * pkl_bytes + 3 * optimizer_bytes
    free = shutil.disk_usage(result_dir).free
    plan = ('%d network snapshots over total_kimg = %g, %s kept at once, of about %s per snapshot, plus optimizer state: '
            'about %s in all' % (written, train_kwargs.get('total_kimg', _train_default('total_kimg')),
                                 'all' if keep is None else 'at most %d' % kept, _bytes(pkl_bytes), _bytes(need)))
    if free < need:
        raise ConfigError('Not enough free disk space under "%s": %s free, but the run writes %s. Free some space, '
                          'choose another result_dir, write snapshots less often (train.network_snapshot_ticks) or '
                          'keep only the newest few (train.network_snapshot_keep = N)' % (
                              os.path.abspath(result_dir), _bytes(free), plan))
    if report:
        print('Disk space: %s; %s free under "%s"' % (plan, _bytes(free), os.path.abspath(result_dir)))


def _bytes(n):
    for unit in ['B', 'KB', 'MB', 'GB', 'TB', 'PB']:
        if n < 1024 or unit == 'PB':
            return '%.1f %s' % (n, unit)
        n /= 1024.0


# ----------------------------------------------------------------------------
# Stale temporary files of the run to resume.


def remove_stale_partial_files(resume_run_id, resume_snapshot):
    for run_dir in snapshots.runs_to_tidy(resume_run_id, resume_snapshot):
        removed, freed = misc.remove_stale_partial_files(run_dir)
        if removed:
            print('Removed %d temporary file%s (%s) that killed writes left in "%s": %s' % (
                len(removed), '' if len(removed) == 1 else 's', _bytes(freed), run_dir, ', '.join(sorted(removed))))

# ----------------------------------------------------------------------------
# Names in config.py: every func / class_name must exist, and the settings beside it must be
# arguments it takes. Both are read from the module's source, so TensorFlow need not load.


def check_label_file(dataset_kwargs, data_dir):
    """The datasets look for label_file as given, then inside the dataset folder."""
    label_file = dataset_kwargs.get('label_file')
    if label_file is None or 'tfrecord_dir' not in dataset_kwargs:
        return
    folder = os.path.join(data_dir or '', dataset_kwargs['tfrecord_dir'])
    places = [label_file, os.path.join(folder, label_file)]
    if not any(os.path.isfile(place) for place in places):
        raise ConfigError('dataset.label_file = %r is not a file: looked for "%s" and "%s"; fix the name or remove '
                          'label_file for an unconditional run' % (
                              label_file, os.path.abspath(places[0]), os.path.abspath(places[1])))


def check_names(cfg):
    """Each block of config.py that names a function or class (func=, class_name=) names one
    that exists, and its other settings are arguments of it."""
    for block_name, block in sorted(vars(cfg).items()):
        if not isinstance(block, dict):
            continue
        if block_name == 'dataset' and 'class_name' not in block:
            block = dict(block, class_name=dataset_class_name(block, getattr(cfg, 'data_dir', None)))
        for key in ['func', 'class_name']:
            if isinstance(block.get(key), str):
                definition = find_definition(block[key], '%s.%s' % (block_name, key))
                check_arguments(block_name, block, key, definition)


def find_definition(name, setting):
    """The ast node of the top-level function or class `name` ('module.name') names, or None when
    the module's source cannot tell (not Python source, star imports, a module __getattr__)."""
    module_name, _, obj_name = name.rpartition('.')
    if not module_name:
        raise ConfigError('%s = %r must be "module.name", e.g. "networks.G_paper"' % (setting, name))
    path = _module_file(module_name)
    if path is None:
        nearest = difflib.get_close_matches(module_name, _local_modules(), n=1)
        raise ConfigError('%s = %r: there is no module %s%s' % (
            setting, name, module_name, '; did you mean %s?' % nearest[0] if nearest else ''))
    defined = _top_level_definitions(path)
    if defined is None:
        return None
    if obj_name not in defined:
        nearest = difflib.get_close_matches(obj_name, [n for n in defined if not n.startswith('_')], n=1)
        raise ConfigError('%s = %r: %s defines no %s%s' % (
            setting, name, os.path.basename(path), obj_name, '; did you mean %s.%s?' % (module_name, nearest[0])
            if nearest else ''))
    return defined[obj_name]


def check_arguments(block_name, block, key, definition):
    parameters = _parameters(definition)
    if parameters is None:
        return      # Not a def or class with an __init__ here, or it takes **kwargs.
    for setting in sorted(set(block) - {key}):
        if setting not in parameters:
            nearest = difflib.get_close_matches(setting, parameters, n=1)
            raise ConfigError('%s.%s is not an argument of %s%s (it takes: %s)' % (
                block_name, setting, block[key], '; did you mean %s.%s?' % (block_name, nearest[0]) if nearest else '',
                ', '.join(parameters)))


def _module_file(module_name):
    """The source file of a module, without importing it (train.py may be running as __main__)."""
    loaded = sys.modules.get(module_name)
    if getattr(loaded, '__file__', None):
        return loaded.__file__
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith('.py') else None


def _local_modules():
    here = os.path.dirname(os.path.abspath(__file__))
    return [name[:-3] for name in os.listdir(here) if name.endswith('.py')]


def _top_level_definitions(path):
    """{name: ast node} for what a module defines at its top level (functions and classes as their
    nodes, other names as None), or None when anything could be defined (star import, __getattr__)."""
    with open(path, 'rb') as file:
        tree = ast.parse(file.read(), path)
    defined = {}
    statements = list(tree.body)
    while statements:
        node = statements.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined[node.name] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == '*' for alias in node.names):
                return None
            defined.update((alias.asname or alias.name.split('.')[0], None) for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):      # Names defined conditionally count too.
            statements += node.body + getattr(node, 'orelse', []) + getattr(node, 'finalbody', []) + \
                [stmt for handler in getattr(node, 'handlers', []) for stmt in handler.body]
        else:
            defined.update((target.id, None) for target in ast.walk(node)
                           if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store))
    return None if '__getattr__' in defined else defined


def _signature_node(definition):
    """The def whose parameters a call passes to: the function itself, or a class's __init__."""
    if isinstance(definition, ast.ClassDef):
        return next((node for node in definition.body if isinstance(node, ast.FunctionDef) and node.name == '__init__'), None)
    return definition if isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _parameters(definition):
    """Names a call can pass by keyword, or None when the def takes **kwargs or is not known."""
    node = _signature_node(definition)
    if node is None or node.args.kwarg is not None:
        return None
    names = [arg.arg for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    return names[1:] if isinstance(definition, ast.ClassDef) else names


def _literal_defaults(module_name, obj_name):
    """{parameter: default} of a function or class in a module's source, for literal defaults."""
    node = _signature_node(_top_level_definitions(_module_file(module_name))[obj_name])
    positional = node.args.posonlyargs + node.args.args
    pairs = list(zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults))
    pairs += [(arg, default) for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults) if default is not None]
    defaults = {}
    for arg, default in pairs:
        try:
            defaults[arg.arg] = ast.literal_eval(default)
        except ValueError:
            pass
    return defaults


def _train_default(name):
    return _literal_defaults('train', 'train_progressive_gan')[name]


def _schedule_defaults():
    return _literal_defaults('train', 'TrainingSchedule')
