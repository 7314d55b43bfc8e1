"""Invariants of the structure layer: masked == surgered, attention scale, costs, save/load."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vitopt.arch.config import load_pruned, save_pruned
from vitopt.arch.cost import CostModel
from vitopt.arch.families import family_of
from vitopt.arch.masks import apply_masks
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError

SMALL = dict(img_size=32, patch_size=8, num_classes=7, depth=3, embed_dim=64, num_heads=4)

#: (timm name, extra kwargs): every ViT variant the family claims to support.
VARIANTS = {
    "vit_cls": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"init_values": 0.1}),
    "registers_avgpool": ("vit_small_patch16_224", dict(reg_tokens=4, class_token=False, global_pool="avg",
                                                        fc_norm=True, no_embed_class=True)),
    "no_qkv_bias": ("vit_tiny_patch16_224", {"qkv_bias": False}),
}


def make(variant: str, seed: int = 0) -> torch.nn.Module:
    """A small model of ``variant`` with every parameter perturbed (so norms and biases matter)."""
    return copy.deepcopy(_make(variant, seed))


@functools.cache
def _make(variant: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    name, kw = VARIANTS[variant]
    model = timm.create_model(name, **{**SMALL, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def random_plan(model, kinds, seed: int) -> KeepPlan:
    st = family_of(model).structure(model)
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in st.of_kind(*kinds):
        k = int(torch.randint(1, grp.size + 1, (1,), generator=g))
        keep[grp.name] = sorted(torch.randperm(grp.size, generator=g)[:k].tolist())
    return KeepPlan(keep)


def set_fused(model, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kinds", [("heads",), ("head_dim",), ("mlp",), ("embed",), ("embed", "heads", "head_dim", "mlp")])
@pytest.mark.parametrize("fused", [True, False])
def test_masked_equals_surgered(variant, kinds, fused):
    model = make(variant)
    set_fused(model, fused)
    for seed, batch in ((1, 1), (2, 3)):
        plan = random_plan(model, kinds, seed)
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            dense = model(x)
            with apply_masks(model, plan):
                masked = model(x)
            pruned = apply_plan(model, plan)
            out = pruned(x)
        assert out.shape == dense.shape
        assert (masked - out).abs().max().item() <= 1e-5
        # the masks really removed something (otherwise the test would be vacuous)
        assert (masked - dense).abs().max().item() > 1e-4
        # the pruned model is still the timm class with consistent attributes
        assert type(pruned) is type(model)
        dims = plan.dims(family_of(model).structure(model))
        assert sum(p.numel() for p in pruned.parameters()) == CostModel(model).params(dims)


@pytest.mark.parametrize("fused", [True, False])
def test_head_dim_prune_keeps_attention_scale(fused):
    model = make("vit_cls")
    plan = KeepPlan({f"blocks.{i}.head_dim": list(range(0, 16, 2)) for i in range(3)})
    pruned = apply_plan(model, plan)
    for blk in pruned.blocks:
        assert blk.attn.head_dim == 8 and blk.attn.attn_dim == 32
        assert blk.attn.scale == pytest.approx(8 ** -0.5)
    x = torch.randn(2, 3, 32, 32)
    set_fused(pruned, fused)
    with torch.no_grad():
        out = pruned(x)
        set_fused(pruned, not fused)
        other = pruned(x)
        with apply_masks(model, plan):
            ref = model(x)
    assert (out - other).abs().max().item() <= 1e-5   # fused and explicit paths agree after the fold
    assert (out - ref).abs().max().item() <= 1e-5     # and equal the unpruned function on kept dims


def test_repeated_prunes_compose():
    """Pruning twice equals pruning once with the composed plan (indices are relative to current dims)."""
    model = make("deit3_layerscale")
    kinds = ("embed", "heads", "head_dim", "mlp")
    first = random_plan(model, kinds, 3)
    once = apply_plan(model, first)
    second = random_plan(once, kinds, 4)
    twice = apply_plan(once, second)
    composed = KeepPlan({g: [first.keep[g][i] for i in idx] for g, idx in second.keep.items()})
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        with apply_masks(model, composed):
            ref = model(x)
        assert (twice(x) - ref).abs().max().item() <= 1e-5


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch.utils.flop_counter's own SDPA formula (2 matmuls: q k^T and attn v), for the CPU kernel it lacks."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: On CPU, timm's fused attention (F.scaled_dot_product_attention) runs
#: aten._scaled_dot_product_flash_attention_for_cpu, which torch.utils.flop_counter has no formula for (it counts
#: the CUDA flash / efficient / cuDNN kernels): map it to the counter's SDPA formula so fused models count fully.
SDPA_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def _counted_flops(model, x, mapping=SDPA_CPU) -> int:
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        with torch.no_grad():
            model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("fused", [False, True], ids=["eager_attention", "fused_sdpa"])
@pytest.mark.parametrize("variant", ["vit_cls", "deit_distilled", "registers_avgpool"])
def test_analytic_flops_match_counter(variant, fused):
    """FLOPs = 2 x MACs in closed form equal torch.utils.flop_counter (1%) with timm's fused attention off and on."""
    model = make(variant)
    set_fused(model, fused)
    pruned = apply_plan(model, random_plan(model, ("embed", "heads", "head_dim", "mlp"), 5))
    set_fused(pruned, fused)
    x = torch.randn(1, 3, 32, 32)
    for m in (model, pruned):
        fam = family_of(m)
        analytic = 2 * fam.macs(m, fam.read_dims(m))["total"]
        counted = _counted_flops(m, x)
        # exact: a 1% tolerance cannot see a dropped term as small as the classifier head (embed x classes)
        assert analytic == counted, (analytic, counted, analytic - counted)


def test_plain_flop_counter_misses_fused_attention_on_cpu():
    """What README says about the counter: without the SDPA mapping it misses exactly the attention matmuls
    (2 x 2 x tokens^2 x heads x head_dim per block) of a fused model on CPU; with fused attention off it does not."""
    model = make("vit_cls")
    set_fused(model, True)
    x = torch.randn(1, 3, 32, 32)
    missed = _counted_flops(model, x) - _counted_flops(model, x, mapping={})
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    attn = [b.attn for b in model.blocks]
    assert missed == sum(2 * 2 * n * n * a.num_heads * a.head_dim for a in attn) > 0
    set_fused(model, False)
    assert _counted_flops(model, x, mapping={}) == _counted_flops(model, x)


def test_deit_small_flops_match_published():
    """DeiT-S/16-224 is 4.6 GMACs and 22.05 M params (timm / DeiT paper, Touvron et al. 2021)."""
    model = timm.create_model("deit_small_patch16_224")
    cm = CostModel(model)
    dims = cm.structure.sizes()
    assert cm.macs(dims) / 1e9 == pytest.approx(4.6, abs=0.05)
    assert cm.params(dims) == sum(p.numel() for p in model.parameters())


def test_save_load_roundtrip(tmp_path):
    model = make("deit_distilled")
    kw = {**SMALL}
    pruned = apply_plan(model, random_plan(model, ("embed", "heads", "head_dim", "mlp"), 7))
    arch = save_pruned(pruned, tmp_path / "m", "deit_tiny_distilled_patch16_224", kw)
    assert (tmp_path / "m" / "arch.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    loaded = load_pruned(tmp_path / "m")
    assert type(loaded) is type(pruned)
    assert family_of(loaded).read_dims(loaded) == arch.dims
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
        feats = loaded.forward_features(x)
    assert feats.shape[-1] == arch.dims["embed"]
    assert loaded.forward_head(feats).shape == (2, 7)


def test_load_rejects_bad_files(tmp_path):
    model = make("vit_cls")
    save_pruned(model, tmp_path / "ok", "vit_tiny_patch16_224", SMALL)
    # truncated weights
    bad = tmp_path / "trunc"
    bad.mkdir()
    (bad / "arch.json").write_bytes((tmp_path / "ok" / "arch.json").read_bytes())
    (bad / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes()[:100])
    with pytest.raises(VitoptError, match="safetensors"):
        load_pruned(bad)
    # weights from a different architecture
    other = tmp_path / "other"
    save_pruned(apply_plan(model, random_plan(model, ("mlp",), 1)), other, "vit_tiny_patch16_224", SMALL)
    (other / "arch.json").write_bytes((tmp_path / "ok" / "arch.json").read_bytes())
    with pytest.raises(VitoptError, match="does not match"):
        load_pruned(other)
    with pytest.raises(VitoptError, match="not a directory"):
        load_pruned(tmp_path / "missing")


def test_unsupported_models_are_named():
    resnet = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(VitoptError, match="not supported.*VisionTransformer"):
        family_of(resnet)
    # qk_norm and RmsNorm are supported (tests/test_vit_variants.py); another norm is named with its module
    qk = timm.create_model("vit_tiny_patch16_224", **SMALL, qk_norm=True)
    qk.blocks[1].attn.k_norm = torch.nn.BatchNorm1d(qk.blocks[1].attn.head_dim)
    with pytest.raises(VitoptError, match=r"blocks\.1\.attn\.k_norm is a BatchNorm1d; only LayerNorm, RmsNorm"):
        family_of(qk).structure(qk)


def test_deit_base_cut_to_deit_tiny_shape_equals_timm_deit_tiny():
    """UP-ViTs' shape recipe: DeiT-B with embed 192, 3 heads x 64, mlp 768 is exactly DeiT-T's size."""
    base = timm.create_model("deit_base_patch16_224").eval()
    st = family_of(base).structure(base)
    sizes = {"embed": 192}
    for i in range(12):
        sizes.update({f"blocks.{i}.heads": 3, f"blocks.{i}.head_dim": 64, f"blocks.{i}.mlp": 768})
    g = torch.Generator().manual_seed(0)
    plan = KeepPlan({k: sorted(torch.randperm(st.groups[k].size, generator=g)[:v].tolist()) for k, v in sizes.items()})
    pruned = apply_plan(base, plan)
    tiny = timm.create_model("deit_tiny_patch16_224").eval()
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in tiny.parameters())
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in tiny.state_dict().items()}
    x = torch.randn(1, 3, 224, 224)
    set_fused(pruned, False)
    set_fused(tiny, False)
    fam = family_of(pruned)
    analytic = 2 * fam.macs(pruned, fam.read_dims(pruned))["total"]
    counted_tiny = _counted_flops(tiny, x)
    assert abs(analytic - counted_tiny) / counted_tiny <= 0.001
    assert _counted_flops(pruned, x) == counted_tiny
