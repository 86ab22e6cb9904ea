"""QC calibration on an annotation session's audit patches: a guarantee for that session's tissue.

Audit patches are drawn uniformly at random from a slide's tissue and corrected by the
pathologist, so they are exchangeable with other patches drawn that way from those slides:
both acceptance rules and the exchangeability gate calibrated on them hold for such patches.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..io import MPP_HINT, InputError, MissingScaleError, Pair
from .conformal import min_accepted

SESSION_SCOPE = "for patches drawn at random from the tissue of the session's slides"


def min_calibration(rule: str, alpha: float, delta: float) -> int:
    """Fewest calibration images with which ``rule`` can accept anything (``ltt``: all of them good)."""
    if rule == "ltt":
        return min_accepted(alpha, delta)
    return max(1, math.ceil(1 / alpha - 1 - 1e-9))  # conformal selection: n + 1 >= 1 / alpha


def session_calibration(
    folder: str | os.PathLike, rule: str, alpha: float, delta: float, mpp: float | None = None
) -> tuple[list[Pair], float, dict]:
    """A session's audit patches, their µm/px and the report's ``calibration`` entry.

    The µm/px is the session's where its slides agree on one, else ``mpp``. Raises
    :class:`InputError` (one line) for a folder that is not a session, one with fewer audit
    patches than ``rule`` needs at ``alpha`` / ``delta``, or one whose scale is unknown.
    """
    from ..session import audit_pairs

    folder = Path(folder).resolve()
    pairs, session_mpp = audit_pairs(folder)
    need = min_calibration(rule, alpha, delta)
    if len(pairs) < need:
        raise InputError(f"{folder}: {len(pairs)} audit patches, too few for {_rule_needs(rule, alpha, delta)}")
    mpp = session_mpp or mpp
    if mpp is None:
        raise MissingScaleError(f"{folder}: the session's slides have no single known µm/px; {MPP_HINT}")
    info = {"source": "session", "folder": str(folder), "patches": len(pairs), "guarantee": SESSION_SCOPE, "mpp": mpp}
    return pairs, mpp, info


def _rule_needs(rule: str, alpha: float, delta: float) -> str:
    """What ``rule`` needs, in words, with the cheaper rule as the way out."""
    if rule == "ltt":
        return (
            f"rule ltt, which needs at least {min_calibration('ltt', alpha, delta)} (all good) at alpha={alpha}, "
            f"delta={delta}; annotate more batches, or use rule fdr (needs {min_calibration('fdr', alpha, delta)})"
        )
    return f"rule fdr, which needs at least {min_calibration('fdr', alpha, delta)} at alpha={alpha}; annotate more"
