"""The feature-distance QC cue: bounded work on large images, a reference per weights, stable values."""

import numpy as np
import torch

from napari_uga.ood import bottleneck_vectors, feature_distance


def test_large_images_are_scored_on_a_bounded_number_of_tiles(tiny_model):
    image = np.random.default_rng(1).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)
    vectors = bottleneck_vectors(tiny_model, image, 1.0)
    positions_per_tile = (512 // tiny_model.multiple) ** 2
    assert vectors.shape == (16 * positions_per_tile, tiny_model.config.base * tiny_model.multiple)


def test_distance_is_stable_and_follows_the_weights(tiny_model, umcu_pairs):
    image = umcu_pairs[0].image
    before = feature_distance(tiny_model, image, 0.5)
    assert np.isfinite(before) and before > 0
    assert feature_distance(tiny_model, image, 0.5) == before
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(1.5)
    assert feature_distance(tiny_model, image, 0.5) != before
