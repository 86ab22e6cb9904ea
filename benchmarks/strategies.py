"""Proposal strategies over many patient splits: a DEV half to choose on, a REPORT half to report.

EBHI (``organ`` preset): each split is ``ebhi_patient_split(seed)`` (patients halved within each
class, its own pool and test patients); DEV splits use seeds 0, 1, ..., REPORT splits 100, 101, ...,
so no choice made on DEV numbers has seen a REPORT split. UMCU (``centre`` preset): the two
position-split directions; nothing is chosen on them (report only).

Each (split, strategy, training seed) run is ``napari_uga.loop.simulate`` from the shipped model,
kept as JSON under ``benchmarks/.cache/strategies/runs`` (git-ignored) so an interrupted benchmark
resumes; the starting model's candidates of every tile and each split's zero-shot Dice are cached
too. Runs on one torch thread. A strategy's row is the Dice of the preset's own way to predict
(``organ``: ``soup+flips`` since stop 29); its ``@plain``, ``@flips``, ``@pair``, ``@soup`` and
``@soup+flips`` rows predict the same runs' rounds otherwise.

Usage::

    nice -n 10 .venv/bin/python benchmarks/strategies.py --dataset ebhi --half dev --splits 4 --seeds 1 \\
        --strategies typical,weighted --budgets 5,10
    nice -n 10 .venv/bin/python benchmarks/strategies.py --dataset umcu --strategies typical --budgets 5 --seeds 4
    nice -n 10 .venv/bin/python benchmarks/strategies.py --time-proposals
    nice -n 10 .venv/bin/python benchmarks/strategies.py --half report4 --strategies uncertainty --budgets 5,10,20
    nice -n 10 .venv/bin/python benchmarks/strategies.py --half report3 --strategies uncertainty --budgets 5,10 \
        --subdivide 1 --diversity none   # whole tiles, the organ preset's proposals before stop 23

Prints mean ± sd over splits x seeds (and the paired difference to random where it ran) and writes
``benchmarks/results/strategies_<dataset>_<half>_<strategies>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from loop import DATA, RESULTS, ebhi_patient_split

from napari_uga.io import load_pairs
from napari_uga.loop import config_for, replay_pairs, simulate
from napari_uga.models import average_weights, load_model, working_factor
from napari_uga.proposals import propose, use_cache
from napari_uga.selection import STRATEGIES, appearance_features, holds_tumour
from napari_uga.splits import position_split
from napari_uga.training import evaluate

CACHE = Path(__file__).resolve().parent / ".cache" / "strategies"
EBHI_MPP = 0.243  # working-scale factor 0.5, as in benchmarks/loop.py
# first EBHI split seed of each half
HALF_START = {
    "dev": 0,
    "report": 100,
    "report2": 200,
    "report3": 300,
    "report4": 400,
    "report5": 500,
    "report6": 600,
    "report7": 700,
    "report8": 800,  # first read in stop 32, by in_session.py --ebhi-half report8 (nothing chosen on it)
    "report9": 900,  # first read in stop 33, by in_session.py --ebhi-half report9 (nothing chosen on it)
    "report10": 1000,  # first read in stop 35, by in_session.py --ebhi-half report10 (nothing chosen on it)
}
PREDICTORS = ("plain", "flips", "pair", "soup", "soup+flips")  # stop 28's screen (predictor_dice)


def ebhi_splits(half: str, n: int, skip: int = 0) -> list[tuple[str, list, list, float]]:
    """(name, pool, test, mpp) of ``n`` EBHI patient splits of one half, after its first ``skip``."""
    seeds = range(HALF_START[half] + skip, HALF_START[half] + skip + n)
    return [(f"ebhi split {s}", *ebhi_patient_split(s), EBHI_MPP) for s in seeds]


def umcu_splits() -> list[tuple[str, list, list, float]]:
    """Both directions of the UMCU position split."""
    umcu = DATA / "camelyon16_umcu"
    left, right = position_split(load_pairs(umcu / "images", umcu / "masks"))
    return [("umcu left->right", left, right, 0.226), ("umcu right->left", right, left, 0.226)]


def _slug(text: str) -> str:
    return text.replace(" ", "_").replace("->", "_to_")


def zero_shot(model, name: str, test, factor: float) -> float:
    """Dice of the starting model on a split's test tiles (cached)."""
    path = CACHE / "runs" / f"{_slug(name)}_zero_shot.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(evaluate(model, test, factor)["dice_global"]))
    return json.loads(path.read_text())


def run(model, split, strategy: str, seed: int, budgets: list[int], config, replay, tag: str = "") -> dict:
    """One simulate run, from the run cache when one with these budgets (or more) exists.

    ``tag`` names settings that differ from the preset's, so their runs are cached apart.
    """
    name, pool, test, mpp = split
    path = CACHE / "runs" / f"{_slug(name)}_{strategy}{tag}_seed{seed}.json"
    if path.exists():
        record = json.loads(path.read_text())
        # runs from before sub-patches had whole patches, and from before stop 29 predicted plainly
        settings = {"subdivide": 1, "predictor": "plain"} | record["config"]
        if set(budgets) <= set(record["budgets"]) and settings == vars(config) and _predicted_every_way(record):
            return record
    started = time.perf_counter()
    factor = working_factor(model, mpp)
    trajectory = simulate(model, pool, test, budgets, strategy, seed, factor, config, replay)
    record = {
        "budgets": trajectory.budgets,
        "dice": trajectory.dice_global,
        "dice_by_predictor": predictor_dice(trajectory, test, factor),
        "picks": trajectory.picks,
        "seconds": round(time.perf_counter() - started, 1),
        "config": vars(config),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def _predicted_every_way(record: dict) -> bool:
    """Whether a cached run has every way to predict (runs before stop 29 lack ``plain``)."""
    return set(PREDICTORS) <= set(record.get("dice_by_predictor", {}))


def predictor_dice(trajectory, test, factor: float) -> dict[str, list[float]]:
    """Test Dice per budget of every way to predict with the round in use (stop 28's screen).

    ``plain``: the round alone, one pass; ``flips``: the mean over 4 flips (test-time
    augmentation); ``pair``: the mean probability of the round in use and the round it was tuned
    from, ``soup``: one network with their mean weights (the pair is the round alone where it
    was tuned from the starting model).
    """
    out: dict[str, list[float]] = {name: [] for name in PREDICTORS}
    for index in trajectory.round_in_use:
        parent = trajectory.tuned_from[index]
        pair = [trajectory.rounds[index]] + ([trajectory.rounds[parent]] if parent else [])
        soup = average_weights(pair)
        for name, (models, tta) in {
            "plain": (trajectory.rounds[index], "none"),
            "flips": (trajectory.rounds[index], "flips"),
            "pair": (pair, "none"),
            "soup": (soup, "none"),
            "soup+flips": (soup, "flips"),
        }.items():
            out[name].append(evaluate(models, test, factor, tta=tta)["dice_global"])
    return out


def summarise(table: dict[str, dict[str, list[list[float]]]], budgets: list[int]) -> dict:
    """Mean ± sd over every (split, seed) run per strategy, and the paired difference to random."""
    out = {}
    for strategy in next(iter(table.values())):
        rows = np.array([r for split in table.values() for r in split[strategy]])
        entry = {"n": len(rows), "mean": rows.mean(0).tolist(), "sd": rows.std(0).tolist()}
        random = "random" + strategy[strategy.index("@") :] if "@" in strategy else "random"  # predicted alike
        if strategy != random and all(random in split for split in table.values()):
            base = np.array([r for split in table.values() for r in split[random]])
            if base.shape == rows.shape:
                diff = rows - base
                entry |= {"minus_random_mean": diff.mean(0).tolist(), "minus_random_sd": diff.std(0).tolist()}
        out[strategy] = entry
    return {"budgets": budgets, "strategies": out}


def merged_with_earlier_parts(path: Path, config: dict, budgets: list[int], table: dict) -> dict:
    """``table`` with the splits an earlier part (``--skip``) wrote to ``path`` with the same settings and budgets."""
    if not path.exists():
        return table
    earlier = json.loads(path.read_text())
    if earlier.get("config") != config or earlier.get("summary", {}).get("budgets") != budgets:
        return table
    added = sorted(set(earlier["per_split"]) - set(table))
    if added:
        print(f"with the earlier parts' {', '.join(added)} from {path.name}", flush=True)
    return dict(sorted((earlier["per_split"] | table).items()))


def print_summary(title: str, summary: dict) -> None:
    """The summary as one line per strategy."""
    print(title, flush=True)
    for strategy, s in summary["strategies"].items():
        cells = [f"{b:>3}: {m:.3f} ± {d:.3f}" for b, m, d in zip(summary["budgets"], s["mean"], s["sd"], strict=True)]
        line = f"  {strategy:12} n={s['n']:<3}" + "  ".join(cells)
        if "minus_random_mean" in s:
            pairs = zip(s["minus_random_mean"], s["minus_random_sd"], strict=True)
            line += "   vs random " + " ".join(f"{m:+.3f}±{d:.3f}" for m, d in pairs)
        print(line, flush=True)


def time_proposals(model) -> None:
    """Seconds of one proposal round on the 122-tile EBHI pool, uncached: 10 patches' worth with none
    labelled, then 5 (one batch) with those 10 labelled; the ``organ`` preset's quarter patches."""
    pool, _ = ebhi_patient_split(0)
    factor = working_factor(model, EBHI_MPP)
    config = config_for("organ")
    first_k, then_k = 2 * config.batch * config.pieces, config.batch * config.pieces
    timings = {}
    images = {p.name: p.image for p in pool}
    truth = {p.name: p.mask for p in pool}  # the oracle's answers, for expected_error's texture model
    for strategy in STRATEGIES:
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        first = propose(model, pool, first_k, factor, config, [], strategy, rng)
        middle = time.perf_counter()
        known = [(appearance_features(p.box.crop(images[p.image])), holds_tumour(p.box.crop(truth[p.image])))
                 for p in first]  # fmt: skip
        propose(model, pool, then_k, factor, config, [p.box for p in first], strategy, rng, known)
        timings[strategy] = [round(middle - started, 1), round(time.perf_counter() - middle, 1)]
        print(
            f"{strategy:12} {len(pool)} tiles: {timings[strategy][0]} s (none labelled), "
            f"{timings[strategy][1]} s (10 labelled)",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "strategies_proposal_seconds.json").write_text(json.dumps(timings, indent=1))


def main() -> None:
    """Run every split x strategy x seed of one half, print and save the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("ebhi", "umcu"), default="ebhi")
    parser.add_argument("--half", choices=tuple(HALF_START), default="dev", help="EBHI only; UMCU is report only")
    parser.add_argument("--splits", type=int, default=4, help="EBHI splits in the half")
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        help="leave out the half's first splits (parts run in parallel add to one results file)",
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--strategies", default="typical,random,uncertainty")
    parser.add_argument("--budgets", default="5,10,20")
    parser.add_argument("--patch", type=int, help="patch side at full resolution (sub-patches: 112 on EBHI's 224)")
    parser.add_argument("--batch", type=int, help="patches per fine-tuning round (default: the preset's 5)")
    parser.add_argument("--diversity", help="spread of the picks (default: the preset's)")
    parser.add_argument("--subdivide", type=int, help="sub-patches per patch side (default: the preset's; organ: 2)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per round (default: the preset's; organ: 400)")
    parser.add_argument("--label", default="", help="appended to the results file name (keeps earlier results)")
    parser.add_argument("--time-proposals", action="store_true", help="only time one proposal round per strategy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(None, "cpu")
    if args.time_proposals:
        time_proposals(model)
        return
    use_cache(CACHE / "candidates")
    budgets = [int(b) for b in args.budgets.split(",")]
    half = "report" if args.dataset == "umcu" else args.half
    config = config_for("centre" if args.dataset == "umcu" else "organ")
    overrides = {
        k: getattr(args, k)
        for k in ("patch", "batch", "diversity", "subdivide", "steps")
        if getattr(args, k) is not None
    }
    config = replace(config, **overrides)
    tag = "".join(f"_{k}{v}" for k, v in overrides.items())
    replay = replay_pairs() if config.replay_share > 0 else []
    splits = umcu_splits() if args.dataset == "umcu" else ebhi_splits(half, args.splits, args.skip)
    table: dict[str, dict[str, list[list[float]]]] = {}
    for split in splits:
        name, _, test, mpp = split
        base = zero_shot(model, name, test, working_factor(model, mpp))
        table[name] = {}
        for strategy in args.strategies.split(","):
            records = [run(model, split, strategy, seed, budgets, config, replay, tag) for seed in range(args.seeds)]
            table[name][strategy] = [[r["dice"][r["budgets"].index(b)] for b in budgets] for r in records]
            for predictor in PREDICTORS:  # the same runs' rounds, predicted otherwise
                table[name][f"{strategy}@{predictor}"] = [
                    [r["dice_by_predictor"][predictor][r["budgets"].index(b)] for b in budgets] for r in records
                ]
            print(
                f"{name:18} {strategy:12} zero-shot {base:.3f}  "
                + "  ".join(
                    f"{b}: " + "/".join(f"{row[i]:.3f}" for row in table[name][strategy]) for i, b in enumerate(budgets)
                )
                + f"   ({sum(r['seconds'] for r in records):.0f} s)",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    label = f"_{args.label}" if args.label else ""
    path = RESULTS / f"strategies_{args.dataset}_{half}_{args.strategies.replace(',', '+')}{label}.json"
    table = merged_with_earlier_parts(path, vars(config), budgets, table)
    results = {"dataset": args.dataset, "half": half, "config": vars(config), "per_split": table}
    if args.dataset == "umcu":
        results["summary"] = {name: summarise({name: t}, budgets) for name, t in table.items()}
        for name, summary in results["summary"].items():
            print_summary(name, summary)
    else:
        results["summary"] = summarise(table, budgets)
        print_summary(f"EBHI {half} splits", results["summary"])
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
