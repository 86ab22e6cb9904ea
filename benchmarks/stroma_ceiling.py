"""Can anything but UMCU stroma labels fix the UMCU right->left split? (docs/benchmarks.md)

Two checks that use no UMCU label:
- fine-tune the shipped model on training-centre (RUMC) tiles given as corrections, e.g. its one
  stroma-only tumour-free tile, then score the left (test) side of the UMCU position split;
- colour-match UMCU to RUMC (Reinhard: Lab mean and sd, per image or per centre), zero-shot.

Usage::

    .venv/bin/python benchmarks/stroma_ceiling.py \
        --tiles c16_tumor_064_x27558_y165126,c16_tumor_064_x68097_y138955 [--steps 200 --anchor 0 --self-share 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from skimage.color import lab2rgb, rgb2lab

from napari_uga.io import Pair, load_pairs
from napari_uga.loop import Annotation, _drain, config_for, finetune, replay_pairs
from napari_uga.models import load_model, working_factor
from napari_uga.selection import Box
from napari_uga.splits import position_split
from napari_uga.training import evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UMCU_MPP, RUMC_MPP = 0.226, 0.243


def pairs_of(group: str) -> list[Pair]:
    """Tiles and masks of one data group."""
    return load_pairs(DATA / group / "images", DATA / group / "masks")


def failures(result: dict) -> str:
    """Tiles below Dice 0.95, short names."""
    return ", ".join(f"{p['name'].split('_', 3)[-1]} {p['dice']:.2f}" for p in result["per_image"] if p["dice"] < 0.95)


def finetune_on_rumc(tiles: list[str], overrides: dict) -> None:
    """Fine-tune on whole RUMC tiles as corrections; Dice on the UMCU left side."""
    model = load_model(None, "cpu")
    rumc = {p.name: p for p in pairs_of("camelyon16_rumc")}
    missing = [t for t in tiles if t not in rumc]
    if missing:
        raise SystemExit(f"not RUMC tiles: {missing}")
    corrections = [Annotation(Box(t, 0, 0, *rumc[t].image.shape[:2]), rumc[t].image, rumc[t].mask) for t in tiles]
    config = config_for("centre", **overrides)
    events = finetune(model, corrections, replay_pairs(), working_factor(model, RUMC_MPP), config, seed=0)
    tuned = _drain(events, None).model
    left, _ = position_split(pairs_of("camelyon16_umcu"))
    result = evaluate(tuned, left, working_factor(model, UMCU_MPP))
    print(f"fine-tuned on {len(tiles)} RUMC tiles ({config.steps} steps, anchor {config.anchor}, "
          f"self-share {config.self_share}): UMCU left dice_global {result['dice_global']:.3f}; "
          f"below 0.95: {failures(result)}")  # fmt: skip


def lab_stats(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of the Lab channels over all pixels of the images."""
    lab = np.concatenate([rgb2lab(i).reshape(-1, 3) for i in images])
    return lab.mean(0), lab.std(0)


def reinhard(image: np.ndarray, source: tuple, target: tuple) -> np.ndarray:
    """Map an RGB image's Lab statistics from ``source`` to ``target`` (mean, sd)."""
    lab = (rgb2lab(image) - source[0]) / source[1] * target[1] + target[0]
    return (np.clip(lab2rgb(lab), 0, 1) * 255).astype(np.uint8)


def colour_matched_zero_shot() -> None:
    """Zero-shot UMCU Dice, raw and colour-matched to RUMC per image and per centre."""
    model = load_model(None, "cpu")
    umcu = pairs_of("camelyon16_umcu")
    target = lab_stats([p.image for p in pairs_of("camelyon16_rumc")])
    centre = lab_stats([p.image for p in umcu])
    variants = {
        "raw": umcu,
        "per image": [Pair(p.name, reinhard(p.image, lab_stats([p.image]), target), p.mask) for p in umcu],
        "per centre": [Pair(p.name, reinhard(p.image, centre, target), p.mask) for p in umcu],
    }
    for name, pairs in variants.items():
        result = evaluate(model, pairs, working_factor(model, UMCU_MPP))
        print(f"zero-shot UMCU, colour {name}: dice_global {result['dice_global']:.3f}; below 0.95: {failures(result)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", default="c16_tumor_064_x27558_y165126,c16_tumor_064_x68097_y138955")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--anchor", type=float, default=None)
    parser.add_argument("--self-share", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in (("steps", args.steps), ("anchor", args.anchor), ("self_share", args.self_share))
        if v is not None
    }
    finetune_on_rumc(args.tiles.split(","), overrides)
    colour_matched_zero_shot()


if __name__ == "__main__":
    main()
