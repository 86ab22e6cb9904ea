"""The Quality control dock with a real viewer, a tiny real network and real tiles."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_uga import quality
from napari_uga._widgets.qc import BOXES, FOLDER, OPENED, QC_MAP, QCWidget
from napari_uga.metrics import dice
from napari_uga.selection import Box

WAIT_MS = 120_000


@pytest.fixture()
def qc_dock(make_napari_viewer, tiny_model_path):
    viewer = make_napari_viewer()
    widget = QCWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Quality control")
    widget.model_edit.setText(str(tiny_model_path))
    yield widget
    widget.shutdown()


def _qc_model(tmp_path, tiny_model, pairs) -> str:
    """A QC model fitted on real features of a few tiles (2 MC samples per view, to keep it fast)."""
    rows, truth = [], []
    for pair in pairs:
        row, pred = quality.compute_features(tiny_model, pair.image, 0.5, samples=2)
        rows.append(row)
        truth.append(dice(pred, pair.mask))
    return str(quality.fit_qc_model(rows, truth, samples=2).save(tmp_path / "qc.json"))


def _wait(qtbot, widget: QCWidget) -> None:
    qtbot.waitUntil(lambda: widget.worker is None and widget.report is not None, timeout=WAIT_MS)


def test_folder_table_sorted_worst_first_and_click_opens(qc_dock, qtbot, tmp_path, sample_dir, umcu_pairs, tiny_model):
    folder = tmp_path / "check"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
        for f in sorted((sample_dir / sub).iterdir())[2::10]:
            shutil.copy(f, folder / sub / f.name)
    qc_dock.qc_model_edit.setText(_qc_model(tmp_path, tiny_model, umcu_pairs[::10]))
    qc_dock.source_combo.setCurrentText(FOLDER)
    qc_dock.folder_edit.setText(str(folder / "images"))
    qc_dock.masks_edit.setText(str(folder / "masks"))
    qc_dock.mpp_spin.setValue(0.243)  # PNG tiles carry no scale
    qc_dock.run()
    assert qc_dock.worker is not None and not qc_dock.run_button.isEnabled()
    _wait(qtbot, qc_dock)
    table = qc_dock.table
    n = len(list((folder / "images").iterdir()))
    assert table.rowCount() == n and qc_dock.run_button.isEnabled()
    shown = [float(table.item(r, 1).text()) for r in range(n)]
    assert shown == sorted(shown)  # worst first
    for r in range(n):
        decision = table.item(r, 2).text()
        assert decision in ("accept", "review")
        expected = "#2e7d32" if decision == "accept" else "#c62828"
        assert table.item(r, 0).background().color().name() == expected
        assert table.item(r, 3).text() != "–"  # masks given: true Dice shown
        assert 0 < float(table.item(r, 4).text()) <= 1  # the exchangeability gate's p-value
    assert table.horizontalHeaderItem(4).text() == "domain p"
    assert "auroc" in qc_dock.status.text() or "mae" in qc_dock.status.text()
    assert "chosen by auto" in qc_dock.status.text() and qc_dock.status.toolTip().startswith("auto chose")
    assert qc_dock.axes.lines  # risk-coverage curve drawn
    assert qc_dock.settings_box.isHidden()  # folded away, the table keeps its room
    qc_dock.settings_toggle.setChecked(True)
    assert not qc_dock.settings_box.isHidden() and qc_dock.method_combo.isVisibleTo(qc_dock)
    qc_dock._row_clicked(0, 0)
    worst = table.item(0, 0).text()
    from napari_uga.io import read_image

    assert np.array_equal(qc_dock.viewer.layers[OPENED].data, read_image(folder / "images" / f"{worst}.png"))


def test_patches_of_current_image_outlined_and_zoomed(qc_dock, qtbot, tmp_path, umcu_pairs, tiny_model):
    image = np.concatenate([np.concatenate([p.image for p in umcu_pairs[i : i + 2]], 1) for i in (0, 16)], 0)
    qc_dock.viewer.add_image(image, name="tiles", rgb=True)
    assert qc_dock.image_combo.currentText() == "tiles"
    qc_dock.qc_model_edit.setText(_qc_model(tmp_path, tiny_model, umcu_pairs[::10]))
    qc_dock.patch_spin.setValue(256)
    qc_dock.run()  # an image layer without µm/px: the dock asks instead of guessing
    assert qc_dock.worker is None and "has no µm/px in its metadata" in qc_dock.status.text()
    qc_dock.mpp_spin.setValue(0.243)
    qc_dock.run()
    _wait(qtbot, qc_dock)
    n = qc_dock.table.rowCount()
    assert 1 <= n <= 4 and len(qc_dock.viewer.layers[BOXES].data) == n
    qc_dock._row_clicked(n - 1, 0)
    box = qc_dock.boxes[qc_dock.table.item(n - 1, 0).text()]
    np.testing.assert_allclose(qc_dock.viewer.camera.center[-2:], (box.y + box.h / 2, box.x + box.w / 2))


def test_out_of_domain_rows_say_so(qc_dock):
    """A row the exchangeability gate sent to review reads 'review: out of domain', with the reason."""
    reason = "unlike the calibration images: atypicality p = 0.0172"
    rows = [
        {"name": "colon", "dice_pred": 0.9, "accepted": False, "dice_true": None, "in_domain": False,
         "domain_p": 0.0172, "reason": reason},
        {"name": "node", "dice_pred": 0.8, "accepted": True, "dice_true": None, "in_domain": True,
         "domain_p": 0.4, "reason": ""},
    ]  # fmt: skip
    report = {"per_image": rows, "threshold": 0.8, "alpha": 0.1, "delta": 0.1, "method": "entropy", "rule": "ltt",
              "cut": 0.0, "note": "", "method_reason": "", "metrics": {}, "domain_level": 0.05,
              "domain_note": "1 of 2 images are unlike the calibration images"}  # fmt: skip
    qc_dock.show_report(report)
    table = qc_dock.table
    by_name = {table.item(r, 0).text(): r for r in range(table.rowCount())}
    colon, node = by_name["colon"], by_name["node"]
    assert table.item(colon, 2).text() == "review: out of domain" and table.item(colon, 2).toolTip() == reason
    assert table.item(colon, 4).text() == "0.017" and table.item(node, 2).text() == "accept"
    assert "1 of 2 images are unlike the calibration images" in qc_dock.status.text()


def test_qc_map_layer_sits_over_the_patches_and_jumps_to_the_worst(qc_dock):
    """The map has one pixel per checked patch, centred on it in world coordinates; the button zooms to the
    out-of-domain patch first, then to the lowest predicted Dice among those to review."""
    layer = qc_dock.viewer.add_image(np.zeros((1024, 1536, 3), np.uint8), name="slide", rgb=True, scale=(0.5, 0.5),
                                     translate=(10, 20))  # fmt: skip
    names, corners = ["a", "b", "c"], [(0, 0), (0, 512), (512, 1024)]
    qc_dock.patch_spin.setValue(512)
    qc_dock.boxes = {n: Box("slide", y, x, 512, 512) for n, (y, x) in zip(names, corners, strict=True)}
    rows = [
        {"name": "a", "dice_pred": 0.95, "accepted": True, "dice_true": None, "in_domain": True, "domain_p": 0.5,
         "reason": ""},
        {"name": "b", "dice_pred": 0.40, "accepted": False, "dice_true": None, "in_domain": True, "domain_p": 0.3,
         "reason": "low"},
        {"name": "c", "dice_pred": 0.90, "accepted": False, "dice_true": None, "in_domain": False, "domain_p": 0.01,
         "reason": "unlike"},
    ]  # fmt: skip
    report = {"per_image": rows, "threshold": 0.8, "alpha": 0.1, "delta": 0.1, "method": "entropy", "rule": "ltt",
              "cut": 0.0, "note": "", "method_reason": "", "metrics": {}, "domain_level": 0.05,
              "domain_note": ""}  # fmt: skip
    qc_dock.show_report(report)
    qc_map = qc_dock.viewer.layers[QC_MAP]
    assert qc_map.data.shape == (2, 3) and np.isnan(qc_map.data[1, 0]) and qc_map.data[1, 2] == np.float32(0.9)
    np.testing.assert_allclose(qc_map.scale, (256, 256))
    # the world centre of map pixel (1, 2) is the world centre of patch c
    centre = np.asarray(qc_map.data_to_world((1, 2)))
    np.testing.assert_allclose(centre, np.asarray(layer.data_to_world((512 + 255.5, 1024 + 255.5))))
    assert "33% accepted, 33% to review, 33% out of domain" in qc_dock.status.text()
    assert qc_dock.worst_button.isEnabled()
    qc_dock.next_worst()
    np.testing.assert_allclose(qc_dock.viewer.camera.center[-2:], layer.data_to_world((768, 1280)))
    qc_dock.next_worst()
    np.testing.assert_allclose(qc_dock.viewer.camera.center[-2:], layer.data_to_world((256, 768)))


def test_calibrate_from_a_session(qc_dock, qtbot, tmp_path, sample_dir, audit_session, monkeypatch):
    """'Calibrate from a session…' picks a real session folder; its ten audit patches are too few for
    Learn-then-Test (the status says how many it needs) and calibrate conformal selection, whose scope is shown."""
    from qtpy.QtWidgets import QFileDialog, QPushButton

    folder = tmp_path / "check"
    (folder / "images").mkdir(parents=True)
    for f in sorted((sample_dir / "images").iterdir())[3::14]:  # none of them in the session
        shutil.copy(f, folder / "images" / f.name)
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a: str(audit_session))
    button = next(b for b in qc_dock.findChildren(QPushButton) if b.text() == "Calibrate from a session…")
    button.click()
    assert qc_dock.cal_session_edit.text() == str(audit_session)
    qc_dock.source_combo.setCurrentText(FOLDER)
    qc_dock.folder_edit.setText(str(folder / "images"))
    qc_dock.mpp_spin.setValue(0.243)
    qc_dock.cal_images_edit.setText(str(folder / "images"))
    qc_dock.cal_masks_edit.setText(str(folder / "images"))
    qc_dock.run()
    assert qc_dock.worker is None and "from labelled images or from a session, not both" in qc_dock.status.text()
    qc_dock.cal_images_edit.clear()
    qc_dock.cal_masks_edit.clear()
    qc_dock.run()  # the calibration's rule: Learn-then-Test
    qtbot.waitUntil(lambda: qc_dock.worker is None, timeout=WAIT_MS)
    assert "10 audit patches, too few for rule ltt, which needs at least 22" in qc_dock.status.text()
    qc_dock.rule_combo.setCurrentText("fdr")
    qc_dock.run()
    _wait(qtbot, qc_dock)
    assert qc_dock.table.rowCount() == 3 and qc_dock.report["calibration"]["patches"] == 10
    assert (
        "Calibrated on 10 audit patches of the session: the guarantee holds for patches drawn at random from the "
        "tissue of the session's slides." in qc_dock.status.text()
    )
