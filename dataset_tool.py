"""Tool for creating and inspecting datasets.

  python dataset_tool.py create_demo_slides datasets/demo-wsi
  python dataset_tool.py inspect_slides datasets/demo-wsi --wsi_ext .svs .tif
  python dataset_tool.py create_from_images datasets/mydata path/to/images --shuffle 1
  python dataset_tool.py create_from_slides datasets/patches datasets/demo-wsi --resolution 64 --downsample 4 --num-images 1000
  python dataset_tool.py display datasets/mydata

TFRecords use the original ProGAN layout: <dir>/<name>-rNN.tfrecords for every log2
resolution NN from the full one down to 2, each record a tf.train.Example with 'shape' [C,H,W]
and 'data' (uint8 CHW bytes), lower resolutions by 2x2 box averaging; labels in
<dir>/<name>-rxx.labels (np.save of float32 [N, label_size]).
"""

import argparse
import glob
import os
import sys

import numpy as np
from tqdm import tqdm

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


def read_tfrecord_images(tfrecord_path, limit=None):
    """uint8 CHW images from one .tfrecords file."""
    from tf_compat import tf
    images = []
    for record in tf.python_io.tf_record_iterator(tfrecord_path):
        example = tf.train.Example.FromString(record)
        shape = example.features.feature['shape'].int64_list.value
        images.append(np.frombuffer(example.features.feature['data'].bytes_list.value[0], np.uint8).reshape(shape))
        if limit is not None and len(images) >= limit:
            break
    return images


# ----------------------------------------------------------------------------------------------
# Commands.

def create_from_images(tfrecord_dir, image_dir, shuffle=True):
    """A dataset from a folder of square, same-size RGB or greyscale images (file-name order,
    or shuffled with the original's fixed seed 123)."""
    from PIL import Image
    paths = sorted(p for p in glob.glob(os.path.join(image_dir, '*')) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {image_dir}')
    order = np.arange(len(paths))
    if shuffle:
        np.random.RandomState(123).shuffle(order)
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
    with wsi.PatchSampler(slide_dir, wsi_ext=wsi_ext, resolution=resolution, downsample=downsample,
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
    if info.tissue_index is not None:
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

    p = commands.add_parser('display', help='Write a PNG grid of the first images of a TFRecord dataset.')
    p.add_argument('tfrecord_dir')
    p.add_argument('--out', default=None)
    p.add_argument('--count', type=int, default=64)
    return parser.parse_args(argv)


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
    elif args.command == 'display':
        display(args.tfrecord_dir, args.out, args.count)


if __name__ == '__main__':
    main()
