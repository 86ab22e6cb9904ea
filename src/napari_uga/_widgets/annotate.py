"""The "UGA annotation" dock: whole-slide uncertainty overlay, patch queue, corrections and background fine-tuning.

The widget only wires napari layers to the core. The slide is a :class:`~napari_uga.wsi.Slide`
(lazy levels); maps are computed tile by tile by :func:`~napari_uga.tiles.compute_maps` into
the round's :class:`~napari_uga.tiles.MapStore`, the view first (the dock only tells the
:class:`~napari_uga.tiles.TileQueue` where the camera is) and shown as multiscale layers that
fill in; proposals come from :func:`~napari_uga.selection.select` over the store's scored
candidates; the correction layer is the size of one patch, placed on the slide; fine-tuning
reads its patches from the slide lazily (:func:`~napari_uga.loop.finetune`); all state lives
in a :class:`~napari_uga.session.Session` folder (layers are views of it).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from .._sample_data import TRUTH_NAME
from ..audit import GATE_PATCHES, HARM_MARGIN, rollback_said
from ..io import REPLAY_MPP, InputError, read_mask
from ..loop import (
    SHIFTS,
    audit_subdivide,
    batch_split,
    config_for,
    config_from_record,
    default_strategy,
    map_sampling,
    predicting_network,
    prediction_tta,
)
from ..metrics import dice
from ..selection import STRATEGIES, Box, Proposal, diversity_for, holds_tumour, nearest_candidate, select, spread
from ..session import Session, SessionWriteError, SlideMissingError
from ..tiles import (
    MapPlan,
    MapStore,
    MapView,
    TileMapper,
    TileProgress,
    TileQueue,
    plan_maps,
    random_tissue_boxes,
    round_store_path,
    survey_boxes,
)
from ..training import CancelToken
from ..wsi import MAX_FLAT_SIDE, Slide, fingerprint
from ._common import WorkerDock, follow_layers, refill_combo, view_box, zoom_to_box
from ._layers import (
    ANNOTATION,
    ANNOTATION_COLOR,
    CURRENT_EDGE,
    DONE_EDGE,
    PROPOSALS,
    QUEUED_EDGE,
    level0,
    one_color,
    refresh_maps,
    show_maps,
    upsert,
)
from ._measure import NOT_YET, batch_dice, history_rows, measure_text, queue_label
from ._workers import SubmitOutcome, finetune_events, maps_worker, submit_worker
from .training import TrainingWidget

if TYPE_CHECKING:
    import napari

LOG = logging.getLogger(__name__)
SHIFT_LABELS = {
    "auto": "decide from the first batch",
    "centre": "new centre / scanner (same tissue)",
    "organ": "new organ / tissue",
}
NEXT_KEY, PREVIOUS_KEY = "n", "Shift-N"
TRAIN_THREADS = max(1, (os.cpu_count() or 2) - 1)  # leave a core to the UI (see benchmarks/ui_stall.py)
SELF_LABEL_PATCHES = 24  # unlabelled tissue patches of the slide that the starting model labels for fine-tuning
REFRESH_S = 0.4  # the map layers are redrawn at most this often while tiles arrive
RERANK_EVERY = 25  # tiles between two re-rankings of the queue's unopened patches
AUDIT_SHARE = 0.2  # share of each batch drawn at random from the tissue to measure the model
TARGET_DICE = 0.9  # the Dice the stop signal checks the estimate's interval against (a setting)
SCORE_MAX_PIXELS = 4096 * 4096  # Dice against a loaded ground truth only on slides whose maps fit this


def _audits_said(picks: list[Proposal]) -> str:
    """``, 4 of them audits drawn at random from the tissue``, or nothing without audits."""
    n = sum(p.audit for p in picks)
    return f", {n} of them audits drawn at random from the tissue" if n else ""


class AnnotateWidget(WorkerDock):
    """Dock widget driving one uncertainty-guided annotation session on a whole slide.

    ``self.worker`` is the fine-tune (one at a time); ``self.maps_worker`` computes the maps in the
    background and is paused (cancelled, its tiles kept) while a round trains.
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: Session | None = None
        self.image_name: str | None = None
        self.slide: Slide | None = None
        self.model = None
        self.origin = None  # the session's round-0 model: the fine-tuning anchor pulls towards it
        self.plan = None
        self.subdivide = 1  # the side divisor of the plan in use's candidates (2: quarter patches)
        self.store: MapStore | None = None
        self.stores: list[MapStore] = []  # shown, newest first (older rounds fill what the newest lacks)
        self.queue: TileQueue | None = None
        self.proposals: list[Proposal] = []
        self.drafts: dict[Box, np.ndarray] = {}  # opened, not yet submitted corrections (patch-sized masks)
        self.current: Box | None = None  # the patch in the correction layer
        self.worker = None
        self.maps_worker = None
        self.maps_token = CancelToken()
        self.last_progress: TileProgress | None = None
        self._propose_when_ready = False
        self._closing = False
        self._last_refresh = 0.0
        self._tiles_since_rank = 0
        self._follow_up = None
        self.token = CancelToken()
        self.config = config_for("centre")
        self.chosen_shift: str | None = None  # what ``auto`` chose from the first batch
        self.notice = ""  # the last do-no-harm verdict
        self._build()
        follow_layers(self.viewer, self._refresh_layers)
        self.viewer.scene.camera.events.center.connect(self._send_view)
        self.viewer.scene.camera.events.zoom.connect(self._send_view)
        self._update_controls()

    # -- construction ------------------------------------------------------------
    def _build(self) -> None:
        self.image_combo = QComboBox()
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("shipped model")
        self.model_edit.setToolTip("A napari-uga .safetensors weights file; empty uses the shipped model")
        model_browse = QPushButton("…")
        model_browse.setMaximumWidth(28)
        model_browse.clicked.connect(self._browse_model)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_edit)
        model_row.addWidget(model_browse)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.0, 20.0)
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setSingleStep(0.01)
        self.mpp_spin.setSpecialValueText("from the file")
        self.mpp_spin.setToolTip("Level-0 µm per pixel of the slide; 'from the file' reads it from its metadata")
        self.samples_spin = _spin(1, 64, self.config.samples, "MC-dropout samples per tile")
        self.compute_button = QPushButton("Compute uncertainty")
        self.compute_button.clicked.connect(self.compute)
        self.maps_bar = QProgressBar()
        self.maps_bar.setFormat("%v / %m tiles")
        self.maps_label = QLabel("")
        self.maps_cancel = QPushButton("Stop maps")
        self.maps_cancel.setToolTip("Stop computing maps (the tiles done are kept; Compute continues)")
        self.maps_cancel.clicked.connect(self.stop_maps)
        maps_row = QHBoxLayout()
        maps_row.addWidget(self.maps_bar, stretch=1)
        maps_row.addWidget(self.maps_cancel)
        setup = QFormLayout()
        setup.addRow("Image", self.image_combo)
        setup.addRow("Model", model_row)
        setup.addRow("Device", self.device_combo)
        setup.addRow("µm / px", self.mpp_spin)
        setup.addRow("MC samples", self.samples_spin)
        setup.addRow(self.compute_button)
        setup.addRow(maps_row)
        setup.addRow(self.maps_label)

        self.k_spin = _spin(
            1, 50, self.config.batch, "How many patches to propose (New organ: each as 4 quarter patches)"
        )
        self.propose_button = QPushButton("Propose patches")
        self.propose_button.clicked.connect(self.propose)
        self.prev_button = QPushButton("◀ Prev")
        self.prev_button.setToolTip(f"Previous patch ({PREVIOUS_KEY})")
        self.prev_button.clicked.connect(self.previous_patch)
        self.next_button = QPushButton("Next ▶")
        self.next_button.setToolTip(f"Next patch ({NEXT_KEY.upper()})")
        self.next_button.clicked.connect(self.next_patch)
        self.counter = QLabel("no patches")
        self.shift_combo = QComboBox()
        self.shift_combo.addItems(list(SHIFT_LABELS.values()))
        self.shift_combo.setToolTip(
            "What differs from the model's training data. New centre: gentle fine-tuning with replay of the "
            "training tiles and of the starting model's own labels elsewhere on this slide. "
            "New organ: batch-norm statistics adapt, more steps, no replay."
        )
        self.shift_combo.currentIndexChanged.connect(self._shift_picked)
        self.strategy_combo = QComboBox()
        self.strategy_combo.addItems(list(STRATEGIES))
        self.strategy_combo.setToolTip(
            "How patches are proposed: uncertainty (the most uncertain first), expected_error (where a texture model "
            "of your corrections says the network's call is wrong), random, or the low-budget coverage rules "
            "(typical, weighted, coverage, mixed, random_first: a random first batch, then uncertainty). "
            "Each queued patch says why it was proposed."
        )
        self.steps_spin = _spin(1, 2000, self.config.steps, "Fine-tuning steps per round")
        self.audit_spin = QDoubleSpinBox()
        self.audit_spin.setRange(0.0, 0.9)
        self.audit_spin.setSingleStep(0.1)
        self.audit_spin.setValue(AUDIT_SHARE)
        self.audit_spin.setToolTip(
            "Share of each batch drawn at random from the tissue ('audit' patches): corrected like the others, they "
            "measure every round on this slide and are never trained on. 0 measures only on the proposed (hard) "
            "patches and trains on them all."
        )
        self.rollback_check = QCheckBox("Roll back a round that scores worse")
        self.rollback_check.setChecked(True)
        self.rollback_check.setToolTip(
            "Each batch, with the audits so far, is scored against the round in use, the one before it and round 0 "
            f"before training, and each new round on the audits. A round that scores more than {HARM_MARGIN:.2f} "
            "worse than the one before it or round 0 is rolled back (unchecked: you are told; Undo round does it)."
        )
        self.target_spin = QDoubleSpinBox()
        self.target_spin.setRange(0.0, 1.0)
        self.target_spin.setSingleStep(0.05)
        self.target_spin.setValue(TARGET_DICE)
        self.target_spin.setSpecialValueText("none")
        self.target_spin.setToolTip("The Dice you want: the dock says when the estimate's interval clears it")
        self.measure_label = QLabel(NOT_YET)
        self.measure_label.setWordWrap(True)
        self.submit_button = QPushButton("Submit batch && fine-tune")
        self.submit_button.clicked.connect(self.submit)
        propose_row = QHBoxLayout()
        propose_row.addWidget(self.k_spin)
        propose_row.addWidget(self.propose_button, stretch=1)
        queue_row = QHBoxLayout()
        queue_row.addWidget(self.prev_button)
        queue_row.addWidget(self.counter, stretch=1)
        queue_row.addWidget(self.next_button)
        patches = QFormLayout()
        patches.addRow("Patches", propose_row)
        patches.addRow(queue_row)
        patches.addRow("Proposals", self.strategy_combo)
        patches.addRow("Domain shift", self.shift_combo)
        patches.addRow("Steps", self.steps_spin)
        patches.addRow("Audit share", self.audit_spin)
        patches.addRow("Target Dice", self.target_spin)
        patches.addRow(self.rollback_check)
        patches.addRow(self.submit_button)

        self.training = TrainingWidget()
        self.training.cancel_requested.connect(self.cancel)
        self.history = QTableWidget(0, 5)
        self.history.setHorizontalHeaderLabels(["Round", "Patches", "Loss", "Estimated", "Dice"])
        self.history.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.history.verticalHeader().setVisible(False)
        self.history.setToolTip(
            "Estimated: the round's Dice on this slide, from the audit patches corrected after it (before it "
            f"trained on them). Dice: against a '{TRUTH_NAME}' labels layer, when one is loaded"
        )
        self.history.setMaximumHeight(150)
        self.undo_button = QPushButton("Undo round")
        self.undo_button.clicked.connect(self.undo_round)

        self.session_edit = QLineEdit(str(Path.home() / "napari-uga-sessions" / time.strftime("%Y%m%d-%H%M%S")))
        self.session_edit.setToolTip("Folder of the session (created at the first Compute)")
        self.save_button = QPushButton("Save session")
        self.save_button.clicked.connect(self.save_session)
        self.open_button = QPushButton("Open session…")
        self.open_button.clicked.connect(self._browse_session)
        session_row = QHBoxLayout()
        for button in (self.undo_button, self.save_button, self.open_button):
            session_row.addWidget(button)
        self.status = QLabel("Pick a slide and compute its uncertainty.")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        for title, inner in (("1 · Uncertainty", setup), ("2 · Annotate", patches)):
            layout.addWidget(_group(title, inner))
        training_box = QVBoxLayout()
        training_box.addWidget(self.training)
        training_box.addWidget(self.history)
        training_box.addWidget(self.measure_label)
        layout.addWidget(_group("3 · Fine-tune rounds", training_box))
        session_box = QVBoxLayout()
        session_box.addWidget(self.session_edit)
        session_box.addLayout(session_row)
        layout.addWidget(_group("Session", session_box))
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _refresh_layers(self, event=None) -> None:
        names = [
            layer.name for layer in self.viewer.layers if isinstance(layer, Image) and not layer.name.startswith("uga:")
        ]
        refill_combo(self.image_combo, names)

    def _update_controls(self) -> None:
        busy = self.worker is not None
        self.compute_button.setEnabled(not busy and self.maps_worker is None)
        self.maps_cancel.setEnabled(self.maps_worker is not None)
        self.propose_button.setEnabled(not busy and self.store is not None)
        for button in (self.prev_button, self.next_button):
            button.setEnabled(bool(self.proposals))
        self.submit_button.setEnabled(not busy and bool(self._unsubmitted()))
        self.undo_button.setEnabled(not busy and self.session is not None and self.session.current_round > 0)
        self.save_button.setEnabled(not busy and self.session is not None)
        self.open_button.setEnabled(not busy)
        for widget in (self.image_combo, self.model_edit, self.device_combo, self.samples_spin, self.mpp_spin):
            widget.setEnabled(not busy and self.session is None)
        for widget in (self.shift_combo, self.steps_spin):  # the running round's settings: changed after it, not during
            widget.setEnabled(not busy)
        position = self.session.queue_position if self.session else 0
        total = len(self.proposals)
        waiting = len(self._unsubmitted())
        self.counter.setText(f"patch {position + 1} / {total} · {waiting} to submit" if total else "no patches")

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    # -- 1 · uncertainty -----------------------------------------------------------
    def image_layer(self) -> Image:
        """The image layer the session works on."""
        name = self.image_name or self.image_combo.currentText()
        if name not in self.viewer.layers:
            raise InputError("pick an image layer first (open a slide or File > Open Sample > Camelyon demo slide)")
        return self.viewer.layers[name]

    def compute(self) -> None:
        """Start (or continue) the session and compute the maps tile by tile, the current view first."""
        try:
            layer = self.image_layer()
            if self.session is None:
                self._start_session(layer)
            self._start_maps()
        except InputError as exc:
            show_error(str(exc))
            self._set_status(f"Cannot compute: {exc}")

    def _mpp_override(self) -> float | None:
        return self.mpp_spin.value() or None

    def _start_session(self, layer: Image) -> None:
        """Create the session for ``layer``'s slide (by path; an in-memory image is saved as a pyramid)."""
        path = layer.metadata.get("path") or layer.source.path
        mpp = self._mpp_override() or layer.metadata.get("mpp")
        if path:
            with Slide(path, self._mpp_override()) as slide:
                mpp = slide.mpp
        else:
            data = level0(layer)
            if not isinstance(data, np.ndarray) or max(data.shape[:2]) > MAX_FLAT_SIDE:
                raise InputError(f"'{layer.name}' is not backed by a file: open the slide from its file instead")
        if mpp is None:
            raise InputError(
                f"'{layer.name}' has no µm/px in its metadata: enter the scanner's level-0 µm/px in the "
                "'µm / px' box (e.g. 0.25 for a 40x scan, 0.5 for 20x); it is never guessed"
            )
        folder = Path(self.session_edit.text()).expanduser()
        model_path = self.model_edit.text().strip() or None
        session = Session.create(folder, model_path, {"loop": self._loop_record()})
        if path:
            session.add_image(layer.name, path=path, mpp=self._mpp_override())
        else:
            session.add_image(layer.name, array=np.asarray(level0(layer)), mpp=mpp)
        self._adopt(session, layer.name)

    def _adopt(self, session: Session, name: str) -> None:
        if self.session is not None and self.session is not session:
            self.session.close()  # the session this dock worked on before: its lock and slides
        self.session = session
        self.image_name = name
        self.slide = session.slide(name)
        self.model = session.load_model(device=self.device_combo.currentText())
        self.origin = session.load_model(0, device=self.device_combo.currentText())  # the anchor's reference
        self.plan = self._plan()
        self.session_edit.setText(str(session.folder))
        self._show_measure()

    def _plan(self, saved: MapPlan | None = None) -> MapPlan:
        """The slide's map plan, its candidates the patches of the preset in use (New organ: quarter patches).

        ``saved``: the plan a round's maps were begun with; where it is the whole- or the quarter-patch
        plan it is kept, so switching presets never throws computed maps away.
        """
        chosen = None
        for subdivide in dict.fromkeys((self.config.subdivide, 1, 2)):  # each plan computed at most once
            plan = self._plan_of(subdivide)
            chosen = chosen or (subdivide, plan)  # the preset's, unless the saved plan is another
            if saved is None or plan == saved:
                chosen = (subdivide, plan)
                break
        subdivide, plan = chosen
        self.subdivide = subdivide  # sub-patches per patch of the Patches box: its square
        self.k_spin.setSuffix(f" × {subdivide**2} sub-patches" if subdivide > 1 else "")
        return plan

    def _plan_of(self, subdivide: int) -> MapPlan:
        patch_um = self.config.patch * REPLAY_MPP / subdivide  # µm, at the training tiles' scale
        return plan_maps(self.slide, self.model.config.input_mpp, patch_um)

    def _factor(self) -> float:
        """Working px per level-0 px (the corrections and self-labels are level-0 crops)."""
        return 1 / self.plan.scale

    def _start_maps(self) -> None:
        """Open (or start) the current round's store and compute what it lacks, the view first."""
        self.stop_maps()
        round_index = self.session.current_round
        folder, slide_print = round_store_path(self.session.folder, round_index), fingerprint(self.slide.path)
        self.plan = self._plan(MapStore.saved_plan(folder, slide_print))  # a new round: the preset in use
        store = MapStore.open_or_create(folder, self.plan, slide_print)
        older = [s for s in self.stores if s.folder.name < store.folder.name]  # round_NNN names sort by round
        self.stores = [store, *older][:2]  # an earlier round fills in what this one has not computed yet
        self.store = store
        survey = survey_boxes(self.slide, self.plan) if not store.candidates else []
        self.queue = TileQueue(store.pending(), survey, seed=round_index)
        self._show_maps()
        self._send_view()
        if not self.queue.remaining():
            self._maps_complete()
            return
        self.maps_token = CancelToken()
        samples, tta = map_sampling(self.samples_spin.value(), self.config.tta, self.config.predictor)
        mapper = TileMapper(self._predicting(round_index, self.model), self.slide, self.plan, samples, tta)
        worker = maps_worker(mapper, store, self.queue, self.maps_token, TRAIN_THREADS)
        worker.yielded.connect(self._on_tile)
        worker.errored.connect(self._failed)
        worker.finished.connect(lambda w=worker: self._maps_finished(w))
        self.maps_worker = worker
        self.maps_bar.setRange(0, self.queue.remaining())
        self.maps_bar.setValue(0)
        self._set_status(f"Computing round {round_index}'s maps: the view first, then the rest of the tissue…")
        self._update_controls()
        worker.start()

    def stop_maps(self) -> None:
        """Stop the background maps after the tile in progress (its tiles are kept in the store)."""
        self.maps_token.set()
        if self.maps_worker is not None:
            self.maps_worker.quit()

    def _maps_finished(self, worker) -> None:
        if self.maps_worker is worker:
            self.maps_worker = None
        if self._closing:  # the dock is going away: its widgets may already be deleted
            return
        self._refresh_maps(force=True)
        if self.store is not None and self.store.complete():
            self._maps_complete()
        self._update_controls()
        if self._propose_when_ready and self.store is not None and self.store.candidates:
            self.propose(zoom=False)

    def _maps_complete(self) -> None:
        self._score_round()
        self.maps_label.setText(f"all {len(self.plan.tiles)} tissue tiles of round {self.session.current_round} done")
        self._set_status(
            f"Uncertainty of round {self.session.current_round}: bright = the model is unsure. Propose patches next."
        )

    def _on_tile(self, progress: TileProgress) -> None:
        """A tile (or survey patch) arrived: progress, a throttled redraw, queued proposals."""
        self.last_progress = progress
        self.maps_bar.setRange(0, progress.total)
        self.maps_bar.setValue(progress.done)
        survey = f" · survey {progress.survey_left} patches left" if progress.survey_left else ""
        self.maps_label.setText(progress.message + survey)
        if self._in_view(progress.box):  # off-screen tiles need no redraw
            self._refresh_maps()
        self._tiles_since_rank += 1
        if self._propose_when_ready and progress.survey_left == 0 and self.store.candidates:
            self.propose(zoom=False)
        elif self.proposals and self._tiles_since_rank >= RERANK_EVERY:
            self._rerank()

    def _in_view(self, box: tuple[int, int, int, int]) -> bool:
        """Whether a working-scale box (y, x, h, w) overlaps what the camera shows."""
        y0, x0, y1, x1 = self._view_box()
        y, x, h, w = box
        return y < y1 and y + h > y0 and x < x1 and x + w > x0

    def _view_box(self) -> tuple[float, float, float, float]:
        """The working-scale box (y0, x0, y1, x1) on screen."""
        y0, x0, y1, x1 = view_box(self.viewer, self.image_layer())
        s = self.plan.scale
        return y0 / s, x0 / s, y1 / s, x1 / s

    def _refresh_maps(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_refresh < REFRESH_S:
            return
        self._last_refresh = now
        refresh_maps(self.viewer, self.store)

    def _send_view(self, event=None) -> None:
        """Tell the tile queue which working-scale box the camera shows."""
        if self.queue is None or self.plan is None:
            return
        self.queue.set_view(*self._view_box())

    def _map_place(self) -> dict:
        image = self.image_layer()
        scale = np.asarray(image.scale[-2:]) * self.plan.scale
        offset = (self.plan.scale - 1) / 2 * np.asarray(image.scale[-2:])  # a working pixel's centre in level-0 px
        return {"scale": tuple(scale), "translate": tuple(np.asarray(image.translate[-2:]) + offset)}

    def _show_maps(self) -> None:
        show_maps(self.viewer, self.stores, self._map_place())
        self.viewer.layers.selection.active = self.image_layer()

    def _score_round(self) -> None:
        """Dice against a loaded ground-truth labels layer (the demo), stored with the round."""
        if TRUTH_NAME not in self.viewer.layers or self.store is None:
            return
        h, w = self.plan.shape
        truth_layer = self.viewer.layers[TRUTH_NAME]
        truth = truth_layer.data[0] if truth_layer.multiscale else truth_layer.data
        if h * w > SCORE_MAX_PIXELS or tuple(truth.shape[:2]) != tuple(self.slide.shape):
            return
        prediction = np.asarray(MapView(self.stores[:1], "probability", 0, threshold=128)[:, :])
        rows = np.minimum(((np.arange(h) + 0.5) * self.plan.scale).astype(int), truth.shape[0] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * self.plan.scale).astype(int), truth.shape[1] - 1)
        truth = np.asarray(truth)[np.ix_(rows, cols)] > 0
        current = self.session.rounds[self.session.current_round]
        current.metrics["dice_truth"] = dice(prediction, truth)
        self._save(self.session.save)
        self._fill_history()

    # -- 2 · proposals and corrections -----------------------------------------------
    def propose(self, zoom: bool = True) -> None:
        """Rank the scored candidate patches of the whole slide (those computed so far) and show the queue.

        Before the survey of candidates has ended, the queue is shown as soon as it has, without
        moving the camera (the user may be looking elsewhere by then).
        """
        if self.store is None:
            show_error("compute the uncertainty first")
            return
        survey_running = self.queue is not None and self.queue.survey_left() > 0 and self.maps_worker is not None
        if not self.store.candidates or survey_running:
            self._propose_when_ready = self.maps_worker is not None
            if self._propose_when_ready:
                self._set_status("Scoring candidate patches across the slide; the queue appears as soon as they are.")
            else:
                show_info("no tissue patch scored yet: compute the uncertainty first")
            return
        self._propose_when_ready = False
        picks = self._rank([])
        if not picks:
            show_info("no tissue patch left to propose")
            return
        self._save(lambda: self.session.set_queue(picks))
        self._show_queue(picks)
        self.go_to(0, zoom=zoom)
        if not zoom:
            self._set_status(
                f"{len(picks)} patches proposed across the slide{_audits_said(picks)} (the first outlined in white); "
                "◀ Prev / Next ▶ walk the queue."
            )

    def _rank(self, keep: list[Proposal]) -> list[Proposal]:
        """The queue's new patches: the most uncertain ones, and audit patches drawn at random from the tissue."""
        done = [Box(a["image"], a["y"], a["x"], a["h"], a["w"]) for a in self.session.annotations]
        self._tiles_since_rank = 0
        k = self.k_spin.value() * self.subdivide**2
        n_proposed, n_audit = batch_split(k, self.audit_spin.value(), self.subdivide)
        kept_audits = sum(p.audit for p in keep)
        audits_wanted = n_audit - kept_audits
        taken = [*done, *(p.box for p in keep)]
        seed = len(self.session.annotations) + 7919 * self.session.current_round
        strategy = self.strategy_combo.currentText()
        audits = self._draw_audits(audits_wanted, taken, seed)  # first: a uniform sample of the tissue left
        picks = select(
            self.store.candidates,
            max(0, n_proposed - (len(keep) - kept_audits)),
            [*taken, *(a.box for a in audits)],
            strategy,
            np.random.default_rng(seed),
            diversity_for(strategy, self.config.diversity),
            self._known() if strategy == "expected_error" else (),
            annotated=len(done),  # the queue's kept patches are not corrections yet
        )
        if not audits:
            return picks
        rng = np.random.default_rng(seed)
        for audit in audits:  # anywhere in the queue, so an audit is corrected like any other patch
            picks.insert(int(rng.integers(0, len(picks) + 1)), audit)
        return [replace(p, rank=i + 1) for i, p in enumerate(picks)]

    def _draw_audits(self, n: int, taken: list[Box], seed: int) -> list[Proposal]:
        """``n`` audit patches drawn at random from the tissue clear of ``taken`` (quarter patches at least)."""
        if n <= 0:
            return []
        side = self.plan.patch * self.subdivide // audit_subdivide(self.subdivide)
        boxes = random_tissue_boxes(self.slide, self.plan, n, seed, taken, side, grid=True)
        return [Proposal(**vars(b), audit=True, reason="audit: drawn at random from the tissue") for b in boxes]

    def _known(self) -> list[tuple[np.ndarray, bool]]:
        """Each correction as ``expected_error`` reads it: the nearest scored patch's features, and tumour or not."""
        out = []
        for a in self.session.annotations:
            near = nearest_candidate(self.store.candidates, Box(a["image"], a["y"], a["x"], a["h"], a["w"]))
            if near is not None:
                out.append((near.features, holds_tumour(read_mask(self.session.folder / a["file"]))))
        return out

    def _rerank(self) -> None:
        """New tiles arrived: re-rank the queue's unopened patches (opened and current ones stay)."""
        keep = [
            p for p in self.proposals if p.audit or p.box in self.drafts or p.box == self.current or self._annotated(p)
        ]
        fresh = self._rank(keep)
        merged = [*keep, *fresh]
        picks = [Proposal(**{**p.as_dict(), "rank": i + 1}) for i, p in enumerate(merged)]
        if [p.box for p in picks] == [p.box for p in self.proposals]:
            return
        position = next((i for i, p in enumerate(picks) if p.box == self.current), 0)
        self.session.queue = [p.as_dict() for p in picks]
        self.session.queue_position = position
        self._save(self.session.save)
        self._show_queue(picks)
        self._color_queue()

    def _show_queue(self, picks: list[Proposal]) -> None:
        self.proposals = picks
        rects = [np.array([[p.y, p.x], [p.y + p.h, p.x + p.w]], float) for p in picks]
        image = self.image_layer()
        layer = upsert(
            self.viewer, Shapes, PROPOSALS, rects, shape_type="rectangle", edge_width=max(2, picks[0].h // 40),
            face_color="transparent", edge_color=QUEUED_EDGE,
            features={"rank": [i + 1 for i in range(len(picks))], "why": [queue_label(p) for p in picks]},
            text={"string": "#{rank}  {why}", "color": "white", "size": 10, "anchor": "upper_left"},
            scale=image.scale, translate=image.translate,
        )  # fmt: skip
        annotation = self._annotation_layer()
        for target in (layer, annotation):
            target.bind_key(NEXT_KEY, lambda _layer: self.next_patch(), overwrite=True)
            target.bind_key(PREVIOUS_KEY, lambda _layer: self.previous_patch(), overwrite=True)
        self._update_controls()

    def _annotation_layer(self) -> Labels:
        """The correction layer: one patch-sized labels array placed at the current patch."""
        if ANNOTATION not in self.viewer.layers:
            image = self.image_layer()
            layer = self.viewer.add_labels(
                np.zeros((1, 1), np.uint8),
                name=ANNOTATION,
                opacity=0.45,
                colormap=one_color(ANNOTATION_COLOR),
                scale=image.scale,
                translate=image.translate,
            )
            layer.brush_size = 12
        return self.viewer.layers[ANNOTATION]

    def _keep_draft(self) -> None:
        """Copy the correction layer back into the current patch's draft."""
        if self.current is not None and ANNOTATION in self.viewer.layers and not self._annotated(self.current):
            data = np.asarray(self.viewer.layers[ANNOTATION].data)
            if data.shape == (self.current.h, self.current.w):
                self.drafts[self.current] = (data > 0).astype(np.uint8)

    def _initial_mask(self, box: Box) -> np.ndarray:
        """A patch's mask: its draft, its submitted correction, else the prediction (level-0 size)."""
        if box in self.drafts:
            return self.drafts[box]
        for a in self.session.annotations:
            if (a["y"], a["x"], a["h"], a["w"]) == (box.y, box.x, box.h, box.w):
                return read_mask(self.session.folder / a["file"])
        wy, wx, wh, ww = self.plan.to_working(box)
        probability = MapView(self.stores, "probability", 0, threshold=128)[wy : wy + wh, wx : wx + ww]
        rows = np.clip(((np.arange(box.h) + 0.5) / self.plan.scale).astype(int), 0, probability.shape[0] - 1)
        cols = np.clip(((np.arange(box.w) + 0.5) / self.plan.scale).astype(int), 0, probability.shape[1] - 1)
        mask = probability[np.ix_(rows, cols)].astype(np.uint8)
        self.drafts[box] = mask
        return mask

    def go_to(self, index: int, zoom: bool = True) -> None:
        """Make queue entry ``index`` current: zoom to it and load its correction (pre-filled with the prediction)."""
        if not self.proposals:
            return
        self._keep_draft()
        index %= len(self.proposals)
        self.session.queue_position = index
        self._save(self.session.save)
        patch = self.proposals[index]
        self.current = patch.box
        annotation = self._annotation_layer()
        image = self.image_layer()
        annotation.data = self._initial_mask(patch.box).copy()
        annotation.translate = tuple(
            np.asarray(image.translate[-2:]) + np.asarray(image.scale[-2:]) * (patch.y, patch.x)
        )
        self._color_queue()
        if zoom:
            zoom_to_box(self.viewer, image, patch)
            annotation.selected_label = 1
            annotation.mode = "paint"
            self.viewer.layers.selection.active = annotation
        self._set_status(
            f"Patch {index + 1}: {patch.reason or f'uncertainty {patch.score:.3f} (the most uncertain first)'}"
        )
        self._update_controls()

    def _color_queue(self) -> None:
        """Current patch white, submitted ones green, the rest yellow."""
        position = self.session.queue_position
        colors = [
            CURRENT_EDGE if i == position else DONE_EDGE if self._annotated(p) else QUEUED_EDGE
            for i, p in enumerate(self.proposals)
        ]
        self.viewer.layers[PROPOSALS].edge_color = colors

    def _annotated(self, box: Box) -> bool:
        return any((a["y"], a["x"], a["h"], a["w"]) == (box.y, box.x, box.h, box.w) for a in self.session.annotations)

    def _unsubmitted(self) -> list[Box]:
        current = (
            [self.current] if self.current is not None and self.session and not self._annotated(self.current) else []
        )
        return list(dict.fromkeys([*self.drafts, *current]))

    def next_patch(self) -> None:
        """Go to the next patch of the queue (wraps around)."""
        if self.session is not None:
            self.go_to(self.session.queue_position + 1)

    def previous_patch(self) -> None:
        """Go to the previous patch of the queue (wraps around)."""
        if self.session is not None:
            self.go_to(self.session.queue_position - 1)

    # -- 3 · submit and fine-tune ----------------------------------------------------
    def submit(self) -> None:
        """Save the corrected patches to the session at once, then fine-tune in a worker."""
        if self.worker is not None:
            return
        self._keep_draft()
        boxes = [b for b in self.drafts if not self._annotated(b)]
        if not boxes:
            return
        audit_boxes = {p.box for p in self.proposals if p.audit}
        try:
            ids = self.session.add_annotations(
                boxes, [self.drafts[b] for b in boxes], [b in audit_boxes for b in boxes]
            )
        except SessionWriteError as exc:  # a full or read-only disk: nothing was saved, nothing is lost
            show_error(f"{exc}. Your {len(boxes)} corrections are kept here: free the disk and Submit again.")
            self._set_status(f"Not saved: {exc}. The corrections wait in the dock; Submit retries.")
            return
        self.drafts = {}
        self._color_queue()
        self.stop_maps()  # the fine-tune gets the cores; the maps resume with the new round
        self._start_finetune(ids)

    def _shift(self) -> str:
        return list(SHIFT_LABELS)[self.shift_combo.currentIndex()]

    def _preset(self) -> str:
        """The preset in use: the one picked, or what ``auto`` chose (``centre`` until it has)."""
        shift = self._shift()
        return (self.chosen_shift or "centre") if shift == "auto" else shift

    def _loop_record(self) -> dict:
        """The loop settings as saved in the session (a copy with the boxes' values and the domain-shift preset)."""
        boxes = {"steps": self.steps_spin.value(), "samples": self.samples_spin.value(), "batch": self.k_spin.value()}
        measure = {"audit_share": self.audit_spin.value(), "auto_rollback": self.rollback_check.isChecked()}
        chosen = {"chosen_shift": self.chosen_shift} if self._shift() == "auto" else {}
        strategy = {"strategy": self.strategy_combo.currentText()}
        return {**vars(self.config), **boxes, **measure, **strategy, "shift": self._shift(), **chosen}

    def _shift_picked(self) -> None:
        """A domain shift picked in the box: its preset's settings and proposal rule (change either after)."""
        self._shift_changed()
        self.strategy_combo.setCurrentText(default_strategy(self._shift()))

    def _shift_changed(self) -> None:
        """Apply the preset of the chosen domain shift (the steps box shows its steps; edit it after)."""
        self.config = self._config_of(self._preset())
        self.steps_spin.setValue(self.config.steps)

    def _config_of(self, shift: str):
        """A preset's settings with the dock's samples, batch and patch."""
        return config_for(shift, samples=self.config.samples, batch=self.config.batch, patch=self.config.patch)

    def _edited_steps(self) -> int | None:
        """The steps box's value where the user changed it from what the preset in use shows, else ``None``."""
        value = self.steps_spin.value()
        return None if value == config_for(self._preset()).steps else value

    def _restore_loop(self, record: dict) -> None:
        """All loop settings of a reopened session (the preset's where the record is unreadable)."""
        try:
            config, shift = config_from_record(record), record.get("shift", "centre")
        except InputError as exc:
            show_error(f"{exc}; using the preset's settings")
            shift = self._shift()
            config = config_for(self._preset())
        chosen = record.get("chosen_shift")
        self.chosen_shift = chosen if shift == "auto" and chosen in SHIFT_LABELS else None
        self.shift_combo.setCurrentIndex(list(SHIFT_LABELS).index(shift))  # applies the preset first
        if isinstance(record.get("audit_share"), int | float) and 0 <= record["audit_share"] <= 0.9:
            self.audit_spin.setValue(record["audit_share"])
        self.rollback_check.setChecked(record.get("auto_rollback", True) is not False)
        if record.get("strategy") in STRATEGIES:
            self.strategy_combo.setCurrentText(record["strategy"])
        self.config = config
        self.steps_spin.setValue(config.steps)
        self.samples_spin.setValue(config.samples)
        self.k_spin.setValue(config.batch)

    def _start_finetune(self, new_ids: list[int]) -> None:
        """Score the new corrections against the rounds, apply do-no-harm, then fine-tune (one worker)."""
        self.config.steps = self.steps_spin.value()
        self.session.config["loop"] = self._loop_record()
        self.token = CancelToken()
        held_ids = self.session.held_out_ids()
        scored_ids = [*new_ids, *(i for i in held_ids if i not in new_ids)]
        held = [i for i in scored_ids if i in held_ids]  # in the order they are scored
        loaded = dict(zip((a["id"] for a in self.session.annotations), self.session.load_annotations(), strict=True))
        batch = [loaded[i] for i in scored_ids]  # the new corrections, and every audit no round trained on
        annotations = [loaded[i] for i in self.session.training_ids()]
        held_boxes = [loaded[i].box for i in held_ids]
        current = self.session.current_round
        previous = current - 1 if current > 0 else None
        models = {current: self.model, 0: self.origin}
        if previous is not None:
            models[previous] = self.session.load_model(previous, device=self.device_combo.currentText())
        predictors = {index: self._predicting(index, model) for index, model in models.items()}
        predictor = self.config.predictor  # what the scores are made under (``auto`` may change the preset after)
        known = self.session.known_scores(scored_ids, predictor)
        if self._shift() == "auto" and self.chosen_shift is None:
            steps = self._edited_steps()
            edited = {} if steps is None else {"steps": steps}
            configs = {s: replace(self.config, **{**SHIFTS[s], **edited}) for s in SHIFTS}
        else:
            configs = {self._preset(): self.config}
        tune = None if not self.session.pending_ids() else partial(
            finetune_events, annotations=annotations, factor=self._factor(), seed=len(self.session.annotations),
            cancel=self.token, threads=TRAIN_THREADS, origin=self.origin,
            self_label_boxes=[b for b in self._self_label_boxes() if not any(b.overlaps(h) for h in held_boxes)],
            read_patch=self.session.read_patch,
        )  # fmt: skip
        worker = submit_worker(
            batch, models, current, previous, self.rollback_check.isChecked(), configs, self._factor(), tune,
            partial(self._read_patches, self._gate_boxes() if len(configs) > 1 else []),
            predictors, prediction_tta(predictor), [i in held for i in scored_ids], known,
        )  # fmt: skip
        worker.yielded.connect(self.training.on_event)
        worker.returned.connect(lambda outcome: self._submitted(outcome, scored_ids, held, predictor))
        self.training.begin(self.config.steps, self._tuning_said(len(annotations) if tune else 0, len(held_ids)))
        then = "then fine-tuning" if tune else "no new correction to train on (audits only)"
        self._run(worker, f"Saved {len(new_ids)} patches to {self.session.folder}; scoring them, {then}.")

    def _tuning_said(self, trained: int, held: int) -> str:
        """What the training box says while a round runs: what it trains on, and the audits it leaves out."""
        shares = {"replay": self.config.replay_share, "self-labels": self.config.self_share}
        memory = [name for name, share in shares.items() if share > 0]
        extra = f" (+ {', '.join(memory)})" if memory else ""
        kept = f"; {held} audit patches held out to measure it" if held else ""
        return f"Fine-tuning on {trained} patches{extra}{kept}…" if trained else f"Scoring {held} audit patches…"

    def _run(self, worker, message: str) -> None:
        self.worker = worker
        worker.errored.connect(self._failed)
        worker.finished.connect(self._worker_done)
        self._set_status(message)
        self._update_controls()
        worker.start()

    def _worker_done(self) -> None:
        """The fine-tune ended (returned, failed or cancelled): re-enable, then run any follow-up."""
        self.worker = None
        follow_up, self._follow_up = self._follow_up, None
        self._update_controls()
        if follow_up is not None:
            follow_up()
        elif self.maps_worker is None and self.store is not None and not self.store.complete():
            self._start_maps()  # cancelled or failed: the same round's maps continue

    def _failed(self, exc: Exception) -> None:
        """A worker raised: notify (napari 0.9 does not relay worker errors itself), keep the session."""
        LOG.error("UGA worker failed", exc_info=exc)
        show_error(f"UGA: {exc}")
        self.training.end(f"Failed: {exc}")
        self._set_status(f"Failed: {exc}. The session is unchanged.")

    def _predicting(self, index: int, model):
        """The network round ``index`` (whose model is ``model``) predicts with, by the preset's predictor."""
        tuned_parent = index >= 2 and "soup" in self.config.predictor  # a round's parent is the round before it
        parent = self.session.load_model(index - 1, device=self.device_combo.currentText()) if tuned_parent else None
        return predicting_network(model, parent, self.config.predictor)

    def _self_label_boxes(self) -> list[Box]:
        """Up to ``SELF_LABEL_PATCHES`` scored tissue patches spread over the slide (for the self-labels)."""
        if self.store is None or self.config.self_share <= 0:
            return []
        boxes = sorted(dict.fromkeys(c.box for c in self.store.candidates), key=lambda b: (b.y, b.x))
        return spread(boxes, SELF_LABEL_PATCHES)

    def _gate_boxes(self) -> list[Box]:
        """Up to ``GATE_PATCHES`` patches drawn at random from the slide's tissue: what ``auto``'s gate reads."""
        return random_tissue_boxes(self.slide, self.plan, GATE_PATCHES, seed=0)

    def _read_patches(self, boxes: list[Box]) -> list[np.ndarray]:
        """The slide's pixels of ``boxes`` (run in a worker)."""
        return [self.session.read_patch(box) for box in boxes]

    def _submitted(self, outcome: SubmitOutcome, scored_ids: list[int], held_ids: list[int], predictor: str) -> None:
        """Store the batch's scores, apply the do-no-harm verdict and ``auto``'s choice, then record the round.

        ``scored_ids``: the corrections the rounds were scored on, in order; ``held_ids``: the held-out audits
        among them, which the tuned round was scored on too; ``predictor``: what the scores were made under."""
        by_id = {i: {r: scores[k] for r, scores in outcome.scores.items()} for k, i in enumerate(scored_ids)}
        if outcome.comparison is not None:
            self.session.config["changes"] = [*self.session.config.get("changes", []), outcome.comparison.delta]
        if outcome.shift is not None:
            edited = self._edited_steps()
            self.chosen_shift = outcome.shift
            self._shift_changed()  # the preset ``auto`` chose, from now on (steps the user set stay)
            if edited is not None:
                self.steps_spin.setValue(edited)
            tissue = {True: "unlike", False: "like"}.get(outcome.new_tissue)
            gate = "" if tissue is None else f"; the slide's tissue is {tissue} the model's training tissue"
            show_info(
                f"Domain shift: {SHIFT_LABELS[outcome.shift]} (round 0 scored Dice {batch_dice(outcome)} on your "
                f"first batch{gate}); its preset trains this round."
            )
        self.session.config["loop"] = self._loop_record()
        if not self._save(lambda: self.session.record_scores(by_id, predictor)):
            return
        if outcome.harm:
            verdict, back_to = rollback_said(outcome.harm), outcome.harm[-1][1]
            if outcome.rolled_back:
                if not self._save(lambda: self.session.rollback(back_to)):  # its retrained round is not recorded
                    self.training.end("Not saved: the rollback could not be written; your corrections are kept.")
                    return
                self.model = outcome.start
                self.notice = (
                    f"Do no harm: {verdict} on your new corrections and the audit patches, so it was rolled back to "
                    f"round {back_to}."
                )
            else:
                self.notice = (
                    f"{verdict} on your new corrections and audits: Undo round goes back towards round {back_to}."
                )
            show_warning(self.notice)
        self._show_measure()
        self._finetuned(outcome, held_ids)

    def _finetuned(self, outcome: SubmitOutcome, held_ids: list[int]) -> None:
        """Record the tuned round and its scores on the held-out audits (its estimate, at once)."""
        result = outcome.result
        if not outcome.tuned:
            self.training.end("Scored; no new correction to train on (audit patches are never trained on).")
            self._set_status("Your audit patches are scored and saved; submit a batch with proposed patches to train.")
            return
        if result is None:
            self.training.end("Cancelled; the model is unchanged.")
            self._set_status("Fine-tuning cancelled. Your annotations are saved and wait for the next round.")
            return
        if outcome.new_harm and self.rollback_check.isChecked():
            self._not_kept(outcome)
            return
        loss = float(np.mean(result.losses[-5:])) if result.losses else None
        pending = self.session.pending_ids()
        if not self._save(lambda: self.session.record_round(result.model, pending, loss, settings=self._loop_record())):
            self.training.end("Trained, but the round could not be saved; your corrections wait for the next Submit.")
            return
        self.model = result.model
        index = self.session.current_round
        if outcome.held_out_scores:  # empty where scoring them failed: the next Submit scores the round on them
            scores = {i: {index: score} for i, score in zip(held_ids, outcome.held_out_scores, strict=True)}
            self._save(lambda: self.session.record_scores(scores, outcome.predictor))
        self.training.end(f"Round {index} done · loss {loss:.3f}")
        if outcome.new_harm:  # the rollback is a suggestion only
            self.notice = f"{rollback_said(outcome.new_harm)} on the audit patches: Undo round goes back."
            show_warning(self.notice)
        self._show_measure()
        self._follow_up = self._start_maps

    def _not_kept(self, outcome: SubmitOutcome) -> None:
        """Do no harm on the audits: the tuned round scored below its start or round 0 on them; it is dropped."""
        back = outcome.kept_after
        if back != self.session.current_round and self._save(lambda: self.session.rollback(back)):
            self.model = self.session.load_model(back, device=self.device_combo.currentText())
            self._follow_up = self._start_maps
        self.notice = (
            f"Do no harm: the newly trained round was not kept ({rollback_said(outcome.new_harm)} on the audit "
            f"patches, which no round trains on); round {self.session.current_round} stays in use, and your "
            "corrections wait for the next Submit."
        )
        show_warning(self.notice)
        self.training.end("Trained, but not kept: it scored worse on the audit patches.")
        self._show_measure()

    def cancel(self) -> None:
        """Stop a running fine-tune at its next step (nothing half-trained is kept).

        Only the token: the worker then returns normally, so the batch's scores are still saved
        (a worker told to quit would drop its return value).
        """
        self.token.set()

    def shutdown(self, timeout_ms: int = 5000) -> None:
        """Stop the fine-tune and the maps, wait for both, and release the session (called when the dock closes)."""
        maps = self.maps_worker
        self._closing = True
        self.stop_maps()
        super().shutdown(timeout_ms)
        if maps is not None:
            maps.await_workers(timeout_ms)
        if self.session is not None:
            self.session.close()  # its slides and the folder's lock (another process may open it now)

    def _save(self, write) -> bool:
        """Run a session write; a full or read-only disk becomes one line (nothing was changed)."""
        try:
            write()
        except SessionWriteError as exc:
            show_error(str(exc))
            self._set_status(f"Not saved: {exc}")
            return False
        return True

    # -- session -------------------------------------------------------------------
    def undo_round(self) -> None:
        """Roll back to the previous round's model and show its maps (kept in its store)."""
        if self.session is None or self.session.current_round == 0:
            return
        if not self._save(self.session.rollback):
            return
        self.model = self.session.load_model(device=self.device_combo.currentText())
        self._fill_history()
        self._start_maps()

    def save_session(self) -> None:
        """Write the session record with the dock's loop settings (annotations and checkpoints are already on disk)."""
        if self.session is None:
            return
        self.session.config["loop"] = self._loop_record()
        if self._save(self.session.save):
            show_info(f"session saved to {self.session.folder}")

    def open_session(self, folder: str | Path, relocate: dict[str, str] | None = None) -> None:
        """Reopen a session: slide, model round, annotations, queue, position and maps.

        A slide that moved is asked for (``relocate`` gives it without a dialog).
        """
        try:
            session = Session.open(folder, relocate)
        except SlideMissingError as exc:
            show_error(str(exc))
            found, _ = QFileDialog.getOpenFileName(self, f"Locate the slide '{exc.name}'", str(exc.path.parent))
            if found:
                self.open_session(folder, {**(relocate or {}), exc.name: found})
            return
        except InputError as exc:
            show_error(str(exc))
            return
        if not session.images:
            show_error(f"{folder}: the session has no image yet")
            return
        name = next(iter(session.images))
        if name not in self.viewer.layers:
            from .._reader import read_one

            data, meta, _ = read_one(session.image_path(name), session.images[name].get("mpp"))
            self.viewer.add_image(data, **{**meta, "name": name})
        self._adopt(session, name)
        self._restore_loop(session.config.get("loop", {}))
        self.drafts, self.current = {}, None
        self.proposals = session.queue_proposals()
        self._start_maps()
        if self.proposals:
            self._show_queue(self.proposals)
            self.go_to(session.queue_position)
        self._update_controls()

    def _fill_history(self) -> None:
        rows = history_rows(self.session)
        self.history.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for col, text in enumerate(cells):
                self.history.setItem(row, col, QTableWidgetItem(text))

    def measure_text(self) -> str:
        """What the session knows of the model from the corrections (:func:`._measure.measure_text`)."""
        return measure_text(self.session, self.target_spin.value() or None)

    def _show_measure(self) -> None:
        if self.session is not None:
            self.measure_label.setText(self.measure_text())
            self._fill_history()

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model weights", "", "Weights (*.safetensors)")
        if path:
            self.model_edit.setText(path)

    def _browse_session(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a napari-uga session folder")
        if folder:
            self.open_session(folder)


def _spin(low: int, high: int, value: int, tip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


def _group(title: str, layout) -> QGroupBox:
    box = QGroupBox(title)
    box.setLayout(layout)
    return box
