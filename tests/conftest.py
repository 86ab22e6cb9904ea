"""Shared fixtures: real sample tiles, a tiny real network and its weights file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_uga.io import load_pairs
from napari_uga.models import ModelConfig, UNet, save_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "camelyon16_umcu"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """Folder with ``images/`` and ``masks/`` of the shipped UMCU tiles."""
    return SAMPLE


@pytest.fixture(scope="session")
def umcu_pairs():
    """All shipped UMCU tiles with their masks (32 real tiles, 256 x 256)."""
    return load_pairs(SAMPLE / "images", SAMPLE / "masks")


@pytest.fixture()
def tiny_model() -> UNet:
    """A small real U-Net (random weights, seeded) for fast training tests."""
    torch.manual_seed(0)
    return UNet(ModelConfig(base=4, depth=3)).eval()


@pytest.fixture()
def tiny_model_path(tmp_path, tiny_model) -> Path:
    """The tiny network saved as safetensors."""
    return save_model(tiny_model, tmp_path / "tiny.safetensors")


@pytest.fixture()
def rng() -> np.random.Generator:
    """A seeded generator."""
    return np.random.default_rng(0)


@pytest.fixture()
def audit_session(tmp_path, tiny_model_path, umcu_pairs) -> Path:
    """A real session folder whose slide is ten shipped UMCU tiles side by side (2 x 5, 0.243 µm/px).

    Each tile is an audit patch with its real mask; one more correction, across two tiles, is
    not an audit (an uncertainty-ranked patch). Tiles 1, 4, ..., 28: none of the others.
    """
    from napari_uga.selection import Box
    from napari_uga.session import Session

    tiles = umcu_pairs[1::3][:10]
    image = np.concatenate([np.concatenate([p.image for p in tiles[r * 5 : r * 5 + 5]], 1) for r in (0, 1)], 0)
    mask = np.concatenate([np.concatenate([p.mask for p in tiles[r * 5 : r * 5 + 5]], 1) for r in (0, 1)], 0)
    folder = tmp_path / "audit_session"
    session = Session.create(folder, tiny_model_path)
    session.add_image("umcu", array=image, mpp=0.243)
    boxes = [Box("umcu", 256 * (i // 5), 256 * (i % 5), 256, 256) for i in range(10)]
    boxes.append(Box("umcu", 64, 128, 256, 256))
    masks = [mask[b.y : b.y + b.h, b.x : b.x + b.w] for b in boxes]
    session.add_annotations(boxes, masks, audits=[True] * 10 + [False])
    session.close()
    return folder
