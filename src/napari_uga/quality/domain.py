"""The exchangeability gate: is an input like the calibration images, or is the guarantee void for it?

Both acceptance rules promise their error rate only for images exchangeable with the calibration
images. The gate tests that, one image at a time, with a conformal p-value of the image's
**atypicality** against the calibration images' own:

* features: the tissue's texture (the 40 local-binary-pattern values: organ, tissue type,
  magnification), how far the network's bottleneck features lie from its training tiles
  (``feature_distance``, :mod:`napari_uga.ood`) and the scale signature of the haematoxylin
  density (:func:`~.features.scale_signature`: magnification, nuclear size), three groups of
  equal weight (files whose rows lack a group use the others). The stain colour is
  left out: it changes from slide to slide and centre to centre of the same tissue, and where
  it matters to the network the bottleneck distance sees it (chosen on the dev half of the
  benchmark data; docs/qc.md);
* each feature is standardised by the mean and standard deviation of the calibration images
  *and the tested image together*, so that the score is a symmetric function of the bag;
* atypicality of a point = mean weighted RMS distance to its ``neighbours`` nearest other points of
  the bag, never counting points of its own group (patient, overlapping tiles), so that a
  calibration image is not made typical by its own copies;
* p = (number of bag points at least as atypical as the tested image, itself included) / (n + 1)
  (full conformal: each calibration image's score is recomputed with the tested image in the
  bag, so p is exactly super-uniform when the tested image is exchangeable with the calibration
  images, ties counted against it).

An image with p <= ``level`` is out of domain: it is sent to review whatever its predicted Dice.
With n calibration images the smallest p is 1 / (n + 1), so at level 0.05 the gate needs at
least 19 calibration images to flag anything (:func:`min_domain_images`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .features import SCALE_PREFIX, TEXTURE_PREFIX

DOMAIN_LEVEL = 0.05  # in-domain images are sent to review at most this often; see docs/qc.md
DOMAIN_NEIGHBOURS = 5  # atypicality = mean distance to this many nearest calibration images (other groups)
NETWORK_FEATURES = ("feature_distance",)


def domain_features(names: Sequence[str]) -> dict[str, list[str]]:
    """The gate's feature groups present among ``names``: texture, network, scale (empty groups dropped)."""
    names = list(names)
    groups = {
        "texture": sorted(n for n in names if n.startswith(TEXTURE_PREFIX)),
        "network": [n for n in NETWORK_FEATURES if n in names],
        "scale": sorted(n for n in names if n.startswith(SCALE_PREFIX)),
    }
    return {k: v for k, v in groups.items() if v}


def _columns(groups: dict[str, list[str]]) -> tuple[list[str], np.ndarray]:
    """Flat column names and weights (each group weighs 1 / number of groups, shared by its columns)."""
    names = [n for cols in groups.values() for n in cols]
    weights = np.concatenate([np.full(len(cols), 1 / (len(groups) * len(cols))) for cols in groups.values()])
    return names, weights


def _matrix(rows: Sequence[dict[str, float]], names: Sequence[str]) -> np.ndarray:
    return np.array([[float(r[n]) for n in names] for r in rows], float).reshape(len(rows), len(names))


def _scale(bag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column of the bag (1 for a constant column)."""
    sd = bag.std(axis=0)
    return bag.mean(axis=0), np.where(sd > 0, sd, 1.0)


def _atypicality(bag: np.ndarray, weights: np.ndarray, labels: np.ndarray, neighbours: int) -> np.ndarray:
    """Each bag point's mean distance to its nearest points of other groups (symmetric in the bag)."""
    centre, scale = _scale(bag)
    z = (bag - centre) / scale * np.sqrt(weights)
    sq = (z**2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0))
    dist[labels[:, None] == labels[None, :]] = np.inf  # itself and its own group
    allowed = np.isfinite(dist).sum(1)
    k = int(max(1, min(neighbours, allowed.min()))) if len(bag) > 1 else 1
    if not np.isfinite(dist).any():
        return np.zeros(len(bag))
    nearest = np.partition(dist, k - 1, axis=1)[:, :k]
    return nearest.mean(1)


def _labels(groups: Sequence | None, n: int) -> np.ndarray:
    """Integer group labels of n calibration images (each its own group when none are given)."""
    if groups is None or len(groups) != n:
        return np.arange(n)
    return np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]


def calibration_scores(
    rows: Sequence[dict[str, float]], groups: Sequence | None = None, neighbours: int = DOMAIN_NEIGHBOURS
) -> list[float]:
    """The calibration images' own atypicality (each against the others of other groups), for the file."""
    features = domain_features(rows[0] if rows else [])
    if not features or len(rows) < 2:
        return []
    names, weights = _columns(features)
    return _atypicality(_matrix(rows, names), weights, _labels(groups, len(rows)), neighbours).round(6).tolist()


def domain_p_values(
    cal_rows: Sequence[dict[str, float]],
    rows: Sequence[dict[str, float]],
    groups: Sequence | None = None,
    neighbours: int = DOMAIN_NEIGHBOURS,
) -> np.ndarray:
    """Conformal p-value of each row's atypicality among the calibration rows (1 = typical); NaN if untestable.

    Each tested row is its own group; ``groups`` are the calibration images' (patients, slides or
    overlapping tiles). The gate reads the features that the calibration rows and every tested row
    share; where they share none (an older features version), the rows get NaN.
    """
    if not rows:
        return np.zeros(0)
    shared = set.intersection(*(set(r) for r in rows)) if cal_rows else set()
    features = domain_features([n for n in (cal_rows[0] if cal_rows else []) if n in shared])
    if not features or len(cal_rows) < 2:
        return np.full(len(rows), np.nan)
    names, weights = _columns(features)
    cal = _matrix(cal_rows, names)
    test = _matrix(rows, names)
    labels = np.r_[_labels(groups, len(cal_rows)), -1]  # the tested image: a group of its own
    out = np.empty(len(rows))
    for j, row in enumerate(test):
        scores = _atypicality(np.vstack([cal, row]), weights, labels, neighbours)
        out[j] = np.sum(scores >= scores[-1] - 1e-12) / len(scores)
    return out


def domain_row(model, image: np.ndarray, factor: float) -> dict[str, float]:
    """Only the gate's features of one image (texture, network-feature distance, scale), without MC sampling."""
    from ..ood import feature_distance
    from .features import _texture, scale_signature

    return {**_texture(image), "feature_distance": feature_distance(model, image, factor), **scale_signature(image)}


def min_domain_images(level: float = DOMAIN_LEVEL) -> int:
    """Fewest calibration images with which the gate can flag an image at ``level`` (1 / (n + 1) <= level)."""
    return max(1, math.ceil(1 / level - 1 - 1e-9)) if level > 0 else 0


def merge_p_values(p_values: Sequence[float]) -> float:
    """One p-value for many blocks of one slide: twice their median (valid under any dependence; NaN ignored)."""
    p = np.asarray(p_values, float)
    p = p[np.isfinite(p)]
    return float(min(1.0, 2 * np.median(p))) if len(p) else math.nan
