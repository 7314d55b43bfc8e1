"""The ``eva`` family (issue 16 item 2): timm ``Eva`` as EVA-02 (fused qkv with q/v bias and packed SwiGLU;
separate q/k/v with SwiGLU + sub-LN), DINOv3 (RoPE, LayerScale, registers, no absolute position embedding,
dynamic size), PE (AttentionRope, MAP head) and EVA-01 (no RoPE: head_dim prunable).

For each: masked == surgered for every group kind (fused attention on and off), analytic FLOPs ==
``torch.utils.flop_counter`` (dense and pruned), ONNX parity with the attention pattern (RoPE as plain
ops), arch.json reload; head_dim under RoPE is refused with a sentence.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from hier_helpers import random_plan
from variant_helpers import (
    ALL,
    analytic_flops,
    check_flops,
    check_masked_equals_surgered,
    check_onnx,
    check_reload,
    counted_flops,
    perturb,
)

import vitopt
from vitopt.arch.families import family_of
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
VARIANTS = {
    # EVA-02 Ti: fused qkv, q_bias/v_bias (+ zero k_bias buffer), packed SwiGLU, RoPE 'cat'
    "eva02_tiny": ("eva02_tiny_patch14_224", dict(SMALL)),
    # EVA-02 B: separate q/k/v, SwiGLU with sub-LN (scale_mlp); plus attention-output norm, LayerScale, registers
    "eva02_base_subln": ("eva02_base_patch14_224", dict(SMALL, scale_attn_inner=True, init_values=0.1,
                                                        num_reg_tokens=2)),
    # DINOv3 S: RoPE 'dinov3' (rotate-half), LayerScale, 4 registers, no abs pos embed, no qkv bias, dynamic size
    "dinov3": ("vit_small_patch16_dinov3", dict(SMALL, global_pool="token")),
    # PE core: AttentionRope (attn_type='rope'), pre-norm, MAP head with 8 heads of its own, qk_norm
    "pe_map": ("vit_pe_core_tiny_patch16_384", dict(SMALL, qk_norm=True)),
    # EVA-01 style (no RoPE): head_dim is a group; qk_norm
    "eva01_norope": ("eva_giant_patch14_224", dict(SMALL, mlp_ratio=4.0, qk_norm=True)),
    # gated EvaAttention (EvaBlock's gated_attn; Eva has no kwarg for it, so _make adds the gate Linear)
    "eva02_gated": ("eva02_tiny_patch14_224", dict(SMALL)),
}
#: variants whose skeleton timm.create_model cannot rebuild from kwargs (the gate is added after construction)
NOT_RELOADABLE = {"eva02_gated"}
NAMES = list(VARIANTS)
KINDS = [("heads",), ("head_dim",), ("mlp",), ("embed",), ALL]


@functools.cache
def _make(variant: str) -> torch.nn.Module:
    name, kw = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw)
    if variant == "eva02_gated":
        for blk in model.blocks:
            blk.attn.gate = torch.nn.Linear(48, 48)          # what EvaAttention(gated=True) builds
    return perturb(model)


def make(variant: str) -> torch.nn.Module:
    return copy.deepcopy(_make(variant))


def img(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _kinds_of(variant: str, kinds: tuple[str, ...]) -> tuple[str, ...]:
    fixed = family_of(_make(variant)).head_dim_fixed(_make(variant))
    return tuple(k for k in kinds if not (fixed and k == "head_dim"))


def test_variants_build_what_they_claim():
    m = make("eva02_tiny")
    a = m.blocks[0].attn
    assert m.rope is not None and a.qkv is not None and a.q_bias is not None and a.k_bias.numel() == 48
    assert type(m.blocks[0].mlp).__name__ == "GluMlp"
    m = make("eva02_base_subln")
    a = m.blocks[0].attn
    assert a.qkv is None and a.q_proj.bias is not None and a.k_proj.bias is None
    assert type(m.blocks[0].mlp).__name__ == "SwiGLU" and m.blocks[0].mlp.norm.normalized_shape == (128,)
    assert a.norm.normalized_shape == (48,) and m.blocks[0].gamma_1 is not None and m.reg_token.shape[1] == 2
    m = make("dinov3")
    assert type(m.rope).__name__ == "RotaryEmbeddingDinoV3" and m.pos_embed is None and m.num_prefix_tokens == 5
    m = make("pe_map")
    assert type(m.blocks[0].attn).__name__ == "AttentionRope" and m.attn_pool.num_heads == 8
    assert make("eva01_norope").rope is None


@pytest.mark.parametrize("variant", NAMES)
@pytest.mark.parametrize("kinds", KINDS, ids=lambda k: "+".join(k))
@pytest.mark.parametrize("fused", [True, False])
def test_masked_equals_surgered(variant, kinds, fused):
    kinds = _kinds_of(variant, kinds)
    if not kinds:
        pytest.skip("head_dim is fixed under RoPE (test_head_dim_under_rope_is_refused)")
    check_masked_equals_surgered(make(variant), kinds, img(), fused)


def test_head_dim_under_rope_is_refused():
    model = make("eva02_tiny")
    st = vitopt.structure(model)
    assert not st.of_kind("head_dim") and len(st.of_kind("heads")) == 2
    with pytest.raises(VitoptError, match=r"head_dim.*fixed under rotary position embedding.*blocks\.0\.attn"):
        vitopt.prune(model, target={"flops": 0.8}, criterion="l1", compare="normalized", groups=["head_dim"])
    # without RoPE it is a group like in the ViT family
    assert len(vitopt.structure(make("eva01_norope")).of_kind("head_dim")) == 2


def test_heads_prune_slices_q_v_bias_and_k_bias_buffer():
    model = make("eva02_tiny")
    keep = [0, 2]
    pruned = apply_plan(model, KeepPlan({"blocks.0.heads": keep}))
    old, new = model.blocks[0].attn, pruned.blocks[0].attn
    rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in keep])
    assert torch.equal(new.q_bias, old.q_bias[rows]) and torch.equal(new.v_bias, old.v_bias[rows])
    assert new.k_bias.shape == (32,) and not new.k_bias.any()
    assert new.qkv.weight.shape == (96, 48) and new.num_heads == 2 and new.head_dim == 16


@pytest.mark.parametrize("variant", NAMES)
def test_analytic_flops_match_counter(variant):
    check_flops(make(variant), img(1))


def test_flops_terms_are_each_counted():
    """Dropping the MAP head, the third SwiGLU matmul or the output gate from the count would break the 0.5%
    agreement."""
    x = img(1)
    for variant in ("pe_map", "eva02_base_subln", "eva02_gated"):
        model = make(variant)
        fam = family_of(model)
        dims = fam.read_dims(model)
        N, D = fam.num_tokens(model), dims["embed"]
        share = {"pe_map": fam.macs(model, dims)["pool"],
                 "eva02_base_subln": sum(N * D * dims[f"blocks.{i}.mlp"] for i in range(2)),
                 "eva02_gated": sum(N * D * 16 * dims[f"blocks.{i}.heads"] for i in range(2))}[variant]
        assert 2 * share > 0.005 * counted_flops(model, x), variant
    assert analytic_flops(make("pe_map")) == counted_flops(make("pe_map"), x)


def test_dynamic_size_dinov3_runs_at_another_size_after_pruning():
    model = make("dinov3")
    assert model.dynamic_img_size
    pruned = apply_plan(model, random_plan(model, _kinds_of("dinov3", ALL), 4))
    with torch.no_grad():
        assert pruned(torch.randn(1, 3, 48, 40)).shape == (1, 5)


@pytest.mark.parametrize("variant", NAMES)
def test_onnx_parity_of_pruned_eva(variant, tmp_path):
    model = make(variant)
    pruned = apply_plan(model, random_plan(model, _kinds_of(variant, ALL), 5))
    check_onnx(pruned, tmp_path / "m.onnx", (3, 32, 32), 2 + (pruned.attn_pool is not None))


@pytest.mark.parametrize("variant", [v for v in NAMES if v not in NOT_RELOADABLE])
def test_reload_from_arch_json(variant, tmp_path):
    model = make(variant)
    pruned = apply_plan(model, random_plan(model, _kinds_of(variant, ALL), 6))
    check_reload(pruned, tmp_path, VARIANTS[variant][0], img())


def test_unsupported_eva_variants_are_named():
    model = timm.create_model("eva02_tiny_patch14_224", **SMALL, use_post_norm=True)
    with pytest.raises(VitoptError, match=r"blocks\.0 is a EvaBlockPostNorm"):
        family_of(model).structure(model)
    model = timm.create_model("vit_small_patch16_rope_mixed_224", **SMALL)
    with pytest.raises(VitoptError, match="rope_type='mixed'"):
        family_of(model).structure(model)
    model = timm.create_model("vit_pe_core_tiny_patch16_384", **dict(SMALL, num_heads=4), qkv_fused=False,
                              num_kv_heads=2)
    with pytest.raises(VitoptError, match=r"blocks\.0\.attn uses grouped-query attention"):
        family_of(model).structure(model)


def test_latency_table_prices_eva_with_fixed_head_dim():
    """A latency LUT measured on an EVA-02 model (head_dim fixed under RoPE) prices heads x head_dim and
    predicts the dense model; allocation's cost function accepts dims without head_dim."""
    from vitopt.arch.latency_table import cost_fn
    from vitopt.deploy.lut import measure_lut

    model = make("eva02_tiny")
    table = measure_lut(model, runtime="pytorch", grid_points=2, warmup=0, repeats=1, threads=1, progress=False)
    assert table.head_dim == 16 and table.attn_grid[-1] == 48
    cost = cost_fn(table, model)
    dense = cost({})
    assert dense == pytest.approx(table.predicted_model_ms, rel=1e-9)
    assert cost({"embed": 16, "blocks.0.heads": 1, "blocks.1.heads": 1, "blocks.0.mlp": 8}) <= dense
