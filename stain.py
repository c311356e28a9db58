"""Stain normalisation of H&E patches to a target image, in numpy and OpenCV (no TensorFlow).

Both methods fit a transform per slide, from a sample of its tissue patches, and then apply that
fixed transform to every patch read from the slide, so a patch keeps its own content (a nuclei-rich
patch stays darker than stroma) while the slide's overall stain moves to the target's.

- Reinhard et al. 2001, "Color transfer between images": shift and scale each channel of the
  decorrelated l-alpha-beta space (log cone responses, rotated) so its mean and standard
  deviation match the target's. (Histology tools often use CIE L*a*b* instead; its two 8-bit
  conversions cost twice the read of a 512-px patch, l-alpha-beta's affine map a quarter.)
  Statistics are taken over tissue pixels only, and background is left as it is: fitted on
  whole patches, the share of white glass would set the statistics and tint the glass.
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
MIN_STAINED_FRACTION = 0.1  # of an image's pixels at OD magnitude >= MACENKO_BETA, to have a stain to measure
REINHARD_TISSUE_OD = 0.2    # OD magnitude from which Reinhard fits and fully moves a pixel
REINHARD_BACKGROUND_OD = 0.12   # ... and up to which it leaves the pixel as it is (glass is about 0.1)
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

RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
LOG_LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]])     # l-alpha-beta (natural log: the base only scales all alike)
_UNIT_OF_BYTE = ((np.arange(256) + 1) / 256).astype(np.float32)   # +1: no log(0) for black


def log_lms(rgb):
    """float32 ln(LMS cone response) of an RGB uint8 image, same shape."""
    return cv2.log(cv2.transform(cv2.LUT(rgb, _UNIT_OF_BYTE), RGB_TO_LMS.astype(np.float32)))


def lalphabeta_statistics(rgb):
    """(mean, std) per channel of Reinhard's l-alpha-beta space over an RGB uint8 image's pixels
    (any shape ending in 3)."""
    lab = log_lms(np.ascontiguousarray(rgb.reshape(-1, 1, 3))).reshape(-1, 3) @ LOG_LMS_TO_LAB.T
    return lab.mean(0), lab.std(0)


def stained_fraction(rgb):
    """Share of an RGB uint8 image's pixels whose OD magnitude reaches MACENKO_BETA (stained tissue)."""
    return float(np.mean(od_magnitude(np.ascontiguousarray(rgb.reshape(-1, 1, 3))) >= MACENKO_BETA))


def od_magnitude(rgb):
    """float32 OD magnitude per pixel of an RGB uint8 image (shape without the channel axis)."""
    od = optical_density(rgb)
    return np.sqrt((od * od).sum(-1))


def tissue_weight(rgb):
    """float32 per pixel in [0, 1]: 0 up to REINHARD_BACKGROUND_OD (glass), 1 from REINHARD_TISSUE_OD
    (tissue), linear between, so normalised tissue fades into untouched background without a seam."""
    ramp = (od_magnitude(rgb) - REINHARD_BACKGROUND_OD) / (REINHARD_TISSUE_OD - REINHARD_BACKGROUND_OD)
    return np.clip(ramp, 0, 1, out=ramp)


def reinhard_statistics(rgb):
    """lalphabeta_statistics of the tissue pixels (OD magnitude >= REINHARD_TISSUE_OD) of an RGB
    uint8 image or stack of patches."""
    pixels = rgb.reshape(-1, 3)
    return lalphabeta_statistics(pixels[od_magnitude(pixels[:, None])[:, 0] >= REINHARD_TISSUE_OD])


class ReinhardTransform:
    """lab' = (lab - mean_src) * std_tgt / std_src + mean_tgt per l-alpha-beta channel. l-alpha-
    beta is linear in log LMS, so that is one affine map A log(LMS) + c, applied between the
    colour-space matrices without converting to l-alpha-beta and back. Each pixel takes the
    mapped colour by its tissue_weight: background keeps its own."""

    def __init__(self, source_stats, target_stats):
        (src_mean, src_std), (tgt_mean, tgt_std) = source_stats, target_stats
        scale = tgt_std / np.maximum(src_std, 1e-6)
        to_log_lms = np.linalg.inv(LOG_LMS_TO_LAB)
        linear = to_log_lms @ np.diag(scale) @ LOG_LMS_TO_LAB
        offset = to_log_lms @ (tgt_mean - scale * src_mean)
        self.in_log_lms = np.hstack([linear, offset[:, None]]).astype(np.float32)
        # LMS back to RGB bytes, undoing _UNIT_OF_BYTE: 256 * rgb - 1.
        self.to_bytes = np.hstack([256 * np.linalg.inv(RGB_TO_LMS), -np.ones((3, 1))]).astype(np.float32)

    def __call__(self, rgb):
        lms = cv2.transform(log_lms(rgb), self.in_log_lms)
        cv2.exp(lms, lms)
        out = cv2.transform(lms, self.to_bytes)
        original = rgb.astype(np.float32)
        out = original + (out - original) * tissue_weight(rgb)[..., None]
        cv2.max(out, 0, dst=out)                 # convertScaleAbs would mirror negatives
        return cv2.convertScaleAbs(out)          # saturating round to uint8


def lab_statistics(rgb):
    """(mean, std) per channel of OpenCV's 8-bit CIE L*a*b* over the pixels of an RGB uint8 image
    (any shape ending in 3): how far apart colours look."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb.reshape(-1, 1, 3)), cv2.COLOR_RGB2LAB).reshape(-1, 3)
    return lab.mean(0), lab.std(0)


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
    """The statistics of an RGB uint8 image (or stack of patches) the method transfers. An image
    with under MIN_STAINED_FRACTION of stained pixels is refused: background has no stain to
    measure, and a fit to it would bleach every patch."""
    fraction = stained_fraction(rgb)
    if fraction < MIN_STAINED_FRACTION:
        raise ValueError(f'only {fraction:.1%} of its pixels are stained tissue (at least {MIN_STAINED_FRACTION:.0%} '
                         f'needed): it shows background, not tissue')
    return reinhard_statistics(rgb) if method == 'reinhard' else macenko_stains(rgb)


def transform(method, source, target):
    """A callable RGB uint8 patch -> normalised RGB uint8 patch, from fit() of source and target."""
    return ReinhardTransform(source, target) if method == 'reinhard' else MacenkoTransform(source, target)


def representative_patch(patches):
    """The patch (of a stack [N, H, W, 3]) whose LAB mean is nearest the median of all the
    patches' LAB means: a typical colour, not an outlier, as a default target."""
    means = np.array([lab_statistics(p)[0] for p in patches])
    return patches[int(np.argmin(np.linalg.norm(means - np.median(means, 0), axis=1)))]
