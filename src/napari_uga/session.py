"""The annotation session: one folder on disk that is the source of truth.

Layout::

    session.json            schema, images (path + fingerprint), config, annotations, rounds, queue
    images/<name>.tif       images that came from memory (so nothing is lost)
    labels/<id>.png         one 0/1 mask per corrected patch, written when it is submitted
    checkpoints/round_NNN.safetensors

Every write is atomic (temporary file, then rename); annotations are saved the moment they
are submitted, so a crash loses nothing and a session can be resumed.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .io import InputError, atomic_write_json, read_image, read_mask, write_array
from .selection import Box, Proposal

SCHEMA_VERSION = 1


def fingerprint(path: str | os.PathLike) -> str:
    """Cheap file fingerprint: size plus a hash of the first and last 64 KiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(65536))
        handle.seek(max(0, size - 65536))
        digest.update(handle.read(65536))
    return digest.hexdigest()[:16]


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
    annotations: list[dict] = field(default_factory=list)  # {"id", "image", "y", "x", "h", "w", "file", "round"}
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
        session = cls(folder=folder, config=dict(config or {}))
        model = load_model(model_path, "cpu")
        session.config.setdefault("base_model", str(model_path) if model_path else "shipped")
        save_model(model, folder / session._checkpoint_name(0), {"round": 0})
        session.rounds.append(Round(0, session._checkpoint_name(0)))
        session.save()
        return session

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Session:
        """Reopen a saved session; refuses a changed image file (fingerprint mismatch)."""
        import json

        folder = Path(folder)
        record = folder / "session.json"
        if not record.is_file():
            raise InputError(f"{folder}: no session.json (not a napari-uga session folder)")
        try:
            data = json.loads(record.read_text())
        except ValueError as exc:  # not JSON, or not text
            raise InputError(f"{record}: not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
        if not isinstance(data, dict):
            raise InputError(f"{record}: not a session record (a JSON object is expected)")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{record}: schema version {data.get('schema_version')} is not {SCHEMA_VERSION}")
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
                current_round=int(data["current_round"]),
                queue=list(data["queue"]),
                queue_position=int(data["queue_position"]),
            )
            changed = [
                name
                for name, info in session.images.items()
                if not session.image_path(name).is_file()
                or fingerprint(session.image_path(name)) != info["fingerprint"]
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{record}: incomplete session record ({type(exc).__name__}: {exc})") from None
        if changed:
            path = session.image_path(changed[0])
            raise InputError(f"{path}: image '{changed[0]}' is missing or changed since the session was saved")
        return session

    def save(self) -> None:
        """Write ``session.json`` atomically."""
        payload = {
            "schema_version": SCHEMA_VERSION,
            "images": self.images,
            "config": self.config,
            "annotations": self.annotations,
            "rounds": [asdict(r) for r in self.rounds],
            "current_round": self.current_round,
            "queue": self.queue,
            "queue_position": self.queue_position,
        }
        atomic_write_json(self.folder / "session.json", payload)

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
            path = write_array(self.folder / "images" / f"{name}.tif", np.asarray(array))
        path = Path(path).resolve()
        if not path.is_file():
            raise InputError(f"{path}: no such image file")
        self.images[name] = {"path": str(path), "fingerprint": fingerprint(path), "mpp": mpp}
        self.save()
        return path

    def image_path(self, name: str) -> Path:
        """Where an image of the session lives."""
        return Path(self.images[name]["path"])

    def read_image(self, name: str) -> np.ndarray:
        """An image of the session as RGB uint8."""
        return read_image(self.image_path(name))

    # -- annotations -----------------------------------------------------------------
    def add_annotations(self, boxes: list[Box], masks: list[np.ndarray]) -> list[int]:
        """Save corrected patches at once (mask PNG, then the record); returns their ids."""
        ids = []
        for box, mask in zip(boxes, masks, strict=True):
            mask = np.asarray(mask)
            if mask.shape != (box.h, box.w):
                raise InputError(f"annotation of {box.image}: mask {mask.shape} does not match patch {(box.h, box.w)}")
            next_id = max((a["id"] for a in self.annotations), default=0) + 1
            rel = f"labels/{next_id:05d}.png"
            write_array(self.folder / rel, (mask > 0).astype(np.uint8))
            record = {"id": next_id, **asdict(Box(box.image, box.y, box.x, box.h, box.w)), "file": rel, "round": None}
            self.annotations.append(record)
            ids.append(next_id)
        self.save()
        return ids

    def pending_ids(self) -> list[int]:
        """Annotations not yet used by any round."""
        return [a["id"] for a in self.annotations if a["round"] is None]

    def load_annotations(self, ids: list[int] | None = None):
        """Annotations (all, or by id) as :class:`~napari_uga.loop.Annotation` with image crops."""
        from .loop import Annotation

        wanted = [a for a in self.annotations if ids is None or a["id"] in ids]
        images = {name: self.read_image(name) for name in {a["image"] for a in wanted}}
        out = []
        for a in wanted:
            box = Box(a["image"], a["y"], a["x"], a["h"], a["w"])
            out.append(Annotation(box, box.crop(images[a["image"]]), read_mask(self.folder / a["file"])))
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

        self._drop_rounds_after(self.current_round)
        index = self.current_round + 1
        save_model(model, self.folder / self._checkpoint_name(index), {"round": index})
        new = Round(
            index,
            self._checkpoint_name(index),
            list(annotation_ids),
            loss,
            dict(metrics or {}),
            settings=dict(settings or {}),
        )
        self.rounds.append(new)
        for a in self.annotations:
            if a["id"] in annotation_ids:
                a["round"] = index
        self.current_round = index
        self.save()
        return new

    def rollback(self, index: int | None = None) -> int:
        """Make an earlier round current (default: the previous one); its later rounds stay on disk until replaced."""
        index = self.current_round - 1 if index is None else index
        if not 0 <= index < len(self.rounds):
            raise InputError(f"rollback: no round {index} (rounds 0-{len(self.rounds) - 1})")
        self.current_round = index
        for a in self.annotations:
            if a["round"] is not None and a["round"] > index:
                a["round"] = None
        self.save()
        return index

    def _drop_rounds_after(self, index: int) -> None:
        for r in self.rounds[index + 1 :]:
            (self.folder / r.checkpoint).unlink(missing_ok=True)
        del self.rounds[index + 1 :]

    # -- proposal queue --------------------------------------------------------------
    def set_queue(self, proposals: list[Proposal]) -> None:
        """Store the proposal queue and reset the position."""
        self.queue = [p.as_dict() for p in proposals]
        self.queue_position = 0
        self.save()

    def queue_proposals(self) -> list[Proposal]:
        """The stored queue as :class:`Proposal` objects."""
        return [Proposal(**q) for q in self.queue]
