"""Width-agnostic forwards for two timm modules whose forward assumes attention width == input width.

timm 1.0.31's ``AttentionPoolLatent.forward`` (the MAP head of SigLIP-style ViTs) and
``EvaAttention.forward`` (EVA-02, DINOv3 on ``timm/models/eva.py``) reshape the attention output
to ``(B, N, C)`` where ``C`` is the width of their *input*. That holds for the dense model (heads x
head_dim == embed_dim) but not after pruning the residual width or heads independently. The
forwards below are timm's own, line for line, with that one reshape taking ``num_heads * head_dim``
instead of ``C``; they compute exactly what timm computes whenever the widths agree.

:func:`install` binds one of them to a module instance (``module.forward``), so the model keeps its
timm classes, its state dict and ``forward_features``/``forward_head``; families call it from
``set_dims``, which :func:`vitopt.arch.config.resize_to` also runs, so ``vitopt.load`` reinstalls
it. ``copy.deepcopy`` and pickling keep the bound method (a module-level function).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from torch import nn

__all__ = ["attention_pool_latent_forward", "eva_attention_forward", "install"]


def install(module: nn.Module, fn: Callable) -> None:
    """Bind ``fn`` as ``module.forward`` (an instance attribute; the class is unchanged)."""
    module.forward = types.MethodType(fn, module)


def attention_pool_latent_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``AttentionPoolLatent.forward`` with the attention output reshaped to ``num_heads * head_dim``.

    Shapes: x ``[B, N, C]`` (C = the pruned residual width) -> ``[B, out]`` (``pool='token'``/``'avg'``)
    or ``[B, latent_len, out]``; the pool's attention width ``num_heads * head_dim`` may differ from C.
    """
    B, N, C = x.shape
    if self.pos_embed is not None:
        x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
    q_latent = self.latent.expand(B, -1, -1)
    q = self.q(q_latent).reshape(B, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
    kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, attn_mask)
        attn = attn.softmax(dim=-1)
        x = attn @ v
    x = x.transpose(1, 2).reshape(B, self.latent_len, self.num_heads * self.head_dim)
    x = self.proj(x)
    x = self.proj_drop(x)
    if self.mlp is not None:
        x = x + self.mlp(self.norm(x))
    if self.pool == "token":
        x = x[:, 0]
    elif self.pool == "avg":
        x = x.mean(1)
    return x


def fused_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's fused q/k/v projection with separate ``q_bias`` / ``k_bias`` / ``v_bias`` (EVA, Swin v2).

    Shapes: x ``[B, N, C]`` -> ``[B, N, 3 * heads * head_dim]`` (layout ``(3) x (heads) x (head_dim)``).
    ``attn.qkv_bias_separate`` adds the bias after the matmul, as timm does; without ``q_bias`` the
    Linear's own bias (if any) is used.
    """
    if attn.q_bias is None:
        return attn.qkv(x)
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if getattr(attn, "qkv_bias_separate", False):
        return attn.qkv(x) + qkv_bias
    return F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)


def eva_attention_forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                          attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """timm ``EvaAttention.forward`` with the attention output reshaped to ``num_heads * head_dim``.

    Shapes: x ``[B, N, C]`` -> ``[B, N, C]``; rope ``[N - prefix, 2 * head_dim]`` (sin and cos, timm's
    ``apply_rot_embed_cat`` layout) or None. Rotary embedding is applied to q and k of the patch tokens
    as plain elementwise ops (it exports to ONNX as Mul/Add/Neg/Concat).
    """
    B, N, C = x.shape
    A = self.num_heads * self.head_dim
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        qkv = fused_qkv(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt = self.num_prefix_tokens
        half = getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0., is_causal=is_causal)
    else:
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn_bias = resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal)
        attn = maybe_add_mask(attn, attn_bias)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
    x = x.transpose(1, 2).reshape(B, N, A)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    x = self.proj_drop(x)
    return x
