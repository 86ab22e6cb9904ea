"""Quality control dock: predicted Dice and accept / review for patches of the current image or a folder.

The computation (:func:`napari_uga.quality.iter_qc`) runs in a napari thread worker that gets
arrays and paths only; the table, the plot and the layers are updated on the main thread from
the worker's ``yielded`` / ``returned`` signals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image
from napari.qt.threading import GeneratorWorker
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..io import MIN_SIZE, InputError, Pair, list_images, read_image
from ..quality import METHODS, RULES, SESSION_SCOPE, QCModel, image_patches
from ..selection import Box
from ._common import WorkerDock, follow_layers, refill_combo, view_box, zoom_to_box
from ._workers import qc_worker

if TYPE_CHECKING:
    import napari

CURRENT, FOLDER = "Patches of the current image", "Images of a folder"
VIEW, PROPOSED = "Patches of the current view", "The proposed patches (UGA queue)"
PROPOSALS = "uga: proposals"
MAX_WHOLE = 8192 * 8192  # level-0 px above which "the current image" is too large to check whole
BOXES = "uga: qc"
QC_MAP = "uga: qc map"  # predicted Dice per checked patch, placed over the image
OPENED = "uga: qc image"
ACCEPT_COLOR, REVIEW_COLOR = "#2e7d32", "#c62828"
BACKGROUND, FOREGROUND = "#262930", "#d0d0d0"


class _Offset:
    """A lazily sliced window (y0, x0, h, w) of an image array: slicing reads only that box."""

    def __init__(self, data, y0: int, x0: int, h: int, w: int) -> None:
        self.data, self.y0, self.x0 = data, y0, x0
        self.shape = (h, w, *data.shape[2:])

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key[:2]
        return np.asarray(self.data[self.y0 + ys.start : self.y0 + ys.stop, self.x0 + xs.start : self.x0 + xs.stop])


class QCWidget(WorkerDock):
    """Run QC, list images / patches worst first (colour-coded), zoom on click, draw the risk-coverage curve."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: GeneratorWorker | None = None
        self.report: dict | None = None
        self.boxes: dict[str, Box] = {}
        self.paths: dict[str, Path] = {}
        self._build()
        follow_layers(self.viewer, self._refresh_layers)

    # -- construction ------------------------------------------------------------
    def _build(self) -> None:
        self.source_combo = QComboBox()
        self.source_combo.addItems([CURRENT, VIEW, PROPOSED, FOLDER])
        self.source_combo.setToolTip(
            "On a whole slide, check the patches of what is on screen, or the UGA dock's proposed patches"
        )
        self.image_combo = QComboBox()
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(64, 4096)
        self.patch_spin.setValue(512)
        self.patch_spin.setToolTip("patch side in image pixels")
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("images folder")
        self.masks_edit = QLineEdit()
        self.masks_edit.setPlaceholderText("masks folder (optional: reports QC metrics)")
        self.cal_images_edit = QLineEdit()
        self.cal_images_edit.setPlaceholderText("calibration images (optional, labelled, same domain)")
        self.cal_masks_edit = QLineEdit()
        self.cal_masks_edit.setPlaceholderText("calibration masks")
        self.cal_session_edit = QLineEdit()
        self.cal_session_edit.setPlaceholderText("or an annotation session (its audit patches)")
        self.cal_session_edit.setToolTip(
            "Calibrate on the session's audit patches (drawn at random from the tissue, corrected): the guarantee "
            f"then holds {SESSION_SCOPE}"
        )
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("network weights (empty: shipped model)")
        self.qc_model_edit = QLineEdit()
        self.qc_model_edit.setPlaceholderText("QC model JSON (empty: shipped calibration)")
        self.method_combo = QComboBox()
        self.method_combo.addItems(["(calibration's)", *METHODS])
        self.alpha_spin = _double(0.01, 0.5, 0.1, "accepted images fail (Dice <= threshold) at most at this rate")
        self.threshold_spin = _double(0.05, 0.99, 0.8, "a Dice above this is a good segmentation")
        self.rule_combo = QComboBox()
        self.rule_combo.addItems(["(calibration's)", *RULES])
        self.rule_combo.setToolTip(
            "ltt: precision >= 1 - alpha with probability 0.9 (needs >= 22 good calibration images at alpha 0.1); "
            "fdr: false discovery rate <= alpha, i.e. the expected share of failures among the accepted, an empty "
            "selection counting as none (conformal selection; ~10 calibration images suffice)"
        )
        self.mpp_spin = _double(0.0, 20.0, 0.0, "µm per pixel of the images (0: the layer's; never guessed)")
        browse = QPushButton("…")
        browse.setMaximumWidth(28)
        browse.clicked.connect(self._browse_folder)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit)
        folder_row.addWidget(browse)
        session_button = QPushButton("Calibrate from a session…")
        session_button.clicked.connect(self._browse_session)
        session_row = QHBoxLayout()
        session_row.addWidget(self.cal_session_edit)
        session_row.addWidget(session_button)

        form = QFormLayout()
        form.addRow("Check", self.source_combo)
        form.addRow("Image layer", self.image_combo)
        form.addRow("Patch size", self.patch_spin)
        form.addRow("Folder", folder_row)
        form.addRow("Masks", self.masks_edit)
        form.addRow("Calibration", self.cal_images_edit)
        form.addRow("Calib. masks", self.cal_masks_edit)
        form.addRow("Calib. session", session_row)
        # the less used settings fold away, so that the table keeps its room
        self.settings_box = QWidget()
        settings = QFormLayout(self.settings_box)
        settings.setContentsMargins(0, 0, 0, 0)
        settings.addRow("Network", self.model_edit)
        settings.addRow("QC model", self.qc_model_edit)
        settings.addRow("Method", self.method_combo)
        settings.addRow("Alpha", self.alpha_spin)
        settings.addRow("Dice threshold", self.threshold_spin)
        settings.addRow("Guarantee", self.rule_combo)
        settings.addRow("µm / px", self.mpp_spin)
        self.settings_box.setVisible(False)
        self.settings_toggle = QToolButton()
        self.settings_toggle.setText("Settings (network, method, alpha, threshold, guarantee, scale)")
        self.settings_toggle.setCheckable(True)
        self.settings_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.settings_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.settings_toggle.toggled.connect(self._show_settings)

        self.run_button = QPushButton("Run QC")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.worst_button = QPushButton("Go to worst region")
        self.worst_button.setToolTip(
            "Zoom to the next region to review: out of domain first, then lowest predicted Dice"
        )
        self.worst_button.setEnabled(False)
        self.worst_button.clicked.connect(self.next_worst)
        buttons.addWidget(self.worst_button)
        self.worst: list[Box] = []
        self.progress = QProgressBar()
        self.status = QLabel("Pick patches of an image or a folder, then Run QC.")
        self.status.setWordWrap(True)

        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["name", "predicted Dice", "decision", "true Dice", "domain p"])
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSortingEnabled(True)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # tile names share long prefixes
        self.table.cellClicked.connect(self._row_clicked)

        self.figure = Figure(figsize=(3, 2), facecolor=BACKGROUND, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(160)
        self.axes = self.figure.add_subplot()

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.settings_toggle)
        layout.addWidget(self.settings_box)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.table, stretch=1)
        layout.addWidget(self.canvas)

    def _show_settings(self, shown: bool) -> None:
        self.settings_box.setVisible(shown)
        self.settings_toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)

    def _refresh_layers(self, event=None) -> None:
        names = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Image) and layer.rgb and layer.name != OPENED
        ]
        refill_combo(self.image_combo, names)

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Images to check")
        if folder:
            self.folder_edit.setText(folder)

    def _browse_session(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Annotation session to calibrate from")
        if folder:
            self.cal_session_edit.setText(folder)

    # -- running -----------------------------------------------------------------
    def _settings(self) -> dict:
        method = self.method_combo.currentText()
        return {
            "alpha": self.alpha_spin.value(),
            "delta": 0.1,
            "threshold": self.threshold_spin.value(),
            "method": None if method not in METHODS else method,
            "rule": None if self.rule_combo.currentText() not in RULES else self.rule_combo.currentText(),
            "mpp": self.mpp_spin.value() or None,
            "qc_model": self.qc_model_edit.text().strip() or None,
        }

    def _patches(self) -> list[Pair]:
        """Patches of the chosen image: all of it, the part on screen, or the UGA queue's proposals."""
        name = self.image_combo.currentText()
        if name not in self.viewer.layers:
            raise InputError("qc: open an RGB image first (or check a folder)")
        layer = self.viewer.layers[name]
        data = layer.data[0] if layer.multiscale else layer.data
        source = self.source_combo.currentText()
        if source == PROPOSED:
            found = self._proposed(name, layer, data)
        else:
            y0, x0, h, w = self._view_box(layer, data) if source == VIEW else (0, 0, *data.shape[:2])
            if h * w > MAX_WHOLE:
                raise InputError(
                    f"qc: {name} is {data.shape[1]} x {data.shape[0]} px; check the current view (zoom in) "
                    "or the proposed patches instead"
                )
            found = [
                (
                    Box(name, box.y + y0, box.x + x0, box.h, box.w),
                    Pair(f"{name} y={box.y + y0} x={box.x + x0}", pair.image),
                )
                for box, pair in image_patches(name, _Offset(data, y0, x0, h, w), self.patch_spin.value())
            ]
        if not found:
            raise InputError(f"qc: no patch of {name} holds enough tissue")
        self.boxes = {pair.name: box for box, pair in found}
        return [pair for _, pair in found]

    def _view_box(self, layer, data) -> tuple[int, int, int, int]:
        """The level-0 box (y, x, h, w) of ``layer`` that the camera shows, clipped to the image."""
        top, left, bottom, right = view_box(self.viewer, layer)
        y0, x0 = max(0, math.floor(top)), max(0, math.floor(left))
        y1, x1 = min(data.shape[0], math.ceil(bottom)), min(data.shape[1], math.ceil(right))
        if y1 <= y0 or x1 <= x0:
            raise InputError(f"qc: the view shows nothing of {layer.name}")
        return int(y0), int(x0), int(y1 - y0), int(x1 - x0)

    def _proposed(self, name: str, layer, data) -> list[tuple[Box, Pair]]:
        """The queue's patches of ``name``; one smaller than QC's smallest side is read with context."""
        if PROPOSALS not in self.viewer.layers or not len(self.viewer.layers[PROPOSALS].data):
            raise InputError("qc: no proposed patches yet (Propose patches in the UGA annotation dock)")
        out = []
        for corners in self.viewer.layers[PROPOSALS].data:
            (y0, x0), (y1, x1) = np.floor(corners.min(0)).astype(int), np.ceil(corners.max(0)).astype(int)
            box = Box(name, int(y0), int(x0), int(y1 - y0), int(x1 - x0))
            window = _with_context(box, data.shape[:2])
            image = np.ascontiguousarray(np.asarray(window.crop(data))[..., :3])
            out.append((box, Pair(f"{name} y={box.y} x={box.x}", image)))
        return out

    def run(self) -> None:
        """Start QC in a worker for the chosen source."""
        if self.worker is not None:
            return
        try:
            settings = self._settings()
            pairs, folder = None, None
            if self.source_combo.currentText() != FOLDER:
                pairs = self._patches()
                layer = self.viewer.layers[self.image_combo.currentText()]
                settings["mpp"] = settings["mpp"] or layer.metadata.get("mpp")
                if settings["mpp"] is None:
                    raise InputError(
                        f"qc: '{layer.name}' has no µm/px in its metadata: enter it under Settings > µm / px "
                        "(it is never guessed)"
                    )
            else:
                images = self.folder_edit.text().strip()
                if not images:
                    raise InputError("qc: choose an images folder")
                self.paths = {p.stem: p for p in list_images(images)}
                self.boxes = {}
                folder = (images, self.masks_edit.text().strip() or None)
                if settings["mpp"] is None:
                    raise InputError("qc: image tiles carry no µm/px: enter it under Settings > µm / px")
            calibration = self._calibration()
        except InputError as exc:
            show_error(str(exc))
            self.status.setText(str(exc))
            return
        model = self.model_edit.text().strip() or None
        worker = qc_worker(model, pairs, folder, calibration, settings)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText("Running QC (MC dropout x flips per image)…")
        worker.start()

    def _calibration(self) -> tuple[str, str] | str | None:
        """Labelled (images, masks) folders, an annotation session folder, or ``None`` (the QC model's own)."""
        images, masks = self.cal_images_edit.text().strip(), self.cal_masks_edit.text().strip()
        session = self.cal_session_edit.text().strip()
        if bool(images) != bool(masks):
            raise InputError("qc: calibration images and masks go together")
        if session and images:
            raise InputError("qc: calibrate from labelled images or from a session, not both")
        return session or ((images, masks) if images else None)

    def cancel(self) -> None:
        """Stop the running QC at the next image."""
        if self.worker is not None:
            self.worker.quit()

    def _on_progress(self, step: tuple[int, int]) -> None:
        done, total = step
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(f"QC failed: {exc}")
        show_error(f"QC failed: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_result(self, result: tuple[dict, QCModel]) -> None:
        self.show_report(result[0])

    # -- results -----------------------------------------------------------------
    def show_report(self, report: dict) -> None:
        """Fill the table (worst first), the status line, the patch outlines and the plot."""
        self.report = report
        rows = report["per_image"]
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            color = QColor(ACCEPT_COLOR if row["accepted"] else REVIEW_COLOR)
            domain_p = row.get("domain_p")  # the exchangeability gate's p-value (None: not tested)
            cells = [
                QTableWidgetItem(row["name"]),
                _number(row["dice_pred"]),
                QTableWidgetItem(
                    "accept" if row["accepted"] else "review" if row.get("in_domain", True) else "review: out of domain"
                ),
                QTableWidgetItem("–") if row["dice_true"] is None else _number(row["dice_true"]),
                QTableWidgetItem("–") if domain_p is None else _number(domain_p),
            ]
            for col, item in enumerate(cells):
                item.setBackground(color)
                item.setToolTip(row.get("reason", ""))  # why it goes to review, e.g. unlike the calibration images
                self.table.setItem(i, col, item)
        self.table.setSortingEnabled(True)
        self.table.sortItems(1, Qt.SortOrder.AscendingOrder)
        accepted = sum(r["accepted"] for r in rows)
        cut = report["cut"]
        rule = (
            "conformal selection"
            if report["rule"] == "fdr"
            else f"predicted Dice ≥ {'—' if cut is None else f'{cut:.3f}'}"
        )
        method = report["method"] + (", chosen by auto" if report["method_reason"] else "")
        text = (f"{accepted}/{len(rows)} accepted ({rule}; "
                f"Dice > {report['threshold']:.2f} with precision ≥ {1 - report['alpha']:.2f}, "
                f"method {method}).")  # fmt: skip
        scope = report.get("calibration")  # present when calibrated on a session's audit patches
        if scope:
            text += f" Calibrated on {scope['patches']} audit patches of the session: "
            text += f"the guarantee holds {scope['guarantee']}."
        if report["note"]:
            text += " " + report["note"] + "."
        if report.get("domain_note"):
            text += " " + report["domain_note"] + "."
        metrics = report["metrics"]
        if metrics:
            text += " " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None)
        text += self._draw_map(rows)
        self.status.setText(text)
        self.status.setToolTip(report["method_reason"])  # the out-of-fold scores behind auto's choice
        self._draw_boxes(rows)
        self._plot(rows)

    def _draw_map(self, rows: list[dict]) -> str:
        """The QC map of the checked patches as an image layer over the image; the summary in words."""
        from ..qc_map import cell_states, map_summary, qc_map

        shown = [r for r in rows if r["name"] in self.boxes]
        self.worst = []
        self.worst_button.setEnabled(False)
        if not shown:
            return ""
        layer = self.viewer.layers[self.image_combo.currentText()]
        data = layer.data[0] if layer.multiscale else layer.data
        cells = [(b.y, b.x, b.h, b.w) for b in (self.boxes[r["name"]] for r in shown)]
        pred = np.array([r["dice_pred"] for r in shown], float)
        states = cell_states([r["accepted"] for r in shown], [r.get("in_domain", True) for r in shown])
        p = np.array([np.nan if r.get("domain_p") is None else r["domain_p"] for r in shown], float)
        cell = self.patch_spin.value()
        values = qc_map(data.shape[:2], cells, pred, states, p, cell)
        scale = np.asarray(layer.scale[-2:], float)
        translate = np.asarray(layer.translate[-2:], float) + scale * (cell - 1) / 2  # cell centres on patch centres
        if QC_MAP in self.viewer.layers:
            self.viewer.layers.remove(QC_MAP)
        self.viewer.add_image(values[0], name=QC_MAP, colormap="magma", contrast_limits=(0, 1), opacity=0.45,
                              scale=scale * cell, translate=translate)  # fmt: skip
        summary = map_summary(cells, pred, states, p)
        by_corner = {(b.y, b.x): b for b in self.boxes.values()}
        self.worst = [by_corner[(r["y"], r["x"])] for r in summary["worst"]]
        self.worst_button.setEnabled(bool(self.worst))
        return (f" Tissue checked: {summary['share_accepted']:.0%} accepted, {summary['share_review']:.0%} to review, "
                f"{summary['share_out_of_domain']:.0%} out of domain.")  # fmt: skip

    def next_worst(self) -> None:
        """Zoom to the worst region not yet visited (then start over)."""
        if self.worst:
            box = self.worst.pop(0)
            self.worst.append(box)
            self.zoom_to(box)

    def _draw_boxes(self, rows: list[dict]) -> None:
        if not self.boxes:
            return
        layer = self.viewer.layers[self.image_combo.currentText()]
        shown = [(self.boxes[r["name"]], r["accepted"]) for r in rows if r["name"] in self.boxes]
        rects = [
            np.array([[b.y, b.x], [b.y, b.x + b.w], [b.y + b.h, b.x + b.w], [b.y + b.h, b.x]], float) for b, _ in shown
        ]
        colors = [ACCEPT_COLOR if ok else REVIEW_COLOR for _, ok in shown]
        if BOXES in self.viewer.layers:
            self.viewer.layers.remove(BOXES)
        self.viewer.add_shapes(rects, shape_type="rectangle", edge_color=colors, face_color="transparent",
                               edge_width=max(2, self.patch_spin.value() // 64), name=BOXES,
                               scale=layer.scale[-2:], translate=layer.translate[-2:])  # fmt: skip

    def _plot(self, rows: list[dict]) -> None:
        from ..quality import rc_curve

        ax = self.axes
        ax.clear()
        ax.set_facecolor(BACKGROUND)
        pred = np.array([r["dice_pred"] for r in rows])
        cov, risk = rc_curve(pred, 1 - pred)
        ax.plot(cov, risk, color="#f9a03f", label="expected (1 - predicted Dice)")
        if all(r["dice_true"] is not None for r in rows):
            true = np.array([r["dice_true"] for r in rows])
            cov, risk = rc_curve(pred, 1 - true)
            ax.plot(cov, risk, color="#4fc3f7", label="true (1 - Dice)")
        coverage = float(np.mean([r["accepted"] for r in rows]))
        ax.axvline(coverage, color=ACCEPT_COLOR, linestyle="--", linewidth=1, label="accepted share")
        ax.set_xlabel("coverage", color=FOREGROUND, fontsize=8)
        ax.set_ylabel("risk", color=FOREGROUND, fontsize=8)
        ax.tick_params(colors=FOREGROUND, labelsize=7)
        ax.legend(fontsize=6, facecolor=BACKGROUND, labelcolor=FOREGROUND)
        self.canvas.draw_idle()

    def _row_clicked(self, row: int, _column: int) -> None:
        name = self.table.item(row, 0).text()
        if name in self.boxes:
            self.zoom_to(self.boxes[name])
        elif name in self.paths:
            self.open_image(self.paths[name])

    def zoom_to(self, box: Box) -> None:
        """Centre the camera on a patch of the checked image."""
        zoom_to_box(self.viewer, self.viewer.layers[box.image], box)

    def open_image(self, path: Path) -> None:
        """Show one checked image of the folder (replacing the previous one)."""
        data = read_image(path)
        if OPENED in self.viewer.layers:
            self.viewer.layers[OPENED].data = data
        else:
            self.viewer.add_image(data, name=OPENED, rgb=True)
        self.viewer.reset_view()


def _double(low: float, high: float, value: float, tip: str) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(low, high)
    spin.setDecimals(3)
    spin.setSingleStep(0.01)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


def _number(value: float) -> QTableWidgetItem:
    item = QTableWidgetItem()
    item.setData(Qt.ItemDataRole.DisplayRole, round(float(value), 3))
    return item


def _with_context(box: Box, shape: tuple[int, int]) -> Box:
    """``box`` grown about its centre to QC's smallest image side, kept inside an image of ``shape``."""

    def grown(start: int, size: int, length: int) -> tuple[int, int]:
        size_out = min(max(size, MIN_SIZE), length)
        start_out = min(max(0, start - (size_out - size) // 2), length - size_out)
        return start_out, size_out

    (y, h), (x, w) = grown(box.y, box.h, shape[0]), grown(box.x, box.w, shape[1])
    return Box(box.image, y, x, h, w)
