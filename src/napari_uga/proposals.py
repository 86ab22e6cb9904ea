"""Which patches to annotate next: the proposal strategies of the annotation loop.

``propose`` is what ``simulate`` and the benchmarks call; each strategy turns a pool of images
into ranked :class:`~napari_uga.selection.Candidate` patches and ``select`` picks ``k`` of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .io import Pair, tissue_mask
from .models import UNet
from .selection import Box, Candidate, Proposal, grid_boxes, score_candidates, select
from .uncertainty import compute_uncertainty

if TYPE_CHECKING:
    from .loop import LoopConfig


def pool_candidates(
    model: UNet,
    pool: Sequence[Pair],
    factor: float,
    config: LoopConfig,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """Uncertainty maps of every pool image, scored into candidate patches ranked together."""
    candidates: list[Candidate] = []
    for i, pair in enumerate(pool):
        maps = compute_uncertainty(model, pair.image, samples=config.samples, tta=config.tta, factor=factor)
        candidates += score_candidates(
            pair.name,
            pair.image,
            maps.layer(config.measure),
            maps.probability,
            tissue_mask(pair.image),
            patch=config.patch,
            how=config.aggregate,
        )
        if progress is not None:
            progress(i + 1, len(pool))
    return candidates


def random_candidates(pool: Sequence[Pair], config: LoopConfig) -> list[Candidate]:
    """Grid patches with tissue, unscored (for the random strategy)."""
    out = []
    for pair in pool:
        tissue = tissue_mask(pair.image)
        for box in grid_boxes(pair.name, pair.image.shape[:2], config.patch):
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
) -> list[Proposal]:
    """The ``k`` patches to annotate next."""
    if config is None:
        from .loop import LoopConfig

        config = LoopConfig()
    if strategy == "random":
        candidates = random_candidates(pool, config)
    else:
        candidates = pool_candidates(model, pool, factor, config)
    return select(candidates, k, exclude, strategy, rng, config.diversity if strategy != "random" else "none")
