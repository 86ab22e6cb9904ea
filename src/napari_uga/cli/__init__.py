"""The ``uga`` command line.

Each subcommand lives in its own module of this package with a ``register(subparsers)``
function; heavy modules are imported inside the handlers so ``uga --help`` stays fast.
Any :class:`~napari_uga.io.InputError` becomes a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = ("demo", "train", "predict", "evaluate", "simulate", "qc", "batch")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand registered."""
    from .._sample_data import UMCU_MPP

    parser = argparse.ArgumentParser(prog="uga", description="Uncertainty-guided annotation and quality control.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    sub.choices["demo"].set_defaults(mpp=UMCU_MPP)  # the demo's own sample tiles (UMCU) know their scale
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``uga`` console script."""
    from ..io import InputError

    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except InputError as exc:
        print(f"uga {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"uga {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
