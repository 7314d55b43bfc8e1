"""Structure of timm ``Eva`` models: EVA-02 (Fang et al. 2023, arXiv 2303.11331), DINOv3-style ViTs
(Simeoni et al. 2025, arXiv 2508.10104), PE and the ``vit_*_rope_*`` models built on ``timm/models/eva.py``.

Groups (docs/architecture.md, "The Structure"):

* ``embed`` - the residual width, consistently everywhere as in UP-ViTs (Yu & Wu 2021, arXiv
  2111.15127): patch_embed.proj out, cls/reg tokens, pos_embed, every residual LayerNorm, q/k/v (or
  fused qkv) in, proj out, LayerScale ``gamma_1``/``gamma_2``, MLP in/out, the output gate in, the
  final norm / fc_norm, the MAP head (:mod:`vitopt.arch.parts`) and the classifier in.
* ``blocks.i.heads`` - heads of block i: rows ``(heads) x (head_dim)`` of q/k/v (fused
  ``(3) x (heads) x (head_dim)``), ``q_bias``/``v_bias`` (and the zero ``k_bias`` buffer), the
  attention-output norm (``scale_attn_inner``, over ``(heads) x (head_dim)``, renormalised over kept
  heads), the output gate rows, proj columns. qk_norm (over head_dim) is untouched by a heads prune.
* ``blocks.i.head_dim`` - only for models without rotary position embedding (EVA-01 style).
  **With RoPE, head_dim is fixed**: the rotary embedding rotates pairs of q/k dims by frequencies
  laid out over the whole head_dim (timm builds one table for ``embed_dim // num_heads`` shared by all
  blocks), so removing dims would change the frequencies of the dims that stay. ``head_dim`` is then
  not a group kind of the model, and naming it (``groups: [head_dim]``) is refused with a VitoptError
  by :func:`vitopt.pruning.importance.select_groups`. Heads, MLP and embed prune as usual.
* ``blocks.i.mlp`` - MLP hidden neurons: Mlp, packed SwiGLU (GluMlp, EVA-02 tiny/small) or SwiGLU with
  its sub-LN hidden norm (``scale_mlp``, EVA-02 base/large), gate and value rows together.
* ``blocks`` - depth, as for ViT (:mod:`vitopt.arch.families.vit`): choke points on the outputs of
  ``attn.proj`` and ``mlp.fc2`` of block i (both residual branches, before LayerScale); the shared rotary
  table does not depend on the block index, so removing blocks leaves it as it is.

timm's ``EvaAttention.forward`` reshapes the attention output to its input width, which a heads or
embed prune breaks; :meth:`EvaFamily.set_dims` binds :func:`vitopt.arch.forwards.eva_attention_forward`
(timm's forward with that one reshape taking ``num_heads * head_dim``). ``AttentionRope`` (``attn_type='rope'``)
already uses its attention width.

Not supported, each refused with a sentence naming the module: post-norm blocks (``use_post_norm``),
``rope_type='mixed'`` (learnable per-head frequencies), grouped-query attention (``num_kv_heads``),
norms other than LayerNorm / RmsNorm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import GluMlp, SwiGLU
from timm.layers.attention import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from vitopt.arch import parts
from vitopt.arch.builder import StructureBuilder, is_token_norm
from vitopt.arch.forwards import eva_attention_forward, install
from vitopt.arch.structure import Structure, removed_units, skeleton_depth
from vitopt.errors import VitoptError

__all__ = ["EvaFamily"]


def _q_rows(attn: nn.Module) -> list[torch.Tensor]:
    """The tensors holding q's rows (weight and bias) whose first ``num_heads * head_dim`` entries are q."""
    if attn.qkv is not None:
        out = [attn.qkv.weight] + ([attn.qkv.bias] if attn.qkv.bias is not None else [])
        return out + ([attn.q_bias] if getattr(attn, "q_bias", None) is not None else [])
    return [attn.q_proj.weight] + ([attn.q_proj.bias] if attn.q_proj.bias is not None else [])


class EvaFamily:
    """The family of timm ``Eva`` models (EVA-02, DINOv3, PE, ``vit_*_rope_*``)."""

    name = "eva"
    description = ("timm Eva: eva02_*, vit_*_dinov3, vit_pe_*, vit_*_rope_* (RoPE with fixed head_dim, fused or "
                   "separate q/k/v, SwiGLU with sub-LN, LayerScale, registers, MAP head)")

    # ----------------------------------------------------------------------------------------- checks
    def matches(self, model: nn.Module) -> bool:
        """True for timm ``Eva`` and its subclasses."""
        return isinstance(model, Eva)

    def check_supported(self, model: nn.Module) -> None:
        """Raise VitoptError naming the first module and feature of ``model`` the Eva structure cannot prune."""
        if getattr(model, "rope_mixed", False):
            raise VitoptError("the Eva model's rope is rope_type='mixed' (learnable per-head rotary frequencies); "
                              "not supported.")
        if not isinstance(model.patch_embed.proj, nn.Conv2d):
            raise VitoptError("the Eva model's patch_embed.proj must be a Conv2d (timm's PatchEmbed).")
        for name in ("patch_embed.norm", "norm_pre", "norm", "fc_norm"):
            parts.check_norm_or_identity(f"the Eva model's {name}", model.get_submodule(name))
        parts.check_pool(model.attn_pool)
        for i, blk in enumerate(model.blocks):
            where = f"blocks.{i}"
            if type(blk) is not EvaBlock:
                raise VitoptError(f"{where} is a {type(blk).__name__}; only timm's pre-norm EvaBlock is supported "
                                  "(use_post_norm=False).")
            attn = blk.attn
            if type(attn) not in (EvaAttention, AttentionRope):
                raise VitoptError(f"{where}.attn is a {type(attn).__name__}; only EvaAttention and AttentionRope "
                                  "are supported.")
            if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
                raise VitoptError(f"{where}.attn uses grouped-query attention (num_kv_heads); not supported.")
            for flag in ("q_norm", "k_norm", "norm"):
                parts.check_norm_or_identity(f"{where}.attn.{flag}", getattr(attn, flag))
            parts.check_mlp(f"{where}.mlp", blk.mlp)
            for norm in ("norm1", "norm2"):
                if not is_token_norm(getattr(blk, norm)):
                    raise VitoptError(f"{where}.{norm} is a {type(getattr(blk, norm)).__name__}; only LayerNorm or RmsNorm "
                                      "or RmsNorm is supported on the residual stream.")

    def head_dim_fixed(self, model: nn.Module) -> bool:
        """True when the model uses rotary position embedding (head_dim is then not a group)."""
        return model.rope is not None

    # -------------------------------------------------------------------------------------- structure
    def read_dims(self, model: nn.Module) -> dict[str, int]:
        """Current dims: ``embed``, ``blocks`` (depth), per block ``heads``, ``mlp`` and, without RoPE, ``head_dim``."""
        dims = {"embed": int(model.embed_dim), "blocks": len(model.blocks)}
        fixed = self.head_dim_fixed(model)
        for i, blk in enumerate(model.blocks):
            dims[f"blocks.{i}.heads"] = int(blk.attn.num_heads)
            if not fixed:
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
        for tok in ("cls_token", "reg_token", "pos_embed"):
            b.lay(tok, 2, E)
        b.ln("norm_pre", E)
        for i, blk in enumerate(model.blocks):
            p, a = f"blocks.{i}", f"blocks.{i}.attn"
            H = b.group(f"{p}.heads", "heads", dims[f"{p}.heads"], block=i)
            if f"{p}.head_dim" in dims:
                d = b.group(f"{p}.head_dim", "head_dim", dims[f"{p}.head_dim"], block=i)
            else:
                d = (None, int(blk.attn.head_dim))
            M = b.group(f"{p}.mlp", "mlp", dims[f"{p}.mlp"], block=i)
            b.ln(f"{p}.norm1", E)
            if blk.attn.qkv is not None:
                b.lay(f"{a}.qkv.weight", 0, (None, 3), H, d)
                b.lay(f"{a}.qkv.bias", 0, (None, 3), H, d)
                b.lay(f"{a}.qkv.weight", 1, E)
                b.lay(f"{a}.q_bias", 0, H, d)
                b.lay(f"{a}.v_bias", 0, H, d)
            else:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    b.lay(f"{a}.{proj}.weight", 0, H, d)
                    b.lay(f"{a}.{proj}.bias", 0, H, d)
                    b.lay(f"{a}.{proj}.weight", 1, E)
            heads_at = parts.lay_attn_extras(b, a, blk.attn, E, H, d)
            b.lay(f"{a}.proj.weight", 1, H, d)
            b.lay(f"{a}.proj.weight", 0, E)
            b.lay(f"{a}.proj.bias", 0, E)
            b.lay(f"{p}.gamma_1", 0, E)
            b.ln(f"{p}.norm2", E)
            parts.lay_mlp(b, f"{p}.mlp", blk.mlp, E, M)
            b.lay(f"{p}.gamma_2", 0, E)
            b.choke(H[0], heads_at, "input", H, d)
            if d[0] is not None:
                # EvaAttention's fused qkv with q/v bias runs F.linear on qkv.weight (no module call), so
                # head_dim is masked where q and k pass through modules (q_norm/k_norm, Identity or not)
                # and, for v, at the heads choke point
                b.choke(d[0], f"{a}.q_norm", "output", d)
                b.choke(d[0], f"{a}.k_norm", "output", d)
                b.choke(d[0], heads_at, "input", H, d)
            b.choke("embed", f"{a}.proj", "output", E)
            b.choke("embed", f"{p}.mlp.fc2", "output", E)
            # depth: both residual branches of block i (before LayerScale); 0 makes the block the identity
            b.unit_choke("blocks", f"{a}.proj", "output", i)
            b.unit_choke("blocks", f"{p}.mlp.fc2", "output", i)
        b.ln("norm", E)
        if model.attn_pool is not None:
            parts.lay_pool(b, "attn_pool", E)
        b.ln("fc_norm", E)
        if isinstance(model.head, nn.Linear):
            b.lay("head.weight", 1, E)
        st = b.build()
        if self.head_dim_fixed(model):
            st.fixed_kinds["head_dim"] = (
                "head_dim is fixed under rotary position embedding: blocks.0.attn of this Eva model rotates "
                "pairs of q/k dims by frequencies spread over the whole head_dim, so it cannot be pruned; "
                "prune heads, mlp or embed instead.")
        return st

    # ----------------------------------------------------------------------------- attribute updates
    def set_dims(self, model: nn.Module, dims: dict[str, int]) -> None:
        """Update module attributes after the parameters were resized to ``dims``.

        Sets ``embed_dim``/``num_features``/``head_hidden_size``, ``feature_info`` channel counts, every
        Linear's and Conv's feature counts and LayerNorm's ``normalized_shape``; per block
        ``num_heads``, ``head_dim``, ``scale = head_dim ** -0.5`` (and AttentionRope's ``attn_dim``,
        ``kv_dim``, ``num_kv_heads``), a zero ``k_bias`` buffer of the new width, and the width-agnostic
        :func:`~vitopt.arch.forwards.eva_attention_forward` on EvaAttention; the MAP head's widths.
        """
        D = dims["embed"]
        model.embed_dim = model.num_features = model.head_hidden_size = D
        for info in getattr(model, "feature_info", []):
            info["num_chs"] = D
        model.patch_embed.proj.out_channels = D
        for mod in model.modules():
            if is_token_norm(mod) and mod.weight is not None:
                mod.normalized_shape = (mod.weight.shape[0],)
        if isinstance(model.head, nn.Linear):
            model.head.in_features = D
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            h, m = dims[f"blocks.{i}.heads"], dims[f"blocks.{i}.mlp"]
            d = dims.get(f"blocks.{i}.head_dim", attn.head_dim)
            A = h * d
            attn.num_heads, attn.head_dim, attn.scale = h, d, d ** -0.5
            if isinstance(attn, AttentionRope):
                attn.attn_dim = attn.kv_dim = A
                attn.num_kv_heads, attn.num_kv_groups = h, 1
            if attn.qkv is not None:
                attn.qkv.in_features, attn.qkv.out_features = D, 3 * A
            else:
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.in_features, proj.out_features = D, A
            k_bias = getattr(attn, "k_bias", None)
            if isinstance(k_bias, torch.Tensor) and k_bias.numel() != A:
                attn.k_bias = torch.zeros(A, dtype=k_bias.dtype, device=k_bias.device)
            attn.proj.in_features, attn.proj.out_features = A, D
            parts.set_attn_extras(attn, D, A)
            parts.set_mlp_dims(blk.mlp, D, m)
            if isinstance(attn, EvaAttention):
                install(attn, eva_attention_forward)
        parts.set_pool_dims(model.attn_pool, D)

    @torch.no_grad()
    def fold_before_surgery(self, model: nn.Module, new_dims: dict[str, int]) -> None:
        """Fold the attention-scale change of a head_dim prune (models without RoPE) into q.

        q is multiplied by sqrt(d'/d): the q rows of qkv / q_proj and ``q_bias``, or, with qk_norm,
        the q_norm LayerNorm's weight and bias (q_norm would undo a scale on its input).
        """
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            new_d = new_dims.get(f"blocks.{i}.head_dim", attn.head_dim)
            if new_d == attn.head_dim:
                continue
            ratio = math.sqrt(new_d / attn.head_dim)
            if is_token_norm(attn.q_norm):
                tensors = [t for t in (attn.q_norm.weight, getattr(attn.q_norm, "bias", None)) if t is not None]
            else:
                rows = attn.num_heads * attn.head_dim
                tensors = [t[:rows] for t in _q_rows(attn)]
            for t in tensors:
                t *= ratio

    def constructor_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """``timm.create_model`` kwargs that rebuild ``model``'s skeleton (before :func:`resize_to` sets the dims).

        Read back from the model: input size, patch size, channels, classes, pooling, depth, and the
        flags that decide which parameters exist (fused qkv and its biases, qk_norm, SwiGLU and its
        sub-LN, the attention-output norm, attention type, LayerScale, class/register tokens, absolute
        and rotary position embedding, pre/post/fc norms, dynamic size). ``embed_dim`` and ``num_heads``
        are chosen so the skeleton's head_dim (and so its rotary table) is the model's; with a MAP head
        they are the head's attention width and ``embed_dim // head_dim``. RoPE's own settings
        (temperature, type, grid) are the model name's defaults.
        """
        pe, blk = model.patch_embed, model.blocks[0]
        attn, mlp = blk.attn, blk.mlp
        d = int(attn.head_dim)
        fused = attn.qkv is not None
        bias = (attn.q_proj.bias is not None if not fused
                else getattr(attn, "q_bias", None) is not None or attn.qkv.bias is not None)
        out: dict[str, Any] = {
            "img_size": list(pe.img_size), "patch_size": list(pe.patch_size), "in_chans": int(pe.proj.in_channels),
            "num_classes": int(model.num_classes), "global_pool": model.global_pool, "embed_dim": d,
            "depth": skeleton_depth(model, "blocks", len(model.blocks)), "num_heads": 1, "qkv_bias": bool(bias),
            "qkv_fused": fused,
            "qk_norm": not isinstance(attn.q_norm, nn.Identity),
            "swiglu_mlp": isinstance(mlp, (GluMlp, SwiGLU)),
            "scale_mlp": not isinstance(mlp.norm, nn.Identity),
            "scale_attn_inner": not isinstance(attn.norm, nn.Identity),
            "attn_type": "rope" if isinstance(attn, AttentionRope) else "eva",
            "init_values": 1e-5 if blk.gamma_1 is not None else None,
            "attn_only_layer_scale": blk.gamma_1 is not None and blk.gamma_2 is None,
            "class_token": model.cls_token is not None,
            "num_reg_tokens": int(model.reg_token.shape[1]) if model.reg_token is not None else 0,
            "no_embed_class": bool(model.no_embed_class), "use_abs_pos_emb": model.pos_embed is not None,
            "use_rot_pos_emb": model.rope is not None,
            "use_pre_transformer_norm": not isinstance(model.norm_pre, nn.Identity),
            "use_post_transformer_norm": not isinstance(model.norm, nn.Identity),
            "use_fc_norm": not isinstance(model.fc_norm, nn.Identity),
            "dynamic_img_size": bool(model.dynamic_img_size)}
        if isinstance(mlp, SwiGLU) and isinstance(mlp.norm, nn.Identity):
            out["swiglu_align_to"] = 1          # timm builds the split SwiGLU only with a norm or an alignment
        if model.attn_pool is not None:
            pk = parts.pool_kwargs(model.attn_pool)
            out.update(embed_dim=pk["width"], num_heads=max(pk["width"] // d, 1),
                       attn_pool_num_heads=pk["heads"], attn_pool_mlp_ratio=pk["mlp_ratio"])
        return out

    # ------------------------------------------------------------------------------------------ cost
    def num_tokens(self, model: nn.Module) -> int:
        """Sequence length N seen by the blocks: patches plus prefix (cls/register) tokens."""
        return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)

    def macs(self, model: nn.Module, dims: dict[str, int]) -> dict[str, int]:
        """Multiply-accumulates of one image's forward pass at ``dims``, by part.

        Counts every matmul and convolution: patch embedding, q/k/v (fused or not: ``N*D*3A``), the
        output gate ``N*D*A``, q@k^T and attn@v ``2*N*N*A``, proj ``N*A*D``, the MLP's two or three
        matmuls, the MAP head over all N tokens and the classifier, as ``torch.utils.flop_counter``
        does. Rotary embedding, norms, softmax, activations and adds are elementwise and not counted.
        FLOPs = 2 x MACs. Returns ``{"patch_embed": .., "blocks.i": .., "pool": .., "head": .., "total": ..}``.
        """
        D, N = dims["embed"], self.num_tokens(model)
        gone = removed_units({"blocks": [f"blocks.{i}" for i in range(len(model.blocks))]}, dims)
        conv = model.patch_embed.proj
        k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        out = {"patch_embed": int(model.patch_embed.num_patches) * D * k}
        for i, blk in enumerate(model.blocks):
            A = dims[f"blocks.{i}.heads"] * dims.get(f"blocks.{i}.head_dim", int(blk.attn.head_dim))
            gate = N * D * A if isinstance(getattr(blk.attn, "gate", None), nn.Linear) else 0
            out[f"blocks.{i}"] = 0 if f"blocks.{i}" in gone else (
                N * D * 3 * A + gate + 2 * N * N * A + N * A * D + parts.mlp_macs(blk.mlp, N, D, dims[f"blocks.{i}.mlp"]))
        out["pool"] = parts.pool_macs(model.attn_pool, N, D)
        out["head"] = D * model.head.out_features if isinstance(model.head, nn.Linear) else 0
        out["total"] = sum(out.values())
        return out
