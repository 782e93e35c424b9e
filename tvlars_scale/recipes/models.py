"""Models: torchvision ResNet-18/34 and small CNNs for the offline datasets.

The paper trains torchvision's ResNets with their ImageNet stem (7x7 stride-2 conv + max-pool)
on 32x32 CIFAR-10 and 64x64 Tiny ImageNet (weights from scratch, torchvision's default init);
``stem="cifar"`` swaps in the usual 3x3 stride-1 conv without max-pool, which is far more
accurate on small images but ~10x the compute. Keep ``imagenet`` to compare with the paper.

``small-cnn`` keeps the input resolution through its first two blocks; ``small-cnn-s2`` has a
stride-2 first convolution, which makes it ~4x cheaper at 28x28 for the same parameters (at
width 16: 15 CPU-seconds per Fashion-MNIST epoch against 73). ``width`` sets both.

Every model exposes ``feature_dim`` and a ``head`` (the final ``nn.Linear``);
``backbone(model)`` replaces the head by ``nn.Identity`` for Barlow Twins.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ConfigError

__all__ = [
    "MODELS",
    "STEMS",
    "SmallCNN",
    "backbone",
    "build_model",
    "default_model",
    "model_options",
]

MODELS = ("small-cnn", "small-cnn-s2", "resnet18", "resnet34")
STEMS = ("imagenet", "cifar")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (``width``, 2x, 4x channels) and a linear head: ~97% on
    digits in seconds on a CPU. ``stride`` is the first convolution's (2: a quarter of the
    compute of the full-resolution blocks)."""

    DEFAULT_WIDTH = 32

    def __init__(
        self, num_classes: int, in_channels: int = 1, width: int = DEFAULT_WIDTH, stride: int = 1
    ) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width, stride),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 4 * width
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ResNet(nn.Module):
    """A torchvision ResNet whose ``fc`` is reachable as ``head``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = net.fc.in_features

    @property
    def head(self) -> nn.Module:
        return self.net.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    stem: str = "imagenet",
    width: int | None = None,
) -> nn.Module:
    """``small-cnn`` / ``small-cnn-s2`` (``width`` channels in the first block, default 32),
    ``resnet18`` or ``resnet34`` for ``in_channels``-channel images."""
    if name not in MODELS:
        raise ConfigError(f"invalid --model={name!r}; expected one of {', '.join(MODELS)}")
    if stem not in STEMS:
        raise ConfigError(f"invalid --stem={stem!r}; expected one of {', '.join(STEMS)}")
    if width is not None and not name.startswith("small-cnn"):
        raise ConfigError(
            f"--width={width} applies to --model small-cnn / small-cnn-s2 only, not {name}"
        )
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ConfigError(f"invalid --width={width!r}; expected an integer >= 1")
    if name.startswith("small-cnn"):
        return SmallCNN(
            num_classes,
            in_channels,
            width or SmallCNN.DEFAULT_WIDTH,
            2 if name == "small-cnn-s2" else 1,
        )
    import torchvision

    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if stem == "cifar" or in_channels != 3:
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return _ResNet(net)


def model_options(name: str, stem: str, width: int | None) -> dict[str, Any]:
    """The options that make ``build_model``'s network, resolved (what a checkpoint records)."""
    if name.startswith("small-cnn"):
        return {"--model": name, "--width": width or SmallCNN.DEFAULT_WIDTH}
    return {"--model": name, "--stem": stem}


def default_model(dataset: str) -> str:
    """The paper's pairing (ResNet-18 on CIFAR-10, ResNet-34 on Tiny ImageNet); else small-cnn."""
    return {"cifar10": "resnet18", "tiny-imagenet": "resnet34"}.get(dataset, "small-cnn")


def backbone(model: nn.Module) -> nn.Module:
    """The model without its classification head (outputs ``model.feature_dim`` features)."""
    if isinstance(model, _ResNet):
        model.net.fc = nn.Identity()
    else:
        model.head = nn.Identity()
    return model
