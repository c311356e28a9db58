"""Stain normalisation of H&E patches to a target image, in numpy and OpenCV (no TensorFlow).

Both methods fit a transform per slide, from a sample of its tissue patches, and then apply that
fixed transform to every patch read from the slide, so a patch keeps its own content (a nuclei-rich
patch stays darker than stroma) while the slide's overall stain moves to the target's.

- Reinhard et al. 2001, "Color transfer between images": shift and scale each channel of a
  perceptual colour space so its mean and standard deviation match the target's. Here the space
  is CIE L*a*b* (OpenCV's 8-bit encoding), as histology tools use it.
- Macenko et al. 2009, "A method for normalizing histology slides for quantitative analysis":
  in optical density (OD = -ln(I / I0)), project the tissue pixels onto the plane of the two
  largest principal directions, take the robust extreme angles (alpha and 100 - alpha
  percentiles) as the haematoxylin and eosin vectors, solve for each pixel's stain
  concentrations, scale each stain's 99th-percentile concentration (over the tissue pixels) to
  the target's, and rebuild
  the image with the target's stain vectors. Concentration solving, scaling and rebuilding are
  linear in OD, so the per-slide transform is a single 3x3 matrix on OD.
"""

import cv2
import numpy as np

METHODS = ('reinhard', 'macenko')
I0 = 255.0                  # light entering the slide (the brightest value)
MACENKO_BETA = 0.15         # pixels of OD magnitude below this are background, left out of the fit
MACENKO_ALPHA = 1.0         # percentile of the angle range taken as the extreme stain vectors
MAX_CONCENTRATION_PERCENTILE = 99.0
_OD_OF_BYTE = -np.log(np.maximum(np.arange(256, dtype=np.float64), 1) / I0).astype(np.float32)


def check_method(method):
    if method is not None and method not in METHODS:
        raise ValueError(f"stain_norm must be None, 'reinhard' or 'macenko', got {method!r}")


def read_target_image(path):
    """RGB uint8 of a stain target image file (PNG, JPEG, TIFF...)."""
    with open(path, 'rb') as f:
        bgr = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f'stain_target {path}: not an image OpenCV can read; give a PNG or JPEG of tissue')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------------------------
# Reinhard.

def lab_statistics(rgb):
    """(mean, std) per channel of OpenCV's 8-bit L*a*b* over the pixels of an RGB uint8 image
    (any shape ending in 3)."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb.reshape(-1, 1, 3)), cv2.COLOR_RGB2LAB).reshape(-1, 3)
    return lab.mean(0), lab.std(0)


def reinhard_lut(source_stats, target_stats):
    """A (1, 256, 3) uint8 table mapping each 8-bit LAB channel value v to
    (v - mean_src) / std_src * std_tgt + mean_tgt."""
    (src_mean, src_std), (tgt_mean, tgt_std) = source_stats, target_stats
    values = np.arange(256, dtype=np.float64)[:, None]
    mapped = (values - src_mean) / np.maximum(src_std, 1e-6) * tgt_std + tgt_mean
    return np.round(mapped).clip(0, 255).astype(np.uint8)[None]


class ReinhardTransform:
    def __init__(self, source_stats, target_stats):
        self.lut = reinhard_lut(source_stats, target_stats)

    def __call__(self, rgb):
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
        cv2.LUT(lab, self.lut, dst=lab)
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


# ----------------------------------------------------------------------------------------------
# Macenko.

def optical_density(rgb):
    """float32 OD (-ln(I / I0), I at least 1) of an RGB uint8 image, same shape."""
    return cv2.LUT(rgb, _OD_OF_BYTE)


def macenko_stains(rgb, beta=MACENKO_BETA, alpha=MACENKO_ALPHA):
    """(stain matrix [3, 2]: unit OD vectors of haematoxylin then eosin, max concentrations [2])
    of the tissue pixels of an RGB uint8 image."""
    od = optical_density(rgb).reshape(-1, 3).astype(np.float64)
    tissue = od[np.linalg.norm(od, axis=1) >= beta]     # the paper's OD intensity: its magnitude
    if len(tissue) < 100:
        raise ValueError('too few stained pixels to estimate H&E stain vectors')
    _, eigenvectors = np.linalg.eigh(np.cov(tissue.T))
    plane = eigenvectors[:, [2, 1]]                      # the two largest principal directions
    plane *= np.where(plane.sum(0) < 0, -1, 1)           # eigenvector signs are arbitrary; OD is positive
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [alpha, 100 - alpha])
    vectors = [plane @ np.array([np.cos(a), np.sin(a)]) for a in (low, high)]
    if vectors[0][0] < vectors[1][0]:                    # haematoxylin absorbs red the most
        vectors.reverse()
    stains = np.stack(vectors, 1)
    stains /= np.linalg.norm(stains, axis=0)
    # Of the tissue pixels only, so a patch's share of white background does not change the scale.
    concentrations = np.linalg.lstsq(stains, tissue.T, rcond=None)[0]
    return stains, np.percentile(concentrations, MAX_CONCENTRATION_PERCENTILE, axis=1)


def macenko_matrix(source, target):
    """3x3 M with OD_normalised = M @ OD: concentrations by least squares on the source stains,
    each scaled by target max / source max, rebuilt with the target stains."""
    (src_stains, src_max), (tgt_stains, tgt_max) = source, target
    return tgt_stains @ np.diag(tgt_max / np.maximum(src_max, 1e-6)) @ np.linalg.pinv(src_stains)


class MacenkoTransform:
    def __init__(self, source, target):
        self.matrix = macenko_matrix(source, target).astype(np.float32)

    def __call__(self, rgb):
        od = cv2.transform(optical_density(rgb), -self.matrix)     # minus: exp(-OD) below
        cv2.exp(od, od)
        return cv2.convertScaleAbs(od, alpha=I0)                  # saturating round to uint8


# ----------------------------------------------------------------------------------------------
# Either method.

def fit(method, rgb):
    """The statistics of an RGB uint8 image (or stack of patches) the method transfers."""
    return lab_statistics(rgb) if method == 'reinhard' else macenko_stains(rgb)


def transform(method, source, target):
    """A callable RGB uint8 patch -> normalised RGB uint8 patch, from fit() of source and target."""
    return ReinhardTransform(source, target) if method == 'reinhard' else MacenkoTransform(source, target)


def representative_patch(patches):
    """The patch (of a stack [N, H, W, 3]) whose LAB mean is nearest the median of all the
    patches' LAB means: a typical colour, not an outlier, as a default target."""
    means = np.array([lab_statistics(p)[0] for p in patches])
    return patches[int(np.argmin(np.linalg.norm(means - np.median(means, 0), axis=1)))]
