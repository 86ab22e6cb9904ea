"""Proposal strategies on real tiles: distinct, non-overlapping tissue patches, a reason each, seeded."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_uga.io import load_pairs, tissue_mask
from napari_uga.loop import config_for
from napari_uga.models import ModelConfig, UNet
from napari_uga.proposals import pool_candidates, propose, use_cache
from napari_uga.selection import (
    COVERAGE_SWITCH,
    STRATEGIES,
    Box,
    holds_tumour,
    nearest_candidate,
    select,
    typicality,
)

EBHI = Path(__file__).resolve().parents[1] / "data" / "ebhi_seg"  # six real colon biopsy tiles
CONFIG = config_for("organ", patch=128, samples=2, subdivide=1)


@pytest.fixture(scope="module")
def net() -> UNet:
    """A tiny real U-Net (seeded random weights)."""
    torch.manual_seed(0)
    return UNet(ModelConfig(base=4, depth=3)).eval()


@pytest.fixture(scope="module")
def pool(umcu_pairs):
    """Two UMCU and three EBHI tiles: nine half-overlapping 128 px patches each."""
    return [umcu_pairs[0], umcu_pairs[16], *load_pairs(EBHI / "images", EBHI / "masks")[:3]]


@pytest.fixture(scope="module")
def candidates(net, pool):
    """The pool's scored candidates."""
    torch.manual_seed(0)
    return pool_candidates(net, pool, 0.5, CONFIG)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_picks_distinct_tissue_patches_with_a_reason_and_repeats_for_a_seed(candidates, pool, strategy):
    first = select(candidates, 1)[0].box
    picks = select(candidates, 6, [first], strategy, np.random.default_rng(1))
    assert len(picks) == 6 and [p.rank for p in picks] == list(range(1, 7))
    assert not any(a.overlaps(b) for i, a in enumerate(picks) for b in picks[i + 1 :])
    assert not any(p.overlaps(first) for p in picks)
    images = {p.name: p.image for p in pool}
    assert all(p.box.crop(tissue_mask(images[p.image])).mean() >= 0.25 for p in picks)
    assert all(p.reason.startswith(strategy) and p.as_dict()["reason"] == p.reason for p in picks)
    assert picks == select(candidates, 6, [first], strategy, np.random.default_rng(1))


@pytest.mark.parametrize("strategy", ["typical", "random"])
def test_propose_is_deterministic_for_a_seed(net, pool, strategy):
    def run():
        torch.manual_seed(3)
        return propose(net, pool, 4, 0.5, CONFIG, [], strategy, np.random.default_rng(3))

    assert run() == run()


def test_typical_covers_clusters_and_coverage_switches_to_uncertainty(candidates):
    picks = select(candidates, 4, [], "typical", np.random.default_rng(0))
    assert all("(0 labelled)" in p.reason for p in picks)  # four clusters, one pick from each
    done = [c.box for c in candidates[::4]][:COVERAGE_SWITCH]
    later = select(candidates, 3, done, "coverage", np.random.default_rng(0))
    assert [p.box for p in later] == [p.box for p in select(candidates, 3, done, "uncertainty")]
    assert typicality(np.array([[0.0], [0.1], [0.2], [5.0]]), 2).argmin() == 3  # the outlier is least typical


def test_random_first_draws_the_first_batch_at_random_then_ranks_by_uncertainty(candidates):
    first = select(candidates, 4, [], "random_first", np.random.default_rng(7), diversity="clusters")
    drawn = select(candidates, 4, [], "random", np.random.default_rng(7))
    assert [p.box for p in first] == [p.box for p in drawn]  # nothing labelled: uniform draws, clusters ignored
    assert [p.box for p in first] != [p.box for p in select(candidates, 4)]
    assert all(p.reason.startswith("random_first (random while nothing is labelled") for p in first)
    done = [p.box for p in first]
    later = select(candidates, 3, done, "random_first", np.random.default_rng(0), diversity="clusters")
    ranked = select(candidates, 3, done, "uncertainty", np.random.default_rng(0), diversity="clusters")
    assert [p.box for p in later] == [p.box for p in ranked]
    assert all("uncertainty:" in p.reason for p in later)
    queued = select(candidates, 3, done, "random_first", np.random.default_rng(0), annotated=0)  # queued, not labelled
    assert all(p.reason.endswith("random: drawn at random") for p in queued)


def test_candidate_cache_repeats_candidates_and_leaves_torch_draws_alone(net, pool, tmp_path):
    use_cache(tmp_path)
    try:
        torch.manual_seed(0)
        first = pool_candidates(net, pool[:2], 0.5, CONFIG)
        after_first = torch.rand(1)
        torch.manual_seed(0)
        second = pool_candidates(net, pool[:2], 0.5, CONFIG)
        after_second = torch.rand(1)
    finally:
        use_cache(None)
    assert [(c.box, c.score, c.tumour) for c in first] == [(c.box, c.score, c.tumour) for c in second]
    assert all(np.array_equal(a.features, b.features) for a, b in zip(first, second, strict=True))
    assert torch.equal(after_first, after_second) and len(list(tmp_path.glob("*.npz"))) == 2


def test_unknown_strategy_is_refused(candidates):
    with pytest.raises(ValueError, match="unknown strategy"):
        select(candidates, 2, [], "entropy-ish")


def test_expected_error_ranks_by_a_texture_model_of_the_corrections(candidates, pool):
    """Fitted on corrections with and without tumour, it ranks the network's likeliest wrong calls first."""
    masks = {p.name: p.mask for p in pool}
    first = select(candidates, 1)[0]
    corrected = select(candidates, 4, [first.box], "random", np.random.default_rng(2))
    boxes = {p.box for p in corrected}
    known = [(c.features, holds_tumour(c.box.crop(masks[c.box.image]))) for c in candidates if c.box in boxes]
    assert {t for _, t in known} == {True, False}  # the pool has tumour and tumour-free tissue
    picks = select(candidates, 3, [p.box for p in corrected], "expected_error", np.random.default_rng(0), known=known)
    assert len(picks) == 3 and all("texture of your corrections" in p.reason for p in picks)
    errors = [float(p.reason.split()[1]) for p in picks]
    assert errors == sorted(errors, reverse=True)
    # one kind of correction only: no texture model yet, the most uncertain of each network call in turn
    one_kind = [(f, False) for f, _ in known]
    fallback = select(candidates, 5, [first.box], "expected_error", known=one_kind)
    assert [p.box for p in fallback] == [p.box for p in select(candidates, 5, [first.box], diversity="balanced")]
    assert all(p.reason.startswith("expected_error: no texture model until") for p in fallback)
    both_calls = [replace(c, tumour=i % 3 == 0) for i, c in enumerate(candidates)]  # the tiny net marks all
    marked = {c.box: c.tumour for c in both_calls}
    calls = [marked[p.box] for p in select(both_calls, 4, [], "expected_error", known=one_kind)]
    assert calls in ([True, False, True, False], [False, True, False, True])


def test_nearest_candidate_shares_the_most_pixels(candidates):
    """The dock reads a correction's features from the scored patch most like it (audits lie off the grid)."""
    grid = candidates[4].box
    assert nearest_candidate(candidates, grid) is candidates[4]
    shifted = Box(grid.image, grid.y + 10, grid.x + 50, grid.h, grid.w)  # 50 px of 128 towards the right neighbour
    near = nearest_candidate(candidates, shifted)
    assert near.box.image == grid.image and near.box.overlaps(shifted) and near.box.x >= grid.x
    assert nearest_candidate(candidates, Box("elsewhere", 0, 0, 64, 64)) is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_organ_preset_proposes_distinct_quarter_patches_spread_over_tiles(net, strategy):
    tiles = load_pairs(EBHI / "images", EBHI / "masks")
    config = config_for("organ", samples=2)  # the default: 4 quarter patches per patch, spread over clusters
    torch.manual_seed(5)
    picks = propose(net, tiles, 8, 0.5, config, [], strategy, np.random.default_rng(5))
    assert len(picks) == 8 and {(p.h, p.w) for p in picks} == {(112, 112)}  # quarters of the 224 px tiles
    assert not any(a.overlaps(b) for i, a in enumerate(picks) for b in picks[i + 1 :])
    assert len({p.image for p in picks}) >= 3  # a batch covers several tiles
    torch.manual_seed(5)
    assert picks == propose(net, tiles, 8, 0.5, config, [], strategy, np.random.default_rng(5))
