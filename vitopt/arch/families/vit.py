"""Structure of timm ``VisionTransformer`` models: ViT, DeiT, DeiT-distilled, DeiT III, register tokens.

Groups (docs/architecture.md, "The Structure"):

* ``embed`` - the residual width: patch_embed.proj out, cls/dist/reg tokens, pos_embed, every
  LayerNorm on the residual stream, qkv in, proj out, fc1 in, fc2 out, LayerScale gammas, the final
  norm / fc_norm, head and head_dist in. Pruned consistently everywhere, as in UP-ViTs
  (Yu & Wu 2021, arXiv 2111.15127).
* ``blocks.i.heads`` - attention heads of block i (qkv rows, proj columns).
* ``blocks.i.head_dim`` - per-head q/k/v dims of block i, uniform across the block's heads so fused
  attention kernels still apply (the q, k and v index j is removed together in every head).
* ``blocks.i.mlp`` - MLP hidden neurons of block i (fc1 rows, fc2 columns; for GluMlp/SwiGLUPacked
  (DINOv2 ViT-g) and SwiGLU the gate row and the value row together, and the hidden norm's channel
  when ``scale_mlp_norm`` is on; :mod:`vitopt.arch.parts`).
* ``blocks`` - depth: one unit per transformer block (``Structure.units``: ``blocks.i``). Its choke
  points are the outputs of ``attn.proj`` and ``mlp.fc2`` of block i (both residual branches, before
  LayerScale): a 0 there makes the block the identity, which is what surgery builds by taking the
  block out of ``model.blocks`` (Gromov et al. 2024, arXiv 2403.17887; Men et al. 2024, ShortGPT,
  arXiv 2403.03853).

Variants (:mod:`vitopt.arch.parts`): qk_norm (``q_norm``/``k_norm`` follow head_dim, not heads), the
attention-output norm (``scale_attn_norm``) and the sigmoid output gate of timm ``Attention(gated=True)``
(``VisionTransformer`` has no kwarg for it; reachable with ``attn_layer=partial(Attention, gated=True)``),
register tokens with or without ``no_embed_class``, ``class_token=False``, ``global_pool`` token/avg/map,
LayerScale, ``dynamic_img_size`` and the SigLIP MAP head (``AttentionPoolLatent``: the residual width
runs through it, its own heads and MLP hidden stay whole). Residual, qk and hidden norms must be
LayerNorm or RmsNorm (AIMv2); other norms are rejected with a sentence.

Attention scale (invariant 2 of docs/architecture.md): timm's fused path calls ``scaled_dot_product_attention``
whose default scale is 1/sqrt(head_dim); after a head_dim prune that would silently change the
trained function. :meth:`VitFamily.fold_before_surgery` folds sqrt(new/old) into the q rows of qkv
(weight and bias) and :meth:`VitFamily.set_dims` sets ``attn.scale`` to 1/sqrt(new head_dim), so
both the fused and the explicit path compute exactly what the unpruned model computed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import GluMlp, LayerScale
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitopt.arch import parts
from vitopt.arch.builder import StructureBuilder, is_token_norm
from vitopt.arch.structure import Structure, removed_units, skeleton_depth
from vitopt.errors import VitoptError

__all__ = ["VitFamily"]


def _is_ln(module: nn.Module | None) -> bool:
    """A LayerNorm or RMS norm over the last dim (the masked-norm hooks handle both)."""
    return is_token_norm(module)


class VitFamily:
    """The family of timm ``VisionTransformer`` (and ``VisionTransformerDistilled``) models."""

    name = "vit"
    description = ("timm VisionTransformer: vit_*, deit_* (incl. distilled), deit3_*, DINOv2 (SwiGLUPacked), "
                   "SigLIP (MAP head), AIMv2 (RmsNorm), ViTs with register tokens, qk_norm, SwiGLU/GLU MLPs or "
                   "global average pooling")

    # ----------------------------------------------------------------------------------------- checks
    def matches(self, model: nn.Module) -> bool:
        """True for timm ``VisionTransformer`` and its subclasses."""
        return isinstance(model, VisionTransformer)

    def check_supported(self, model: nn.Module) -> None:
        """Raise VitoptError naming the first module and feature of ``model`` the ViT structure cannot prune."""
        parts.check_pool(getattr(model, "attn_pool", None))
        if getattr(model, "attn_pool", None) is not None and model.global_pool != "map":
            raise VitoptError(f"the ViT's global_pool={model.global_pool!r} attention pool is not supported; "
                              "use 'map', 'token' or 'avg'.")
        if not isinstance(model.patch_embed.proj, nn.Conv2d):
            raise VitoptError("the ViT's patch_embed.proj must be a Conv2d (timm's PatchEmbed).")
        for name in ("patch_embed.norm", "norm_pre", "norm", "fc_norm"):
            parts.check_norm_or_identity(f"the ViT's {name}", model.get_submodule(name))
        for i, blk in enumerate(model.blocks):
            where = f"blocks.{i}"
            if type(blk) is not Block:
                raise VitoptError(f"{where} is a {type(blk).__name__}; only timm's standard pre-norm Block "
                                  "(norm1/attn/ls1/norm2/mlp/ls2) is supported.")
            attn = blk.attn
            if type(attn) is not Attention:
                raise VitoptError(f"{where}.attn is a {type(attn).__name__}; only timm's fused-qkv Attention "
                                  "is supported.")
            for flag in ("q_norm", "k_norm", "norm"):
                parts.check_norm_or_identity(f"{where}.attn.{flag}", getattr(attn, flag))
            if attn.proj.in_features != attn.attn_dim or attn.qkv.out_features != 3 * attn.attn_dim:
                raise VitoptError(f"{where}.attn has an output width other than its attention width; not supported.")
            parts.check_mlp(f"{where}.mlp", blk.mlp)
            for norm in ("norm1", "norm2"):
                if not _is_ln(getattr(blk, norm)):
                    raise VitoptError(f"{where}.{norm} is a {type(getattr(blk, norm)).__name__}; only "
                                      "LayerNorm or RmsNorm is supported on the residual stream.")

    # -------------------------------------------------------------------------------------- structure
    def read_dims(self, model: nn.Module) -> dict[str, int]:
        """Current dims: ``{"embed": D, "blocks": depth, "blocks.i.heads": H, "blocks.i.head_dim": d,
        "blocks.i.mlp": m}``."""
        dims = {"embed": int(model.embed_dim), "blocks": len(model.blocks)}
        for i, blk in enumerate(model.blocks):
            dims[f"blocks.{i}.heads"] = int(blk.attn.num_heads)
            dims[f"blocks.{i}.head_dim"] = int(blk.attn.head_dim)
            dims[f"blocks.{i}.mlp"] = parts.mlp_hidden(blk.mlp)
        return dims

    def structure(self, model: nn.Module) -> Structure:
        """Build the :class:`Structure` of ``model`` at its current dims.

        Raises:
            VitoptError: the model uses a variant :meth:`check_supported` rejects.
        """
        self.check_supported(model)
        dims = self.read_dims(model)
        b = StructureBuilder(self.name, model)
        E = b.group("embed", "embed", dims["embed"])
        b.choke("embed", "norm_pre", "input", E)
        b.depth("blocks", dims["blocks"])
        b.patch_embed("patch_embed", E)
        for tok in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            b.lay(tok, 2, E)
        b.ln("norm_pre", E)
        for i, blk in enumerate(model.blocks):
            p = f"blocks.{i}"
            H = b.group(f"{p}.heads", "heads", dims[f"{p}.heads"], block=i)
            d = b.group(f"{p}.head_dim", "head_dim", dims[f"{p}.head_dim"], block=i)
            M = b.group(f"{p}.mlp", "mlp", dims[f"{p}.mlp"], block=i)
            b.ln(f"{p}.norm1", E)
            b.lay(f"{p}.attn.qkv.weight", 0, (None, 3), H, d)
            b.lay(f"{p}.attn.qkv.bias", 0, (None, 3), H, d)
            b.lay(f"{p}.attn.qkv.weight", 1, E)
            heads_at = parts.lay_attn_extras(b, f"{p}.attn", blk.attn, E, H, d)
            b.lay(f"{p}.attn.proj.weight", 1, H, d)
            b.lay(f"{p}.attn.proj.weight", 0, E)
            b.lay(f"{p}.attn.proj.bias", 0, E)
            b.lay(f"{p}.ls1.gamma", 0, E)
            b.ln(f"{p}.norm2", E)
            parts.lay_mlp(b, f"{p}.mlp", blk.mlp, E, M)
            b.lay(f"{p}.ls2.gamma", 0, E)
            b.choke(H[0], heads_at, "input", H, d)
            b.choke(d[0], f"{p}.attn.qkv", "output", (None, 3), H, d)
            b.choke("embed", f"{p}.attn.proj", "output", E)
            b.choke("embed", f"{p}.mlp.fc2", "output", E)
            b.unit_choke("blocks", f"{p}.attn.proj", "output", i)
            b.unit_choke("blocks", f"{p}.mlp.fc2", "output", i)
        b.ln("norm", E)
        if getattr(model, "attn_pool", None) is not None:
            parts.lay_pool(b, "attn_pool", E)
        b.ln("fc_norm", E)
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                b.lay(f"{head}.weight", 1, E)
        return b.build()

    # ----------------------------------------------------------------------------- attribute updates
    def set_dims(self, model: nn.Module, dims: dict[str, int]) -> None:
        """Update module attributes after the parameters were resized to ``dims``.

        Sets ``embed_dim``, ``num_features``, ``head_hidden_size``, every Linear's/Conv's feature
        counts and LayerNorm's ``normalized_shape``, per block ``attn.num_heads``,
        ``attn.head_dim``, ``attn.attn_dim`` and ``attn.scale = head_dim ** -0.5``, and the MAP head's
        widths (:func:`vitopt.arch.parts.set_pool_dims`).
        """
        D = dims["embed"]
        model.embed_dim = model.num_features = D
        if hasattr(model, "head_hidden_size"):
            model.head_hidden_size = D
        model.patch_embed.proj.out_channels = D
        for mod in model.modules():
            if _is_ln(mod) and mod.weight is not None:
                mod.normalized_shape = (mod.weight.shape[0],)
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                getattr(model, head).in_features = D
        for i, blk in enumerate(model.blocks):
            h, d, m = (dims[f"blocks.{i}.{k}"] for k in ("heads", "head_dim", "mlp"))
            attn = blk.attn
            attn.num_heads, attn.head_dim, attn.attn_dim = h, d, h * d
            attn.scale = d ** -0.5
            attn.qkv.in_features, attn.qkv.out_features = D, 3 * h * d
            attn.proj.in_features, attn.proj.out_features = h * d, D
            parts.set_attn_extras(attn, D, h * d)
            parts.set_mlp_dims(blk.mlp, D, m)
        parts.set_pool_dims(getattr(model, "attn_pool", None), D)

    @torch.no_grad()
    def fold_before_surgery(self, model: nn.Module, new_dims: dict[str, int]) -> None:
        """Fold the attention-scale change of a head_dim prune into q.

        For block i going from head_dim d to d', q is multiplied by sqrt(d'/d) so that
        (q' . k) / sqrt(d') == (q . k) / sqrt(d) on the kept dims: the q rows of qkv (weight and bias),
        or, with qk_norm, the q_norm LayerNorm's weight and bias (q_norm would undo a scale on its input).
        """
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            new_d = new_dims.get(f"blocks.{i}.head_dim", attn.head_dim)
            if new_d == attn.head_dim:
                continue
            ratio = math.sqrt(new_d / attn.head_dim)
            if _is_ln(attn.q_norm):
                for t in (attn.q_norm.weight, getattr(attn.q_norm, "bias", None)):
                    if t is not None:
                        t *= ratio
                continue
            attn.qkv.weight[: attn.attn_dim] *= ratio
            if attn.qkv.bias is not None:
                attn.qkv.bias[: attn.attn_dim] *= ratio

    def constructor_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """``timm.create_model`` kwargs that rebuild ``model``'s skeleton (before :func:`resize_to` sets the dims).

        Read back from the model: input size, patch size, channels, classes, pooling, depth, and the
        flags that decide which parameters exist (qkv bias, class/register tokens, LayerScale, pre-norm,
        fc_norm, and when set: qk_norm, scale_attn_norm, scale_mlp_norm, no final norm, no position
        embedding, no proj bias, prefix tokens into the pool). ``num_heads`` is 1 (any value works: the
        stored dims set the real heads), except with a MAP head, whose attention width, heads and MLP
        ratio come from ``embed_dim``, ``num_heads`` and ``mlp_ratio`` (its heads are not pruned).
        The MLP class is the model name's default (a class is not JSON); GluMlp skeletons get
        ``mlp_ratio=2`` so their hidden width is even. A depth-pruned model's ``depth`` is that of the skeleton
        holding its kept blocks (:func:`~vitopt.arch.structure.skeleton_depth`).
        """
        pe, blk = model.patch_embed, model.blocks[0]
        out = {"img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
               "in_chans": int(pe.proj.in_channels), "num_classes": int(model.num_classes),
               "global_pool": model.global_pool, "embed_dim": int(model.embed_dim),
               "depth": skeleton_depth(model, "blocks", len(model.blocks)),
               "num_heads": 1, "qkv_bias": blk.attn.qkv.bias is not None,
               "class_token": model.cls_token is not None, "reg_tokens": int(model.num_reg_tokens),
               "no_embed_class": bool(model.no_embed_class),
               "init_values": 1e-5 if isinstance(blk.ls1, LayerScale) else None,
               "pre_norm": not isinstance(model.norm_pre, nn.Identity),
               "fc_norm": not isinstance(model.fc_norm, nn.Identity),
               "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False))}
        extra = {"qk_norm": not isinstance(blk.attn.q_norm, nn.Identity),
                 "scale_attn_norm": not isinstance(blk.attn.norm, nn.Identity),
                 "scale_mlp_norm": not isinstance(blk.mlp.norm, nn.Identity),
                 "final_norm": not isinstance(model.norm, nn.Identity) or not isinstance(model.fc_norm, nn.Identity),
                 "pool_include_prefix": bool(getattr(model, "pool_include_prefix", False)),
                 "proj_bias": blk.attn.proj.bias is not None}
        defaults = {"qk_norm": False, "scale_attn_norm": False, "scale_mlp_norm": False, "final_norm": True,
                    "pool_include_prefix": False, "proj_bias": True}
        out.update({k: v for k, v in extra.items() if v != defaults[k]})
        if model.pos_embed is None:
            out["pos_embed"] = "none"
        if isinstance(blk.mlp, GluMlp):
            out["mlp_ratio"] = 2.0
        pool = getattr(model, "attn_pool", None)
        if pool is not None:
            pk = parts.pool_kwargs(pool)
            out.update(embed_dim=pk["width"], num_heads=pk["heads"], mlp_ratio=pk["mlp_ratio"])
        return out

    # ------------------------------------------------------------------------------------------ cost
    def num_tokens(self, model: nn.Module) -> int:
        """Sequence length N seen by the blocks: patches plus prefix (cls/dist/register) tokens."""
        return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)

    def macs(self, model: nn.Module, dims: dict[str, int]) -> dict[str, int]:
        """Multiply-accumulates of one image's forward pass at ``dims``, by part.

        Counts every matmul and convolution (patch embedding, qkv, the output gate, q@k^T, attn@v,
        proj, the MLP's two or three matmuls, the MAP head, heads), as fvcore and
        ``torch.utils.flop_counter`` do; norms, softmax, GELU and adds are excluded. FLOPs = 2 x MACs.
        A block removed at ``dims`` (depth: :func:`vitopt.arch.structure.removed_units`) costs 0.
        Returns ``{"patch_embed": .., "blocks.i": .., "pool": .., "head": .., "total": ..}``.
        """
        D, N = dims["embed"], self.num_tokens(model)
        gone = removed_units({"blocks": [f"blocks.{i}" for i in range(len(model.blocks))]}, dims)
        conv = model.patch_embed.proj
        k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        out = {"patch_embed": int(model.patch_embed.num_patches) * D * k}
        for i, blk in enumerate(model.blocks):
            A = dims[f"blocks.{i}.heads"] * dims[f"blocks.{i}.head_dim"]
            m = dims[f"blocks.{i}.mlp"]
            gate = N * D * A if isinstance(getattr(blk.attn, "gate", None), nn.Linear) else 0
            out[f"blocks.{i}"] = 0 if f"blocks.{i}" in gone else (N * D * 3 * A + gate + 2 * N * N * A + N * A * D
                                                                   + parts.mlp_macs(blk.mlp, N, D, m))
        pool = getattr(model, "attn_pool", None)
        pooled = N if getattr(model, "pool_include_prefix", False) else int(model.patch_embed.num_patches)
        out["pool"] = parts.pool_macs(pool, pooled, D)
        out["head"] = sum(D * getattr(model, h).out_features for h in ("head", "head_dist")
                          if isinstance(getattr(model, h, None), nn.Linear))
        out["total"] = sum(out.values())
        return out
