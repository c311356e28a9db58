"""The random tissue-patch sampler: PatchSampler, in the trainer's process, and the reader
processes (worker_pool) that read its patches.

PatchSampler finds and inspects the slides (masks built in the readers), keeps each slide's tissue
as row runs (wsi.TissueRuns) in one shared-memory table that every reader maps, draws which slide
each patch comes from, and hands each reader a contiguous chunk of every minibatch. A reader picks
the patch centre in the slide's tissue, reads the patch through its own open handles and writes it
straight into a shared-memory slot of the minibatch (NCHW), so patches never pass through a socket.
The trainer copies a finished minibatch out of its slot once.

Geometry: at LOD k a patch is `resolution >> k` pixels read at `downsample << k`, so every LOD
covers the same field of view of `resolution * downsample` level-0 pixels (per slide with patch_um).
"""

import collections
import functools
import os

import cv2
import numpy as np
import openslide

import stain
import worker_pool
import wsi

READER_TILE_CACHE_BYTES = 64 << 20      # OpenSlide's tile cache per reader, shared by all its handles
READER_HANDLE_BUDGET_BYTES = 256 << 20  # estimated memory of the slide handles a reader keeps open
HANDLE_BASE_BYTES = 64 << 10            # an open handle without tiles (measured: about 45 kB)
HANDLE_BYTES_PER_TILE = 32              # tile offsets and byte counts, in OpenSlide and libtiff
TILE_SIDE = 256                         # assumed for the estimate when the slide does not say
FD_SHARE_OF_LIMIT = 0.75                # a reader closes handles when its open files pass this
MAX_OVERVIEWS = 64                      # slides pictured at the start of a run (a sample beyond that)


class PatchSampler:
    """Random tissue patches from a folder of slides, read by num_readers reader processes.

    sample(lod, count) -> (uint8 [count, 3, r, r], int64 [count] class index or -1),
    r = resolution >> lod read at downsample << lod. With patch_um instead of downsample, each
    slide's downsample is patch_um / (its MPP * resolution): the same physical field of view.
    roi_dir limits patch centres to annotated regions; stain_norm normalises every patch's stain
    to a target (stain.py). Read problems are counted per slide; tick_report() summarises them.
    num_readers=0 reads in this process (for debugging); num_threads is its former name.
    """

    def __init__(self, slide_dir, wsi_ext='.svs', resolution=512, downsample=4,
                 label_file=None, max_label_size=0, recursive=False, mask_cache_dir=None,
                 rotate90=False, min_tissue_fraction=0.01, weight_by_tissue=False,
                 num_readers=None, seed=None, log=print, patch_um=None, default_mpp=None,
                 roi_dir=None, roi_labels=None, roi_missing='leave_out', stain_norm=None, stain_target=None,
                 roi_detections=False, num_threads=None):
        self.resolution_log2 = int(np.log2(resolution))
        if resolution != 2 ** self.resolution_log2 or resolution < 4:
            raise ValueError(f'resolution must be a power of two >= 4, got {resolution}')
        if roi_missing not in ('leave_out', 'tissue'):
            raise ValueError(f"roi_missing must be 'leave_out' or 'tissue', got {roi_missing!r}")
        stain.check_method(stain_norm)
        self.resolution = resolution
        self.downsample = None if patch_um is not None else downsample
        self.field_of_view = None if patch_um is not None else resolution * downsample   # per slide otherwise
        self.shape = [3, resolution, resolution]
        self.max_lod = self.resolution_log2 - 2   # the field of view is the same at every LOD
        self.log = log
        self.mask_cache_dir = mask_cache_dir or wsi.default_mask_cache_dir()
        self.num_readers = reader_count(num_readers, num_threads)
        self.stain_norm = stain_norm
        self.problems_path = None   # read-problems.txt once the run directory is known

        paths = wsi.find_slides(slide_dir, wsi_ext, recursive)
        if not paths:
            raise wsi.NoUsableSlidesError(f'No files with extension {wsi_ext} in {slide_dir}')
        self._pool = worker_pool.WorkerPool(self.num_readers, name='slide reader')
        try:
            infos = self._prepare_slides(paths, min_tissue_fraction, patch_um, default_mpp,
                                         roi_dir, roi_labels, roi_missing, roi_detections)
            self._apply_labels(infos, slide_dir, label_file, max_label_size)
            self._report_problems(slide_dir, infos)
            self.slides = [info for info in infos if info.problem is None]
            self.slide_paths = [info.path for info in self.slides]
            self._start_readers(seed, weight_by_tissue, rotate90)
            if stain_norm is not None:
                self._fit_stain(stain_target)
        except BaseException:
            self._pool.close()
            raise

    # -- setting up ----------------------------------------------------------------------------

    def _prepare_slides(self, paths, min_tissue_fraction, patch_um, default_mpp, roi_dir, roi_labels, roi_missing,
                        roi_detections):
        """Inspect every slide (mask built or loaded) and limit it to its regions, in the readers."""
        job = functools.partial(prepare_slide, mask_cache_dir=self.mask_cache_dir,
                                min_tissue_fraction=min_tissue_fraction, field_of_view=self.field_of_view,
                                patch_um=patch_um, default_mpp=default_mpp, roi_dir=roi_dir, roi_labels=roi_labels,
                                whole_tissue_without_file=roi_missing == 'tissue', roi_detections=roi_detections)
        infos = worker_pool.map_with_progress(job, paths, self._pool, desc='Tissue masks', unit='slide')
        mixed = wsi.mixed_magnification_warning(infos) if patch_um is None else None
        if mixed:
            self.log(f'Warning: {os.path.dirname(paths[0])}: {mixed}')
        return infos

    def _apply_labels(self, infos, slide_dir, label_file, max_label_size):
        self.class_names = []
        self.label_size = 0
        if label_file is None or max_label_size == 0:
            return
        indices, self.class_names = wsi.slide_classes([i.path for i in infos], slide_dir, label_file)
        self.label_size = len(self.class_names) if max_label_size == 'full' else min(len(self.class_names), max_label_size)
        for info, index in zip(infos, indices):
            info.class_index = int(index)
            if index < 0 and info.problem is None:
                info.problem = f'no class for it in {label_file}'

    def _report_problems(self, slide_dir, infos):
        for info in infos:
            if info.warning:
                self.log(f'Warning: {info.path}: {info.warning}')
            if info.problem:
                self.log(f'Warning: leaving out {info.path}: {info.problem}')
        if all(info.problem for info in infos):
            listing = '\n'.join(f'  {info.path}: {info.problem}' for info in infos)
            raise wsi.NoUsableSlidesError(f'No usable slide in {slide_dir}:\n{listing}')

    def _start_readers(self, seed, weight_by_tissue, rotate90):
        """Move the slides' tissue runs into one shared table and set every reader up on it."""
        weights = [s.tissue_area if weight_by_tissue else 1.0 for s in self.slides]
        self._table = SlideTable(self.slides, weights)
        self._slide_cdf = np.cumsum(self._table.weights)
        self._active = np.ones(len(self.slides), bool)
        self._drops = []                # slide indices dropped, in order; readers are told as they go
        self._drops_told = [0] * len(self._pool)
        self.read_problems = [collections.Counter() for _ in self.slides]   # cause -> count, since the last tick
        self._problem_details = []      # lines for read-problems.txt, written at the next tick
        self._rng = np.random.default_rng(seed)
        self._serial = 0                # minibatches submitted; the control word cancels up to one
        self._control = worker_pool.SharedBuffer(8 * (1 + len(self._pool)))
        self._counters = self._control.array(np.int64, [1 + len(self._pool)])
        for k, worker in enumerate(self._pool.workers):
            worker.share(self._table.buffer)
            worker.share(self._control)
            worker.call(setup_reader, self._table.description(), self._control.key, k, self.resolution, rotate90)
        for worker in self._pool.workers:
            worker.result()

    def _fit_stain(self, target_path):
        """A stain transform per slide, fitted in the readers to wsi.STAIN_FIT_PATCHES of its patches,
        towards the target image, or by default towards the cohort's most typical patch (stain_target_image)."""
        size = min(self.resolution, wsi.STAIN_FIT_SIZE)
        every = max(1, len(self.slides) // 64)      # candidates for the target: one per slide, up to 64
        jobs = [(self._control.key, index, size, self.stain_norm, index % every == 0)
                for index in range(len(self.slides))]
        fits = worker_pool.map_with_progress(fit_slide_stain, jobs, self._pool, desc='Stain fits', unit='slide')
        for index, (_, _, warning) in enumerate(fits):
            if warning:
                self.log(f'Warning: {self.slides[index].path}: patches stay unnormalised ({warning})')
        if target_path is not None:
            self.stain_target_image = stain.read_target_image(target_path)
        else:
            candidates = [patch for _, patch, _ in fits if patch is not None]
            if not candidates:
                raise wsi.NoUsableSlidesError('No patch could be read to pick a stain target from; see the warnings above')
            self.stain_target_image = stain.representative_patch(np.stack(candidates))
        try:
            target = stain.fit(self.stain_norm, self.stain_target_image)
        except ValueError as e:
            raise ValueError(f'stain_target {target_path or "(picked from the slides)"}: {e}; '
                             f'give a stain_target image showing stained tissue') from None
        transforms = [stain.transform(self.stain_norm, source, target) if source is not None else None
                      for source, _, _ in fits]
        self._pool.broadcast(set_reader_stain, self._control.key, transforms)

    # -- public API ---------------------------------------------------------------------------

    @property
    def patches_read(self):
        """Patches the readers have read, read-ahead included."""
        return int(self._counters[1:].sum())

    def patch_size(self, lod):
        """Patch side at an integer LOD: resolution >> lod."""
        if lod != int(lod) or not 0 <= lod <= self.max_lod:
            raise ValueError(f'lod must be an integer in 0..{self.max_lod}, got {lod}')
        return self.resolution >> int(lod)

    def sample(self, lod, count):
        """count random tissue patches at LOD lod, read by the readers:
        (uint8 [count, 3, r, r], int64 [count] class index, -1 without labels)."""
        size = self.patch_size(lod)
        arena = worker_pool.SharedBuffer(count * 3 * size * size)
        try:
            chunks = self._submit(arena, 0, count, size)
            classes = self._collect(chunks)
            return arena.array(np.uint8, [count, 3, size, size]).copy(), classes
        finally:
            self._release(arena)

    def batches(self, lod, minibatch, prefetch=4):
        """Endless (images, class indices) minibatches. `prefetch` of them stay queued in the
        readers, so a reader goes straight on to the next minibatch rather than idling at each
        one's end while the slowest chunk finishes. Closing the generator (a new LOD or minibatch
        size) cancels the read-ahead and returns once no reader works for it."""
        size = self.patch_size(lod)
        slots = max(prefetch, 1) + 1            # + the one handed out now
        slot_shape = [minibatch, 3, size, size]
        arena = worker_pool.SharedBuffer(slots * int(np.prod(slot_shape)))
        free, in_flight = collections.deque(range(slots)), collections.deque()
        try:
            while True:
                while free:
                    slot = free.popleft()
                    in_flight.append((slot, self._submit(arena, slot, minibatch, size)))
                slot, chunks = in_flight.popleft()
                classes = self._collect(chunks)
                images = arena.array(np.uint8, slot_shape, offset=slot * int(np.prod(slot_shape))).copy()
                free.append(slot)
                yield images, classes
        finally:    # cancel what is queued; collect every reply, so nothing reads on after
            self._counters[0] = self._serial
            for _, chunks in in_flight:
                self._collect(chunks, cancelled=True)
            self._release(arena)

    def labels_onehot(self, class_indices):
        class_indices = np.asarray(class_indices)
        onehot = np.zeros([len(class_indices), self.label_size], np.float32)
        rows = np.flatnonzero((class_indices >= 0) & (class_indices < self.label_size))
        onehot[rows, class_indices[rows]] = 1
        return onehot

    def random_labels(self, count):
        return self.labels_onehot(self._table.class_index[self._choose_slides(count)])

    def close(self):
        if self._pool is not None:
            forget_reader(self._control.key)    # the reader num_readers=0 kept in this process
            self._pool.close()
            self._pool = None
            self._control.close()
            self._table.buffer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- minibatches ----------------------------------------------------------------------------

    def _choose_slides(self, count):
        """count slide indices drawn by the slide weights among the slides not dropped."""
        choice = np.minimum(np.searchsorted(self._slide_cdf, self._rng.random(count), side='right'),
                            len(self.slides) - 1)
        dropped = ~self._active[choice]
        if dropped.any():
            weights = np.diff(self._slide_cdf, prepend=0) * self._active
            if not weights.any():
                raise RuntimeError('Every slide has been dropped after failed reads; see the warnings above')
            choice[dropped] = self._rng.choice(len(weights), size=int(dropped.sum()), p=weights / weights.sum())
        return choice

    def _submit(self, arena, slot, count, size):
        """Queue the reading of count patches into a slot of arena, one contiguous chunk per
        reader: [(worker, first, last)]."""
        self._serial += 1
        slides = self._choose_slides(count)
        bounds = np.linspace(0, count, len(self._pool) + 1).astype(int)
        seeds = self._rng.integers(2 ** 63, size=len(self._pool))
        chunks = []
        for k, (worker, begin, end) in enumerate(zip(self._pool.workers, bounds[:-1], bounds[1:])):
            if begin == end:
                continue
            worker.share(arena)
            news = self._drops[self._drops_told[k]:]
            self._drops_told[k] = len(self._drops)
            worker.call(read_chunk, self._control.key, arena.key, slot * count, count, size, begin, slides[begin:end],
                        int(seeds[k]), self._serial, news)
            chunks.append((worker, begin, end))
        return chunks

    def _collect(self, chunks, cancelled=False):
        """Wait for every chunk's reader (so no reply is left behind when one fails), count their
        read problems, and return the class index of every patch."""
        classes = np.empty(chunks[-1][2] if chunks else 0, np.int64)
        failure = None
        for worker, begin, end in chunks:
            try:
                used, problems, error = worker.result()
            except worker_pool.WorkerError as e:
                failure = failure or e
                continue
            self._count_problems(problems)
            failure = failure or (RuntimeError(error) if error else None)
            if not cancelled:
                classes[begin:end] = self._table.class_index[used]
        if failure is not None:
            raise failure
        return classes

    def _release(self, arena):
        if self._pool is not None:
            for worker in self._pool.workers:
                worker.forget(arena)
        arena.close()

    # -- read problems --------------------------------------------------------------------------

    def _count_problems(self, problems):
        """Take a reader's failed reads: (slide index, centre, cause, message, drop) each; a slide
        any reader drops after wsi.MAX_CONSECUTIVE_FAILURES failures in a row is dropped for all."""
        for slide_index, (x, y), cause, message, drop in problems:
            path = self.slides[slide_index].path
            self.read_problems[slide_index][cause] += 1
            if len(self._problem_details) < wsi.MAX_PROBLEM_DETAILS_PER_TICK:
                self._problem_details.append(f'{path}\tcentre ({x:.0f}, {y:.0f})\t{cause}: {message}')
            if drop and self._active[slide_index]:
                self._active[slide_index] = False
                self._drops.append(slide_index)
                self.log(f'Warning: dropping {path} after {wsi.MAX_CONSECUTIVE_FAILURES} failed reads in a row '
                         f'(last: {cause}: {message}); it is left out from now on')

    def tick_report(self):
        """One line per slide with read problems since the last call (count, commonest cause),
        and those problems' details appended to problems_path (when set)."""
        counts, self.read_problems = self.read_problems, [collections.Counter() for _ in self.slides]
        details, self._problem_details = self._problem_details, []
        if details and self.problems_path:
            with open(self.problems_path, 'a', encoding='utf-8') as f:
                f.writelines(line + '\n' for line in details)
        where = f'; details in {self.problems_path}' if self.problems_path else ''
        lines = []
        for slide, causes in zip(self.slides, counts):
            if causes:
                cause, count = causes.most_common(1)[0]
                lines.append(f'Read problems: {slide.path}: {sum(causes.values())} since the last tick, '
                             f'mostly {cause} ({count}){where}')
        return lines

    # -- pictures -------------------------------------------------------------------------------

    def overview_slides(self, limit=MAX_OVERVIEWS):
        """Indices of the slides pictured at the start of a run: all of them up to limit, else
        limit of them spread evenly over the cohort."""
        if limit is None or len(self.slides) <= limit:
            return list(range(len(self.slides)))
        return sorted({int(i) for i in np.linspace(0, len(self.slides) - 1, limit).round()})

    def write_overview(self, out_dir, boxes_per_slide=8, max_size=1000, limit=MAX_OVERVIEWS):
        """One PNG per pictured slide (see overview_slides), drawn by the readers: thumbnail,
        tissue-mask outline (green), annotated regions (blue), sampled patch boxes (red); with
        stain normalisation also one patch per slide before (left) and after (right)."""
        os.makedirs(out_dir, exist_ok=True)
        jobs = [(self._control.key, index, self.slides[index].region, out_dir, boxes_per_slide, max_size)
                for index in self.overview_slides(limit)]
        names = worker_pool.map_with_progress(draw_overview, jobs, self._pool, desc='Slide overviews', unit='slide',
                                              progress=len(jobs) > 16)
        return [path for paths in names for path in paths]

    def write_stain_target(self, path):
        wsi.write_png(path, cv2.cvtColor(self.stain_target_image, cv2.COLOR_RGB2BGR))


def reader_count(num_readers, num_threads=None):
    """Reader processes: num_readers, else num_threads (the option's former name), else one per core."""
    count = num_readers if num_readers is not None else num_threads
    if count is None:
        return os.cpu_count() or 1
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f'num_readers must be a whole number >= 0 (0 reads in the trainer\'s process), got {count!r}')
    return int(count)


def prepare_slide(path, roi_dir=None, roi_labels=None, whole_tissue_without_file=False, roi_detections=False,
                  **inspect_kwargs):
    """wsi.inspect_slide, then limited to the slide's annotated regions when roi_dir is given."""
    info = wsi.inspect_slide(path, **inspect_kwargs)
    if roi_dir is not None and info.problem is None:
        wsi.restrict_to_regions(info, roi_dir, roi_labels, whole_tissue_without_file, roi_detections)
    return info


# ----------------------------------------------------------------------------------------------
# The slide table: what readers need of every slide, the tissue runs in shared memory.

class SlideTable:
    """Per slide: path, field of view, mask shape and scale, class index, drawing weight, and its
    tissue runs, which move into one shared buffer (the slides' TissueRuns become views into it)."""

    def __init__(self, slides, weights):
        self.paths = [s.path for s in slides]
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.field_of_view = np.array([s.field_of_view for s in slides], np.float64)
        self.mask_shape = np.array([s.mask_shape for s in slides], np.int64).reshape(-1, 2)
        self.mask_scale = np.array([s.mask_scale for s in slides], np.float64).reshape(-1, 2)
        self.class_index = np.array([s.class_index for s in slides], np.int64)
        self.tiles = np.array([estimated_tiles(s.level_dimensions) for s in slides], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum([len(s.tissue.starts) for s in slides])]).astype(np.int64)
        runs = int(self.offsets[-1])
        self.buffer = worker_pool.SharedBuffer(8 * runs)
        starts, ends = self.runs_of(self.buffer)
        for slide, begin, end in zip(slides, self.offsets[:-1], self.offsets[1:]):
            starts[begin:end], ends[begin:end] = slide.tissue.starts, slide.tissue.ends
            slide.tissue = wsi.TissueRuns(starts[begin:end], ends[begin:end], slide.tissue.shape)

    def runs_of(self, buffer):
        runs = int(self.offsets[-1])
        return buffer.array(np.int32, [runs]), buffer.array(np.int32, [runs], offset=4 * runs)

    def description(self):
        """What a reader needs to rebuild the table on its mapping of the buffer (small arrays)."""
        fields = dict(self.__dict__)
        fields['buffer_key'] = fields.pop('buffer').key
        return fields


def estimated_tiles(level_dimensions, tile=TILE_SIDE):
    return sum(-(-w // tile) * -(-h // tile) for w, h in level_dimensions)


# ----------------------------------------------------------------------------------------------
# The readers' side: state kept in each reader process, and the calls PatchSampler makes.

_readers = {}      # reader key (the sampler's control buffer) -> Reader: one per sampler


class Reader:
    """A reader process's state: the slide table, open handles, stain transforms, failures."""

    def __init__(self, description, control_key, index, resolution, rotate90):
        self.table = SlideTable.__new__(SlideTable)
        self.table.__dict__.update(description)
        self.table.buffer = worker_pool.mapped(description['buffer_key'])
        self.starts, self.ends = self.table.runs_of(self.table.buffer)
        self.counters = worker_pool.mapped(control_key).array(np.int64, [-1])
        self.index = index
        self.resolution = resolution
        self.rotate90 = rotate90
        self.handles = collections.OrderedDict()    # slide index -> open handle, least recently used first
        self.handle_bytes = 0
        self.tile_cache = openslide.OpenSlideCache(READER_TILE_CACHE_BYTES) if hasattr(openslide, 'OpenSlideCache') else None
        self.fd_limit = open_files_limit()
        self.transforms = None
        self.dropped = np.zeros(len(self.table.paths), bool)
        self.consecutive_failures = collections.Counter()
        self.problems = []

    def cancelled(self, serial):
        return self.counters[0] >= serial

    def tissue(self, slide_index):
        begin, end = self.table.offsets[slide_index], self.table.offsets[slide_index + 1]
        return wsi.TissueRuns(self.starts[begin:end], self.ends[begin:end], self.table.mask_shape[slide_index])

    def random_centre(self, slide_index, rng):
        return wsi.random_centre(self.tissue(slide_index), self.table.mask_scale[slide_index], rng)

    def handle(self, slide_index):
        """An open handle of the slide, kept in a least-recently-used cache bounded by estimated
        memory and by the open-files limit (some formats hold a file open per handle)."""
        handle = self.handles.pop(slide_index, None)
        if handle is None:
            handle = openslide.OpenSlide(self.table.paths[slide_index])
            if self.tile_cache is not None:
                handle.set_cache(self.tile_cache)
            self.handle_bytes += self.handle_cost(slide_index)
            self.handles[slide_index] = handle
            self.trim_handles()
        else:
            self.handles[slide_index] = handle
        return handle

    def handle_cost(self, slide_index):
        return HANDLE_BASE_BYTES + HANDLE_BYTES_PER_TILE * int(self.table.tiles[slide_index])

    def trim_handles(self):
        while len(self.handles) > 1 and (self.handle_bytes > READER_HANDLE_BUDGET_BYTES
                                         or open_files() > FD_SHARE_OF_LIMIT * self.fd_limit):
            self.close_handle(next(iter(self.handles)))

    def close_handle(self, slide_index):
        handle = self.handles.pop(slide_index, None)
        if handle is not None:
            handle.close()
            self.handle_bytes -= self.handle_cost(slide_index)

    def try_read(self, slide_index, rng, size):
        """A patch from a random tissue location of one slide, or None once the failure is recorded."""
        centre = self.random_centre(slide_index, rng)
        try:
            patch = wsi.read_patch(self.handle(slide_index), centre, self.table.field_of_view[slide_index], size)
        except (openslide.OpenSlideError, OSError, wsi.BlankRegionError) as e:
            self.record_failure(slide_index, centre, e)
            return None
        self.consecutive_failures.pop(slide_index, None)
        return patch

    def record_failure(self, slide_index, centre, error):
        self.close_handle(slide_index)     # an OpenSlide handle is unusable after an error
        self.consecutive_failures[slide_index] += 1
        drop = self.consecutive_failures[slide_index] >= wsi.MAX_CONSECUTIVE_FAILURES
        if drop:
            self.dropped[slide_index] = True
        self.problems.append((slide_index, centre, type(error).__name__, str(error), drop))

    def read_random_patch(self, slide_index, rng, size):
        """(patch, slide index): from the given slide, or after a failed read from another drawn by
        weight among the slides not dropped."""
        for _ in range(wsi.MAX_ATTEMPTS_PER_PATCH):
            if not self.dropped[slide_index]:
                patch = self.try_read(slide_index, rng, size)
                if patch is not None:
                    return patch, slide_index
            slide_index = self.another_slide(rng)
        raise RuntimeError(f'{wsi.MAX_ATTEMPTS_PER_PATCH} reads in a row failed; see the warnings above')

    def another_slide(self, rng):
        weights = self.table.weights * ~self.dropped
        if not weights.any():
            raise RuntimeError('Every slide has been dropped after failed reads; see the warnings above')
        return int(rng.choice(len(weights), p=weights / weights.sum()))

    def finish(self, patch, slide_index, rng):
        if self.transforms is not None and self.transforms[slide_index] is not None:
            patch = self.transforms[slide_index](patch)
        return random_quarter_turn(patch, rng) if self.rotate90 else patch


_ROTATE_CODES = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}  # as np.rot90


def random_quarter_turn(patch, rng):
    """patch turned by 0-3 quarter turns at random (tissue has no up). cv2.rotate rather than
    np.rot90: a strided view makes the CHW copy 4x slower."""
    turns = rng.integers(4)
    return cv2.rotate(patch, _ROTATE_CODES[turns]) if turns else patch


def open_files_limit():
    try:
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError):
        return 1 << 20


def open_files():
    """Open file descriptors of this process (0 where /proc does not tell)."""
    try:
        return len(os.listdir('/proc/self/fd'))
    except OSError:
        return 0


def setup_reader(description, control_key, index, resolution, rotate90):
    _readers[control_key] = Reader(description, control_key, index, resolution, rotate90)


def forget_reader(key):
    _readers.pop(key, None)


def set_reader_stain(key, transforms):
    _readers[key].transforms = transforms


def read_chunk(key, arena_key, first, count, size, begin, slides, seed, serial, dropped):
    """Read len(slides) patches into rows begin.. of the minibatch at row `first` of the arena
    (skipped once the minibatch is cancelled): (slide index of each patch, read problems, why the
    chunk could not be read or None)."""
    reader = _readers[key]
    reader.dropped[dropped] = True
    images = worker_pool.mapped(arena_key).array(np.uint8, [count, 3, size, size], offset=first * 3 * size * size)
    rng = np.random.default_rng(seed)
    used = np.asarray(slides, np.int64).copy()
    error = None
    try:
        for j, slide_index in enumerate(slides):
            if reader.cancelled(serial):
                break
            patch, used[j] = reader.read_random_patch(slide_index, rng, size)
            cv2.split(reader.finish(patch, used[j], rng), list(images[begin + j]))   # HWC -> CHW into the slot
            reader.counters[1 + reader.index] += 1
    except RuntimeError as e:   # every slide dropped: the problems behind it still go back
        error = str(e)
    problems, reader.problems = reader.problems, []
    return used, problems, error


def fit_slide_stain(job):
    """(stain fit of wsi.STAIN_FIT_PATCHES of a slide's patches or None, the slide's most typical
    patch as a target candidate when asked for, why it could not be fitted or None)."""
    key, slide_index, size, method, want_candidate = job
    reader = _readers[key]
    rng = np.random.default_rng(slide_index)
    patches = []
    for _ in range(2 * wsi.STAIN_FIT_PATCHES):
        patch = reader.try_read(slide_index, rng, size)
        if patch is not None:
            patches.append(patch)
        if len(patches) == wsi.STAIN_FIT_PATCHES:
            break
    reader.problems = []       # a failed read while fitting is not a training read problem
    if not patches:
        return None, None, 'no patch of it could be read to fit the stain'
    patches = np.stack(patches)
    candidate = stain.representative_patch(patches) if want_candidate else None
    try:
        return stain.fit(method, patches), candidate, None
    except ValueError as e:
        return None, candidate, str(e)


def draw_overview(job):
    """The overview PNG(s) of one slide (see PatchSampler.write_overview): their paths."""
    key, slide_index, region, out_dir, boxes, max_size = job
    reader = _readers[key]
    path = reader.table.paths[slide_index]
    with openslide.OpenSlide(path) as handle:
        picture = wsi.slide_thumbnail(handle, max_size)
        dimensions = handle.dimensions
    scale = picture.shape[1] / dimensions[0]
    mask = reader.tissue(slide_index).mask()
    mask = cv2.resize(mask, (picture.shape[1], picture.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(picture, contours, -1, (0, 200, 0), 2)
    if region is not None:
        rings = [r for p in wsi.polygons_of(region) for r in (p.exterior, *p.interiors)]
        cv2.polylines(picture, [np.round(np.asarray(r.coords)[:, :2] * scale).astype(np.int32) for r in rings],
                      True, (0, 0, 230), 2)
    rng = np.random.default_rng(slide_index)
    fov = reader.table.field_of_view[slide_index]
    for _ in range(boxes):
        x0, y0 = wsi.clamp_top_left(reader.random_centre(slide_index, rng), fov, dimensions)
        corner = (round(x0 * scale), round(y0 * scale))
        far = (round((x0 + fov) * scale), round((y0 + fov) * scale))
        cv2.rectangle(picture, corner, far, (220, 0, 0), 2)
    name = os.path.join(out_dir, f'overview-{slide_index:03d}-{wsi.slide_name(path)}')
    wsi.write_png(name + '.png', cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if reader.transforms is None or reader.transforms[slide_index] is None:
        return [name + '.png']
    for _ in range(wsi.MAX_ATTEMPTS_PER_PATCH):
        patch = reader.try_read(slide_index, rng, reader.resolution)
        if patch is not None:
            pair = np.concatenate([patch, reader.transforms[slide_index](patch)], 1)
            wsi.write_png(name + '-stain.png', cv2.cvtColor(pair, cv2.COLOR_RGB2BGR))
            break
    reader.problems = []
    return [name + '.png', name + '-stain.png']

