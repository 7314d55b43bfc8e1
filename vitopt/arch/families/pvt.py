"""Structure of timm ``PyramidVisionTransformerV2`` (PVTv2, Wang et al. 2021, arXiv 2106.13797).

PVTv2 has four stages joined by overlapping patch embeddings (strided Conv2d + LayerNorm), blocks with
spatial-reduction attention (separate ``q`` and ``kv`` Linears; keys/values come from a strided
``sr`` Conv2d + LayerNorm ``attn.norm`` over the tokens) and an MLP with a 3x3 depth-wise conv between
fc1 and fc2; each stage ends with its own LayerNorm. Groups, named after the timm module paths:

* ``stages.s.embed`` - the residual width of stage s, consistent everywhere (UP-ViTs, Yu & Wu 2021,
  arXiv 2111.15127, which prunes PVTv2 this way): the stage's patch embedding conv out (and the next
  stage's patch embedding conv in) and its LayerNorm; per block norm1/norm2, q/kv in, the sr conv's
  in and out channels and ``attn.norm``, proj out, fc1 in, fc2 out; the stage norm; the head in.
* ``stages.s.blocks.j.heads`` - q rows ``(heads) x (head_dim)``, kv rows ``(2) x (heads) x (head_dim)``,
  proj columns.
* ``stages.s.blocks.j.head_dim`` - per-head dims, uniform across the block's heads.
* ``stages.s.blocks.j.mlp`` - hidden neurons: fc1 rows, the depth-wise conv's channels (its
  ``groups`` follow the hidden width) and fc2 columns.
* ``stages.s.blocks`` - depth of stage s, one unit per block (``Structure.units``), masked at the
  block's ``drop_path1`` / ``drop_path2`` outputs; surgery takes the block out of the stage.

timm's PVTv2 ``Attention.forward`` reshapes the attention output to the block's input width ``C``,
so it assumes heads x head_dim == embed. When a prune makes them differ, :meth:`PvtV2Family.set_dims`
switches that module to :class:`PrunedSRAttention`, a subclass of timm's class whose forward is the
same computation with the output reshaped to heads x head_dim (our design choice: the model stays
a ``PyramidVisionTransformerV2`` with timm's parameter names, and ``load_pruned`` re-applies the
switch from arch.json). Attention scale: as for ViT, sqrt(new/old head_dim) is folded into the q rows.

PVTv2 has no ``img_size`` argument (it is resolution-agnostic); vitopt records the input size in
``patch_embed.img_size`` (see :func:`vitopt.arch.config.create_model`) and counts MACs at that size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.pvt_v2 import Block, MlpWithDepthwiseConv, PyramidVisionTransformerV2
from torch import nn

from vitopt.arch.builder import StructureBuilder, is_layernorm
from vitopt.arch.structure import Structure, removed_units, skeleton_depth
from vitopt.errors import VitoptError

__all__ = ["PvtV2Family", "PrunedSRAttention", "input_size"]


class PrunedSRAttention(PvtAttention):
    """timm PVTv2 spatial-reduction attention whose inner width (heads x head_dim) may differ from its input width.

    Same parameters, buffers and computation as ``timm.models.pvt_v2.Attention``; the only difference
    is that the attention output [B, heads, N, head_dim] is reshaped to [B, N, heads * head_dim]
    (timm reshapes to the input width C, which equals heads x head_dim only before pruning).
    Input ``x`` [B, N, C] with ``feat_size`` (H, W), N = H*W; output [B, N, C].
    """

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        B, N, C = x.shape
        H, W = feat_size
        q = self.q(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        if self.sr is not None:
            y = x.permute(0, 2, 1).reshape(B, C, H, W)
            y = self.sr(self.pool(y) if self.pool is not None else y).reshape(B, C, -1).permute(0, 2, 1)
            y = self.norm(y)
            if self.act is not None:
                y = self.act(y)
        else:
            y = x
        kv = self.kv(y).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


def input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) in pixels a PVTv2 model is costed at: ``patch_embed.img_size`` if recorded, else the
    timm pretrained config's ``input_size`` (224 x 224 for the published models)."""
    size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    if isinstance(size, int):
        size = (size, size)
    return int(size[0]), int(size[1])


def _conv_out(n: int, conv: nn.Conv2d, axis: int) -> int:
    k, s, p = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis]
    return (n + 2 * p - k) // s + 1


def _stage_embed(model: nn.Module, s: int) -> int:
    pe = model.patch_embed if s == 0 else model.stages[s].downsample
    return int(pe.proj.out_channels)


class PvtV2Family:
    """The family of timm ``PyramidVisionTransformerV2`` models: ``pvt_v2_b0`` ... ``pvt_v2_b5``, ``pvt_v2_b2_li``."""

    name = "pvt_v2"
    description = ("timm PyramidVisionTransformerV2: pvt_v2_b0..b5 and b2_li (spatial-reduction attention, "
                   "depth-wise conv MLP, overlapping patch embeddings)")

    def matches(self, model: nn.Module) -> bool:
        """True for timm ``PyramidVisionTransformerV2`` and subclasses."""
        return isinstance(model, PyramidVisionTransformerV2)

    def check_supported(self, model: nn.Module) -> None:
        """Raise VitoptError naming the first feature of ``model`` the PVTv2 structure cannot prune."""
        for s, stage in enumerate(model.stages):
            if not is_layernorm(stage.norm):
                raise VitoptError(f"stages.{s}.norm is a {type(stage.norm).__name__}; only LayerNorm is supported.")
            for j, blk in enumerate(stage.blocks):
                where = f"stages.{s}.blocks.{j}"
                if type(blk) is not Block or not isinstance(blk.attn, PvtAttention):
                    raise VitoptError(f"{where} is a {type(blk).__name__}; only timm's PVTv2 Block is supported.")
                if type(blk.mlp) is not MlpWithDepthwiseConv:
                    raise VitoptError(f"{where}.mlp is a {type(blk.mlp).__name__}; only MlpWithDepthwiseConv is supported.")
                for norm in ("norm1", "norm2"):
                    if not is_layernorm(getattr(blk, norm)):
                        raise VitoptError(f"{where}.{norm} is a {type(getattr(blk, norm)).__name__}; only LayerNorm "
                                          "is supported on the residual stream.")

    # -------------------------------------------------------------------------------------- structure
    def read_dims(self, model: nn.Module) -> dict[str, int]:
        """Current dims: ``stages.s.embed`` per stage and ``stages.s.blocks.j.{heads,head_dim,mlp}`` per block."""
        dims: dict[str, int] = {}
        for s, stage in enumerate(model.stages):
            dims[f"stages.{s}.embed"] = _stage_embed(model, s)
            dims[f"stages.{s}.blocks"] = len(stage.blocks)
            for j, blk in enumerate(stage.blocks):
                p = f"stages.{s}.blocks.{j}"
                dims[f"{p}.heads"] = int(blk.attn.num_heads)
                dims[f"{p}.head_dim"] = int(blk.attn.head_dim)
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
        for s, stage in enumerate(model.stages):
            E = b.group(f"stages.{s}.embed", "embed", dims[f"stages.{s}.embed"], stage=s)
            depth = f"stages.{s}.blocks"
            b.depth(depth, dims[depth], stage=s)
            pe = "patch_embed" if s == 0 else f"stages.{s}.downsample"
            b.lay(f"{pe}.proj.weight", 0, E)
            if prev is not None:
                b.lay(f"{pe}.proj.weight", 1, prev)
            b.lay(f"{pe}.proj.bias", 0, E)
            b.ln(f"{pe}.norm", E)
            b.choke(E[0], pe, "output", E)
            for j in range(len(stage.blocks)):
                p = f"stages.{s}.blocks.{j}"
                H = b.group(f"{p}.heads", "heads", dims[f"{p}.heads"], block=block, stage=s)
                hd = b.group(f"{p}.head_dim", "head_dim", dims[f"{p}.head_dim"], block=block, stage=s)
                M = b.group(f"{p}.mlp", "mlp", dims[f"{p}.mlp"], block=block, stage=s)
                a = f"{p}.attn"
                b.ln(f"{p}.norm1", E)
                b.lay(f"{a}.q.weight", 0, H, hd)
                b.lay(f"{a}.q.bias", 0, H, hd)
                b.lay(f"{a}.q.weight", 1, E)
                b.lay(f"{a}.kv.weight", 0, (None, 2), H, hd)
                b.lay(f"{a}.kv.bias", 0, (None, 2), H, hd)
                b.lay(f"{a}.kv.weight", 1, E)
                b.lay(f"{a}.sr.weight", 0, E)
                b.lay(f"{a}.sr.weight", 1, E)
                b.lay(f"{a}.sr.bias", 0, E)
                if stage.blocks[j].attn.norm is not None:
                    b.ln(f"{a}.norm", E)
                b.lay(f"{a}.proj.weight", 1, H, hd)
                b.lay(f"{a}.proj.weight", 0, E)
                b.lay(f"{a}.proj.bias", 0, E)
                b.ln(f"{p}.norm2", E)
                b.mlp(f"{p}.mlp", E, M, hidden_convs=("dwconv",))
                b.choke(H[0], f"{a}.proj", "input", H, hd)
                b.choke(hd[0], f"{a}.q", "output", H, hd)
                b.choke(hd[0], f"{a}.kv", "output", (None, 2), H, hd)
                b.choke(M[0], f"{p}.mlp.fc2", "input", M)
                b.choke(E[0], f"{a}.proj", "output", E)
                b.choke(E[0], f"{p}.mlp.fc2", "output", E)
                b.unit_choke(depth, f"{p}.drop_path1", "output", j)      # depth: both residual branches
                b.unit_choke(depth, f"{p}.drop_path2", "output", j)
                block += 1
            b.ln(f"stages.{s}.norm", E)
            prev = E
        if isinstance(model.head, nn.Linear):
            b.lay("head.weight", 1, prev)
        return b.build()

    # ----------------------------------------------------------------------------- attribute updates
    def set_dims(self, model: nn.Module, dims: dict[str, int]) -> None:
        """Update module attributes after the parameters were resized to ``dims``.

        Sets ``num_features`` / ``head_hidden_size`` (last stage), each ``feature_info[s]["num_chs"]``,
        conv channel counts (patch embeddings, sr, and the depth-wise conv's ``groups`` = hidden width),
        Linear feature counts, LayerNorm ``normalized_shape``, and per block ``attn.dim``,
        ``attn.num_heads``, ``attn.head_dim``, ``attn.scale = head_dim ** -0.5``; switches a block's
        attention to :class:`PrunedSRAttention` when heads x head_dim != embed (and back when equal).
        """
        widths = [dims[f"stages.{s}.embed"] for s in range(len(model.stages))]
        model.num_features = model.head_hidden_size = widths[-1]
        for s, info in enumerate(model.feature_info[: len(widths)]):
            info["num_chs"] = widths[s]
        for mod in model.modules():
            if is_layernorm(mod) and mod.weight is not None:
                mod.normalized_shape = (mod.weight.shape[0],)
        if isinstance(model.head, nn.Linear):
            model.head.in_features = widths[-1]
        timm_cls, pruned_cls = PvtAttention, PrunedSRAttention
        for s, stage in enumerate(model.stages):
            D = widths[s]
            pe = model.patch_embed if s == 0 else stage.downsample
            pe.proj.out_channels = D
            if s > 0:
                pe.proj.in_channels = widths[s - 1]
            for j, blk in enumerate(stage.blocks):
                p = f"stages.{s}.blocks.{j}"
                h, d, m = dims[f"{p}.heads"], dims[f"{p}.head_dim"], dims[f"{p}.mlp"]
                attn = blk.attn
                attn.dim, attn.num_heads, attn.head_dim, attn.scale = D, h, d, d ** -0.5
                attn.q.in_features, attn.q.out_features = D, h * d
                attn.kv.in_features, attn.kv.out_features = D, 2 * h * d
                attn.proj.in_features, attn.proj.out_features = h * d, D
                if attn.sr is not None:
                    attn.sr.in_channels = attn.sr.out_channels = D
                attn.__class__ = timm_cls if h * d == D else pruned_cls
                mlp = blk.mlp
                mlp.fc1.in_features, mlp.fc1.out_features = D, m
                mlp.dwconv.in_channels = mlp.dwconv.out_channels = mlp.dwconv.groups = m
                mlp.fc2.in_features, mlp.fc2.out_features = m, D

    @torch.no_grad()
    def fold_before_surgery(self, model: nn.Module, new_dims: dict[str, int]) -> None:
        """Fold sqrt(new/old head_dim) into each block's q Linear (weight and bias), as for ViT."""
        for s, stage in enumerate(model.stages):
            for j, blk in enumerate(stage.blocks):
                attn = blk.attn
                new_d = new_dims.get(f"stages.{s}.blocks.{j}.head_dim", attn.head_dim)
                if new_d == attn.head_dim:
                    continue
                ratio = math.sqrt(new_d / attn.head_dim)
                attn.q.weight.mul_(ratio)
                if attn.q.bias is not None:
                    attn.q.bias.mul_(ratio)

    # ------------------------------------------------------------------------------------------ cost
    def stage_sizes(self, model: nn.Module) -> list[tuple[int, int]]:
        """Token grid (H, W) of every stage at the model's input size (:func:`input_size`)."""
        h, w = input_size(model)
        out = []
        for s, stage in enumerate(model.stages):
            conv = (model.patch_embed if s == 0 else stage.downsample).proj
            h, w = _conv_out(h, conv, 0), _conv_out(w, conv, 1)
            out.append((h, w))
        return out

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
                               "depths": [skeleton_depth(model, f"stages.{s}.blocks", len(st.blocks))
                                          for s, st in enumerate(model.stages)]}
        if size is not None:
            out["img_size"] = list(size) if not isinstance(size, int) else size
        return out

    def num_tokens(self, model: nn.Module) -> int:
        """Tokens of the first stage."""
        h, w = self.stage_sizes(model)[0]
        return h * w

    def macs(self, model: nn.Module, dims: dict) -> dict:
        """Multiply-accumulates of one image at ``dims``, by part (matmuls and convolutions only).

        Per block (N = H*W tokens, N' key/value tokens: (H//r)(W//r) after the r x r sr conv, 49
        after the 7x7 pool of linear-SRA, N otherwise; A = heads x head_dim): q ``N*E*A``, sr conv
        ``N'*E*E*r^2``, kv ``N'*E*2A``, q@k^T and attn@v ``2*N*N'*A``, proj ``N*A*E``, fc1 and fc2
        ``2*N*E*m``, depth-wise 3x3 conv ``9*N*m``. Patch embeddings: ``H_s*W_s*E_s*E_{s-1}*k^2``.
        Head ``E_last*classes``. FLOPs = 2 x MACs. Values may be floats or tensors.

        Returns:
            ``{"stages.s.patch_embed": .., "stages.s.blocks.j": .., "head": .., "total": ..}``.
        """
        sizes = self.stage_sizes(model)
        out: dict = {}
        prev = model.patch_embed.proj.in_channels
        gone = removed_units({f"stages.{s}.blocks": [f"stages.{s}.blocks.{j}" for j in range(len(st.blocks))]
                              for s, st in enumerate(model.stages)}, dims)
        for s, stage in enumerate(model.stages):
            H, W = sizes[s]
            N = H * W
            E = dims[f"stages.{s}.embed"]
            conv = (model.patch_embed if s == 0 else stage.downsample).proj
            out[f"stages.{s}.patch_embed"] = N * E * prev * conv.kernel_size[0] * conv.kernel_size[1]
            for j, blk in enumerate(stage.blocks):
                p = f"stages.{s}.blocks.{j}"
                if p in gone:                                  # depth: a removed block costs nothing
                    out[p] = 0
                    continue
                A = dims[f"{p}.heads"] * dims[f"{p}.head_dim"]
                m = dims[f"{p}.mlp"]
                attn = blk.attn
                if attn.sr is None:
                    nkv, sr = N, 0
                else:
                    if attn.pool is not None:
                        ph, pw = (attn.pool.output_size,) * 2 if isinstance(attn.pool.output_size, int) else attn.pool.output_size
                    else:
                        ph, pw = H, W
                    k = attn.sr.kernel_size[0] * attn.sr.kernel_size[1]
                    nkv = _conv_out(ph, attn.sr, 0) * _conv_out(pw, attn.sr, 1)
                    sr = nkv * E * E * k
                out[p] = N * E * A + sr + nkv * E * 2 * A + 2 * N * nkv * A + N * A * E + 2 * N * E * m + 9 * N * m
            prev = E
        out["head"] = prev * model.head.out_features if isinstance(model.head, nn.Linear) else 0
        out["total"] = sum(out.values())
        return out
