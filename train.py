"""Progressive GAN training: `python train.py` runs what config.py says (training or a utility
script); `python train.py other_config.py` runs another config file of the same shape."""

import glob
import hashlib
import os
import signal
import sys
import time

import numpy as np

import checks
import config
import misc

if __name__ == '__main__':
    checks.preflight(sys.argv)      # Config mistakes fail here, before the slow TensorFlow import.

import dataset      # noqa: E402 (imports TensorFlow)
import tfutil       # noqa: E402
from tf_compat import tf   # noqa: E402

# ----------------------------------------------------------------------------
# Real images as the networks see them at a fractional LOD.


def process_reals(x, lod, mirror_augment, drange_data, drange_net):
    with tf.name_scope('ProcessReals'):
        with tf.name_scope('DynamicRange'):
            x = tf.cast(x, tf.float32)
            x = misc.adjust_dynamic_range(x, drange_data, drange_net)
        if mirror_augment:
            with tf.name_scope('MirrorAugment'):
                s = tf.shape(x)
                mask = tf.random_uniform([s[0], 1, 1, 1], 0.0, 1.0)
                mask = tf.tile(mask, [1, s[1], s[2], s[3]])
                x = tf.where(mask < 0.5, x, tf.reverse(x, axis=[3]))
        with tf.name_scope('FadeLOD'):     # Smooth crossfade between consecutive LODs.
            s = tf.shape(x)
            y = tf.reshape(x, [-1, s[1], s[2] // 2, 2, s[3] // 2, 2])
            y = tf.reduce_mean(y, axis=[3, 5], keepdims=True)
            y = tf.tile(y, [1, 1, 1, 2, 1, 2])
            y = tf.reshape(y, [-1, s[1], s[2], s[3]])
            x = tfutil.lerp(x, y, lod - tf.floor(lod))
        with tf.name_scope('UpscaleLOD'):  # The networks take and give full-resolution images.
            s = tf.shape(x)
            factor = tf.cast(2 ** tf.floor(lod), tf.int32)
            x = tf.reshape(x, [-1, s[1], s[2], 1, s[3], 1])
            x = tf.tile(x, [1, 1, 1, factor, 1, factor])
            x = tf.reshape(x, [-1, s[1], s[2] * factor, s[3] * factor])
        return x

# ----------------------------------------------------------------------------
# The schedule: LOD, minibatch size, learning rates and tick length as functions of progress.


class TrainingSchedule:
    def __init__(self, cur_nimg, training_set,
                 lod_initial_resolution=4,      # Image resolution used at the beginning.
                 lod_training_kimg=600,         # Thousands of real images to show before doubling the resolution.
                 lod_transition_kimg=600,       # Thousands of real images to show when fading in new layers.
                 minibatch_base=16,             # Maximum minibatch size, divided evenly among GPUs.
                 minibatch_dict={},             # Resolution-specific overrides.
                 max_minibatch_per_gpu={},      # Resolution-specific maximum minibatch size per GPU.
                 G_lrate_base=0.001,            # Learning rate for the generator.
                 G_lrate_dict={},               # Resolution-specific overrides.
                 D_lrate_base=0.001,            # Learning rate for the discriminator.
                 D_lrate_dict={},               # Resolution-specific overrides.
                 tick_kimg_base=160,            # Default interval of progress snapshots.
                 tick_kimg_dict={4: 160, 8: 140, 16: 120, 32: 100, 64: 80, 128: 60, 256: 40, 512: 20, 1024: 10},
                 num_gpus=None):                # None = config.num_gpus.
        num_gpus = num_gpus if num_gpus is not None else config.num_gpus

        # Training phase.
        self.kimg = cur_nimg / 1000.0
        phase_dur = lod_training_kimg + lod_transition_kimg
        phase_idx = int(np.floor(self.kimg / phase_dur)) if phase_dur > 0 else 0
        phase_kimg = self.kimg - phase_idx * phase_dur

        # Level of detail and resolution.
        self.lod = training_set.resolution_log2
        self.lod -= np.floor(np.log2(lod_initial_resolution))
        self.lod -= phase_idx
        if lod_transition_kimg > 0:
            self.lod -= max(phase_kimg - lod_training_kimg, 0.0) / lod_transition_kimg
        self.lod = max(self.lod, 0.0)
        self.resolution = 2 ** (training_set.resolution_log2 - int(np.floor(self.lod)))

        # Minibatch size.
        self.minibatch = minibatch_dict.get(self.resolution, minibatch_base)
        self.minibatch -= self.minibatch % num_gpus
        if self.resolution in max_minibatch_per_gpu:
            self.minibatch = min(self.minibatch, max_minibatch_per_gpu[self.resolution] * num_gpus)

        # Other parameters.
        self.G_lrate = G_lrate_dict.get(self.resolution, G_lrate_base)
        self.D_lrate = D_lrate_dict.get(self.resolution, D_lrate_base)
        self.tick_kimg = tick_kimg_dict.get(self.resolution, tick_kimg_base)

# ----------------------------------------------------------------------------
# The snapshot grid: the same latents every time, so fakesNNNNNN.png show progress.


def grid_shape(size, image_width, image_height):
    """Grid (columns, rows) for '1080p', '4k' or an explicit 'WxH' such as '8x6'."""
    if size == '1080p':
        return int(np.clip(1920 // image_width, 3, 32)), int(np.clip(1080 // image_height, 2, 32))
    if size == '4k':
        return int(np.clip(3840 // image_width, 7, 32)), int(np.clip(2160 // image_height, 4, 32))
    try:
        gw, gh = (int(v) for v in str(size).lower().split('x'))
        return gw, gh
    except ValueError:
        raise ValueError('grid.size must be "1080p", "4k" or "WxH" (e.g. "8x6"), not %r' % (size,))


def setup_snapshot_image_grid(G, training_set, size='1080p', layout='random'):
    gw, gh = grid_shape(size, G.output_shape[3], G.output_shape[2])
    count = gw * gh
    reals = np.zeros([count] + training_set.shape, dtype=training_set.dtype)
    labels = np.zeros([count, training_set.label_size], dtype=training_set.label_dtype)
    want_class = layout == 'row_per_class' and training_set.label_size > 0
    filled = 0
    while filled < count:
        batch_reals, batch_labels = training_set.get_minibatch_np(min(count, 64))
        for real, label in zip(batch_reals, batch_labels):
            if filled == count:
                break
            if want_class and label[(filled // gw) % training_set.label_size] == 0.0:
                continue
            reals[filled], labels[filled] = real, label
            filled += 1
    latents = misc.random_latents(count, G)
    return (gw, gh), reals, labels, latents

# ----------------------------------------------------------------------------
# Main training loop.


def train_progressive_gan(
        G_smoothing=0.999,              # Exponential running average of generator weights.
        D_repeats=1,                    # How many times the discriminator is trained per G iteration.
        minibatch_repeats=4,            # Number of minibatches to run before adjusting training parameters.
        reset_opt_for_new_lod=True,     # Reset optimizer internal state (e.g. Adam moments) when new layers are introduced?
        total_kimg=15000,               # Total length of the training, measured in thousands of real images.
        mirror_augment=False,           # Enable mirror augment?
        drange_net=[-1, 1],             # Dynamic range used when feeding image data to the networks.
        image_snapshot_ticks=1,         # How often to export image snapshots?
        network_snapshot_ticks=10,      # How often to export network snapshots?
        save_tf_graph=False,            # Include full TensorFlow computation graph in the tfevents file?
        save_weight_histograms=False,   # Include weight histograms in the tfevents file?
        resume_run_id=None,             # Run ID, run dir or network pkl to resume from; 'latest' = newest run with a snapshot.
        resume_snapshot=None,           # Snapshot index to resume training from, None = latest.
        resume_kimg=None,               # Training progress at the beginning; None = exact from resume-state.json, else from the snapshot's name.
        resume_time=None,               # Wall-clock time at the beginning; None = from resume-state.json, else from the resumed run's log.
        max_nonfinite_ticks=2,          # Stop when G or D losses are non-finite (or every step overflows) for more ticks in a row than this.
        handle_signals=True):           # SIGTERM / Ctrl-C: finish the step, write a snapshot, exit (143 / 130).

    maintenance_start_time = time.time()
    checks.validate_training_setup(resume_run_id, resume_snapshot)      # Seconds, before any graph is built.
    training_set = dataset.load_dataset(data_dir=config.data_dir, verbose=True, **config.dataset)
    num_gpus = config.num_gpus

    # Construct networks.
    network_pkl = locate_resume_pkl(resume_run_id, resume_snapshot)
    resume_state = None
    with tf.device(tfutil.device_names(1)[0]):
        if network_pkl is not None:
            print('Loading networks from "%s"...' % network_pkl)
            G, D, Gs = misc.load_pkl(network_pkl)
            resume_state = misc.load_resume_state(network_pkl)
            resume_kimg, resume_time = resume_progress(network_pkl, resume_kimg, resume_time, resume_state)
        else:
            print('Constructing networks...')
            net_kwargs = dict(num_channels=training_set.shape[0], resolution=training_set.shape[1],
                              label_size=training_set.label_size)
            G = tfutil.Network('G', **net_kwargs, **config.G)
            D = tfutil.Network('D', **net_kwargs, **config.D)
            Gs = G.clone('Gs')
    resume_kimg = resume_kimg or 0.0
    resume_time = resume_time or 0.0
    G.print_layers()
    D.print_layers()

    print('Building TensorFlow graph...')
    graph = build_training_graph(G, D, Gs, training_set, num_gpus, mirror_augment, drange_net, G_smoothing)
    lod_in, lrate_in, minibatch_in = graph.lod_in, graph.lrate_in, graph.minibatch_in
    G_opt, D_opt = graph.G_opt, graph.D_opt
    G_train_op, D_train_op, Gs_update_op = graph.G_train_op, graph.D_train_op, graph.Gs_update_op

    cur_nimg = int(round(resume_kimg * 1000))
    sched = TrainingSchedule(cur_nimg, training_set, **config.sched)
    if resume_state is not None and resume_state.get('optimizer_state'):
        restore_optimizer_state(os.path.join(os.path.dirname(network_pkl), resume_state['optimizer_state']),
                                G_opt.variables() + D_opt.variables(),
                                same_phase=not reset_opt_for_new_lod or same_lod_phase(resume_state['lod'], sched.lod))

    print('Setting up snapshot image grid...')
    training_set.configure(sched.minibatch, sched.lod)
    grid_size, grid_reals, grid_labels, grid_latents = setup_snapshot_image_grid(G, training_set, **config.grid)
    grid_fakes = Gs.run(grid_latents, grid_labels, minibatch_size=sched.minibatch // num_gpus)

    print('Setting up result dir...')
    result_subdir = misc.create_result_subdir(config.result_dir, config.desc)
    misc.save_image_grid(grid_reals, os.path.join(result_subdir, 'reals.png'), drange=training_set.dynamic_range, grid_size=grid_size)
    misc.save_image_grid(grid_fakes, os.path.join(result_subdir, 'fakes%06d.png' % int(resume_kimg)), drange=drange_net, grid_size=grid_size)
    save_augmented_reals(training_set, grid_reals, os.path.join(result_subdir, 'reals-augmented.png'), grid_size)
    if hasattr(training_set, 'write_overview'):
        training_set.write_overview(result_subdir)
    summary_log = tf.summary.FileWriter(result_subdir)
    if save_tf_graph:
        summary_log.add_graph(tf.get_default_graph())
    if save_weight_histograms:
        G.setup_weight_histograms()
        D.setup_weight_histograms()

    print('Training...')
    if resume_state is not None and resume_state.get('numpy_random_state'):
        np.random.set_state(misc.decode_random_state(resume_state['numpy_random_state']))
    cur_tick = int(resume_state['tick']) if resume_state is not None else 0
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    train_start_time = tick_start_time - resume_time
    prev_lod = -1.0
    snapshots = SnapshotWriter(result_subdir, G, D, Gs, G_opt, D_opt)
    health = LossHealth(G_opt, D_opt, max_nonfinite_ticks)
    stop = SignalCatcher([signal.SIGTERM, signal.SIGINT] if handle_signals else [])
    try:
        while cur_nimg < total_kimg * 1000:
            # Choose training parameters and configure training ops.
            sched = TrainingSchedule(cur_nimg, training_set, **config.sched)
            training_set.configure(sched.minibatch, sched.lod)
            if reset_opt_for_new_lod and prev_lod >= 0.0:
                if not same_lod_phase(sched.lod, prev_lod):
                    G_opt.reset_optimizer_state()
                    D_opt.reset_optimizer_state()
            prev_lod = sched.lod

            # Run training ops.
            for _ in range(minibatch_repeats):
                for _ in range(D_repeats):
                    _, _, D_loss = tfutil.run([D_train_op, Gs_update_op, graph.D_loss_mean], {lod_in: sched.lod, lrate_in: sched.D_lrate, minibatch_in: sched.minibatch})
                    cur_nimg += sched.minibatch
                    health.record('D', D_loss)
                _, G_loss = tfutil.run([G_train_op, graph.G_loss_mean], {lod_in: sched.lod, lrate_in: sched.G_lrate, minibatch_in: sched.minibatch})
                health.record('G', G_loss)
                if stop.signum is not None:
                    break

            # SIGTERM / Ctrl-C: the step is done; snapshot the current state (unless it is a bad one) and exit.
            if stop.signum is not None:
                total_time = time.time() - train_start_time
                name = 'network-snapshot-%06d.pkl' % (cur_nimg // 1000)
                if health.current_tick_bad():
                    print('%s at kimg %.3f: losses are not finite, so no snapshot is written; the last good one is %s' % (
                        stop.name, cur_nimg / 1000.0, snapshots.last_name))
                else:
                    snapshots.save(name, cur_nimg, total_time, cur_tick, sched.lod)
                    print('%s at kimg %.3f (tick %d, time %s): wrote %s and %s; exiting' % (
                        stop.name, cur_nimg / 1000.0, cur_tick, misc.format_time(total_time), name, misc.RESUME_STATE_FILE))
                summary_log.close()
                raise SystemExit(128 + stop.signum)

            # Perform maintenance tasks once per tick.
            done = (cur_nimg >= total_kimg * 1000)
            if cur_nimg >= tick_start_nimg + sched.tick_kimg * 1000 or done:
                cur_tick += 1
                cur_time = time.time()
                tick_kimg = (cur_nimg - tick_start_nimg) / 1000.0
                tick_start_nimg = cur_nimg
                tick_time = cur_time - tick_start_time
                total_time = cur_time - train_start_time
                maintenance_time = tick_start_time - maintenance_start_time
                maintenance_start_time = cur_time

                # Report progress.
                print(misc.format_tick_line(misc.TickLine(
                    tick=tfutil.autosummary('Progress/tick', cur_tick),
                    kimg=tfutil.autosummary('Progress/kimg', cur_nimg / 1000.0),
                    lod=tfutil.autosummary('Progress/lod', sched.lod),
                    minibatch=tfutil.autosummary('Progress/minibatch', sched.minibatch),
                    total_sec=tfutil.autosummary('Timing/total_sec', total_time),
                    sec_per_tick=tfutil.autosummary('Timing/sec_per_tick', tick_time),
                    sec_per_kimg=tfutil.autosummary('Timing/sec_per_kimg', tick_time / tick_kimg),
                    maintenance_sec=tfutil.autosummary('Timing/maintenance_sec', maintenance_time))))
                tfutil.autosummary('Timing/total_hours', total_time / (60.0 * 60.0))
                tfutil.autosummary('Timing/total_days', total_time / (24.0 * 60.0 * 60.0))
                tfutil.save_summaries(summary_log, cur_nimg)

                # Save snapshots.
                if cur_tick % image_snapshot_ticks == 0 or done:
                    grid_fakes = Gs.run(grid_latents, grid_labels, minibatch_size=sched.minibatch // num_gpus)
                    misc.save_image_grid(grid_fakes, os.path.join(result_subdir, 'fakes%06d.png' % (cur_nimg // 1000)), drange=drange_net, grid_size=grid_size)
                tick_bad = health.end_tick(cur_tick, cur_nimg, snapshots.last_name)   # Raises TrainingStopped when it persists.
                if (cur_tick % network_snapshot_ticks == 0 or done) and not tick_bad:
                    snapshots.save('network-snapshot-%06d.pkl' % (cur_nimg // 1000), cur_nimg, total_time, cur_tick, sched.lod)

                # Record start time of the next tick.
                tick_start_time = time.time()

        if health.bad_ticks:
            raise TrainingStopped('Training ended with non-finite losses in the last tick; network-final.pkl is not '
                                  'written. The last good snapshot is %s' % snapshots.last_name)
    finally:
        stop.restore()

    # Write final results.
    snapshots.save('network-final.pkl', cur_nimg, time.time() - train_start_time, cur_tick, sched.lod)
    summary_log.close()
    open(os.path.join(result_subdir, '_training-done.txt'), 'wt').close()
    return result_subdir


def augment_reals(training_set, reals):
    """The dataset's own training-time augmentation (WSIDataset's colour + warp), if it has one."""
    augment = getattr(training_set, 'augment_minibatch_tf', None)
    return reals if augment is None else augment(reals)


def save_augmented_reals(training_set, grid_reals, filename, grid_size):
    """The reals grid as the networks see it after the dataset's augmentation, if it has one
    (the grid itself stays unaugmented, like the patches metrics see)."""
    with tf.name_scope('AugmentedRealsGrid'):
        reals = tf.placeholder(tf.as_dtype(grid_reals.dtype), grid_reals.shape)
        augmented = augment_reals(training_set, reals)
    if augmented is not reals:
        misc.save_image_grid(tfutil.run(augmented, {reals: grid_reals}), filename, drange=training_set.dynamic_range,
                             grid_size=grid_size)


def build_training_graph(G, D, Gs, training_set, num_gpus, mirror_augment=False, drange_net=[-1, 1], G_smoothing=0.999):
    """The training ops: one tower per device, the two optimizers, and the Gs moving average."""
    graph = config.EasyDict()
    devices = tfutil.device_names(num_gpus)
    with tf.device(devices[0]):
        graph.Gs_update_op = Gs.setup_as_moving_average_of(G, beta=G_smoothing)
    with tf.name_scope('Inputs'):
        graph.lod_in = tf.placeholder(tf.float32, name='lod_in', shape=[])
        graph.lrate_in = tf.placeholder(tf.float32, name='lrate_in', shape=[])
        graph.minibatch_in = tf.placeholder(tf.int32, name='minibatch_in', shape=[])
        minibatch_split = graph.minibatch_in // num_gpus
        reals, labels = training_set.get_minibatch_tf()
        reals_split = tf.split(reals, num_gpus)
        labels_split = tf.split(labels, num_gpus)
    graph.G_opt = tfutil.Optimizer(name='TrainG', learning_rate=graph.lrate_in, **config.G_opt)
    graph.D_opt = tfutil.Optimizer(name='TrainD', learning_rate=graph.lrate_in, **config.D_opt)
    graph.G_losses, graph.D_losses = [], []
    G_means, D_means = [], []
    for gpu, device in enumerate(devices):
        with tf.name_scope('GPU%d' % gpu), tf.device(device):
            G_gpu = G if gpu == 0 else G.clone(G.name + '_shadow')
            D_gpu = D if gpu == 0 else D.clone(D.name + '_shadow')
            lod_assign_ops = [tf.assign(G_gpu.find_var('lod'), graph.lod_in), tf.assign(D_gpu.find_var('lod'), graph.lod_in)]
            reals_gpu = augment_reals(training_set, reals_split[gpu])
            reals_gpu = process_reals(reals_gpu, graph.lod_in, mirror_augment, training_set.dynamic_range, drange_net)
            labels_gpu = labels_split[gpu]
            with tf.name_scope('G_loss'), tf.control_dependencies(lod_assign_ops):
                G_loss = tfutil.call_func_by_name(G=G_gpu, D=D_gpu, opt=graph.G_opt, training_set=training_set,
                                                  minibatch_size=minibatch_split, **config.G_loss)
            with tf.name_scope('D_loss'), tf.control_dependencies(lod_assign_ops):
                D_loss = tfutil.call_func_by_name(G=G_gpu, D=D_gpu, opt=graph.D_opt, training_set=training_set,
                                                  minibatch_size=minibatch_split, reals=reals_gpu, labels=labels_gpu,
                                                  **config.D_loss)
            G_means.append(tf.reduce_mean(G_loss))
            D_means.append(tf.reduce_mean(D_loss))
            graph.G_opt.register_gradients(G_means[-1], G_gpu.trainables)
            graph.D_opt.register_gradients(D_means[-1], D_gpu.trainables)
            graph.G_losses.append((G_loss, G_gpu))     # Kept for benchmarks that time the bare work.
            graph.D_losses.append((D_loss, D_gpu))
    with tf.name_scope('LossMeans'), tf.device(devices[0]):    # Fetched with each step: the losses already computed.
        graph.G_loss_mean = tf.add_n([tf.cast(x, tf.float32) for x in G_means]) / len(G_means)
        graph.D_loss_mean = tf.add_n([tf.cast(x, tf.float32) for x in D_means]) / len(D_means)
    graph.G_train_op = graph.G_opt.apply_updates()
    graph.D_train_op = graph.D_opt.apply_updates()
    return graph


def locate_resume_pkl(resume_run_id, resume_snapshot=None):
    """The pickle to resume from, or None to start from scratch (no resume_run_id, or 'latest' and no
    run has a snapshot yet: then a preempted job's very first start and its restarts are one command)."""
    if resume_run_id is None:
        return None
    try:
        return misc.locate_network_pkl(resume_run_id, resume_snapshot)
    except misc.NoRunToResume:
        if resume_run_id != 'latest':
            raise
        print('resume_run_id="latest": no run with a network snapshot under "%s" yet; starting from scratch' % config.result_dir)
        return None


def resume_progress(network_pkl, resume_kimg, resume_time, resume_state=None):
    """Fill in resume_kimg/resume_time left at None: from the snapshot's resume-state.json when it
    belongs to this very pickle (exact), otherwise from the snapshot's name and its run's log."""
    if resume_state is not None:
        if resume_kimg is None:
            resume_kimg = resume_state['cur_nimg'] / 1000.0
        if resume_time is None:
            resume_time = resume_state['total_time']
        print('Resume state from %s: kimg %.3f, tick %d, lod %.2f' % (
            misc.RESUME_STATE_FILE, resume_state['cur_nimg'] / 1000.0, resume_state['tick'], resume_state['lod']))
    if resume_kimg is None:
        resume_kimg = misc.snapshot_kimg(network_pkl)
        if resume_kimg is None:
            print('Cannot tell the kimg of "%s" from its name; resuming at kimg 0' % network_pkl)
            resume_kimg = 0.0
    if resume_time is None:
        resume_time = misc.resume_time_from_log(os.path.dirname(network_pkl), resume_kimg) or 0.0
    print('Resuming at kimg %.1f, time %s' % (resume_kimg, misc.format_time(resume_time)))
    return float(resume_kimg), float(resume_time)

def same_lod_phase(lod_a, lod_b):
    """The optimizer-reset rule: a new phase starts when floor or ceil of the LOD changes."""
    return np.floor(lod_a) == np.floor(lod_b) and np.ceil(lod_a) == np.ceil(lod_b)


def is_loss_scaling_var(var):
    return 'LossScalingVars' in var.name


def restore_optimizer_state(npz_path, variables, same_phase):
    """Load the saved optimizer state: loss scaling always (the original never resets it), the Adam
    slots only when training resumes in the LOD phase they were saved in (else they stay reset)."""
    try:
        with np.load(npz_path) as data:
            saved = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        print('Cannot read optimizer state "%s" (%s); starting with fresh optimizer state' % (npz_path, error))
        return {}
    wanted = [var for var in variables if same_phase or is_loss_scaling_var(var)]
    values = {var: saved[var.name] for var in wanted
              if var.name in saved and list(saved[var.name].shape) == var.shape.as_list()}
    tfutil.set_vars(values)
    print('Restored optimizer state from "%s": %d of %d variables (%s)%s' % (
        os.path.basename(npz_path), len(values), len(variables),
        'Adam slots and loss scaling' if same_phase else 'loss scaling only: new LOD phase, Adam slots reset',
        '' if len(values) == len(wanted) else '; %d not in the file (different setup?) start fresh' % (len(wanted) - len(values))))
    return values


class SnapshotWriter:
    """Network pickle, then its optimizer state (.npz), then resume-state.json naming both: each
    written atomically, in this order, so the json only ever names files that are complete."""

    def __init__(self, result_subdir, G, D, Gs, G_opt, D_opt):
        self.result_subdir = result_subdir
        self.networks = (G, D, Gs)
        self.opt_vars = G_opt.variables() + D_opt.variables()
        self.last_name = None

    def save(self, name, cur_nimg, total_time, cur_tick, lod):
        network_pkl = os.path.join(self.result_subdir, name)
        data = misc.pkl_bytes(self.networks)
        values = tfutil.run(self.opt_vars)
        opt_name = misc.optimizer_state_name(cur_nimg)
        misc.save_npz(os.path.join(self.result_subdir, opt_name), {var.name: value for var, value in zip(self.opt_vars, values)})
        entry = dict(
            snapshot=name, snapshot_sha256=hashlib.sha256(data).hexdigest(), optimizer_state=opt_name,
            cur_nimg=int(cur_nimg), kimg=cur_nimg / 1000.0, total_time=float(total_time), tick=int(cur_tick),
            lod=float(lod), lod_phase=[float(np.floor(lod)), float(np.ceil(lod))],
            loss_scaling={var.name: float(value) for var, value in zip(self.opt_vars, values) if is_loss_scaling_var(var)},
            numpy_random_state=misc.encode_random_state(np.random.get_state()),
            saved_at=time.strftime('%Y-%m-%d %H:%M:%S'))
        # The state of the pickle now on disk stays as 'previous' until the new pickle replaces it.
        older = misc.resume_state_entries(misc.read_resume_state(self.result_subdir))
        misc.save_resume_state(self.result_subdir, dict(entry, previous=older[:1]))     # Before the pickle.
        misc.atomic_write_bytes(network_pkl, data)
        keep = {opt_name} | {e.get('optimizer_state') for e in older[:1]}
        for old in glob.glob(os.path.join(self.result_subdir, 'optimizer-state-*.npz')):
            if os.path.basename(old) not in keep:
                os.remove(old)
        self.last_name = name
        return network_pkl


class TrainingStopped(RuntimeError):
    """Training cannot usefully continue (non-finite losses that persist)."""


class LossHealth:
    """Counts, per tick, steps whose mean G / D loss was finite, and with loss scaling whether every
    step overflowed (the scale then fell by loss_scaling_dec per step). A tick where G or D had no
    finite step, or every step overflowed, is bad; more than `max_bad` bad ticks in a row stop the
    run. The losses come with the training steps (no extra work); loss scales are read once a tick."""

    def __init__(self, G_opt, D_opt, max_bad):
        self.max_bad = max_bad
        self.bad_ticks = 0
        self.ls = [(which, opt, var) for which, opt in [('G', G_opt), ('D', D_opt)]
                   for var in opt.variables() if is_loss_scaling_var(var)]
        self._start_tick()

    def _start_tick(self):
        self.steps = {'G': 0, 'D': 0}
        self.finite = {'G': 0, 'D': 0}
        self.ls_start = tfutil.run([var for _, _, var in self.ls]) if self.ls else []

    def record(self, which, loss):
        self.steps[which] += 1
        self.finite[which] += int(np.isfinite(loss))

    def problems(self):
        found = ['%s loss non-finite in all %d steps' % (w, self.steps[w]) for w in 'GD' if self.steps[w] and not self.finite[w]]
        if self.ls:
            ls_end = tfutil.run([var for _, _, var in self.ls])
            for (which, opt, var), start, end in zip(self.ls, self.ls_start, ls_end):
                steps = self.steps[which]
                if steps and end <= start - opt.loss_scaling_dec * steps + 1e-3:
                    found.append('every %s step overflowed (loss scale 2^%.1f)' % (opt.id, end))
        return found

    def current_tick_bad(self):
        return bool(self.problems()) or self.bad_ticks > 0

    def end_tick(self, cur_tick, cur_nimg, last_snapshot):
        problems = self.problems()
        self._start_tick()
        if not problems:
            self.bad_ticks = 0
            return False
        self.bad_ticks += 1
        print('Warning: tick %d (kimg %.3f): %s; steps were skipped, no snapshot written (%d bad tick%s in a row)' % (
            cur_tick, cur_nimg / 1000.0, '; '.join(problems), self.bad_ticks, '' if self.bad_ticks == 1 else 's'))
        if self.bad_ticks > self.max_bad:
            raise TrainingStopped('Training stopped at kimg %.3f: %s for %d ticks in a row (max_nonfinite_ticks=%d). '
                                  'The last good snapshot is %s, left as it was. Lower the learning rates, or for fp16 '
                                  'check the loss-scaling settings, then resume from it.' % (
                                      cur_nimg / 1000.0, '; '.join(problems), self.bad_ticks, self.max_bad,
                                      last_snapshot or 'none (no snapshot was written in this run)'))
        return True


class SignalCatcher:
    """Notes SIGTERM / SIGINT so the loop can finish its step and snapshot; a second Ctrl-C interrupts."""

    def __init__(self, signums):
        self.signum = None
        self.previous = {}
        for signum in signums:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:      # Not the main thread: signals stay as they were.
                pass

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        sys.stderr.write('\n%s received: finishing the current step, then writing a snapshot...\n' % signal.Signals(signum).name)

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

# ----------------------------------------------------------------------------
# Main entry point: the config decides what runs.


def use_config_file(path):
    """Replace the contents of the `config` module (which every module shares) with another file's."""
    checks.load_config_file(path)


def session_config(tf_config, num_gpus):
    """The configured session fields, plus one virtual CPU device per tower on GPU-less hosts."""
    fields = dict(tf_config)
    if num_gpus > 1 and tfutil.num_gpus_available() == 0:
        fields['device_count.CPU'] = num_gpus
    return fields


def main(argv):
    if len(argv) > 2:
        sys.exit('usage: python train.py [config_file.py]')
    if len(argv) == 2:
        use_config_file(argv[1])
    misc.init_output_logging()
    np.random.seed(config.random_seed)
    print('Initializing TensorFlow...')
    os.environ.update(config.env)
    tfutil.init_tf(session_config(config.tf_config, config.num_gpus))
    print('Running %s()...' % config.train['func'])
    import train as train_module    # The config names 'train.…', a module other than __main__.
    try:
        tfutil.call_func_by_name(**config.train)
    except checks.ConfigError as error:
        sys.exit('Configuration error: %s' % error)
    except (TrainingStopped, train_module.TrainingStopped) as error:
        sys.exit(str(error))
    print('Exiting...')


if __name__ == '__main__':
    main(sys.argv)
