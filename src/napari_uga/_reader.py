"""npe2 reader: PNG / JPEG / TIFF images, and pyramidal TIFF slides as lazy multiscale layers.

A pyramid is opened level by level through tifffile's zarr store, so only the tiles on
screen are decoded. A single-channel file opens as a labels layer (a 0/1 mask).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .io import IMAGE_SUFFIXES, InputError, read_image, read_mask

LayerData = tuple[object, dict, str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read` for supported image files, else ``None`` (napari tries other readers)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or any(Path(p).suffix.lower() not in IMAGE_SUFFIXES for p in paths):
        return None
    return read


def read(path: str | list[str]) -> list[LayerData]:
    """Layer data for one or more image files."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [read_one(Path(p)) for p in paths]


def read_one(path: Path) -> LayerData:
    """One file as an image layer (multiscale when it is a pyramid) or, for a 0/1 mask, a labels layer."""
    meta: dict = {"name": path.stem, "metadata": {"path": str(path)}}
    if path.suffix.lower() in (".tif", ".tiff"):
        levels = tiff_levels(path)
        if len(levels) > 1:
            rgb = levels[0].ndim == 3 and levels[0].shape[-1] in (3, 4)
            return levels, {**meta, "multiscale": True, "rgb": rgb}, "image"
    try:
        return read_image(path), {**meta, "rgb": True}, "image"
    except InputError:
        return read_mask(path), meta, "labels"


def tiff_levels(path: Path) -> list:
    """Every level of a TIFF as a lazily read zarr array (one element for a flat TIFF)."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        count = len(tif.series[0].levels)
    return [zarr.open(tifffile.imread(path, aszarr=True, level=i), mode="r") for i in range(count)]
