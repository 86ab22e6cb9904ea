"""Image, mask and slide input/output with validation.

Every reader checks shape, dtype and channel count and raises :class:`InputError`
with a one-line message naming the file, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MIN_SIZE = 64
MAX_DECODED_BYTES = 16384 * 16384 * 4  # an image read whole (or one TIFF tile or strip) is never larger
MAX_TILE_BYTES = 2048 * 2048 * 4  # nor is a tile larger than this, unless its whole image is (a single strip)


class InputError(ValueError):
    """Bad user input: a missing, unreadable or malformed file or folder."""


class MissingScaleError(InputError):
    """An image or slide whose µm/px is neither in its metadata nor given: it is never guessed."""


REPLAY_MPP = 0.243  # µm/px of the shipped replay tiles (Camelyon16 RUMC level 0, the training centre)
MPP_HINT = "give --mpp (µm per pixel of level 0, e.g. 0.25 for a 40x scan, 0.5 for 20x)"


@dataclass(frozen=True)
class Pair:
    """One image with its (optional) ground-truth mask."""

    name: str
    image: np.ndarray
    mask: np.ndarray | None = None


def list_images(path: str | os.PathLike) -> list[Path]:
    """Image files in a folder (sorted), or the single file given."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _imread(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                level = tif.series[0].levels[0]
                check_decoded_size(path, level.shape, level.dtype, level.keyframe)
                return tif.asarray(series=0, level=0)
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise InputError(f"{path}: not a readable image ({type(exc).__name__})") from None


def check_decoded_size(path: str | os.PathLike, shape, dtype, page=None, whole: bool = True) -> None:
    """Refuse, before anything is allocated, an image (``whole``) or a TIFF tile/strip (``page``) over the limit.

    A damaged or hostile header can claim any size; what it claims is checked here, not found
    out by trying to allocate it.
    """
    itemsize = np.dtype(dtype).itemsize
    image = math.prod(shape) * itemsize
    if whole and image > MAX_DECODED_BYTES:
        raise InputError(f"{path}: claims an image of {' x '.join(map(str, shape))} px, too large to read whole")
    chunks = getattr(page, "chunks", None)  # one tile or strip: never much larger than the image it is part of
    if chunks is not None and math.prod(chunks) * itemsize > min(MAX_DECODED_BYTES, max(2 * image, MAX_TILE_BYTES)):
        raise InputError(
            f"{path}: claims tiles of {' x '.join(map(str, chunks))} px in a {' x '.join(map(str, shape))} image "
            "(a damaged header)"
        )


def to_rgb_uint8(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Validate an RGB(A) image array and return it as H x W x 3 uint8."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InputError(f"{source}: expected an RGB image (H x W x 3), got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.dtype == np.uint16 and array.max(initial=0) <= 255:
            array = array.astype(np.uint8)
        elif np.issubdtype(array.dtype, np.floating) and array.min() >= 0 and array.max() <= 1:
            array = np.round(array * 255).astype(np.uint8)
        else:
            raise InputError(f"{source}: unsupported dtype {array.dtype} (expected uint8 RGB)")
    array = array[..., :3]
    if min(array.shape[:2]) < MIN_SIZE:
        raise InputError(f"{source}: image is {array.shape[1]}x{array.shape[0]} px, smaller than {MIN_SIZE} px")
    return np.ascontiguousarray(array)


def to_binary_mask(array: np.ndarray, source: str = "mask") -> np.ndarray:
    """Validate a single-channel mask (0 / 1 or 0 / 255) and return it as uint8 0/1."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if not np.all(array[..., :3] == array[..., :1]):
            raise InputError(f"{source}: mask must have a single channel, got shape {array.shape}")
        array = array[..., 0]
    if array.ndim != 2:
        raise InputError(f"{source}: mask must be 2-D, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise InputError(f"{source}: mask dtype {array.dtype} is not an integer type")
    return (array > 0).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB image file as H x W x 3 uint8 (level 0 of a pyramid)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return to_rgb_uint8(_imread(path), str(path))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a binary mask file as H x W uint8 with values 0/1."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return to_binary_mask(_imread(path), str(path))


def mask_path_for(image_path: Path, masks_dir: Path) -> Path:
    """The mask file with the same stem as an image (any image suffix)."""
    for suffix in (image_path.suffix, *IMAGE_SUFFIXES):
        candidate = masks_dir / f"{image_path.stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(f"{image_path}: no mask named {image_path.stem}.* in {masks_dir}")


def load_pairs(images: str | os.PathLike, masks: str | os.PathLike | None = None) -> list[Pair]:
    """Read every image of a folder (or one file) and, if given, its mask; sizes must match."""
    pairs = []
    masks_dir = Path(masks) if masks is not None else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise InputError(f"{masks_dir}: no such folder")
    for path in list_images(images):
        image = read_image(path)
        mask = None
        if masks_dir is not None:
            mask_file = mask_path_for(path, masks_dir)
            mask = read_mask(mask_file)
            if mask.shape != image.shape[:2]:
                raise InputError(f"{mask_file}: mask is {mask.shape[::-1]} but image is {image.shape[1::-1]}")
        pairs.append(Pair(path.stem, image, mask))
    return pairs


def tissue_mask(rgb: np.ndarray, min_saturation: float = 0.07, max_value: float = 0.92) -> np.ndarray:
    """Tissue (not glass) from the image alone: saturated or dark pixels, cleaned up.

    Uses the HSV saturation / value of an H&E image; never looks at any ground truth.
    """
    from scipy import ndimage
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(np.asarray(rgb)[..., :3])
    tissue = (hsv[..., 1] > min_saturation) | (hsv[..., 2] < 0.5)
    tissue &= hsv[..., 2] < max_value + 0.08
    tissue = ndimage.binary_opening(tissue, iterations=2)
    return ndimage.binary_fill_holes(tissue)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file under a temporary name in the same folder, flush it to disk, then rename it into place.

    So the final name always holds a complete file: the old one or the new one, after a crash,
    a power cut, a full disk or a read-only folder (an ``OSError`` then, and the old file stays).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform or file system can)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, payload: object) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


def _encode(array: np.ndarray, suffix: str) -> bytes:
    import io as _bytesio

    buffer = _bytesio.BytesIO()
    if suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(buffer, array, compression="zlib")
    else:
        import imageio.v3 as iio

        iio.imwrite(buffer, array, extension=suffix)
    return buffer.getvalue()


def write_array(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a map (TIFF, any dtype) or a mask/image (PNG) atomically."""
    path = Path(path)
    atomic_write_bytes(path, _encode(np.asarray(array), path.suffix.lower()))
    return path
