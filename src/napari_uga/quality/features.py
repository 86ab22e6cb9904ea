"""QC features of one image: agreement of the MC-dropout x TTA samples, uncertainty, shape, stain, texture.

:func:`image_features` turns the samples of one image into a row of numbers; :func:`compute_features`
runs the network first; :func:`image_patches` cuts an image into the patches the dock checks.
"""

from __future__ import annotations

import numpy as np

from ..io import Pair, tissue_mask
from ..selection import Box
from ..uncertainty import UncertaintyMaps

QC_SAMPLES = 8  # MC-dropout samples per TTA view
QC_TTA = "flips"
QC_FEATURES_VERSION = 6  # 2: feature_distance; 3-4: stain inside the prediction; 5-6: texture. Caches key on it
QC_TILE = 512  # working-scale tile: small images go through the net in one piece
BAND_RADIUS = 3  # px, half-width of the boundary band around the predicted contour
TEXTURE_PREFIX = "lbp_"  # the texture features (:func:`_texture`)
SCALE_PREFIX = "gate_dog_"  # the gate's scale signature (:func:`scale_signature`); no QC estimator reads it
SCALE_SIGMAS = (1, 2, 4, 8)  # px, difference-of-Gaussians bands of the haematoxylin density


def _pairwise_dice(binary: np.ndarray) -> tuple[float, float]:
    """Mean Dice over all sample pairs and mean Dice of each sample against the consensus."""
    flat = binary.reshape(binary.shape[0], -1).astype(np.float32)
    sizes = flat.sum(1)
    inter = flat @ flat.T
    denom = sizes[:, None] + sizes[None, :]
    pair = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
    iu = np.triu_indices(len(sizes), 1)
    consensus = (flat.mean(0) >= 0.5).astype(np.float32)
    c_size = consensus.sum()
    c_inter = flat @ consensus
    c_denom = sizes + c_size
    cons = np.where(c_denom > 0, 2 * c_inter / np.maximum(c_denom, 1), 1.0)
    return float(pair[iu].mean()) if len(iu[0]) else 1.0, float(cons.mean())


def _region_mean(values: np.ndarray, region: np.ndarray) -> float:
    return float(values[region].mean()) if region.any() else 0.0


def _shape_stats(pred: np.ndarray, band: np.ndarray) -> dict[str, float]:
    from scipy import ndimage

    area = int(pred.sum())
    labels, n = ndimage.label(pred)
    largest = int(np.bincount(labels.ravel())[1:].max()) if n else 0
    return {
        "n_components": float(n),
        "largest_fraction": largest / area if area else 1.0,
        "boundary_ratio": float(band.sum()) / max(area, 1),
    }


def _appearance(image: np.ndarray) -> dict[str, float]:
    """Colour statistics of the tissue (out-of-distribution cues; no ground truth involved)."""
    from skimage.color import rgb2hed, rgb2hsv

    small = np.asarray(image[::2, ::2, :3])
    tissue = tissue_mask(small)
    hsv = rgb2hsv(small)
    hed = rgb2hed(small)
    region = tissue if tissue.any() else np.ones(tissue.shape, bool)
    return {
        "tissue_fraction": float(tissue.mean()),
        "saturation": float(hsv[..., 1][region].mean()),
        "value": float(hsv[..., 2][region].mean()),
        "hematoxylin": float(hed[..., 0][region].mean()),
        "eosin": float(hed[..., 1][region].mean()),
    }


LBP_RADII = (1, 3)  # px; 8 neighbours, rotation-invariant uniform patterns: 10 histogram bins each


def _texture(image: np.ndarray) -> dict[str, float]:
    """Local-binary-pattern histograms of the grey level and of the haematoxylin channel.

    Texture tells carcinoma from normal mucosa, stroma or lymphocytes where the network's own
    outputs cannot (an empty prediction scores Dice 1 or 0 depending only on whether tumour is
    there): it is what the ``presence`` method's tumour classifier reads (docs/qc.md).
    """
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import local_binary_pattern

    rgb = np.asarray(image)[..., :3]
    hematoxylin = rgb2hed(rgb)[..., 0]
    low, high = np.percentile(hematoxylin, [1, 99])  # robust to a few very dark or empty pixels
    levels = np.clip((hematoxylin - low) / ((high - low) or 1.0) * 31, 0, 31)
    channels = {"grey": (rgb2gray(rgb) * 255).astype(np.uint8), "hem": levels.astype(np.uint8)}
    out = {}
    for name, channel in channels.items():
        for radius in LBP_RADII:
            codes = local_binary_pattern(channel, 8, radius, "uniform").astype(int)
            histogram = np.bincount(codes.ravel(), minlength=10)[:10] / codes.size
            out.update({f"lbp_{name}_r{radius}_{b}": float(v) for b, v in enumerate(histogram)})
    return out


def scale_signature(image: np.ndarray) -> dict[str, float]:
    """How the haematoxylin density's detail splits over scales: log share of each DoG band's energy.

    Band k is G(sigma_k) - G(2 sigma_k) of the haematoxylin optical density; nuclei put their
    energy in the band matching their size in pixels, so the signature tells the magnification
    (and the nuclear size) of the pixels whatever the stain's strength. Only the exchangeability
    gate reads it (docs/qc.md).
    """
    from scipy import ndimage
    from skimage.color import rgb2hed

    hematoxylin = rgb2hed(np.asarray(image)[..., :3])[..., 0]
    energy = []
    for sigma in SCALE_SIGMAS:
        band = ndimage.gaussian_filter(hematoxylin, sigma) - ndimage.gaussian_filter(hematoxylin, 2 * sigma)
        energy.append(float(np.mean(band**2)))
    energy = np.asarray(energy) + 1e-12
    share = np.log(energy / energy.sum())
    return {f"{SCALE_PREFIX}{sigma}": float(v) for sigma, v in zip(SCALE_SIGMAS, share, strict=True)}


def _foreground_stain(image: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Haematoxylin and eosin optical density inside the predicted tumour (the tissue's when empty).

    Metastatic carcinoma is cellular (much haematoxylin); fibrous stroma called tumour is eosin-rich
    with few nuclei, a confident error that sample agreement cannot see.
    """
    from skimage.color import rgb2hed

    rgb = np.asarray(image)[..., :3]
    region = pred if pred.any() else tissue_mask(rgb)
    region = region if region.any() else np.ones(pred.shape, bool)
    hed = rgb2hed(rgb[region][None])[0]
    hematoxylin, eosin = float(hed[:, 0].mean()), float(hed[:, 1].mean())
    share = hematoxylin / (abs(hematoxylin) + abs(eosin) + 1e-6)  # bounded in [-1, 1], unlike a ratio
    return {"fg_hematoxylin": hematoxylin, "fg_eosin": eosin, "fg_hematoxylin_share": share}


def _view_agreement(binary: np.ndarray, samples: int) -> tuple[float, float]:
    """Within-view MC agreement (mean pairwise Dice) and agreement between the TTA views' consensus masks."""
    if samples < 1 or len(binary) % samples:
        return _pairwise_dice(binary)[0], 1.0
    views = binary.reshape(len(binary) // samples, samples, *binary.shape[1:])
    mc = float(np.mean([_pairwise_dice(v)[0] for v in views]))
    view_masks = views.astype(np.float32).mean(1) >= 0.5
    return mc, _pairwise_dice(view_masks)[0]


def image_features(maps: UncertaintyMaps, image: np.ndarray, samples: int = QC_SAMPLES) -> dict[str, float]:
    """QC features of one image or patch from its uncertainty maps and pixels.

    Parameters
    ----------
    maps : from ``compute_uncertainty(..., samples=samples, keep_samples=True, output_scale="source")``;
        the kept samples are ordered view by view (TTA transform, ensemble member), ``samples`` MC draws each.
    image : the H x W x 3 image the maps were computed on.
    samples : MC-dropout samples per view, to separate MC agreement from TTA agreement.

    Returns
    -------
    dict of float features (names are stable; see the module docstring).
    """
    from scipy import ndimage

    if maps.samples is None:
        raise ValueError("image_features needs the per-sample maps: compute_uncertainty(..., keep_samples=True)")
    prob = maps.probability
    pred = prob >= 0.5
    binary = maps.samples.astype(np.float32) >= 0.5
    pairwise, consensus = _pairwise_dice(binary)
    mc_dice, tta_dice = _view_agreement(binary, samples)
    areas = binary.reshape(binary.shape[0], -1).mean(1)
    band = ndimage.binary_dilation(pred, iterations=BAND_RADIUS) & ~ndimage.binary_erosion(
        pred, iterations=BAND_RADIUS, border_value=1
    )
    region = pred | band
    smooth = 0.005 * prob.size
    soft = (2 * float((prob * pred).sum()) + smooth) / (float(prob.sum()) + float(pred.sum()) + smooth)
    area = float(pred.mean())
    return {
        "area": area,
        "empty": float(pred.sum() == 0),
        "prob_fg": _region_mean(prob, pred),
        "prob_max": float(np.percentile(prob, 99.9)),
        "uncertain_fraction": float(((prob > 0.1) & (prob < 0.9)).mean()),
        "uncertain_over_fg": float(((prob > 0.1) & (prob < 0.9)).sum()) / (float(pred.sum()) + smooth),
        "soft_dice": soft,
        "pairwise_dice": pairwise,
        "consensus_dice": consensus,
        "mc_pairwise_dice": mc_dice,
        "tta_dice": tta_dice,
        "area_std": float(areas.std()),
        "area_cv": float(areas.std() / areas.mean()) if areas.mean() > 0 else 0.0,
        "entropy_mean": float(maps.entropy.mean()),
        "entropy_region": _region_mean(maps.entropy, region),
        "entropy_band": _region_mean(maps.entropy, band),
        "mi_mean": float(maps.mutual_information.mean()),
        "mi_region": _region_mean(maps.mutual_information, region),
        "mi_band": _region_mean(maps.mutual_information, band),
        "variance_mean": float(maps.variance.mean()),
        **_shape_stats(pred, band),
        **_appearance(image),
        **_foreground_stain(image, pred),
        **_texture(image),
    }


def compute_features(
    model, image: np.ndarray, factor: float, samples: int = QC_SAMPLES, tta: str = QC_TTA
) -> tuple[dict[str, float], np.ndarray]:
    """Run the network (MC dropout x TTA) on one image; return its QC features and prediction.

    The features are :func:`model_features`.

    The dropout masks are drawn from a fixed seed (without touching the global RNG), so QC is reproducible.
    """
    import torch

    from ..uncertainty import compute_uncertainty

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        maps = compute_uncertainty(
            model, image, samples=samples, tta=tta, factor=factor, tile=QC_TILE, keep_samples=True
        )
    return model_features(model, maps, image, samples, factor), maps.prediction


def model_features(model, maps: UncertaintyMaps, image: np.ndarray, samples: int, factor: float) -> dict[str, float]:
    """:func:`image_features`, the network's ``feature_distance`` and the gate's :func:`scale_signature`.

    This is the full QC row of one image or slide cell.
    """
    from ..ood import feature_distance

    return {
        **image_features(maps, image, samples),
        "feature_distance": feature_distance(model, image, factor),
        **scale_signature(image),
    }


def _starts(length: int, size: int) -> list[int]:
    if length <= size:
        return [0]
    return [*range(0, length - size, size), length - size]


def image_patches(name: str, image, size: int = 512, min_tissue: float = 0.2) -> list[tuple[Box, Pair]]:
    """Patches of ``size`` px tiling an image (the last row/column shifted inside) that hold tissue.

    ``image`` may be lazily sliced (zarr / dask); patches with less than ``min_tissue`` tissue
    (:func:`~napari_uga.io.tissue_mask`) are skipped. Each patch is named ``name y=.. x=..``.
    """
    height, width = image.shape[:2]
    out = []
    for y in _starts(height, size):
        for x in _starts(width, size):
            h, w = min(size, height - y), min(size, width - x)
            patch = np.ascontiguousarray(np.asarray(image[y : y + h, x : x + w])[..., :3])
            if tissue_mask(patch[::4, ::4]).mean() >= min_tissue:
                out.append((Box(name, y, x, h, w), Pair(f"{name} y={y} x={x}", patch)))
    return out
