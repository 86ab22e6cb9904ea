"""Fixtures for widget tests: a real viewer with the demo slide and the UGA dock on it."""

from __future__ import annotations

import pytest
from qtpy.QtCore import Qt

from napari_uga._widgets.annotate import AnnotateWidget

WAIT_MS = 180_000


@pytest.fixture()
def make_dock(make_napari_viewer, tiny_model_path, tmp_path):
    """Factory: the UGA dock on a viewer holding the demo slide and its ground truth (opened through the manifest)."""
    docks = []

    def make(show: bool = False) -> AnnotateWidget:
        viewer = make_napari_viewer(show=show)
        viewer.open_sample("napari-uga", "camelyon_demo_slide")
        viewer.open_sample("napari-uga", "camelyon_demo_truth")
        widget = AnnotateWidget(viewer)
        viewer.window.add_dock_widget(widget, name="UGA annotation")
        widget.model_edit.setText(str(tiny_model_path))
        widget.session_edit.setText(str(tmp_path / f"session{len(docks)}"))
        widget.samples_spin.setValue(2)
        widget.steps_spin.setValue(3)
        widget.k_spin.setValue(3)
        docks.append(widget)
        return widget

    yield make
    for widget in docks:
        widget.shutdown()


@pytest.fixture()
def dock(make_dock) -> AnnotateWidget:
    """The UGA dock on a hidden viewer with the demo slide."""
    return make_dock()


@pytest.fixture()
def wait_idle(qtbot):
    """Wait until no worker of a dock runs any more (maps refresh included)."""

    def wait(widget: AnnotateWidget) -> None:
        qtbot.waitUntil(lambda: widget.worker is None and widget.maps_worker is None, timeout=WAIT_MS)

    return wait


@pytest.fixture()
def submit_batch(qtbot, wait_idle):
    """Propose a batch, open every queued patch (its prediction is the correction), submit and wait for the round."""

    def submit(widget: AnnotateWidget) -> None:
        qtbot.mouseClick(widget.propose_button, Qt.MouseButton.LeftButton)
        for i in range(len(widget.proposals)):
            widget.go_to(i)
        widget.submit()
        with qtbot.waitSignal(widget.worker.finished, timeout=WAIT_MS):
            pass
        wait_idle(widget)

    return submit
