"""The datasets training reads from. Each yields NCHW uint8 minibatches at the current level of
detail (LOD k: images 2**k times smaller per side than `shape`) together with their labels, and
shares the interface of `Dataset`, which train.py, loss.py and util_scripts.py rely on.

Op creation order matters here: with a graph-level seed, TF derives each random op's seed from
the number of ops made before it, so the datasets build their ops in a fixed order."""

import glob
import os

import numpy as np

import augment
import tfutil
from tf_compat import tf

INPUT_DEVICE = '/cpu:0'           # input pipelines stay on the host, whichever devices train
MAX_READ_AHEAD_MINIBATCHES = 8    # enough to keep every reader busy; more is work thrown away at a LOD change


class Dataset:
    """What every dataset offers, with the behaviour most datasets share as the default.

    A subclass sets `shape` [C,H,W], `resolution`, `resolution_log2`, `dtype`, `dynamic_range`,
    `label_size` and `label_dtype`, provides `get_minibatch_tf()`, and reacts to a new minibatch
    size or LOD in `_apply_setting`. The defaults: no labels beyond zeros, no augmentation, no
    overview pictures, nothing to release on `close()`."""

    _setting = None             # (minibatch size, integer LOD) applied by the last configure().
    _np_minibatch = None        # The tensors get_minibatch_np runs; made on first use.

    @property
    def max_lod(self):
        """The coarsest LOD the dataset can serve."""
        return self.resolution_log2

    def configure(self, minibatch_size, lod=0):
        """Serve minibatches of minibatch_size images at LOD floor(lod) from now on."""
        setting = (int(minibatch_size), int(np.floor(lod)))
        self._check_setting(*setting)
        if setting != self._setting:
            self._apply_setting(*setting)
            self._setting = setting

    def _check_setting(self, minibatch_size, lod):
        if minibatch_size < 1:
            raise ValueError('A minibatch needs at least one image; got a minibatch size of %d' % minibatch_size)
        if not 0 <= lod <= self.max_lod:
            raise ValueError('%s serves LODs 0..%d (images of %d down to %d pixels); LOD %d is outside that' % (
                type(self).__name__, self.max_lod, self.resolution, self.resolution >> self.max_lod, lod))

    def _apply_setting(self, minibatch_size, lod):
        """Make get_minibatch_tf's tensors deliver this setting; nothing to do by default."""

    def get_minibatch_tf(self):
        raise NotImplementedError('%s must say how its minibatches reach the graph' % type(self).__name__)

    def get_minibatch_np(self, minibatch_size, lod=0):
        """The next minibatch (images, labels) as numpy arrays, by running get_minibatch_tf's tensors."""
        self.configure(minibatch_size, lod)
        if self._np_minibatch is None:
            self._np_minibatch = self.get_minibatch_tf()    # Once: each call would add ops to the graph.
        return tfutil.run(self._np_minibatch)

    def get_random_labels_tf(self, minibatch_size):
        """Labels to condition fakes on; all zeros unless the dataset has real ones."""
        return tf.zeros([minibatch_size, self.label_size], self.label_dtype)

    def get_random_labels_np(self, minibatch_size):
        return np.zeros([minibatch_size, self.label_size], self.label_dtype)

    def augment_minibatch_tf(self, images):
        """Training-time augmentation of a minibatch of reals; by default none, and no ops."""
        return images

    def write_overview(self, result_subdir, pictures=True):
        """Pictures of where the data comes from, into the run directory (pictures=False: a resumed
        run, whose first run has them); by default none."""

    def tick_report(self):
        """Lines to print at the end of each training tick (e.g. read problems); by default none."""
        return []

    def close(self):
        """Release readers and files; by default there are none (tf.data's end with the graph)."""


def check_max_label_size(max_label_size):
    is_count = isinstance(max_label_size, (int, np.integer)) and not isinstance(max_label_size, bool)
    if max_label_size != 'full' and not (is_count and max_label_size >= 0):
        raise ValueError("dataset.max_label_size must be 0 (no labels), 'full' (every label component) or a "
                         "positive number of leading label components to keep, not %r" % (max_label_size,))


# ----------------------------------------------------------------------------
# TFRecords as the original ProGAN wrote them: one file per resolution, <name>-r02.tfrecords
# (4x4) up to <name>-rNN.tfrecords, all holding the same images in the same order, each record
# a tf.train.Example with the image's 'shape' [C,H,W] and its raw uint8 pixels as 'data'.


def _image_features():
    return {'shape': tf.FixedLenFeature([3], tf.int64), 'data': tf.FixedLenFeature([], tf.string)}


def parse_tfrecord_tf(record):
    """A serialized example -> its uint8 [C,H,W] image tensor."""
    fields = tf.parse_single_example(record, features=_image_features())
    pixels = tf.decode_raw(fields['data'], tf.uint8)
    return tf.reshape(pixels, fields['shape'])


def parse_tfrecord_np(record):
    """A serialized example -> its uint8 [C,H,W] image array."""
    fields = tf.train.Example.FromString(record).features.feature
    pixels = np.frombuffer(fields['data'].bytes_list.value[0], np.uint8)
    return pixels.reshape(fields['shape'].int64_list.value)


def _items_in(megabytes, item_bytes):
    """How many items of item_bytes fill the given megabytes, rounded up."""
    return -(-(megabytes << 20) // item_bytes)


NO_LABELS_ROWS = 1 << 20    # Rows of the 0-wide label array zipped with unlabelled images.


class TFRecordDataset(Dataset):
    def __init__(self,
                 tfrecord_dir,          # Folder of the dataset's *.tfrecords files.
                 resolution=None,       # Full-resolution size; None takes the largest file's.
                 label_file=None,       # Numpy labels, a row per image; None uses the folder's *.labels, if any.
                 max_label_size=0,      # Label components to use: 0 none, 'full' all, N the first N.
                 repeat=True,           # Start over at the end of the records?
                 shuffle_mb=4096,       # Megabytes of images shuffled together; 0 keeps the file order.
                 prefetch_mb=2048,      # Megabytes of images read ahead of training; 0 reads on demand.
                 buffer_mb=256,         # Megabytes of each file's read buffer.
                 num_threads=2):        # Threads decoding records.
        check_max_label_size(max_label_size)
        self.tfrecord_dir = tfrecord_dir
        self.dtype = 'uint8'
        self.dynamic_range = [0, 255]
        files = self._list_files(tfrecord_dir)
        file_shapes = [self._first_image_shape(path) for path in files]
        self.label_file = self._find_label_file(label_file)
        largest = max(file_shapes, key=np.prod)
        self.resolution = largest[1] if resolution is None else resolution
        self.resolution_log2 = int(np.log2(self.resolution))
        self.shape = [largest[0], self.resolution, self.resolution]
        file_lods = [self.resolution_log2 - int(np.log2(shape[1])) for shape in file_shapes]
        self._check_shapes(file_shapes, file_lods)
        self._labels = self._load_labels(max_label_size, files[int(np.argmin([np.prod(s) for s in file_shapes]))])
        self.label_size = self._labels.shape[1]
        self.label_dtype = self._labels.dtype.name
        self._build_streams(files, file_shapes, file_lods, repeat, shuffle_mb, prefetch_mb, buffer_mb, num_threads)

    @staticmethod
    def _list_files(folder):
        if not os.path.isdir(folder):
            raise IOError('TFRecord dataset folder "%s" does not exist' % folder)
        files = sorted(glob.glob(os.path.join(folder, '*.tfrecords')))
        if not files:
            raise IOError('No *.tfrecords files in "%s"' % folder)
        return files

    @staticmethod
    def _first_image_shape(path):
        first = next(iter(tf.python_io.tf_record_iterator(path)), None)
        if first is None:
            raise IOError('TFRecord file "%s" is empty' % path)
        return parse_tfrecord_np(first).shape

    def _find_label_file(self, label_file):
        """The label file to use: a given path as is, or else relative to the dataset folder;
        without one, the first *.labels in the folder (or none)."""
        if label_file is None:
            found = sorted(glob.glob(os.path.join(self.tfrecord_dir, '*.labels')))
            return found[0] if found else None
        in_folder = os.path.join(self.tfrecord_dir, label_file)
        return in_folder if not os.path.isfile(label_file) and os.path.isfile(in_folder) else label_file

    def _check_shapes(self, file_shapes, file_lods):
        problems = []
        if any(shape[0] != self.shape[0] for shape in file_shapes):
            problems.append('channel counts differ between files')
        if any(shape[1] != shape[2] for shape in file_shapes):
            problems.append('images are not square')
        if any(shape[1] != self.resolution // 2 ** lod for shape, lod in zip(file_shapes, file_lods)):
            problems.append('resolutions are not powers of two of each other')
        missing = sorted(set(range(self.resolution_log2 - 1)) - set(file_lods))
        if missing:
            problems.append('no file for LODs %s' % missing)
        if problems:
            raise ValueError('TFRecord dataset "%s": %s' % (self.tfrecord_dir, '; '.join(problems)))

    def _load_labels(self, max_label_size, smallest_file):
        """[images, label components] array; 0 components when labels are off or missing."""
        if self.label_file is None or max_label_size == 0:
            return np.zeros([NO_LABELS_ROWS, 0], np.float32)
        labels = np.load(self.label_file)
        if labels.ndim != 2:
            raise ValueError('Label file "%s" must hold a 2-D array [images, label components], not shape %s'
                             % (self.label_file, list(labels.shape)))
        # Every file holds every image; the 4x4 one is the quickest to count.
        num_images = sum(1 for _ in tf.python_io.tf_record_iterator(smallest_file))
        if len(labels) != num_images:
            raise ValueError('Label file "%s" has %d rows but the dataset in "%s" has %d images; write the labels '
                             'again with the images (dataset_tool.py), or set dataset.max_label_size = 0 to train '
                             'without them' % (self.label_file, len(labels), self.tfrecord_dir, num_images))
        return labels if max_label_size == 'full' else labels[:, :max_label_size]

    def _build_streams(self, files, file_shapes, file_lods, *stream_options):
        """One minibatch stream per LOD, all of them pairing images with the labels of a shared
        variable, and one iterator the current LOD's stream is switched into."""
        with tf.name_scope('Dataset'), tf.device(INPUT_DEVICE):
            self._minibatch_size_in = tf.placeholder(tf.int64, name='minibatch_in', shape=[])
            self._labels_var = tf.Variable(tf.zeros(self._labels.shape, self._labels.dtype),
                                              name='labels_var')
            tfutil.set_vars({self._labels_var: self._labels})
            label_rows = tf.data.Dataset.from_tensor_slices(self._labels_var)
            self._streams = {}
            for path, shape, lod in zip(files, file_shapes, file_lods):
                if lod >= 0:    # Files larger than the chosen resolution are not used.
                    self._streams[lod] = self._minibatch_stream(path, shape, label_rows, *stream_options)
            full_size = self._streams[0]
            self._iterator = tf.data.Iterator.from_structure(
                tf.data.get_output_types(full_size), tf.data.get_output_shapes(full_size))
            self._switch_ops = {lod: self._iterator.make_initializer(stream)
                                 for lod, stream in self._streams.items()}

    def _minibatch_stream(self, path, shape, label_rows, repeat, shuffle_mb, prefetch_mb, buffer_mb, num_threads):
        records = tf.data.TFRecordDataset(path, compression_type='', buffer_size=buffer_mb << 20)
        images = records.map(parse_tfrecord_tf, num_parallel_calls=num_threads)
        stream = tf.data.Dataset.zip((images, label_rows))
        image_bytes = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
        if shuffle_mb > 0:
            stream = stream.shuffle(_items_in(shuffle_mb, image_bytes))
        if repeat:
            stream = stream.repeat()
        if prefetch_mb > 0:
            stream = stream.prefetch(_items_in(prefetch_mb, image_bytes))
        return stream.batch(self._minibatch_size_in)

    @property
    def max_lod(self):
        return max(self._streams)

    def _apply_setting(self, minibatch_size, lod):
        # Restarts the iterator on the LOD's stream: what it read ahead for the old setting is dropped.
        self._switch_ops[lod].run({self._minibatch_size_in: minibatch_size})

    def get_minibatch_tf(self):
        return self._iterator.get_next()

    def get_random_labels_tf(self, minibatch_size):
        if self.label_size == 0:
            return super().get_random_labels_tf(minibatch_size)
        rows = tf.random_uniform([minibatch_size], 0, len(self._labels), dtype=tf.int32)
        return tf.gather(self._labels_var, rows)

    def get_random_labels_np(self, minibatch_size):
        if self.label_size == 0:
            return super().get_random_labels_np(minibatch_size)
        return self._labels[np.random.randint(len(self._labels), size=[minibatch_size])]


# ----------------------------------------------------------------------------
# Synthetic data: all-zero images, for timing the training loop without any data cost.


class SyntheticDataset(Dataset):
    def __init__(self, resolution=1024, num_channels=3, dtype='uint8', dynamic_range=[0, 255],
                 label_size=0, label_dtype='float32'):
        self.resolution = resolution
        self.resolution_log2 = int(np.log2(resolution))
        if resolution != 2 ** self.resolution_log2:
            raise ValueError('SyntheticDataset resolution must be a power of two, not %r' % (resolution,))
        self.shape = [num_channels, resolution, resolution]
        self.dtype = dtype
        self.dynamic_range = dynamic_range
        self.label_size = label_size
        self.label_dtype = label_dtype
        # The setting lives in variables, so that one graph serves every minibatch size and LOD.
        with tf.name_scope('Dataset'), tf.device(INPUT_DEVICE):
            self._minibatch_size_var = tf.Variable(np.int32(0), name='minibatch_var')
            self._lod_var = tf.Variable(np.int32(0), name='lod_var')
        tfutil.init_uninited_vars([self._minibatch_size_var, self._lod_var])

    def _apply_setting(self, minibatch_size, lod):
        tfutil.set_vars({self._minibatch_size_var: minibatch_size, self._lod_var: lod})

    def get_minibatch_tf(self):
        with tf.name_scope('SyntheticDataset'):
            side_divisor = tf.cast(tf.pow(2.0, tf.cast(self._lod_var, tf.float32)), tf.int32)
            image_shape = [self.shape[0]] + [side // side_divisor for side in self.shape[1:]]
            images = tf.zeros([self._minibatch_size_var] + image_shape, self.dtype)
            labels = tf.zeros([self._minibatch_size_var, self.label_size], self.label_dtype)
            return images, labels


# ----------------------------------------------------------------------------
# Whole-slide images: random tissue patches streamed from a folder of slides (patch_sampler.PatchSampler).


class WSIDataset(Dataset):
    def __init__(self,
                 tfrecord_dir,              # The folder of slides (the name config.py has always used).
                 wsi_ext='.svs',            # File extension of the slides, or a list of extensions.
                 resolution=512,            # Patch side in pixels at LOD 0.
                 downsample=4,              # Slide pixels (at full magnification) per patch pixel at LOD 0.
                 label_file=None,           # CSV of slide file name and class, or the fork's .npy; also looked for in the folder.
                 max_label_size=0,          # Classes to use: 0 none, 'full' all, N the first N.
                 repeat=True,               # Unused: patches are drawn without end (accepted for old configs).
                 shuffle_mb=0,              # Unused: patches come in random order anyway.
                 prefetch_mb=64,            # Megabytes of patches read ahead of training (at most 8 minibatches).
                 buffer_mb=0,               # Unused (accepted for old configs).
                 num_threads=None,          # Former name of num_readers.
                 recursive=False,           # Search subfolders for slides too?
                 mask_cache_dir=None,       # Folder caching tissue masks; None = the user cache.
                 augment=0.0,               # Chance per patch of colour and warp augmentation (done in the graph).
                 rotate90=False,            # Rotate patches by random multiples of 90 degrees?
                 min_tissue_fraction=0.01,  # Slides with less tissue than this are skipped.
                 weight_by_tissue=False,    # Pick slides in proportion to their tissue area, not equally often?
                 create_demo=False,         # Write the demo slides missing from the folder when it holds no other slides.
                 seed=None,
                 patch_um=None,             # Instead of downsample: micrometres a patch covers; each slide's MPP sets its downsample.
                 default_mpp=None,          # With patch_um: um/px assumed for slides that record no MPP (else they are left out).
                 roi_dir=None,              # Folder of QuPath GeoJSON exports, <slide name>.geojson: sample only inside their regions.
                 roi_labels=None,           # Only regions of these classes (list of names); None = every region.
                 roi_missing='leave_out',   # A slide without annotation file: 'leave_out', or 'tissue' to sample its whole tissue.
                 stain_norm=None,           # None, 'reinhard' or 'macenko': normalise each slide's stain to the target.
                 stain_target=None,         # Image file of the target stain; None = a typical patch of the slides (saved in the run dir).
                 roi_detections=False,      # Take QuPath cell/detection objects as regions too, not only annotations?
                 num_readers=None):         # Processes reading patches; None = one per core, 0 = in the trainer's process.
        import patch_sampler
        import wsi
        check_max_label_size(max_label_size)
        if create_demo and wsi.demo_slides_wanted(tfrecord_dir, wsi_ext, recursive):
            print('Creating demo slides in "%s"...' % tfrecord_dir)
            wsi.create_demo_slides(tfrecord_dir, keep_existing=True)
        if label_file is not None and not os.path.isfile(label_file):
            in_folder = os.path.join(tfrecord_dir, label_file)
            label_file = in_folder if os.path.isfile(in_folder) else label_file
        self.sampler = patch_sampler.PatchSampler(
            tfrecord_dir, wsi_ext=wsi_ext, resolution=resolution, downsample=downsample, label_file=label_file,
            max_label_size=max_label_size, recursive=recursive, mask_cache_dir=mask_cache_dir, rotate90=rotate90,
            min_tissue_fraction=min_tissue_fraction, weight_by_tissue=weight_by_tissue,
            num_readers=num_readers, num_threads=num_threads, seed=seed, patch_um=patch_um, default_mpp=default_mpp,
            roi_dir=roi_dir, roi_labels=roi_labels, roi_missing=roi_missing, stain_norm=stain_norm,
            stain_target=stain_target, roi_detections=roi_detections)
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

    @property
    def max_lod(self):
        return self.sampler.max_lod

    def _apply_setting(self, minibatch_size, lod):
        if self._feed is not None:
            self._feed.close()          # Its reader stops, so nothing of the old setting reaches training.
        self._feed = self.sampler.batches(lod, minibatch_size, prefetch=self._read_ahead(minibatch_size, lod))

    def _read_ahead(self, minibatch_size, lod):
        """Minibatches to read ahead: prefetch_mb worth, within 2..MAX_READ_AHEAD_MINIBATCHES."""
        minibatch_bytes = max(minibatch_size * int(np.prod(self.shape)) >> (2 * lod), 1)
        return int(np.clip((self._prefetch_mb << 20) // minibatch_bytes, 2, MAX_READ_AHEAD_MINIBATCHES))

    def _next_minibatch(self):
        images, classes = next(self._feed)
        return images, self.sampler.labels_onehot(classes)

    def get_minibatch_tf(self):
        """Tensors that take the next minibatch of the current setting each time they are run.

        The numpy_function only pops the sampler's read-ahead queue (its threads do the reading,
        without the GIL), and that queue is the only read-ahead, so a new LOD or minibatch size
        takes effect at the very next run."""
        with tf.name_scope('WSIDataset'), tf.device(INPUT_DEVICE):
            images, labels = tf.numpy_function(self._next_minibatch, [], [tf.uint8, tf.float32], stateful=True)
            images.set_shape([None, self.shape[0], None, None])
            labels.set_shape([None, self.label_size])
            return images, labels

    def augment_minibatch_tf(self, images):
        """Colour and warp augmentation (float32 out) where the caller builds it: train.py does so on
        each GPU. Minibatches taken otherwise (snapshot grids, metrics) stay as read."""
        return augment.augment_minibatch(images, self.augment, self.dynamic_range) if self.augment > 0 else images

    def get_minibatch_np(self, minibatch_size, lod=0):
        # Straight from the sampler, leaving the training feed and its read-ahead alone.
        images, classes = self.sampler.sample(int(np.floor(lod)), minibatch_size)
        return images, self.sampler.labels_onehot(classes)

    def get_random_labels_tf(self, minibatch_size):
        if self.label_size == 0:
            return super().get_random_labels_tf(minibatch_size)
        with tf.name_scope('WSIDataset'), tf.device(INPUT_DEVICE):
            labels = tf.numpy_function(lambda count: self.sampler.random_labels(int(count)), [minibatch_size],
                                       tf.float32, stateful=True)
            labels.set_shape([None, self.label_size])
            return labels

    def get_random_labels_np(self, minibatch_size):
        return self.sampler.random_labels(minibatch_size)

    def write_overview(self, result_subdir, pictures=True):
        """Pictures of what is sampled from a sample of the slides (pictures=False: none, as for a
        resumed run) and the stain target, into the run directory, where read-problems.txt collects
        the details of failed reads from now on."""
        if pictures:
            self.sampler.write_overview(os.path.join(result_subdir, 'slide-overviews'))
        if self.sampler.stain_norm is not None:
            self.sampler.write_stain_target(os.path.join(result_subdir, 'stain-target.png'))
        self.sampler.problems_path = os.path.join(result_subdir, 'read-problems.txt')

    def tick_report(self):
        return self.sampler.tick_report()

    def close(self):
        if self._feed is not None:
            self._feed.close()
        self.sampler.close()


# ----------------------------------------------------------------------------


def _dataset_class(class_name):
    try:
        return tfutil.import_obj(class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError('Unknown dataset class %r (%s): set dataset.class_name to dataset.WSIDataset, '
                         'dataset.TFRecordDataset, dataset.SyntheticDataset or a "module.Class" of your own'
                         % (class_name, error)) from error


def _class_for_folder(kwargs):
    if 'tfrecord_dir' not in kwargs:
        return 'dataset.TFRecordDataset'   # Which then names what is missing.
    import wsi
    folder = kwargs['tfrecord_dir']
    class_name = wsi.guess_dataset_class(folder, kwargs.get('wsi_ext', '.svs'), kwargs.get('recursive', False))
    if class_name == 'dataset.WSIDataset':
        print('dataset.class_name not set: "%s" holds slides and no *.tfrecords, so it is read as dataset.WSIDataset'
              % folder)
    return class_name


def load_dataset(class_name=None, data_dir=None, verbose=False, **kwargs):
    """The dataset class_name names, made from kwargs; a tfrecord_dir is taken relative to data_dir.
    Without a class_name (the WSI-ProGAN fork's configs) the folder's contents decide: TFRecords, or
    slides when it holds no TFRecords."""
    if data_dir is not None and 'tfrecord_dir' in kwargs:
        kwargs['tfrecord_dir'] = os.path.join(data_dir, kwargs['tfrecord_dir'])
    if class_name is None:
        class_name = _class_for_folder(kwargs)
    if verbose:
        print('Streaming data using %s...' % class_name)
    dataset = _dataset_class(class_name)(**kwargs)
    if verbose:
        for name, value in [('Dataset shape', np.int32(dataset.shape).tolist()),
                            ('Dynamic range', dataset.dynamic_range), ('Label size', dataset.label_size)]:
            print('%-14s=' % name, value)
    return dataset
