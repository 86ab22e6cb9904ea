"""Patch proposals: tissue only, non-overlapping, excluding annotated boxes, ranked."""

import numpy as np
import pytest

from napari_uga.selection import Box, grid_boxes, score_candidates, select


def _candidates(umcu_pairs, patch=128):
    pair = umcu_pairs[0]
    yy, xx = np.mgrid[:256, :256]
    uncertainty = ((yy > 128) & (xx > 128)).astype(np.float32)  # most uncertain bottom-right
    tissue = np.ones((256, 256), bool)
    tissue[:128, :128] = False  # top-left is glass
    return score_candidates(pair.name, pair.image, uncertainty, np.zeros((256, 256), np.float32), tissue, patch)


def test_grid_covers_image_and_small_images_are_one_patch():
    boxes = grid_boxes("a", (300, 500), 256)
    assert all(b.y + b.h <= 300 and b.x + b.w <= 500 for b in boxes)
    assert max(b.x + b.w for b in boxes) == 500
    assert grid_boxes("b", (100, 80), 256) == [Box("b", 0, 0, 100, 80)]


def test_sub_patches_are_quarters_of_a_patch_or_of_a_small_image():
    quarters = grid_boxes("t", (224, 224), 256, subdivide=2)  # an EBHI tile: 112 px quarters, half-overlapping
    assert {(b.h, b.w) for b in quarters} == {(112, 112)} and len(quarters) == 9
    corners = [b for b in quarters if b.y in (0, 112) and b.x in (0, 112)]
    assert len(corners) == 4 and not any(a.overlaps(b) for i, a in enumerate(corners) for b in corners[i + 1 :])
    assert {(b.h, b.w) for b in grid_boxes("s", (1000, 600), 256, subdivide=2)} == {(128, 128)}


def test_uncertainty_ranking_skips_glass_and_suppresses_overlap(umcu_pairs):
    cands = _candidates(umcu_pairs)
    assert all(not (c.box.y == 0 and c.box.x == 0) for c in cands)  # the glass patch is never a candidate
    picks = select(cands, 3)
    assert (picks[0].y, picks[0].x) == (128, 128)
    assert [p.rank for p in picks] == [1, 2, 3]
    assert picks[0].score >= picks[1].score >= picks[2].score
    assert not any(a.overlaps(b) for i, a in enumerate(picks) for b in picks[i + 1 :])


def test_annotated_boxes_are_excluded(umcu_pairs):
    cands = _candidates(umcu_pairs)
    first = select(cands, 1)[0]
    again = select(cands, 1, exclude=[first.box])[0]
    assert not again.overlaps(first)


def test_random_strategy_depends_on_the_rng(umcu_pairs):
    cands = _candidates(umcu_pairs, patch=64)
    a = select(cands, 4, strategy="random", rng=np.random.default_rng(1))
    b = select(cands, 4, strategy="random", rng=np.random.default_rng(2))
    assert [p.box for p in a] != [p.box for p in b]


@pytest.mark.parametrize("diversity", ["clusters", "balanced", "clusters+balanced"])
def test_diverse_selection_returns_k_distinct_patches(umcu_pairs, diversity):
    cands = []
    for pair in umcu_pairs[:6]:
        rng = np.random.default_rng(0)
        cands += score_candidates(
            pair.name,
            pair.image,
            rng.random((256, 256), dtype=np.float32),
            pair.mask.astype(np.float32),
            np.ones((256, 256), bool),
            128,
        )
    picks = select(cands, 5, diversity=diversity, rng=np.random.default_rng(0))
    assert len(picks) == 5 and len({p.box for p in picks}) == 5
