"""The rendered canvas shows the uncertainty overlay where the model is unsure."""

from __future__ import annotations

import numpy as np
import pytest

from napari_uga._widgets._layers import PREDICTION, UNCERTAINTY


def _centre_patch(viewer) -> np.ndarray:
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    h, w = shot.shape[:2]
    return shot[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4]


def test_overlay_is_visible_where_uncertainty_is_high(qtbot, make_dock, wait_idle):
    dock = make_dock(show=True)
    dock.compute()
    wait_idle(dock)
    viewer = dock.viewer
    layer = viewer.layers[UNCERTAINTY]
    entropy = np.asarray(layer.data[0])
    y, x = np.unravel_index(np.argmax(entropy), entropy.shape)
    viewer.layers[PREDICTION].visible = False
    viewer.scene.camera.center = tuple(layer.data_to_world((y, x)))
    viewer.scene.camera.zoom = 4.0

    viewer.layers[UNCERTAINTY].visible = False
    without = _centre_patch(viewer)
    viewer.layers[UNCERTAINTY].visible = True
    qtbot.waitUntil(lambda: np.abs(_centre_patch(viewer) - without).mean() > 20, timeout=10_000)
    full = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    assert full.std() > 10  # not a blank or uniform frame


def test_uncertainty_contrast_shows_the_top_half_of_tissue_values(tmp_path):
    from napari_uga.tiles import ENTROPY_SCALE, MapPlan, MapStore

    plan = MapPlan(0, 1.0, 2.0, (64, 64), ((0, 0),), (1, 1), 16)
    store = MapStore.create(tmp_path / "r.zarr", plan, "fp")
    assert store.limits() == (0.0, 255.0)  # nothing computed yet
    ramp = np.concatenate([np.zeros(100), np.linspace(0.1, 0.6, 1001)])  # glass is zero
    store.write(0, 0, np.zeros((1, 1101), np.float32), ramp[None].astype(np.float32))
    low, high = store.limits()
    assert low == pytest.approx(0.35 * ENTROPY_SCALE, abs=1) and high == pytest.approx(0.5975 * ENTROPY_SCALE, abs=1)
    flat = MapStore.create(tmp_path / "f.zarr", plan, "fp")
    flat.write(0, 0, np.zeros((1, 50), np.float32), np.full((1, 50), 0.693, np.float32))
    assert flat.limits()[0] == 0.0  # a flat map is shown from zero
