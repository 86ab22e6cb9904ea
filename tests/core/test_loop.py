"""Fine-tuning with replay, cancellation and the oracle loop, with real training steps."""

import copy

import numpy as np
import pytest
import torch

from napari_uga.io import InputError
from napari_uga.loop import (
    LoopConfig,
    Oracle,
    config_for,
    config_from_record,
    finetune,
    map_sampling,
    replay_pairs,
    self_labels,
    simulate,
)
from napari_uga.metrics import dice_global
from napari_uga.models import average_weights
from napari_uga.selection import Box
from napari_uga.training import CancelToken, evaluate
from napari_uga.uncertainty import predict_probability


def test_finetune_trains_a_copy_and_reports_progress(tiny_model, umcu_pairs):
    oracle = Oracle(umcu_pairs)
    annotations = [oracle.annotate(Box(p.name, 0, 0, 256, 256)) for p in umcu_pairs[:4]]
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    events = []
    run = finetune(tiny_model, annotations, replay_pairs(), 0.5, LoopConfig(steps=4, batch_size=4))
    while True:
        try:
            events.append(next(run))
        except StopIteration as stop:
            result = stop.value
            break
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert all(set(e) == {"stage", "step", "total", "loss", "val_loss", "message"} for e in events)
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())  # original untouched
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())


def test_cancel_returns_none_without_weights(tiny_model, umcu_pairs):
    oracle = Oracle(umcu_pairs)
    token = CancelToken()
    run = finetune(
        tiny_model,
        [oracle.annotate(Box(umcu_pairs[0].name, 0, 0, 128, 128))],
        [],
        0.5,
        LoopConfig(steps=50),
        cancel=token,
    )
    next(run)
    token.set()
    events = list(run)
    assert events[-1]["message"] == "cancelled"


def test_oracle_loop_on_a_tiny_budget(tiny_model, umcu_pairs):
    pool, test = umcu_pairs[::4][:5], umcu_pairs[1::8][:2]
    config = LoopConfig(steps=3, batch=2, batch_size=4, samples=2)
    traj = simulate(tiny_model, pool, test, [0, 2, 3], "uncertainty", 0, 0.5, config)
    assert traj.budgets == [0, 2, 3]
    assert [len(p) for p in traj.picks] == [2, 1]
    picked = [(p["image"], p["y"], p["x"]) for batch in traj.picks for p in batch]
    assert len(set(picked)) == 3  # never the same patch twice
    assert traj.dice_global[0] == evaluate(tiny_model, test, 0.5)["dice_global"]
    assert all(0 <= d <= 1 for d in traj.dice_global)
    assert traj.tuned_from == [None, 0, 1] and traj.rounds[0] is tiny_model  # each round tuned from the one before
    assert traj.dice_global[-1] == evaluate(traj.rounds[traj.round_in_use[-1]], test, 0.5)["dice_global"]
    torch.rand(3)  # whatever ran before, a seed repeats its run
    again = simulate(tiny_model, pool, test, [0, 2], "uncertainty", 0, 0.5, config)
    assert again.picks[0] == traj.picks[0] and again.dice_global == traj.dice_global[:2]


def test_sub_patches_spend_the_budget_in_quarters(tiny_model, umcu_pairs):
    pool, test = umcu_pairs[::4][:4], umcu_pairs[1::8][:1]
    config = config_for("organ", steps=2, batch=1, batch_size=4, samples=2)  # subdivide 2: 4 per patch
    traj = simulate(tiny_model, pool, test, [0, 2], "uncertainty", 0, 0.5, config)
    assert traj.budgets == [0, 2] and [len(b) for b in traj.picks] == [4, 4]  # two rounds of one patch each
    side = min(config.patch, pool[0].image.shape[0]) // 2
    assert {(p["h"], p["w"]) for b in traj.picks for p in b} == {(side, side)}
    boxes = [Box(p["image"], p["y"], p["x"], p["h"], p["w"]) for b in traj.picks for p in b]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_audits_are_quarter_patches_so_switching_to_quarters_keeps_every_audit(tiny_model, umcu_pairs):
    pool, test = umcu_pairs[::2][:8], umcu_pairs[1::8][:1]
    whole = LoopConfig(steps=2, batch=2, batch_size=4, samples=2)
    quarters = config_for("organ", steps=2, batch=2, batch_size=4, samples=2)
    traj = simulate(
        tiny_model, pool, test, [0, 2, 4], "uncertainty", 0, 0.5, whole, audit_share=0.5,
        presets={"centre": quarters, "organ": quarters},  # whatever auto chooses, proposals become quarters
    )  # fmt: skip
    assert traj.budgets == [0, 2, 4]
    # one whole patch and the other's area as 4 quarter audits; then two patches' worth of quarters, half audits
    assert [len(b) for b in traj.picks] == [5, 8] and [sum(p["audit"] for p in b) for b in traj.picks] == [4, 4]
    side = min(whole.patch, pool[0].image.shape[0]) // 2
    assert {(p["h"], p["w"]) for b in traj.picks for p in b if p["audit"]} == {(side, side)}
    # the first batch's audits are a sample of the same quarter boxes as the second's, and no round trains on
    # an audit: each budget's estimate keeps every audit drawn so far
    assert traj.estimate_audits == [0, 4, 8] and traj.estimated_dice[1] is not None


def test_fine_tuning_never_sees_an_audit(tiny_model, umcu_pairs, monkeypatch):
    """Audits measure every round: no fine-tune may train on one, nor on self-labels over one."""
    import napari_uga.loop as loop

    seen, real = [], loop.finetune

    def spy(model, annotations, *args, **kwargs):  # the real fine-tune, watched
        seen.append(([a.box for a in annotations], list(kwargs["held_out"])))
        return real(model, annotations, *args, **kwargs)

    monkeypatch.setattr(loop, "finetune", spy)
    pool, test = umcu_pairs[::2][:8], umcu_pairs[1::8][:1]
    config = LoopConfig(steps=2, batch=2, batch_size=4, samples=2)
    traj = simulate(tiny_model, pool, test, [0, 2, 4], "uncertainty", 0, 0.5, config, audit_share=0.5)
    audits = {Box(p["image"], p["y"], p["x"], p["h"], p["w"]) for b in traj.picks for p in b if p["audit"]}
    assert len(audits) == 8 and len(seen) == 2
    assert [len(trained) for trained, _ in seen] == [1, 2]  # the proposed patch of each batch, and only those
    assert all(not audits & set(trained) for trained, _ in seen)
    assert [len(held) for _, held in seen] == [4, 8] and all(set(held) <= audits for _, held in seen)


def test_organ_shift_adapts_batch_norm_statistics_and_centre_shift_keeps_them(tiny_model, umcu_pairs):
    oracle = Oracle(umcu_pairs)
    annotations = [oracle.annotate(Box(p.name, 0, 0, 256, 256)) for p in umcu_pairs[:2]]
    stats = {k for k in tiny_model.state_dict() if k.endswith(("running_mean", "running_var"))}
    for shift, changes in (("centre", False), ("organ", True)):
        config = config_for(shift, steps=2, batch_size=4)
        run = finetune(tiny_model, annotations, replay_pairs(), 0.5, config)
        tuned = _last(run).model.state_dict()
        moved = any(not torch.equal(tuned[k], tiny_model.state_dict()[k]) for k in stats)
        assert moved == changes, shift
    assert config_for("organ", steps=7).steps == 7 and config_for("organ").replay_share == 0
    assert config_for("centre") == LoopConfig()
    with pytest.raises(ValueError, match="unknown shift"):
        config_for("planet")


def _last(run):
    while True:
        try:
            next(run)
        except StopIteration as stop:
            return stop.value


def test_anchor_keeps_the_fine_tuned_weights_near_the_start(tiny_model, umcu_pairs):
    oracle = Oracle(umcu_pairs)
    annotations = [oracle.annotate(Box(p.name, 0, 0, 256, 256)) for p in umcu_pairs[:2]]

    def drift(anchor: float) -> float:
        tuned = _last(finetune(tiny_model, annotations, [], 0.5, LoopConfig(steps=6, batch_size=4, anchor=anchor)))
        return sum(
            float(((p - q) ** 2).sum()) for p, q in zip(tuned.model.parameters(), tiny_model.parameters(), strict=True)
        )

    assert drift(100.0) < 0.5 * drift(0.0)

    moved = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05)
    config = LoopConfig(steps=6, batch_size=4, anchor=100.0, lr=1e-2)
    tuned = _last(finetune(moved, annotations, [], 0.5, config, origin=tiny_model)).model

    def distance(a, b):
        return sum(float(((p - q) ** 2).sum()) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    assert distance(tuned, tiny_model) < distance(moved, tiny_model)  # pulled back to the session's start


def test_self_labels_are_the_starting_models_masks_and_never_contradict_a_correction(tiny_model, umcu_pairs):
    whole = [(Box(p.name, 0, 0, *p.image.shape[:2]), p.image) for p in umcu_pairs[:3]]
    labelled = self_labels(tiny_model, whole, 0.5)
    expected = predict_probability(tiny_model, umcu_pairs[1].image, factor=0.5) >= 0.5
    np.testing.assert_array_equal(labelled[1].mask, expected)

    correction = Oracle(umcu_pairs).annotate(Box(umcu_pairs[0].name, 64, 64, 128, 128))
    config = LoopConfig(steps=2, batch_size=4, replay_share=0.0, self_share=0.5)

    def weights(self_labelled):
        return _last(
            finetune(tiny_model, [correction], [], 0.5, config, seed=3, self_labelled=self_labelled)
        ).model.state_dict()

    alone = weights([])
    overlapping = weights(labelled[:1])  # the corrected image itself: left out
    elsewhere = weights(labelled[1:])
    assert all(torch.equal(alone[k], overlapping[k]) for k in alone)
    assert any(not torch.equal(alone[k], elsewhere[k]) for k in alone)
    with pytest.raises(ValueError, match="sum < 1"):
        LoopConfig(replay_share=0.5, self_share=0.5)


def test_saved_loop_settings_come_back_whole_and_bad_ones_fail_in_one_line():
    custom = config_for("organ", steps=50, lr=1e-3)
    assert config_from_record({**vars(custom), "shift": "organ", "added_later": 1}) == custom
    assert config_from_record({"shift": "organ", "lr": 1}).lr == 1.0  # an int where a float is expected
    assert config_from_record({}) == LoopConfig()
    before_sub_patches = {k: v for k, v in vars(config_for("organ", diversity="none")).items() if k != "subdivide"}
    assert config_from_record({**before_sub_patches, "shift": "organ"}).pieces == 1  # reopens with whole patches
    assert config_from_record({"shift": "organ"}).pieces == 4
    bad_records = (
        {"shift": "planet"}, {"shift": ["centre"]}, {"steps": "many"}, {"freeze_norm": 1},
        {"replay_share": 0.6, "self_share": 0.6}, {"steps": -5}, {"lr": float("nan")}, {"anchor": -3.0},
        {"measure": "bogus"}, {"tta": "bogus"}, ["centre"], {"subdivide": 9},
    )  # fmt: skip
    for bad in bad_records:
        with pytest.raises(InputError, match="saved loop settings"):
            config_from_record(bad)


def test_evaluate_predicts_with_an_ensemble_or_flips(tiny_model, umcu_pairs):
    pairs = umcu_pairs[:2]
    plain = evaluate(tiny_model, pairs, 0.5)
    assert evaluate([tiny_model, tiny_model], pairs, 0.5)["dice_global"] == pytest.approx(plain["dice_global"])
    flips = [(), (0,), (1,), (0, 1)]  # the mean over the image flipped each way, flipped back

    def by_hand(image):
        runs = [np.flip(predict_probability(tiny_model, np.flip(image, a).copy(), factor=0.5), a) for a in flips]
        return np.mean(runs, axis=0) >= 0.5

    expected = dice_global([by_hand(p.image) for p in pairs], [p.mask for p in pairs])
    assert evaluate(tiny_model, pairs, 0.5, tta="flips")["dice_global"] == pytest.approx(expected, abs=0.01)


def test_average_weights_is_the_mean_of_every_weight(tiny_model):
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p += 1.0
    soup = average_weights([tiny_model, other])
    for name, value in soup.state_dict().items():
        a, b = tiny_model.state_dict()[name], other.state_dict()[name]
        expected = (a + b) / 2 if value.is_floating_point() else a
        assert torch.allclose(value, expected), name
    assert soup is not tiny_model and not soup.training


def test_a_round_predicts_with_its_soup_under_flips_and_trains_on_from_itself(tiny_model, umcu_pairs):
    pool, test = umcu_pairs[::4][:5], umcu_pairs[1::8][:2]
    config = LoopConfig(steps=3, batch=2, batch_size=4, samples=2, replay_share=0, self_share=0, predictor="soup+flips")
    traj = simulate(tiny_model, pool, test, [0, 2, 4], "uncertainty", 0, 0.5, config)
    assert traj.tuned_from == [None, 0, 1] and traj.round_in_use == [0, 1, 2]
    round_one = evaluate(traj.rounds[1], test, 0.5, tta="flips")["dice_global"]  # tuned from the starting model: alone
    soup = average_weights([traj.rounds[2], traj.rounds[1]])
    assert traj.dice_global[1:] == [round_one, evaluate(soup, test, 0.5, tta="flips")["dice_global"]]
    assert traj.prediction_tta == "flips"
    for handed, expected in zip(traj.model.parameters(), soup.parameters(), strict=True):
        assert torch.allclose(handed, expected)
    oracle = Oracle(pool)
    annotations = [
        oracle.annotate(Box(**{k: p[k] for k in ("image", "y", "x", "h", "w")})) for b in traj.picks[:2] for p in b
    ]
    again = _last(finetune(traj.rounds[1], annotations, [], 0.5, config, 4, origin=tiny_model)).model
    for retrained, kept in zip(again.parameters(), traj.rounds[2].parameters(), strict=True):
        assert torch.equal(retrained, kept)  # round 2 was trained from round 1 itself, not from its soup


def test_maps_spread_their_samples_over_the_flips_of_a_flipping_predictor():
    assert map_sampling(8, "none", "soup+flips") == (2, "flips")
    assert map_sampling(3, "none", "flips") == (1, "flips")
    assert map_sampling(8, "none", "soup") == (8, "none")
    assert map_sampling(8, "d4", "soup+flips") == (8, "d4")  # the maps' own TTA is kept
