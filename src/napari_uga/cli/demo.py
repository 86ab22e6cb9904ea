"""``uga demo``: the annotation loop on the shipped Camelyon sample (napari with a display)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .._sample_data import SAMPLE_DIR
from ._common import add_model_options, emit, load_model_from_args, progress_bar
from .simulate import add_loop_options, loop_config, parse_budgets


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="run the loop on the shipped sample (opens napari when a display is present)")
    p.add_argument("--headless", action="store_true", help="run the simulated loop without napari")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for report.json and the plots")
    p.add_argument("--budgets", default="0,5,10", help="annotated patches after each round")
    p.add_argument("--seed", type=int, default=0)
    add_loop_options(p)
    add_model_options(p)
    p.set_defaults(handler=run)


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
    from ..loop import replay_pairs, simulate
    from ..models import working_factor
    from ..splits import position_split

    started = time.perf_counter()
    budgets = parse_budgets(args.budgets)
    config = loop_config(args, 256)
    pool, test = position_split(load_pairs(SAMPLE_DIR / "images", SAMPLE_DIR / "masks"))
    model = load_model_from_args(args)
    factor = working_factor(model, args.mpp)
    rounds = sum(-(-(b - a) // config.batch) for a, b in zip([0, *budgets], budgets, strict=False)) if budgets else 0
    bar = progress_bar(rounds * config.steps + len(budgets), "demo", args.json)

    def on_event(event) -> None:
        bar.update(1)
        if event["stage"] == "evaluate":
            bar.write(event["message"])

    trajectory = simulate(
        model, pool, test, budgets, "uncertainty", args.seed, factor, config, replay_pairs(), on_event=on_event
    )
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "data": str(SAMPLE_DIR),
        "pool": [p.name for p in pool],
        "test": [p.name for p in test],
        "curve": [
            {"budget": b, "dice_global": d} for b, d in zip(trajectory.budgets, trajectory.dice_global, strict=True)
        ],
        "picks": trajectory.picks,
        "seconds": round(time.perf_counter() - started, 1),
        "files": {"report": "report.json", "overlay": "overlay.png", "plot": "dice_vs_round.png"},
    }
    from ..io import atomic_write_json
    from ..plots import pick_showcase, plot_dice_curve, plot_overlay

    plot_dice_curve(trajectory.budgets, trajectory.dice_global, args.out / "dice_vs_round.png")
    models = {"before": model, f"after {budgets[-1]} patches": trajectory.model}
    plot_overlay(models, pick_showcase(test), factor, config.samples, args.out / "overlay.png")
    atomic_write_json(args.out / "report.json", report)
    lines = [f"budget {c['budget']:>3}: Dice {c['dice_global']:.3f}" for c in report["curve"]]
    emit(
        args,
        report,
        "\n".join([*lines, f"wrote {args.out}/report.json, overlay.png, dice_vs_round.png ({report['seconds']} s)"]),
    )
    return report
