"""Benchmark the annotation loop: Dice on held-out tiles against the number of annotated patches.

Splits (documented in docs/benchmarks.md):
- UMCU (centre shift): tiles split by position, stratified by class, overlapping tiles kept on one
  side (``napari_uga.splits.position_split``); both directions (pool=left/test=right and reverse).
- EBHI (organ shift): patients split in half (stratified by class, fixed seed); pool = one half.

Usage::

    .venv/bin/python benchmarks/loop.py --dataset umcu --seeds 5 --budgets 0,5,10,20
    .venv/bin/python benchmarks/loop.py --dataset ebhi --seeds 5 --diversity clusters+balanced

Prints a table (mean ± sd over seeds) and writes JSON + a plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from napari_uga.io import load_pairs
from napari_uga.loop import SHIFTS, LoopConfig, config_for, replay_pairs, simulate
from napari_uga.models import load_model, working_factor
from napari_uga.plots import plot_curves
from napari_uga.splits import position_split

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def ebhi_patient_split(seed: int = 0):
    """EBHI pool/test halves by patient, stratified by each patient's class."""
    with open(DATA / "index.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["group"] == "ebhi_seg"]
    by_class: dict[str, list[str]] = {}
    for patient, cls in sorted({(r["patient"], r["orig_class"]) for r in rows}):
        by_class.setdefault(cls, []).append(patient)
    rng = np.random.default_rng(seed)
    pool_patients: set[str] = set()
    for patients in by_class.values():
        rng.shuffle(patients)
        pool_patients.update(patients[: len(patients) // 2])
    pairs = load_pairs(DATA / "ebhi_seg" / "images", DATA / "ebhi_seg" / "masks")
    patient_of = {r["name"]: r["patient"] for r in rows}
    pool = [p for p in pairs if patient_of[p.name] in pool_patients]
    test = [p for p in pairs if patient_of[p.name] not in pool_patients]
    return pool, test


SHIFT_OF = {"umcu": "centre", "ebhi": "organ"}  # UMCU: another hospital and scanner; EBHI: colon, not lymph node


def splits(dataset: str, ebhi_mpp: float):
    """(name, pool, test, mpp) for each split of a dataset."""
    if dataset == "umcu":
        umcu = DATA / "camelyon16_umcu"
        left, right = position_split(load_pairs(umcu / "images", umcu / "masks"))
        return [("umcu left->right", left, right, 0.226), ("umcu right->left", right, left, 0.226)]
    pool, test = ebhi_patient_split()
    return [("ebhi patients", pool, test, ebhi_mpp)]


def main() -> None:
    """Run every split x strategy x seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("umcu", "ebhi"), required=True)
    parser.add_argument("--budgets", default="0,5,10,20")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--strategies", default="uncertainty,random")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tag", default="default", help="name of this configuration in the output files")
    parser.add_argument("--ebhi-mpp", type=float, default=0.97, help="µm/px assumed for EBHI tiles (about 1)")
    parser.add_argument(
        "--replay", type=Path, default=None, help="replay folder with images/ and masks/ (default: shipped)"
    )
    parser.add_argument("--only", default="", help="run only the splits whose name contains this (e.g. right->left)")
    parser.add_argument(
        "--shift", choices=tuple(SHIFTS), default=None, help="loop preset (default: centre for UMCU, organ for EBHI)"
    )
    defaults = LoopConfig()
    for field, value in vars(defaults).items():
        kind = (lambda text: text.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        option = f"--{field.replace('_', '-')}"
        parser.add_argument(option, type=kind, default=None, help=f"overrides the preset (centre: {value})")
    args = parser.parse_args()
    overrides = {f: getattr(args, f) for f in vars(defaults) if getattr(args, f) is not None}
    config = config_for(args.shift or SHIFT_OF[args.dataset], **overrides)
    budgets = [int(b) for b in args.budgets.split(",")]
    model = load_model(args.model, "auto")
    replay = replay_pairs(args.replay)
    shift = args.shift or SHIFT_OF[args.dataset]
    results = {"config": vars(config), "shift": shift, "tag": args.tag, "ebhi_mpp": args.ebhi_mpp, "splits": {}}
    for name, pool, test, mpp in splits(args.dataset, args.ebhi_mpp):
        if args.only not in name:
            continue
        factor = working_factor(model, mpp)
        curves = {}
        for strategy in args.strategies.split(","):
            started = time.perf_counter()
            runs = [
                simulate(model, pool, test, budgets, strategy, s, factor, config, replay).dice_global
                for s in range(args.seeds)
            ]
            arr = np.array(runs)
            curves[strategy] = {
                "budgets": budgets,
                "mean": arr.mean(0).tolist(),
                "std": arr.std(0).tolist(),
                "per_seed": runs,
                "seconds": round(time.perf_counter() - started, 1),
            }
            points = zip(budgets, arr.mean(0), arr.std(0), strict=True)
            print(
                f"{name:18} {strategy:11} "
                + "  ".join(f"{b:>3}: {m:.3f}±{s:.3f}" for b, m, s in points)
                + f"   ({curves[strategy]['seconds']} s, {len(pool)} pool / {len(test)} test tiles)",
                flush=True,
            )
        results["splits"][name] = curves
        slug = name.replace(" ", "_").replace(">", "").replace("-", "_")
        plot_curves(
            {k: (v["budgets"], v["mean"], v["std"]) for k, v in curves.items()},
            RESULTS / f"loop_{args.tag}_{slug}.png",
            f"{name} ({args.tag})",
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"loop_{args.tag}_{args.dataset}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
