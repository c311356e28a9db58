"""Tool for creating and inspecting datasets.

  python dataset_tool.py create_demo_slides datasets/demo-wsi
  python dataset_tool.py inspect_slides datasets/demo-wsi --wsi_ext .svs .tif
  python dataset_tool.py create_from_images datasets/mydata path/to/images --shuffle 1
  python dataset_tool.py create_from_slides datasets/patches datasets/demo-wsi --resolution 64 --downsample 4 --num-images 1000
  python dataset_tool.py display datasets/mydata

The original ProGAN's commands, with its arguments and output:

  python dataset_tool.py create_mnist datasets/mnist ~/downloads/mnist
  python dataset_tool.py create_mnistrgb datasets/mnistrgb ~/downloads/mnist --num_images 1000000
  python dataset_tool.py create_cifar10 datasets/cifar10 ~/downloads/cifar-10-batches-py
  python dataset_tool.py create_cifar100 datasets/cifar100 ~/downloads/cifar-100-python
  python dataset_tool.py create_svhn datasets/svhn ~/downloads/svhn
  python dataset_tool.py create_lsun datasets/lsun-bedroom ~/downloads/bedroom_train_lmdb --resolution 256
  python dataset_tool.py create_celeba datasets/celeba ~/downloads/celeba --cx 89 --cy 121
  python dataset_tool.py create_from_hdf5 datasets/mydata path/to/mydata.h5 --shuffle 1
  python dataset_tool.py compare datasets/a datasets/b --ignore_labels 0
  python dataset_tool.py extract datasets/mydata path/to/pngs

TFRecords use the original ProGAN layout: <dir>/<name>-rNN.tfrecords for every log2
resolution NN from the full one down to 2, each record a tf.train.Example with 'shape' [C,H,W]
and 'data' (uint8 CHW bytes), lower resolutions by 2x2 box averaging; labels in
<dir>/<name>-rxx.labels (np.save of float32 [N, label_size]).
"""

import argparse
import glob
import gzip
import io
import itertools
import os
import pickle
import sys

import numpy as np
from tqdm import tqdm

import patch_sampler
import wsi

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


# ----------------------------------------------------------------------------------------------
# TFRecords.

class TFRecordExporter:
    """Writes images one at a time (memory stays flat) into the multi-resolution layout."""

    def __init__(self, tfrecord_dir, expected_images=None, progress=True):
        self.tfrecord_dir = tfrecord_dir
        self.prefix = os.path.join(tfrecord_dir, os.path.basename(os.path.normpath(tfrecord_dir)))
        self.writers = []
        self.shape = None
        self.count = 0
        self.progress = tqdm(total=expected_images, desc='Writing TFRecords', unit='img', disable=not progress)
        os.makedirs(tfrecord_dir, exist_ok=True)

    def add_image(self, image_chw):
        from tf_compat import tf
        image_chw = np.asarray(image_chw)
        if not self.writers:
            self._open_writers(image_chw.shape)
        if image_chw.shape != self.shape:
            raise ValueError(f'image {self.count} has shape {image_chw.shape}, the first had {self.shape}')
        image = image_chw.astype(np.float32)
        for writer in self.writers:
            if writer is not self.writers[0]:   # the original's box filter, on unrounded values
                image = (image[:, 0::2, 0::2] + image[:, 0::2, 1::2] + image[:, 1::2, 0::2] + image[:, 1::2, 1::2]) * 0.25
            quantized = np.rint(image).clip(0, 255).astype(np.uint8)
            example = tf.train.Example(features=tf.train.Features(feature={
                'shape': tf.train.Feature(int64_list=tf.train.Int64List(value=quantized.shape)),
                'data': tf.train.Feature(bytes_list=tf.train.BytesList(value=[quantized.tobytes()]))}))
            writer.write(example.SerializeToString())
        self.count += 1
        self.progress.update(1)

    def _open_writers(self, shape):
        from tf_compat import tf
        channels, height, width = shape
        resolution_log2 = int(np.log2(height))
        if channels not in (1, 3) or height != width or height != 2 ** resolution_log2 or height < 4:
            raise ValueError(f'images must be [1 or 3, R, R] with R a power of two >= 4, got {list(shape)}')
        self.shape = tuple(shape)
        options = tf.python_io.TFRecordOptions(tf.python_io.TFRecordCompressionType.NONE)
        self.writers = [tf.python_io.TFRecordWriter(f'{self.prefix}-r{log2:02d}.tfrecords', options)
                        for log2 in range(resolution_log2, 1, -1)]

    def add_labels(self, labels):
        labels = np.asarray(labels, np.float32)
        if labels.ndim != 2 or labels.shape[0] != self.count:
            raise ValueError(f'labels must be [{self.count}, label_size], got {list(labels.shape)}')
        with open(f'{self.prefix}-rxx.labels', 'wb') as f:
            np.save(f, labels)

    def close(self):
        for writer in self.writers:
            writer.close()
        self.writers = []
        self.progress.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_tfrecords(tfrecord_dir, images_uint8_NCHW, labels=None):
    """Write an [N, C, H, W] uint8 array (and optional [N, label_size] labels) as a dataset."""
    with TFRecordExporter(tfrecord_dir, len(images_uint8_NCHW), progress=False) as exporter:
        for image in images_uint8_NCHW:
            exporter.add_image(image)
        if labels is not None:
            exporter.add_labels(labels)


def iter_tfrecord_images(tfrecord_path):
    """uint8 CHW images from one .tfrecords file, one at a time."""
    from tf_compat import tf
    for record in tf.python_io.tf_record_iterator(tfrecord_path):
        example = tf.train.Example.FromString(record)
        shape = example.features.feature['shape'].int64_list.value
        yield np.frombuffer(example.features.feature['data'].bytes_list.value[0], np.uint8).reshape(shape)


def read_tfrecord_images(tfrecord_path, limit=None):
    """uint8 CHW images from one .tfrecords file."""
    return list(itertools.islice(iter_tfrecord_images(tfrecord_path), limit))


def shuffled_order(count):
    """The original's order for shuffled exports: a permutation drawn with the fixed seed 123."""
    order = np.arange(count)
    np.random.RandomState(123).shuffle(order)
    return order


def export_in_order(tfrecord_dir, images, order, labels=None):
    """Write images[order] (any indexable of CHW arrays) and labels[order] when given."""
    with TFRecordExporter(tfrecord_dir, len(order)) as exporter:
        for index in order:
            exporter.add_image(images[index])
        if labels is not None:
            exporter.add_labels(labels[order])


# ----------------------------------------------------------------------------------------------
# Commands.

def create_from_images(tfrecord_dir, image_dir, shuffle=True):
    """A dataset from a folder of square, same-size RGB or greyscale images (file-name order,
    or shuffled with the original's fixed seed 123)."""
    from PIL import Image
    paths = sorted(p for p in glob.glob(os.path.join(image_dir, '*')) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {image_dir}')
    order = shuffled_order(len(paths)) if shuffle else np.arange(len(paths))
    with TFRecordExporter(tfrecord_dir, len(paths)) as exporter:
        for index in order:
            with Image.open(paths[index]) as image:
                pixels = np.asarray(image.convert('L' if image.mode in ('L', 'I;16', 'I', '1') else 'RGB'))
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            try:
                exporter.add_image(pixels)
            except ValueError as e:
                raise ValueError(f'{paths[index]}: {e}') from None
    return len(paths)


def create_from_slides(tfrecord_dir, slide_dir, resolution=512, downsample=4, num_images=10000,
                       wsi_ext='.svs', label_file=None, recursive=False, mask_cache_dir=None,
                       seed=123, chunk=256):
    """A fixed, reproducible set of random tissue patches pre-extracted from slides (the same
    sampler WSIDataset uses at LOD 0), with one-hot slide labels when label_file is given."""
    with patch_sampler.PatchSampler(slide_dir, wsi_ext=wsi_ext, resolution=resolution, downsample=downsample,
                          label_file=label_file, max_label_size='full' if label_file else 0,
                          recursive=recursive, mask_cache_dir=mask_cache_dir, seed=seed) as sampler:
        classes = []
        with TFRecordExporter(tfrecord_dir, num_images) as exporter:
            for begin in range(0, num_images, chunk):
                images, class_indices = sampler.sample(0, min(chunk, num_images - begin))
                for image in images:
                    exporter.add_image(image)
                classes.append(class_indices)
            if label_file:
                exporter.add_labels(sampler.labels_onehot(np.concatenate(classes)))
    return num_images


# ----------------------------------------------------------------------------------------------
# The original ProGAN's dataset commands: same arguments, same images, order and labels.

def one_hot(labels, num_classes, source):
    labels = np.asarray(labels).astype(np.int64).ravel()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'{source}: labels must lie in 0..{num_classes - 1}, '
                         f'found {labels.min()}..{labels.max()}')
    return np.eye(num_classes, dtype=np.float32)[labels]


def require_file(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: {what}')
    return path


def read_idx_ubyte_gz(path):
    """An MNIST idx file (gzipped): a big-endian header (two zero bytes, type 0x08 for uint8,
    the number of dimensions, then each dimension) followed by the raw uint8 array."""
    require_file(path, 'put the MNIST training files (train-*-ubyte.gz) in this folder')
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f'{path} is not a complete gzip file ({e}); download it again') from None
    ndim = data[3] if len(data) >= 4 else 0
    if data[:3] != b'\0\0\x08' or ndim == 0:
        raise ValueError(f'{path} is not an idx file of uint8 (header {data[:4].hex()})')
    shape = np.frombuffer(data, '>u4', ndim, offset=4).tolist()
    header_bytes = 4 + 4 * ndim
    if len(data) != header_bytes + int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f'{path}: the header gives the shape {shape}, but the file holds '
                         f'{len(data) - header_bytes} bytes of data; download it again')
    return np.frombuffer(data, np.uint8, offset=header_bytes).reshape(shape)


def load_mnist(mnist_dir):
    """MNIST training digits padded with zeros to 32x32 ([N, 32, 32] uint8), and their labels."""
    images = read_idx_ubyte_gz(os.path.join(mnist_dir, 'train-images-idx3-ubyte.gz'))
    labels = read_idx_ubyte_gz(os.path.join(mnist_dir, 'train-labels-idx1-ubyte.gz'))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(f'{mnist_dir}: expected [N, 28, 28] images and [N] labels, '
                         f'got {list(images.shape)} and {list(labels.shape)}')
    return np.pad(images, [(0, 0), (2, 2), (2, 2)]), labels


def create_mnist(tfrecord_dir, mnist_dir):
    """Greyscale 32x32 digits with one-hot labels of 10 classes, shuffled."""
    images, labels = load_mnist(mnist_dir)
    export_in_order(tfrecord_dir, images[:, None], shuffled_order(len(images)),
                    one_hot(labels, 10, mnist_dir))
    return len(images)


def create_mnistrgb(tfrecord_dir, mnist_dir, num_images=1000000, random_seed=123):
    """num_images RGB images whose three channels are digits drawn at random (the original's
    stacked MNIST: 1000 digit triples to cover); no labels."""
    digits = load_mnist(mnist_dir)[0]
    rng = np.random.RandomState(random_seed)
    with TFRecordExporter(tfrecord_dir, num_images) as exporter:
        for _ in range(num_images):
            exporter.add_image(digits[rng.randint(len(digits), size=3)])
    return num_images


class PythonBatchUnpickler(pickle.Unpickler):
    """Reads the CIFAR 'python version' batches: dicts of lists, strings and one numpy array.
    Only what rebuilding a numpy array takes is admitted; any other global is refused, so a
    doctored batch file cannot run code."""

    ADMITTED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
                ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct')}

    def __init__(self, file, path):
        super().__init__(file, encoding='latin1')     # the batches were pickled by Python 2
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in self.ADMITTED:
            raise pickle.UnpicklingError(f'{self.path}: refused {module}.{name}; a CIFAR batch holds only '
                                         'lists, strings and a numpy array. Download the batch again.')
        if module == 'numpy.core.multiarray':       # numpy 1's name, as in the published batches
            module = 'numpy._core.multiarray'
        return super().find_class(module, name)


def load_python_batch(path, label_key):
    """[N, 3, 32, 32] uint8 images and [N] labels from one CIFAR python batch."""
    with open(require_file(path, 'unpack the CIFAR "python version" archive into this folder'), 'rb') as f:
        batch = PythonBatchUnpickler(f, path).load()
    if not isinstance(batch, dict) or 'data' not in batch or label_key not in batch:
        raise ValueError(f'{path}: expected a dict with "data" and "{label_key}"')
    data = np.asarray(batch['data'])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f'{path}: "data" must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}')
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[label_key])


def create_cifar_batches(tfrecord_dir, paths, label_key, num_classes, source):
    batches = [load_python_batch(path, label_key) for path in paths]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    export_in_order(tfrecord_dir, images, shuffled_order(len(images)), one_hot(labels, num_classes, source))
    return len(images)


def create_cifar10(tfrecord_dir, cifar10_dir):
    """The 50000 training images (data_batch_1..5), one-hot labels of 10 classes, shuffled."""
    paths = [os.path.join(cifar10_dir, f'data_batch_{batch}') for batch in range(1, 6)]
    return create_cifar_batches(tfrecord_dir, paths, 'labels', 10, cifar10_dir)


def create_cifar100(tfrecord_dir, cifar100_dir):
    """The 50000 training images ('train'), one-hot fine labels of 100 classes, shuffled."""
    return create_cifar_batches(tfrecord_dir, [os.path.join(cifar100_dir, 'train')], 'fine_labels', 100,
                                cifar100_dir)


def create_svhn(tfrecord_dir, svhn_dir):
    """The 73257 training digits of train_32x32.mat, one-hot labels of 10 classes (the file's
    label 10 stands for the digit 0), shuffled."""
    import scipy.io
    path = require_file(os.path.join(svhn_dir, 'train_32x32.mat'), 'download the SVHN "format 2" training set')
    mat = scipy.io.loadmat(path)
    if 'X' not in mat or 'y' not in mat or mat['X'].ndim != 4 or mat['X'].shape[:3] != (32, 32, 3):
        raise ValueError(f'{path}: expected X [32, 32, 3, N] and y [N, 1]')
    images = mat['X'].transpose(3, 2, 0, 1)
    labels = mat['y'].ravel() % 10
    if len(labels) != len(images):
        raise ValueError(f'{path}: {len(images)} images but {len(labels)} labels')
    export_in_order(tfrecord_dir, images, shuffled_order(len(images)), one_hot(labels, 10, path))
    return len(images)


def center_crop_square(image_hwc):
    side = min(image_hwc.shape[:2])
    top, left = (image_hwc.shape[0] - side) // 2, (image_hwc.shape[1] - side) // 2
    return image_hwc[top:top + side, left:left + side]


def decode_lsun_image(jpeg_bytes, resolution):
    """The original's LSUN transform: the central square, resized with Lanczos, CHW."""
    from PIL import Image
    with Image.open(io.BytesIO(jpeg_bytes)) as image:
        pixels = np.asarray(image.convert('RGB'))
    square = Image.fromarray(center_crop_square(pixels))
    return np.asarray(square.resize((resolution, resolution), Image.LANCZOS)).transpose(2, 0, 1)


def create_lsun(tfrecord_dir, lmdb_dir, resolution=256, max_images=None):
    """An LSUN category from its lmdb of JPEGs, in database order, unshuffled and unlabelled;
    records that do not decode are skipped with a message, as in the original."""
    import lmdb
    if not os.path.isdir(lmdb_dir):
        raise FileNotFoundError(f'{lmdb_dir} not found: give the folder of an LSUN lmdb (e.g. bedroom_train_lmdb)')
    with lmdb.open(lmdb_dir, readonly=True, lock=False) as env, env.begin(write=False) as txn:
        total = txn.stat()['entries']
        wanted = total if max_images is None else min(max_images, total)
        with TFRecordExporter(tfrecord_dir, wanted) as exporter:
            for key, value in txn.cursor():
                if exporter.count == wanted:
                    break
                try:
                    image = decode_lsun_image(value, resolution)
                except OSError as e:
                    print(f'Skipped the record {key.decode(errors="replace")}: {e}')
                    continue
                exporter.add_image(image)
    if exporter.count == 0:
        raise ValueError(f'No record of {lmdb_dir} decoded as an image')
    return exporter.count


CELEBA_IMAGES = 202599


def celeba_image_paths(celeba_dir):
    """The aligned CelebA images: the PNG folder the original read, else the JPEG one CelebA ships."""
    for folder, extension in (('img_align_celeba_png', '.png'), ('img_align_celeba', '.jpg')):
        paths = sorted(glob.glob(os.path.join(celeba_dir, folder, '*' + extension)))
        if paths:
            if len(paths) != CELEBA_IMAGES:
                print(f'Note: {os.path.join(celeba_dir, folder)} holds {len(paths)} images, CelebA has {CELEBA_IMAGES}')
            return paths
    raise FileNotFoundError(f'No aligned CelebA images in {celeba_dir}: expected img_align_celeba_png/*.png '
                            'or img_align_celeba/*.jpg')


def create_celeba(tfrecord_dir, celeba_dir, cx=89, cy=121):
    """128x128 crops centred on (cx, cy) of the aligned 178x218 CelebA images, shuffled, unlabelled."""
    from PIL import Image
    paths = celeba_image_paths(celeba_dir)
    with TFRecordExporter(tfrecord_dir, len(paths)) as exporter:
        for index in shuffled_order(len(paths)):
            with Image.open(paths[index]) as image:
                pixels = np.asarray(image.convert('RGB'))
            top, left = cy - 64, cx - 64
            if top < 0 or left < 0 or top + 128 > pixels.shape[0] or left + 128 > pixels.shape[1]:
                raise ValueError(f'{paths[index]}: a 128x128 crop centred on --cx {cx} --cy {cy} leaves the '
                                 f'{pixels.shape[1]}x{pixels.shape[0]} image; choose a centre inside it')
            exporter.add_image(pixels[top:top + 128, left:left + 128].transpose(2, 0, 1))
    return len(paths)


def create_from_hdf5(tfrecord_dir, hdf5_filename, shuffle=True):
    """The highest-resolution dataset of an HDF5 file in the original's layout (data4x4 ...
    dataRxR, uint8 NCHW), with labels from <file stem>-labels.npy when that exists."""
    import h5py
    with h5py.File(require_file(hdf5_filename, 'give an HDF5 file with data4x4 ... dataRxR datasets'), 'r') as f:
        levels = [value for key, value in f.items() if key.startswith('data') and isinstance(value, h5py.Dataset)]
        if not levels:
            raise ValueError(f'{hdf5_filename} has no datasets named data<R>x<R>; found {sorted(f.keys())}')
        images = max(levels, key=lambda level: level.shape[-1])
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f'{hdf5_filename}:{images.name} must be uint8 [N, C, R, R], '
                             f'got {images.dtype} {list(images.shape)}')
        order = shuffled_order(len(images)) if shuffle else np.arange(len(images))
        label_path = os.path.splitext(hdf5_filename)[0] + '-labels.npy'
        labels = np.load(label_path) if os.path.isfile(label_path) else None
        if labels is not None and (labels.ndim != 2 or len(labels) != len(images)):
            raise ValueError(f'{label_path} must hold [{len(images)}, label_size] labels, got {list(labels.shape)}')
        export_in_order(tfrecord_dir, images, order, labels)
    return len(order)


def full_resolution_images(tfrecord_dir):
    """The images of the dataset's highest-resolution .tfrecords file, streamed."""
    paths = sorted(glob.glob(os.path.join(tfrecord_dir, '*.tfrecords')))
    if not paths:
        raise ValueError(f'No *.tfrecords files in {tfrecord_dir}')
    first_sizes = {path: next(iter_tfrecord_images(path), np.zeros((0, 0, 0))).shape[-1] for path in paths}
    return iter_tfrecord_images(max(paths, key=first_sizes.get))


def dataset_labels(tfrecord_dir):
    """The labels TFRecordDataset would use (the first *.labels file), or no label components."""
    paths = sorted(glob.glob(os.path.join(tfrecord_dir, '*.labels')))
    return np.load(paths[0]) if paths else np.zeros((0, 0), np.float32)


def label_row(labels, index):
    return labels[index] if index < len(labels) else np.zeros(0, np.float32)


def compare(tfrecord_dir_a, tfrecord_dir_b, ignore_labels=False):
    """Compare two datasets image by image (and label by label) at full resolution, in file order;
    print the differences and return (identical images, identical labels, images compared)."""
    no_labels = np.zeros((0, 0), np.float32)
    labels_a, labels_b = ((no_labels, no_labels) if ignore_labels else
                          (dataset_labels(tfrecord_dir_a), dataset_labels(tfrecord_dir_b)))
    identical_images = identical_labels = count = 0
    pairs = itertools.zip_longest(full_resolution_images(tfrecord_dir_a), full_resolution_images(tfrecord_dir_b))
    for image_a, image_b in pairs:
        if image_a is None or image_b is None:
            print('Datasets contain different number of images')
            break
        if image_a.shape == image_b.shape and np.array_equal(image_a, image_b):
            identical_images += 1
        else:
            print(f'Image {count} is different')
        row_a, row_b = label_row(labels_a, count), label_row(labels_b, count)
        if row_a.shape == row_b.shape and np.array_equal(row_a, row_b):
            identical_labels += 1
        else:
            print(f'Label {count} is different')
        count += 1
    print(f'Identical images: {identical_images} / {count}')
    if not ignore_labels:
        print(f'Identical labels: {identical_labels} / {count}')
    return identical_images, identical_labels, count


def extract(tfrecord_dir, output_dir):
    """Write the full-resolution images as output_dir/img00000000.png ... in file order."""
    from PIL import Image
    os.makedirs(output_dir, exist_ok=True)
    count = 0
    for image in full_resolution_images(tfrecord_dir):
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(pixels).save(os.path.join(output_dir, f'img{count:08d}.png'))
        count += 1
    print(f'Extracted {count} images to {output_dir}')
    return count


CELEBAHQ_LEFT_OUT = (
    'create_celebahq is left out: it rebuilds CelebA-HQ from the in-the-wild CelebA images and the '
    'encrypted delta files the ProGAN authors published, which cannot be made or checked here. '
    'See "Datasets from the original ProGAN" in README.md.')


def display(tfrecord_dir, out_path=None, count=64):
    """Write a grid PNG of the first images of each resolution (headless: no window)."""
    files = sorted(glob.glob(os.path.join(tfrecord_dir, '*.tfrecords')))
    if not files:
        raise ValueError(f'No *.tfrecords files in {tfrecord_dir}')
    out_path = out_path or os.path.join(tfrecord_dir, 'display.png')
    rows = []
    full_size = None
    for path in reversed(files):      # highest resolution first
        images = read_tfrecord_images(path, count)
        full_size = full_size or images[0].shape[1]
        upscale = full_size // images[0].shape[1]
        row = np.concatenate([np.broadcast_to(im, (3,) + im.shape[1:]).repeat(upscale, 1).repeat(upscale, 2)
                              for im in images], axis=2)
        rows.append(row)
        print(f'{os.path.basename(path)}: {len(images)} shown, shape {list(images[0].shape)}')
    width = max(row.shape[2] for row in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, 0), (0, width - r.shape[2])), constant_values=255) for r in rows], 1)
    wsi.write_png(out_path, grid.transpose(1, 2, 0)[..., ::-1])
    print(f'Wrote {out_path}')
    return out_path


def inspect_slides(slide_dir, wsi_ext=('.svs',), recursive=False, resolution=None, downsample=None,
                   mask_cache_dir=None, min_tissue_fraction=0.01, patch_um=None, default_mpp=None):
    """Print each slide's vendor, levels, MPP, tissue fraction, whether it is usable, and with a
    resolution the downsample and field of view its patches get (from patch_um and its MPP, or
    downsample); warn when a cohort mixes magnifications under downsample."""
    if patch_um is not None and downsample is not None:
        raise SystemExit('Give --patch_um or --downsample, not both')
    paths = wsi.find_slides(slide_dir, wsi_ext, recursive)
    if not paths:
        print(f'No files with extension {" ".join(wsi_ext)} in {slide_dir}')
        return []
    field_of_view = resolution * downsample if resolution and downsample else None
    infos = wsi.inspect_slides(paths, mask_cache_dir, min_tissue_fraction, field_of_view,
                               patch_um=patch_um, default_mpp=default_mpp)
    for info in infos:
        print(format_slide_info(info, slide_dir, resolution))
    usable = sum(info.problem is None for info in infos)
    print(f'{usable} of {len(infos)} slides usable')
    mixed = wsi.mixed_magnification_warning(infos)
    if mixed and patch_um is None:
        print(f'Warning: {mixed}')
    return infos


def slide_overviews(slide_dir, out_dir, wsi_ext=('.svs',), recursive=False, resolution=512, downsample=None,
                    patch_um=None, default_mpp=None, roi_dir=None, mask_cache_dir=None):
    """One overview PNG per usable slide (thumbnail, tissue outline, regions, patch boxes) into
    out_dir, drawn by reader processes: a training run draws them for a sample of the slides only."""
    if patch_um is not None and downsample is not None:
        raise SystemExit('Give --patch_um or --downsample, not both')
    with patch_sampler.PatchSampler(slide_dir, wsi_ext=list(wsi_ext), resolution=resolution, downsample=downsample or 4,
                                    patch_um=patch_um, default_mpp=default_mpp, recursive=recursive, roi_dir=roi_dir,
                                    roi_missing='tissue', mask_cache_dir=mask_cache_dir) as sampler:
        paths = sampler.write_overview(out_dir, limit=None)
    print(f'Wrote {len(paths)} overviews into {out_dir}')
    return paths


def format_slide_info(info, slide_dir, resolution=None):
    lines = [os.path.relpath(info.path, slide_dir)]
    if info.level_dimensions:
        mpp = f'{info.mpp:g} um/px' if info.mpp else 'unknown'
        lines.append(f'  vendor {info.vendor or "unknown"}, MPP {mpp}')
        levels = ', '.join(f'{w}x{h} (/{d:g})' for (w, h), d in zip(info.level_dimensions, info.level_downsamples))
        lines.append(f'  levels: {levels}')
    if info.field_of_view and resolution:
        microns = f' = {info.field_of_view * info.mpp:g} um' if info.mpp else ''
        lines.append(f'  patches: downsample {info.field_of_view / resolution:g}, field of view '
                     f'{info.field_of_view:g} px{microns}')
    if info.tissue is not None:
        lines.append(f'  tissue: {info.tissue_fraction:.1%} of the slide')
    lines.append('  usable' if info.problem is None else f'  NOT usable: {info.problem}')
    if info.warning:
        lines.append(f'  warning: {info.warning}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Command line.

def number(text):
    """An int when integral (so sizes print as 256, not 256.0), else a float."""
    value = float(text)
    return int(value) if value.is_integer() else value


def parse_args(argv):
    parser = argparse.ArgumentParser(prog='dataset_tool.py', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)

    p = commands.add_parser('create_demo_slides', help='Write the built-in demo slides.')
    p.add_argument('out_dir')
    p.add_argument('--seed', type=int, default=1000)

    p = commands.add_parser('create_from_images', help='TFRecords from a folder of images.')
    p.add_argument('tfrecord_dir')
    p.add_argument('image_dir')
    p.add_argument('--shuffle', type=int, default=1, help='shuffle the order (default: 1)')

    p = commands.add_parser('create_from_slides', help='TFRecords of a fixed set of random tissue patches.')
    p.add_argument('tfrecord_dir')
    p.add_argument('slide_dir')
    p.add_argument('--resolution', type=int, default=512)
    p.add_argument('--downsample', type=number, default=4)
    p.add_argument('--num-images', '--num_images', dest='num_images', type=int, default=10000)
    p.add_argument('--wsi_ext', nargs='+', default=['.svs'])
    p.add_argument('--label_file', default=None, help='CSV: slide file name, class')
    p.add_argument('--recursive', action='store_true')
    p.add_argument('--mask_cache_dir', default=None)
    p.add_argument('--seed', type=int, default=123)

    for name in ('inspect_slides', 'info'):
        p = commands.add_parser(name, help='Levels, MPP, vendor, tissue and usability of each slide.')
        p.add_argument('slide_dir')
        p.add_argument('--wsi_ext', nargs='+', default=['.svs'])
        p.add_argument('--recursive', action='store_true')
        p.add_argument('--resolution', type=int, default=None,
                       help='with --downsample or --patch_um: each slide\'s downsample and field of view')
        p.add_argument('--downsample', type=number, default=None)
        p.add_argument('--patch_um', type=number, default=None, help='micrometres a patch covers (instead of --downsample)')
        p.add_argument('--default_mpp', type=float, default=None, help='with --patch_um: um/px of slides without MPP')
        p.add_argument('--mask_cache_dir', default=None)
        p.add_argument('--min_tissue_fraction', type=float, default=0.01)

    p = commands.add_parser('slide_overviews', help='Overview PNGs of every slide (a run writes them for a sample).')
    p.add_argument('slide_dir')
    p.add_argument('out_dir')
    p.add_argument('--wsi_ext', nargs='+', default=['.svs'])
    p.add_argument('--recursive', action='store_true')
    p.add_argument('--resolution', type=int, default=512)
    p.add_argument('--downsample', type=number, default=None, help='default 4, unless --patch_um is given')
    p.add_argument('--patch_um', type=number, default=None, help='micrometres a patch covers (instead of --downsample)')
    p.add_argument('--default_mpp', type=float, default=None, help='with --patch_um: um/px of slides without MPP')
    p.add_argument('--roi_dir', default=None, help='folder of QuPath GeoJSON exports: their regions are drawn')
    p.add_argument('--mask_cache_dir', default=None)

    add_original_commands(commands)

    p = commands.add_parser('display', help='Write a PNG grid of the first images of a TFRecord dataset.')
    p.add_argument('tfrecord_dir')
    p.add_argument('--out', default=None)
    p.add_argument('--count', type=int, default=64)
    return parser.parse_args(argv)


def add_original_commands(commands):
    """The original ProGAN's commands, named and argued as there; main passes every argument
    on to the function of the same name."""
    for name, source in [('create_mnist', 'mnist_dir'), ('create_cifar10', 'cifar10_dir'),
                         ('create_cifar100', 'cifar100_dir'), ('create_svhn', 'svhn_dir')]:
        p = commands.add_parser(name, help=f'TFRecords from {source} (original ProGAN).')
        p.add_argument('tfrecord_dir')
        p.add_argument(source)

    p = commands.add_parser('create_mnistrgb', help='Stacked-MNIST RGB TFRecords (original ProGAN).')
    p.add_argument('tfrecord_dir')
    p.add_argument('mnist_dir')
    p.add_argument('--num_images', type=int, default=1000000)
    p.add_argument('--random_seed', type=int, default=123)

    p = commands.add_parser('create_lsun', help='TFRecords from an LSUN lmdb (original ProGAN).')
    p.add_argument('tfrecord_dir')
    p.add_argument('lmdb_dir')
    p.add_argument('--resolution', type=int, default=256)
    p.add_argument('--max_images', type=int, default=None)

    p = commands.add_parser('create_celeba', help='TFRecords from aligned CelebA (original ProGAN).')
    p.add_argument('tfrecord_dir')
    p.add_argument('celeba_dir')
    p.add_argument('--cx', type=int, default=89)
    p.add_argument('--cy', type=int, default=121)

    p = commands.add_parser('create_celebahq', help='Left out; says why.')
    p.add_argument('ignored', nargs=argparse.REMAINDER)

    p = commands.add_parser('create_from_hdf5', help='TFRecords from an HDF5 file (original ProGAN).')
    p.add_argument('tfrecord_dir')
    p.add_argument('hdf5_filename')
    p.add_argument('--shuffle', type=int, default=1)

    p = commands.add_parser('compare', help='Compare two TFRecord datasets image by image.')
    p.add_argument('tfrecord_dir_a')
    p.add_argument('tfrecord_dir_b')
    p.add_argument('--ignore_labels', type=int, default=0)

    p = commands.add_parser('extract', help='Write the images of a TFRecord dataset as PNGs.')
    p.add_argument('tfrecord_dir')
    p.add_argument('output_dir')


ORIGINAL_COMMANDS = {function.__name__: function for function in (
    create_mnist, create_mnistrgb, create_cifar10, create_cifar100, create_svhn, create_lsun, create_celeba,
    create_from_hdf5, compare, extract)}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == 'create_demo_slides':
        wsi.create_demo_slides(args.out_dir, seed=args.seed)
    elif args.command == 'create_from_images':
        create_from_images(args.tfrecord_dir, args.image_dir, bool(args.shuffle))
    elif args.command == 'create_from_slides':
        create_from_slides(args.tfrecord_dir, args.slide_dir, args.resolution, args.downsample, args.num_images,
                           args.wsi_ext, args.label_file, args.recursive, args.mask_cache_dir, args.seed)
    elif args.command in ('inspect_slides', 'info'):
        inspect_slides(args.slide_dir, args.wsi_ext, args.recursive, args.resolution, args.downsample,
                       args.mask_cache_dir, args.min_tissue_fraction, args.patch_um, args.default_mpp)
    elif args.command == 'slide_overviews':
        slide_overviews(args.slide_dir, args.out_dir, args.wsi_ext, args.recursive, args.resolution, args.downsample,
                        args.patch_um, args.default_mpp, args.roi_dir, args.mask_cache_dir)
    elif args.command == 'display':
        display(args.tfrecord_dir, args.out, args.count)
    elif args.command in ORIGINAL_COMMANDS:
        arguments = {key: value for key, value in vars(args).items() if key != 'command'}
        ORIGINAL_COMMANDS[args.command](**arguments)
    elif args.command == 'create_celebahq':
        sys.exit(CELEBAHQ_LEFT_OUT)


if __name__ == '__main__':
    main()
