"""npe2 reader: whole slides (TIFF / OME-TIFF / SVS / NDPI / MRXS / SCN / BIF / VMS / DICOM) and H&E images.

Every file opens through :class:`napari_uga.wsi.Slide`: a pyramid becomes a lazy multiscale
layer (only the tiles on screen are decoded), with its µm/px in ``metadata["mpp"]`` and its
path in ``metadata["path"]``. A single-channel image opens as a labels layer (a 0/1 mask).
A file that cannot be read gives one line in napari's notification, never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .io import InputError, read_mask
from .wsi import MAX_FLAT_SIDE, PLAIN_SUFFIXES, NotRGBError, Slide, is_slide_path, slide_name

LayerData = tuple[object, dict, str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read` for slides, slide folders (DICOM) and image files, else ``None``."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(Path(p).exists() and is_slide_path(p) for p in paths):
        return None
    return read


def read(path: str | list[str]) -> list[LayerData]:
    """Layer data for one or more slides or image files.

    A file that cannot be read raises :class:`InputError` with one line naming it and why
    (napari shows it as a notification; the viewer stays usable).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [read_one(Path(p)) for p in paths]


def read_one(path: Path, mpp: float | None = None) -> LayerData:
    """One slide as an image layer (multiscale when it has levels) or, for a 0/1 mask image, a labels layer."""
    meta: dict = {"name": slide_name(path)}
    try:
        slide = Slide(path, mpp)
    except NotRGBError:
        if path.suffix.lower() in (*PLAIN_SUFFIXES, ".tif", ".tiff"):
            return _map_or_mask(path, meta)
        raise
    meta["metadata"] = {"path": str(path), "mpp": slide.mpp, "reader": slide.reader}
    levels = slide.levels
    if len(levels) > 1:
        return levels, {**meta, "multiscale": True, "rgb": True}, "image"
    return levels[0], {**meta, "rgb": True}, "image"


def _map_or_mask(path: Path, meta: dict) -> LayerData:
    """A single-channel file: a pyramid of values (e.g. a written map) as an image, else a 0/1 mask as labels."""
    from .slides import read_pyramid

    meta = {**meta, "metadata": {"path": str(path)}}
    levels = read_pyramid(path) if path.suffix.lower() in (".tif", ".tiff") else None
    if levels is None or (len(levels) == 1 and max(levels[0].shape[:2]) <= MAX_FLAT_SIDE):
        try:
            return read_mask(path), meta, "labels"
        except InputError:
            if levels is None:
                raise
    return levels, {**meta, "multiscale": len(levels) > 1, "rgb": False}, "image"
