"""The core stays Qt-free: importing it loads no napari, Qt or Dask-distributed module."""

import subprocess
import sys

CORE = [
    "io",
    "models",
    "uncertainty",
    "selection",
    "training",
    "loop",
    "session",
    "metrics",
    "splits",
    "plots",
    "quality",
    "slides",
]


def test_core_imports_no_gui_or_cluster_module():
    code = (
        "import sys\n"
        + "".join(f"import napari_uga.{m}\n" for m in CORE)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'PyQt6', 'PySide6', 'superqt', 'magicgui', 'vispy', 'distributed'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"core modules pulled in: {out}"
