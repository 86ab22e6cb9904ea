"""Is the model confidently wrong on a slide's tissue? Changed pixels over the pixels its probabilities expected.

For each split's pool, the shipped model (round 0) predicts every tissue patch audits are drawn
from (as ``estimate_coverage.py``); the truth is :func:`napari_uga.audit.overconfidence` over all
of them. Then ``--draws`` times, ``n`` patches are drawn uniformly, as audits are, and the share of
draws whose interval's low end clears :data:`napari_uga.audit.OVERCONFIDENT` (the rule the session
says it by) is counted.

Pre-registered (stop 35, before any number was read): the rule is "the 90 % interval's low end is
above 2" (the pathologist changed over twice the pixels the model expected to be wrong). It is
kept only if, on the DEV splits, it fires in at most 10 % of draws of 8 audits on the training
centre (RUMC, where the model is right); otherwise the sessions do not say it.
DEV: RUMC halved at random and EBHI DEV splits 0-3; REPORT: UMCU's halves, EBHI 100-103 and the
shipped demo sample's pool (none of them looked at for the rule).

Usage::

    nice -n 10 .venv/bin/python benchmarks/overconfidence.py --part dev
    nice -n 10 .venv/bin/python benchmarks/overconfidence.py --part report
"""

from __future__ import annotations

import json

import numpy as np
from estimate_coverage import splits_of, start, tissue_scores
from loop import RESULTS

from napari_uga._sample_data import SAMPLE_DIR, UMCU_MPP
from napari_uga.audit import OVERCONFIDENT, overconfidence
from napari_uga.io import load_pairs
from napari_uga.splits import position_split

SIZES = (4, 8, 16, 32)
OUT = RESULTS / "overconfidence.json"


def demo_split() -> tuple[str, list, float, str]:
    """The shipped sample's pool, as ``uga demo`` splits it."""
    pool, _ = position_split(load_pairs(SAMPLE_DIR / "images", SAMPLE_DIR / "masks"))
    return "demo sample pool", pool, UMCU_MPP, "centre"


def main() -> None:
    args, model, results = start(__doc__.splitlines()[0], OUT)
    splits = splits_of(args.part) + ([demo_split()] if args.part == "report" else [])
    for name, pool, mpp, preset in splits:
        scores, _ = tissue_scores(model, pool, mpp, preset)
        truth = overconfidence(scores)
        rng = np.random.default_rng(0)
        row = {"patches": len(scores), "ratio": None if truth is None else truth.ratio, "fires": {}}
        for n in (n for n in SIZES if n < len(scores)):
            found = [
                overconfidence([scores[i] for i in rng.choice(len(scores), n, replace=False)])
                for _ in range(args.draws)
            ]
            row["fires"][str(n)] = float(np.mean([f is not None and f.low > OVERCONFIDENT for f in found]))
        fires = "  ".join(f"n {n}: {share:.2f}" for n, share in row["fires"].items())
        print(
            f"{name:24} {len(scores):4} patches, ratio {'-' if truth is None else f'{truth.ratio:.2f}'} "
            f"| rule fires in {fires}",
            flush=True,
        )
        results[f"{args.part} / {name}"] = row
    OUT.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
