"""Report figures (matplotlib, Agg backend): Dice curves and uncertainty overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_dice_curve(
    budgets: Sequence[int],
    dice: Sequence[float],
    path: Path,
    label: str = "uncertainty",
    estimates: Sequence[float | None] = (),
    intervals: Sequence[tuple[float, float] | None] = (),
    stop_budget: int | None = None,
    tissue: Sequence[float | None] = (),
    handed_over: tuple[str, float] | None = None,
) -> Path:
    """Test-set Dice against the number of annotated patches, with the in-session estimate where given and,
    where known (a demo), ``tissue``: the truth the estimate is about (the tissue not annotated yet);
    ``handed_over``: the model the session ends with (``("round 0", held-out Dice)``), at the last budget."""
    fig, ax = _figure(figsize=(4.8, 3.4))
    ax.plot(budgets, dice, "o-", label=f"{label}: held-out Dice")
    truth = [(b, t) for b, t in zip(budgets, tissue, strict=False) if t is not None]
    if truth:
        ax.plot(*zip(*truth, strict=True), "^:", color="tab:green", label="truth on the tissue audits come from")
    known = [(b, e, i) for b, e, i in zip(budgets, estimates, intervals, strict=False) if e is not None]
    if known:
        xs, ys, spans = zip(*known, strict=True)
        low = [y - span[0] for y, span in zip(ys, spans, strict=True)]
        high = [span[1] - y for y, span in zip(ys, spans, strict=True)]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="s--", capsize=3, label="in-session estimate (audit patches)")
    if stop_budget is not None:
        ax.axvline(stop_budget, color="grey", linestyle=":", label=f"stop signal at {stop_budget}")
    if handed_over is not None and budgets:
        which, value = handed_over
        ax.plot([budgets[-1]], [value], "*", color="black", markersize=11, label=f"handed over: {which} (held out)")
    ax.set_xlabel("annotated patches")
    ax.set_ylabel("Dice (pooled)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_curves(
    curves: dict[str, tuple[Sequence[int], Sequence[float], Sequence[float]]], path: Path, title: str
) -> Path:
    """Several mean ± sd Dice-vs-budget curves on one axis."""
    fig, ax = _figure(figsize=(5, 3.5))
    for label, (budgets, mean, std) in curves.items():
        mean, std = np.asarray(mean), np.asarray(std)
        ax.plot(budgets, mean, "o-", label=label)
        ax.fill_between(budgets, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="annotated patches", ylabel="Dice (pooled)", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pick_showcase(pairs: Sequence) -> object:
    """The tile with the most tumour boundary (partial tumour), for overlays."""
    return max(pairs, key=lambda p: min(p.mask.mean(), 1 - p.mask.mean()) if p.mask is not None else -1)


def plot_overlay(models: dict, pair, factor: float, samples: int, path: Path) -> Path:
    """One tile: the image with its ground-truth contour, then per model the uncertainty and prediction."""
    from .uncertainty import compute_uncertainty

    fig, axes = _figure(1, 1 + len(models), figsize=(3.2 * (1 + len(models)), 3.4))
    axes[0].imshow(pair.image)
    if pair.mask is not None and pair.mask.any():
        axes[0].contour(pair.mask, levels=[0.5], colors="lime", linewidths=1.2)
    axes[0].set_title(f"{pair.name[-18:]}\nground truth (green)", fontsize=8)
    for ax, (label, model) in zip(axes[1:], models.items(), strict=True):
        maps = compute_uncertainty(model, pair.image, samples=samples, factor=factor)
        ax.imshow(pair.image)
        shown = ax.imshow(maps.entropy, cmap="magma", alpha=0.6, vmin=0, vmax=float(np.log(2)))
        if maps.prediction.any():
            ax.contour(maps.prediction, levels=[0.5], colors="cyan", linewidths=1.2)
        ax.set_title(f"{label}: entropy + prediction (cyan)", fontsize=8)
    fig.colorbar(shown, ax=axes[-1], fraction=0.046, label="entropy (nats)")
    for ax in axes:
        ax.axis("off")
    return _save(fig, path)
