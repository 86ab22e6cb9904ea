"""The dock measures every round on fresh corrections: audits, the estimate, auto preset, do-no-harm (real viewer)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt

from napari_uga._widgets._layers import PROPOSALS
from napari_uga._widgets.annotate import SHIFT_LABELS, AnnotateWidget
from napari_uga.audit import pooled_estimate
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
    # all scored by round 0 before round 1 trained; round 1 trained on the proposed two and was scored on the audits
    assert [sorted(a["scores"]) for a in session.annotations] == [
        ["0", "1"] if a["audit"] else ["0"] for a in session.annotations
    ]
    chosen = dock.chosen_shift  # auto chose from the first batch (its rule: tests/core/test_audit.py)
    assert chosen in ("centre", "organ") and session.config["loop"]["chosen_shift"] == chosen
    assert session.current_round == 1
    assert len(session.rounds[1].annotation_ids) == 2 and len(session.held_out_ids()) == 4
    said = dock.measure_label.text()
    assert said.startswith("Round 1:") and "4 audit patches, never trained on" in said, said
    assert "Against round 0 on the same 4 corrections: " in said  # did round 1 help? asked at once

    submit_batch(dock)  # round 1 meets this batch and the 4 earlier audits: kept, or rolled back with a notice
    (change,) = session.config["changes"]
    assert dock.notice.startswith("Do no harm: round 1 scored") == (change < -0.01), (change, dock.notice)
    assert "Against round 0 on the same 8 corrections: " in dock.measure_label.text()

    # a held-out audit's scores are made once per round: the next Submit reuses the stored one, not a new one
    first = session.held_out_ids()[0]
    (stored,) = session.known_scores([first], dock.config.predictor)
    marked = replace(stored[0], changed=stored[0].changed / 2 + 0.25)  # a share no prediction of it gives
    session.record_scores({first: {0: marked}}, dock.config.predictor)
    submit_batch(dock)
    assert session.known_scores([first], dock.config.predictor)[0][0] == marked
    last = session.current_round
    with torch.no_grad():  # fault injected: the round calls tumour everywhere (under a weight soup too)
        dock.model.head_out.bias.fill_(40.0)
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        submit_batch(dock)  # the wrong round meets fresh corrections
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    said = [n.message for n in seen if n.message.startswith("Do no harm")]
    assert said and said[0].startswith(f"Do no harm: round {last} scored"), said
    assert session.config["changes"][-1] < -0.01
    # back to the round it was tuned from, or on to round 0 where that one scores below the start too
    back = int(said[0].rsplit("round ", 1)[1].rstrip("."))
    assert back in (last - 1, 0) and (back == 0) == ("against round 0" in said[0])
    # the round retrained from there is kept, or, worse than it on the audits, not kept (a second notice)
    not_kept = said[1:] == [dock.notice] and dock.notice.startswith("Do no harm: the newly trained round was not")
    assert len(said) == 1 + not_kept, said
    now = session.current_round
    assert now == back + (not not_kept) and (not_kept or session.rounds[now].annotation_ids)
    proposed = [a for a in session.annotations if not a["audit"]]
    assert all(max(map(int, a["scores"])) == back for a in proposed[-2:])  # the undone rounds' scores are dropped
    # test-then-train: a proposed correction is scored only by rounds before the one that trained on it
    assert all(max(map(int, a["scores"])) < a["round"] for a in proposed if a["round"] is not None)
    assert all(max(map(int, a["scores"])) <= now for a in session.annotations)
    # the round in use and round 0 are scored on every audit
    audits = [a for a in session.annotations if a["audit"]]
    assert all({"0", str(now)} <= set(a["scores"]) for a in audits)
    retrained = pooled_estimate(session.scores_of(now, audits_only=True))
    assert retrained is not None and retrained.dice > 0.5
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
    assert reopened.measure_text() == text and reopened.chosen_shift == chosen
    assert reopened.shift_combo.currentIndex() == list(SHIFT_LABELS).index("auto")
    assert reopened.audit_spin.value() == 0.34 and reopened.strategy_combo.currentText() == "expected_error"
    reopened.shutdown()


def test_a_round_that_scores_worse_on_the_audits_is_not_kept(qtbot, wait_idle, submit_batch, make_dock):
    dock = make_dock()
    dock.model_edit.setText("")  # the shipped model: right on the demo slide
    dock.audit_spin.setValue(0.34)
    qtbot.mouseClick(dock.compute_button, Qt.MouseButton.LeftButton)
    wait_idle(dock)
    dock.config.lr, dock.config.anchor = 1.0, 0.0  # fault injected: a learning rate that wrecks the round
    submit_batch(dock)
    session = dock.session
    assert dock.notice.startswith("Do no harm: the newly trained round was not kept (round 1 scored -"), dock.notice
    assert "against round 0 on the audit patches" in dock.notice
    assert session.current_round == 0 and len(session.rounds) == 1  # nothing recorded
    assert session.pending_ids() and len(session.held_out_ids()) == 4  # the corrections wait for the next Submit
    assert "not kept" in dock.training.status.text()
    assert all(set(a["scores"]) == {"0"} for a in session.annotations)  # the dropped round left no score behind
