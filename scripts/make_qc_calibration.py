"""Make the shipped QC calibration, ``src/napari_uga/weights/qc_calibration.json``.

It is the ``entropy`` method fitted on the 57 Camelyon16 RUMC tiles (slides tumor_001, tumor_004,
tumor_064: the shipped network's training centre, never a test split) with the shipped network's
features at 0.243 µm/px, and it carries what the exchangeability gate needs out of the box: the
calibration rows (colour, texture and network-feature distance among them), their overlap groups
(connected groups of overlapping tiles, so that a tile is never made typical by its own copies),
the gate's level and the calibration images' own atypicality scores (docs/qc.md).

Usage::

    .venv/bin/python scripts/make_qc_calibration.py               # features from runs/qc_cache/ (computed if missing)
    .venv/bin/python scripts/make_qc_calibration.py --reuse-rows  # refit from the shipped file's own rows

Data: ``../shared/data/camelyon16_rumc`` (see its README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import qc as bench  # noqa: E402  (benchmarks/qc.py: the feature cache and the overlap groups)

from napari_uga import quality  # noqa: E402
from napari_uga.io import list_images, read_image, read_mask  # noqa: E402

METHOD = "entropy"  # a single score transfers to other centres; a forest fitted where 96 % of tiles are good does not


def rumc_names() -> list[str]:
    """The RUMC tile names in the order the calibration rows are stored (sorted)."""
    return sorted(p.stem for p in list_images(bench.DATA / "camelyon16_rumc" / "images"))


def with_scale(row: dict, name: str) -> dict:
    """A calibration row with the gate's scale signature (rows cached before it get it from the tile)."""
    if any(k.startswith(quality.SCALE_PREFIX) for k in row):
        return row
    image = read_image(bench.DATA / "camelyon16_rumc" / "images" / f"{name}.png")
    return {**row, **quality.scale_signature(image)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse-rows", action="store_true", help="refit from the shipped file's stored rows")
    parser.add_argument("--domain-level", type=float, default=quality.DOMAIN_LEVEL)
    parser.add_argument("--output", type=Path, default=quality.DEFAULT_QC_FILE)
    args = parser.parse_args()
    names = rumc_names()
    if args.reuse_rows:
        shipped = quality.QCModel.load(quality.DEFAULT_QC_FILE)
        rows, truth, tumour = shipped.rows, shipped.dice_true, shipped.tumour
        masks = [bool(read_mask(bench.DATA / "camelyon16_rumc" / "masks" / f"{n}.png").any()) for n in names]
        if len(rows) != len(names) or masks != list(tumour):
            sys.exit("the shipped rows do not match the RUMC tiles (sorted by name); recompute the features")
    else:
        data = bench.features("rumc", quality.QC_SAMPLES)
        if sorted(data) != names:
            sys.exit("the RUMC feature cache does not hold every tile")
        rows = [data[n]["row"] for n in names]
        truth = [data[n]["dice"] for n in names]
        tumour = [data[n]["tumour"] for n in names]
    rows = [with_scale(row, name) for row, name in zip(rows, names, strict=True)]
    groups = bench.groups_for("rumc", names)
    info = {
        "calibration": "camelyon16_rumc (57 tiles, 3 slides): the shipped model's training centre",
        "weights": bench.weights_path().name,
        "mpp": 0.243,
        "command": "python scripts/make_qc_calibration.py" + (" --reuse-rows" if args.reuse_rows else ""),
    }
    qc = quality.fit_qc_model(rows, truth, 0.1, 0.1, 0.8, METHOD, groups=groups, samples=quality.QC_SAMPLES,
                              info=info, tumour=tumour, domain_level=args.domain_level)  # fmt: skip
    qc.save(args.output)
    p = quality.domain_p_values(rows, rows[:1], groups)  # smoke: the gate runs on the stored rows
    print(f"wrote {args.output}: {METHOD}, cut {qc.cut}, {len(rows)} rows, {len(set(groups))} overlap groups, "
          f"gate level {qc.domain_level} (first tile p = {float(np.round(p[0], 3))})")  # fmt: skip


if __name__ == "__main__":
    main()
