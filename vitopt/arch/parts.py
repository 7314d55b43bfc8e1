"""Structure pieces shared by the ViT-like families (:mod:`~vitopt.arch.families.vit`, :mod:`~vitopt.arch.families.eva`).

* MLPs: timm ``Mlp`` (fc1 -> act -> [norm] -> fc2), ``GluMlp`` / ``SwiGLUPacked`` (fc1 rows laid out
  ``(2) x (hidden)``: value and gate halves, chunked on the last dim) and ``SwiGLU`` (two Linears
  ``fc1_g`` and ``fc1_x``). One ``mlp`` unit is one hidden neuron: its fc1 row (both the gate row and
  the value row for the gated MLPs), its channel of the hidden norm (sub-LN, ``scale_mlp``) and its
  fc2 column. MACs: two matmuls per token for ``Mlp``, three for the gated ones (Shazeer 2020,
  arXiv 2002.05202).
* Attention extras: ``q_norm`` / ``k_norm`` (qk_norm, a LayerNorm over head_dim, sliced by a
  head_dim prune and left alone by a heads prune), the attention-output norm (``scale_norm`` /
  Eva's ``scale_attn_inner``, a LayerNorm over ``(heads) x (head_dim)``) and the sigmoid output gate
  (``gated``, a Linear ``embed -> (heads) x (head_dim)``).
* The MAP head (``AttentionPoolLatent``, SigLIP, Zhai et al. 2023, arXiv 2303.15343): the residual
  width runs through the latent query, q's and kv's inputs, proj's output, the pool's norm and its
  MLP's input and output; the pool's own attention width (its heads x head_dim) and MLP hidden stay
  whole. timm's forward reshapes the attention output to the input width, so a pruned pool gets the
  width-agnostic forward of :mod:`vitopt.arch.forwards`.

With a hidden norm (MLP) or an attention-output norm, the choke point of the pruned units is the
norm's *input* and the norm is renormalised over kept units (invariant 1 of docs/architecture.md):
multiplying after the norm would leave its statistics over removed units.
"""

from __future__ import annotations

from typing import Any

from timm.layers import AttentionPoolLatent, GluMlp, Mlp, SwiGLU
from torch import nn

from vitopt.arch.builder import StructureBuilder, is_token_norm
from vitopt.arch.forwards import attention_pool_latent_forward, install
from vitopt.arch.structure import Factor
from vitopt.errors import VitoptError

__all__ = ["check_mlp", "mlp_hidden", "lay_mlp", "set_mlp_dims", "mlp_macs", "check_norm_or_identity",
           "lay_attn_extras", "set_attn_extras", "check_pool", "lay_pool", "set_pool_dims", "pool_macs",
           "pool_kwargs"]


# ----------------------------------------------------------------------------------------------- MLP
def check_mlp(where: str, mlp: nn.Module) -> None:
    """Raise VitoptError unless ``mlp`` is a token-wise timm Mlp, GluMlp/SwiGLUPacked or SwiGLU with an
    optional LayerNorm / RmsNorm hidden norm."""
    if type(mlp) not in (Mlp, GluMlp, SwiGLU):
        raise VitoptError(f"{where} is a {type(mlp).__name__}; only timm's Mlp, GluMlp/SwiGLUPacked and SwiGLU "
                          "MLPs are supported.")
    if type(mlp) in (Mlp, GluMlp) and not isinstance(mlp.fc1, nn.Linear):
        raise VitoptError(f"{where} uses 1x1 convolutions (use_conv=True); only Linear MLPs are supported.")
    check_norm_or_identity(f"{where}.norm", mlp.norm)


def check_norm_or_identity(where: str, norm: nn.Module) -> None:
    """Raise VitoptError unless ``norm`` is a LayerNorm, an RMS norm or Identity (BatchNorm etc. are not supported)."""
    if not (is_token_norm(norm) or isinstance(norm, nn.Identity)):
        raise VitoptError(f"{where} is a {type(norm).__name__}; only LayerNorm, RmsNorm or no norm is supported there.")


def mlp_hidden(mlp: nn.Module) -> int:
    """Hidden neurons of ``mlp`` (for GluMlp, half of fc1's rows: one unit = one gate row + one value row)."""
    if isinstance(mlp, SwiGLU):
        return int(mlp.fc1_g.out_features)
    if isinstance(mlp, GluMlp):
        return int(mlp.fc1.out_features) // 2
    return int(mlp.fc1.out_features)


def lay_mlp(b: StructureBuilder, prefix: str, mlp: nn.Module, E: Factor, M: Factor) -> None:
    """Layouts of ``mlp`` at ``prefix`` over embed ``E`` and hidden ``M``; the hidden norm (renormalised
    under M) and M's choke point (the hidden norm's input if there is one, else fc2's input)."""
    if isinstance(mlp, SwiGLU):
        for fc in ("fc1_g", "fc1_x"):
            b.lay(f"{prefix}.{fc}.weight", 0, M)
            b.lay(f"{prefix}.{fc}.bias", 0, M)
            b.lay(f"{prefix}.{fc}.weight", 1, E)
    else:
        rows = ((None, 2), M) if isinstance(mlp, GluMlp) else (M,)
        b.lay(f"{prefix}.fc1.weight", 0, *rows)
        b.lay(f"{prefix}.fc1.bias", 0, *rows)
        b.lay(f"{prefix}.fc1.weight", 1, E)
    b.ln(f"{prefix}.norm", M)
    b.lay(f"{prefix}.fc2.weight", 1, M)
    b.lay(f"{prefix}.fc2.weight", 0, E)
    b.lay(f"{prefix}.fc2.bias", 0, E)
    if is_token_norm(mlp.norm):
        b.choke(M[0], f"{prefix}.norm", "input", M)
    else:
        b.choke(M[0], f"{prefix}.fc2", "input", M)


def set_mlp_dims(mlp: nn.Module, D: int, m: int) -> None:
    """Set ``mlp``'s Linear feature counts to embed ``D`` and hidden ``m`` (LayerNorm shapes are set by the caller)."""
    if isinstance(mlp, SwiGLU):
        for fc in (mlp.fc1_g, mlp.fc1_x):
            fc.in_features, fc.out_features = D, m
    else:
        mlp.fc1.in_features = D
        mlp.fc1.out_features = 2 * m if isinstance(mlp, GluMlp) else m
    mlp.fc2.in_features, mlp.fc2.out_features = m, D


def mlp_macs(mlp: nn.Module, tokens: int, D: int, m: int) -> int:
    """MACs of ``mlp`` over ``tokens`` tokens: ``2*N*D*m`` for Mlp, ``3*N*D*m`` for GluMlp / SwiGLU
    (gate, value and output matmuls)."""
    return (3 if isinstance(mlp, (GluMlp, SwiGLU)) else 2) * tokens * D * m


# ------------------------------------------------------------------------------------ attention extras
def lay_attn_extras(b: StructureBuilder, prefix: str, attn: nn.Module, E: Factor, H: Factor, d: Factor) -> str:
    """Layouts of qk_norm, the attention-output norm and the output gate of ``attn`` at ``prefix``.

    ``d`` is the head_dim factor: a group, or ``(None, head_dim)`` where head_dim is fixed (RoPE).
    Returns the module whose *input* is the heads choke point: the output norm when there is one
    (so its statistics can be taken over kept heads), else ``proj``.
    """
    for qk in ("q_norm", "k_norm"):
        if is_token_norm(getattr(attn, qk, None)):
            b.lay(f"{prefix}.{qk}.weight", 0, d)
            b.lay(f"{prefix}.{qk}.bias", 0, d)
            if d[0] is not None:
                b.norms.setdefault(d[0], []).append(f"{prefix}.{qk}")
    gate = getattr(attn, "gate", None)
    if isinstance(gate, nn.Linear):
        b.lay(f"{prefix}.gate.weight", 0, H, d)
        b.lay(f"{prefix}.gate.bias", 0, H, d)
        b.lay(f"{prefix}.gate.weight", 1, E)
    if is_token_norm(getattr(attn, "norm", None)):
        b.lay(f"{prefix}.norm.weight", 0, H, d)
        b.lay(f"{prefix}.norm.bias", 0, H, d)
        for g in (H[0], d[0]):
            if g is not None:
                b.norms.setdefault(g, []).append(f"{prefix}.norm")
        b.norm_factors[f"{prefix}.norm"] = (H, d)
        return f"{prefix}.norm"
    return f"{prefix}.proj"


def set_attn_extras(attn: nn.Module, D: int, A: int) -> None:
    """Set the output gate's feature counts to embed ``D`` -> attention width ``A``."""
    gate = getattr(attn, "gate", None)
    if isinstance(gate, nn.Linear):
        gate.in_features, gate.out_features = D, A


# -------------------------------------------------------------------------------------- MAP pool head
def check_pool(pool: nn.Module | None, where: str = "attn_pool") -> None:
    """Raise VitoptError for a pooling head other than None or a prunable ``AttentionPoolLatent``."""
    if pool is None:
        return
    if type(pool) is not AttentionPoolLatent:
        raise VitoptError(f"{where} is a {type(pool).__name__}; only timm's AttentionPoolLatent (global_pool='map') "
                          "attention-pool head is supported.")
    if pool.pos_embed is not None:
        raise VitoptError(f"{where} has its own position embedding (pos_embed='abs'); not supported.")
    if not isinstance(pool.q, nn.Linear) or pool.mlp is None:
        raise VitoptError(f"{where} has no q projection or no output projection/MLP (out_features=0); only the "
                          "full SigLIP-style MAP head is supported.")
    if type(pool.mlp) is not Mlp or not isinstance(pool.mlp.norm, nn.Identity):
        raise VitoptError(f"{where}.mlp is a {type(pool.mlp).__name__}; only timm's two-layer Mlp is supported.")
    check_norm_or_identity(f"{where}.norm", pool.norm)


def lay_pool(b: StructureBuilder, prefix: str, E: Factor) -> None:
    """Layouts and embed choke points of the MAP head at ``prefix``: the residual width through the latent,
    q in, kv in, proj out, the pool's norm and its MLP in/out; heads, head_dim and MLP hidden stay whole."""
    b.lay(f"{prefix}.latent", 2, E)
    b.lay(f"{prefix}.q.weight", 1, E)
    b.lay(f"{prefix}.kv.weight", 1, E)
    b.lay(f"{prefix}.proj.weight", 0, E)
    b.lay(f"{prefix}.proj.bias", 0, E)
    b.ln(f"{prefix}.norm", E)
    b.lay(f"{prefix}.mlp.fc1.weight", 1, E)
    b.lay(f"{prefix}.mlp.fc2.weight", 0, E)
    b.lay(f"{prefix}.mlp.fc2.bias", 0, E)
    b.choke(E[0], f"{prefix}.q", "input", E)
    b.choke(E[0], f"{prefix}.kv", "input", E)
    b.choke(E[0], f"{prefix}.proj", "output", E)
    b.choke(E[0], f"{prefix}.mlp.fc2", "output", E)


def set_pool_dims(pool: nn.Module | None, D: int) -> None:
    """Set the MAP head's widths to residual width ``D`` and give it the width-agnostic forward."""
    if pool is None:
        return
    pool.latent_dim = pool.out_features = D
    pool.q.in_features = pool.kv.in_features = D
    pool.proj.out_features = D
    pool.mlp.fc1.in_features = pool.mlp.fc2.out_features = D
    install(pool, attention_pool_latent_forward)


def pool_macs(pool: nn.Module | None, tokens: int, D: int) -> int:
    """MACs of the MAP head over ``tokens`` input tokens at residual width ``D`` (L = latent_len,
    A = pool heads x head_dim, h = pool MLP hidden): q ``L*D*A``, kv ``N*D*2A``, q@k^T and attn@v
    ``2*L*N*A``, proj ``L*A*D``, MLP ``2*L*D*h``."""
    if pool is None:
        return 0
    L, A, h = int(pool.latent_len), int(pool.num_heads * pool.head_dim), int(pool.mlp.fc1.out_features)
    return L * D * A + tokens * D * 2 * A + 2 * L * tokens * A + L * A * D + 2 * L * D * h


def pool_kwargs(pool: nn.Module) -> dict[str, Any]:
    """The pool's attention width, heads and MLP ratio (to rebuild its skeleton)."""
    A = int(pool.num_heads * pool.head_dim)
    return {"width": A, "heads": int(pool.num_heads), "mlp_ratio": (int(pool.mlp.fc1.out_features) + 0.5) / A}
