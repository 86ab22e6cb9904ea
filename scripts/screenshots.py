"""Make the README screenshots from a real napari session (rerunnable).

Opens napari with the demo slide and the UGA dock, computes the uncertainty, proposes
patches, corrects two patches with the demo ground truth (standing in for the pathologist), runs
one fine-tuning round, and writes:

- ``docs/images/overlay.png``: the canvas with the uncertainty overlay, prediction outline
  and ranked proposals;
- ``docs/images/dock.png``: the whole window after a round (patch in view, dock with loss
  curve and round history);
- ``docs/images/qc.png``: the Quality control dock on the sample UMCU tiles (every other group of
  overlapping tiles as calibration, the rest checked with their masks), with the worst tile open.

Usage (on a headless machine wrap it in ``xvfb-run -a``)::

    xvfb-run -a .venv/bin/python scripts/screenshots.py [--model runs/uga_unet_v2.safetensors] [--steps 40] [--qc-only]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_uga.models import DEFAULT_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"


def default_model() -> Path:
    """The shipped weights, else the newest run in ``runs/``."""
    runs = sorted((ROOT / "runs").glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in [DEFAULT_WEIGHTS, *runs]:
        if path.is_file():
            return path
    raise SystemExit("no trained weights found: pass --model")


def wait_until(app, condition, timeout: float = 900.0) -> None:
    """Process Qt events until ``condition()`` holds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the dock did not finish in time")
        app.processEvents()
        time.sleep(0.02)


def settle(app, seconds: float = 1.0) -> None:
    """Let the canvas redraw for a moment."""
    end = time.monotonic() + seconds
    wait_until(app, lambda: time.monotonic() > end)


def frame_boxes(viewer, boxes, width: int, margin: float = 1.3) -> None:
    """Frame the rows holding the boxes, across the image's whole ``width``."""
    y0 = min(b.y for b in boxes)
    y1 = max(b.y + b.h for b in boxes)
    x0, x1 = 0, width
    camera = viewer.scene.camera
    camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)
    height, width = viewer.canvas.size
    camera.zoom = min(height / ((y1 - y0) * margin), width / ((x1 - x0) * margin))


def split_sample(folder: Path) -> tuple[Path, Path]:
    """Calibration and checked halves of the sample UMCU tiles (alternate groups of overlapping tiles, by class)."""
    from napari_uga.io import load_pairs, write_array
    from napari_uga.splits import overlap_groups

    sample = ROOT / "sample_data" / "camelyon16_umcu"
    pairs = load_pairs(sample / "images", sample / "masks")
    groups = overlap_groups(pairs)
    tumour = {g: any(p.mask.any() for p, h in zip(pairs, groups, strict=True) if h == g) for g in set(groups)}
    ordered = sorted(set(groups), key=lambda g: (tumour[g], g))
    calibration = set(ordered[::2])
    for pair, group in zip(pairs, groups, strict=True):
        side = "calibration" if group in calibration else "checked"
        write_array(folder / side / "images" / f"{pair.name}.png", pair.image)
        write_array(folder / side / "masks" / f"{pair.name}.png", pair.mask)
    return folder / "calibration", folder / "checked"


def qc_screenshot(model: Path, out: Path) -> None:
    """The Quality control dock after a folder run, its worst tile opened."""
    import napari

    from napari_uga._widgets.qc import FOLDER, QCWidget

    calibration, checked = split_sample(Path(tempfile.mkdtemp(prefix="uga-qc-shot-")))
    viewer = napari.Viewer(title="napari-uga quality control", show=True)
    viewer.window._qt_window.resize(1500, 950)
    app = napari.qt.get_qapp()
    dock = QCWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Quality control", area="right")
    dock.model_edit.setText(str(model))
    dock.source_combo.setCurrentText(FOLDER)
    dock.folder_edit.setText(str(checked / "images"))
    dock.masks_edit.setText(str(checked / "masks"))
    dock.cal_images_edit.setText(str(calibration / "images"))
    dock.cal_masks_edit.setText(str(calibration / "masks"))
    dock.rule_combo.setCurrentText("fdr")
    dock.run()
    wait_until(app, lambda: dock.worker is None)
    dock._row_clicked(0, 0)  # worst first: open it
    settle(app, 2.0)
    napari.utils.io.imsave(str(out / "qc.png"), viewer.screenshot(canvas_only=False, flash=False))
    print(f"wrote {out / 'qc.png'}: {dock.status.text()}")
    viewer.close()


def main() -> None:
    """Drive the demo and save the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps of the round shown")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--qc-only", action="store_true", help="only the Quality control screenshot")
    args = parser.parse_args()
    if args.qc_only:
        args.out.mkdir(parents=True, exist_ok=True)
        qc_screenshot(args.model or default_model(), args.out)
        return

    import napari

    from napari_uga._sample_data import TRUTH_NAME
    from napari_uga._widgets.annotate import ANNOTATION, UNCERTAINTY
    from napari_uga._widgets.demo import open_demo

    args.out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-uga demo", show=True)
    viewer.window._qt_window.resize(1500, 950)
    app = napari.qt.get_qapp()
    dock = open_demo(viewer, tempfile.mkdtemp(prefix="uga-shots-"))
    dock.model_edit.setText(str(args.model or default_model()))
    dock.steps_spin.setValue(args.steps)

    dock.compute()
    wait_until(app, lambda: dock.worker is None)
    dock.propose()
    viewer.layers.selection.active = viewer.layers[UNCERTAINTY]
    frame_boxes(viewer, dock.proposals, viewer.layers[UNCERTAINTY].data.shape[1])
    settle(app)
    overlay = viewer.screenshot(canvas_only=True, flash=False)
    napari.utils.io.imsave(str(args.out / "overlay.png"), overlay)

    truth = viewer.layers[TRUTH_NAME].data[0]
    annotation = viewer.layers[ANNOTATION]
    for index in range(2):  # the script plays the pathologist: the demo ground truth is the correction
        dock.go_to(index)
        patch = dock.proposals[index]
        annotation.data[patch.y : patch.y + patch.h, patch.x : patch.x + patch.w] = patch.crop(np.asarray(truth))
    annotation.refresh()
    dock.submit()
    wait_until(app, lambda: dock.worker is None and dock.session.current_round == 1)
    dock.go_to(2)
    viewer.layers[UNCERTAINTY].opacity = 0.4
    settle(app, 2.0)
    window = viewer.screenshot(canvas_only=False, flash=False)
    napari.utils.io.imsave(str(args.out / "dock.png"), window)
    print(f"wrote {args.out / 'overlay.png'} {overlay.shape[1::-1]} and {args.out / 'dock.png'} {window.shape[1::-1]}")
    dice = [r.metrics.get("dice_truth") for r in dock.session.rounds]
    rounded = [None if d is None else round(d, 3) for d in dice]
    print("Dice of the demo slide against its ground truth, by round:", rounded)
    viewer.close()
    qc_screenshot(args.model or default_model(), args.out)


if __name__ == "__main__":
    main()
