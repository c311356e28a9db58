"""wsi.py on real pyramidal slides written into tmp_path and read through OpenSlide."""
import csv
import hashlib
import os
import stat
import time

import cv2
import numpy as np
import openslide
import pytest

import patch_sampler
import wsi
from conftest import corrupt_tiles, run_with_timeout, slide_image, whiten_tiles, write_slide


def make_sampler(slide_dir, mask_cache, messages=None, **kwargs):
    kwargs = {'resolution': 32, 'downsample': 4, 'seed': 1, 'num_threads': 2, **kwargs}
    return patch_sampler.PatchSampler(str(slide_dir), mask_cache_dir=mask_cache,
                            log=messages.append if messages is not None else print, **kwargs)


def warnings_about(messages, path):
    return [m for m in messages if m.startswith('Warning') and str(path) in m]


def assert_no_blank_patches(images):
    flat = images.reshape(len(images), -1)
    assert (np.ptp(flat, axis=1) >= wsi.BLANK_PEAK_TO_PEAK).all(), 'a flat (white/black) patch was returned'
    assert (flat.mean(axis=1) < 235).all(), 'a background-only patch was returned'


# ----------------------------------------------------------------------------------------------
# Writing slides.

@pytest.mark.parametrize('name, vendor, mpp', [('a.svs', 'aperio', 0.25), ('a.tif', 'generic-tiff', None)])
def test_written_pyramid_opens_with_right_colours_and_metadata(tmp_path, name, vendor, mpp):
    rgb = np.zeros((1024, 1536, 3), np.uint8)
    rgb[:, :700] = (200, 60, 30)
    rgb[:, 700:] = (40, 90, 220)
    path = str(tmp_path / name)
    wsi.write_pyramidal_tiff(path, rgb, aperio=name.endswith('.svs'))
    with openslide.OpenSlide(path) as slide:
        assert slide.properties['openslide.vendor'] == vendor
        if mpp is None:
            assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        else:
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == mpp
        assert slide.level_count >= 3 and slide.level_downsamples[1] == pytest.approx(2)
        for level, x in [(0, 100), (0, 1200), (1, 50), (1, 600)]:
            got = np.asarray(slide.read_region((x * int(slide.level_downsamples[level]), 300), level, (8, 8)))
            want = rgb[300, x * int(slide.level_downsamples[level])]
            assert np.abs(got[..., :3].astype(int) - want).max() <= 6, (level, x)
    assert wsi.inspect_slide(path, str(tmp_path / 'masks')).mpp == mpp


def test_demo_slides_are_deterministic_and_serve_the_default_config(tmp_path, mask_cache):
    paths = wsi.create_demo_slides(str(tmp_path / 'a'), seed=7, log=lambda m: None)
    again = wsi.create_demo_slides(str(tmp_path / 'b'), seed=7, log=lambda m: None)
    digest = lambda p: hashlib.sha1(open(p, 'rb').read()).hexdigest()
    assert [digest(p) for p in paths] == [digest(p) for p in again]
    vendors = {openslide.OpenSlide(p).properties['openslide.vendor'] for p in paths}
    assert vendors == {'aperio', 'generic-tiff'}
    with make_sampler(tmp_path / 'a', mask_cache, wsi_ext=['.svs', '.tif'], resolution=64, downsample=4) as sampler:
        assert len(sampler.slide_paths) == len(paths)
        assert sampler.max_lod == 4
        biggest = max(sampler.slides, key=lambda s: s.dimensions[0])
        assert min(biggest.dimensions) >= 512 * 4, 'the benchmark needs a 2048-px field of view'
        for lod in range(5):
            images, _ = sampler.sample(lod, 8)
            assert images.shape == (8, 3, 64 >> lod, 64 >> lod)


# ----------------------------------------------------------------------------------------------
# Tissue masks.

def test_blank_slide_gets_no_tissue_where_plain_otsu_would_find_half():
    blank = slide_image(1000, 800, tissue_boxes=())
    grey = cv2.GaussianBlur(cv2.cvtColor(blank, cv2.COLOR_RGB2GRAY), (0, 0), wsi.MASK_BLUR_SIGMA)
    threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert 0.2 < (grey < threshold).mean() < 0.8     # what the sanity check is for
    assert wsi.compute_tissue_mask(blank).sum() == 0
    with_tissue = slide_image(1000, 800, tissue_boxes=[(200, 200, 600, 500)])
    mask = wsi.compute_tissue_mask(with_tissue)
    assert mask[250:450, 250:550].mean() > 0.9 and mask[600:, :].sum() == 0


def test_thumbnail_of_a_slide_without_pyramid_is_read_in_strips(tmp_path, mask_cache):
    path = str(tmp_path / 'flat.tif')
    wsi.write_pyramidal_tiff(path, slide_image(3000, 2000, [(500, 400, 2000, 1500)]), min_level_size=10 ** 6)
    with openslide.OpenSlide(path) as handle:
        assert handle.level_count == 1
        expected = np.asarray(handle.get_thumbnail((1000, 1000)).convert('RGB')).astype(int)
        strips = wsi.slide_thumbnail(handle, 1000, strip_pixels=3000 * 70)     # 29 strips
    assert strips.shape == expected.shape
    assert np.abs(strips - expected).mean() < 2
    with make_sampler(tmp_path, mask_cache, wsi_ext='.tif') as sampler:
        assert sampler.slides[0].tissue_fraction > 0.2


def test_mask_cache_name_is_a_hash_and_changes_when_the_slide_is_replaced(tmp_path, mask_cache):
    folder = tmp_path / 'v1.2.slides'
    folder.mkdir()
    path = write_slide(folder / 'case.01.svs', tissue_boxes=[(100, 100, 900, 700)])
    first = wsi.mask_cache_path(path, mask_cache)
    assert os.path.dirname(first) == mask_cache
    assert len(os.path.basename(first)) == 40 + len('.png')
    stat_before = os.stat(path)
    os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 1))   # same size, newer
    assert wsi.mask_cache_path(path, mask_cache) != first
    os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert wsi.mask_cache_path(path, mask_cache) == first

    with make_sampler(folder, mask_cache) as sampler:
        assert sampler.slides[0].mask()[:, -100:].sum() == 0
    assert os.path.exists(first)

    write_slide(path, tissue_boxes=[(1100, 800, 1950, 1450)])        # replaced: tissue elsewhere
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(first).st_mtime_ns + 10 ** 9))
    assert wsi.mask_cache_path(path, mask_cache) != first
    with make_sampler(folder, mask_cache) as sampler:
        rng = np.random.default_rng(0)
        centres = np.array([sampler.slides[0].random_centre(rng) for _ in range(200)])
        assert (centres[:, 0] > 1000).all(), 'the old cached mask was used for the new slide'


# ----------------------------------------------------------------------------------------------
# Patches: shapes, field of view, tissue.

def test_patches_have_right_shape_and_dtype_at_every_lod(tmp_path, mask_cache):
    write_slide(tmp_path / 's.svs')
    with make_sampler(tmp_path, mask_cache) as sampler:
        assert sampler.shape == [3, 32, 32] and sampler.resolution_log2 == 5 and sampler.label_size == 0
        assert sampler.max_lod == 3
        for lod in range(4):
            images, classes = sampler.sample(lod, 6)
            assert images.shape == (6, 3, 32 >> lod, 32 >> lod) and images.dtype == np.uint8
            assert classes.dtype == np.int64 and (classes == -1).all()
            assert_no_blank_patches(images)
        with pytest.raises(ValueError):
            sampler.sample(4, 1)


def test_every_lod_covers_the_same_field_of_view(tmp_path):
    # A smooth pattern with a 200-px period: a patch with the wrong field of view or centre
    # differs clearly; the same view at another pyramid level differs only by JPEG noise.
    y, x = np.mgrid[0:2048, 0:2048].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(2 * np.pi * x / 200), 128 + 100 * np.sin(2 * np.pi * y / 260),
                    128 + 100 * np.cos(2 * np.pi * (x + y) / 330)], -1).astype(np.uint8)
    path = str(tmp_path / 'pattern.svs')
    wsi.write_pyramidal_tiff(path, rgb, aperio=True)
    resolution, downsample, centre = 64, 4, (1128.4, 1119.7)   # corner (1000, 992): on every level's grid
    field_of_view = resolution * downsample
    with openslide.OpenSlide(path) as handle:
        lod0 = wsi.read_patch(handle, centre, field_of_view, resolution).astype(np.float32)
        for lod in range(1, 5):
            size = resolution >> lod
            patch = wsi.read_patch(handle, centre, field_of_view, size).astype(np.float32)
            expected = cv2.resize(lod0, (size, size), interpolation=cv2.INTER_AREA)
            assert np.abs(patch - expected).mean() < 4, lod
        wider = wsi.read_patch(handle, centre, 2 * field_of_view, resolution >> 2).astype(np.float32)
        assert np.abs(wider - cv2.resize(lod0, (16, 16), interpolation=cv2.INTER_AREA)).mean() > 20
        exact = wsi.read_patch(handle, (1024, 1024), field_of_view, field_of_view)
        assert np.abs(exact.astype(int) - rgb[896:1152, 896:1152]).mean() < 3, 'centre misplaced'


def test_sampler_patches_cover_the_same_field_of_view_at_every_lod(tmp_path, mask_cache):
    # Same seed, same random centres: a patch at LOD k is the LOD 0 patch shrunk, up to JPEG noise
    # and the level-grid snapping (a patch with half or twice the field of view differs by far more).
    write_slide(tmp_path / 's.svs')
    patches = {}
    for lod in (0, 1, 2):
        with make_sampler(tmp_path, mask_cache, num_threads=1, seed=5) as sampler:
            patches[lod] = sampler.sample(lod, 16)[0].transpose(0, 2, 3, 1).astype(np.float32)
    for lod in (1, 2):
        size = 32 >> lod
        shrunk = np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in patches[0]])
        assert np.abs(patches[lod] - shrunk).mean() < 10, lod     # 6 and 4 here; halved: 23 and 20


def test_reads_snap_to_the_level_grid_by_at_most_half_a_level_pixel():
    rng = np.random.default_rng(0)
    for _ in range(500):
        downsample = float(rng.choice([1, 2, 4, 16]))
        corner = tuple(int(v) for v in rng.integers(0, 1792, 2))
        snapped = wsi.snap_to_level_grid(corner, downsample, 256, (2048, 2048))
        for before, after in zip(corner, snapped):
            assert after % downsample == 0 and 0 <= after <= 2048 - 256
            assert abs(after - before) <= downsample / 2


def test_patch_centres_fall_in_the_tissue_region(tmp_path, mask_cache):
    box = (600, 400, 1500, 1100)
    write_slide(tmp_path / 's.svs', tissue_boxes=[box])
    with make_sampler(tmp_path, mask_cache) as sampler:
        rng = np.random.default_rng(3)
        centres = np.array([sampler.slides[0].random_centre(rng) for _ in range(2000)])
        inside = ((centres[:, 0] >= box[0]) & (centres[:, 0] < box[2]) &
                  (centres[:, 1] >= box[1]) & (centres[:, 1] < box[3]))
        assert inside.mean() >= 0.95
        assert centres[:, 0].std() > 150, 'centres should spread over the region'
        assert_no_blank_patches(sampler.sample(0, 64)[0])


def test_weight_by_tissue_draws_slides_in_proportion_to_tissue_area(tmp_path, mask_cache):
    write_slide(tmp_path / 'small.svs', tissue_boxes=[(800, 600, 1200, 900)])
    write_slide(tmp_path / 'large.svs', tissue_boxes=[(200, 150, 1800, 1350)])
    labels = tmp_path / 'labels.csv'
    labels.write_text('small.svs,a\nlarge.svs,b\n')
    fractions = {}
    for weighted in (False, True):
        with make_sampler(tmp_path, mask_cache, label_file=str(labels), max_label_size='full',
                          weight_by_tissue=weighted) as sampler:
            fractions[weighted] = (sampler.sample(0, 600)[1] == 1).mean()
    assert 0.43 < fractions[False] < 0.57
    assert fractions[True] > 0.85


def test_rotate90_gives_every_quarter_turn_of_the_patch(tmp_path, mask_cache):
    write_slide(tmp_path / 's.svs')
    patch = np.ascontiguousarray(np.arange(5 * 5 * 3, dtype=np.uint8).reshape(5, 5, 3))
    rng = np.random.default_rng(0)
    with make_sampler(tmp_path, mask_cache, rotate90=True) as sampler:
        turns = []
        for _ in range(40):
            out = patch_sampler.random_quarter_turn(patch, rng)
            turns += [k for k in range(4) if np.array_equal(out, np.rot90(patch, k))]
        images, _ = sampler.sample(0, 16)
    assert len(turns) == 40 and set(turns) == {0, 1, 2, 3}
    assert images.shape == (16, 3, 32, 32) and images.dtype == np.uint8
    assert_no_blank_patches(images)


REGIONS = (((512, 384), 0, 64), ((1000, 700), 1, 50), ((2000, 1500), 0, 96),
           ((-40, -30), 1, 64))   # the last two hang off the slide: transparent there


def reads_by_path(function, *args):
    """function(*args)'s result and how many regions each read path of wsi.read_region_rgb served."""
    before = dict(wsi.region_reads)
    result = function(*args)
    return result, {path: wsi.region_reads[path] - before.get(path, 0) for path in ('direct', 'public')}


@pytest.mark.parametrize('direct_call_available', [True, False])
def test_region_reads_match_openslides_public_read_region(tmp_path, monkeypatch, direct_call_available):
    if direct_call_available:
        assert wsi._openslide_read_region is not None, 'the fast path is unavailable with this openslide-python'
    else:
        monkeypatch.setattr(wsi, '_openslide_read_region', None)     # as with an openslide-python without it
    path = write_slide(tmp_path / 's.svs')
    with openslide.OpenSlide(path) as handle:
        for top_left, level, size in REGIONS:
            rgba = np.asarray(handle.read_region(top_left, level, (size, size)))
            expected = wsi.composite_on_white(rgba)
            got, paths = reads_by_path(wsi.read_region_rgb, handle, top_left, level, size)
            assert paths == ({'direct': 1, 'public': 0} if direct_call_available else {'direct': 0, 'public': 1})
            assert got.shape == (size, size, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
            assert np.abs(got.astype(int) - expected).max() <= 1, top_left
        assert (got[:10, :10] == 255).all(), 'outside the slide is white'


def test_sampler_reads_through_the_fast_path(tmp_path, mask_cache):
    write_slide(tmp_path / 's.svs')
    with make_sampler(tmp_path, mask_cache, num_readers=0) as sampler:     # read here, where the counter is
        _, paths = reads_by_path(sampler.sample, 1, 8)
    assert paths == {'direct': 8, 'public': 0}


def test_batches_read_ahead_a_bounded_amount_and_stop_cleanly(tmp_path, mask_cache):
    write_slide(tmp_path / 's.svs')
    with make_sampler(tmp_path, mask_cache) as sampler:
        batches = sampler.batches(1, 8, prefetch=3)
        for _ in range(3):
            images, classes = next(batches)
            assert images.shape == (8, 3, 16, 16) and classes.shape == (8,)
        time.sleep(1.0)
        # Three taken and prefetch=3 read ahead behind them: no more.
        assert sampler.patches_read == (3 + 3) * 8, sampler.patches_read
        batches.close()

        # Large batches that one reader needs a while for: most of the read-ahead is still
        # queued when the generator is closed right after the first batch.
        minibatch, prefetch = 256, 3
        read_before = sampler.patches_read
        batches = sampler.batches(0, minibatch, prefetch=prefetch)
        next(batches)
        batches.close()
        read_at_close = sampler.patches_read - read_before
        assert read_at_close < (1 + prefetch) * minibatch, 'nothing was queued at close: the test proves nothing'
        time.sleep(1.0)
        assert sampler.patches_read - read_before == read_at_close, 'closing the generator left reads running or queued'
        images, _ = sampler.sample(2, 4)       # the pool still serves
        assert images.shape == (4, 3, 8, 8)


def test_write_overview_one_png_per_slide(tmp_path, mask_cache):
    write_slide(tmp_path / 'a.svs')
    write_slide(tmp_path / 'b.svs', tissue_boxes=[(100, 100, 700, 600)])
    with make_sampler(tmp_path, mask_cache) as sampler:
        pngs = sampler.write_overview(str(tmp_path / 'overview'))
    assert len(pngs) == 2
    picture = cv2.imread(pngs[0])
    assert picture is not None and max(picture.shape[:2]) == 1000
    assert ((picture[..., 1] == 200) & (picture[..., 0] == 0)).any(), 'no tissue outline drawn'


# ----------------------------------------------------------------------------------------------
# The predecessor's failure cases.

def test_folder_with_dots_and_non_ascii_file_names(tmp_path, mask_cache, messages):
    folder = tmp_path / 'data.v2.0' / 'slides.final'
    folder.mkdir(parents=True)
    write_slide(folder / 'Präparat ü.1.SVS')
    write_slide(folder / '組織.tif')
    with make_sampler(folder, mask_cache, messages, wsi_ext=['.svs', '.TIF']) as sampler:
        assert sorted(os.path.basename(p) for p in sampler.slide_paths) == ['Präparat ü.1.SVS', '組織.tif']
        assert_no_blank_patches(sampler.sample(0, 16)[0])
    assert not [m for m in messages if m.startswith('Warning')]
    assert len(os.listdir(mask_cache)) == 2


def test_read_only_slide_folder_masks_go_to_the_user_cache(tmp_path, monkeypatch, messages):
    folder = tmp_path / 'readonly'
    folder.mkdir()
    write_slide(folder / 's.svs')
    cache_root = tmp_path / 'user-cache'
    monkeypatch.setenv('WSI_PROGAN_CACHE', str(cache_root))
    before = sorted(os.listdir(folder))
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with patch_sampler.PatchSampler(str(folder), resolution=32, downsample=4, log=messages.append) as sampler:
            sampler.sample(0, 4)
    finally:
        folder.chmod(stat.S_IRWXU)
    assert sorted(os.listdir(folder)) == before, 'something was written into the slide folder'
    assert len(os.listdir(cache_root / 'masks')) == 1
    assert not [m for m in messages if m.startswith('Warning')]


def test_slide_without_tissue_is_left_out_with_a_warning(tmp_path, mask_cache, messages):
    good = write_slide(tmp_path / 'good.svs')
    empty = write_slide(tmp_path / 'empty.svs', tissue_boxes=[])
    with make_sampler(tmp_path, mask_cache, messages) as sampler:
        assert sampler.slide_paths == [good]
    assert any('no tissue' in m for m in warnings_about(messages, empty))


def test_slide_smaller_than_the_field_of_view_is_left_out_with_a_warning(tmp_path, mask_cache, messages):
    good = write_slide(tmp_path / 'good.svs')
    small = write_slide(tmp_path / 'small.svs', width=200, height=120, tissue_boxes=[(20, 20, 180, 100)])
    with make_sampler(tmp_path, mask_cache, messages, resolution=32, downsample=8) as sampler:   # 256 px
        assert sampler.slide_paths == [good] and sampler.max_lod == 3
        for lod in range(4):
            assert_no_blank_patches(sampler.sample(lod, 4)[0])
    assert any('field of view' in m for m in warnings_about(messages, small))
    with make_sampler(tmp_path, mask_cache, resolution=16, downsample=4) as sampler:           # 64 px
        assert sorted(sampler.slide_paths) == sorted([good, small])


def test_unopenable_files_are_skipped_with_a_warning(tmp_path, mask_cache, messages):
    good = write_slide(tmp_path / 'good.svs')
    (tmp_path / 'garbage.svs').write_bytes(os.urandom(5000))
    (tmp_path / 'empty.svs').write_bytes(b'')
    with make_sampler(tmp_path, mask_cache, messages) as sampler:
        assert sampler.slide_paths == [good]
    for name in ('garbage.svs', 'empty.svs'):
        assert any('cannot open' in m for m in warnings_about(messages, tmp_path / name)), name


def test_corrupt_tiles_are_resampled_elsewhere_and_the_slide_dropped(tmp_path, mask_cache, messages):
    good = write_slide(tmp_path / 'good.svs')
    bad = write_slide(tmp_path / 'bad.svs')
    with openslide.OpenSlide(bad) as handle:
        assert handle.get_best_level_for_downsample(2048 / 2000) == 0   # the mask thumbnail level
    corrupt_tiles(bad, from_level=1)                                     # every level patches read
    with make_sampler(tmp_path, mask_cache, messages, resolution=32, downsample=4) as sampler:
        assert sorted(sampler.slide_paths) == sorted([good, bad])
        images, _ = run_with_timeout(lambda: sampler.sample(0, 64), 60)
        assert_no_blank_patches(images)
        images, _ = run_with_timeout(lambda: sampler.sample(2, 64), 60)
        assert_no_blank_patches(images)
        report = sampler.tick_report()
        assert sampler.tick_report() == []                  # counts start again after each report
    about_bad = warnings_about(messages, bad)
    assert len(about_bad) == 1 and 'dropping' in about_bad[0] and 'failed' in about_bad[0]
    assert not warnings_about(messages, good)
    assert len(report) == 1 and report[0].startswith(f'Read problems: {bad}: ') and 'mostly OpenSlideError' in report[0]


def test_only_corrupt_slides_raise_instead_of_hanging(tmp_path, mask_cache, messages):
    bad = write_slide(tmp_path / 'bad.svs')
    corrupt_tiles(bad, from_level=1)
    with make_sampler(tmp_path, mask_cache, messages) as sampler:
        with pytest.raises(RuntimeError, match='dropped|failed'):
            run_with_timeout(lambda: sampler.sample(0, 16), 60)
    assert any('dropping' in m for m in warnings_about(messages, bad))


def test_slide_reading_white_is_resampled_never_passed_on(tmp_path, mask_cache, messages):
    good = write_slide(tmp_path / 'good.svs')
    white = write_slide(tmp_path / 'white.svs')
    whiten_tiles(white, from_level=1)          # the mask (level 0) shows tissue, patches read white
    with make_sampler(tmp_path, mask_cache, messages) as sampler:
        assert sorted(sampler.slide_paths) == sorted([good, white])
        assert_no_blank_patches(run_with_timeout(lambda: sampler.sample(0, 64), 60)[0])
    assert any('dropping' in m for m in warnings_about(messages, white))


def test_no_usable_slide_raises_one_error_listing_each_file_and_why(tmp_path, mask_cache):
    write_slide(tmp_path / 'blank.svs', tissue_boxes=[])
    write_slide(tmp_path / 'tiny.svs', width=100, height=100, tissue_boxes=[(10, 10, 90, 90)])
    (tmp_path / 'garbage.svs').write_bytes(b'not a slide')
    unreadable = write_slide(tmp_path / 'unreadable.svs')
    corrupt_tiles(unreadable)
    with pytest.raises(ValueError) as error:
        make_sampler(tmp_path, mask_cache)
    text = str(error.value)
    for name, reason in [('blank.svs', 'no tissue'), ('tiny.svs', 'field of view'),
                         ('garbage.svs', 'cannot open'), ('unreadable.svs', 'failed')]:
        line = next((row for row in text.splitlines() if name in row), '')
        assert reason in line, (name, text)


def test_empty_or_missing_folder_raises(tmp_path, mask_cache):
    with pytest.raises(ValueError, match='No files with extension'):
        make_sampler(tmp_path, mask_cache)
    with pytest.raises(ValueError, match='does not exist'):
        make_sampler(tmp_path / 'missing', mask_cache)


# ----------------------------------------------------------------------------------------------
# Labels.

TINTS = {'red.svs': (1.3, 0.5, 0.5), 'green.svs': (0.5, 1.3, 0.5), 'blue.svs': (0.5, 0.5, 1.3)}


def write_tinted_slides(folder):
    for name, tint in TINTS.items():
        write_slide(folder / name, tint=tint, tissue_boxes=[(300, 200, 1700, 1300)])


def dominant_channel_name(images):
    names = list(TINTS)
    return [names[c] for c in images.reshape(len(images), 3, -1).mean(-1).argmax(1)]


def test_csv_labels_give_each_patch_its_slides_class_in_sorted_one_hot_order(tmp_path, mask_cache, messages):
    write_tinted_slides(tmp_path)
    classes = {'red.svs': 'tumor', 'green.svs': 'normal', 'blue.svs': 'stroma'}
    label_file = tmp_path / 'labels.csv'
    with open(label_file, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['slide', 'class'])
        writer.writerows(classes.items())
    with make_sampler(tmp_path, mask_cache, messages, label_file=str(label_file), max_label_size='full') as sampler:
        assert sampler.class_names == ['normal', 'stroma', 'tumor'] and sampler.label_size == 3
        images, indices = sampler.sample(0, 60)
        onehot = sampler.labels_onehot(indices)
        expected = [sampler.class_names.index(classes[name]) for name in dominant_channel_name(images)]
        assert indices.tolist() == expected
        assert onehot.dtype == np.float32 and onehot.shape == (60, 3)
        assert (onehot.argmax(1) == indices).all() and (onehot.sum(1) == 1).all()
        random = sampler.random_labels(3000)
        assert random.shape == (3000, 3) and (random.sum(1) == 1).all()
        assert np.allclose(random.mean(0), 1 / 3, atol=0.04)
    assert not [m for m in messages if m.startswith('Warning')]


def test_max_label_size_limits_the_label_width_as_in_the_original(tmp_path, mask_cache):
    write_tinted_slides(tmp_path)
    label_file = tmp_path / 'labels.csv'
    label_file.write_text('red,b\ngreen,a\nblue,c\n')     # no header, names without extension
    with make_sampler(tmp_path, mask_cache, label_file=str(label_file), max_label_size=0) as sampler:
        assert sampler.label_size == 0 and (sampler.sample(0, 4)[1] == -1).all()
    with make_sampler(tmp_path, mask_cache, label_file=str(label_file), max_label_size=2) as sampler:
        assert sampler.label_size == 2
        assert sampler.labels_onehot([0, 1, 2]).tolist() == [[1, 0], [0, 1], [0, 0]]


def test_slide_missing_from_the_csv_is_left_out_with_a_warning(tmp_path, mask_cache, messages):
    write_tinted_slides(tmp_path)
    label_file = tmp_path / 'labels.csv'
    label_file.write_text('red.svs,x\ngreen.svs,y\n')
    with make_sampler(tmp_path, mask_cache, messages, label_file=str(label_file), max_label_size='full') as sampler:
        assert sorted(os.path.basename(p) for p in sampler.slide_paths) == ['green.svs', 'red.svs']
    assert any('no class' in m for m in warnings_about(messages, tmp_path / 'blue.svs'))
