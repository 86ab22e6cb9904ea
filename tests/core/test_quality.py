"""Quality control: metrics against hand-computed cases, the conformal guarantee, features, models."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from napari_uga import quality
from napari_uga.io import InputError, load_pairs
from napari_uga.uncertainty import UncertaintyMaps


def test_rc_curve_and_aurc_by_hand():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    risk = np.array([0.0, 1.0, 0.0, 1.0])
    cov, r = quality.rc_curve(conf, risk)
    np.testing.assert_allclose(cov, [1, 0.75, 0.5, 0.25, 0])
    np.testing.assert_allclose(r, [0.5, 1 / 3, 0.5, 0, 0])
    # trapezoids of width 1/4: (0.5+1/3)/2 + (1/3+0.5)/2 + (0.5+0)/2 + 0
    assert quality.aurc(conf, risk) == pytest.approx(0.25 * (5 / 12 + 5 / 12 + 0.25))


def test_aurc_drops_tied_confidences_together():
    risk = np.array([0.0, 1.0, 0.0, 1.0])
    # oracle ordering has two ties: points (1, 0.5), (0.5, 0), (0, 0)
    assert quality.aurc(-risk, risk) == pytest.approx(0.125)


def test_qc_metrics_by_hand():
    pred = np.array([0.9, 0.85, 0.5, 0.3])
    true = np.array([0.95, 0.7, 0.82, 0.1])
    m = quality.qc_metrics(pred, true, np.array([True, True, False, False]), threshold=0.8)
    assert m["auroc"] == pytest.approx(0.75)  # 3 of 4 (good, bad) pairs ordered right
    assert m["mae"] == pytest.approx((0.05 + 0.15 + 0.32 + 0.2) / 4)
    assert m["spearman"] == pytest.approx(0.8)  # rank differences 0, 1, -1, 0
    assert m["accepted_precision"] == pytest.approx(0.5)
    assert m["coverage"] == pytest.approx(0.5)
    risk = 1 - true
    opt, rand = quality.aurc(-risk, risk), risk.mean()
    assert m["eaurc"] == pytest.approx(m["aurc"] - opt)
    assert m["naurc"] == pytest.approx((rand - m["aurc"]) / (rand - opt))


def test_naurc_is_one_for_oracle_and_auroc_undefined_for_one_class():
    true = np.array([0.1, 0.5, 0.9, 0.95])
    m = quality.qc_metrics(true, true, np.ones(4, bool))
    assert m["naurc"] == pytest.approx(1.0) and m["eaurc"] == pytest.approx(0.0) and m["mae"] == 0
    assert quality.qc_metrics(np.array([0.2, 0.3]), np.array([0.9, 0.95]), np.zeros(2, bool))["auroc"] is None


def _precision(cut: float) -> float:
    """Population precision of accepting s >= cut when s ~ U(0, 1) and P(success | s) = min(1, 1.5 s)."""
    if cut >= 2 / 3:
        return 1.0
    return (0.75 * (4 / 9 - cut**2) + 1 / 3) / (1 - cut)


def test_conformal_precision_holds_over_many_exchangeable_draws():
    rng = np.random.default_rng(0)
    alpha, delta, draws, n = 0.1, 0.1, 300, 200
    violations, coverages = 0, []
    for _ in range(draws):
        s = rng.uniform(size=n)
        dice_true = (rng.uniform(size=n) < np.minimum(1, 1.5 * s)).astype(float)  # 1 = Dice above threshold
        cut = quality.conformal_cut(s, dice_true, threshold=0.8, alpha=alpha, delta=delta)
        violations += (1.0 if math.isinf(cut) else _precision(cut)) < 1 - alpha
        coverages.append(0.0 if math.isinf(cut) else 1 - cut)
    # allowed rate delta, plus 3 binomial standard errors of the estimate over `draws`
    assert violations / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert np.mean(coverages) > 0.4  # not vacuous: the oracle cut (0.379) covers 0.62


def test_conformal_cut_refuses_too_small_calibration_and_stricter_alpha_cuts_higher():
    s = np.linspace(0, 1, 10)
    assert math.isinf(quality.conformal_cut(s, np.ones(10), alpha=0.1, delta=0.1))  # < 22 images
    rng = np.random.default_rng(1)
    s = rng.uniform(size=2000)
    y = (rng.uniform(size=2000) < s).astype(float)
    assert quality.conformal_cut(s, y, alpha=0.05) > quality.conformal_cut(s, y, alpha=0.2)
    with pytest.raises(InputError):
        quality.conformal_cut(s, y, alpha=1.5)


def test_conformal_selection_controls_the_false_discovery_rate_with_small_calibration_sets():
    rng = np.random.default_rng(2)
    alpha, draws, n, m = 0.1, 2000, 16, 16
    fdp, coverage = [], []
    for _ in range(draws):
        s = rng.uniform(size=n + m)
        good = rng.uniform(size=n + m) < np.minimum(1, 1.5 * s)
        accepted = quality.conformal_selection(s[:n], good[:n].astype(float), s[n:], threshold=0.8, alpha=alpha)
        fdp.append(float((~good[n:][accepted]).mean()) if accepted.any() else 0.0)
        coverage.append(accepted.mean())
    # the expected share of failures among the accepted stays at alpha (3 standard errors of the mean)
    assert np.mean(fdp) <= alpha + 3 * np.std(fdp) / math.sqrt(draws)
    assert np.mean(coverage) > 0.15  # 16 calibration images: Learn-then-Test accepts nothing here
    assert math.isinf(quality.conformal_cut(s[:n], good[:n].astype(float), alpha=alpha, delta=0.1))


def test_conformal_selection_hand_computed():
    cal = np.array([0.9, 0.8, 0.3, 0.2])
    dice_true = np.array([1.0, 0.5, 1.0, 0.1])  # failures scored 0.8 and 0.2
    # p-values (1 + failures scored >= s) / 5: 0.95 -> 0.2, 0.85 -> 0.2, 0.5 -> 0.4
    # Benjamini-Hochberg at 0.3 over 3 images: 0.2 <= 0.3 * 2/3 passes, 0.4 > 0.3 does not
    test = np.array([0.95, 0.85, 0.5])
    assert quality.conformal_selection(cal, dice_true, test, alpha=0.3).tolist() == [True, True, False]
    assert quality.conformal_selection(cal, dice_true, test, alpha=0.5).all()  # 0.4 <= 0.5 * 3/3
    assert not quality.conformal_selection(cal, dice_true, np.array([0.95]), alpha=0.1).any()  # 1/5 > 0.1
    assert quality.conformal_selection(cal, dice_true, np.zeros(0)).shape == (0,)


def _maps(samples: np.ndarray) -> UncertaintyMaps:
    prob = samples.mean(0).astype(np.float32)
    zeros = np.zeros_like(prob)
    return UncertaintyMaps(prob, zeros + 0.1, zeros, zeros, samples.astype(np.float16))


def test_image_features_agreement(rng):
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    same = np.zeros((8, 64, 64))
    same[:, 10:40, 10:40] = 0.9
    f = quality.image_features(_maps(same), image, samples=4)
    assert f["pairwise_dice"] == 1.0 and f["tta_dice"] == 1.0 and f["area_cv"] == 0.0
    assert f["area"] == pytest.approx(900 / 4096) and f["empty"] == 0.0 and f["n_components"] == 1.0
    shifted = same.copy()
    shifted[4:, :, :] = 0
    shifted[4:, 20:50, 20:50] = 0.9  # the second view segments a shifted square
    g = quality.image_features(_maps(shifted), image, samples=4)
    assert g["mc_pairwise_dice"] == 1.0  # every view agrees with itself
    expected = 2 * 400 / 1800  # two 30x30 squares overlapping 20x20
    assert g["tta_dice"] == pytest.approx(expected) and g["area_cv"] == 0.0
    assert g["pairwise_dice"] == pytest.approx((2 * 6 * 1.0 + 16 * expected) / 28)
    empty = quality.image_features(_maps(np.zeros((8, 64, 64))), image)
    assert empty["empty"] == 1.0 and empty["pairwise_dice"] == 1.0 and set(empty) == set(f)
    with pytest.raises(ValueError, match="keep_samples"):
        quality.image_features(UncertaintyMaps(*[np.zeros((64, 64), np.float32)] * 4), image)


def test_texture_histograms_tell_flat_from_structured_tissue(rng):
    flat = quality._texture(np.full((64, 64, 3), 200, np.uint8))
    assert flat["lbp_grey_r1_8"] > 0.9  # inside the border every neighbour equals the centre: one code
    noisy = quality._texture(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for name in ("grey", "hem"):
        for radius in quality.LBP_RADII:
            assert sum(noisy[f"lbp_{name}_r{radius}_{b}"] for b in range(10)) == pytest.approx(1.0)
    assert noisy["lbp_grey_r1_8"] < 0.2 and noisy["lbp_grey_r1_9"] > 0.2  # noise: many irregular patterns


def _synthetic_rows(rng, n=80):
    rows, truth = [], []
    for _ in range(n):
        agree = rng.uniform()
        noise = {name: rng.uniform() for name in ("area", "noise", "tta_dice", "mi_region", "entropy_region")}
        rows.append(noise | {"pairwise_dice": agree, "soft_dice": agree})
        truth.append(float(np.clip(agree + rng.normal(0, 0.05), 0, 1)))
    return rows, truth


@pytest.mark.parametrize("method", ["regressor", "pairwise_dice", "linear", "auto"])
def test_fit_predict_and_json_round_trip(tmp_path, rng, method):
    rows, truth = _synthetic_rows(rng)
    qc = quality.fit_qc_model(rows, truth, method=method)
    pred, accepted = qc.predict(rows)
    assert np.abs(pred - truth).mean() < 0.1
    assert np.all(accepted == (pred >= qc.cut))
    loaded = quality.QCModel.load(qc.save(tmp_path / "qc.json"))
    np.testing.assert_allclose(loaded.predict(rows)[0], pred)
    assert loaded.cut == qc.cut and loaded.method == qc.method
    assert qc.method == method or (method == "auto" and qc.method in ("regressor", "presence", "blend"))
    fdr = quality.refit_for(loaded, qc.alpha, qc.delta, qc.threshold, rule="fdr")
    assert fdr.rule == "fdr" and fdr.oof == qc.oof  # the cross-fitted scores are kept, not refitted
    looser = quality.refit_for(qc, 0.3, qc.delta, qc.threshold)
    assert looser.cut <= qc.cut and looser.oof == qc.oof
    again = quality.QCModel.load(fdr.save(tmp_path / "fdr.json"))
    assert again.rule == "fdr" and np.array_equal(again.predict(rows)[1], fdr.predict(rows)[1])


def test_regressor_predicts_the_median_of_a_bimodal_dice(rng):
    """Where the features cannot separate Dice 0 from Dice 1 (1:2 odds), the forest mean lands in
    between; the median of its trees leans to the likely mode, which lowers the absolute error."""

    def draw(n):
        return [{"pairwise_dice": float(v), "area": float(a)} for v, a in rng.uniform(size=(n, 2))]

    truth = np.array([0.0, 1.0, 1.0] * 30)
    qc = quality.fit_qc_model(draw(90), truth, method="regressor")
    fresh = draw(90)
    pred, _ = qc.predict(fresh)
    mean = np.clip(qc.estimator.predict(quality._matrix(fresh, qc.features)), 0, 1)
    assert np.abs(pred - truth).mean() < np.abs(mean - truth).mean() - 0.01


def _presence_case(rng, n):
    """Images where the prediction is empty or not, and a texture cue tells whether tumour is there.

    Dice follows the two facts as real tiles do: empty prediction -> 1 without tumour, 0 with;
    a prediction -> 0 without tumour, its overlap (here ``quality_cue``) with tumour.
    """
    empty = rng.uniform(size=n) < 0.4
    tumour = rng.uniform(size=n) < 0.5
    texture = tumour + rng.normal(0, 0.3, n)
    overlap = rng.uniform(0.5, 1.0, n)
    truth = np.where(empty, (~tumour).astype(float), np.where(tumour, overlap, 0.0))
    rows = [{"empty": float(e), "lbp_cue": float(t), "quality_cue": float(q), "noise": float(rng.uniform())}
            for e, t, q in zip(empty, texture, overlap, strict=True)]  # fmt: skip
    return rows, truth, tumour


def test_presence_model_separates_tumour_presence_from_segmentation_quality(tmp_path, rng):
    rows, truth, tumour = _presence_case(rng, 160)
    qc = quality.fit_qc_model(rows, truth, method="presence", tumour=tumour)
    fresh, fresh_truth, _ = _presence_case(rng, 160)
    pred, _ = qc.predict(fresh)
    forest = quality.fit_qc_model(rows, truth, method="regressor").predict(fresh)[0]
    presence_mae, forest_mae = np.abs(pred - fresh_truth).mean(), np.abs(forest - fresh_truth).mean()
    assert presence_mae < 0.15 and presence_mae < forest_mae
    assert [qc.features[i] for i in qc.estimator.columns] == ["lbp_cue"]  # P(tumour) reads the texture only
    quality._FITTED.clear()  # refit from the JSON alone, as in a new process
    loaded = quality.QCModel.load(qc.save(tmp_path / "presence.json"))
    assert loaded.estimator is not qc.estimator and loaded.tumour == tumour.tolist()
    np.testing.assert_allclose(loaded.predict(fresh)[0], pred)
    auto = quality.fit_qc_model(rows, truth, method="auto", tumour=tumour)
    assert set(auto.info["auto"]["out_of_fold_naurc"]) == {"regressor", "presence", "blend"}
    assert auto.info["auto"]["naurc_gap_se"] > 0 and "one standard error" in quality.method_reason(auto)
    without_flags = quality.fit_qc_model(rows, truth, method="auto")
    assert set(without_flags.info["auto"]["out_of_fold_naurc"]) == {"regressor"}
    assert "no tumour flags" in quality.method_reason(without_flags) and quality.method_reason(qc) == ""
    with pytest.raises(InputError, match="tumour flag"):
        quality.fit_qc_model(rows, truth, method="presence")
    with pytest.raises(InputError, match="tumour flag"):
        quality.QCModel.from_dict({**qc.to_dict(), "tumour": [True]})
    with pytest.raises(InputError, match="first feature"):
        quality.QCModel.from_dict({**qc.to_dict(), "features": qc.features[::-1]})


def test_blend_is_the_mean_of_the_forest_and_the_presence_model(tmp_path, rng):
    rows, truth, tumour = _presence_case(rng, 60)
    fitted = {m: quality.fit_qc_model(rows, truth, method=m, tumour=tumour) for m in ("regressor", "presence", "blend")}
    np.testing.assert_allclose(fitted["blend"].oof, (np.array(fitted["regressor"].oof) + fitted["presence"].oof) / 2)
    fresh, _, _ = _presence_case(rng, 20)
    parts = [fitted[m].predict(fresh)[0] for m in ("regressor", "presence")]
    np.testing.assert_allclose(fitted["blend"].predict(fresh)[0], (parts[0] + parts[1]) / 2)
    quality._FITTED.clear()
    loaded = quality.QCModel.load(fitted["blend"].save(tmp_path / "blend.json"))
    np.testing.assert_allclose(loaded.predict(fresh)[0], fitted["blend"].predict(fresh)[0])


@pytest.mark.parametrize(
    ("forest_noise", "presence_noise", "chosen"),
    [(0.4, 0.02, "presence"), (0.02, 0.4, "regressor"), (0.1, 0.1, "blend")],
)
def test_auto_keeps_one_model_only_when_it_is_clearly_better(monkeypatch, forest_noise, presence_noise, chosen):
    """One-standard-error rule: a clear out-of-fold winner is kept, a gap within the noise gives their mean."""
    truth = np.random.default_rng(1).uniform(size=40)
    noise = {"regressor": forest_noise, "presence": presence_noise}
    scores = {m: truth + noise[m] * np.random.default_rng(seed).normal(size=40) for seed, m in enumerate(noise)}
    monkeypatch.setattr(quality.auto, "_cross_fit_rows", lambda m, *_: scores[m])
    rows = [{"empty": 0.0, "lbp_cue": 0.0}] * 40
    method, oof, evidence = quality._select_method(rows, truth, None, np.ones(40, bool))
    assert method == chosen and evidence["naurc_gap_se"] > 0
    np.testing.assert_allclose(oof, {**scores, "blend": (scores["regressor"] + scores["presence"]) / 2}[chosen])


def test_auto_blends_where_nothing_tells_the_models_apart(monkeypatch):
    scores = {"regressor": np.array([0.2, 0.9]), "presence": np.array([0.9, 0.2])}
    monkeypatch.setattr(quality.auto, "_cross_fit_rows", lambda m, *_: scores[m])
    rows = [{"empty": 0.0, "lbp_cue": 0.0}] * 2
    assert quality._select_method(rows, np.array([0.1, 0.95]), None, np.ones(2, bool))[0] == "blend"  # 2 images
    same = np.full(2, 0.7)  # every image equally good: no ordering to score
    assert quality.naurc(scores["regressor"], same) is None
    assert quality._select_method(rows, same, None, np.ones(2, bool))[0] == "blend"


def test_the_standard_error_resamples_whole_groups(rng):
    """Copies of one patient's image are not independent evidence: resampling groups widens the error."""
    truth = rng.uniform(size=10)
    first, second = (np.repeat(truth + rng.normal(0, 0.2, 10), 4) for _ in range(2))
    truth = np.repeat(truth, 4)
    by_image = quality._naurc_gap_se(first, second, truth, None)
    by_group = quality._naurc_gap_se(first, second, truth, np.repeat(np.arange(10), 4))
    assert by_group > 1.3 * by_image


def test_presence_models_read_every_column_without_names(rng):
    rows, truth, tumour = _presence_case(rng, 40)
    x = quality._matrix(rows, quality._feature_names("presence", rows))
    for method in ("presence", "blend"):
        oof = quality.cross_fit(method, x, truth, tumour=tumour)
        assert oof.shape == (40,) and np.all((0 <= oof) & (oof <= 1))
    assert quality.PresenceModel().fit(x, truth, tumour).columns == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["regressor", "presence", "blend"])
def test_older_learned_files_are_rescored_with_todays_estimate(rng, method):
    rows, truth, tumour = _presence_case(rng, 30)
    current = quality.fit_qc_model(rows, truth, method=method, rule="fdr", tumour=tumour)
    assert quality.QCModel.from_dict(current.to_dict()).oof == current.oof
    older = current.to_dict() | {"cut": 0.0, "oof": [0.5] * 30}  # scored by the forest mean / every feature
    del older["estimate"]
    loaded = quality.QCModel.from_dict(older)
    assert loaded.oof != older["oof"] and method in loaded.info["rescored"]
    assert loaded.cut == quality.conformal_cut(np.array(loaded.oof), truth, 0.8, 0.1, 0.1)


def test_older_files_load_as_learn_then_test_and_fdr_needs_its_scores(rng):
    rows, truth = _synthetic_rows(rng, 30)
    old = quality.fit_qc_model(rows, truth, method="pairwise_dice").to_dict()
    del old["rule"], old["oof"]  # a QC model written before the rule existed
    loaded = quality.QCModel.from_dict(old)
    assert loaded.rule == "ltt" and loaded.oof == []
    refitted = quality.refit_for(loaded, 0.1, 0.1, 0.8, rule="fdr")
    assert refitted.rule == "fdr" and len(refitted.oof) == 30
    with pytest.raises(InputError, match="out-of-fold"):
        quality.QCModel.from_dict({**old, "rule": "fdr", "oof": [0.5]})


def test_report_note_says_why_nothing_is_accepted(rng):
    rows, truth = _synthetic_rows(rng, 8)
    ltt = quality.fit_qc_model(rows, truth, method="pairwise_dice")
    note = quality.qc_report(ltt, ["a"] * 8, rows, [None] * 8)["note"]
    assert "Learn-then-Test needs at least 22" in note
    fdr = quality.refit_for(ltt, 0.1, 0.1, 0.8, rule="fdr")
    report = quality.qc_report(fdr, ["a"] * 8, rows, [None] * 8)
    assert report["rule"] == "fdr" and report["cut"] is None
    assert "needs at least 9 calibration images" in report["note"]


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a JSON QC model"):
        quality.QCModel.load(bad)
    bad.write_text('{"format": "other"}')
    with pytest.raises(InputError, match="not a napari-uga QC model"):
        quality.QCModel.load(bad)
    with pytest.raises(InputError, match="unknown QC method"):
        quality.fit_qc_model([{"a": 1.0}] * 3, [1.0] * 3, method="magic")
    with pytest.raises(InputError, match="unknown acceptance rule"):
        quality.fit_qc_model([{"a": 1.0}] * 3, [1.0] * 3, rule="magic")


def test_run_qc_real_tiles_tiny_model(umcu_pairs, tiny_model):
    calibration, test = umcu_pairs[::8], umcu_pairs[1::16]
    seen = []
    out = quality.run_qc(tiny_model, test, calibration, samples=2, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(test) + len(calibration),) * 2
    assert [r["name"] for r in out["per_image"]] == [p.name for p in test]
    assert all(0 <= r["dice_pred"] <= 1 and r["dice_true"] is not None for r in out["per_image"])
    assert set(out["metrics"]) == {
        "auroc",
        "aurc",
        "eaurc",
        "naurc",
        "mae",
        "spearman",
        "accepted_precision",
        "coverage",
    }
    assert out["threshold"] == 0.8 and out["alpha"] == 0.1
    first, again = (quality.compute_features(tiny_model, test[0].image, 0.5, samples=2)[0] for _ in range(2))
    assert first == again  # seeded dropout: QC is reproducible


def test_shipped_calibration_matches_the_features(rng):
    qc = quality.default_qc_model()
    samples = np.zeros((8, 64, 64))
    samples[:, 5:30, 5:30] = 0.8
    row = quality.image_features(_maps(samples), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert set(qc.features) <= set(row) and qc.method in quality.METHODS
    assert "camelyon16_rumc" in qc.info["calibration"]  # never a test split
    pred, accepted = qc.predict([row])
    assert 0 <= pred[0] <= 1 and accepted.dtype == bool


# ----------------------------------------------------------------------------- the exchangeability gate


def _domain_rows(rng, n, shift=0.0, copies=1):
    """Rows with colour, the gate's features (texture, network distance) and a QC score; ``copies``
    near-identical images per group (overlapping tiles)."""
    rows = []
    for _ in range(n // copies):
        base = rng.normal(size=8) + shift
        for _ in range(copies):
            v = base + rng.normal(0, 0.02, 8)
            rows.append(
                {"saturation": v[0], "value": v[1], "hematoxylin": v[2], "eosin": v[3], "tissue_fraction": 1.0,
                 "lbp_grey_r1_0": v[4], "lbp_grey_r1_1": v[5], "lbp_hem_r3_2": v[6], "feature_distance": v[7],
                 "pairwise_dice": float(rng.uniform())}
            )  # fmt: skip
    return rows


def test_domain_p_values_are_valid_in_domain_and_small_out_of_it(rng):
    """Full conformal: over many exchangeable draws p <= 0.05 happens at most 5 % of the time."""
    flagged, shifted = [], []
    for _ in range(200):
        cal, test = _domain_rows(rng, 30), _domain_rows(rng, 5)
        flagged.extend(quality.domain_p_values(cal, test) <= 0.05)
        shifted.extend(quality.domain_p_values(cal, _domain_rows(rng, 2, shift=3.0)) <= 0.05)
    assert np.mean(flagged) <= 0.05 + 0.02 and np.mean(flagged) > 0.01  # about the level, not far below
    assert np.mean(shifted) > 0.95
    p = quality.domain_p_values(cal, test)
    assert np.all((1 / 31 <= p) & (p <= 1)) and np.allclose(p * 31, np.round(p * 31))  # ranks among n + 1
    assert quality.min_domain_images(0.05) == 19 and quality.min_domain_images(0.1) == 9


def test_domain_groups_keep_copies_from_making_calibration_images_typical(rng):
    """Calibration tiles that overlap (groups of near-copies) would look typical of each other; a new
    tile has no copy. Leaving the own group out keeps the gate valid."""
    plain, grouped = [], []
    for _ in range(100):
        cal = _domain_rows(rng, 40, copies=4)
        groups = np.repeat(np.arange(10), 4)
        test = _domain_rows(rng, 4)
        plain.extend(quality.domain_p_values(cal, test) <= 0.1)
        grouped.extend(quality.domain_p_values(cal, test, groups) <= 0.1)
    assert np.mean(plain) > 0.5 and np.mean(grouped) <= 0.1 + 0.04


def test_gate_sends_unlike_images_to_review_with_the_reason(tmp_path, rng):
    cal = _domain_rows(rng, 60)
    truth = [0.95] * 60  # every calibration image good: Learn-then-Test accepts from the lowest score up
    qc = quality.fit_qc_model(cal, truth, method="pairwise_dice", groups=[f"g{i // 2}" for i in range(60)])
    assert qc.groups[:3] == ["g0", "g0", "g1"] and math.isfinite(qc.cut)
    near, far = _domain_rows(rng, 10), _domain_rows(rng, 10, shift=4.0)
    report = quality.qc_report(qc, [f"i{i}" for i in range(20)], near + far, [None] * 20)
    rows = report["per_image"]
    assert all({"in_domain", "domain_p", "reason"} <= set(r) for r in rows) and report["domain_level"] == 0.05
    assert sum(r["in_domain"] for r in rows[:10]) >= 8 and not any(r["in_domain"] for r in rows[10:])
    assert not any(r["accepted"] for r in rows[10:])
    assert rows[15]["reason"].startswith("unlike the calibration images: atypicality p = ")
    assert (
        "10 of 20 images are unlike the calibration images" in report["domain_note"] or "of 20" in report["domain_note"]
    )
    fdr = quality.refit_for(qc, 0.1, 0.1, 0.8, rule="fdr")
    assert not fdr.predict(far)[1].any() and fdr.predict(far, gate=False)[1].all()
    # the gate travels with the file: groups, level, the calibration images' own scores
    data = qc.to_dict()
    assert data["groups"] == qc.groups and data["domain"]["level"] == 0.05 and len(data["domain"]["scores"]) == 60
    assert set(data["domain"]["features"]) == {"texture", "network"}
    loaded = quality.QCModel.load(qc.save(tmp_path / "qc.json"))
    np.testing.assert_allclose(loaded.domain_p(far), qc.domain_p(far))
    off = quality.refit_for(loaded, 0.1, 0.1, 0.8, domain_level=0.0)
    assert off.predict(far)[1].all() and np.isnan(off.domain_p(far)).all()
    assert "gate is off" in quality.qc_report(off, ["a"], far[:1], [None])["domain_note"]
    older = {k: v for k, v in data.items() if k not in ("groups", "domain")}  # a file from before the gate
    old = quality.QCModel.from_dict(older)
    assert old.groups == [] and old.domain_level == 0.05 and not old.predict(far)[1].any()
    with pytest.raises(InputError, match="domain level"):
        quality.QCModel.from_dict({**data, "domain": {"level": 1.5}})
    with pytest.raises(InputError, match="groups"):
        quality.QCModel.from_dict({**data, "groups": ["a"]})


def test_gate_cannot_flag_with_too_few_calibration_images_and_says_so(rng):
    cal = _domain_rows(rng, 12)
    qc = quality.fit_qc_model(cal, [0.9] * 12, method="pairwise_dice", rule="fdr")
    report = quality.qc_report(qc, ["x"], _domain_rows(rng, 1, shift=5.0), [None])
    assert report["per_image"][0]["in_domain"] and report["per_image"][0]["domain_p"] == pytest.approx(1 / 13)
    assert "cannot flag anything with 12 calibration images" in report["domain_note"]


def test_slide_domain_p_merges_blocks():
    assert quality.merge_p_values([0.01, 0.02, 0.5, 0.6]) == pytest.approx(0.52)
    assert quality.merge_p_values([0.01, 0.01, 0.02]) == pytest.approx(0.02)
    assert math.isnan(quality.merge_p_values([math.nan]))


EBHI = Path(__file__).resolve().parents[1] / "data" / "ebhi_seg"  # six real colon biopsy tiles (README there)


@pytest.fixture(scope="module")
def shipped_net():
    from napari_uga.models import DEFAULT_WEIGHTS, load_model

    return load_model(DEFAULT_WEIGHTS, "cpu")


def _overlap_groups(names: list[str]) -> list[int]:
    """Connected groups of overlapping 256 px Camelyon tiles (names carry their level-0 corner)."""
    xy = np.array([[int(v) for v in re.search(r"_x(\d+)_y(\d+)", n).groups()] for n in names])
    label = list(range(len(names)))
    for i in range(len(names)):
        for j in range(i):
            if np.all(np.abs(xy[i] - xy[j]) < 256):
                old, new = label[i], label[j]
                label = [new if g == old else g for g in label]
    return label


def test_gate_on_real_tiles_of_two_domains(shipped_net, umcu_pairs):
    """Colon biopsies are unlike the lymph-node calibration images (shipped, or UMCU tiles); UMCU tiles
    of groups held out of a UMCU calibration are mostly like it."""
    from napari_uga.models import working_factor

    factor = working_factor(shipped_net, 0.243)  # EBHI as the benchmarks run it
    ebhi = load_pairs(EBHI / "images", EBHI / "masks")
    ebhi_rows = [quality.domain_row(shipped_net, p.image, factor) for p in ebhi]
    shipped = quality.default_qc_model()
    assert len(shipped.groups) == len(shipped.rows) and shipped.domain_level == quality.DOMAIN_LEVEL
    assert not shipped.in_domain(shipped.domain_p(ebhi_rows)).any()  # every colon tile: review
    umcu_rows = [quality.domain_row(shipped_net, p.image, factor) for p in umcu_pairs]
    groups = np.array(_overlap_groups([p.name for p in umcu_pairs]))
    held_out = np.isin(groups, np.unique(groups)[::4])  # a quarter of the groups
    cal = [r for r, h in zip(umcu_rows, held_out, strict=True) if not h]
    test = [r for r, h in zip(umcu_rows, held_out, strict=True) if h]
    assert len(cal) >= quality.min_domain_images()  # enough to flag at 0.05
    p = quality.domain_p_values(cal, test, groups[~held_out])
    assert np.mean(p > quality.DOMAIN_LEVEL) >= 0.75
    # 26 calibration tiles: a p-value is a multiple of 1/27, the power is smaller than with the 57 shipped ones
    assert np.mean(quality.domain_p_values(cal, ebhi_rows, groups[~held_out]) <= quality.DOMAIN_LEVEL) >= 0.8


def test_batch_qc_rows_and_csv_carry_the_gate(tmp_path, rng):
    """``uga batch``: each record and ``qc.csv`` say whether the input is like the calibration images."""
    from napari_uga.distributed import _qc_row, write_qc_csv
    from napari_uga.qc_map import slide_qc

    qc = quality.fit_qc_model(_domain_rows(rng, 60), [0.95] * 60, method="pairwise_dice").to_dict()
    image = _qc_row(qc, _domain_rows(rng, 1, shift=4.0))
    assert image["in_domain"] is False and image["accepted"] is False and image["domain_p"] <= 0.05
    cells = [(512 * (i // 5), 512 * (i % 5), 512, 512) for i in range(20)]
    slide, paths = slide_qc(
        quality.QCModel.from_dict(qc), (2048, 2560), cells, _domain_rows(rng, 20), 0.25, tmp_path, "s"
    )  # a slide's map cells: one merged p-value
    shares = slide["qc_map"]
    assert shares["share_accepted"] + shares["share_out_of_domain"] == 1.0 and shares["share_accepted"] >= 0.85
    assert set(paths) == {"qc_map", "qc_regions"} and len(shares["worst"]) == round(20 * shares["share_out_of_domain"])
    assert slide["in_domain"] is True and 0.05 < slide["domain_p"] <= 1  # typical cells: the slide is in domain
    assert slide["accepted"] is (shares["share_accepted"] == 1.0)  # accepted only when every cell is
    assert _qc_row(None, []) == {"dice_pred": None, "accepted": None, "in_domain": None, "domain_p": None}
    write_qc_csv(tmp_path / "qc.csv", [{"name": "a", **image}, {"name": "b", **slide}, {"name": "c"}])
    lines = (tmp_path / "qc.csv").read_text().splitlines()
    assert lines[0] == "name,dice_pred,accepted,in_domain,domain_p" and lines[3] == "c,,,,"
    assert lines[1].startswith("a,") and lines[1].split(",")[2:4] == ["false", "false"]
    assert lines[2].split(",")[2:4] == [str(slide["accepted"]).lower(), "true"]
