"""Image classifiers that expose their penultimate embedding.

Every model takes inputs in [0, 1] pixel space and normalises them itself, so attacks
can work in pixel space and the embedding used for score extrapolation is the same one
the classifier head reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2471, 0.2435, 0.2616)

_ACTIVATIONS: Mapping[str, type[nn.Module]] = MappingProxyType(
    {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU}
)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; mean/std are buffers so they follow ``.to()``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if len(mean) == 0 or len(mean) != len(std):
            raise ValueError(
                f"mean and std must be non-empty and of equal length; "
                f"got len(mean)={len(mean)}, len(std)={len(std)}"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0 for every channel; got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"channels={self.mean.shape[1]}"


def _default_stats(
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[Sequence[float], Sequence[float]]:
    """CIFAR-10 statistics for RGB inputs, 0.5/0.5 otherwise, unless given explicitly."""
    if mean is None:
        mean = CIFAR10_MEAN if in_channels == 3 else (0.5,) * in_channels
    if std is None:
        std = CIFAR10_STD if in_channels == 3 else (0.5,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean and std must have in_channels={in_channels} entries; "
            f"got {len(mean)} and {len(std)}"
        )
    return mean, std


def _check_common(num_classes: int, in_channels: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1; got {in_channels!r}")


class EmbeddingClassifier(nn.Module):
    """Base class: ``forward(x) == head(embed(x))`` with ``embed`` the pooled penultimate features.

    Subclasses implement :meth:`embed_normalized`, which receives already-normalised
    inputs and returns ``(B, embedding_dim)`` features (after the final activation and
    global pooling).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        embedding_dim: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _check_common(num_classes, in_channels)
        mean, std = _default_stats(in_channels, mean, std)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.normalize = Normalize(mean, std)
        self.head = nn.Linear(embedding_dim, num_classes)

    @property
    def embedding_dim(self) -> int:
        """Width of the embedding returned by :meth:`embed`."""
        return self.head.in_features

    def embed_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Features of already-normalised inputs ``z``; implemented by subclasses."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, D)`` of pixel-space inputs ``x`` in [0, 1]."""
        return self.embed_normalized(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and embedding from a single pass."""
        emb = self.embed(x)
        return self.head(emb), emb


def _init_conv_bn_linear(module: nn.Module) -> None:
    """Kaiming-normal convs, unit/zero BN, zero linear bias (standard ResNet init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- SmallCNN


class SmallCNN(EmbeddingClassifier):
    """Four conv-BN-ReLU layers (two max-pools), global average pooling, linear head.

    Cheap enough for tests and scoring-run experiments; any image size >= 8 works.
    Embedding dimension is ``2 * width``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an int >= 1; got {width!r}")
        super().__init__(num_classes, in_channels, 2 * width, mean, std)

        def block(cin: int, cout: int) -> list[nn.Module]:
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        _init_conv_bn_linear(self)

    def embed_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


# ----------------------------------------------------------------------- PreActResNet


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity mappings")."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + shortcut


class PreActResNet18(EmbeddingClassifier):
    """Pre-activation ResNet-18, CIFAR style (3x3 stem, no stem pooling), 512-d embedding.

    A final BN-ReLU precedes pooling (as in Rice et al. 2020), so the embedding is taken
    after the last activation. Adaptive pooling makes any image size >= 8 work.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, 512, mean, std)
        self.stem = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        _init_conv_bn_linear(self)

    def embed_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.pool(self.final(self.layers(self.stem(z))))


# ------------------------------------------------------------------------- WideResNet


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-act-conv3x3-BN-act-(dropout)-conv3x3 plus shortcut."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        activation: type[nn.Module],
        drop_rate: float,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = activation()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = activation()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        # With a projection shortcut the pre-activated tensor feeds both paths (Zagoruyko).
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + shortcut


class WideResNet(EmbeddingClassifier):
    """WRN-depth-width, CIFAR style (Zagoruyko & Komodakis 2016), embedding ``64 * width``.

    ``depth`` must be ``6n + 4`` (n >= 1 blocks per group). The default activation is
    SiLU/swish, as used by Rebuffi et al. and the pruning paper; ``activation="relu"``
    gives the original network. WRN-28-10 and WRN-70-16 are ``depth=28, width=10`` and
    ``depth=70, width=16``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 28,
        width: int = 10,
        activation: str = "silu",
        drop_rate: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"depth must be an int of the form 6n+4 with n >= 1 (10, 16, 22, 28, ...); got {depth!r}"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an int >= 1; got {width!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(_ACTIVATIONS)}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1); got {drop_rate!r}")
        channels = (16, 16 * width, 32 * width, 64 * width)
        super().__init__(num_classes, in_channels, channels[3], mean, std)
        self.depth, self.width, self.activation = depth, width, activation
        act = _ACTIVATIONS[activation]
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = channels[0]
        for planes, stride in zip(channels[1:], (1, 2, 2)):
            for i in range(n):
                block_stride = stride if i == 0 else 1
                blocks.append(WideBasicBlock(in_planes, planes, block_stride, act, drop_rate))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.final = nn.Sequential(nn.BatchNorm2d(channels[3]), act())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        _init_conv_bn_linear(self)

    def embed_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.pool(self.final(self.blocks(self.stem(z))))


# --------------------------------------------------------------------------- registry


def _fixed_wrn(depth: int, width: int) -> Callable[..., WideResNet]:
    """Constructor for a named WRN configuration that refuses to be re-sized by kwargs."""

    def build(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> WideResNet:
        clash = sorted({"depth", "width"} & kwargs.keys())
        if clash:
            raise ValueError(
                f"wrn_{depth}_{width} fixes depth and width; got {', '.join(clash)} "
                f"(use model 'wide_resnet' to choose them)"
            )
        return WideResNet(num_classes, in_channels, depth=depth, width=width, **kwargs)

    build.__name__ = build.__qualname__ = f"wrn_{depth}_{width}"
    build.__doc__ = f"WRN-{depth}-{width} (see :class:`WideResNet`)."
    return build


MODEL_REGISTRY: Mapping[str, Callable[..., EmbeddingClassifier]] = MappingProxyType(
    {
        "small_cnn": SmallCNN,
        "preact_resnet18": PreActResNet18,
        "wide_resnet": WideResNet,
        "wrn_28_10": _fixed_wrn(28, 10),
        "wrn_70_16": _fixed_wrn(70, 16),
    }
)


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> EmbeddingClassifier:
    """Build a registered model by name; extra kwargs go to its constructor."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_REGISTRY)}")
    _check_common(num_classes, in_channels)
    model = MODEL_REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    logger.debug("built %s (%d parameters)", name, count_parameters(model))
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
