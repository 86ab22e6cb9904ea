"""``uga predict``: probability, uncertainty and mask files per image."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_model_options, emit, load_model_from_args, progress_bar


def register(sub) -> None:
    """Add the ``predict`` subcommand."""
    p = sub.add_parser("predict", help="write <name>_prob.tif, <name>_uncertainty.tif and <name>_mask.png per image")
    p.add_argument("--images", type=Path, required=True, help="an image file or a folder of images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=8, help="MC-dropout samples (1 = deterministic)")
    p.add_argument("--tta", choices=("none", "flips", "d4"), default="none", help="test-time augmentation")
    p.add_argument(
        "--measure",
        choices=("entropy", "mutual_information", "variance"),
        default="entropy",
        help="which uncertainty map goes to <name>_uncertainty.tif",
    )
    add_model_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> dict:
    """Predict every image and write its three files atomically."""
    from ..io import InputError, list_images, read_image, write_array
    from ..models import working_factor
    from ..uncertainty import compute_uncertainty

    if args.samples < 1:
        raise InputError("predict: --samples must be at least 1")
    files = list_images(args.images)
    model = load_model_from_args(args)
    factor = working_factor(model, args.mpp)
    written = []
    bar = progress_bar(len(files), "predict", args.json)
    for path in files:
        maps = compute_uncertainty(model, read_image(path), samples=args.samples, tta=args.tta, factor=factor)
        outputs = {
            "prob": write_array(args.out / f"{path.stem}_prob.tif", maps.probability),
            "uncertainty": write_array(args.out / f"{path.stem}_uncertainty.tif", maps.layer(args.measure)),
            "mask": write_array(args.out / f"{path.stem}_mask.png", maps.prediction),
        }
        written.append({"name": path.stem, **{k: str(v) for k, v in outputs.items()}})
        bar.update()
    bar.close()
    payload = {"out": str(args.out), "n_images": len(written), "images": written}
    emit(args, payload, f"wrote {3 * len(written)} files for {len(written)} images to {args.out}")
    return payload
