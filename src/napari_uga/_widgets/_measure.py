"""What the annotation dock says of the model from the corrections: estimates, the rounds table, the stop signal.

Qt-free text from a :class:`~napari_uga.session.Session`; the dock only puts it in its labels.
"""

from __future__ import annotations

from ..audit import FEWEST, compare_rounds, overconfident_said, pooled_estimate, stop_signal
from ..selection import Proposal
from ..session import Session
from ._workers import SubmitOutcome

NOT_YET = "The model is measured on your corrections from the first Submit on."


def measure_text(session: Session, target: float | None) -> str:
    """The estimate, the hard patches' Dice, whether the model is confidently wrong, round 0 against the latest,
    and the stop signal."""
    index = next((r for r in range(session.current_round, -1, -1) if session.scores_of(r)), None)
    if index is None:
        return NOT_YET
    audits, every = session.scores_of(index, audits_only=True), session.scores_of(index)
    audit, hard = pooled_estimate(audits), pooled_estimate(every)
    said = [f"Round {index}:"]
    if audit is not None:
        said.append(f"estimated Dice {audit.text()} on this slide ({_audits(len(audits))}, never trained on).")
    elif audits:
        said.append(f"its {len(audits)} audit patches hold no tumour, marked or predicted: no Dice to estimate yet.")
    else:
        said.append("no audit patch scored yet (the estimate needs them; see Audit share).")
    if hard is not None:
        said.append(f"{hard.dice:.2f} on all {len(every)} corrections it had not trained on (hard ones: lower).")
    overconfident = overconfident_said(audits, who="you")
    if overconfident is not None:
        said.append(f"{overconfident[0].upper()}{overconfident[1:]}.")
    if index > 0:
        said.append(against_start(*session.paired_scores(index, 0)))
    if index < session.current_round:
        said.append(f"Round {session.current_round} is measured by your next batch.")
    signal = stop_signal(audit, session.config.get("changes", []), target, hard)
    if signal is not None:
        said.append(f"■ {signal[0].upper()}{signal[1:]}.")
    return " ".join(said)


def _audits(n: int) -> str:
    return f"{n} audit patch" if n == 1 else f"{n} audit patches"


def against_start(newer: list, start: list) -> str:
    """Did the rounds help? A round against the starting model (round 0) on the same fresh corrections."""
    comparison = compare_rounds(newer, start)
    if comparison is None or comparison.n < FEWEST:
        return f"Against round 0: too few shared corrections to compare yet ({len(newer)} of {FEWEST})."
    what = "pooled Dice" if comparison.measure == "dice" else "pixel accuracy"
    verdict = "a gain" if comparison.low > 0 else "worse than round 0" if comparison.high < 0 else "no difference shown"
    return (
        f"Against round 0 on the same {comparison.n} corrections: {comparison.delta:+.3f} "
        f"[{comparison.low:+.3f}, {comparison.high:+.3f}] ({what}): {verdict}."
    )


def history_rows(session: Session | None) -> list[list[str]]:
    """The rounds table up to the round in use: round, patches, loss, estimated Dice, Dice against a truth layer."""
    rounds = session.rounds[: session.current_round + 1] if session else []
    rows = []
    for record in rounds:
        dice_value = record.metrics.get("dice_truth")
        estimate = pooled_estimate(session.scores_of(record.index, audits_only=True))
        rows.append([
            str(record.index),
            str(len(record.annotation_ids)),
            "—" if record.loss is None else f"{record.loss:.3f}",
            "—" if estimate is None else estimate.text(),
            "—" if dice_value is None else f"{dice_value:.3f}",
        ])  # fmt: skip
    return rows


def queue_label(proposal: Proposal) -> str:
    """The label of a queued patch: ``audit``, or its uncertainty score."""
    return "audit" if proposal.audit else f"{proposal.score:.3f}"


def batch_dice(outcome: SubmitOutcome) -> str:
    """Round 0's pooled Dice on a submitted batch, for the preset notice."""
    estimate = pooled_estimate(outcome.scores[0])
    return "—" if estimate is None else f"{estimate.dice:.2f}"
