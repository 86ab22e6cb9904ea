"""Position split of overlapping tiles."""

import numpy as np

from napari_uga.splits import overlap_groups, position_split, tile_position


def test_position_split_keeps_overlaps_together_and_tumour_on_both_sides(umcu_pairs):
    left, right = position_split(umcu_pairs)
    assert len(left) + len(right) == len(umcu_pairs)
    assert any(p.mask.any() for p in left) and any(p.mask.any() for p in right)
    assert any(not p.mask.any() for p in left) and any(not p.mask.any() for p in right)
    for a in left:
        ax, ay = tile_position(a.name)
        for b in right:
            bx, by = tile_position(b.name)
            assert not (abs(ax - bx) < 256 and abs(ay - by) < 256), (a.name, b.name)


def test_overlap_groups_join_touching_tiles(umcu_pairs):
    groups = overlap_groups(umcu_pairs)
    tumour_groups = {g for g, p in zip(groups, umcu_pairs, strict=True) if p.mask.any()}
    assert 1 < len(tumour_groups) < 16  # one lesion: several overlapping clusters
    assert len(np.unique(groups)) < len(umcu_pairs)
