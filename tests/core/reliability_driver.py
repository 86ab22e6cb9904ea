"""Crash, lock and fuzz campaigns for a session: a child process does real work and the parent checks.

Used by ``tests/core/test_reliability.py`` (short runs) and runnable for long ones::

    python tests/core/reliability_driver.py campaign --kills 200     # kill -9 at random moments, then reopen
    python tests/core/reliability_driver.py fuzz --cases 1000        # hostile files through the readers

A worker process runs the core API the dock calls (``napari_uga.session.Session``, ``napari_uga.tiles``,
``napari_uga.loop.finetune``) on a tiny real U-Net and a real-H&E pyramid. Workers are forked by a
``zygote`` process that imported everything once (a fresh interpreter per kill would spend most of
the test importing torch). A worker reports, one line each: ``OPEN`` once the session is open,
``BEGIN <what>`` before each write and, once it returned, ``ACK <json>`` (a Submit:
``[[id, y, x, h, w], ...]``), ``ROUND <i>``, ``ROLLBACK <i>``, ``TILE <store> <row> <col>``.

The parent SIGKILLs it at a random moment and checks what a reopen must show (:func:`check_session`).
Nothing here fakes the code under test: the only injected faults are the kill, hostile bytes and
a memory limit (``RLIMIT_AS``) that turns a header-driven huge allocation into a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = REPO / "sample_data" / "camelyon16_umcu" / "images"
WSI_DATA = REPO / "tests" / "data" / "wsi"
PHASES = ("submit", "finetune", "checkpoint", "maps")
PATCH = 256
# when a child is killed: a uniform draw from (low, high) seconds after it said the word (the work began)
KILL_WINDOWS = {
    "submit": ("OPEN", 0.0, 0.8),
    "finetune": ("TRAIN", 0.0, 2.0),
    "checkpoint": ("OPEN", 0.0, 1.2),
    "maps": ("STORE", 0.0, 2.5),
}


def mask_for(y: int, x: int, h: int, w: int) -> np.ndarray:
    """The correction the child submits for a box: a pattern that depends on where the box is."""
    yy, xx = np.ogrid[:h, :w]
    return (((yy // 8) * 3 + (xx // 8) + y + x) % 5 < 2).astype(np.uint8)


def _say(*words) -> None:
    print(*words, flush=True)


# -- the child ---------------------------------------------------------------------------


def zygote(folder: Path) -> None:
    """Import everything once, then fork a worker per ``GO <phase> <seed> <output file>`` line.

    Each worker is a real process that opens the session and works at ``phase`` until it is
    killed; it writes its reports to the output file. ``REAP <pid>`` waits for a worker and
    answers ``REAPED <pid> <exit code>`` (negative: the signal). Forking saves the start-up
    (torch and the rest) a fresh interpreter would need for every kill.
    """
    import traceback

    import torch

    import napari_uga.loop  # noqa: F401 - imported once, before the forks
    import napari_uga.session  # noqa: F401
    import napari_uga.tiles  # noqa: F401

    torch.set_num_threads(1)
    _say("WARM")
    for line in sys.stdin:
        command, *args = line.split()
        if command == "GO":
            phase, seed, out = args
            pid = os.fork()
            if pid == 0:  # the worker: its reports go to the file, it reads nothing
                try:
                    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                    work(folder, phase, int(seed))
                except BaseException:  # noqa: BLE001 - the parent sees it in the exit code and stderr
                    traceback.print_exc()
                finally:
                    os._exit(1)
            _say("PID", pid)
        elif command == "REAP":
            pid = int(args[0])
            _, status = os.waitpid(pid, 0)
            _say("REAPED", pid, os.waitstatus_to_exitcode(status))


def work(folder: Path, phase: str, seed: int) -> None:
    """Open the session and work at ``phase`` until killed, reporting each step on stdout."""
    from napari_uga.loop import LoopConfig, finetune
    from napari_uga.models import working_factor
    from napari_uga.selection import Box
    from napari_uga.session import Session
    from napari_uga.tiles import (
        TILE,
        MapStore,
        TileMapper,
        TileQueue,
        compute_maps,
        plan_maps,
        round_store_path,
        survey_boxes,
    )
    from napari_uga.wsi import fingerprint

    rng = np.random.default_rng(seed)
    session = Session.open(folder)
    name = next(iter(session.images))
    slide = session.slide(name)
    model = session.load_model(device="cpu")
    _say("OPEN")

    def submit(n: int) -> list[int]:
        h0, w0 = slide.shape
        boxes = [
            Box(name, int(rng.integers(0, h0 - PATCH)), int(rng.integers(0, w0 - PATCH)), PATCH, PATCH)
            for _ in range(n)
        ]
        _say("BEGIN submit", n)
        ids = session.add_annotations(boxes, [mask_for(b.y, b.x, b.h, b.w) for b in boxes])
        _say("ACK", json.dumps([[i, b.y, b.x, b.h, b.w] for i, b in zip(ids, boxes, strict=True)]))
        return ids

    def record(trained) -> None:
        index = session.current_round + 1
        _say("BEGIN round", index)
        session.record_round(trained, session.pending_ids(), loss=0.5, settings={"phase": phase})
        _say("ROUND", index)

    if phase == "submit":
        while True:
            submit(int(rng.integers(1, 4)))
    elif phase == "finetune":
        config = LoopConfig(steps=25, batch_size=2, crop=64, replay_share=0.0, self_share=0.0)
        factor = working_factor(model, slide.mpp)
        while True:
            submit(1)
            annotations = session.load_annotations(session.pending_ids())
            _say("TRAIN")
            run = finetune(model, annotations, [], factor, config, seed=int(rng.integers(1 << 30)))
            while True:
                try:
                    next(run)
                except StopIteration as stop:
                    result = stop.value
                    break
            record(result.model)
            model = result.model
    elif phase == "checkpoint":
        while True:
            if session.current_round >= 2 and rng.random() < 0.25:
                target = session.current_round - 1
                _say("BEGIN rollback", target)
                session.rollback(target)
                _say("ROLLBACK", target)
            else:
                record(model)
    elif phase == "maps":
        while True:
            plan = plan_maps(slide, model.config.input_mpp, PATCH * 0.243)
            path = round_store_path(folder, session.current_round)
            _say("BEGIN store", path.name)
            store = MapStore.open_or_create(path, plan, fingerprint(slide.path))
            _say("STORE", path.name)
            queue = TileQueue(store.pending(), survey_boxes(slide, plan), seed=session.current_round)
            mapper = TileMapper(model, slide, plan, samples=4)
            for progress in compute_maps(mapper, store, queue):
                if progress.kind == "tile":
                    _say("TILE", path.name, progress.box[0] // TILE, progress.box[1] // TILE)
            record(model)  # the slide is done: the next round's maps start


def child_hold(folder: Path) -> None:
    """Open a session and keep it open until stdin closes (a second viewer for the lock test)."""
    from napari_uga.session import Session

    session = Session.open(folder)
    _say("OPEN", os.getpid(), "locked" if session.locked else "read-only")
    sys.stdin.read()
    session.close()
    _say("CLOSED")


# -- the parent: the kill campaign ------------------------------------------------------


@dataclass
class Expected:
    """What the session must show: everything acknowledged so far."""

    annotations: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    current_round: int = 0
    tiles: dict[str, set] = field(default_factory=dict)  # store name -> tiles acknowledged done
    plan: object = None  # the slide's map plan, as the dock computes it
    complete: set = field(default_factory=set)  # map stores found finished (and whole)
    verified: dict = field(default_factory=dict)  # file -> (inode, size, mtime) when it was last read whole

    def unchanged(self, path: Path) -> bool:
        """The file is as it was when it last read fine (so it need not be read again)."""
        st = path.stat()
        return self.verified.get(path) == (st.st_ino, st.st_size, st.st_mtime_ns)

    def verify(self, path: Path) -> None:
        st = path.stat()
        self.verified[path] = (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class Figures:
    kills: int = 0
    by_phase: dict = field(default_factory=dict)
    by_stage: dict = field(default_factory=dict)  # what the child had last said when it was killed
    acknowledged: int = 0
    lost: int = 0
    failed_to_open: int = 0
    problems: list = field(default_factory=list)
    temp_files_left: int = 0  # proof that kills landed inside atomic writes (hidden names, never the final one)
    inflight_kept: int = 0  # an unacknowledged Submit / round that was on disk anyway
    rounds: int = 0
    tiles: int = 0
    timing: dict = field(default_factory=dict)  # seconds spent waiting for start-ups, for work to begin, ...
    candidate_lines_damaged: int = 0  # lines of a store's candidates.jsonl cut by a kill (ignored when read)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"kills {self.kills} ({', '.join(f'{k} {v}' for k, v in sorted(self.by_phase.items()))}) · "
            f"corrections acknowledged {self.acknowledged}, lost {self.lost} · sessions failed to open "
            f"{self.failed_to_open} · problems {len(self.problems)} · temporary files left by kills "
            f"{self.temp_files_left} · rounds {self.rounds} · tiles {self.tiles} · cut candidate lines "
            f"{self.candidate_lines_damaged} · {self.seconds:.0f} s"
        )


def tiny_model_file(path: Path) -> Path:
    """The tiny real network (seeded random weights) as safetensors."""
    import torch

    from napari_uga.models import ModelConfig, UNet, save_model

    torch.manual_seed(0)
    return save_model(UNet(ModelConfig(base=4, depth=3)).eval(), path)


def fixture_slide(path: Path, shape=(2400, 3200)) -> Path:
    """A small pyramid of real H&E islands on glass (the shipped sample tiles)."""
    from napari_uga.io import read_image
    from napari_uga.slides import write_tissue_slide

    tiles = [read_image(p) for p in sorted(SAMPLE_IMAGES.iterdir())[:8]]
    return write_tissue_slide(path, shape, tiles, tissue_fraction=0.35, n_islands=5, seed=1)


class Child:
    """A started driver process, its stdout lines collected by a thread (time-stamped)."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: deque = deque()
        self.stderr: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._errors = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._errors.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_for(self, word: str, timeout: float) -> bool:
        """Block until a line starting with ``word`` arrived (False on timeout or exit)."""
        end = time.monotonic() + timeout
        with self._new:
            while not any(line.startswith(word) for line in self.lines):
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return any(line.startswith(word) for line in self.lines)
                self._new.wait(min(left, 0.1))
            return True

    def wait_lines(self, seen: int, timeout: float) -> bool:
        """Block until more than ``seen`` lines arrived (False on timeout, or once the output ended)."""
        end = time.monotonic() + timeout
        with self._new:
            while len(self.lines) <= seen:
                left = end - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    return len(self.lines) > seen
                self._new.wait(min(left, 0.1))
            return True

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(10)
        self._errors.join(10)


class Worker:
    """A worker forked by the zygote: its pid, the lines of its report file, a SIGKILL."""

    def __init__(self, forks: Child, phase: str, seed: int, out: Path) -> None:
        self.forks, self.out = forks, out
        seen = len(forks.lines)
        forks.send(f"GO {phase} {seed} {out}")
        if not forks.wait_lines(seen, 60):
            raise RuntimeError(f"the zygote did not fork: {''.join(forks.stderr)[-2000:]}")
        self.pid = int(forks.lines[seen].split()[1])

    def lines(self) -> list[str]:
        """The complete lines reported so far."""
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        return text.split("\n")[:-1]

    def wait_for(self, word: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(line.startswith(word) for line in self.lines()):
                return True
            time.sleep(0.01)
        return False

    def kill(self) -> int:
        """SIGKILL it; returns its exit code as the zygote reaped it (``-9``)."""
        os.kill(self.pid, signal.SIGKILL)
        seen = len(self.forks.lines)
        self.forks.send(f"REAP {self.pid}")
        if not self.forks.wait_lines(seen, 60):
            raise RuntimeError("the zygote did not reap its worker")
        return int(self.forks.lines[seen].split()[2])


def new_session(workdir: Path) -> tuple[Path, Path]:
    """A session on the fixture slide, with the tiny model as round 0."""
    from napari_uga.session import Session

    workdir.mkdir(parents=True, exist_ok=True)
    slide = fixture_slide(workdir / "slide.tif")
    model = tiny_model_file(workdir / "tiny.safetensors")
    session = Session.create(workdir / "session", model)
    session.add_image("slide", path=slide)
    session.close()
    return workdir / "session", slide


def campaign(kills: int, workdir: Path, seed: int = 0, log=print) -> Figures:
    """Kill a working child ``kills`` times at random moments (phases in turn); check the session after each."""
    start = time.perf_counter()
    folder, _ = new_session(Path(workdir))
    rng = random.Random(seed)
    expected, figures = Expected(), Figures()
    order = []
    while len(order) < kills:
        cycle = list(PHASES)
        rng.shuffle(cycle)
        order += cycle
    order = order[:kills]
    forks = Child(["zygote", str(folder)])
    if not forks.wait_for("WARM", 120):
        raise RuntimeError(f"driver did not start: {''.join(forks.stderr)[-2000:]}")
    try:
        for i, phase in enumerate(order):
            t0 = time.perf_counter()
            worker = Worker(forks, phase, seed * 1000 + i, Path(workdir) / f"worker{i}.out")
            word, low, high = KILL_WINDOWS[phase]
            started = worker.wait_for(word, 60)
            t1 = time.perf_counter()
            if started:
                time.sleep(rng.uniform(low, high))
            code = worker.kill()
            t2 = time.perf_counter()
            lines = worker.lines()
            if not started:
                figures.problems.append(f"kill {i} ({phase}): the worker never said {word}: {forks.stderr[-3:]}")
            if code != -signal.SIGKILL:
                figures.problems.append(f"kill {i} ({phase}): the worker exited {code}: {forks.stderr[-5:]}")
            figures.kills += 1
            figures.by_phase[phase] = figures.by_phase.get(phase, 0) + 1
            last = lines[-1].split()[0] if lines else "-"
            stage = f"{phase}:{last}"
            figures.by_stage[stage] = figures.by_stage.get(stage, 0) + 1
            check_session(folder, lines, expected, figures, f"kill {i} ({phase}, last said {last})")
            spent = {"start": t1 - t0, "window": t2 - t1, "check": time.perf_counter() - t2}
            for key, seconds in spent.items():
                figures.timing[key] = figures.timing.get(key, 0.0) + seconds
    finally:
        forks.proc.stdin.close()
        forks.kill()
    figures.seconds = time.perf_counter() - start
    log(figures.line())
    return figures


def check_session(folder: Path, lines: list[str], expected: Expected, figures: Figures, label: str) -> None:
    """After a kill: what reopening must show, given what the child acknowledged; updates ``expected``."""
    from napari_uga.io import InputError, read_mask
    from napari_uga.models import load_model
    from napari_uga.session import Session
    from napari_uga.tiles import MapStore, plan_maps
    from napari_uga.wsi import fingerprint

    inflight_round, acked_submits = None, []
    for line in lines:
        word, *rest = line.split(maxsplit=1)
        if word == "ACK":
            acked_submits.append(json.loads(rest[0]))
        elif word == "BEGIN":
            what = rest[0].split()
            if what[0] in ("round", "rollback"):
                inflight_round = int(what[1])
        elif word in ("ROUND", "ROLLBACK"):
            expected.current_round = int(rest[0])
            inflight_round = None
            figures.rounds += word == "ROUND"
        elif word == "TILE":
            store, row, col = rest[0].split()
            expected.tiles.setdefault(store, set()).add((int(row), int(col)))
            figures.tiles += 1
    for submit in acked_submits:
        for i, y, x, h, w in submit:
            expected.annotations[i] = (y, x, h, w)
            figures.acknowledged += 1

    # files under their final names are whole; temporary ones only under hidden names
    figures.temp_files_left += sum(1 for _ in folder.rglob(".*.tmp")) + sum(1 for _ in folder.rglob("*.partial"))
    try:
        json.loads((folder / "session.json").read_bytes())
    except ValueError as exc:
        figures.problems.append(f"{label}: session.json does not parse ({exc})")
    for png in (folder / "labels").glob("*.png"):
        if expected.unchanged(png):
            continue
        try:
            read_mask(png)
            expected.verify(png)
        except InputError as exc:
            figures.problems.append(f"{label}: half-written label under its final name: {exc}")
    for checkpoint in (folder / "checkpoints").glob("*.safetensors"):
        if expected.unchanged(checkpoint):
            continue
        try:
            load_model(checkpoint, "cpu")
            expected.verify(checkpoint)
        except (InputError, RuntimeError) as exc:
            figures.problems.append(f"{label}: half-written checkpoint under its final name: {exc}")

    try:
        session = Session.open(folder)
    except InputError as exc:
        figures.failed_to_open += 1
        figures.problems.append(f"{label}: the session does not open: {exc}")
        return
    try:
        present = {a["id"]: a for a in session.annotations}
        for i, (y, x, h, w) in expected.annotations.items():
            a = present.get(i)
            if a is None or (a["y"], a["x"], a["h"], a["w"]) != (y, x, h, w):
                figures.lost += 1
                figures.problems.append(f"{label}: acknowledged correction {i} is missing")
                continue
            if not np.array_equal(read_mask(folder / a["file"]), mask_for(y, x, h, w)):
                figures.lost += 1
                figures.problems.append(f"{label}: correction {i} has the wrong mask")
        extra = [i for i in present if i not in expected.annotations]
        if extra:  # the Submit in flight reached the disk before its acknowledgement did
            figures.inflight_kept += 1
            if len(extra) > 3:
                figures.problems.append(f"{label}: {len(extra)} unacknowledged corrections appeared")
            for i in extra:
                a = present[i]
                expected.annotations[i] = (a["y"], a["x"], a["h"], a["w"])
        for r in session.rounds:
            path = folder / r.checkpoint
            if not path.is_file():
                figures.problems.append(f"{label}: listed round {r.index} has no checkpoint")
            elif not expected.unchanged(path):  # (an unchanged file loaded before)
                try:
                    session.load_model(r.index, "cpu")
                    expected.verify(path)
                except (InputError, RuntimeError) as exc:
                    figures.problems.append(f"{label}: listed round {r.index} does not load: {exc}")
        if session.current_round not in (expected.current_round, inflight_round):
            figures.problems.append(
                f"{label}: current round {session.current_round}, acknowledged {expected.current_round}"
                f" (in flight: {inflight_round})"
            )
        if session.current_round != expected.current_round:
            figures.inflight_kept += 1
            expected.current_round = session.current_round
        slide = session.slide(next(iter(session.images)))
        for store_dir in sorted((folder / "maps").glob("round_*.zarr")):
            if store_dir.name in expected.complete:  # checked whole once finished; nothing writes it since
                continue
            acked = expected.tiles.get(store_dir.name, set())
            try:
                store = MapStore(store_dir)
            except Exception as exc:  # noqa: BLE001 - any failure to reopen is the finding
                figures.problems.append(f"{label}: map store {store_dir.name} does not reopen: {exc!r}")
                continue
            candidates = store_dir / "candidates.jsonl"
            lines = candidates.read_bytes().split(b"\n")[:-1] if candidates.is_file() else []
            damaged = 0
            for line in lines:
                try:
                    json.loads(line)
                except ValueError:
                    damaged += 1
            figures.candidate_lines_damaged = max(figures.candidate_lines_damaged, damaged)
            done = {tuple(int(v) for v in t) for t in np.argwhere(store.done)}
            if not acked <= done:
                figures.problems.append(f"{label}: {store_dir.name} lost done tiles {sorted(acked - done)}")
            if len(done - acked) > 1:
                figures.problems.append(f"{label}: {store_dir.name} has {len(done - acked)} unacknowledged tiles")
            for ty, tx in done:
                store.region("probability", *store.plan.tile_box((ty, tx)))
                store.region("entropy", *store.plan.tile_box((ty, tx)))
            if expected.plan is None:  # as the dock plans it (the same every time: the store is kept)
                expected.plan = plan_maps(slide, session.load_model(device="cpu").config.input_mpp, PATCH * 0.243)
            again = MapStore.open_or_create(store_dir, expected.plan, fingerprint(slide.path))
            if {tuple(int(v) for v in t) for t in np.argwhere(again.done)} != done:
                figures.problems.append(f"{label}: {store_dir.name} was recomputed on reopening")
            expected.tiles[store_dir.name] = done
            if again.complete():
                expected.complete.add(store_dir.name)
    except Exception as exc:  # noqa: BLE001 - report, do not stop the campaign
        figures.problems.append(f"{label}: checking failed: {exc!r}")
    finally:
        session.close()


# -- fuzzing ---------------------------------------------------------------------------

HOSTILE_VALUES = [None, -1, 0, 10**12, 1e300, "x", "", "../../etc/passwd", [], {}, [1, 2], {"a": 1}, True, 3.5]


@dataclass
class Case:
    index: int
    kind: str  # session_json | label_png | slide
    source: str  # file name (slides) or what is mutated
    mutation: str  # truncate | flip | random | edit
    seed: int


def fuzz_cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` cases: a quarter session records, a sixth label PNGs, the rest slides (mostly the SVS)."""
    rng = random.Random(seed)
    slides = ["CMU-1-Small-Region.svs"] * 6 + ["tcga-cr-7395-01a-01-ts1.svs", "test3-DAPI-2-387.ndpi"]
    cases = []
    for i in range(n):
        roll = i % 12
        if roll < 3:
            kind, source, mutations = "session_json", "session.json", ("truncate", "flip", "random", "edit", "edit")
        elif roll < 5:
            kind, source, mutations = "label_png", "labels/00001.png", ("truncate", "flip", "random", "edit")
        else:
            kind, source, mutations = "slide", rng.choice(slides), ("truncate", "flip", "flip", "edit", "random")
        cases.append(Case(i, kind, source, rng.choice(mutations), rng.randrange(1 << 30)))
    return cases


def mutate_bytes(data: bytes, mutation: str, rng: random.Random, header: int = 4096) -> bytes:
    """Truncate, flip bits (half of them near the start, where the headers are) or replace with random bytes."""
    if mutation == "truncate":
        return data[: rng.randrange(0, len(data))]
    if mutation == "random":
        return rng.randbytes(rng.choice([0, 1, 7, 64, 4096, 100_000]))
    out = bytearray(data)
    for _ in range(rng.choice([1, 2, 4, 16, 64])):
        pos = rng.randrange(min(header, len(out))) if rng.random() < 0.5 else rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def edit_json(data: bytes, rng: random.Random) -> bytes:
    """Replace one value anywhere in a JSON document with a hostile one (or nest it absurdly deep)."""
    if rng.random() < 0.08:
        return b"[" * 200_000 + b"]" * 200_000
    doc = json.loads(data)
    paths = []

    def walk(node, path):
        paths.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            walk(value, (*path, key))

    walk(doc, ())
    path = rng.choice(paths[1:])
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = rng.choice(HOSTILE_VALUES)
    return json.dumps(doc).encode()


def edit_png(data: bytes, rng: random.Random) -> bytes:
    """Claim another size in the PNG header (with a valid CRC), so only a size check stands in the way."""
    import struct
    import zlib

    width = rng.choice([0, 1, 255, 257, 65535, 1 << 20, (1 << 31) - 1])
    height = rng.choice([0, 1, 256, 100_000, (1 << 31) - 1])
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    chunk = b"IHDR" + bytes(ihdr)
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def edit_tiff(path: Path, rng: random.Random) -> None:
    """Overwrite one geometry or layout tag of a TIFF's first pages with a hostile value, in place."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        entries = []
        for page in tif.pages[:3]:
            for tag in page.tags.values():
                if tag.name in {
                    "ImageWidth",
                    "ImageLength",
                    "TileWidth",
                    "TileLength",
                    "RowsPerStrip",
                    "BitsPerSample",
                    "SamplesPerPixel",
                    "Compression",
                    "TileOffsets",
                    "TileByteCounts",
                    "StripOffsets",
                    "StripByteCounts",
                    "PlanarConfiguration",
                    "ImageDepth",
                }:
                    entries.append((tag.valueoffset, tag.dtype_name, tag.count))
        byteorder = tif.byteorder
    offset, dtype_name, count = rng.choice(entries)
    width = {"BYTE": 1, "SHORT": 2, "LONG": 4, "LONG8": 8}.get(dtype_name, 4)
    value = rng.choice([0, 1, 3, 7, 65535, 1 << 20, (1 << 32) - 1])
    value &= (1 << (8 * width)) - 1
    with open(path, "r+b") as handle:
        handle.seek(offset + width * rng.randrange(max(1, min(count, 64))))
        handle.write(value.to_bytes(width, "little" if byteorder == "<" else "big"))


def fuzz_base(workdir: Path) -> Path:
    """A real session to mutate: the CMU SVS, two corrections, a fine-tuned round and a queue."""
    from napari_uga.selection import Box, Proposal
    from napari_uga.session import Session

    workdir.mkdir(parents=True, exist_ok=True)
    slide = workdir / "CMU-1-Small-Region.svs"
    shutil.copy(WSI_DATA / slide.name, slide)
    session = Session.create(workdir / "base", tiny_model_file(workdir / "tiny.safetensors"))
    session.add_image("cmu", path=slide)
    boxes = [Box("cmu", 600, 800, 128, 128), Box("cmu", 1200, 1500, 96, 160)]
    session.add_annotations(boxes, [mask_for(b.y, b.x, b.h, b.w) for b in boxes])
    session.record_round(session.load_model(device="cpu"), [1], loss=0.4, settings={"shift": "centre"})
    session.set_queue([Proposal("cmu", 100 * k, 200, 128, 128, score=0.1 * k, rank=k) for k in range(1, 4)])
    session.close()
    return workdir / "base"


def run_case(case: Case, base: Path, scratch: Path) -> None:
    """Build one mutated input and push it through what would meet it; raises what they raise."""
    from napari_uga._reader import read
    from napari_uga.session import Session
    from napari_uga.wsi import Slide

    rng = random.Random(case.seed)
    if case.kind == "slide":
        target = scratch / case.source
        shutil.copy(WSI_DATA / case.source, target)
        if case.mutation == "edit":
            edit_tiff(target, rng)
        else:
            target.write_bytes(mutate_bytes(target.read_bytes(), case.mutation, rng, header=65536))
        with Slide(target) as slide:
            slide.thumbnail(256)
            for _ in range(3):
                level = rng.randrange(len(slide.levels))
                lh, lw = slide.levels[level].shape[:2]
                slide.read(level, rng.randrange(lh), rng.randrange(lw), 256, 256)
        for levels in (layer[0] for layer in read(str(target))):
            for level in levels if isinstance(levels, list) else [levels]:
                np.asarray(level[:256, :256])
        return
    folder = scratch / "session"
    shutil.copytree(base, folder)
    target = folder / case.source
    data = target.read_bytes()
    if case.mutation == "edit":
        data = edit_json(data, rng) if case.kind == "session_json" else edit_png(data, rng)
    else:
        data = mutate_bytes(data, case.mutation, rng)
    target.write_bytes(data)
    if case.kind == "label_png":
        read(str(target))
    session = Session.open(folder)
    try:
        session.pending_ids()
        session.queue_proposals()
        for annotation in session.load_annotations():
            assert annotation.mask.shape == annotation.image.shape[:2]
        session.load_model(device="cpu")
    finally:
        session.close()


def child_fuzz(base: Path, scratch: Path, limit_gib: float) -> None:
    """Run the cases read from stdin (JSON lines); print ``START i`` and then one JSON result line each."""
    import resource

    import napari_uga._reader  # noqa: F401 - imported before the memory limit, like the rest
    from napari_uga.io import InputError
    from napari_uga.session import Session  # noqa: F401

    vm = _vm_bytes()
    if limit_gib > 0 and vm:
        resource.setrlimit(resource.RLIMIT_AS, (vm + int(limit_gib * 2**30), resource.RLIM_INFINITY))
    _say("WARM")
    for line in sys.stdin:
        case = Case(**json.loads(line))
        _say("START", case.index)
        work = scratch / f"case{case.index}"
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        outcome, error = "ok", ""
        logged = io.StringIO()  # what libraries print meanwhile (asyncio / zarr log failed reads they dropped)
        try:
            with contextlib.redirect_stderr(logged):
                run_case(case, base, work)
                gc.collect()
        except InputError as exc:
            outcome, error = "input_error", str(exc)
            if "\n" in error or "MemoryError" in error:
                outcome = "bad_message" if "\n" in error else "allocation"
        except MemoryError as exc:
            outcome, error = "allocation", repr(exc)
        except BaseException as exc:  # noqa: BLE001 - anything else is the finding
            outcome, error = "other", f"{type(exc).__name__}: {exc}"[:300]
        shutil.rmtree(work, ignore_errors=True)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        seconds = time.perf_counter() - t0
        tracebacks = logged.getvalue().count("Traceback")
        result = {"index": case.index, "outcome": outcome, "error": error, "s": seconds, "peak_mb": rss}
        _say(json.dumps({**result, "logged_tracebacks": tracebacks}))


def _vm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fuzz(n: int, workdir: Path, seed: int = 0, case_timeout: float = 30.0, limit_gib: float = 2.0, log=print):
    """Run ``n`` fuzz cases in a child (restarted after a hang or a crash); returns (counts, results)."""
    workdir = Path(workdir)
    base = fuzz_base(workdir / "fuzz_base")
    cases = fuzz_cases(n, seed)
    results: dict[int, dict] = {}
    todo = list(cases)
    start = time.perf_counter()
    while todo:
        child = Child(["fuzz", str(base), str(workdir / "fuzz_scratch"), str(limit_gib)])
        if not child.wait_for("WARM", 120):
            raise RuntimeError(f"fuzz driver did not start: {''.join(child.stderr)[-2000:]}")
        for case in todo:
            child.send(json.dumps(case.__dict__))
        child.proc.stdin.close()
        seen = 0
        while True:
            fresh = child.wait_lines(seen, case_timeout)
            for line in list(child.lines)[seen:]:
                if line.startswith("{"):
                    r = json.loads(line)
                    results[r["index"]] = r
            seen = len(child.lines)
            if not fresh:  # silent for a whole case's time limit, or gone
                alive = child.proc.poll() is None
                child.kill()
                current = _current_case(child)
                if current is not None and current not in results:
                    outcome = "hang" if alive else f"crash (exit {child.proc.returncode})"
                    results[current] = {"index": current, "outcome": outcome, "error": "".join(child.stderr)[-300:]}
                break
        shutil.rmtree(workdir / "fuzz_scratch", ignore_errors=True)
        todo = [c for c in cases if c.index not in results]
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    by_kind: dict[str, dict[str, int]] = {}
    for case in cases:
        kind = by_kind.setdefault(case.kind, {})
        outcome = results[case.index]["outcome"]
        kind[outcome] = kind.get(outcome, 0) + 1
    logged = sum(1 for r in results.values() if r.get("logged_tracebacks"))
    peak = max((r.get("peak_mb", 0) for r in results.values()), default=0)
    slowest = max((r.get("s", 0) for r in results.values()), default=0)
    log(
        f"fuzz cases {len(cases)}: {counts} · by input {by_kind} · slowest case {slowest:.1f} s · "
        f"peak memory {peak:.0f} MB · cases where a library logged a traceback to stderr (not raised) {logged} · "
        f"{time.perf_counter() - start:.0f} s"
    )
    return counts, [(case, results[case.index]) for case in cases]


def _current_case(child: Child) -> int | None:
    for line in reversed(child.lines):
        if line.startswith("START"):
            return int(line.split()[1])
    return None


# -- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("zygote").add_argument("folder", type=Path)
    sub.add_parser("hold").add_argument("folder", type=Path)
    fz = sub.add_parser("fuzz")
    fz.add_argument("base", type=Path)
    fz.add_argument("scratch", type=Path)
    fz.add_argument("limit_gib", type=float)
    run = sub.add_parser("campaign", help="the kill -9 campaign")
    run.add_argument("--kills", type=int, default=100)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--workdir", type=Path, default=None)
    fuzzing = sub.add_parser("fuzz-all", help="the fuzz campaign")
    fuzzing.add_argument("--cases", type=int, default=1000)
    fuzzing.add_argument("--seed", type=int, default=0)
    fuzzing.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "zygote":
        zygote(args.folder)
    elif args.command == "hold":
        child_hold(args.folder)
    elif args.command == "fuzz":
        child_fuzz(args.base, args.scratch, args.limit_gib)
    else:
        import tempfile

        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="uga-reliability-"))
        if args.command == "campaign":
            figures = campaign(args.kills, workdir, args.seed)
            for problem in figures.problems:
                print("  ", problem)
            print("kills by stage:", dict(sorted(figures.by_stage.items())))
            print("seconds:", {k: round(v, 1) for k, v in figures.timing.items()})
            return 1 if figures.problems or figures.lost or figures.failed_to_open else 0
        counts, results = fuzz(args.cases, workdir, args.seed)
        for case, r in results:
            if r["outcome"] not in ("ok", "input_error"):
                print("  ", case, r)
        print("slowest:", *sorted(results, key=lambda cr: -cr[1].get("s", 0))[:3], sep="\n   ")
        peak, grew = 0.0, []
        for case, r in results:  # cases that raised the child's peak memory by more than 100 MB
            if r.get("peak_mb", 0) > peak + 100:
                grew.append((round(r["peak_mb"] - peak), case, r["outcome"], r["error"][:120]))
            peak = max(peak, r.get("peak_mb", 0))
        print("memory steps:", *grew, sep="\n   ")
        return 0 if set(counts) <= {"ok", "input_error"} else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
