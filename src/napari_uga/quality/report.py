"""QC of images end to end: features, predicted Dice, acceptance, the ``uga qc --json`` report."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace

import numpy as np

from ..io import InputError, Pair
from ..metrics import dice
from .conformal import conformal_cut, min_accepted
from .domain import DOMAIN_LEVEL, min_domain_images
from .features import QC_SAMPLES, compute_features
from .metrics import qc_metrics
from .model import (
    DEFAULT_METHOD,
    DEFAULT_RULE,
    QCModel,
    _checked_level,
    _checked_rule,
    _refit,
    default_qc_model,
    fit_qc_model,
)


def qc_report(
    qc: QCModel, names: Sequence[str], rows: Sequence[dict[str, float]], dice_true: Sequence[float | None]
) -> dict:
    """The ``uga qc --json`` payload: per-image predictions, settings, and metrics where masks exist.

    Each ``per_image`` row also says whether the image is like the calibration images
    (``in_domain``; ``domain_p``: its atypicality p-value, ``None`` when the gate is off) and why
    it is sent to review (``reason``; empty when accepted).
    """
    pred, accepted, domain_p = qc.decide(rows)
    in_domain = qc.in_domain(domain_p)
    per_image = [
        {
            "name": n,
            "dice_pred": float(p),
            "accepted": bool(a),
            "dice_true": None if t is None else float(t),
            "in_domain": bool(d),
            "domain_p": None if not math.isfinite(q) else float(q),
            "reason": review_reason(qc, float(p), bool(a), bool(d), float(q)),
        }
        for n, p, a, t, d, q in zip(names, pred, accepted, dice_true, in_domain, domain_p, strict=True)
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
        "note": _acceptance_note(qc, bool(accepted.any()), bool(in_domain.any())),
        "method_reason": method_reason(qc),
        "metrics": metrics,
        "domain_level": qc.domain_level,
        "domain_note": domain_note(qc, in_domain),
    }


def review_reason(qc: QCModel, dice_pred: float, accepted: bool, in_domain: bool, domain_p: float) -> str:
    """Why one image goes to review, in words ("" when it is accepted)."""
    if accepted:
        return ""
    if not in_domain:
        return f"unlike the calibration images: atypicality p = {domain_p:.3g}"
    if qc.rule == "fdr":
        return "not selected by conformal selection at this false discovery rate"
    if math.isinf(qc.cut):
        return "no predicted Dice is high enough for the stated error rate"
    return f"predicted Dice {dice_pred:.3f} below the cut {qc.cut:.3f}"


def domain_note(qc: QCModel, in_domain: np.ndarray) -> str:
    """How many images the gate sent to review, or why it cannot gate ("" when it passed everything)."""
    out = int(np.sum(~np.asarray(in_domain, bool)))
    if qc.domain_level <= 0:
        return "the exchangeability gate is off (domain level 0)"
    if out:
        return (
            f"{out} of {len(in_domain)} images are unlike the calibration images (atypicality p <= "
            f"{qc.domain_level}): the guarantee does not cover them, they go to review"
        )
    if len(qc.rows) < min_domain_images(qc.domain_level):
        return (
            f"the exchangeability gate cannot flag anything with {len(qc.rows)} calibration images at level "
            f"{qc.domain_level} (it needs {min_domain_images(qc.domain_level)})"
        )
    return ""


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


def _acceptance_note(qc: QCModel, any_accepted: bool, any_in_domain: bool = True) -> str:
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
    if not any_in_domain:
        return "nothing accepted: no image is like the calibration images (see domain_note)"
    return "nothing accepted: no image is predicted reliably enough for the stated error rate"


def refit_for(
    qc: QCModel,
    alpha: float,
    delta: float,
    threshold: float,
    method: str | None = None,
    rule: str | None = None,
    domain_level: float | None = None,
) -> QCModel:
    """``qc`` for another guarantee, rule, method or gate level (``None``: the model's own).

    With the same method and stored out-of-fold scores, only the cut is recomputed from them (the
    cross-fitting, grouped by slide or patient when the model was fitted, is kept); a new method, or
    a model file without out-of-fold scores, is refitted from the stored calibration rows.
    """
    rule = _checked_rule(rule or qc.rule)
    if domain_level is not None:
        qc = replace(qc, domain_level=_checked_level(domain_level))
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
    domain_level: float | None = None,
    calibration_factor: float | None = None,
) -> Generator[tuple[int, int], None, tuple[dict, QCModel]]:
    """QC as a generator: yields (images done, images total); returns (report, fitted QC model).

    With ``calibration_pairs`` (labelled target-domain images) a new QC model is fitted on them;
    otherwise ``qc_model`` or the shipped calibration is used, refitted from its stored rows
    when ``alpha``/``delta``/``threshold``/``method``/``rule`` differ from its own (:func:`refit_for`).
    ``domain_level``: the exchangeability gate's level (``None``: the QC model's own, else
    :data:`~.domain.DOMAIN_LEVEL`; 0 turns it off). ``calibration_factor``: the calibration images'
    source-to-working scale when it differs from the checked images' ``factor``.
    """
    if rule is not None:
        _checked_rule(rule)
    if domain_level is not None:
        _checked_level(domain_level)
    if not pairs:
        raise InputError("qc: no images to check")
    if calibration_pairs and any(p.mask is None for p in calibration_pairs):
        raise InputError("qc: every calibration image needs a mask")
    total = len(pairs) + len(calibration_pairs or [])
    done = 0
    if calibration_pairs:
        cal_rows, cal_truth = [], []
        for pair in calibration_pairs:
            row, pred = compute_features(model, pair.image, calibration_factor or factor, samples)
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
            domain_level=DOMAIN_LEVEL if domain_level is None else domain_level,
        )
    else:
        qc = refit_for(qc_model or default_qc_model(), alpha, delta, threshold, method, rule, domain_level)
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
    domain_level: float | None = None,
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
    domain_level : the exchangeability gate's level (see :func:`iter_qc`).

    Returns
    -------
    dict with ``per_image`` (name, dice_pred, accepted, dice_true, in_domain, domain_p, reason),
    ``threshold``, ``alpha``, ``delta``, ``method``, ``cut``, ``domain_level`` and ``metrics``
    (empty without masks); see :func:`qc_report`.
    """
    steps = iter_qc(
        model, pairs, calibration_pairs, alpha, delta, threshold, method, samples, factor, qc_model, rule, domain_level
    )
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value[0]
        if progress is not None:
            progress(done, total)
