"""The annotation session: one folder on disk that is the source of truth.

Layout::

    session.json            schema, slides (path + fingerprint + µm/px), config, annotations, rounds, queue
    images/<name>.ome.tif   images that came from memory, as a tiled pyramid (so nothing is lost)
    labels/<id>.png         one 0/1 mask per corrected patch (level-0 box), written when it is submitted
    checkpoints/round_NNN.safetensors
    maps/round_NNN.zarr     each round's whole-slide maps, tile by tile (:mod:`napari_uga.tiles`)

A slide is referred to by path and fingerprint; nothing the size of level 0 is ever copied.
Patches are read from the slide lazily (:meth:`Session.read_patch`).

Every write is atomic (temporary file, flushed to disk, then renamed); annotations are saved the
moment they are submitted, so a crash loses nothing and a session can be resumed. A write that
fails (a full or read-only disk) raises :class:`SessionWriteError` and changes nothing, on disk
or in memory, so the same call can simply be repeated.

One process writes a session at a time: :meth:`Session.open` / :meth:`Session.create` take an
advisory lock (``.session.lock``: the owner's pid and host, held with ``flock`` so the kernel
drops it when the owner dies, even by ``kill -9``), :meth:`Session.close` releases it, and an
open from another process is refused with :class:`SessionInUseError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .audit import PatchScore
from .io import InputError, Pair, atomic_write_json, read_mask, write_array
from .selection import Box, Proposal
from .wsi import fingerprint

SCHEMA_VERSION = 1
LOCK_FILE = ".session.lock"
_SUBFOLDERS = ("labels", "checkpoints", "images")  # where interrupted atomic writes can leave ``.<name>.*.tmp``


class SlideMissingError(InputError):
    """A session's slide is missing or changed: point the session at it again (``Session.open(relocate=...)``)."""

    def __init__(self, name: str, path: Path, reason: str) -> None:
        super().__init__(f"{path}: slide '{name}' {reason}; locate it to continue the session")
        self.name, self.path = name, path


class SessionInUseError(InputError):
    """The session folder is open in another process (another viewer or a script)."""

    def __init__(self, folder: Path, owner: dict) -> None:
        pid, host = owner.get("pid", "?"), owner.get("host", "?")
        since = owner.get("since")
        when = f" since {time.strftime('%Y-%m-%d %H:%M', time.localtime(since))}" if _is_number(since) else ""
        super().__init__(
            f"{folder}: this session is in use by napari-uga process {pid} on {host}{when}; "
            "close it there first (or open a copy of the folder)"
        )
        self.folder, self.owner = folder, owner


class SessionWriteError(InputError):
    """Saving to the session folder failed (full disk, read-only folder, ...); nothing was changed."""

    def __init__(self, folder: Path, what: str, exc: OSError | None = None) -> None:
        if exc is None:  # opened where it could not be written: reopening is what helps
            message = f"{folder}: could not save {what}: the session was opened read-only (its folder was not "
            message += "writable); make the folder writable and open the session again"
        else:
            reason, hint = _WRITE_REASONS.get(exc.errno, (exc.strerror or type(exc).__name__, "fix it"))
            message = f"{folder}: could not save {what}: {reason}; nothing was changed, {hint} and try again"
        super().__init__(message)
        self.folder, self.errno = folder, errno.EROFS if exc is None else exc.errno


_WRITE_REASONS = {
    errno.ENOSPC: ("the disk is full", "free some space"),
    errno.EDQUOT: ("the disk quota is used up", "free some space"),
    errno.EROFS: ("the folder is on a read-only file system", "make it writable"),
    errno.EACCES: ("permission denied", "make the folder writable"),
    errno.EPERM: ("permission denied", "make the folder writable"),
    errno.EFBIG: ("the file is too large for this disk", "free some space"),
    errno.EIO: ("a disk input/output error", "check the disk"),
}


@dataclass
class Round:
    """One fine-tuning round: which annotations went in, its checkpoint, metrics and loop settings."""

    index: int
    checkpoint: str
    annotation_ids: list[int] = field(default_factory=list)
    loss: float | None = None
    metrics: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    settings: dict = field(default_factory=dict)  # the loop settings it was trained with


@dataclass
class Session:
    """State of an annotation session, backed by ``folder``."""

    folder: Path
    images: dict[str, dict] = field(default_factory=dict)  # name -> {"path", "fingerprint", "mpp"}
    config: dict = field(default_factory=dict)
    # {"id", "image", "y", "x", "h", "w", "file", "round", "audit", "scores": {round: PatchScore fields}}
    annotations: list[dict] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    current_round: int = 0
    queue: list[dict] = field(default_factory=list)
    queue_position: int = 0

    # -- creation and persistence -------------------------------------------------
    @classmethod
    def create(
        cls, folder: str | os.PathLike, model_path: str | os.PathLike | None = None, config: dict | None = None
    ) -> Session:
        """Start a new session in an empty (or new) folder; round 0 is a copy of the given model."""
        from .models import load_model, save_model

        folder = Path(folder)
        if (folder / "session.json").exists():
            raise InputError(f"{folder}: already holds a session (open it instead)")
        model = load_model(model_path, "cpu")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionWriteError(folder, "a new session", exc) from None
        key = _acquire_lock(folder)
        try:
            if (folder / "session.json").exists():  # created meanwhile by another process
                raise InputError(f"{folder}: already holds a session (open it instead)")
            session = cls(folder=folder, config=dict(config or {}))
            session.config.setdefault("base_model", str(model_path) if model_path else "shipped")
            try:
                save_model(model, folder / session._checkpoint_name(0), {"round": 0})
            except OSError as exc:
                raise SessionWriteError(folder, "the starting model", exc) from None
            session.rounds.append(Round(0, session._checkpoint_name(0)))
            session.save()
        except BaseException:
            _release_lock(key)
            raise
        session._hold(key)
        return session

    @classmethod
    def open(cls, folder: str | os.PathLike, relocate: dict[str, str | os.PathLike] | None = None) -> Session:
        """Reopen a saved session; a moved or changed slide raises :class:`SlideMissingError`.

        ``relocate`` maps a slide's name to where it is now; the file there must have the
        fingerprint the session recorded (the same slide, moved), and the new path is saved.
        """
        folder = Path(folder)
        record = folder / "session.json"
        if not record.is_file():
            raise InputError(f"{folder}: no session.json (not a napari-uga session folder)")
        key = _acquire_lock(folder)
        try:
            session = cls._read(folder, record)
            for name, new_path in (relocate or {}).items():
                session.relocate(name, new_path)
            for name, info in session.images.items():
                path = session.image_path(name)
                if not path.exists():
                    raise SlideMissingError(name, path, "is not where the session saw it (moved or deleted)")
                try:
                    same = fingerprint(path) == info.get("fingerprint")
                except OSError as exc:
                    raise SlideMissingError(name, path, f"cannot be read ({exc.strerror or exc})") from None
                if not same:
                    raise SlideMissingError(name, path, "has changed since the session was saved (a different file)")
        except BaseException:
            _release_lock(key)
            raise
        if key is not None and _HELD[key].count == 1:
            session._remove_stale_temporaries()
        session._hold(key)
        return session

    @classmethod
    def _read(cls, folder: Path, record: Path) -> Session:
        """The session recorded in ``session.json``, every field checked (one-line :class:`InputError`)."""
        try:
            data = json.loads(record.read_bytes())
        except ValueError as exc:  # not JSON, or not text
            raise InputError(f"{record}: not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
        except OSError as exc:
            raise InputError(f"{record}: cannot be read ({exc.strerror or exc})") from None
        except RecursionError:
            raise InputError(f"{record}: not valid JSON (nested too deeply)") from None
        if not isinstance(data, dict):
            raise InputError(f"{record}: not a session record (a JSON object is expected)")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{record}: schema version {data.get('schema_version')!r:.40} is not {SCHEMA_VERSION}")
        known = {f.name for f in fields(Round)}
        try:
            if not (isinstance(data["images"], dict) and isinstance(data["config"], dict)):
                raise TypeError("images and config must be objects")
            session = cls(
                folder=folder,
                images=data["images"],
                config=data["config"],
                annotations=list(data["annotations"]),
                rounds=[Round(**{k: v for k, v in r.items() if k in known}) for r in data["rounds"]],
                current_round=_int(data["current_round"], "current_round"),
                queue=list(data["queue"]),
                queue_position=_int(data["queue_position"], "queue_position"),
            )
            session._check()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
            raise InputError(f"{record}: incomplete session record ({detail})") from None
        return session

    def _check(self) -> None:
        """Every record of the session has the fields and types the rest of the code relies on (else ValueError)."""
        for name, info in self.images.items():
            if not isinstance(info, dict) or not isinstance(info["path"], str) or not info["path"]:
                raise TypeError(f"slide {name!r}: a path is needed")
            if not (info.get("mpp") is None or (_is_number(info["mpp"]) and info["mpp"] > 0)):
                raise ValueError(f"slide {name!r}: mpp {info['mpp']!r} is not a pixel size")
        ids = set()
        for a in self.annotations:
            if not isinstance(a, dict):
                raise TypeError("an annotation is not an object")
            _int(a["id"], "annotation id", 1)
            if a["id"] in ids:
                raise ValueError(f"annotation id {a['id']} appears twice")
            ids.add(a["id"])
            if a["image"] not in self.images:
                raise ValueError(f"annotation {a['id']}: no slide {a['image']!r:.60} in the session")
            for key, low in (("y", 0), ("x", 0), ("h", 1), ("w", 1)):
                _int(a[key], f"annotation {a['id']} {key}", low)
            _relative_file(a["file"], f"annotation {a['id']} file")
            if a["round"] is not None:
                _int(a["round"], f"annotation {a['id']} round", 1)
            for flag in ("audit", "trained"):
                if not isinstance(a.get(flag, False), bool):
                    raise TypeError(f"annotation {a['id']}: {flag} must be true or false")
            for index, score in a.get("scores", {}).items():
                _int(int(index), f"annotation {a['id']} scored round", 0)
                PatchScore.from_dict(score)
                if not isinstance(score.get("predictor", ""), str):
                    raise TypeError(f"annotation {a['id']}: the predictor of a score must be text")
        if not self.rounds:
            raise ValueError("no rounds (round 0 is the starting model)")
        for i, r in enumerate(self.rounds):
            if r.index != i or isinstance(r.index, bool):
                raise ValueError(f"round {i} is recorded as round {r.index!r:.20}")
            _relative_file(r.checkpoint, f"round {i} checkpoint")
            if not (isinstance(r.annotation_ids, list) and all(isinstance(v, int) for v in r.annotation_ids)):
                raise TypeError(f"round {i}: annotation_ids must be a list of ids")
            if not (isinstance(r.metrics, dict) and isinstance(r.settings, dict)):
                raise TypeError(f"round {i}: metrics and settings must be objects")
            if not (r.loss is None or _is_number(r.loss)) or not _is_number(r.created):
                raise TypeError(f"round {i}: loss and created must be numbers")
        _int(self.current_round, "current_round", 0, len(self.rounds) - 1)
        for q in self.queue:
            if not isinstance(q, dict):
                raise TypeError("a queued proposal is not an object")
            p = Proposal(**q)
            if not isinstance(p.image, str):
                raise TypeError("a queued proposal has no slide name")
            for key, low in (("y", 0), ("x", 0), ("h", 1), ("w", 1), ("rank", 0)):
                _int(getattr(p, key), f"queued proposal {key}", low)
            if not _is_number(p.score):
                raise TypeError("a queued proposal's score is not a number")
        _int(self.queue_position, "queue_position", 0, len(self.queue))

    def save(self) -> None:
        """Write ``session.json`` atomically; a failed write raises :class:`SessionWriteError`."""
        self._write_record()

    def _write_record(self, what: str = "the session record", **changes) -> None:
        """Write ``session.json`` as the session would be with ``changes`` (field -> value) applied.

        The caller applies the changes to the session only once this returned, so a failed
        write leaves the session as it was, in memory and on disk.
        """
        state = {
            "images": self.images,
            "config": self.config,
            "annotations": self.annotations,
            "rounds": self.rounds,
            "current_round": self.current_round,
            "queue": self.queue,
            "queue_position": self.queue_position,
            **changes,
        }
        payload = {"schema_version": SCHEMA_VERSION, **state, "rounds": [asdict(r) for r in state["rounds"]]}
        self._check_writable(what)
        try:
            atomic_write_json(self.folder / "session.json", payload)
        except OSError as exc:
            raise SessionWriteError(self.folder, what, exc) from None

    def _remove_stale_temporaries(self) -> None:
        """Delete what atomic writes interrupted by a crash left behind (``.<name>.*.tmp``); the lock is ours."""
        for folder in (self.folder, *(self.folder / sub for sub in _SUBFOLDERS)):
            for tmp in folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _hold(self, key: str | None) -> None:
        """Keep the folder's lock while this object lives (released by :meth:`close` or when it is collected).

        ``None``: the folder was not writable, so the session is read-only (every save refuses).
        """
        self.__dict__["_lock"] = weakref.finalize(self, _release_lock, key) if key is not None else None
        self.__dict__["_read_only"] = key is None

    @property
    def read_only(self) -> bool:
        """Opened where it could not be written (no lock taken): it can be looked at, not saved."""
        return self.__dict__.get("_read_only", False)

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise SessionWriteError(self.folder, what)

    @property
    def locked(self) -> bool:
        """Whether this session holds the folder's lock (``False`` on a read-only folder, or once closed)."""
        lock = self.__dict__.get("_lock")
        return lock is not None and lock.alive

    # -- images ----------------------------------------------------------------------
    def add_image(
        self,
        name: str,
        path: str | os.PathLike | None = None,
        array: np.ndarray | None = None,
        mpp: float | None = None,
    ) -> Path:
        """Register an image by file path, or save an in-memory array into the session."""
        if path is None:
            if array is None:
                raise ValueError("add_image needs a path or an array")
            from .slides import write_rgb_pyramid

            path = write_rgb_pyramid(self.folder / "images" / f"{name}.ome.tif", np.asarray(array), mpp)
        path = Path(path).resolve()
        if not path.exists():
            raise InputError(f"{path}: no such slide or image file")
        self.images[name] = {"path": str(path), "fingerprint": fingerprint(path), "mpp": mpp}
        self.save()
        return path

    def relocate(self, name: str, path: str | os.PathLike) -> None:
        """Point slide ``name`` at its new path; refuses a file that is not the same slide."""
        if name not in self.images:
            raise InputError(f"relocate: the session has no slide '{name}'")
        path = Path(path).resolve()
        if not path.exists():
            raise InputError(f"{path}: no such slide file or folder")
        if fingerprint(path) != self.images[name].get("fingerprint"):
            raise InputError(f"{path}: not the slide '{name}' of this session (its fingerprint differs)")
        self.images[name]["path"] = str(path)
        self.save()

    def image_path(self, name: str) -> Path:
        """Where an image of the session lives."""
        return Path(self.images[name]["path"])

    def slide(self, name: str):
        """The session's slide ``name``, opened once and kept open (with the session's µm/px)."""
        from .wsi import Slide

        slides = self.__dict__.setdefault("_slides", {})
        if name not in slides:
            slides[name] = Slide(self.image_path(name), self.images[name].get("mpp"))
        return slides[name]

    def read_patch(self, box: Box) -> np.ndarray:
        """The level-0 pixels of a patch (read lazily from its slide)."""
        return np.ascontiguousarray(self.slide(box.image).read(0, box.y, box.x, box.h, box.w))

    def close(self) -> None:
        """Close the slides the session opened and release the folder's lock (another process may open it then)."""
        for slide in self.__dict__.pop("_slides", {}).values():
            slide.close()
        lock = self.__dict__.pop("_lock", None)
        if lock is not None:
            lock()

    # -- annotations -----------------------------------------------------------------
    def add_annotations(self, boxes: list[Box], masks: list[np.ndarray], audits: list[bool] | None = None) -> list[int]:
        """Save corrected patches at once (mask PNGs, then the record); returns their ids.

        ``audits``: which of them were drawn at random from the tissue to measure the model.

        All or nothing: when a write fails (full disk, read-only folder) the masks written so
        far are removed, the session is unchanged and :class:`SessionWriteError` says why;
        call again with the same patches once the disk is fixed.
        """
        boxes, masks = list(boxes), [np.asarray(m) for m in masks]
        if len(boxes) != len(masks):
            raise ValueError(f"add_annotations: {len(boxes)} boxes but {len(masks)} masks")
        for box, mask in zip(boxes, masks, strict=True):
            if mask.shape != (box.h, box.w):
                raise InputError(f"annotation of {box.image}: mask {mask.shape} does not match patch {(box.h, box.w)}")
        first = max((a["id"] for a in self.annotations), default=0) + 1
        records, written = [], []
        what = "the correction" if len(boxes) == 1 else f"the {len(boxes)} corrections"
        self._check_writable(what)
        try:
            for i, (box, mask) in enumerate(zip(boxes, masks, strict=True)):
                rel = f"labels/{first + i:05d}.png"
                write_array(self.folder / rel, (mask > 0).astype(np.uint8))
                written.append(self.folder / rel)
                place = asdict(Box(box.image, box.y, box.x, box.h, box.w))
                audit = bool(audits[i]) if audits is not None else False
                records.append({"id": first + i, **place, "file": rel, "round": None, "audit": audit, "scores": {}})
        except OSError as exc:
            _remove_quietly(written)
            raise SessionWriteError(self.folder, what, exc) from None
        try:
            self._write_record(what, annotations=[*self.annotations, *records])
        except SessionWriteError:
            _remove_quietly(written)  # not in the record: orphans (a later save reuses their ids)
            raise
        self.annotations.extend(records)
        return [r["id"] for r in records]

    def record_scores(self, scores: dict[int, dict[int, PatchScore]], predictor: str) -> None:
        """Store test-then-train scores: annotation id -> {round: score of that round before it trained on it},
        each tagged with the ``predictor`` the round predicted with (:meth:`known_scores`)."""

        def tagged(made: dict[int, PatchScore]) -> dict:
            return {str(r): {**s.as_dict(), "predictor": predictor} for r, s in made.items()}

        annotations = [
            {**a, "scores": {**a.get("scores", {}), **tagged(scores[a["id"]])}} if a["id"] in scores else a
            for a in self.annotations
        ]
        self._write_record("the scores of the corrections", annotations=annotations)
        self.annotations[:] = annotations

    def scores_of(self, round_index: int, audits_only: bool = False) -> list[PatchScore]:
        """Every stored score of a round (on corrections it had not trained on); only audits if asked."""
        return [
            PatchScore.from_dict(a["scores"][str(round_index)])
            for a in self.annotations
            if str(round_index) in a.get("scores", {}) and (a.get("audit", False) or not audits_only)
        ]

    def known_scores(self, ids: Sequence[int], predictor: str) -> list[dict[int, PatchScore]]:
        """Per annotation id (in order), its stored scores made under ``predictor``: those need not be made again
        (a round's stored score is of the model of that index the session uses; rollbacks drop the others)."""
        by_id = {a["id"]: a.get("scores", {}) for a in self.annotations}
        return [
            {int(r): PatchScore.from_dict(s) for r, s in by_id[i].items() if s.get("predictor") == predictor}
            for i in ids
        ]

    def paired_scores(self, newer: int, older: int) -> tuple[list[PatchScore], list[PatchScore]]:
        """Two rounds' scores on the same corrections (those scored against both), in the same order."""
        both = [a["scores"] for a in self.annotations if {str(newer), str(older)} <= set(a.get("scores", {}))]
        return (
            [PatchScore.from_dict(s[str(newer)]) for s in both],
            [PatchScore.from_dict(s[str(older)]) for s in both],
        )

    def pending_ids(self) -> list[int]:
        """Corrections waiting to be trained on: not yet used by any round, and not held-out audits."""
        return [a["id"] for a in self.annotations if a["round"] is None and not is_held_out(a)]

    def held_out_ids(self) -> list[int]:
        """Audit patches no round has trained on: every round is scored on them (sessions before stop 32
        trained on their audits; those stay with the round that used them)."""
        return [a["id"] for a in self.annotations if is_held_out(a)]

    def training_ids(self) -> list[int]:
        """The annotations a fine-tune uses: every one but the held-out audits."""
        return [a["id"] for a in self.annotations if not is_held_out(a)]

    def load_annotations(self, ids: list[int] | None = None):
        """Annotations (all, or by id) as :class:`~napari_uga.loop.Annotation` with image crops."""
        from .loop import Annotation

        wanted = [a for a in self.annotations if ids is None or a["id"] in ids]
        out = []
        for a in wanted:
            box = Box(a["image"], a["y"], a["x"], a["h"], a["w"])
            mask = read_mask(self.folder / a["file"])
            if mask.shape != (box.h, box.w):
                raise InputError(f"{self.folder / a['file']}: mask is {mask.shape} but its patch is {(box.h, box.w)}")
            out.append(Annotation(box, self.read_patch(box), mask))
        return out

    # -- rounds and checkpoints ------------------------------------------------------
    @staticmethod
    def _checkpoint_name(index: int) -> str:
        return f"checkpoints/round_{index:03d}.safetensors"

    def load_model(self, index: int | None = None, device: str = "auto"):
        """The model of a round (default: the current one)."""
        from .models import load_model

        index = self.current_round if index is None else index
        return load_model(self.folder / self.rounds[index].checkpoint, device)

    def record_round(
        self,
        model,
        annotation_ids: list[int],
        loss: float | None = None,
        metrics: dict | None = None,
        settings: dict | None = None,
    ) -> Round:
        """Save a fine-tuned model as the next round and make it current (``settings``: how it was trained).

        Rounds after the current one (undone earlier) are dropped and their annotations
        become pending again.
        """
        from .models import save_model

        index = self.current_round + 1
        name = self._checkpoint_name(index)
        path = self.folder / name
        new = Round(index, name, list(annotation_ids), loss, dict(metrics or {}), settings=dict(settings or {}))
        kept, dropped = self.rounds[:index], self.rounds[index:]  # rounds undone earlier are replaced
        chosen = set(annotation_ids)
        annotations = [
            _without_scores_from({**a, "round": index} if a["id"] in chosen else a, index) for a in self.annotations
        ]  # the scores of an undone round of this index were of another model
        # An undone round of the same index stays listed until the new record is saved: its file is
        # replaced atomically, so whatever a crash leaves, every listed checkpoint loads.
        self._check_writable(f"round {index}")
        try:
            save_model(model, path, {"round": index})
        except OSError as exc:
            raise SessionWriteError(self.folder, f"the checkpoint of round {index}", exc) from None
        try:
            self._write_record(f"round {index}", rounds=[*kept, new], annotations=annotations, current_round=index)
        except SessionWriteError:
            if not dropped:
                path.unlink(missing_ok=True)
            raise
        self.rounds[:] = [*kept, new]
        self.annotations[:] = annotations
        self.current_round = index
        _remove_quietly([self.folder / r.checkpoint for r in dropped[1:]])  # no longer listed
        return new

    def rollback(self, index: int | None = None) -> int:
        """Make an earlier round current (default: the previous one); its later rounds stay on disk until replaced,
        their scores are dropped."""
        index = self.current_round - 1 if index is None else index
        if not 0 <= index < len(self.rounds):
            raise InputError(f"rollback: no round {index} (rounds 0-{len(self.rounds) - 1})")
        annotations = [
            _without_scores_from(
                {**a, "round": None, **({"trained": True} if a.get("audit") else {})}
                if a["round"] is not None and a["round"] > index
                else a,
                index + 1,
            )
            for a in self.annotations
        ]  # an audit a round trained on (sessions before stop 32) is marked, so it never counts as held out;
        # the undone rounds' scores go (they were of models the session no longer uses)
        self._write_record(f"the rollback to round {index}", annotations=annotations, current_round=index)
        self.annotations[:] = annotations
        self.current_round = index
        return index

    # -- proposal queue --------------------------------------------------------------
    def set_queue(self, proposals: list[Proposal]) -> None:
        """Store the proposal queue and reset the position."""
        self.queue = [p.as_dict() for p in proposals]
        self.queue_position = 0
        self.save()

    def queue_proposals(self) -> list[Proposal]:
        """The stored queue as :class:`Proposal` objects."""
        return [Proposal(**q) for q in self.queue]


def is_held_out(annotation: dict) -> bool:
    """An annotation record of an audit patch that no round has trained on (``trained``: one did, then was undone)."""
    return bool(annotation.get("audit", False)) and annotation["round"] is None and not annotation.get("trained")


def _without_scores_from(annotation: dict, index: int) -> dict:
    """An annotation record without its scores of rounds ``index`` and later."""
    scores = annotation.get("scores", {})
    kept = {r: v for r, v in scores.items() if int(r) < index}
    return annotation if len(kept) == len(scores) else {**annotation, "scores": kept}


def audit_pairs(folder: str | os.PathLike) -> tuple[list[Pair], float | None]:
    """The held-out audit patches of a session (image crop, corrected 0/1 mask) and their µm/px, for QC calibration.

    Audits were drawn uniformly at random from the slide's tissue, so they are exchangeable with
    other randomly drawn tissue patches of that slide: a conformal guarantee calibrated on them
    holds for patches drawn that way. Only audits no round trained on count (a model scores its
    own training patches too well). Reads the record without taking the lock (the dock may
    have the session open); a session without such audits raises :class:`InputError`.
    """
    folder = Path(folder)
    record = folder / "session.json"
    if not record.is_file():
        raise InputError(f"{folder}: no session.json (not a napari-uga session folder)")
    session = Session._read(folder, record)
    audits = [a for a in session.annotations if is_held_out(a)]
    if not audits:
        raise InputError(
            f"{folder}: the session has no audit patch that no round trained on (annotate a batch with audits first)"
        )
    scales = {session.images[a["image"]].get("mpp") for a in audits}
    pairs = []
    try:
        for annotation in session.load_annotations([a["id"] for a in audits]):
            box = annotation.box
            pairs.append(Pair(f"{box.image}@y{box.y}x{box.x}", annotation.image, annotation.mask))
    finally:
        session.close()
    return pairs, scales.pop() if len(scales) == 1 else None


# -- helpers ---------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` when it is a whole number in [low, high], else ValueError / TypeError naming ``what``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be a whole number, not {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{what} {value} is out of range")
    return value


def _relative_file(value, what: str) -> None:
    """A file named inside the session folder (relative, no ``..``), else ValueError / TypeError."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a file name")
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or "\x00" in value:
        raise ValueError(f"{what} {value!r:.60} is not a file inside the session folder")


def _remove_quietly(paths) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)


# -- the folder lock -------------------------------------------------------------------

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid in the lock file alone decides
    fcntl = None


@dataclass
class _Held:
    fd: int
    count: int
    pid: int


_HELD: dict[str, _Held] = {}  # real folder path -> this process's lock on it (re-entrant within a process)
_HELD_GUARD = threading.Lock()


def _acquire_lock(folder: Path) -> str | None:
    """Take ``folder``'s lock for this process (another process holding it: :class:`SessionInUseError`).

    Returns the key to release it with, or ``None`` where the folder is read-only (no one can
    write there, so there is nothing to guard). Within one process the lock is re-entrant.
    """
    key = os.path.realpath(folder)
    path = Path(key) / LOCK_FILE
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held.pid == os.getpid():
            held.count += 1
            return key
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)  # (read-only: a folder can still be remounted ro)
            except OSError as exc:
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    _refuse_if_held(folder, path)
                    return None
                raise InputError(f"{path}: cannot take the session's lock ({exc.strerror or exc})") from None
            if not _lock_fd(fd):
                owner = _read_owner(path)
                os.close(fd)
                raise SessionInUseError(folder, owner)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if not same:  # the owner released it (and unlinked it) between our open and our lock
                os.close(fd)
                continue
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            try:
                out = os.open(path, os.O_WRONLY | os.O_TRUNC)
                try:
                    os.write(out, json.dumps(owner).encode())
                finally:
                    os.close(out)
            except OSError:
                pass  # a full disk: the lock still holds, only the message for others lacks the owner
            _HELD[key] = _Held(fd, 1, os.getpid())
            return key
        raise InputError(f"{path}: could not take the session's lock (it keeps changing hands)")


def _refuse_if_held(folder: Path, path: Path) -> None:
    """On a folder we cannot write: refuse it all the same while another process holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                raise SessionInUseError(folder, _read_owner(path)) from None
            except OSError:
                pass
        owner = _read_owner(path)
        if owner and (owner.get("host") != socket.gethostname() or _pid_alive(owner.get("pid"))):
            raise SessionInUseError(folder, owner)
    finally:
        os.close(fd)


def _lock_fd(fd: int) -> bool:
    """Lock an open lock file for this process; ``False`` when a live process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:
            pass  # a file system without flock: fall back to the pid recorded in the file
    try:
        owner = json.loads(os.pread(fd, 4096, 0) if hasattr(os, "pread") else b"{}")
    except (OSError, ValueError):
        owner = {}
    if not isinstance(owner, dict) or not owner:
        return True
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process: it cannot be checked, so it is taken as alive
    return owner.get("pid") == os.getpid() or not _pid_alive(owner.get("pid"))


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (owned by another user)
    return True


def _read_owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_bytes()[:4096])
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _release_lock(key: str | None) -> None:
    """Release one hold of a folder's lock; the last one removes the lock file, then unlocks it."""
    if key is None:
        return
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        if held.pid != os.getpid():  # a forked child: the lock is its parent's
            del _HELD[key]
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(Path(key) / LOCK_FILE)  # while still locked, so nobody locks a file that then vanishes
        os.close(held.fd)
