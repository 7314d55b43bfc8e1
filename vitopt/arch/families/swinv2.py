"""Structure of timm ``SwinTransformerV2``: post-norm blocks, cosine attention, continuous position bias.

Swin v2 (Liu et al. 2022, "Swin Transformer V2: Scaling Up Capacity and Resolution", arXiv 2111.09883)
changes three things in the block that matter for pruning:

* **post-norm** residual branches, ``x + norm1(attn(x))`` and ``x + norm2(mlp(x))``: the LayerNorms act
  on the branch outputs (they normalise over the stage's width, so they are renormalised under the
  stage's ``embed`` group when it is masked);
* **cosine attention** with a learnable per-head temperature ``logit_scale`` ``[heads, 1, 1]``: there
  is no 1/sqrt(head_dim) scale to keep;
* a **continuous relative position bias**: a small MLP ``cpb_mlp`` (Linear(2, 512), ReLU,
  Linear(512, heads, bias=False)) maps the log-spaced relative coordinates of the window to one bias
  per head; its last layer's rows go with the heads.

Groups, named after the timm module paths:

* ``layers.s.embed`` - the residual width of stage s: patch_embed.proj out and patch_embed.norm
  (s = 0) or downsample.reduction out and downsample.norm (s > 0; Swin v2's PatchMerging reduces
  ``4 x C_{s-1} -> C_s`` and then normalises, so its norm is over the new width); every block's qkv in,
  proj out, norm1/norm2, fc1 in, fc2 out; the next stage's reduction in (laid out ``(4) x (C)``); the
  final norm and head.fc in (last stage).
* ``layers.s.blocks.j.heads`` - heads of one block: qkv rows ``(3) x (heads) x (head_dim)``, ``q_bias``
  / ``v_bias`` ``(heads) x (head_dim)``, ``logit_scale`` rows, ``cpb_mlp.2.weight`` rows, proj columns.
  Masked at the proj input. After surgery the block's attention width (heads x head_dim) differs
  from the stage width, which timm's ``WindowAttention.forward`` does not allow (it reshapes the
  attention output to the *input* width); :meth:`SwinV2Family.set_dims` then switches those modules to
  :class:`PrunedWindowAttention`, a subclass of timm's class whose forward is timm's with that one
  reshape made width-agnostic (the same design as PVTv2's ``PrunedSRAttention``; the model stays a
  ``SwinTransformerV2`` with timm's parameter names, and ``load_pruned`` re-applies the switch).
* ``layers.s.blocks.j.mlp`` - MLP hidden neurons (fc1 rows, fc2 columns).
* ``layers.s.blocks`` - depth of stage s: one unit per block (``Structure.units``), masked at the block's
  ``drop_path1`` / ``drop_path2`` outputs (after the post-norms: zero there makes the block the
  identity). Each block keeps its own shift and attention mask, so removing one is exact.

Not a group: ``head_dim``. timm's Swin v2 attention applies ``qkv.weight`` with ``F.linear`` when
``q_bias`` is set (it never calls the ``qkv`` module), so a per-dim mask has no module to act on; heads,
mlp, embed and blocks cover the model.

``Group.block`` counts blocks over the whole model (stage 0 first).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.swin_transformer_v2 import (
    PatchMerging,
    SwinTransformerV2,
    SwinTransformerV2Block,
    WindowAttention,
)
from torch import nn

from vitopt.arch.builder import StructureBuilder, is_layernorm
from vitopt.arch.forwards import fused_qkv
from vitopt.arch.structure import Structure, removed_units, skeleton_depth
from vitopt.errors import VitoptError

__all__ = ["SwinV2Family", "PrunedWindowAttention", "window_attention_forward"]


def _stage_embed(model: nn.Module, s: int) -> int:
    if s == 0:
        return int(model.patch_embed.proj.out_channels)
    return int(model.layers[s].downsample.reduction.out_features)


def _attn_width(attn: nn.Module) -> int:
    return int(attn.qkv.out_features) // 3


def window_attention_forward(self: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm 1.0's Swin v2 ``WindowAttention.forward`` with the attention output reshaped to ``heads x head_dim``
    instead of the input width ``C``, so a block whose heads were pruned still runs.

    Same operations in the same order as timm (cosine attention, clamped ``logit_scale``, ``16 *
    sigmoid`` of the continuous position bias, window mask, softmax, ``attn @ v``, proj).

    Args:
        x: ``[windows * B, N, C]`` tokens of each window.
        mask: ``[windows, N, N]`` shifted-window mask or None.

    Returns:
        ``[windows * B, N, C]``.
    """
    B_, N, _ = x.shape
    qkv = fused_qkv(self, x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
    attn = attn * logit_scale
    table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
    bias = table[self.relative_position_index.view(-1)].view(
        self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1)
    bias = 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.softmax(attn)
    attn = self.attn_drop(attn)
    x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
    x = self.proj(x)
    return self.proj_drop(x)


class PrunedWindowAttention(WindowAttention):
    """timm Swin v2 window attention whose inner width (heads x head_dim) may differ from its input width.

    Same parameters, buffers and computation as ``timm.models.swin_transformer_v2.WindowAttention``;
    :meth:`forward` is :func:`window_attention_forward`. Input ``[windows * B, N, C]``, output the same.
    """

    forward = window_attention_forward


class SwinV2Family:
    """The family of timm ``SwinTransformerV2`` models: ``swinv2_*`` (cosine attention, continuous position bias)."""

    name = "swinv2"
    description = ("timm SwinTransformerV2: swinv2_tiny/small/base/large_*, post-norm blocks, cosine attention, "
                   "continuous position bias (groups embed, heads, mlp, blocks)")

    # ----------------------------------------------------------------------------------------- checks
    def matches(self, model: nn.Module) -> bool:
        """True for timm ``SwinTransformerV2`` and subclasses."""
        return isinstance(model, SwinTransformerV2)

    def check_supported(self, model: nn.Module) -> None:
        """Raise VitoptError naming the first feature of ``model`` the Swin v2 structure cannot prune."""
        if not isinstance(model.patch_embed.proj, nn.Conv2d):
            raise VitoptError("the Swin v2 model's patch_embed.proj must be a Conv2d (timm's PatchEmbed).")
        if not is_layernorm(model.norm):
            raise VitoptError(f"the Swin v2 model's final norm is a {type(model.norm).__name__}; only LayerNorm is "
                              "supported.")
        for s, stage in enumerate(model.layers):
            if s > 0 and not (isinstance(stage.downsample, PatchMerging) and is_layernorm(stage.downsample.norm)):
                raise VitoptError(f"layers.{s}.downsample must be timm's Swin v2 PatchMerging with a LayerNorm.")
            if s == 0 and not isinstance(stage.downsample, nn.Identity):
                raise VitoptError("layers.0.downsample is set; a Swin v2 whose first stage downsamples is not "
                                  "supported.")
            for j, blk in enumerate(stage.blocks):
                where = f"layers.{s}.blocks.{j}"
                if type(blk) is not SwinTransformerV2Block or type(blk.attn) not in (WindowAttention,
                                                                                      PrunedWindowAttention):
                    raise VitoptError(f"{where} is a {type(blk).__name__}; only timm's SwinTransformerV2Block with "
                                      "its WindowAttention is supported.")
                if getattr(blk.attn, "qkv_bias_separate", False):
                    raise VitoptError(f"{where}.attn has qkv_bias_separate=True; only the fused q/v bias is supported.")
                if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
                    raise VitoptError(f"{where}.mlp is a {type(blk.mlp).__name__}; only timm's two-layer Mlp is "
                                      "supported.")
                for norm in ("norm1", "norm2"):
                    if not is_layernorm(getattr(blk, norm)):
                        raise VitoptError(f"{where}.{norm} is a {type(getattr(blk, norm)).__name__}; only LayerNorm "
                                          "post-norms are supported.")

    # -------------------------------------------------------------------------------------- structure
    def read_dims(self, model: nn.Module) -> dict[str, int]:
        """Current dims: per stage ``layers.s.embed`` and ``layers.s.blocks`` (depth), per block
        ``layers.s.blocks.j.{heads,mlp}``."""
        dims: dict[str, int] = {}
        for s, stage in enumerate(model.layers):
            dims[f"layers.{s}.embed"] = _stage_embed(model, s)
            dims[f"layers.{s}.blocks"] = len(stage.blocks)
            for j, blk in enumerate(stage.blocks):
                p = f"layers.{s}.blocks.{j}"
                dims[f"{p}.heads"] = int(blk.attn.num_heads)
                dims[f"{p}.mlp"] = int(blk.mlp.fc1.out_features)
        return dims

    def structure(self, model: nn.Module) -> Structure:
        """Build the :class:`Structure` of ``model`` at its current dims.

        Raises:
            VitoptError: the model uses a variant :meth:`check_supported` rejects.
        """
        self.check_supported(model)
        dims = self.read_dims(model)
        b = StructureBuilder(self.name, model)
        prev = None
        block = 0
        for s, stage in enumerate(model.layers):
            E = b.group(f"layers.{s}.embed", "embed", dims[f"layers.{s}.embed"], stage=s)
            depth = f"layers.{s}.blocks"
            b.depth(depth, dims[depth], stage=s)
            if s == 0:
                b.patch_embed("patch_embed", E)
                b.choke(E[0], "patch_embed", "output", E)
            else:
                d = f"layers.{s}.downsample"
                b.lay(f"{d}.reduction.weight", 1, (None, 4), prev)
                b.lay(f"{d}.reduction.weight", 0, E)
                b.ln(f"{d}.norm", E)
                b.choke(E[0], d, "output", E)
            for j, blk in enumerate(stage.blocks):
                p = f"{depth}.{j}"
                H = b.group(f"{p}.heads", "heads", dims[f"{p}.heads"], block=block, stage=s)
                hd = (None, _attn_width(blk.attn) // dims[f"{p}.heads"])
                M = b.group(f"{p}.mlp", "mlp", dims[f"{p}.mlp"], block=block, stage=s)
                b.lay(f"{p}.attn.qkv.weight", 0, (None, 3), H, hd)
                b.lay(f"{p}.attn.qkv.weight", 1, E)
                b.lay(f"{p}.attn.q_bias", 0, H, hd)
                b.lay(f"{p}.attn.v_bias", 0, H, hd)
                b.lay(f"{p}.attn.logit_scale", 0, H)
                b.lay(f"{p}.attn.cpb_mlp.2.weight", 0, H)
                b.lay(f"{p}.attn.proj.weight", 1, H, hd)
                b.lay(f"{p}.attn.proj.weight", 0, E)
                b.lay(f"{p}.attn.proj.bias", 0, E)
                b.ln(f"{p}.norm1", E)
                b.ln(f"{p}.norm2", E)
                b.mlp(f"{p}.mlp", E, M)
                b.choke(H[0], f"{p}.attn.proj", "input", H, hd)
                b.choke(M[0], f"{p}.mlp.fc2", "input", M)
                b.choke(E[0], f"{p}.attn.proj", "output", E)
                b.choke(E[0], f"{p}.mlp.fc2", "output", E)
                b.unit_choke(depth, f"{p}.drop_path1", "output", j)
                b.unit_choke(depth, f"{p}.drop_path2", "output", j)
                block += 1
            prev = E
        b.ln("norm", prev)
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            b.lay("head.fc.weight", 1, prev)
        return b.build()

    # ----------------------------------------------------------------------------- attribute updates
    def set_dims(self, model: nn.Module, dims: dict[str, int]) -> None:
        """Update module attributes after the parameters were resized to ``dims``.

        Sets ``embed_dim`` (stage 0), ``num_features`` / ``head_hidden_size`` (last stage), each
        ``feature_info[s]["num_chs"]``, the head's ``in_features`` / ``num_features``, every LayerNorm's
        ``normalized_shape``, PatchMerging ``dim`` / ``out_dim``, stage / block / attention ``dim``, per
        block ``attn.num_heads`` and the zero ``k_bias`` buffer at the new attention width, and switches
        each attention module to :class:`PrunedWindowAttention` where its width no longer equals the stage
        width (and back to timm's class where it does).
        """
        widths = [dims[f"layers.{s}.embed"] for s in range(len(model.layers))]
        model.embed_dim = widths[0]
        model.num_features = model.head_hidden_size = widths[-1]
        for s, info in enumerate(model.feature_info[: len(widths)]):
            info["num_chs"] = widths[s]
        model.patch_embed.proj.out_channels = widths[0]
        for mod in model.modules():
            if is_layernorm(mod) and mod.weight is not None:
                mod.normalized_shape = (mod.weight.shape[0],)
        model.head.in_features = model.head.num_features = widths[-1]
        if isinstance(getattr(model.head, "fc", None), nn.Linear):
            model.head.fc.in_features = widths[-1]
        for s, stage in enumerate(model.layers):
            D = widths[s]
            stage.dim = widths[max(s - 1, 0)]
            if s > 0:
                ds = stage.downsample
                ds.dim, ds.out_dim = widths[s - 1], D
                ds.reduction.in_features, ds.reduction.out_features = 4 * widths[s - 1], D
            for j, blk in enumerate(stage.blocks):
                p = f"layers.{s}.blocks.{j}"
                h, m = dims[f"{p}.heads"], dims[f"{p}.mlp"]
                attn = blk.attn
                A = int(attn.qkv.weight.shape[0]) // 3
                blk.dim = attn.dim = D
                attn.num_heads = h
                attn.cpb_mlp[2].out_features = h
                attn.qkv.in_features, attn.qkv.out_features = D, 3 * A
                attn.proj.in_features, attn.proj.out_features = A, D
                if attn.k_bias is not None and attn.k_bias.shape[0] != A:
                    attn.register_buffer("k_bias", torch.zeros(A, dtype=attn.k_bias.dtype, device=attn.k_bias.device),
                                         persistent=False)
                attn.__class__ = WindowAttention if A == D else PrunedWindowAttention
                blk.mlp.fc1.in_features, blk.mlp.fc1.out_features = D, m
                blk.mlp.fc2.in_features, blk.mlp.fc2.out_features = m, D

    def fold_before_surgery(self, model: nn.Module, new_dims: dict[str, int]) -> None:
        """Nothing to fold: cosine attention has no 1/sqrt(head_dim) scale, and head_dim is not pruned."""

    # ------------------------------------------------------------------------------------------ cost
    def constructor_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """``timm.create_model`` kwargs of a skeleton that :func:`vitopt.arch.config.resize_to` can cut to this model.

        Input size, channels, classes, patch and window size, q/v bias, and per stage the depth and a
        width / head count whose head_dim equals the model's (head_dim is not a group, so the skeleton must
        have it: ``embed_dim`` = stage 0's head_dim and ``num_heads[s] = embed_dim * 2**s / head_dim_s``;
        the stored dims then set every width and head count). A depth-pruned stage's depth is that of the
        skeleton holding its kept blocks at their original indices (:func:`~vitopt.arch.structure.skeleton_depth`),
        so each block's window shift comes back. :func:`vitopt.arch.config.save` checks the rebuild and asks
        for explicit kwargs when these are not enough.
        """
        pe = model.patch_embed
        first = [stage.blocks[0].attn for stage in model.layers]
        head_dims = [_attn_width(a) // int(a.num_heads) for a in first]
        base = head_dims[0]
        heads = [max(1, base * 2 ** s // d) for s, d in enumerate(head_dims)]
        size = getattr(pe, "img_size", None)
        out: dict[str, Any] = {"in_chans": int(pe.proj.in_channels), "num_classes": int(model.num_classes),
                               "patch_size": int(pe.patch_size[0]), "embed_dim": base,
                               "depths": [skeleton_depth(model, f"layers.{s}.blocks", len(st.blocks))
                                          for s, st in enumerate(model.layers)],
                               "num_heads": heads,
                               "window_size": list(first[0].window_size),
                               "qkv_bias": first[0].q_bias is not None}
        if size is not None:
            out["img_size"] = list(size) if not isinstance(size, int) else size
        return out

    def num_tokens(self, model: nn.Module) -> int:
        """Tokens of the first stage (patch grid H x W)."""
        gh, gw = model.patch_embed.grid_size
        return int(gh) * int(gw)

    def macs(self, model: nn.Module, dims: dict) -> dict:
        """Multiply-accumulates of one image at ``dims``, by part (matmuls and convolutions only).

        Per block of stage s at resolution H x W, window Wh x Ww (area a), padded to Hp x Wp (``Np``
        tokens): qkv ``Np*E*3A``, q@k^T and attn@v ``2*Np*a*A``, proj ``Np*A*E``, MLP ``2*H*W*E*m``
        (A = the block's attention width), and the continuous position-bias MLP on the
        ``(2Wh-1)(2Ww-1)`` relative coordinates, ``T*(2*512 + 512*heads)``: it runs once per forward
        whatever the batch, so this is exact at batch 1 (what the counter tests) and an upper bound
        per image otherwise. PatchMerging ``H'*W'*4*E_{s-1}*E_s``; patch embedding
        ``Hg*Wg*E_0*C_in*P^2``; head ``E_last*classes``. A block removed at ``dims`` (depth) costs 0.
        FLOPs = 2 x MACs.

        Returns:
            ``{"patch_embed": .., "layers.s.downsample": .., "layers.s.blocks.j": .., "head": .., "total": ..}``.
        """
        conv = model.patch_embed.proj
        gh, gw = model.patch_embed.grid_size
        out = {"patch_embed": gh * gw * dims["layers.0.embed"] * conv.in_channels * conv.kernel_size[0]
               * conv.kernel_size[1]}
        gone = removed_units({f"layers.{s}.blocks": [f"layers.{s}.blocks.{j}" for j in range(len(st.blocks))]
                              for s, st in enumerate(model.layers)}, dims)
        for s, stage in enumerate(model.layers):
            E = dims[f"layers.{s}.embed"]
            if s > 0:
                oh, ow = stage.output_resolution
                out[f"layers.{s}.downsample"] = oh * ow * 4 * dims[f"layers.{s - 1}.embed"] * E
            for j, blk in enumerate(stage.blocks):
                p = f"layers.{s}.blocks.{j}"
                if p in gone:
                    out[p] = 0
                    continue
                H, W = blk.input_resolution
                wh, ww = blk.window_size
                n, npad = H * W, math.ceil(H / wh) * wh * math.ceil(W / ww) * ww
                h = dims[f"{p}.heads"]
                A = h * (_attn_width(blk.attn) // int(blk.attn.num_heads))
                hidden = blk.attn.cpb_mlp[0].out_features
                cpb = (2 * wh - 1) * (2 * ww - 1) * (blk.attn.cpb_mlp[0].in_features * hidden + hidden * h)
                out[p] = (npad * E * 3 * A + 2 * npad * wh * ww * A + npad * A * E + 2 * n * E * dims[f"{p}.mlp"]
                          + cpb)
        fc = getattr(model.head, "fc", None)
        last = dims[f"layers.{len(model.layers) - 1}.embed"]
        out["head"] = last * fc.out_features if isinstance(fc, nn.Linear) else 0
        out["total"] = sum(out.values())
        return out
