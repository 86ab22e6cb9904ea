"""One plot per split with every strategy, from the JSON files that ``benchmarks/loop.py`` wrote.

Usage::

    .venv/bin/python benchmarks/loop_figure.py --tags centre_unc,centre_rand --dataset umcu
    .venv/bin/python benchmarks/loop_figure.py --tags organ_unc,organ_rand --dataset ebhi

Writes ``benchmarks/results/loop_<dataset>_<split>.png`` (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_uga.plots import plot_curves

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    """Merge the strategies of several runs per split and plot them together."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tags", required=True, help="comma-separated tags of loop.py runs")
    parser.add_argument("--dataset", choices=("umcu", "ebhi"), required=True)
    args = parser.parse_args()
    merged: dict[str, dict] = {}
    for tag in args.tags.split(","):
        run = json.loads((RESULTS / f"loop_{tag}_{args.dataset}.json").read_text())
        for split, curves in run["splits"].items():
            seeds = {len(c["per_seed"]) for c in curves.values()}
            for strategy, c in curves.items():
                label = f"{strategy} ({tag}, {max(seeds)} seeds)"
                merged.setdefault(split, {})[label] = (c["budgets"], c["mean"], c["std"])
    for split, curves in merged.items():
        slug = split.replace(" ", "_").replace(">", "").replace("-", "_")
        print(plot_curves(curves, RESULTS / f"loop_{slug}.png", split))


if __name__ == "__main__":
    main()
