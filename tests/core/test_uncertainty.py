"""Tiled MC / TTA / ensemble uncertainty on real tiles."""

import numpy as np
import pytest
import torch

from napari_uga.models import ModelConfig, UNet
from napari_uga.uncertainty import compute_uncertainty, patch_score, sample_batch


def test_fast_mc_matches_naive_in_distribution(tiny_model):
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(1)
    fast = tiny_model.sample(x, 64)
    naive = tiny_model.sample_naive(x, 64)
    deterministic = tiny_model.sample(x, 1)[0]
    assert fast.shape == naive.shape == (64, 2, 32, 32)
    # same trunk, same head distribution: the sample means agree closely, and dropout adds spread
    assert torch.allclose(fast.mean(0), naive.mean(0), atol=0.03)
    assert fast.std(0).mean() > 1e-4
    assert torch.allclose(tiny_model.sample(x, 1)[0], deterministic)


def test_maps_have_image_size_and_valid_ranges(tiny_model, umcu_pairs):
    image = np.concatenate([umcu_pairs[0].image, umcu_pairs[1].image[:, :100]], axis=1)  # 256 x 356
    maps = compute_uncertainty(tiny_model, image, samples=4, tta="flips", tile=64, overlap=16, keep_samples=True)
    for name in ("probability", "entropy", "mutual_information", "variance"):
        arr = maps.layer(name)
        assert arr.shape == (256, 356) and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert maps.probability.min() >= 0 and maps.probability.max() <= 1
    assert (maps.entropy <= np.log(2) + 1e-5).all()
    assert (maps.mutual_information <= maps.entropy + 1e-5).all()
    assert maps.samples.shape == (16, 256, 356)  # 4 MC samples x 4 TTA transforms


def test_tiling_is_seamless_for_a_deterministic_model(tiny_model, umcu_pairs):
    image = umcu_pairs[3].image
    whole = compute_uncertainty(tiny_model, image, samples=1, factor=1.0, tile=256)
    tiled = compute_uncertainty(tiny_model, image, samples=1, factor=1.0, tile=128, overlap=64)
    assert np.abs(whole.probability - tiled.probability).mean() < 0.05


def test_lazy_zarr_input_gives_same_maps(tiny_model, umcu_pairs):
    zarr = pytest.importorskip("zarr")
    image = umcu_pairs[2].image
    lazy = zarr.create_array(store={}, shape=image.shape, chunks=(64, 64, 3), dtype=np.uint8)
    lazy[:] = image
    a = compute_uncertainty(tiny_model, image, samples=1, tile=64)
    b = compute_uncertainty(tiny_model, lazy, samples=1, tile=64)
    assert np.allclose(a.probability, b.probability, atol=1e-5)


def test_ensemble_disagreement_shows_in_mutual_information(umcu_pairs):
    torch.manual_seed(0)
    members = [UNet(ModelConfig(base=4, depth=3, dropout=0.0)).eval() for _ in range(3)]
    x = torch.rand(1, 3, 64, 64)
    assert sample_batch(members, x, samples=1).shape == (3, 1, 64, 64)
    maps = compute_uncertainty(members, umcu_pairs[0].image, samples=1)
    assert maps.mutual_information.mean() > 0


def test_patch_score_topk_is_at_least_the_mean():
    values = np.random.default_rng(0).random((32, 32))
    assert patch_score(values, "topk", 0.1) >= patch_score(values, "mean")
    with pytest.raises(ValueError):
        patch_score(values, "median")
