"""Tiny builders for CLI tests (``tiny_archs:NAME`` with ``RANKCUT_TRUST=tiny_archs``): families no one here wrote."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import VisionTransformer


def vit(num_classes: int = 10) -> nn.Module:
    """torchvision's ViT at 32x32 with 16x16 patches: 4 tokens plus the class token, one block.

    Its head starts at zero (torchvision's choice); a random one makes every output depend on the body.
    """
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight)
    return model


class CrossAttention(nn.Module):
    """Patch tokens attend to a learned query (cross-attention), beside a depthwise conv and a grouped conv."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.query = nn.Parameter(torch.randn(1, 1, 16))
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        tokens = self.grouped(self.depthwise(self.stem(x))).flatten(2).transpose(1, 2)
        query = self.query.expand(len(x), -1, -1) + 0  # not a bare view of a parameter: flop_counter trips on one
        pooled, _ = self.attention(query, tokens, tokens, need_weights=False)
        return self.head(pooled[:, 0])


def cross_attention(num_classes: int = 10) -> nn.Module:
    return CrossAttention(num_classes)
