"""Structure of timm ``SwinTransformer`` (v1): shifted-window attention in a pyramid of stages.

Swin (Liu et al. 2021, arXiv 2103.14030) keeps one residual width per stage, joined by PatchMerging
(LayerNorm over the 4 x C channels of a 2x2 neighbourhood, then a Linear ``reduction`` to the next
stage's width). Groups, named after the timm module paths:

* ``layers.s.embed`` - the residual width of stage s, cut consistently (UP-ViTs' rule, Yu & Wu 2021,
  arXiv 2111.15127, applied per stage as SiDT does for hierarchical backbones, Xue et al. 2022,
  arXiv 2204.07722): patch_embed.proj out and patch_embed.norm (s = 0) or downsample.reduction out
  (s > 0); every block's norm1/norm2, qkv in, proj out, fc1 in, fc2 out; the next stage's
  downsample.norm and reduction in (laid out as ``(4) x (C)``); the final norm and head.fc in
  (last stage). ``stage`` of the Group is s, ``block`` is None.
* ``layers.s.blocks.j.heads`` - heads of one block: qkv rows ``(3) x (heads) x (head_dim)``, proj
  columns, and the columns of ``relative_position_bias_table`` ``[(2Wh-1)(2Ww-1), heads]``: the bias
  of a head goes with the head. ``relative_position_index`` indexes table rows (positions), so it
  is unchanged; the shifted-window mask ``attn_mask`` is per position and also unchanged.
* ``layers.s.blocks.j.head_dim`` - per-head q/k/v dims, uniform across the block's heads.
* ``layers.s.blocks.j.mlp`` - MLP hidden neurons (fc1 rows, fc2 columns).
* ``layers.s.blocks`` - depth of stage s, one unit per block (``Structure.units``), masked at the
  block's ``drop_path1`` / ``drop_path2`` outputs (both residual branches); surgery takes the block out
  of the stage and every kept block keeps its own window shift and mask.

``Group.block`` counts blocks over the whole model (stage 0 first).

Attention scale: ``WindowAttention`` with ``fused_attn`` calls ``scaled_dot_product_attention`` with
its default 1/sqrt(head_dim of q); the explicit path multiplies by ``attn.scale``. As for ViT
(invariant 2 of docs/architecture.md), :meth:`SwinFamily.fold_before_surgery` folds sqrt(new/old) into the q rows of
qkv and :meth:`SwinFamily.set_dims` sets ``scale = new_head_dim ** -0.5``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import Mlp
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
)
from torch import nn

from vitopt.arch.builder import StructureBuilder, is_layernorm
from vitopt.arch.structure import Structure, removed_units, skeleton_depth
from vitopt.errors import VitoptError

__all__ = ["SwinFamily"]


def _stage_embed(model: nn.Module, s: int) -> int:
    if s == 0:
        return int(model.patch_embed.proj.out_channels)
    return int(model.layers[s].downsample.reduction.out_features)


def _head_dim(attn: nn.Module) -> int:
    return int(attn.qkv.out_features) // (3 * int(attn.num_heads))


class SwinFamily:
    """The family of timm ``SwinTransformer`` (v1) models: ``swin_*``, S3 (AutoFormerV2) weights."""

    name = "swin"
    description = "timm SwinTransformer (v1): swin_tiny/small/base/large_*, window attention with shifted windows"

    # ----------------------------------------------------------------------------------------- checks
    def matches(self, model: nn.Module) -> bool:
        """True for timm ``SwinTransformer`` (v1) and subclasses; Swin v2 is a different class."""
        return isinstance(model, SwinTransformer)

    def check_supported(self, model: nn.Module) -> None:
        """Raise VitoptError naming the first feature of ``model`` the Swin structure cannot prune."""
        if not isinstance(model.patch_embed.proj, nn.Conv2d):
            raise VitoptError("the Swin model's patch_embed.proj must be a Conv2d (timm's PatchEmbed).")
        if not isinstance(model.norm, (nn.LayerNorm, nn.Identity)):
            raise VitoptError(f"the Swin model's final norm is a {type(model.norm).__name__}; only LayerNorm is supported.")
        for s, stage in enumerate(model.layers):
            if s > 0 and not (isinstance(stage.downsample, PatchMerging) and is_layernorm(stage.downsample.norm)):
                raise VitoptError(f"layers.{s}.downsample must be timm's PatchMerging with a LayerNorm.")
            for j, blk in enumerate(stage.blocks):
                where = f"layers.{s}.blocks.{j}"
                if type(blk) is not SwinTransformerBlock or type(blk.attn) is not WindowAttention:
                    raise VitoptError(f"{where} is a {type(blk).__name__}; only timm's SwinTransformerBlock with "
                                      "WindowAttention is supported.")
                if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
                    raise VitoptError(f"{where}.mlp is a {type(blk.mlp).__name__}; only timm's two-layer Mlp is supported.")
                for norm in ("norm1", "norm2"):
                    if not is_layernorm(getattr(blk, norm)):
                        raise VitoptError(f"{where}.{norm} is a {type(getattr(blk, norm)).__name__}; only LayerNorm "
                                          "is supported on the residual stream.")

    # -------------------------------------------------------------------------------------- structure
    def read_dims(self, model: nn.Module) -> dict[str, int]:
        """Current dims: ``layers.s.embed`` per stage and ``layers.s.blocks.j.{heads,head_dim,mlp}`` per block."""
        dims: dict[str, int] = {}
        for s, stage in enumerate(model.layers):
            dims[f"layers.{s}.embed"] = _stage_embed(model, s)
            dims[f"layers.{s}.blocks"] = len(stage.blocks)
            for j, blk in enumerate(stage.blocks):
                p = f"layers.{s}.blocks.{j}"
                dims[f"{p}.heads"] = int(blk.attn.num_heads)
                dims[f"{p}.head_dim"] = _head_dim(blk.attn)
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
                b.ln(f"{d}.norm", (None, 4), prev)
                b.lay(f"{d}.reduction.weight", 1, (None, 4), prev)
                b.lay(f"{d}.reduction.weight", 0, E)
                b.lay(f"{d}.reduction.bias", 0, E)
                b.choke(E[0], d, "output", E)
            for j in range(len(stage.blocks)):
                p = f"layers.{s}.blocks.{j}"
                H = b.group(f"{p}.heads", "heads", dims[f"{p}.heads"], block=block, stage=s)
                hd = b.group(f"{p}.head_dim", "head_dim", dims[f"{p}.head_dim"], block=block, stage=s)
                M = b.group(f"{p}.mlp", "mlp", dims[f"{p}.mlp"], block=block, stage=s)
                b.ln(f"{p}.norm1", E)
                b.lay(f"{p}.attn.qkv.weight", 0, (None, 3), H, hd)
                b.lay(f"{p}.attn.qkv.bias", 0, (None, 3), H, hd)
                b.lay(f"{p}.attn.qkv.weight", 1, E)
                b.lay(f"{p}.attn.relative_position_bias_table", 1, H)
                b.lay(f"{p}.attn.proj.weight", 1, H, hd)
                b.lay(f"{p}.attn.proj.weight", 0, E)
                b.lay(f"{p}.attn.proj.bias", 0, E)
                b.ln(f"{p}.norm2", E)
                b.mlp(f"{p}.mlp", E, M)
                b.choke(H[0], f"{p}.attn.proj", "input", H, hd)
                b.choke(hd[0], f"{p}.attn.qkv", "output", (None, 3), H, hd)
                b.choke(M[0], f"{p}.mlp.fc2", "input", M)
                b.choke(E[0], f"{p}.attn.proj", "output", E)
                b.choke(E[0], f"{p}.mlp.fc2", "output", E)
                b.unit_choke(depth, f"{p}.drop_path1", "output", j)      # depth: both residual branches
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
        ``feature_info[s]["num_chs"]`` (so ``features_only`` / ``forward_intermediates`` users see the
        new channel counts), the head's ``in_features``/``num_features``, every LayerNorm's
        ``normalized_shape``, PatchMerging ``dim``/``out_dim``, stage/block/attention ``dim``, and per
        block ``attn.num_heads`` and ``attn.scale = head_dim ** -0.5``, plus Linear/Conv feature counts.
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
                h, d, m = dims[f"{p}.heads"], dims[f"{p}.head_dim"], dims[f"{p}.mlp"]
                blk.dim = blk.attn.dim = D
                attn = blk.attn
                attn.num_heads, attn.scale = h, d ** -0.5
                attn.qkv.in_features, attn.qkv.out_features = D, 3 * h * d
                attn.proj.in_features, attn.proj.out_features = h * d, D
                blk.mlp.fc1.in_features, blk.mlp.fc1.out_features = D, m
                blk.mlp.fc2.in_features, blk.mlp.fc2.out_features = m, D

    @torch.no_grad()
    def fold_before_surgery(self, model: nn.Module, new_dims: dict[str, int]) -> None:
        """Fold the attention-scale change of a head_dim prune into the q rows of each block's qkv.

        For a block going from head_dim d to d', q rows (weight and bias) are multiplied by
        sqrt(d'/d), so ``(q'.k) / sqrt(d') == (q.k) / sqrt(d)`` on the kept dims (fused and explicit paths).
        """
        for s, stage in enumerate(model.layers):
            for j, blk in enumerate(stage.blocks):
                attn = blk.attn
                d = _head_dim(attn)
                new_d = new_dims.get(f"layers.{s}.blocks.{j}.head_dim", d)
                if new_d == d:
                    continue
                rows = attn.num_heads * d
                ratio = math.sqrt(new_d / d)
                attn.qkv.weight[:rows] *= ratio
                if attn.qkv.bias is not None:
                    attn.qkv.bias[:rows] *= ratio

    # ------------------------------------------------------------------------------------------ cost
    def constructor_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """``timm.create_model`` kwargs read back from the model: input size, channels, classes and per-stage
        depths (a depth-pruned stage: the skeleton holding its kept blocks at their original indices,
        :func:`~vitopt.arch.structure.skeleton_depth`).

        Other constructor arguments keep the model name's defaults; :func:`vitopt.arch.config.save`
        checks the rebuild and asks for explicit kwargs when these are not enough.
        """
        pe = model.patch_embed
        size = getattr(pe, "img_size", None)
        out: dict[str, Any] = {"in_chans": int(pe.proj.in_channels), "num_classes": int(model.num_classes),
                               "depths": [skeleton_depth(model, f"layers.{s}.blocks", len(st.blocks))
                                          for s, st in enumerate(model.layers)]}
        if size is not None:
            out["img_size"] = list(size) if not isinstance(size, int) else size
        return out

    def num_tokens(self, model: nn.Module) -> int:
        """Tokens of the first stage (patch grid H x W)."""
        gh, gw = model.patch_embed.grid_size
        return int(gh) * int(gw)

    def macs(self, model: nn.Module, dims: dict) -> dict:
        """Multiply-accumulates of one image at ``dims``, by part (matmuls and convolutions only).

        Per block of stage s at resolution H x W, window Wh x Ww (area a), padded to Hp x Wp
        (``Np = Hp*Wp`` tokens; timm pads before partitioning): qkv ``Np*E*3A``, q@k^T and attn@v
        ``2*Np*a*A``, proj ``Np*A*E``, MLP ``2*H*W*E*m`` (A = heads x head_dim). PatchMerging
        ``H'*W'*4*E_{s-1}*E_s``; patch embedding ``Hg*Wg*E_0*C_in*P^2``; head ``E_last*classes``.
        Norms, softmax, the relative position bias gather and adds are not counted. FLOPs = 2 x MACs.
        Values may be floats or tensors (the ``search`` criterion differentiates through them).

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
                if p in gone:                                  # depth: a removed block costs nothing
                    out[p] = 0
                    continue
                H, W = blk.input_resolution
                wh, ww = blk.window_size
                n, npad = H * W, math.ceil(H / wh) * wh * math.ceil(W / ww) * ww
                A = dims[f"{p}.heads"] * dims[f"{p}.head_dim"]
                out[p] = npad * E * 3 * A + 2 * npad * wh * ww * A + npad * A * E + 2 * n * E * dims[f"{p}.mlp"]
        fc = getattr(model.head, "fc", None)
        last = dims[f"layers.{len(model.layers) - 1}.embed"]
        out["head"] = last * fc.out_features if isinstance(fc, nn.Linear) else 0
        out["total"] = sum(out.values())
        return out
