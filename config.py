"""Global configuration. Edit the lines below (uncomment a dataset, a preset, a switch or a
utility script), then run `python train.py`. `python train.py other_config.py` runs another file
of this shape instead."""

# ----------------------------------------------------------------------------


class EasyDict(dict):
    """A dict whose keys read and write as attributes too (`G.fmap_base = 256`), which keeps the
    one-line settings below short. A missing key raises AttributeError, so getattr() defaults work."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


# ----------------------------------------------------------------------------
# Where things live, relative to the folder you start train.py from.

data_dir = 'datasets'
result_dir = 'results'
inception_dir = None        # Only FID and IS need it: folder of classify_image_graph_def.pb; None looks in the cache.

# ----------------------------------------------------------------------------
# TensorFlow session and process environment (rarely edited).

tf_config = EasyDict()      # Session fields as 'group.field' keys; tfutil.init_tf() applies them.
env = EasyDict()            # Copied into os.environ by train.py before the session starts.

tf_config['graph_options.place_pruned_graph'] = True    # Place only the ops a run uses, so ops that cannot run on this device do not stop it.
#tf_config['gpu_options.allow_growth']          = False  # True: take GPU memory bit by bit, e.g. when sharing a GPU; False grabs it all at start.
#env.CUDA_VISIBLE_DEVICES                       = '0'    # Which GPUs this run may see, e.g. '0,1'; unset means all of them.
env.TF_CPP_MIN_LOG_LEVEL                        = '1'    # '1' hides TensorFlow's info chatter and keeps its warnings and errors.

# Several machines (README, "Training on several machines"): TF_CONFIG set on each node joins them
# into one run. A node that hears nothing from the others for `timeout` seconds stops and names them
# (the chief's snapshot writing must fit in it); start-up, while each node reads its slides and
# builds its graph, may take up to `startup_timeout`. Ignored without TF_CONFIG.
cluster = EasyDict(timeout=300, startup_timeout=1800)

# ----------------------------------------------------------------------------
# A training run: one line from each group below (dataset, preset, precision) plus any switches.
# kimg counts thousands of real patches shown to the discriminator; it is the unit of progress.

desc        = 'pgan'                                        # Start of the run's folder name; each chosen line appends its tag.
random_seed = 1000                                          # Seeds NumPy at start, e.g. the snapshot grid's latents.
dataset     = EasyDict()                                    # Arguments of dataset.load_dataset(): where the images come from.
train       = EasyDict(func='train.train_progressive_gan')  # What train.py runs, with its arguments (training or a utility script).
G           = EasyDict(func='networks.G_paper')             # Generator build function and its options.
D           = EasyDict(func='networks.D_paper')             # Discriminator build function and its options.
G_opt       = EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8) # Adam settings for G; beta1=0 (no momentum) as in the paper.
D_opt       = EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8) # Adam settings for D, the same as G's.
G_loss      = EasyDict(func='loss.G_wgan_acgan')            # G's objective: Wasserstein loss, plus a class term with labels.
D_loss      = EasyDict(func='loss.D_wgangp_acgan')          # D's: Wasserstein loss, gradient penalty, class term.
sched       = EasyDict()                                    # train.TrainingSchedule: when to grow, minibatch and rate per resolution.
grid        = EasyDict(size='1080p', layout='random')       # The fakesNNNNNN.png/reals.png mosaic: screen size and order.

# Dataset (choose one). tfrecord_dir is the slide folder under data_dir; a patch is `resolution`
# pixels square, read at `downsample` level-0 (full-scan) pixels per patch pixel, so it covers
# resolution * downsample level-0 pixels: 512 * 4 = 2048 px, about 0.5 mm on a 40x scan (0.25 um/px).
# mirror_augment adds random left-right flips, harmless for tissue, which has no handedness.
# demowsi: three small synthetic slides, written on first use (32-px patches, a 256-px field);
# -wsi: your folder of .svs scans; -wsi-labels: plus a CSV of (slide file, class) for the -cond lines;
# -kidney-256: two scanner formats, half the patches colour/warp-augmented, random quarter turns.
# -wsi-cohort: 512 um per patch whatever the scanner's MPP, only QuPath 'Tumor' regions, Macenko stain (README).
desc += '-demowsi';         dataset = EasyDict(class_name='dataset.WSIDataset', tfrecord_dir='demo-wsi', wsi_ext=['.svs', '.tif'], resolution=32, downsample=8, create_demo=True); train.mirror_augment = True
#desc += '-wsi';             dataset = EasyDict(class_name='dataset.WSIDataset', tfrecord_dir='my-slides', wsi_ext='.svs', resolution=512, downsample=4); train.mirror_augment = True
#desc += '-wsi-labels';      dataset = EasyDict(class_name='dataset.WSIDataset', tfrecord_dir='my-slides', wsi_ext='.svs', resolution=512, downsample=4, label_file='my-slides/labels.csv'); train.mirror_augment = True
#desc += '-kidney-256';      dataset = EasyDict(class_name='dataset.WSIDataset', tfrecord_dir='kidney-biopsies', wsi_ext=['.svs', '.ndpi'], resolution=256, downsample=2, augment=0.5, rotate90=True); train.mirror_augment = True
#desc += '-wsi-cohort';      dataset = EasyDict(class_name='dataset.WSIDataset', tfrecord_dir='my-slides', wsi_ext=['.svs', '.ndpi'], resolution=512, patch_um=512, roi_dir='datasets/my-rois', roi_labels=['Tumor'], stain_norm='macenko'); train.mirror_augment = True
# Image benchmarks of the ProGAN paper and your own images, as TFRecords made by dataset_tool.py;
# then random images of a given size, to time the networks without reading anything.
#desc += '-celebahq';        dataset = EasyDict(tfrecord_dir='celebahq'); train.mirror_augment = True    # faces, 1024 px
#desc += '-celeba';          dataset = EasyDict(tfrecord_dir='celeba'); train.mirror_augment = True    # faces, 128 px
#desc += '-cifar10';         dataset = EasyDict(tfrecord_dir='cifar10')    # 32-px photos, 10 classes
#desc += '-mnist';           dataset = EasyDict(tfrecord_dir='mnist')    # 28-px digits padded to 32
#desc += '-tfrecords';       dataset = EasyDict(tfrecord_dir='my-tfrecords')
#desc += '-syn1024rgb';      dataset = EasyDict(class_name='dataset.SyntheticDataset', resolution=1024, num_channels=3)    # timing only

# Slide labels and the snapshot grid (optional). The -cond lines need a label_file (see -wsi-labels):
# G then draws patches of a requested class and D also learns to tell the class of a patch.
#desc += '-cond'; dataset.max_label_size = 'full' # condition on every class of the CSV
#desc += '-cond1'; dataset.max_label_size = 1 # condition on the first class only (present or not)
#desc += '-g4k'; grid.size = '4k'             # grid images fill a 3840x2160 screen instead of 1920x1080
#desc += '-grpc'; grid.layout = 'row_per_class' # one class per grid row, to compare classes by eye

# Preset (choose one): GPU count, network width and the schedule. Minibatch sizes are totals split
# evenly over the GPUs; minibatch_dict sets them per resolution: large for small images, small for big.
# cpu-demo: small networks for the demo slides on a CPU (5 kimg to settle each size, 5 to fade in the next).
desc += '-preset-cpu-demo'; num_gpus = 1; G.fmap_base = 256; G.fmap_max = 64; G.latent_size = 64; D.fmap_base = 256; D.fmap_max = 64; sched.lod_initial_resolution = 4; sched.lod_training_kimg = 5; sched.lod_transition_kimg = 5; sched.minibatch_base = 16; sched.tick_kimg_base = 2.5; sched.tick_kimg_dict = {}; train.total_kimg = 40; train.G_smoothing = 0.99; train.network_snapshot_ticks = 4; grid.size = '8x6'
# v1: the paper's first schedule on one GPU: 800 kimg to settle each resolution and 800 to fade in
# the next, 19 million patches in all; D compares statistics over groups of 16 patches.
#desc += '-preset-v1-1gpu'; num_gpus = 1; D.mbstd_group_size = 16; sched.minibatch_base = 16; sched.minibatch_dict = {256: 14, 512: 6, 1024: 3}; sched.lod_training_kimg = 800; sched.lod_transition_kimg = 800; train.total_kimg = 19000    # v1, 1 GPU
# v2: the faster later schedule for 1, 2, 4 or 8 GPUs: 600-kimg phases, big minibatches at low
# resolution, higher learning rates at the top resolutions, 12 million patches in all.
#desc += '-preset-v2-1gpu'; num_gpus = 1; sched.minibatch_base = 4; sched.minibatch_dict = {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4}; sched.G_lrate_dict = {1024: 0.0015}; sched.D_lrate_dict = EasyDict(sched.G_lrate_dict); train.total_kimg = 12000
#desc += '-preset-v2-2gpus'; num_gpus = 2; sched.minibatch_base = 8; sched.minibatch_dict = {4: 256, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8}; sched.G_lrate_dict = {512: 0.0015, 1024: 0.002}; sched.D_lrate_dict = EasyDict(sched.G_lrate_dict); train.total_kimg = 12000    # v2, 2 GPUs
#desc += '-preset-v2-4gpus'; num_gpus = 4; sched.minibatch_base = 16; sched.minibatch_dict = {4: 512, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16}; sched.G_lrate_dict = {256: 0.0015, 512: 0.002, 1024: 0.003}; sched.D_lrate_dict = EasyDict(sched.G_lrate_dict); train.total_kimg = 12000    # v2, 4 GPUs
#desc += '-preset-v2-8gpus'; num_gpus = 8; sched.minibatch_base = 32; sched.minibatch_dict = {4: 512, 8: 256, 16: 128, 32: 64, 64: 32}; sched.G_lrate_dict = {128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003}; sched.D_lrate_dict = EasyDict(sched.G_lrate_dict); train.total_kimg = 12000    # v2, 8 GPUs

# Precision (choose one). fp32 is safe everywhere; the cap keeps large patches within GPU memory.
# fp16 halves memory and is faster on GPUs with half-precision units; it scales the losses so small
# gradients do not round to zero, and needs a larger epsilon in G's pixel normalisation.
desc += '-fp32'; sched.max_minibatch_per_gpu = {256: 16, 512: 8, 1024: 4}
#desc += '-fp16'; G.dtype = 'float16'; D.dtype = 'float16'; G.pixelnorm_epsilon=1e-4; G_opt.use_loss_scaling = True; D_opt.use_loss_scaling = True; sched.max_minibatch_per_gpu = {512: 16, 1024: 8}    # half precision

# Switches that each turn one of ProGAN's ideas off, to see what it contributes (ablations).
# -nogrowing: no progressive growing; train at the full patch size from the first step.
#desc += '-nogrowing'; sched.lod_initial_resolution = 1024; sched.lod_training_kimg = 0; sched.lod_transition_kimg = 0; train.total_kimg = 10000    # full size from the start
#desc += '-nopixelnorm'; G.use_pixelnorm = False    # G's features are not rescaled to unit length per pixel
#desc += '-nowscale'; G.use_wscale = False; D.use_wscale = False    # plain weight init, no per-layer rate equalising
#desc += '-noleakyrelu'; G.use_leakyrelu = False    # G uses plain ReLU (zero slope below zero)
#desc += '-nosmoothing'; train.G_smoothing = 0.0    # Gs (snapshots, scripts) is G itself, not its running average
#desc += '-norepeat'; train.minibatch_repeats = 1   # schedule rechecked after every minibatch instead of every 4
#desc += '-noreset'; train.reset_opt_for_new_lod = False    # Adam keeps its moments when a new resolution comes in
# -fullres: every LOD trains on full-resolution images (the original's way): the same losses, but early phases cost as much as the last.
#desc += '-fullres'; train.full_resolution_graph = True    # reals and fakes enlarged to full size, D pools them back down

# Disk space: keep only the newest few network-snapshot-*.pkl (network-final.pkl always stays).
#train.network_snapshot_keep = 3    # None, the default, keeps every snapshot

# Special modes for measuring and debugging, not for real training.
# BENCHMARK: 3 kimg per phase through every resolution, no snapshots, to time each; BENCHMARK0: 10 kimg at full size.
#desc += '-BENCHMARK'; sched.lod_initial_resolution = 4; sched.lod_training_kimg = 3; sched.lod_transition_kimg = 3; train.total_kimg = (8*2+1)*3; sched.tick_kimg_base = 1; sched.tick_kimg_dict = {}; train.image_snapshot_ticks = 1000; train.network_snapshot_ticks = 1000    # time each phase
#desc += '-BENCHMARK0'; sched.lod_initial_resolution = 1024; train.total_kimg = 10; sched.tick_kimg_base = 1; sched.tick_kimg_dict = {}; train.image_snapshot_ticks = 1000; train.network_snapshot_ticks = 1000    # time the full size
# VERBOSE: a tick line and an image grid every kimg; GRAPH, HIST: the graph or weight histograms in TensorBoard.
#desc += '-VERBOSE'; sched.tick_kimg_base = 1; sched.tick_kimg_dict = {}; train.image_snapshot_ticks = 1; train.network_snapshot_ticks = 100    # report every kimg
#desc += '-GRAPH'; train.save_tf_graph = True    # graph in TensorBoard
#desc += '-HIST'; train.save_weight_histograms = True    # weight histograms

# ----------------------------------------------------------------------------
# Utility scripts: uncomment one line and run train.py; its output goes to a new results folder.
# run_id names the trained run to use: its number (23 = results/023-*), its folder or a .pkl path.

# Generated patches: 1000 single PNGs; then 10 PNG mosaics of 15x8 patches, each shrunk 4x.
#train = EasyDict(func='util_scripts.generate_fake_images', run_id=23, num_pngs=1000); num_gpus = 1; desc = 'fake-images-' + str(train.run_id)    # single PNGs
#train = EasyDict(func='util_scripts.generate_fake_images', run_id=23, grid_size=[15,8], num_pngs=10, image_shrink=4); num_gpus = 1; desc = 'fake-grids-' + str(train.run_id)    # PNG mosaics
# Videos: a 60-s smooth walk through G's latent space; the run's progress from its fakes*.png.
#train = EasyDict(func='util_scripts.generate_interpolation_video', run_id=23, grid_size=[1,1], duration_sec=60.0, smoothing_sec=1.0); num_gpus = 1; desc = 'interpolation-video-' + str(train.run_id)    # latent walk MP4
#train = EasyDict(func='util_scripts.generate_training_video', run_id=23, duration_sec=20.0); num_gpus = 1; desc = 'training-video-' + str(train.run_id)    # progress MP4

# Image-quality metrics for every snapshot of a run against real patches of its dataset; one row per
# snapshot in the named log. real_passes=2 also scores reals against reals, the floor to compare with.
#train = EasyDict(func='util_scripts.evaluate_metrics', run_id=23, log='metric-swd-16k.txt', metrics=['swd'], num_images=16384, real_passes=2); num_gpus = 1; desc = train.func + '-' + str(train.run_id)
#train = EasyDict(func='util_scripts.evaluate_metrics', run_id=23, log='metric-fid-10k.txt', metrics=['fid'], num_images=10000, real_passes=1); num_gpus = 1; desc = train.func + '-' + str(train.run_id)
#train = EasyDict(func='util_scripts.evaluate_metrics', run_id=23, log='metric-fid-50k.txt', metrics=['fid'], num_images=50000, real_passes=1); num_gpus = 1; desc = train.func + '-' + str(train.run_id)
#train = EasyDict(func='util_scripts.evaluate_metrics', run_id=23, log='metric-is-50k.txt', metrics=['is'], num_images=50000, real_passes=1); num_gpus = 1; desc = train.func + '-' + str(train.run_id)
#train = EasyDict(func='util_scripts.evaluate_metrics', run_id=23, log='metric-msssim-20k.txt', metrics=['msssim'], num_images=20000, real_passes=1); num_gpus = 1; desc = train.func + '-' + str(train.run_id)

# ----------------------------------------------------------------------------
