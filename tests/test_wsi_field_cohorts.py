"""Cohorts as they come from the field, on real files the tests write: CLAM label sheets, generic
TIFFs whose resolution tags are in dpi, DICOM slides in several files, QuPath's file names and
object types, malformed region files, and stain targets without tissue."""
import json
import os

import cv2
import numpy as np
import openslide
import pytest
import shapely.geometry
import tifffile

import dataset_tool
import stain
import patch_sampler
import wsi
from conftest import slide_image, write_slide
from dicom_slides import series_uid, write_dicom_slide

TINTS = {'red.svs': (1.3, 0.5, 0.5), 'green.svs': (0.5, 1.3, 0.5), 'blue.svs': (0.5, 0.5, 1.3)}


def sampler(slide_dir, mask_cache, messages, **kwargs):
    kwargs = {'resolution': 32, 'downsample': 4, 'seed': 1, 'num_threads': 2, **kwargs}
    return patch_sampler.PatchSampler(str(slide_dir), mask_cache_dir=mask_cache, log=messages.append, **kwargs)


def dominant_channel(images):
    return images.reshape(len(images), 3, -1).mean(-1).argmax(1)


# ----------------------------------------------------------------------------------------------
# Label sheets.

@pytest.fixture
def tinted(tmp_path):
    folder = tmp_path / 'slides'
    folder.mkdir()
    for name, tint in TINTS.items():
        write_slide(folder / name, width=1024, height=768, tint=tint)
    return folder


def test_a_clam_sheet_with_an_index_column_labels_every_slide(tinted, mask_cache, messages):
    sheet = tinted / 'labels.csv'
    sheet.write_text(',case_id,slide_id,label\n0,case-r,red,tumor\n1,case-g,green,normal\n2,case-b,blue,stroma\n')
    with sampler(tinted, mask_cache, messages, label_file=str(sheet), max_label_size='full') as s:
        assert len(s.slides) == 3 and s.class_names == ['normal', 'stroma', 'tumor']
        images, classes = s.sample(0, 30)
    by_channel = {0: 'tumor', 1: 'normal', 2: 'stroma'}
    assert [s.class_names[c] for c in classes] == [by_channel[c] for c in dominant_channel(images)]
    assert messages == []


def test_a_sheet_naming_no_slide_says_which_column_it_read(tinted, mask_cache, messages):
    sheet = tinted / 'labels.csv'
    sheet.write_text('case_id,slide_id,label\nred,TCGA-01,tumor\ngreen,TCGA-02,normal\n')
    with pytest.raises(ValueError, match=r"labels.csv: names none of the 3 slides.*column 1 \('slide_id'\).*"
                                         r"'TCGA-01' in row \['TCGA-01', 'tumor'\]"):
        sampler(tinted, mask_cache, messages, label_file=str(sheet), max_label_size='full')


def test_a_label_file_that_is_not_text_is_refused_by_name(tinted, mask_cache, messages):
    sheet = tinted / 'labels.csv'
    sheet.write_bytes(b'\xff\xfe\x00\x81binary\x00')
    with pytest.raises(ValueError, match='labels.csv: not a UTF-8 CSV'):
        sampler(tinted, mask_cache, messages, label_file=str(sheet), max_label_size='full')


# ----------------------------------------------------------------------------------------------
# Scale.

def write_dpi_tiff(path, rgb, dpi=72):
    """A tiled pyramid as a general image tool writes it: resolution tags in dots per inch."""
    levels = [rgb, cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)]
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            tif.write(level, tile=(256, 256), compression='zlib', photometric='rgb', subfiletype=0 if i == 0 else 1,
                      resolution=(dpi, dpi), resolutionunit='INCH', metadata=None)
    return str(path)


@pytest.fixture
def dpi_slide(tmp_path):
    folder = tmp_path / 'dpi'
    folder.mkdir()
    path = write_dpi_tiff(folder / 'export.tif', slide_image(1024, 768, [(256, 192, 768, 576)]))
    with openslide.OpenSlide(path) as handle:    # what OpenSlide makes of 72 dpi
        assert float(handle.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(352.8, rel=1e-3)
    return path


def test_a_72_dpi_tiff_under_patch_um_is_left_out_naming_the_value(dpi_slide, mask_cache, messages):
    with pytest.raises(wsi.NoUsableSlidesError, match='default_mpp'):
        sampler(os.path.dirname(dpi_slide), mask_cache, messages, wsi_ext='.tif', patch_um=64)
    assert any('352.8 um/px' in m and 'dpi' in m for m in messages)


def test_a_72_dpi_tiff_takes_default_mpp_with_a_warning(dpi_slide, mask_cache, messages):
    with sampler(os.path.dirname(dpi_slide), mask_cache, messages, wsi_ext='.tif', patch_um=64, default_mpp=0.5) as s:
        assert s.slides[0].mpp is None and s.slides[0].field_of_view == 128
        images, _ = s.sample(0, 8)
    assert all(np.ptp(image) > 30 for image in images)       # tissue, not flat colour
    [warning] = messages
    assert dpi_slide in warning and '352.8 um/px' in warning and 'default_mpp applies' in warning


def test_a_field_of_view_of_a_few_pixels_is_left_out(tmp_path, mask_cache, messages):
    path = write_slide(tmp_path / 'scan.svs', width=1024, height=768)
    with pytest.raises(wsi.NoUsableSlidesError, match='a patch would cover 8 level-0 pixels a side'):
        sampler(tmp_path, mask_cache, messages, patch_um=2)      # 2 um at 0.25 um/px
    assert path in messages[0]


def test_inspect_slides_shows_the_implausible_mpp_and_the_tiny_field_of_view(dpi_slide, mask_cache, capsys):
    folder = os.path.dirname(dpi_slide)
    common = ['inspect_slides', folder, '--wsi_ext', '.tif', '--resolution', '32', '--mask_cache_dir', mask_cache]
    dataset_tool.main(common + ['--patch_um', '64', '--default_mpp', '0.5'])
    out = capsys.readouterr().out
    assert 'MPP unknown' in out and 'warning: its metadata give 352.8 um/px' in out and '  usable' in out
    dataset_tool.main(common + ['--patch_um', '4', '--default_mpp', '0.5'])
    assert 'NOT usable: a patch would cover 8 level-0 pixels a side' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# DICOM.

@pytest.fixture
def dicom_cohort(tmp_path):
    """Two DICOM slides of three files each (levels 0 and 1, a label), one folder per slide."""
    root = tmp_path / 'dicom'
    files = {}
    for name, tint in (('case-7', (1.3, 0.5, 0.5)), ('case-8', (0.5, 0.5, 1.3))):
        rgb = slide_image(1024, 768, [(256, 192, 768, 576)], tint=tint)
        files[name] = write_dicom_slide(root / name, rgb)
    return root, files


def test_a_dicom_slide_in_three_files_is_one_slide_with_one_label_region_and_overview(
        dicom_cohort, mask_cache, messages, tmp_path):
    root, files = dicom_cohort
    for path in files['case-7']:        # OpenSlide opens the whole slide from any of its files
        with openslide.OpenSlide(path) as handle:
            assert handle.level_dimensions[0] == (1024, 768)
            assert handle.properties['dicom.SeriesInstanceUID'] == series_uid(files['case-7'][0])
    found = wsi.find_slides(str(root), '.dcm', recursive=True)
    assert [os.path.dirname(p) for p in found] == [str(root / 'case-7'), str(root / 'case-8')]
    sheet = tmp_path / 'labels.csv'
    sheet.write_text('slide_id,label\ncase-7,tumor\ncase-8,normal\n')
    rois = tmp_path / 'rois'
    rois.mkdir()
    box = shapely.geometry.mapping(shapely.geometry.box(300, 250, 700, 520))
    for name in ('case-7', 'case-8'):
        (rois / f'{name}.geojson').write_text(json.dumps([{'type': 'Feature', 'geometry': box, 'properties': {}}]))
    with sampler(root, mask_cache, messages, wsi_ext='.dcm', recursive=True, label_file=str(sheet),
                 max_label_size='full', roi_dir=str(rois)) as s:
        assert len(s.slides) == 2 and [sl.class_index for sl in s.slides] == [1, 0]
        assert all(sl.region is not None for sl in s.slides)
        images, classes = s.sample(0, 20)
        overviews = s.write_overview(str(tmp_path / 'overviews'))
    assert [{0: 1, 2: 0}[c] for c in dominant_channel(images)] == classes.tolist()
    assert len(overviews) == 2
    assert len(os.listdir(mask_cache)) == 2
    assert messages == []


# ----------------------------------------------------------------------------------------------
# QuPath file names and object types.

def annotation(geometry, object_type='annotation', name='Tumor'):
    properties = {'classification': {'name': name}}
    if object_type is not None:
        properties['objectType'] = object_type
    return {'type': 'Feature', 'geometry': shapely.geometry.mapping(geometry), 'properties': properties}


TISSUE_BOX = shapely.geometry.box(600, 450, 1400, 1050)


@pytest.fixture
def qupath(tmp_path):
    slides, rois = tmp_path / 'slides', tmp_path / 'rois'
    slides.mkdir()
    rois.mkdir()
    return write_slide(slides / 'case 12.svs'), str(slides), rois


@pytest.mark.parametrize('file_name', ['case 12.svs.geojson', 'case 12.json', 'case 12.svs.json'])
def test_qupath_file_names_with_the_image_extension_or_json_are_found(qupath, mask_cache, messages, file_name):
    path, slides, rois = qupath
    (rois / file_name).write_text(json.dumps([annotation(TISSUE_BOX)]))
    with sampler(slides, mask_cache, messages, roi_dir=str(rois)) as s:
        assert s.slide_paths == [path] and s.slides[0].region.equals(TISSUE_BOX)
    assert messages == []


def test_two_region_files_for_one_slide_are_an_error_naming_both(qupath, mask_cache, messages):
    _, slides, rois = qupath
    for name in ('case 12.geojson', 'case 12.svs.geojson'):
        (rois / name).write_text(json.dumps([annotation(TISSUE_BOX)]))
    with pytest.raises(ValueError, match=r'case 12.geojson and .*case 12.svs.geojson; keep one'):
        sampler(slides, mask_cache, messages, roi_dir=str(rois))


def test_a_cell_only_export_has_no_region_unless_detections_are_asked_for(qupath, mask_cache, messages):
    path, slides, rois = qupath
    cells = [annotation(shapely.geometry.Point(700 + 40 * i, 600).buffer(60), 'cell') for i in range(12)]
    (rois / 'case 12.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': cells}))
    with pytest.raises(wsi.NoUsableSlidesError, match=r'no polygon \(skipped 12 cell object\(s\) '
                                                      r'\(roi_detections=True takes them'):
        sampler(slides, mask_cache, messages, roi_dir=str(rois))
    with sampler(slides, mask_cache, [], roi_dir=str(rois), roi_detections=True) as s:
        assert s.slide_paths == [path] and s.slides[0].region is not None


def test_detections_beside_annotations_are_skipped_and_counted(qupath, mask_cache, messages):
    _, slides, rois = qupath
    features = [annotation(TISSUE_BOX, None), annotation(shapely.geometry.box(0, 0, 300, 300), 'detection')]
    (rois / 'case 12.geojson').write_text(json.dumps(features))
    with sampler(slides, mask_cache, messages, roi_dir=str(rois)) as s:
        assert s.slides[0].region.equals(TISSUE_BOX)
    [warning] = messages
    assert 'skipped 1 detection object(s)' in warning


def test_a_slide_without_region_file_lists_files_with_close_names(qupath, mask_cache, messages):
    _, slides, rois = qupath
    (rois / 'case_12.geojson').write_text('[]')
    (rois / 'other.geojson').write_text('[]')
    with pytest.raises(wsi.NoUsableSlidesError, match='files with similar names there: case_12.geojson'):
        sampler(slides, mask_cache, messages, roi_dir=str(rois))
    assert 'other.geojson' not in messages[0]


def test_roi_labels_given_as_one_string_is_refused(qupath, mask_cache, messages):
    _, slides, rois = qupath
    unclassified = annotation(TISSUE_BOX, name='')
    (rois / 'case 12.geojson').write_text(json.dumps([unclassified]))   # '' in 'Tumor' would select it
    with pytest.raises(ValueError, match=r"roi_labels must be a list of class names, got the string 'Tumor'"):
        sampler(slides, mask_cache, messages, roi_dir=str(rois), roi_labels='Tumor')


# ----------------------------------------------------------------------------------------------
# Malformed region files.

def write_regions(rois, content):
    path = rois / 'case 12.geojson'
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_a_self_intersecting_polygon_is_repaired_and_reported(qupath, mask_cache, messages):
    _, slides, rois = qupath
    bowtie = {'type': 'Polygon', 'coordinates': [[[600, 450], [1400, 1050], [1400, 450], [600, 1050], [600, 450]]]}
    write_regions(rois, [{'type': 'Feature', 'geometry': bowtie, 'properties': {}}])
    with sampler(slides, mask_cache, messages, roi_dir=str(rois)) as s:
        assert s.slides[0].region.is_valid and s.slides[0].region.area == pytest.approx(800 * 600 / 2)
    [warning] = messages
    assert 'repaired invalid geometry of feature 0 (Self-intersection' in warning


@pytest.mark.parametrize('content, message', [
    ([{'type': 'Feature', 'properties': {}, 'geometry': {
        'type': 'Polygon', 'coordinates': [[[0, 0], [float('nan'), 5], [9, 9], [0, 0]]]}}],
     'feature 0 has coordinates that are not finite'),
    ('[{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", '
     '"coordinates": [[[0, 0], [Infinity, 5], [9, 9], [0, 0]]]}}]', 'feature 0 has coordinates that are not finite'),
    ([{'type': 'Feature', 'properties': {}, 'geometry': {'type': 'Polygon', 'coordinates': [[[0, 0], [5, 5]]]}}],
     'feature 0 has a Polygon that cannot be read'),
    ([{'type': 'Feature', 'properties': {}, 'geometry': {'type': 'Polygon', 'coordinates': 'ring'}}],
     'feature 0 has a Polygon that cannot be read'),
    ([{'type': 'Feature', 'properties': {}, 'geometry': 'Polygon'}], 'feature 0 has a geometry that is a str'),
    ([annotation(TISSUE_BOX), 17], 'feature 1 is a int, not a GeoJSON Feature'),
    ([{'type': 'Feature', 'properties': ['annotation'], 'geometry': shapely.geometry.mapping(TISSUE_BOX)}],
     'feature 0 has properties that are a list'),
    ('[' * 100000 + ']' * 100000, 'nested too deeply'),
])
def test_malformed_region_files_are_refused_naming_file_and_feature(qupath, mask_cache, messages, content, message):
    _, slides, rois = qupath
    path = write_regions(rois, content)
    with pytest.raises(ValueError, match=message) as raised:
        sampler(slides, mask_cache, messages, roi_dir=str(rois))
    assert path in str(raised.value)


def test_regions_outside_the_slide_and_empty_regions_say_so(qupath, mask_cache, messages):
    _, slides, rois = qupath
    write_regions(rois, [annotation(shapely.geometry.box(5000, 5000, 6000, 6000))])
    with pytest.raises(wsi.NoUsableSlidesError, match=r"lie outside the slide's 2048x1536 level-0 pixels"):
        sampler(slides, mask_cache, messages, roi_dir=str(rois))
    write_regions(rois, [{'type': 'Feature', 'properties': {}, 'geometry': {'type': 'Polygon', 'coordinates': []}}])
    with pytest.raises(wsi.NoUsableSlidesError, match='has no polygon'):
        sampler(slides, mask_cache, messages, roi_dir=str(rois))


def test_a_region_file_over_the_size_bound_is_refused(qupath, mask_cache, messages, monkeypatch):
    _, slides, rois = qupath
    path = write_regions(rois, [annotation(TISSUE_BOX)] * 50)
    monkeypatch.setattr(wsi, 'MAX_REGION_FILE_BYTES', 4096)     # the real bound is 1 GB
    with pytest.raises(ValueError, match='MB a region file may have; export only the annotations') as raised:
        sampler(slides, mask_cache, messages, roi_dir=str(rois), num_readers=0)   # patched here
    assert path in str(raised.value)


# ----------------------------------------------------------------------------------------------
# Stain targets.

@pytest.mark.parametrize('method', ['reinhard', 'macenko'])
def test_a_background_tile_as_stain_target_is_refused(tmp_path, mask_cache, messages, method):
    write_slide(tmp_path / 'slide.svs', width=1024, height=768)
    target = str(tmp_path / 'background.png')
    cv2.imwrite(target, cv2.cvtColor(slide_image(256, 256, seed=3), cv2.COLOR_RGB2BGR))
    with pytest.raises(ValueError, match=r'background.png: only \d+\.\d% of its pixels are stained tissue'):
        sampler(tmp_path, mask_cache, messages, stain_norm=method, stain_target=target)


def test_reinhard_keeps_white_background_white_and_fits_on_tissue():
    from test_stain import SITES, TARGET_SITE, stained_tissue
    patch = slide_image(128, 128, seed=4)
    patch[:, 64:] = stained_tissue(128, 64, SITES['site-b'], seed=2)
    patch[40:90, 70:120] = stained_tissue(50, 50, SITES['site-b'], seed=5)
    target = stained_tissue(128, 128, TARGET_SITE, seed=9)
    normalise = stain.transform('reinhard', stain.fit('reinhard', patch), stain.fit('reinhard', target))
    result = normalise(patch)
    glass = stain.od_magnitude(patch) <= stain.REINHARD_BACKGROUND_OD
    assert glass[:, :64].mean() > 0.8 and (result[glass] == patch[glass]).all()
    assert np.abs(result[:, :64].astype(int) - patch[:, :64]).mean() < 2     # fitted on whole patches: about 45
    tissue = stain.od_magnitude(patch) >= stain.REINHARD_TISSUE_OD
    mean, std = stain.lalphabeta_statistics(result[tissue])
    target_mean, target_std = stain.fit('reinhard', target)
    assert np.abs(mean - target_mean).max() < 0.01 and np.abs(std / target_std - 1).max() < 0.05
