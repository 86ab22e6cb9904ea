"""``auto``: the forest, the presence model or their mean, chosen from out-of-fold scores (one-standard-error rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .estimators import _feature_names, _matrix, cross_fit
from .metrics import naurc


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
