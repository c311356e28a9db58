"""dataset_tool.py: TFRecords in the original ProGAN layout, from arrays, images and slides."""
import os

import numpy as np
import pytest
from PIL import Image

import dataset_tool
from conftest import write_slide


def read_dataset(tfrecord_dir):
    """{log2 resolution: uint8 [N, C, H, W]} and the labels array (or None)."""
    name = os.path.basename(tfrecord_dir)
    files = sorted(f for f in os.listdir(tfrecord_dir) if f.endswith('.tfrecords'))
    by_log2 = {int(f[len(name) + 2:-len('.tfrecords')]): f for f in files}
    assert files == [f'{name}-r{log2:02d}.tfrecords' for log2 in sorted(by_log2)]
    images = {log2: np.stack(dataset_tool.read_tfrecord_images(os.path.join(tfrecord_dir, f)))
              for log2, f in by_log2.items()}
    label_path = os.path.join(tfrecord_dir, f'{name}-rxx.labels')
    return images, (np.load(label_path) if os.path.exists(label_path) else None)


def box_pyramid(images):
    """The original's lower resolutions: 2x2 averages of the unrounded previous level."""
    levels = [images.astype(np.float32)]
    while levels[-1].shape[-1] > 4:
        x = levels[-1]
        levels.append((x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) * 0.25)
    return [np.rint(level).clip(0, 255).astype(np.uint8) for level in levels]


def test_write_tfrecords_writes_every_resolution_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    labels = np.eye(5, 3, dtype=np.float32)
    tfrecord_dir = str(tmp_path / 'mydata')
    dataset_tool.write_tfrecords(tfrecord_dir, images, labels)
    written, written_labels = read_dataset(tfrecord_dir)
    assert sorted(written) == [2, 3, 4]
    for log2, expected in zip([4, 3, 2], box_pyramid(images)):
        assert written[log2].dtype == np.uint8 and written[log2].shape == expected.shape
        assert np.array_equal(written[log2], expected), log2
    assert written_labels.dtype == np.float32 and np.array_equal(written_labels, labels)


def test_write_tfrecords_rejects_bad_shapes_and_label_counts(tmp_path):
    with pytest.raises(ValueError, match='power of two'):
        dataset_tool.write_tfrecords(str(tmp_path / 'a'), np.zeros((2, 3, 12, 12), np.uint8))
    with pytest.raises(ValueError, match='labels'):
        dataset_tool.write_tfrecords(str(tmp_path / 'b'), np.zeros((2, 3, 8, 8), np.uint8), np.zeros((3, 2)))


def write_images(folder, count, size=8, mode='RGB'):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = np.full((size, size, 3), i * 20, np.uint8) if mode == 'RGB' else np.full((size, size), i * 20, np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f'img{i:02d}.png'))


def test_create_from_images_in_name_order_or_shuffled_as_the_original(tmp_path):
    write_images(tmp_path / 'images', 6)
    dataset_tool.create_from_images(str(tmp_path / 'ordered'), str(tmp_path / 'images'), shuffle=False)
    ordered, labels = read_dataset(str(tmp_path / 'ordered'))
    assert labels is None and ordered[3].shape == (6, 3, 8, 8)
    assert ordered[3][:, 0, 0, 0].tolist() == [0, 20, 40, 60, 80, 100]
    dataset_tool.create_from_images(str(tmp_path / 'shuffled'), str(tmp_path / 'images'), shuffle=True)
    order = np.arange(6)
    np.random.RandomState(123).shuffle(order)
    assert read_dataset(str(tmp_path / 'shuffled'))[0][3][:, 0, 0, 0].tolist() == (order * 20).tolist()


def test_create_from_images_greyscale_and_errors_name_the_file(tmp_path):
    write_images(tmp_path / 'grey', 2, mode='L')
    dataset_tool.create_from_images(str(tmp_path / 'g'), str(tmp_path / 'grey'), shuffle=False)
    assert read_dataset(str(tmp_path / 'g'))[0][3].shape == (2, 1, 8, 8)
    write_images(tmp_path / 'mixed', 2)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / 'mixed' / 'wide.png')
    with pytest.raises(ValueError, match='wide.png'):
        dataset_tool.create_from_images(str(tmp_path / 'm'), str(tmp_path / 'mixed'), shuffle=False)
    with pytest.raises(ValueError, match='No images'):
        dataset_tool.create_from_images(str(tmp_path / 'e'), str(tmp_path / 'nothing-here'), shuffle=False)


def test_create_from_slides_writes_patches_with_one_hot_slide_labels(tmp_path):
    slides = tmp_path / 'slides'
    slides.mkdir()
    write_slide(slides / 'red.svs', tint=(1.3, 0.5, 0.5))
    write_slide(slides / 'blue.svs', tint=(0.5, 0.5, 1.3))
    (tmp_path / 'labels.csv').write_text('slide,class\nred.svs,tumour\nblue.svs,normal\n')
    tfrecord_dir = str(tmp_path / 'patches')
    dataset_tool.main(['create_from_slides', tfrecord_dir, str(slides), '--resolution', '32', '--downsample', '4',
                       '--num-images', '40', '--label_file', str(tmp_path / 'labels.csv'),
                       '--mask_cache_dir', str(tmp_path / 'cache')])
    images, labels = read_dataset(tfrecord_dir)
    assert sorted(images) == [2, 3, 4, 5] and images[5].shape == (40, 3, 32, 32)
    assert labels.shape == (40, 2) and (labels.sum(1) == 1).all()
    redder = images[5][:, 0].mean((1, 2)) > images[5][:, 2].mean((1, 2))
    assert (labels[:, 1] == redder).all(), 'classes sorted: normal=0 (blue), tumour=1 (red)'
    for log2, expected in zip([5, 4, 3, 2], box_pyramid(images[5])):
        assert np.array_equal(images[log2], expected)


def test_cli_demo_slides_inspect_and_display(tmp_path, capsys):
    demo = str(tmp_path / 'demo')
    dataset_tool.main(['create_demo_slides', demo, '--seed', '5'])
    (tmp_path / 'demo' / 'broken.svs').write_bytes(b'nope')
    dataset_tool.main(['inspect_slides', demo, '--wsi_ext', '.svs', '.tif', '--resolution', '64',
                       '--downsample', '4', '--mask_cache_dir', str(tmp_path / 'cache')])
    out = capsys.readouterr().out
    assert out.count('  usable') == 3 and 'vendor aperio, MPP 0.25' in out and 'vendor generic-tiff' in out
    assert 'broken.svs\n  NOT usable: OpenSlide cannot open it' in out and '3 of 4 slides usable' in out
    assert 'tissue: ' in out and 'levels: 6144x4096 (/1)' in out

    write_images(tmp_path / 'images', 3, size=16)
    dataset_tool.main(['create_from_images', str(tmp_path / 'ds'), str(tmp_path / 'images')])
    dataset_tool.main(['display', str(tmp_path / 'ds')])
    grid = np.asarray(Image.open(tmp_path / 'ds' / 'display.png'))
    assert grid.shape == (16 * 3, 16 * 3, 3)       # three resolutions (16, 8, 4) upscaled, 3 images each
