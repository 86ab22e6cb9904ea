"""Fine-tuning progress: a progress bar, a live loss plot and a Cancel button.

A pure view: it draws :class:`~napari_uga.training.ProgressEvent` dicts handed to it on
the main thread and emits ``cancel_requested``; it never starts or stops anything itself.
"""

from __future__ import annotations

import time

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..training import ProgressEvent

BACKGROUND = "#262930"  # napari dark theme
FOREGROUND = "#d0d0d0"
LINE = "#f9a03f"
REDRAW_S = 5.0  # a plot redraw costs 35-75 ms of main thread (benchmarks/wsi_session.py); at most one per 5 s


class TrainingWidget(QWidget):
    """Progress bar, status line, loss curve and Cancel for one fine-tune at a time."""

    cancel_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m steps")
        self.status = QLabel("No fine-tune yet.")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop fine-tuning at the next step; the current model is kept")
        self.cancel_button.clicked.connect(self.cancel_requested.emit)
        self.figure = Figure(figsize=(3, 1.6), facecolor=BACKGROUND, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(130)
        self.axes = self.figure.add_subplot()
        (self.line,) = self.axes.plot([], [], color=LINE, linewidth=1.5)
        self._style_axes()
        self.losses: list[float] = []
        self._drawn_at = 0.0

        row = QHBoxLayout()
        row.addWidget(self.progress, stretch=1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)

    def _style_axes(self) -> None:
        ax = self.axes
        ax.set_facecolor(BACKGROUND)
        ax.set_xlabel("step", color=FOREGROUND, fontsize=8)
        ax.set_ylabel("loss", color=FOREGROUND, fontsize=8)
        ax.tick_params(colors=FOREGROUND, labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#5a5f6a")

    def begin(self, total: int, message: str) -> None:
        """Reset for a new run of ``total`` steps."""
        self.losses = []
        self.line.set_data([], [])
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        self.status.setText(message)
        self.cancel_button.setEnabled(True)
        self.canvas.draw_idle()

    def on_event(self, event: ProgressEvent) -> None:
        """Show one progress event (step, loss, message)."""
        self.progress.setMaximum(max(1, event["total"]))
        self.progress.setValue(event["step"])
        if event["loss"] is not None:
            self.losses.append(event["loss"])
            if time.monotonic() - self._drawn_at >= REDRAW_S:
                self._redraw()
            self.status.setText(f"{event['message']} · loss {event['loss']:.3f}")
        elif event["message"]:
            self.status.setText(event["message"])

    def end(self, message: str) -> None:
        """The run finished, failed or was cancelled."""
        self.cancel_button.setEnabled(False)
        self.status.setText(message)
        self._redraw()

    def _redraw(self) -> None:
        self.line.set_data(range(1, len(self.losses) + 1), self.losses)
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()
        self._drawn_at = time.monotonic()
        if self.losses:
            self.figure.set_tight_layout(False)  # laid out once: later redraws skip the layout pass
