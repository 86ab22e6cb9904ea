"""Background work for the dock: the only place that creates napari thread workers.

Workers get arrays, models and settings, never layers or widgets, and report back only
through the worker's signals (``yielded``, ``returned``, ``errored``, ``finished``), which
napari delivers on the main thread. The dock turns ``errored`` into a notification (napari
0.9's own relay does not run: its mixin's ``__init__`` is skipped by the sip base class).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from napari.qt.threading import FunctionWorker, GeneratorWorker, create_worker

from ..io import Pair, tissue_mask
from ..loop import Annotation, FinetuneResult, LoopConfig, finetune, replay_pairs, self_labels
from ..models import UNet
from ..selection import Box, Candidate, score_candidates
from ..training import CancelToken, ProgressEvent, progress_event, resize_image
from ..uncertainty import UncertaintyMaps, compute_uncertainty


class WorkerError(Exception):
    """A failure inside a generator worker.

    superqt's ``GeneratorWorker`` takes a ``RuntimeError`` from the generator for a deleted
    worker: it only warns and never emits ``errored`` or ``finished``. Torch raises
    ``RuntimeError`` for most failures (shape mismatch, out of memory), so they are re-raised
    as this type to reach the dock.
    """


@dataclass
class MapsResult:
    """Uncertainty maps of one image and its scored candidate patches."""

    maps: UncertaintyMaps
    candidates: list[Candidate]


MIN_TISSUE = 0.6  # a patch worth an annotator's time is mostly tissue (tissue edges are uncertain but cheap)


@lru_cache(maxsize=1)
def _replay() -> tuple[Pair, ...]:
    return tuple(replay_pairs())


def compute_maps(model: UNet, name: str, image, samples: int, factor: float, config: LoopConfig) -> MapsResult:
    """Uncertainty maps of ``image`` and every tissue patch scored for the proposal queue.

    Tiles without tissue are skipped, and the maps are zero on glass (no tissue, no tumour,
    nothing to annotate), so the overlay and the Dice only speak about tissue.
    """
    rgb = np.asarray(image)
    tissue_small = tissue_mask(resize_image(rgb, factor))
    maps = compute_uncertainty(model, rgb, samples=samples, tta=config.tta, factor=factor, tissue=tissue_small)
    rows = np.minimum((np.arange(rgb.shape[0]) * factor).astype(int), tissue_small.shape[0] - 1)
    cols = np.minimum((np.arange(rgb.shape[1]) * factor).astype(int), tissue_small.shape[1] - 1)
    tissue = tissue_small[np.ix_(rows, cols)]
    for array in (maps.probability, maps.entropy, maps.mutual_information, maps.variance):
        array[~tissue] = 0
    candidates = score_candidates(
        name, rgb, maps.layer(config.measure), maps.probability, tissue, config.patch, config.aggregate, MIN_TISSUE
    )
    return MapsResult(maps, candidates)


def _make_self_labels(
    origin: UNet,
    boxes: Sequence[Box],
    read_image: Callable[[str], np.ndarray] | None,
    factor: float,
    config: LoopConfig,
    cancel: CancelToken,
) -> Generator[ProgressEvent, None, list[Annotation] | None]:
    """The starting model's labels on unlabelled patches of the session's images, patch by patch.

    Yields progress; returns the labelled patches (none if the preset uses none), or ``None`` when cancelled.
    """
    if config.self_share <= 0 or not boxes or read_image is None:
        return []
    images = {name: read_image(name) for name in {b.image for b in boxes}}
    labelled: list[Annotation] = []
    for i, box in enumerate(boxes):
        if cancel.is_set():
            return None
        labelled += self_labels(origin, [(box, box.crop(images[box.image]))], factor)
        yield progress_event("self-labels", i + 1, len(boxes), f"starting model labels patch {i + 1}/{len(boxes)}")
    return labelled


def finetune_events(
    model: UNet,
    annotations: Sequence[Annotation],
    factor: float,
    config: LoopConfig,
    seed: int,
    cancel: CancelToken,
    threads: int | None = None,
    origin: UNet | None = None,
    self_label_boxes: Sequence[Box] = (),
    read_image: Callable[[str], np.ndarray] | None = None,
) -> Iterator[ProgressEvent]:
    """Drive :func:`napari_uga.loop.finetune` with the shipped replay tiles; returns its result.

    ``origin``: the session's starting model, which the fine-tuning anchor pulls towards and
    which labels the ``self_label_boxes`` patches (read with ``read_image``) for the self-label share.

    ``threads`` caps torch's CPU threads for the run (fewer threads leave a core to the UI);
    the process-wide setting is restored afterwards.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        self_labelled = yield from _make_self_labels(
            origin or model, self_label_boxes, read_image, factor, config, cancel
        )
        if self_labelled is None:
            return None
        result: FinetuneResult | None = yield from finetune(
            model, annotations, _replay(), factor, config, seed, cancel, origin=origin, self_labelled=self_labelled
        )
    except RuntimeError as exc:
        raise WorkerError(f"fine-tuning failed: {exc}") from exc
    finally:
        torch.set_num_threads(previous)
    return result


def _unstarted(function, *args, **options) -> FunctionWorker | GeneratorWorker:
    """A napari worker running ``function(*args)``, not started, whose errors only go to ``errored``."""
    return create_worker(function, *args, _start_thread=False, _ignore_errors=True, **options)


def maps_worker(model: UNet, name: str, image, samples: int, factor: float, config: LoopConfig) -> FunctionWorker:
    """An unstarted worker returning :class:`MapsResult`."""
    return _unstarted(
        compute_maps, model, name, image, samples, factor, config, _progress={"desc": "UGA uncertainty maps"}
    )


def finetune_worker(
    model: UNet,
    annotations: Sequence[Annotation],
    factor: float,
    config: LoopConfig,
    seed: int,
    cancel: CancelToken,
    threads: int | None = None,
    origin: UNet | None = None,
    self_label_boxes: Sequence[Box] = (),
    read_image: Callable[[str], np.ndarray] | None = None,
) -> GeneratorWorker:
    """An unstarted worker yielding progress events and returning a ``FinetuneResult`` (or ``None``)."""
    return _unstarted(
        finetune_events, model, list(annotations), factor, config, seed, cancel, threads, origin, list(self_label_boxes),
        read_image,
    )


def qc_steps(
    model_path: str | None,
    pairs: list[Pair] | None,
    folder: tuple[str, str | None] | None,
    calibration: tuple[str, str] | None,
    settings: dict,
):
    """Load the network and the images, then run :func:`napari_uga.quality.iter_qc` (yields progress)."""
    from ..io import load_pairs
    from ..models import load_model, working_factor
    from ..quality import QCModel, iter_qc

    model = load_model(model_path, "auto")
    pairs = load_pairs(*folder) if pairs is None else pairs
    cal = load_pairs(*calibration) if calibration else None
    qc_model = QCModel.load(settings["qc_model"]) if settings["qc_model"] else None
    factor = working_factor(model, settings["mpp"])
    result = yield from iter_qc(
        model, pairs, cal, settings["alpha"], settings["delta"], settings["threshold"], settings["method"],
        factor=factor, qc_model=qc_model, rule=settings.get("rule"),
    )  # fmt: skip
    return result


def qc_worker(
    model_path: str | None,
    pairs: list[Pair] | None,
    folder: tuple[str, str | None] | None,
    calibration: tuple[str, str] | None,
    settings: dict,
) -> GeneratorWorker:
    """An unstarted worker yielding (done, total) and returning (QC report, QC model)."""
    return _unstarted(qc_steps, model_path, pairs, folder, calibration, settings)
