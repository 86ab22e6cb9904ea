"""The ``uga`` command line: contracts (JSON keys, files) and one-line errors on bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_uga.cli import main
from napari_uga.io import InputError, write_array
from napari_uga.models import load_model

UGA = [sys.executable, "-m", "napari_uga.cli"]


def _subset(src: Path, dst: Path, n: int, stride: int = 1) -> Path:
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True)
        for f in sorted((src / sub).iterdir())[::stride][:n]:
            shutil.copy(f, dst / sub / f.name)
    return dst


def _run(args, json_out=True):
    proc = subprocess.run(
        [*UGA, *args, *(["--json"] if json_out else [])],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "DISPLAY": ""},
    )
    return proc


def test_evaluate_json_contract(tmp_path, sample_dir, tiny_model_path):
    data = _subset(sample_dir, tmp_path / "d", 3, stride=8)
    proc = _run(
        ["evaluate", "--images", str(data / "images"), "--masks", str(data / "masks"), "--model", str(tiny_model_path),
         "--mpp", "0.243"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"dice_global", "dice_mean", "n_images", "per_image"}
    assert out["n_images"] == 3 and all(set(r) == {"name", "dice"} for r in out["per_image"])
    assert 0 <= out["dice_global"] <= 1


def test_predict_writes_three_files_per_image(tmp_path, sample_dir, tiny_model_path, capsys):
    data = _subset(sample_dir, tmp_path / "d", 2)
    code = main(
        [
            "predict",
            "--images",
            str(data / "images"),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tiny_model_path),
            "--samples",
            "2",
            "--json",
            "--mpp",
            "0.243",
        ]
    )
    assert code == 0
    import tifffile

    for f in sorted((data / "images").iterdir()):
        prob = tifffile.imread(tmp_path / "o" / f"{f.stem}_prob.tif")
        unc = tifffile.imread(tmp_path / "o" / f"{f.stem}_uncertainty.tif")
        from napari_uga.io import read_mask

        mask = read_mask(tmp_path / "o" / f"{f.stem}_mask.png")
        assert prob.dtype == unc.dtype == np.float32 and prob.shape == unc.shape == mask.shape == (256, 256)
        assert np.array_equal(mask, (prob >= 0.5).astype(np.uint8))
    assert json.loads(capsys.readouterr().out)["n_images"] == 2


def test_train_writes_loadable_safetensors(tmp_path, sample_dir):
    data = _subset(sample_dir, tmp_path / "d", 4, stride=8)
    out = tmp_path / "m.safetensors"
    code = main(
        [
            "train",
            "--images",
            str(data / "images"),
            "--masks",
            str(data / "masks"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--base",
            "4",
            "--json",
            "--mpp",
            "0.243",
        ]
    )
    assert code == 0
    model = load_model(out, "cpu")
    assert model.config.base == 4


def test_simulate_json_contract(tmp_path, sample_dir, tiny_model_path, capsys):
    pool = _subset(sample_dir, tmp_path / "pool", 4, stride=8)
    test = _subset(sample_dir, tmp_path / "test", 2, stride=16)
    code = main(
        [
            "simulate",
            "--pool-images",
            str(pool / "images"),
            "--pool-masks",
            str(pool / "masks"),
            "--test-images",
            str(test / "images"),
            "--test-masks",
            str(test / "masks"),
            "--budgets",
            "0,1",
            "--strategy",
            "random",
            "--seeds",
            "2",
            "--model",
            str(tiny_model_path),
            "--patch-size",
            "128",
            "--steps",
            "2",
            "--samples",
            "2",
            "--mpp",
            "0.243",
            "--shift",
            "organ",
            "--json",
        ]
    )  # organ: no replay
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "random"
    assert [c["budget"] for c in out["curve"]] == [0, 1]
    for c in out["curve"]:
        assert len(c["per_seed"]) == 2
        assert c["dice_global"] == pytest.approx(np.mean(c["per_seed"]))
        assert c["dice_global_std"] == pytest.approx(np.std(c["per_seed"]))
        assert len(c["estimated_dice_per_seed"]) == 2 and isinstance(c["rollbacks"], int)
        known = [e for e in c["estimated_dice_per_seed"] if e is not None]
        assert c["estimated_dice"] == (pytest.approx(np.mean(known)) if known else None)
        audits = c["estimate_audits_per_seed"]  # no estimate rests on no audit
        assert all((n > 0) == (e is not None) for n, e in zip(audits, c["estimated_dice_per_seed"], strict=True))
    assert out["shift"] == ["organ", "organ"]  # given, not chosen


def test_simulate_proposes_with_the_presets_rule_unless_told(tmp_path, sample_dir, tiny_model_path, capsys):
    pool = _subset(sample_dir, tmp_path / "pool", 4, stride=8)
    test = _subset(sample_dir, tmp_path / "test", 1, stride=16)
    data = ["--pool-images", str(pool / "images"), "--pool-masks", str(pool / "masks"),
            "--test-images", str(test / "images"), "--test-masks", str(test / "masks")]  # fmt: skip
    quick = ["--budgets", "0,1", "--seeds", "1", "--model", str(tiny_model_path), "--patch-size", "128",
             "--steps", "1", "--samples", "2", "--mpp", "0.243", "--audit-share", "0", "--json"]  # fmt: skip
    for shift, strategy in (("organ", "random_first"), ("centre", "uncertainty")):
        assert main(["simulate", *data, *quick, "--shift", shift]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["strategy"] == strategy
        reasons = [p["reason"] for p in out["picks"][0][0]]
        first = "random_first (random while nothing is labelled, then uncertainty): random: drawn at random"
        assert reasons and all(r.startswith(first if shift == "organ" else "uncertainty: ") for r in reasons)


def test_headless_demo_writes_report_and_plots(tmp_path, tiny_model_path):
    proc = _run(
        [
            "demo",
            "--headless",
            "--out",
            str(tmp_path / "demo"),
            "--model",
            str(tiny_model_path),
            "--budgets",
            "0,2",
            "--batch",
            "2",
            "--steps",
            "2",
            "--samples",
            "2",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [c["budget"] for c in report["curve"]] == [0, 2]
    assert not set(report["pool"]) & set(report["test"])
    assert report["shift"] in ("centre", "organ")  # --shift auto (the default) chose from the first batch
    assert report["strategy"] == "uncertainty"  # auto proposes its first batch as centre does
    assert {"estimated_dice", "estimate_interval", "estimate_audits", "round_in_use"} <= set(report["curve"][1])
    # the truth the estimate is about: the pool's unannotated tissue, scored against the sample's masks
    assert all(c["tissue_dice"] is None or 0 <= c["tissue_dice"] <= 1 for c in report["curve"])
    assert report["curve"][0]["tissue_dice"] is not None
    assert report["handed_over"]["round"] in (0, 1) and 0 <= report["handed_over"]["dice_global"] <= 1
    for name in ("overlay.png", "dice_vs_round.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 5000


def _grey_image_dir(tmp_path):
    d = tmp_path / "grey"
    d.mkdir()
    write_array(d / "g.png", np.zeros((128, 128), np.uint8))
    return d


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no such file or folder"),
        ("not_image", "not a readable image"),
        ("grey", "expected an RGB image"),
        ("mismatch", "mask is"),
        ("bad_model", "not a napari-uga safetensors weights file"),
        ("bad_budgets", "--budgets"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, sample_dir, case, expected):
    images, masks = sample_dir / "images", sample_dir / "masks"
    extra = []
    command = "evaluate"
    if case == "missing":
        images = tmp_path / "nope"
    elif case == "not_image":
        images = tmp_path / "txt"
        images.mkdir()
        (images / "a.png").write_text("hello")
    elif case == "grey":
        images = _grey_image_dir(tmp_path)
    elif case == "mismatch":
        images = _subset(sample_dir, tmp_path / "d", 1) / "images"
        masks = tmp_path / "d" / "masks"
        name = next(masks.iterdir()).name
        write_array(masks / name, np.zeros((100, 100), np.uint8))
    elif case == "bad_model":
        bad = tmp_path / "evil.safetensors"
        bad.write_bytes(b"\x80\x04not safetensors")
        extra = ["--model", str(bad)]
    elif case == "bad_budgets":
        command = "simulate"
    args = [command, "--images", str(images), "--masks", str(masks), "--mpp", "0.243", *extra]
    if command == "simulate":
        args = [
            "simulate",
            "--pool-images",
            str(images),
            "--pool-masks",
            str(masks),
            "--test-images",
            str(images),
            "--test-masks",
            str(masks),
            "--budgets",
            "five",
        ]
    proc = _run(args, json_out=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_explicit_loop_options_override_the_shift_preset():
    import argparse

    from napari_uga.cli.simulate import add_loop_options, loop_config

    parser = argparse.ArgumentParser()
    add_loop_options(parser)
    organ = loop_config(parser.parse_args(["--shift", "organ"]), 256)
    assert (organ.steps, organ.replay_share, organ.freeze_norm, organ.anchor) == (400, 0.0, False, 0.0)
    mixed = loop_config(parser.parse_args(["--shift", "organ", "--steps", "7", "--replay-share", "0.3",
                                           "--norm", "frozen", "--anchor", "0.5"]), 128)  # fmt: skip
    assert (mixed.steps, mixed.replay_share, mixed.freeze_norm, mixed.anchor, mixed.patch) == (7, 0.3, True, 0.5, 128)
    assert loop_config(parser.parse_args(["--shift", "organ", "--self-share", "0.2"]), 256).self_share == 0.2
    assert (organ.subdivide, organ.diversity) == (2, "clusters")  # quarter patches over appearance clusters
    whole = loop_config(parser.parse_args(["--shift", "organ", "--subdivide", "1", "--diversity", "none"]), 256)
    assert (whole.subdivide, whole.diversity, whole.steps) == (1, "none", 400)
    assert loop_config(parser.parse_args(["--shift", "centre"]), 256).subdivide == 1
    with pytest.raises(InputError, match="--anchor"):
        loop_config(parser.parse_args(["--anchor", "-1"]), 256)
    with pytest.raises(InputError, match="--self-share"):
        loop_config(parser.parse_args(["--replay-share", "0.6", "--self-share", "0.5"]), 256)


def test_predict_reads_vendor_slides_through_the_slide_abstraction(tmp_path, tiny_model_path, capsys):
    from napari_uga.slides import write_synthetic_slide

    wsi = Path(__file__).resolve().parent / "data" / "wsi"
    slides = tmp_path / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "large.ome.tif", (4200, 4200), n_regions=2, tissue_fraction=0.05, seed=1)
    for source in (wsi / "CMU-1-Small-Region.svs", wsi / "CMU-1-Small-Region-dicom"):
        code = main(["predict", "--images", str(source), "--out", str(tmp_path / "o"), "--model",
                     str(tiny_model_path), "--samples", "1", "--json"])  # fmt: skip
        assert code == 0
    code = main(["predict", "--images", str(slides), "--out", str(tmp_path / "o"), "--model", str(tiny_model_path),
                 "--samples", "1", "--json"])  # fmt: skip
    assert code == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(payload["images"][0]) == {"name", "probability", "entropy", "prediction"}  # a large slide: pyramids
    import tifffile

    for name in ("CMU-1-Small-Region", "CMU-1-Small-Region-dicom"):
        assert tifffile.imread(tmp_path / "o" / f"{name}_prob.tif").shape == (2967, 2220)
    assert (tmp_path / "o" / "large_probability.ome.tif").is_file()
