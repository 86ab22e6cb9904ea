"""``uga evaluate``: Dice of a model against ground-truth masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_model_options, emit, load_model_from_args


def register(sub) -> None:
    """Add the ``evaluate`` subcommand."""
    p = sub.add_parser("evaluate", help="Dice of the model's prediction against masks")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True)
    add_model_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict:
    """Evaluate and print ``dice_global``, ``dice_mean``, ``n_images``, ``per_image``."""
    from ..io import load_pairs
    from ..models import working_factor
    from ..training import evaluate

    pairs = load_pairs(args.images, args.masks)
    model = load_model_from_args(args)
    result = evaluate(model, pairs, working_factor(model, args.mpp))
    human = (
        f"dice_global {result['dice_global']:.4f}  dice_mean {result['dice_mean']:.4f}  ({result['n_images']} images)"
    )
    emit(args, result, human)
    return result
