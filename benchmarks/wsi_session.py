"""A whole-slide annotation session in the real dock, timed: open -> maps of the view -> proposals -> rounds.

Drives the UGA dock on a shown napari viewer as a user would (``viewer.open(path,
plugin="napari-uga")``, the dock's ``compute()`` and ``propose()``, corrections in the patch
layer, ``submit()``), with a 10 ms ``QTimer`` on the main thread to measure event-loop stalls and
the process's resident memory sampled at every tick. Per run it prints:

- peak resident memory of the whole process (napari included), from opening the slide to the end;
- first map tile on screen, and the whole current view (1,500 x 950 screen px at working scale);
- the first 10 proposals (the slide-wide survey of candidate patches);
- tissue throughput in Mpx/s (level-0 and working-scale pixels of tissue tiles per second);
- event-loop stall p50 / p99 / max while maps compute, while it fine-tunes, and (apart) while the
  script walks the queue (napari re-slices the slide at each patch on the main thread);
- seconds per fine-tune round, and the new round's view after it.

Usage (a display is needed; on a headless machine)::

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python benchmarks/wsi_session.py --generate 100000x200000
    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python benchmarks/wsi_session.py \
        --slide tests/data/wsi/CMU-1-Small-Region.svs

``--generate HxW`` writes (once, into ``benchmarks/.cache/``) a pyramid at 0.243 µm/px whose tissue
is the shipped Camelyon tiles, mirrored and rotated into islands covering about 20 % of the slide.
Each of the ``--repeats`` runs is a fresh process (so resident memory is that of one session) with a
fresh session folder; their medians close the output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

CACHE = Path(__file__).resolve().parent / ".cache"
VIEW = (950, 1500)  # screen px of the view, at working scale (one screen px = one working px)
TICK_MS = 10


def generated(shape: tuple[int, int], fraction: float) -> Path:
    """The cached generated pyramid of ``shape`` (written on first use)."""
    from napari_uga._sample_data import SAMPLE_DIR
    from napari_uga.io import read_image
    from napari_uga.slides import write_tissue_slide

    path = CACHE / f"tissue_{shape[0]}x{shape[1]}_{round(fraction * 100)}pct.ome.tif"
    if not path.is_file():
        CACHE.mkdir(exist_ok=True)
        tiles = [read_image(p) for p in sorted((SAMPLE_DIR / "images").glob("*.png"))]
        started = time.perf_counter()
        write_tissue_slide(path, shape, tiles, tissue_fraction=fraction, n_islands=24, seed=0)
        print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")
    return path


class Probe:
    """A 10 ms main-thread timer: stall per tick (tagged with the current phase) and the peak RSS."""

    def __init__(self) -> None:
        from qtpy.QtCore import QElapsedTimer, Qt, QTimer

        self.process = psutil.Process()
        self.phase = "idle"
        self.stalls: dict[str, list[float]] = {}
        self.peak = self.process.memory_info().rss
        self.clock = QElapsedTimer()
        self.clock.start()
        self.last = 0.0
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self.tick)
        self.timer.start(TICK_MS)

    def tick(self) -> None:
        now = self.clock.nsecsElapsed() / 1e6
        self.stalls.setdefault(self.phase, []).append(max(0.0, now - self.last - TICK_MS))
        self.last = now
        self.peak = max(self.peak, self.process.memory_info().rss)

    def summary(self, phase: str) -> tuple[float, float, float]:
        values = np.asarray(self.stalls.get(phase, [0.0])[1:] or [0.0])
        return float(np.percentile(values, 50)), float(np.percentile(values, 99)), float(values.max())


def wait(app, condition, timeout: float) -> float:
    """Run the event loop until ``condition()`` (checked every 20 ms); seconds waited (raises after ``timeout``)."""
    from qtpy.QtCore import QEventLoop, QTimer

    started = time.perf_counter()
    loop = QEventLoop()
    check = QTimer()
    check.timeout.connect(lambda: (condition() or time.perf_counter() - started > timeout) and loop.quit())
    check.start(20)
    if not condition():
        loop.exec()
    check.stop()
    if not condition():
        raise TimeoutError("benchmark step did not finish in time")
    return time.perf_counter() - started


def pause(app, seconds: float) -> None:
    """Run the event loop for ``seconds`` (the ticks after a step record its stall in its phase)."""
    end = time.perf_counter() + seconds
    wait(app, lambda: time.perf_counter() >= end, seconds + 60)


def view_tiles(plan, centre_working: tuple[float, float]) -> set:
    """Tissue tiles of the working-scale box of ``VIEW`` around a centre."""
    from napari_uga.tiles import TILE

    cy, cx = centre_working
    y0, y1, x0, x1 = cy - VIEW[0] / 2, cy + VIEW[0] / 2, cx - VIEW[1] / 2, cx + VIEW[1] / 2
    return {
        (ty, tx)
        for ty, tx in plan.tiles
        if ty * TILE < y1 and (ty + 1) * TILE > y0 and tx * TILE < x1 and (tx + 1) * TILE > x0
    }


def run_once(app, napari, slide: Path, args, folder: Path) -> dict:
    """One session from opening the slide through ``args.rounds`` fine-tune rounds."""
    from napari_uga._widgets._layers import ANNOTATION
    from napari_uga._widgets.annotate import AnnotateWidget
    from napari_uga.io import REPLAY_MPP
    from napari_uga.loop import LoopConfig
    from napari_uga.models import load_model
    from napari_uga.tiles import TILE, plan_maps
    from napari_uga.wsi import Slide

    probe = Probe()
    started = time.perf_counter()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1900, 1180)
    [layer] = viewer.open(slide, plugin="napari-uga")
    dock = AnnotateWidget(viewer)
    viewer.window.add_dock_widget(dock, name="UGA annotation", area="left")
    dock.session_edit.setText(str(folder / "session"))
    dock.samples_spin.setValue(args.samples)
    dock.k_spin.setValue(10)
    if args.mpp:
        dock.mpp_spin.setValue(args.mpp)
    app.processEvents()
    opened = time.perf_counter() - started

    # the user zooms to one screen px per working px on the middle of the tissue, then computes
    with Slide(slide, args.mpp or None) as opened_slide:
        plan = plan_maps(opened_slide, load_model(None, "cpu").config.input_mpp, LoopConfig().patch * REPLAY_MPP)
    middle = plan.tiles[len(plan.tiles) // 2]
    centre = ((middle[0] + 0.5) * TILE, (middle[1] + 0.5) * TILE)
    viewer.scene.camera.center = (centre[0] * plan.scale, centre[1] * plan.scale)
    viewer.scene.camera.zoom = 1 / plan.scale
    wanted = view_tiles(plan, centre)
    clicked = time.perf_counter()
    dock.compute()
    probe.phase = "maps"
    arrivals: list = []
    dock.maps_worker.yielded.connect(lambda p: arrivals.append((time.perf_counter(), p)))
    wait(app, lambda: any(p.kind == "tile" for _, p in arrivals), 600)
    first_tile = time.perf_counter() - clicked
    wait(app, lambda: all(dock.store.done[t] for t in wanted), 1800)
    view_s = time.perf_counter() - clicked
    dock.propose()
    wait(app, lambda: len(dock.proposals) >= 10, 1800)
    probe.phase = "navigate"
    dock.go_to(0)
    pause(app, 0.5)
    proposals_s = time.perf_counter() - clicked
    print(f"  first tile {first_tile:.1f} s, view {view_s:.1f} s, 10 proposals {proposals_s:.1f} s", flush=True)
    # seconds per tile: the median gap between two tiles that arrived one after the other (no survey patch between)
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False) if a[1].kind == b[1].kind == "tile"]
    working_mpx = TILE * TILE / 1e6 / float(np.median(gaps)) if gaps else float("nan")
    rounds = []
    for _ in range(args.rounds):
        probe.phase = "navigate"
        for _ in range(min(args.patches, len(dock.proposals))):
            data = np.asarray(viewer.layers[ANNOTATION].data).copy()
            data[: data.shape[0] // 3] = 1 - data[: data.shape[0] // 3]  # a correction
            viewer.layers[ANNOTATION].data = data
            dock.next_patch()
            pause(app, 0.5)
        target = dock.session.current_round + 1
        viewer.scene.camera.center = (centre[0] * plan.scale, centre[1] * plan.scale)  # back to the view
        viewer.scene.camera.zoom = 1 / plan.scale
        probe.phase = "finetune"
        submitted = time.perf_counter()
        dock.submit()
        tune_s = wait(app, lambda t=target: dock.session.current_round == t and dock.maps_worker is not None, 3600)
        probe.phase = "maps"
        after_s = wait(app, lambda: all(dock.store.done[t] for t in wanted), 1800)
        rounds.append({"finetune_s": tune_s, "view_after_s": after_s, "wall_s": time.perf_counter() - submitted})
        print(f"  round {target}: fine-tune {tune_s:.1f} s, its view {after_s:.1f} s", flush=True)
        dock.propose()  # the new round's queue: as soon as its survey has ended
        wait(app, lambda: not dock._propose_when_ready, 1800)
        probe.phase = "navigate"
        dock.go_to(0)
        pause(app, 0.5)
    dock.shutdown()
    result = {
        "open_s": opened,
        "first_tile_s": first_tile,
        "view_s": view_s,
        "view_tiles": len(wanted),
        "proposals_10_s": proposals_s,
        "tissue_tiles": len(plan.tiles),
        "working_mpx_s": working_mpx,
        "level0_mpx_s": working_mpx * plan.scale**2,
        "stall_maps": probe.summary("maps"),
        "stall_finetune": probe.summary("finetune"),
        "stall_navigate": probe.summary("navigate"),
        "rounds": rounds,
        "peak_rss_gb": probe.peak / 1024**3,
        "largest_slide_read_px": dock.slide.largest_read(),
    }
    probe.timer.stop()
    viewer.close()
    return result


def main() -> None:
    """Run the sessions and print one row per run, then the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, help="a slide file (or DICOM folder)")
    parser.add_argument("--generate", help="HxW of a generated real-H&E pyramid, e.g. 100000x200000")
    parser.add_argument("--tissue", type=float, default=0.2, help="tissue share of a generated slide")
    parser.add_argument("--mpp", type=float, default=0.0, help="level-0 µm/px when the file has none")
    parser.add_argument("--samples", type=int, default=8, help="MC-dropout samples per tile (the dock's default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patches", type=int, default=5, help="patches corrected per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the runs here")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: one run, its result to this file
    args = parser.parse_args()
    if bool(args.slide) == bool(args.generate):
        parser.error("give --slide or --generate")
    slide = args.slide or generated(tuple(int(v) for v in args.generate.split("x")), args.tissue)

    if args.one is not None:
        import napari

        with tempfile.TemporaryDirectory() as tmp:
            result = run_once(napari.qt.get_qapp(), napari, slide, args, Path(tmp))
        args.one.write_text(json.dumps(result))
        return
    own = ["--mpp", str(args.mpp), "--samples", str(args.samples), "--rounds", str(args.rounds)]
    own += ["--patches", str(args.patches), "--slide", str(slide)]
    runs = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            subprocess.run([sys.executable, __file__, *own, "--one", str(out)], check=True)
            runs.append(json.loads(out.read_text()))
        r = runs[-1]
        tunes = " ".join(f"{x['finetune_s']:.0f}/{x['view_after_s']:.0f}" for x in r["rounds"])
        print(
            f"run {i + 1}: open {r['open_s']:.1f} s · first tile {r['first_tile_s']:.1f} s · view "
            f"({r['view_tiles']} tiles) {r['view_s']:.1f} s · 10 proposals {r['proposals_10_s']:.1f} s · "
            f"{r['level0_mpx_s']:.2f} level-0 Mpx/s ({r['working_mpx_s']:.2f} working) · "
            f"stall p99 maps {r['stall_maps'][1]:.0f} ms, fine-tune {r['stall_finetune'][1]:.0f} ms, "
            f"walking the queue {r['stall_navigate'][1]:.0f} ms · "
            f"rounds fine-tune/view-after s {tunes} · peak RSS {r['peak_rss_gb']:.2f} GB",
            flush=True,
        )
    keys = ["open_s", "first_tile_s", "view_s", "proposals_10_s", "level0_mpx_s", "working_mpx_s", "peak_rss_gb"]
    medians = {k: float(np.median([r[k] for r in runs])) for k in keys}
    medians["stall_p99_maps_ms"] = float(np.median([r["stall_maps"][1] for r in runs]))
    medians["stall_p99_finetune_ms"] = float(np.median([r["stall_finetune"][1] for r in runs]))
    medians["stall_p99_navigate_ms"] = float(np.median([r["stall_navigate"][1] for r in runs]))
    medians["finetune_s"] = float(np.median([x["finetune_s"] for r in runs for x in r["rounds"]] or [np.nan]))
    print(f"{slide.name}: {runs[0]['tissue_tiles']} tissue tiles; medians of {len(runs)} runs:")
    print(json.dumps(medians, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"slide": str(slide), "runs": runs, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
