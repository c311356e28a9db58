"""Patches per second from the demo .svs: PatchSampler against two baselines measured in the
same run, the cost of the augmentation (which runs in the training graph, not in the reader),
and a memory-flatness run.

  python bench/wsi_throughput.py [--seconds 6.0] [--memory-patches 20000] [--train-steps 3] [--cohort-only]

Configurations (size, downsample) = (512, 4), (256, 8), (128, 16), (32, 64): the same 2048-px
field of view, i.e. LODs 0, 1, 2 and 4 of a resolution-512 downsample-4 run. Baselines:
  naive: the predecessor's way, per patch: open the slide, load the mask PNG, np.argwhere,
         rejection-sample a location in the tissue bounding box, read_region + resize, close;
  raw:   read_region + resize on one already-open handle at random tissue locations;
  snap:  the same with the corner snapped to the read level's pixel grid as PatchSampler does
         (OpenSlide's fractional-position path is several times slower): the fair reference
         for the sampler's own overhead. (The sampler reads through wsi.read_region_rgb, into a
         numpy buffer without the PIL image and np.asarray copy these baselines pay, about
         1.4 ms less per 512-px read, so it can beat snap.)
The sampler columns (1w: one reader thread, Nw: one per core) draw from PatchSampler.batches(),
the read-ahead feed that WSIDataset trains from, and count the patches its readers read.
Augmentation (WSIDataset(augment=p): HSV hue, LAB lightness gamma, piecewise-affine warp) is built into
the training graph on each GPU, so the reader's rates above are the same with or without it.
Measured here on the CPU: the augmentation op's time per patch at each size, and at 512/4 the
training rate (patches/s through D and G steps of the paper's 512-px networks, minibatch 2)
with augment=1 against augment=0, steps interleaved in one graph.
Cohort rows (also alone with --cohort-only): the training feed at 512 px with patch_um instead of
downsample, with an annotated region (roi_dir), and with each stain_norm, against plain sampling.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import openslide
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402
import config  # noqa: E402
import dataset  # noqa: E402
import tfutil  # noqa: E402
import train  # noqa: E402
import patch_sampler  # noqa: E402
import wsi  # noqa: E402
from tf_compat import tf  # noqa: E402

RESOLUTION, DOWNSAMPLE = 512, 4
LODS = [0, 1, 2, 4]
FIELD_OF_VIEW = RESOLUTION * DOWNSAMPLE


def bench_slide_dir(work_dir):
    """A folder holding only the demo .svs (or a larger bench slide from the same maker when
    the demo .svs cannot hold a 2048-px field of view)."""
    demo = wsi.create_demo_slides(os.path.join(work_dir, 'demo'), log=lambda message: None)
    svs = next(p for p in demo if p.endswith('.svs'))
    slide_dir = os.path.join(work_dir, 'bench')
    os.makedirs(slide_dir)
    with openslide.OpenSlide(svs) as handle:
        big_enough = min(handle.dimensions) >= 2 * FIELD_OF_VIEW
    if big_enough:
        os.link(svs, os.path.join(slide_dir, os.path.basename(svs)))
    else:
        rgb = wsi.demo_tissue_image(4 * FIELD_OF_VIEW, 3 * FIELD_OF_VIEW, np.random.default_rng(0), num_blobs=4)
        wsi.write_pyramidal_tiff(os.path.join(slide_dir, 'bench.svs'), rgb, aperio=True, level_factor=4)
    return slide_dir


def interleaved_rates(producers, seconds, rounds=4):
    """Patches per wall-clock second and per CPU second (all threads of this process) of each
    producer (a callable that makes patches for about the seconds it is given and returns how
    many), measured in interleaved rounds so that load from other processes affects all alike."""
    for produce in producers.values():
        produce(0.0)   # warm-up: handles, caches
    counts = dict.fromkeys(producers, 0)
    wall = dict.fromkeys(producers, 0.0)
    cpu = dict.fromkeys(producers, 0.0)
    for _ in range(rounds):
        for name, produce in producers.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            counts[name] += produce(seconds / rounds)
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - start_cpu
    return ({name: counts[name] / wall[name] for name in producers},
            {name: counts[name] / cpu[name] for name in producers})


def repeat_for(make_patches):
    """A producer calling make_patches() (which returns its patch count) until time is up."""
    def produce(seconds):
        count, start = make_patches(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            count += make_patches()
        return count
    return produce


def training_feed(sampler, lod, batch):
    """A producer drawing minibatches from sampler.batches() as WSIDataset does. It counts the
    patches read, read-ahead included, and closes the feed at the end (which waits for running
    reads), so its readers do not run on into the next producer's turn."""
    def produce(seconds):
        read_before = sampler.patches_read
        feed = sampler.batches(lod, batch)
        try:
            next(feed)
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                next(feed)
        finally:
            feed.close()
        return sampler.patches_read - read_before
    return produce


def read_and_resize(handle, top_left, size, snap=False):
    level = handle.get_best_level_for_downsample(FIELD_OF_VIEW / size * 1.01)
    read_size = round(FIELD_OF_VIEW / handle.level_downsamples[level])
    if snap:
        top_left = wsi.snap_to_level_grid(top_left, handle.level_downsamples[level], FIELD_OF_VIEW, handle.dimensions)
    rgb = np.asarray(handle.read_region(top_left, level, (read_size, read_size)))[..., :3]
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA) if read_size != size else rgb


def naive_patch(slide_path, mask_path, size, rng):
    handle = openslide.OpenSlide(slide_path)
    mask = wsi.read_png(mask_path, cv2.IMREAD_GRAYSCALE)
    tissue = np.argwhere(mask)
    (y0, x0), (y1, x1) = tissue.min(0), tissue.max(0) + 1
    while True:
        y, x = rng.integers(y0, y1), rng.integers(x0, x1)
        if mask[y, x]:
            break
    scale = handle.dimensions[0] / mask.shape[1]
    top_left = wsi.clamp_top_left(((x + 0.5) * scale, (y + 0.5) * scale), FIELD_OF_VIEW, handle.dimensions)
    patch = read_and_resize(handle, top_left, size)
    handle.close()
    return patch


def measure(slide_dir, mask_cache, seconds):
    cores = os.cpu_count()
    samplers = {threads: patch_sampler.PatchSampler(slide_dir, resolution=RESOLUTION, downsample=DOWNSAMPLE,
                                          mask_cache_dir=mask_cache, num_threads=threads, seed=1, log=lambda m: None)
                for threads in (1, cores)}
    slide = samplers[1].slides[0]
    mask_path = wsi.mask_cache_path(slide.path, mask_cache)
    handle = openslide.OpenSlide(slide.path)
    rng = np.random.default_rng(0)
    rows = []
    for lod in LODS:
        size = RESOLUTION >> lod
        batch = 16 if size >= 256 else 64
        row = {'size': size, 'downsample': DOWNSAMPLE << lod}

        def naive_batch():
            for _ in range(4):
                naive_patch(slide.path, mask_path, size, rng)
            return 4

        def raw_batch(snap=False):
            for _ in range(batch):
                centre = slide.random_centre(rng)
                read_and_resize(handle, wsi.clamp_top_left(centre, FIELD_OF_VIEW, slide.dimensions), size, snap)
            return batch

        producers = {'naive': repeat_for(naive_batch), 'raw': repeat_for(raw_batch),
                     'snap': repeat_for(lambda: raw_batch(snap=True))}
        for threads, sampler in samplers.items():
            producers[threads] = training_feed(sampler, lod, batch)
        wall, cpu = interleaved_rates(producers, seconds)
        rows.append(({**row, **wall, 'aug_ms': augmentation_ms(samplers[1].sample(lod, batch)[0], seconds)},
                     {**row, **cpu}))
        print_row(rows[-1][0], cores)
    handle.close()
    for sampler in samplers.values():
        sampler.close()
    return rows


def augmentation_ms(images, seconds):
    """Milliseconds per patch of augment.augment_minibatch(p=1) on these uint8 NCHW patches, run
    in a TensorFlow session on this machine's CPU."""
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        augmented = augment.augment_minibatch(tf.constant(images), 1.0)
        tfutil.run(augmented)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or runs < 2:
            tfutil.run(augmented)
            runs += 1
        return (time.perf_counter() - start) / runs / len(images) * 1000


def print_header(cores):
    print(f'{"size/ds":>8} {"naive":>7} {"raw":>7} {"snap":>7} {"1w":>7} {f"{cores}w":>7}'
          f' {"1w/naive":>9} {"1w/raw":>7} {"1w/snap":>7} {f"{cores}w/1w":>7} {"aug ms/patch (TF, CPU)":>23}')


def print_row(row, cores):
    one, all_ = row[1], row[cores]
    aug = f'{row["aug_ms"]:23.2f}' if 'aug_ms' in row else f'{"-":>23}'
    print(f'{row["size"]:>4}/{row["downsample"]:<3} {row["naive"]:7.1f} {row["raw"]:7.1f} {row["snap"]:7.1f}'
          f' {one:7.1f} {all_:7.1f} {one / row["naive"]:8.1f}x'
          f' {one / row["raw"]:6.0%} {one / row["snap"]:6.0%} {all_ / one:6.2f}x {aug}', flush=True)


class SwitchedAugmentation(dataset.SyntheticDataset):
    """Synthetic reals with WSIDataset's augmentation behind a switch: one graph times both."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.augment_on = tf.placeholder_with_default(False, [], name='augment_on')

    def augment_minibatch_tf(self, images):
        return tf.cond(self.augment_on, lambda: augment.augment_minibatch(images, 1.0, self.dynamic_range),
                       lambda: tf.cast(images, tf.float32))


def training_rates(steps, minibatch=2):
    """Training patches/s at 512 px (LOD 0) with the paper's networks, with and without the
    in-graph augmentation, D and G steps as train.py runs them, interleaved. A step takes about
    half a minute here, and steps vary by a few percent, so the ratio is good to about 10%."""
    config.G_opt = config.D_opt = config.EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8)
    config.G_loss = config.EasyDict(func='loss.G_wgan_acgan')
    config.D_loss = config.EasyDict(func='loss.D_wgangp_acgan')
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        training_set = SwitchedAugmentation(resolution=RESOLUTION, num_channels=3)
        G = tfutil.Network('G', func='networks.G_paper', num_channels=3, resolution=RESOLUTION, label_size=0)
        D = tfutil.Network('D', func='networks.D_paper', num_channels=3, resolution=RESOLUTION, label_size=0)
        graph = train.build_training_graph(G, D, G.clone('Gs'), training_set, num_gpus=1)
        training_set.configure(minibatch, 0)
        seconds = {False: 0.0, True: 0.0}
        for step in range(steps + 1):
            for augment_on in (False, True) if step % 2 else (True, False):    # alternate: drift hits both
                feed = {graph.lod_in: 0.0, graph.lrate_in: 0.001, graph.minibatch_in: minibatch,
                        training_set.augment_on: augment_on}
                start = time.perf_counter()
                tfutil.run([graph.D_train_op, graph.Gs_update_op], feed)
                tfutil.run(graph.G_train_op, feed)
                if step > 0:    # the first is warm-up
                    seconds[augment_on] += time.perf_counter() - start
    return {augment_on: steps * minibatch / total for augment_on, total in seconds.items()}


def memory_run(slide_dir, mask_cache, total, lod=0, batch=16):
    process = psutil.Process()
    with patch_sampler.PatchSampler(slide_dir, resolution=RESOLUTION, downsample=DOWNSAMPLE, mask_cache_dir=mask_cache,
                          seed=2, log=lambda m: None) as sampler:
        done, after_first_1000 = 0, None
        start = time.perf_counter()
        feed = sampler.batches(lod, batch)
        while done < total:
            done += len(next(feed)[0])
            if after_first_1000 is None and done >= 1000:
                after_first_1000 = process.memory_info().rss
        elapsed = time.perf_counter() - start
        feed.close()
        end = process.memory_info().rss
    size = RESOLUTION >> lod
    print(f'Memory: {total} patches of {size}x{size} in {elapsed:.1f} s ({total / elapsed:.0f}/s): RSS '
          f'{after_first_1000 / 2**20:.0f} MB after the first 1,000, {end / 2**20:.0f} MB at the end '
          f'({(end - after_first_1000) / 2**20:+.0f} MB; target within 300 MB)')


def write_roi(slide_path, roi_dir):
    """A QuPath-style GeoJSON for the slide: the central 60% of it, less a hole in its middle fifth."""
    with openslide.OpenSlide(slide_path) as handle:
        width, height = handle.dimensions

    def box(f0, f1):     # a closed ring from fraction f0 to f1 of the slide on both axes
        return [[width * f0, height * f0], [width * f1, height * f0], [width * f1, height * f1],
                [width * f0, height * f1], [width * f0, height * f0]]
    feature = {'type': 'Feature', 'properties': {'classification': {'name': 'Tumor'}},
               'geometry': {'type': 'Polygon', 'coordinates': [box(0.2, 0.8), box(0.4, 0.6)]}}
    os.makedirs(roi_dir, exist_ok=True)
    with open(wsi.roi_path(slide_path, roi_dir), 'w', encoding='utf-8') as f:
        json.dump({'type': 'FeatureCollection', 'features': [feature]}, f)


def cohort_rates(slide_dir, mask_cache, seconds):
    """Reader rates at 512 px with every reader thread (the training feed), for the cohort
    options against plain downsample sampling, measured interleaved: patch_um giving the same
    field of view from the slide's MPP, an annotated region, and each stain normalisation."""
    path = os.path.join(slide_dir, os.listdir(slide_dir)[0])
    roi_dir = os.path.join(os.path.dirname(slide_dir), 'roi')
    write_roi(path, roi_dir)
    with openslide.OpenSlide(path) as handle:
        mpp = float(handle.properties[openslide.PROPERTY_NAME_MPP_X])
    options = {'plain (downsample)': {'downsample': DOWNSAMPLE},
               f'patch_um={FIELD_OF_VIEW * mpp:g}': {'patch_um': FIELD_OF_VIEW * mpp},
               'roi': {'downsample': DOWNSAMPLE, 'roi_dir': roi_dir},
               'stain_norm=reinhard': {'downsample': DOWNSAMPLE, 'stain_norm': 'reinhard'},
               'stain_norm=macenko': {'downsample': DOWNSAMPLE, 'stain_norm': 'macenko'}}
    samplers = {name: patch_sampler.PatchSampler(slide_dir, resolution=RESOLUTION, mask_cache_dir=mask_cache, seed=1,
                                       log=lambda m: None, **kwargs) for name, kwargs in options.items()}
    try:
        wall, cpu = interleaved_rates({name: training_feed(s, 0, 16) for name, s in samplers.items()}, seconds)
    finally:
        for sampler in samplers.values():
            sampler.close()
    plain = 'plain (downsample)'
    print(f'Cohort options at {RESOLUTION} px, {os.cpu_count()} readers, target >= 70% of plain: patches/s and '
          f'share of plain per wall-clock second and per CPU-second (the latter robust to other processes\' load)')
    for name in options:
        shares = [rates[name] / rates[plain] for rates in (wall, cpu)]
        verdicts = ' '.join('met   ' if share >= 0.7 else 'MISSED' for share in shares)
        print(f'  {name:<22} {wall[name]:7.1f} {shares[0]:5.0%}   {cpu[name]:7.1f} {shares[1]:5.0%}   {verdicts}',
              flush=True)


def print_targets(wall, cpu, cores, training):
    checks = [('one worker >= 5x naive', 'naive', 1, 'naive', 5.0),
              ('one worker >= 80% of raw', 'raw', 1, 'raw', 0.8),
              ('one worker >= 80% of snap (same reads)', 'snap', 1, 'snap', 0.8),
              (f'{cores} workers >= 1.7x one worker', None, cores, 1, 1.7)]
    print(f'Targets at 512/4{"":<27}  wall-clock  per CPU-second')
    for name, cpu_meaningful, numerator, denominator, target in checks:
        by_wall = wall[numerator] / wall[denominator]
        by_cpu = f'{cpu[numerator] / cpu[denominator]:6.2f}' if cpu_meaningful else '     -'
        print(f'  {name:<42} {by_wall:6.2f} {"met" if by_wall >= target else "MISSED":<6} {by_cpu}')
    ratio = training[True] / training[False]
    print(f'  {"training with augment=1 >= 70% of without":<42} {ratio:6.2f} {"met" if ratio >= 0.7 else "MISSED":<6}'
          f'      -   ({training[True]:.3f} vs {training[False]:.3f} patches/s, paper networks on this CPU)')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seconds', type=float, default=6.0, help='per measurement, in 4 turns')
    parser.add_argument('--memory-patches', type=int, default=20000)
    parser.add_argument('--train-steps', type=int, default=3, help='timed training steps per mode at 512 px')
    parser.add_argument('--cohort-only', action='store_true', help='only the rows for patch_um, roi and stain_norm')
    args = parser.parse_args()
    if args.train_steps < 1:
        parser.error('--train-steps must be at least 1')
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as work_dir:
        slide_dir = bench_slide_dir(work_dir)
        mask_cache = os.path.join(work_dir, 'masks')
        print(f'Slide: {os.listdir(slide_dir)[0]}, field of view {FIELD_OF_VIEW} px, {cores} cores; patches/s')
        if args.cohort_only:
            cohort_rates(slide_dir, mask_cache, args.seconds)
            return
        print(f'Load average before: {os.getloadavg()[0]:.1f} (other processes compete when above {cores})')
        print('Patches per wall-clock second:')
        print_header(cores)
        rows = measure(slide_dir, mask_cache, args.seconds)
        print('Patches per CPU-second of this process (all threads; robust to load from other processes):')
        print_header(cores)
        for _, cpu in rows:
            print_row(cpu, cores)
        memory_run(slide_dir, mask_cache, args.memory_patches)
        training = training_rates(args.train_steps)
        print(f'Load average after: {os.getloadavg()[0]:.1f}')
        print_targets(*rows[0], cores, training)
        cohort_rates(slide_dir, mask_cache, args.seconds)
        first = rows[0][0]
        print(f'512/4 one worker: {first[1]:.1f} patches/s = {first[1] / first["naive"]:.1f}x '
              f'the naive baseline ({first["naive"]:.1f} patches/s)')


if __name__ == '__main__':
    main()
