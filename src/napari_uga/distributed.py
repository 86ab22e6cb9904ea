"""Batch uncertainty + QC over many images and whole slides on a Dask cluster.

Tasks take paths and return small dicts; the network is loaded inside each worker and cached
per process. An image (or a small slide) is one task; a large slide is planned on the client
(level, tissue, blocks), split into one task per tissue block (each writes its chunk-aligned
block into a scratch zarr store), and finished by a task that streams the OME-TIFF pyramids and
the slide's QC. Every output is written under a temporary name and renamed; a slide's
``<name>.json`` record is written last, so a re-run skips exactly the finished slides. A task
that fails is reported in the summary while the rest finish; a worker that dies is replaced by
its nanny and its tasks rerun (Dask's ``allowed-failures``).
"""

from __future__ import annotations

import csv
import io as _bytesio
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .io import InputError, atomic_write_bytes, atomic_write_json
from .wsi import is_large, read_whole, slide_name

_MODELS: dict[tuple, object] = {}


@dataclass(frozen=True)
class BatchOptions:
    """Settings shared by every task of a batch."""

    samples: int = 8
    tta: str = "none"
    mpp: float | None = None
    block: int = 2048
    margin: int = 64
    batch_size: int = 1  # inference tiles (512 px working scale) per network call
    split_above: int = 4096 * 4096  # source pixels; larger TIFFs are split into blocks
    device: str = "auto"
    threads: int = 0  # torch threads per worker (0 = leave torch's default)


def cached_model(model_path: str, device: str = "auto", threads: int = 0):
    """The network from ``model_path``, loaded once per worker process (keyed by path, mtime, device)."""
    import torch

    from .models import load_model

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    device = _worker_device(device)
    key = (model_path, os.path.getmtime(model_path), device)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(model_path, device)
    return _MODELS[key]


def _worker_device(device: str) -> str:
    """``auto`` on a multi-GPU machine: the GPU matching the local worker's number, so workers spread out."""
    import torch

    if device != "auto" or torch.cuda.device_count() < 2:
        return device
    from distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:  # not inside a worker
        return device
    return f"cuda:{int(name) % torch.cuda.device_count()}" if str(name).isdigit() else device


def record_path(out_dir: str | os.PathLike, name: str) -> Path:
    """The per-slide record; written last, it marks the slide as finished."""
    return Path(out_dir) / f"{name}.json"


def settings_key(model_path: str, options: dict, qc: dict | None) -> str:
    """A short hash of what determines a slide's outputs: weights (path, mtime), options, QC model."""
    import hashlib

    payload = {"model": [model_path, os.path.getmtime(model_path)], "options": options, "qc": qc}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_record(out_dir: str | os.PathLike, name: str, key: str) -> dict | None:
    """The record of a slide finished by an earlier run with the same settings (all outputs present), else ``None``."""
    path = record_path(out_dir, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    outputs = record.get("outputs", {})
    if (
        record.get("status") != "ok"
        or record.get("settings") != key
        or not outputs
        or not all(Path(p).is_file() for p in outputs.values())
    ):
        return None
    return record


def calibrate_qc(
    model, pairs: Sequence, factor: float, samples: int, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Fit a QC model on labelled target-domain tiles (on the client); returns its dict for the tasks."""
    from .metrics import dice
    from .quality import compute_features, fit_qc_model

    rows, truth = [], []
    for i, pair in enumerate(pairs):
        if pair.mask is None:
            raise InputError(f"{pair.name}: every QC calibration image needs a mask")
        row, prediction = compute_features(model, pair.image, factor, samples)
        rows.append(row)
        truth.append(dice(prediction, pair.mask))
        if progress is not None:
            progress(i + 1, len(pairs))
    info = {"calibration_images": [p.name for p in pairs]}
    return fit_qc_model(rows, truth, samples=samples, info=info, tumour=[bool(p.mask.any()) for p in pairs]).to_dict()


def _qc_row(qc: dict | None, rows: Sequence[dict]) -> dict:
    """Predicted Dice, acceptance and the exchangeability gate of one image's feature row (none: QC off)."""
    if qc is None or not rows:
        return {"dice_pred": None, "accepted": None, "in_domain": None, "domain_p": None}
    from .quality import QCModel

    model = QCModel.from_dict(qc)
    pred, accepted, p_values = model.decide(list(rows))
    domain_p = float(p_values[0])
    return {
        "dice_pred": float(pred[0]),
        "accepted": bool(accepted[0]),
        "in_domain": bool(model.in_domain(p_values)[0]),
        "domain_p": domain_p if np.isfinite(domain_p) else None,
    }


def image_task(path: str, out_dir: str, model_path: str, options: dict, qc: dict | None, key: str) -> dict:
    """One image or small slide in one task: maps at the image's resolution, OME-TIFFs, QC, record.

    An input larger than one QC map cell gets its QC cell by cell (:mod:`napari_uga.qc_map`):
    the map, its summary and the worst regions; a tile is judged whole.
    """
    from .models import working_factor
    from .slides import INFER_TILE, output_paths, write_pyramid_array
    from .uncertainty import compute_uncertainty_safe

    start = time.perf_counter()
    opts = BatchOptions(**options)
    model = cached_model(model_path, opts.device, opts.threads)
    image, mpp = read_whole(Path(path), opts.mpp)
    factor = working_factor(model, mpp)
    maps = compute_uncertainty_safe(
        model, image, samples=opts.samples, tta=opts.tta, factor=factor, tile=INFER_TILE, batch_size=opts.batch_size
    )
    name = slide_name(Path(path))
    paths = output_paths(out_dir, name)
    write_pyramid_array(paths["probability"], maps.probability, mpp, name=f"{name} probability")
    write_pyramid_array(paths["entropy"], maps.entropy, mpp, name=f"{name} entropy")
    write_pyramid_array(paths["prediction"], maps.prediction, mpp, "uint8", name=f"{name} prediction")
    fields = _qc_row(None, [])
    if qc is not None:  # the QC pass exactly as calibrated (its own samples, TTA and seed)
        fields = _image_qc(model, image, factor, mpp, qc, out_dir, name)
        paths.update(fields.pop("paths", {}))
    record = {
        "name": name,
        "path": str(path),
        "status": "ok",
        "kind": "image",
        "shape": list(image.shape[:2]),
        "mpp": mpp,
        "megapixels": image.shape[0] * image.shape[1] / 1e6,
        "seconds": time.perf_counter() - start,
        "outputs": {k: str(v) for k, v in paths.items()},
        "settings": key,
        **fields,
    }
    atomic_write_json(record_path(out_dir, name), record)
    return record


def _image_qc(model, image: np.ndarray, factor: float, mpp: float, qc: dict, out_dir: str, name: str) -> dict:
    """QC record fields of an in-memory input: whole (a tile of at most one cell) or cell by cell, with its map."""
    from .qc_map import QC_CELL, cell_rows, image_tissue, slide_qc, tissue_cells
    from .quality import QCModel, compute_features

    if max(image.shape[:2]) <= QC_CELL:
        return _qc_row(qc, [compute_features(model, image, factor, qc["samples"], qc["tta"])[0]])
    cells = tissue_cells(image.shape[:2], *image_tissue(image))
    rows = cell_rows(model, image, cells, factor, qc["samples"], qc["tta"])
    fields, paths = slide_qc(QCModel.from_dict(qc), image.shape[:2], cells, rows, mpp, out_dir, name)
    return {**fields, "paths": paths}


def _qc_sampling(qc: dict | None) -> tuple[int, str] | None:
    """The QC's own MC samples and TTA (the block tasks compute the cells' rows with them)."""
    return None if qc is None else (int(qc["samples"]), str(qc["tta"]))


def block_task(
    plan: dict, index: tuple[int, int], model_path: str, options: dict, qc_sampling: tuple[int, str] | None
) -> list[dict]:
    """One tissue block of a large slide into the scratch store; the QC rows of its map cells when asked."""
    from .slides import SlidePlan, process_block

    opts = BatchOptions(**options)
    model = cached_model(model_path, opts.device, opts.threads)
    return process_block(
        model, SlidePlan.from_dict(plan), tuple(index), opts.samples, opts.tta, opts.batch_size, opts.mpp,
        None if qc_sampling is None else tuple(qc_sampling),
    )  # fmt: skip


def finalize_task(
    plan: dict, out_dir: str, qc: dict | None, mpp: float | None, key: str, start: float, *block_rows: list[dict]
) -> dict:
    """Stream a slide's pyramids from its scratch store, decide its QC map cells, write its record."""
    from .slides import SlidePlan, finalize_slide, summarize_plan

    slide_plan = SlidePlan.from_dict(plan)
    paths = finalize_slide(slide_plan, out_dir)
    cells = [cell for rows in block_rows for cell in rows]
    h, w = slide_plan.source_shape
    fields = _qc_row(None, [])
    if qc is not None:
        from .qc_map import slide_qc
        from .quality import QCModel
        from .wsi import Slide

        with Slide(slide_plan.path, mpp) as slide:
            level0_mpp = slide.require_mpp()
        boxes, rows = [tuple(c["cell"]) for c in cells], [c["row"] for c in cells]
        fields, map_paths = slide_qc(QCModel.from_dict(qc), (h, w), boxes, rows, level0_mpp, out_dir, slide_plan.name)
        paths.update(map_paths)
    record = {
        **summarize_plan(slide_plan, paths),
        "path": slide_plan.path,
        "status": "ok",
        "kind": "slide",
        "megapixels": h * w / 1e6,
        "seconds": time.time() - start,
        "settings": key,
        **fields,
    }
    atomic_write_json(record_path(out_dir, slide_plan.name), record)
    return record


def _has_gpu_workers(client) -> bool:
    workers = client.scheduler_info().get("workers", {}).values()
    return any(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)


def _failed(path: Path, error: BaseException | str) -> dict:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {
        "name": slide_name(path),
        "path": str(path),
        "status": "failed",
        "error": message,
        "dice_pred": None,
        "accepted": None,
    }


def submit_all(
    client, inputs: Sequence[Path], out_dir: Path, model_path: str, opts: BatchOptions, qc: dict | None
) -> tuple[dict, list[dict], int]:
    """Submit every unfinished input; returns {future: input path}, records for skipped/failed inputs, task count."""
    from .slides import plan_slide

    input_mpp = cached_model(model_path, "cpu").config.input_mpp
    resources = {"GPU": 1} if _has_gpu_workers(client) else None
    options = asdict(opts)
    settings = settings_key(model_path, options, qc)
    finals: dict = {}
    early: list[dict] = []
    n_tasks = 0
    for path in inputs:
        name = slide_name(path)
        done = finished_record(out_dir, name, settings)
        if done is not None:
            early.append({**done, "skipped": True})
            continue
        try:
            large = is_large(path, opts.mpp, opts.split_above)
            if large:
                plan = plan_slide(
                    path,
                    out_dir / ".scratch" / f"{name}.zarr",
                    input_mpp,
                    opts.mpp,
                    block=opts.block,
                    margin=opts.margin,
                )
        except Exception as exc:  # noqa: BLE001 - a slide that cannot be planned fails alone
            early.append(_failed(path, str(exc) if isinstance(exc, InputError) else exc))
            continue
        if not large:
            future = client.submit(
                image_task,
                str(path),
                str(out_dir),
                model_path,
                options,
                qc,
                settings,
                key=f"image-{name}-{time.time_ns()}",
                resources=resources,
                retries=1,
            )
            finals[future] = path
            n_tasks += 1
            continue
        plan_dict = plan.to_dict()
        blocks = [
            client.submit(
                block_task,
                plan_dict,
                list(index),
                model_path,
                options,
                _qc_sampling(qc),
                key=f"block-{name}-{index[0]}-{index[1]}-{time.time_ns()}",
                resources=resources,
                retries=1,
            )
            for index in plan.blocks
        ]
        future = client.submit(
            finalize_task,
            plan_dict,
            str(out_dir),
            qc,
            opts.mpp,
            settings,
            time.time(),
            *blocks,
            key=f"finalize-{name}-{time.time_ns()}",
            retries=1,
        )
        finals[future] = path
        n_tasks += len(blocks) + 1
    return finals, early, n_tasks


def run_batch(
    client,
    inputs: Sequence[Path],
    out_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    options: BatchOptions = BatchOptions(),
    qc: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Process every input on ``client``'s cluster; write ``qc.csv`` and ``summary.json``; return the summary.

    Parameters
    ----------
    client : a ``distributed.Client``.
    inputs : image / slide paths (see :func:`napari_uga.wsi.list_inputs`).
    out_dir : outputs per input (``<name>_{probability,entropy,prediction}.ome.tif``, ``<name>.json``).
    model_path : the weights file, loaded inside the workers.
    qc : a ``QCModel.to_dict()``, or ``None`` to skip QC.
    progress : called with (inputs done, inputs total).
    """
    from distributed import as_completed

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    finals, records, n_tasks = submit_all(client, inputs, out_dir, str(model_path), options, qc)
    total = len(inputs)
    if progress is not None:
        progress(len(records), total)
    for future in as_completed(list(finals)):
        path = finals[future]
        if future.status == "finished":
            records.append(future.result())
        else:
            records.append(_failed(path, future.exception()))
        if progress is not None:
            progress(len(records), total)
    order = {slide_name(p): i for i, p in enumerate(inputs)}
    records.sort(key=lambda r: order.get(r["name"], len(order)))
    summary = _summary(records, time.perf_counter() - start, n_tasks)
    if (out_dir / ".scratch").is_dir() and not any((out_dir / ".scratch").iterdir()):
        (out_dir / ".scratch").rmdir()
    write_qc_csv(out_dir / "qc.csv", records)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _summary(records: list[dict], seconds: float, n_tasks: int) -> dict:
    ran = [r for r in records if r["status"] == "ok" and not r.get("skipped")]
    megapixels = sum(r.get("megapixels", 0.0) for r in ran)
    return {
        "n_inputs": len(records),
        "n_ok": sum(r["status"] == "ok" for r in records),
        "n_failed": sum(r["status"] == "failed" for r in records),
        "n_skipped": sum(bool(r.get("skipped")) for r in records),
        "n_tasks": n_tasks,
        "seconds": seconds,
        "megapixels": megapixels,
        "megapixels_per_second": megapixels / seconds if seconds > 0 else 0.0,
        "slides": records,
    }


def write_qc_csv(path: Path, records: Sequence[dict]) -> None:
    """``name, dice_pred, accepted, in_domain, domain_p`` for every input (empty cells where QC did not run)."""
    buffer = _bytesio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "dice_pred", "accepted", "in_domain", "domain_p"])
    for r in records:
        dice_pred = "" if r.get("dice_pred") is None else f"{r['dice_pred']:.4f}"
        accepted = "" if r.get("accepted") is None else str(bool(r["accepted"])).lower()
        in_domain = "" if r.get("in_domain") is None else str(bool(r["in_domain"])).lower()
        domain_p = "" if r.get("domain_p") is None else f"{r['domain_p']:.4f}"
        writer.writerow([r["name"], dice_pred, accepted, in_domain, domain_p])
    atomic_write_bytes(path, buffer.getvalue().encode())


def make_client(scheduler: str | None = None, workers: int = 2):
    """A client of the scheduler at ``scheduler``, or of a new ``LocalCluster`` (GPU workers when CUDA is present).

    The local cluster has one single-threaded worker process per GPU (marked with the ``GPU``
    resource) or ``workers`` CPU worker processes; torch threads are split between them.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="10s")
        except OSError as exc:
            raise InputError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    import torch

    gpus = torch.cuda.device_count()
    kwargs = {"n_workers": gpus, "resources": {"GPU": 1}} if gpus else {"n_workers": workers}
    cluster = LocalCluster(threads_per_worker=1, processes=True, dashboard_address=None, **kwargs)
    return Client(cluster)


def worker_threads(workers: int) -> int:
    """Torch threads per local CPU worker so that workers do not oversubscribe the cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
