"""The ``uga`` command line: demo, train, predict, evaluate, simulate.

Heavy modules are imported inside each subcommand so ``uga --help`` stays fast. Any
:class:`~napari_uga.io.InputError` becomes a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS: dict[str, Callable[[argparse.Namespace], object]] = {}


def command(name: str):
    """Register a subcommand handler."""

    def register(func):
        COMMANDS[name] = func
        return func

    return register


def _emit(args: argparse.Namespace, payload: dict, human: str) -> None:
    print(json.dumps(payload, indent=None if args.json else 2) if args.json else human)


def _progress(total: int, desc: str, quiet: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, leave=False)


def _model_args(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, args.device)


@command("train")
def train_command(args: argparse.Namespace) -> dict:
    """Train a network from scratch on a folder of images and masks."""
    from .io import InputError, load_pairs
    from .models import ModelConfig, UNet, save_model, working_factor
    from .training import fit

    pairs = load_pairs(args.images, args.masks)
    val = [p for p in pairs if args.val_pattern and args.val_pattern in p.name]
    pairs = [p for p in pairs if p not in val]
    if not pairs:
        raise InputError(f"{args.images}: no training image left after --val-pattern {args.val_pattern!r}")
    model = UNet(ModelConfig(base=args.base)).to(_device(args.device))
    factor = working_factor(model, args.mpp)
    bar = _progress(args.epochs * args.steps_per_epoch, "train", args.json)
    run = fit(model, pairs, val, args.epochs * args.steps_per_epoch, seed=args.seed, factor=factor)
    result = _drive(run, bar)
    extra = {
        "train_images": [p.name for p in pairs],
        "val_images": [p.name for p in val],
        "seed": args.seed,
        "steps": args.epochs * args.steps_per_epoch,
        "best_step": result["step"],
        "val_dice": result["val_dice"],
        "command": " ".join(sys.argv),
    }
    save_model(model, args.out, extra)
    payload = {"out": str(args.out), "val_dice": result["val_dice"], "best_step": result["step"]}
    _emit(args, payload, f"saved {args.out} (validation Dice {result['val_dice']:.3f} at step {result['step']})")
    return payload


def _device(preference: str):
    from .models import pick_device

    return pick_device(preference)


def _drive(events, bar):
    """Run a progress-event generator to its end, updating a tqdm bar; returns its value."""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            bar.close()
            return stop.value
        bar.n = event["step"]
        if event["loss"] is not None:
            bar.set_postfix(loss=f"{event['loss']:.3f}", refresh=False)
        if event["val_loss"] is not None:
            bar.write(f"{event['stage']}: {event['message']}")
        bar.refresh()


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="weights (.safetensors); default: shipped model")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--mpp", type=float, default=None, help="µm per pixel of the images (default 0.243, Camelyon level 0)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="uga", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a network from scratch")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True)
    p.add_argument("--val-pattern", default=None, help="images whose name contains this are held out for validation")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps-per-epoch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", type=int, default=16, help="channels of the first U-Net level")
    _add_model_options(p)
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print JSON to stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``uga`` console script."""
    from .io import InputError

    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except InputError as exc:
        print(f"uga {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"uga {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
