"""The UGA dock on whole slides: a 60,000 x 60,000 px pyramid of real H&E, and real vendor files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile

from napari_uga._widgets._layers import ANNOTATION, PREDICTION, PROPOSALS, UNCERTAINTY
from napari_uga._widgets.annotate import AnnotateWidget
from napari_uga.io import InputError, read_image
from napari_uga.slides import write_tissue_slide
from napari_uga.tiles import MARGIN, TILE

WAIT_MS = 180_000
WSI = Path(__file__).resolve().parents[1] / "data" / "wsi"
GIB = 1024**3


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory, sample_dir) -> Path:
    """60,000 x 60,000 px at 0.243 µm/px: real Camelyon tiles mirrored and rotated into islands (~1 % tissue)."""
    tiles = [read_image(p) for p in sorted((sample_dir / "images").glob("*.png"))]
    path = tmp_path_factory.mktemp("wsi") / "big.ome.tif"
    return write_tissue_slide(path, (60_000, 60_000), tiles, tissue_fraction=0.01, n_islands=4, seed=3)


@pytest.fixture()
def docks():
    """Docks made by :func:`_dock`, shut down at teardown even when a test fails."""
    made: list[AnnotateWidget] = []
    yield made
    for widget in made:
        widget.shutdown()


def _dock(viewer, model_path, folder, made: list) -> AnnotateWidget:
    widget = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="UGA annotation")
    widget.model_edit.setText(str(model_path))
    widget.session_edit.setText(str(folder))
    widget.samples_spin.setValue(2)
    widget.steps_spin.setValue(3)
    widget.k_spin.setValue(3)
    made.append(widget)
    return widget


def test_big_pyramid_view_first_propose_correct_finetune_reopen(
    qtbot, make_napari_viewer, big_slide, tiny_model_path, tmp_path, docks
):
    rss_before = psutil.Process().memory_info().rss
    viewer = make_napari_viewer(show=True)
    [layer] = viewer.open(big_slide, plugin="napari-uga")
    assert layer.multiscale and layer.data[0].shape == (60_000, 60_000, 3)
    assert layer.metadata["mpp"] == pytest.approx(0.243)
    dock = _dock(viewer, tiny_model_path, tmp_path / "session", docks)

    dock.compute()
    plan = dock.plan
    arrived = []
    dock.maps_worker.yielded.connect(lambda progress: arrived.append(progress))
    qtbot.waitUntil(lambda: len(arrived) >= 1, timeout=WAIT_MS)
    first = arrived[0].box
    far = max(plan.tiles, key=lambda t: abs(t[0] * TILE - first[0]) + abs(t[1] * TILE - first[1]))
    centre = ((far[0] + 0.5) * TILE * plan.scale, (far[1] + 0.5) * TILE * plan.scale)
    viewer.scene.camera.center = centre  # the user pans to a far island: its tiles jump the queue
    viewer.scene.camera.zoom = min(viewer.canvas.size) / (2 * TILE * plan.scale)
    seen = len(arrived)
    qtbot.waitUntil(lambda: len(arrived) >= seen + 2, timeout=WAIT_MS)
    moved = arrived[seen + 1].box  # the one in flight at the move may be elsewhere; the next is in view
    assert moved[:2] == (far[0] * TILE, far[1] * TILE) or (
        abs(moved[0] - far[0] * TILE) <= 2 * TILE and abs(moved[1] - far[1] * TILE) <= 2 * TILE
    ), (moved, far)

    dock.propose()  # before the slide is done: the survey of candidates across the tissue feeds the queue
    qtbot.waitUntil(lambda: len(dock.proposals) == 6, timeout=WAIT_MS)
    assert PROPOSALS in viewer.layers and UNCERTAINTY in viewer.layers
    maps = viewer.layers[UNCERTAINTY]
    assert maps.multiscale and maps.data[0].shape == plan.shape  # working scale, placed on the slide by scale
    assert maps.scale[-1] == pytest.approx(plan.scale)
    annotation = viewer.layers[ANNOTATION]
    patch = dock.proposals[0]
    assert annotation.data.shape == (patch.h, patch.w)  # the correction layer is one patch
    annotation.data[: patch.h // 2] = 1
    dock.submit()
    folder = dock.session.folder
    assert (folder / "labels" / "00001.png").is_file()
    qtbot.waitUntil(lambda: dock.session.current_round == 1 and dock.maps_worker is not None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: dock.store.done.any(), timeout=WAIT_MS)
    assert (folder / "maps" / "round_001.zarr").is_dir()
    assert len(dock.stores) == 2  # round 0's tiles stay on screen until round 1's arrive
    dock.shutdown()

    window = ((TILE + 2 * MARGIN) / plan.factor + 2) ** 2  # one inference tile with its context
    assert max(level.largest_read for level in dock.slide.levels[: plan.level + 1]) <= window
    assert dock.slide.largest_read() <= 2048 * 1024  # the tissue overview is read from a low level in strips
    assert max(level.largest_read for level in layer.data) <= 4096 * 4096  # napari read only screen-sized boxes
    assert psutil.Process().memory_info().rss - rss_before < 2 * GIB  # level 0 alone is 10 GiB as RGB

    other = make_napari_viewer()
    reopened = AnnotateWidget(other)
    docks.append(reopened)
    other.window.add_dock_widget(reopened)
    reopened.open_session(folder)
    assert reopened.session.current_round == 1 and len(reopened.proposals) == 6
    assert reopened.store.done.any() and other.layers[reopened.image_name].multiscale


@pytest.mark.parametrize(
    ("name", "mpp", "levels"),
    [
        ("CMU-1-Small-Region.svs", 0.499, 2),  # Aperio JPEG, one level (+ an overview level)
        ("tcga-cr-7395-01a-01-ts1.svs", None, 2),  # Aperio JPEG 2000, no µm/px in the file
        ("test3-DAPI-2-387.ndpi", 0.2282, 4),  # Hamamatsu NDPI
        ("CMU-1-Small-Region-dicom", 0.499, 2),  # DICOM WSI: a folder of instances, through OpenSlide
    ],
)
def test_vendor_slide_opens_and_the_dock_maps_and_proposes(
    qtbot, make_napari_viewer, tiny_model_path, tmp_path, name, mpp, levels, docks
):
    viewer = make_napari_viewer()
    [layer] = viewer.open(WSI / name, plugin="napari-uga")
    assert layer.multiscale and len(layer.data) == levels and layer.rgb
    assert layer.metadata["mpp"] == (pytest.approx(mpp, abs=1e-3) if mpp else None)
    dock = _dock(viewer, tiny_model_path, tmp_path / "session", docks)
    dock.compute()
    if mpp is None:  # no pixel size: a clear prompt, no session, the viewer stays usable
        assert dock.session is None and "µm/px" in dock.status.text()
        dock.mpp_spin.setValue(0.25)
        dock.compute()
    qtbot.waitUntil(lambda: dock.maps_worker is None, timeout=WAIT_MS)
    assert dock.store.complete() and dock.slide.mpp == pytest.approx(mpp or 0.25, abs=1e-3)
    dock.propose()
    assert len(dock.proposals) == 6 and PREDICTION in viewer.layers


def test_bad_slides_give_one_line_and_the_viewer_stays_usable(make_napari_viewer, tmp_path):
    truncated = tmp_path / "truncated.svs"
    data = (WSI / "CMU-1-Small-Region.svs").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    junk = tmp_path / "junk.ndpi"
    junk.write_bytes(b"not a slide at all" * 100)
    flat = tmp_path / "flat.tif"  # a single-level 20,000 x 20,000 TIFF: no pyramid to show it with
    glass = np.full((256, 256, 3), 240, np.uint8)
    tifffile.imwrite(flat, (glass for _ in range(79 * 79)), shape=(20_000, 20_000, 3), dtype="uint8", tile=(256, 256))
    viewer = make_napari_viewer()
    messages = []
    for path in (truncated, junk, flat):
        with pytest.raises(Exception) as raised:  # napari turns a reader's error into a notification
            viewer.open(path, plugin="napari-uga")
        error = raised.value
        while not isinstance(error, InputError) and error.__cause__ is not None:
            error = error.__cause__
        assert isinstance(error, InputError), repr(raised.value)
        messages.append(str(error))
    assert all("\n" not in m and str(tmp_path) in m for m in messages), messages
    assert "pyramid" in messages[2]
    [layer] = viewer.open(WSI / "CMU-1-Small-Region.svs", plugin="napari-uga")  # still usable
    assert layer.multiscale


def test_moved_slide_is_located_again(make_napari_viewer, tiny_model_path, tmp_path, qtbot, docks):
    slide = tmp_path / "slides" / "CMU-1-Small-Region.svs"
    slide.parent.mkdir()
    shutil.copy(WSI / "CMU-1-Small-Region.svs", slide)
    viewer = make_napari_viewer()
    viewer.open(slide, plugin="napari-uga")
    dock = _dock(viewer, tiny_model_path, tmp_path / "session", docks)
    dock.compute()
    qtbot.waitUntil(lambda: dock.maps_worker is None, timeout=WAIT_MS)
    dock.shutdown()
    dock.session.close()
    moved = tmp_path / "elsewhere" / slide.name
    moved.parent.mkdir()
    shutil.move(slide, moved)

    from napari_uga.session import Session, SlideMissingError

    with pytest.raises(SlideMissingError, match="not where the session saw it"):
        Session.open(tmp_path / "session")
    other = make_napari_viewer()
    reopened = AnnotateWidget(other)
    docks.append(reopened)
    other.window.add_dock_widget(reopened)
    reopened.open_session(tmp_path / "session", relocate={"CMU-1-Small-Region": str(moved)})
    assert reopened.session.image_path("CMU-1-Small-Region") == moved.resolve()
    assert Session.open(tmp_path / "session").image_path("CMU-1-Small-Region") == moved.resolve()  # saved


def test_qc_dock_checks_the_proposed_patches_and_the_current_view_of_a_slide(
    qtbot, make_napari_viewer, tiny_model_path, tmp_path, docks
):
    from napari_uga._widgets.qc import BOXES, PROPOSED, VIEW, QCWidget

    viewer = make_napari_viewer(show=True)
    [layer] = viewer.open(WSI / "CMU-1-Small-Region.svs", plugin="napari-uga")
    dock = _dock(viewer, tiny_model_path, tmp_path / "session", docks)
    dock.compute()
    qtbot.waitUntil(lambda: dock.maps_worker is None, timeout=WAIT_MS)
    dock.propose()
    qc = QCWidget(viewer)
    viewer.window.add_dock_widget(qc, name="Quality control")
    qc.model_edit.setText(str(tiny_model_path))
    qc.image_combo.setCurrentText(layer.name)

    qc.source_combo.setCurrentText(PROPOSED)
    qc.run()
    qtbot.waitUntil(lambda: qc.worker is None and qc.report is not None, timeout=WAIT_MS)
    proposed = {(p.y, p.x, p.h, p.w) for p in dock.proposals}
    assert {(b.y, b.x, b.h, b.w) for b in qc.boxes.values()} == proposed and qc.table.rowCount() == len(proposed)
    assert min(b.h for b in qc.boxes.values()) < 64  # the quarter-patch audits, checked with context around them

    viewer.scene.camera.center = (1500, 1100)
    viewer.scene.camera.zoom = 1.0  # about one canvas of level-0 pixels around (1500, 1100)
    qc.report = None
    qc.source_combo.setCurrentText(VIEW)
    qc.patch_spin.setValue(256)
    qc.run()
    qtbot.waitUntil(lambda: qc.worker is None and qc.report is not None, timeout=WAIT_MS)
    h, w = viewer.canvas.size
    for box in qc.boxes.values():  # every checked patch lies in the view
        assert 1500 - h / 2 - 1 <= box.y and box.y + box.h <= 1500 + h / 2 + 1
        assert 1100 - w / 2 - 1 <= box.x and box.x + box.w <= 1100 + w / 2 + 1
    assert qc.boxes and BOXES in viewer.layers
    assert layer.data[0].largest_read <= 4096 * 4096  # the view, never the slide, was read
    qc.shutdown()
