"""Tests for rayprune.robust.models: embeddings, in-model normalisation, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayprune.robust.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MODEL_REGISTRY,
    EmbeddingClassifier,
    Normalize,
    WideResNet,
    build_model,
    count_parameters,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Small but registry-complete configurations (the big WRN aliases are checked on "meta").
TINY_CONFIGS: dict[str, dict] = {
    "small_cnn": {"width": 4},
    "preact_resnet18": {},
    "wide_resnet": {"depth": 10, "width": 1},
}


def _batch(seed: int, b: int = 2, c: int = 3, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g)


def _trained_bn_stats(model: nn.Module, seed: int) -> None:
    """Give BatchNorm non-trivial running statistics so eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_embedding_and_head_agree(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, **TINY_CONFIGS[name]).eval()
    _trained_bn_stats(model, 1)
    x = _batch(2)
    with torch.no_grad():
        logits = model(x)
        emb = model.embed(x)
        logits2, emb2 = model.forward_with_embedding(x)
        by_hand = emb @ model.head.weight.T + model.head.bias
    assert isinstance(model, EmbeddingClassifier)
    assert logits.shape == (2, 5)
    assert emb.shape == (2, model.embedding_dim)
    assert torch.equal(model.head(emb), logits)
    assert torch.equal(logits2, logits) and torch.equal(emb2, emb)
    torch.testing.assert_close(by_hand, logits)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_normalisation_happens_inside_the_model(name: str) -> None:
    """model(x) equals the same layers applied to (x - mean) / std computed by hand."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, **TINY_CONFIGS[name]).eval()
    _trained_bn_stats(model, 3)
    x = _batch(4)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(x)
        model.normalize = nn.Identity()
        by_hand = model((x - mean) / std)
    torch.testing.assert_close(by_hand, expected)


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18"])
def test_embedding_dim_independent_of_image_size(name: str) -> None:
    model = build_model(name, num_classes=4, **TINY_CONFIGS[name]).eval()
    for size in (8, 16):
        with torch.no_grad():
            emb = model.embed(_batch(5, size=size))
        assert emb.shape == (2, model.embedding_dim)


def test_embedding_is_after_final_activation() -> None:
    """ReLU-then-average pooling gives non-negative features for ReLU networks."""
    for name in ("small_cnn", "preact_resnet18"):
        model = build_model(name, num_classes=3, **TINY_CONFIGS[name]).eval()
        with torch.no_grad():
            emb = model.embed(_batch(6))
        assert (emb >= 0).all()
        assert (emb > 0).any()


def test_normalize_layer_matches_formula_and_validates() -> None:
    x = _batch(7, c=2)
    layer = Normalize(mean=(0.2, 0.7), std=(0.5, 0.25))
    expected = torch.stack([(x[:, 0] - 0.2) / 0.5, (x[:, 1] - 0.7) / 0.25], dim=1)
    torch.testing.assert_close(layer(x), expected)
    assert {n for n, _ in layer.named_buffers()} == {"mean", "std"}
    with pytest.raises(ValueError, match="std"):
        Normalize(mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="mean and std"):
        Normalize(mean=(0.5, 0.5), std=(0.5,))


def test_single_channel_inputs_use_half_mean_std() -> None:
    model = build_model("small_cnn", num_classes=2, in_channels=1, width=4).eval()
    assert torch.equal(model.normalize.mean.flatten(), torch.tensor([0.5]))
    assert torch.equal(model.normalize.std.flatten(), torch.tensor([0.5]))
    with torch.no_grad():
        assert model(_batch(8, c=1)).shape == (2, 2)


def test_wide_resnet_depth_activation_and_structure() -> None:
    for bad in (27, 4, 0, 28.0):
        with pytest.raises(ValueError, match="depth"):
            WideResNet(num_classes=10, depth=bad, width=1)
    with pytest.raises(ValueError, match="activation.*allowed: silu"):
        WideResNet(num_classes=10, depth=10, width=1, activation="gelu")
    silu = WideResNet(num_classes=10, depth=16, width=2)
    relu = WideResNet(num_classes=10, depth=16, width=2, activation="relu")
    assert any(isinstance(m, nn.SiLU) for m in silu.modules())
    assert not any(isinstance(m, nn.ReLU) for m in silu.modules())
    assert any(isinstance(m, nn.ReLU) for m in relu.modules())
    # depth 16 -> n = 2 blocks per group, 3 groups; embedding 64 * width.
    assert len(silu.blocks) == 6
    assert silu.embedding_dim == 128


def test_registry_errors() -> None:
    allowed = r"unknown model 'foo'; allowed: .*small_cnn.*preact_resnet18.*wide_resnet"
    with pytest.raises(ValueError, match=allowed):
        build_model("foo", num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", num_classes=1)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("small_cnn", num_classes=10, in_channels=0)
    with pytest.raises(ValueError, match="depth"):
        build_model("wrn_28_10", num_classes=10, depth=10)
    assert set(MODEL_REGISTRY) == {"small_cnn", "preact_resnet18", "wide_resnet", "wrn_28_10", "wrn_70_16"}
    with pytest.raises(TypeError):
        MODEL_REGISTRY["new"] = nn.Linear  # type: ignore[index]


def _param_count_formula_wrn(depth: int, width: int, num_classes: int) -> int:
    """Parameters of a CIFAR WRN counted from its layer shapes, written out independently."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    total = 3 * 16 * 9  # stem conv
    cin = 16
    for cout in widths[1:]:
        for _ in range(n):
            total += 2 * cin  # bn1
            total += cin * cout * 9  # conv1
            total += 2 * cout  # bn2
            total += cout * cout * 9  # conv2
            if cin != cout:
                total += cin * cout  # 1x1 shortcut
            cin = cout
    total += 2 * cin  # final bn
    total += cin * num_classes + num_classes  # head
    return total


@pytest.mark.parametrize(
    ("name", "published"),
    [("wrn_28_10", 36.5e6), ("wrn_70_16", 266.8e6), ("preact_resnet18", 11.17e6)],
)
def test_parameter_counts_match_published(name: str, published: float) -> None:
    with torch.device("meta"):  # no memory, no initialisation cost
        model = build_model(name, num_classes=10)
    n = count_parameters(model)
    assert abs(n - published) / published < 0.01
    if name.startswith("wrn"):
        depth, width = (int(s) for s in name.split("_")[1:])
        assert n == _param_count_formula_wrn(depth, width, 10)


def test_wrn_28_10_forward_tiny_input() -> None:
    torch.manual_seed(0)
    model = build_model("wrn_28_10", num_classes=10).eval()
    assert isinstance(model, WideResNet) and (model.depth, model.width) == (28, 10)
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(_batch(9, b=1))
    assert logits.shape == (1, 10)
    assert emb.shape == (1, 640) and model.embedding_dim == 640
    assert torch.isfinite(logits).all()


def test_count_parameters_trainable_only() -> None:
    model = build_model("small_cnn", num_classes=3, width=4)
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.head.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - (8 * 3 + 3)
