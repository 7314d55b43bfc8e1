"""Sparse-then-Prune attention regularizer: value against an explicit attention computation, blocks, cleanup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitopt.errors import VitoptError
from vitopt.sparsity.attention import AttentionSparsityReg, attention_penalty, attention_reg_callbacks
from vitopt.train.loop import TrainHParams, fit

KW = dict(img_size=16, patch_size=4, in_chans=1, num_classes=4, depth=3, embed_dim=32, num_heads=4)


def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **KW)


def explicit_maps(model, x):
    """Attention maps of every block, computed by hand from qkv (reference)."""
    maps = []
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks:
            a = blk.attn
            B, N, _ = h.shape
            qkv = a.qkv(blk.norm1(h)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            maps.append(((q * a.scale) @ k.transpose(-2, -1)).softmax(-1))
            h = blk(h)
    return maps


@pytest.mark.parametrize("blocks", ["all", "last"])
def test_penalty_matches_explicit_attention(blocks):
    model = tiny().train()
    x = torch.randn(2, 1, 16, 16)
    maps = explicit_maps(model, x)
    reg = AttentionSparsityReg(model, weight=0.5, blocks=blocks)
    model(x)
    got = reg.loss()
    chosen = maps if blocks == "all" else maps[-1:]
    expect = torch.log1p(torch.cat([m.flatten() for m in chosen]).square()).mean()
    assert got.item() == pytest.approx(0.5 * expect.item(), rel=1e-5)
    assert attention_penalty(maps[-1]).item() == pytest.approx(torch.log1p(maps[-1] ** 2).mean().item(), rel=1e-6)
    assert reg.loss() is None                                        # consumed
    model.eval()
    model(x)
    assert reg.loss() is None                                        # eval forwards are not collected
    reg.close()
    assert all(blk.attn.fused_attn for blk in model.blocks)


def test_penalty_gradient_matches_explicit_and_fit_integration():
    model = tiny().train()
    x = torch.randn(4, 1, 16, 16)
    with torch.enable_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        maps = []
        for blk in model.blocks:
            a = blk.attn
            B, N, _ = h.shape
            qkv = a.qkv(blk.norm1(h)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
            maps.append(((qkv[0] * a.scale) @ qkv[1].transpose(-2, -1)).softmax(-1))
            h = blk(h)
        ref = torch.log1p(torch.cat([m.flatten() for m in maps]).square()).mean()
        w = model.blocks[0].attn.qkv.weight
        (g_ref,) = torch.autograd.grad(ref, w)
    with attention_reg_callbacks(SimpleNamespace(weight=1.0, blocks="all"), model) as cbs:
        model(x)
        (g,) = torch.autograd.grad(cbs[0].loss(), w)
    assert g.abs().max() > 0
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-9)
    g_data = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 16, 16, generator=g_data),
                                    torch.randint(0, 4, (32,), generator=g_data)), batch_size=16)
    with attention_reg_callbacks(SimpleNamespace(weight=5.0, blocks="last"), model) as cbs:
        assert model.blocks[0].attn.fused_attn and not model.blocks[-1].attn.fused_attn
        hist = fit(model, data, None, TrainHParams(epochs=1, lr=1e-3, warmup_epochs=0), callbacks=cbs)
    assert model.blocks[-1].attn.fused_attn                          # restored on exit
    assert hist[-1]["train_extra_loss"] == pytest.approx(5.0 * hist[-1]["attn_sparsity"], rel=0.2)


def test_bad_options():
    with pytest.raises(VitoptError):
        AttentionSparsityReg(tiny(), weight=0.0)
    with pytest.raises(VitoptError):
        AttentionSparsityReg(torch.nn.Linear(2, 2))
