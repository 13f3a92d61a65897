"""Robust-training building blocks in plain PyTorch: models, PGD attacks, AT losses, EMA."""

from rayprune.robust.apgd import apgd_attack, apgd_targeted
from rayprune.robust.at_losses import pgd_at_loss, trades_loss
from rayprune.robust.attacks import (
    ATTACK_LOSSES,
    NORMS,
    AttackConfig,
    attack_objective,
    l2_128_255,
    linf_8_255,
    pgd_attack,
)
from rayprune.robust.ema import ModelEMA, unwrap_model
from rayprune.robust.evaluation import EvalConfig, robust_correct, summarize
from rayprune.robust.metrics import true_class_stats
from rayprune.robust.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MODEL_REGISTRY,
    EmbeddingClassifier,
    Normalize,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    count_parameters,
)
from rayprune.robust.modes import MODEL_MODES, temporary_mode

__all__ = [
    "ATTACK_LOSSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MODEL_MODES",
    "MODEL_REGISTRY",
    "NORMS",
    "AttackConfig",
    "EvalConfig",
    "EmbeddingClassifier",
    "ModelEMA",
    "Normalize",
    "PreActResNet18",
    "SmallCNN",
    "WideResNet",
    "apgd_attack",
    "apgd_targeted",
    "attack_objective",
    "build_model",
    "count_parameters",
    "l2_128_255",
    "linf_8_255",
    "pgd_at_loss",
    "pgd_attack",
    "robust_correct",
    "summarize",
    "temporary_mode",
    "trades_loss",
    "true_class_stats",
    "unwrap_model",
]
