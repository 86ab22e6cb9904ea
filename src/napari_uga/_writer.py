"""npe2 writers: labels as a TIFF mask, labels and shapes as QuPath-compatible GeoJSON.

GeoJSON coordinates are the layers' world coordinates (data coordinates through the layer's
``scale`` and ``translate``), which are the level-0 pixel coordinates of the slide they were
drawn on: the dock's patch-sized correction layer exports where it lies on the slide.
GeoJSON points are ``[x, y]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io import atomic_write_bytes, write_array

CLASS_COLOURS = {"Tumor": [200, 0, 0], "Proposal": [255, 200, 0]}


def write_labels_tiff(path: str, data, meta: dict) -> list[str]:
    """Write a labels layer (level 0 when multiscale) as a single-channel uint8 TIFF mask."""
    array = np.asarray(data[0] if meta.get("multiscale") else data)
    if array.max(initial=0) > 255:
        raise ValueError(f"{path}: labels above 255 do not fit an 8-bit mask")
    return [str(write_array(_with_suffix(path, (".tif", ".tiff")), array.astype(np.uint8)))]


def write_labels_geojson(path: str, data, meta: dict) -> list[str]:
    """Write each label value of a labels layer as one (multi)polygon feature."""
    array = np.asarray(data[0] if meta.get("multiscale") else data)
    features = []
    scale = np.asarray(meta.get("scale", (1.0, 1.0)), float)[-2:][::-1]  # (x, y)
    offset = np.asarray(meta.get("translate", (0.0, 0.0)), float)[-2:][::-1]
    for value in np.unique(array):
        if value == 0:
            continue
        polygons = [
            [[[float(v) for v in np.asarray(p) * scale + offset] for p in ring] for ring in polygon]
            for polygon in mask_polygons(array == value)
        ]
        geometry = {"type": "MultiPolygon", "coordinates": polygons}
        features.append(_feature(geometry, "Tumor", f"{meta.get('name', 'labels')} {int(value)}"))
    return [_dump(path, features)]


def write_shapes_geojson(path: str, data, meta: dict) -> list[str]:
    """Write the polygons and rectangles of a shapes layer (e.g. ``uga: proposals``) as features.

    Each feature is named by the layer's text (e.g. ``#1  0.412``) and carries the numeric
    feature columns (rank, score) as QuPath measurements.
    """
    rows = _feature_rows(meta, len(data))
    fmt = _text_format(meta)
    features = []
    for i, (vertices, row) in enumerate(zip(data, rows, strict=True)):
        ring = [[float(x), float(y)] for y, x in np.asarray(vertices)[:, -2:]]
        ring.append(ring[0])
        name = fmt.format(**row) if fmt else f"{meta.get('name', 'shape')} {i + 1}"
        feature = _feature({"type": "Polygon", "coordinates": [ring]}, "Proposal", name)
        feature["properties"]["measurements"] = {k: float(v) for k, v in row.items() if np.isscalar(v) and np.isreal(v)}
        features.append(feature)
    return [_dump(path, features)]


def _feature_rows(meta: dict, count: int) -> list[dict]:
    import pandas as pd

    table = pd.DataFrame(meta.get("features") if meta.get("features") is not None else {})
    return table.to_dict("records") if len(table) == count else [{} for _ in range(count)]


def _text_format(meta: dict) -> str | None:
    string = (meta.get("text") or {}).get("string")
    return string.get("format") if isinstance(string, dict) else None


def mask_polygons(mask: np.ndarray) -> list[list[list[list[float]]]]:
    """Polygons (outer ring + holes, ``[x, y]`` pixel corners) tracing a boolean mask."""
    from matplotlib.path import Path as MplPath
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.uint8), 1)
    rings = [c[:, ::-1] - 1 + 0.5 for c in find_contours(padded, 0.5, positive_orientation="high")]
    outers = [r for r in rings if _signed_area(r) < 0]
    holes = [r for r in rings if _signed_area(r) >= 0]
    polygons = [[r] for r in outers]
    for hole in holes:
        for polygon in polygons:
            if MplPath(polygon[0]).contains_point(hole[0]):
                polygon.append(hole)
                break
    return [[np.round(r, 2).tolist() for r in polygon] for polygon in polygons]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _feature(geometry: dict, classification: str, name: str) -> dict:
    properties = {
        "objectType": "annotation",
        "name": name,
        "classification": {"name": classification, "color": CLASS_COLOURS[classification]},
    }
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _dump(path: str, features: list[dict]) -> str:
    target = _with_suffix(path, (".geojson", ".json"))
    payload = {"type": "FeatureCollection", "features": features}
    atomic_write_bytes(target, json.dumps(payload).encode())
    return str(target)


def _with_suffix(path: str, suffixes: tuple[str, ...]) -> Path:
    target = Path(path)
    return target if target.suffix.lower() in suffixes else target.with_suffix(suffixes[0])
