"""Seconds for one fine-tune round on 10 annotated patches with a loop preset (default: centre).

The ``centre`` round includes what the dock does first: the starting model labels 24 other
unlabelled 256 px patches (the self-label share).

Usage: ``.venv/bin/python benchmarks/finetune_round.py [--repeats 3] [--threads 2] [--shift centre|organ]``
Prints each run, the median and the machine's load average (other jobs slow it down).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from napari_uga.io import load_pairs
from napari_uga.loop import SHIFTS, Oracle, config_for, finetune, replay_pairs, self_labels
from napari_uga.models import load_model, pick_device
from napari_uga.selection import Box

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "camelyon16_umcu"


def main() -> None:
    """Time ``repeats`` rounds and print the median."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shift", choices=tuple(SHIFTS), default="centre")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = load_pairs(SAMPLE / "images", SAMPLE / "masks")
    oracle = Oracle(pairs)
    annotations = [oracle.annotate(Box(p.name, 0, 0, 256, 256)) for p in pairs[:10]]
    unlabelled = [(Box(p.name, 0, 0, 256, 256), p.image) for p in (pairs[10:] * 3)[:24]]
    model = load_model(None, pick_device(args.device))
    config = config_for(args.shift)
    replay = replay_pairs() if config.replay_share > 0 else []
    times = []
    for seed in range(args.repeats):
        started = time.perf_counter()
        labelled = self_labels(model, unlabelled, 0.5) if config.self_share > 0 else []
        for _ in finetune(model, annotations, replay, 0.5, config, seed=seed, self_labelled=labelled):
            pass
        times.append(time.perf_counter() - started)
    print(
        f"fine-tune round ({args.shift}), 10 patches, {config.steps} steps on {model.head_out.weight.device}: "
        f"runs {[round(t, 1) for t in times]} s, median {statistics.median(times):.1f} s, "
        f"load average {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
