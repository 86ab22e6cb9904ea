"""Event-loop stalls of napari while the dock fine-tunes in its background worker.

A 10 ms ``QTimer`` ticks on the main thread of a real (shown) napari viewer holding the demo
slide; the delay of each tick beyond 10 ms is a stall the annotator would feel while panning or
painting. The fine-tune is the dock's own worker (``_widgets/_workers.finetune_worker``) on five
demo patches plus replay, with the dock's progress/loss-plot widget drawing every step.

Usage (needs a display; on a headless machine wrap it in ``xvfb-run -a``)::

    xvfb-run -a .venv/bin/python benchmarks/ui_stall.py                # shipped model, default steps
    xvfb-run -a .venv/bin/python benchmarks/ui_stall.py --threads 0 1  # torch default vs 1 thread

Prints p50 / p99 / max stall in ms for an idle baseline and for each thread setting
(median over ``--repeats`` runs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from napari_uga._sample_data import demo_slide
from napari_uga.loop import Annotation, LoopConfig
from napari_uga.models import DEFAULT_WEIGHTS, UNet, load_model, working_factor
from napari_uga.selection import Box, grid_boxes
from napari_uga.training import CancelToken

TICK_MS = 10
RUNS = Path(__file__).resolve().parents[1] / "runs"


def pick_model() -> tuple[UNet, str]:
    """The shipped weights, else the newest trained run, else an untrained network of the same size."""
    candidates = [DEFAULT_WEIGHTS, *sorted(RUNS.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)]
    for path in candidates:
        if path.is_file():
            return load_model(path, "cpu"), str(path)
    return UNet().eval(), "untrained UNet() (no weights file found; same cost per step)"


def demo_annotations(count: int = 5) -> list[Annotation]:
    """The first ``count`` demo patches holding tumour, with their ground truth as the correction."""
    image, truth = demo_slide()
    boxes = [b for b in grid_boxes("demo", truth.shape, 256) if b.crop(truth).mean() > 0.3][:count]
    return [Annotation(Box("demo", b.y, b.x, b.h, b.w), b.crop(image), b.crop(truth)) for b in boxes]


def measure(app, seconds: float | None = None, worker=None) -> np.ndarray:
    """Tick delays (ms beyond the period) for ``seconds``, or until ``worker`` finishes."""
    from qtpy.QtCore import QElapsedTimer, QEventLoop, Qt, QTimer

    delays: list[float] = []
    clock = QElapsedTimer()
    last = [0.0]

    def tick() -> None:
        now = clock.nsecsElapsed() / 1e6
        delays.append(now - last[0] - TICK_MS)
        last[0] = now

    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.timeout.connect(tick)
    loop = QEventLoop()
    if worker is not None:
        worker.finished.connect(loop.quit)
    else:
        QTimer.singleShot(int(seconds * 1000), loop.quit)
    clock.start()
    timer.start(TICK_MS)
    if worker is not None:
        worker.start()
    loop.exec()
    timer.stop()
    return np.clip(np.asarray(delays[1:]), 0, None)


def summary(delays: np.ndarray) -> dict:
    """p50 / p99 / max of the tick delays in ms, and when (s after the start) the worst one came."""
    return {
        "p50": float(np.percentile(delays, 50)),
        "p99": float(np.percentile(delays, 99)),
        "max": float(delays.max()),
        "max_at": float((np.argmax(delays) + 1) * TICK_MS / 1000 + delays[: np.argmax(delays)].sum() / 1000),
    }


def main() -> None:
    """Run the baseline and one fine-tune per thread setting; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=LoopConfig().steps, help="fine-tune steps (default: the dock's)")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[0, 1], help="torch threads in the worker (0 = default)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import napari
    import torch

    from napari_uga._widgets._workers import _replay, finetune_worker
    from napari_uga._widgets.training import TrainingWidget

    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-uga", "camelyon_demo_slide")
    progress = TrainingWidget()
    viewer.window.add_dock_widget(progress, name="training")
    app = napari.qt.get_qapp()
    model, source = pick_model()
    annotations = demo_annotations()
    config = LoopConfig(steps=args.steps)
    factor = working_factor(model, 0.226)
    default_threads = torch.get_num_threads()
    print(
        f"model: {source}; {len(annotations)} patches + replay; {args.steps} steps; "
        f"torch threads default {default_threads}"
    )

    _replay()  # load the replay tiles once, as the dock's first round does
    measure(app, seconds=1.0)  # let the first frames render
    rows = [("idle viewer", summary(measure(app, seconds=3.0)), 3.0)]
    for threads in args.threads:
        results, walls = [], []
        for _ in range(args.repeats):
            worker = finetune_worker(model, annotations, factor, config, 0, CancelToken(), threads or default_threads)
            worker.yielded.connect(progress.on_event)
            progress.begin(args.steps, "benchmark")
            started = time.perf_counter()
            results.append(summary(measure(app, worker=worker)))
            walls.append(time.perf_counter() - started)
        label = f"fine-tune, {threads or default_threads} torch thread(s)"
        rows.append(
            (
                label,
                {k: float(np.median([r[k] for r in results])) for k in ("p50", "p99", "max", "max_at")},
                float(np.median(walls)),
            )
        )
    torch.set_num_threads(default_threads)

    print(f"{'condition':<34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'max at s':>9} {'wall s':>8}")
    for label, stats, wall in rows:
        line = f"{label:<34} {stats['p50']:>8.1f} {stats['p99']:>8.1f} {stats['max']:>8.1f} {stats['max_at']:>9.1f}"
        print(f"{line} {wall:>8.1f}")
    viewer.close()


if __name__ == "__main__":
    main()
