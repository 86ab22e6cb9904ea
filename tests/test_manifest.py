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
