"""``uga batch``: uncertainty maps + QC over many images and whole slides on a Dask cluster."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import emit, progress_bar


def register(sub) -> None:
    """Add the ``batch`` subcommand."""
    p = sub.add_parser("batch", help="maps (OME-TIFF pyramids) + QC for a folder of images/slides on Dask")
    p.add_argument("--images", required=True, help="folder, file or glob pattern of images / slides")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--workers", type=int, default=2, help="local cluster worker processes (CPU)")
    p.add_argument("--samples", type=int, default=8, help="MC-dropout samples T")
    p.add_argument(
        "--qc-calibration",
        type=Path,
        default=None,
        help="folder with images/ and masks/ of labelled target-domain tiles",
    )
    p.add_argument("--model", type=Path, default=None, help="weights (.safetensors); default: the shipped model")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel; needed when the files do not say")
    p.add_argument(
        "--block", type=int, default=2048, help="working-scale block side for large slides (multiple of 256)"
    )
    p.add_argument("--no-qc", action="store_true", help="skip quality control")
    p.set_defaults(handler=run)


def _qc_dict(args: argparse.Namespace, model) -> dict | None:
    """The QC model as a dict: fitted on the calibration folder, else the shipped calibration.

    Without a calibration folder and without a shipped calibration, QC is skipped with a warning.
    """
    import sys

    from ..distributed import calibrate_qc
    from ..io import InputError, load_pairs
    from ..models import working_factor
    from ..quality import DEFAULT_QC_FILE, default_qc_model

    if args.no_qc:
        return None
    if args.qc_calibration is None:
        if not DEFAULT_QC_FILE.is_file():
            print(f"uga batch: warning: {DEFAULT_QC_FILE.name} is not shipped; running without QC", file=sys.stderr)
            return None
        return default_qc_model().to_dict()
    folder = args.qc_calibration
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        raise InputError(f"--qc-calibration {folder}: expected images/ and masks/ subfolders")
    pairs = load_pairs(folder / "images", folder / "masks")
    bar = progress_bar(len(pairs), "qc calibration", args.json)
    try:
        return calibrate_qc(
            model, pairs, working_factor(model, args.mpp), args.samples, lambda d, t: bar.update(d - bar.n)
        )
    finally:
        bar.close()


def run(args: argparse.Namespace) -> dict:
    """Run the batch and print its summary."""
    from ..distributed import BatchOptions, make_client, run_batch, worker_threads
    from ..io import InputError
    from ..models import DEFAULT_WEIGHTS, load_model
    from ..wsi import list_inputs, require_scale

    if args.samples < 1:
        raise InputError(f"--samples must be at least 1, got {args.samples}")
    if args.block < 256 or args.block % 256:
        raise InputError(f"--block must be a positive multiple of 256, got {args.block}")
    inputs = list_inputs(args.images)
    require_scale(inputs, args.mpp)
    model_path = args.model or DEFAULT_WEIGHTS
    model = load_model(model_path, args.device)
    qc = _qc_dict(args, model)
    threads = 0 if args.scheduler else worker_threads(args.workers)
    options = BatchOptions(samples=args.samples, mpp=args.mpp, block=args.block, device=args.device, threads=threads)
    client = make_client(args.scheduler, args.workers)
    bar = progress_bar(len(inputs), "batch", args.json)
    try:
        summary = run_batch(
            client, inputs, args.out, model_path, options, qc, progress=lambda d, t: bar.update(d - bar.n)
        )
    finally:
        bar.close()
        cluster = client.cluster
        client.close()
        if cluster is not None and not args.scheduler:
            cluster.close()
    failed = [r for r in summary["slides"] if r["status"] == "failed"]
    human = (
        f"{summary['n_ok']}/{summary['n_inputs']} done ({summary['n_skipped']} skipped, {summary['n_failed']} failed) "
        f"in {summary['seconds']:.1f} s, {summary['megapixels_per_second']:.2f} Mpx/s -> {args.out}"
    )
    human += "".join(f"\nfailed: {r['name']}: {r['error']}" for r in failed)
    emit(args, {k: v for k, v in summary.items() if k != "slides"} | {"failed": [r["name"] for r in failed]}, human)
    return summary
