#!/usr/bin/env bash
# Release check: build the sdist and the wheel, install the wheel alone in a fresh virtual
# environment outside the checkout and run the plugin from another folder: the headless demo,
# npe2's manifest validation, the sample data through npe2, and one short fine-tune round with
# the shipped replay tiles. Fails (non-zero) when a file the plugin needs is not in the wheel.
#
#   bash scripts/check_wheel.sh            # uses .venv/bin/python (with `build`) to build
#   KEEP=1 bash scripts/check_wheel.sh     # keep the temporary folder (printed) for a look
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BUILD_PYTHON=${BUILD_PYTHON:-$REPO/.venv/bin/python}  # needs the `build` package (test extras)
PYTHON=${PYTHON:-python3}                              # the interpreter of the fresh environment
if [ -d /opt/wheels ]; then export PIP_FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONNOUSERSITE=1
unset PYTHONPATH

WORK=$(mktemp -d "${TMPDIR:-/tmp}/uga-wheel-check.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "check_wheel: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
step() { echo "== check_wheel: $* ($SECONDS s)"; }

step "build the sdist, then the wheel from the sdist"
"$BUILD_PYTHON" -m build --outdir "$WORK/dist" "$REPO" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/napari_uga-*.whl)
SDIST=$(ls "$WORK"/dist/napari_uga-*.tar.gz)

step "contents and metadata of $(basename "$WHEEL") and $(basename "$SDIST")"
# every file of the package folder and of sample_data/ that git tracks (or would) must be in the wheel
(git ls-files --cached --others --exclude-standard -- src/napari_uga sample_data 2>/dev/null || true) >"$WORK/sources.txt"
"$PYTHON" - "$WHEEL" "$SDIST" "$WORK/sources.txt" <<'EOF'
import re
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

wheel, sdist, sources = sys.argv[1:4]
names = set(zipfile.ZipFile(wheel).namelist())
problems = []

expected = set()
for line in Path(sources).read_text().splitlines():
    if not Path(line).is_file() or "__pycache__" in line:
        continue
    if line.startswith("src/napari_uga/"):
        expected.add("napari_uga/" + line.removeprefix("src/napari_uga/"))
    elif line.startswith("sample_data/"):
        expected.add("napari_uga/sample_data/" + line.removeprefix("sample_data/"))
# what the plugin reads at run time, named even where git cannot list the sources
required = {
    "napari_uga/napari.yaml",
    "napari_uga/weights/uga_unet.safetensors",
    "napari_uga/weights/MODEL_CARD.md",
    "napari_uga/weights/qc_calibration.json",
    "napari_uga/sample_data/__init__.py",
}
problems += [f"missing from the wheel: {n}" for n in sorted((expected | required) - names)]
counts = {
    folder: sum(n.startswith(folder) and n.endswith(".png") for n in names)
    for folder in (
        "napari_uga/replay/images/",
        "napari_uga/replay/masks/",
        "napari_uga/sample_data/camelyon16_umcu/images/",
        "napari_uga/sample_data/camelyon16_umcu/masks/",
    )
}
for folder, n in counts.items():
    if n == 0:
        problems.append(f"no tiles in the wheel under {folder}")
if counts["napari_uga/replay/images/"] != counts["napari_uga/replay/masks/"]:
    problems.append(f"replay images and masks differ in number: {counts}")

dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
zf = zipfile.ZipFile(wheel)
meta = Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
init = zf.read("napari_uga/__init__.py").decode()
version = re.search(r'^__version__ = "([^"]+)"', init, re.M).group(1)
wants = {
    "Version": version,
    "License-Expression": "BSD-3-Clause",
    "Requires-Python": ">=3.11",
    "Description-Content-Type": "text/markdown",
}
for key, value in wants.items():
    if meta.get(key) != value:
        problems.append(f"METADATA {key}: {meta.get(key)!r}, expected {value!r}")
if not meta.get("Summary"):
    problems.append("METADATA: no Summary")
if "# napari-uga" not in (meta.get_payload() or ""):
    problems.append("METADATA: the long description is not the README")
for classifier in ("Framework :: napari", "Programming Language :: Python :: 3.11"):
    if classifier not in meta.get_all("Classifier", []):
        problems.append(f"METADATA: no classifier {classifier!r}")
if f"{dist_info}/licenses/LICENSE" not in names:
    problems.append("the wheel carries no LICENSE")
entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
for needed in ("[napari.manifest]", "napari-uga = napari_uga:napari.yaml", "uga = napari_uga.cli:main"):
    if needed not in entry_points:
        problems.append(f"entry_points.txt lacks {needed!r}")

top = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
for needed in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "CHANGELOG.md", "napari.yaml",
               "sample_data/__init__.py", "src/napari_uga/__init__.py", "tests/test_manifest.py"):
    if needed not in top:
        problems.append(f"missing from the sdist: {needed}")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
size = sum(i.file_size for i in zf.infolist())
print(f"wheel {Path(wheel).name}: {Path(wheel).stat().st_size / 2**20:.1f} MiB, {len(names)} files, "
      f"{size / 2**20:.1f} MiB unpacked; "
      f"{len(expected)} source files all present; tiles {counts}; version {version}")
EOF

step "fresh virtual environment in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
pip_in() { "$VPY" -m pip "$@" >>"$WORK/pip.log" 2>&1 || { grep -v "^WARNING: Location" "$WORK/pip.log" | tail -40; exit 1; }; }
pip_in install "torch==2.13.0"  # the pinned CPU build first, as scripts/setup.sh does
pip_in install "$WHEEL" PyQt6
pip_in check

mkdir -p "$WORK/run" && cd "$WORK/run"  # nothing from the checkout on the path from here on
export QT_QPA_PLATFORM=offscreen
unset DISPLAY

step "the installed package reads its files from the environment, not from the checkout"
"$VPY" - "$WORK/venv" <<'EOF'
import importlib.metadata
import sys
from pathlib import Path

import napari_uga
from napari_uga import _sample_data, loop, models, quality

venv = Path(sys.argv[1]).resolve()
assert importlib.metadata.version("napari-uga") == napari_uga.__version__
paths = {
    "package": Path(napari_uga.__file__),
    "sample data": _sample_data.SAMPLE_DIR,
    "replay tiles": loop.REPLAY_DIR,
    "weights": models.DEFAULT_WEIGHTS,
    "QC calibration": quality.DEFAULT_QC_FILE,
}
for what, path in paths.items():
    path = Path(path).resolve()
    assert path.is_relative_to(venv), f"{what}: {path} is outside the fresh environment {venv}"
    assert path.exists(), f"{what}: {path} does not exist"
quality.default_qc_model()
print("package files in", Path(napari_uga.__file__).parent)
EOF

step "uga demo --headless"
"$WORK/venv/bin/uga" demo --headless --budgets 0,5 --out "$WORK/demo" 2>"$WORK/demo.err" || { tail -40 "$WORK/demo.err"; exit 1; }
"$VPY" - "$WORK/demo" "$WORK/venv" <<'EOF'
import json
import sys
from pathlib import Path

out, venv = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
report = json.loads((out / "report.json").read_text())
assert Path(report["data"]).resolve().is_relative_to(venv), f"demo read {report['data']}, not the installed sample"
for name in ("report.json", "overlay.png", "dice_vs_round.png"):
    assert (out / name).is_file(), f"uga demo wrote no {name}"
curve = ", ".join(f"{p['budget']} patches: Dice {p['dice_global']:.3f}" for p in report["curve"])
print(f"demo: {len(report['pool'])} pool / {len(report['test'])} test tiles; {curve}")
EOF

step "npe2 validate napari-uga"
"$WORK/venv/bin/npe2" validate napari-uga --imports | tee "$WORK/npe2.txt"
grep -q "valid" "$WORK/npe2.txt"

step "sample data through npe2"
"$VPY" - <<'EOF'
import numpy as np
import npe2

pm = npe2.PluginManager.instance()
pm.discover()
samples = {s.key: s for s in pm.get_manifest("napari-uga").contributions.sample_data}
for key, kind in (("camelyon_demo_slide", "image"), ("camelyon_demo_truth", "labels"), ("camelyon_tile", "image")):
    [(data, meta, layer_type)] = samples[key].open(_registry=pm.commands)
    levels = data if isinstance(data, list) else [data]
    assert layer_type == kind and levels and all(np.asarray(a).size for a in levels), key
    print(f"{key}: {layer_type} {meta['name']!r}, level 0 {np.asarray(levels[0]).shape}, {len(levels)} level(s)")
EOF

step "one short fine-tune round with the shipped replay tiles"
"$VPY" - <<'EOF'
import math

import torch

from napari_uga._sample_data import SAMPLE_DIR
from napari_uga.io import load_pairs
from napari_uga.loop import LoopConfig, Oracle, finetune, replay_pairs
from napari_uga.models import load_model, working_factor
from napari_uga.selection import Box

torch.set_num_threads(2)
model = load_model(device="cpu")
pairs = load_pairs(SAMPLE_DIR / "images", SAMPLE_DIR / "masks")
replay = replay_pairs()
oracle = Oracle(pairs)
annotations = [oracle.annotate(Box(p.name, 0, 0, 128, 128)) for p in pairs if p.mask.any()][:2]
rounds = finetune(model, annotations, replay, working_factor(model), LoopConfig(steps=3, batch_size=4), origin=model)
while True:
    try:
        next(rounds)
    except StopIteration as stop:
        result = stop.value
        break
losses = list(result.losses)
assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
with torch.no_grad():
    moved = sum(float((p - q).abs().sum()) for p, q in zip(result.model.parameters(), model.parameters(), strict=True))
assert moved > 0, "fine-tuning left the weights unchanged"
print(f"fine-tune: {len(pairs)} sample tiles, {len(replay)} replay tiles, losses {', '.join(f'{v:.3f}' for v in losses)}")
EOF

step "passed: $(basename "$WHEEL") installs and runs from a clean environment"
