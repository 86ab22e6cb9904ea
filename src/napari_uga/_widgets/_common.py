"""Shared dock pieces: worker shutdown on close, an image picker following the layer list, zoom to a patch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import QComboBox, QWidget

from ..selection import Box

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer


class WorkerDock(QWidget):
    """A dock running at most one worker (``self.worker``) that it stops before it closes.

    Subclasses set ``self.worker`` and define ``cancel()`` (ask the running worker to stop).
    """

    def shutdown(self, timeout_ms: int = 5000) -> None:
        """Stop a running worker and wait for it (called when the dock closes)."""
        worker = self.worker
        self.cancel()
        if worker is not None:
            worker.await_workers(timeout_ms)

    def closeEvent(self, event) -> None:
        """Stop the worker before the dock goes away."""
        self.shutdown()
        super().closeEvent(event)


def follow_layers(viewer: napari.Viewer, refresh: Callable[..., None]) -> None:
    """Call ``refresh`` now and whenever a layer is added to or removed from ``viewer``."""
    viewer.layers.events.inserted.connect(refresh)
    viewer.layers.events.removed.connect(refresh)
    refresh()


def refill_combo(combo: QComboBox, names: Sequence[str]) -> None:
    """Replace the entries of ``combo`` by ``names``, keeping the current choice when it is still there."""
    current = combo.currentText()
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)


def view_box(viewer: napari.Viewer, layer: Layer) -> tuple[float, float, float, float]:
    """The box (y0, x0, y1, x1) of ``layer``'s data pixels that the camera shows (not clipped)."""
    camera = viewer.scene.camera
    scale, offset = np.asarray(layer.scale[-2:]), np.asarray(layer.translate[-2:])
    centre = (np.asarray(camera.center[-2:]) - offset) / scale
    half = np.asarray(viewer.canvas.size) / camera.zoom / 2 / scale
    (y0, x0), (y1, x1) = centre - half, centre + half
    return float(y0), float(x0), float(y1), float(x1)


def zoom_to_box(viewer: napari.Viewer, layer: Layer, box: Box) -> None:
    """Centre the camera on ``box`` (pixels of ``layer``) and zoom so it fills most of the canvas."""
    scale = np.asarray(layer.scale[-2:])
    center = np.array([box.y + box.h / 2, box.x + box.w / 2]) * scale + np.asarray(layer.translate[-2:])
    camera = viewer.scene.camera  # napari >= 0.9 (``viewer.camera`` before)
    camera.center = tuple(center)
    camera.zoom = min(viewer.canvas.size) / (1.6 * max(box.h, box.w) * float(scale.max()))
