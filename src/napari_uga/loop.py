"""One uncertainty-guided annotation round, fine-tuning with replay, and the simulated loop.

``finetune`` is the generator that the CLI, the napari worker and the benchmarks all
drive; ``simulate`` measures the loop with an :class:`Oracle` standing in for the annotator.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .audit import (
    GATE_PATCHES,
    HARM_RULES,
    PatchScore,
    Proxies,
    choose_shift,
    compare_rounds,
    overconfident_said,
    pooled_estimate,
    ppi_estimate,
    rollback_said,
    round_to_keep,
    score_patch,
    stop_signal,
    tissue_is_new,
)
from .io import InputError, Pair, load_pairs
from .models import UNet, average_weights, working_factor
from .proposals import propose, random_candidates
from .selection import Box, Proposal, appearance_features, holds_tumour, select, spread
from .training import (
    CancelToken,
    MixedSampler,
    PatchSampler,
    ProgressEvent,
    evaluate,
    progress_event,
    to_working_scale,
    train_steps,
)
from .uncertainty import TTA_MODES, predict_probability

REPLAY_DIR = Path(__file__).parent / "replay"
# audits are quarter patches (or the proposals' sub-patches where smaller): four audits for the area of one
# whole patch, so the estimate of a round rests on four fresh patches per batch, not one (issue 14).
# Audits are held out of fine-tuning: every round is scored on every audit, the do-no-harm check and
# the handover compare rounds on all of them, and QC calibrated on them checks a model that never saw them.
AUDIT_SUBDIVIDE = 2


@dataclass
class Annotation:
    """A corrected patch: where it is, its image crop and its 0/1 mask crop."""

    box: Box
    image: np.ndarray
    mask: np.ndarray


# allowed values of the loop's choice settings (the CLI offers the same)
CHOICES: dict[str, tuple[str, ...]] = {
    "tta": tuple(TTA_MODES),
    "measure": ("entropy", "mutual_information", "variance"),
    "aggregate": ("mean", "topk"),
    "diversity": ("none", "clusters", "balanced", "clusters+balanced"),
    "predictor": ("plain", "flips", "soup", "soup+flips"),
}
COUNTS = ("patch", "subdivide", "samples", "steps", "batch_size", "crop", "batch")  # whole numbers >= 1


@dataclass
class LoopConfig:
    """Settings of the annotation loop; the defaults are the ``centre`` preset (measured in ``benchmarks/loop.py``)."""

    patch: int = 256
    subdivide: int = 1  # each patch of the budget proposed as subdivide² sub-patches of 1/subdivide its side
    samples: int = 8
    tta: str = "none"
    measure: str = "entropy"
    aggregate: str = "mean"
    diversity: str = "none"
    steps: int = 40
    lr: float = 5e-4
    batch_size: int = 8
    crop: int = 96
    replay_share: float = 0.35
    batch: int = 5
    freeze_norm: bool = True
    anchor: float = 1.0  # L2-SP weight towards the session's starting model
    self_share: float = 0.35  # share of each batch from unlabelled target patches labelled by the starting model
    predictor: str = "plain"  # how a round predicts (:func:`predicting_network`, :func:`prediction_tta`)

    def __post_init__(self) -> None:
        if not (0 <= self.replay_share and 0 <= self.self_share and self.replay_share + self.self_share < 1):
            raise ValueError("replay_share and self_share must be >= 0 and leave room for the annotations (sum < 1)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in COUNTS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.subdivide > 4:
            raise ValueError(f"subdivide must be at most 4, not {self.subdivide}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, not {self.lr}")
        if not (math.isfinite(self.anchor) and self.anchor >= 0):
            raise ValueError(f"anchor must be a finite number >= 0, not {self.anchor}")

    @property
    def pieces(self) -> int:
        """Sub-patches per patch of the budget (1: whole patches)."""
        return self.subdivide**2


# What differs from the training data decides how hard fine-tuning may pull (benchmarks/loop.py):
SHIFTS: dict[str, dict] = {
    # new centre or scanner, same tissue: the model is mostly right; frozen batch norm, replay of the
    # training tiles, the starting model's own labels on unlabelled patches of the new images, and an
    # L2 pull towards the starting model keep a few patches from swinging it
    "centre": {},
    # new organ or tissue: batch-norm statistics must follow the new tissue, lymph-node replay and the
    # starting model's labels contradict its truth, and more steps are needed to learn it (400 per round
    # since stop 25); each patch of the budget is proposed as 4 quarter-area sub-patches spread over
    # appearance clusters, so one batch covers more kinds of tissue (docs/benchmarks.md, stops 23 and 25)
    "organ": {
        "steps": 400,
        "replay_share": 0.0,
        "self_share": 0.0,
        "freeze_norm": False,
        "anchor": 0.0,
        "subdivide": 2,
        "diversity": "clusters",
        # a round predicts with the mean weights of it and the round it was tuned from, under 4 flips
        # (chosen on REPORT-4 in stop 28, +0.034 mean Dice over plain; docs/benchmarks.md)
        "predictor": "soup+flips",
    },
}


# The proposal rule a preset starts with (``--strategy`` and the dock's Proposals box override it). On a
# new organ the first batch is drawn at random from the tissue, then ranked by uncertainty
# (docs/benchmarks.md, stop 26); ``auto`` proposes its first batch as ``centre`` does, and once it
# has chosen ``organ`` a batch is labelled, so ``random_first`` would rank by uncertainty there too.
PRESET_STRATEGY = {"centre": "uncertainty", "organ": "random_first"}


def default_strategy(shift: str) -> str:
    """The proposal rule of a preset (``auto``: ``centre``'s)."""
    return PRESET_STRATEGY.get(shift, PRESET_STRATEGY["centre"])


def config_for(shift: str = "centre", **overrides) -> LoopConfig:
    """The :class:`LoopConfig` of a kind of domain shift (:data:`SHIFTS`), with explicit overrides."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}")
    return LoopConfig(**{**SHIFTS[shift], **overrides})


def config_from_record(record: dict) -> LoopConfig:
    """The loop settings saved in a session record: its preset, then every known field it holds.

    Unknown keys are ignored (newer or older records); a value of the wrong type or out of range
    raises :class:`InputError`.
    """
    if not isinstance(record, dict):
        raise InputError("saved loop settings: not a mapping of names to values")
    shift = record.get("shift", "centre")
    if "patch" in record and "subdivide" not in record:  # saved before sub-patches: whole patches
        record = {**record, "subdivide": 1}
    if shift == "auto":  # decided from the first batch: the preset chosen then, centre before
        shift = record.get("chosen_shift") or "centre"
    if not isinstance(shift, str) or shift not in SHIFTS:
        raise InputError(f"saved loop settings: unknown shift {shift!r}")
    defaults = LoopConfig()
    overrides = {}
    for name, value in record.items():
        if not hasattr(defaults, name):
            continue
        expected = type(getattr(defaults, name))
        valid = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, valid = float(value), True
        if not valid:
            raise InputError(f"saved loop settings: {name} = {value!r} is not a {expected.__name__}")
        overrides[name] = value
    try:
        return config_for(shift, **overrides)
    except ValueError as exc:
        raise InputError(f"saved loop settings: {exc}") from None


def predicting_network(model: UNet, parent: UNet | None, predictor: str) -> UNet:
    """The network a round predicts with: ``model`` itself, or with ``soup`` the mean of its weights
    and its ``parent``'s, the tuned round it was tuned from (``None`` when it was tuned from the
    starting model, whose weights on a new organ would pull it half-way back). Training always
    continues from ``model`` itself."""
    return average_weights([model, parent]) if "soup" in predictor and parent is not None else model


def prediction_tta(predictor: str) -> str:
    """The test-time augmentation of a round's prediction: 4 flips with ``flips``, else none."""
    return "flips" if "flips" in predictor else "none"


def map_sampling(samples: int, tta: str, predictor: str) -> tuple[int, str]:
    """MC-dropout samples and TTA of a round's maps: with a flipping predictor and no TTA of the
    maps' own, the samples are spread over the 4 flips (the same number of passes in all)."""
    if tta != "none" or prediction_tta(predictor) == "none":
        return samples, tta
    flips = prediction_tta(predictor)
    return max(1, math.ceil(samples / TTA_MODES[flips])), flips


@dataclass
class FinetuneResult:
    """The fine-tuned copy of the model and its per-step losses."""

    model: UNet
    losses: list[float]


class Oracle:
    """Simulated annotator: answers a proposed patch with its ground-truth mask crop."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.pairs = {p.name: p for p in pairs}

    def annotate(self, box: Box) -> Annotation:
        """The ground truth of one patch."""
        pair = self.pairs[box.image]
        return Annotation(Box(box.image, box.y, box.x, box.h, box.w), box.crop(pair.image), box.crop(pair.mask))


def tissue_sample(pool: Sequence[Pair], boxes: Sequence[Box], n: int = GATE_PATCHES) -> list[np.ndarray]:
    """Up to ``n`` of the pool's tissue patches ``boxes``, spread over it: what the ``auto`` gate reads."""
    images = {p.name: p.image for p in pool}
    return [box.crop(images[box.image]) for box in spread(boxes, n)]


def replay_pairs(folder: Path | None = None) -> list[Pair]:
    """The small sample of the original training data shipped for replay."""
    folder = REPLAY_DIR if folder is None else Path(folder)
    return load_pairs(folder / "images", folder / "masks")


def _sampler(patches: Sequence[Pair | Annotation], factor: float, crop: int) -> PatchSampler:
    """Random crops of image/mask patches, brought to working scale."""
    scaled = [to_working_scale(p.image, p.mask, factor) for p in patches]
    return PatchSampler([s[0] for s in scaled], [s[1] for s in scaled], crop=crop)


def self_labels(origin: UNet, crops: Sequence[tuple[Box, np.ndarray]], factor: float) -> list[Annotation]:
    """Unlabelled patches of the new images, labelled by the session's starting model (its deterministic mask).

    Replayed while fine-tuning, they keep what the model already gets right on the new images
    where the corrections say nothing (self-distillation, cf. learning without forgetting, Li &
    Hoiem 2016); for a new centre, not for a new organ, where the starting model is mostly wrong.
    """
    from .uncertainty import predict_probability

    return [
        Annotation(box, image, (predict_probability(origin, image, factor=factor) >= 0.5).astype(np.uint8))
        for box, image in crops
    ]


def finetune(
    model: UNet,
    annotations: Sequence[Annotation],
    replay: Sequence[Pair],
    factor: float,
    config: LoopConfig | None = None,
    seed: int = 0,
    cancel: CancelToken | None = None,
    replay_factor: float | None = None,
    origin: UNet | None = None,
    self_labelled: Sequence[Annotation] = (),
    held_out: Sequence[Box] = (),
) -> Iterator[ProgressEvent]:
    """Fine-tune a copy of ``model`` on annotated patches plus replay shares; yields progress.

    ``origin`` is the model the session started from: the anchor (``config.anchor``) pulls
    towards it, so drift cannot add up over rounds (default: ``model`` itself).
    ``self_labelled``: unlabelled patches of the new images labelled by ``origin``
    (:func:`self_labels`), drawn for ``config.self_share`` of each batch; those overlapping an
    annotation are left out, so a correction is never contradicted, and so are those overlapping
    ``held_out`` (audit patches kept out of training to measure it). Replay and self-labels keep
    their shares when present; the corrections get the rest.

    Returns a :class:`FinetuneResult` (the generator's value), or ``None`` when cancelled,
    so a cancelled run never leaves half-trained weights behind.
    """
    config = LoopConfig() if config is None else config
    if not annotations:
        raise ValueError("finetune needs at least one annotation")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    taken = [*(a.box for a in annotations), *held_out]
    kept_self_labels = [u for u in self_labelled if not any(u.box.overlaps(box) for box in taken)]
    rf = working_factor(model) if replay_factor is None else replay_factor
    memory = [(replay, rf, config.replay_share), (kept_self_labels, factor, config.self_share)]
    memory = [(patches, scale, share) for patches, scale, share in memory if patches and share > 0]
    sampler = _sampler(annotations, factor, config.crop)
    if memory:
        # each memory source keeps its share and the corrections get the rest: when every pool patch is
        # annotated (no self-label left), giving the replay both shares did worse (docs/benchmarks.md)
        sampler = MixedSampler(
            [sampler, *(_sampler(patches, scale, config.crop) for patches, scale, _ in memory)],
            [1 - sum(share for *_, share in memory), *(share for *_, share in memory)],
        )
    steps = train_steps(
        tuned,
        sampler,
        config.steps,
        rng,
        config.lr,
        config.batch_size,
        cancel,
        stage="finetune",
        freeze_norm=config.freeze_norm,
        anchor=config.anchor,
        anchor_to=None if origin is None else list(origin.parameters()),
    )
    losses = yield from steps
    if cancel is not None and cancel.is_set():
        return None
    return FinetuneResult(tuned, losses)


@dataclass
class Trajectory:
    """Dice on the test set after each budget of one simulated run, and what the session measured itself.

    Per budget: ``dice_global`` of the model in use on the test images; ``estimated_dice`` and
    ``hard_dice``: that model's pooled Dice on the audit patches, and on every patch, scored
    before any round trained on them, as the session knew them at that budget (``None`` where
    none had scored it yet: at budget 0); ``round_in_use``.
    """

    budgets: list[int] = field(default_factory=list)
    dice_global: list[float] = field(default_factory=list)
    picks: list[list[dict]] = field(default_factory=list)
    model: UNet | None = None  # the network the handed-over round predicts with
    prediction_tta: str = "none"  # and its test-time augmentation
    estimated_dice: list[float | None] = field(default_factory=list)
    estimate_interval: list[tuple[float, float] | None] = field(default_factory=list)
    estimate_audits: list[int] = field(default_factory=list)  # how many audit patches each estimate rests on
    hard_dice: list[float | None] = field(default_factory=list)
    overconfident: list[str | None] = field(default_factory=list)  # :func:`~napari_uga.audit.overconfident_said`
    round_in_use: list[int] = field(default_factory=list)
    rollbacks: int = 0
    rollbacks_by_budget: list[int] = field(default_factory=list)  # rounds rolled back up to each budget
    shift: str | None = None  # the preset ``auto`` chose from the first batch (``None`` when one was given)
    stop_budget: int | float | None = None  # the budget (in patches) at which the stop signal first spoke
    stop_reason: str | None = None
    pool_dice: list[float | None] = field(default_factory=list)  # on the tissue patches not annotated yet (benchmarks)
    handed_over: int | None = None  # the round the session ends with (after the closing batch's check)
    handed_over_dice: float | None = None
    rounds: list[UNet] = field(default_factory=list)  # every round's model as trained, round 0 the starting one
    tuned_from: list[int | None] = field(default_factory=list)  # the round each was fine-tuned from


@dataclass
class _Ledger:
    """The rounds of a simulated session, their maps of the pool, and every fresh score.

    ``scores`` holds, per correction, whether it was an audit and its :class:`PatchScore`
    against each round that existed when it arrived (none had trained on it). Audits are never
    trained on, so every later round is scored on them too, as it is added.
    """

    pool: Sequence[Pair]
    tissue: list[Box]
    factor: float
    rounds: list[UNet] = field(default_factory=list)
    tuned_from: list[int | None] = field(default_factory=list)
    predictors: list[tuple[UNet, str]] = field(default_factory=list)  # each round's network and TTA to predict with
    maps: list[dict[str, np.ndarray]] = field(default_factory=list)
    proxies: list[Proxies] = field(default_factory=list)
    trained_on: list[list[Box]] = field(default_factory=list)  # per round, the annotated boxes it was tuned on
    scores: list[tuple[bool, dict[int, PatchScore]]] = field(default_factory=list)
    held_out: list[tuple[Annotation, dict[int, PatchScore]]] = field(default_factory=list)  # audits, every round
    changes: list[float] = field(default_factory=list)

    def add_round(
        self, model: UNet, parent: int | None, predictor: str = "plain", trained_on: Sequence[Box] = ()
    ) -> int:
        """A new round tuned on the boxes ``trained_on``: its prediction (``predictor``) of every pool image
        and the proxies of the tissue patches."""
        self.rounds.append(model)
        self.tuned_from.append(parent)
        self.trained_on.append(list(trained_on))
        network = predicting_network(model, self.rounds[parent] if parent else None, predictor)
        tta = prediction_tta(predictor)
        self.predictors.append((network, tta))
        maps = {
            p.name: predict_probability(network, p.image, factor=self.factor, tta=tta).astype(np.float16)
            for p in self.pool
        }
        self.maps.append(maps)
        index = len(self.maps) - 1
        self.proxies.append(self._proxies(index))
        for annotation, by_round in self.held_out:  # no round trains on an audit: each is fresh for this one too
            by_round[index] = self._score(index, annotation)
        return index

    def _proxies(self, index: int) -> Proxies:
        """Round ``index``'s proxies on the tissue patches it was not tuned on (audits are drawn from those;
        they also avoid their own batch's proposals, which the proxies keep)."""
        maps = self.maps[index]
        return Proxies.of(box.crop(maps[box.image]) for box in self._clear_of(self.trained_on[index]))

    def _clear_of(self, annotated: Sequence[Box]) -> list[Box]:
        """The tissue patches that overlap none of ``annotated``."""
        return [box for box in self.tissue if not any(box.overlaps(done) for done in annotated)]

    def evaluate(self, index: int, pairs: Sequence[Pair]) -> float:
        """Pooled Dice of round ``index``'s prediction on image/mask pairs."""
        network, tta = self.predictors[index]
        return evaluate(network, pairs, self.factor, tta=tta)["dice_global"]

    def tissue_truth(self, index: int, annotated: Sequence[Box], oracle: Oracle) -> float | None:
        """Round ``index``'s pooled Dice against the truth on the tissue patches not annotated yet: the audit
        estimate's target (benchmarks); ``None`` where none is left or none holds tumour."""
        maps = self.maps[index]
        unseen = self._clear_of(annotated)
        found = pooled_estimate([score_patch(box.crop(maps[box.image]), oracle.annotate(box).mask) for box in unseen])
        return None if found is None else found.dice

    def retile(self, tissue: list[Box]) -> None:
        """New tissue patches (the audit geometry changed): every round's proxies recomputed on them.

        The audits so far were drawn from the old boxes, no sample of the new ones: they stay in the
        pooled estimate of all corrections and leave the audit estimate.
        """
        self.tissue = tissue
        self.scores = [(False, by_round) for _, by_round in self.scores]
        self.proxies = [self._proxies(index) for index in range(len(self.maps))]

    def _score(self, index: int, annotation: Annotation) -> PatchScore:
        box = annotation.box
        return score_patch(box.crop(self.maps[index][box.image]), annotation.mask)

    def score(self, batch: Sequence[Annotation], audits: Sequence[bool]) -> list[dict[int, PatchScore]]:
        """Test-then-train: every round so far against each correction of a fresh batch; the audits are kept."""
        fresh = []
        for annotation, audit in zip(batch, audits, strict=True):
            by_round = {i: self._score(i, annotation) for i in range(len(self.maps))}
            self.scores.append((audit, by_round))
            if audit:
                self.held_out.append((annotation, by_round))
            fresh.append(by_round)
        return fresh

    def checked_on(self, fresh: Sequence[dict[int, PatchScore]]) -> list[dict[int, PatchScore]]:
        """What two rounds are compared on: a batch's fresh proposed corrections and every audit so far
        (none was trained on; the batch's own audits are among them)."""
        held = [by_round for _, by_round in self.held_out]
        return [*(s for s in fresh if not any(s is h for h in held)), *held]

    def estimate(self, round_index: int, audits_only: bool = True):
        """A round's Dice from the corrections scored against it: PPI on the audits, or pooled over all."""
        picked = [
            by_round[round_index]
            for audit, by_round in self.scores
            if round_index in by_round and (audit or not audits_only)
        ]
        if audits_only:
            return ppi_estimate(picked, self.proxies[round_index])
        return pooled_estimate(picked)


def audit_count(k: int, share: float) -> int:
    """How many of a batch of ``k`` are given to audits: ``share`` of it, at least one when the share is > 0."""
    return 0 if share <= 0 or k <= 0 else min(k, max(1, round(k * share)))


def audit_subdivide(subdivide: int) -> int:
    """The side divisor of audit patches: quarter patches at least (:data:`AUDIT_SUBDIVIDE`), else the proposals'."""
    return max(AUDIT_SUBDIVIDE, subdivide)


def batch_split(k: int, share: float, subdivide: int) -> tuple[int, int]:
    """A batch of ``k`` patches of side 1/``subdivide``: how many are proposed, and how many audit patches
    (of side 1/:func:`audit_subdivide`) fill the area of the rest (:func:`audit_count`)."""
    given = audit_count(k, share)
    return k - given, given * (audit_subdivide(subdivide) // subdivide) ** 2


def audit_config(config: LoopConfig) -> LoopConfig:
    """The settings audits are drawn with: ``config`` with the audits' side (:func:`audit_subdivide`)."""
    return replace(config, subdivide=audit_subdivide(config.subdivide))


def draw_audits(pool: Sequence[Pair], n: int, config: LoopConfig, exclude: Sequence[Box], rng) -> list[Proposal]:
    """``n`` audit patches (:func:`audit_config`) drawn uniformly at random from the pool's tissue (an unbiased
    sample of it), marked as audits."""
    picks = select(random_candidates(pool, audit_config(config)), n, exclude, "random", rng)
    return [replace(p, audit=True) for p in picks]


def simulate(
    model: UNet,
    pool: Sequence[Pair],
    test: Sequence[Pair],
    budgets: Sequence[int],
    strategy: str = "uncertainty",
    seed: int = 0,
    factor: float = 0.5,
    config: LoopConfig | None = None,
    replay: Sequence[Pair] = (),
    replay_factor: float | None = None,
    on_event: Callable[[ProgressEvent], None] | None = None,
    audit_share: float = 0.0,
    no_harm: bool = False,
    presets: dict[str, LoopConfig] | None = None,
    target: float | None = None,
    stop: bool = False,
    closing_batch: bool = False,
    pool_truth: bool = False,
    harm_rule: str = "margin",
) -> Trajectory:
    """Run the oracle loop: annotate in batches of ``config.batch`` until each budget, evaluate.

    Each batch holds ``audit_share`` of audit patches (:func:`draw_audits`), the rest proposed by
    ``strategy``. Every correction is scored against every round before training
    (test-then-train); audits are never trained on, so every round is scored on all of them.
    With ``no_harm``, a round that scores more than :data:`~napari_uga.audit.HARM_MARGIN` below
    the round it was tuned from, or below round 0, is rolled back: on the audits as soon as it is
    trained, and on the next batch with the audits.
    ``presets`` (``{"centre": ..., "organ": ...}``) is the ``auto`` shift: the first batch's
    scores of the starting model choose one (:func:`~napari_uga.audit.choose_shift`).
    ``stop`` ends the run when the stop signal speaks (the demo); otherwise it is only recorded.
    ``closing_batch``: one more batch after the last budget, scored and not trained on, so the
    last round has an in-session estimate and a do-no-harm check before the session hands it
    over (``handed_over``; with ``no_harm``, only if its paired gain over the starting model on
    that batch and the audits is clearly above zero, :func:`_hand_over`); it costs one batch more.
    ``pool_truth``: also measure each budget's model on the pool's tissue patches not annotated
    yet (what the in-session estimate is about). ``harm_rule``: how sure the rule must be that a
    round is worse (:func:`~napari_uga.audit.worse_than`).

    The model is fine-tuned (continuing from the round in use) on all corrections so far but the audits.
    ``seed`` alone fixes the run: the MC-dropout proposals draw from torch's generator too.
    """
    rng = np.random.default_rng(seed)
    if harm_rule not in HARM_RULES:
        raise ValueError(f"harm_rule must be one of {HARM_RULES}, not {harm_rule!r}")
    harm = harm_rule if no_harm else None  # the do-no-harm rule, or none
    if config is None:
        config = presets["centre"] if presets else LoopConfig()
    torch.manual_seed(seed)
    oracle = Oracle(pool)
    result = Trajectory()
    ledger = _Ledger(pool, _audit_boxes(pool, config), factor)
    in_use = ledger.add_round(model, None, config.predictor)
    annotations: list[Annotation] = []
    trained: list[Annotation] = []  # the annotations fine-tuning uses: all but the audits (held out)
    fresh: list[dict[int, PatchScore]] = []  # the last batch's scores, before training on it
    self_labelled: list[Annotation] | None = None
    spent = 0.0  # the budget used, in patches (a sub-patch is 1 / config.pieces of one)
    for budget in sorted(set(budgets)):
        while spent < budget - 1e-9 and not (stop and result.stop_budget is not None):
            k = math.ceil(min(config.batch, budget - spent) * config.pieces - 1e-9)  # sub-patches of this batch
            picks = _batch(ledger.rounds[in_use], pool, k, audit_share, config, annotations, strategy, rng, factor)
            if not picks:
                break
            batch = [oracle.annotate(p) for p in picks]
            fresh = ledger.score(batch, [p.audit for p in picks])
            annotations += batch
            trained += [a for a, p in zip(batch, picks, strict=True) if not p.audit]
            spent += _area(picks, config)
            result.picks.append([p.as_dict() for p in picks])
            if presets and result.shift is None:
                proposable = [c.box for c in random_candidates(pool, config)]  # the gate reads proposal patches
                gate = partial(tissue_is_new, model, tissue_sample(pool, proposable), factor)
                result.shift = choose_shift([s[0] for s in fresh], gate)
                geometry = _audit_geometry(config)
                config = presets[result.shift]
                if _audit_geometry(config) != geometry:  # the audits are drawn from other boxes now
                    ledger.retile(_audit_boxes(pool, config))
            in_use = _do_no_harm(ledger, in_use, ledger.checked_on(fresh), harm, result, on_event)
            signal = stop_signal(ledger.estimate(in_use), ledger.changes, target, ledger.estimate(in_use, False))
            if signal is not None and result.stop_budget is None:
                result.stop_budget, result.stop_reason = _patches(spent), signal
                _say(on_event, f"stop signal: {signal}")
                if stop:
                    break  # the round in use has just been checked on this batch: keep it
            if all(p.audit for p in picks):
                continue  # a batch of audits alone: measured, no new correction to train on
            if self_labelled is None:
                whole = [(Box(p.name, 0, 0, *p.image.shape[:2]), p.image) for p in pool]
                self_labelled = self_labels(model, whole, factor) if config.self_share > 0 else []
            run = finetune(
                ledger.rounds[in_use],
                trained,
                replay,
                factor,
                config,
                seed + len(annotations),
                replay_factor=replay_factor,
                origin=model,
                self_labelled=self_labelled,
                held_out=[a.box for a, _ in ledger.held_out],
            )
            tuned = _drain(run, on_event).model
            tuned_index = ledger.add_round(tuned, in_use, config.predictor, [a.box for a in trained])
            in_use = _check_on_audits(ledger, tuned_index, harm, result, on_event)
        if stop and result.stop_budget is not None and budget > spent + 1e-9:
            break  # the session stopped before this budget
        result.budgets.append(budget)
        result.round_in_use.append(in_use)
        result.rollbacks_by_budget.append(result.rollbacks)
        _record_estimates(result, ledger, in_use)
        result.dice_global.append(ledger.evaluate(in_use, test))
        if pool_truth:
            result.pool_dice.append(ledger.tissue_truth(in_use, [a.box for a in annotations], oracle))
        _say(on_event, f"budget {budget}: Dice {result.dice_global[-1]:.3f}", "evaluate", budget, max(budgets))
    if closing_batch:
        k = config.batch * config.pieces
        picks = _batch(ledger.rounds[in_use], pool, k, audit_share, config, annotations, strategy, rng, factor)
        closing = ledger.score([oracle.annotate(p) for p in picks], [p.audit for p in picks]) if picks else []
        checks = ledger.checked_on(closing)  # with no tissue left, the audits so far still check the last round
        if checks:
            in_use = _do_no_harm(ledger, in_use, checks, harm, result, on_event)
            in_use = _hand_over(ledger, in_use, checks, no_harm, on_event)
        elif no_harm and ledger.tuned_from[in_use] is not None:  # nothing left to check the last round on
            checked = ledger.tuned_from[in_use]
            _say(on_event, f"round {in_use} could not be checked (no tissue left): round {checked} met fresh patches")
            in_use = _hand_over(ledger, checked, fresh, no_harm, on_event)
    result.handed_over = in_use
    result.handed_over_dice = (
        result.dice_global[result.round_in_use.index(in_use)]
        if in_use in result.round_in_use
        else ledger.evaluate(in_use, test)
    )
    result.model, result.prediction_tta = ledger.predictors[in_use]
    result.rounds, result.tuned_from = ledger.rounds, ledger.tuned_from
    return result


def _audit_boxes(pool: Sequence[Pair], config: LoopConfig) -> list[Box]:
    """The tissue patches audits are drawn from (the boxes the audit estimate is about)."""
    return [c.box for c in random_candidates(pool, audit_config(config))]


def _audit_geometry(config: LoopConfig) -> tuple[int, int]:
    """Patch side and divisor of the audits: where they are equal, so are the boxes they are drawn from."""
    return config.patch, audit_subdivide(config.subdivide)


def _area(picks: Sequence[Proposal], config: LoopConfig) -> float:
    """The budget a batch uses, in whole patches: a proposal is 1 / ``config.pieces`` of one, an audit its share."""
    audit_pieces = audit_config(config).pieces
    return sum(1 / (audit_pieces if p.audit else config.pieces) for p in picks)


def _patches(spent: float) -> int | float:
    """The budget used, as a whole number of patches where it is one."""
    return round(spent) if abs(spent - round(spent)) < 1e-9 else round(spent, 3)


def _batch(model, pool, k, audit_share, config, annotations, strategy, rng, factor) -> list[Proposal]:
    """The next ``k`` patches: ``audit_share`` of them audits, the rest proposed by ``strategy``.

    The audits are drawn first, from all the tissue not annotated yet, so they are a uniform
    sample of it (drawn after the proposals, they would miss the hardest patches of the batch)."""
    done = [a.box for a in annotations]
    n_proposed, n_audit = batch_split(k, audit_share, config.subdivide)
    audits = draw_audits(pool, n_audit, config, done, rng)
    known = [(appearance_features(a.image), holds_tumour(a.mask)) for a in annotations]
    taken = [*done, *(a.box for a in audits)]
    picks = propose(model, pool, n_proposed, factor, config, taken, strategy, rng, known, annotated=len(done))
    return picks + audits


def _do_no_harm(ledger: _Ledger, in_use: int, fresh: list[dict], harm: str | None, result: Trajectory, on_event) -> int:
    """Check the round in use against the round it was tuned from and round 0 on fresh patches; the round to keep
    (:func:`~napari_uga.audit.round_to_keep` under rule ``harm``; ``None``: the rule is off)."""
    parent = ledger.tuned_from[in_use]
    if parent is None:
        return in_use
    comparison = compare_rounds([s[in_use] for s in fresh], [s[parent] for s in fresh])
    ledger.changes.append(0.0 if comparison is None else comparison.delta)
    kept, steps = round_to_keep(fresh, in_use, parent, rule=harm or "margin")
    if not (harm and steps):
        return in_use
    result.rollbacks += 1
    _say(on_event, f"{rollback_said(steps)}: rolled back to round {kept}")
    return kept


def _check_on_audits(ledger: _Ledger, tuned: int, harm: str | None, result: Trajectory, on_event) -> int:
    """A new round against the round it was tuned from and round 0 on every audit (none of them trained on
    one): the round to use from now on (:func:`~napari_uga.audit.round_to_keep` under rule ``harm``)."""
    audits = [by_round for _, by_round in ledger.held_out]
    if not (harm and audits):
        return tuned
    kept, steps = round_to_keep(audits, tuned, ledger.tuned_from[tuned], rule=harm)
    if steps:
        result.rollbacks += 1
        _say(on_event, f"{rollback_said(steps)} on the audits: round {tuned} not kept, round {kept} in use")
    return kept


def _hand_over(ledger: _Ledger, in_use: int, fresh: list[dict], no_harm: bool, on_event) -> int:
    """The round to hand over: a tuned round only where it clearly beats the starting model on ``fresh``.

    At the end of a session the burden of proof is on the change: the tuned round is handed over
    only where its paired gain over round 0 on ``fresh`` (the closing batch and every audit, none of
    which either round trained on; the same audits chose the rounds before, so the gain may be a
    little optimistic) has an interval above
    zero (:func:`~napari_uga.audit.compare_rounds`, one-sided at 5 %); a gain within noise, a tie
    or a loss hands over round 0. A round never scored on them is handed over as it is.
    """
    if not no_harm or in_use == 0:
        return in_use
    scored = [s for s in fresh if in_use in s]
    comparison = compare_rounds([s[in_use] for s in scored], [s[0] for s in scored])
    if comparison is None:
        return in_use
    if comparison.low > 0:
        _say(on_event, f"round {in_use} scored {_compared(comparison)} against the starting model: handed over")
        return in_use
    _say(on_event, f"round {in_use} scored {_compared(comparison)} against the starting model: handing over round 0")
    return 0


def _compared(comparison) -> str:
    """``+0.004 [-0.020, +0.031] dice`` (a :class:`~napari_uga.audit.Comparison`)."""
    return f"{comparison.delta:+.3f} [{comparison.low:+.3f}, {comparison.high:+.3f}] {comparison.measure}"


def _record_estimates(result: Trajectory, ledger: _Ledger, index: int) -> None:
    """A budget's in-session estimates of the round in use, as the session knows them then: from every
    correction scored against it so far (no later audit, no hindsight)."""
    audit, hard = ledger.estimate(index), ledger.estimate(index, audits_only=False)
    result.estimated_dice.append(None if audit is None else audit.dice)
    result.estimate_interval.append(None if audit is None else (audit.low, audit.high))
    audits = [by_round[index] for audit, by_round in ledger.scores if audit and index in by_round]
    result.estimate_audits.append(len(audits))
    result.hard_dice.append(None if hard is None else hard.dice)
    result.overconfident.append(overconfident_said(audits))


def _say(on_event, text: str, stage: str = "audit", step: int = 0, total: int = 0) -> None:
    if on_event is not None:
        on_event(progress_event(stage, step, total, text))


def _drain(events: Iterator[ProgressEvent], on_event: Callable[[ProgressEvent], None] | None):
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)
