"""Rank candidate patches for annotation by aggregated uncertainty.

Candidates lie on a half-overlapping grid inside each image, need enough tissue (from the
image alone), skip patches that overlap an existing annotation, and are picked greedily
with overlap suppression. Optional diversity spreads the picks over appearance clusters
and over predicted tumour / non-tumour, which matters where top-uncertainty patches are
redundant (organ shift).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .uncertainty import patch_score


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
    """A proposed patch with its rank (1 = most uncertain) and score; ``audit``: drawn at random to measure the model."""

    score: float = 0.0
    rank: int = 0
    audit: bool = False

    def as_dict(self) -> dict:
        """JSON-friendly form."""
        return asdict(self)

    @property
    def box(self) -> Box:
        """The patch without ranking information."""
        return Box(self.image, self.y, self.x, self.h, self.w)


@dataclass
class Candidate:
    """One scored grid patch and the features used for diversity."""

    box: Box
    score: float
    features: np.ndarray
    tumour: bool


def grid_boxes(name: str, shape: tuple[int, int], patch: int) -> list[Box]:
    """Half-overlapping grid of patches covering an image; an image smaller than a patch is one patch."""
    h, w = shape
    ph, pw = min(patch, h), min(patch, w)
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
) -> list[Candidate]:
    """Score every grid patch of one image that holds enough tissue."""
    out = []
    for box in grid_boxes(name, uncertainty.shape, patch):
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
                tumour=bool((prob >= 0.5).mean() >= 0.05),
            )
        )
    return out


def select(
    candidates: Sequence[Candidate],
    k: int,
    exclude: Sequence[Box] = (),
    strategy: str = "uncertainty",
    rng: np.random.Generator | None = None,
    diversity: str = "none",
) -> list[Proposal]:
    """Pick ``k`` non-overlapping patches, ranked; ``exclude`` holds already annotated boxes.

    Parameters
    ----------
    strategy : ``uncertainty`` (highest score first) or ``random``.
    diversity : ``none``; ``clusters`` (round-robin over k appearance clusters, most uncertain
        first in each); ``balanced`` (alternate predicted tumour / non-tumour); or
        ``clusters+balanced``.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    pool = [c for c in candidates if not any(c.box.overlaps(e) for e in exclude)]
    if strategy == "random":
        order = list(rng.permutation(len(pool)))
    elif strategy == "uncertainty":
        order = list(np.argsort([-c.score for c in pool], kind="stable"))
    else:
        raise ValueError(f"unknown strategy {strategy!r} (uncertainty or random)")
    queues = _queues(pool, order, k, diversity, rng)
    picked: list[Candidate] = []
    while len(picked) < k and any(queues):
        for queue in queues:
            while queue:
                cand = pool[queue.pop(0)]
                if not any(cand.box.overlaps(p.box) for p in picked):
                    picked.append(cand)
                    break
            if len(picked) == k:
                break
    return [Proposal(**asdict(c.box), score=float(c.score), rank=i + 1) for i, c in enumerate(picked)]


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
