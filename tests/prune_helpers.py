"""Shared fixtures of the pruning-loop tests: a tiny DeiT on 16 px single-channel images and random batches."""

from __future__ import annotations

import timm
import torch


def tiny_deit(seed: int = 0) -> torch.nn.Module:
    """DeiT with width 32, depth 2, 2 heads, MLP 128, 10 classes, for ``[B, 1, 16, 16]`` images (eval mode)."""
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                             num_heads=2, mlp_ratio=4, num_classes=10).eval()


def noise_batches(n: int, batch: int) -> list:
    """``n`` seeded ``(images [batch, 1, 16, 16], zero labels [batch])`` batches."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 1, 16, 16, generator=g), torch.zeros(batch, dtype=torch.long)) for _ in range(n)]
