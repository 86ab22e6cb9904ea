"""What a session measures about itself: the audit estimate against held-out Dice, do-no-harm, --shift auto.

Two parts:

``--first-batch``: the starting model's pooled Dice on the first batch of corrections (4
uncertainty-ranked patches + 4 quarter-patch audits), on the DEV splits only: RUMC (the training centre, where
the model is right) and the EBHI DEV patient splits (seeds 0..; a new organ). The cut of
``--shift auto`` (``napari_uga.audit.GOOD_DICE``) is chosen from these numbers; UMCU and the
EBHI REPORT splits (seeds 100..) are never looked at for it.

The grid (default): ``simulate`` from the shipped model with the defaults of ``uga simulate``
(audit share 0.2, no-harm on, shift auto) and the variants ``--no-harm off`` and audit share 0,
on UMCU both directions (``centre`` is the right preset there) and an EBHI REPORT split
(``organ``), seeds 0..N-1. A closing batch after the last budget is scored, not trained on, so
the last round has an estimate too. Each run is cached as JSON under
``benchmarks/.cache/in_session`` (git-ignored), so an interrupted grid resumes.

The estimate (pooled Dice over the pool's tissue patches) is compared with ``dice_global`` of
the test split (pooled over the test tiles): both are pooled Dice, over different tissue of the
same domain.

Usage::

    nice -n 10 .venv/bin/python benchmarks/in_session.py --first-batch
    nice -n 10 .venv/bin/python benchmarks/in_session.py --gate
    nice -n 10 .venv/bin/python benchmarks/in_session.py --seeds 5 --variants default,harm_off,no_audit
    nice -n 10 .venv/bin/python benchmarks/in_session.py --only "split 800" --ebhi-half report8 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from loop import DATA, RESULTS
from strategies import HALF_START, ebhi_splits, umcu_splits

from napari_uga.audit import pooled_estimate, score_patch, tissue_p_value
from napari_uga.io import load_pairs
from napari_uga.loop import Oracle, batch_split, config_for, draw_audits, replay_pairs, simulate, tissue_sample
from napari_uga.models import load_model, working_factor
from napari_uga.proposals import propose, random_candidates
from napari_uga.quality import default_qc_model
from napari_uga.uncertainty import predict_probability

CACHE = Path(__file__).resolve().parent / ".cache" / "in_session"
VARIANTS = {
    "default": {"audit_share": 0.2, "no_harm": True},
    "harm_off": {"audit_share": 0.2, "no_harm": False},
    "no_audit": {"audit_share": 0.0, "no_harm": True},
    "clear": {"audit_share": 0.2, "no_harm": True, "harm_rule": "clear"},  # a rollback needs a clear loss (stop 33)
    "clear_or_large": {"audit_share": 0.2, "no_harm": True, "harm_rule": "clear_or_large"},  # or a large one (stop 35)
}
assert {**VARIANTS["harm_off"], "no_harm": True} == VARIANTS["default"]  # _load's reuse of default runs relies on it
STRICTER = ("clear", "clear_or_large")  # rules that roll back only where the default's would: same run if it never did
BUDGETS = [0, 5, 10, 20]
OUT = RESULTS / "in_session.json"
GATE_OUT = RESULTS / "in_session_gate.json"


def rumc_split() -> tuple[str, list, list, float]:
    """RUMC tiles (the training centre) halved at random: a DEV split where the model is right."""
    rumc = DATA / "camelyon16_rumc"
    pairs = load_pairs(rumc / "images", rumc / "masks")
    order = np.random.default_rng(0).permutation(len(pairs))
    half = len(pairs) // 2
    return "rumc", [pairs[i] for i in order[:half]], [pairs[i] for i in order[half:]], 0.243


def first_batch(model, split, seed: int) -> float | None:
    """The starting model's pooled Dice on a first batch (4 proposed, 4 quarter audits), as ``--shift auto`` sees it."""
    name, pool, _, mpp = split
    factor = working_factor(model, mpp)
    config = config_for("centre")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_proposed, n_audit = batch_split(5, 0.2, config.subdivide)
    picks = propose(model, pool, n_proposed, factor, config, [], "uncertainty", rng)
    picks += draw_audits(pool, n_audit, config, [p.box for p in picks], rng)
    oracle = Oracle(pool)
    scores = []
    for p in picks:
        annotation = oracle.annotate(p)
        scores.append(score_patch(predict_probability(model, annotation.image, factor=factor), annotation.mask))
    estimate = pooled_estimate(scores)
    return None if estimate is None else estimate.dice


def run(model, split, variant: str, seed: int, replay) -> dict:
    """One simulate run of a variant (cached)."""
    name, pool, test, mpp = split
    done = _load(name, variant, seed)
    if done is not None:
        return done
    path = _cached(name, variant, seed)
    started = time.perf_counter()
    presets = {shift: config_for(shift) for shift in ("centre", "organ")}
    t = simulate(
        model, pool, test, BUDGETS, "uncertainty", seed, working_factor(model, mpp), replay=replay,
        presets=presets, closing_batch=True, pool_truth=True, **VARIANTS[variant],
    )  # fmt: skip
    record = {
        "budgets": t.budgets,
        "dice": t.dice_global,
        "estimated": t.estimated_dice,
        "pool_dice": t.pool_dice,
        "interval": t.estimate_interval,
        "hard": t.hard_dice,
        "round_in_use": t.round_in_use,
        "rollbacks": t.rollbacks_by_budget,
        "shift": t.shift,
        "stop": t.stop_budget,
        "handed_over": t.handed_over,
        "handed_over_dice": t.handed_over_dice,
        "handover_rule": "clear_gain",  # handed over only if it clearly beats the starting model on the closing batch
        "audits": "held_out",  # never trained on: every round is scored on every audit (stop 32)
        "harm_rule": "parent_then_start_on_audits",  # below its parent or round 0: on the audits once trained,
        # and on the next batch with them (stop 32)
        "harm_evidence": VARIANTS[variant].get("harm_rule", "margin"),  # a loss beyond the margin, or a clear one
        "seconds": round(time.perf_counter() - started, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def gate_verdicts(model) -> None:
    """The ``auto`` gate on each split's pool (the sample ``simulate`` reads): merged p-value and verdict."""
    level = default_qc_model().domain_level
    splits = [rumc_split(), *umcu_splits(), *(s for half in HALF_START for s in ebhi_splits(half, 4))]
    verdicts = {}
    for name, pool, _, mpp in splits:
        images = tissue_sample(pool, [c.box for c in random_candidates(pool, config_for("centre"))])
        p = tissue_p_value(model, images, working_factor(model, mpp))
        verdicts[name] = {"p": p, "patches": len(images), "new": p is not None and p <= level}
        verdict = "new" if verdicts[name]["new"] else "not new"
        print(f"{name:18} {len(images):3} patches: merged p {_f(p)}, {verdict}", flush=True)
    GATE_OUT.write_text(json.dumps({"level": level, "splits": verdicts}, indent=1))


def _cached(name: str, variant: str, seed: int) -> Path:
    return CACHE / f"{name.replace(' ', '_').replace('->', '_to_')}_{variant}_seed{seed}.json"


def _load(name: str, variant: str, seed: int) -> dict | None:
    """A finished run from the cache; ``harm_off`` reuses the default run where the rule never acted."""
    path = _cached(name, variant, seed)
    if path.exists():
        return json.loads(path.read_text())
    default = _cached(name, "default", seed)
    if variant in ("harm_off", *STRICTER) and default.exists():
        record = json.loads(default.read_text())
        # a rollback on the closing batch is not in ``rollbacks``: it shows as another round handed over
        if record["rollbacks"][-1] == 0 and record["handed_over"] == record["round_in_use"][-1]:
            return record  # no rollback: without the rule, or with a stricter one, it is the same run (deterministic)
    return None


def summarise(name: str, variant: str, runs: list[dict]) -> dict:
    """Per budget: held-out Dice, estimate error and coverage, rollbacks; harm against zero-shot."""
    dice = np.array([r["dice"] for r in runs])
    out = {"dice_mean": dice.mean(0).tolist(), "dice_sd": dice.std(0).tolist(), "shift": [r["shift"] for r in runs]}
    for against in ("dice", "pool_dice"):  # the test split's tissue, and the pool's own unannotated tissue
        errors, covered = [], []
        for r in runs:
            for b, d, e, span in zip(r["budgets"], r[against], r["estimated"], r["interval"], strict=True):
                if b >= 10 and e is not None and d is not None:
                    errors.append(abs(e - d))
                    covered.append(span[0] <= d <= span[1])
        out[f"error_vs_{against}"] = float(np.mean(errors)) if errors else None
        out[f"coverage_vs_{against}"] = float(np.mean(covered)) if covered else None
        out["estimates_ge10"] = len(errors)
    out["worst_drop"] = float((dice - dice[:, :1]).min())  # most negative (budget Dice - zero-shot) of any seed
    out["harmed_runs"] = int(((dice - dice[:, :1]) < -0.01).any(1).sum())
    out["rollbacks"] = int(sum(r["rollbacks"][-1] for r in runs))
    ruled = [r for r in runs if r.get("handover_rule") == "clear_gain"]  # runs cached under older rules differ
    # the worst seed's drop of the model the session ends with, below zero-shot
    gains = [r["handed_over_dice"] - r["dice"][0] for r in ruled]
    out["handed_over_drop"] = min(gains, default=None)
    out["handed_over_runs"] = len(ruled)
    out["handed_over_gain_mean"] = float(np.mean(gains)) if gains else None
    out["handed_over_round_0"] = sum(r["handed_over"] == 0 for r in ruled)
    means = "  ".join(
        f"{b}: {m:.3f}±{s:.3f}" for b, m, s in zip(BUDGETS, out["dice_mean"], out["dice_sd"], strict=True)
    )
    print(
        f"{name:18} {variant:9} {means} | estimate (budgets >= 10, n {out['estimates_ge10']}): error vs test "
        f"{_f(out['error_vs_dice'])} cover {_f(out['coverage_vs_dice'])}, vs pool {_f(out['error_vs_pool_dice'])} "
        f"cover {_f(out['coverage_vs_pool_dice'])} | worst drop {out['worst_drop']:+.3f}, "
        f"harmed {out['harmed_runs']}/{len(runs)}, "
        f"rollbacks {out['rollbacks']} | handed over (n {len(ruled)}): worst drop {_f(out['handed_over_drop'])}, "
        f"mean gain {_f(out['handed_over_gain_mean'])}, round 0 in {out['handed_over_round_0']} "
        f"| shift {out['shift']}",
        flush=True,
    )
    return out


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-batch", action="store_true", help="the DEV scan that sets the auto cut")
    parser.add_argument("--gate", action="store_true", help="only the tissue gate's verdict on every split's pool")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--variants", default="default,harm_off,no_audit")
    parser.add_argument("--only", default="", help="run only the splits whose name contains this")
    parser.add_argument("--summary", action="store_true", help="summarise the cached runs only")
    parser.add_argument("--run-seeds", default="", help="run only these seeds (e.g. 0,2,4), to share a grid")
    parser.add_argument("--ebhi-half", default="report", choices=tuple(HALF_START), help="the EBHI split's half")
    parser.add_argument("--ebhi-splits", type=int, default=1, help="EBHI splits of that half")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(device="cpu")
    if args.first_batch:
        for split in [rumc_split(), *ebhi_splits("dev", 4)]:
            values = [first_batch(model, split, seed) for seed in range(3)]
            print(f"{split[0]:14} first-batch Dice of the starting model: {values}", flush=True)
        return
    if args.gate:
        gate_verdicts(model)
        return
    replay = replay_pairs()
    splits = [*umcu_splits(), *ebhi_splits(args.ebhi_half, args.ebhi_splits)]
    chosen = [split for split in splits if args.only in split[0]]
    if not args.summary:
        for variant in args.variants.split(","):  # variants outermost: the default grid is complete first
            for seed in [int(s) for s in args.run_seeds.split(",")] if args.run_seeds else range(args.seeds):
                for split in chosen:
                    run(model, split, variant, seed, replay)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for split in chosen:
        for variant in args.variants.split(","):
            runs = [r for s in range(args.seeds) if (r := _load(split[0], variant, s)) is not None]
            if runs:
                results[f"{split[0]} / {variant}"] = summarise(split[0], variant, runs)
    OUT.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
