"""The rendered canvas shows the uncertainty overlay where the model is unsure."""

from __future__ import annotations

import numpy as np
import pytest

from napari_uga._widgets.annotate import PREDICTION, UNCERTAINTY


def _centre_patch(viewer) -> np.ndarray:
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    h, w = shot.shape[:2]
    return shot[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4]


def test_overlay_is_visible_where_uncertainty_is_high(qtbot, make_dock, wait_idle):
    dock = make_dock(show=True)
    dock.compute()
    wait_idle(dock)
    viewer = dock.viewer
    entropy = viewer.layers[UNCERTAINTY].data
    y, x = np.unravel_index(np.argmax(entropy), entropy.shape)
    viewer.layers[PREDICTION].visible = False
    viewer.scene.camera.center = (float(y), float(x))
    viewer.scene.camera.zoom = 4.0

    viewer.layers[UNCERTAINTY].visible = False
    without = _centre_patch(viewer)
    viewer.layers[UNCERTAINTY].visible = True
    qtbot.waitUntil(lambda: np.abs(_centre_patch(viewer) - without).mean() > 20, timeout=10_000)
    full = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    assert full.std() > 10  # not a blank or uniform frame


def test_uncertainty_contrast_shows_the_top_half_of_tissue_values():
    from napari_uga._widgets.annotate import uncertainty_limits

    ramp = np.concatenate([np.zeros(100), np.linspace(0.1, 0.6, 1001)])  # glass is zero
    low, high = uncertainty_limits(ramp)
    assert low == pytest.approx(0.35) and high == pytest.approx(0.5975, abs=1e-3)
    assert uncertainty_limits(np.full(50, 0.693))[0] == 0.0  # a flat map is shown from zero
    assert uncertainty_limits(np.zeros(10)) == (0.0, 1e-3)
