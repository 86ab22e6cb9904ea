"""``uga qc``: predicted Dice per image and a conformal accept / review decision, without masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_model_options, emit, load_model_from_args, progress_bar


def register(sub) -> None:
    """Add the ``qc`` subcommand."""
    p = sub.add_parser("qc", help="quality control: predicted Dice and accept / review per image")
    p.add_argument("--images", type=Path, required=True, help="folder (or file) of images to check")
    p.add_argument("--masks", type=Path, default=None, help="true masks, only to report QC metrics")
    p.add_argument("--calibration-images", type=Path, default=None, help="labelled target-domain images")
    p.add_argument("--calibration-masks", type=Path, default=None)
    p.add_argument(
        "--calibration-session",
        type=Path,
        default=None,
        help="calibrate on an annotation session's audit patches (random tissue patches, corrected): the guarantee "
        "then holds for patches drawn at random from the tissue of the session's slides",
    )
    p.add_argument("--alpha", type=float, default=0.1, help="accepted images fail with rate <= alpha")
    p.add_argument("--delta", type=float, default=0.1, help="the guarantee holds with probability >= 1 - delta")
    p.add_argument("--threshold", type=float, default=0.8, help="Dice that counts as a good segmentation")
    p.add_argument(
        "--rule",
        choices=("ltt", "fdr"),
        default=None,
        help="acceptance guarantee: ltt = precision >= 1-alpha with probability >= 1-delta (Learn-then-Test); "
        "fdr = false discovery rate <= alpha: expected share of failures among the accepted, an empty selection "
        "counting as none (conformal selection, works with ~10 calibration images); "
        "default: the QC model's own, else ltt",
    )
    p.add_argument(
        "--method",
        default=None,
        help="QC method (default: the QC model's; with calibration images auto: the random forest or the "
        "presence model where one ranks the calibration images clearly better, else their mean, blend)",
    )
    p.add_argument(
        "--domain-level",
        type=float,
        default=None,
        help="exchangeability gate: an image whose atypicality p-value against the calibration images is <= this "
        "is out of domain and goes to review (default: the QC model's, else 0.05; 0 turns the gate off)",
    )
    p.add_argument("--samples", type=int, default=None, help="MC samples per TTA view (default 8)")
    p.add_argument("--qc-model", type=Path, default=None, help="QC model JSON (default: the shipped calibration)")
    p.add_argument("--save-qc-model", type=Path, default=None, help="write the fitted QC model as JSON")
    add_model_options(p)
    p.set_defaults(handler=run)


def _validate(args: argparse.Namespace) -> None:
    from ..io import MPP_HINT, InputError, MissingScaleError
    from ..quality import METHODS

    if args.mpp is None and args.calibration_session is None:  # tiles carry no µm/px QC could trust; never guessed
        raise MissingScaleError(f"{args.images}: the images' µm/px is not known; {MPP_HINT}")

    if (args.calibration_images is None) != (args.calibration_masks is None):
        raise InputError("--calibration-images and --calibration-masks go together")
    if args.calibration_session is not None and args.calibration_images is not None:
        raise InputError("--calibration-session replaces --calibration-images/--calibration-masks: give one of them")
    for name in ("alpha", "delta"):
        if not 0 < getattr(args, name) < 1:
            raise InputError(f"--{name} must lie strictly between 0 and 1")
    if not 0 <= args.threshold <= 1:
        raise InputError("--threshold is a Dice in [0, 1]")
    if args.method is not None and args.method not in METHODS:
        raise InputError(f"--method {args.method!r}: choose one of {', '.join(METHODS)}")
    if args.domain_level is not None and not 0 <= args.domain_level < 1:
        raise InputError("--domain-level must lie in [0, 1) (0 turns the gate off)")
    if args.samples is not None and not 1 <= args.samples <= 64:
        raise InputError("--samples must be between 1 and 64")


def run(args: argparse.Namespace) -> dict:
    """Load images (and masks), run QC, print the per-image table or JSON."""
    from ..io import load_pairs
    from ..models import working_factor
    from ..quality import QC_SAMPLES, QCModel, iter_qc

    _validate(args)
    pairs = load_pairs(args.images, args.masks)
    calibration, scope, cal_mpp = _calibration(args)
    qc = QCModel.load(args.qc_model) if args.qc_model is not None else None
    model = load_model_from_args(args)
    factor = working_factor(model, args.mpp or cal_mpp)  # the session's scale where --mpp is not given
    steps = iter_qc(model, pairs, calibration, args.alpha, args.delta, args.threshold, args.method,
                    args.samples or QC_SAMPLES, factor, qc, args.rule, args.domain_level,
                    working_factor(model, cal_mpp))  # fmt: skip
    payload, qc = drive_steps(steps, progress_bar(len(pairs) + len(calibration or []), "qc", args.json))
    if scope is not None:
        payload["calibration"] = scope
    if args.save_qc_model is not None:
        qc.save(args.save_qc_model)
    emit(args, payload, _human(payload))
    return payload


def _calibration(args: argparse.Namespace) -> tuple[list | None, dict | None, float]:
    """The calibration pairs, the report's ``calibration`` entry and their µm/px (``--mpp`` unless a session says)."""
    from ..io import load_pairs
    from ..quality import DEFAULT_RULE, session_calibration

    if args.calibration_images is not None:
        return load_pairs(args.calibration_images, args.calibration_masks), None, args.mpp
    if args.calibration_session is None:
        return None, None, args.mpp
    rule = args.rule or DEFAULT_RULE
    pairs, mpp, scope = session_calibration(args.calibration_session, rule, args.alpha, args.delta, args.mpp)
    return pairs, scope, mpp


def drive_steps(steps, bar):
    """Run a ``(done, total)`` generator to its end, updating a tqdm bar; returns its value."""
    while True:
        try:
            bar.n, bar.total = next(steps)
        except StopIteration as stop:
            bar.close()
            return stop.value
        bar.refresh()


def _guarantee(payload: dict) -> str:
    """The acceptance rule in words."""
    precision = f"Dice > {payload['threshold']} with precision >= {1 - payload['alpha']:.2f}"
    if payload["rule"] == "fdr":
        share = f"expected share of Dice <= {payload['threshold']} among the accepted <= {payload['alpha']}"
        return f"accepted by conformal selection ({share})"
    cut = payload["cut"]
    when = "no predicted Dice is high enough" if cut is None else f"accept when predicted Dice >= {cut:.3f}"
    return f"{when} ({precision} w.p. >= {1 - payload['delta']:.2f})"


def _human(payload: dict) -> str:
    lines = [f"{'name':40s} {'dice_pred':>9s} {'decision':>8s} {'dice_true':>9s} {'domain_p':>8s}  reason"]
    for row in sorted(payload["per_image"], key=lambda r: r["dice_pred"]):
        true = "-" if row["dice_true"] is None else f"{row['dice_true']:.3f}"
        domain = "-" if row["domain_p"] is None else f"{row['domain_p']:.3f}"
        decision = "accept" if row["accepted"] else "review"
        lines.append(
            f"{row['name'][:40]:40s} {row['dice_pred']:9.3f} {decision:>8s} {true:>9s} {domain:>8s}  {row['reason']}"
        )
    lines.append(f"method {payload['method']}, {_guarantee(payload)}")
    if "calibration" in payload:
        scope = payload["calibration"]
        lines.append(f"calibrated on {scope['patches']} audit patches of {scope['folder']}: {scope['guarantee']}")
    if payload["domain_note"]:
        lines.append(payload["domain_note"])
    if payload["method_reason"]:
        lines.append(payload["method_reason"])
    if payload["note"]:
        lines.append(payload["note"])
    if payload["metrics"]:
        lines.append(" ".join(f"{k}={'-' if v is None else f'{v:.3f}'}" for k, v in payload["metrics"].items()))
    return "\n".join(lines)
