"""Real cohorts: patch size in micrometres across scanners of different magnification, and
sampling inside QuPath GeoJSON regions, on real pyramidal slides written into tmp_path."""
import json
import os

import cv2
import numpy as np
import openslide
import pytest
import shapely.geometry

import patch_sampler
import wsi
from conftest import slide_image, write_slide


def sampler(slide_dir, mask_cache, messages, **kwargs):
    kwargs = {'resolution': 32, 'seed': 1, 'num_threads': 2, **kwargs}
    return patch_sampler.PatchSampler(str(slide_dir), mask_cache_dir=mask_cache, log=messages.append, **kwargs)


# ----------------------------------------------------------------------------------------------
# Scale.

@pytest.fixture
def twin_scans(tmp_path):
    """The same tissue scanned at 0.25 um/px (40x) and 0.5 um/px (20x), each in its own folder."""
    tissue = slide_image(2048, 1536, [(256, 256, 1792, 1280)], seed=5)
    paths = {}
    for mpp, image in ((0.25, tissue), (0.5, cv2.resize(tissue, (1024, 768), interpolation=cv2.INTER_AREA))):
        folder = tmp_path / f'mpp{mpp}'
        folder.mkdir()
        paths[mpp] = str(folder / 'scan.svs')
        wsi.write_pyramidal_tiff(paths[mpp], image, aperio=True, mpp=mpp, app_mag=int(10 / mpp))
    return paths


def patch_at(sampler_, physical_centre_um, size):
    """A patch through the sampler's own per-slide field of view, at a physical position."""
    slide = sampler_.slides[0]
    centre = [c / slide.mpp for c in physical_centre_um]
    with openslide.OpenSlide(slide.path) as handle:
        return wsi.read_patch(handle, centre, slide.field_of_view, size).astype(np.float32)


def test_patch_um_gives_the_same_physical_field_of_view_at_025_and_05_um_per_px(twin_scans, mask_cache, messages):
    by_um = {mpp: sampler(os.path.dirname(p), mask_cache, messages, patch_um=96) for mpp, p in twin_scans.items()}
    by_px = {mpp: sampler(os.path.dirname(p), mask_cache, messages, downsample=12) for mpp, p in twin_scans.items()}
    try:
        assert by_um[0.25].slides[0].field_of_view == 384 and by_um[0.5].slides[0].field_of_view == 192
        for lod, centre_um in ((0, (200, 150)), (1, (300, 180)), (3, (150, 200))):
            size = 32 >> lod
            same = np.abs(patch_at(by_um[0.25], centre_um, size) - patch_at(by_um[0.5], centre_um, size)).mean()
            differ = np.abs(patch_at(by_px[0.25], centre_um, size) - patch_at(by_px[0.5], centre_um, size)).mean()
            assert same < 6 and differ > 3 * same, (lod, same, differ)
        images, _ = by_um[0.5].sample(0, 8)        # the sampler itself reads at that field of view
        assert images.shape == (8, 3, 32, 32)
    finally:
        for s in [*by_um.values(), *by_px.values()]:
            s.close()
    assert messages == []


def test_slides_without_mpp_are_left_out_under_patch_um_unless_default_mpp(tmp_path, mask_cache, messages):
    aperio = write_slide(tmp_path / 'aperio.svs')                       # MPP 0.25 in its description
    generic = write_slide(tmp_path / 'generic.tif', aperio=False)      # no MPP
    with sampler(tmp_path, mask_cache, messages, wsi_ext=['.svs', '.tif'], patch_um=64) as s:
        assert s.slide_paths == [aperio]
    assert len(messages) == 1 and generic in messages[0] and 'default_mpp' in messages[0]
    with sampler(tmp_path, mask_cache, [], wsi_ext=['.svs', '.tif'], patch_um=64, default_mpp=0.5) as s:
        assert {sl.path: sl.field_of_view for sl in s.slides} == {aperio: 256, generic: 128}


def test_mixed_magnifications_under_downsample_are_warned_about(twin_scans, tmp_path, mask_cache, messages):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    for mpp, path in twin_scans.items():
        os.link(path, folder / f'scan-{mpp}.svs')
    with sampler(folder, mask_cache, messages, downsample=4):
        pass
    assert len(messages) == 1 and 'mix magnifications' in messages[0] and '0.25' in messages[0]
    with sampler(folder, mask_cache, messages, patch_um=64):
        pass
    assert len(messages) == 1


# ----------------------------------------------------------------------------------------------
# Regions.

TUMOUR = shapely.geometry.Polygon([(200, 200), (1100, 200), (1100, 1300), (200, 1300)],
                                  [[(500, 500), (800, 500), (800, 1000), (500, 1000)]])
STROMA = shapely.geometry.Polygon([(1300, 200), (1900, 200), (1900, 1300), (1300, 1300)])


def feature(geometry, classification):
    return {'type': 'Feature', 'geometry': shapely.geometry.mapping(geometry),
            'properties': {'objectType': 'annotation', 'classification': classification}}


@pytest.fixture
def annotated(tmp_path):
    """A slide with tissue nearly everywhere and a QuPath export: a Tumor polygon with a hole
    (as a MultiPolygon, QuPath's current classification dict) and a Stroma polygon (an older
    export's plain-string classification), as a bare list of Features."""
    slides, rois = tmp_path / 'slides', tmp_path / 'rois'
    slides.mkdir()
    rois.mkdir()
    path = write_slide(slides / 'case 1.svs', tissue_boxes=[(100, 100, 1950, 1450)])
    features = [feature(shapely.geometry.MultiPolygon([TUMOUR]), {'name': 'Tumor', 'color': [200, 0, 0]}),
                feature(STROMA, 'Stroma')]
    (rois / 'case 1.geojson').write_text(json.dumps(features), encoding='utf-8')
    return path, str(slides), str(rois)


def recorded_centres(monkeypatch):
    """The centres of the patches read by a sampler made with num_readers=0 (in this process)."""
    centres = []
    real_read_patch = wsi.read_patch

    def recording(handle, centre, field_of_view, size):
        centres.append(centre)
        return real_read_patch(handle, centre, field_of_view, size)
    monkeypatch.setattr(wsi, 'read_patch', recording)
    return centres


def test_patch_centres_fall_inside_the_chosen_class_and_outside_its_hole_at_every_lod(
        annotated, mask_cache, messages, monkeypatch):
    _, slides, rois = annotated
    centres = recorded_centres(monkeypatch)
    with sampler(slides, mask_cache, messages, downsample=4, roi_dir=rois, roi_labels=['Tumor'], num_readers=0) as s:
        for lod in range(s.max_lod + 1):
            del centres[:]
            images, _ = s.sample(lod, 200)
            assert images.shape[2] == 32 >> lod and len(centres) >= 200
            points = [shapely.geometry.Point(c) for c in centres]
            assert all(TUMOUR.contains(p) for p in points), lod
            assert not any(TUMOUR.interiors[0].envelope.contains(p) for p in points)
    assert messages == []


def test_without_labels_every_region_is_sampled_and_nothing_outside(annotated, mask_cache, messages, monkeypatch):
    _, slides, rois = annotated
    centres = recorded_centres(monkeypatch)
    with sampler(slides, mask_cache, messages, downsample=4, roi_dir=rois, num_readers=0) as s:
        s.sample(0, 300)
    points = [shapely.geometry.Point(c) for c in centres]
    in_stroma = sum(STROMA.contains(p) for p in points)
    assert 0 < in_stroma < len(points) and all(TUMOUR.contains(p) or STROMA.contains(p) for p in points)


def test_slides_without_annotation_file_are_left_out_or_use_their_tissue(annotated, mask_cache, messages):
    annotated_path, slides, rois = annotated
    plain = write_slide(os.path.join(slides, 'case 2.svs'))
    with sampler(slides, mask_cache, messages, downsample=4, roi_dir=rois, num_readers=0) as s:
        assert s.slide_paths == [annotated_path]
    assert len(messages) == 1 and plain in messages[0] and 'case 2.geojson' in messages[0]
    with sampler(slides, mask_cache, [], downsample=4, roi_dir=rois, roi_missing='tissue') as s:
        assert sorted(s.slide_paths) == sorted([annotated_path, plain])
        assert s.slides[s.slide_paths.index(plain)].region is None


def test_regions_of_an_unknown_class_or_bad_json_are_clear_errors(annotated, mask_cache, messages):
    _, slides, rois = annotated
    with pytest.raises(wsi.NoUsableSlidesError, match='no polygon of class Glomerulus'):
        sampler(slides, mask_cache, messages, downsample=4, roi_dir=rois, roi_labels=['Glomerulus'])
    with open(os.path.join(rois, 'case 1.geojson'), 'w') as f:
        f.write('{"type": "FeatureCollection", "features": [')
    with pytest.raises(ValueError, match='case 1.geojson: not valid GeoJSON'):
        sampler(slides, mask_cache, messages, downsample=4, roi_dir=rois)


def test_feature_collection_and_name_only_exports_are_read(tmp_path):
    path = tmp_path / 'a.geojson'
    collection = {'type': 'FeatureCollection', 'features': [
        {'type': 'Feature', 'geometry': shapely.geometry.mapping(STROMA), 'properties': {'name': 'Stroma'}},
        {'type': 'Feature', 'geometry': {'type': 'Point', 'coordinates': [5, 5]}, 'properties': {'name': 'Stroma'}}]}
    path.write_text(json.dumps(collection))
    assert wsi.load_regions(str(path), ['Stroma']).equals(STROMA)
    assert wsi.load_regions(str(path), ['Tumor']) is None


def test_overview_draws_the_regions(annotated, mask_cache, messages, tmp_path):
    _, slides, rois = annotated
    with sampler(slides, mask_cache, messages, downsample=4, roi_dir=rois, roi_labels=['Tumor'], num_readers=0) as s:
        [picture_path] = s.write_overview(str(tmp_path / 'overviews'), max_size=1024)
    picture = cv2.imread(picture_path)      # BGR; regions are drawn (0, 0, 230) in RGB
    scale = 1024 / 2048
    hole_edge_x = round(500 * scale)
    column = picture[round(600 * scale):round(900 * scale), hole_edge_x - 2:hole_edge_x + 3]
    assert ((column[..., 0] > 200) & (column[..., 2] < 40)).any(axis=1).all()


def test_inspect_slides_prints_each_slides_mpp_and_downsample_and_warns_on_mixed_magnifications(
        twin_scans, tmp_path, mask_cache, capsys):
    import dataset_tool
    folder = tmp_path / 'mixed'
    folder.mkdir()
    for mpp, path in twin_scans.items():
        os.link(path, folder / f'scan-{mpp}.svs')
    common = ['inspect_slides', str(folder), '--resolution', '32', '--mask_cache_dir', mask_cache]
    dataset_tool.main(common + ['--downsample', '4'])
    by_downsample = capsys.readouterr().out
    assert 'MPP 0.25 um/px' in by_downsample and 'MPP 0.5 um/px' in by_downsample
    assert 'downsample 4, field of view 128 px = 32 um' in by_downsample
    assert 'downsample 4, field of view 128 px = 64 um' in by_downsample
    assert by_downsample.count('Warning: the slides mix magnifications (MPP 0.25, 0.5 um/px)') == 1
    dataset_tool.main(common + ['--patch_um', '64'])
    by_microns = capsys.readouterr().out
    assert 'downsample 8, field of view 256 px = 64 um' in by_microns
    assert 'downsample 4, field of view 128 px = 64 um' in by_microns
    assert 'Warning' not in by_microns
