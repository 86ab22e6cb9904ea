"""Helpers shared by the subcommands: options, output, progress bars."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and ``--mpp``."""
    parser.add_argument("--model", type=Path, default=None, help="weights (.safetensors); default: the shipped model")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="µm per pixel of the images; needed when the files do not say (it is never guessed)",
    )


def emit(args: argparse.Namespace, payload: dict, human: str) -> None:
    """Print JSON with ``--json``, else a human summary."""
    print(json.dumps(payload) if args.json else human)


def progress_bar(total: int, desc: str, quiet: bool = False):
    """A tqdm bar on stderr (so stdout stays clean JSON)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, leave=False, dynamic_ncols=True)


def drive(events, bar):
    """Run a progress-event generator to its end, updating a tqdm bar; returns its value."""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            bar.close()
            return stop.value
        bar.total = max(bar.total or 0, event["total"])
        bar.n = event["step"]
        if event["loss"] is not None:
            bar.set_postfix(loss=f"{event['loss']:.3f}", refresh=False)
        if event["val_loss"] is not None:
            bar.write(f"{event['stage']}: {event['message']}")
        bar.refresh()


def load_model_from_args(args: argparse.Namespace):
    """The network named by ``--model`` (default: shipped) on ``--device``."""
    from ..models import load_model

    return load_model(args.model, args.device)
