"""Per-pixel uncertainty from MC dropout, test-time augmentation and deep ensembles.

Inference is tiled with overlap and a smooth (Hann) blending window, at the network's
working scale, so any image size works. The image may be a numpy array or any lazily
sliced array (zarr / dask): only the tiles being processed are read.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch.nn import functional as F

from .io import to_rgb_uint8
from .models import UNet

EPS = 1e-6
TTA_MODES = {"none": 1, "flips": 4, "d4": 8}
T = TypeVar("T")


@dataclass
class UncertaintyMaps:
    """Float32 maps at the image's resolution (or at working scale for lazy slides)."""

    probability: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray
    variance: np.ndarray
    samples: np.ndarray | None = None  # S x H x W float16 sample probabilities, when kept

    @property
    def prediction(self) -> np.ndarray:
        """Binary tumour mask (uint8 0/1) from the mean probability."""
        return (self.probability >= 0.5).astype(np.uint8)

    def layer(self, name: str) -> np.ndarray:
        """A map by its short name (``probability, entropy, mutual_information, variance``)."""
        return getattr(self, name)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of a Bernoulli probability."""
    p = p.clamp(EPS, 1 - EPS)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def _undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    x = x.flip(-1) if k >= 4 else x
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def transforms_for(tta: str) -> list[int]:
    """Dihedral transform indices for a TTA mode: identity, 4 flips/rotations, or all 8."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {sorted(TTA_MODES)}, got {tta!r}")
    return {"none": [0], "flips": [0, 2, 4, 6], "d4": list(range(8))}[tta]


@torch.inference_mode()
def sample_batch(models: Sequence[UNet], x: torch.Tensor, samples: int, tta: str = "none") -> torch.Tensor:
    """Sample probabilities S x N x H x W for a batch over ensemble members, TTA and MC dropout.

    All TTA variants of the batch go through each network together; MC samples reuse the
    encoder features (see :meth:`UNet.sample`).
    """
    ks = transforms_for(tta)
    stacked = torch.cat([_dihedral(x, k) for k in ks])
    n = x.shape[0]
    out = []
    for model in models:
        device = next(model.parameters()).device
        probs = model.sample(stacked.to(device), samples).float().cpu()  # S x (K*N) x H x W
        for i, k in enumerate(ks):
            out.append(_undo_dihedral(probs[:, i * n : (i + 1) * n], k))
    return torch.cat(out)


def _window(size: int) -> torch.Tensor:
    ramp = torch.hann_window(size + 2, periodic=False)[1:-1]
    return torch.outer(ramp, ramp).clamp_min(1e-3)


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _read_tile(image, y0: int, x0: int, h: int, w: int, factor: float) -> torch.Tensor:
    """Read a working-scale tile (h x w at working scale) from the source image."""
    sy0, sx0 = int(np.floor(y0 / factor)), int(np.floor(x0 / factor))
    sy1 = min(image.shape[0], int(np.ceil((y0 + h) / factor)))
    sx1 = min(image.shape[1], int(np.ceil((x0 + w) / factor)))
    crop = np.asarray(image[sy0:sy1, sx0:sx1, :3])
    tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0
    if abs(factor - 1) > 1e-3:
        mode = "area" if factor < 1 else "bilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        tensor = F.interpolate(tensor, size=(h, w), mode=mode, **kwargs)
    return tensor[0, :, :h, :w]


def _pad_to(x: torch.Tensor, tile: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h == tile and w == tile:
        return x
    mode = "reflect" if h > 1 and w > 1 and tile - h < h and tile - w < w else "replicate"
    return F.pad(x[None], (0, tile - w, 0, tile - h), mode=mode)[0]


def compute_uncertainty(
    models: UNet | Sequence[UNet],
    image,
    samples: int = 8,
    tta: str = "none",
    factor: float = 0.5,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 2,
    keep_samples: bool = False,
    output_scale: str = "source",
    progress: Callable[[int, int], None] | None = None,
    tissue: np.ndarray | None = None,
) -> UncertaintyMaps:
    """Tiled MC/TTA/ensemble inference; returns mean probability, entropy, MI and variance maps.

    Parameters
    ----------
    models : one network or an ensemble.
    image : H x W x 3 uint8 array, numpy or lazily sliced (zarr/dask).
    samples : MC-dropout samples per network and transform (1 = deterministic).
    tta : ``none``, ``flips`` (4) or ``d4`` (8) dihedral transforms.
    factor : source-to-working scale (source µm/px divided by the network's µm/px).
    tile, overlap : working-scale tile side and overlap (blended with a Hann window).
    keep_samples : also return the S x H x W sample probabilities (small images only).
    output_scale : ``source`` (maps resized to the image) or ``working``.
    progress : called with (tiles done, tiles total).
    tissue : optional working-scale boolean mask; tiles without tissue are skipped (zero maps).
    """
    models = [models] if isinstance(models, UNet) else list(models)
    if isinstance(image, np.ndarray):
        image = to_rgb_uint8(image)
    h_src, w_src = image.shape[:2]
    h, w = max(1, round(h_src * factor)), max(1, round(w_src * factor))
    multiple = models[0].multiple
    tile = min(tile, -(-max(h, w) // multiple) * multiple)
    tile = -(-tile // multiple) * multiple
    stride = max(multiple, tile - overlap)
    n_samples = len(models) * len(transforms_for(tta)) * max(1, samples)
    acc = {k: torch.zeros(h, w) for k in ("p", "p2", "h_exp")}
    sample_acc = torch.zeros(n_samples, h, w) if keep_samples else None
    weight = torch.zeros(h, w)
    window = _window(tile)
    boxes = [(y, x) for y in _tile_starts(h, tile, stride) for x in _tile_starts(w, tile, stride)]
    if tissue is not None:
        boxes = [(y, x) for y, x in boxes if tissue[y : y + tile, x : x + tile].any()]
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        sizes = [(min(tile, h - y), min(tile, w - x)) for y, x in chunk]
        crops = [_read_tile(image, y, x, th, tw, factor) for (y, x), (th, tw) in zip(chunk, sizes, strict=True)]
        batch = torch.stack([_pad_to(t, tile) for t in crops])
        probs = sample_batch(models, batch, samples, tta)  # S x N x tile x tile
        stats = {"p": probs.mean(0), "p2": (probs**2).mean(0), "h_exp": binary_entropy(probs).mean(0)}
        for i, ((y, x), (th, tw)) in enumerate(zip(chunk, sizes, strict=True)):
            win = window[:th, :tw]
            for key, value in stats.items():
                acc[key][y : y + th, x : x + tw] += value[i, :th, :tw] * win
            if sample_acc is not None:
                sample_acc[:, y : y + th, x : x + tw] += probs[:, i, :th, :tw] * win
            weight[y : y + th, x : x + tw] += win
        if progress is not None:
            progress(min(start + batch_size, len(boxes)), len(boxes))
    weight = weight.clamp_min(EPS)
    mean = acc["p"] / weight
    entropy = binary_entropy(mean) * (weight > EPS * 2)
    expected = acc["h_exp"] / weight
    maps = {
        "probability": mean,
        "entropy": entropy,
        "mutual_information": (entropy - expected).clamp_min(0),
        "variance": (acc["p2"] / weight - mean**2).clamp_min(0),
    }
    kept = None if sample_acc is None else sample_acc / weight
    if output_scale == "source" and (h, w) != (h_src, w_src):
        maps = {k: _resize_map(v, (h_src, w_src)) for k, v in maps.items()}
        kept = None if kept is None else _resize_map(kept, (h_src, w_src))
    arrays = {k: v.numpy().astype(np.float32) for k, v in maps.items()}
    return UncertaintyMaps(**arrays, samples=None if kept is None else kept.numpy().astype(np.float16))


def _resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    squeeze = x.ndim == 2
    x = x[None, None] if squeeze else x[None]
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]
    return out[0] if squeeze else out


def predict_probability(models: UNet | Sequence[UNet], image, factor: float = 0.5, **kwargs) -> np.ndarray:
    """Deterministic mean tumour probability (no MC sampling) at the image's resolution."""
    return compute_uncertainty(models, image, samples=1, factor=factor, **kwargs).probability


def patch_score(values: np.ndarray, how: str = "mean", top_fraction: float = 0.1) -> float:
    """Aggregate a patch of an uncertainty map: ``mean``, or mean of the ``topk`` highest pixels."""
    flat = np.asarray(values, np.float32).ravel()
    if flat.size == 0:
        return 0.0
    if how == "mean":
        return float(flat.mean())
    if how == "topk":
        k = max(1, round(flat.size * top_fraction))
        return float(np.partition(flat, flat.size - k)[-k:].mean())
    raise ValueError(f"unknown aggregation {how!r} (mean or topk)")


def run_with_oom_fallback(run: Callable[[int, bool], T], batch_size: int) -> T:
    """Call ``run(batch_size, on_cpu)``; on GPU out-of-memory halve the batch and retry, then fall back to CPU.

    Each fallback step is announced with a ``RuntimeWarning``; the CPU attempt is the last one.
    """
    while True:
        try:
            return run(batch_size, False)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch_size <= 1:
                break
            batch_size = max(1, batch_size // 2)
            warnings.warn(f"GPU out of memory: retrying with batch size {batch_size}", RuntimeWarning, stacklevel=2)
    warnings.warn("GPU out of memory at batch size 1: falling back to CPU", RuntimeWarning, stacklevel=2)
    return run(batch_size, True)


def compute_uncertainty_safe(models: UNet | Sequence[UNet], image, batch_size: int = 4, **kwargs) -> UncertaintyMaps:
    """:func:`compute_uncertainty` that never dies of GPU memory, and is faster on CUDA.

    On CUDA the networks run channels-last under float16 autocast; on out-of-memory the batch is
    halved and retried, then the networks are moved to the CPU (with a warning).
    ``kwargs`` are those of :func:`compute_uncertainty`.
    """
    models = [models] if isinstance(models, UNet) else list(models)

    def run(size: int, on_cpu: bool) -> UncertaintyMaps:
        if on_cpu:
            for model in models:
                model.to("cpu", memory_format=torch.contiguous_format)
        cuda = any(next(m.parameters()).is_cuda for m in models)
        if cuda:
            for model in models:
                model.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            return compute_uncertainty(models, image, batch_size=size, **kwargs)

    return run_with_oom_fallback(run, batch_size)
