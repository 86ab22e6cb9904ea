"""Whole-slide maps tile by tile: the plan, the view-first queue, the per-round store and its views."""

from __future__ import annotations

import numpy as np
import pytest

from napari_uga.selection import Box
from napari_uga.slides import write_tissue_slide
from napari_uga.tiles import (
    MARGIN,
    TILE,
    MapPlan,
    MapStore,
    MapView,
    TileMapper,
    TileQueue,
    compute_maps,
    level_shapes,
    map_levels,
    plan_maps,
    random_tissue_boxes,
    survey_boxes,
)
from napari_uga.training import CancelToken
from napari_uga.wsi import Slide


@pytest.fixture(scope="module")
def island_slide(tmp_path_factory, umcu_pairs):
    """12,000 x 16,000 px at 0.243 µm/px, real tiles in islands over ~15 % of it."""
    path = tmp_path_factory.mktemp("tiles") / "islands.ome.tif"
    tiles = [p.image for p in umcu_pairs]
    return write_tissue_slide(path, (12_000, 16_000), tiles, tissue_fraction=0.15, n_islands=5, seed=4)


def test_plan_keeps_tissue_tiles_only(island_slide):
    with Slide(island_slide) as slide:
        plan = plan_maps(slide, 0.486, 256 * 0.243)
    assert plan.scale == pytest.approx(2.0) and plan.shape == (6000, 8000) and plan.patch == 128
    assert plan.grid == (12, 16) and 0 < len(plan.tiles) < 0.5 * 12 * 16
    assert plan.level == 1 and plan.factor == pytest.approx(1.0)  # read from the level at the working scale


def test_audit_boxes_lie_on_their_grid_in_the_tissue_and_avoid_what_is_taken(island_slide):
    with Slide(island_slide) as slide:
        plan = plan_maps(slide, 0.486, 256 * 0.243)
        taken = random_tissue_boxes(slide, plan, 3, seed=1)
        audits = random_tissue_boxes(slide, plan, 12, seed=2, exclude=taken, side=64, grid=True)
        tissue, ds = slide.tissue()
    assert len(audits) == 12 and len(set(audits)) == 12
    assert all(y % 64 == 0 and x % 64 == 0 and (h, w) == (64, 64) for y, x, h, w in map(plan.to_working, audits))
    cells = [tissue[int(b.y / ds) : int((b.y + b.h) / ds), int(b.x / ds) : int((b.x + b.w) / ds)] for b in audits]
    assert all(cell.size and cell.mean() > 0.5 for cell in cells)  # mostly tissue
    assert not any(a.overlaps(t) for a in audits for t in taken)


def test_queue_serves_the_view_first_nearest_its_centre_then_survey_then_rest():
    tiles = [(y, x) for y in range(6) for x in range(6)]
    survey = [Box("s", 0, 0, 8, 8), Box("s", 100, 100, 8, 8)]
    queue = TileQueue(tiles, survey, seed=1)
    queue.set_view(2 * TILE, 3 * TILE, 4 * TILE, 5 * TILE)  # tiles rows 2-3, columns 3-4
    first = [queue.pop() for _ in range(4)]
    assert {item for _, item in first} == {(2, 3), (2, 4), (3, 3), (3, 4)}
    assert [queue.pop()[0] for _ in range(2)] == ["patch", "patch"]
    queue.set_view(0, 0, TILE, TILE)  # the user pans: the new view jumps the queue
    assert queue.pop() == ("tile", (0, 0))
    rest = []
    while (job := queue.pop()) is not None:
        rest.append(job[1])
    assert len(rest) == 36 - 5 and len(set(rest)) == len(rest)
    queue.put_back(("tile", (5, 5)))  # a cancelled job comes back first
    assert queue.pop() == ("tile", (5, 5)) and queue.remaining() == 0


def test_store_pyramid_done_flags_candidates_and_fallback_to_the_older_round(tmp_path, island_slide, tiny_model):
    with Slide(island_slide) as slide:
        plan = plan_maps(slide, 0.486, 256 * 0.243)
        old = MapStore.create(tmp_path / "round_000.zarr", plan, "fp")
        new = MapStore.create(tmp_path / "round_001.zarr", plan, "fp")
        assert [tuple(a.shape) for a in old.levels["entropy"]] == level_shapes(plan.shape)
        mapper = TileMapper(tiny_model, slide, plan, samples=2)
        queue = TileQueue(plan.tiles[:3], survey_boxes(slide, plan, 4) if len(plan.tiles) >= 48 else [])
        events = list(compute_maps(mapper, old, queue))
        assert [e.done for e in events][-1] == events[0].total and old.done.sum() == 3
        assert old.candidates and all(c.box.h == 256 for c in old.candidates)
        assert slide.levels[plan.level].largest_read <= (TILE + 2 * MARGIN) ** 2  # one tile and its margins at a time
    y, x, h, w = plan.tile_box(plan.tiles[0])
    values = old.region("probability", y, x, h, w)
    assert values.shape == (h, w) and 0 <= values.min() and values.max() <= 1
    coarse = np.asarray(old.levels["probability"][1][y // 2 : (y + h) // 2, x // 2 : (x + w) // 2], float)
    fine = np.asarray(old.levels["probability"][0][y : y + h, x : x + w], float)
    assert abs(coarse.mean() - fine.mean()) < 2  # levels are 2 x 2 means
    view = MapView([new, old], "probability", 0)
    np.testing.assert_array_equal(view[y : y + h, x : x + w], old.levels["probability"][0][y : y + h, x : x + w])
    new.write(y, x, np.ones((h, w), np.float32), np.zeros((h, w), np.float32))
    new.mark_done(plan.tiles[0], [])
    assert (view[y : y + h, x : x + w] == 255).all()  # the new round's tile replaces the old one once done
    assert [v.shape for v in map_levels([new, old], "entropy")] == level_shapes(plan.shape)
    outline = MapView([new], "probability", 0, threshold=128, outline=True)[y : y + h, x : x + w]
    assert outline[0].all() and outline[:, 0].all() and not outline[1:-1, 1:-1].any()  # the tile's boundary only

    (tmp_path / "round_000.zarr" / "candidates.jsonl").open("a").write('{"image": "cut')  # a crash mid-line
    reopened = MapStore.open_or_create(tmp_path / "round_000.zarr", plan, "fp")
    assert reopened.done.sum() == 3 and len(reopened.candidates) == len(old.candidates)
    assert sorted(reopened.pending()) == sorted(set(plan.tiles) - set(plan.tiles[:3]))
    assert MapStore.open_or_create(tmp_path / "round_000.zarr", plan, "other slide").done.sum() == 0


def test_cancel_stops_between_tiles_and_keeps_what_is_done(tmp_path, island_slide, tiny_model):
    with Slide(island_slide) as slide:
        plan = plan_maps(slide, 0.486, 256 * 0.243)
        store = MapStore.create(tmp_path / "r.zarr", plan, "fp")
        queue = TileQueue(plan.tiles, [])
        token = CancelToken()
        run = compute_maps(TileMapper(tiny_model, slide, plan, 1), store, queue, token)
        next(run)
        token.set()
        assert list(run) == []
    assert store.done.sum() == 1 and queue.remaining() == len(plan.tiles) - 1


def test_survey_spreads_over_the_tissue(island_slide):
    with Slide(island_slide) as slide:
        plan = plan_maps(slide, 0.486, 256 * 0.243)
        boxes = survey_boxes(slide, plan, 30, seed=0)
        tissue, ds = slide.tissue()
    assert len(boxes) == 30 and not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert all(tissue[int((b.y + b.h / 2) / ds), int((b.x + b.w / 2) / ds)] for b in boxes)
    assert np.std([b.y for b in boxes]) > 1000 and np.std([b.x for b in boxes]) > 1000  # not one corner


def test_a_box_at_the_slides_edge_is_cut_to_the_slide():
    """Rounding working px to level-0 px can carry an edge patch past the slide: its image would be a row short."""
    plan = MapPlan(level=0, factor=1 / 2.15, scale=2.15, shape=(1723, 667), tiles=(), grid=(1, 1), patch=128)
    past = plan.to_level0(1596, 0, 128, 128, "s")
    assert past.y + past.h == 3706  # two rows past a slide of 3704
    cut = plan.to_level0(1596, 0, 128, 128, "s", within=(3704, 1434))
    assert (cut.y, cut.h, cut.w) == (past.y, 273, past.w)
