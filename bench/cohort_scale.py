"""How the slide path holds as the cohort grows: memory, cold start, and patch rates against the raw
OpenSlide read rate of the same reads, for cohorts of N distinct pyramidal Aperio slides.

  python bench/cohort_scale.py [--sizes 30 300 1000] [--seconds 4] [--work-dir DIR] [--extra]

Per N, with WSIDataset's geometry at resolution 512, downsample 4 (a 2048-px field of view):
  cold start   PatchSampler construction with an empty mask cache, one worker and one per core
               (seconds, seconds per slide, cores used = CPU seconds of this process and its
               children / wall seconds)
  memory       resident MB of this process per slide after a warm construction, and of the
               reader processes (USS: pages of their own)
  rates        patches/s through the training feed (PatchSampler.batches) at 512, 32, 16 and 4 px with
               1 and 2 readers, and the raw rate: the same kind of reads (random slide, random tissue
               pixel, the same level and size) through OpenSlide.read_region on handles kept open,
               one thread, measured in the same rounds
  CPU/patch    milliseconds of CPU (this process and its children) per patch at 4 px
Then an extrapolation to 10,000 and 30,000 slides. --extra adds the second issue's cases: 256 slides
whose lowest level is small enough for OpenSlide to hash it at every open, the RSS plateau of 4
readers over 256 large slides, and the start-up time of writing slide overviews.

Slides are written once into --work-dir (default: a folder under the system temp dir) and reused.
"""

import argparse
import inspect
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import openslide
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import patch_sampler  # noqa: E402
import wsi  # noqa: E402

RESOLUTION, DOWNSAMPLE = 512, 4
FIELD_OF_VIEW = RESOLUTION * DOWNSAMPLE
SIZES = (512, 32, 16, 4)


# ----------------------------------------------------------------------------------------------
# Slides.

def write_cohort_slide(path, seed, width=None, height=None, min_level_size=None):
    """A distinct 3-level Aperio slide (level factor 4) of random size and tissue layout."""
    rng = np.random.default_rng(seed)
    width = width or int(rng.integers(3072, 4608))
    height = height or int(rng.integers(3072, 4608))
    rgb = wsi.demo_tissue_image(width, height, rng, num_blobs=int(rng.integers(2, 5)))
    wsi.write_pyramidal_tiff(path, rgb, aperio=True, level_factor=4, min_level_size=min_level_size)


def slide_pool(work_dir, name, count, **kwargs):
    """Paths of `count` slides in work_dir/name, written now where missing (two processes)."""
    folder = os.path.join(work_dir, name)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f'{name}-{i:05d}.svs') for i in range(count)]
    missing = [(p, i) for i, p in enumerate(paths) if not os.path.exists(p)]
    if missing:
        import concurrent.futures
        print(f'writing {len(missing)} slides into {folder} ...', flush=True)
        with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write_one, [(p, i + hash(name) % 10 ** 6, kwargs) for p, i in missing]))
    return paths


def _write_one(job):
    path, seed, kwargs = job
    write_cohort_slide(path, seed, **kwargs)


def cohort_folder(work_dir, paths, name):
    """A folder of symbolic links to paths: a cohort of its own for the mask cache (keyed by path)."""
    folder = os.path.join(work_dir, 'cohorts', name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for i, path in enumerate(paths):   # numbered: one file may stand for several slides
        os.symlink(path, os.path.join(folder, f'{i:05d}-{os.path.basename(path)}'))
    return folder


# ----------------------------------------------------------------------------------------------
# Measuring.

def cpu_seconds():
    """CPU seconds of this process, its finished children and its live ones."""
    t = os.times()
    live = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
            live += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return t.user + t.system + t.children_user + t.children_system + live


def rss_mb():
    return psutil.Process().memory_info().rss / 2 ** 20


def children_uss_mb():
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_full_info().uss
        except psutil.NoSuchProcess:
            pass
    return total / 2 ** 20


def make_sampler(folder, mask_cache, readers, **kwargs):
    """PatchSampler with `readers` readers (the option was num_threads before reader processes)."""
    params = inspect.signature(patch_sampler.PatchSampler).parameters
    key = 'num_readers' if 'num_readers' in params else 'num_threads'
    return patch_sampler.PatchSampler(folder, resolution=RESOLUTION, downsample=DOWNSAMPLE, mask_cache_dir=mask_cache,
                            seed=1, log=lambda m: None, **{key: readers}, **kwargs)


def cold_start(folder, work_dir, workers):
    """(seconds, cores used) of building every mask of the folder with `workers` workers."""
    mask_cache = tempfile.mkdtemp(dir=work_dir, prefix='masks-')
    paths = wsi.find_slides(folder)
    params = inspect.signature(wsi.inspect_slides).parameters
    key = 'num_workers' if 'num_workers' in params else 'num_threads'
    start, start_cpu = time.perf_counter(), cpu_seconds()
    wsi.inspect_slides(paths, mask_cache, field_of_view=FIELD_OF_VIEW, progress=False, **{key: workers})
    wall = time.perf_counter() - start
    cores = (cpu_seconds() - start_cpu) / wall
    shutil.rmtree(mask_cache)
    return wall, cores


def tissue_pixels(folder, mask_cache):
    """Per slide: (path, level-0 size, level-0 pixels per mask pixel, (ys, xs) of tissue pixels)."""
    slides = []
    for path in wsi.find_slides(folder):
        info = wsi.inspect_slide(path, mask_cache, field_of_view=FIELD_OF_VIEW)
        if info.problem is None:
            slides.append((path, info.dimensions, info.mask_scale, np.nonzero(info.mask())))
    return slides


def raw_reads(slides, size, rng):
    """A producer of raw reads: the reads PatchSampler makes for `size`-px patches, through
    OpenSlide.read_region on handles kept open (one shared tile cache when the API has it)."""
    cache = openslide.OpenSlideCache(256 << 20) if hasattr(openslide, 'OpenSlideCache') else None
    handles = {}

    def handle(path):
        if path not in handles:
            handles[path] = openslide.OpenSlide(path)
            if cache is not None:
                handles[path].set_cache(cache)
        return handles[path]

    def produce(seconds):
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds:
            path, dimensions, scale, (ys, xs) = slides[rng.integers(len(slides))]
            k = rng.integers(len(ys))
            centre = ((xs[k] + rng.random()) * scale[0], (ys[k] + rng.random()) * scale[1])
            h = handle(path)
            level = h.get_best_level_for_downsample(FIELD_OF_VIEW / size * 1.01)
            level_downsample = h.level_downsamples[level]
            top_left = wsi.clamp_top_left(centre, FIELD_OF_VIEW, dimensions)
            top_left = wsi.snap_to_level_grid(top_left, level_downsample, FIELD_OF_VIEW, dimensions)
            read = max(1, round(FIELD_OF_VIEW / level_downsample))
            np.asarray(h.read_region(top_left, level, (read, read)))
            count += 1
        return count
    produce.close = lambda: [h.close() for h in handles.values()]
    return produce


def training_feed(sampler, size, minibatch):
    """A producer drawing minibatches from sampler.batches() as WSIDataset does; it counts the
    patches read (read-ahead included) and closes the feed, so no reader runs on afterwards."""
    lod = int(np.log2(RESOLUTION // size))

    def produce(seconds):
        before = sampler.patches_read
        feed = sampler.batches(lod, minibatch)
        try:
            next(feed)
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                next(feed)
        finally:
            feed.close()
        return sampler.patches_read - before
    return produce


def interleaved(producers, seconds, rounds=3):
    """(patches per wall second, CPU ms per patch) of each producer, in interleaved rounds so that
    other load on the machine touches all alike."""
    for produce in producers.values():
        produce(0.2)
    counts, wall, cpu = (dict.fromkeys(producers, 0.0) for _ in range(3))
    for _ in range(rounds):
        for name, produce in producers.items():
            start, start_cpu = time.perf_counter(), cpu_seconds()
            counts[name] += produce(seconds / rounds)
            wall[name] += time.perf_counter() - start
            cpu[name] += cpu_seconds() - start_cpu
    return ({n: counts[n] / wall[n] for n in producers}, {n: 1000 * cpu[n] / counts[n] for n in producers})


def measure_cohort(work_dir, paths, seconds, workers):
    n = len(paths)
    folder = cohort_folder(work_dir, paths, f'n{n}')
    row = {'n': n}
    row['cold_1'], row['cores_1'] = cold_start(folder, work_dir, 1)
    row['cold_all'], row['cores_all'] = cold_start(folder, work_dir, workers)
    mask_cache = tempfile.mkdtemp(dir=work_dir, prefix='masks-')
    wsi.inspect_slides(wsi.find_slides(folder), mask_cache, field_of_view=FIELD_OF_VIEW, progress=False)
    base = rss_mb()
    sampler = make_sampler(folder, mask_cache, 1)
    row['rss'] = rss_mb() - base
    row['mb_per_slide'] = row['rss'] / n
    samplers = {1: sampler, 2: make_sampler(folder, mask_cache, 2)}
    row['reader_uss'] = children_uss_mb()
    slides = tissue_pixels(folder, mask_cache)
    rng = np.random.default_rng(0)
    for size in SIZES:
        raw = raw_reads(slides, size, rng)
        minibatch = 16 if size >= 256 else 256
        producers = {'raw': raw, 1: training_feed(samplers[1], size, minibatch),
                     2: training_feed(samplers[2], size, minibatch)}
        rates, cpu_ms = interleaved(producers, seconds)
        raw.close()
        row[size] = rates
        row[f'cpu_{size}'] = cpu_ms
    for s in samplers.values():
        s.close()
    shutil.rmtree(mask_cache)
    return row


# ----------------------------------------------------------------------------------------------
# Printing.

def print_rows(rows):
    print(f'\n{"N":>5} {"cold 1w s":>9} {"cold Nw s":>9} {"speed-up":>8} {"s/slide":>7} {"cores":>5} '
          f'{"RSS MB":>7} {"MB/slide":>8} {"readers MB":>10}')
    for r in rows:
        print(f'{r["n"]:5d} {r["cold_1"]:9.1f} {r["cold_all"]:9.1f} {r["cold_1"] / r["cold_all"]:7.2f}x '
              f'{r["cold_all"] / r["n"]:7.3f} {r["cores_all"]:5.2f} {r["rss"]:7.0f} {r["mb_per_slide"]:8.3f} '
              f'{r["reader_uss"]:10.0f}')
    print(f'\n{"N":>5} {"size":>4} {"raw/s":>8} {"1 reader":>8} {"2 readers":>9} {"1r/raw":>6} {"2r/1r":>6} '
          f'{"CPU ms/patch raw, 1r, 2r":>26}')
    for r in rows:
        for size in SIZES:
            rate, cpu = r[size], r[f'cpu_{size}']
            print(f'{r["n"]:5d} {size:4d} {rate["raw"]:8.0f} {rate[1]:8.0f} {rate[2]:9.0f} '
                  f'{rate[1] / rate["raw"]:6.0%} {rate[2] / rate[1]:5.2f}x '
                  f'{cpu["raw"]:8.2f} {cpu[1]:8.2f} {cpu[2]:8.2f}')


def print_extrapolation(rows, workers):
    largest = rows[-1]
    per_slide_mb = np.median([r['mb_per_slide'] for r in rows])
    print('\nExtrapolated from the measured per-slide figures (largest cohort for time, median for memory):')
    for n in (10_000, 30_000):
        cold = largest['cold_all'] / largest['n'] * n
        print(f'  {n:6d} slides: resident {per_slide_mb * n / 1024:6.2f} GB, cold start {cold / 60:6.1f} min '
              f'with {workers} workers ({cold / 60 * largest["cores_all"]:6.1f} CPU-minutes)')


# ----------------------------------------------------------------------------------------------
# The second issue's cases.

def extra_cases(work_dir, seconds):
    print('\nExtra cases')
    normal = slide_pool(work_dir, 'normal', 256)
    hashed = slide_pool(work_dir, 'hashed', 256, min_level_size=1600)
    for name, paths in (('normal lowest level', normal), ('lowest level hashed at open', hashed)):
        folder = cohort_folder(work_dir, paths, name.replace(' ', '-'))
        mask_cache = tempfile.mkdtemp(dir=work_dir, prefix='masks-')
        sampler = make_sampler(folder, mask_cache, 2)
        rates, cpu = interleaved({'feed': training_feed(sampler, 32, 256)}, seconds)
        sampler.close()
        print(f'  256 slides, {name:28s}: {rates["feed"]:7.0f} patches/s at 32 px, {cpu["feed"]:.2f} CPU ms/patch')
    large = slide_pool(work_dir, 'large', 8, width=16384, height=12288)
    folder = cohort_folder(work_dir, large * 32, 'large')  # 256 names, 8 files: 256 handles, 256 tile caches
    mask_cache = tempfile.mkdtemp(dir=work_dir, prefix='masks-')
    base = rss_mb() + children_uss_mb()
    sampler = make_sampler(folder, mask_cache, 4)
    peak = 0.0
    feed = training_feed(sampler, 512, 16)
    for _ in range(4):
        feed(seconds)
        peak = max(peak, rss_mb() + children_uss_mb() - base)
    print(f'  256 large slides, 4 readers, 512 px: resident peak {peak:.0f} MB above the empty process')
    start = time.perf_counter()
    sampler.write_overview(os.path.join(work_dir, 'overviews'))
    print(f'  slide overviews at start-up: {time.perf_counter() - start:.1f} s for {len(sampler.slides)} slides')
    sampler.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[30, 300, 1000])
    parser.add_argument('--seconds', type=float, default=4.0, help='per rate, split over interleaved rounds')
    parser.add_argument('--work-dir', default=os.path.join(tempfile.gettempdir(), 'wsi-progan-cohort-bench'))
    parser.add_argument('--extra', action='store_true')
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    print(f'{workers} cores, load average {os.getloadavg()[0]:.1f}; resolution {RESOLUTION}, downsample {DOWNSAMPLE}')
    pool = slide_pool(args.work_dir, 'cohort', max(args.sizes))
    rows = []
    for n in sorted(args.sizes):
        rows.append(measure_cohort(args.work_dir, pool[:n], args.seconds, workers))
        print_rows(rows[-1:])
    print_rows(rows)
    print_extrapolation(rows, workers)
    if args.extra:
        extra_cases(args.work_dir, args.seconds)
    small = [r for r in rows if r['n'] == min(args.sizes)][0]
    print(f'\nheadline: {rows[-1]["n"]} slides, cold start {rows[-1]["cold_1"] / rows[-1]["cold_all"]:.2f}x with '
          f'{workers} workers, {rows[-1]["mb_per_slide"]:.3f} MB/slide, 2 readers {rows[-1][32][2] / rows[-1][32][1]:.2f}x '
          f'at 32 px, 1 reader at 16 px {small[16][1] / small[16]["raw"]:.0%} of raw')


if __name__ == '__main__':
    main()
