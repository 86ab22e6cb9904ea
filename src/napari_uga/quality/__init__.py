"""Quality control without delineation: predict each image's Dice and decide Dice > threshold.

Pipeline (one call: :func:`run_qc`):

1. :func:`image_features` turns the MC-dropout x TTA samples of one image into a row of
   numbers: uncertainty aggregates (entropy / mutual information over the predicted
   foreground and its boundary band), agreement between samples (pairwise Dice, each sample
   against the consensus), soft-Dice confidence, spread of the predicted area, shape,
   appearance and texture statistics.
2. A :class:`QCModel` maps a row to a predicted Dice. ``method`` picks one feature (monotone
   isotonic calibration to Dice), a random-forest regressor over all features (the median of
   its trees: per-image Dice is bimodal), or ``presence`` (:class:`PresenceModel`: P(tumour)
   times the segmentation's overlap where there is tumour); ``auto`` keeps the clearly better
   learned one, or their mean (``blend``) when neither is.
   It is fitted on labelled calibration images; out-of-fold (cross-fitted) predictions are used
   for the acceptance rule, never in-sample ones.
3. The acceptance rule, ``rule="ltt"`` (:func:`conformal_cut`): a Learn-then-Test fixed-sequence
   binomial test, the lowest cut on predicted Dice such that, with probability >= 1 - delta, the
   accepted images have Dice > threshold with precision >= 1 - alpha. Or ``rule="fdr"``
   (:func:`conformal_selection`): conformal selection, whose accepted set has an expected share
   of failures (false discovery rate, an empty selection counting as none) <= alpha; it needs far
   fewer calibration images.

Models are stored as JSON (the calibration rows and settings); the regressor is refitted
deterministically at load time, so nothing is ever unpickled.

4. The exchangeability gate (:mod:`.domain`): both guarantees hold only for images like the
   calibration images, so an image is accepted only when a conformal test of its atypicality
   (texture, network-feature distance, scale signature) against the calibration images' own does not
   reject at ``domain_level`` (default 0.05); otherwise it goes to review, with the p-value.

Modules: :mod:`.features` (step 1), :mod:`.estimators` and :mod:`.auto` (step 2),
:mod:`.conformal` (step 3), :mod:`.domain` (step 4), :mod:`.calibration` (an annotation session's
audit patches as calibration), :mod:`.model` (:class:`QCModel`, fitting,
files), :mod:`.metrics` (failure-detection metrics) and :mod:`.report` (:func:`iter_qc`,
:func:`run_qc`, the report). Every name is importable from ``napari_uga.quality``.
"""

from .auto import _cross_fit_rows, _naurc_gap_se, _score, _select_method
from .calibration import SESSION_SCOPE, min_calibration, session_calibration
from .conformal import conformal_cut, conformal_selection, min_accepted
from .domain import (
    DOMAIN_LEVEL,
    DOMAIN_NEIGHBOURS,
    NETWORK_FEATURES,
    calibration_scores,
    domain_features,
    domain_p_values,
    domain_row,
    merge_p_values,
    min_domain_images,
)
from .estimators import (
    METHODS,
    PRESENCE_METHODS,
    SCORE_METHODS,
    BlendModel,
    PresenceModel,
    _estimator,
    _feature_names,
    _fit,
    _forest_median,
    _matrix,
    _predict,
    _presence_classifier,
    cross_fit,
)
from .features import (
    BAND_RADIUS,
    LBP_RADII,
    QC_FEATURES_VERSION,
    QC_SAMPLES,
    QC_TILE,
    QC_TTA,
    SCALE_PREFIX,
    TEXTURE_PREFIX,
    _appearance,
    _foreground_stain,
    _pairwise_dice,
    _region_mean,
    _shape_stats,
    _starts,
    _texture,
    _view_agreement,
    compute_features,
    image_features,
    image_patches,
    model_features,
    scale_signature,
)
from .metrics import aurc, naurc, qc_metrics, rc_curve
from .model import (
    _FITTED,
    DEFAULT_METHOD,
    DEFAULT_QC_FILE,
    DEFAULT_RULE,
    ESTIMATES,
    RULES,
    QCModel,
    _checked_flags,
    _checked_groups,
    _checked_level,
    _checked_rule,
    _fit_cached,
    _refit,
    _rescored,
    default_qc_model,
    fit_qc_model,
)
from .report import _acceptance_note, domain_note, iter_qc, method_reason, qc_report, refit_for, review_reason, run_qc

__all__ = [
    "BAND_RADIUS",
    "DOMAIN_LEVEL",
    "DOMAIN_NEIGHBOURS",
    "NETWORK_FEATURES",
    "DEFAULT_METHOD",
    "DEFAULT_QC_FILE",
    "DEFAULT_RULE",
    "ESTIMATES",
    "LBP_RADII",
    "METHODS",
    "PRESENCE_METHODS",
    "QC_FEATURES_VERSION",
    "QC_SAMPLES",
    "QC_TILE",
    "QC_TTA",
    "RULES",
    "SESSION_SCOPE",
    "SCORE_METHODS",
    "SCALE_PREFIX",
    "TEXTURE_PREFIX",
    "BlendModel",
    "PresenceModel",
    "QCModel",
    "aurc",
    "calibration_scores",
    "domain_features",
    "domain_note",
    "domain_p_values",
    "domain_row",
    "merge_p_values",
    "min_domain_images",
    "review_reason",
    "compute_features",
    "conformal_cut",
    "conformal_selection",
    "cross_fit",
    "default_qc_model",
    "fit_qc_model",
    "image_features",
    "image_patches",
    "iter_qc",
    "method_reason",
    "min_accepted",
    "min_calibration",
    "model_features",
    "scale_signature",
    "naurc",
    "qc_metrics",
    "qc_report",
    "rc_curve",
    "refit_for",
    "run_qc",
    "session_calibration",
    # private helpers that tests and benchmarks reach for
    "_FITTED",
    "_acceptance_note",
    "_appearance",
    "_checked_flags",
    "_checked_groups",
    "_checked_level",
    "_checked_rule",
    "_cross_fit_rows",
    "_estimator",
    "_feature_names",
    "_fit",
    "_fit_cached",
    "_forest_median",
    "_foreground_stain",
    "_matrix",
    "_naurc_gap_se",
    "_pairwise_dice",
    "_predict",
    "_presence_classifier",
    "_refit",
    "_region_mean",
    "_rescored",
    "_score",
    "_select_method",
    "_shape_stats",
    "_starts",
    "_texture",
    "_view_agreement",
]
