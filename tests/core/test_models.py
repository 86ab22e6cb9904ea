"""Weights files: a round trip, and files whose architecture is implausible or does not match their tensors."""

import json

import pytest
import torch
from safetensors.torch import save

from napari_uga.io import InputError
from napari_uga.models import ModelConfig, UNet, load_model, save_model


def _write(path, state, config: dict) -> None:
    path.write_bytes(save(state, metadata={"config": json.dumps(config), "extra": "{}"}))


def test_round_trip_keeps_every_weight(tmp_path):
    model = UNet(ModelConfig(base=4, depth=3)).eval()
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"), "cpu")
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_an_oversized_architecture_is_refused_before_it_is_built(tmp_path):
    path = tmp_path / "huge.safetensors"
    _write(path, {"x": torch.zeros(1)}, {"base": 4096, "depth": 6, "dropout": 0.25, "input_mpp": 0.486})
    with pytest.raises(InputError, match="not a napari-uga safetensors weights file.*channels"):
        load_model(path, "cpu")


def test_tensors_that_do_not_fit_the_stated_architecture_are_refused(tmp_path):
    small = UNet(ModelConfig(base=4, depth=3)).state_dict()
    path = tmp_path / "mismatch.safetensors"
    _write(path, {k: v.contiguous() for k, v in small.items()}, {"base": 8, "depth": 3})
    with pytest.raises(InputError, match="do not match its stated architecture"):
        load_model(path, "cpu")
