"""The acceptance rules: Learn-then-Test (:func:`conformal_cut`) and conformal selection."""

from __future__ import annotations

import math

import numpy as np

from ..io import InputError


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
