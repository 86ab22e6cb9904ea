"""The npe2 manifest: valid, shipped inside the package, and every command importable."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import napari_uga

ROOT_MANIFEST = Path(__file__).resolve().parents[1] / "napari.yaml"
COMMANDS = yaml.safe_load(ROOT_MANIFEST.read_text())["contributions"]["commands"]


def test_package_manifest_is_the_root_manifest():
    packaged = Path(napari_uga.__file__).parent / "napari.yaml"
    assert packaged.read_text() == ROOT_MANIFEST.read_text()


@pytest.mark.parametrize("command", COMMANDS, ids=[c["id"] for c in COMMANDS])
def test_python_name_imports(command):
    module, _, attribute = command["python_name"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_npe2_validate():
    npe2 = Path(sys.executable).parent / "npe2"
    done = subprocess.run(
        [str(npe2), "validate", "napari-uga"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout


def test_npe2_discovers_every_contribution():
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest("napari-uga")
    assert {s.key for s in manifest.contributions.sample_data} == {
        "camelyon_demo_slide",
        "camelyon_demo_truth",
        "camelyon_tile",
    }
    assert "UGA annotation" in {w.display_name for w in manifest.contributions.widgets}


# --- packaging: what the wheel must carry, checked without building it (scripts/check_wheel.sh builds it)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "napari_uga"


def _package_data() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]


def _data_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` but Python sources and caches, relative to it."""
    found = [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [p.relative_to(folder) for p in found if p.suffix not in (".py", ".pyc")]


@pytest.mark.parametrize(
    ("package", "folder"), [("napari_uga", PACKAGE), ("napari_uga.sample_data", REPO / "sample_data")]
)
def test_package_data_globs_cover_every_data_file(package, folder):
    globs = _package_data()[package]
    unshipped = [str(p) for p in _data_files(folder) if not any(p.match(g) for g in globs)]
    assert not unshipped, f"not in [tool.setuptools.package-data] {package!r}, so not in the wheel: {unshipped}"


def test_runtime_files_resolve_through_the_package():
    from importlib.resources import files

    from napari_uga import _sample_data, loop, models, quality

    assert _sample_data.SAMPLE_DIR == Path(str(files("napari_uga.sample_data"))) / "camelyon16_umcu"
    for folder, n in ((_sample_data.SAMPLE_DIR, 32), (loop.REPLAY_DIR, 15)):
        assert len(list((folder / "images").glob("*.png"))) == len(list((folder / "masks").glob("*.png"))) == n
    assert models.DEFAULT_WEIGHTS.is_file() and quality.DEFAULT_QC_FILE.is_file()
    assert (models.WEIGHTS_DIR / "MODEL_CARD.md").is_file()


def test_no_code_reads_paths_relative_to_the_checkout():
    """An installed wheel has no checkout: package files are found through the package (as above)."""
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if ".parents[" in line or "parent.parent" in line
    ]
    assert not offenders, f"repository-relative paths (use importlib.resources / napari_uga._sample_data): {offenders}"


def test_version_has_one_source():
    from importlib.metadata import version

    assert version("napari-uga") == napari_uga.__version__
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "napari_uga.__version__"' in pyproject
