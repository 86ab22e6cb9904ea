"""How close and how honest the audit estimate is for a given number of audits: error, coverage, width.

For each split's pool, the shipped model (round 0) predicts every tissue patch audits are drawn
from (quarter patches, the boxes ``loop.simulate`` and the dock draw them from); the truth is its
pooled Dice over all of them (what an audit estimate is about). Then ``--draws`` times, ``n``
patches are drawn uniformly without replacement, as audits are, and each estimator's value and
interval at the 90 % level are compared with the truth.

Estimators: ``pooled`` (:func:`napari_uga.audit.pooled_estimate`, the audits alone), ``ppi``
(:func:`napari_uga.audit.ppi_estimate`, what ``simulate`` reports: the audits correct the round's own
maps of all the tissue; the dock reports ``pooled``), each with its interval on the Dice scale or
(``_logit``) the logit scale.

Pre-registered choice (stop 33, before any logit number was seen): of ``pooled``, ``ppi`` and
their ``_logit`` forms (the interval on the logit scale, :func:`napari_uga.audit._bounds`), ``simulate``
uses the one with the highest worst coverage over the DEV splits at n = 8, 16, 32 (what a session
has at budgets 10 to 40); within 0.02 of it, the narrowest on average. Chosen: ``ppi_logit``
(worst 0.66, RUMC at n = 8; ``pooled_logit`` 0.60, ``pooled`` 0.54, ``ppi`` 0.52).

DEV (choose on): RUMC halved at random (the training centre) and EBHI DEV splits 0-3. REPORT:
UMCU's two position halves and EBHI REPORT splits 100-103 (seen by other benchmarks, never by a
choice of interval). Runs on one torch thread; prints a table and writes
``benchmarks/results/estimate_coverage.json``.

Usage::

    nice -n 10 .venv/bin/python benchmarks/estimate_coverage.py --part dev
    nice -n 10 .venv/bin/python benchmarks/estimate_coverage.py --part report
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from in_session import rumc_split
from loop import RESULTS
from strategies import ebhi_splits, umcu_splits

from napari_uga.audit import LEVEL, PatchScore, Proxies, pooled_estimate, ppi_estimate, score_patch
from napari_uga.loop import Oracle, audit_config, config_for
from napari_uga.models import load_model, working_factor
from napari_uga.proposals import random_candidates
from napari_uga.uncertainty import predict_probability

SIZES = (4, 8, 16, 32)
ESTIMATORS = {
    "pooled": lambda scores, proxies: pooled_estimate(scores, scale="raw"),
    "ppi": lambda scores, proxies: ppi_estimate(scores, proxies, scale="raw"),
    "pooled_logit": lambda scores, proxies: pooled_estimate(scores, scale="logit"),
    "ppi_logit": lambda scores, proxies: ppi_estimate(scores, proxies, scale="logit"),  # sessions' (stop 33)
}
OUT = RESULTS / "estimate_coverage.json"


def tissue_scores(model, pool, mpp: float, preset: str) -> tuple[list[PatchScore], Proxies]:
    """Round 0's score and proxies on every audit patch of the pool."""
    factor = working_factor(model, mpp)
    maps = {p.name: predict_probability(model, p.image, factor=factor) for p in pool}
    boxes = [c.box for c in random_candidates(pool, audit_config(config_for(preset)))]
    oracle = Oracle(pool)
    crops = [box.crop(maps[box.image]) for box in boxes]
    scores = [score_patch(crop, oracle.annotate(box).mask) for crop, box in zip(crops, boxes, strict=True)]
    return scores, Proxies.of(crops)


def draws_of(scores, proxies, truth: float, n: int, draws: int, rng) -> dict:
    """Each estimator's mean |error|, coverage and mean width over ``draws`` uniform samples of ``n`` patches."""
    out = {}
    picks = [rng.choice(len(scores), n, replace=False) for _ in range(draws)]  # the same draws for each estimator
    for name, estimator in ESTIMATORS.items():
        errors, covered, widths = [], [], []
        for pick in picks:
            estimate = estimator([scores[i] for i in pick], proxies)
            if estimate is None:  # no tumour in the draw, and no maps to fall back on
                continue
            errors.append(abs(estimate.dice - truth))
            covered.append(estimate.low <= truth <= estimate.high)
            widths.append(estimate.high - estimate.low)
        out[name] = {
            "error": float(np.mean(errors)),
            "coverage": float(np.mean(covered)),
            "width": float(np.mean(widths)),
            "none": draws - len(errors),
        }
    return out


def splits_of(part: str) -> list[tuple[str, list, float, str]]:
    """(name, pool, µm/px, preset) of the part's splits."""
    if part == "dev":
        name, pool, _, mpp = rumc_split()
        return [(name, pool, mpp, "centre"), *((n, p, m, "organ") for n, p, _, m in ebhi_splits("dev", 4))]
    umcu = [(f"{n} pool", p, m, "centre") for n, p, _, m in umcu_splits()]
    return [*umcu, *((n, p, m, "organ") for n, p, _, m in ebhi_splits("report", 4))]


def start(description: str, out) -> tuple[argparse.Namespace, object, dict]:
    """A round-0 study's command line (``--part``, ``--draws``), the shipped model on one thread, its results so far."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--part", choices=("dev", "report"), default="dev")
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args, load_model(device="cpu"), json.loads(out.read_text()) if out.exists() else {}


def main() -> None:
    args, model, results = start(__doc__.splitlines()[0], OUT)
    for name, pool, mpp, preset in splits_of(args.part):
        scores, proxies = tissue_scores(model, pool, mpp, preset)
        truth = pooled_estimate(scores)
        if truth is None:
            continue
        rng = np.random.default_rng(0)
        row = {"patches": len(scores), "truth": truth.dice, "level": LEVEL}
        for n in SIZES:
            if n < len(scores):
                row[str(n)] = draws_of(scores, proxies, truth.dice, n, args.draws, rng)
                said = "  ".join(
                    f"{e} err {v['error']:.3f} cover {v['coverage']:.2f} width {v['width']:.2f}"
                    for e, v in row[str(n)].items()
                )
                print(f"{name:24} {len(scores):4} patches, truth {truth.dice:.3f} | n {n:2}: {said}", flush=True)
        results[f"{args.part} / {name}"] = row
    OUT.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
