"""``uga demo`` with a display: napari with the demo slide, its ground truth and the UGA dock."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari

    from .annotate import AnnotateWidget


def open_demo(viewer: napari.Viewer, out_dir: str | Path | None = None) -> AnnotateWidget:
    """Load the demo samples into ``viewer`` and dock the UGA widget, ready to compute.

    The session folder goes under ``out_dir`` (default: the widget's own default).
    """
    viewer.open_sample("napari-uga", "camelyon_demo_slide")
    viewer.open_sample("napari-uga", "camelyon_demo_truth")
    _, widget = viewer.window.add_plugin_dock_widget("napari-uga", "UGA annotation")
    if out_dir is not None:
        widget.session_edit.setText(str(Path(out_dir) / f"session-{time.strftime('%Y%m%d-%H%M%S')}"))
    viewer.layers.selection.active = viewer.layers[0]
    return widget


def launch_demo(out_dir: str | Path | None = None) -> None:
    """Open napari with the demo ready and run its event loop until the window closes."""
    import napari

    viewer = napari.Viewer(title="napari-uga demo")
    open_demo(viewer, out_dir)
    napari.run()
