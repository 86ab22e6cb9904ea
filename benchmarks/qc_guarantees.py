"""QC's guarantees checked over many calibration/test draws, and the exchangeability gate.

For each dataset the per-image QC features of the shipped network are computed once and cached
(``runs/qc_cache/``, shared with ``benchmarks/qc.py``); each draw's outcome is cached too
(``runs/qc_guarantees/``), so a rerun only computes the draws it has not seen. Every draw splits
the dataset into a labelled calibration half and a test half (EBHI by patient, UMCU by connected
group of overlapping tiles; half of the groups with tumour and half of those without, as in
``benchmarks/qc.py``), fits the QC model on the calibration half and decides on the test half:

* conformal selection (``fdr``): the false-discovery share of the accepted, V / max(R, 1); its
  mean over draws must be <= alpha;
* Learn-then-Test (``ltt``): the share of draws whose accepted test images have precision
  >= 1 - alpha (nothing accepted counts as kept), which must be >= 1 - delta; because a test half
  is finite, a rule whose precision is exactly 1 - alpha fails this about half the time, so the
  draws where the test-half failures are *significantly* above alpha (one-sided binomial test at
  5 %) are reported as well;
* mean coverage (share of the test half accepted), with and without the exchangeability gate;
* the gate: share of the test half passed (in domain).

``--part dev`` or ``report`` restricts a dataset to one fixed half of its groups (by a hash of
the group name): settings are chosen on ``dev`` draws, numbers are reported on ``report`` draws.

Usage::

    .venv/bin/python benchmarks/qc_guarantees.py --features-only          # compute the feature caches
    .venv/bin/python benchmarks/qc_guarantees.py --draws 200 --part report  # -> benchmarks/results/qc_guarantees_*.md
    .venv/bin/python benchmarks/qc_guarantees.py --shipped-gate             # the shipped calibration's gate
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import qc as bench  # benchmarks/qc.py: feature cache, groups, stratified splits
from scipy.stats import binom

from napari_uga import quality
from napari_uga.io import atomic_write_json

DRAWS_CACHE = bench.REPO / "runs" / "qc_guarantees"
SEED_OFFSET = 1000  # draws independent of benchmarks/qc.py's splits 0..39


def part_of(group: str) -> str:
    """``dev`` or ``report``: a fixed half of the groups, by a hash of the group name."""
    return "dev" if int(hashlib.sha1(group.encode()).hexdigest(), 16) % 2 == 0 else "report"


def load(dataset: str, part: str, compute: bool) -> tuple[list[str], list[dict], np.ndarray, np.ndarray, list[str]]:
    """Names, feature rows, true Dice, tumour flags and groups of a dataset's part."""
    data = bench.features(dataset, quality.QC_SAMPLES, compute=compute)
    names = sorted(data)
    groups = bench.groups_for(dataset, names)
    keep = [i for i, g in enumerate(groups) if part == "all" or part_of(g) == part]
    names = [names[i] for i in keep]
    return (
        names,
        with_scale(dataset, names, [data[n]["row"] for n in names]),
        np.array([data[n]["dice"] for n in names]),
        np.array([data[n]["tumour"] for n in names]),
        [groups[i] for i in keep],
    )


def with_scale(dataset: str, names: list[str], rows: list[dict]) -> list[dict]:
    """Rows with the gate's scale signature (cached in ``runs/qc_cache/scale_<dataset>.json``; tiles only)."""
    from napari_uga.io import read_image

    cache = bench.CACHE / f"scale_{dataset}.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [n for n in names if n not in done]
    for name in missing:
        done[name] = quality.scale_signature(
            read_image(bench.DATA / bench.DATASETS[dataset][0] / "images" / f"{name}.png")
        )
    if missing:
        atomic_write_json(cache, done)
    return [{**row, **done[name]} for name, row in zip(names, rows, strict=True)]


def one_draw(rows, truth, tumour, groups, seed, args) -> dict:
    """Fit on the calibration half of one draw; what each rule accepts on the test half."""
    cal = bench.split(groups, tumour, seed, args.share)
    ci, ti = np.flatnonzero(cal), np.flatnonzero(~cal)
    cal_rows, test_rows = [rows[i] for i in ci], [rows[i] for i in ti]
    cal_groups = [groups[i] for i in ci]
    qc = quality.fit_qc_model(cal_rows, truth[ci], args.alpha, args.delta, args.threshold, args.method,
                              groups=cal_groups, tumour=tumour[ci], domain_level=args.domain_level)  # fmt: skip
    pred, _ = qc.predict(test_rows, gate=False)
    good = truth[ti] > args.threshold
    p_grouped = quality.domain_p_values(cal_rows, test_rows, cal_groups)
    p_plain = quality.domain_p_values(cal_rows, test_rows, None)
    out = {
        "seed": seed,
        "method": qc.method,
        "n_cal": len(ci),
        "n_test": len(ti),
        "cal_good": int(np.sum(truth[ci] > args.threshold)),
        "test_good": int(good.sum()),
        "cut": None if not np.isfinite(qc.cut) else qc.cut,
        "gate_pass": float(np.mean(p_grouped > args.domain_level)),
        "gate_pass_no_groups": float(np.mean(p_plain > args.domain_level)),
        # conformal p-values of the test failures: P(fails and p <= t) <= t when the scores are exchangeable
        "failure_p": conformal_p(qc.oof, truth[ci], pred[~good], args.threshold).round(6).tolist(),
    }
    for gate in (False, True):
        candidate = p_grouped > args.domain_level if gate else np.ones(len(ti), bool)
        ltt = candidate & (pred >= qc.cut)
        fdr = np.zeros(len(ti), bool)
        fdr[candidate] = quality.conformal_selection(qc.oof, truth[ci], pred[candidate], args.threshold, args.alpha)
        for rule, accepted in (("ltt", ltt), ("fdr", fdr)):
            key = f"{rule}{'_gated' if gate else ''}"
            out[key] = {"accepted": int(accepted.sum()), "failures": int((accepted & ~good).sum())}
    return out


def conformal_p(cal_scores, cal_dice, scores, threshold: float) -> np.ndarray:
    """p = (1 + calibration failures scored at least as high) / (n + 1), as conformal selection computes it."""
    failed = np.asarray(cal_dice) <= threshold
    above = (np.asarray(cal_scores)[failed][None, :] >= np.asarray(scores)[:, None]).sum(1)
    return (1 + above) / (len(cal_scores) + 1)


def run_draws(dataset: str, args) -> list[dict]:
    """All draws of a dataset's part (cached per seed)."""
    names, rows, truth, tumour, groups = load(dataset, args.part, compute=not args.cached_only)
    settings = {k: getattr(args, k) for k in ("alpha", "delta", "threshold", "method", "share", "domain_level")}
    digest = hashlib.sha1(
        json.dumps([settings, names, [float(t) for t in truth], quality.QC_FEATURES_VERSION], sort_keys=True).encode()
    ).hexdigest()[:10]
    cache = DRAWS_CACHE / f"{dataset}_{args.part}_{args.method}_{digest}.json"
    done = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    start = time.perf_counter()
    for d in range(args.draws):
        seed = SEED_OFFSET + d
        if seed in done:
            continue
        done[seed] = one_draw(rows, truth, tumour, groups, seed, args)
        if len(done) % 5 == 0 or d + 1 == args.draws:
            atomic_write_json(cache, {str(k): v for k, v in sorted(done.items())})
        rate = (time.perf_counter() - start) / max(1, sum(1 for s in done if s >= seed - d))
        print(f"\r{dataset} {args.part}: draw {d + 1}/{args.draws} ({rate:.1f} s each)", end="", file=sys.stderr)
    print(file=sys.stderr)
    atomic_write_json(cache, {str(k): v for k, v in sorted(done.items())})
    return [done[SEED_OFFSET + d] for d in range(args.draws)]


def summarise(draws: list[dict], alpha: float, delta: float) -> dict:
    """Per rule: mean false-discovery share, precision >= 1 - alpha share, coverage; the gate's pass share."""
    out = {"draws": len(draws), "n_cal": float(np.mean([d["n_cal"] for d in draws]))}
    out["n_test"] = float(np.mean([d["n_test"] for d in draws]))
    out["gate_pass"] = float(np.mean([d["gate_pass"] for d in draws]))
    out["gate_pass_no_groups"] = float(np.mean([d["gate_pass_no_groups"] for d in draws]))
    out["methods"] = {m: sum(d["method"] == m for d in draws) for m in sorted({d["method"] for d in draws})}
    failure_p = np.concatenate([d["failure_p"] for d in draws]) if draws else np.zeros(0)
    tested = sum(d["n_test"] for d in draws)
    # P(a test image fails and its p <= t): at most t for exchangeable scores (Jin & Candes' validity is
    # joint with the null, so among failures alone the share may reach t / P(fail))
    out["failure_p_at_most"] = {str(t): float(np.sum(failure_p <= t) / max(tested, 1)) for t in (0.05, 0.1, 0.2)}
    out["failure_share"] = float(len(failure_p) / max(tested, 1))
    for key in ("ltt", "ltt_gated", "fdr", "fdr_gated"):
        r = np.array([d[key]["accepted"] for d in draws])
        v = np.array([d[key]["failures"] for d in draws])
        n = np.array([d["n_test"] for d in draws])
        fdp = v / np.maximum(r, 1)
        kept = (r == 0) | (fdp <= alpha + 1e-12)
        # failures significantly above alpha: P[Bin(r, alpha) >= v] < 5 %
        significant = (r > 0) & (binom.sf(v - 1, np.maximum(r, 1), alpha) < 0.05)
        out[key] = {
            "mean_fdp": float(fdp.mean()),
            "precision_kept_share": float(kept.mean()),
            "significant_violation_share": float(significant.mean()),
            "accepting_draws": int((r > 0).sum()),
            "mean_precision_when_accepting": float((1 - fdp)[r > 0].mean()) if (r > 0).any() else None,
            "pooled_precision": float(1 - v.sum() / r.sum()) if r.sum() else None,
            "mean_coverage": float((r / n).mean()),
        }
    return out


def table(summaries: dict, alpha: float, delta: float) -> str:
    lines = [
        "| data, part | draws | cal / test | rule | gate | mean FDP | precision ≥ 1−α | signif. violation | "
        "accepting draws | precision when accepting | mean coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        for key in ("fdr", "fdr_gated", "ltt", "ltt_gated"):
            r = s[key]
            rule = "conformal selection" if key.startswith("fdr") else "Learn-then-Test"
            precision = (
                "–" if r["mean_precision_when_accepting"] is None else f"{r['mean_precision_when_accepting']:.3f}"
            )
            lines.append(
                f"| {name} | {s['draws']} | {s['n_cal']:.0f} / {s['n_test']:.0f} | {rule} | "
                f"{'on' if key.endswith('gated') else 'off'} | {r['mean_fdp']:.3f} | {r['precision_kept_share']:.3f} | "
                f"{r['significant_violation_share']:.3f} | {r['accepting_draws']} | {precision} | "
                f"{r['mean_coverage']:.3f} |"
            )
    lines.append("")
    lines.append(f"Guarantees: conformal selection mean FDP ≤ α = {alpha}; Learn-then-Test precision ≥ {1 - alpha:.2f} "
                 f"in ≥ {1 - delta:.2f} of the draws.")  # fmt: skip
    lines.append("")
    lines.append("| data, part | gate passes (test half, groups known) | gate passes (no groups) | `auto` chose |")
    lines.append("|---|---|---|---|")
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['gate_pass']:.3f} | {s['gate_pass_no_groups']:.3f} | {s['methods']} |")
    lines.append("")
    lines.append("Conformal p-values: share of the test images that fail *and* have p ≤ t (exchangeable scores: ≤ t):")
    lines.append("")
    lines.append("| data, part | test failures | t = 0.05 | t = 0.1 | t = 0.2 |")
    lines.append("|---|---|---|---|---|")
    for name, s in summaries.items():
        at = s["failure_p_at_most"]
        lines.append(f"| {name} | {s['failure_share']:.3f} | {at['0.05']:.3f} | {at['0.1']:.3f} | {at['0.2']:.3f} |")
    return "\n".join(lines)


def shipped_gate(args) -> str:
    """Share of each dataset's tiles that the shipped calibration's gate sends to review."""
    qc = quality.default_qc_model()
    lines = [
        f"Shipped calibration ({len(qc.rows)} RUMC tiles, {len(set(qc.groups))} overlap groups), "
        f"level {qc.domain_level}:",
        "",
        "| tiles | part | n | out of domain | median p |",
        "|---|---|---|---|---|",
    ]
    for dataset in ("ebhi", "umcu"):
        for part in ("dev", "report", "all"):
            _, rows, _, _, _ = load(dataset, part, compute=False)
            if not rows:
                continue
            p = qc.domain_p(rows)
            lines.append(f"| {dataset} | {part} | {len(rows)} | {np.mean(~qc.in_domain(p)):.3f} | {np.median(p):.3f} |")
    # RUMC: each calibration tile against the others, its own overlap group left out
    labels = np.asarray(qc.groups)
    p = np.array([
        quality.domain_p_values([r for j, r in enumerate(qc.rows) if labels[j] != labels[i]], [qc.rows[i]],
                                [g for g in labels if g != labels[i]])[0]
        for i in range(len(qc.rows))
    ])  # fmt: skip
    lines.append(f"| rumc (each against the others, own overlap group out) | all | {len(p)} | "
                 f"{np.mean(p <= qc.domain_level):.3f} | {np.median(p):.3f} |")  # fmt: skip
    slides = np.array([g.split(":")[0] for g in labels])
    for slide in sorted(set(slides)):
        rest = slides != slide
        kept = [r for r, k in zip(qc.rows, rest, strict=True) if k]
        left = [r for r, k in zip(qc.rows, rest, strict=True) if not k]
        q = quality.domain_p_values(kept, left, list(labels[rest]))
        lines.append(f"| rumc {slide} against the other two slides | all | {int((~rest).sum())} | "
                     f"{np.mean(q <= qc.domain_level):.3f} | {np.median(q):.3f} |")  # fmt: skip
    for path in args.slides:
        for mpp in args.slide_mpp:
            p, dev = slide_cell_p(qc, path, mpp)
            for part, keep in (("dev", dev), ("report", ~dev), ("all", np.ones(len(p), bool))):
                name = f"{path.name} at {mpp} µm/px: its QC map cells (512 px of level 0 with tissue)"
                lines.append(f"| {name} | {part} | {int(keep.sum())} | {np.mean(~qc.in_domain(p[keep])):.3f} | "
                             f"{np.median(p[keep]):.3f} |")  # fmt: skip
    return "\n".join(lines)


def slide_cell_p(qc, path: Path, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Domain p-values of a slide's QC map cells (level 0, the gate's features only) and which are dev.

    Dev cells: those whose centre lies in the left half of the slide; the right half is reported.
    """
    from napari_uga.models import load_model, working_factor
    from napari_uga.qc_map import tissue_cells
    from napari_uga.wsi import Slide

    net = load_model(bench.weights_path(), "cpu")
    with Slide(path, mpp) as slide:
        cells = tissue_cells(slide.shape, *slide.tissue())
        factor = working_factor(net, slide.require_mpp())
        rows = [quality.domain_row(net, slide.read(0, *cell), factor) for cell in cells]
        width = slide.shape[1]
    dev = np.array([x + w / 2 < width / 2 for _, x, _, w in cells])
    return qc.domain_p(rows), dev


def _variant_p(cal, test, groups, scaling: str, neighbours: int, kinds: tuple[str, ...]) -> np.ndarray:
    """Domain p-values of a gate design: feature groups ``kinds``, per-feature ``scaling``, ``neighbours``."""
    from scipy.stats import norm, rankdata

    from napari_uga.quality import domain

    names = list(cal[0])
    chosen = {
        "colour": [n for n in ("tissue_fraction", "saturation", "value", "hematoxylin", "eosin") if n in names],
        "texture": sorted(n for n in names if n.startswith(quality.TEXTURE_PREFIX)),
        "network": ["feature_distance"],
    }
    columns, weights = domain._columns({k: chosen[k] for k in kinds})
    c, t = domain._matrix(cal, columns), domain._matrix(test, columns)
    labels = np.r_[domain._labels(groups, len(cal)), -1]
    out = np.empty(len(t))
    for j, row in enumerate(t):
        bag = np.vstack([c, row])
        if scaling == "rank":  # normal scores of the ranks within the bag
            z = norm.ppf((rankdata(bag, axis=0) - 0.5) / len(bag))
        elif scaling == "mad":  # median and normal-consistent median absolute deviation (sd where it is 0)
            centre = np.median(bag, 0)
            mad = 1.4826 * np.median(np.abs(bag - centre), 0)
            z = (bag - centre) / np.where(mad > 0, mad, np.where(bag.std(0) > 0, bag.std(0), 1.0))
        else:  # mean and standard deviation (shipped)
            z = (bag - bag.mean(0)) / np.where(bag.std(0) > 0, bag.std(0), 1.0)
        z = z * np.sqrt(weights)
        sq = (z**2).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0))
        dist[labels[:, None] == labels[None, :]] = np.inf
        k = int(max(1, min(neighbours, np.isfinite(dist).sum(1).min())))
        scores = np.partition(dist, k - 1, axis=1)[:, :k].mean(1)
        out[j] = np.mean(scores >= scores[-1] - 1e-12)
    return out


def fold_scores(qc, cal_rows, y, groups, tumour, test_rows) -> tuple[np.ndarray, np.ndarray]:
    """Each fold model's predicted Dice of the test rows (folds x tests), and each calibration image's fold.

    The folds and fits are exactly :func:`napari_uga.quality.cross_fit`'s, so fold k's model scored
    the calibration images of fold k (their out-of-fold scores) and never saw a test image.
    """
    from sklearn.model_selection import GroupKFold

    x = quality._matrix(cal_rows, qc.features)
    xt = quality._matrix(test_rows, qc.features)
    labels = np.asarray(groups)
    k = min(5, len(np.unique(labels)))
    fold = np.empty(len(y), int)
    scores = []
    for f, (train, test) in enumerate(GroupKFold(n_splits=k, shuffle=True, random_state=0).split(x, y, labels)):
        model = quality._fit(qc.method, x[train], y[train], 0, tumour[train], qc.features)
        scores.append(quality._predict(qc.method, model, xt))
        fold[test] = f
    return np.array(scores), fold


def diagnose(dataset: str, args) -> str:
    """Why a rule misses its guarantee: are the conformal p-values of the test images valid?

    Conformal selection's p-value is valid jointly with the null: P(an image fails and p <= t) <= t
    (among failures alone the share may reach t / P(fail)). Scored three ways against the
    calibration images' out-of-fold scores: with the final model (fitted on every calibration
    image: what QC does), with the fold models (cross-conformal: fold k's model scores the test
    image against fold k's calibration images), and split by the size of the failure's group.
    Learn-then-Test's cut is also applied to the fold models' median and minimum.
    """
    _, rows, truth, tumour, groups = load(dataset, args.part, compute=False)
    full, cross, big = [], [], []
    ltt_full, ltt_median, ltt_min, fdr_full, fdr_cross = [], [], [], [], []
    for d in range(args.draws):
        cal = bench.split(groups, tumour, SEED_OFFSET + 10_000 + d, args.share)
        ci, ti = np.flatnonzero(cal), np.flatnonzero(~cal)
        cal_rows, test_rows = [rows[i] for i in ci], [rows[i] for i in ti]
        cal_groups = [groups[i] for i in ci]
        qc = quality.fit_qc_model(cal_rows, truth[ci], args.alpha, args.delta, args.threshold, args.method,
                                  groups=cal_groups, tumour=tumour[ci])  # fmt: skip
        pred, _ = qc.predict(test_rows, gate=False)
        folds, fold_of = fold_scores(qc, cal_rows, truth[ci], cal_groups, tumour[ci], test_rows)
        oof, failed = np.asarray(qc.oof), truth[ci] <= args.threshold
        bad = truth[ti] <= args.threshold
        p = conformal_p(oof, truth[ci], pred[bad], args.threshold)
        full.extend(p)
        # cross-conformal: fold f's model scores the test failure against fold f's calibration failures
        above = sum(((failed & (fold_of == f))[None, :] & (oof[None, :] >= folds[f, bad][:, None])).sum(1)
                    for f in range(len(folds)))  # fmt: skip
        cross.extend((1 + np.asarray(above)) / (len(oof) + 1))
        test_groups = np.asarray(groups)[ti][bad]
        sizes = {g: np.sum(np.asarray(groups) == g) for g in set(test_groups)}
        big.extend([sizes[g] > 3 for g in test_groups])
        # Learn-then-Test: the test half's precision with the final model, the fold models' median or minimum
        good = ~bad
        for scores, sink in ((pred, ltt_full), (np.median(folds, 0), ltt_median), (folds.min(0), ltt_min)):
            accepted = scores >= qc.cut
            sink.append((int(accepted.sum()), int((accepted & bad).sum()), int(good.sum())))
        # conformal selection with the final model's p-values, or the cross-conformal ones (all test images)
        p_all = conformal_p(oof, truth[ci], pred, args.threshold)
        above_all = sum(((failed & (fold_of == f))[None, :] & (oof[None, :] >= folds[f][:, None])).sum(1)
                        for f in range(len(folds)))  # fmt: skip
        for p_values, sink in ((p_all, fdr_full), ((1 + np.asarray(above_all)) / (len(oof) + 1), fdr_cross)):
            accepted = benjamini_hochberg(p_values, args.alpha)
            sink.append((int(accepted.sum()), int((accepted & bad).sum()), len(ti)))
        print(f"\r{dataset} {args.part}: diagnosis draw {d + 1}/{args.draws}", end="", file=sys.stderr)
    print(file=sys.stderr)
    full, cross, big = np.array(full), np.array(cross), np.array(big)
    tested = sum(n for _, _, n in fdr_full)
    lines = [f"{dataset}, {args.part}, {args.draws} draws, {tested} test images, {len(full)} failures: share of the "
             "test images that fail and have p <= t (at most t for exchangeable scores)", "",
             "| scoring | t = 0.05 | t = 0.1 | t = 0.2 |", "|---|---|---|---|"]  # fmt: skip
    for name, values in (("final model (QC)", full), ("fold models (cross-conformal)", cross),
                         ("final model, failures in groups of > 3 tiles", full[big]),
                         ("final model, failures in groups of <= 3 tiles", full[~big])):  # fmt: skip
        lines.append(
            f"| {name} | " + " | ".join(f"{np.sum(values <= t) / tested:.3f}" for t in (0.05, 0.1, 0.2)) + " |"
        )
    lines += ["", "| Learn-then-Test scores | precision ≥ 1−α share | accepting draws | pooled precision |",
              "|---|---|---|---|"]  # fmt: skip
    for name, sink in (("final model (QC)", ltt_full), ("median of the fold models", ltt_median),
                       ("minimum of the fold models", ltt_min)):  # fmt: skip
        r = np.array([a for a, _, _ in sink])
        v = np.array([b for _, b, _ in sink])
        kept = np.mean((r == 0) | (v / np.maximum(r, 1) <= args.alpha + 1e-12))
        pooled = 1 - v.sum() / r.sum() if r.sum() else float("nan")
        lines.append(f"| {name} | {kept:.3f} | {int((r > 0).sum())} | {pooled:.3f} |")
    lines += ["", "| conformal selection p-values | mean FDP | accepting draws | mean coverage |", "|---|---|---|---|"]
    for name, sink in (("final model (QC)", fdr_full), ("fold models (cross-conformal)", fdr_cross)):
        r = np.array([a for a, _, _ in sink])
        v = np.array([b for _, b, _ in sink])
        n = np.array([c for _, _, c in sink])
        lines.append(f"| {name} | {np.mean(v / np.maximum(r, 1)):.3f} | {int((r > 0).sum())} | {np.mean(r / n):.3f} |")
    return "\n".join(lines)


def benjamini_hochberg(p_values: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg at level alpha, as :func:`napari_uga.quality.conformal_selection` applies it."""
    ranked = np.sort(p_values)
    passing = np.flatnonzero(ranked <= alpha * np.arange(1, len(ranked) + 1) / len(ranked) + 1e-12)
    return p_values <= ranked[passing[-1]] if len(passing) else np.zeros(len(p_values), bool)


def gate_draws(args) -> str:
    """The gate alone over the draws of ``--part``: share of the test half passed, with and without groups."""
    lines = [f"Gate over {args.draws} draws, part {args.part}, level {args.domain_level}:", "",
             "| data | cal / test | passes (groups known) | passes (no groups) |", "|---|---|---|---|"]  # fmt: skip
    for dataset in args.datasets:
        _, rows, _, tumour, groups = load(dataset, args.part, compute=False)
        grouped, plain, sizes = [], [], []
        for d in range(args.draws):
            cal = bench.split(groups, tumour, SEED_OFFSET + d, args.share)
            c = [r for r, x in zip(rows, cal, strict=True) if x]
            t = [r for r, x in zip(rows, cal, strict=True) if not x]
            g = [r for r, x in zip(groups, cal, strict=True) if x]
            grouped.append(np.mean(quality.domain_p_values(c, t, g) > args.domain_level))
            plain.append(np.mean(quality.domain_p_values(c, t, None) > args.domain_level))
            sizes.append((len(c), len(t)))
        n_cal, n_test = np.mean(sizes, axis=0)
        lines.append(f"| {dataset} | {n_cal:.0f} / {n_test:.0f} | {np.mean(grouped):.3f} | {np.mean(plain):.3f} |")
    return "\n".join(lines)


def gate_designs(args) -> str:
    """Compare gate designs on the DEV part (how the shipped design was chosen; docs/qc.md)."""
    qc = quality.default_qc_model()
    rumc, rumc_groups = qc.rows, qc.groups
    data = {d: load(d, "dev", compute=False) for d in ("ebhi", "umcu")}
    level = args.domain_level
    lines = [
        "Gate designs on the dev part (EBHI dev patients, UMCU dev groups; the shipped RUMC calibration):",
        "",
        "| scaling | neighbours | features | shipped: EBHI out | shipped: UMCU out | EBHI half: other half passes "
        "| EBHI half: UMCU out |",
        "|---|---|---|---|---|---|---|",
    ]
    for scaling in ("sd", "mad", "rank"):
        for k in (1, 3, 5, 10):
            for kinds in (("colour", "texture", "network"), ("colour", "texture"), ("texture", "network")):
                _, erows, _, etum, egroups = data["ebhi"]
                urows = data["umcu"][1]
                passed, umcu_out = [], []
                for d in range(20):
                    cal = bench.split(egroups, etum, 5000 + d, 0.5)
                    c = [r for r, x in zip(erows, cal, strict=True) if x]
                    t = [r for r, x in zip(erows, cal, strict=True) if not x]
                    g = [r for r, x in zip(egroups, cal, strict=True) if x]
                    passed.extend(_variant_p(c, t, g, scaling, k, kinds) > level)
                    umcu_out.extend(_variant_p(c, urows, g, scaling, k, kinds) <= level)
                ship_e = np.mean(_variant_p(rumc, erows, rumc_groups, scaling, k, kinds) <= level)
                ship_u = np.mean(_variant_p(rumc, urows, rumc_groups, scaling, k, kinds) <= level)
                lines.append(f"| {scaling} | {k} | {' + '.join(kinds)} | {ship_e:.3f} | {ship_u:.3f} | "
                             f"{np.mean(passed):.3f} | {np.mean(umcu_out):.3f} |")  # fmt: skip
                print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ebhi", "umcu"], choices=("ebhi", "umcu"))
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--part", choices=("dev", "report", "all"), default="report")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--share", type=float, default=0.5, help="share of the groups in the calibration half")
    parser.add_argument("--domain-level", type=float, default=quality.DOMAIN_LEVEL)
    parser.add_argument("--features-only", action="store_true", help="compute the feature caches and stop")
    parser.add_argument("--cached-only", action="store_true", help="never compute features")
    parser.add_argument("--shipped-gate", action="store_true", help="only the shipped calibration's gate")
    parser.add_argument("--gate-designs", action="store_true", help="compare gate designs on the dev part")
    parser.add_argument("--diagnose", action="store_true", help="why a rule misses its guarantee (see diagnose)")
    parser.add_argument("--gate-only", action="store_true", help="only the gate's pass share over the draws")
    parser.add_argument(
        "--slides",
        nargs="*",
        type=Path,
        default=[p for p in [bench.DATA / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"] if p.is_file()],
        help="slides whose QC map cells --shipped-gate also checks (default: the TCGA squamous carcinoma crop)",
    )
    parser.add_argument(
        "--slide-mpp",
        nargs="+",
        type=float,
        default=[0.243, 1.0],
        help="µm/px to give those slides (the TCGA crop says none; its nuclei, 6-8 px across, suggest about 1)",
    )
    args = parser.parse_args()
    if args.features_only:
        for dataset in ("rumc", "umcu", "ebhi"):
            bench.features(dataset, quality.QC_SAMPLES)
        return
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    if args.diagnose:
        text = "\n\n".join(diagnose(d, args) for d in args.datasets)
        print(text)
        (bench.RESULTS / f"qc_guarantees_diagnosis_{args.part}.md").write_text(text + "\n")
        return
    if args.gate_only:
        text = gate_draws(args)
        print(text)
        share = "" if args.share == 0.5 else f"_cal{round(100 * args.share)}"
        (bench.RESULTS / f"qc_gate_draws_{args.part}{share}.md").write_text(text + "\n")
        return
    if args.gate_designs:
        text = gate_designs(args)
        print(text)
        (bench.RESULTS / "qc_gate_designs.md").write_text(text + "\n")
        return
    if args.shipped_gate:
        text = shipped_gate(args)
        print(text)
        (bench.RESULTS / "qc_shipped_gate.md").write_text(text + "\n")
        return
    summaries = {}
    for dataset in args.datasets:
        draws = run_draws(dataset, args)
        summaries[f"{dataset}, {args.part}"] = summarise(draws, args.alpha, args.delta)
    header = (f"QC guarantees over {args.draws} draws: alpha={args.alpha}, delta={args.delta}, "
              f"threshold={args.threshold}, method {args.method}, calibration share {args.share:g}, "
              f"gate level {args.domain_level}, features version {quality.QC_FEATURES_VERSION}")  # fmt: skip
    text = header + "\n\n" + table(summaries, args.alpha, args.delta) + "\n"
    print(text)
    stem = f"qc_guarantees_{args.part}_{args.method}" + ("" if args.share == 0.5 else f"_cal{round(100 * args.share)}")
    (bench.RESULTS / f"{stem}.md").write_text(text)
    settings = {k: [str(v) for v in value] if k == "slides" else value for k, value in vars(args).items()}
    atomic_write_json(bench.RESULTS / f"{stem}.json", {"settings": settings, "summary": summaries})
    print(f"wrote {bench.RESULTS / stem}.md, .json")


if __name__ == "__main__":
    main()
