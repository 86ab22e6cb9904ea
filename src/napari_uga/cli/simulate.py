"""``uga simulate``: the annotation loop measured with an oracle annotator."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ._common import add_model_options, emit, load_model_from_args, progress_bar


def register(sub) -> None:
    """Add the ``simulate`` subcommand."""
    p = sub.add_parser("simulate", help="oracle-annotated loop: Dice on a test set against the annotation budget")
    p.add_argument("--pool-images", type=Path, required=True)
    p.add_argument("--pool-masks", type=Path, required=True)
    p.add_argument("--test-images", type=Path, required=True)
    p.add_argument("--test-masks", type=Path, required=True)
    p.add_argument("--budgets", default="0,5,10", help="comma-separated numbers of annotated patches")
    from ..selection import STRATEGIES

    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="how patches are proposed (default: the preset's, random_first with --shift organ, else "
        "uncertainty): uncertainty, random, or the low-budget rules typical "
        "(TypiClust), weighted (uncertainty-weighted k-means++), coverage (typical, then uncertainty), mixed, "
        "expected_error (a texture model of the corrections), random_first (a random first batch, then "
        "uncertainty); with --shift organ each patch is proposed as four quarter patches (--subdivide; "
        "docs/benchmarks.md)",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (random choice and training noise)")
    p.add_argument(
        "--patch-size", type=int, default=256, help="patch side at full resolution (an image's side where smaller)"
    )
    add_loop_options(p)
    add_model_options(p)
    p.set_defaults(handler=run)


def add_loop_options(p: argparse.ArgumentParser) -> None:
    """Loop settings shared with the demo (defaults from :class:`~napari_uga.loop.LoopConfig` and ``--shift``)."""
    from ..loop import CHOICES, SHIFTS, LoopConfig

    d = LoopConfig()
    p.add_argument(
        "--shift",
        choices=(*SHIFTS, "auto"),
        default="auto",
        help="what differs from the training data: centre (scanner, stain; gentle fine-tuning with replay, the "
        "starting model's own labels on unlabelled patches and an L2 pull towards it), "
        "organ (tissue; batch norm adapts, 400 steps, no replay), or auto (the default: centre where the "
        "starting model scores Dice >= 0.8 on the first batch of corrections, else organ); "
        "explicit options below override it",
    )
    p.add_argument(
        "--audit-share",
        type=float,
        default=0.2,
        help="share of each batch drawn at random from the tissue to measure the model (default 0.2; 0 for none)",
    )
    p.add_argument(
        "--no-harm",
        choices=("on", "off"),
        default="on",
        help="roll back a round that scores clearly worse than its predecessor on fresh corrections (default on)",
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="a Dice to clear: the stop signal speaks when the in-session estimate's interval is above it",
    )
    p.add_argument("--samples", type=int, default=d.samples, help="MC-dropout samples for the uncertainty maps")
    p.add_argument("--tta", choices=CHOICES["tta"], default=d.tta)
    p.add_argument("--measure", choices=CHOICES["measure"], default=d.measure)
    p.add_argument("--aggregate", choices=CHOICES["aggregate"], default=d.aggregate, help="patch score from its pixels")
    p.add_argument(
        "--diversity",
        choices=CHOICES["diversity"],
        default=None,
        help="spread the picks over appearance clusters and/or predicted classes (centre: none, organ: clusters)",
    )
    p.add_argument(
        "--subdivide",
        type=int,
        choices=(1, 2, 3, 4),
        default=None,
        help="propose each patch of the budget as N x N sub-patches of 1/N its side, the same pixels to correct "
        "(centre: 1, whole patches; organ: 2, four quarter patches)",
    )
    p.add_argument("--steps", type=int, default=None, help=f"fine-tune steps per labelled batch (centre: {d.steps})")
    p.add_argument("--lr", type=float, default=None, help=f"fine-tune learning rate (default {d.lr})")
    p.add_argument(
        "--replay-share",
        type=float,
        default=None,
        help=f"share of each batch from the replay tiles (centre: {d.replay_share}; with --self-share below 1)",
    )
    p.add_argument(
        "--self-share",
        type=float,
        default=None,
        help="share of each batch from unlabelled pool patches labelled by the starting model "
        f"(centre: {d.self_share}, organ: 0)",
    )
    p.add_argument(
        "--anchor",
        type=float,
        default=None,
        help=f"L2 pull of the fine-tuned weights towards the starting model's (centre: {d.anchor}, organ: 0)",
    )
    p.add_argument(
        "--norm",
        choices=("frozen", "adapted"),
        default=None,
        help="batch-norm statistics while fine-tuning (centre: frozen, organ: adapted)",
    )
    p.add_argument("--batch", type=int, default=d.batch, help="patches annotated per round (x N² sub-patches)")
    p.add_argument(
        "--predictor",
        choices=CHOICES["predictor"],
        default=None,
        help="how a round predicts: plain, flips (mean over 4 flips), soup (the mean weights of the round and the "
        "round it was tuned from), soup+flips (centre: plain, organ: soup+flips)",
    )


def loop_configs(args: argparse.Namespace, patch: int) -> tuple[object, dict | None]:
    """The loop settings from the command line: a :class:`LoopConfig`, and the presets of ``--shift auto``."""
    from ..io import InputError

    if not 0 <= args.audit_share < 1:
        raise InputError(f"--audit-share must be in [0, 1), not {args.audit_share}")
    if args.target is not None and not 0 < args.target <= 1:
        raise InputError(f"--target must be a Dice in (0, 1], not {args.target}")
    if args.shift != "auto":
        return loop_config(args, patch), None
    presets = {shift: loop_config(args, patch, shift) for shift in ("centre", "organ")}
    return presets["centre"], presets


def loop_config(args: argparse.Namespace, patch: int, shift: str | None = None):
    """A :class:`LoopConfig` from the command-line options (``shift``: the preset, default ``--shift``)."""
    from ..io import InputError
    from ..loop import LoopConfig, config_for

    explicit = {
        "steps": args.steps,
        "lr": args.lr,
        "replay_share": args.replay_share,
        "self_share": args.self_share,
        "anchor": args.anchor,
        "diversity": args.diversity,
        "subdivide": args.subdivide,
        "predictor": args.predictor,
    }
    if args.norm is not None:
        explicit["freeze_norm"] = args.norm == "frozen"
    if patch < 16:
        raise InputError("--patch-size must be >= 16")
    shift = args.shift if shift is None else shift
    shift = "centre" if shift == "auto" else shift  # auto starts from centre's proposal settings
    try:
        config = config_for(
            shift,
            patch=patch,
            samples=args.samples,
            tta=args.tta,
            measure=args.measure,
            aggregate=args.aggregate,
            batch=args.batch,
            **{k: v for k, v in explicit.items() if v is not None},
        )
    except ValueError as exc:  # LoopConfig names the settings at fault: say which options they are
        named = [f"--{name.replace('_', '-')}" for name in vars(LoopConfig()) if re.search(rf"\b{name}\b", str(exc))]
        raise InputError(f"{' / '.join(named) or 'loop settings'} ({shift} preset): {exc}") from None
    return config


def parse_budgets(text: str) -> list[int]:
    """``"0,5,10"`` -> ``[0, 5, 10]``, validated."""
    from ..io import InputError

    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise InputError(f"--budgets: {text!r} is not a comma-separated list of integers") from None
    if not budgets or budgets[0] < 0:
        raise InputError(f"--budgets: {text!r} must list non-negative integers")
    return budgets


def run(args: argparse.Namespace) -> dict:
    """Run the loop for every seed and print the Dice-vs-budget curve."""

    from ..io import InputError, load_pairs
    from ..loop import default_strategy, replay_pairs, simulate
    from ..models import working_factor

    budgets = parse_budgets(args.budgets)
    if args.seeds < 1:
        raise InputError("--seeds must be at least 1")
    config, presets = loop_configs(args, args.patch_size)
    strategy = args.strategy or default_strategy(args.shift)
    pool = load_pairs(args.pool_images, args.pool_masks)
    test = load_pairs(args.test_images, args.test_masks)
    model = load_model_from_args(args)
    factor = working_factor(model, args.mpp)
    replay = replay_pairs() if config.replay_share > 0 else []
    bar = progress_bar(args.seeds * len(budgets), f"simulate {strategy}", args.json)
    runs = []
    for seed in range(args.seeds):

        def on_event(event, _bar=bar):
            if event["stage"] == "evaluate":
                _bar.update()

        runs.append(
            simulate(
                model,
                pool,
                test,
                budgets,
                strategy,
                seed,
                factor,
                config,
                replay,
                on_event=on_event,
                audit_share=args.audit_share,
                no_harm=args.no_harm == "on",
                presets=presets,
                target=args.target,
            )  # fmt: skip
        )
    bar.close()
    curve = [_curve_entry(budget, i, runs) for i, budget in enumerate(budgets)]
    payload = {
        "strategy": strategy,
        "curve": curve,
        "picks": [r.picks for r in runs],
        "shift": [r.shift or args.shift for r in runs],
        "stop": [{"budget": r.stop_budget, "reason": r.stop_reason} for r in runs],
    }
    human = "\n".join(
        f"budget {c['budget']:>3}: Dice {c['dice_global']:.3f} ± {c['dice_global_std']:.3f}"
        f" · estimated {_maybe(c['estimated_dice'])} · rollbacks {c['rollbacks']}"
        for c in curve
    )
    emit(args, payload, human)
    return payload


def _curve_entry(budget: int, i: int, runs) -> dict:
    """One budget of the curve: held-out Dice and the in-session estimate, over seeds."""
    import numpy as np

    per_seed = [r.dice_global[i] for r in runs]
    estimates = [r.estimated_dice[i] for r in runs]
    known = [e for e in estimates if e is not None]
    return {
        "budget": budget,
        "dice_global": float(np.mean(per_seed)),
        "dice_global_std": float(np.std(per_seed)),
        "per_seed": per_seed,
        "estimated_dice": float(np.mean(known)) if known else None,
        "estimated_dice_per_seed": estimates,
        "estimate_interval_per_seed": [r.estimate_interval[i] for r in runs],
        "estimate_audits_per_seed": [r.estimate_audits[i] for r in runs],
        "hard_dice_per_seed": [r.hard_dice[i] for r in runs],
        "rollbacks": sum(r.rollbacks_by_budget[i] for r in runs),
    }


def _maybe(value) -> str:
    return "-" if value is None else f"{value:.3f}"
