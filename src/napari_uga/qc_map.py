"""QC maps of slides: predicted Dice, acceptance and the exchangeability gate cell by cell over the tissue.

A slide (or any image larger than one cell) is cut into a grid of square **cells** of
``QC_CELL`` level-0 pixels; every cell holding tissue is read at level 0 (the source pixels,
as the calibration tiles were: one bounded read per cell) and gets the full QC row
(:func:`napari_uga.quality.compute_features`), so the gate compares like with like. The
decisions become a small map (one pixel per cell: predicted Dice, state, domain p-value;
OME-TIFF with the cell's µm/px), a summary (share of the tissue accepted, to review, out of
domain) and the worst cells as regions in level-0 coordinates (JSON and QuPath GeoJSON).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .io import atomic_write_json, tissue_mask

QC_CELL = 512  # level-0 px per map cell: the QC dock's patch side
MIN_CELL_TISSUE = 0.2  # a cell with less tissue than this is not checked
STATES = {0: "no tissue", 1: "accepted", 2: "review", 3: "out of domain"}
MAP_CHANNELS = ("dice_pred", "state", "domain_p")
WORST = 10  # regions listed in the summary and the GeoJSON

Box = tuple[int, int, int, int]  # level-0 y, x, height, width


def grid_shape(shape: tuple[int, int], cell: int = QC_CELL) -> tuple[int, int]:
    """Rows and columns of the cell grid over a level-0 shape (edge cells are clipped)."""
    return -(-int(shape[0]) // cell), -(-int(shape[1]) // cell)


def tissue_cells(
    shape: tuple[int, int],
    tissue: np.ndarray,
    tissue_ds: float,
    cell: int = QC_CELL,
    region: Box | None = None,
    min_tissue: float = MIN_CELL_TISSUE,
) -> list[Box]:
    """The grid cells (level-0 boxes) whose tissue share in ``tissue`` (level-0 px per mask px ``tissue_ds``)
    reaches ``min_tissue``; with ``region``, only the cells whose top-left corner lies in it."""
    gh, gw = grid_shape(shape, cell)
    out = []
    for gy in range(gh):
        for gx in range(gw):
            y, x = gy * cell, gx * cell
            if region is not None and not (
                region[0] <= y < region[0] + region[2] and region[1] <= x < region[1] + region[3]
            ):
                continue
            h, w = min(cell, shape[0] - y), min(cell, shape[1] - x)
            ty0, tx0 = int(y / tissue_ds), int(x / tissue_ds)
            ty1, tx1 = max(ty0 + 1, math.ceil((y + h) / tissue_ds)), max(tx0 + 1, math.ceil((x + w) / tissue_ds))
            crop = tissue[ty0:ty1, tx0:tx1]
            if crop.size and crop.mean() >= min_tissue:
                out.append((y, x, h, w))
    return out


def image_tissue(image) -> tuple[np.ndarray, float]:
    """Tissue mask of an in-memory image at a quarter of its resolution, and its downsample (4)."""
    return tissue_mask(np.asarray(image[::4, ::4])[..., :3]), 4.0


def cell_rows(
    model,
    level0,
    cells: Sequence[Box],
    factor: float,
    samples: int,
    tta: str,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """The full QC row of each cell, read at level 0 from ``level0`` (an array or a lazy slide level)."""
    from .quality import compute_features

    rows = []
    for i, (y, x, h, w) in enumerate(cells):
        image = np.ascontiguousarray(np.asarray(level0[y : y + h, x : x + w])[..., :3])
        rows.append(compute_features(model, image, factor, samples, tta)[0])
        if progress is not None:
            progress(i + 1, len(cells))
    return rows


def cell_states(accepted: np.ndarray, in_domain: np.ndarray) -> np.ndarray:
    """1 accepted, 2 review, 3 out of domain, per checked cell."""
    return np.where(~np.asarray(in_domain, bool), 3, np.where(np.asarray(accepted, bool), 1, 2)).astype(np.uint8)


def qc_map(
    shape: tuple[int, int],
    cells: Sequence[Box],
    pred: np.ndarray,
    states: np.ndarray,
    p: np.ndarray,
    cell: int = QC_CELL,
) -> np.ndarray:
    """The 3 x rows x cols float32 map: predicted Dice (NaN off tissue), state (0-3), domain p (NaN untested)."""
    out = np.full((len(MAP_CHANNELS), *grid_shape(shape, cell)), np.nan, np.float32)
    out[1] = 0
    for (y, x, _, _), d, s, q in zip(cells, pred, states, p, strict=True):
        gy, gx = min(round(y / cell), out.shape[1] - 1), min(round(x / cell), out.shape[2] - 1)  # shifted edge patches
        out[:, gy, gx] = (d, s, q)
    return out


def map_summary(cells: Sequence[Box], pred: np.ndarray, states: np.ndarray, p: np.ndarray, worst: int = WORST) -> dict:
    """Shares of the checked tissue (by area) accepted / to review / out of domain, and the worst cells.

    The worst cells are those not accepted, out of domain first (their predicted Dice means
    nothing), then by predicted Dice from the lowest; each with its level-0 box.
    """
    areas = np.array([h * w for _, _, h, w in cells], float)
    total = areas.sum()

    def share(state: int) -> float:
        return float(areas[states == state].sum() / total) if total else 0.0

    order = sorted((i for i in range(len(cells)) if states[i] != 1), key=lambda i: (states[i] != 3, float(pred[i])))[
        :worst
    ]
    regions = [
        {
            "y": int(cells[i][0]),
            "x": int(cells[i][1]),
            "height": int(cells[i][2]),
            "width": int(cells[i][3]),
            "dice_pred": round(float(pred[i]), 4),
            "domain_p": None if not np.isfinite(p[i]) else round(float(p[i]), 4),
            "state": STATES[int(states[i])],
        }
        for i in order
    ]
    return {
        "n_cells": len(cells),
        "share_accepted": share(1),
        "share_review": share(2),
        "share_out_of_domain": share(3),
        "worst": regions,
    }


def regions_geojson(regions: Sequence[dict]) -> dict:
    """The regions as a QuPath-importable GeoJSON FeatureCollection (level-0 pixel coordinates)."""
    features = []
    for rank, r in enumerate(regions, 1):
        x0, y0, x1, y1 = r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "annotation",
                "name": f"QC {rank}: {r['state']}, predicted Dice {r['dice_pred']:.2f}",
                "classification": {"name": "QC review", "color": [220, 40, 40]},
                "dice_pred": r["dice_pred"],
                "domain_p": r["domain_p"],
                "state": r["state"],
            },
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def write_qc_map(path: str | os.PathLike, values: np.ndarray, cell_mpp: float | None, name: str = "") -> Path:
    """Write the map as a C x Y x X float32 OME-TIFF (channel names; pixel size = one cell), atomically."""
    import tifffile

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    metadata: dict = {"axes": "CYX", "Name": name, "Channel": {"Name": list(MAP_CHANNELS)}}
    options: dict = {}
    if cell_mpp is not None:
        metadata.update(PhysicalSizeX=cell_mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=cell_mpp, PhysicalSizeYUnit="µm")
        options = {"resolution": (1e4 / cell_mpp, 1e4 / cell_mpp), "resolutionunit": "CENTIMETER"}
    try:
        tifffile.imwrite(tmp, values.astype(np.float32), ome=True, photometric="minisblack", metadata=metadata,
                         **options)  # fmt: skip
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def map_outputs(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """The QC map files of a slide: the OME-TIFF map and the worst regions as GeoJSON."""
    return {"qc_map": Path(out_dir) / f"{name}_qc_map.ome.tif", "qc_regions": Path(out_dir) / f"{name}_qc.geojson"}


def decide_cells(qc, rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted Dice, state (1-3) and domain p-value of the cells' rows under a ``QCModel``."""
    pred, accepted, p = qc.decide(list(rows))
    return pred, cell_states(accepted, qc.in_domain(p)), p


def slide_qc(
    qc, shape: tuple[int, int], cells: Sequence[Box], rows: Sequence[dict], mpp: float | None, out_dir, name: str
) -> tuple[dict, dict[str, Path]]:
    """Decide every cell, write the map and the regions; the slide's QC record fields and the files.

    The slide's ``dice_pred`` is the area-weighted mean over its cells, ``domain_p`` merges the
    cells' (twice their median), and the slide is accepted only when every cell is.
    """
    from .quality import merge_p_values

    pred, states, p = decide_cells(qc, rows)
    summary = map_summary(cells, pred, states, p)
    paths = map_outputs(out_dir, name)
    write_qc_map(paths["qc_map"], qc_map(shape, cells, pred, states, p), None if mpp is None else mpp * QC_CELL, name)
    atomic_write_json(paths["qc_regions"], regions_geojson(summary["worst"]))
    domain_p = merge_p_values(p)
    in_domain = bool(qc.in_domain(np.array([domain_p]))[0])
    areas = np.array([h * w for _, _, h, w in cells], float)
    fields = {
        "dice_pred": float(np.average(pred, weights=areas)) if len(cells) else None,
        "accepted": bool(len(cells)) and bool(np.all(states == 1)) and in_domain,
        "in_domain": in_domain,
        "domain_p": domain_p if np.isfinite(domain_p) else None,
        "qc_map": {"cell": QC_CELL, "cell_mpp": None if mpp is None else mpp * QC_CELL, **summary},
    }
    return fields, paths
