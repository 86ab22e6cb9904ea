"""Quality control without delineation: predict each image's Dice and decide Dice > threshold.

Pipeline (one call: :func:`run_qc`):

1. :func:`image_features` turns the MC-dropout x TTA samples of one image into a row of
   numbers: uncertainty aggregates (entropy / mutual information over the predicted
   foreground and its boundary band), agreement between samples (pairwise Dice, each sample
   against the consensus), soft-Dice confidence, spread of the predicted area, shape,
   appearance and texture statistics.
2. A :class:`QCModel` maps a row to a predicted Dice. ``method`` picks one feature (monotone
   isotonic calibration to Dice), a random-forest regressor over all features (the median of
   its trees: per-image Dice is bimodal), or ``presence`` (:class:`PresenceModel`: P(tumour)
   times the segmentation's overlap where there is tumour); ``auto`` keeps the clearly better
   learned one, or their mean (``blend``) when neither is.
   It is fitted on labelled calibration images; out-of-fold (cross-fitted) predictions are used
   for the acceptance rule, never in-sample ones.
3. The acceptance rule, ``rule="ltt"`` (:func:`conformal_cut`): a Learn-then-Test fixed-sequence
   binomial test, the lowest cut on predicted Dice such that, with probability >= 1 - delta, the
   accepted images have Dice > threshold with precision >= 1 - alpha. Or ``rule="fdr"``
   (:func:`conformal_selection`): conformal selection, whose accepted set has an expected share
   of failures (false discovery rate, an empty selection counting as none) <= alpha; it needs far
   fewer calibration images.

Models are stored as JSON (the calibration rows and settings); the regressor is refitted
deterministically at load time, so nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .io import InputError, Pair, atomic_write_json, tissue_mask
from .metrics import dice
from .selection import Box
from .uncertainty import UncertaintyMaps

QC_SAMPLES = 8  # MC-dropout samples per TTA view
QC_TTA = "flips"
QC_FEATURES_VERSION = 6  # 2: feature_distance; 3-4: stain inside the prediction; 5-6: texture. Caches key on it
QC_TILE = 512  # working-scale tile: small images go through the net in one piece
BAND_RADIUS = 3  # px, half-width of the boundary band around the predicted contour
# what the learned methods predict; an older file (other or no "estimate") is rescored when loaded
ESTIMATES = {
    "regressor": "tree_median",  # before: the forest mean
    "presence": "texture_presence",  # before: P(tumour) from every feature, not the texture alone
    "blend": "tree_median+texture_presence",
}
TEXTURE_PREFIX = "lbp_"  # the texture features (:func:`_texture`)
DEFAULT_METHOD = "auto"  # forest, presence model or their mean, by the calibration images (_select_method)
RULES = ("ltt", "fdr")  # precision >= 1 - alpha w.p. >= 1 - delta; or false discovery rate <= alpha
DEFAULT_RULE = "ltt"
DEFAULT_QC_FILE = Path(__file__).parent / "weights" / "qc_calibration.json"

# Single-feature methods: feature name and whether larger values mean a better segmentation.
SCORE_METHODS: dict[str, tuple[str, bool]] = {
    "pairwise_dice": ("pairwise_dice", True),
    "consensus_dice": ("consensus_dice", True),
    "mc_pairwise_dice": ("mc_pairwise_dice", True),
    "tta_dice": ("tta_dice", True),
    "soft_dice": ("soft_dice", True),
    "entropy": ("entropy_region", False),
    "mutual_information": ("mi_region", False),
    "area_cv": ("area_cv", False),
    "feature_distance": ("feature_distance", False),
}
METHODS = ("auto", *SCORE_METHODS, "regressor", "linear", "presence", "blend")
PRESENCE_METHODS = ("presence", "blend")  # need the calibration images' tumour flags (from their masks)


# ----------------------------------------------------------------------------- features


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

    from .uncertainty import compute_uncertainty

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        maps = compute_uncertainty(
            model, image, samples=samples, tta=tta, factor=factor, tile=QC_TILE, keep_samples=True
        )
    return model_features(model, maps, image, samples, factor), maps.prediction


def model_features(model, maps: UncertaintyMaps, image: np.ndarray, samples: int, factor: float) -> dict[str, float]:
    """:func:`image_features` plus the network's ``feature_distance`` (the full QC row of one image or block)."""
    from .ood import feature_distance

    return {**image_features(maps, image, samples), "feature_distance": feature_distance(model, image, factor)}


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


# ----------------------------------------------------------------------------- metrics


def rc_curve(confidence: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve: coverages (1 -> 0) and selective risks, dropping the least confident first.

    Tied confidences are dropped together; the last point repeats the risk at coverage 0.
    """
    confidence = np.asarray(confidence, float)
    risk = np.asarray(risk, float)
    n = len(risk)
    order = np.argsort(-confidence, kind="stable")
    conf_sorted, risk_sorted = confidence[order], risk[order]
    cum = np.cumsum(risk_sorted)
    # a curve point after each full group of tied confidences (kept = the k most confident)
    ends = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True]) + 1
    coverages = ends / n
    risks = cum[ends - 1] / ends
    return np.r_[coverages[::-1], 0.0], np.r_[risks[::-1], risks[0]]


def aurc(confidence: np.ndarray, risk: np.ndarray) -> float:
    """Area under the risk-coverage curve (trapezoids), as in the MIC-DKFZ failure-detection benchmark."""
    cov, risks = rc_curve(confidence, risk)
    return float(np.sum((risks[:-1] + risks[1:]) / 2 * (cov[:-1] - cov[1:])))


def naurc(dice_pred: np.ndarray, dice_true: np.ndarray) -> float | None:
    """Normalised AURC: 1 = oracle ordering, 0 = random; ``None`` when every image has the same risk."""
    risk = 1 - np.asarray(dice_true, float)
    optimal, random = aurc(-risk, risk), float(risk.mean())
    if random - optimal <= 1e-12:
        return None
    return (random - aurc(np.asarray(dice_pred, float), risk)) / (random - optimal)


def qc_metrics(
    dice_pred: np.ndarray, dice_true: np.ndarray, accepted: np.ndarray, threshold: float = 0.8
) -> dict[str, float | None]:
    """Failure-detection metrics of predicted vs true Dice (risk = 1 - Dice; ``None`` where undefined).

    ``auroc``: separating Dice > threshold from the rest by predicted Dice. ``aurc``, ``eaurc``
    (minus the oracle's AURC) and ``naurc`` (1 = oracle ordering, 0 = random) follow Zenk et al.
    ``mae``, ``spearman`` (predicted vs true Dice), ``accepted_precision`` (share of accepted
    images with Dice > threshold) and ``coverage`` (share accepted).
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    pred = np.asarray(dice_pred, float)
    true = np.asarray(dice_true, float)
    accepted = np.asarray(accepted, bool)
    risk = 1 - true
    good = true > threshold
    value = aurc(pred, risk)
    optimal = aurc(-risk, risk)
    spread = np.ptp(pred) > 0 and np.ptp(true) > 0
    out = {
        "auroc": float(roc_auc_score(good, pred)) if 0 < good.sum() < len(good) else None,
        "aurc": value,
        "eaurc": value - optimal,
        "naurc": naurc(pred, true),
        "mae": float(np.abs(pred - true).mean()),
        "spearman": float(spearmanr(pred, true).statistic) if spread else None,
        "accepted_precision": float(good[accepted].mean()) if accepted.any() else None,
        "coverage": float(accepted.mean()),
    }
    return {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in out.items()}


# ----------------------------------------------------------------------------- conformal decision


def conformal_cut(
    scores: np.ndarray, dice_true: np.ndarray, threshold: float = 0.8, alpha: float = 0.1, delta: float = 0.1
) -> float:
    """Lowest cut on predicted Dice with precision >= 1 - alpha w.p. >= 1 - delta (Learn-then-Test).

    Candidate cuts are the calibration scores from high to low (fixed-sequence testing). For a
    cut with n accepted images, k of them with Dice <= threshold, the null "failure rate > alpha"
    is rejected when the binomial (Clopper-Pearson) p-value P[Bin(n, alpha) <= k] <= delta.
    Cuts accepting too few images to ever reject are skipped; the sequence stops at the first
    cut that is not rejected. Returns ``inf`` (accept nothing) when no cut passes.
    """
    from scipy.stats import binom

    if not (0 < alpha < 1 and 0 < delta < 1):
        raise InputError(f"alpha and delta must lie in (0, 1), got alpha={alpha}, delta={delta}")
    scores = np.asarray(scores, float)
    fail = np.asarray(dice_true, float) <= threshold
    n_min = math.ceil(math.log(delta) / math.log(1 - alpha))  # fewest images for which k = 0 rejects
    cut = math.inf
    for candidate in np.unique(scores)[::-1]:
        accepted = scores >= candidate
        n = int(accepted.sum())
        if n < n_min:
            continue
        if binom.cdf(int(fail[accepted].sum()), n, alpha) > delta:
            break
        cut = float(candidate)
    return cut


def min_accepted(alpha: float, delta: float) -> int:
    """Fewest accepted calibration images (all good) with which Learn-then-Test can accept anything."""
    return math.ceil(math.log(delta) / math.log(1 - alpha))


def conformal_selection(
    cal_scores: np.ndarray, cal_dice: np.ndarray, scores: np.ndarray, threshold: float = 0.8, alpha: float = 0.1
) -> np.ndarray:
    """Accept test images by conformal selection (Jin & Candes, JMLR 2023): FDR <= alpha.

    Each test image gets the conformal p-value of "this segmentation fails" (Dice <= threshold):
    p = (1 + #calibration failures scored at least as high) / (n + 1); Benjamini-Hochberg at level
    ``alpha`` over the test images then accepts a set whose expected share of failures (an empty
    selection counting as none) is at most ``alpha`` for exchangeable calibration and test images
    (ties counted against acceptance, so it is conservative). With no failure above it, one image
    alone passes once n >= 1/alpha - 1.
    """
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")
    cal_scores = np.asarray(cal_scores, float)
    failed = np.asarray(cal_dice, float) <= threshold
    scores = np.asarray(scores, float)
    if not len(scores):
        return np.zeros(0, bool)
    above = (cal_scores[failed][None, :] >= scores[:, None]).sum(1)
    p_values = (1 + above) / (len(cal_scores) + 1)
    ranked = np.sort(p_values)
    passing = np.flatnonzero(ranked <= alpha * np.arange(1, len(ranked) + 1) / len(ranked) + 1e-12)
    return p_values <= ranked[passing[-1]] if len(passing) else np.zeros(len(scores), bool)


# ----------------------------------------------------------------------------- estimators


def _matrix(rows: Sequence[dict[str, float]], names: Sequence[str]) -> np.ndarray:
    try:
        return np.array([[float(r[name]) for name in names] for r in rows], dtype=float).reshape(len(rows), len(names))
    except KeyError as exc:
        raise InputError(f"QC features: missing feature {exc} (features from another version?)") from None


def _estimator(method: str, seed: int = 0):
    """An unfitted scikit-learn regressor for a method (predicts Dice in [0, 1])."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if method in SCORE_METHODS:
        return IsotonicRegression(y_min=0.0, y_max=1.0, increasing=SCORE_METHODS[method][1], out_of_bounds="clip")
    if method == "regressor":
        return RandomForestRegressor(
            n_estimators=200, min_samples_leaf=3, max_features=0.5, random_state=seed, n_jobs=1
        )
    if method == "linear":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 3, 12)))
    raise InputError(f"unknown QC method {method!r}; choose one of {', '.join(METHODS)}")


def _feature_names(method: str, rows: Sequence[dict[str, float]]) -> list[str]:
    if method in SCORE_METHODS:
        return [SCORE_METHODS[method][0]]
    if method in PRESENCE_METHODS:
        if "empty" not in rows[0]:
            raise InputError(f"QC method {method!r} needs the 'empty' feature (rows from image_features)")
        return ["empty", *sorted(k for k in rows[0] if k != "empty")]  # column 0: is the prediction empty?
    return sorted(rows[0])


def _fit(
    method: str,
    x: np.ndarray,
    y: np.ndarray,
    seed: int = 0,
    tumour: np.ndarray | None = None,
    names: Sequence[str] = (),
):
    if method in PRESENCE_METHODS:
        if tumour is None or len(tumour) != len(y):
            raise InputError(f"QC method {method!r} needs one tumour flag per calibration image (from its mask)")
        learner = BlendModel(names, seed) if method == "blend" else PresenceModel(names, seed)
        return learner.fit(x, y, np.asarray(tumour, bool))
    est = _estimator(method, seed)
    return est.fit(x[:, 0] if method in SCORE_METHODS else x, y)


def _presence_classifier(x: np.ndarray, tumour: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """P(tumour in the image) from its features: L2 logistic regression on standardised features.

    The penalty is chosen by accuracy in up to 3-fold cross-validation (as many folds as the smaller
    class has images, when that is 2 or more); with one image in a class C = 1; with a single class
    the probability is that class's share (0 or 1).
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    minority = int(min(tumour.sum(), (~tumour).sum()))
    if minority == 0:
        constant = float(tumour.mean())
        return lambda rows: np.full(len(rows), constant)
    learner = (
        LogisticRegressionCV(Cs=10, cv=min(3, minority), scoring="accuracy", max_iter=3000)
        if minority >= 2
        else LogisticRegression(max_iter=3000)
    )
    # scoring is explicit (scikit-learn 1.11 changes its default), so a model refitted from its JSON keeps
    # its penalty; the other announced changes (l1_ratios, fitted attributes) do not alter an L2 fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fitted = make_pipeline(StandardScaler(), learner).fit(x, tumour)
    return lambda rows: fitted.predict_proba(rows)[:, 1]


class PresenceModel:
    """Predicted Dice in two stages: is there tumour, and how good is the segmentation where there is.

    Per-image Dice splits by two facts: an empty prediction scores 1 when the image holds no
    tumour and 0 when it does; a non-empty prediction scores 0 without tumour and its overlap
    with the tumour otherwise. ``presence`` models P(tumour) (:func:`_presence_classifier`) from
    the tissue's texture alone (the columns whose ``names`` start with ``lbp_``: whether there is
    tumour is a property of the tissue, and the network's own features add noise where it fails
    silently) and, on the calibration images with tumour and a prediction, that overlap (the
    forest on every feature, its trees' median). Like the forest it predicts the more likely
    outcome, nudged (0.1 %) by the expected Dice so that images keep an order. Column 0 of the
    features is the ``empty`` flag.
    """

    def __init__(self, names: Sequence[str] = (), seed: int = 0) -> None:
        self.names = list(names)
        self.seed = seed

    def fit(self, x: np.ndarray, dice_true: np.ndarray, tumour: np.ndarray) -> PresenceModel:
        texture = [i for i, name in enumerate(self.names) if name.startswith(TEXTURE_PREFIX)]
        self.columns = texture or list(range(x.shape[1]))  # rows without texture features: all of them
        classifier = _presence_classifier(x[:, self.columns], tumour)
        self.presence = lambda rows: classifier(rows[:, self.columns])
        segmented = tumour & (x[:, 0] < 0.5)
        self.forest = _fit("regressor", x[segmented], dice_true[segmented], self.seed) if segmented.sum() >= 2 else None
        self.overlap = float(dice_true[segmented].mean()) if segmented.any() else 0.5
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        empty = x[:, 0] >= 0.5
        p = self.presence(x)
        overlap = (
            np.full(len(x), self.overlap) if self.forest is None else np.clip(_forest_median(self.forest, x), 0, 1)
        )
        expected = np.where(empty, 1 - p, p * overlap)
        likely = np.where(empty, (p < 0.5).astype(float), np.where(p >= 0.5, overlap, 0.0))
        return likely * (1 - 1e-3) + 1e-3 * expected


class BlendModel:
    """The mean of the forest's (``regressor``) and the :class:`PresenceModel`'s predicted Dice.

    ``auto`` uses it when neither beats the other clearly on the calibration images
    (:func:`_select_method`). Both are fitted exactly as on their own (the forest on its own
    column order), so its out-of-fold scores are the mean of theirs.
    """

    def __init__(self, names: Sequence[str] = (), seed: int = 0) -> None:
        self.names = list(names)
        self.presence = PresenceModel(names, seed)
        self.seed = seed

    def fit(self, x: np.ndarray, dice_true: np.ndarray, tumour: np.ndarray) -> BlendModel:
        # the forest's own (sorted) column order; without names the given one
        self.forest_columns = list(np.argsort(self.names)) if self.names else list(range(x.shape[1]))
        self.forest = _fit("regressor", x[:, self.forest_columns], dice_true, self.seed)
        self.presence.fit(x, dice_true, tumour)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        forest = _predict("regressor", self.forest, x[:, self.forest_columns])
        return (forest + _predict("presence", self.presence, x)) / 2


def _forest_median(forest, x: np.ndarray) -> np.ndarray:
    """The median of the trees' predicted Dice, nudged by their mean (0.1 %) so that ties keep an order.

    Per-image Dice is bimodal (a tumour-free tile scores 1 or 0), and the median is the
    estimate that minimises absolute error; the forest mean sits between the modes. On UMCU it
    lowered the MAE from 0.23 to 0.17 (``docs/qc.md``).
    """
    trees = np.stack([tree.predict(x) for tree in forest.estimators_])
    return np.median(trees, axis=0) * (1 - 1e-3) + 1e-3 * trees.mean(axis=0)


def _predict(method: str, est, x: np.ndarray) -> np.ndarray:
    if method in PRESENCE_METHODS:
        return np.clip(est.predict(x), 0.0, 1.0)
    if method == "regressor":
        return np.clip(_forest_median(est, x), 0.0, 1.0)
    if method not in SCORE_METHODS:
        return np.clip(est.predict(x), 0.0, 1.0)
    score = x[:, 0]
    # isotonic steps tie many images; a vanishing slope keeps the score's own order inside a step
    tie_break = 1e-6 * np.tanh(score if SCORE_METHODS[method][1] else -score)
    return np.clip(est.predict(score) + tie_break, 0.0, 1.0)


def cross_fit(
    method: str,
    x: np.ndarray,
    y: np.ndarray,
    groups: Sequence | None = None,
    folds: int = 5,
    seed: int = 0,
    tumour: np.ndarray | None = None,
    names: Sequence[str] = (),
) -> np.ndarray:
    """Out-of-fold predicted Dice: each image predicted by a model that never saw it (or its group).

    ``names``: the columns' feature names (``presence`` reads the texture ones).
    """
    from sklearn.model_selection import GroupKFold

    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    k = min(folds, len(np.unique(groups)))
    if k < 2:
        raise InputError("QC calibration needs at least 2 labelled images (or groups)")
    oof = np.empty(len(y))
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, groups):
        flags = None if tumour is None else np.asarray(tumour, bool)[train]
        oof[test] = _predict(method, _fit(method, x[train], y[train], seed, flags, names), x[test])
    return oof


# ----------------------------------------------------------------------------- the QC model


_FITTED: dict[str, object] = {}


def _fit_cached(
    method: str,
    names: list[str],
    rows: Sequence[dict[str, float]],
    dice_true: Sequence[float],
    tumour: Sequence[bool] = (),
):
    """Fit (deterministically) once per distinct calibration; Dask tasks rebuild models from JSON per image."""
    import hashlib

    key = hashlib.sha1(
        json.dumps(
            [method, names, rows, list(dice_true), [bool(t) for t in tumour]], sort_keys=True, default=float
        ).encode()
    ).hexdigest()
    if key not in _FITTED:
        if len(_FITTED) >= 8:
            _FITTED.pop(next(iter(_FITTED)))
        flags = np.asarray(tumour, bool) if len(tumour) else None
        _FITTED[key] = _fit(method, _matrix(rows, names), np.asarray(dice_true, float), tumour=flags, names=names)
    return _FITTED[key]


@dataclass
class QCModel:
    """A fitted quality model: predicted Dice per image and the conformal acceptance rule.

    ``rule`` ``ltt`` accepts predicted Dice >= ``cut``; ``fdr`` accepts by conformal selection
    against ``oof`` (the calibration images' out-of-fold predicted Dice). The JSON form keeps the
    calibration rows and true Dice; the estimator is refitted from them (deterministically) when loading.
    """

    method: str
    features: list[str]
    rows: list[dict[str, float]]
    dice_true: list[float]
    cut: float
    threshold: float = 0.8
    alpha: float = 0.1
    delta: float = 0.1
    samples: int = QC_SAMPLES
    tta: str = QC_TTA
    info: dict = field(default_factory=dict)
    rule: str = DEFAULT_RULE
    oof: list[float] = field(default_factory=list)
    tumour: list[bool] = field(default_factory=list)  # calibration images holding tumour (``presence`` needs them)
    estimator: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.estimator is None:
            self.estimator = _fit_cached(self.method, self.features, self.rows, self.dice_true, self.tumour)

    def predict(self, rows: Sequence[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted Dice and acceptance (by :attr:`rule`) for feature rows, judged together."""
        if not rows:
            return np.zeros(0), np.zeros(0, bool)
        pred = _predict(self.method, self.estimator, _matrix(rows, self.features))
        if self.rule == "fdr":
            return pred, conformal_selection(self.oof, self.dice_true, pred, self.threshold, self.alpha)
        return pred, pred >= self.cut

    def to_dict(self) -> dict:
        """JSON-serialisable form (``cut`` is ``null`` when nothing is accepted)."""
        return {
            "format": "napari-uga-qc/1",
            "method": self.method,
            "features": list(self.features),
            "threshold": self.threshold,
            "alpha": self.alpha,
            "delta": self.delta,
            "cut": None if math.isinf(self.cut) else self.cut,
            "samples": self.samples,
            "tta": self.tta,
            "info": self.info,
            "rule": self.rule,
            "oof": [float(v) for v in self.oof],
            "rows": [{k: float(v) for k, v in r.items()} for r in self.rows],
            "dice_true": [float(d) for d in self.dice_true],
            "tumour": [bool(t) for t in self.tumour],
            "estimate": ESTIMATES.get(self.method),
        }

    @classmethod
    def from_dict(cls, d: dict) -> QCModel:
        """Rebuild (and refit) a model from :meth:`to_dict` output."""
        try:
            if d.get("format") != "napari-uga-qc/1":
                raise KeyError("format")
            model = cls(
                method=d["method"],
                features=list(d["features"]),
                rows=[dict(r) for r in d["rows"]],
                dice_true=[float(x) for x in d["dice_true"]],
                cut=math.inf if d["cut"] is None else float(d["cut"]),
                threshold=float(d["threshold"]),
                alpha=float(d["alpha"]),
                delta=float(d["delta"]),
                samples=int(d["samples"]),
                tta=str(d["tta"]),
                info=dict(d.get("info", {})),
                rule=_checked_rule(d.get("rule", "ltt")),
                oof=[float(x) for x in d.get("oof", [])],
                tumour=_checked_flags(d.get("tumour", []), d["method"], len(d["dice_true"])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a napari-uga QC model ({exc})") from None
        if model.method in PRESENCE_METHODS and model.features[:1] != ["empty"]:
            raise InputError(f"not a napari-uga QC model (method {model.method} needs 'empty' as its first feature)")
        if model.rule == "fdr" and len(model.oof) != len(model.dice_true):
            raise InputError("not a napari-uga QC model (rule fdr needs one out-of-fold score per calibration image)")
        if model.method in ESTIMATES and d.get("estimate") != ESTIMATES[model.method]:
            return _rescored(model)
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as JSON (atomically)."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QCModel:
        """Read a model written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such QC model file")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a JSON QC model ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: not a napari-uga QC model")
        return cls.from_dict(data)


def _rescored(qc: QCModel) -> QCModel:
    """An older file of a learned method (:data:`ESTIMATES`), rescored with today's estimate of that method.

    Its calibration rows are kept; the patient groups of the original cross-fitting are not stored,
    so the new out-of-fold scores come from plain 5-fold cross-fitting.
    """
    info = {**qc.info, "rescored": f"cut and out-of-fold scores recomputed for today's {qc.method} (older file)"}
    return _refit(qc, qc.alpha, qc.delta, qc.threshold, qc.method, qc.rule, info)


def _refit(qc: QCModel, alpha: float, delta: float, threshold: float, method: str, rule: str, info: dict) -> QCModel:
    """A fresh fit on a model's stored calibration rows, true Dice and tumour flags."""
    return fit_qc_model(
        qc.rows,
        qc.dice_true,
        alpha,
        delta,
        threshold,
        method,
        samples=qc.samples,
        tta=qc.tta,
        info=info,
        rule=rule,
        tumour=qc.tumour or None,
    )


def _checked_flags(tumour, method: str, n: int) -> list[bool]:
    """Tumour flags of a model file: booleans, one per calibration image where the method needs them."""
    if not isinstance(tumour, list) or not all(isinstance(t, bool) for t in tumour):
        raise TypeError("tumour must be a list of true/false")
    if method in PRESENCE_METHODS and len(tumour) != n:
        raise ValueError(f"method {method} needs one tumour flag per calibration image")
    return tumour


def _checked_rule(rule: str) -> str:
    if rule not in RULES:
        raise InputError(f"unknown acceptance rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def fit_qc_model(
    rows: Sequence[dict[str, float]],
    dice_true: Sequence[float],
    alpha: float = 0.1,
    delta: float = 0.1,
    threshold: float = 0.8,
    method: str = DEFAULT_METHOD,
    groups: Sequence | None = None,
    samples: int = QC_SAMPLES,
    tta: str = QC_TTA,
    info: dict | None = None,
    rule: str = DEFAULT_RULE,
    tumour: Sequence[bool] | None = None,
) -> QCModel:
    """Fit a QC model on labelled calibration rows; the cut comes from out-of-fold predictions.

    Parameters
    ----------
    rows, dice_true : features (:func:`image_features`) and true Dice of calibration images.
    alpha, delta : accepted images have Dice > ``threshold`` with precision >= 1 - alpha, w.p. >= 1 - delta.
    method : a single-feature method (``SCORE_METHODS``), ``regressor`` (random forest), ``linear``
        (ridge), ``presence`` (:class:`PresenceModel`), ``blend`` (their mean, :class:`BlendModel`), or
        ``auto``: one of the forest and ``presence`` when its out-of-fold normalised AURC is better by
        more than a standard error, else ``blend`` (:func:`_select_method`; ``presence`` and ``blend``
        only when ``tumour`` is given).
    groups : e.g. patient ids, so cross-fitting never predicts an image from its own group.
    rule : ``ltt`` (the cut above) or ``fdr`` (conformal selection against the out-of-fold scores).
    tumour : whether each calibration image holds tumour (its mask is not empty).
    """
    _checked_rule(rule)
    if method not in METHODS:
        raise InputError(f"unknown QC method {method!r}; choose one of {', '.join(METHODS)}")
    if len(rows) != len(dice_true) or len(rows) < 2:
        raise InputError("QC calibration needs at least 2 labelled images, one Dice per feature row")
    y = np.asarray(dice_true, float)
    flags = None if tumour is None else np.asarray(tumour, bool)
    if flags is not None and len(flags) != len(y):
        raise InputError("QC calibration: one tumour flag per image")
    info = dict(info or {})
    if method == "auto":
        method, oof, choice = _select_method(rows, y, groups, flags)
        info["auto"] = {"selected": method, **choice}
    else:
        oof = _cross_fit_rows(method, rows, y, groups, flags)
    cut = conformal_cut(oof, y, threshold, alpha, delta)
    return QCModel(
        method,
        _feature_names(method, rows),
        [dict(r) for r in rows],
        y.tolist(),
        cut,
        threshold,
        alpha,
        delta,
        samples,
        tta,
        info,
        rule,
        oof.tolist(),
        [] if flags is None else flags.tolist(),
    )


def _cross_fit_rows(
    method: str, rows: Sequence[dict[str, float]], y: np.ndarray, groups: Sequence | None, tumour: np.ndarray | None
) -> np.ndarray:
    """:func:`cross_fit` on feature rows, in the method's columns."""
    names = _feature_names(method, rows)
    return cross_fit(method, _matrix(rows, names), y, groups, tumour=tumour, names=names)


def _score(dice_pred: np.ndarray, dice_true: np.ndarray) -> float:
    """:func:`naurc`, 0 (no better than random) where it is undefined."""
    value = naurc(dice_pred, dice_true)
    return 0.0 if value is None else value


def _naurc_gap_se(
    first: np.ndarray, second: np.ndarray, dice_true: np.ndarray, groups: Sequence | None, resamples: int = 200
) -> float:
    """Bootstrap standard error of ``naurc(second) - naurc(first)``, resampling whole groups (paired)."""
    labels = np.arange(len(dice_true)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    members = [np.flatnonzero(labels == g) for g in range(labels.max() + 1)]
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(resamples):
        i = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if np.ptp(dice_true[i]) > 0:
            gaps.append(_score(second[i], dice_true[i]) - _score(first[i], dice_true[i]))
    return float(np.std(gaps)) if gaps else 0.0


def _select_method(
    rows: Sequence[dict[str, float]], y: np.ndarray, groups: Sequence | None, tumour: np.ndarray | None = None
) -> tuple[str, np.ndarray, dict]:
    """``auto``: the forest, the presence model, or their mean, from out-of-fold scores on the calibration images.

    The forest or the presence model is kept when its out-of-fold normalised AURC beats the other's by
    more than one bootstrap standard error of the difference (a one-standard-error rule), else
    their mean (``blend``). Picking the better one outright was noise on 16 UMCU calibration tiles:
    over 40 splits the pick did worse on the test half than either model alone (``docs/qc.md``).
    Without tumour flags: the forest. Returns the method, its out-of-fold scores and the evidence.
    """
    forest = _cross_fit_rows("regressor", rows, y, groups, None)
    if tumour is None or "empty" not in rows[0]:
        return "regressor", forest, {"out_of_fold_naurc": {"regressor": round(_score(forest, y), 6)}}
    presence = _cross_fit_rows("presence", rows, y, groups, tumour)
    oofs = {"regressor": forest, "presence": presence, "blend": (forest + presence) / 2}
    scores = {name: round(_score(oof, y), 6) for name, oof in oofs.items()}
    gap, se = scores["presence"] - scores["regressor"], _naurc_gap_se(forest, presence, y, groups)
    # no spread (e.g. two images): nothing tells the two apart
    chosen = "blend" if se == 0 or abs(gap) <= se else "presence" if gap > 0 else "regressor"
    return chosen, oofs[chosen], {"out_of_fold_naurc": scores, "naurc_gap_se": round(se, 6)}


def default_qc_model() -> QCModel:
    """The QC calibration shipped with the model (``weights/qc_calibration.json``)."""
    if not DEFAULT_QC_FILE.is_file():
        raise InputError(f"{DEFAULT_QC_FILE}: the shipped QC calibration is missing; pass calibration images")
    return QCModel.load(DEFAULT_QC_FILE)


def qc_report(
    qc: QCModel, names: Sequence[str], rows: Sequence[dict[str, float]], dice_true: Sequence[float | None]
) -> dict:
    """The ``uga qc --json`` payload: per-image predictions, settings, and metrics where masks exist."""
    pred, accepted = qc.predict(rows)
    per_image = [
        {"name": n, "dice_pred": float(p), "accepted": bool(a), "dice_true": None if t is None else float(t)}
        for n, p, a, t in zip(names, pred, accepted, dice_true, strict=True)
    ]
    labelled = [i for i, t in enumerate(dice_true) if t is not None]
    metrics = {}
    if labelled:
        truth = np.array([dice_true[i] for i in labelled], float)
        metrics = qc_metrics(pred[labelled], truth, accepted[labelled], qc.threshold)
    return {
        "per_image": per_image,
        "threshold": qc.threshold,
        "alpha": qc.alpha,
        "delta": qc.delta,
        "method": qc.method,
        "rule": qc.rule,
        "cut": None if qc.rule == "fdr" or math.isinf(qc.cut) else qc.cut,
        "note": _acceptance_note(qc, bool(accepted.any())),
        "method_reason": method_reason(qc),
        "metrics": metrics,
    }


def method_reason(qc: QCModel) -> str:
    """Why ``auto`` chose the model's method, in words ("" when it was not chosen by ``auto``)."""
    auto = qc.info.get("auto")
    if not isinstance(auto, dict) or not isinstance(auto.get("out_of_fold_naurc"), dict):
        return ""
    scores = auto["out_of_fold_naurc"]
    text = f"auto chose {qc.method}: out-of-fold normalised AURC " + ", ".join(
        f"{name} {score:.3f}" for name, score in scores.items()
    )
    if "presence" not in scores:
        return text + " (no tumour flags for the presence model)"
    se = auto.get("naurc_gap_se")
    if se is None:  # a file from before the one-standard-error rule: the better one was kept
        return text
    if qc.method == "blend":
        return text + f" (forest and presence are within one standard error, {se:.3f}, of each other)"
    return text + f" ({qc.method} is better by more than one standard error, {se:.3f})"


def _acceptance_note(qc: QCModel, any_accepted: bool) -> str:
    """Why nothing was accepted, when the calibration set is what limits it ("" otherwise)."""
    if any_accepted:
        return ""
    good = int(np.sum(np.asarray(qc.dice_true) > qc.threshold))
    if qc.rule == "ltt" and good < min_accepted(qc.alpha, qc.delta):
        return (
            f"nothing can be accepted: the calibration holds {good} images with Dice > {qc.threshold}, and "
            f"Learn-then-Test needs at least {min_accepted(qc.alpha, qc.delta)} at alpha={qc.alpha}, "
            f"delta={qc.delta}; add calibration images, or use rule 'fdr' (false discovery rate)"
        )
    if qc.rule == "fdr" and len(qc.dice_true) + 1 < 1 / qc.alpha:
        return (
            f"nothing can be accepted: conformal selection needs at least {math.ceil(1 / qc.alpha - 1)} "
            f"calibration images at alpha={qc.alpha}, and the calibration holds {len(qc.dice_true)}"
        )
    return "nothing accepted: no image is predicted reliably enough for the stated error rate"


def refit_for(
    qc: QCModel, alpha: float, delta: float, threshold: float, method: str | None = None, rule: str | None = None
) -> QCModel:
    """``qc`` for another guarantee, rule or method.

    With the same method and stored out-of-fold scores, only the cut is recomputed from them (the
    cross-fitting, grouped by slide or patient when the model was fitted, is kept); a new method, or
    a model file without out-of-fold scores, is refitted from the stored calibration rows.
    """
    rule = _checked_rule(rule or qc.rule)
    if (method or qc.method) == qc.method and len(qc.oof) == len(qc.dice_true):
        cut = (
            qc.cut
            if (alpha, delta, threshold) == (qc.alpha, qc.delta, qc.threshold)
            else conformal_cut(np.asarray(qc.oof), np.asarray(qc.dice_true), threshold, alpha, delta)
        )
        return replace(qc, alpha=alpha, delta=delta, threshold=threshold, rule=rule, cut=cut)
    return _refit(qc, alpha, delta, threshold, method or qc.method, rule, qc.info)


def iter_qc(
    model,
    pairs: Sequence[Pair],
    calibration_pairs: Sequence[Pair] | None = None,
    alpha: float = 0.1,
    delta: float = 0.1,
    threshold: float = 0.8,
    method: str | None = None,
    samples: int = QC_SAMPLES,
    factor: float = 0.5,
    qc_model: QCModel | None = None,
    rule: str | None = None,
) -> Generator[tuple[int, int], None, tuple[dict, QCModel]]:
    """QC as a generator: yields (images done, images total); returns (report, fitted QC model).

    With ``calibration_pairs`` (labelled target-domain images) a new QC model is fitted on them;
    otherwise ``qc_model`` or the shipped calibration is used, refitted from its stored rows
    when ``alpha``/``delta``/``threshold``/``method``/``rule`` differ from its own (:func:`refit_for`).
    """
    if rule is not None:
        _checked_rule(rule)
    if not pairs:
        raise InputError("qc: no images to check")
    if calibration_pairs and any(p.mask is None for p in calibration_pairs):
        raise InputError("qc: every calibration image needs a mask")
    total = len(pairs) + len(calibration_pairs or [])
    done = 0
    if calibration_pairs:
        cal_rows, cal_truth = [], []
        for pair in calibration_pairs:
            row, pred = compute_features(model, pair.image, factor, samples)
            cal_rows.append(row)
            cal_truth.append(dice(pred, pair.mask))
            done += 1
            yield done, total
        info = {"calibration_images": [p.name for p in calibration_pairs]}
        qc = fit_qc_model(
            cal_rows,
            cal_truth,
            alpha,
            delta,
            threshold,
            method or DEFAULT_METHOD,
            samples=samples,
            info=info,
            rule=rule or DEFAULT_RULE,
            tumour=[bool(p.mask.any()) for p in calibration_pairs],
        )
    else:
        qc = refit_for(qc_model or default_qc_model(), alpha, delta, threshold, method, rule)
    rows, truth = [], []
    for pair in pairs:
        row, pred = compute_features(model, pair.image, factor, qc.samples, qc.tta)
        rows.append(row)
        truth.append(None if pair.mask is None else dice(pred, pair.mask))
        done += 1
        yield done, total
    return qc_report(qc, [p.name for p in pairs], rows, truth), qc


def run_qc(
    model,
    pairs: Sequence[Pair],
    calibration_pairs: Sequence[Pair] | None = None,
    alpha: float = 0.1,
    delta: float = 0.1,
    threshold: float = 0.8,
    method: str | None = None,
    samples: int = QC_SAMPLES,
    factor: float = 0.5,
    qc_model: QCModel | None = None,
    progress: Callable[[int, int], None] | None = None,
    rule: str | None = None,
) -> dict:
    """QC of images in one call: features, predicted Dice, conformal acceptance, metrics.

    Parameters
    ----------
    model : the segmentation network (or an ensemble list).
    pairs : images to check; their masks (if any) are used only for the metrics.
    calibration_pairs : labelled target-domain images to fit the QC model on (see :func:`iter_qc`).
    alpha, delta, threshold, method : the acceptance guarantee and the QC method.
    samples, factor : MC samples per TTA view, source-to-working scale.
    qc_model : a fitted QC model to use instead of the shipped calibration.
    rule : ``ltt`` or ``fdr`` (:data:`RULES`); default: the QC model's own, else ``ltt``.
    progress : called with (images done, images total), calibration images included.

    Returns
    -------
    dict with ``per_image`` (name, dice_pred, accepted, dice_true), ``threshold``, ``alpha``,
    ``delta``, ``method``, ``cut`` and ``metrics`` (empty without masks).
    """
    steps = iter_qc(model, pairs, calibration_pairs, alpha, delta, threshold, method, samples, factor, qc_model, rule)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value[0]
        if progress is not None:
            progress(done, total)
