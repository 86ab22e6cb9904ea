"""Failure-detection metrics of predicted against true Dice (risk = 1 - Dice), after Zenk et al. 2025."""

from __future__ import annotations

import math

import numpy as np


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
