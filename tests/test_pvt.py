"""PVTv2 structure: masked == surgered (spatial-reduction attention, depth-wise conv MLP, overlapping patch
embeddings), the attention-width switch, FLOPs, reload from arch.json, feature maps."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from hier_helpers import random_plan, set_fused  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

from vitopt.arch.config import create_model, load_pruned, save_pruned
from vitopt.arch.cost import CostModel
from vitopt.arch.families import family_of
from vitopt.arch.families.pvt import PrunedSRAttention
from vitopt.arch.masks import apply_masks
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError

NAME = "pvt_v2_b0"
#: sr conv + attn.norm in stage 0 (sr 2), plain attention in stage 1 (sr 1); a linear-SRA variant
#: (7x7 average pool + 1x1 sr conv + norm + GELU, ReLU inside the MLP).
VARIANTS = {
    "sra": dict(img_size=32, depths=(1, 2), embed_dims=(16, 32), num_heads=(2, 4), sr_ratios=(2, 1),
                mlp_ratios=(4, 4), num_classes=7),
    "linear": dict(img_size=32, depths=(1, 1), embed_dims=(16, 24), num_heads=(2, 3), sr_ratios=(2, 1),
                   mlp_ratios=(2, 2), linear=True, num_classes=4, qkv_bias=False),
}
KINDS = [("heads",), ("head_dim",), ("mlp",), ("embed",), ("embed", "heads", "head_dim", "mlp"), ("blocks",),
         ("embed", "heads", "head_dim", "mlp", "blocks")]


@functools.cache
def _make(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(NAME, VARIANTS[variant]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def make(variant: str = "sra") -> torch.nn.Module:
    """A small PVTv2 with every parameter perturbed."""
    return copy.deepcopy(_make(variant))


def test_structure_and_recorded_input_size():
    model = make()
    st = family_of(model).structure(model)
    assert st.family == "pvt_v2" and st.stages() == [0, 1]
    assert model.patch_embed.img_size == (32, 32)          # PVTv2 takes no img_size; vitopt records it
    assert family_of(model).stage_sizes(model) == [(8, 8), (4, 4)]
    norms = st.norms["stages.0.embed"]
    assert {"patch_embed.norm", "stages.0.blocks.0.attn.norm", "stages.0.norm"} <= set(norms)
    assert "stages.1.downsample.norm" in st.norms["stages.1.embed"]
    lays = {(lay.param, lay.axis) for lay in st.layouts_of("stages.0.blocks.0.mlp")}
    assert ("stages.0.blocks.0.mlp.dwconv.weight", 0) in lays and ("stages.0.blocks.0.mlp.dwconv.bias", 0) in lays


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kinds", KINDS)
@pytest.mark.parametrize("fused", [True, False])
def test_masked_equals_surgered(variant, kinds, fused):
    model = make(variant)
    if kinds == ("blocks",) and all(g.size == 1 for g in family_of(model).structure(model).of_kind("blocks")):
        pytest.skip("every stage of this variant has one block: depth has nothing to remove")
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
        assert (masked - dense).abs().max().item() > 1e-4
        assert type(pruned) is type(model)
        st = family_of(model).structure(model)
        dims = plan.dims(st)
        if "blocks" in kinds:          # depth renumbers the kept blocks: compare the stage depths
            assert [family_of(pruned).read_dims(pruned)[g] for g in st.units] == [dims[g] for g in st.units]
        else:
            assert family_of(pruned).read_dims(pruned) == dims
        assert sum(p.numel() for p in pruned.parameters()) == CostModel(model).params(plan.cost_dims(st))


def test_depthwise_groups_follow_mlp_and_attention_switches():
    model = make()
    plan = KeepPlan({"stages.1.blocks.0.mlp": list(range(0, 128, 4)), "stages.1.blocks.1.heads": [0, 3]})
    pruned = apply_plan(model, plan)
    dw = pruned.stages[1].blocks[0].mlp.dwconv
    assert dw.groups == dw.in_channels == dw.out_channels == 32 and dw.weight.shape == (32, 1, 3, 3)
    a0, a1 = pruned.stages[1].blocks[0].attn, pruned.stages[1].blocks[1].attn
    assert type(a0) is type(model.stages[1].blocks[0].attn)          # heads x head_dim == embed: timm's class
    assert isinstance(a1, PrunedSRAttention) and a1.num_heads == 2 and a1.q.out_features == 16
    # restoring the width switches back (a second prune of the embed to 16 = 2 heads x 8)
    again = apply_plan(pruned, KeepPlan({"stages.1.embed": list(range(16))}))
    assert isinstance(again.stages[1].blocks[1].attn, PrunedSRAttention) is False


def _counted_flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_analytic_flops_match_counter(variant):
    model = make(variant)
    set_fused(model, False)
    pruned = apply_plan(model, random_plan(model, ("embed", "heads", "head_dim", "mlp", "blocks"), 4))
    x = torch.randn(1, 3, 32, 32)
    for m in (model, pruned):
        fam = family_of(m)
        analytic = 2 * fam.macs(m, fam.read_dims(m))["total"]
        counted = _counted_flops(m, x)
        # exact: a 1% tolerance cannot see a dropped term as small as the classifier head (embed x classes)
        assert analytic == counted, (analytic, counted, analytic - counted)


def test_pvt_v2_b0_cost_matches_published():
    """PVTv2-B0: 3.7 M params, 0.6 GFLOPs (multiply-adds) at 224 (Wang et al. 2021, Table 1)."""
    model = timm.create_model(NAME)
    cm = CostModel(model)
    dims = cm.structure.sizes()
    assert cm.params(dims) == sum(p.numel() for p in model.parameters())
    assert cm.params(dims) / 1e6 == pytest.approx(3.7, abs=0.05)
    assert cm.macs(dims) / 1e9 == pytest.approx(0.6, abs=0.05)


def test_save_load_roundtrip_and_features(tmp_path):
    model = make()
    plan = random_plan(model, ("embed", "heads", "head_dim", "mlp"), 7)
    pruned = apply_plan(model, plan)
    arch = save_pruned(pruned, tmp_path / "m", NAME, VARIANTS["sra"])
    loaded = load_pruned(tmp_path / "m")
    assert type(loaded) is type(model)
    assert family_of(loaded).read_dims(loaded) == arch.dims
    assert [type(b.attn) for s in loaded.stages for b in s.blocks] == [type(b.attn) for s in pruned.stages for b in s.blocks]
    widths = [arch.dims["stages.0.embed"], arch.dims["stages.1.embed"]]
    assert [info["num_chs"] for info in loaded.feature_info] == widths
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
        inter = loaded.forward_intermediates(x, intermediates_only=True)
        assert loaded.forward_head(loaded.forward_features(x)).shape == (2, 7)
    assert [tuple(t.shape) for t in inter] == [(2, widths[0], 8, 8), (2, widths[1], 4, 4)]


def test_bad_img_size_is_one_sentence():
    with pytest.raises(VitoptError, match="img_size"):
        create_model(NAME, {"img_size": "big"})
