"""Rank candidate patches for annotation: by uncertainty, at random, or for typicality and coverage.

Candidates lie on a half-overlapping grid inside each image, need enough tissue (from the
image alone), skip patches that overlap an existing annotation, and are picked greedily
with overlap suppression. Optional diversity spreads the picks over appearance clusters
and over predicted tumour / non-tumour, which matters where top-uncertainty patches are
redundant (organ shift).

The low-budget strategies follow the active-learning-on-a-budget literature (Hacohen et al.,
ICML 2022): ``typical`` is TypiClust (cluster labelled and unlabelled patches into
``|labelled| + k`` clusters, take the densest unlabelled member of each cluster with the fewest
labels, largest first), ``weighted`` is k-means++ seeding weighted by uncertainty (BADGE-like),
``coverage`` is ``typical`` until :data:`COVERAGE_SWITCH` patches are labelled, then
``uncertainty``, and ``mixed`` fills half of each batch (rounded up) with ``typical`` picks and
the rest with the most uncertain patches. ``random_first`` draws the first batch (nothing
labelled yet) uniformly at random from the tissue, an unbiased cover of it, and ranks by
uncertainty from then on: before any correction the starting model's entropy says least about a
new organ, whose errors are mostly confident misses. ``expected_error`` ranks by the chance that the
network's call on a patch (tumour or not) is wrong, as a texture classifier fitted on the
session's own corrections sees it: under a large shift most errors are confident misses, which
entropy cannot see (until the corrections hold tumour and tumour-free patches, uncertainty
alternating over the network's tumour / no-tumour calls).
Each proposal records the rule and the value behind it in ``reason``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .uncertainty import patch_score


def spread(items: Sequence, n: int) -> list:
    """Up to ``n`` items evenly spaced along ``items`` (all of them where there are no more than ``n``)."""
    if n <= 0 or not items:
        return []
    keep = np.unique(np.linspace(0, len(items) - 1, min(len(items), n)).round().astype(int))
    return [items[i] for i in keep]


@dataclass(frozen=True)
class Box:
    """A patch of one image, in full-resolution pixel coordinates."""

    image: str
    y: int
    x: int
    h: int
    w: int

    def overlaps(self, other: Box) -> bool:
        """True when both boxes are in the same image and share at least one pixel."""
        return (
            self.image == other.image
            and self.y < other.y + other.h
            and other.y < self.y + self.h
            and self.x < other.x + other.w
            and other.x < self.x + self.w
        )

    def crop(self, array: np.ndarray) -> np.ndarray:
        """This patch cut out of an image-sized array."""
        return array[self.y : self.y + self.h, self.x : self.x + self.w]


@dataclass(frozen=True)
class Proposal(Box):
    """A proposed patch with its rank (1 = first), uncertainty score and why it was proposed.

    ``audit``: drawn at random to measure the model; ``reason``: the rule and the value behind it.
    """

    score: float = 0.0
    rank: int = 0
    audit: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        """JSON-friendly form."""
        return asdict(self)

    @property
    def box(self) -> Box:
        """The patch without ranking information."""
        return Box(self.image, self.y, self.x, self.h, self.w)


@dataclass
class Candidate:
    """One scored grid patch and the features used for diversity, typicality and coverage."""

    box: Box
    score: float
    features: np.ndarray
    tumour: bool


def grid_boxes(name: str, shape: tuple[int, int], patch: int, subdivide: int = 1) -> list[Box]:
    """Half-overlapping grid of patches covering an image; an image smaller than a patch is one patch.

    ``subdivide``: boxes of ``1/subdivide`` of that side (sub-patches; on an image smaller than a
    patch, of the image's side).
    """
    h, w = shape
    ph, pw = max(1, min(patch, h) // subdivide), max(1, min(patch, w) // subdivide)
    ys = _starts(h, ph)
    xs = _starts(w, pw)
    return [Box(name, y, x, ph, pw) for y in ys for x in xs]


def _starts(length: int, size: int) -> list[int]:
    if length <= size:
        return [0]
    stride = max(1, size // 2)
    starts = list(range(0, length - size + 1, stride))
    return starts if starts[-1] == length - size else [*starts, length - size]


def appearance_features(rgb: np.ndarray) -> np.ndarray:
    """Cheap appearance descriptor of a patch: mean and spread of optical density per channel."""
    od = -np.log(np.clip(np.asarray(rgb, np.float32)[..., :3] / 255.0, 1e-3, 1.0)).reshape(-1, 3)
    return np.concatenate([od.mean(0), od.std(0), np.percentile(od, [25, 75], axis=0).ravel()])


def score_candidates(
    name: str,
    image: np.ndarray,
    uncertainty: np.ndarray,
    probability: np.ndarray,
    tissue: np.ndarray,
    patch: int = 256,
    how: str = "mean",
    min_tissue: float = 0.25,
    subdivide: int = 1,
) -> list[Candidate]:
    """Score every grid patch (or sub-patch, :func:`grid_boxes`) of one image that holds enough tissue."""
    out = []
    for box in grid_boxes(name, uncertainty.shape, patch, subdivide):
        tissue_patch = box.crop(tissue)
        if tissue_patch.mean() < min_tissue:
            continue
        values = box.crop(uncertainty)[tissue_patch]
        prob = box.crop(probability)
        out.append(
            Candidate(
                box=box,
                score=patch_score(values, how),
                features=np.concatenate([appearance_features(box.crop(image)), [prob.mean()]]),
                tumour=holds_tumour(prob >= 0.5),
            )
        )
    return out


STRATEGIES = ("uncertainty", "random", "typical", "weighted", "coverage", "mixed", "expected_error", "random_first")
TUMOUR_SHARE = 0.05  # a patch holds tumour when at least this share of it is marked (predicted or corrected)
APPEARANCE = slice(0, 12)  # the columns of Candidate.features that come from the image alone
COVERAGE_SWITCH = 10  # labelled patches after which ``coverage`` ranks by uncertainty
TYPICAL_NEIGHBOURS = 20  # TypiClust's k nearest neighbours for typicality


def select(
    candidates: Sequence[Candidate],
    k: int,
    exclude: Sequence[Box] = (),
    strategy: str = "uncertainty",
    rng: np.random.Generator | None = None,
    diversity: str = "none",
    known: Sequence[tuple[np.ndarray, bool]] = (),
    annotated: int | None = None,
) -> list[Proposal]:
    """Pick ``k`` non-overlapping patches, ranked; ``exclude`` holds already annotated boxes.

    Parameters
    ----------
    strategy : one of :data:`STRATEGIES`: ``uncertainty`` (highest score first), ``random``,
        ``typical``, ``weighted``, ``coverage``, ``mixed``, ``expected_error`` or ``random_first``
        (see the module docstring).
    diversity : for ``uncertainty`` (and ``random_first`` once something is labelled) only:
        ``none``; ``clusters`` (round-robin over k appearance clusters, most uncertain first in
        each); ``balanced`` (alternate predicted tumour / non-tumour); or ``clusters+balanced``.
    known : for ``expected_error``: per corrected patch, its :func:`appearance_features` and
        whether the correction holds tumour (:func:`holds_tumour`).
    annotated : patches annotated so far, for the rules that switch on it (``coverage``,
        ``random_first``); default ``len(exclude)`` (pass it where ``exclude`` also holds queued boxes).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} ({', '.join(STRATEGIES)})")
    rng = rng if rng is not None else np.random.default_rng(0)
    labelled = [c for c in candidates if any(c.box.overlaps(e) for e in exclude)]
    pool = [c for c in candidates if not any(c.box.overlaps(e) for e in exclude)]
    annotated = len(exclude) if annotated is None else annotated
    if strategy == "coverage":
        strategy = "typical" if annotated < COVERAGE_SWITCH else "uncertainty"
        tag = f"coverage ({strategy} below / from {COVERAGE_SWITCH} labelled): "
    elif strategy == "random_first":
        strategy, diversity = ("uncertainty", diversity) if annotated else ("random", "none")
        tag = "random_first (random while nothing is labelled, then uncertainty): "
    else:
        tag = ""
    if strategy == "typical":
        picked = _typical(pool, labelled, k, rng)
    elif strategy == "mixed":
        picked = _mixed(pool, labelled, k, rng)
    elif strategy == "weighted":
        picked = _weighted(pool, labelled, k, rng)
    elif strategy == "expected_error":
        picked = _expected_error(pool, known, k, rng)
    else:
        picked = _ranked(pool, k, strategy, rng, diversity)
    return [
        Proposal(**asdict(c.box), score=float(c.score), rank=i + 1, reason=tag + why)
        for i, (c, why) in enumerate(picked)
    ]


def diversity_for(strategy: str, diversity: str) -> str:
    """The loop's diversity setting as a strategy uses it: random draws ignore it."""
    return "none" if strategy == "random" else diversity


GROUP_NAMES = {"clusters": "appearance cluster", "balanced": "predicted class", "clusters+balanced": "cluster × class"}


def _free(cand: Candidate, picked: Sequence[tuple[Candidate, str]]) -> bool:
    return not any(cand.box.overlaps(p.box) for p, _ in picked)


def _ranked(pool: Sequence[Candidate], k: int, strategy: str, rng, diversity: str) -> list[tuple[Candidate, str]]:
    """Uncertainty or random order, optionally round-robin over diversity queues."""
    if strategy == "random":
        order = list(rng.permutation(len(pool)))
    else:
        order = list(np.argsort([-c.score for c in pool], kind="stable"))
    queues = _queues(pool, order, k, diversity, rng)
    picked: list[tuple[Candidate, str]] = []
    group_name = GROUP_NAMES.get(diversity) if len(queues) > 1 else None
    while len(picked) < k and any(queues):
        for group, queue in enumerate(queues, 1):
            while queue:
                cand = pool[queue.pop(0)]
                if _free(cand, picked):
                    why = "random: drawn at random" if strategy == "random" else f"uncertainty: {cand.score:.3g}"
                    if group_name and strategy != "random":
                        why += f", the most uncertain free patch of {group_name} {group} of {len(queues)}"
                    picked.append((cand, why))
                    break
            if len(picked) == k:
                break
    return picked


def feature_matrix(candidates: Sequence[Candidate]) -> np.ndarray:
    """Standardised appearance features (stain statistics and mean probability), one row per candidate."""
    x = np.stack([c.features for c in candidates]).astype(np.float64)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and of ``b`` (len(a) x len(b))."""
    return np.sqrt(np.maximum(((a[:, None] - b[None]) ** 2).sum(-1), 0))


def typicality(x: np.ndarray, neighbours: int = TYPICAL_NEIGHBOURS) -> np.ndarray:
    """TypiClust typicality: inverse mean distance to the ``neighbours`` nearest other rows."""
    if len(x) < 2:
        return np.ones(len(x))
    d = np.sort(_distance(x, x), 1)
    return 1.0 / (d[:, 1 : 1 + min(neighbours, len(x) - 1)].mean(1) + 1e-9)


def _typical(pool: Sequence[Candidate], labelled: Sequence[Candidate], k: int, rng) -> list[tuple[Candidate, str]]:
    """TypiClust: the most typical unlabelled member of the least-labelled, largest cluster, k times."""
    from sklearn.cluster import KMeans

    if not pool:
        return []
    x = feature_matrix([*pool, *labelled])
    n_clusters = max(1, min(len(x), len(labelled) + k))
    groups = KMeans(n_clusters, n_init=4, random_state=int(rng.integers(2**31))).fit_predict(x)
    counts = np.bincount(groups[len(pool) :], minlength=n_clusters)
    sizes = np.bincount(groups, minlength=n_clusters)
    typical = np.zeros(len(pool))
    for g in range(n_clusters):
        members = np.flatnonzero(groups == g)
        typical[members[members < len(pool)]] = typicality(x[members])[members < len(pool)]
    picked: list[tuple[Candidate, str]] = []
    open_ = set(range(n_clusters))
    while len(picked) < k and open_:
        g = min(open_, key=lambda c: (counts[c], -sizes[c], c))
        members = [i for i in np.flatnonzero(groups[: len(pool)] == g) if _free(pool[i], picked)]
        if not members:
            open_.discard(g)
            continue
        best = max(members, key=lambda i: (typical[i], -i))
        why = f"typical: densest unlabelled patch of a cluster of {sizes[g]} ({counts[g]} labelled)"
        picked.append((pool[best], f"{why}, typicality {typical[best]:.3g}"))
        counts[g] += 1
    return picked


def _mixed(pool: Sequence[Candidate], labelled: Sequence[Candidate], k: int, rng) -> list[tuple[Candidate, str]]:
    """Half the batch (rounded up) typical, the rest the most uncertain of what does not overlap them."""
    typical = _typical(pool, labelled, (k + 1) // 2, rng)
    free = [c for c in pool if _free(c, typical)]
    uncertain = _ranked(free, k - len(typical), "uncertainty", rng, "none")
    return [(c, f"mixed: {why}") for c, why in [*typical, *uncertain]]


def _weighted(pool: Sequence[Candidate], labelled: Sequence[Candidate], k: int, rng) -> list[tuple[Candidate, str]]:
    """k-means++ seeding weighted by uncertainty: draw with probability ∝ score x squared distance to the chosen."""
    if not pool:
        return []
    x = feature_matrix([*pool, *labelled])
    score = np.array([max(c.score, 0.0) for c in pool]) + 1e-12
    chosen = list(range(len(pool), len(x)))
    picked: list[tuple[Candidate, str]] = []
    while len(picked) < k:
        dist = _distance(x[: len(pool)], x[chosen]).min(1) if chosen else np.ones(len(pool))
        weight = score * dist**2 * np.array([_free(c, picked) for c in pool])
        if weight.sum() <= 0:
            break
        i = int(rng.choice(len(pool), p=weight / weight.sum()))
        why = f"weighted: uncertainty {pool[i].score:.3g} x distance {dist[i]:.3g} to the labelled and chosen"
        picked.append((pool[i], why))
        chosen.append(i)
    return picked


def nearest_candidate(candidates: Sequence[Candidate], box: Box) -> Candidate | None:
    """The candidate that shares the most pixels with ``box`` (``None`` where none overlaps it)."""
    same = [c for c in candidates if c.box.image == box.image]
    if not same:
        return None
    y, x, h, w = (np.array([getattr(c.box, f) for c in same]) for f in "yxhw")
    rows = np.clip(np.minimum(y + h, box.y + box.h) - np.maximum(y, box.y), 0, None)
    cols = np.clip(np.minimum(x + w, box.x + box.w) - np.maximum(x, box.x), 0, None)
    shared = rows * cols
    return same[int(shared.argmax())] if shared.max() > 0 else None


def holds_tumour(mask: np.ndarray) -> bool:
    """Whether a 0/1 mask marks tumour on at least :data:`TUMOUR_SHARE` of its pixels."""
    return bool((np.asarray(mask) > 0).mean() >= TUMOUR_SHARE)


def _expected_error(
    pool: Sequence[Candidate], known: Sequence[tuple[np.ndarray, bool]], k: int, rng
) -> list[tuple[Candidate, str]]:
    """The patches whose tumour call the network most likely gets wrong, as a texture model of the corrections sees it.

    A logistic regression on the image-only features of the corrected patches (balanced
    classes) gives each candidate's chance of holding tumour, ``p``; the chance that the
    network's call is wrong is ``p`` where it marks no tumour and ``1 - p`` where it does.
    Ties go to the more uncertain patch. Until the corrections hold both kinds, the most
    uncertain patches, alternating between those the network marks as tumour and those it does
    not, so that the first batch is likely to teach both.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    truth = np.array([t for _, t in known], bool)
    if not pool or truth.all() or not truth.any():
        fallback = _ranked(pool, k, "uncertainty", rng, "balanced")
        said = "expected_error: no texture model until the corrections hold patches with and without tumour"
        return [(c, f"{said}; {why}, alternating marked tumour / none") for c, why in fallback]
    seen = np.stack([f[APPEARANCE] for f, _ in known])
    texture = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000))
    texture.fit(seen, truth)
    p = texture.predict_proba(np.stack([c.features[APPEARANCE] for c in pool]))[:, 1]
    marked = np.array([c.tumour for c in pool])
    error = np.where(marked, 1 - p, p)
    order = np.lexsort(([-c.score for c in pool], -error))
    picked: list[tuple[Candidate, str]] = []
    for i in order:
        if len(picked) == k:
            break
        if _free(pool[i], picked):
            call = "marks tumour" if marked[i] else "marks none"
            why = f"expected_error: {error[i]:.2f} (texture of your corrections: tumour {p[i]:.2f}; the network {call})"
            picked.append((pool[i], why))
    return picked


def _queues(pool: Sequence[Candidate], order: list[int], k: int, diversity: str, rng) -> list[list[int]]:
    """Split the ranked order into queues that :func:`select` visits round-robin."""
    if diversity == "none" or len(pool) <= 1:
        return [list(order)]
    groups = np.zeros(len(pool), int)
    if "clusters" in diversity:
        groups = _cluster(pool, k, rng)
    if "balanced" in diversity:
        groups = groups * 2 + np.array([c.tumour for c in pool], int)
    if diversity not in ("clusters", "balanced", "clusters+balanced"):
        raise ValueError(f"unknown diversity {diversity!r}")
    labels = sorted(set(groups.tolist()), key=lambda g: next(i for i, j in enumerate(order) if groups[j] == g))
    return [[j for j in order if groups[j] == g] for g in labels]


def _cluster(pool: Sequence[Candidate], k: int, rng) -> np.ndarray:
    from sklearn.cluster import KMeans

    features = np.stack([c.features for c in pool])
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    n_clusters = max(1, min(k, len(pool)))
    return KMeans(n_clusters, n_init=4, random_state=int(rng.integers(2**31))).fit_predict(features)
