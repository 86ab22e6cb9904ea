"""How much of the ``presence`` QC model's error comes from calling tumour presence wrong?

On the cached QC features of ``benchmarks/qc.py`` (run it first), over the same calibration/test
splits: the tumour classifier's AUROC and accuracy on the test half, the model's MAE, and the part
of that MAE from tiles whose P(tumour) >= 0.5 disagrees with their mask.

Usage::

    .venv/bin/python benchmarks/qc_presence.py --dataset ebhi --splits 10
"""

from __future__ import annotations

import argparse

import numpy as np
import qc as bench
from sklearn.metrics import roc_auc_score

from napari_uga import quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("umcu", "ebhi"), default="ebhi")
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--calibration-share", type=float, default=0.5)
    args = parser.parse_args()
    data = bench.features(args.dataset, quality.QC_SAMPLES, compute=False)
    if not data:
        raise SystemExit(f"no cached features for {args.dataset}: run benchmarks/qc.py first")
    names = sorted(data)
    rows = [data[n]["row"] for n in names]
    truth = np.array([data[n]["dice"] for n in names])
    tumour = np.array([data[n]["tumour"] for n in names])
    groups = bench.groups_for(args.dataset, names)
    columns = quality._feature_names("presence", rows)
    x = quality._matrix(rows, columns)
    scores = {"auroc": [], "accuracy": [], "mae": [], "mae_from_presence": []}
    for seed in range(args.splits):
        cal = bench.split(groups, tumour, seed, args.calibration_share)
        model = quality.PresenceModel(columns).fit(x[cal], truth[cal], tumour[cal])
        probability = model.presence(x[~cal])
        error = np.abs(np.clip(model.predict(x[~cal]), 0, 1) - truth[~cal])
        wrong = (probability >= 0.5) != tumour[~cal]
        scores["auroc"].append(roc_auc_score(tumour[~cal], probability))
        scores["accuracy"].append(1 - wrong.mean())
        scores["mae"].append(error.mean())
        scores["mae_from_presence"].append(error[wrong].sum() / len(error))
    print(
        f"{args.dataset}, {args.splits} splits: "
        + ", ".join(f"{k} {np.mean(v):.3f} ± {np.std(v):.3f}" for k, v in scores.items())
    )


if __name__ == "__main__":
    main()
