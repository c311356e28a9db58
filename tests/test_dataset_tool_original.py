"""dataset_tool.py's commands from the original ProGAN, each run through the command line on small
files written here in the source's own format, and read back from the TFRecords it writes."""
import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

import dataset_tool
from test_dataset_tool import box_pyramid, read_dataset


def original_order(count):
    """The original's shuffled order: a permutation with the seed 123."""
    return np.random.RandomState(123).permutation(count)


def assert_dataset(tfrecord_dir, expected_images, expected_labels=None):
    """Every resolution holds the box pyramid of the expected images; the labels match."""
    images, labels = read_dataset(tfrecord_dir)
    levels = box_pyramid(np.asarray(expected_images))
    assert sorted(images, reverse=True) == [int(np.log2(level.shape[-1])) for level in levels]
    for level in levels:
        assert np.array_equal(images[int(np.log2(level.shape[-1]))], level)
    if expected_labels is None:
        assert labels is None
    else:
        assert labels.dtype == np.float32 and np.array_equal(labels, expected_labels)


# ----------------------------------------------------------------------------------------------
# MNIST: gzipped idx-ubyte files.

def write_idx_gz(path, array):
    header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack('>' + 'I' * array.ndim, *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist(tmp_path):
    rng = np.random.default_rng(1)
    digits = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 3, 7, 2], np.uint8)
    write_idx_gz(tmp_path / 'train-images-idx3-ubyte.gz', digits)
    write_idx_gz(tmp_path / 'train-labels-idx1-ubyte.gz', labels)
    return str(tmp_path), digits, labels


def padded(digits):
    out = np.zeros((len(digits), 32, 32), np.uint8)
    out[:, 2:30, 2:30] = digits
    return out


def test_create_mnist_pads_to_32_shuffles_and_one_hots(tmp_path, mnist):
    mnist_dir, digits, labels = mnist
    dataset_tool.main(['create_mnist', str(tmp_path / 'out'), mnist_dir])
    order = original_order(7)
    assert_dataset(str(tmp_path / 'out'), padded(digits)[order][:, None], np.eye(10, dtype=np.float32)[labels[order]])


def test_create_mnistrgb_stacks_three_random_digits(tmp_path, mnist):
    mnist_dir, digits, _ = mnist
    dataset_tool.main(['create_mnistrgb', str(tmp_path / 'out'), mnist_dir, '--num_images', '5',
                       '--random_seed', '7'])
    rng = np.random.RandomState(7)
    expected = np.stack([padded(digits)[rng.randint(7, size=3)] for _ in range(5)])
    assert_dataset(str(tmp_path / 'out'), expected)


def test_mnist_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte.gz'):
        dataset_tool.create_mnist(str(tmp_path / 'out'), str(tmp_path))
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(b'<html>not found</html>')
    with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz is not an idx file'):
        dataset_tool.create_mnist(str(tmp_path / 'out'), str(tmp_path))
    write_idx_gz(tmp_path / 'train-images-idx3-ubyte.gz', np.zeros((3, 28, 28)))
    whole = (tmp_path / 'train-images-idx3-ubyte.gz').read_bytes()
    (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz is not a complete gzip file'):
        dataset_tool.create_mnist(str(tmp_path / 'out'), str(tmp_path))
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:    # header says 3 images, data holds 2
        f.write(struct.pack('>BBBBIII', 0, 0, 8, 3, 3, 28, 28) + bytes(2 * 28 * 28))
    with pytest.raises(ValueError, match=r'shape \[3, 28, 28\], but the file holds 1568 bytes'):
        dataset_tool.create_mnist(str(tmp_path / 'out'), str(tmp_path))


# ----------------------------------------------------------------------------------------------
# CIFAR: Python 2 pickled batches of {'data': uint8 [N, 3072], 'labels' or 'fine_labels': [...]}.

def write_cifar_batch(path, images, **label_lists):
    batch = {'batch_label': 'training batch', 'data': images.reshape(len(images), -1),
             'filenames': [f'img{i}.png' for i in range(len(images))], **label_lists}
    data = pickle.dumps(batch, protocol=2)
    # The published batches name numpy 1's module, as numpy 1 under Python 2 pickled them.
    data = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    with open(path, 'wb') as f:
        f.write(data)


def test_create_cifar10_reads_the_five_batches(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(10) % 10
    source = tmp_path / 'cifar-10-batches-py'
    source.mkdir()
    for batch in range(5):
        rows = slice(2 * batch, 2 * batch + 2)
        write_cifar_batch(source / f'data_batch_{batch + 1}', images[rows], labels=labels[rows].tolist())
    dataset_tool.main(['create_cifar10', str(tmp_path / 'out'), str(source)])
    order = original_order(10)
    assert_dataset(str(tmp_path / 'out'), images[order], np.eye(10, dtype=np.float32)[labels[order]])


def test_create_cifar100_uses_the_fine_labels(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    fine = [99, 0, 42, 7]
    write_cifar_batch(tmp_path / 'train', images, fine_labels=fine, coarse_labels=[19, 0, 5, 1])
    dataset_tool.main(['create_cifar100', str(tmp_path / 'out'), str(tmp_path)])
    order = original_order(4)
    assert_dataset(str(tmp_path / 'out'), images[order], np.eye(100, dtype=np.float32)[np.array(fine)[order]])


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / 'was-run'
    with open(tmp_path / 'train', 'wb') as f:
        pickle.dump({'data': RunsACommand(marker), 'fine_labels': [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r'train: refused (posix|os)\.system'):
        dataset_tool.create_cifar100(str(tmp_path / 'out'), str(tmp_path))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# SVHN: train_32x32.mat with X [32, 32, 3, N] and y [N, 1], digit 0 stored as 10.

def test_create_svhn_reads_the_mat_file(tmp_path):
    import scipy.io
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    digits = np.array([0, 1, 9, 5, 0, 3])
    stored = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
    scipy.io.savemat(tmp_path / 'train_32x32.mat', {'X': images.transpose(2, 3, 1, 0), 'y': stored})
    dataset_tool.main(['create_svhn', str(tmp_path / 'out'), str(tmp_path)])
    order = original_order(6)
    assert_dataset(str(tmp_path / 'out'), images[order], np.eye(10, dtype=np.float32)[digits[order]])


# ----------------------------------------------------------------------------------------------
# LSUN: an lmdb of JPEGs, read in key order; central square, Lanczos to --resolution.

def jpeg_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG', quality=95)
    return buffer.getvalue()


def decoded(jpeg):
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))


def test_create_lsun_crops_resizes_and_skips_broken_records(tmp_path, capsys):
    import lmdb
    rng = np.random.default_rng(5)
    wide = jpeg_bytes(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))      # 40 rows, 48 columns
    tall = jpeg_bytes(rng.integers(0, 256, (36, 32, 3), dtype=np.uint8))
    exact = jpeg_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    with lmdb.open(str(tmp_path / 'bedroom_train_lmdb'), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for key, value in [(b'a1', wide), (b'b2', b'not a jpeg'), (b'c3', tall), (b'd4', exact)]:
            txn.put(key, value)
    dataset_tool.main(['create_lsun', str(tmp_path / 'out'), str(tmp_path / 'bedroom_train_lmdb'),
                       '--resolution', '16'])
    assert 'Skipped the record b2' in capsys.readouterr().out

    def lanczos16(square):
        return np.asarray(Image.fromarray(square).resize((16, 16), Image.LANCZOS)).transpose(2, 0, 1)
    expected = [lanczos16(decoded(wide)[:, 4:44]), lanczos16(decoded(tall)[2:34]), decoded(exact).transpose(2, 0, 1)]
    assert_dataset(str(tmp_path / 'out'), expected)

    dataset_tool.main(['create_lsun', str(tmp_path / 'two'), str(tmp_path / 'bedroom_train_lmdb'),
                       '--resolution', '16', '--max_images', '2'])
    assert_dataset(str(tmp_path / 'two'), expected[:2])


# ----------------------------------------------------------------------------------------------
# CelebA: img_align_celeba/*.jpg (or the original's img_align_celeba_png/*.png), 178x218.

def test_create_celeba_crops_128_around_the_centre(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path / 'img_align_celeba'
    folder.mkdir()
    jpegs = [jpeg_bytes(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)) for _ in range(3)]
    for i, jpeg in enumerate(jpegs):
        (folder / f'{i + 1:06d}.jpg').write_bytes(jpeg)
    sources = np.stack([decoded(jpeg) for jpeg in jpegs])
    order = original_order(3)

    dataset_tool.main(['create_celeba', str(tmp_path / 'default'), str(tmp_path)])
    assert_dataset(str(tmp_path / 'default'), sources[order, 121 - 64:121 + 64, 89 - 64:89 + 64].transpose(0, 3, 1, 2))
    dataset_tool.main(['create_celeba', str(tmp_path / 'moved'), str(tmp_path), '--cx', '70', '--cy', '150'])
    assert_dataset(str(tmp_path / 'moved'), sources[order, 150 - 64:150 + 64, 70 - 64:70 + 64].transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r'\d{6}\.jpg: a 128x128 crop centred on --cx 150'):
        dataset_tool.create_celeba(str(tmp_path / 'off'), str(tmp_path), cx=150)


# ----------------------------------------------------------------------------------------------
# HDF5 in the original's layout: data4x4 ... dataRxR, uint8 NCHW; labels in <stem>-labels.npy.

def test_create_from_hdf5_takes_the_largest_level_and_the_labels(tmp_path):
    import h5py
    rng = np.random.default_rng(7)
    full = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    with h5py.File(tmp_path / 'faces.h5', 'w') as f:
        for size in (4, 8, 16):     # unrelated lower levels (data16x16 sorts first): the tool must use 32x32
            f.create_dataset(f'data{size}x{size}', data=rng.integers(0, 256, (5, 3, size, size), dtype=np.uint8))
        f.create_dataset('data32x32', data=full)
    labels = rng.random((5, 4)).astype(np.float32)
    np.save(tmp_path / 'faces-labels.npy', labels)

    dataset_tool.main(['create_from_hdf5', str(tmp_path / 'ordered'), str(tmp_path / 'faces.h5'), '--shuffle', '0'])
    assert_dataset(str(tmp_path / 'ordered'), full, labels)
    dataset_tool.main(['create_from_hdf5', str(tmp_path / 'shuffled'), str(tmp_path / 'faces.h5')])
    order = original_order(5)
    assert_dataset(str(tmp_path / 'shuffled'), full[order], labels[order])


# ----------------------------------------------------------------------------------------------
# compare and extract.

def compare_output(capsys, *argv):
    dataset_tool.main(['compare', *argv])
    return capsys.readouterr().out


def test_compare_reports_equal_and_unequal_datasets(tmp_path, capsys):
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    labels = np.eye(4, 2, dtype=np.float32)
    changed_image = images.copy()
    changed_image[2, 1, 5, 5] ^= 1
    changed_label = labels.copy()
    changed_label[3, 0] = 0.5
    for name, these_images, these_labels in [('a', images, labels), ('same', images, labels),
                                             ('image', changed_image, labels), ('label', images, changed_label),
                                             ('short', images[:3], labels[:3])]:
        dataset_tool.write_tfrecords(str(tmp_path / name), these_images, these_labels)
    a = str(tmp_path / 'a')

    out = compare_output(capsys, a, str(tmp_path / 'same'))
    assert 'different' not in out and 'Identical images: 4 / 4\nIdentical labels: 4 / 4' in out
    out = compare_output(capsys, a, str(tmp_path / 'image'))
    assert 'Image 2 is different' in out and 'Identical images: 3 / 4' in out and 'Identical labels: 4 / 4' in out
    out = compare_output(capsys, a, str(tmp_path / 'label'))
    assert 'Label 3 is different' in out and 'Identical images: 4 / 4' in out and 'Identical labels: 3 / 4' in out
    out = compare_output(capsys, a, str(tmp_path / 'label'), '--ignore_labels', '1')
    assert 'different' not in out and 'Identical images: 4 / 4' in out and 'labels' not in out
    out = compare_output(capsys, a, str(tmp_path / 'short'))
    assert 'Datasets contain different number of images' in out and 'Identical images: 3 / 3' in out


def test_extract_writes_the_full_resolution_images_as_pngs(tmp_path):
    rng = np.random.default_rng(9)
    for name, channels in [('rgb', 3), ('grey', 1)]:
        images = rng.integers(0, 256, (3, channels, 16, 16), dtype=np.uint8)
        dataset_tool.write_tfrecords(str(tmp_path / name), images)
        dataset_tool.main(['extract', str(tmp_path / name), str(tmp_path / f'{name}-png')])
        names = sorted(os.listdir(tmp_path / f'{name}-png'))
        assert names == ['img00000000.png', 'img00000001.png', 'img00000002.png']
        read_back = np.stack([np.asarray(Image.open(tmp_path / f'{name}-png' / n)) for n in names])
        expected = images[:, 0] if channels == 1 else images.transpose(0, 2, 3, 1)
        assert np.array_equal(read_back, expected)


def test_create_celebahq_says_why_it_is_left_out(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        dataset_tool.main(['create_celebahq', str(tmp_path / 'out'), 'celeba', 'deltas', '--num_threads', '4'])
    assert 'create_celebahq is left out' in str(exit_info.value.code) and 'README.md' in str(exit_info.value.code)
    assert not (tmp_path / 'out').exists()
