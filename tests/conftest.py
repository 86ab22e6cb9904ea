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
