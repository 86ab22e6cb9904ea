"""Whole-slide maps computed tile by tile: the plan, a view-first tile queue and a chunked store per round.

Qt-free. The dock tells the :class:`TileQueue` where the view is; :func:`compute_maps` pops
jobs from it (visible tiles nearest the view centre first, then a slide-wide survey of
candidate patches, then the rest of the tissue), writes each result into the round's
:class:`MapStore` (zarr, one pyramid per map, uint8) and yields a :class:`TileProgress`.
Scored candidate patches are appended to the store as they are computed, so proposals can be
ranked over the whole slide long before the whole slide is computed.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .io import InputError
from .selection import Box, Candidate, appearance_features
from .wsi import Slide

TILE = 512  # working-scale tile side: one inference job and four store chunks
CHUNK = 256
MARGIN = 64  # working-scale context around a tile or patch (32 left seams: mean |Δp| 0.19 at a tile edge, 64: 0.017)
MIN_TISSUE = 0.6  # a candidate patch worth an annotator's time is mostly tissue
SURVEY_PATCHES = 160  # candidate patches scored across the whole tissue before the slide is done
SURVEY_MIN_TILES = 48  # below this many tissue tiles the slide itself is computed as fast as a survey
MIN_LEVEL_SIDE = 256
ENTROPY_SCALE = 255 / math.log(2)  # nats -> uint8 (the largest binary entropy is ln 2)
MAP_KEYS = ("probability", "entropy")


@dataclass(frozen=True)
class MapPlan:
    """How a slide is mapped: source level, scales, the working-scale tile grid and the tissue tiles."""

    level: int  # the slide level read
    factor: float  # working px per px of that level
    scale: float  # level-0 px per working px
    shape: tuple[int, int]  # working-scale height and width
    tiles: tuple[tuple[int, int], ...]  # tissue tiles (row, column)
    grid: tuple[int, int]
    patch: int  # candidate patch side in working px

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MapPlan:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        for key in ("shape", "grid"):
            data[key] = tuple(data[key])
        data["tiles"] = tuple(tuple(t) for t in data["tiles"])
        return cls(**data)

    def tile_box(self, tile: tuple[int, int]) -> tuple[int, int, int, int]:
        """Working-scale (y, x, h, w) of a tile, clipped to the slide."""
        y, x = tile[0] * TILE, tile[1] * TILE
        return y, x, min(TILE, self.shape[0] - y), min(TILE, self.shape[1] - x)

    def to_level0(self, y: int, x: int, h: int, w: int, image: str, within: tuple[int, int] | None = None) -> Box:
        """A working-scale box as a level-0 :class:`Box`, cut to a level-0 ``within`` (height, width) if given
        (rounding can carry a box at the slide's edge a pixel past it)."""
        s = self.scale
        y0, x0, h0, w0 = round(y * s), round(x * s), max(1, round(h * s)), max(1, round(w * s))
        if within is not None:
            h0, w0 = max(1, min(h0, within[0] - y0)), max(1, min(w0, within[1] - x0))
        return Box(image, y0, x0, h0, w0)

    def to_working(self, box: Box) -> tuple[int, int, int, int]:
        """A level-0 box in working-scale pixels (y, x, h, w)."""
        s = self.scale
        return round(box.y / s), round(box.x / s), max(1, round(box.h / s)), max(1, round(box.w / s))


def pick_level(slide: Slide, target_mpp: float) -> tuple[int, float]:
    """The coarsest level not coarser than ``target_mpp`` and its level-to-working factor."""
    level = 0
    for i in range(len(slide.levels)):
        if slide.level_mpp(i) <= target_mpp * 1.05:
            level = i
    return level, slide.level_mpp(level) / target_mpp


def tissue_crop(tissue: np.ndarray, scale: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Nearest-neighbour crop of a low-resolution tissue mask (``scale`` mask px per box px) to a box."""
    y0, x0, h, w = box
    rows = np.clip(((y0 + np.arange(h) + 0.5) * scale).astype(int), 0, tissue.shape[0] - 1)
    cols = np.clip(((x0 + np.arange(w) + 0.5) * scale).astype(int), 0, tissue.shape[1] - 1)
    return tissue[np.ix_(rows, cols)]


def plan_maps(slide: Slide, input_mpp: float, patch_um: float) -> MapPlan:
    """Working level, scales, and the tiles that hold tissue (from the slide's tissue mask)."""
    level, factor = pick_level(slide, input_mpp)
    scale = input_mpp / slide.level_mpp(0)
    h0, w0 = slide.shape
    shape = (max(1, math.ceil(h0 / scale)), max(1, math.ceil(w0 / scale)))
    grid = (-(-shape[0] // TILE), -(-shape[1] // TILE))
    tissue, tissue_ds = slide.tissue()
    per_px = scale / tissue_ds  # tissue px per working px
    tiles = []
    for ty in range(grid[0]):
        for tx in range(grid[1]):
            y, x = ty * TILE, tx * TILE
            box = (y, x, min(TILE, shape[0] - y), min(TILE, shape[1] - x))
            if _coarse_any(tissue, per_px, box):
                tiles.append((ty, tx))
    patch = max(16, round(patch_um / input_mpp))
    return MapPlan(level, factor, scale, shape, tuple(tiles), grid, patch)


def _coarse_any(tissue: np.ndarray, per_px: float, box: tuple[int, int, int, int]) -> bool:
    y, x, h, w = box
    y0, x0 = int(y * per_px), int(x * per_px)
    y1, x1 = max(y0 + 1, math.ceil((y + h) * per_px)), max(x0 + 1, math.ceil((x + w) * per_px))
    return bool(tissue[y0:y1, x0:x1].any())


# -- the store -------------------------------------------------------------------------


class MapStore:
    """One round's maps at working scale in a zarr folder: ``probability`` and ``entropy`` pyramids (uint8).

    ``done`` flags a tile once its maps are written; ``candidates.jsonl`` holds the scored
    candidate patches (one JSON line per patch, level-0 boxes), appended as they are computed.
    A crash leaves at most the tile in flight undone; a partial last line is ignored.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        import zarr

        self.folder = Path(folder)
        self.group = zarr.open_group(self.folder, mode="r+")
        self.plan = MapPlan.from_dict(self.group.attrs["plan"])
        self.levels = {key: [self.group[f"{key}/{i}"] for i in range(self.group.attrs["n_levels"])] for key in MAP_KEYS}
        self.done = np.asarray(self.group["done"]).astype(bool)
        self._candidates_path = self.folder / "candidates.jsonl"
        self.candidates = _read_candidates(self._candidates_path)
        self.histogram = np.asarray(self.group.attrs.get("histogram", [0] * 256), np.int64)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, folder: str | os.PathLike, plan: MapPlan, slide_fingerprint: str) -> MapStore:
        """A new empty store (refuses to replace an existing one)."""
        import zarr

        folder = Path(folder)
        if folder.exists():
            raise InputError(f"{folder}: a map store already exists")
        tmp = folder.with_name(f".{folder.name}.partial")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(tmp, mode="w")
        shapes = level_shapes(plan.shape)
        for key in MAP_KEYS:
            for i, shape in enumerate(shapes):
                group.create_array(f"{key}/{i}", shape=shape, chunks=(CHUNK, CHUNK), dtype="uint8", fill_value=0)
        group.create_array("done", shape=plan.grid, chunks=plan.grid, dtype="uint8", fill_value=0)
        group.attrs.update({"plan": plan.to_dict(), "n_levels": len(shapes), "fingerprint": slide_fingerprint})
        os.replace(tmp, folder)
        return cls(folder)

    @classmethod
    def _of_slide(cls, folder: Path, slide_fingerprint: str) -> MapStore | None:
        """The store in ``folder`` if it was begun on this slide; ``None`` when absent, other or unreadable."""
        if not folder.exists():
            return None
        try:
            store = cls(folder)
            return store if store.group.attrs.get("fingerprint") == slide_fingerprint else None
        except Exception:  # noqa: BLE001 - an unreadable store is recomputed
            return None

    @classmethod
    def saved_plan(cls, folder: str | os.PathLike, slide_fingerprint: str) -> MapPlan | None:
        """The plan of a round's store begun on this slide; ``None`` when there is none (or it is unreadable)."""
        store = cls._of_slide(Path(folder), slide_fingerprint)
        return None if store is None else store.plan

    @classmethod
    def open_or_create(cls, folder: str | os.PathLike, plan: MapPlan, slide_fingerprint: str) -> MapStore:
        """The store of a round: reopened when it matches the slide and plan, else started afresh."""
        import shutil

        folder = Path(folder)
        store = cls._of_slide(folder, slide_fingerprint)
        if store is not None and store.plan == plan:
            return store
        if folder.exists():
            shutil.rmtree(folder)
        return cls.create(folder, plan, slide_fingerprint)

    # -- writing -------------------------------------------------------------------------
    def write(self, y: int, x: int, probability: np.ndarray, entropy: np.ndarray) -> None:
        """Write working-scale float maps at (y, x) into every level (means over 2^k x 2^k blocks)."""
        values = {"probability": probability * 255, "entropy": entropy * ENTROPY_SCALE}
        for key, full in values.items():
            for k, array in enumerate(self.levels[key]):
                f = 2**k
                ly, lx = y // f, x // f
                pooled = _pool(full, f) if f > 1 else full
                pooled = pooled[: array.shape[0] - ly, : array.shape[1] - lx]
                if pooled.size:
                    array[ly : ly + pooled.shape[0], lx : lx + pooled.shape[1]] = np.clip(pooled + 0.5, 0, 255).astype(
                        np.uint8
                    )
        tissue = entropy[entropy > 0] * ENTROPY_SCALE
        self.histogram += np.bincount(np.clip(tissue, 0, 255).astype(int), minlength=256)

    def mark_done(self, tile: tuple[int, int], candidates: Sequence[Candidate]) -> None:
        """Append a tile's candidates, then flag it done (in that order, so a done tile has its candidates)."""
        self.add_candidates(candidates)
        with self._lock:
            self.done[tile] = True
            self.group["done"][tile] = 1
            self.group.attrs["histogram"] = self.histogram.tolist()

    def add_candidates(self, candidates: Sequence[Candidate]) -> None:
        """Append scored candidate patches (level-0 boxes) to the store."""
        if not candidates:
            return
        lines = "".join(json.dumps(_candidate_record(c)) + "\n" for c in candidates)
        with self._lock, open(self._candidates_path, "a") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
            self.candidates.extend(candidates)

    # -- reading -------------------------------------------------------------------------
    def pending(self) -> list[tuple[int, int]]:
        """Tissue tiles not yet computed."""
        return [t for t in self.plan.tiles if not self.done[t]]

    def complete(self) -> bool:
        """Every tissue tile is computed."""
        return not self.pending()

    def region(self, key: str, y: int, x: int, h: int, w: int) -> np.ndarray:
        """A working-scale box of a map as float32 (probability in [0, 1], entropy in nats)."""
        raw = np.asarray(self.levels[key][0][max(0, y) : y + h, max(0, x) : x + w], np.float32)
        return raw / (255 if key == "probability" else ENTROPY_SCALE)

    def limits(self) -> tuple[float, float]:
        """Display contrast of the uint8 entropy: tissue median to 99.5th percentile (flat maps from zero)."""
        total = self.histogram.sum()
        if total == 0:
            return 0.0, 255.0
        cdf = np.cumsum(self.histogram) / total
        low, high = float(np.searchsorted(cdf, 0.5)), float(np.searchsorted(cdf, 0.995))
        if high - low < 0.05 * high:
            low = 0.0
        return low, max(high, low + 1.0)


def level_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Shapes of a map pyramid: halved until the longer side would drop below 256 (at most 10 levels)."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) >= 2 * MIN_LEVEL_SIDE and len(shapes) < 10:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _pool(values: np.ndarray, f: int) -> np.ndarray:
    h, w = values.shape
    hh, ww = -(-h // f) * f, -(-w // f) * f
    padded = np.pad(values, ((0, hh - h), (0, ww - w)), mode="edge")
    return padded.reshape(hh // f, f, ww // f, f).mean(axis=(1, 3))


def _candidate_record(c: Candidate) -> dict:
    return {**asdict(c.box), "score": float(c.score), "features": [float(v) for v in c.features], "tumour": c.tumour}


def _read_candidates(path: Path) -> list[Candidate]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            box = Box(r["image"], r["y"], r["x"], r["h"], r["w"])
            out.append(Candidate(box, float(r["score"]), np.asarray(r["features"], np.float32), bool(r["tumour"])))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash
    return out


class MapView:
    """A level of a map as napari reads it: the newest round where its tile is done, else the older rounds'.

    So after a fine-tune the previous round's tiles stay on screen until their replacements arrive.
    ``threshold`` turns the probability into a 0/1 prediction; ``outline`` keeps only its boundary
    (1 px at the level read), which napari draws far faster than a labels layer's contour.
    """

    def __init__(
        self, stores: Sequence[MapStore], key: str, level: int, threshold: int | None = None, outline: bool = False
    ) -> None:
        self.stores, self.key, self.k, self.threshold, self.outline = list(stores), key, level, threshold, outline
        self.shape = tuple(stores[0].levels[key][level].shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 2

    @property
    def size(self) -> int:
        """Number of elements."""
        return self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (2 - len(key))
        slices = [k if isinstance(k, slice) else slice(int(k), int(k) + 1) for k in key]
        (y0, y1, sy), (x0, x1, sx) = (s.indices(n) for s, n in zip(slices, self.shape, strict=True))
        y1, x1 = max(y0, y1), max(x0, x1)
        if self.outline:
            out = self._outline(y0, y1, x0, x1)
        else:
            out = self._values(y0, y1, x0, x1)
            if self.threshold is not None:
                out = (out >= self.threshold).astype(np.uint8)
        out = out[::sy, ::sx]
        return out[tuple(0 if not isinstance(k, slice) else slice(None) for k in key)]

    def _outline(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The boundary pixels of the thresholded map in a box (read with a 1 px rim for the neighbours)."""
        py0, px0 = max(0, y0 - 1), max(0, x0 - 1)
        py1, px1 = min(self.shape[0], y1 + 1), min(self.shape[1], x1 + 1)
        inside = np.pad(self._values(py0, py1, px0, px1) >= (self.threshold or 128), 1, mode="edge")
        core = inside[1:-1, 1:-1]
        interior = core & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        edge = (core & ~interior).astype(np.uint8)
        return edge[y0 - py0 : y0 - py0 + (y1 - y0), x0 - px0 : x0 - px0 + (x1 - x0)]

    def _values(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The uint8 map in a box: the newest round where its tiles are done, else an older round's."""
        out = np.asarray(self.stores[0].levels[self.key][self.k][y0:y1, x0:x1])
        if len(self.stores) > 1 and out.size:
            tile = TILE / 2**self.k
            rows = (np.arange(y0, y1) // tile).astype(int)
            cols = (np.arange(x0, x1) // tile).astype(int)
            filled = np.zeros(out.shape, bool)
            for store in self.stores:
                done = store.done[
                    np.ix_(np.minimum(rows, store.done.shape[0] - 1), np.minimum(cols, store.done.shape[1] - 1))
                ]
                take = done & ~filled
                if store is not self.stores[0] and take.any():
                    older = np.asarray(store.levels[self.key][self.k][y0:y1, x0:x1])
                    out = np.where(take, older, out)
                filled |= done
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)


def map_levels(
    stores: Sequence[MapStore], key: str, threshold: int | None = None, outline: bool = False
) -> list[MapView]:
    """Every level of a map as :class:`MapView` (finest first), for a multiscale napari layer."""
    return [MapView(stores, key, k, threshold, outline) for k in range(len(stores[0].levels[key]))]


# -- the queue ---------------------------------------------------------------------------


class TileQueue:
    """Jobs in priority order: visible tiles nearest the view centre, then survey patches, then other tiles.

    Thread-safe: the dock calls :meth:`set_view` from the main thread while a worker pops.
    """

    def __init__(
        self, tiles: Sequence[tuple[int, int]], survey: Sequence[Box] = (), seed: int = 0, tile: int = TILE
    ) -> None:
        self._lock = threading.Lock()
        self.tile = tile
        order = np.random.default_rng(seed).permutation(len(tiles))
        self._background = [tuple(tiles[i]) for i in order]  # spread over the tissue: an overview fills in evenly
        self._pending = set(self._background)
        self._survey = list(survey)
        self._front: list[tuple[int, int]] = []
        self.total = len(self._pending) + len(self._survey)

    def set_view(self, y0: float, x0: float, y1: float, x1: float) -> None:
        """The visible working-scale box: its pending tiles go first, nearest its centre first."""
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        t = self.tile
        with self._lock:
            visible = [
                (ty, tx)
                for ty, tx in self._pending
                if ty * t < y1 and (ty + 1) * t > y0 and tx * t < x1 and (tx + 1) * t > x0
            ]
            visible.sort(key=lambda p: ((p[0] + 0.5) * t - cy) ** 2 + ((p[1] + 0.5) * t - cx) ** 2)
            self._front = visible

    def pop(self) -> tuple[str, object] | None:
        """The next job: ``("tile", (row, col))`` or ``("patch", Box)``; ``None`` when all are done."""
        with self._lock:
            for source in (self._front, None, self._background):
                if source is None:
                    if self._survey:
                        return "patch", self._survey.pop(0)
                    continue
                while source:
                    tile = source.pop(0)
                    if tile in self._pending:
                        self._pending.discard(tile)
                        return "tile", tile
            return None

    def put_back(self, job: tuple[str, object]) -> None:
        """Return a job that was popped but not finished (a cancel) to the head of the queue."""
        kind, item = job
        with self._lock:
            if kind == "tile":
                self._pending.add(item)
                self._front.insert(0, item)
            else:
                self._survey.insert(0, item)

    def remaining(self) -> int:
        """Jobs not yet popped."""
        with self._lock:
            return len(self._pending) + len(self._survey)

    def survey_left(self) -> int:
        """Survey patches not yet popped."""
        with self._lock:
            return len(self._survey)


def survey_boxes(slide: Slide, plan: MapPlan, n: int = SURVEY_PATCHES, seed: int = 0) -> list[Box]:
    """``n`` candidate patches drawn at random over all the tissue of a large slide (none on a small one)."""
    if len(plan.tiles) < SURVEY_MIN_TILES:
        return []
    return random_tissue_boxes(slide, plan, n, seed)


def random_tissue_boxes(
    slide: Slide,
    plan: MapPlan,
    n: int,
    seed: int = 0,
    exclude: Sequence[Box] = (),
    side: int | None = None,
    grid: bool = False,
) -> list[Box]:
    """``n`` patches (level-0 boxes) of ``side`` working px (default the plan's patch) drawn uniformly at
    random over the tissue, none overlapping ``exclude``. With ``grid`` they are drawn uniformly among the
    cells of a grid of ``side`` working px (audits: a quarter patch then covers the fewest of the
    half-overlapping candidate patches)."""
    side = plan.patch if side is None else side
    if not 1 <= side <= plan.patch:
        raise ValueError(f"audit patch side {side} must be between 1 and the plan's patch {plan.patch}")
    tissue, ds = slide.tissue()
    step = max(1, int(side * plan.scale / ds))  # patch side in tissue-mask px
    ys, xs = np.nonzero(tissue[::step, ::step])
    places = np.stack([(ys * step * ds / plan.scale).astype(int), (xs * step * ds / plan.scale).astype(int)], 1)
    if grid:
        places = np.unique(places // side * side, axis=0)  # each cell once: uniform over the cells
    rng = np.random.default_rng(seed)
    picked: list[Box] = []
    for wy, wx in places[rng.permutation(len(places))]:
        if wy + side > plan.shape[0] or wx + side > plan.shape[1]:
            continue
        if tissue_crop(tissue, plan.scale / ds, (wy, wx, side, side)).mean() < MIN_TISSUE:
            continue
        box = plan.to_level0(int(wy), int(wx), side, side, slide.name)
        if box.y + box.h > slide.shape[0] or box.x + box.w > slide.shape[1]:  # rounding past the slide's edge
            continue
        if not any(box.overlaps(p) for p in [*picked, *exclude]):
            picked.append(box)
        if len(picked) == n:
            break
    return picked


# -- computing ---------------------------------------------------------------------------


@dataclass
class TileProgress:
    """What one finished job reports: where, how far, how fast."""

    kind: str  # "tile" or "patch"
    box: tuple[int, int, int, int]  # working-scale (y, x, h, w)
    done: int
    total: int
    rate: float  # jobs per second so far
    eta: float  # seconds left at that rate
    survey_left: int

    @property
    def message(self) -> str:
        """One line for a progress bar."""
        return f"{self.done}/{self.total} tiles · {self.rate:.2f} tiles/s · {_duration(self.eta)} left"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "—"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class TileMapper:
    """Computes the maps of one working-scale box of a slide with a model (margin for context, tissue only)."""

    def __init__(self, model, slide: Slide, plan: MapPlan, samples: int, tta: str = "none") -> None:
        self.model, self.slide, self.plan, self.samples, self.tta = model, slide, plan, samples, tta
        self.tissue, ds = slide.tissue()
        self.tissue_per_px = plan.scale / ds

    def maps(self, y: int, x: int, h: int, w: int):
        """Working-scale probability and entropy of a box, its working-scale RGB and tissue mask."""
        from .training import resize_image
        from .uncertainty import compute_uncertainty_safe

        plan = self.plan
        wy0, wx0 = max(0, y - MARGIN), max(0, x - MARGIN)
        wy1, wx1 = min(plan.shape[0], y + h + MARGIN), min(plan.shape[1], x + w + MARGIN)
        level = self.slide.levels[plan.level]
        sy0, sx0 = int(wy0 / plan.factor), int(wx0 / plan.factor)
        sy1 = min(level.shape[0], math.ceil(wy1 / plan.factor))
        sx1 = min(level.shape[1], math.ceil(wx1 / plan.factor))
        source = level[sy0:sy1, sx0:sx1]
        oy, ox = round(sy0 * plan.factor), round(sx0 * plan.factor)
        out_h, out_w = max(1, round((sy1 - sy0) * plan.factor)), max(1, round((sx1 - sx0) * plan.factor))
        tissue = tissue_crop(self.tissue, self.tissue_per_px, (oy, ox, out_h, out_w))
        result = compute_uncertainty_safe(
            self.model,
            source,
            samples=self.samples,
            tta=self.tta,
            factor=plan.factor,
            batch_size=1,
            tile=max(out_h, out_w),
            output_scale="working",
            tissue=tissue,
        )  # fmt: skip  (one pass over the whole window: its margin is the context)
        rgb = resize_image(source, plan.factor) if abs(plan.factor - 1) > 1e-3 else source
        crop = (slice(y - oy, y - oy + h), slice(x - ox, x - ox + w))
        parts = [_fit(a[crop], h, w) for a in (result.probability, result.entropy, rgb, tissue)]
        probability, entropy, rgb, tissue = parts
        probability = np.where(tissue, probability, 0).astype(np.float32)
        entropy = np.where(tissue, entropy, 0).astype(np.float32)
        return probability, entropy, rgb, tissue


def _fit(array: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pad (edge) or cut an array to h x w (rounding at the slide's edge)."""
    array = array[:h, :w]
    pad = ((0, h - array.shape[0]), (0, w - array.shape[1])) + ((0, 0),) * (array.ndim - 2)
    return np.pad(array, pad, mode="edge") if any(p[1] for p in pad) else array


def candidates_in(
    plan: MapPlan,
    image: str,
    y: int,
    x: int,
    probability,
    entropy,
    rgb,
    tissue,
    how: str = "mean",
    within: tuple[int, int] | None = None,
) -> list[Candidate]:
    """Scored candidate patches (level-0 boxes, cut to the level-0 ``within``) on a half-overlapping grid
    inside a computed working box."""
    from .selection import grid_boxes
    from .uncertainty import patch_score

    out = []
    h, w = probability.shape
    if min(h, w) < plan.patch:
        return out
    for box in grid_boxes(image, (h, w), plan.patch):
        in_tissue = box.crop(tissue)
        if in_tissue.mean() < MIN_TISSUE:
            continue
        prob = box.crop(probability)
        out.append(
            Candidate(
                box=plan.to_level0(y + box.y, x + box.x, box.h, box.w, image, within),
                score=patch_score(box.crop(entropy)[in_tissue], how),
                features=np.concatenate([appearance_features(box.crop(rgb)), [prob.mean()]]).astype(np.float32),
                tumour=bool((prob >= 0.5).mean() >= 0.05),
            )
        )
    return out


def compute_maps(
    mapper: TileMapper, store: MapStore, queue: TileQueue, cancel=None, how: str = "mean"
) -> Iterator[TileProgress]:
    """Pop jobs until the queue is empty or ``cancel`` is set, writing each into ``store``; yields progress."""
    start, finished = time.perf_counter(), 0
    total = queue.remaining()
    image = mapper.slide.name
    while cancel is None or not cancel.is_set():
        job = queue.pop()
        if job is None:
            return
        kind, item = job
        box = mapper.plan.tile_box(item) if kind == "tile" else mapper.plan.to_working(item)
        try:
            probability, entropy, rgb, tissue = mapper.maps(*box)
        except BaseException:
            queue.put_back(job)
            raise
        store.write(box[0], box[1], probability, entropy)
        found = candidates_in(
            mapper.plan, image, box[0], box[1], probability, entropy, rgb, tissue, how, mapper.slide.shape[:2]
        )
        if kind == "tile":
            store.mark_done(item, found)
        else:
            store.add_candidates(found)
        finished += 1
        rate = finished / max(time.perf_counter() - start, 1e-6)
        left = queue.remaining()
        yield TileProgress(kind, box, total - left, total, rate, left / rate, queue.survey_left())


def round_store_path(session_folder: str | os.PathLike, round_index: int) -> Path:
    """Where the maps of a model round live in a session folder."""
    return Path(session_folder) / "maps" / f"round_{round_index:03d}.zarr"
