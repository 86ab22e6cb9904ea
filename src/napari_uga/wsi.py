"""The one slide abstraction: lazy levels of any whole-slide file, its µm/px, thumbnail and tissue.

Which library reads what:

- **tifffile** (with imagecodecs) reads TIFF, OME-TIFF, Aperio SVS (JPEG and JPEG 2000) and
  Hamamatsu NDPI: pure Python, it exposes each level as a zarr store whose chunks are the
  file's own tiles, so a read decodes only the tiles it touches.
- **OpenSlide** (``openslide-python`` with the ``openslide-bin`` wheel, no system library)
  reads what tifffile cannot: 3DHistech MRXS, Leica SCN, Ventana BIF, Hamamatsu VMS/VMU,
  Philips TIFF and DICOM WSI (a folder of ``.dcm`` instances: the folder is the slide).
- PNG / JPEG images are small by nature and read whole (one level).

Every level is a :class:`SlideLevel`: an array-like (``shape``, ``dtype``, ``ndim``, slicing)
that napari shows as a multiscale layer and the core reads box by box. A level records the
largest read it served, so tests can prove that nothing larger than a block is ever read.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .io import MPP_HINT, InputError, MissingScaleError, check_decoded_size, tissue_mask

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".ome.tif", ".ome.tiff", ".btf")
OPENSLIDE_SUFFIXES = (".mrxs", ".scn", ".bif", ".vms", ".vmu", ".dcm")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = (*TIFF_SUFFIXES, *OPENSLIDE_SUFFIXES, *PLAIN_SUFFIXES)
TISSUE_SIDE = 2048  # the tissue mask comes from a level (or a stride of one) at most this long
MAX_FLAT_SIDE = 16384  # a single-level image larger than this cannot be shown or surveyed without a pyramid
OVERVIEW_SIDE = 2048  # a single-level image gets halved levels down to this size (napari shows it multiscale)
MAX_READ_PIXELS = 8192 * 8192  # no read of a slide is ever larger (a guard, not a working size)
_UNIT_TO_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


class NotRGBError(InputError):
    """The file is readable but not an RGB uint8 image (a mask, a map, fluorescence channels)."""


def plausible_mpp(mpp: float | None) -> float | None:
    """``mpp`` when it is a believable pixel size (0.01-20 µm/px), else ``None``."""
    return float(mpp) if mpp is not None and 0.01 <= float(mpp) <= 20 else None


def _ome_mpp(xml: str) -> float | None:
    root = ET.fromstring(xml)
    for element in root.iter():
        if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
            unit = element.attrib.get("PhysicalSizeXUnit", "µm")
            return float(element.attrib["PhysicalSizeX"]) * _UNIT_TO_UM.get(unit, 1.0)
    return None


def _tag_mpp(page) -> float | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    per_unit = num / den if den else 0.0
    unit = int(tags["ResolutionUnit"].value)
    if per_unit <= 0 or unit not in (2, 3):
        return None
    return (25400.0 if unit == 2 else 10000.0) / per_unit


def read_mpp(tif) -> float | None:
    """Level-0 µm/px of an open ``tifffile.TiffFile``: OME metadata, SVS ``MPP``, or resolution tags."""
    mpp = None
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.ome_metadata)
    if mpp is None and tif.is_svs:
        found = re.search(r"MPP\s*=\s*([0-9.]+)", tif.pages[0].description)
        mpp = float(found.group(1)) if found else None
    if mpp is None:
        mpp = _tag_mpp(tif.pages[0])
    return plausible_mpp(mpp)


def slide_name(path: str | os.PathLike) -> str:
    """A slide's name: its file (or DICOM folder) name without the slide suffixes."""
    name = Path(path).name
    for suffix in sorted(SLIDE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_slide_path(path: str | os.PathLike) -> bool:
    """True for a file with a slide suffix, or a folder holding DICOM instances."""
    path = Path(path)
    if path.is_dir():
        return any(p.suffix.lower() == ".dcm" for p in path.iterdir())
    return path.name.lower().endswith(SLIDE_SUFFIXES)


def fingerprint(path: str | os.PathLike) -> str:
    """Cheap fingerprint of a slide file (or DICOM folder): sizes plus the first and last 64 KiB of each file."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name if path.is_dir() else ''}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(65536))
            handle.seek(max(0, size - 65536))
            digest.update(handle.read(65536))
    return digest.hexdigest()[:16]


class SlideLevel:
    """One level of a slide as a lazy H x W x 3 uint8 array: slicing reads only the box asked for."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, shape: tuple[int, int], read_box) -> None:
        self.shape = (int(shape[0]), int(shape[1]), 3)
        self._read_box = read_box  # (y0, y1, x0, x1) -> h x w x 3 uint8
        self.largest_read = 0  # pixels of the largest box read so far
        self.reads = 0

    @property
    def size(self) -> int:
        """Number of elements (as numpy arrays have)."""
        return self.shape[0] * self.shape[1] * 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key
        y0, y1, sy = _as_slice(ys, self.shape[0]).indices(self.shape[0])
        x0, x1, sx = _as_slice(xs, self.shape[1]).indices(self.shape[1])
        if sy < 0 or sx < 0:
            raise IndexError("negative steps are not supported on a slide level")
        y1, x1 = max(y0, y1), max(x0, x1)
        pixels = (y1 - y0) * (x1 - x0)
        if pixels > MAX_READ_PIXELS:
            raise InputError(f"refusing to read {y1 - y0} x {x1 - x0} px of a slide at once (read it tile by tile)")
        self.largest_read = max(self.largest_read, pixels)
        self.reads += 1
        box = self._read_box(y0, y1, x0, x1) if pixels else np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        return box[_local(ys, sy), _local(xs, sx), cs]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype)


def _halved_reader(parent: SlideLevel, part: int = 2048):
    """Reads a box of a level half the size of ``parent`` (2 x 2 means), in parent reads of at most ``part`` px."""

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        step = part // 2
        for y in range(y0, y1, step):
            for x in range(x0, x1, step):
                h, w = min(step, y1 - y), min(step, x1 - x)
                block = parent[2 * y : 2 * (y + h), 2 * x : 2 * (x + w)]
                ph, pw = 2 * h - block.shape[0], 2 * w - block.shape[1]
                if ph or pw:
                    block = np.pad(block, ((0, ph), (0, pw), (0, 0)), mode="edge")
                out[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = block.reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
        return out

    return read


def _local(key, step: int):
    """The index into a read box that applies ``key`` (an int picks its one row, a slice its step)."""
    return slice(None, None, step) if isinstance(key, slice) else 0


def _as_slice(key, length: int) -> slice:
    if isinstance(key, slice):
        return key
    index = int(key) + (length if int(key) < 0 else 0)
    return slice(index, index + 1)


class Slide:
    """A whole-slide image opened lazily: ``levels`` (finest first), ``mpp``, thumbnail and tissue.

    Open any supported file (or a DICOM folder) with ``Slide(path)``; ``mpp`` overrides the
    file's pixel size. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.name = slide_name(self.path)
        self._closers: list = []
        self._lock = threading.Lock()
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or folder")
        if mpp is not None and plausible_mpp(mpp) is None:
            raise InputError(f"mpp: {mpp} µm/px is outside the plausible range 0.01-20")
        lower = self.path.name.lower()
        if self.path.is_dir() or lower.endswith(OPENSLIDE_SUFFIXES):
            self.levels, file_mpp = self._open_openslide()
            self.reader = "openslide"
        elif lower.endswith(PLAIN_SUFFIXES):
            self.levels, file_mpp = self._open_plain()
            self.reader = "imageio"
        elif lower.endswith(TIFF_SUFFIXES):
            self.levels, file_mpp = self._open_tiff()
            self.reader = "tifffile"
        else:
            raise InputError(f"{self.path}: not a slide format napari-uga reads ({', '.join(SLIDE_SUFFIXES)})")
        self.file_mpp = file_mpp
        self._add_overview_levels()
        self.mpp = plausible_mpp(mpp) if mpp is not None else file_mpp
        if max(self.levels[-1].shape[:2]) > MAX_FLAT_SIDE:
            self.close()
            raise self._unpyramided(self.levels[0].shape, self.levels[-1].shape)

    def _unpyramided(self, level0: tuple, coarsest: tuple) -> InputError:
        """The error for an image too large to show or survey without a (small enough) pyramid level."""
        return InputError(
            f"{self.path}: a {level0[1]} x {level0[0]} px image without a small enough pyramid level "
            f"(coarsest {coarsest[1]} x {coarsest[0]}); save it as a tiled pyramid first, "
            "e.g. `vips tiffsave in out.tif --tile --pyramid --compression jpeg`"
        )

    # -- backends --------------------------------------------------------------------
    def _open_tiff(self) -> tuple[list[SlideLevel], float | None]:
        import tifffile
        import zarr

        try:
            tif = tifffile.TiffFile(self.path)
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
            raise InputError(f"{self.path}: not a readable TIFF slide ({type(exc).__name__}: {exc})") from None
        self._closers.append(tif.close)
        try:
            series = tif.series[0]
            arrays = [zarr.open(tif.aszarr(series=0, level=i), mode="r") for i in range(len(series.levels))]
            file_mpp = read_mpp(tif)
            pages = [level.keyframe for level in series.levels]
        except Exception as exc:  # noqa: BLE001
            self.close()
            raise InputError(f"{self.path}: not a readable TIFF slide ({type(exc).__name__}: {exc})") from None
        try:  # what the header claims, checked before a tile is decoded (RGB or not)
            for page, array in zip(pages, arrays, strict=True):
                check_decoded_size(self.path, array.shape, array.dtype, page, whole=False)
                if 0 in array.shape[:2]:
                    raise InputError(f"{self.path}: not a readable TIFF slide (a level of {array.shape} px is empty)")
            if max(arrays[-1].shape[:2]) > MAX_FLAT_SIDE:
                raise self._unpyramided(arrays[0].shape, arrays[-1].shape)
        except InputError:
            self.close()
            raise
        shape, dtype = arrays[0].shape, arrays[0].dtype
        if len(shape) != 3 or shape[-1] not in (3, 4) or dtype != np.uint8:
            self.close()
            raise NotRGBError(f"{self.path}: expected an RGB uint8 slide (H x W x 3), got {shape} {dtype}")
        levels = [SlideLevel(a.shape[:2], self._zarr_reader(a)) for a in arrays]
        self._check_readable(levels[-1])
        return levels, file_mpp

    def _zarr_reader(self, array):
        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            try:
                with self._lock:  # one file handle, many threads
                    return np.asarray(array[y0:y1, x0:x1, :3])
            except Exception as exc:  # noqa: BLE001 - a damaged tile reads as a clear error
                raise InputError(
                    f"{self.path}: tiles at ({y0}, {x0}) cannot be decoded ({type(exc).__name__})"
                ) from None

        return read

    def _open_openslide(self) -> tuple[list[SlideLevel], float | None]:
        try:
            import openslide
        except ImportError:  # pragma: no cover - openslide-python is a dependency
            raise InputError(f"{self.path}: reading this format needs openslide-python and openslide-bin") from None
        target = self.path
        if self.path.is_dir():
            instances = sorted(p for p in self.path.iterdir() if p.suffix.lower() == ".dcm")
            if not instances:
                raise InputError(f"{self.path}: a folder that holds no DICOM (.dcm) instances")
            target = instances[0]
        try:
            handle = openslide.OpenSlide(str(target))
        except Exception as exc:  # noqa: BLE001 - unsupported, truncated or corrupt
            raise InputError(f"{self.path}: OpenSlide cannot open it ({type(exc).__name__}: {exc})") from None
        self._closers.append(handle.close)
        file_mpp = plausible_mpp(_float(handle.properties.get("openslide.mpp-x")))
        levels = []
        for i, (w, h) in enumerate(handle.level_dimensions):
            levels.append(SlideLevel((h, w), self._openslide_reader(handle, i)))
        self._check_readable(levels[-1])
        return levels, file_mpp

    def _openslide_reader(self, handle, level: int):
        down = handle.level_downsamples[level]

        def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            with self._lock:  # one OpenSlide handle, many threads
                region = handle.read_region((round(x0 * down), round(y0 * down)), level, (x1 - x0, y1 - y0))
            rgba = np.asarray(region)
            rgb = rgba[..., :3].copy()
            rgb[rgba[..., 3] == 0] = 255  # outside the scanned area: white glass
            return rgb

        return read

    def _open_plain(self) -> tuple[list[SlideLevel], float | None]:
        from .io import read_image

        try:
            image = read_image(self.path)
        except InputError as exc:
            raise NotRGBError(str(exc)) from None
        return [SlideLevel(image.shape[:2], lambda y0, y1, x0, x1: image[y0:y1, x0:x1])], None

    def _add_overview_levels(self) -> None:
        """Give a single-level image halved levels (read from the one below, box by box) down to 2048 px."""
        if len(self.levels) != 1 or max(self.levels[0].shape[:2]) > MAX_FLAT_SIDE:
            return
        while max(self.levels[-1].shape[:2]) > OVERVIEW_SIDE:
            parent = self.levels[-1]
            h, w = parent.shape[:2]
            self.levels.append(SlideLevel((-(-h // 2), -(-w // 2)), _halved_reader(parent)))

    def _check_readable(self, level: SlideLevel) -> None:
        """Decode one tile of the coarsest level now, so a truncated file fails at open, not later."""
        try:
            level[: min(64, level.shape[0]), : min(64, level.shape[1])]
        except InputError:
            self.close()
            raise
        level.largest_read, level.reads = 0, 0

    # -- context -----------------------------------------------------------------------
    def __enter__(self) -> Slide:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file(s)."""
        for close in self._closers:
            close()
        self._closers = []

    # -- geometry ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 height and width."""
        return self.levels[0].shape[:2]

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of ``level``."""
        return self.levels[0].shape[1] / self.levels[level].shape[1]

    def level_mpp(self, level: int) -> float:
        """µm/px of a level; a slide that does not say its scale (and no ``mpp`` given) is a MissingScaleError."""
        return self.require_mpp() * self.downsample(level)

    def require_mpp(self) -> float:
        """Level-0 µm/px, never guessed: the file's or the one given, else a one-line MissingScaleError."""
        if self.mpp is None:
            raise MissingScaleError(f"{self.path}: no µm/px in the file; {MPP_HINT}")
        return self.mpp

    def largest_read(self) -> int:
        """Pixels of the largest box read from any level so far."""
        return max(level.largest_read for level in self.levels)

    def dask(self, level: int = 0, chunk: int = 512):
        """A level as a dask array (``chunk``-sided blocks)."""
        import dask.array as da

        return da.from_array(self.levels[level], chunks=(chunk, chunk, 3), asarray=True, fancy=False)

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """A box of a level (clipped to the level), H x W x 3 uint8."""
        return self.levels[level][max(0, y) : y + h, max(0, x) : x + w]

    def _small_level(self, max_side: int) -> tuple[int, int]:
        """The finest level whose longer side fits ``max_side`` (else the coarsest) and a stride that fits it."""
        fitting = [i for i, a in enumerate(self.levels) if max(a.shape[:2]) <= max_side]
        level = fitting[0] if fitting else len(self.levels) - 1
        step = max(1, math.ceil(max(self.levels[level].shape[:2]) / max_side))
        return level, step

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB overview whose longer side is at most ``max_side``, and its level-0 px per thumbnail px."""
        level, step = self._small_level(max_side)
        rgb = _strided(self.levels[level], step)
        return rgb, self.downsample(level) * step

    def tissue(self, max_side: int = TISSUE_SIDE) -> tuple[np.ndarray, float]:
        """Tissue mask from a low level and its downsample (level-0 px per mask px); computed once per size."""
        from scipy import ndimage

        cache = self.__dict__.setdefault("_tissue", {})
        if max_side not in cache:
            rgb, ds = self.thumbnail(max_side)
            mask = tissue_mask(rgb) if min(rgb.shape[:2]) >= 8 else np.ones(rgb.shape[:2], bool)
            mask = ndimage.binary_dilation(mask, iterations=1)
            mask.flags.writeable = False
            cache[max_side] = (mask, ds)
        return cache[max_side]


def _strided(level: SlideLevel, step: int, strip: int = 1024) -> np.ndarray:
    """Every ``step``-th pixel of a small level, read in strips of about ``strip`` rows (bounded reads)."""
    h, w = level.shape[:2]
    rows_per_read = max(step, strip // step * step)
    rows = []
    for y in range(0, h, rows_per_read):
        rows.append(level[y : y + rows_per_read, :][::step, ::step])
    return np.concatenate(rows) if rows else np.zeros((0, w, 3), np.uint8)


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def list_inputs(spec: str | os.PathLike) -> list[Path]:
    """Images and slides named by a folder, a file or a glob pattern (sorted)."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text))]
    elif Path(text).is_dir():
        paths = [Path(text)] if is_slide_path(text) else sorted(Path(text).iterdir())
    elif Path(text).is_file():
        paths = [Path(text)]
    else:
        raise InputError(f"{text}: no such file, folder or matching pattern")
    paths = [p for p in paths if is_slide_path(p)]
    if not paths:
        raise InputError(f"{text}: no image or slide files ({', '.join(SLIDE_SUFFIXES)}, or a DICOM folder)")
    names = [slide_name(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{text}: several inputs share the name {duplicates[0]!r}; outputs would collide")
    return paths


WHOLE_PIXELS = 4096 * 4096  # level-0 px up to which a slide is read into memory whole


def is_large(path: str | os.PathLike, mpp: float | None = None, limit: int = WHOLE_PIXELS) -> bool:
    """Whether a slide has more than ``limit`` level-0 pixels (PNG / JPEG never do: they are read whole)."""
    if Path(path).suffix.lower() in PLAIN_SUFFIXES:
        return False
    with Slide(path, mpp) as slide:
        h, w = slide.shape
    return h * w > limit


def require_scale(paths, mpp: float | None = None) -> None:
    """Check, before any work, that every input says its µm/px or that ``mpp`` is given (MissingScaleError)."""
    if mpp is not None:
        return
    for path in paths:
        with Slide(path) as slide:
            slide.require_mpp()


def read_whole(path: str | os.PathLike, mpp: float | None = None) -> tuple[np.ndarray, float | None]:
    """A small slide or image in memory (RGB uint8, level 0) and its µm/px (``mpp``, else the file's)."""
    from .io import to_rgb_uint8

    with Slide(path, mpp) as slide:
        h, w = slide.shape
        return to_rgb_uint8(slide.read(0, 0, 0, h, w), str(path)), slide.mpp
