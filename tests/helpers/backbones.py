"""Backbones for export tests, built with local random weights (no downloads).

Each factory returns an nn.Module mapping [N, 3, H, W] images to features,
the contract of `smily model export --factory`.
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


def tiny_resnet() -> nn.Module:
    """A small ResNet-style network giving [N, 64, h, w] feature maps."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, stride=4, padding=2, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        _Block(32),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        _Block(64),
    )


class _LiteFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite1")

    def forward(self, x):
        return self.net.extract_features(x)


def efficientnet_lite1() -> nn.Module:
    """EfficientNet-Lite1's convolutional trunk: [N, 1280, h, w]."""
    return _LiteFeatures()


def save_random_weights(factory, path: str, seed: int = 0) -> nn.Module:
    """Initialise factory() from `seed`, save its state dict to `path`, return it in eval mode."""
    torch.manual_seed(seed)
    module = factory().eval()
    torch.save(module.state_dict(), path)
    return module
