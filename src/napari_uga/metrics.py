"""Segmentation metrics shared by evaluation, the annotation loop and quality control."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    pred = np.asarray(pred, bool)
    target = np.asarray(target, bool)
    total = int(pred.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / total


def dice_global(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Dice over all pixels of a set pooled together; 1.0 when everything is empty."""
    inter = sum(int(np.logical_and(p > 0, t > 0).sum()) for p, t in zip(preds, targets, strict=True))
    total = sum(int((p > 0).sum()) + int((t > 0).sum()) for p, t in zip(preds, targets, strict=True))
    return 1.0 if total == 0 else 2.0 * inter / total
