"""``uga demo``: the annotation loop on the shipped Camelyon sample (napari with a display)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .._sample_data import SAMPLE_DIR
from ._common import add_model_options, emit, load_model_from_args, progress_bar
from .simulate import add_loop_options, loop_configs, parse_budgets


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="run the loop on the shipped sample (opens napari when a display is present)")
    p.add_argument("--headless", action="store_true", help="run the simulated loop without napari")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for report.json and the plots")
    p.add_argument(
        "--budgets", default="0,5,10,20", help="annotated patches after each round (the stop signal may end it sooner)"
    )
    p.add_argument(
        "--no-stop", action="store_true", help="run every budget even when the stop signal says more will not help"
    )
    p.add_argument("--seed", type=int, default=0)
    add_loop_options(p)
    add_model_options(p)
    p.set_defaults(handler=run)


DEMO_TARGET = 0.9  # the demo's Dice to clear: the session stops once its estimate's interval is above it


def run(args: argparse.Namespace) -> dict | None:
    """Open napari with the sample slide, or run the headless loop and write the report."""
    if not args.headless and os.environ.get("DISPLAY"):
        from .._widgets.demo import launch_demo

        launch_demo(args.out)
        return None
    return run_headless(args)


def run_headless(args: argparse.Namespace) -> dict:
    """Uncertainty -> proposals -> oracle annotation -> fine-tune, a few rounds; report + plots."""
    from ..io import load_pairs
    from ..loop import default_strategy, replay_pairs, simulate
    from ..models import working_factor
    from ..splits import position_split

    started = time.perf_counter()
    budgets = parse_budgets(args.budgets)
    config, presets = loop_configs(args, 256)
    target = DEMO_TARGET if args.target is None else args.target
    pool, test = position_split(load_pairs(SAMPLE_DIR / "images", SAMPLE_DIR / "masks"))
    model = load_model_from_args(args)
    factor = working_factor(model, args.mpp)
    rounds = sum(-(-(b - a) // config.batch) for a, b in zip([0, *budgets], budgets, strict=False)) if budgets else 0
    bar = progress_bar(rounds * config.steps + len(budgets), "demo", args.json)

    def on_event(event) -> None:
        bar.update(1)
        if event["stage"] in ("evaluate", "audit"):
            bar.write(event["message"])

    strategy = default_strategy(args.shift)
    trajectory = simulate(
        model, pool, test, budgets, strategy, args.seed, factor, config, replay_pairs(), on_event=on_event,
        audit_share=args.audit_share, no_harm=args.no_harm == "on", presets=presets, target=target,
        stop=not args.no_stop, closing_batch=True, pool_truth=True,
    )  # fmt: skip
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "data": str(SAMPLE_DIR),
        "pool": [p.name for p in pool],
        "test": [p.name for p in test],
        "strategy": strategy,
        "curve": _curve(trajectory),
        "shift": trajectory.shift,
        "rollbacks": trajectory.rollbacks,
        "stop": {"budget": trajectory.stop_budget, "reason": trajectory.stop_reason, "target": target},
        "handed_over": {"round": trajectory.handed_over, "dice_global": trajectory.handed_over_dice},
        "picks": trajectory.picks,
        "seconds": round(time.perf_counter() - started, 1),
        "files": {"report": "report.json", "overlay": "overlay.png", "plot": "dice_vs_round.png"},
    }
    from ..io import atomic_write_json
    from ..plots import pick_showcase, plot_dice_curve, plot_overlay

    plot_dice_curve(
        trajectory.budgets, trajectory.dice_global, args.out / "dice_vs_round.png",
        estimates=trajectory.estimated_dice, intervals=trajectory.estimate_interval,
        stop_budget=trajectory.stop_budget, tissue=trajectory.pool_dice,
        handed_over=(f"round {trajectory.handed_over}", trajectory.handed_over_dice),
    )  # fmt: skip
    models = {"before": model, f"round {trajectory.handed_over} (handed over)": trajectory.model}
    plot_overlay(models, pick_showcase(test), factor, config.samples, args.out / "overlay.png")
    atomic_write_json(args.out / "report.json", report)
    lines = [_line(c) for c in report["curve"]]
    if trajectory.stop_reason:
        lines.append(f"stop signal at {trajectory.stop_budget} patches: {trajectory.stop_reason}")
    said = trajectory.overconfident[-1] if trajectory.overconfident else None
    if said:
        lines.append(f"at {trajectory.budgets[-1]} patches (round {trajectory.round_in_use[-1]}), {said}.")
    last = trajectory.round_in_use[-1] if trajectory.round_in_use else 0
    if last == 0:
        why = "no round was tuned"
    elif trajectory.handed_over == last:
        checked = args.no_harm == "on"
        why = "it clearly beat round 0 on one more batch of corrections" if checked else "not checked (--no-harm off)"
    elif trajectory.handed_over == 0:
        why = f"round {last} did not clearly beat round 0 on fresh corrections"
    else:
        why = f"round {last} was rolled back or could not be checked; round {trajectory.handed_over} was"
    lines.append(
        f"handed over: round {trajectory.handed_over} (held-out Dice {trajectory.handed_over_dice:.3f}; "
        f"{trajectory.rollbacks} rounds rolled back; {why})"
    )
    emit(
        args,
        report,
        "\n".join([*lines, f"wrote {args.out}/report.json, overlay.png, dice_vs_round.png ({report['seconds']} s)"]),
    )
    return report


def _curve(trajectory) -> list[dict]:
    """Per budget: held-out Dice, the in-session estimate with its interval, what it estimates, whether the audits
    show the model confidently wrong (``overconfident``, a sentence or ``None``), the round in use.

    ``tissue_dice``: the round in use's pooled Dice on the pool's tissue patches not annotated yet,
    against the sample's masks, the patches audits are drawn from (what the estimate is about; the held-out
    tiles are other tissue of the slide). A real session has no such truth: the demo shows it to let the
    estimate be checked.
    """
    return [
        {
            "budget": budget,
            "dice_global": dice,
            "estimated_dice": estimate,
            "estimate_interval": None if interval is None else list(interval),
            "estimate_audits": audits,
            "tissue_dice": tissue,
            "overconfident": overconfident,
            "round_in_use": kept,
        }
        for budget, dice, estimate, interval, audits, tissue, overconfident, kept in zip(
            trajectory.budgets,
            trajectory.dice_global,
            trajectory.estimated_dice,
            trajectory.estimate_interval,
            trajectory.estimate_audits,
            trajectory.pool_dice,
            trajectory.overconfident,
            trajectory.round_in_use,
            strict=True,
        )  # fmt: skip
    ]


def _line(entry: dict) -> str:
    estimate, audits = entry["estimated_dice"], entry["estimate_audits"]
    said = (
        "no audit yet"
        if estimate is None
        else "estimated {:.3f} [{:.2f}, {:.2f}]".format(estimate, *entry["estimate_interval"])
        + f" from {audits} audit{'' if audits == 1 else 's'}"
    )
    tissue = entry["tissue_dice"]
    truth = "" if tissue is None else f" · truth {tissue:.3f} on the tissue not annotated yet"
    budget, dice, kept = entry["budget"], entry["dice_global"], entry["round_in_use"]
    return f"budget {budget:>3}: held-out Dice {dice:.3f} · {said}{truth} · round {kept}"
