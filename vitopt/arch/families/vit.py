"""Structure of timm ``VisionTransformer`` models: ViT, DeiT, DeiT-distilled, DeiT III, register tokens.

Groups (docs/architecture.md, "The Structure"):

* ``embed`` - the residual width: patch_embed.proj out, cls/dist/reg tokens, pos_embed, every
  LayerNorm on the residual stream, qkv in, proj out, fc1 in, fc2 out, LayerScale gammas, the final
  norm / fc_norm, head and head_dist in. Pruned consistently everywhere, as in UP-ViTs
  (Yu & Wu 2021, arXiv 2111.15127).
* ``blocks.i.heads`` - attention heads of block i (qkv rows, proj columns).
* ``blocks.i.head_dim`` - per-head q/k/v dims of block i, uniform across the block's heads so fused
  attention kernels still apply (the q, k and v index j is removed together in every head).
* ``blocks.i.mlp`` - MLP hidden neurons of block i (fc1 rows, fc2 columns).
* ``blocks`` - depth: one unit per transformer block (``Structure.units``: ``blocks.i``). Its choke
  points are the outputs of ``attn.proj`` and ``mlp.fc2`` of block i (both residual branches, before
  LayerScale): a 0 there makes the block the identity, which is what surgery builds by taking the
  block out of ``model.blocks`` (Gromov et al. 2024, arXiv 2403.17887; Men et al. 2024, ShortGPT,
  arXiv 2403.03853).

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
from timm.layers import LayerScale, Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitopt.arch.structure import AxisLayout, ChokePoint, Group, Structure, removed_units, skeleton_depth
from vitopt.errors import VitoptError

__all__ = ["VitFamily"]


def _is_ln(module: nn.Module | None) -> bool:
    return isinstance(module, nn.LayerNorm)


class VitFamily:
    """The family of timm ``VisionTransformer`` (and ``VisionTransformerDistilled``) models."""

    name = "vit"
    description = ("timm VisionTransformer: vit_*, deit_* (incl. distilled), deit3_*, ViTs with register "
                   "tokens or global average pooling, qkv with or without bias")

    # ----------------------------------------------------------------------------------------- checks
    def matches(self, model: nn.Module) -> bool:
        """True for timm ``VisionTransformer`` and its subclasses."""
        return isinstance(model, VisionTransformer)

    def check_supported(self, model: nn.Module) -> None:
        """Raise VitoptError naming the first feature of ``model`` the ViT structure cannot prune."""
        if getattr(model, "attn_pool", None) is not None:
            raise VitoptError("ViTs with an attention-pool (global_pool='map') head are not supported; "
                              "use global_pool 'token' or 'avg'.")
        if not isinstance(model.patch_embed.proj, nn.Conv2d):
            raise VitoptError("the ViT's patch_embed.proj must be a Conv2d (timm's PatchEmbed).")
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
                if not isinstance(getattr(attn, flag), nn.Identity):
                    raise VitoptError(f"{where}.attn.{flag} is set (qk_norm/scale_norm); this ViT variant "
                                      "is not supported.")
            if getattr(attn, "gate", None) is not None:
                raise VitoptError(f"{where}.attn has a gated output; gated attention is not supported.")
            if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
                raise VitoptError(f"{where}.mlp is a {type(blk.mlp).__name__} (or has a hidden norm); "
                                  "only timm's two-layer Mlp is supported.")
            for norm in ("norm1", "norm2"):
                if not _is_ln(getattr(blk, norm)):
                    raise VitoptError(f"{where}.{norm} is a {type(getattr(blk, norm)).__name__}; only "
                                      "LayerNorm is supported on the residual stream.")

    # -------------------------------------------------------------------------------------- structure
    def read_dims(self, model: nn.Module) -> dict[str, int]:
        """Current dims: ``{"embed": D, "blocks": depth, "blocks.i.heads": H, "blocks.i.head_dim": d,
        "blocks.i.mlp": m}``."""
        dims = {"embed": int(model.embed_dim), "blocks": len(model.blocks)}
        for i, blk in enumerate(model.blocks):
            dims[f"blocks.{i}.heads"] = int(blk.attn.num_heads)
            dims[f"blocks.{i}.head_dim"] = int(blk.attn.head_dim)
            dims[f"blocks.{i}.mlp"] = int(blk.mlp.fc1.out_features)
        return dims

    def structure(self, model: nn.Module) -> Structure:
        """Build the :class:`Structure` of ``model`` at its current dims.

        Raises:
            VitoptError: the model uses a variant :meth:`check_supported` rejects.
        """
        self.check_supported(model)
        dims = self.read_dims(model)
        E = ("embed", dims["embed"])
        groups = {"embed": Group("embed", "embed", None, dims["embed"]),
                  "blocks": Group("blocks", "blocks", None, dims["blocks"])}
        layouts: list[AxisLayout] = []
        chokes: dict[str, list[ChokePoint]] = {"embed": [ChokePoint("norm_pre", "input", (E,))], "blocks": []}
        norms: list[str] = []
        params = dict(model.named_parameters())

        def lay(name: str, axis: int, *factors) -> None:
            if name in params:
                layouts.append(AxisLayout(name, axis, tuple(factors)))

        def ln(prefix: str) -> None:
            mod = model.get_submodule(prefix) if prefix else model
            if _is_ln(mod):
                lay(f"{prefix}.weight", 0, E)
                lay(f"{prefix}.bias", 0, E)
                norms.append(prefix)

        lay("patch_embed.proj.weight", 0, E)
        lay("patch_embed.proj.bias", 0, E)
        ln("patch_embed.norm")
        for tok in ("cls_token", "reg_token", "dist_token", "pos_embed"):
            lay(tok, 2, E)
        ln("norm_pre")
        for i, _blk in enumerate(model.blocks):
            p = f"blocks.{i}"
            H = (f"{p}.heads", dims[f"{p}.heads"])
            d = (f"{p}.head_dim", dims[f"{p}.head_dim"])
            M = (f"{p}.mlp", dims[f"{p}.mlp"])
            for kind, (gname, size) in (("heads", H), ("head_dim", d), ("mlp", M)):
                groups[gname] = Group(gname, kind, i, size)
            ln(f"{p}.norm1")
            lay(f"{p}.attn.qkv.weight", 0, (None, 3), H, d)
            lay(f"{p}.attn.qkv.bias", 0, (None, 3), H, d)
            lay(f"{p}.attn.qkv.weight", 1, E)
            lay(f"{p}.attn.proj.weight", 1, H, d)
            lay(f"{p}.attn.proj.weight", 0, E)
            lay(f"{p}.attn.proj.bias", 0, E)
            lay(f"{p}.ls1.gamma", 0, E)
            ln(f"{p}.norm2")
            lay(f"{p}.mlp.fc1.weight", 0, M)
            lay(f"{p}.mlp.fc1.bias", 0, M)
            lay(f"{p}.mlp.fc1.weight", 1, E)
            lay(f"{p}.mlp.fc2.weight", 1, M)
            lay(f"{p}.mlp.fc2.weight", 0, E)
            lay(f"{p}.mlp.fc2.bias", 0, E)
            lay(f"{p}.ls2.gamma", 0, E)
            chokes[H[0]] = [ChokePoint(f"{p}.attn.proj", "input", (H, d))]
            chokes[d[0]] = [ChokePoint(f"{p}.attn.qkv", "output", ((None, 3), H, d))]
            chokes[M[0]] = [ChokePoint(f"{p}.mlp.fc2", "input", (M,))]
            chokes["embed"] += [ChokePoint(f"{p}.attn.proj", "output", (E,)),
                                ChokePoint(f"{p}.mlp.fc2", "output", (E,))]
            chokes["blocks"] += [ChokePoint(f"{p}.attn.proj", "output", (), unit=i),
                                 ChokePoint(f"{p}.mlp.fc2", "output", (), unit=i)]
        ln("norm")
        ln("fc_norm")
        for head in ("head", "head_dist"):
            if isinstance(getattr(model, head, None), nn.Linear):
                lay(f"{head}.weight", 1, E)
        return Structure(self.name, groups, layouts, chokes, {"embed": norms},
                         units={"blocks": [f"blocks.{i}" for i in range(len(model.blocks))]})

    # ----------------------------------------------------------------------------- attribute updates
    def set_dims(self, model: nn.Module, dims: dict[str, int]) -> None:
        """Update module attributes after the parameters were resized to ``dims``.

        Sets ``embed_dim``, ``num_features``, ``head_hidden_size``, every Linear's/Conv's feature
        counts and LayerNorm's ``normalized_shape``, and per block ``attn.num_heads``,
        ``attn.head_dim``, ``attn.attn_dim`` and ``attn.scale = head_dim ** -0.5``.
        """
        D = dims["embed"]
        model.embed_dim = model.num_features = D
        if hasattr(model, "head_hidden_size"):
            model.head_hidden_size = D
        model.patch_embed.proj.out_channels = D
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm) and mod.weight is not None:
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
            blk.mlp.fc1.in_features, blk.mlp.fc1.out_features = D, m
            blk.mlp.fc2.in_features, blk.mlp.fc2.out_features = m, D

    @torch.no_grad()
    def fold_before_surgery(self, model: nn.Module, new_dims: dict[str, int]) -> None:
        """Fold the attention-scale change of a head_dim prune into the q rows of qkv.

        For block i going from head_dim d to d', q rows (weight and bias) are multiplied by
        sqrt(d'/d) so that (q' . k) / sqrt(d') == (q . k) / sqrt(d) on the kept dims.
        """
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            new_d = new_dims.get(f"blocks.{i}.head_dim", attn.head_dim)
            if new_d == attn.head_dim:
                continue
            ratio = math.sqrt(new_d / attn.head_dim)
            attn.qkv.weight[: attn.attn_dim] *= ratio
            if attn.qkv.bias is not None:
                attn.qkv.bias[: attn.attn_dim] *= ratio

    def constructor_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """``timm.create_model`` kwargs that rebuild ``model``'s skeleton (before :func:`resize_to` sets the dims).

        Read back from the model: input size, patch size, channels, classes, pooling, depth, and the
        flags that decide which parameters exist (qkv bias, class/register tokens, LayerScale, pre-norm,
        fc_norm). ``num_heads`` is 1 (any value works: the stored dims set the real heads). A depth-pruned
        model's ``depth`` is that of the skeleton holding its kept blocks (:func:`~vitopt.arch.structure.skeleton_depth`).
        """
        pe, blk = model.patch_embed, model.blocks[0]
        return {"img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
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

    # ------------------------------------------------------------------------------------------ cost
    def num_tokens(self, model: nn.Module) -> int:
        """Sequence length N seen by the blocks: patches plus prefix (cls/dist/register) tokens."""
        return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)

    def macs(self, model: nn.Module, dims: dict[str, int]) -> dict[str, int]:
        """Multiply-accumulates of one image's forward pass at ``dims``, by part.

        Counts every matmul and convolution (patch embedding, qkv, q@k^T, attn@v, proj, fc1, fc2,
        heads), as fvcore and ``torch.utils.flop_counter`` do; norms, softmax, GELU and adds are
        excluded. FLOPs = 2 x MACs. A block removed at ``dims`` (depth:
        :func:`vitopt.arch.structure.removed_units`) costs 0. Returns ``{"patch_embed": .., "blocks.i": ..,
        "head": .., "total": ..}``.
        """
        D, N = dims["embed"], self.num_tokens(model)
        gone = removed_units({"blocks": [f"blocks.{i}" for i in range(len(model.blocks))]}, dims)
        conv = model.patch_embed.proj
        k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        out = {"patch_embed": int(model.patch_embed.num_patches) * D * k}
        for i in range(len(model.blocks)):
            A = dims[f"blocks.{i}.heads"] * dims[f"blocks.{i}.head_dim"]
            m = dims[f"blocks.{i}.mlp"]
            out[f"blocks.{i}"] = 0 if f"blocks.{i}" in gone else N * D * 3 * A + 2 * N * N * A + N * A * D + 2 * N * D * m
        out["head"] = sum(D * getattr(model, h).out_features for h in ("head", "head_dist")
                          if isinstance(getattr(model, h, None), nn.Linear))
        out["total"] = sum(out.values())
        return out
