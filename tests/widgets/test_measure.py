"""The dock measures every round on fresh corrections: audits, the estimate, auto preset, do-no-harm (real viewer)."""

from __future__ import annotations

import numpy as np
import torch
from qtpy.QtCore import Qt

from napari_uga._widgets._layers import PROPOSALS
from napari_uga._widgets.annotate import SHIFT_LABELS, AnnotateWidget
from napari_uga.session import audit_pairs


def test_rounds_are_measured_on_fresh_corrections_and_a_harmful_one_is_rolled_back(
    qtbot, wait_idle, submit_batch, make_dock, make_napari_viewer
):
    dock = make_dock()
    dock.model_edit.setText("")  # the shipped model: right on the demo slide
    assert dock._shift() == "auto"
    dock.audit_spin.setValue(0.34)  # one patch's area of each batch of three: 4 quarter-patch audits
    qtbot.mouseClick(dock.compute_button, Qt.MouseButton.LeftButton)
    wait_idle(dock)

    submit_batch(dock)
    session = dock.session
    assert [a["audit"] for a in session.annotations].count(True) == 4
    assert "audit" in list(dock.viewer.layers[PROPOSALS].features["why"])
    assert all(set(a["scores"]) == {"0"} for a in session.annotations)  # scored before round 1 trained on them
    assert dock.chosen_shift == "centre"  # the starting model clears the bar on this slide's first batch
    assert session.config["loop"]["chosen_shift"] == "centre" and session.current_round == 1
    said = dock.measure_label.text()
    assert said.startswith("Round 0:") and "4 audit patches" in said and "on all 6 corrections" in said

    submit_batch(dock)  # round 1 is checked against round 0 on this batch
    assert not dock.notice and session.current_round == 2 and len(session.config["changes"]) == 1
    assert "Against round 0 on the same 6 corrections: " in dock.measure_label.text()  # did round 1 help?

    submit_batch(dock)
    assert session.current_round == 3
    with torch.no_grad():  # fault injected: round 3 goes wrong, it calls tumour what it called tissue and back
        dock.model.head_out.weight.neg_()
        dock.model.head_out.bias.neg_()
    submit_batch(dock)  # the wrong round 3 meets fresh corrections
    assert dock.notice.startswith("Do no harm: round 3 scored") and "rolled back to round 2" in dock.notice
    assert session.config["changes"][-1] < -0.01
    assert session.current_round == 3 and session.rounds[3].annotation_ids  # retrained from round 2
    scores = [a["scores"] for a in session.annotations]
    assert all("2" in s and "3" not in s for s in scores[-6:])  # the undone round's scores are dropped
    assert all(set(s) == {"0", "1", "2"} for s in scores[12:18])  # batch 3 met rounds 0-2 before training
    text = dock.measure_text()
    dock.strategy_combo.setCurrentText("expected_error")  # proposals from a texture model of the corrections
    dock.propose()
    reasons = [p.reason for p in dock.proposals if not p.audit]
    assert reasons and all(r.startswith("expected_error: ") for r in reasons)
    dock.save_session()  # the settings as the dock shows them are kept

    folder = session.folder
    pairs, mpp = audit_pairs(folder)  # readable while the dock holds the session
    assert (
        len(pairs) == sum(a["audit"] for a in session.annotations) >= 4
        and mpp == session.images[dock.image_name]["mpp"]
    )
    assert all(p.image.shape[:2] == p.mask.shape and set(np.unique(p.mask)) <= {0, 1} for p in pairs)
    dock.shutdown()

    viewer = make_napari_viewer()
    reopened = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(reopened)
    reopened.open_session(folder)
    wait_idle(reopened)
    assert reopened.measure_text() == text and reopened.chosen_shift == "centre"
    assert reopened.shift_combo.currentIndex() == list(SHIFT_LABELS).index("auto")
    assert reopened.audit_spin.value() == 0.34 and reopened.strategy_combo.currentText() == "expected_error"
    reopened.shutdown()
