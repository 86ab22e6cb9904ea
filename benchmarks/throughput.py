"""Inference and fine-tuning speed: fast vs naive MC dropout, batched vs looped TTA, Mpx/s, QC features, fine-tuning.

Every ratio is measured in the same run on the same inputs; times are medians over repeats.
The machine may be shared: the load average before and after is printed, so contention is visible.

Usage::

    .venv/bin/python benchmarks/throughput.py                 # 2 CPU threads, shipped model
    .venv/bin/python benchmarks/throughput.py --threads 2 --repeats 5 --json benchmarks/results/throughput.json

CUDA is used when present (``--device auto``); rows that only make sense on a GPU say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from napari_uga._sample_data import UMCU_MPP
from napari_uga.io import load_pairs
from napari_uga.loop import Annotation, LoopConfig, finetune, replay_pairs
from napari_uga.models import DEFAULT_WEIGHTS, ModelConfig, UNet, load_model, pick_device, working_factor
from napari_uga.selection import Box
from napari_uga.uncertainty import _dihedral, _undo_dihedral, compute_uncertainty_safe, sample_batch

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "camelyon16_umcu"


def median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def get_model(device: torch.device) -> tuple[UNet, str]:
    """The shipped network, or the default architecture with seeded random weights (same speed)."""
    if DEFAULT_WEIGHTS.is_file():
        return load_model(DEFAULT_WEIGHTS, device), DEFAULT_WEIGHTS.name
    torch.manual_seed(0)
    return UNet(ModelConfig()).to(device).eval(), "default architecture, random weights"


def tiles_batch(n: int, side: int, device: torch.device) -> torch.Tensor:
    """``n`` real sample tiles (``side`` px crops) as an N x 3 x side x side float batch."""
    pairs = load_pairs(SAMPLE / "images", SAMPLE / "masks")[:n]
    crops = [torch.from_numpy(p.image[:side, :side]).permute(2, 0, 1).float() / 255 for p in pairs]
    return torch.stack(crops).to(device)


def mosaic(side: int) -> np.ndarray:
    """A ``side`` x ``side`` RGB mosaic of real tissue tiles (all tissue: worst case for skipping)."""
    pairs = load_pairs(SAMPLE / "images")
    tile = pairs[0].image.shape[0]
    rows = []
    k = 0
    for _ in range(-(-side // tile)):
        row = []
        for _ in range(-(-side // tile)):
            row.append(pairs[k % len(pairs)].image)
            k += 1
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows)[:side, :side])


@torch.inference_mode()
def mc_rows(model: UNet, x: torch.Tensor, samples: int, repeats: int, device: torch.device) -> list[dict]:
    """Naive T-pass loop vs trunk-once batched head, with agreement figures."""
    naive = median_time(lambda: model.sample_naive(x, samples), repeats, device)
    fast = median_time(lambda: model.sample(x, samples), repeats, device)
    deterministic_fast = model.sample(x, 1)[0]
    deterministic_full = torch.sigmoid(model(x))[:, 0]  # one ordinary forward pass, eval mode
    torch.manual_seed(1)
    mean_naive = model.sample_naive(x, samples).mean(0)
    mean_fast = model.sample(x, samples).mean(0)
    mean_naive2 = model.sample_naive(x, samples).mean(0)
    mpx = x.shape[0] * x.shape[-1] * x.shape[-2] / 1e6
    return [
        {"what": f"MC naive loop (T={samples}, {samples} full passes)", "seconds": naive, "mpx_s": mpx / naive},
        {
            "what": f"MC fast (T={samples}, trunk once, head batched)",
            "seconds": fast,
            "mpx_s": mpx / fast,
            "speedup": naive / fast,
            "max_abs_diff_deterministic": float((deterministic_fast - deterministic_full).abs().max()),
            "max_abs_diff_mean_prob_fast_vs_naive": float((mean_fast - mean_naive).abs().max()),
            "max_abs_diff_mean_prob_naive_vs_naive": float((mean_naive2 - mean_naive).abs().max()),
        },
    ]


@torch.inference_mode()
def tta_rows(model: UNet, x: torch.Tensor, samples: int, repeats: int, device: torch.device) -> list[dict]:
    """Four flips/rotations: one network call per transform vs all transforms in one batch."""

    def looped() -> torch.Tensor:
        outs = [_undo_dihedral(model.sample(_dihedral(x, k), samples), k) for k in (0, 2, 4, 6)]
        return torch.cat(outs)

    loop = median_time(looped, repeats, device)
    batched = median_time(lambda: sample_batch([model], x, samples, "flips"), repeats, device)
    mpx = x.shape[0] * x.shape[-1] * x.shape[-2] / 1e6
    return [
        {"what": f"TTA flips looped (4 calls, T={samples})", "seconds": loop, "mpx_s": mpx / loop},
        {
            "what": f"TTA flips batched (1 call, T={samples})",
            "seconds": batched,
            "mpx_s": mpx / batched,
            "speedup": loop / batched,
        },
    ]


def end_to_end_rows(model: UNet, side: int, samples: int, repeats: int, device: torch.device) -> list[dict]:
    """Tiled ``compute_uncertainty`` on an all-tissue image given at 0.243 µm/px (Camelyon level 0)."""
    image = mosaic(side)
    factor = working_factor(model, 0.243)

    def run() -> object:
        return compute_uncertainty_safe(
            model, image, samples=samples, factor=factor, tile=512, batch_size=1, output_scale="working"
        )

    seconds = median_time(run, max(1, repeats // 2), device)
    level0 = side * side / 1e6
    return [
        {
            "what": f"compute_uncertainty T={samples}, {side}^2 px level 0 -> {round(side * factor)}^2 working, "
            "512 px tiles",
            "seconds": seconds,
            "mpx_s": level0 / seconds,
            "note": f"level-0 Mpx/s (working-scale {level0 * factor**2 / seconds:.2f})",
        }
    ]


def qc_rows(model: UNet, repeats: int, device: torch.device) -> list[dict]:
    """QC features of one 256 px sample tile (8 MC samples x 4 flips), and the texture histograms' share."""
    from napari_uga.quality import _texture, compute_features

    image = load_pairs(SAMPLE / "images", SAMPLE / "masks")[0].image
    factor = working_factor(model, 0.226)
    total = median_time(lambda: compute_features(model, image, factor), repeats, device)
    texture = median_time(lambda: _texture(image), repeats, device)
    return [
        {"what": "QC features of one 256^2 tile (compute_features, 8 MC x 4 TTA)", "seconds": total},
        {
            "what": "  of which texture histograms (4 local binary patterns)",
            "seconds": texture,
            "note": f"{100 * texture / total:.1f} % of the QC features",
        },
    ]


def finetune_row(model: UNet, device: torch.device) -> dict:
    """One fine-tune round (default ``LoopConfig``) on 10 annotated 256 px patches plus replay."""
    pairs = load_pairs(SAMPLE / "images", SAMPLE / "masks")[:10]
    annotations = [Annotation(Box(p.name, 0, 0, 256, 256), p.image[:256, :256], p.mask[:256, :256]) for p in pairs]
    replay = replay_pairs()
    config = LoopConfig()
    start = time.perf_counter()
    run = finetune(model, annotations, replay, working_factor(model, UMCU_MPP), config, seed=0)
    while True:
        try:
            next(run)
        except StopIteration:
            break
    seconds = time.perf_counter() - start
    return {"what": f"fine-tune round: 10 patches, {config.steps} steps, batch {config.batch_size}", "seconds": seconds}


def print_table(rows: list[dict]) -> None:
    """A fixed-width table of the measurements."""
    print(f"{'measurement':<68} {'median s':>9} {'Mpx/s':>8} {'speedup':>8}")
    for r in rows:
        mpx = f"{r['mpx_s']:.2f}" if "mpx_s" in r else ""
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"{r['what']:<68} {r['seconds']:>9.3f} {mpx:>8} {speed:>8}")
        for key in (
            "max_abs_diff_deterministic",
            "max_abs_diff_mean_prob_fast_vs_naive",
            "max_abs_diff_mean_prob_naive_vs_naive",
            "note",
        ):
            if key in r:
                print(f"    {key}: {r[key] if isinstance(r[key], str) else f'{r[key]:.3g}'}")


def main() -> None:
    """Run every measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="tiles per batch")
    parser.add_argument("--side", type=int, default=256, help="working-scale tile side")
    parser.add_argument("--mosaic", type=int, default=1024, help="level-0 side of the end-to-end image")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, source = get_model(device)
    load_before = os.getloadavg()
    x = tiles_batch(args.batch, args.side, device)
    rows = mc_rows(model, x, args.samples, args.repeats, device)
    rows += tta_rows(model, x, args.samples, args.repeats, device)
    rows += end_to_end_rows(model, args.mosaic, args.samples, args.repeats, device)
    rows += qc_rows(model, args.repeats, device)
    if not args.skip_finetune:
        rows.append(finetune_row(model, device))
    load_after = os.getloadavg()
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, model: {source}, "
        f"batch {args.batch} x {args.side}^2 px"
    )
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores")
    if device.type != "cuda":
        print("GPU rows (channels-last + fp16 autocast) not measured: no CUDA device")
    print_table(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "model": source,
            "load": [load_before, load_after],
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
