"""The segmentation network: a compact U-Net with a stochastic (MC-dropout) head.

The trunk is deterministic and dropout lives only in a small head, so MC sampling
runs the trunk once and the head T times in one batch (:meth:`UNet.sample`).
Weights are stored as safetensors with the model configuration in the metadata.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .io import MPP_HINT, REPLAY_MPP, InputError, MissingScaleError
from .wsi import plausible_mpp

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "uga_unet.safetensors"
RGB_MEAN = (0.70, 0.55, 0.70)
RGB_STD = (0.17, 0.20, 0.15)
MAX_DEPTH = 6
MAX_WIDTH = 2048  # widest layer a weights file may ask for (the shipped model's is 256)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and working scale of a network."""

    base: int = 16
    depth: int = 4
    dropout: float = 0.25
    input_mpp: float = 0.486  # µm per pixel the network sees (Camelyon level 0 at half size)

    def __post_init__(self) -> None:
        """Refuse an architecture no file of this project holds, before anything is allocated for it."""
        if not (isinstance(self.base, int) and isinstance(self.depth, int) and 1 <= self.depth <= MAX_DEPTH):
            raise ValueError(f"base and depth must be integers, depth 1-{MAX_DEPTH} (got {self.base}, {self.depth})")
        if not 1 <= self.base * 2**self.depth <= MAX_WIDTH:
            raise ValueError(f"base x 2^depth must be 1-{MAX_WIDTH} channels (got {self.base} x 2^{self.depth})")
        if not (0 <= self.dropout < 1 and plausible_mpp(self.input_mpp) is not None):
            raise ValueError(f"dropout must be in [0, 1) and input_mpp 0.01-20 (got {self.dropout}, {self.input_mpp})")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net trunk (deterministic) with a small stochastic head that keeps dropout for MC sampling.

    Batch norm is frozen at inference (eval mode); only the head's dropout is sampled, so
    :meth:`sample` runs the trunk once and the head T times in one batch.
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        widths = [config.base * 2**i for i in range(config.depth + 1)]
        self.down = nn.ModuleList([_block(3, widths[0])])
        self.down.extend(_block(widths[i], widths[i + 1]) for i in range(config.depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(config.depth))
        )
        self.dec = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(config.depth)))
        self.head_hidden = nn.Conv2d(widths[0], widths[0], 3, padding=1)
        self.head_out = nn.Conv2d(widths[0], 1, 1)
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(RGB_STD).view(1, 3, 1, 1))

    @property
    def multiple(self) -> int:
        """Input sides must be a multiple of this."""
        return 2**self.config.depth

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features at every level, finest first; ``x`` is float RGB in [0, 1], N x 3 x H x W."""
        feats = [self.down[0]((x - self.mean) / self.std)]
        for block in self.down[1:]:
            feats.append(block(F.max_pool2d(feats[-1], 2)))
        return feats

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic features N x base x H x W; ``x`` is float RGB in [0, 1], N x 3 x H x W."""
        feats = self.encode(x)
        x = feats[-1]
        for up, dec, skip in zip(self.up, self.dec, reversed(feats[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return x

    def head(self, features: torch.Tensor, dropout: bool) -> torch.Tensor:
        """Stochastic head: logits N x 1 x H x W, with dropout active when ``dropout`` is true."""
        p = self.config.dropout
        x = F.dropout2d(features, p, training=dropout)
        x = F.relu(self.head_hidden(x))
        return self.head_out(F.dropout2d(x, p, training=dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits N x 1 x H x W; dropout follows ``self.training``."""
        return self.head(self.trunk(x), self.training)

    def sample(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """MC-dropout probabilities S x N x H x W: trunk once, head ``samples`` times batched.

        ``samples <= 1`` gives the deterministic prediction (no dropout).
        """
        features = self.trunk(x)
        if samples <= 1:
            return torch.sigmoid(self.head(features, dropout=False))[:, 0][None]
        n = x.shape[0]
        probs = torch.sigmoid(self.head(features.repeat(samples, 1, 1, 1), dropout=True))[:, 0]
        return probs.view(samples, n, *probs.shape[-2:])

    def sample_naive(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """Reference MC-dropout: ``samples`` full forward passes (for benchmarks and tests)."""
        return torch.stack([torch.sigmoid(self.head(self.trunk(x), True))[:, 0] for _ in range(samples)])


def average_weights(models: list[UNet]) -> UNet:
    """One network whose weights are the mean of ``models``' (weight averaging along one fine-tuning
    path, as in SWA and model soups); integer buffers (batch-norm counters) from the first."""
    states = [m.state_dict() for m in models]
    averaged = {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(averaged)
    return soup.eval()


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device: CUDA was requested but is not available")
    return torch.device(preference)


def save_model(model: UNet, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save weights as safetensors (atomically), with the config and ``extra`` in the metadata."""
    from safetensors.torch import save

    from .io import atomic_write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"config": json.dumps(asdict(model.config)), "extra": json.dumps(extra or {})}
    atomic_write_bytes(path, save(state, metadata=metadata))
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``extra`` metadata stored with a weights file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("extra", "{}"))


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "auto") -> UNet:
    """Load a safetensors weights file (default: the shipped model), in eval mode on ``device``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            config = ModelConfig(**json.loads((handle.metadata() or {})["config"]))
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, KeyError, TypeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a napari-uga safetensors weights file ({exc})") from None
    model = UNet(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # torch lists the missing, unexpected and misshapen tensors, one per line
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise InputError(f"{path}: its tensors do not match its stated architecture ({first[0].strip()})") from None
    device = pick_device(device) if isinstance(device, str) else device
    return model.to(device).eval()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    soft_dice = (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return bce + (1 - soft_dice)


def working_factor(model: UNet, mpp: float | None = REPLAY_MPP) -> float:
    """Source-to-working resize factor for an image of ``mpp`` µm/px (omitted: the replay tiles' scale).

    ``None`` (images that do not say their scale, and no ``--mpp``) is a :class:`MissingScaleError`.
    """
    if mpp is None:
        raise MissingScaleError(f"no µm/px known for these images; {MPP_HINT}")
    scale = plausible_mpp(mpp)
    if scale is None:
        raise InputError(f"mpp: {float(mpp)} µm/px is outside the plausible range 0.01-20")
    return scale / model.config.input_mpp
