"""QC of images end to end: features, predicted Dice, acceptance, the ``uga qc --json`` report."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace

import numpy as np

from ..io import InputError, Pair
from ..metrics import dice
from .conformal import conformal_cut, min_accepted
from .features import QC_SAMPLES, compute_features
from .metrics import qc_metrics
from .model import DEFAULT_METHOD, DEFAULT_RULE, QCModel, _checked_rule, _refit, default_qc_model, fit_qc_model


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
