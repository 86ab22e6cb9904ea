"""Position-aware splits of overlapping tiles (never split one lesion's overlapping tiles)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .io import InputError, Pair

_POSITION = re.compile(r"_x(\d+)_y(\d+)$")


def tile_position(name: str) -> tuple[int, int]:
    """Level-0 (x, y) of a tile named ``..._x<X>_y<Y>``."""
    match = _POSITION.search(name)
    if match is None:
        raise InputError(f"{name}: tile name carries no _x<X>_y<Y> position")
    return int(match.group(1)), int(match.group(2))


def overlap_groups(pairs: Sequence[Pair]) -> np.ndarray:
    """Connected groups of tiles whose level-0 footprints overlap (label per tile)."""
    xy = np.array([tile_position(p.name) for p in pairs])
    sizes = np.array([p.image.shape[:2][::-1] for p in pairs])
    i, j = np.triu_indices(len(pairs), 1)
    touch = np.all(np.abs(xy[i] - xy[j]) < np.minimum(sizes[i], sizes[j]), axis=1)
    graph = coo_matrix((np.ones(touch.sum()), (i[touch], j[touch])), shape=(len(pairs), len(pairs)))
    return connected_components(graph, directed=False)[1]


def position_split(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    """Split tiles into a left and a right side by x position, stratified by class.

    Overlapping tiles form groups that stay on one side; within tumour groups and within
    tumour-free groups separately, the groups left of the median x go to the first side.
    """
    groups = overlap_groups(pairs)
    xs = np.array([tile_position(p.name)[0] for p in pairs], float)
    members = np.array(pairs, object)
    tumour = {g: any(p.mask is not None and p.mask.any() for p in members[groups == g]) for g in set(groups)}
    left_groups: set[int] = set()
    for has_tumour in (True, False):
        ids = sorted((g for g in tumour if tumour[g] == has_tumour), key=lambda g: xs[groups == g].mean())
        sizes = np.cumsum([np.sum(groups == g) for g in ids])
        if len(ids):
            left_groups.update(ids[: int(np.searchsorted(sizes, sizes[-1] / 2)) + 1 if len(ids) > 1 else 1])
    left = [p for g, p in zip(groups, pairs, strict=True) if g in left_groups]
    right = [p for g, p in zip(groups, pairs, strict=True) if g not in left_groups]
    return left, right
