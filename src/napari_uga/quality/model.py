"""The fitted QC model (:class:`QCModel`): fitting, JSON form, rescoring of older files, the shipped calibration."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import InputError, atomic_write_json
from ..models import WEIGHTS_DIR
from .auto import _cross_fit_rows, _select_method
from .conformal import conformal_cut, conformal_selection
from .domain import DOMAIN_LEVEL, DOMAIN_NEIGHBOURS, calibration_scores, domain_features, domain_p_values
from .estimators import METHODS, PRESENCE_METHODS, _feature_names, _fit, _matrix, _predict
from .features import QC_SAMPLES, QC_TTA

# what the learned methods predict; an older file (other or no "estimate") is rescored when loaded
ESTIMATES = {
    "regressor": "tree_median",  # before: the forest mean
    "presence": "texture_presence",  # before: P(tumour) from every feature, not the texture alone
    "blend": "tree_median+texture_presence",
}
DEFAULT_METHOD = "auto"  # forest, presence model or their mean, by the calibration images (_select_method)
RULES = ("ltt", "fdr")  # precision >= 1 - alpha w.p. >= 1 - delta; or false discovery rate <= alpha
DEFAULT_RULE = "ltt"
DEFAULT_QC_FILE = WEIGHTS_DIR / "qc_calibration.json"


_FITTED: dict[str, object] = {}


def _fit_cached(
    method: str,
    names: list[str],
    rows: Sequence[dict[str, float]],
    dice_true: Sequence[float],
    tumour: Sequence[bool] = (),
):
    """Fit (deterministically) once per distinct calibration; Dask tasks rebuild models from JSON per image."""
    import hashlib

    key = hashlib.sha1(
        json.dumps(
            [method, names, rows, list(dice_true), [bool(t) for t in tumour]], sort_keys=True, default=float
        ).encode()
    ).hexdigest()
    if key not in _FITTED:
        if len(_FITTED) >= 8:
            _FITTED.pop(next(iter(_FITTED)))
        flags = np.asarray(tumour, bool) if len(tumour) else None
        _FITTED[key] = _fit(method, _matrix(rows, names), np.asarray(dice_true, float), tumour=flags, names=names)
    return _FITTED[key]


@dataclass
class QCModel:
    """A fitted quality model: predicted Dice per image and the conformal acceptance rule.

    ``rule`` ``ltt`` accepts predicted Dice >= ``cut``; ``fdr`` accepts by conformal selection
    against ``oof`` (the calibration images' out-of-fold predicted Dice). The JSON form keeps the
    calibration rows and true Dice; the estimator is refitted from them (deterministically) when loading.

    The exchangeability gate (:mod:`.domain`) accepts only images whose atypicality p-value
    against the calibration rows (``groups``: their patients or overlap groups) exceeds
    ``domain_level``; 0 turns the gate off.
    """

    method: str
    features: list[str]
    rows: list[dict[str, float]]
    dice_true: list[float]
    cut: float
    threshold: float = 0.8
    alpha: float = 0.1
    delta: float = 0.1
    samples: int = QC_SAMPLES
    tta: str = QC_TTA
    info: dict = field(default_factory=dict)
    rule: str = DEFAULT_RULE
    oof: list[float] = field(default_factory=list)
    tumour: list[bool] = field(default_factory=list)  # calibration images holding tumour (``presence`` needs them)
    groups: list[str] = field(default_factory=list)  # the calibration images' patients / overlap groups ([]: unknown)
    domain_level: float = DOMAIN_LEVEL  # the gate: out of domain when the atypicality p-value <= this
    estimator: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.estimator is None:
            self.estimator = _fit_cached(self.method, self.features, self.rows, self.dice_true, self.tumour)

    def predict(self, rows: Sequence[dict[str, float]], gate: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Predicted Dice and acceptance (by :attr:`rule`) for feature rows, judged together.

        With ``gate`` only images in the calibration domain (:meth:`domain_p`) can be accepted;
        conformal selection then runs over those images alone.
        """
        pred, accepted, _ = self.decide(rows, gate)
        return pred, accepted

    def decide(self, rows: Sequence[dict[str, float]], gate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted Dice, acceptance and the domain p-value (NaN: not tested) of feature rows."""
        if not rows:
            return np.zeros(0), np.zeros(0, bool), np.zeros(0)
        pred = _predict(self.method, self.estimator, _matrix(rows, self.features))
        p = self.domain_p(rows) if gate else np.full(len(rows), np.nan)
        candidate = self.in_domain(p)
        accepted = np.zeros(len(rows), bool)
        if self.rule == "fdr":
            accepted[candidate] = conformal_selection(
                self.oof, self.dice_true, pred[candidate], self.threshold, self.alpha
            )
        else:
            accepted = candidate & (pred >= self.cut)
        return pred, accepted, p

    def domain_p(self, rows: Sequence[dict[str, float]]) -> np.ndarray:
        """Conformal p-value of each row's atypicality among the calibration rows (NaN: gate off or untestable)."""
        if self.domain_level <= 0:
            return np.full(len(rows), np.nan)
        return domain_p_values(self.rows, rows, self.groups or None)

    def in_domain(self, p: np.ndarray) -> np.ndarray:
        """Whether images with domain p-values ``p`` may be accepted (an untested image may)."""
        p = np.asarray(p, float)
        return ~(np.isfinite(p) & (p <= self.domain_level))

    def to_dict(self) -> dict:
        """JSON-serialisable form (``cut`` is ``null`` when nothing is accepted)."""
        return {
            "format": "napari-uga-qc/1",
            "method": self.method,
            "features": list(self.features),
            "threshold": self.threshold,
            "alpha": self.alpha,
            "delta": self.delta,
            "cut": None if math.isinf(self.cut) else self.cut,
            "samples": self.samples,
            "tta": self.tta,
            "info": self.info,
            "rule": self.rule,
            "oof": [float(v) for v in self.oof],
            "rows": [{k: float(v) for k, v in r.items()} for r in self.rows],
            "dice_true": [float(d) for d in self.dice_true],
            "tumour": [bool(t) for t in self.tumour],
            "estimate": ESTIMATES.get(self.method),
            "groups": [str(g) for g in self.groups],
            "domain": {
                "level": self.domain_level,
                "neighbours": DOMAIN_NEIGHBOURS,
                "features": domain_features(self.rows[0] if self.rows else []),
                "scores": calibration_scores(self.rows, self.groups or None),
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> QCModel:
        """Rebuild (and refit) a model from :meth:`to_dict` output."""
        try:
            if d.get("format") != "napari-uga-qc/1":
                raise KeyError("format")
            model = cls(
                method=d["method"],
                features=list(d["features"]),
                rows=[dict(r) for r in d["rows"]],
                dice_true=[float(x) for x in d["dice_true"]],
                cut=math.inf if d["cut"] is None else float(d["cut"]),
                threshold=float(d["threshold"]),
                alpha=float(d["alpha"]),
                delta=float(d["delta"]),
                samples=int(d["samples"]),
                tta=str(d["tta"]),
                info=dict(d.get("info", {})),
                rule=_checked_rule(d.get("rule", "ltt")),
                oof=[float(x) for x in d.get("oof", [])],
                tumour=_checked_flags(d.get("tumour", []), d["method"], len(d["dice_true"])),
                groups=_checked_groups(d.get("groups", []), len(d["dice_true"])),
                domain_level=_checked_level(d.get("domain", {}).get("level", DOMAIN_LEVEL)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a napari-uga QC model ({exc})") from None
        if model.method in PRESENCE_METHODS and model.features[:1] != ["empty"]:
            raise InputError(f"not a napari-uga QC model (method {model.method} needs 'empty' as its first feature)")
        if model.rule == "fdr" and len(model.oof) != len(model.dice_true):
            raise InputError("not a napari-uga QC model (rule fdr needs one out-of-fold score per calibration image)")
        if model.method in ESTIMATES and d.get("estimate") != ESTIMATES[model.method]:
            return _rescored(model)
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as JSON (atomically)."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QCModel:
        """Read a model written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such QC model file")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a JSON QC model ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: not a napari-uga QC model")
        return cls.from_dict(data)


def _rescored(qc: QCModel) -> QCModel:
    """An older file of a learned method (:data:`ESTIMATES`), rescored with today's estimate of that method.

    Its calibration rows are kept; the patient groups of the original cross-fitting are not stored,
    so the new out-of-fold scores come from plain 5-fold cross-fitting.
    """
    info = {**qc.info, "rescored": f"cut and out-of-fold scores recomputed for today's {qc.method} (older file)"}
    return _refit(qc, qc.alpha, qc.delta, qc.threshold, qc.method, qc.rule, info)


def _refit(qc: QCModel, alpha: float, delta: float, threshold: float, method: str, rule: str, info: dict) -> QCModel:
    """A fresh fit on a model's stored calibration rows, true Dice and tumour flags."""
    return fit_qc_model(
        qc.rows,
        qc.dice_true,
        alpha,
        delta,
        threshold,
        method,
        samples=qc.samples,
        tta=qc.tta,
        info=info,
        rule=rule,
        tumour=qc.tumour or None,
        groups=qc.groups or None,
        domain_level=qc.domain_level,
    )


def _checked_flags(tumour, method: str, n: int) -> list[bool]:
    """Tumour flags of a model file: booleans, one per calibration image where the method needs them."""
    if not isinstance(tumour, list) or not all(isinstance(t, bool) for t in tumour):
        raise TypeError("tumour must be a list of true/false")
    if method in PRESENCE_METHODS and len(tumour) != n:
        raise ValueError(f"method {method} needs one tumour flag per calibration image")
    return tumour


def _checked_groups(groups, n: int) -> list[str]:
    """Calibration groups of a model file: none, or one (text) per calibration image."""
    if not isinstance(groups, list) or (groups and len(groups) != n):
        raise ValueError("groups must be one per calibration image")
    return [str(g) for g in groups]


def _checked_level(level) -> float:
    """The gate's level: 0 (off) or in (0, 1)."""
    level = float(level)
    if not 0 <= level < 1:
        raise InputError(f"the domain level must lie in [0, 1) (0 turns the gate off), got {level}")
    return level


def _checked_rule(rule: str) -> str:
    if rule not in RULES:
        raise InputError(f"unknown acceptance rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def fit_qc_model(
    rows: Sequence[dict[str, float]],
    dice_true: Sequence[float],
    alpha: float = 0.1,
    delta: float = 0.1,
    threshold: float = 0.8,
    method: str = DEFAULT_METHOD,
    groups: Sequence | None = None,
    samples: int = QC_SAMPLES,
    tta: str = QC_TTA,
    info: dict | None = None,
    rule: str = DEFAULT_RULE,
    tumour: Sequence[bool] | None = None,
    domain_level: float = DOMAIN_LEVEL,
) -> QCModel:
    """Fit a QC model on labelled calibration rows; the cut comes from out-of-fold predictions.

    Parameters
    ----------
    rows, dice_true : features (:func:`image_features`) and true Dice of calibration images.
    alpha, delta : accepted images have Dice > ``threshold`` with precision >= 1 - alpha, w.p. >= 1 - delta.
    method : a single-feature method (``SCORE_METHODS``), ``regressor`` (random forest), ``linear``
        (ridge), ``presence`` (:class:`PresenceModel`), ``blend`` (their mean, :class:`BlendModel`), or
        ``auto``: one of the forest and ``presence`` when its out-of-fold normalised AURC is better by
        more than a standard error, else ``blend`` (:func:`_select_method`; ``presence`` and ``blend``
        only when ``tumour`` is given).
    groups : e.g. patient ids, so cross-fitting never predicts an image from its own group.
    rule : ``ltt`` (the cut above) or ``fdr`` (conformal selection against the out-of-fold scores).
    tumour : whether each calibration image holds tumour (its mask is not empty).
    domain_level : the exchangeability gate's level (:mod:`.domain`; 0: off); ``groups`` also serve it.
    """
    _checked_rule(rule)
    _checked_level(domain_level)
    if method not in METHODS:
        raise InputError(f"unknown QC method {method!r}; choose one of {', '.join(METHODS)}")
    if len(rows) != len(dice_true) or len(rows) < 2:
        raise InputError("QC calibration needs at least 2 labelled images, one Dice per feature row")
    if groups is not None and len(groups) != len(rows):
        raise InputError("QC calibration: one group per image")
    y = np.asarray(dice_true, float)
    flags = None if tumour is None else np.asarray(tumour, bool)
    if flags is not None and len(flags) != len(y):
        raise InputError("QC calibration: one tumour flag per image")
    info = dict(info or {})
    if method == "auto":
        method, oof, choice = _select_method(rows, y, groups, flags)
        info["auto"] = {"selected": method, **choice}
    else:
        oof = _cross_fit_rows(method, rows, y, groups, flags)
    cut = conformal_cut(oof, y, threshold, alpha, delta)
    return QCModel(
        method,
        _feature_names(method, rows),
        [dict(r) for r in rows],
        y.tolist(),
        cut,
        threshold,
        alpha,
        delta,
        samples,
        tta,
        info,
        rule,
        oof.tolist(),
        [] if flags is None else flags.tolist(),
        [] if groups is None else [str(g) for g in groups],
        domain_level,
    )


def default_qc_model() -> QCModel:
    """The QC calibration shipped with the model (``weights/qc_calibration.json``)."""
    if not DEFAULT_QC_FILE.is_file():
        raise InputError(f"{DEFAULT_QC_FILE}: the shipped QC calibration is missing; pass calibration images")
    return QCModel.load(DEFAULT_QC_FILE)
