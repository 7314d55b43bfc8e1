"""Swin v2 structure: masked == surgered (post-norm, cosine attention, continuous position bias, depth per stage),
FLOPs against torch.utils.flop_counter, ONNX parity, reload."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import timm
import torch
from hier_helpers import random_plan  # noqa: E402
from timm.models.swin_transformer_v2 import WindowAttention
from torch.utils.flop_counter import FlopCounterMode

import vitopt
from vitopt.arch.config import create_model, load_pruned, save_pruned
from vitopt.arch.families import family_of
from vitopt.arch.families.swinv2 import PrunedWindowAttention, window_attention_forward
from vitopt.arch.masks import apply_masks
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.deploy import OrtRuntime, TorchRuntime, compare_logits, export_onnx
from vitopt.errors import VitoptError

torch.set_num_threads(1)

NAME = "swinv2_tiny_window8_256"
#: 16x16 then 8x8 tokens with 4x4 windows (shifted in every second block); and a 6x6 grid padded to 8x8 for
#: its 4x4 windows, without q/v bias.
VARIANTS = {
    "shifted": dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 3), num_heads=(2, 4),
                    num_classes=7),
    "padded": dict(img_size=24, patch_size=4, window_size=4, embed_dim=24, depths=(2, 1), num_heads=(3, 3),
                   num_classes=5, qkv_bias=False),
}
KINDS = [("heads",), ("mlp",), ("embed",), ("blocks",), ("embed", "heads", "mlp"), ("embed", "heads", "mlp", "blocks")]


@functools.cache
def _make(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(NAME, VARIANTS[variant]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def make(variant: str = "shifted") -> torch.nn.Module:
    """A small Swin v2 with every parameter perturbed (norms, q/v biases, logit scales and the cpb MLP matter)."""
    return copy.deepcopy(_make(variant))


def _img(variant: str, batch: int) -> torch.Tensor:
    size = VARIANTS[variant]["img_size"]
    return torch.randn(batch, 3, size, size)


def _counted_flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_structure_declares_stage_groups_heads_slices_and_depth():
    model = make()
    st = vitopt.structure(model)
    assert st.family == "swinv2"
    kinds = {g.kind for g in st.groups.values()}
    assert kinds == {"embed", "heads", "mlp", "blocks"}            # head_dim is not a Swin v2 group
    assert st.units["layers.1.blocks"] == ["layers.1.blocks.0", "layers.1.blocks.1", "layers.1.blocks.2"]
    assert st.groups["layers.1.blocks"].stage == 1 and st.groups["layers.1.blocks"].size == 3
    heads = {lay.param: lay.axis for lay in st.layouts_of("layers.1.blocks.2.heads")}
    for p in ("qkv.weight", "q_bias", "v_bias", "logit_scale", "cpb_mlp.2.weight", "proj.weight"):
        assert f"layers.1.blocks.2.attn.{p}" in heads
    assert heads["layers.1.blocks.2.attn.cpb_mlp.2.weight"] == 0 and heads["layers.1.blocks.2.attn.proj.weight"] == 1
    assert set(st.norms["layers.1.embed"]) >= {"layers.1.downsample.norm", "layers.1.blocks.0.norm1",
                                                "layers.1.blocks.2.norm2", "norm"}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kinds", KINDS, ids=["+".join(k) for k in KINDS])
def test_masked_equals_surgered(variant, kinds):
    model = make(variant)
    for seed, batch in ((1, 1), (2, 3)):
        plan = random_plan(model, kinds, seed)
        x = _img(variant, batch)
        with torch.no_grad():
            dense = model(x)
            with apply_masks(model, plan):
                masked = model(x)
            pruned = apply_plan(model, plan)
            out = pruned(x)
        assert type(pruned) is type(model)
        assert (masked - dense).abs().max() > 1e-4                # the plan changed the function
        assert (out - masked).abs().max() <= 1e-5, (out - masked).abs().max()


def test_per_head_logit_scale_and_position_bias_go_with_the_head():
    """Keeping heads [2, 0] of a block keeps exactly their logit_scale, cpb_mlp rows and q/v bias slices."""
    model = make()
    p = "layers.1.blocks.1.attn"
    pruned = apply_plan(model, KeepPlan({"layers.1.blocks.1.heads": [0, 2]}))
    old, new = model.get_submodule(p), pruned.get_submodule(p)
    d = old.qkv.out_features // 3 // old.num_heads
    assert new.num_heads == 2 and new.k_bias.shape == (2 * d,)
    assert torch.equal(new.logit_scale, old.logit_scale[[0, 2]])
    assert torch.equal(new.cpb_mlp[2].weight, old.cpb_mlp[2].weight[[0, 2]])
    assert torch.equal(new.q_bias, torch.cat([old.q_bias[:d], old.q_bias[2 * d:3 * d]]))
    assert torch.equal(new.v_bias, torch.cat([old.v_bias[:d], old.v_bias[2 * d:3 * d]]))
    # the attention width (2 x d) now differs from the stage width: that module only is switched
    assert type(new) is PrunedWindowAttention and isinstance(new, WindowAttention)
    assert type(pruned.get_submodule("layers.1.blocks.0.attn")) is WindowAttention


def test_width_agnostic_forward_equals_timms_on_an_unpruned_block():
    model = make()
    attn = model.layers[1].blocks[1].attn
    x = torch.randn(4, 16, 64)
    mask = model.layers[1].blocks[1].attn_mask
    with torch.no_grad():
        assert torch.equal(window_attention_forward(attn, x, mask), attn(x, mask))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_analytic_flops_and_params_match_counters(variant):
    """Exact FLOPs (flop_counter, batch 1: the position-bias MLP runs once per forward) and params, dense and
    pruned by width and depth together; the cost model prices the plan before surgery."""
    model = make(variant)
    plan = random_plan(model, ("embed", "heads", "mlp", "blocks"), 9)
    pruned = apply_plan(model, plan)
    x = _img(variant, 1)
    for m in (model, pruned):
        fam = family_of(m)
        analytic = 2 * fam.macs(m, fam.read_dims(m))["total"]
        assert analytic == _counted_flops(m, x), (analytic, _counted_flops(m, x))
        assert vitopt.structure(m).cost("params") == sum(p.numel() for p in m.parameters())
    st = vitopt.structure(model)
    assert st.cost("flops", plan.cost_dims(st)) == vitopt.structure(pruned).cost("flops")


def test_onnx_parity_of_a_pruned_swinv2(tmp_path):
    model = make()
    pruned = apply_plan(model, random_plan(model, ("embed", "heads", "mlp", "blocks"), 11))
    info = export_onnx(pruned, tmp_path / "swinv2.onnx", (3, 32, 32))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    torch_rt, ort_rt = TorchRuntime(pruned), OrtRuntime(info["path"], threads=1)
    try:
        a, b = torch_rt(x), ort_rt(x)
    finally:
        torch_rt.close()
        ort_rt.close()
    cmp = compare_logits(a, b)
    assert cmp["max_abs_diff"] <= 1e-4, cmp
    assert np.array_equal(a.argmax(1), b.argmax(1))
    assert np.abs(a).max() > 0.1


def test_save_load_roundtrip_keeps_blocks_and_shifts(tmp_path):
    """Reload from arch.json: the kept blocks of each stage come back in place, with their own window shift
    (block 0 of stage 1 removed: the shifted block 1 must stay shifted although it is now first)."""
    model = make()
    plan = KeepPlan({"layers.1.blocks": [1, 2], "layers.1.blocks.1.heads": [1, 3], "layers.0.embed": list(range(24))})
    pruned = apply_plan(model, plan)
    assert pruned.layers[1].blocks[0].shift_size == model.layers[1].blocks[1].shift_size != (0, 0)
    arch = save_pruned(pruned, tmp_path / "m", NAME, VARIANTS["shifted"])
    assert arch.kept_units == {"layers.1.blocks": [1, 2]} and arch.dims["layers.1.blocks"] == 2
    loaded = load_pruned(tmp_path / "m")
    assert type(loaded) is type(model)
    assert family_of(loaded).read_dims(loaded) == arch.dims
    assert [b.shift_size for b in loaded.layers[1].blocks] == [b.shift_size for b in pruned.layers[1].blocks]
    x = _img("shifted", 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
    # kwargs read back from the model: stage 1's skeleton keeps 3 blocks so block 1 is shifted again
    again = vitopt.save(pruned, tmp_path / "n", model_name=NAME)
    assert again.model_kwargs["depths"] == [2, 3] and again.kept_units == {"layers.1.blocks": [1, 2]}
    third = vitopt.load(tmp_path / "n")
    with torch.no_grad():
        assert torch.equal(third(x), pruned(x))


def test_unsupported_swinv2_variants_are_named():
    model = make()
    model.layers[0].blocks[0].norm1 = torch.nn.BatchNorm1d(32)
    with pytest.raises(VitoptError, match="layers.0.blocks.0.norm1"):
        family_of(model).structure(model)
    with pytest.raises(VitoptError, match="head_dim"):
        vitopt.importance(make(), "l1", groups=["head_dim"])
    assert timm.create_model(NAME, **{**VARIANTS["shifted"], "depths": (1, 1)}) is not None
