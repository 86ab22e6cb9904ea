"""Dask batch on real clusters: local 2-worker cluster, a worker killed mid-batch, an external scheduler."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_uga.distributed import BatchOptions, calibrate_qc, run_batch
from napari_uga.io import InputError, load_pairs
from napari_uga.slides import MAP_NAMES, write_synthetic_slide
from napari_uga.wsi import list_inputs

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    """A real local cluster: 2 single-threaded worker processes."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _tiles(sample_dir: Path, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((sample_dir / "images").iterdir())[:n]
    for f in files:
        shutil.copy(f, folder / f.name)
    return [folder / f.name for f in files]


def _outputs_complete(out: Path, name: str) -> bool:
    return (out / f"{name}.json").is_file() and all((out / f"{name}_{k}.ome.tif").is_file() for k in MAP_NAMES)


def test_batch_tiles_and_split_slide_with_qc_failure_and_rerun(
    client, sample_dir, tiny_model, tiny_model_path, tmp_path
):
    images = tmp_path / "in"
    tiles = _tiles(sample_dir, images, 3)
    write_synthetic_slide(images / "slide.ome.tif", (1600, 2000), n_regions=3, tissue_fraction=0.15, seed=2)
    (images / "broken.png").write_bytes(b"this is not a png")
    calibration = load_pairs(sample_dir / "images", sample_dir / "masks")[-4:]
    qc = calibrate_qc(tiny_model, calibration, factor=0.5, samples=2)
    options = BatchOptions(samples=2, mpp=0.243, block=256, split_above=1000 * 1000, threads=1)
    out = tmp_path / "out"
    seen = []
    summary = run_batch(
        client, list_inputs(images), out, tiny_model_path, options, qc, progress=lambda d, t: seen.append((d, t))
    )

    assert summary["n_inputs"] == 5 and summary["n_ok"] == 4 and summary["n_failed"] == 1
    assert seen[-1] == (5, 5)
    by_name = {r["name"]: r for r in summary["slides"]}
    assert "broken.png" in by_name["broken"]["error"]
    slide = by_name["slide"]
    assert slide["kind"] == "slide" and slide["blocks_run"] < slide["blocks_total"] == 16
    assert summary["n_tasks"] == len(tiles) + 1 + slide["blocks_run"] + 1
    for name in [t.stem for t in tiles] + ["slide"]:
        assert _outputs_complete(out, name)
        assert 0.0 <= by_name[name]["dice_pred"] <= 1.0 and isinstance(by_name[name]["accepted"], bool)
    assert not list(out.rglob(".*.partial")) and not (out / ".scratch").exists()
    rows = (out / "qc.csv").read_text().splitlines()
    assert rows[0] == "name,dice_pred,accepted,in_domain,domain_p" and len(rows) == 6
    head = "slide," + f"{slide['dice_pred']:.4f}," + str(slide["accepted"]).lower()
    assert rows[-1] == f"{head},{str(slide['in_domain']).lower()},{slide['domain_p']:.4f}"
    assert json.loads((out / "summary.json").read_text())["n_ok"] == 4
    _check_qc_map(out, slide, (1600, 2000))

    again = run_batch(client, list_inputs(images), out, tiny_model_path, options, qc)
    assert again["n_skipped"] == 4 and again["n_failed"] == 1 and again["n_tasks"] == 1
    changed = run_batch(
        client, list_inputs(tiles[0]), out, tiny_model_path, BatchOptions(samples=3, mpp=0.243, threads=1), None
    )
    assert changed["n_skipped"] == 0 and changed["slides"][0]["dice_pred"] is None


def _check_qc_map(out: Path, record: dict, shape: tuple[int, int]) -> None:
    """The slide's QC map: one pixel per 512 px level-0 cell, its µm/px, states where the cells were checked."""
    import numpy as np
    import tifffile

    from napari_uga.qc_map import grid_shape

    summary = record["qc_map"]
    with tifffile.TiffFile(record["outputs"]["qc_map"]) as tif:
        values = tif.asarray()
        assert 'PhysicalSizeX="124.416"' in tif.ome_metadata  # 0.243 µm/px x 512 px
    assert values.shape == (3, *grid_shape(shape)) and summary["cell"] == 512
    checked = values[1] > 0
    assert checked.sum() == summary["n_cells"] > 0 and np.isfinite(values[0][checked]).all()
    assert summary["share_accepted"] + summary["share_review"] + summary["share_out_of_domain"] == pytest.approx(1)
    regions = json.loads(Path(record["outputs"]["qc_regions"]).read_text())
    assert len(regions["features"]) == len(summary["worst"])
    for feature, region in zip(regions["features"], summary["worst"], strict=True):
        assert values[1, region["y"] // 512, region["x"] // 512] > 1  # a listed region was not accepted
        assert feature["geometry"]["coordinates"][0][0] == [region["x"], region["y"]]


def test_cli_batch_stops_on_a_slide_without_scale(tiny_model_path, tmp_path, capsys):
    """The TCGA crop says no µm/px: ``uga batch`` asks for --mpp in one line before starting a cluster."""
    from napari_uga.cli import main

    slide = Path(__file__).parent / "data" / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
    code = main(["batch", "--images", str(slide), "--out", str(tmp_path / "out"), "--model", str(tiny_model_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "no µm/px in the file; give --mpp" in err
    assert not (tmp_path / "out").exists()


def test_list_inputs_validates(tmp_path):
    with pytest.raises(InputError, match="no such"):
        list_inputs(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no image"):
        list_inputs(tmp_path)
    with pytest.raises(InputError, match="no image"):
        list_inputs(str(tmp_path / "*.png"))


def test_worker_killed_mid_batch_loses_nothing(sample_dir, tiny_model_path, tmp_path):
    tiles = _tiles(sample_dir, tmp_path / "in", 8)
    out = tmp_path / "out"
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    killed = []
    with distributed.Client(cluster) as c:
        pids = sorted(c.run(os.getpid).values())

        def kill_one(done: int, total: int) -> None:
            if done >= 1 and not killed:
                killed.append(done)
                os.kill(pids[0], signal.SIGKILL)

        summary = run_batch(
            c, tiles, out, tiny_model_path, BatchOptions(samples=8, mpp=0.243, threads=1), None, progress=kill_one
        )
        assert pids[0] not in c.run(os.getpid).values()
    cluster.close()
    assert killed and killed[0] < len(tiles)  # killed while tasks were still pending
    assert summary["n_ok"] == len(tiles) and summary["n_failed"] == 0
    for t in tiles:
        assert _outputs_complete(out, t.stem)
    assert not list(out.glob(".*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_batch_on_external_scheduler(sample_dir, tiny_model_path, tmp_path, capsys):
    from napari_uga.cli import main

    tiles = _tiles(sample_dir, tmp_path / "in", 2)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).parent / "dask")
    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], stderr=subprocess.DEVNULL
        )
    ]
    try:
        procs.append(
            subprocess.Popen(
                [dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                stderr=subprocess.DEVNULL,
            )
        )
        with distributed.Client(address, timeout="60s") as c:
            c.wait_for_workers(1, timeout=60)
        code = main(["batch", "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--scheduler", address,
                     "--model", str(tiny_model_path), "--samples", "2", "--no-qc", "--json",
                     "--mpp", "0.243"])  # fmt: skip
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["n_ok"] == len(tiles) and payload["failed"] == []
    for t in tiles:
        assert _outputs_complete(tmp_path / "out", t.stem)
    assert (tmp_path / "out" / "qc.csv").read_text().splitlines()[1:] == [f"{t.stem},,,," for t in tiles]


def test_cli_batch_bad_scheduler_is_one_line_error(tiny_model_path, sample_dir, tmp_path, capsys):
    from napari_uga.cli import main

    _tiles(sample_dir, tmp_path / "in", 1)
    start = time.perf_counter()
    code = main(["batch", "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--scheduler",
                 f"tcp://127.0.0.1:{_free_port()}", "--model", str(tiny_model_path), "--no-qc",
                 "--mpp", "0.243"])  # fmt: skip
    assert code == 2 and "--scheduler" in capsys.readouterr().err
    assert time.perf_counter() - start < 60
