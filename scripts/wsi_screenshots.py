"""Screenshots of the UGA dock on whole slides: a real Aperio SVS, and a large pyramid half filled in.

Usage (a display is needed; on a headless machine)::

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python scripts/wsi_screenshots.py [--large SLIDE]

Writes ``docs/images/wsi_svs.png`` (CMU-1-Small-Region.svs, maps done, proposals, the first patch
open for correction) and ``docs/images/wsi_large.png`` (the large pyramid, default the one
``benchmarks/wsi_session.py --generate 100000x200000`` caches, with the overlay about half filled
in around the view).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
SVS = REPO / "tests" / "data" / "wsi" / "CMU-1-Small-Region.svs"
LARGE = REPO / "benchmarks" / ".cache" / "tissue_100000x200000_20pct.ome.tif"


def wait(app, condition, timeout: float = 1800) -> None:
    """Run the event loop until ``condition()``."""
    started = time.perf_counter()
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - started > timeout:
            raise TimeoutError("screenshot step did not finish")


def docked(napari, path: Path, folder: Path):
    """A shown viewer with the slide opened through the plugin and the UGA dock."""
    from napari_uga._widgets.annotate import AnnotateWidget

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1800, 1100)
    viewer.open(path, plugin="napari-uga")
    dock = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(dock, name="UGA annotation", area="right")
    dock.session_edit.setText(str(folder))
    return viewer, dock


def svs(napari, app, folder: Path) -> None:
    """The real SVS: maps of the whole slide, the queue, the first patch under correction."""
    viewer, dock = docked(napari, SVS, folder / "svs")
    dock.compute()
    wait(app, lambda: dock.maps_worker is None)
    dock.propose()
    viewer.scene.camera.zoom *= 0.35  # step back from the patch: the queue around it shows
    for _ in range(20):
        app.processEvents()
    viewer.screenshot(str(IMAGES / "wsi_svs.png"), canvas_only=False, flash=False)
    print(f"wsi_svs.png: {len(dock.plan.tiles)} tiles, {len(dock.proposals)} proposals, {dock.status.text()}")
    dock.shutdown()
    viewer.close()


def large(napari, app, path: Path, folder: Path) -> None:
    """The large pyramid, zoomed to a region of about 40 tissue tiles, screenshot with about half done."""
    from napari_uga.tiles import TILE

    viewer, dock = docked(napari, path, folder / "large")
    dock.compute()
    plan = dock.plan
    middle = plan.tiles[len(plan.tiles) // 2]
    viewer.scene.camera.center = ((middle[0] + 0.5) * TILE * plan.scale, (middle[1] + 0.5) * TILE * plan.scale)
    h, w = viewer.canvas.size
    viewer.scene.camera.zoom = min(h / (6 * TILE), w / (9 * TILE)) / plan.scale
    y0, x0, y1, x1 = dock._view_box()
    visible = [
        t
        for t in plan.tiles
        if y0 < (t[0] + 1) * TILE and t[0] * TILE < y1 and x0 < (t[1] + 1) * TILE and t[1] * TILE < x1
    ]
    wait(app, lambda: np.mean([dock.store.done[t] for t in visible]) >= 0.5)
    dock.stop_maps()
    wait(app, lambda: dock.maps_worker is None)
    dock._refresh_maps(force=True)
    for _ in range(20):
        app.processEvents()
    viewer.screenshot(str(IMAGES / "wsi_large.png"), canvas_only=False, flash=False)
    print(f"wsi_large.png: {plan.shape} working px, {len(visible)} tiles in view, {dock.maps_label.text()}")
    dock.shutdown()
    viewer.close()


def main() -> None:
    """Make both screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, default=LARGE, help="the large pyramid to show")
    args = parser.parse_args()
    import napari

    app = napari.qt.get_qapp()
    with tempfile.TemporaryDirectory() as tmp:
        svs(napari, app, Path(tmp))
        if args.large.exists():
            large(napari, app, args.large, Path(tmp))
        else:
            print(f"{args.large}: not there (make it with benchmarks/wsi_session.py --generate); skipped")


if __name__ == "__main__":
    main()
