"""The "UGA annotation" dock: uncertainty overlay, patch queue, corrections and background fine-tuning.

The widget only wires napari layers to the core: maps come from
:func:`~napari_uga.uncertainty.compute_uncertainty`, proposals from
:func:`~napari_uga.selection.select`, fine-tuning from :func:`~napari_uga.loop.finetune`, and
all state from a :class:`~napari_uga.session.Session` folder (layers are views of it).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.colormaps import Colormap, DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from .._sample_data import TRUTH_NAME
from ..io import InputError
from ..loop import config_for, config_from_record
from ..metrics import dice
from ..models import working_factor
from ..selection import Box, Proposal, select
from ..session import Session
from ..training import CancelToken
from ._common import WorkerDock, follow_layers, refill_combo, zoom_to_box
from ._workers import MapsResult, finetune_worker, maps_worker
from .training import TrainingWidget

if TYPE_CHECKING:
    import napari

LOG = logging.getLogger(__name__)
PROBABILITY = "uga: probability"
UNCERTAINTY = "uga: uncertainty"
PREDICTION = "uga: prediction"
PROPOSALS = "uga: proposals"
ANNOTATION = "uga: annotation"
CURRENT_EDGE = "#ffffff"
QUEUED_EDGE = "#ffd400"
DONE_EDGE = "#7cfc00"
PREDICTION_COLOR = "#00e5ff"
SHIFT_LABELS = {"centre": "new centre / scanner (same tissue)", "organ": "new organ / tissue"}
ANNOTATION_COLOR = "#39ff14"
NEXT_KEY, PREVIOUS_KEY = "n", "Shift-N"
TRAIN_THREADS = max(1, (os.cpu_count() or 2) - 1)  # leave a core to the UI (see benchmarks/ui_stall.py)
SELF_LABEL_PATCHES = 24  # unlabelled tissue patches of the image that the starting model labels for fine-tuning


def uncertainty_colormap() -> Colormap:
    """Inferno with transparency that rises with the value, so certain areas leave the H&E visible."""
    from matplotlib import colormaps

    t = np.linspace(0, 1, 64)
    colors = colormaps["inferno"](0.15 + 0.85 * t)
    colors[:, 3] = np.clip(t * 1.6, 0, 1)
    return Colormap(colors, name="uga inferno", controls=t)


def uncertainty_limits(values: np.ndarray) -> tuple[float, float]:
    """Contrast from the median to the 99.5th percentile of the tissue (non-zero) pixels: the top half glows.

    A flat map (spread under 5 % of its level, e.g. an untrained model) is shown from zero instead.
    """
    tissue = values[values > 0]
    if tissue.size == 0:
        return 0.0, 1e-3
    low, high = np.percentile(tissue, [50, 99.5])
    if high - low < 0.05 * high:
        low = 0.0
    return float(low), float(max(high, low + 1e-3))


def level0(layer: Image):
    """Full-resolution data of an image layer (level 0 of a multiscale layer)."""
    return layer.data[0] if layer.multiscale else layer.data


class AnnotateWidget(WorkerDock):
    """Dock widget driving one uncertainty-guided annotation session on an image layer."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: Session | None = None
        self.image_name: str | None = None
        self.model = None
        self.origin = None  # the session's round-0 model: the fine-tuning anchor pulls towards it
        self.result: MapsResult | None = None
        self.proposals: list[Proposal] = []
        self.opened: set[int] = set()
        self.worker = None
        self._follow_up = None
        self.token = CancelToken()
        self.config = config_for("centre")
        self._build()
        follow_layers(self.viewer, self._refresh_layers)
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
        self.samples_spin = _spin(1, 64, self.config.samples, "MC-dropout samples per tile")
        self.compute_button = QPushButton("Compute uncertainty")
        self.compute_button.clicked.connect(self.compute)
        setup = QFormLayout()
        setup.addRow("Image", self.image_combo)
        setup.addRow("Model", model_row)
        setup.addRow("Device", self.device_combo)
        setup.addRow("MC samples", self.samples_spin)
        setup.addRow(self.compute_button)

        self.k_spin = _spin(1, 50, self.config.batch, "How many patches to propose")
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
            "training tiles and of the starting model's own labels elsewhere in this image. "
            "New organ: batch-norm statistics adapt, more steps, no replay."
        )
        self.shift_combo.currentIndexChanged.connect(self._shift_changed)
        self.steps_spin = _spin(1, 2000, self.config.steps, "Fine-tuning steps per round")
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
        patches.addRow("Domain shift", self.shift_combo)
        patches.addRow("Steps", self.steps_spin)
        patches.addRow(self.submit_button)

        self.training = TrainingWidget()
        self.training.cancel_requested.connect(self.cancel)
        self.history = QTableWidget(0, 4)
        self.history.setHorizontalHeaderLabels(["Round", "Patches", "Loss", "Dice"])
        self.history.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.history.verticalHeader().setVisible(False)
        self.history.setToolTip(f"Dice of the prediction against a '{TRUTH_NAME}' labels layer, when one is loaded")
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
        self.status = QLabel("Pick an image and compute its uncertainty.")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        for title, inner in (("1 · Uncertainty", setup), ("2 · Annotate", patches)):
            layout.addWidget(_group(title, inner))
        training_box = QVBoxLayout()
        training_box.addWidget(self.training)
        training_box.addWidget(self.history)
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
        has_maps = self.result is not None
        self.compute_button.setEnabled(not busy)
        self.propose_button.setEnabled(not busy and has_maps)
        for button in (self.prev_button, self.next_button):
            button.setEnabled(bool(self.proposals))
        self.submit_button.setEnabled(not busy and bool(self.opened))
        self.undo_button.setEnabled(not busy and self.session is not None and self.session.current_round > 0)
        self.save_button.setEnabled(not busy and self.session is not None)
        self.open_button.setEnabled(not busy)
        for widget in (self.image_combo, self.model_edit, self.device_combo, self.samples_spin):
            widget.setEnabled(not busy and self.session is None)
        position = self.session.queue_position if self.session else 0
        total = len(self.proposals)
        waiting = len(self.opened)
        self.counter.setText(f"patch {position + 1} / {total} · {waiting} to submit" if total else "no patches")

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    # -- 1 · uncertainty -----------------------------------------------------------
    def image_layer(self) -> Image:
        """The image layer the session works on."""
        name = self.image_name or self.image_combo.currentText()
        if name not in self.viewer.layers:
            raise InputError("pick an image layer first (open an image or File > Open Sample > Camelyon demo slide)")
        return self.viewer.layers[name]

    def compute(self) -> None:
        """Start (or continue) the session and compute the uncertainty maps in a worker."""
        try:
            layer = self.image_layer()
            if self.session is None:
                self._start_session(layer)
        except InputError as exc:
            show_error(str(exc))
            return
        self._start_maps()

    def _start_session(self, layer: Image) -> None:
        folder = Path(self.session_edit.text()).expanduser()
        model_path = self.model_edit.text().strip() or None
        session = Session.create(folder, model_path, {"loop": self._loop_record()})
        source = layer.source.path
        if source:
            session.add_image(layer.name, path=source, mpp=layer.metadata.get("mpp"))
        else:
            session.add_image(layer.name, array=np.asarray(level0(layer)), mpp=layer.metadata.get("mpp"))
        self._adopt(session, layer.name)

    def _adopt(self, session: Session, name: str) -> None:
        self.session = session
        self.image_name = name
        self.model = session.load_model(device=self.device_combo.currentText())
        self.origin = session.load_model(0, device=self.device_combo.currentText())  # the anchor's reference
        self.session_edit.setText(str(session.folder))
        self._fill_history()

    def _factor(self) -> float:
        return working_factor(self.model, self.session.images[self.image_name].get("mpp"))

    def _start_maps(self) -> None:
        layer = self.image_layer()
        worker = maps_worker(
            self.model, layer.name, level0(layer), self.samples_spin.value(), self._factor(), self.config
        )
        worker.returned.connect(self._show_maps)
        self._run(worker, f"Computing uncertainty with the round {self.session.current_round} model…")

    def _run(self, worker, message: str) -> None:
        self.worker = worker
        worker.errored.connect(self._failed)
        worker.finished.connect(self._worker_done)
        self._set_status(message)
        self._update_controls()
        worker.start()

    def _worker_done(self) -> None:
        """A worker ended (returned, failed or cancelled): re-enable, then run any follow-up."""
        self.worker = None
        follow_up, self._follow_up = self._follow_up, None
        self._update_controls()
        if follow_up is not None:
            follow_up()

    def _failed(self, exc: Exception) -> None:
        """A worker raised: notify (napari 0.9 does not relay worker errors itself), keep the session."""
        LOG.error("UGA worker failed", exc_info=exc)
        show_error(f"UGA: {exc}")
        self.training.end(f"Failed: {exc}")
        self._set_status(f"Failed: {exc}. The session is unchanged.")

    def _show_maps(self, result: MapsResult) -> None:
        self.result = result
        maps = result.maps
        image = self.image_layer()
        place = {"scale": image.scale, "translate": image.translate}
        limits = uncertainty_limits(maps.entropy)
        _upsert(
            self.viewer,
            Image,
            PROBABILITY,
            maps.probability,
            colormap="viridis",
            contrast_limits=(0, 1),
            opacity=0.5,
            visible=False,
            **place,
        )
        _upsert(
            self.viewer,
            Image,
            UNCERTAINTY,
            maps.entropy,
            colormap=uncertainty_colormap(),
            contrast_limits=limits,
            opacity=0.8,
            **place,
        )
        self.viewer.layers[UNCERTAINTY].contrast_limits = limits
        prediction = _upsert(
            self.viewer,
            Labels,
            PREDICTION,
            maps.prediction,
            opacity=0.9,
            colormap=_one_color(PREDICTION_COLOR),
            **place,
        )
        prediction.contour = 2
        self._score_round(maps.prediction)
        self._set_status(
            f"Uncertainty of round {self.session.current_round}: bright = the model is unsure. Propose patches next."
        )
        self.viewer.layers.selection.active = image

    def _score_round(self, prediction: np.ndarray) -> None:
        """Dice against a loaded ground-truth labels layer (the demo), stored with the round."""
        if TRUTH_NAME not in self.viewer.layers:
            return
        truth = self.viewer.layers[TRUTH_NAME]
        truth = np.asarray(truth.data[0] if truth.multiscale else truth.data)
        if truth.shape != prediction.shape:
            return
        current = self.session.rounds[self.session.current_round]
        current.metrics["dice_truth"] = dice(prediction, truth > 0)
        self.session.save()
        self._fill_history()

    # -- 2 · proposals and corrections -----------------------------------------------
    def propose(self) -> None:
        """Pick the k most uncertain patches not yet annotated, and show the queue."""
        if self.result is None:
            show_error("compute the uncertainty first")
            return
        done = [Box(a["image"], a["y"], a["x"], a["h"], a["w"]) for a in self.session.annotations]
        picks = select(self.result.candidates, self.k_spin.value(), done, diversity=self.config.diversity)
        if not picks:
            show_info("no tissue patch left to propose")
            return
        self.session.set_queue(picks)
        self._show_queue(picks)
        self.go_to(0)

    def _show_queue(self, picks: list[Proposal]) -> None:
        self.proposals = picks
        self.opened = set()
        rects = [np.array([[p.y, p.x], [p.y + p.h, p.x + p.w]], float) for p in picks]
        image = self.image_layer()
        layer = _upsert(
            self.viewer, Shapes, PROPOSALS, rects, shape_type="rectangle", edge_width=6, face_color="transparent",
            edge_color=QUEUED_EDGE, features={"rank": [p.rank for p in picks], "score": [p.score for p in picks]},
            text={"string": "#{rank}  {score:.3f}", "color": "white", "size": 10, "anchor": "upper_left"},
            scale=image.scale, translate=image.translate,
        )  # fmt: skip
        self._annotation_layer()
        for target in (layer, self.viewer.layers[ANNOTATION]):
            target.bind_key(NEXT_KEY, lambda _layer: self.next_patch(), overwrite=True)
            target.bind_key(PREVIOUS_KEY, lambda _layer: self.previous_patch(), overwrite=True)

    def _annotation_layer(self) -> Labels:
        if ANNOTATION not in self.viewer.layers:
            image = self.image_layer()
            shape = level0(image).shape[:2]
            layer = self.viewer.add_labels(
                np.zeros(shape, np.uint8),
                name=ANNOTATION,
                opacity=0.45,
                colormap=_one_color(ANNOTATION_COLOR),
                scale=image.scale,
                translate=image.translate,
            )
            layer.brush_size = 12
        return self.viewer.layers[ANNOTATION]

    def go_to(self, index: int) -> None:
        """Make queue entry ``index`` current: zoom to it and pre-fill its correction with the prediction."""
        if not self.proposals:
            return
        index %= len(self.proposals)
        self.session.queue_position = index
        self.session.save()
        patch = self.proposals[index]
        annotation = self._annotation_layer()
        if index not in self.opened and self.result is not None and not self._annotated(patch):
            region = (slice(patch.y, patch.y + patch.h), slice(patch.x, patch.x + patch.w))
            annotation.data[region] = patch.crop(self.result.maps.prediction)
            annotation.refresh()
            self.opened.add(index)
        self._color_queue()
        zoom_to_box(self.viewer, self.image_layer(), patch)
        annotation.selected_label = 1
        annotation.mode = "paint"
        self.viewer.layers.selection.active = annotation
        self._update_controls()

    def _color_queue(self) -> None:
        """Current patch cyan, submitted ones green, the rest yellow."""
        position = self.session.queue_position
        colors = [
            CURRENT_EDGE if i == position else DONE_EDGE if self._annotated(p) else QUEUED_EDGE
            for i, p in enumerate(self.proposals)
        ]
        self.viewer.layers[PROPOSALS].edge_color = colors

    def _annotated(self, box: Box) -> bool:
        return any((a["y"], a["x"], a["h"], a["w"]) == (box.y, box.x, box.h, box.w) for a in self.session.annotations)

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
        if not self.opened or self.worker is not None:
            return
        annotation = np.asarray(self._annotation_layer().data)
        picked = [self.proposals[i] for i in sorted(self.opened)]
        masks = [(p.crop(annotation) > 0).astype(np.uint8) for p in picked]
        self.session.add_annotations([p.box for p in picked], masks)
        self.opened = set()
        self._color_queue()
        self._start_finetune()

    def _shift(self) -> str:
        return list(SHIFT_LABELS)[self.shift_combo.currentIndex()]

    def _loop_record(self) -> dict:
        """The loop settings as saved in the session (a copy with the boxes' values and the domain-shift preset)."""
        boxes = {"steps": self.steps_spin.value(), "samples": self.samples_spin.value(), "batch": self.k_spin.value()}
        return {**vars(self.config), **boxes, "shift": self._shift()}

    def _shift_changed(self) -> None:
        """Apply the preset of the chosen domain shift (the steps box shows its steps; edit it after)."""
        self.config = config_for(
            self._shift(), samples=self.config.samples, batch=self.config.batch, patch=self.config.patch
        )
        self.steps_spin.setValue(self.config.steps)

    def _restore_loop(self, record: dict) -> None:
        """All loop settings of a reopened session (the preset's where the record is unreadable)."""
        try:
            config, shift = config_from_record(record), record.get("shift", "centre")
        except InputError as exc:
            show_error(f"{exc}; using the preset's settings")
            shift = self._shift()
            config = config_for(shift)
        self.shift_combo.setCurrentIndex(list(SHIFT_LABELS).index(shift))  # applies the preset first
        self.config = config
        self.steps_spin.setValue(config.steps)
        self.samples_spin.setValue(config.samples)
        self.k_spin.setValue(config.batch)

    def _start_finetune(self) -> None:
        self.config.steps = self.steps_spin.value()
        self.session.config["loop"] = self._loop_record()
        self.token = CancelToken()
        pending = self.session.pending_ids()
        annotations = self.session.load_annotations()
        seed = len(self.session.annotations)
        worker = finetune_worker(
            self.model,
            annotations,
            self._factor(),
            self.config,
            seed,
            self.token,
            TRAIN_THREADS,
            self.origin,
            self._self_label_boxes(),
            self.session.read_image,
        )
        worker.yielded.connect(self.training.on_event)
        worker.returned.connect(lambda result: self._finetuned(result, pending))
        worker.aborted.connect(lambda: self._finetuned(None, pending))
        shares = {"replay": self.config.replay_share, "self-labels": self.config.self_share}
        memory = [name for name, share in shares.items() if share > 0]
        extra = f" (+ {', '.join(memory)})" if memory else ""
        self.training.begin(self.config.steps, f"Fine-tuning on {len(annotations)} patches{extra}…")
        self._run(worker, f"Saved {len(pending)} patches to {self.session.folder}; fine-tuning in the background.")

    def _self_label_boxes(self) -> list[Box]:
        """Up to ``SELF_LABEL_PATCHES`` tissue patches spread over the current image (for the self-labels)."""
        if self.result is None or self.config.self_share <= 0:
            return []
        boxes = [c.box for c in self.result.candidates]
        spread = np.linspace(0, len(boxes) - 1, min(len(boxes), SELF_LABEL_PATCHES)).round().astype(int)
        return [boxes[i] for i in np.unique(spread)]

    def _finetuned(self, result, pending: list[int]) -> None:
        if result is None:
            self.training.end("Cancelled; the model is unchanged.")
            self._set_status("Fine-tuning cancelled. Your annotations are saved and wait for the next round.")
            return
        loss = float(np.mean(result.losses[-5:])) if result.losses else None
        self.session.record_round(result.model, pending, loss, settings=self._loop_record())
        self.model = result.model
        self.training.end(f"Round {self.session.current_round} done · loss {loss:.3f}")
        self._fill_history()
        self._follow_up = self._start_maps

    def cancel(self) -> None:
        """Stop a running fine-tune at its next step (nothing half-trained is kept)."""
        self.token.set()
        if self.worker is not None:
            self.worker.quit()

    # -- session -------------------------------------------------------------------
    def undo_round(self) -> None:
        """Roll back to the previous round's model and recompute the maps."""
        if self.session is None or self.session.current_round == 0:
            return
        self.session.rollback()
        self.model = self.session.load_model(device=self.device_combo.currentText())
        self._fill_history()
        self._start_maps()

    def save_session(self) -> None:
        """Write the session record (annotations and checkpoints are already on disk)."""
        if self.session is not None:
            self.session.save()
            show_info(f"session saved to {self.session.folder}")

    def open_session(self, folder: str | Path) -> None:
        """Reopen a session: image, model round, annotations, queue and position."""
        try:
            session = Session.open(folder)
        except InputError as exc:
            show_error(str(exc))
            return
        if not session.images:
            show_error(f"{folder}: the session has no image yet")
            return
        name = next(iter(session.images))
        if name not in self.viewer.layers:
            from .._reader import read_one

            data, meta, _ = read_one(session.image_path(name))
            self.viewer.add_image(data, **{**meta, "name": name})
        self.result = None
        self._adopt(session, name)
        self._restore_loop(session.config.get("loop", {}))
        annotation = self._annotation_layer()
        annotation.data[:] = 0
        for item in session.load_annotations():
            annotation.data[item.box.y : item.box.y + item.box.h, item.box.x : item.box.x + item.box.w] = item.mask
        annotation.refresh()
        self.proposals = session.queue_proposals()
        if self.proposals:
            self._show_queue(self.proposals)
            self._color_queue()
        self._update_controls()
        self._start_maps()

    def _fill_history(self) -> None:
        rounds = self.session.rounds[: self.session.current_round + 1] if self.session else []
        self.history.setRowCount(len(rounds))
        for row, record in enumerate(rounds):
            dice_value = record.metrics.get("dice_truth")
            cells = [
                str(record.index),
                str(len(record.annotation_ids)),
                "—" if record.loss is None else f"{record.loss:.3f}",
                "—" if dice_value is None else f"{dice_value:.3f}",
            ]
            for col, text in enumerate(cells):
                self.history.setItem(row, col, QTableWidgetItem(text))

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model weights", "", "Weights (*.safetensors)")
        if path:
            self.model_edit.setText(path)

    def _browse_session(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a napari-uga session folder")
        if folder:
            self.open_session(folder)


def _one_color(color: str) -> DirectLabelColormap:
    """Label 1 (tumour) in ``color``, everything else transparent."""
    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: color})


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


def _upsert(viewer: napari.Viewer, kind: type, name: str, data, **kwargs):
    """Update a layer's data in place, or add it the first time."""
    if name in viewer.layers and isinstance(viewer.layers[name], kind):
        layer = viewer.layers[name]
        layer.data = data
        if kind is Shapes:
            layer.features = kwargs["features"]
        return layer
    adders = {Image: viewer.add_image, Labels: viewer.add_labels, Shapes: viewer.add_shapes}
    return adders[kind](data, name=name, **kwargs)
