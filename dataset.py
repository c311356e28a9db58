"""Datasets with one interface: `shape` [C,H,W], `resolution_log2`, `dynamic_range`,
`label_size`, `label_dtype`, `configure(minibatch_size, lod)`, `get_minibatch_tf()` /
`get_minibatch_np(minibatch_size, lod)` yielding NCHW uint8 images of the current LOD with their
labels, and `get_random_labels_tf/np(minibatch_size)`."""

import glob
import os

import numpy as np

import augment
import tfutil
from tf_compat import tf

# ----------------------------------------------------------------------------
# TFRecords in the original multi-LOD layout: <name>-r02.tfrecords ... <name>-rNN.tfrecords, one
# file per log2 resolution, each record a tf.train.Example with 'shape' [C,H,W] and 'data' bytes.


def parse_tfrecord_tf(record):
    features = tf.parse_single_example(record, features={
        'shape': tf.FixedLenFeature([3], tf.int64),
        'data': tf.FixedLenFeature([], tf.string)})
    data = tf.decode_raw(features['data'], tf.uint8)
    return tf.reshape(data, features['shape'])


def parse_tfrecord_np(record):
    example = tf.train.Example()
    example.ParseFromString(record)
    shape = example.features.feature['shape'].int64_list.value
    data = example.features.feature['data'].bytes_list.value[0]
    return np.frombuffer(data, np.uint8).reshape(shape)


class GraphDataset:
    """A dataset whose minibatches come from its TF graph: numpy minibatches run that graph."""
    _tf_minibatch_np = None

    def get_minibatch_np(self, minibatch_size, lod=0):
        self.configure(minibatch_size, lod)
        if self._tf_minibatch_np is None:
            self._tf_minibatch_np = self.get_minibatch_tf()
        return tfutil.run(self._tf_minibatch_np)

    def close(self):
        """Nothing to release: tf.data owns the readers and ends with the graph."""


class TFRecordDataset(GraphDataset):
    def __init__(self,
                 tfrecord_dir,          # Directory containing a collection of tfrecords files.
                 resolution=None,       # Dataset resolution, None = autodetect.
                 label_file=None,       # Relative path of the labels file, None = autodetect.
                 max_label_size=0,      # 0 = no labels, 'full' = full labels, <int> = N first label components.
                 repeat=True,           # Repeat dataset indefinitely.
                 shuffle_mb=4096,       # Shuffle data within specified window (megabytes), 0 = disable shuffling.
                 prefetch_mb=2048,      # Amount of data to prefetch (megabytes), 0 = disable prefetching.
                 buffer_mb=256,         # Read buffer size (megabytes).
                 num_threads=2):        # Number of concurrent threads.
        self.tfrecord_dir = tfrecord_dir
        self.dtype = 'uint8'
        self.dynamic_range = [0, 255]
        self._cur_minibatch = -1
        self._cur_lod = -1

        tfr_files, tfr_shapes = self._inspect_files()
        self.label_file = self._find_label_file(label_file)
        max_shape = max(tfr_shapes, key=np.prod)
        self.resolution = resolution if resolution is not None else max_shape[1]
        self.resolution_log2 = int(np.log2(self.resolution))
        self.shape = [max_shape[0], self.resolution, self.resolution]
        tfr_lods = [self.resolution_log2 - int(np.log2(shape[1])) for shape in tfr_shapes]
        self._check_shapes(tfr_shapes, tfr_lods)
        self._np_labels = self._load_labels(max_label_size)
        self.label_size = self._np_labels.shape[1]
        self.label_dtype = self._np_labels.dtype.name

        with tf.name_scope('Dataset'), tf.device('/cpu:0'):
            self._tf_minibatch_in = tf.placeholder(tf.int64, name='minibatch_in', shape=[])
            self._tf_labels_var = tf.Variable(tf.zeros(self._np_labels.shape, self._np_labels.dtype), name='labels_var')
            tfutil.set_vars({self._tf_labels_var: self._np_labels})
            labels_dataset = tf.data.Dataset.from_tensor_slices(self._tf_labels_var)
            self._tf_datasets = {}
            for tfr_file, tfr_shape, tfr_lod in zip(tfr_files, tfr_shapes, tfr_lods):
                if tfr_lod < 0:
                    continue
                dset = tf.data.TFRecordDataset(tfr_file, compression_type='', buffer_size=buffer_mb << 20)
                dset = dset.map(parse_tfrecord_tf, num_parallel_calls=num_threads)
                dset = tf.data.Dataset.zip((dset, labels_dataset))
                bytes_per_item = int(np.prod(tfr_shape)) * np.dtype(self.dtype).itemsize
                if shuffle_mb > 0:
                    dset = dset.shuffle(((shuffle_mb << 20) - 1) // bytes_per_item + 1)
                if repeat:
                    dset = dset.repeat()
                if prefetch_mb > 0:
                    dset = dset.prefetch(((prefetch_mb << 20) - 1) // bytes_per_item + 1)
                self._tf_datasets[tfr_lod] = dset.batch(self._tf_minibatch_in)
            first = self._tf_datasets[0]
            self._tf_iterator = tf.data.Iterator.from_structure(
                tf.data.get_output_types(first), tf.data.get_output_shapes(first))
            self._tf_init_ops = {lod: self._tf_iterator.make_initializer(dset) for lod, dset in self._tf_datasets.items()}

    def _inspect_files(self):
        if not os.path.isdir(self.tfrecord_dir):
            raise IOError('TFRecord dataset folder "%s" does not exist' % self.tfrecord_dir)
        tfr_files = sorted(glob.glob(os.path.join(self.tfrecord_dir, '*.tfrecords')))
        if not tfr_files:
            raise IOError('No *.tfrecords files in "%s"' % self.tfrecord_dir)
        tfr_shapes = []
        for tfr_file in tfr_files:
            record = next(iter(tf.python_io.tf_record_iterator(tfr_file)), None)
            if record is None:
                raise IOError('TFRecord file "%s" is empty' % tfr_file)
            tfr_shapes.append(parse_tfrecord_np(record).shape)
        return tfr_files, tfr_shapes

    def _find_label_file(self, label_file):
        if label_file is None:
            guess = sorted(glob.glob(os.path.join(self.tfrecord_dir, '*.labels')))
            return guess[0] if guess else None
        if not os.path.isfile(label_file) and os.path.isfile(os.path.join(self.tfrecord_dir, label_file)):
            return os.path.join(self.tfrecord_dir, label_file)
        return label_file

    def _check_shapes(self, tfr_shapes, tfr_lods):
        problems = []
        if not all(shape[0] == self.shape[0] for shape in tfr_shapes):
            problems.append('channel counts differ between files')
        if not all(shape[1] == shape[2] for shape in tfr_shapes):
            problems.append('images are not square')
        if not all(shape[1] == self.resolution // (2 ** lod) for shape, lod in zip(tfr_shapes, tfr_lods)):
            problems.append('resolutions are not powers of two of each other')
        missing = [lod for lod in range(self.resolution_log2 - 1) if lod not in tfr_lods]
        if missing:
            problems.append('no file for LODs %s' % missing)
        if problems:
            raise ValueError('TFRecord dataset "%s": %s' % (self.tfrecord_dir, '; '.join(problems)))

    def _load_labels(self, max_label_size):
        assert max_label_size == 'full' or max_label_size >= 0
        labels = np.zeros([1 << 20, 0], dtype=np.float32)
        if self.label_file is not None and max_label_size != 0:
            labels = np.load(self.label_file)
            if labels.ndim != 2:
                raise ValueError('Label file "%s" must hold a 2-D array' % self.label_file)
        if max_label_size != 'full' and labels.shape[1] > max_label_size:
            labels = labels[:, :max_label_size]
        return labels

    def configure(self, minibatch_size, lod=0):
        """Use minibatches of this size from the tfrecords of floor(lod)."""
        lod = int(np.floor(lod))
        assert minibatch_size >= 1 and lod in self._tf_datasets
        if self._cur_minibatch != minibatch_size or self._cur_lod != lod:
            self._tf_init_ops[lod].run({self._tf_minibatch_in: minibatch_size})
            self._cur_minibatch = minibatch_size
            self._cur_lod = lod

    def get_minibatch_tf(self):
        return self._tf_iterator.get_next()

    def get_random_labels_tf(self, minibatch_size):
        if self.label_size > 0:
            indices = tf.random_uniform([minibatch_size], 0, self._np_labels.shape[0], dtype=tf.int32)
            return tf.gather(self._tf_labels_var, indices)
        return tf.zeros([minibatch_size, 0], self.label_dtype)

    def get_random_labels_np(self, minibatch_size):
        if self.label_size > 0:
            return self._np_labels[np.random.randint(self._np_labels.shape[0], size=[minibatch_size])]
        return np.zeros([minibatch_size, 0], self.label_dtype)


# ----------------------------------------------------------------------------
# Synthetic data: constant images, for measuring the training loop without data costs.


class SyntheticDataset(GraphDataset):
    def __init__(self, resolution=1024, num_channels=3, dtype='uint8', dynamic_range=[0, 255],
                 label_size=0, label_dtype='float32'):
        self.resolution = resolution
        self.resolution_log2 = int(np.log2(resolution))
        self.shape = [num_channels, resolution, resolution]
        self.dtype = dtype
        self.dynamic_range = dynamic_range
        self.label_size = label_size
        self.label_dtype = label_dtype
        self._tf_minibatch_var = None
        self._tf_lod_var = None
        self._tf_labels_np = None
        assert self.resolution == 2 ** self.resolution_log2
        with tf.name_scope('Dataset'), tf.device('/cpu:0'):
            self._tf_minibatch_var = tf.Variable(np.int32(0), name='minibatch_var')
            self._tf_lod_var = tf.Variable(np.int32(0), name='lod_var')
        tfutil.init_uninited_vars([self._tf_minibatch_var, self._tf_lod_var])

    def configure(self, minibatch_size, lod=0):
        lod = int(np.floor(lod))
        assert minibatch_size >= 1 and 0 <= lod <= self.resolution_log2
        tfutil.set_vars({self._tf_minibatch_var: minibatch_size, self._tf_lod_var: lod})

    def get_minibatch_tf(self):
        with tf.name_scope('SyntheticDataset'):
            shrink = tf.cast(2.0 ** tf.cast(self._tf_lod_var, tf.float32), tf.int32)
            shape = [self.shape[0], self.shape[1] // shrink, self.shape[2] // shrink]
            return self._generate_images(self._tf_minibatch_var, shape), self._generate_labels(self._tf_minibatch_var)

    def get_random_labels_tf(self, minibatch_size):
        with tf.name_scope('SyntheticDataset'):
            return self._generate_labels(minibatch_size)

    def get_random_labels_np(self, minibatch_size):
        self.configure(minibatch_size)
        if self._tf_labels_np is None:
            self._tf_labels_np = self.get_random_labels_tf(self._tf_minibatch_var)
        return tfutil.run(self._tf_labels_np)

    def _generate_images(self, minibatch, shape):
        return tf.zeros([minibatch] + shape, self.dtype)

    def _generate_labels(self, minibatch):
        return tf.zeros([minibatch, self.label_size], self.label_dtype)


# ----------------------------------------------------------------------------
# Whole-slide images: random tissue patches streamed from a folder of slides (wsi.PatchSampler).


MAX_READ_AHEAD_MINIBATCHES = 8    # enough to keep every reader busy; more is work thrown away at a LOD change


class WSIDataset:
    def __init__(self,
                 tfrecord_dir,              # Folder of slides (named so for config compatibility).
                 wsi_ext='.svs',            # Slide extension, or a list of them.
                 resolution=512,            # Patch size at LOD 0.
                 downsample=4,              # Level-0 pixels per patch pixel at LOD 0.
                 label_file=None,           # CSV of (slide file name, class); relative to the folder if not found.
                 max_label_size=0,          # 0 = no labels, 'full' = all classes, <int> = first N classes.
                 repeat=True,               # Kept for config compatibility: patches are drawn endlessly.
                 shuffle_mb=0,              # Kept for config compatibility: patches are random already.
                 prefetch_mb=64,            # Patches read ahead of training, in megabytes (at most 8 minibatches).
                 buffer_mb=0,               # Kept for config compatibility.
                 num_threads=None,          # Reader threads; None = one per core.
                 recursive=False,           # Also look for slides in subfolders?
                 mask_cache_dir=None,       # Where tissue masks are cached; None = the user cache dir.
                 augment=0.0,               # Probability of colour + warp augmentation per patch (in the graph).
                 rotate90=False,            # Random 90-degree rotations?
                 min_tissue_fraction=0.01,  # Slides with less tissue are left out.
                 weight_by_tissue=False,    # Choose slides by tissue area rather than uniformly?
                 create_demo=False,         # Write the demo slides into the folder if it has none.
                 seed=None):
        import wsi
        if create_demo and not (os.path.isdir(tfrecord_dir) and wsi.find_slides(tfrecord_dir, wsi_ext)):
            print('Creating demo slides in "%s"...' % tfrecord_dir)
            wsi.create_demo_slides(tfrecord_dir)
        if label_file is not None and not os.path.isfile(label_file) and os.path.isfile(os.path.join(tfrecord_dir, label_file)):
            label_file = os.path.join(tfrecord_dir, label_file)
        self.sampler = wsi.PatchSampler(
            tfrecord_dir, wsi_ext=wsi_ext, resolution=resolution, downsample=downsample, label_file=label_file,
            max_label_size=max_label_size, recursive=recursive, mask_cache_dir=mask_cache_dir, rotate90=rotate90,
            min_tissue_fraction=min_tissue_fraction, weight_by_tissue=weight_by_tissue,
            num_threads=num_threads, seed=seed)
        self.tfrecord_dir = tfrecord_dir
        self.resolution = resolution
        self.resolution_log2 = self.sampler.resolution_log2
        self.shape = list(self.sampler.shape)
        self.dtype = 'uint8'
        self.dynamic_range = [0, 255]
        self.label_size = self.sampler.label_size
        self.label_dtype = 'float32'
        self.augment = float(augment)
        self._prefetch_mb = prefetch_mb
        self._feed = None               # The sampler's read-ahead generator for the current setting.
        self._cur_setting = None        # (minibatch_size, lod) of the feed.

    def configure(self, minibatch_size, lod=0):
        """Read minibatches of this size at floor(lod) from now on."""
        setting = (int(minibatch_size), int(np.floor(lod)))
        if setting != self._cur_setting:
            if self._feed is not None:
                self._feed.close()      # Stops its reader; nothing stale reaches training.
            minibatch_bytes = setting[0] * int(np.prod(self.shape)) >> (2 * setting[1])
            depth = int(np.clip((self._prefetch_mb << 20) // max(minibatch_bytes, 1), 2, MAX_READ_AHEAD_MINIBATCHES))
            self._feed = self.sampler.batches(setting[1], setting[0], prefetch=depth)
            self._cur_setting = setting

    def _next_minibatch(self):
        images, classes = next(self._feed)
        return images, self.sampler.labels_onehot(classes)

    def get_minibatch_tf(self):
        """Tensors that take the next minibatch of the current setting each time they are run.

        A numpy_function only pops the reader's queue (reading happens in the sampler's threads,
        without the GIL), and reading ahead stays in that one queue, so a new LOD or minibatch
        size takes effect at the next run."""
        with tf.name_scope('WSIDataset'), tf.device('/cpu:0'):
            images, labels = tf.numpy_function(self._next_minibatch, [], [tf.uint8, tf.float32], stateful=True)
            images.set_shape([None] + self.shape[:1] + [None, None])
            labels.set_shape([None, self.label_size])
            return images, labels

    def augment_minibatch_tf(self, images):
        """Training-time colour + warp augmentation of a minibatch (float32 out), built where the
        caller places it: train.py puts it on each GPU. Minibatches taken otherwise (snapshot
        grids, metrics) stay unaugmented."""
        return augment.augment_minibatch(images, self.augment, self.dynamic_range) if self.augment > 0 else images

    def get_minibatch_np(self, minibatch_size, lod=0):
        images, classes = self.sampler.sample(int(np.floor(lod)), minibatch_size)
        return images, self.sampler.labels_onehot(classes)

    def get_random_labels_tf(self, minibatch_size):
        if self.label_size == 0:
            return tf.zeros([minibatch_size, 0], self.label_dtype)
        with tf.name_scope('WSIDataset'), tf.device('/cpu:0'):
            labels = tf.numpy_function(lambda n: self.sampler.random_labels(int(n)), [minibatch_size], tf.float32,
                                       stateful=True)
            labels.set_shape([None, self.label_size])
            return labels

    def get_random_labels_np(self, minibatch_size):
        return self.sampler.random_labels(minibatch_size)

    def write_overview(self, result_subdir):
        """Pictures of what is sampled from each slide, into the run directory."""
        self.sampler.write_overview(os.path.join(result_subdir, 'slide-overviews'))

    def close(self):
        if self._feed is not None:
            self._feed.close()
        self.sampler.close()


# ----------------------------------------------------------------------------


def load_dataset(class_name='dataset.TFRecordDataset', data_dir=None, verbose=False, **kwargs):
    """A dataset by class name; `tfrecord_dir` is taken relative to data_dir."""
    adjusted_kwargs = dict(kwargs)
    if 'tfrecord_dir' in adjusted_kwargs and data_dir is not None:
        adjusted_kwargs['tfrecord_dir'] = os.path.join(data_dir, adjusted_kwargs['tfrecord_dir'])
    if verbose:
        print('Streaming data using %s...' % class_name)
    dataset = tfutil.import_obj(class_name)(**adjusted_kwargs)
    if verbose:
        print('Dataset shape =', np.int32(dataset.shape).tolist())
        print('Dynamic range =', dataset.dynamic_range)
        print('Label size    =', dataset.label_size)
    return dataset
