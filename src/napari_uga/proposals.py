"""Which patches to annotate next: the proposal strategies of the annotation loop.

``propose`` is what ``simulate`` and the benchmarks call; each strategy turns a pool of images
into ranked :class:`~napari_uga.selection.Candidate` patches and ``select`` picks ``k`` of them
(strategies: :data:`~napari_uga.selection.STRATEGIES`).

:func:`use_cache` (for benchmarks) keeps each image's candidates on disk, keyed by the network's
weights, the image and the settings; with it the MC-dropout draws are seeded by that key, so a
cached and an uncached round give the same candidates and leave torch's generator untouched.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .io import Pair, tissue_mask
from .models import UNet
from .selection import Box, Candidate, Proposal, diversity_for, grid_boxes, score_candidates, select
from .uncertainty import compute_uncertainty

_CACHE: list[Path] = []  # the candidate cache folder, when one is in use

if TYPE_CHECKING:
    from .loop import LoopConfig


def use_cache(folder: Path | None) -> None:
    """Keep pool candidates under ``folder`` (``None``: no cache)."""
    _CACHE[:] = [] if folder is None else [Path(folder)]


def _weights_key(model: UNet) -> str:
    from .ood import _fingerprint

    return _fingerprint(model)


def image_candidates(model: UNet, pair: Pair, factor: float, config: LoopConfig) -> list[Candidate]:
    """Scored candidate patches of one image."""
    maps = compute_uncertainty(model, pair.image, samples=config.samples, tta=config.tta, factor=factor)
    return score_candidates(
        pair.name,
        pair.image,
        maps.layer(config.measure),
        maps.probability,
        tissue_mask(pair.image),
        patch=config.patch,
        how=config.aggregate,
        subdivide=config.subdivide,
    )


def _cache_key(model_key: str, pair: Pair, factor: float, config: LoopConfig) -> str:
    settings = (model_key, pair.name, pair.image.shape, factor, config.samples, config.tta, config.measure)
    settings += (config.patch, config.aggregate, hashlib.sha1(pair.image.tobytes()).hexdigest())
    settings += (config.subdivide,) if config.subdivide > 1 else ()  # whole-patch keys as before
    return hashlib.sha1(repr(settings).encode()).hexdigest()


def _cached(key: str, compute: Callable[[], list[Candidate]]) -> list[Candidate]:
    """``compute()`` once per key, kept in the cache folder; its torch draws are seeded by the key."""
    import torch

    path = _CACHE[0] / f"{key}.npz"
    if path.exists():
        return _read_candidates(path)
    with torch.random.fork_rng():
        torch.manual_seed(int(key[:8], 16))
        candidates = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{key}.{os.getpid()}.tmp.npz")  # benchmarks share the cache
    _write_candidates(tmp, candidates)
    tmp.replace(path)
    return candidates


def _write_candidates(path: Path, candidates: Sequence[Candidate]) -> None:
    """Candidates as plain arrays (no pickle)."""
    np.savez(
        path,
        images=np.array([c.box.image for c in candidates], dtype=str),
        boxes=np.array([(c.box.y, c.box.x, c.box.h, c.box.w) for c in candidates], dtype=np.int64).reshape(-1, 4),
        scores=np.array([c.score for c in candidates], dtype=np.float64),
        features=np.array([c.features for c in candidates]),
        tumour=np.array([c.tumour for c in candidates], dtype=bool),
    )


def _read_candidates(path: Path) -> list[Candidate]:
    with np.load(path, allow_pickle=False) as data:
        rows = zip(data["images"], data["boxes"], data["scores"], data["features"], data["tumour"], strict=True)
        return [
            Candidate(Box(str(name), *(int(v) for v in box)), float(score), features, bool(tumour))
            for name, box, score, features, tumour in rows
        ]


def pool_candidates(
    model: UNet,
    pool: Sequence[Pair],
    factor: float,
    config: LoopConfig,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """Uncertainty maps of every pool image, scored into candidate patches ranked together."""
    model_key = _weights_key(model) if _CACHE else ""
    candidates: list[Candidate] = []
    for i, pair in enumerate(pool):

        def compute(pair: Pair = pair) -> list[Candidate]:
            return image_candidates(model, pair, factor, config)

        if _CACHE:
            candidates += _cached(_cache_key(model_key, pair, factor, config), compute)
        else:
            candidates += compute()
        if progress is not None:
            progress(i + 1, len(pool))
    return candidates


def random_candidates(pool: Sequence[Pair], config: LoopConfig) -> list[Candidate]:
    """Grid patches with tissue, unscored (for the random strategy)."""
    out = []
    for pair in pool:
        tissue = tissue_mask(pair.image)
        for box in grid_boxes(pair.name, pair.image.shape[:2], config.patch, config.subdivide):
            if box.crop(tissue).mean() >= 0.25:
                out.append(Candidate(box, 0.0, np.zeros(1), False))
    return out


def propose(
    model: UNet,
    pool: Sequence[Pair],
    k: int,
    factor: float,
    config: LoopConfig | None = None,
    exclude: Sequence[Box] = (),
    strategy: str = "uncertainty",
    rng: np.random.Generator | None = None,
    known: Sequence[tuple[np.ndarray, bool]] = (),
    annotated: int | None = None,
) -> list[Proposal]:
    """The ``k`` patches to annotate next, each with the rule that proposed it in ``reason``.

    ``known``: the corrections so far as (appearance features, holds tumour), for ``expected_error``;
    ``annotated``: how many of ``exclude`` are corrections (default all; the batch's audits are not yet).
    """
    if config is None:
        from .loop import LoopConfig

        config = LoopConfig()
    if strategy == "random":
        candidates = random_candidates(pool, config)
    else:
        candidates = pool_candidates(model, pool, factor, config)
    diversity = diversity_for(strategy, config.diversity)
    return select(candidates, k, exclude, strategy, rng, diversity, known, annotated=annotated)
