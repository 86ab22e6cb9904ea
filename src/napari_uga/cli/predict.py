"""``uga predict``: probability, uncertainty and mask files per image."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_model_options, emit, load_model_from_args, progress_bar


def register(sub) -> None:
    """Add the ``predict`` subcommand."""
    p = sub.add_parser(
        "predict",
        help="write <name>_prob.tif, <name>_uncertainty.tif and <name>_mask.png per image "
        "(OME-TIFF pyramids for a large slide)",
    )
    p.add_argument(
        "--images", type=Path, required=True, help="an image or slide (SVS, NDPI, ...), a DICOM folder, or a folder"
    )
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
    """Predict every image or slide and write its files atomically.

    Small inputs are read whole through :class:`napari_uga.wsi.Slide` and get three flat files;
    a slide of more than 4096 x 4096 px is processed block by block into probability, entropy
    and prediction OME-TIFF pyramids (:func:`napari_uga.slides.process_slide`). The pixel size
    is ``--mpp``, else the file's; an input with neither stops the command before any work.
    """
    from ..io import InputError, write_array
    from ..models import working_factor
    from ..slides import process_slide
    from ..uncertainty import compute_uncertainty
    from ..wsi import is_large, list_inputs, read_whole, require_scale, slide_name

    if args.samples < 1:
        raise InputError("predict: --samples must be at least 1")
    files = list_inputs(args.images)
    require_scale(files, args.mpp)
    model = load_model_from_args(args)
    written = []
    bar = progress_bar(len(files), "predict", args.json)
    for path in files:
        name = slide_name(path)
        if is_large(path, args.mpp):
            summary = process_slide(model, path, args.out, samples=args.samples, tta=args.tta, mpp=args.mpp)
            written.append({"name": name, **summary["outputs"]})
            bar.update()
            continue
        image, mpp = read_whole(path, args.mpp)
        factor = working_factor(model, mpp)
        maps = compute_uncertainty(model, image, samples=args.samples, tta=args.tta, factor=factor)
        outputs = {
            "prob": write_array(args.out / f"{name}_prob.tif", maps.probability),
            "uncertainty": write_array(args.out / f"{name}_uncertainty.tif", maps.layer(args.measure)),
            "mask": write_array(args.out / f"{name}_mask.png", maps.prediction),
        }
        written.append({"name": name, **{k: str(v) for k, v in outputs.items()}})
        bar.update()
    bar.close()
    payload = {"out": str(args.out), "n_images": len(written), "images": written}
    emit(args, payload, f"wrote the maps of {len(written)} images and slides to {args.out}")
    return payload
