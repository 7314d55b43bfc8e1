"""Swin v1 structure: masked == surgered (shifted windows, relative position bias), scale, FLOPs, reload, features."""

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
from vitopt.arch.hooks import attach_replica_masks
from vitopt.arch.masks import apply_masks
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError

NAME = "swin_tiny_patch4_window7_224"
#: two tiny Swins: 16x16 then 8x8 tokens with 4x4 windows (shifted in every second block), and one whose
#: 6x6 grid is padded to 8x8 for its 4x4 windows (timm pads before partitioning).
VARIANTS = {
    "shifted": dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                    num_classes=7),
    "padded": dict(img_size=24, patch_size=4, window_size=4, embed_dim=24, depths=(2, 1), num_heads=(3, 3),
                   head_dim=8, num_classes=5, qkv_bias=False),
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


def make(variant: str = "shifted") -> torch.nn.Module:
    """A small Swin with every parameter perturbed (so norms, biases and the bias table matter)."""
    return copy.deepcopy(_make(variant))


def _img(variant: str, batch: int) -> torch.Tensor:
    size = VARIANTS[variant]["img_size"]
    return torch.randn(batch, 3, size, size)


def test_structure_declares_stage_groups_and_shifted_blocks():
    model = make()
    st = family_of(model).structure(model)
    assert st.family == "swin" and st.stages() == [0, 1]
    embeds = st.of_kind("embed")
    assert [(g.name, g.size, g.stage, g.block) for g in embeds] == [("layers.0.embed", 32, 0, None),
                                                                   ("layers.1.embed", 64, 1, None)]
    assert [g.block for g in st.of_kind("heads")] == [0, 1, 2, 3]
    # the odd blocks really use shifted windows, so the tests below cover SW-MSA
    assert [any(b.shift_size) for stage in model.layers for b in stage.blocks] == [False, True, False, True]
    # PatchMerging's norm spans (4) x (stage-0 embed) and renormalises under stage 0's group
    assert st.norm_factors["layers.1.downsample.norm"] == ((None, 4), ("layers.0.embed", 32))
    assert "layers.1.downsample.norm" in st.norms["layers.0.embed"]


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
        x = _img(variant, batch)
        with torch.no_grad():
            dense = model(x)
            with apply_masks(model, plan):
                masked = model(x)
            pruned = apply_plan(model, plan)
            out = pruned(x)
        assert out.shape == dense.shape
        assert (masked - out).abs().max().item() <= 1e-5
        assert (masked - dense).abs().max().item() > 1e-4          # something was really removed
        assert type(pruned) is type(model)
        st = family_of(model).structure(model)
        dims = plan.dims(st)
        if "blocks" in kinds:          # depth renumbers the kept blocks: compare the stage depths
            assert [family_of(pruned).read_dims(pruned)[g] for g in st.units] == [dims[g] for g in st.units]
        else:
            assert family_of(pruned).read_dims(pruned) == dims
        assert sum(p.numel() for p in pruned.parameters()) == CostModel(model).params(plan.cost_dims(st))


def test_relative_position_bias_is_sliced_with_the_heads():
    model = make()
    keep = [1]
    plan = KeepPlan({"layers.1.blocks.1.heads": keep})
    pruned = apply_plan(model, plan)
    old = model.layers[1].blocks[1].attn
    new = pruned.layers[1].blocks[1].attn
    ws = old.window_size
    assert new.relative_position_bias_table.shape == ((2 * ws[0] - 1) * (2 * ws[1] - 1), 1)
    assert torch.equal(new.relative_position_bias_table, old.relative_position_bias_table[:, keep])
    assert new.num_heads == 1 and new.qkv.out_features == 3 * 16
    # the cached bias of the kept head is the old head's bias
    assert torch.equal(new._get_rel_pos_bias()[0, 0], old._get_rel_pos_bias()[0, 1])


@pytest.mark.parametrize("fused", [True, False])
def test_head_dim_prune_keeps_attention_scale(fused):
    model = make()
    plan = KeepPlan({f"layers.{s}.blocks.{j}.head_dim": list(range(0, 16, 2)) for s in range(2) for j in range(2)})
    pruned = apply_plan(model, plan)
    for stage in pruned.layers:
        for blk in stage.blocks:
            assert blk.attn.scale == pytest.approx(8 ** -0.5)
    x = _img("shifted", 2)
    set_fused(pruned, fused)
    with torch.no_grad():
        out = pruned(x)
        set_fused(pruned, not fused)
        other = pruned(x)
        with apply_masks(model, plan):
            ref = model(x)
    assert (out - other).abs().max().item() <= 1e-5
    assert (out - ref).abs().max().item() <= 1e-5


def test_replica_masks_with_patch_merging_norm_equal_single_masks():
    """The replicated-batch masks of the KL criterion renormalise PatchMerging's 4C-wide norm per replica."""
    model = make()
    st = family_of(model).structure(model)
    plans = [random_plan(model, ("embed",), s) for s in (5, 6)]
    x = _img("shifted", 2)
    masks = torch.stack([plans[0].masks(st)["layers.0.embed"], plans[1].masks(st)["layers.0.embed"],
                         torch.ones(32)])
    with torch.no_grad():
        with attach_replica_masks(model, st, "layers.0.embed", masks):
            rep = model(x.repeat(3, 1, 1, 1)).reshape(3, 2, -1)
        for r, plan in enumerate(plans):
            ref = apply_plan(model, KeepPlan({"layers.0.embed": plan.keep["layers.0.embed"]}))(x)
            assert (rep[r] - ref).abs().max().item() <= 1e-5
        assert (rep[2] - model(x)).abs().max().item() <= 1e-5


def _counted_flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_analytic_flops_match_counter(variant):
    model = make(variant)
    set_fused(model, False)
    pruned = apply_plan(model, random_plan(model, ("embed", "heads", "head_dim", "mlp", "blocks"), 9))
    x = _img(variant, 1)
    for m in (model, pruned):
        fam = family_of(m)
        analytic = 2 * fam.macs(m, fam.read_dims(m))["total"]
        counted = _counted_flops(m, x)
        # exact: a 1% tolerance cannot see a dropped term as small as the classifier head (embed x classes)
        assert analytic == counted, (analytic, counted, analytic - counted)


def test_swin_tiny_flops_match_published():
    """Swin-T/224 is 4.5 GFLOPs (multiply-adds) and 28.3 M params (Liu et al. 2021, Table 1)."""
    model = timm.create_model(NAME)
    cm = CostModel(model)
    dims = cm.structure.sizes()
    assert cm.macs(dims) / 1e9 == pytest.approx(4.5, abs=0.06)
    assert cm.params(dims) == sum(p.numel() for p in model.parameters())
    assert cm.params(dims) / 1e6 == pytest.approx(28.3, abs=0.05)


def test_save_load_roundtrip_and_features(tmp_path):
    model = make()
    plan = random_plan(model, ("embed", "heads", "head_dim", "mlp"), 7)
    pruned = apply_plan(model, plan)
    arch = save_pruned(pruned, tmp_path / "m", NAME, VARIANTS["shifted"])
    assert "layers.1.embed" in arch.dims and "layers.1.blocks.1.heads" in arch.dims
    loaded = load_pruned(tmp_path / "m")
    assert type(loaded) is type(model)
    assert family_of(loaded).read_dims(loaded) == arch.dims
    x = _img("shifted", 2)
    widths = [arch.dims["layers.0.embed"], arch.dims["layers.1.embed"]]
    assert [info["num_chs"] for info in loaded.feature_info] == widths
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
        feats = loaded.forward_features(x)
        assert feats.shape == (2, 8, 8, widths[1])
        assert loaded.forward_head(feats).shape == (2, 7)
        final, inter = loaded.forward_intermediates(x)
    assert [tuple(t.shape) for t in inter] == [(2, widths[0], 16, 16), (2, widths[1], 8, 8)]
    assert torch.equal(final, feats)


def test_unsupported_swin_variants_are_named():
    v2 = timm.create_model("swinv2_tiny_window8_256", img_size=32, window_size=4, embed_dim=16, depths=(1, 1),
                           num_heads=(1, 2), num_classes=3)
    assert family_of(v2).name == "swinv2"                  # its own family (tests/test_swinv2.py), not Swin v1's
    model = make()
    model.layers[0].blocks[0].norm1 = torch.nn.BatchNorm1d(32)
    with pytest.raises(VitoptError, match="layers.0.blocks.0.norm1"):
        family_of(model).structure(model)


def test_cli_inspect_lists_every_block_with_its_stage(tmp_path):
    """`vitopt inspect` on a pruned Swin: per-stage embed widths in the title, one row per block with its
    stage and kept dims, and the analytic total FLOPs."""
    from typer.testing import CliRunner

    from vitopt.cli import app

    pruned = apply_plan(make(), random_plan(make(), ("embed", "heads", "head_dim", "mlp"), 3))
    arch = save_pruned(pruned, tmp_path / "m", NAME, VARIANTS["shifted"])
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "m")], terminal_width=200)
    assert res.exit_code == 0, res.output
    d = arch.dims
    assert f"embed_dim {d['layers.0.embed']}/{d['layers.1.embed']}" in res.output
    for s, j, b in ((0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)):
        p = f"layers.{s}.blocks.{j}"
        cells = [str(b), str(s), str(d[f"{p}.heads"]), str(d[f"{p}.head_dim"]), str(d[f"{p}.mlp"])]
        assert any(line.split("│")[1:6] and [c.strip() for c in line.split("│")[1:6]] == cells
                   for line in res.output.splitlines()), (cells, res.output)
    cm = CostModel(pruned)
    assert f"total {cm.flops(cm.structure.sizes()) / 1e6:.2f} MFLOPs" in res.output
