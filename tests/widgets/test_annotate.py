"""The UGA dock on a real viewer: compute, propose, correct, submit, fine-tune, undo, reopen."""

from __future__ import annotations

import numpy as np
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt

from napari_uga._widgets._layers import ANNOTATION, PREDICTION, PROBABILITY, PROPOSALS, UNCERTAINTY
from napari_uga._widgets.annotate import SELF_LABEL_PATCHES, AnnotateWidget
from napari_uga.io import REPLAY_MPP
from napari_uga.tiles import MapView, plan_maps

WAIT_MS = 120_000


def _compute_and_propose(qtbot, wait_idle, widget) -> None:
    qtbot.mouseClick(widget.compute_button, Qt.MouseButton.LeftButton)
    wait_idle(widget)
    qtbot.mouseClick(widget.propose_button, Qt.MouseButton.LeftButton)


def test_round_trip_advances_the_model(qtbot, wait_idle, dock, monkeypatch):
    import napari_uga._widgets.annotate as annotate

    trained_on, real = [], annotate.finetune_events

    def spy(model, annotations, *args, **kwargs):  # the real fine-tune, watched: what does it train on?
        trained_on.append([a.box for a in annotations])
        return real(model, annotations, *args, **kwargs)

    monkeypatch.setattr(annotate, "finetune_events", spy)
    viewer = dock.viewer
    _compute_and_propose(qtbot, wait_idle, dock)
    for name in (PROBABILITY, UNCERTAINTY, PREDICTION, PROPOSALS, ANNOTATION):
        assert name in viewer.layers
    assert viewer.layers[UNCERTAINTY].colormap.name == "uga inferno"
    # 3 patches' worth: 2 proposed, and the third's area as 4 quarter-patch audits drawn at random
    assert len(viewer.layers[PROPOSALS].data) == 6 and sum(p.audit for p in dock.proposals) == 4
    assert {dock.plan.to_working(p)[2:] for p in dock.proposals if p.audit} == {(dock.plan.patch // 2,) * 2}
    assert dock.counter.text() == "patch 1 / 6 · 1 to submit"
    submitted_audits = [p.audit for p in dock.proposals[:2]]
    assert submitted_audits == [False, True]  # a proposed patch, then an audit
    self_label_boxes = dock._self_label_boxes()  # what the starting model labels for the self-label share
    assert 0 < len(self_label_boxes) <= SELF_LABEL_PATCHES and len(set(self_label_boxes)) == len(self_label_boxes)

    first = dock.proposals[0]
    annotation = viewer.layers[ANNOTATION]
    assert annotation.data.shape == (first.h, first.w)  # the correction layer is one patch, placed on the slide
    np.testing.assert_allclose(annotation.translate, (first.y, first.x))
    wy, wx, wh, ww = dock.plan.to_working(first)
    predicted = np.asarray(MapView(dock.stores, "probability", 0, threshold=128)[wy : wy + wh, wx : wx + ww])
    assert abs(annotation.data.mean() - predicted.mean()) < 0.05  # pre-filled with the prediction
    annotation.paint((first.h // 2, first.w // 2), 1)  # a brush correction
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, Qt.Key.Key_N)
    assert dock.session.queue_position == 1
    assert dock.counter.text() == "patch 2 / 6 · 2 to submit"

    before = np.asarray(viewer.layers[PROBABILITY].data[0]).copy()
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        qtbot.mouseClick(dock.submit_button, Qt.MouseButton.LeftButton)
        folder = dock.session.folder
        assert sorted(p.name for p in (folder / "labels").iterdir()) == ["00001.png", "00002.png"]  # before training
        assert not dock.submit_button.isEnabled() and not dock.compute_button.isEnabled()
        assert not dock.shift_combo.isEnabled() and not dock.steps_spin.isEnabled()  # the running round's settings
        with qtbot.waitSignal(dock.worker.finished, timeout=WAIT_MS):
            pass
        wait_idle(dock)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    (said,) = [n.message for n in seen if n.message.startswith("Domain shift:")]  # auto chose, and says why
    first_dice = float(said.split("scored Dice ")[1].split(" ")[0])
    assert ("the slide's tissue is" in said) == (first_dice < 0.8), said  # the gate is asked only where the bar fails
    assert "unlike" in said or dock.chosen_shift == "centre"

    assert dock.session.current_round == 1
    assert (folder / "checkpoints" / "round_001.safetensors").is_file()
    assert not np.array_equal(np.asarray(viewer.layers[PROBABILITY].data[0]), before)
    assert (folder / "maps" / "round_001.zarr").is_dir() and dock.store.complete()
    assert dock.history.rowCount() == 2
    assert dock.history.item(1, 1).text() == "1"  # the audit is held out of training
    assert dock.history.item(1, 4).text() != "—"  # Dice against the loaded ground truth
    # round 1 is measured at once, on the audit it never trained on
    assert dock.measure_label.text().startswith("Round 1:"), dock.measure_label.text()
    assert "1 audit patch, never trained on" in dock.measure_label.text()
    assert [a["audit"] for a in dock.session.annotations] == submitted_audits
    # both scored by round 0 before round 1 trained; the audit by round 1 too
    assert [sorted(a["scores"]) for a in dock.session.annotations] == [["0"], ["0", "1"]]
    assert dock.session.held_out_ids() == [2] and dock.session.rounds[1].annotation_ids == [1]
    (boxes,) = trained_on  # one fine-tune, on the proposed patch alone
    assert boxes == [a.box for a in dock.session.load_annotations([1])]
    assert dock.chosen_shift in ("centre", "organ") and dock.steps_spin.value() == 3
    assert len(dock.training.losses) == 3
    assert dock.compute_button.isEnabled() and dock.undo_button.isEnabled() and dock.shift_combo.isEnabled()

    dock.undo_round()
    wait_idle(dock)
    assert dock.session.current_round == 0
    assert dock.session.pending_ids() == [1] and dock.session.held_out_ids() == [2]
    assert dock.history.rowCount() == 1


def test_cancel_keeps_no_partial_checkpoint(qtbot, wait_idle, dock):
    _compute_and_propose(qtbot, wait_idle, dock)
    dock.steps_spin.setValue(500)
    dock.submit()
    worker = dock.worker
    with qtbot.waitSignal(worker.yielded, timeout=WAIT_MS):
        pass
    with qtbot.waitSignal(worker.finished, timeout=WAIT_MS):
        qtbot.mouseClick(dock.training.cancel_button, Qt.MouseButton.LeftButton)
    wait_idle(dock)
    folder = dock.session.folder
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["round_000.safetensors"]
    assert dock.session.current_round == 0
    assert dock.session.pending_ids() == [1]
    assert dock.compute_button.isEnabled() and dock.propose_button.isEnabled()
    assert not dock.training.cancel_button.isEnabled(), (dock.training.status.text(), dock.status.text())
    assert "Cancelled" in dock.training.status.text()


def test_reopen_restores_the_session(qtbot, wait_idle, dock, make_napari_viewer):
    _compute_and_propose(qtbot, wait_idle, dock)
    dock.shift_combo.setCurrentIndex(2)  # new organ: no replay, batch norm adapts
    dock.steps_spin.setValue(3)
    dock.config.lr = 3e-4  # a setting the dock has no box for (Python API)
    dock.k_spin.setValue(4)
    dock.viewer.layers[ANNOTATION].data[:40, :40] = 1
    dock.next_patch()
    dock.submit()
    wait_idle(dock)
    dock.go_to(2)
    dock.save_session()
    folder = dock.session.folder

    viewer = make_napari_viewer()
    reopened = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(reopened)
    reopened.open_session(folder)
    wait_idle(reopened)
    assert reopened.session.current_round == 1
    assert reopened.session.queue_position == 2
    assert len(viewer.layers[PROPOSALS].data) == 6  # the queue as proposed: 2 patches and 4 quarter-patch audits
    reopened.go_to(0)
    restored = viewer.layers[ANNOTATION].data
    np.testing.assert_array_equal(restored[:40, :40], 1)
    assert PROBABILITY in viewer.layers and reopened.store is not None
    assert reopened.history.rowCount() == 2
    assert not reopened.image_combo.isEnabled()  # the session is bound to its image
    assert reopened.shift_combo.currentIndex() == 2 and reopened.steps_spin.value() == 3
    assert not reopened.config.freeze_norm and reopened.config.lr == 3e-4
    assert reopened.session.rounds[1].settings["lr"] == 3e-4  # each round keeps how it was trained
    assert reopened.k_spin.value() == 4 and reopened.session.rounds[1].settings["batch"] == 4


def test_bad_model_file_is_a_notification_not_a_crash(dock, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not weights")
    dock.model_edit.setText(str(bad))
    dock.compute()
    assert dock.session is None and dock.worker is None
    assert dock.compute_button.isEnabled()


def test_demo_opens_the_dock_through_the_manifest(make_napari_viewer, tmp_path):
    from napari_uga._widgets.demo import open_demo

    viewer = make_napari_viewer()
    widget = open_demo(viewer, tmp_path)
    assert isinstance(widget, AnnotateWidget)
    assert widget.image_combo.currentText() == "Camelyon demo slide"
    assert "ground truth" in viewer.layers and viewer.layers["Camelyon demo slide"].multiscale
    assert widget.session_edit.text().startswith(str(tmp_path))


def test_worker_error_is_a_notification_and_the_session_stays_usable(qtbot, wait_idle, dock):
    _compute_and_propose(qtbot, wait_idle, dock)
    dock.config.crop = 20  # not a multiple of the tiny U-Net's 8: the network fails inside the worker
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        dock.submit()
        wait_idle(dock)
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert any(n.severity == "error" for n in seen), (seen, dock.status.text())
    assert dock.status.text().startswith("Failed:")
    assert dock.session.current_round == 0 and dock.session.pending_ids() == [1]  # the correction is kept
    dock.config.crop = 128
    dock.next_patch()
    dock.submit()
    wait_idle(dock)
    assert dock.session.current_round == 1


def test_domain_shift_preset_sets_the_fine_tuning(dock):
    assert dock.config.freeze_norm and dock.config.replay_share > 0  # new centre: gentle, with replay
    assert dock._shift() == "auto" and dock.config.steps == 40  # decides from the first batch; centre until then
    dock.shift_combo.setCurrentIndex(2)  # new organ / tissue
    assert not dock.config.freeze_norm and dock.config.replay_share == 0 and dock.config.self_share == 0
    assert dock._self_label_boxes() == []
    assert dock.steps_spin.value() == dock.config.steps == 400
    assert dock.strategy_combo.currentText() == "random_first"  # the preset's proposal rule
    dock.shift_combo.setCurrentIndex(1)
    assert dock.config.freeze_norm and dock.steps_spin.value() == 40
    assert dock.strategy_combo.currentText() == "uncertainty"


def test_new_organ_proposes_four_quarter_patches_per_patch_each_with_its_reason(qtbot, wait_idle, dock):
    dock.shift_combo.setCurrentIndex(2)  # new organ / tissue, chosen before the maps are planned
    dock.k_spin.setValue(2)
    _compute_and_propose(qtbot, wait_idle, dock)
    wait_idle(dock)
    whole = plan_maps(dock.slide, dock.model.config.input_mpp, dock.config.patch * REPLAY_MPP).patch
    assert abs(dock.plan.patch - whole / 2) <= 1  # candidates are quarter patches
    picks = dock.proposals
    assert len(picks) == 8 and sum(p.audit for p in picks) == 2  # 2 patches' worth, a fifth of them audits
    assert not any(a.overlaps(b) for i, a in enumerate(picks) for b in picks[i + 1 :])
    first = "random_first (random while nothing is labelled, then uncertainty): random"
    assert all(p.reason.startswith("audit" if p.audit else first) for p in picks)  # nothing labelled yet
    dock._rerank()  # new tiles re-rank the unopened patches: still nothing corrected, still random draws
    assert all(p.reason.startswith("audit" if p.audit else first) for p in dock.proposals)
    picks = dock.proposals
    for i, patch in enumerate(picks):  # walking the queue says why each patch is there
        dock.go_to(i, zoom=False)
        assert patch.reason in dock.status.text()
    dock.strategy_combo.setCurrentText("uncertainty")
    qtbot.mouseClick(dock.propose_button, Qt.MouseButton.LeftButton)
    ranked = [p for p in dock.proposals if not p.audit]
    assert ranked and all(p.reason.startswith("uncertainty") for p in ranked)
    assert all("of appearance cluster" in p.reason for p in ranked)  # the rule, and the spread
    assert dock.k_spin.suffix() == " × 4 sub-patches"

    dock.shift_combo.setCurrentIndex(1)  # new centre now: round 0's quarter-patch maps are kept, not recomputed
    qtbot.mouseClick(dock.compute_button, Qt.MouseButton.LeftButton)
    assert dock.maps_worker is None and dock.store.complete() and dock.subdivide == 2


def test_cancel_during_self_labelling_returns_before_any_step(tiny_model, umcu_pairs):
    from napari_uga._widgets._workers import finetune_events
    from napari_uga.loop import Oracle, config_for
    from napari_uga.selection import Box
    from napari_uga.training import CancelToken

    pair = umcu_pairs[0]
    correction = Oracle(umcu_pairs).annotate(Box(pair.name, 0, 0, 128, 128))
    boxes = [Box(pair.name, y, x, 64, 64) for y in (128, 192) for x in (0, 64, 128)]
    token = CancelToken()
    run = finetune_events(
        tiny_model,
        [correction],
        0.5,
        config_for("centre", steps=3, batch_size=2),
        0,
        token,
        1,
        tiny_model,
        boxes,
        lambda name: pair.image,
    )
    first = next(run)
    assert first["stage"] == "self-labels" and first["total"] == len(boxes)
    token.set()
    stages = []
    try:
        while True:
            stages.append(next(run)["stage"])
    except StopIteration as stop:
        assert stop.value is None and stages == []  # cancelled before any fine-tuning step: no weights


def test_full_disk_at_submit_keeps_the_corrections_for_a_retry(qtbot, wait_idle, dock, monkeypatch):
    import errno

    from napari_uga import session as session_module

    _compute_and_propose(qtbot, wait_idle, dock)
    first = dock.proposals[0]
    dock.viewer.layers[ANNOTATION].data[:20, :20] = 1
    real_write = session_module.write_array

    def full_disk(path, array):  # the fault: the disk fills while the first mask is written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(session_module, "write_array", full_disk)
    dock.submit()
    assert dock.worker is None and dock.session.annotations == [] and dock.session.current_round == 0
    assert first.box in dock.drafts and "Not saved" in dock.status.text()
    labels = dock.session.folder / "labels"
    assert not labels.exists() or not any(labels.glob("*.png"))  # all or nothing
    monkeypatch.setattr(session_module, "write_array", real_write)  # space freed: Submit again
    dock.submit()
    assert [a["id"] for a in dock.session.annotations] == [1]
    assert first.box not in dock.drafts  # submitted: no longer a draft
    wait_idle(dock)
    assert dock.session.current_round == 1


def test_new_organ_rounds_predict_with_their_soup_under_flips(qtbot, wait_idle, submit_batch, dock):
    import torch

    from napari_uga.audit import score_patch
    from napari_uga.models import average_weights
    from napari_uga.uncertainty import predict_probability

    dock.shift_combo.setCurrentIndex(2)  # new organ / tissue: the soup+flips predictor
    dock.steps_spin.setValue(2)
    dock.k_spin.setValue(1)
    assert dock.config.predictor == "soup+flips"
    qtbot.mouseClick(dock.compute_button, Qt.MouseButton.LeftButton)
    wait_idle(dock)
    for _ in range(3):  # round 2 meets the third batch before it trains on it
        submit_batch(dock)
    session = dock.session
    assert session.current_round == 3
    round_2 = session.load_model(2, "cpu")
    soup = average_weights([round_2, session.load_model(1, "cpu")])
    predicting = dock._predicting(2, round_2)
    assert all(torch.equal(a, b) for a, b in zip(predicting.parameters(), soup.parameters(), strict=True))
    third = session.annotations[-4:]
    for record, annotation in zip(third, session.load_annotations([a["id"] for a in third]), strict=True):
        probability = predict_probability(soup, annotation.image, factor=dock._factor(), tta="flips")
        made = score_patch(probability, annotation.mask).as_dict()
        assert record["scores"]["2"] == {**made, "predictor": "soup+flips"}  # scored as it predicts, and so tagged
