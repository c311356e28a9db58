"""Stain normalisation: Reinhard and Macenko checked against their published formulas, and through
the sampler on real pyramidal slides: each slide's patches move to the target's LAB statistics,
and two copies of one tissue stained at different sites end up closer together."""
import os

import cv2
import numpy as np
import pytest

import stain
import patch_sampler
import wsi
from conftest import slide_image

# Ruifrok & Johnston's H&E optical-density vectors, normalised.
HAEMATOXYLIN = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
# Sites: (stain vectors, stain strengths) of the same tissue stained and scanned elsewhere.
SITES = {'site-a': (np.stack([HAEMATOXYLIN, EOSIN], 1), (1.0, 1.0)),
         'site-b': (np.stack([[0.50, 0.78, 0.37], [0.15, 0.95, 0.27]], 1), (1.4, 0.65))}
TARGET_SITE = (np.stack([[0.62, 0.74, 0.26], [0.05, 0.97, 0.22]], 1), (1.2, 0.85))
TOWARDS_EACH_OTHER = 3.0     # normalised copies are at least this many times closer than before


def synthetic_he(stains, shape=(96, 96), seed=0):
    """(RGB uint8 image made by Beer-Lambert from OD stain vectors [3, 2], concentrations [2, N])."""
    rng = np.random.default_rng(seed)
    count = shape[0] * shape[1]
    concentrations = np.stack([rng.gamma(2.0, 0.35, count), rng.gamma(2.0, 0.25, count)])
    pure = np.flatnonzero(rng.random(count) < 0.2)                     # some pixels show one stain only
    concentrations[rng.integers(2, size=len(pure)), pure] = 0
    rgb = stain.I0 * np.exp(-(stains @ concentrations)).T.reshape(*shape, 3)
    return np.round(rgb).clip(0, 255).astype(np.uint8), concentrations


def angle_degrees(a, b):
    return np.degrees(np.arccos(np.clip(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)))


def test_reinhard_gives_the_target_lalphabeta_mean_and_std_and_about_its_cie_lab_ones():
    source = stained_tissue(256, 256, SITES['site-b'])
    target = stained_tissue(256, 256, TARGET_SITE, seed=9)
    normalise = stain.transform('reinhard', stain.fit('reinhard', source), stain.fit('reinhard', target))
    result = normalise(source)
    # Reinhard et al. 2001: each l-alpha-beta channel takes the target's mean and standard deviation.
    (mean, std), (target_mean, target_std) = stain.lalphabeta_statistics(result), stain.fit('reinhard', target)
    assert np.abs(mean - target_mean).max() < 0.005 and np.abs(std / target_std - 1).max() < 0.03
    (lab_mean, lab_std), (target_lab_mean, target_lab_std) = stain.lab_statistics(result), stain.lab_statistics(target)
    assert np.abs(lab_mean - target_lab_mean).max() < 3 and np.abs(lab_std - target_lab_std).max() < 3
    assert np.abs(stain.lab_statistics(source)[0] - target_lab_mean).max() > 5     # a real move, not already there


def test_macenko_recovers_the_stain_vectors_an_image_was_made_from():
    image, _ = synthetic_he(np.stack([HAEMATOXYLIN, EOSIN], 1))
    stains, max_concentrations = stain.macenko_stains(image)
    assert angle_degrees(stains[:, 0], HAEMATOXYLIN) < 3 and angle_degrees(stains[:, 1], EOSIN) < 3
    assert (max_concentrations > 0).all()


def test_macenko_rebuilds_each_pixel_with_the_target_stains_and_scaled_concentrations():
    # Macenko et al.: C = source stains^-1 OD; C' = C * maxC_target / maxC_source; I = I0 exp(-target stains C').
    source_stains = np.stack([HAEMATOXYLIN, EOSIN], 1)
    rotated = np.array([0.55, 0.80, 0.24]), np.array([0.20, 0.95, 0.25])
    target_stains = np.stack([v / np.linalg.norm(v) for v in rotated], 1)
    image, _ = synthetic_he(source_stains, seed=1)
    source_fit = stain.macenko_stains(image)
    target_fit = (target_stains, np.array([1.5, 0.8]))
    result = stain.transform('macenko', source_fit, target_fit)(image).astype(np.float64)

    od = -np.log(np.maximum(image.reshape(-1, 3).astype(np.float64), 1) / stain.I0)
    concentrations = np.linalg.lstsq(source_fit[0], od.T, rcond=None)[0]
    scaled = concentrations * (target_fit[1] / source_fit[1])[:, None]
    expected = np.clip(stain.I0 * np.exp(-(target_stains @ scaled)).T, 0, 255).reshape(image.shape)
    assert np.abs(result - expected).max() <= 1.0


def test_unknown_method_and_unreadable_target_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="stain_norm must be None, 'reinhard' or 'macenko'"):
        stain.check_method('vahadane')
    bad = tmp_path / 'target.png'
    bad.write_bytes(b'not an image')
    with pytest.raises(ValueError, match='target.png: not an image'):
        stain.read_target_image(str(bad))


# ----------------------------------------------------------------------------------------------
# Through the sampler on slides.

def stained_tissue(height, width, site, seed=0):
    """RGB uint8 tissue by Beer-Lambert: smooth random haematoxylin and eosin concentration maps
    (the same for a given seed: the same tissue) through a site's stain vectors and strengths."""
    rng = np.random.default_rng(seed)
    stains, strengths = site
    stains = stains / np.linalg.norm(stains, axis=0)
    maps = []
    for strength, scale in zip(strengths, (0.7, 0.5)):
        field = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 12)
        field = (field - field.min()) / np.ptp(field)
        maps.append(strength * scale * 3 * field ** 2)
    od = np.stack(maps, -1) @ stains.T
    return (stain.I0 * np.exp(-od)).round().clip(0, 255).astype(np.uint8)


@pytest.fixture
def tinted_copies(tmp_path):
    """Folders each holding one copy of the same tissue stained at a different site, and a
    target image file of a third site."""
    folders = {}
    for name, site in SITES.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        image = slide_image(2048, 1536, seed=2)
        image[96:1440, 96:1952] = stained_tissue(1344, 1856, site)
        wsi.write_pyramidal_tiff(str(folders[name] / 'slide.svs'), image, aperio=True)
    # The same tissue stained at a third site, a 1024-px piece at the patches' scale (4 slide
    # pixels per patch pixel): Macenko matches stain vectors and top concentrations, so the LAB
    # statistics agree when the tissue does.
    tissue = stained_tissue(1344, 1856, TARGET_SITE)[160:1184, 416:1440]
    target = cv2.resize(tissue, (256, 256), interpolation=cv2.INTER_AREA)
    target_path = str(tmp_path / 'target.png')
    cv2.imwrite(target_path, cv2.cvtColor(target, cv2.COLOR_RGB2BGR))
    return folders, target_path, target


def tissue_lab_statistics(rgb):
    """LAB (mean, std) of the stained pixels only: white background looks the same at every site."""
    pixels = rgb.reshape(-1, 3)
    od = stain.optical_density(pixels[:, None])[:, 0]
    return stain.lab_statistics(pixels[np.linalg.norm(od, axis=1) >= stain.MACENKO_BETA])


def patches_of(folder, mask_cache, **kwargs):
    """[N, H, W, 3] patches the sampler gives at LOD 0 (same seed: the same places of each copy)."""
    with patch_sampler.PatchSampler(str(folder), resolution=64, downsample=4, mask_cache_dir=mask_cache, seed=7,
                          num_threads=1, log=print, **kwargs) as sampler:
        images, _ = sampler.sample(0, 48)
    return images.transpose(0, 2, 3, 1)


@pytest.mark.parametrize('method', ['reinhard', 'macenko'])
def test_slide_patches_move_to_the_target_and_tinted_copies_come_together(tinted_copies, mask_cache, method):
    folders, target_path, target = tinted_copies
    target_mean, target_std = tissue_lab_statistics(target)
    plain = {name: tissue_lab_statistics(patches_of(f, mask_cache)) for name, f in folders.items()}
    normalised = {name: tissue_lab_statistics(patches_of(f, mask_cache, stain_norm=method, stain_target=target_path))
                  for name, f in folders.items()}
    for mean, std in normalised.values():
        assert np.abs(mean - target_mean).max() < 6, (mean, target_mean)
        assert np.abs(std - target_std).max() < 8, (std, target_std)
    gap_before = np.linalg.norm(plain['site-a'][0] - plain['site-b'][0])
    gap_after = np.linalg.norm(normalised['site-a'][0] - normalised['site-b'][0])
    assert gap_after * TOWARDS_EACH_OTHER < gap_before, (gap_before, gap_after)


def test_default_target_is_a_cohort_patch_saved_with_before_and_after_overviews(tinted_copies, mask_cache, tmp_path):
    import dataset
    folders, _, _ = tinted_copies
    data = dataset.WSIDataset(str(folders['site-a']), resolution=64, downsample=4, mask_cache_dir=mask_cache,
                              stain_norm='reinhard', seed=3)
    try:
        run_dir = tmp_path / 'run'
        data.write_overview(str(run_dir))
        assert data.sampler.problems_path == str(run_dir / 'read-problems.txt')
        target = cv2.cvtColor(cv2.imread(str(run_dir / 'stain-target.png')), cv2.COLOR_BGR2RGB)
        assert target.shape == (64, 64, 3) and np.array_equal(target, data.sampler.stain_target_image)
        pair = cv2.imread(str(run_dir / 'slide-overviews' / 'overview-000-slide.svs-stain.png'))
        assert pair.shape == (64, 128, 3) and not np.array_equal(pair[:, :64], pair[:, 64:])
        images, _ = data.get_minibatch_np(64)       # what reals.png shows: normalised patches
        mean, _ = tissue_lab_statistics(images.transpose(0, 2, 3, 1))    # the background is left as it is
        assert np.abs(mean - tissue_lab_statistics(target)[0]).max() < 6
    finally:
        data.close()
    assert os.path.isfile(run_dir / 'slide-overviews' / 'overview-000-slide.svs.png')
