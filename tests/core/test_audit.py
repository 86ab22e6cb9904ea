"""In-session measurement on real tiles: test-then-train scores, the audit estimate, do-no-harm, auto preset."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_uga.audit import (
    PatchScore,
    Proxies,
    choose_shift,
    compare_rounds,
    missing_scores,
    overconfidence,
    overconfident_said,
    pooled_estimate,
    ppi_estimate,
    rollback_said,
    round_to_keep,
    score_patch,
    score_rounds,
    stop_signal,
    tissue_is_new,
    worse_than,
)
from napari_uga.io import load_pairs
from napari_uga.loop import LoopConfig, Oracle, _audit_boxes, _hand_over, _Ledger, audit_count, draw_audits, simulate
from napari_uga.models import load_model
from napari_uga.selection import Box
from napari_uga.training import evaluate
from napari_uga.uncertainty import predict_probability

EBHI = Path(__file__).resolve().parents[1] / "data" / "ebhi_seg"  # six real colon biopsy tiles (README there)


@pytest.fixture(scope="module")
def shipped():
    return load_model(device="cpu")


def _scores(model, pairs, factor=0.5):
    oracle = Oracle(pairs)
    out = []
    for p in pairs:
        a = oracle.annotate(Box(p.name, 0, 0, *p.image.shape[:2]))
        out.append(score_patch(predict_probability(model, a.image, factor=factor), a.mask))
    return out


def test_scores_are_pixel_counts_and_the_pooled_estimate_is_global_dice(shipped, umcu_pairs):
    score = score_patch(np.array([[1, 1], [0, 0]]), np.array([[1, 0], [1, 0]]))
    assert score == PatchScore(tp=1, predicted=2, truth=2, changed=0.5, expected_tp=2, expected_truth=2)
    assert score.dice == 0.5
    assert score_patch(np.zeros((2, 2)), np.zeros((2, 2))).dice is None
    assert PatchScore.from_dict(score.as_dict()) == score
    with pytest.raises(TypeError):
        PatchScore.from_dict({**score.as_dict(), "tp": -1})

    scores = _scores(shipped, umcu_pairs)
    whole = pooled_estimate(scores)
    assert whole.dice == pytest.approx(evaluate(shipped, umcu_pairs, 0.5)["dice_global"], abs=1e-6)
    assert whole.low <= whole.dice <= whole.high and whole.n == len(umcu_pairs)
    two = pooled_estimate([s for s in scores if s.truth][:2])
    assert (two.low, two.high) == (0.0, 1.0)  # two patches say nothing about the spread
    assert pooled_estimate([PatchScore(0, 0, 0, 0.0)]) is None


def test_intervals_cover_the_pool_dice_and_perfect_maps_make_the_estimate_exact(shipped, umcu_pairs):
    """Audits of 8 random tiles of 32: both 90 % intervals cover the Dice of all 32 in most of 300 draws
    (0.83 and 0.84 measured on 400); with maps equal to the truth, the prediction-powered estimate is exact."""
    oracle = Oracle(umcu_pairs)
    probabilities = [predict_probability(shipped, p.image, factor=0.5) for p in umcu_pairs]
    masks = [oracle.annotate(Box(p.name, 0, 0, 256, 256)).mask for p in umcu_pairs]
    scores = [score_patch(pr, m) for pr, m in zip(probabilities, masks, strict=True)]
    truth = pooled_estimate(scores).dice
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(scores), 8, replace=False) for _ in range(300)]
    proxies = Proxies.of(probabilities)
    for estimate in (pooled_estimate, lambda s: ppi_estimate(s, proxies)):
        draws = [estimate([scores[i] for i in pick]) for pick in picks]
        assert np.mean([d is not None and d.low <= truth <= d.high for d in draws]) >= 0.75
    oracle_maps = [m.astype(float) for m in masks]
    exact = [score_patch(m, m) for m in oracle_maps]
    sharp = ppi_estimate([exact[i] for i in picks[0]], Proxies.of(oracle_maps))
    assert sharp.dice == pytest.approx(1.0) and sharp.high - sharp.low < 1e-9
    assert ppi_estimate([scores[i] for i in picks[0][:2]], proxies).low == 0.0  # two patches: no interval


def test_do_no_harm_compares_rounds_on_the_same_fresh_patches(shipped, tiny_model, umcu_pairs):
    good, bad = _scores(shipped, umcu_pairs[:8]), _scores(tiny_model, umcu_pairs[:8])
    assert compare_rounds(good, good).delta == 0
    worse = compare_rounds(bad, good)
    assert worse.delta < -0.1 and worse.high < 0 and worse_than(worse)
    assert not worse_than(compare_rounds(good, bad))
    with pytest.raises(ValueError):
        compare_rounds(good, bad[:3])


def test_auto_preset_reads_the_first_batch(shipped, umcu_pairs):
    ebhi = load_pairs(EBHI / "images", EBHI / "masks")
    assert choose_shift(_scores(shipped, ebhi[:5], factor=0.97 / 0.486)) == "organ"  # colon, not lymph node
    never = lambda: 1 / 0  # noqa: E731 - a gate that must not be asked
    assert choose_shift([PatchScore(90, 100, 100, 0.05)], never) == "centre"  # right on the new tissue: keep it
    assert choose_shift([PatchScore(0, 0, 0, 0.0)], never) == "centre"  # nothing says the model is wrong
    hard = [PatchScore(10, 100, 100, 0.5)]
    assert choose_shift(hard, lambda: False) == "centre"  # hard, but not new tissue
    assert choose_shift(hard, lambda: True) == "organ" and choose_shift(hard) == "organ"


def test_the_gate_tells_new_tissue_from_the_training_tissue(shipped, umcu_pairs):
    """Colon biopsies are new to the lymph-node model; its own training centre's replay tiles are not."""
    from napari_uga.loop import replay_pairs

    ebhi = load_pairs(EBHI / "images", EBHI / "masks")
    assert tissue_is_new(shipped, [p.image for p in ebhi[:5]], 0.97 / 0.486) is True
    assert tissue_is_new(shipped, [p.image[:256, :256] for p in replay_pairs()[:5]], 0.5) is False
    assert tissue_is_new(shipped, [], 0.5) is None


def test_auto_reads_the_pool_tissue_not_the_uncertain_batch(shipped, umcu_pairs):
    """UMCU lymph node at a new centre: its most uncertain patches look new to the gate, its tissue does not."""
    from napari_uga.loop import config_for
    from napari_uga.models import working_factor
    from napari_uga.splits import position_split

    left, right = position_split(umcu_pairs)
    factor = working_factor(shipped, 0.226)
    presets = {s: config_for(s, steps=1) for s in ("centre", "organ")}
    run = simulate(shipped, left, right[:2], [0, 5], "uncertainty", 3, factor, presets=presets, audit_share=0.2)
    batch = Oracle(left)
    uncertain = [batch.annotate(Box(**{k: p[k] for k in ("image", "y", "x", "h", "w")})).image for p in run.picks[0]]
    assert tissue_is_new(shipped, uncertain, factor) is True  # the first batch alone says "new"
    assert run.shift == "centre"  # the gate read the pool's tissue: lymph node, like the training tissue


def test_stop_signal_speaks_on_a_cleared_target_or_a_steady_estimate(shipped, umcu_pairs):
    estimate = pooled_estimate(_scores(shipped, umcu_pairs))
    assert stop_signal(estimate, [], target=estimate.low - 0.01).endswith("you can stop")
    assert stop_signal(estimate, [0.2, 0.004, -0.003]).endswith("unlikely to help")
    assert stop_signal(estimate, [0.004, 0.05]) is None and stop_signal(None, [0.0, 0.0]) is None


def test_audits_are_random_tissue_patches_apart_from_the_proposals(umcu_pairs):
    assert [audit_count(k, 0.2) for k in (0, 1, 5, 10)] == [0, 1, 1, 2] and audit_count(5, 0) == 0
    config = LoopConfig()
    taken = [Box(umcu_pairs[0].name, 0, 0, 256, 256)]
    picks = draw_audits(umcu_pairs, 6, config, taken, np.random.default_rng(3))
    assert len(picks) == 6 and all(p.audit for p in picks)
    assert not any(p.box.overlaps(t) for p in picks for t in taken)
    assert picks == draw_audits(umcu_pairs, 6, config, taken, np.random.default_rng(3))


def test_simulate_scores_before_training_and_rolls_back_a_harmful_round(shipped, umcu_pairs):
    """A fine-tune that wrecks the model (a huge learning rate) is caught on the audits as soon as it is trained."""
    pool, test = umcu_pairs[::2][:8], umcu_pairs[1::2][:6]
    harmful = LoopConfig(steps=3, batch=2, batch_size=4, samples=2, lr=0.5, anchor=0.0, replay_share=0, self_share=0)
    on = simulate(shipped, pool, test, [0, 2, 4], "uncertainty", 0, 0.5, harmful, audit_share=0.5, no_harm=True)
    off = simulate(shipped, pool, test, [0, 2, 4], "uncertainty", 0, 0.5, harmful, audit_share=0.5, no_harm=False)
    assert on.rollbacks == 2 and on.rollbacks_by_budget == [0, 1, 2] and off.rollbacks == 0
    assert on.round_in_use == [0, 0, 0] and off.round_in_use == [0, 1, 2] and on.tuned_from == [None, 0, 0]
    assert on.dice_global == [on.dice_global[0]] * 3 and off.dice_global[2] < on.dice_global[2] - 0.1
    assert on.picks[0] == off.picks[0]  # the same first batch; the wrecked round proposes the second one
    # each batch of 2: 1 proposed patch, and the other patch's area as 4 quarter-patch audits
    assert [sum(p["audit"] for p in batch) for batch in on.picks] == [4, 4]
    assert {(p["h"], p["w"], p["audit"]) for batch in on.picks for p in batch} == {(256, 256, False), (128, 128, True)}
    # audits are never trained on: the round in use at each budget is scored on every audit drawn so far
    assert on.estimate_audits == [0, 4, 8] and on.estimated_dice[0] is None and None not in on.estimated_dice[1:]
    assert None not in (off.hard_dice[1], on.hard_dice[1]) and off.hard_dice[1] < on.hard_dice[1] - 0.1  # wrecked
    # a batch of audits alone is measured and trains nothing
    audits_only = simulate(shipped, pool, test, [0, 2], "uncertainty", 0, 0.5, harmful, audit_share=1.0)
    assert audits_only.round_in_use == [0, 0] and len(audits_only.rounds) == 1
    assert audits_only.estimate_audits == [0, 8] and all(p["audit"] for p in audits_only.picks[0])


def test_auto_shift_and_stop_end_a_session_that_is_already_right(shipped, umcu_pairs):
    pool, test = umcu_pairs[::2][:8], umcu_pairs[1::2][:6]
    centre, organ = LoopConfig(steps=2, batch=4, samples=2), LoopConfig(steps=2, batch=4, samples=2, freeze_norm=False)
    run = simulate(
        shipped, pool, test, [0, 4, 8], "uncertainty", 0, 0.5, presets={"centre": centre, "organ": organ},
        audit_share=0.25, target=0.4, stop=True,
    )  # fmt: skip
    assert run.shift == "centre" and run.stop_budget == 4 and "clears your target 0.40" in run.stop_reason
    assert run.budgets == [0, 4] and run.round_in_use == [0, 0]  # stopped before training on what it did not need
    assert run.dice_global[1] == run.dice_global[0]


def test_only_a_round_that_clearly_beats_the_starting_model_is_handed_over(shipped, umcu_pairs):
    """At the end the burden of proof is on the change: a tuned round must beat round 0 beyond noise."""
    pool = [p for p in umcu_pairs if p.mask.any()][:4]
    blind = copy.deepcopy(shipped)
    with torch.no_grad():
        blind.head_out.bias.fill_(-20.0)  # an injected fault: the round marks no tumour anywhere
    worse = _Ledger(pool, [], 0.5)
    worse.add_round(shipped, None)
    worse.add_round(blind, 0)
    same = worse.add_round(copy.deepcopy(shipped), 0)
    better = _Ledger(pool, [], 0.5)
    better.add_round(blind, None)  # a session that starts from the broken model
    better.add_round(shipped, 0)
    oracle = Oracle(pool)
    patches = [oracle.annotate(Box(p.name, 0, 0, *p.image.shape[:2])) for p in pool]
    fresh = worse.score(patches, [True] * len(pool))
    assert _hand_over(worse, 1, fresh, True, None) == 0  # the blind round is replaced by the starting model
    assert _hand_over(worse, 1, fresh, False, None) == 1  # without the rule it is handed over as it is
    assert _hand_over(worse, same, fresh, True, None) == 0  # a tie proves nothing: round 0 stays
    assert _hand_over(better, 1, better.score(patches, [True] * len(pool)), True, None) == 1  # a clear gain


def test_a_rounds_proxies_and_the_tissue_truth_leave_out_the_tissue_it_was_tuned_on(shipped, umcu_pairs):
    """Audits come from tissue not annotated yet, so PPI's proxies of a round must not cover its training patches."""
    pool = [p for p in umcu_pairs if p.mask.any()][:2]
    tissue = [Box(p.name, y, x, 64, 64) for p in pool for y in (0, 64) for x in (0, 64)]
    ledger = _Ledger(pool, tissue, 0.5)
    ledger.add_round(shipped, None)
    ledger.add_round(copy.deepcopy(shipped), 0, trained_on=[Box(pool[0].name, 0, 0, 100, 100)])
    assert len(ledger.proxies[0].predicted) == 8  # round 0 was tuned on nothing
    assert len(ledger.proxies[1].predicted) == 4  # the four boxes of the annotated tile are left out
    np.testing.assert_allclose(ledger.proxies[1].expected_tp, ledger.proxies[0].expected_tp[4:], rtol=1e-6)
    ledger.retile(tissue[2:])  # a new geometry keeps each round's exclusion
    assert [len(p.predicted) for p in ledger.proxies] == [6, 4]
    oracle = Oracle(pool)
    assert ledger.tissue_truth(0, tissue, oracle) is None  # nothing left unannotated
    left = [score_patch(b.crop(ledger.maps[0][b.image]), oracle.annotate(b).mask) for b in tissue[4:]]
    expected = pooled_estimate(left)
    assert expected is not None and ledger.tissue_truth(0, tissue[:4], oracle) == expected.dice


def test_do_no_harm_steps_back_to_the_parent_and_catches_a_drift_against_the_start():
    """Each round within the margin of the one before can still add up to a loss against round 0."""

    def scores(*tps: int) -> list[dict[int, PatchScore]]:  # rounds 0, 1, 2 on six patches of 1000 tumour px
        return [{r: PatchScore(tp + k, 1000, 1000, 0.0) for r, tp in enumerate(tps)} for k in range(6)]

    kept, steps = round_to_keep(scores(1000, 900, 895), 2, 1)  # 0.005 below its parent, 0.105 below round 0
    assert kept == 0 and [(a, b) for a, b, _ in steps] == [(2, 0)]
    kept, steps = round_to_keep(scores(1000, 900, 800), 2, 1)  # below its parent, and the parent below round 0
    assert kept == 0 and [(a, b) for a, b, _ in steps] == [(2, 1), (1, 0)]
    assert rollback_said(steps).startswith("round 2 scored -0.100 dice against round 1; round 1 scored -0.100")
    assert round_to_keep(scores(900, 950, 990), 2, 1) == (2, [])  # better than both: kept
    assert round_to_keep(scores(1000, 995), 1, 0) == (1, [])  # its parent is round 0: one check, within the margin


def test_a_clear_harm_rule_rolls_back_only_a_loss_its_interval_is_sure_of():
    """One bad patch among six: below the margin on average, but within noise; a loss on every patch is clear."""
    noisy = [{0: PatchScore(1000, 1000, 1000, 0.0), 1: PatchScore(600 if k == 5 else 1000, 1000, 1000, 0.0)}
             for k in range(6)]  # fmt: skip
    steady = [{0: PatchScore(1000, 1000, 1000, 0.0), 1: PatchScore(930 + k, 1000, 1000, 0.0)} for k in range(6)]
    for fresh, margin_says, clear_says in ((noisy, 0, 1), (steady, 0, 0)):
        comparison = compare_rounds([s[1] for s in fresh], [s[0] for s in fresh])
        assert comparison.delta < -0.01
        assert round_to_keep(fresh, 1, 0, rule="margin")[0] == margin_says
        assert round_to_keep(fresh, 1, 0, rule="clear")[0] == clear_says
    assert not worse_than(compare_rounds([s[1] for s in noisy[:2]], [s[0] for s in noisy[:2]]), rule="clear")
    # clear_or_large: the noisy loss is large (-0.067), so it goes; a small unclear one (-0.033) stays
    small = [{0: PatchScore(1000, 1000, 1000, 0.0), 1: PatchScore(800 if k == 5 else 1000, 1000, 1000, 0.0)}
             for k in range(6)]  # fmt: skip
    for fresh, says in ((noisy, 0), (steady, 0), (small, 1)):
        assert round_to_keep(fresh, 1, 0, rule="clear_or_large")[0] == says
    assert round_to_keep(small, 1, 0, rule="margin")[0] == 0
    with pytest.raises(ValueError, match="harm rule"):
        worse_than(compare_rounds([s[1] for s in steady], [s[0] for s in steady]), rule="sure")


def test_scores_already_made_are_kept_and_only_the_missing_ones_are_made(shipped, umcu_pairs):
    oracle = Oracle(umcu_pairs[:2])
    crops = [oracle.annotate(Box(p.name, 0, 0, 128, 128)) for p in umcu_pairs[:2]]
    images, masks = [a.image for a in crops], [a.mask for a in crops]
    models = {0: shipped, 1: copy.deepcopy(shipped)}
    made = score_rounds(models, images, masks, 0.5)
    sentinel = PatchScore(7, 7, 7, 0.0)  # no prediction gives these counts on a 128 px crop by chance
    known = [{0: sentinel}, {1: made[1][1]}]
    assert missing_scores(models, known) == 2
    again = score_rounds(models, images, masks, 0.5, known=known)
    assert again[0][0] is sentinel and again[1][1] is made[1][1]
    assert again[1][0] == made[1][0] and again[0][1] == made[0][1]


def test_the_audits_tell_a_confidently_wrong_model_from_an_honest_one(shipped, umcu_pairs):
    """The sample's left half holds stroma the shipped model calls tumour with confidence; the right half does not."""
    from napari_uga.splits import position_split

    def quarter_scores(pairs):  # every quarter-patch tissue box, as audits are drawn
        maps = {p.name: predict_probability(shipped, p.image, factor=0.5) for p in pairs}
        oracle = Oracle(pairs)
        return [score_patch(b.crop(maps[b.image]), oracle.annotate(b).mask) for b in _audit_boxes(pairs, LoopConfig())]

    left, right = (quarter_scores(half) for half in position_split(umcu_pairs))
    wrong, honest = overconfidence(left), overconfidence(right)
    assert wrong.low > 2 > honest.high and wrong.n == len(left) > 100
    assert "confidently wrong" in overconfident_said(left)
    assert overconfident_said(right) is None
    perfect = score_patch(np.array([[0.9, 0.1], [0.1, 0.1]]), np.array([[1, 0], [0, 0]]))
    assert overconfidence([perfect] * 4).ratio == 0  # nothing changed where it expected some error
    assert overconfidence([PatchScore(0, 0, 0, 0.0)]) is None  # it expected no error and none was found
    sure_and_wrong = [PatchScore(0, 0, 100, 0.5)] * 3  # probabilities of exactly 0 on marked tumour
    assert "changed pixels where it was sure of itself" in overconfident_said(sure_and_wrong, who="you")
