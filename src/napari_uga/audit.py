"""Every correction counts twice: it measures the model before it trains it.

A corrected patch that no model round has trained on yet is a fresh, labelled sample of the new
hospital's tissue. Scored against a round's prediction before fine-tuning (*test-then-train*),
it says how well that round does there, with no ground truth beyond the corrections:

- :func:`score_patch`: the pixel counts of one round's prediction against one correction;
- :func:`pooled_estimate`: the pooled Dice of a round over patches, with an interval. On
  *audit* patches (drawn uniformly at random from the tissue) it estimates the round's Dice on
  the slide's tissue; on the uncertainty-ranked ones it is pessimistic (they are the hard ones);
- :func:`compare_rounds`: the paired difference of two rounds on the same fresh patches, which
  drives the do-no-harm rule (:func:`worse_than`) and the stop signal (:func:`stop_signal`);
- :func:`choose_shift`: the ``auto`` preset, from the starting model's score on the first batch and
  whether the slide's tissue is new to the model (:func:`tissue_is_new`, on a sample of the tissue).

Pooled Dice (``2 ΣTP / (Σpredicted + Σtrue)``) is what ``dice_global`` computes over test
images, so an audit estimate compares with it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

LEVEL = 0.9  # two-sided level of every interval
HARM_MARGIN = 0.01  # a round this much worse than its predecessor on fresh corrections is rolled back
GOOD_DICE = 0.8  # the product's bar for a good segmentation (QC's cut): below it, the tissue is new to the model
STEADY = 0.01  # the estimate moved less than this over the last rounds: more rounds are unlikely to help
FEWEST = 3  # fewer patches than this give the interval [0, 1]: two patches can agree by chance
GATE_PATCHES = 64  # tissue patches the gate of ``auto`` reads (a cost cap: about 0.1 s a patch on one core)
OVERCONFIDENT = 2.0  # changed over expected-wrong pixels above which a round is confidently wrong (stop 35)


@dataclass(frozen=True)
class PatchScore:
    """One round's prediction against one correction: tumour pixels predicted, true, in both; share changed.

    ``expected_tp`` and ``expected_truth``: the same counts as the round's own probabilities
    expect them (the proxy that :func:`ppi_estimate` corrects with the true counts).
    """

    tp: int
    predicted: int
    truth: int
    changed: float
    expected_tp: float = 0.0
    expected_truth: float = 0.0

    @property
    def dice(self) -> float | None:
        """Patch Dice (``None`` where neither marks tumour)."""
        total = self.predicted + self.truth
        return 2 * self.tp / total if total else None

    def as_dict(self) -> dict:
        """JSON-friendly form (stored per annotation in the session)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> PatchScore:
        """The inverse of :meth:`as_dict` (``TypeError``/``KeyError`` on a malformed record)."""
        values = [record[k] for k in ("tp", "predicted", "truth")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise TypeError(f"patch score counts must be whole numbers >= 0, not {values}")
        changed = record["changed"]
        if not isinstance(changed, int | float) or not 0 <= changed <= 1:
            raise TypeError(f"patch score changed share must be in [0, 1], not {changed!r}")
        expected = [record.get(k, 0.0) for k in ("expected_tp", "expected_truth")]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in expected):
            raise TypeError(f"patch score expected counts must be numbers >= 0, not {expected}")
        return cls(*values, float(changed), *map(float, expected))


def score_patch(probability: np.ndarray, correction: np.ndarray) -> PatchScore:
    """Score a round's tumour probability (thresholded at 0.5) against the pathologist's 0/1 correction."""
    probability, correction = _finite(probability), np.asarray(correction) > 0
    if probability.shape != correction.shape:
        raise ValueError(f"prediction {probability.shape} and correction {correction.shape} differ in shape")
    prediction = probability >= 0.5
    expected_tp, expected_truth = expected_counts(probability)
    return PatchScore(
        int(np.count_nonzero(prediction & correction)),
        int(np.count_nonzero(prediction)),
        int(np.count_nonzero(correction)),
        float(np.mean(prediction != correction)) if prediction.size else 0.0,
        expected_tp,
        expected_truth,
    )


def score_rounds(
    models: dict,
    patches: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    factor: float,
    tta: str = "none",
    known: Sequence[dict[int, PatchScore]] = (),
) -> dict:
    """Test-then-train: ``{round: [PatchScore per patch]}`` for each round's network (none trained on these),
    predicting under ``tta``. ``known``: per patch, scores already made (same networks and ``tta``): kept, not
    made again."""
    from .uncertainty import predict_probability

    known = list(known) or [{} for _ in patches]
    return {
        index: [
            made[index] if index in made else score_patch(predict_probability(model, p, factor=factor, tta=tta), m)
            for p, m, made in zip(patches, masks, known, strict=True)
        ]
        for index, model in models.items()
    }


def missing_scores(models: dict, known: Sequence[dict[int, PatchScore]]) -> int:
    """How many (round, patch) scores :func:`score_rounds` still has to make."""
    return sum(index not in made for made in known for index in models)


def expected_counts(probability: np.ndarray) -> tuple[float, float]:
    """Tumour pixels in both and true tumour pixels, as a round's own probabilities expect them."""
    probability = _finite(probability)
    return float(probability[probability >= 0.5].sum()), float(probability.sum())


def _finite(probability: np.ndarray) -> np.ndarray:
    """Probabilities as float64, a broken round's NaN read as no tumour (so it scores as wrong, not as nothing)."""
    return np.nan_to_num(np.asarray(probability, np.float64), nan=0.0, posinf=1.0, neginf=0.0)


@dataclass(frozen=True)
class Proxies:
    """Per unlabelled tissue patch of a round: predicted tumour pixels and the expected counts (for PPI)."""

    predicted: np.ndarray
    expected_tp: np.ndarray
    expected_truth: np.ndarray

    @classmethod
    def of(cls, probabilities) -> Proxies:
        """The proxies of patches given as probability crops."""
        rows = [(np.count_nonzero(_finite(p) >= 0.5), *expected_counts(p)) for p in probabilities]
        table = np.array(rows, np.float64).reshape(-1, 3)
        return cls(table[:, 0], table[:, 1], table[:, 2])


@dataclass(frozen=True)
class Estimate:
    """A pooled Dice over ``n`` patches with its interval at :data:`LEVEL`."""

    dice: float
    low: float
    high: float
    n: int

    def text(self) -> str:
        """``0.86 [0.81, 0.90]``."""
        return f"{self.dice:.2f} [{self.low:.2f}, {self.high:.2f}]"


def _ratio_terms(scores: Sequence[PatchScore]) -> tuple[np.ndarray, np.ndarray]:
    """Per patch, the numerator (2 TP) and denominator (predicted + true) of the pooled Dice."""
    numerator = np.array([2.0 * s.tp for s in scores])
    denominator = np.array([float(s.predicted + s.truth) for s in scores])
    return numerator, denominator


def _t_half_width(residuals: np.ndarray, mean_denominator: float, level: float) -> float:
    """Half-width of the delta-method interval of a ratio of means (Student t, n - 1 degrees of freedom)."""
    n = len(residuals)
    if n < FEWEST:
        return np.inf
    standard_error = residuals.std(ddof=1) / (np.sqrt(n) * mean_denominator)
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * standard_error)


def _bounds(dice: float, half: float, scale: str) -> tuple[float, float]:
    """An interval of half-width ``half`` around ``dice``: on the Dice scale, cut to [0, 1], or on the logit scale
    (``half`` carried there by the derivative of the logit), which widens it towards the middle near 0 and 1."""
    if scale == "raw" or not np.isfinite(half) or half == 0:
        return max(0.0, dice - half), min(1.0, dice + half)
    p = float(np.clip(dice, 1e-6, 1 - 1e-6))
    centre, spread = special.logit(p), half / (p * (1 - p))
    return min(dice, float(special.expit(centre - spread))), max(dice, float(special.expit(centre + spread)))


def pooled_estimate(scores: Sequence[PatchScore], level: float = LEVEL, scale: str = "logit") -> Estimate | None:
    """Pooled Dice of one round over patches, with a ratio-estimator interval; ``None`` with no tumour anywhere.

    The pooled Dice is a ratio of two sums over patches, so its interval is the delta-method
    one for a ratio of means with Student-t quantiles (Cochran, *Sampling Techniques*, 6.4):
    unlike a bootstrap it does not shrink to nothing for the handful of patches a session has
    (a bootstrap of two patches has two distinct values). Below :data:`FEWEST` patches the
    interval is ``[0, 1]``: measured on 400 draws of real tiles, two patches covered the truth
    in 37 % of draws at the nominal 90 %. ``scale="logit"`` (the default) sets the interval on the
    logit scale (:func:`_bounds`), as for :func:`ppi_estimate`, whose logit form was chosen on DEV
    splits in ``benchmarks/estimate_coverage.py`` (this one's logit form also covered better there
    than on the Dice scale).
    """
    numerator, denominator = _ratio_terms(scores)
    if denominator.sum() == 0:
        return None
    dice = float(numerator.sum() / denominator.sum())
    half = _t_half_width(numerator - dice * denominator, denominator.mean(), level)
    return Estimate(dice, *_bounds(dice, half, scale), len(scores))


def ppi_estimate(
    scores: Sequence[PatchScore], proxies: Proxies, level: float = LEVEL, scale: str = "logit"
) -> Estimate | None:
    """Pooled Dice on audit patches, sharpened by the round's own maps of all the tissue (prediction-powered).

    Prediction-powered inference (Angelopoulos et al., *Science* 2023): the round's expected
    counts over every unlabelled tissue patch (``proxies``) give the pooled Dice's numerator and
    denominator; the audit patches, a uniform sample of the same patches, correct their bias
    with the true counts. The estimate stays unbiased whatever the model's calibration, and
    its interval (delta method, Student t) is narrow where the maps are right, because only
    the correction's spread remains. Falls back to :func:`pooled_estimate` with no proxies.
    """
    if len(proxies.predicted) == 0:
        return pooled_estimate(scores, level, scale)
    if not scores:
        return None
    numerator, denominator = _ratio_terms(scores)
    proxy_num = np.array([2.0 * s.expected_tp for s in scores])
    proxy_den = np.array([s.predicted + s.expected_truth for s in scores])
    all_num, all_den = 2.0 * proxies.expected_tp, proxies.predicted + proxies.expected_truth
    mean_num = all_num.mean() + (numerator - proxy_num).mean()
    mean_den = all_den.mean() + (denominator - proxy_den).mean()
    if mean_den <= 0:
        return None
    dice = float(np.clip(mean_num / mean_den, 0.0, 1.0))
    n = len(scores)
    if n < FEWEST:
        return Estimate(dice, 0.0, 1.0, n)
    rectifier = (numerator - proxy_num) - dice * (denominator - proxy_den)
    unlabelled = all_num - dice * all_den
    variance = rectifier.var(ddof=1) / n + (unlabelled.var(ddof=1) / len(all_num) if len(all_num) > 1 else 0.0)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * np.sqrt(variance) / mean_den)
    return Estimate(dice, *_bounds(dice, half, scale), n)


@dataclass(frozen=True)
class Overconfidence:
    """Pixels the pathologist changed over the pixels the round's own probabilities expected to be wrong.

    About 1 where the round's probabilities are honest about its errors; far above 1 where it is
    confidently wrong (its errors have low uncertainty, so uncertainty-ranked patches miss them).
    """

    ratio: float
    low: float
    high: float
    n: int


def overconfidence(scores: Sequence[PatchScore], level: float = LEVEL) -> Overconfidence | None:
    """The ratio of changed to expected-wrong pixels over ``scores`` (audits: a sample of the tissue), with a
    delta-method interval as :func:`pooled_estimate`'s; ``None`` where nothing was changed or expected wrong,
    infinite where the round was sure of every pixel and some were changed (from :data:`FEWEST` patches on)."""
    changed = np.array([float(s.predicted + s.truth - 2 * s.tp) for s in scores])
    expected = np.array([s.predicted + s.expected_truth - 2 * s.expected_tp for s in scores])
    if not len(scores) or expected.sum() <= 0 and changed.sum() <= 0:
        return None
    if expected.sum() <= 0:  # sure of every pixel, and wrong on some: as confidently wrong as it gets
        return Overconfidence(np.inf, np.inf if len(scores) >= FEWEST else 0.0, np.inf, len(scores))
    ratio = float(changed.sum() / expected.sum())
    half = _t_half_width(changed - ratio * expected, expected.mean(), level)
    return Overconfidence(ratio, max(0.0, ratio - half), ratio + half, len(scores))


def overconfident_said(audits: Sequence[PatchScore], who: str = "the pathologist") -> str | None:
    """A plain sentence where a round is clearly confidently wrong on the audits (:func:`overconfidence`'s
    interval above :data:`OVERCONFIDENT`), else ``None``. Its errors are where uncertainty does not look.
    ``who`` made the corrections (``"you"`` in the dock)."""
    found = overconfidence(audits)
    if found is None or found.low <= OVERCONFIDENT:
        return None
    times = (
        "pixels where it was sure of itself"
        if np.isinf(found.ratio)
        else f"{found.ratio:.1f}× [{found.low:.1f}, {found.high:.1f}] as many pixels as the model expected to get wrong"
    )
    return (
        f"on the {found.n} audit patches {who} changed {times}: it is confidently wrong on some of this tissue, "
        "where uncertainty-ranked patches do not look; propose at random or annotate such tissue yourself"
    )


@dataclass(frozen=True)
class Comparison:
    """A newer round's score minus an older one's on the same fresh patches, with its interval.

    ``measure``: ``dice`` (pooled), or ``accuracy`` (share of pixels right) on a batch where
    one of the rounds has no tumour to score: neither marks nor predicts any.
    """

    delta: float
    low: float
    high: float
    n: int
    measure: str = "dice"


def compare_rounds(newer: Sequence[PatchScore], older: Sequence[PatchScore], level: float = LEVEL) -> Comparison | None:
    """Paired difference of two rounds on the same patches (delta method, as :func:`pooled_estimate`).

    Pooled Dice where both rounds have tumour to score on the batch; else pixel accuracy, so a
    batch of tumour-free tissue still tells a round that marks tumour there from one that does
    not. ``None`` for no patches.
    """
    if len(newer) != len(older):
        raise ValueError(f"compare_rounds: {len(newer)} and {len(older)} scores are not the same patches")
    if not newer:
        return None
    a_new, b_new = _ratio_terms(newer)
    a_old, b_old = _ratio_terms(older)
    if b_new.sum() == 0 or b_old.sum() == 0:
        differences = np.array([o.changed - n.changed for n, o in zip(newer, older, strict=True)])
        half = _t_half_width(differences, 1.0, level)
        delta = float(differences.mean())
        return Comparison(delta, delta - half, delta + half, len(newer), "accuracy")
    r_new, r_old = a_new.sum() / b_new.sum(), a_old.sum() / b_old.sum()
    # linearised difference per patch: each ratio's residual over its own mean denominator
    residuals = (a_new - r_new * b_new) / b_new.mean() - (a_old - r_old * b_old) / b_old.mean()
    half = _t_half_width(residuals, 1.0, level)
    delta = float(r_new - r_old)
    return Comparison(delta, delta - half, delta + half, len(newer))


# how sure do no harm must be that a round is worse (:func:`worse_than`)
HARM_RULES = ("margin", "clear", "clear_or_large")
LARGE_LOSS = 0.05  # ``clear_or_large``: a loss this large rolls back even where the few patches leave it unclear


def worse_than(comparison: Comparison | None, margin: float = HARM_MARGIN, rule: str = "margin") -> bool:
    """Do no harm: the newer round scored more than ``margin`` below the older one on fresh corrections.

    ``rule="clear"`` also needs the loss to be clear: the comparison's interval lies below zero
    (below :data:`FEWEST` patches it never does). Measured in stop 33 and not the default: on four
    audits it let a wrecked round through (docs/benchmarks.md). ``rule="clear_or_large"``: a clear
    loss, or one beyond :data:`LARGE_LOSS` however unclear (stop 35).
    """
    if rule not in HARM_RULES:
        raise ValueError(f"harm rule must be one of {HARM_RULES}, not {rule!r}")
    if comparison is None or comparison.delta >= -margin:
        return False
    clear = comparison.high < 0
    return {"margin": True, "clear": clear, "clear_or_large": clear or comparison.delta < -LARGE_LOSS}[rule]


def round_to_keep(
    fresh: Sequence[dict[int, PatchScore]], in_use: int, parent: int, margin: float = HARM_MARGIN, rule: str = "margin"
) -> tuple[int, list[tuple[int, int, Comparison]]]:
    """Do no harm: the round to keep, and why (``(round, reference, comparison)`` per step back).

    ``fresh``: per patch, each round's score on it (patches none of them trained on). The round in
    use gives way to the round it was tuned from where it scores more than ``margin`` below it
    (:func:`worse_than`), and the round kept then gives way to round 0 where it scores below the
    starting model: a drift of many rounds, each within the margin of the one before, adds up
    and is caught against the start. ``rule``: as in :func:`worse_than`.
    """
    kept, steps = in_use, []
    for reference in dict.fromkeys((parent, 0)):
        if reference == kept:
            continue
        comparison = compare_rounds([s[kept] for s in fresh], [s[reference] for s in fresh])
        if worse_than(comparison, margin, rule):
            steps.append((kept, reference, comparison))
            kept = reference
    return kept, steps


def rollback_said(steps: Sequence[tuple[int, int, Comparison]]) -> str:
    """``round 3 scored -0.052 dice against round 2; round 2 scored -0.031 dice against round 0``."""
    return "; ".join(f"round {a} scored {c.delta:+.3f} {c.measure} against round {b}" for a, b, c in steps)


def choose_shift(first_batch: Sequence[PatchScore], new_tissue: Callable[[], bool | None] | None = None) -> str:
    """The ``auto`` preset: ``organ`` when the starting model fails the first batch *and* the tissue is new to it.

    Where the starting model is already good on the new tissue (a new centre or scanner), the
    cautious ``centre`` fine-tuning keeps it; where it fails the product's own bar
    (:data:`GOOD_DICE`) on tissue unlike its training tissue (``new_tissue``, from
    :func:`tissue_is_new`, asked only where the bar fails: a new organ), the ``organ`` preset lets
    fine-tuning follow the new tissue. Hard lymph-node tissue at a new centre fails the bar too, but
    is not new tissue, and ``organ`` fine-tuning there forgets what the model knew.
    ``new_tissue=None`` (no gate): the bar alone. Neither the bar nor the gate's level is tuned here.
    """
    estimate = pooled_estimate(first_batch)
    if estimate is None or estimate.dice >= GOOD_DICE:  # nothing says the model is wrong
        return "centre"
    return "centre" if new_tissue is not None and new_tissue() is False else "organ"


def tissue_is_new(model, images: Sequence[np.ndarray], factor: float) -> bool | None:
    """Whether a session's tissue is unlike the model's training tissue: the QC exchangeability gate.

    ``images``: up to :data:`GATE_PATCHES` tissue patches drawn without regard to the model (the
    boxes audits come from), not the proposed batch: uncertainty proposes the atypical patches, a
    sample biased towards "new" (it sent 2 of 5 UMCU sessions to ``organ``; docs/benchmarks.md,
    stop 27). The gate (:mod:`napari_uga.quality.domain`, calibrated on the training centre's
    tiles) gives each patch a conformal p-value; they are merged
    (:func:`~napari_uga.quality.merge_p_values`) and the tissue is new when the merged p is at most
    the gate's level. ``None`` where the gate cannot say (turned off, no patch, no shared features).
    """
    from .quality import default_qc_model

    merged = tissue_p_value(model, images, factor)
    return None if merged is None else bool(merged <= default_qc_model().domain_level)


def tissue_p_value(model, images: Sequence[np.ndarray], factor: float) -> float | None:
    """The gate's merged p-value for ``images`` (small: unlike the training tissue); ``None`` where it cannot say."""
    from .quality import default_qc_model, merge_p_values
    from .quality.domain import domain_row

    qc = default_qc_model()
    if qc.domain_level <= 0 or not images:
        return None
    merged = merge_p_values(qc.domain_p([domain_row(model, image, factor) for image in images]))
    return float(merged) if np.isfinite(merged) else None


def stop_signal(
    audit: Estimate | None,
    changes: Sequence[float],
    target: float | None = None,
    hard: Estimate | None = None,
) -> str | None:
    """A plain sentence when more rounds are unlikely to be worth it, else ``None``.

    ``audit``: the model in use's estimate on audit patches; ``hard``: on every fresh
    correction (the uncertainty-ranked ones are the hard ones, so it underestimates and
    clearing a target with it is conservative); ``changes``: the paired change at each round
    (newest last); ``target``: a Dice the user wants to clear.
    """
    said = None if audit is None else f"estimated Dice {audit.text()} on this slide"
    if target is not None:
        for estimate, where in ((audit, "on this slide"), (hard, "on your corrections, the hard patches")):
            if estimate is not None and estimate.low >= target:
                return f"estimated Dice {estimate.text()} {where}: it clears your target {target:.2f}; you can stop"
    if said is not None and len(changes) >= 2 and all(abs(c) < STEADY for c in changes[-2:]):
        return f"{said}; the last two rounds changed it by less than {STEADY:.2f}: more patches are unlikely to help"
    return None
