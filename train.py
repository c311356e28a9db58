"""Progressive GAN training: `python train.py` runs what config.py says (training or a utility
script); `python train.py other_config.py` runs another config file of the same shape."""

import contextlib
import os
import signal
import sys
import time

import numpy as np

import checks
import cluster
import config
import misc

if __name__ == '__main__':
    # The config names its functions 'train.…'. Registering this running module under that name
    # makes `import train` find it, instead of executing a second copy with its own classes.
    sys.modules['train'] = sys.modules['__main__']
    checks.preflight(sys.argv)      # Config mistakes fail here, before the slow TensorFlow import.

import dataset      # noqa: E402 (imports TensorFlow)
import snapshots    # noqa: E402
import survival     # noqa: E402
import tfutil       # noqa: E402
from tf_compat import tf   # noqa: E402

# ----------------------------------------------------------------------------
# Real images as the networks see them at a fractional LOD. The graph ops below are created in
# a fixed order on purpose: with a graph-level seed, TensorFlow derives each random op's seed
# from the number of ops created before it, so reordering would change every later random draw.


def process_reals(x, lod, mirror_augment, drange_data, drange_net, full_resolution=True):
    """Reals in drange_net, optionally mirrored, with the LOD's fade applied and (full_resolution)
    enlarged back to the full resolution: the form G's output has at the same LOD, so D compares
    like with like. Without full_resolution they stay at the LOD's own size, as the dataset gives them."""
    with tf.name_scope('ProcessReals'):
        with tf.name_scope('DynamicRange'):
            images = misc.adjust_dynamic_range(tf.cast(x, tf.float32), drange_data, drange_net)
        if mirror_augment:
            with tf.name_scope('MirrorAugment'):
                images = _flip_half_at_random(images)
        with tf.name_scope('FadeLOD'):     # Between two LODs G blends the coarser output in; so do the reals.
            images = tfutil.lerp(images, _one_level_coarser(images), lod - tf.floor(lod))
        if full_resolution:
            with tf.name_scope('UpscaleLOD'):  # The networks take and give full-resolution images.
                images = _enlarge_to_full_resolution(images, lod)
        return images


def _flip_half_at_random(images):
    """Each NCHW image mirrored left-right with probability 1/2."""
    dims = tf.shape(images)
    coin = tf.random_uniform([dims[0], 1, 1, 1], 0.0, 1.0)
    coin = tf.tile(coin, [1, dims[1], dims[2], dims[3]])
    keep = coin < 0.5
    return tf.where(keep, images, tf.reverse(images, axis=[3]))


def _one_level_coarser(images):
    """Every 2x2 block replaced by its mean: the next-coarser LOD, at the same size."""
    dims = tf.shape(images)
    blocks = tf.reshape(images, [-1, dims[1], dims[2] // 2, 2, dims[3] // 2, 2])
    block_means = tf.reduce_mean(blocks, axis=[3, 5], keepdims=True)
    spread = tf.tile(block_means, [1, 1, 1, 2, 1, 2])
    return tf.reshape(spread, [-1, dims[1], dims[2], dims[3]])


def _enlarge_to_full_resolution(images, lod):
    """Nearest-neighbour enlargement by 2 ** floor(lod): every pixel becomes a factor x factor block."""
    dims = tf.shape(images)
    whole_levels = tf.floor(lod)
    factor = tf.cast(2 ** whole_levels, tf.int32)
    pixels = tf.reshape(images, [-1, dims[1], dims[2], 1, dims[3], 1])
    pixel_blocks = tf.tile(pixels, [1, 1, 1, factor, 1, factor])
    return tf.reshape(pixel_blocks, [-1, dims[1], dims[2] * factor, dims[3] * factor])

# ----------------------------------------------------------------------------
# The schedule: LOD, minibatch size, learning rates and tick length as functions of progress.


class TrainingSchedule:
    """The training parameters for the point `cur_nimg` (real images shown so far).

    Training grows in phases of lod_training_kimg + lod_transition_kimg: first the current
    resolution trains alone, then the next one fades in linearly. LOD counts halvings from the
    dataset's full resolution: 0 is full size, fractional values are fades."""

    def __init__(self, cur_nimg, training_set,
                 lod_initial_resolution=4,      # The resolution of the first phase.
                 lod_training_kimg=600,         # kimg per phase that a resolution trains on its own.
                 lod_transition_kimg=600,       # kimg per phase that the next resolution takes to fade in.
                 minibatch_base=16,             # Minibatch over all GPUs (each gets an equal share).
                 minibatch_dict={},             # {resolution: minibatch} where it differs from the base.
                 max_minibatch_per_gpu={},      # {resolution: largest share one GPU's memory allows}.
                 G_lrate_base=0.001,            # Learning rate of G.
                 G_lrate_dict={},               # {resolution: G learning rate} where it differs.
                 D_lrate_base=0.001,            # Learning rate of D.
                 D_lrate_dict={},               # {resolution: D learning rate} where it differs.
                 tick_kimg_base=160,            # kimg between progress lines (and snapshots).
                 tick_kimg_dict={4: 160, 8: 140, 16: 120, 32: 100, 64: 80, 128: 60, 256: 40, 512: 20, 1024: 10},
                 num_gpus=None):                # None = config.num_gpus.
        if num_gpus is None:
            num_gpus = config.num_gpus
        self.kimg = cur_nimg / 1000.0
        self.lod = misc.lod_at(self.kimg, training_set.resolution_log2, lod_initial_resolution,
                               lod_training_kimg, lod_transition_kimg)
        halvings = int(np.floor(self.lod))
        self.resolution = 2 ** (training_set.resolution_log2 - halvings)

        def at_this_resolution(overrides, default):
            return overrides.get(self.resolution, default)

        self.minibatch = misc.minibatch_size(at_this_resolution(minibatch_dict, minibatch_base), num_gpus,
                                             max_minibatch_per_gpu.get(self.resolution))
        self.G_lrate = at_this_resolution(G_lrate_dict, G_lrate_base)
        self.D_lrate = at_this_resolution(D_lrate_dict, D_lrate_base)
        self.tick_kimg = at_this_resolution(tick_kimg_dict, tick_kimg_base)

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
        raise ValueError('grid.size must be "1080p", "4k" or "WxH" (e.g. "8x6"), not %r' % (size,)) from None


def setup_snapshot_image_grid(G, training_set, size='1080p', layout='random'):
    """((columns, rows), reals, labels, latents) of the image grid; with layout='row_per_class' and
    labels, row r shows class r (modulo the number of classes)."""
    columns, rows = grid_shape(size, G.output_shape[3], G.output_shape[2])
    count = columns * rows
    reals = np.zeros([count] + training_set.shape, dtype=training_set.dtype)
    labels = np.zeros([count, training_set.label_size], dtype=training_set.label_dtype)
    by_class = layout == 'row_per_class' and training_set.label_size > 0
    filled = 0
    while filled < count:
        batch = zip(*training_set.get_minibatch_np(min(count, 64)))
        for real, label in batch:
            if filled == count:
                break
            if by_class and label[(filled // columns) % training_set.label_size] == 0.0:
                continue        # Not the class this row shows.
            reals[filled], labels[filled] = real, label
            filled += 1
    return (columns, rows), reals, labels, misc.random_latents(count, G)

# ----------------------------------------------------------------------------
# Main training loop.


def train_progressive_gan(
        G_smoothing=0.999,              # Gs follows G as a running average with this decay per step.
        D_repeats=1,                    # D steps per G step.
        minibatch_repeats=4,            # G steps between updates of the schedule.
        reset_opt_for_new_lod=True,     # Zero the Adam moments when a fade starts or ends?
        total_kimg=15000,               # Length of training in thousands of real images shown.
        mirror_augment=False,           # Flip reals left-right at random?
        drange_net=[-1, 1],             # Value range of the images the networks take and give.
        image_snapshot_ticks=1,         # Write fakesNNNNNN.png every this many ticks.
        network_snapshot_ticks=10,      # Write network-snapshot-NNNNNN.pkl every this many ticks.
        network_snapshot_keep=None,     # Keep only the newest this many network-snapshot-*.pkl; None = all.
        save_tf_graph=False,            # Put the whole graph into the TensorBoard log?
        save_weight_histograms=False,   # Log histograms of all weights to TensorBoard?
        resume_run_id=None,             # Run ID, run dir or network pkl to resume from; 'latest' = newest run with a snapshot.
        resume_snapshot=None,           # Snapshot index to resume training from, None = latest.
        resume_kimg=None,               # Training progress at the beginning; None = exact from resume-state.json, else from the snapshot's name.
        resume_time=None,               # Wall-clock time at the beginning; None = from resume-state.json, else from the resumed run's log.
        max_nonfinite_ticks=2,          # Stop when G or D losses are non-finite (or every step overflows) for more ticks in a row than this.
        full_resolution_graph=False,    # Networks and losses on full-resolution images at every LOD, as the original? (Same losses, slower.)
        handle_signals=True):           # SIGTERM / Ctrl-C: finish the step, write a snapshot, exit (143 / 130).
    """Train as config.py says; returns the run's result directory."""
    options = config.EasyDict(locals())     # The arguments above, by name, for _TrainingRun.
    setup_start = time.time()
    checks.validate_training_setup(resume_run_id, resume_snapshot, report=True)    # Seconds, before any graph is built.
    finished = checks.finished_run(resume_run_id, total_kimg)
    if finished:
        return os.path.dirname(finished)
    training_set = dataset.load_dataset(**_dataset_kwargs(cluster.this_node()), data_dir=config.data_dir, verbose=True)
    try:
        return _TrainingRun(training_set, options, setup_start).train()
    finally:
        training_set.close()    # Slide readers and prefetch threads, also when training fails.


def _dataset_kwargs(node):
    """config.dataset, with a seed of its own on each node when the config fixes one."""
    kwargs = dict(config.dataset)
    if kwargs.get('seed') is not None and node.count > 1:
        kwargs['seed'] = [kwargs['seed'], node.index]
    return kwargs


def _new_networks(training_set):
    """Fresh G and D for the dataset's images, and Gs starting as a copy of G."""
    shape_kwargs = dict(num_channels=training_set.shape[0], resolution=training_set.shape[1],
                        label_size=training_set.label_size)
    G = tfutil.Network('G', **shape_kwargs, **config.G)
    D = tfutil.Network('D', **shape_kwargs, **config.D)
    return G, D, G.clone('Gs')


class _TrainingRun:
    """One run of train_progressive_gan: set up in the constructor, trained by train().

    In a multi-node run (cluster.py) every node runs this with the same config. The chief alone
    writes results; every decision that ends or changes the run (the schedule, bad losses, a stop
    signal) is made from values that are identical on all nodes, so that they act in step."""

    def __init__(self, training_set, options, setup_start):
        self.training_set = training_set
        self.opts = options
        self.node = cluster.this_node()
        self.num_devices = config.num_gpus * self.node.count     # Towers over all nodes; minibatches are split over them.
        self.maintenance_start = setup_start    # The time before the first tick counts as maintenance.
        self.writer = None      # The chief's SnapshotWriter once training starts.
        self.result_subdir = None
        self._setup_networks()
        print('Building TensorFlow graph...')
        self.graph = build_training_graph(self.G, self.D, self.Gs, training_set, config.num_gpus,
                                          options.mirror_augment, options.drange_net, options.G_smoothing,
                                          options.full_resolution_graph, self.node)
        self.cur_nimg = int(round(self.resume_kimg * 1000))
        self.sched = self._schedule()
        if self.node.is_chief:
            snapshots.restore_optimizers(self.resume, self._optimizer_variables(), self.sched.lod,
                                         options.reset_opt_for_new_lod)
            with self._stop_if_writing_fails():
                self._setup_result_dir(self._setup_grid())
        self.node.broadcast_from_chief(trained_variables(self.G, self.D, self.Gs, self.graph))

    def _schedule(self):
        return TrainingSchedule(self.cur_nimg, self.training_set, **config.sched, num_gpus=self.num_devices)

    def _setup_networks(self):
        opts = self.opts
        network_pkl = self.node.share_from_chief(
            snapshots.locate_resume_pkl(opts.resume_run_id, opts.resume_snapshot) if self.node.is_chief else None)
        if network_pkl is not None and not os.path.isfile(network_pkl):
            raise checks.ConfigError('%s cannot read "%s", the snapshot the chief resumes from: result_dir must be '
                                     'on storage that every node sees at the same path' % (self.node.describe(), network_pkl))
        with tf.device(tfutil.device_names(1)[0]):
            self.resume = snapshots.load_resume_point(network_pkl, opts.resume_kimg, opts.resume_time)
            if self.resume is None:
                print('Constructing networks...')
                self.G, self.D, self.Gs = _new_networks(self.training_set)
                kimg, seconds = opts.resume_kimg, opts.resume_time
            else:
                self.G, self.D, self.Gs = self.resume.networks
                kimg, seconds = self.resume.kimg, self.resume.time
        self.resume_kimg = kimg or 0.0
        self.resume_time = seconds or 0.0
        self.G.print_layers()
        self.D.print_layers()

    def _optimizer_variables(self):
        return self.graph.G_opt.variables() + self.graph.D_opt.variables()

    def _setup_grid(self):
        """Choose the grid's reals and latents; returns what Gs makes of them before training."""
        print('Setting up snapshot image grid...')
        self.training_set.configure(self.sched.minibatch, self.sched.lod)
        self.grid_size, self.grid_reals, self.grid_labels, self.grid_latents = setup_snapshot_image_grid(
            self.G, self.training_set, **config.grid)
        return self._grid_fakes()

    def _setup_result_dir(self, first_fakes):
        print('Setting up result dir...')
        self.result_subdir = misc.create_result_subdir(config.result_dir, config.desc)
        drange_data = self.training_set.dynamic_range
        misc.save_image_grid(self.grid_reals, self._path('reals.png'), drange=drange_data, grid_size=self.grid_size)
        self._save_fakes(first_fakes, int(self.resume_kimg))
        save_augmented_reals(self.training_set, self.grid_reals, self._path('reals-augmented.png'), self.grid_size)
        if hasattr(self.training_set, 'write_overview'):     # not again on resume: at 10,000 slides it takes hours
            self.training_set.write_overview(self.result_subdir, pictures=self.resume is None)
        self.summary_log = tf.summary.FileWriter(self.result_subdir)
        if self.opts.save_tf_graph:
            self.summary_log.add_graph(tf.get_default_graph())
        if self.opts.save_weight_histograms:
            self.G.setup_weight_histograms()
            self.D.setup_weight_histograms()

    def _path(self, filename):
        return os.path.join(self.result_subdir, filename)

    @contextlib.contextmanager
    def _stop_if_writing_fails(self):
        """Turn an OSError while writing results (a full disk, say) into one message that names the
        newest good snapshot and how to resume."""
        try:
            yield
        except OSError as error:
            if self.writer is not None and self.writer.last_name is not None:
                good = self._path(self.writer.last_name)
            else:
                good = self.resume.network_pkl if self.resume is not None else None
            raise survival.write_failed(error, self.cur_nimg / 1000.0, good, self.opts.resume_run_id,
                                        getattr(config, '__file__', None)) from error

    def _save_snapshot(self, name, total_time):
        with self._stop_if_writing_fails():
            self.writer.save(name, self.cur_nimg, total_time, self.cur_tick, self.sched.lod)

    def _grid_fakes(self):
        return self.Gs.run(self.grid_latents, self.grid_labels, minibatch_size=self.sched.minibatch // self.num_devices)

    def _save_fakes(self, fakes, kimg):
        with self._stop_if_writing_fails():
            misc.save_image_grid(fakes, self._path('fakes%06d.png' % kimg), drange=self.opts.drange_net,
                                 grid_size=self.grid_size)

    def train(self):
        print('Training...')
        self.cur_tick = snapshots.resume_tick(self.resume)
        self.tick_start_nimg = self.cur_nimg
        self.tick_start_time = time.time()
        self.train_start_time = self.tick_start_time - self.resume_time
        self.health = survival.LossHealth(self.graph.G_opt, self.graph.D_opt, self.opts.max_nonfinite_ticks)
        self.stop = survival.SignalCatcher([signal.SIGTERM, signal.SIGINT] if self.opts.handle_signals else [])
        self.stop_request = None    # (signal number, node that caught it) once the run is to stop.
        if not self.node.is_chief:
            return self._train_as_worker()
        snapshots.restore_random_state(self.resume)     # Other nodes keep their own random streams.
        self.writer = snapshots.SnapshotWriter(self.result_subdir, self.G, self.D, self.Gs,
                                               self.graph.G_opt, self.graph.D_opt, self.opts.network_snapshot_keep)
        try:
            self._train_until_done()
        finally:
            self.stop.restore()
        self._save_snapshot('network-final.pkl', time.time() - self.train_start_time)
        self.summary_log.close()
        with self._stop_if_writing_fails():
            open(self._path('_training-done.txt'), 'wt').close()
        return self.result_subdir

    def _train_as_worker(self):
        """A node other than the chief trains in step with it and writes nothing."""
        try:
            self._train_until_done()
        finally:
            self.stop.restore()
        print('Training done on %s; the chief writes the results.' % self.node.describe())

    def _train_until_done(self):
        end_nimg = self.opts.total_kimg * 1000
        prev_lod = None
        while self.cur_nimg < end_nimg:
            self.sched = self._schedule()
            self.training_set.configure(self.sched.minibatch // self.node.count, self.sched.lod)
            if prev_lod is not None and self.opts.reset_opt_for_new_lod and \
                    not snapshots.same_lod_phase(self.sched.lod, prev_lod):
                self.graph.G_opt.reset_optimizer_state()
                self.graph.D_opt.reset_optimizer_state()
            prev_lod = self.sched.lod
            self._train_steps()
            if self.stop_request is not None:
                self._snapshot_and_exit()
            done = self.cur_nimg >= end_nimg
            if done or self.cur_nimg >= self.tick_start_nimg + self.sched.tick_kimg * 1000:
                self._end_tick(done)
        if self.health.bad_ticks:
            raise survival.TrainingStopped('Training ended with non-finite losses in the last tick; network-final.pkl '
                                           'is not written. The last good snapshot is %s' % self._last_snapshot())

    def _last_snapshot(self):
        """The newest snapshot this run wrote, for messages, or words saying there is none yet."""
        name = self.writer.last_name if self.writer is not None else None
        return name or 'none yet (this run has written no snapshot)'

    def _train_steps(self):
        """minibatch_repeats rounds of D_repeats D steps and one G step; stops early on a signal.
        Each step reports [the mean loss over all nodes, the signal each node caught]."""
        graph, sched, node = self.graph, self.sched, self.node
        D_feed = {graph.lod_in: sched.lod, graph.lrate_in: sched.D_lrate, graph.minibatch_in: sched.minibatch // node.count}
        G_feed = dict(D_feed)
        G_feed[graph.lrate_in] = sched.G_lrate
        for _ in range(self.opts.minibatch_repeats):
            D_feed[graph.signal_in] = G_feed[graph.signal_in] = self.stop.signum or 0
            for _ in range(self.opts.D_repeats):
                D_report = node.run([graph.D_train_op, graph.Gs_update_op, graph.D_report], D_feed)[-1]
                self.cur_nimg += sched.minibatch
                self.health.record('D', D_report[0])
            G_report = node.run([graph.G_train_op, graph.G_report], G_feed)[-1]
            self.health.record('G', G_report[0])
            self.stop_request = self._stop_requested(G_report)
            if self.stop_request is not None:
                return

    def _stop_requested(self, G_report):
        """(signal, node index) that ends the run after this step, or None. One machine acts on its own
        flag at once; nodes act only on the step's report, so that all of them stop at the same step."""
        if self.node.count == 1:
            return None if self.stop.signum is None else (self.stop.signum, 0)
        asked = [(int(signum), index) for index, signum in enumerate(G_report[1:]) if signum]
        return asked[0] if asked else None

    def _snapshot_and_exit(self):
        """The step in flight has finished: snapshot it (unless its losses are bad) and exit 128 + signal."""
        signum, asker = self.stop_request
        what = signal.Signals(signum).name
        if self.node.count > 1:
            what += ' on %s' % self.node.describe(asker)
        total_time = time.time() - self.train_start_time
        kimg = self.cur_nimg / 1000.0
        name = 'network-snapshot-%06d.pkl' % (self.cur_nimg // 1000)
        if not self.node.is_chief:
            print('%s at kimg %.3f: the chief writes the snapshot; exiting' % (what, kimg))
        elif self.health.current_tick_bad():
            print('%s at kimg %.3f: losses are not finite, so no snapshot is written; the last good one is %s' % (
                what, kimg, self._last_snapshot()))
        else:
            self._save_snapshot(name, total_time)
            print('%s at kimg %.3f (tick %d, time %s): wrote %s and %s; exiting' % (
                what, kimg, self.cur_tick, misc.format_time(total_time), name, snapshots.RESUME_STATE_FILE))
        if self.node.is_chief:
            self.summary_log.close()
        raise SystemExit(128 + signum)

    def _end_tick(self, done):
        """Once per tick: the progress line and summaries, then (the chief) image and network
        snapshots when due; the other nodes wait for it at the end."""
        self.cur_tick += 1
        now = time.time()
        total_time = now - self.train_start_time
        sec_per_kimg = (now - self.tick_start_time) / ((self.cur_nimg - self.tick_start_nimg) / 1000.0)
        node_rates = self.node.gather([sec_per_kimg])[:, 0]
        self._report_tick(now, total_time, node_rates)
        for line in getattr(self.training_set, 'tick_report', list)():    # A dataset of one's own may lack it.
            print(line)
        self.tick_start_nimg = self.cur_nimg
        self.maintenance_start = now
        if self.node.is_chief and (self.cur_tick % self.opts.image_snapshot_ticks == 0 or done):
            self._save_fakes(self._grid_fakes(), self.cur_nimg // 1000)
        tick_bad = self.health.end_tick(self.cur_tick, self.cur_nimg, self._last_snapshot())   # Raises TrainingStopped when it persists.
        if self.node.is_chief and (self.cur_tick % self.opts.network_snapshot_ticks == 0 or done) and not tick_bad:
            self._save_snapshot('network-snapshot-%06d.pkl' % (self.cur_nimg // 1000), total_time)
        self.node.barrier('the end of a tick (while the chief writes its snapshots)')
        self.tick_start_time = time.time()     # Snapshot writing above counts as the next tick's maintenance.

    def _report_tick(self, now, total_time, node_rates):
        """Print the tick line (misc.TickLine); the chief also logs the same values, and more, to
        TensorBoard, and in a multi-node run every node's sec/kimg."""
        tick_sec = now - self.tick_start_time
        chief = self.node.is_chief
        summary = tfutil.autosummary if chief else (lambda name, value: value)
        print(misc.format_tick_line(misc.TickLine(
            tick=summary('Progress/tick', self.cur_tick),
            kimg=summary('Progress/kimg', self.cur_nimg / 1000.0),
            lod=summary('Progress/lod', self.sched.lod),
            minibatch=summary('Progress/minibatch', self.sched.minibatch),
            total_sec=summary('Timing/total_sec', total_time),
            sec_per_tick=summary('Timing/sec_per_tick', tick_sec),
            sec_per_kimg=summary('Timing/sec_per_kimg', node_rates[self.node.index]),
            maintenance_sec=summary('Timing/maintenance_sec', self.tick_start_time - self.maintenance_start))))
        if self.node.count > 1:
            print('sec/kimg by node: %s' % '  '.join('node %d %.2f' % (index, summary('Timing/node%d/sec_per_kimg' % index, rate))
                                                     for index, rate in enumerate(node_rates)))
        if chief:
            summary('Timing/total_hours', total_time / 3600.0)
            summary('Timing/total_days', total_time / 86400.0)
            tfutil.save_summaries(self.summary_log, self.cur_nimg)


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

# ----------------------------------------------------------------------------
# The training graph. As in process_reals, the order in which ops are created is part of the
# result (it decides the random ops' seeds), so the steps below keep it.
#
# By default the networks and losses work on images of the current LOD's own size,
# 2**(log2(resolution) - floor(lod)): one graph serves every phase, its tf.cond branches choosing
# the LOD's blocks and sizes. The losses are the full-resolution graph's (full_resolution=True, the
# original's way): enlarging by nearest neighbour and average-pooling back is the identity, and
# the gradient penalty corrects its norm for the size (loss._enlargement).


def build_training_graph(G, D, Gs, training_set, num_gpus, mirror_augment=False, drange_net=[-1, 1], G_smoothing=0.999,
                         full_resolution=False, node=None):
    """The training ops: one tower per device, the two optimizers, the Gs moving average, and each
    step's report. `node` (cluster.py) joins this graph to the same graph on other nodes."""
    node = node or cluster.LocalNode()
    graph = config.EasyDict()
    devices = tfutil.device_names(num_gpus)
    with tf.device(devices[0]):
        graph.Gs_update_op = Gs.setup_as_moving_average_of(G, beta=G_smoothing)
    with tf.name_scope('Inputs'):
        tower_inputs = _training_inputs(graph, training_set, num_gpus)
    graph.G_opt = tfutil.Optimizer(name='TrainG', learning_rate=graph.lrate_in, cluster_node=node, **config.G_opt)
    graph.D_opt = tfutil.Optimizer(name='TrainD', learning_rate=graph.lrate_in, cluster_node=node, **config.D_opt)
    graph.G_losses, graph.D_losses = [], []     # (loss, network) per tower, for benchmarks that time the bare work.
    tower_means = []
    for tower, device in enumerate(devices):
        with tf.name_scope('GPU%d' % tower), tf.device(device):
            tower_means.append(_build_tower(graph, tower, G, D, training_set, tower_inputs, mirror_augment, drange_net,
                                            full_resolution))
    G_means, D_means = zip(*tower_means)
    with tf.name_scope('LossMeans'), tf.device(devices[0]):    # Fetched with each step: the losses already computed.
        graph.G_loss_mean = _average(G_means)
        graph.D_loss_mean = _average(D_means)
    graph.G_train_op = graph.G_opt.apply_updates()
    graph.D_train_op = graph.D_opt.apply_updates()
    with tf.name_scope('StepReports'), tf.device(devices[0]):
        graph.signal_in = tf.placeholder(tf.float32, name='signal_in', shape=[])   # The signal this node caught, or 0.
        graph.D_report = _step_report(graph.D_loss_mean, graph.signal_in, node)
        graph.G_report = _step_report(graph.G_loss_mean, graph.signal_in, node)
    return graph


def _training_inputs(graph, training_set, num_gpus):
    """Placeholders for the schedule's values (into `graph`), and the dataset's minibatch cut into
    one share per tower: (share size, [reals per tower], [labels per tower])."""
    graph.lod_in = tf.placeholder(tf.float32, name='lod_in', shape=[])
    graph.lrate_in = tf.placeholder(tf.float32, name='lrate_in', shape=[])
    graph.minibatch_in = tf.placeholder(tf.int32, name='minibatch_in', shape=[])
    share = graph.minibatch_in // num_gpus
    minibatch_reals, minibatch_labels = training_set.get_minibatch_tf()
    return share, tf.split(minibatch_reals, num_gpus), tf.split(minibatch_labels, num_gpus)


def _build_tower(graph, tower, G, D, training_set, tower_inputs, mirror_augment, drange_net, full_resolution):
    """One device's share: both losses on its part of the minibatch, and their gradients registered
    with the optimizers. Towers after the first work on shadow copies of G and D."""
    share, reals_per_tower, labels_per_tower = tower_inputs
    tower_G = G.clone(G.name + '_shadow') if tower > 0 else G
    tower_D = D.clone(D.name + '_shadow') if tower > 0 else D
    # The networks read their LOD from a variable; each loss first sets it to this step's value.
    set_lods = [tf.assign(tower_G.find_var('lod'), graph.lod_in), tf.assign(tower_D.find_var('lod'), graph.lod_in)]
    reals = augment_reals(training_set, reals_per_tower[tower])
    reals = process_reals(reals, graph.lod_in, mirror_augment, training_set.dynamic_range, drange_net, full_resolution)
    loss_kwargs = dict(G=tower_G, D=tower_D, training_set=training_set, minibatch_size=share,
                       lod_sized=not full_resolution)
    with tf.name_scope('G_loss'):
        with tf.control_dependencies(set_lods):
            G_loss = tfutil.call_func_by_name(opt=graph.G_opt, **loss_kwargs, **config.G_loss)
    with tf.name_scope('D_loss'):
        with tf.control_dependencies(set_lods):
            D_loss = tfutil.call_func_by_name(opt=graph.D_opt, reals=reals, labels=labels_per_tower[tower],
                                              **loss_kwargs, **config.D_loss)
    G_mean = tf.reduce_mean(G_loss)
    D_mean = tf.reduce_mean(D_loss)
    graph.G_opt.register_gradients(G_mean, tower_G.trainables)
    graph.D_opt.register_gradients(D_mean, tower_D.trainables)
    graph.G_losses.append((G_loss, tower_G))
    graph.D_losses.append((D_loss, tower_D))
    return G_mean, D_mean


def trained_variables(G, D, Gs, graph):
    """Every variable that training changes (the networks, the towers' copies of them, the
    optimizers' state): what all nodes of a multi-node run must agree on before the first step."""
    tower_copies = [net for _, net in graph.G_losses[1:] + graph.D_losses[1:]]
    networks = [G, D, Gs] + tower_copies
    return [var for net in networks for var in net.vars.values()] + graph.G_opt.variables() + graph.D_opt.variables()


def _step_report(loss_mean, signal_in, node):
    """Fetched with a step: [its mean loss over all nodes, then the signal each node caught (0:
    none)]. Every node gets the same report, so decisions taken from it agree everywhere."""
    caught = tf.one_hot(node.index, node.count) * signal_in
    mine = tf.concat([[loss_mean / node.count], caught], axis=0)
    return node.all_reduce_sum([mine])[0]


def _average(tower_means):
    return tf.add_n([tf.cast(mean, tf.float32) for mean in tower_means]) / len(tower_means)

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


def start_tensorflow(node):
    """The default session: in this process, or on this node's TensorFlow server in a multi-node
    run. init_tf seeds numpy, and TF's graph seed from it, with the node's seed."""
    fields = dict(session_config(config.tf_config, config.num_gpus), **node.session_fields())
    target = node.start_server(tfutil.config_proto(fields))
    tfutil.init_tf(fields, target=target, random_seed=node.seed(config.random_seed))
    cluster.set_this_node(node)


def main(argv):
    if len(argv) > 2:
        sys.exit('usage: python train.py [config_file.py]')
    if len(argv) == 2:
        use_config_file(argv[1])
    try:
        func = checks.train_func(config)
        node = cluster.node_from_environment(getattr(config, 'cluster', {}))
    except (checks.ConfigError, cluster.ClusterConfigError) as error:
        sys.exit('Configuration error: %s' % error)
    misc.init_output_logging()
    print('Initializing TensorFlow...')
    os.environ.update(config.env)
    if node.count > 1:
        print('Joining the run as %s of %d nodes' % (node.describe(), node.count))
    start_tensorflow(node)
    print('Running %s()...' % func)
    try:
        tfutil.call_func_by_name(**config.train)
    except checks.ConfigError as error:
        sys.exit('Configuration error: %s' % error)
    except (survival.TrainingStopped, cluster.NodeLost) as error:
        sys.exit(str(error))
    print('Exiting...')


if __name__ == '__main__':
    main(sys.argv)
