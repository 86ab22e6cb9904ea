"""The annotation session: one folder on disk that is the source of truth.

Layout::

    session.json            schema, slides (path + fingerprint + µm/px), config, annotations, rounds, queue
    images/<name>.ome.tif   images that came from memory, as a tiled pyramid (so nothing is lost)
    labels/<id>.png         one 0/1 mask per corrected patch (level-0 box), written when it is submitted
    checkpoints/round_NNN.safetensors
    maps/round_NNN.zarr     each round's whole-slide maps, tile by tile (:mod:`napari_uga.tiles`)

A slide is referred to by path and fingerprint; nothing the size of level 0 is ever copied.
Patches are read from the slide lazily (:meth:`Session.read_patch`).

Every write is atomic (temporary file, then rename); annotations are saved the moment they
are submitted, so a crash loses nothing and a session can be resumed.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .io import InputError, atomic_write_json, read_mask, write_array
from .selection import Box, Proposal
from .wsi import fingerprint

SCHEMA_VERSION = 1


class SlideMissingError(InputError):
    """A session's slide is missing or changed: point the session at it again (``Session.open(relocate=...)``)."""

    def __init__(self, name: str, path: Path, reason: str) -> None:
        super().__init__(f"{path}: slide '{name}' {reason}; locate it to continue the session")
        self.name, self.path = name, path


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
    def open(cls, folder: str | os.PathLike, relocate: dict[str, str | os.PathLike] | None = None) -> Session:
        """Reopen a saved session; a moved or changed slide raises :class:`SlideMissingError`.

        ``relocate`` maps a slide's name to where it is now; the file there must have the
        fingerprint the session recorded (the same slide, moved), and the new path is saved.
        """
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
            for info in session.images.values():
                Path(info["path"])  # each slide has a path
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{record}: incomplete session record ({type(exc).__name__}: {exc})") from None
        for name, new_path in (relocate or {}).items():
            session.relocate(name, new_path)
        for name, info in session.images.items():
            path = session.image_path(name)
            if not path.exists():
                raise SlideMissingError(name, path, "is not where the session saw it (moved or deleted)")
            if fingerprint(path) != info.get("fingerprint"):
                raise SlideMissingError(name, path, "has changed since the session was saved (a different file)")
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
        """Close the slides the session opened."""
        for slide in self.__dict__.pop("_slides", {}).values():
            slide.close()

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
        out = []
        for a in wanted:
            box = Box(a["image"], a["y"], a["x"], a["h"], a["w"])
            out.append(Annotation(box, self.read_patch(box), read_mask(self.folder / a["file"])))
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
