"""``uga demo`` with a display: napari with the demo slide, its ground truth and the UGA dock."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari

    from .annotate import AnnotateWidget


def open_demo(viewer: napari.Viewer, out_dir: str | Path | None = None) -> AnnotateWidget:
    """Open the demo slide as a pathologist opens a slide (a pyramidal file, through the plugin's reader),
    add its ground truth, and dock the UGA widget, ready to compute.

    The slide file and the session folder go under ``out_dir`` (default: a temporary folder for the
    slide, the widget's own default for the session).
    """
    import tempfile

    from .._sample_data import SLIDE_NAME, UMCU_MPP, demo_slide
    from ..slides import write_rgb_pyramid

    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="napari-uga-demo-"))
    path = folder / f"{SLIDE_NAME}.ome.tif"
    if not path.is_file():
        write_rgb_pyramid(path, demo_slide()[0], UMCU_MPP)
    viewer.open(path, plugin="napari-uga")
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
