"""Release-grade reliability: kill -9 mid-work, full and read-only disks, two viewers, hostile files.

Real processes, real disks and real files: the faults are injected (SIGKILL, a small tmpfs that
fills or is remounted read-only, mutated bytes, a memory limit), never the code under test.
The long campaigns are ``tests/core/reliability_driver.py campaign|fuzz-all``; these are short runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from napari_uga.io import InputError, read_image, read_mask
from napari_uga.selection import Box
from napari_uga.session import LOCK_FILE, Session, SessionInUseError, SessionWriteError

sys.path.insert(0, str(Path(__file__).parent))
import reliability_driver as driver  # noqa: E402

CMU = driver.WSI_DATA / "CMU-1-Small-Region.svs"  # 2,967 x 2,220 px, a real Aperio slide


def _box(k: int, size: int = 128) -> Box:
    return Box("cmu", 300 + 150 * k, 400 + 90 * k, size, size)


def _mask(box: Box) -> np.ndarray:
    return driver.mask_for(box.y, box.x, box.h, box.w)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a session folder (but its lock) and its bytes."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != LOCK_FILE]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


# -- 1. kill -9 mid-work --------------------------------------------------------------------


def test_kill_9_at_random_moments_loses_no_acknowledged_work(tmp_path):
    """20 SIGKILLs of a real session at work: submitting, fine-tuning, writing checkpoints, computing maps.

    After each, the session reopens with every acknowledged correction (mask exact), a record
    that parses, every listed round's checkpoint loading, no half-written file under a final
    name, the map store reopening with its done tiles, at most the in-flight round missing.
    """
    figures = driver.campaign(20, tmp_path, seed=17)
    print(figures.line(), dict(sorted(figures.by_stage.items())))
    assert figures.problems == []
    assert (figures.kills, figures.lost, figures.failed_to_open) == (20, 0, 0)
    assert all(figures.by_phase[p] == 5 for p in driver.PHASES)
    assert figures.acknowledged >= 20 and figures.rounds >= 5 and figures.tiles >= 3  # real work was done
    killed_at = {stage.split(":")[1] for stage in figures.by_stage}
    assert {"BEGIN", "TRAIN"} <= killed_at  # inside a write (Submit, checkpoint) and inside a fine-tune


# -- 3. one session, two viewers ---------------------------------------------------------------


def _hold(folder: Path) -> driver.Child:
    child = driver.Child(["hold", str(folder)])
    child.wait_for("OPEN", 60) or child.proc.wait(60)
    return child


def test_second_process_is_refused_until_the_owner_closes_or_dies(tmp_path, tiny_model_path):
    folder = tmp_path / "s"
    Session.create(folder, tiny_model_path).close()
    assert not (folder / LOCK_FILE).exists()  # closing releases the lock

    owner = _hold(folder)
    assert owner.lines and owner.lines[-1].split()[2] == "locked"
    with pytest.raises(SessionInUseError) as refused:
        Session.open(folder)
    message = str(refused.value)
    assert f"process {owner.proc.pid} on {socket.gethostname()}" in message and "\n" not in message
    with pytest.raises(InputError, match="already holds a session"):
        Session.create(folder, tiny_model_path)

    owner.kill()  # kill -9: the lock file stays behind, naming a dead process
    assert owner.proc.returncode == -signal.SIGKILL
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == owner.proc.pid
    session = Session.open(folder)  # a stale lock is taken over
    assert session.locked and json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()

    second = _hold(folder)  # now we are the owner: another process is refused
    assert second.proc.wait(60) != 0
    assert f"in use by napari-uga process {os.getpid()}" in "".join(second.stderr)
    second.kill()

    again = Session.open(folder)  # the same process may open it twice (one writer)
    session.close()
    assert (folder / LOCK_FILE).exists()
    again.close()
    assert not (folder / LOCK_FILE).exists()

    third = _hold(folder)  # free again: a clean exit leaves no lock
    third.proc.stdin.close()
    assert third.proc.wait(60) == 0 and third.wait_for("CLOSED", 5)
    third.kill()
    assert not (folder / LOCK_FILE).exists()


def test_without_flock_the_recorded_pid_decides(tmp_path, tiny_model_path, monkeypatch):
    """Where the file system has no flock, a lock is stale exactly when its pid is gone (same host)."""
    import napari_uga.session as session_module

    folder = tmp_path / "s"
    Session.create(folder, tiny_model_path).close()
    monkeypatch.setattr(session_module, "fcntl", None)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": sleeper.pid, "host": socket.gethostname(), "since": 0}
        (folder / LOCK_FILE).write_text(json.dumps(record))
        with pytest.raises(SessionInUseError, match=f"process {sleeper.pid}"):
            Session.open(folder)
        (folder / LOCK_FILE).write_text(json.dumps({**record, "host": "another-machine"}))
        with pytest.raises(SessionInUseError, match="on another-machine"):
            Session.open(folder)
    finally:
        sleeper.kill()
        sleeper.wait()
    (folder / LOCK_FILE).write_text(json.dumps(record))  # its process is gone now
    Session.open(folder).close()
    (folder / LOCK_FILE).write_text("")  # a lock cut short by a crash
    Session.open(folder).close()


# -- 2. disk trouble during Submit --------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (as root; ``chmod`` cannot stop root, a read-only remount can)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root (run as root, e.g. in a container)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Fill the disk to the last byte (a filler file, written until the disk says ENOSPC)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * block):
                    pass
    finally:
        os.close(fd)
    return filler


def _remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True, capture_output=True)


def test_full_disk_during_submit_keeps_everything_and_the_retry_saves(small_disk, tiny_model_path, tiny_model):
    folder = small_disk / "s"
    session = Session.create(folder, tiny_model_path)
    session.add_image("cmu", path=CMU)
    assert session.add_annotations([_box(0)], [_mask(_box(0))]) == [1]
    saved, before = _snapshot(folder), [dict(a) for a in session.annotations]
    filler = _fill(small_disk)
    boxes = [_box(1), _box(2)]
    outcomes = []
    for free_pages in range(0, 16):  # a page more each time: room for none, some, then all of the files
        os.truncate(filler, max(0, os.path.getsize(filler) - min(free_pages, 1) * 4096))
        try:
            ids = session.add_annotations(boxes, [_mask(b) for b in boxes])
        except SessionWriteError as exc:
            outcomes.append(str(exc))
            assert "the disk is full" in str(exc) and "\n" not in str(exc)
            assert session.annotations == before  # nothing half-recorded in memory ...
            assert _snapshot(folder) == saved  # ... nor on disk: no new file, no temporary one, nothing changed
            continue
        break
    else:
        pytest.fail("the Submit never succeeded")
    print(f"full disk: {len(outcomes)} refused Submits, then saved with {free_pages} pages free; e.g. {outcomes[0]}")
    assert outcomes and ids == [2, 3]
    assert "could not save the 2 corrections: the disk is full" in outcomes[0]

    os.truncate(filler, os.path.getsize(filler))
    _fill(small_disk)  # a fine-tuned round on a full disk: the same
    rounds = list(session.rounds)
    with pytest.raises(SessionWriteError, match="round 1: the disk is full"):
        session.record_round(tiny_model, [1, 2, 3], loss=0.1)
    assert session.rounds == rounds and session.pending_ids() == [1, 2, 3]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["round_000.safetensors"]
    filler.unlink()
    session.record_round(tiny_model, [1, 2, 3], loss=0.1)
    session.close()

    reopened = Session.open(folder)
    assert [a["id"] for a in reopened.annotations] == [1, 2, 3] and reopened.current_round == 1
    for a in reopened.annotations:
        box = Box(a["image"], a["y"], a["x"], a["h"], a["w"])
        assert np.array_equal(read_mask(folder / a["file"]), _mask(box))
    reopened.load_model(1, "cpu")
    reopened.close()


def test_read_only_folder_during_submit_keeps_everything_and_the_retry_saves(small_disk, tiny_model_path, tiny_model):
    folder = small_disk / "s"
    session = Session.create(folder, tiny_model_path)
    session.add_image("cmu", path=CMU)
    session.add_annotations([_box(0)], [_mask(_box(0))])
    saved, before = _snapshot(folder), [dict(a) for a in session.annotations]

    _remount(small_disk, "ro")
    with pytest.raises(SessionWriteError) as refused:
        session.add_annotations([_box(1)], [_mask(_box(1))])
    message = str(refused.value)
    print(f"read-only folder: {message}")
    assert "could not save the correction: the folder is on a read-only file system" in message and "\n" not in message
    with pytest.raises(SessionWriteError, match="read-only"):
        session.record_round(tiny_model, [1])
    with pytest.raises(SessionWriteError, match="read-only"):
        session.save()
    assert session.annotations == before and session.rounds[-1].index == 0
    assert _snapshot(folder) == saved
    other = _hold(folder)  # read-only or not, the folder is ours: a second process is refused
    assert other.proc.wait(60) != 0 and "in use by napari-uga process" in "".join(other.stderr)
    other.kill()

    _remount(small_disk, "rw")
    assert session.add_annotations([_box(1)], [_mask(_box(1))]) == [2]  # the retry
    session.record_round(tiny_model, [1, 2])
    session.close()

    _remount(small_disk, "ro")  # opened where it cannot be written: read-only access, saving refuses clearly
    viewer = Session.open(folder)
    assert viewer.read_only and not viewer.locked and len(viewer.annotations) == 2
    with pytest.raises(SessionWriteError, match="opened read-only"):
        viewer.add_annotations([_box(2)], [_mask(_box(2))])
    viewer.close()
    _remount(small_disk, "rw")
    assert [a["round"] for a in Session.open(folder).annotations] == [1, 1]


# -- 4. hostile files -----------------------------------------------------------------------


def test_fuzzed_session_records_masks_and_slides_fail_in_one_line(tmp_path):
    """96 mutated inputs (truncated, bit-flipped, random, hostile header edits) through the readers.

    Each through what would meet it (Session.open and its annotations, the npe2 reader, Slide and
    a few tile reads) in a child process under a 2 GiB address-space limit, 30 s per case:
    it works or raises one-line ``InputError``; no other exception, hang, crash or huge allocation.
    """
    counts, results = driver.fuzz(96, tmp_path, seed=3)
    bad = [(case, r) for case, r in results if r["outcome"] not in ("ok", "input_error")]
    assert bad == []
    assert sum(counts.values()) == 96 and counts.get("input_error", 0) >= 48  # most of them are refused


def test_a_tiff_claiming_a_million_pixels_a_side_is_refused_before_allocating(tmp_path):
    import tifffile

    from napari_uga._reader import read
    from napari_uga.wsi import Slide

    rgb, mask = tmp_path / "huge.tif", tmp_path / "huge_mask.tif"
    tifffile.imwrite(rgb, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    tifffile.imwrite(mask, np.ones((512, 512), np.uint8))
    for path in (rgb, mask):
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            offsets = [tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
            widths = [2 if tags[name].dtype_name == "SHORT" else 4 for name in ("ImageWidth", "ImageLength")]
        with open(path, "r+b") as handle:
            for offset, width in zip(offsets, widths, strict=True):
                handle.seek(offset)
                handle.write((1_000_000 if width == 4 else 65535).to_bytes(width, "little"))
    tracemalloc.start()
    try:
        for call in (lambda: Slide(rgb), lambda: read(str(rgb)), lambda: read_image(mask), lambda: read(str(mask))):
            with pytest.raises(InputError) as refused:
                call()
            assert "\n" not in str(refused.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # nothing of the claimed size was allocated
