"""``uga train``: train the segmentation network from scratch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_model_options, drive, emit, progress_bar


def register(sub) -> None:
    """Add the ``train`` subcommand."""
    p = sub.add_parser("train", help="train a network from scratch on images + masks")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output weights (.safetensors)")
    p.add_argument("--val-pattern", default=None, help="images whose name contains this are held out for validation")
    p.add_argument(
        "--val-side",
        choices=("all", "left", "right"),
        default="all",
        help="hold out all matching tiles, or only their left or right half by position "
        "(overlapping tiles kept together)",
    )
    p.add_argument(
        "--balance",
        action="store_true",
        help="draw tumour and tumour-free tiles equally, and each appearance cluster within them equally",
    )
    p.add_argument("--augment-strength", type=float, default=1.0, help="scale of the stain and colour jitter")
    p.add_argument("--epochs", type=int, default=8, help="validation rounds; the best one is kept")
    p.add_argument("--steps-per-epoch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", type=int, default=16, help="channels of the first U-Net level")
    add_model_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict:
    """Train, keep the weights with the best validation Dice, save them with their provenance."""
    from ..io import InputError, load_pairs
    from ..models import ModelConfig, UNet, pick_device, save_model, working_factor
    from ..training import fit

    pairs = load_pairs(args.images, args.masks)
    val = [p for p in pairs if args.val_pattern and args.val_pattern in p.name]
    if val and args.val_side != "all":
        from ..splits import position_split

        val = position_split(val)[args.val_side == "right"]
    names = {p.name for p in val}
    pairs = [p for p in pairs if p.name not in names]
    if not pairs:
        raise InputError(f"{args.images}: no training image left after --val-pattern {args.val_pattern!r}")
    if args.epochs < 1 or args.steps_per_epoch < 1:
        raise InputError("train: --epochs and --steps-per-epoch must be at least 1")
    model = UNet(ModelConfig(base=args.base)).to(pick_device(args.device))
    steps = args.epochs * args.steps_per_epoch
    run = fit(
        model,
        pairs,
        val,
        steps,
        seed=args.seed,
        factor=working_factor(model, args.mpp),
        val_every=args.steps_per_epoch,
        balance=args.balance,
        strength=args.augment_strength,
    )
    result = drive(run, progress_bar(steps, "train", args.json))
    extra = {
        "train_images": [p.name for p in pairs],
        "val_images": [p.name for p in val],
        "seed": args.seed,
        "balance": args.balance,
        "augment_strength": args.augment_strength,
        "steps": steps,
        "steps_per_epoch": args.steps_per_epoch,
        "best_step": result["step"],
        "val_dice": result["val_dice"],
        "command": "uga " + " ".join(sys.argv[1:]),
    }
    save_model(model, args.out, extra)
    payload = {"out": str(args.out), "val_dice": result["val_dice"], "best_step": result["step"]}
    emit(args, payload, f"saved {args.out} (validation Dice {result['val_dice']:.3f} at step {result['step']})")
    return payload
