"""timm VisionTransformer variants (issue 16 item 1): SwiGLUPacked/GluMlp and SwiGLU MLPs with and without a
hidden norm, qk_norm, the attention-output norm, gated attention, the SigLIP MAP head, register tokens with
no_embed_class, class_token=False, avg/token/map pooling, LayerScale and dynamic_img_size.

For each: masked == surgered for every group kind (fused attention on and off), analytic FLOPs ==
``torch.utils.flop_counter`` (dense and pruned), ONNX parity with the attention pattern, arch.json reload.
"""

from __future__ import annotations

import copy
import functools
from functools import partial

import pytest
import timm
import torch
from hier_helpers import random_plan  # noqa: E402
from timm.layers import SwiGLU
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

from vitopt.arch.families import family_of
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
#: variant -> (timm model name, kwargs, reloadable from arch.json: kwargs holding a class are not JSON)
VARIANTS = {
    # DINOv2 ViT-g style: SwiGLUPacked (GluMlp, fc1 rows (2) x hidden), LayerScale
    "dinov2": ("vit_giant_patch14_dinov2", dict(SMALL, mlp_ratio=4.0), True),
    # DINOv2 with registers: reg_tokens=4, no_embed_class, packed SwiGLU with a hidden norm (sub-LN)
    "dinov2_reg_subln": ("vit_giant_patch14_reg4_dinov2", dict(SMALL, mlp_ratio=4.0, scale_mlp_norm=True), True),
    # split SwiGLU (fc1_g, fc1_x) with a hidden norm, qk_norm, attention-output norm, no class token, avg pool
    "swiglu_qknorm": ("vit_small_patch16_224", dict(SMALL, mlp_layer=SwiGLU, act_layer="silu", qk_norm=True,
                                                     scale_attn_norm=True, scale_mlp_norm=True, class_token=False,
                                                     reg_tokens=2, global_pool="avg"), False),
    # gated attention (timm Attention(gated=True); VisionTransformer has no kwarg for it, so _make adds the
    # gate Linear the constructor would have made) with qk_norm, LayerScale, token pool
    "gated": ("vit_small_patch16_224", dict(SMALL, qk_norm=True, init_values=0.1), False),
    # SigLIP: MAP head (AttentionPoolLatent), no class token, qk_norm, dynamic_img_size
    "siglip": ("vit_base_patch16_siglip_224", dict(SMALL, qk_norm=True, dynamic_img_size=True), True),
    # AIMv2: RmsNorm everywhere (patch embed, residual, final), split SwiGLU, no qkv/proj bias, avg pool;
    # qk_norm (RmsNorm over head_dim) added
    "aimv2_rmsnorm": ("aimv2_large_patch14_224", dict(SMALL, qk_norm=True), True),
}
NAMES = list(VARIANTS)
KINDS = [("heads",), ("head_dim",), ("mlp",), ("embed",), ALL]


@functools.cache
def _make(variant: str) -> torch.nn.Module:
    name, kw, _ = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw)
    if variant == "gated":
        for blk in model.blocks:
            blk.attn.gate = torch.nn.Linear(48, blk.attn.attn_dim)      # what Attention(gated=True) builds
    return perturb(model)


def make(variant: str) -> torch.nn.Module:
    return copy.deepcopy(_make(variant))


def img(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_variants_build_what_they_claim():
    m = make("dinov2")
    assert type(m.blocks[0].mlp).__name__ == "GluMlp" and m.blocks[0].mlp.fc1.out_features == 2 * 96
    m = make("dinov2_reg_subln")
    assert m.num_reg_tokens == 4 and m.no_embed_class and m.blocks[0].mlp.norm.normalized_shape == (96,)
    m = make("swiglu_qknorm")
    blk = m.blocks[0]
    assert isinstance(blk.mlp, SwiGLU) and m.cls_token is None and m.global_pool == "avg"
    assert blk.attn.q_norm.normalized_shape == (16,) and blk.attn.norm.normalized_shape == (48,)
    assert make("gated").blocks[0].attn.gate.out_features == 48
    m = make("siglip")
    assert m.attn_pool is not None and m.dynamic_img_size and m.cls_token is None


@pytest.mark.parametrize("variant", NAMES)
@pytest.mark.parametrize("kinds", KINDS, ids=lambda k: "+".join(k))
@pytest.mark.parametrize("fused", [True, False])
def test_masked_equals_surgered(variant, kinds, fused):
    check_masked_equals_surgered(make(variant), kinds, img(), fused)


def test_structure_of_the_variants():
    st = family_of(make("swiglu_qknorm")).structure(make("swiglu_qknorm"))
    # qk_norm follows head_dim (renormalised over kept dims), the output norm both heads and head_dim
    assert st.norms["blocks.0.head_dim"] == ["blocks.0.attn.q_norm", "blocks.0.attn.k_norm", "blocks.0.attn.norm"]
    assert st.norms["blocks.0.heads"] == ["blocks.0.attn.norm"]
    assert st.norms["blocks.0.mlp"] == ["blocks.0.mlp.norm"]
    assert {lay.param for lay in st.layouts_of("blocks.0.heads")} >= {"blocks.0.attn.norm.weight"}
    assert "blocks.0.attn.q_norm.weight" not in {lay.param for lay in st.layouts_of("blocks.0.heads")}
    # the gate row and the value row of one packed SwiGLU unit go together
    st = family_of(make("dinov2")).structure(make("dinov2"))
    (fc1,) = [lay for lay in st.layouts if lay.param == "blocks.0.mlp.fc1.weight" and lay.axis == 0]
    assert fc1.factors == ((None, 2), ("blocks.0.mlp", 96))
    # the MAP head's own attention width is not a group; the residual width runs through it
    st = family_of(make("siglip")).structure(make("siglip"))
    pool = {(lay.param, lay.axis) for lay in st.layouts if lay.param.startswith("attn_pool")}
    assert pool == {("attn_pool.latent", 2), ("attn_pool.q.weight", 1), ("attn_pool.kv.weight", 1),
                    ("attn_pool.proj.weight", 0), ("attn_pool.proj.bias", 0), ("attn_pool.norm.weight", 0),
                    ("attn_pool.norm.bias", 0), ("attn_pool.mlp.fc1.weight", 1), ("attn_pool.mlp.fc2.weight", 0),
                    ("attn_pool.mlp.fc2.bias", 0)}


def test_qk_norm_head_dim_prune_slices_q_norm_and_heads_prune_leaves_it():
    model = make("swiglu_qknorm")
    keep = [0, 3, 5, 6, 9, 15]
    pruned = apply_plan(model, KeepPlan({"blocks.1.head_dim": keep}))
    old, new = model.blocks[1].attn, pruned.blocks[1].attn
    ratio = (len(keep) / 16) ** 0.5                           # attention scale folded into q_norm
    assert torch.allclose(new.q_norm.weight, old.q_norm.weight[keep] * ratio)
    assert torch.allclose(new.q_norm.bias, old.q_norm.bias[keep] * ratio)
    assert torch.equal(new.k_norm.weight, old.k_norm.weight[keep]) and new.scale == len(keep) ** -0.5
    pruned = apply_plan(model, KeepPlan({"blocks.1.heads": [0, 2]}))
    assert torch.equal(pruned.blocks[1].attn.q_norm.weight, old.q_norm.weight)
    assert torch.equal(pruned.blocks[1].attn.k_norm.bias, old.k_norm.bias)


@pytest.mark.parametrize("variant", NAMES)
def test_analytic_flops_match_counter(variant):
    check_flops(make(variant), img(1))


def test_flops_terms_are_each_counted():
    """The terms that only these variants have are a visible share of the count: dropping any one of
    them (the third gated-MLP matmul, the output gate, the MAP head) breaks the 0.5% agreement."""
    x = img(1)
    for variant, term in (("dinov2", "third MLP matmul"), ("gated", "output gate"), ("siglip", "MAP head")):
        model = make(variant)
        fam = family_of(model)
        dims, macs = fam.read_dims(model), fam.macs(model, fam.read_dims(model))
        N, D = fam.num_tokens(model), dims["embed"]
        share = {"third MLP matmul": sum(N * D * dims[f"blocks.{i}.mlp"] for i in range(2)),
                 "output gate": sum(N * D * 3 * dims[f"blocks.{i}.head_dim"] for i in range(2)),
                 "MAP head": macs["pool"]}[term]
        assert 2 * share > 0.005 * counted_flops(model, x), (variant, term)
    assert analytic_flops(make("siglip")) == counted_flops(make("siglip"), x)


def test_dynamic_img_size_runs_at_another_size_after_pruning():
    model = make("siglip")
    pruned = apply_plan(model, random_plan(model, ALL, 4))
    with torch.no_grad():
        assert pruned(torch.randn(1, 3, 48, 40)).shape == (1, 5)


@pytest.mark.parametrize("variant", NAMES)
def test_onnx_parity_of_pruned_variant(variant, tmp_path):
    model = make(variant)
    pruned = apply_plan(model, random_plan(model, ALL, 5))
    attention = 2 + (pruned.attn_pool is not None)
    check_onnx(pruned, tmp_path / "m.onnx", (3, 32, 32), attention)


@pytest.mark.parametrize("variant", [v for v in NAMES if VARIANTS[v][2]])
def test_reload_from_arch_json(variant, tmp_path):
    model = make(variant)
    pruned = apply_plan(model, random_plan(model, ALL, 6))
    kwargs = check_reload(pruned, tmp_path, VARIANTS[variant][0], img())
    if variant == "siglip":          # the MAP head is rebuilt at its own (unpruned) width and heads
        assert kwargs["embed_dim"] == 48 and kwargs["num_heads"] == 3


def test_unsupported_variants_are_named():
    model = timm.create_model("vit_small_patch16_224", **SMALL, global_pool="prr")
    with pytest.raises(VitoptError, match="attn_pool is a AttentionPoolPrr"):
        family_of(model).structure(model)
    model = timm.create_model("vit_small_patch16_224", **SMALL, mlp_layer=partial(timm.layers.GluMlp, use_conv=True))
    with pytest.raises(VitoptError, match=r"blocks\.0\.mlp uses 1x1 convolutions"):
        family_of(model).structure(model)


@pytest.mark.parametrize("variant,group", [("aimv2_rmsnorm", "embed"), ("aimv2_rmsnorm", "blocks.0.head_dim"),
                                           ("swiglu_qknorm", "blocks.1.heads"), ("dinov2_reg_subln", "blocks.0.mlp")])
def test_replica_masks_equal_surgery(variant, group):
    """The KL criterion's replicated-batch masks renormalise RmsNorm / qk_norm / output and hidden norms per
    replica over that replica's kept units: each replica equals the surgered model."""
    from vitopt.arch.hooks import attach_replica_masks

    model = make(variant)
    st = family_of(model).structure(model)
    size = st.groups[group].size
    g = torch.Generator().manual_seed(7)
    keeps = [sorted(torch.randperm(size, generator=g)[: max(1, size // 2 + r)].tolist()) for r in range(2)]
    masks = torch.zeros(3, size)
    for r, keep in enumerate(keeps):
        masks[r, keep] = 1.0
    masks[2] = 1.0
    x = img()
    with torch.no_grad():
        with attach_replica_masks(model, st, group, masks):
            rep = model(x.repeat(3, 1, 1, 1)).reshape(3, 2, -1)
        for r, keep in enumerate(keeps):
            ref = apply_plan(model, KeepPlan({group: keep}))(x)
            assert (rep[r] - ref).abs().max().item() <= 1e-5
        assert (rep[2] - model(x)).abs().max().item() <= 1e-5
