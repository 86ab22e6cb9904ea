"""Training from scratch and fine-tuning: working scale, augmentation, patch sampling, steps.

:func:`train_steps` is a generator that yields progress events with fixed keys
(``stage, step, total, loss, val_loss, message``) and checks a :class:`CancelToken`
every step, so the CLI, the napari worker and the benchmarks drive the same code.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import torch
from torch.nn import functional as F

from .io import InputError
from .models import UNet, dice_bce_loss


class ProgressEvent(TypedDict):
    """One progress message of a long computation."""

    stage: str
    step: int
    total: int
    loss: float | None
    val_loss: float | None
    message: str


class CancelToken(threading.Event):
    """Set it from any thread to stop a running computation at its next step."""


def progress_event(stage: str, step: int, total: int, message: str = "", loss=None, val_loss=None) -> ProgressEvent:
    """Build a :class:`ProgressEvent`."""
    return ProgressEvent(stage=stage, step=step, total=total, loss=loss, val_loss=val_loss, message=message)


def resize_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize an H x W x 3 uint8 image by ``factor`` (area-averaging down, bilinear up)."""
    if abs(factor - 1.0) < 1e-3:
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    size = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
    mode = "area" if factor < 1 else "bilinear"
    out = F.interpolate(tensor, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 0/1 mask to ``size`` (H, W) by nearest neighbour on the soft average."""
    if mask.shape == tuple(size):
        return mask
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    out = F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
    return (out[0, 0].numpy() >= 0.5).astype(np.uint8)


def to_working_scale(image: np.ndarray, mask: np.ndarray | None, factor: float):
    """An image (and mask) resized to the network's working scale."""
    small = resize_image(image, factor)
    return small, (None if mask is None else resize_mask(mask, small.shape[:2]))


_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_HED /= np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED).astype(np.float32)


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """Dihedral flips/rotations, H&E stain jitter, brightness/contrast/saturation jitter."""
    k = int(rng.integers(4))
    image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    rgb = image.astype(np.float32) / 255.0
    od = -np.log(np.clip(rgb, 1e-3, 1.0))
    stains = od.reshape(-1, 3) @ _HED_INV
    stains = stains * rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength, 3) + rng.uniform(-0.05, 0.05, 3) * strength
    rgb = np.exp(-(stains @ _HED)).reshape(rgb.shape)
    grey = rgb.mean(axis=2, keepdims=True)
    rgb = grey + (rgb - grey) * rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength)
    rgb = (rgb - 0.5) * rng.uniform(1 - 0.2 * strength, 1 + 0.2 * strength) + 0.5 + rng.uniform(-0.1, 0.1) * strength
    return np.clip(rgb, 0, 1).astype(np.float32), np.ascontiguousarray(mask)


@dataclass
class PatchSampler:
    """Random crops (with optional augmentation) from images already at working scale."""

    images: Sequence[np.ndarray]
    masks: Sequence[np.ndarray]
    crop: int = 128
    augment: bool = True
    zoom: float = 0.2
    weights: Sequence[float] | None = None
    strength: float = 1.0
    _probs: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.images or len(self.images) != len(self.masks):
            raise InputError("training: need at least one image with a mask of the same count")
        weights = np.ones(len(self.images)) if self.weights is None else np.asarray(self.weights, float)
        self._probs = weights / weights.sum()

    def _crop(self, index: int, rng: np.random.Generator):
        image, mask = self.images[index], self.masks[index]
        zoom = float(np.exp(rng.uniform(-self.zoom, self.zoom))) if self.augment else 1.0
        side = max(16, round(self.crop * zoom))
        h, w = mask.shape
        if h < side or w < side:
            pad = ((0, max(0, side - h)), (0, max(0, side - w)))
            image = np.pad(image, (*pad, (0, 0)), mode="reflect")
            mask = np.pad(mask, pad, mode="reflect")
            h, w = mask.shape
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        image, mask = image[y : y + side, x : x + side], mask[y : y + side, x : x + side]
        if self.augment:
            rgb, mask = augment(image, mask, rng, self.strength)
        else:
            rgb = image.astype(np.float32) / 255.0
        return rgb, mask, side

    def batch(self, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch N x 3 x crop x crop (float, [0, 1]) with targets N x 1 x crop x crop."""
        xs, ys = [], []
        for index in rng.choice(len(self.images), size=size, p=self._probs):
            rgb, mask, side = self._crop(int(index), rng)
            x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
            y = torch.from_numpy(mask.astype(np.float32))[None, None]
            if side != self.crop:
                x = F.interpolate(x, size=(self.crop, self.crop), mode="bilinear", align_corners=False)
                y = (F.interpolate(y, size=(self.crop, self.crop), mode="bilinear", align_corners=False) >= 0.5).float()
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)


@dataclass
class MixedSampler:
    """Draws each batch element from one of several samplers with fixed shares (e.g. replay)."""

    samplers: Sequence[PatchSampler]
    shares: Sequence[float]

    def batch(self, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch split between the samplers by their shares (each gets at least one)."""
        counts = np.maximum(1, np.round(np.asarray(self.shares) / sum(self.shares) * size).astype(int))
        parts = [s.batch(int(c), rng) for s, c in zip(self.samplers, counts, strict=True)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_steps(
    model: UNet,
    sampler: PatchSampler | MixedSampler,
    steps: int,
    rng: np.random.Generator,
    lr: float = 1e-3,
    batch_size: int = 8,
    cancel: CancelToken | None = None,
    stage: str = "train",
    weight_decay: float = 1e-4,
    freeze_norm: bool = False,
    anchor: float = 0.0,
    anchor_to: Sequence[torch.Tensor] | None = None,
) -> Iterator[ProgressEvent]:
    """Train ``model`` in place for ``steps`` steps (AdamW, cosine schedule), yielding events.

    ``freeze_norm`` keeps batch-norm statistics fixed (for fine-tuning on a few patches);
    ``anchor`` > 0 adds ``anchor * sum((w - w0)^2)`` to the loss (L2-SP, Li et al. 2018), so
    fine-tuning stays near ``w0``: ``anchor_to`` (e.g. the model a session started from), else
    the weights this call starts from. The reported losses are the data loss alone.

    Returns (as the generator's value) the list of per-step losses; stops early and
    cleanly when ``cancel`` is set, leaving the model with the last completed step.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    model.train()
    if freeze_norm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    losses: list[float] = []
    reference = model.parameters() if anchor_to is None else anchor_to
    start = [p.detach().clone().to(device) for p in reference] if anchor > 0 else []
    try:
        for step in range(1, steps + 1):
            if cancel is not None and cancel.is_set():
                yield progress_event(stage, step - 1, steps, "cancelled")
                break
            x, y = sampler.batch(batch_size, rng)
            task = dice_bce_loss(model(x.to(device)), y.to(device))
            loss = task
            if start:
                pull = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start, strict=True))
                loss = task + anchor * pull
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(task.detach()))  # the data loss alone, comparable with or without an anchor
            yield progress_event(stage, step, steps, f"step {step}/{steps}", loss=losses[-1])
    finally:
        model.eval()
    return losses


def evaluate(model: UNet | Sequence[UNet], pairs, factor: float, tta: str = "none") -> dict:
    """Dice of the deterministic prediction (of one network or an ensemble, ``tta`` as in
    :func:`~napari_uga.uncertainty.compute_uncertainty`) over image/mask pairs.

    Returns ``{"dice_global", "dice_mean", "n_images", "per_image": [{"name", "dice"}]}``;
    ``dice_global`` pools all pixels of the set.
    """
    from .metrics import dice, dice_global
    from .uncertainty import predict_probability

    preds = [predict_probability(model, p.image, factor=factor, tta=tta) >= 0.5 for p in pairs]
    per_image = [{"name": p.name, "dice": dice(pred, p.mask)} for p, pred in zip(pairs, preds, strict=True)]
    return {
        "dice_global": dice_global(preds, [p.mask for p in pairs]),
        "dice_mean": float(np.mean([r["dice"] for r in per_image])) if per_image else float("nan"),
        "n_images": len(pairs),
        "per_image": per_image,
    }


def balanced_weights(images, masks, seed: int = 0, clusters: int = 4) -> np.ndarray:
    """Tile weights giving tumour and tumour-free tiles equal shares, split equally over appearance clusters.

    Rare tissue (a few stroma or fat tiles among many lymphocyte tiles) is drawn as often as
    the common kind of its class, so the network sees every tissue type the data holds.
    """
    from sklearn.cluster import KMeans

    from .selection import appearance_features

    has_tumour = np.array([bool(np.any(m)) for m in masks])
    features = np.stack([appearance_features(im) for im in images])
    weights = np.zeros(len(images))
    classes = np.unique(has_tumour)
    for value in classes:
        members = np.flatnonzero(has_tumour == value)
        scaled = (features[members] - features[members].mean(0)) / (features[members].std(0) + 1e-6)
        k = min(clusters, len(members))
        labels = KMeans(k, n_init=4, random_state=seed).fit_predict(scaled) if k > 1 else np.zeros(len(members), int)
        for label in np.unique(labels):
            group = members[labels == label]
            weights[group] = 1.0 / (len(classes) * len(np.unique(labels)) * len(group))
    return weights


def fit(
    model: UNet,
    train_pairs,
    val_pairs,
    steps: int,
    seed: int = 0,
    factor: float = 0.5,
    lr: float = 2e-3,
    batch_size: int = 8,
    crop: int = 128,
    val_every: int = 250,
    cancel: CancelToken | None = None,
    balance: bool = False,
    strength: float = 1.0,
) -> Iterator[ProgressEvent]:
    """Train from scratch with periodic validation; keeps the weights with the best validation Dice.

    ``balance`` draws tiles by :func:`balanced_weights` instead of uniformly; ``strength``
    scales the colour augmentation (see :func:`augment`).

    Returns ``{"val_dice": best, "step": best_step, "losses": [...]}`` as the generator's value.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    scaled = [to_working_scale(p.image, p.mask, factor) for p in train_pairs]
    weights = balanced_weights([p.image for p in train_pairs], [p.mask for p in train_pairs], seed) if balance else None
    images, masks = [s[0] for s in scaled], [s[1] for s in scaled]
    sampler = PatchSampler(images, masks, crop=crop, weights=weights, strength=strength)
    best = {"val_dice": -1.0, "step": 0, "state": None}
    losses: list[float] = []
    done = 0
    while done < steps and not (cancel is not None and cancel.is_set()):
        chunk = min(val_every, steps - done)
        chunk_steps = train_steps(model, sampler, chunk, rng, lr, batch_size, cancel)
        chunk_losses = yield from _offset_steps(chunk_steps, done, steps)
        losses.extend(chunk_losses)
        done += chunk
        lr *= 0.7
        score = evaluate(model, val_pairs, factor)["dice_global"] if val_pairs else -float(np.mean(chunk_losses[-50:]))
        yield progress_event("validate", done, steps, f"validation Dice {score:.3f}", val_loss=score)
        if score > best["val_dice"]:
            best = {"val_dice": score, "step": done, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {"val_dice": best["val_dice"], "step": best["step"], "losses": losses}


def _offset_steps(events: Iterator[ProgressEvent], offset: int, total: int):
    """Re-number the events of a sub-run so they count against the whole run."""
    while True:
        try:
            e = next(events)
        except StopIteration as stop:
            return stop.value
        yield progress_event(e["stage"], e["step"] + offset, total, e["message"], e["loss"], e["val_loss"])
