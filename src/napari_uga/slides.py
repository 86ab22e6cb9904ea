"""Whole slides: lazy multi-resolution reading, block-wise uncertainty, pyramidal OME-TIFF output.

A slide is read level by level through :class:`napari_uga.wsi.Slide` (only the tiles touched
are decoded). The working level is the coarsest one that is still at least as fine as the
network's µm/px; tissue is found on a low level so background blocks never reach the model.
The slide is processed in square blocks of working-scale pixels (plus a margin for context);
each block's maps go into a scratch zarr store, from which tiled, compressed, multi-resolution
OME-TIFFs (probability, entropy, prediction) are streamed tile by tile. Memory stays bounded
by the block size, not the slide size.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .tiles import pick_level, tissue_crop
from .wsi import TISSUE_SIDE, Slide, read_mpp, slide_name

__all__ = ["Slide", "pick_level", "read_mpp", "slide_name"]  # re-exported: the one slide abstraction lives in wsi

MAP_NAMES = ("probability", "entropy", "prediction")
SCRATCH_MAPS = ("probability", "entropy", "mutual_information", "variance")
TILE = 256  # output TIFF tile side
INFER_TILE = 512  # working-scale inference tile; with batch size 1 the network's activations stay < 1 GB at T=8


class _Window:
    """A lazy rectangular view of a level: slicing reads only what is asked for."""

    def __init__(self, array, y0: int, x0: int, h: int, w: int) -> None:
        self.array, self.y0, self.x0 = array, y0, x0
        self.shape = (h, w, array.shape[2])

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        ys, xs, cs = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        return np.asarray(self.array[self.y0 + y0 : self.y0 + y1, self.x0 + x0 : self.x0 + x1, cs])


@dataclass(frozen=True)
class SlidePlan:
    """How a slide is processed: level, scale, working shape and the blocks that hold tissue."""

    path: str
    name: str
    level: int
    factor: float
    working_mpp: float
    shape: tuple[int, int]
    block: int
    margin: int
    blocks: tuple[tuple[int, int], ...]
    n_blocks: int
    scratch: str
    source_shape: tuple[int, int]  # level 0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SlidePlan:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["shape"] = tuple(data["shape"])
        data["source_shape"] = tuple(data["source_shape"])
        data["blocks"] = tuple(tuple(b) for b in data["blocks"])
        return cls(**data)


def plan_slide(
    path: str | os.PathLike,
    scratch: str | os.PathLike,
    input_mpp: float,
    mpp: float | None = None,
    block: int = 2048,
    margin: int = 64,
) -> SlidePlan:
    """Choose the working level, detect tissue and create the scratch store for the maps.

    Parameters
    ----------
    path : the slide (multi-resolution or plain TIFF).
    scratch : a ``.zarr`` folder to create (replaced if it exists).
    input_mpp : the network's µm/px (``model.config.input_mpp``).
    mpp : level-0 µm/px when the file has none (or to override it); never guessed (MissingScaleError).
    block, margin : working-scale block side (a multiple of 256) and context margin.
    """
    import zarr

    if block % TILE:
        raise ValueError(f"block must be a multiple of {TILE}, got {block}")
    with Slide(path, mpp) as slide:
        level, factor = pick_level(slide, input_mpp)
        h_src, w_src = slide.levels[level].shape[:2]
        shape = (max(1, round(h_src * factor)), max(1, round(w_src * factor)))
        tissue, tissue_ds = slide.tissue()
        source_shape = slide.shape
        scale = input_mpp / slide.level_mpp(0) / tissue_ds  # tissue px per working px
    grid = [(by, bx) for by in range(-(-shape[0] // block)) for bx in range(-(-shape[1] // block))]
    blocks = tuple(
        (by, bx)
        for by, bx in grid
        if tissue_crop(
            tissue,
            scale,
            (by * block, bx * block, min(block, shape[0] - by * block), min(block, shape[1] - bx * block)),
        ).any()
    )
    scratch = Path(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    group = zarr.open_group(scratch, mode="w")
    for key in SCRATCH_MAPS:
        group.create_array(key, shape=shape, chunks=(block, block), dtype="float32", fill_value=0.0)
    group.create_array("tissue", data=tissue)
    group.attrs["tissue_scale"] = scale
    group.attrs["tissue_ds"] = tissue_ds
    plan = SlidePlan(
        str(path),
        slide_name(path),
        level,
        factor,
        input_mpp,
        shape,
        block,
        margin,
        blocks,
        len(grid),
        str(scratch),
        source_shape,
    )
    group.attrs["plan"] = plan.to_dict()
    return plan


def process_block(
    model,
    plan: SlidePlan,
    index: tuple[int, int],
    samples: int = 8,
    tta: str = "none",
    batch_size: int = 1,
    mpp: float | None = None,
    qc_sampling: tuple[int, str] | None = None,
) -> list[dict]:
    """Compute one block's maps (with its margin) and write them into the scratch store.

    The block is chunk-aligned, so blocks can be written by different processes at once;
    rewriting a block (a retried task) gives the same result. With ``qc_sampling`` (the QC's
    MC samples and TTA) the QC rows of the map cells whose corner lies in the block are
    returned, ``{"cell": [y, x, h, w], "row": {...}}`` each, read at level 0 as the calibration
    tiles were (:mod:`napari_uga.qc_map`).
    """
    import zarr

    from .uncertainty import compute_uncertainty_safe

    group = zarr.open_group(plan.scratch, mode="r+")
    h, w = plan.shape
    by, bx = index
    y0, x0 = by * plan.block, bx * plan.block
    bh, bw = min(plan.block, h - y0), min(plan.block, w - x0)
    wy0, wx0 = max(0, y0 - plan.margin), max(0, x0 - plan.margin)
    wy1, wx1 = min(h, y0 + bh + plan.margin), min(w, x0 + bw + plan.margin)
    with Slide(plan.path, mpp) as slide:
        level = slide.levels[plan.level]
        sy0, sx0 = int(wy0 / plan.factor), int(wx0 / plan.factor)
        sy1 = min(level.shape[0], math.ceil(wy1 / plan.factor))
        sx1 = min(level.shape[1], math.ceil(wx1 / plan.factor))
        window = _Window(level, sy0, sx0, sy1 - sy0, sx1 - sx0)
        out_h, out_w = max(1, round((sy1 - sy0) * plan.factor)), max(1, round((sx1 - sx0) * plan.factor))
        oy, ox = round(sy0 * plan.factor), round(sx0 * plan.factor)
        tissue = tissue_crop(np.asarray(group["tissue"]), group.attrs["tissue_scale"], (oy, ox, out_h, out_w))
        maps = compute_uncertainty_safe(
            model,
            window,
            samples=samples,
            tta=tta,
            factor=plan.factor,
            tile=INFER_TILE,
            batch_size=batch_size,
            output_scale="working",
            tissue=tissue,
        )
        rows = [] if qc_sampling is None else _cell_rows(model, slide, plan, group, (y0, x0, bh, bw), qc_sampling)
    for key in SCRATCH_MAPS:
        values = maps.layer(key)[y0 - oy : y0 - oy + bh, x0 - ox : x0 - ox + bw]
        pad = ((0, bh - values.shape[0]), (0, bw - values.shape[1]))
        group[key][y0 : y0 + bh, x0 : x0 + bw] = np.pad(values, pad, mode="edge") if any(p[1] for p in pad) else values
    return rows


def _cell_rows(model, slide: Slide, plan: SlidePlan, group, box: tuple, qc_sampling: tuple[int, str]) -> list[dict]:
    """QC rows of the map cells whose level-0 corner lies in a working-scale block, read at level 0."""
    from .qc_map import cell_rows, tissue_cells

    to_level0 = slide.downsample(plan.level) / plan.factor
    region = tuple(round(v * to_level0) for v in box)
    tissue = np.asarray(group["tissue"])
    cells = tissue_cells(plan.source_shape, tissue, group.attrs["tissue_ds"], region=region)
    factor = slide.level_mpp(0) / plan.working_mpp
    rows = cell_rows(model, slide.levels[0], cells, factor, *qc_sampling)
    return [{"cell": list(c), "row": r} for c, r in zip(cells, rows, strict=True)]


def _pool2(values: np.ndarray) -> np.ndarray:
    """2 x 2 mean pooling (odd edges repeated)."""
    values = np.pad(values, ((0, values.shape[0] % 2), (0, values.shape[1] % 2)), mode="edge")
    return values.reshape(values.shape[0] // 2, 2, values.shape[1] // 2, 2).mean(axis=(1, 3), dtype=np.float32)


def _build_pyramid(group, key: str, min_side: int = TILE, block: int = 2048) -> list:
    """Levels ``key``, ``key_1``, ... of a scratch map, each half the size of the previous one."""
    levels = [group[key]]
    while min(levels[-1].shape) >= 2 * min_side:
        src = levels[-1]
        shape = (-(-src.shape[0] // 2), -(-src.shape[1] // 2))
        dst = group.create_array(
            f"{key}_{len(levels)}", shape=shape, chunks=(block // 2, block // 2), dtype="float32", overwrite=True
        )
        for y in range(0, src.shape[0], block):
            for x in range(0, src.shape[1], block):
                dst[y // 2 : (y + block) // 2, x // 2 : (x + block) // 2] = _pool2(
                    np.asarray(src[y : y + block, x : x + block])
                )
        levels.append(dst)
    return levels


def _tiles(array, transform: Callable[[np.ndarray], np.ndarray], tile: int = TILE) -> Iterator[np.ndarray]:
    """Row-major tiles of a 2-D (lazy) array, padded to full tiles, one tile row in memory."""
    h, w = array.shape
    for y in range(0, h, tile):
        strip = transform(np.asarray(array[y : y + tile, :]))
        strip = np.pad(strip, ((0, tile - strip.shape[0]), (0, (-w) % tile)))
        for x in range(0, w, tile):
            yield np.ascontiguousarray(strip[:, x : x + tile])


def _to_prediction(values: np.ndarray) -> np.ndarray:
    return (values >= 0.5).astype(np.uint8)


def write_pyramid(
    path: str | os.PathLike,
    levels: list,
    mpp: float,
    dtype: str = "float32",
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    name: str = "",
) -> Path:
    """Stream lazy 2-D levels into a tiled, zlib-compressed pyramidal OME-TIFF (sub-IFDs), atomically.

    Level 0 carries the OME pixel size (µm) and every level its resolution tags.
    """
    import tifffile

    transform = transform or (lambda v: v.astype(dtype, copy=False))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    options = {
        "tile": (TILE, TILE),
        "compression": "zlib",
        "photometric": "minisblack",
        "resolutionunit": "CENTIMETER",
        "dtype": dtype,
    }
    metadata = {
        "axes": "YX",
        "Name": name,
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
    }
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for i, level in enumerate(levels):
                ds = levels[0].shape[1] / level.shape[1]
                extra = {"subifds": len(levels) - 1, "metadata": metadata} if i == 0 else {"subfiletype": 1}
                res = 1e4 / (mpp * ds)
                tif.write(_tiles(level, transform), shape=tuple(level.shape), resolution=(res, res), **options, **extra)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_pyramid_array(
    path: str | os.PathLike, values: np.ndarray, mpp: float, dtype: str = "float32", name: str = ""
) -> Path:
    """Write an in-memory 2-D map as a pyramidal OME-TIFF (levels by 2 x 2 mean pooling)."""
    levels = [np.asarray(values)]
    while min(levels[-1].shape) >= 2 * TILE:
        levels.append(_pool2(levels[-1].astype(np.float32)))
    transform = _to_prediction if dtype == "uint8" and len(levels) > 1 else None
    if transform is not None:
        levels = [levels[0].astype(np.float32), *levels[1:]]
    return write_pyramid(path, levels, mpp, dtype, transform, name)


def output_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """The three OME-TIFF outputs of a slide or image."""
    return {key: Path(out_dir) / f"{name}_{key}.ome.tif" for key in MAP_NAMES}


def finalize_slide(plan: SlidePlan, out_dir: str | os.PathLike, keep_scratch: bool = False) -> dict[str, Path]:
    """Write the OME-TIFF pyramids from the scratch store, then remove it."""
    import zarr

    group = zarr.open_group(plan.scratch, mode="r+")
    paths = output_paths(out_dir, plan.name)
    probability = _build_pyramid(group, "probability")
    write_pyramid(paths["probability"], probability, plan.working_mpp, name=f"{plan.name} probability")
    write_pyramid(paths["entropy"], _build_pyramid(group, "entropy"), plan.working_mpp, name=f"{plan.name} entropy")
    write_pyramid(
        paths["prediction"], probability, plan.working_mpp, "uint8", _to_prediction, f"{plan.name} prediction"
    )
    if not keep_scratch:
        shutil.rmtree(plan.scratch, ignore_errors=True)
    return paths


def pooled_maps(plan: SlidePlan, max_side: int = TISSUE_SIDE) -> dict[str, np.ndarray]:
    """Scratch maps mean-pooled so the longer side is at most ``max_side`` (for slide-level QC)."""
    import zarr

    group = zarr.open_group(plan.scratch, mode="r")
    k = max(1, math.ceil(max(plan.shape) / max_side))
    out = {}
    for key in SCRATCH_MAPS:
        src = group[key]
        rows = []
        for y in range(0, plan.shape[0], k * 256):
            strip = np.asarray(src[y : y + k * 256, :])
            hh, ww = -(-strip.shape[0] // k) * k, -(-strip.shape[1] // k) * k
            strip = np.pad(strip, ((0, hh - strip.shape[0]), (0, ww - strip.shape[1])), mode="edge")
            rows.append(strip.reshape(hh // k, k, ww // k, k).mean(axis=(1, 3), dtype=np.float32))
        out[key] = np.concatenate(rows)
    return out


def slide_thumbnail(plan: SlidePlan, shape: tuple[int, int], mpp: float | None = None) -> np.ndarray:
    """The slide's RGB image resized to ``shape`` from the coarsest level at least that large."""
    from skimage.transform import resize

    with Slide(plan.path, mpp) as slide:
        rgb, _ = slide.thumbnail(max(TISSUE_SIDE, *shape))
    return (resize(rgb, shape, order=1, anti_aliasing=False, preserve_range=True)).astype(np.uint8)


def process_slide(
    model,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    samples: int = 8,
    tta: str = "none",
    mpp: float | None = None,
    block: int = 2048,
    margin: int = 64,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Plan, run every tissue block and write the three pyramids of one slide, in this process.

    Returns a small summary (name, level, working shape, blocks run / total, outputs).
    """
    out_dir = Path(out_dir)
    scratch = out_dir / ".scratch" / f"{slide_name(path)}.zarr"
    plan = plan_slide(path, scratch, model.config.input_mpp, mpp, block=block, margin=margin)
    for i, index in enumerate(plan.blocks):
        process_block(model, plan, index, samples, tta, batch_size, mpp)
        if progress is not None:
            progress(i + 1, len(plan.blocks))
    paths = finalize_slide(plan, out_dir)
    return summarize_plan(plan, paths)


def summarize_plan(plan: SlidePlan, paths: dict[str, Path]) -> dict:
    """The JSON-ready summary of a processed slide."""
    return {
        "name": plan.name,
        "level": plan.level,
        "working_shape": list(plan.shape),
        "working_mpp": plan.working_mpp,
        "blocks_run": len(plan.blocks),
        "blocks_total": plan.n_blocks,
        "outputs": {k: str(v) for k, v in paths.items()},
    }


def read_pyramid(path: str | os.PathLike) -> list:
    """The levels of a written (or any) pyramidal TIFF as lazy dask arrays, finest first (for napari)."""
    import dask.array as da
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True)
    group = zarr.open(store, mode="r")
    if isinstance(group, zarr.Array):
        return [da.from_zarr(group)]
    keys = sorted(group.array_keys(), key=int)
    return [da.from_zarr(group[k]) for k in keys]


def _synthetic_tile(
    y0: float, x0: float, shape: tuple[int, int], ds: float, blobs: np.ndarray, seed: int
) -> np.ndarray:
    """RGB tile of the synthetic slide: glass, with pink tissue and purple nuclei inside ``blobs``."""
    yy = (y0 + np.arange(shape[0])[:, None] + 0.5) * ds
    xx = (x0 + np.arange(shape[1])[None, :] + 0.5) * ds
    inside = np.zeros(shape, bool)
    for cy, cx, ry, rx in blobs:
        inside |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    tile = np.full((*shape, 3), 242, np.uint8)
    if inside.any():
        rng = np.random.default_rng([seed, int(y0), int(x0), int(ds)])
        nuclei = (np.sin(yy / 9.0) * np.sin(xx / 7.0) + rng.normal(0, 0.3, shape)) > 0.6
        colour = np.where(nuclei[..., None], (110, 60, 150), (225, 150, 195)) + rng.normal(0, 8, (*shape, 3))
        tile[inside] = np.clip(colour, 0, 255).astype(np.uint8)[inside]
    return tile


def write_synthetic_slide(
    path: str | os.PathLike,
    shape: tuple[int, int],
    mpp: float = 0.243,
    n_regions: int = 6,
    tissue_fraction: float = 0.05,
    seed: int = 0,
) -> Path:
    """Write a lazily generated H&E-like pyramidal OME-TIFF (mostly glass) for tests and benchmarks.

    Tiles are generated one at a time, so any size can be written with little memory.
    """
    import tifffile

    rng = np.random.default_rng(seed)
    radius = math.sqrt(tissue_fraction * shape[0] * shape[1] / (math.pi * n_regions))
    centres = rng.uniform(radius, np.array(shape) - radius, size=(n_regions, 2))
    blobs = np.column_stack([centres, radius * rng.uniform(0.7, 1.3, (n_regions, 2))])
    n_levels = max(1, int(math.log2(max(shape) / 512)) + 1)
    options = {
        "tile": (TILE, TILE),
        "compression": "zlib",
        "photometric": "rgb",
        "resolutionunit": "CENTIMETER",
        "dtype": "uint8",
    }
    metadata = {
        "axes": "YXS",
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
    }

    def tiles(ds: int) -> Iterator[np.ndarray]:
        h, w = -(-shape[0] // ds), -(-shape[1] // ds)
        for y in range(0, h, TILE):
            for x in range(0, w, TILE):
                yield _synthetic_tile(y, x, (TILE, TILE), ds, blobs, seed)

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for i in range(n_levels):
            ds = 2**i
            extra = {"subifds": n_levels - 1, "metadata": metadata} if i == 0 else {"subfiletype": 1}
            level_shape = (-(-shape[0] // ds), -(-shape[1] // ds), 3)
            tif.write(tiles(ds), shape=level_shape, resolution=(1e4 / (mpp * ds),) * 2, **options, **extra)
    return path


def _write_rgb_levels(
    path: str | os.PathLike,
    shape: tuple[int, int],
    n_levels: int,
    level_tiles: Callable[[int], Iterator[np.ndarray]],
    mpp: float | None,
    compression: str = "zlib",
) -> Path:
    """Write a tiled RGB pyramidal OME-TIFF (level ``i`` is ``2**i`` times smaller), atomically.

    ``level_tiles(i)`` yields the 256 x 256 tiles of level ``i`` in row-major order.
    """
    import tifffile

    options = {"tile": (TILE, TILE), "compression": compression, "photometric": "rgb", "dtype": "uint8"}
    metadata: dict = {"axes": "YXS"}
    if mpp is not None:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
        options.update(resolutionunit="CENTIMETER")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for i in range(n_levels):
                ds = 2**i
                extra = {"subifds": n_levels - 1, "metadata": metadata} if i == 0 else {"subfiletype": 1}
                if mpp is not None:
                    extra["resolution"] = (1e4 / (mpp * ds),) * 2
                level_shape = (-(-shape[0] // ds), -(-shape[1] // ds), 3)
                tif.write(level_tiles(i), shape=level_shape, **options, **extra)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_rgb_pyramid(path: str | os.PathLike, image: np.ndarray, mpp: float | None = None) -> Path:
    """Save an in-memory RGB image as a tiled, lossless pyramidal OME-TIFF (levels by 2 x 2 means)."""
    levels = [np.ascontiguousarray(np.asarray(image)[..., :3])]
    while max(levels[-1].shape[:2]) > 2 * TILE:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        levels.append(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))

    def tiles(i: int) -> Iterator[np.ndarray]:
        level = levels[i]
        h, w = -(-levels[0].shape[0] // 2**i), -(-levels[0].shape[1] // 2**i)
        for y in range(0, h, TILE):
            for x in range(0, w, TILE):
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                part = level[y : y + TILE, x : x + TILE]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile

    return _write_rgb_levels(path, levels[0].shape[:2], len(levels), tiles, mpp)


def write_tissue_slide(
    path: str | os.PathLike,
    shape: tuple[int, int],
    tiles: list[np.ndarray],
    mpp: float = 0.243,
    tissue_fraction: float = 0.2,
    n_islands: int = 12,
    seed: int = 0,
) -> Path:
    """A whole-slide pyramid of any size whose tissue is real H&E: ``tiles`` (256 x 256 RGB) mirrored
    and rotated into elliptic islands covering about ``tissue_fraction``, glass elsewhere (JPEG tiles).

    Written tile by tile (a glass tile is one shared array), so memory stays small at any size.
    """
    rng = np.random.default_rng(seed)
    variants = [
        np.ascontiguousarray(np.rot90(t[:TILE, :TILE, :3], k)[:, :: 1 - 2 * f])
        for t in tiles
        for k in range(4)
        for f in (0, 1)
    ]
    radius = math.sqrt(tissue_fraction * shape[0] * shape[1] / (math.pi * n_islands))
    centres = rng.uniform(0.1, 0.9, size=(n_islands, 2)) * np.array(shape)
    axes = radius * rng.uniform(0.7, 1.3, (n_islands, 2))
    n_levels = max(1, int(math.log2(max(shape) / 1024)) + 1)
    glass = np.full((TILE, TILE, 3), 238, np.uint8)
    pools = {0: variants}

    def pool(i: int) -> list[np.ndarray]:
        if i not in pools:
            f = 2**i
            pools[i] = [
                v.reshape(TILE // f, f, TILE // f, f, 3).mean(axis=(1, 3)).astype(np.uint8) if f <= TILE else v[:1, :1]
                for v in variants
            ]
        return pools[i]

    def inside(y0: float, x0: float, size: float, n: int) -> np.ndarray:
        """Which of n x n cells (level-0 origin y0, x0, cell side size) lie inside an island."""
        yy = y0 + (np.arange(n)[:, None] + 0.5) * size
        xx = x0 + (np.arange(n)[None, :] + 0.5) * size
        mask = np.zeros((n, n), bool)
        for (cy, cx), (ry, rx) in zip(centres, axes, strict=True):
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        return mask

    def level_tiles(i: int) -> Iterator[np.ndarray]:
        f = 2**i
        h, w = -(-shape[0] // f), -(-shape[1] // f)
        sub = pool(i)
        cell = TILE // f if f <= TILE else 1  # px of one source tile at this level
        n = TILE // cell
        for y in range(0, h, TILE):
            for x in range(0, w, TILE):
                y0, x0 = y * f, x * f  # level-0 origin
                near = np.any(
                    (np.abs(centres[:, 0] - (y0 + TILE * f / 2)) < axes[:, 0] + TILE * f)
                    & (np.abs(centres[:, 1] - (x0 + TILE * f / 2)) < axes[:, 1] + TILE * f)
                )
                if not near:
                    yield glass
                    continue
                mask = inside(y0, x0, TILE, n)  # one decision per level-0 source tile
                if not mask.any():
                    yield glass
                    continue
                out = glass.copy()
                for r, c in zip(*np.nonzero(mask), strict=True):
                    ty, tx = (y0 // TILE) + r, (x0 // TILE) + c
                    v = sub[(ty * 7919 + tx * 104729 + seed) % len(sub)]
                    out[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = v
                yield out

    return _write_rgb_levels(path, shape, n_levels, level_tiles, mpp, compression="jpeg")
