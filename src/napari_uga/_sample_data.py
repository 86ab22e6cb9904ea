"""npe2 sample data: a small multi-resolution demo slide built from the shipped UMCU tiles.

The shipped Camelyon16 tiles of slide ``tumor_073`` (UMC Utrecht, the out-of-domain centre)
carry their level-0 slide coordinates in their names (``..._x<X>_y<Y>.png``). The demo slide
places the tumour cluster at its true relative position and packs the other (tumour-free)
tiles, which lie far apart on the slide, in a column of fragments beside it. Everything is
shipped; nothing is downloaded.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np

from .io import read_image, read_mask

# the repository's sample_data/ folder, installed as the package napari_uga.sample_data (see setup.py)
SAMPLE_DIR = Path(str(files("napari_uga.sample_data") / "camelyon16_umcu"))
UMCU_MPP = 0.226
GLASS = (242, 240, 244)
GAP = 48
LEVELS = 3
CLUSTER_X = (45000, 46500)  # level-0 x range of the lesion on tumor_073
SLIDE_NAME = "Camelyon demo slide"
TRUTH_NAME = "ground truth"
_COORDS = re.compile(r"_x(\d+)_y(\d+)$")


def tile_origin(path: Path) -> tuple[int, int]:
    """Level-0 (y, x) of a tile from its file name."""
    match = _COORDS.search(path.stem)
    if match is None:
        raise ValueError(f"{path.name}: no _x<X>_y<Y> coordinates in the name")
    return int(match.group(2)), int(match.group(1))


def _placements(paths: list[Path], tile: int) -> list[tuple[Path, int, int]]:
    """Where each tile goes on the demo canvas: the lesion at true offsets, the rest packed beside it."""
    origins = {p: tile_origin(p) for p in paths}
    lesion = [p for p in paths if CLUSTER_X[0] <= origins[p][1] <= CLUSTER_X[1]]
    others = [p for p in paths if p not in lesion]
    y0 = min(origins[p][0] for p in lesion)
    x0 = min(origins[p][1] for p in lesion)
    width = max(origins[p][1] for p in lesion) - x0 + tile
    out = [(p, origins[p][0] - y0, origins[p][1] - x0) for p in lesion]
    columns = 2
    for i, p in enumerate(others):
        row, col = divmod(i, columns)
        out.append((p, row * (tile + GAP), width + GAP + col * (tile + GAP)))
    return out


@lru_cache(maxsize=1)
def demo_slide(folder: Path = SAMPLE_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Level 0 of the demo slide (H x W x 3 uint8) and its ground-truth mask (H x W uint8 0/1)."""
    paths = sorted((folder / "images").glob("*.png"))
    tile = read_image(paths[0]).shape[0]
    placed = _placements(paths, tile)
    height = max(y for _, y, _ in placed) + tile
    width = max(x for _, _, x in placed) + tile
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GLASS
    truth = np.zeros((height, width), np.uint8)
    for path, y, x in placed:
        image[y : y + tile, x : x + tile] = read_image(path)
        truth[y : y + tile, x : x + tile] = read_mask(folder / "masks" / path.name)
    return image, truth


def pyramid(level0: np.ndarray, levels: int = LEVELS) -> list[np.ndarray]:
    """A 2x-downsampled pyramid (block mean for images, stride for label masks)."""
    out = [level0]
    for _ in range(levels - 1):
        prev = out[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        if prev.ndim == 3:
            blocks = prev[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
            out.append(blocks.round().astype(np.uint8))
        else:
            out.append(np.ascontiguousarray(prev[:h:2, :w:2]))
    return out


def camelyon_demo_slide() -> list[tuple]:
    """Sample: the multi-resolution demo slide (image layer)."""
    image, _ = demo_slide()
    meta = {"name": SLIDE_NAME, "rgb": True, "multiscale": True, "metadata": {"mpp": UMCU_MPP}}
    return [(pyramid(image), meta, "image")]


def camelyon_demo_truth() -> list[tuple]:
    """Sample: the ground truth of the demo slide (labels layer, for demo scoring)."""
    _, truth = demo_slide()
    meta = {"name": TRUTH_NAME, "multiscale": True, "opacity": 0.4, "visible": False}
    return [(pyramid(truth), meta, "labels")]


def camelyon_tile() -> list[tuple]:
    """Sample: one 256 x 256 tumour tile of the demo slide."""
    path = SAMPLE_DIR / "images" / "c16_tumor_073_x45668_y61571.png"
    return [(read_image(path), {"name": path.stem, "rgb": True, "metadata": {"mpp": UMCU_MPP}}, "image")]
