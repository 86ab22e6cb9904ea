"""``uga qc``: the JSON contract on real tiles with a tiny real network, and one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_uga.cli import main
from napari_uga.io import write_array

KEYS = {"auroc", "aurc", "eaurc", "naurc", "mae", "spearman", "accepted_precision", "coverage"}
MPP = ["--mpp", "0.243"]  # the sample and EBHI tiles as the benchmarks run them; tiles carry no scale


def _subset(src: Path, dst: Path, names: list[str]) -> Path:
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(src / sub / name, dst / sub / name)
    return dst


@pytest.fixture()
def folders(tmp_path, sample_dir):
    names = sorted(p.name for p in (sample_dir / "images").iterdir())
    return _subset(sample_dir, tmp_path / "cal", names[::8]), _subset(sample_dir, tmp_path / "test", names[3::14])


def test_json_contract_with_calibration_and_saved_model(folders, tiny_model_path, tmp_path, capsys):
    cal, test = folders
    saved = tmp_path / "qc.json"
    args = ["qc", "--images", str(test / "images"), "--masks", str(test / "masks"),
            "--calibration-images", str(cal / "images"), "--calibration-masks", str(cal / "masks"),
            "--model", str(tiny_model_path), "--samples", "2", "--save-qc-model", str(saved),
            "--json", *MPP]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"per_image", "threshold", "alpha", "metrics"} <= set(out) and set(out["metrics"]) == KEYS
    assert out["method_reason"].startswith(f"auto chose {out['method']}: out-of-fold normalised AURC")
    assert [r["name"] for r in out["per_image"]] == sorted(p.stem for p in (test / "images").iterdir())
    for row in out["per_image"]:
        assert set(row) == {"name", "dice_pred", "accepted", "dice_true", "in_domain", "domain_p", "reason"}
        assert 0 <= row["dice_pred"] <= 1 and isinstance(row["accepted"], bool) and 0 <= row["dice_true"] <= 1
        assert isinstance(row["in_domain"], bool) and 0 < row["domain_p"] <= 1
        assert (row["reason"] == "") == row["accepted"]
    # 4 calibration tiles: the gate cannot flag anything at 0.05, and the report says so
    assert out["domain_level"] == 0.05 and "cannot flag anything with 4 calibration images" in out["domain_note"]
    # the saved QC model reproduces the predictions without calibration images and without masks
    proc = subprocess.run(
        [sys.executable, "-m", "napari_uga.cli", "qc", "--images", str(test / "images"), "--qc-model", str(saved),
         "--model", str(tiny_model_path), "--rule", "fdr", "--json", *MPP],
        check=False, capture_output=True, text=True, env={**os.environ, "DISPLAY": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["metrics"] == {} and all(r["dice_true"] is None for r in again["per_image"])
    assert out["rule"] == "ltt" and again["rule"] == "fdr" and again["cut"] is None
    np.testing.assert_allclose([r["dice_pred"] for r in again["per_image"]], [r["dice_pred"] for r in out["per_image"]])


def test_colon_tiles_under_the_shipped_lymph_node_calibration_go_to_review(capsys):
    """What a new user gets: colon biopsies checked with the shipped calibration (lymph node, RUMC)
    are unlike its images, so none is accepted, each with the reason; without the gate all were."""
    ebhi = Path(__file__).parent / "data" / "ebhi_seg"
    assert main(["qc", "--images", str(ebhi / "images"), "--masks", str(ebhi / "masks"), "--json", *MPP]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["per_image"]) == 6 and out["method"] == "entropy"
    for row in out["per_image"]:
        assert not row["in_domain"] and not row["accepted"] and row["domain_p"] <= 0.05
        assert row["reason"].startswith("unlike the calibration images: atypicality p = ")
    assert out["domain_note"].startswith("6 of 6 images are unlike the calibration images")
    assert out["metrics"]["coverage"] == 0.0
    assert main(["qc", "--images", str(ebhi / "images"), "--domain-level", "0", *MPP]) == 0  # the gate off, human table
    text = capsys.readouterr().out
    assert [line.split()[2] for line in text.splitlines()[1:7]] == ["accept"] * 6 and "gate is off" in text


def _error(capsys, args, mpp=MPP) -> str:
    assert main(["qc", *args, *mpp]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("uga qc: error:")
    return err


def test_error_paths_are_one_line(folders, tiny_model_path, tmp_path, capsys):
    cal, test = folders
    model = ["--model", str(tiny_model_path)]
    assert "no such file or folder" in _error(capsys, ["--images", str(tmp_path / "missing"), *model])
    no_scale = _error(capsys, ["--images", str(test / "images"), *model], mpp=[])  # never guessed: asked for
    assert "µm/px is not known; give --mpp" in no_scale
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    assert "not a readable image" in _error(capsys, ["--images", str(bad), *model])
    small = tmp_path / "small"
    small.mkdir()
    name = next((test / "images").iterdir()).name
    (tmp_path / "one").mkdir()
    shutil.copy(test / "images" / name, tmp_path / "one" / name)
    write_array(small / name, np.zeros((100, 100), np.uint8))
    assert "mask is" in _error(capsys, ["--images", str(tmp_path / "one"), "--masks", str(small), *model])
    assert "go together" in _error(
        capsys, ["--images", str(test / "images"), "--calibration-images", str(cal / "images")]
    )
    assert "--alpha" in _error(capsys, ["--images", str(test / "images"), "--alpha", "1.5"])
    assert "--method" in _error(capsys, ["--images", str(test / "images"), "--method", "magic"])
    assert "--domain-level" in _error(capsys, ["--images", str(test / "images"), "--domain-level", "1"])
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    assert "QC model" in _error(capsys, ["--images", str(test / "images"), "--qc-model", str(junk), *model])


def test_calibration_from_an_annotation_session(audit_session, sample_dir, tiny_model_path, tmp_path, capsys):
    """A real session's ten audit patches calibrate QC at the session's µm/px (no --mpp), and the report says for
    which patches the guarantee holds; too few audits for the rule, or no session, is one line."""
    from napari_uga.cli.qc import _human

    names = sorted(p.name for p in (sample_dir / "images").iterdir())
    test = _subset(sample_dir, tmp_path / "test", names[3::14])  # tiles 3, 17, 31: none of them in the session
    saved = tmp_path / "qc.json"
    session = ["--calibration-session", str(audit_session), "--model", str(tiny_model_path)]
    args = ["qc", "--images", str(test / "images"), "--masks", str(test / "masks"), *session, "--samples", "2",
            "--rule", "fdr", "--save-qc-model", str(saved), "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration"] == {
        "source": "session",
        "folder": str(audit_session.resolve()),
        "patches": 10,
        "guarantee": "for patches drawn at random from the tissue of the session's slides",
        "mpp": 0.243,
    }
    assert out["rule"] == "fdr" and set(out["metrics"]) == KEYS and len(out["per_image"]) == 3
    assert "cannot flag anything with 10 calibration images" in out["domain_note"]
    fitted = json.loads(saved.read_text())["info"]["calibration_images"]
    assert fitted == [f"umcu@y{256 * (i // 5)}x{256 * (i % 5)}" for i in range(10)]  # the audits, nothing else
    assert f"calibrated on 10 audit patches of {audit_session.resolve()}: for patches drawn at random" in _human(out)

    images = ["--images", str(test / "images"), *session]
    assert "10 audit patches, too few for rule ltt, which needs at least 22 (all good)" in _error(capsys, images)
    assert "or use rule fdr (needs 9)" in _error(capsys, images)
    assert "not a napari-uga session folder" in _error(
        capsys, ["--images", str(test / "images"), "--calibration-session", str(tmp_path)]
    )
    assert "--calibration-session replaces" in _error(
        capsys, [*images, "--calibration-images", str(test / "images"), "--calibration-masks", str(test / "masks")]
    )
