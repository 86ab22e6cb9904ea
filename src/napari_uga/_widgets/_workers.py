"""Background work for the dock: the only place that creates napari thread workers.

Workers get arrays, models and settings, never layers or widgets, and report back only
through the worker's signals (``yielded``, ``returned``, ``errored``, ``finished``), which
napari delivers on the main thread. The dock turns ``errored`` into a notification (napari
0.9's own relay does not run: its mixin's ``__init__`` is skipped by the sip base class).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from napari.qt.threading import FunctionWorker, GeneratorWorker, create_worker

from ..audit import (
    Comparison,
    PatchScore,
    choose_shift,
    compare_rounds,
    missing_scores,
    round_to_keep,
    score_rounds,
    tissue_is_new,
)
from ..io import Pair
from ..loop import (
    Annotation,
    FinetuneResult,
    LoopConfig,
    finetune,
    predicting_network,
    prediction_tta,
    replay_pairs,
    self_labels,
)
from ..models import UNet
from ..selection import Box
from ..tiles import MapStore, TileMapper, TileQueue, compute_maps
from ..training import CancelToken, ProgressEvent, progress_event


class WorkerError(Exception):
    """A failure inside a generator worker.

    superqt's ``GeneratorWorker`` takes a ``RuntimeError`` from the generator for a deleted
    worker: it only warns and never emits ``errored`` or ``finished``. Torch raises
    ``RuntimeError`` for most failures (shape mismatch, out of memory), so they are re-raised
    as this type to reach the dock.
    """


@lru_cache(maxsize=1)
def _replay() -> tuple[Pair, ...]:
    return tuple(replay_pairs())


def maps_events(mapper: TileMapper, store: MapStore, queue: TileQueue, cancel: CancelToken, threads: int | None = None):
    """Drive :func:`napari_uga.tiles.compute_maps` with capped torch threads (a core stays with the UI)."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield from compute_maps(mapper, store, queue, cancel)
    except RuntimeError as exc:
        raise WorkerError(f"computing the maps failed: {exc}") from exc
    finally:
        torch.set_num_threads(previous)


def _make_self_labels(
    origin: UNet,
    boxes: Sequence[Box],
    read_patch: Callable[[Box], np.ndarray] | None,
    factor: float,
    config: LoopConfig,
    cancel: CancelToken,
) -> Generator[ProgressEvent, None, list[Annotation] | None]:
    """The starting model's labels on unlabelled patches of the session's slides, patch by patch.

    Each patch is read lazily from its slide (``read_patch``). Yields progress; returns the
    labelled patches (none if the preset uses none), or ``None`` when cancelled.
    """
    if config.self_share <= 0 or not boxes or read_patch is None:
        return []
    labelled: list[Annotation] = []
    for i, box in enumerate(boxes):
        if cancel.is_set():
            return None
        labelled += self_labels(origin, [(box, read_patch(box))], factor)
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
    read_patch: Callable[[Box], np.ndarray] | None = None,
) -> Iterator[ProgressEvent]:
    """Drive :func:`napari_uga.loop.finetune` with the shipped replay tiles; returns its result.

    ``origin``: the session's starting model, which the fine-tuning anchor pulls towards and
    which labels the ``self_label_boxes`` patches (read with ``read_patch``) for the self-label share.

    ``threads`` caps torch's CPU threads for the run (fewer threads leave a core to the UI);
    the process-wide setting is restored afterwards.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        self_labelled = yield from _make_self_labels(
            origin or model, self_label_boxes, read_patch, factor, config, cancel
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


@dataclass
class SubmitOutcome:
    """What a submitted batch led to: its scores per round, the check of the round in use, the fine-tune."""

    scores: dict[int, list[PatchScore]]
    comparison: Comparison | None  # round in use minus the round before it, on this batch
    rolled_back: bool
    harm: list[tuple[int, int, Comparison]]  # do no harm's steps back (round, reference, comparison); empty: kept
    shift: str | None  # the preset chosen from this batch (``auto``, first batch only)
    new_tissue: bool | None  # what ``auto``'s gate said of the slide's tissue (``None``: not asked, or no answer)
    start: UNet  # the model the fine-tune started from
    result: FinetuneResult | None  # ``None``: cancelled, or not tuned
    held_out_scores: list[PatchScore]  # the tuned round on each held-out audit of the batch, in order
    new_harm: list[tuple[int, int, Comparison]]  # the tuned round's check on the audits (empty: no harm seen)
    kept_after: int  # the round to use after it: the tuned round's index, or the round it fell back to
    tuned: bool = True  # False: no new correction to train on (a batch of audits alone)
    predictor: str = ""  # the predictor the tuned round's held-out scores were made under


def submit_events(
    batch: Sequence[Annotation],
    models: dict[int, UNet],
    current: int,
    previous: int | None,
    auto_rollback: bool,
    configs: dict[str, LoopConfig],
    factor: float,
    tune: Callable[[UNet, LoopConfig], Iterator[ProgressEvent]] | None,
    read_tissue: Callable[[], Sequence[np.ndarray]],
    predictors: dict[int, UNet] | None = None,
    tta: str = "none",
    held_out: Sequence[bool] = (),
    known: Sequence[dict[int, PatchScore]] = (),
) -> Iterator[ProgressEvent]:
    """Test-then-train: score the new corrections against the rounds, apply do-no-harm, then fine-tune.

    ``batch``: the new corrections and every audit no round has trained on (``held_out`` marks
    them; the comparison of the rounds reads all of them). The tuned round is then scored on the
    held-out audits too, so its estimate is known at once. ``tune=None``: nothing to train on.

    ``configs``: the loop settings, one entry (the preset in use) or ``centre`` and ``organ``
    when ``auto`` still has to choose from this batch. ``tune(start, config=...)``: the fine-tune
    (:func:`finetune_events` with the session's annotations bound). ``read_tissue()``: the tissue
    patches ``auto``'s gate reads (:func:`~napari_uga.audit.tissue_is_new`), read only when it
    chooses. ``predictors``: the network each round predicts with (default ``models``), under
    ``tta``; ``models`` are what training starts from. ``known``: per patch of ``batch``, scores an earlier
    Submit made with the same networks (the held-out audits'): kept, not made again. Returns a
    :class:`SubmitOutcome`.
    """
    known = list(known) or [{} for _ in batch]
    made = missing_scores(models, known)
    yield progress_event("scoring", 0, len(models), f"scoring {len(batch)} corrections against {len(models)} rounds "
                         f"({made} new scores)")  # fmt: skip
    try:
        images, masks = [a.image for a in batch], [a.mask for a in batch]
        scores = score_rounds(predictors or models, images, masks, factor, tta, known)
    except RuntimeError as exc:
        raise WorkerError(f"scoring the corrections failed: {exc}") from exc
    comparison = None if previous is None else compare_rounds(scores[current], scores[previous])
    per_patch = [{r: scored[k] for r, scored in scores.items()} for k in range(len(batch))]
    kept, harm = (current, []) if previous is None else round_to_keep(per_patch, current, previous)
    rolled_back = auto_rollback and bool(harm)
    shift, gate = None, {}
    if len(configs) > 1:  # auto: the starting model's score on this first batch, and whether the tissue is new
        yield progress_event("gate", 0, 1, "choosing the domain shift from the first batch")

        def new_tissue() -> bool | None:
            gate["new"] = tissue_is_new(models[0], read_tissue(), factor)
            return gate["new"]

        try:
            shift = choose_shift(scores[0], new_tissue)
        except RuntimeError as exc:
            raise WorkerError(f"reading the tissue for the domain-shift choice failed: {exc}") from exc
    config = configs[shift] if shift is not None else next(iter(configs.values()))
    start_index = kept if rolled_back else current
    start = models[start_index]
    result = None if tune is None else (yield from tune(start, config=config))
    flags = list(held_out) or [False] * len(batch)
    audits = [a for a, held in zip(batch, flags, strict=True) if held]
    held_scores = []
    if result is not None and audits:
        yield progress_event("scoring", 0, 1, f"scoring the new round on {len(audits)} held-out audit patches")
        # a tuned round's parent is the round it was tuned from, where that is a tuned round itself
        network = predicting_network(result.model, start if start_index > 0 else None, config.predictor)
        try:
            held_scores = score_rounds(
                {0: network}, [a.image for a in audits], [a.mask for a in audits], factor,
                prediction_tta(config.predictor),
            )[0]  # fmt: skip
        except RuntimeError as exc:  # the round stays; the next Submit scores it on the audits
            warnings.warn(f"scoring the new round on the audits failed: {exc}", RuntimeWarning, stacklevel=2)
    on_audits = [k for k, held in enumerate(flags) if held]
    new = start_index + 1  # the index the tuned round is recorded under
    kept_after, new_harm = new, []
    if held_scores:
        per_audit = [
            {start_index: scores[start_index][k], 0: scores[0][k], new: score}
            for k, score in zip(on_audits, held_scores, strict=True)
        ]
        kept_after, new_harm = round_to_keep(per_audit, new, start_index)
    return SubmitOutcome(
        scores, comparison, rolled_back, harm, shift, gate.get("new"), start, result, held_scores,
        new_harm, kept_after, tune is not None, config.predictor,
    )  # fmt: skip


def submit_worker(*args) -> GeneratorWorker:
    """An unstarted worker running :func:`submit_events` (same arguments)."""
    return _unstarted(submit_events, *args)


def _unstarted(function, *args, **options) -> FunctionWorker | GeneratorWorker:
    """A napari worker running ``function(*args)``, not started, whose errors only go to ``errored``."""
    return create_worker(function, *args, _start_thread=False, _ignore_errors=True, **options)


def maps_worker(mapper: TileMapper, store: MapStore, queue: TileQueue, cancel: CancelToken, threads: int | None):
    """An unstarted worker yielding :class:`~napari_uga.tiles.TileProgress` per finished tile or patch."""
    return _unstarted(maps_events, mapper, store, queue, cancel, threads)


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
    read_patch: Callable[[Box], np.ndarray] | None = None,
) -> GeneratorWorker:
    """An unstarted worker yielding progress events and returning a ``FinetuneResult`` (or ``None``)."""
    return _unstarted(
        finetune_events,
        model,
        list(annotations),
        factor,
        config,
        seed,
        cancel,
        threads,
        origin,
        list(self_label_boxes),
        read_patch,
    )


def qc_steps(
    model_path: str | None,
    pairs: list[Pair] | None,
    folder: tuple[str, str | None] | None,
    calibration: tuple[str, str] | str | None,
    settings: dict,
):
    """Load the network and the images, then run :func:`napari_uga.quality.iter_qc` (yields progress).

    ``calibration``: (images, masks) folders, or an annotation session folder (its audit patches,
    at the session's µm/px; the report then gains their ``calibration`` entry).
    """
    from ..io import load_pairs
    from ..models import load_model, working_factor
    from ..quality import DEFAULT_RULE, QCModel, iter_qc, session_calibration

    model = load_model(model_path, "auto")
    pairs = load_pairs(*folder) if pairs is None else pairs
    cal, cal_mpp, scope = None, settings["mpp"], None
    if isinstance(calibration, str):
        rule = settings.get("rule") or DEFAULT_RULE
        cal, cal_mpp, scope = session_calibration(calibration, rule, settings["alpha"], settings["delta"], cal_mpp)
    elif calibration:
        cal = load_pairs(*calibration)
    qc_model = QCModel.load(settings["qc_model"]) if settings["qc_model"] else None
    report, qc = yield from iter_qc(
        model, pairs, cal, settings["alpha"], settings["delta"], settings["threshold"], settings["method"],
        factor=working_factor(model, settings["mpp"]), qc_model=qc_model, rule=settings.get("rule"),
        calibration_factor=working_factor(model, cal_mpp),
    )  # fmt: skip
    if scope is not None:
        report["calibration"] = scope
    return report, qc


def qc_worker(
    model_path: str | None,
    pairs: list[Pair] | None,
    folder: tuple[str, str | None] | None,
    calibration: tuple[str, str] | str | None,
    settings: dict,
) -> GeneratorWorker:
    """An unstarted worker yielding (done, total) and returning (QC report, QC model)."""
    return _unstarted(qc_steps, model_path, pairs, folder, calibration, settings)
