"""Depth pruning (``blocks`` groups): exact surgery, costs, export, reload, criteria and allocation.

Removing a block takes it out of ``model.blocks``; the masked model zeroes both residual branches of
the block (the outputs of ``attn.proj`` and ``mlp.fc2``), so the residual stream passes through. The
two must agree (invariant 1 of docs/architecture.md), alone and together with every width kind.
"""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import vitopt
from vitopt.arch.config import ArchConfig, load_pruned, save_pruned
from vitopt.arch.families import family_of
from vitopt.arch.masks import apply_masks
from vitopt.arch.plan import KeepPlan
from vitopt.arch.structure import removed_units
from vitopt.arch.surgery import apply_plan
from vitopt.deploy import OrtRuntime, TorchRuntime, compare_logits, export_onnx
from vitopt.errors import VitoptError
from vitopt.pipeline import run_recipe
from vitopt.pruning.allocation import allocate_budget
from vitopt.pruning.prune import prune_with_report
from vitopt.recipe import load_recipe

torch.set_num_threads(1)

SMALL = dict(img_size=32, patch_size=8, num_classes=7, depth=5, embed_dim=64, num_heads=4)
VARIANTS = {
    "vit_cls": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "dinov2_style": ("vit_small_patch14_reg4_dinov2", dict(patch_size=8, init_values=0.1, dynamic_img_size=False)),
    "registers_avgpool": ("vit_small_patch16_224", dict(reg_tokens=4, class_token=False, global_pool="avg",
                                                        fc_norm=True, no_embed_class=True)),
    # DINOv2-g: packed SwiGLU MLP; SigLIP: MAP head; EVA-02 (eva family): RoPE, q/v bias, SwiGLU with sub-LN,
    # registers, LayerScale; DINOv3 (eva family): rotate-half RoPE, registers, no abs pos embed
    "dinov2g_swiglu": ("vit_giant_patch14_dinov2", dict(patch_size=8, init_values=0.1, dynamic_img_size=False,
                                                        mlp_ratio=4.0)),
    "siglip_map": ("vit_base_patch16_siglip_224", {}),
    "eva02_subln": ("eva02_base_patch14_224", dict(patch_size=8, scale_attn_inner=True, init_values=0.1,
                                                   num_reg_tokens=2)),
    "dinov3": ("vit_small_patch16_dinov3", dict(patch_size=8, global_pool="token")),
}
WIDTH = ("embed", "heads", "head_dim", "mlp")


@functools.cache
def _make(variant: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    name, kw = VARIANTS[variant]
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def make(variant: str = "vit_cls", seed: int = 0) -> torch.nn.Module:
    return copy.deepcopy(_make(variant, seed))


def set_fused(model, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


def random_plan(model, kinds, seed: int) -> KeepPlan:
    st = family_of(model).structure(model)
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in st.of_kind(*kinds):
        k = int(torch.randint(1, grp.size + (0 if grp.kind == "blocks" else 1), (1,), generator=g))
        keep[grp.name] = sorted(torch.randperm(grp.size, generator=g)[:k].tolist())
    return KeepPlan(keep)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


SDPA_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def counted_flops(model, x) -> int:
    # with grad on: under no_grad the MAP head's latent.expand() is a grad-requiring view without a grad_fn,
    # which FlopCounterMode's module tracker rejects
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU) as counter:
        model(x)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------- masked == surgered
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kinds", [("blocks",), ("blocks", *WIDTH)], ids=["depth", "depth+width"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_masked_equals_surgered(variant, kinds, fused):
    model = make(variant)
    set_fused(model, fused)
    for seed, batch in ((1, 1), (2, 3)):
        plan = random_plan(model, kinds, seed)
        assert len(plan.keep["blocks"]) < len(model.blocks)
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            dense = model(x)
            with apply_masks(model, plan):
                masked = model(x)
            pruned = apply_plan(model, plan)
            out = pruned(x)
        assert type(pruned) is type(model) and len(pruned.blocks) == len(plan.keep["blocks"])
        assert (masked - dense).abs().max() > 1e-3          # the mask changed something
        assert (out - masked).abs().max() <= 1e-5, (out - masked).abs().max()
        # no hooks left behind
        with torch.no_grad():
            assert torch.equal(model(x), dense)


def test_removed_block_is_the_identity_in_the_residual_stream():
    """Surgery keeps each kept block's own weights: the pruned model's blocks are the kept originals."""
    model = make("dinov2_style")
    pruned = apply_plan(model, KeepPlan({"blocks": [0, 2, 4]}))
    for new, old in zip(pruned.blocks, (0, 2, 4)):
        assert torch.equal(new.attn.qkv.weight, model.blocks[old].attn.qkv.weight)
    assert pruned.vitopt_kept_units == {"blocks": [0, 2, 4]}
    assert [f["module"] for f in pruned.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():   # forward_intermediates counts the kept blocks
        feats = pruned.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == 3


def test_repeated_depth_prunes_compose_kept_indices():
    model = make()
    once = apply_plan(model, KeepPlan({"blocks": [0, 1, 3, 4]}))
    twice = apply_plan(once, KeepPlan({"blocks": [0, 2, 3]}))
    assert twice.vitopt_kept_units == {"blocks": [0, 3, 4]}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        direct = apply_plan(model, KeepPlan({"blocks": [0, 3, 4]}))(x)
        assert (twice(x) - direct).abs().max() == 0


def test_plan_that_removes_every_block_is_refused():
    model = make()
    with pytest.raises(VitoptError, match="keep at least one"):
        apply_plan(model, KeepPlan({"blocks": []}))


# ------------------------------------------------------------------------------------------ costs
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("variant", ["vit_cls", "deit_distilled", "dinov2_style", "dinov2g_swiglu", "siglip_map",
                                     "eva02_subln", "dinov3"])
def test_analytic_flops_and_params_after_depth_prune(variant, fused):
    """Closed-form FLOPs equal torch.utils.flop_counter exactly (the house claim is exact; the issue asks 0.5%),
    params equal sum(numel), for depth alone and depth + width; and the cost model prices *which* blocks
    go (KeepPlan.cost_dims) on the model before surgery."""
    model = make(variant)
    x = torch.randn(1, 3, 32, 32)
    for kinds, seed in ((("blocks",), 3), (("blocks", *WIDTH), 4)):
        plan = random_plan(model, kinds, seed)
        pruned = apply_plan(model, plan)
        set_fused(pruned, fused)
        fam = family_of(pruned)
        analytic = 2 * fam.macs(pruned, fam.read_dims(pruned))["total"]
        assert analytic == counted_flops(pruned, x)
        st = vitopt.structure(model)
        assert st.cost("flops", plan.cost_dims(st)) == analytic
        assert st.cost("params", plan.cost_dims(st)) == sum(p.numel() for p in pruned.parameters())


def test_blocks_of_different_width_are_priced_by_which_one_goes():
    """After a width prune the blocks differ; removing block 0 (narrow) and block 3 (wide) save different
    FLOPs, and the count-only dims price the last block (removed_units' convention)."""
    model = apply_plan(make(), KeepPlan({"blocks.0.mlp": list(range(8)), "blocks.0.heads": [0]}))
    st = vitopt.structure(model)
    full = st.cost("flops")
    narrow = full - st.cost("flops", {"blocks": 4, "blocks.0": 0})
    wide = full - st.cost("flops", {"blocks": 4, "blocks.3": 0})
    assert narrow < wide
    assert st.cost("flops", {"blocks": 4}) == st.cost("flops", {"blocks": 4, "blocks.4": 0})
    assert removed_units(st.units, {"blocks": 3, "blocks.1": 0}) == {"blocks.1", "blocks.4"}
    assert st.unit_costs()["blocks"]["flops"] == pytest.approx(wide)


# ------------------------------------------------------------------------------------ export, reload
@pytest.mark.parametrize("variant", ["dinov2_style", "eva02_subln"])
def test_onnx_parity_of_a_depth_pruned_model(tmp_path, variant):
    model = make(variant, seed=3)
    pruned = apply_plan(model, random_plan(model, ("blocks", "heads", "mlp"), 7))
    info = export_onnx(pruned, tmp_path / "depth.onnx", (3, 32, 32))
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
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


@pytest.mark.parametrize("variant", ["dinov2_style", "eva02_subln"])
def test_reload_from_arch_json(tmp_path, variant):
    model = make(variant, seed=4)
    name, kw = VARIANTS[variant]
    pruned = apply_plan(model, random_plan(model, ("blocks", "mlp", "heads"), 9))
    kept = pruned.vitopt_kept_units["blocks"]
    x = torch.randn(2, 3, 32, 32)
    # with the kwargs of the dense model (as the pipeline saves): arch.json records the kept blocks
    arch = save_pruned(pruned, tmp_path / "a", name, {**SMALL, **kw})
    assert arch.kept_units == {"blocks": kept} and arch.dims["blocks"] == len(kept)
    assert ArchConfig.from_json(arch.to_json()).kept_units == {"blocks": kept}
    again = load_pruned(tmp_path / "a")
    assert len(again.blocks) == len(kept) and again.vitopt_kept_units == {"blocks": kept}
    # vitopt.save reads the kwargs back: the skeleton that holds the kept blocks at their indices
    arch2 = vitopt.save(pruned, tmp_path / "b", model_name=name)
    assert arch2.kept_units == {"blocks": kept} and arch2.model_kwargs["depth"] == max(kept) + 1
    third = vitopt.load(tmp_path / "b")
    assert third.vitopt_kept_units == {"blocks": kept}           # provenance survives a save/load cycle
    with torch.no_grad():
        ref = pruned(x)
        assert (again(x) - ref).abs().max() == 0
        assert (third(x) - ref).abs().max() == 0


def test_arch_json_with_more_blocks_than_the_skeleton_is_refused(tmp_path):
    model = make()
    save_pruned(model, tmp_path, "vit_tiny_patch16_224", {**SMALL, "depth": 3})
    text = (tmp_path / "arch.json").read_text().replace('"blocks": 5', '"blocks": 4')
    (tmp_path / "arch.json").write_text(text)
    with pytest.raises(VitoptError, match="4 units in 'blocks' but the model built from its kwargs has 3"):
        load_pruned(tmp_path)


# ------------------------------------------------------------------------------------------ criteria
def _dead_block_model(dead: int = 2) -> torch.nn.Module:
    """A ViT (no LayerScale) whose block ``dead`` has both residual branches zeroed: it is the identity."""
    model = make()
    with torch.no_grad():
        blk = model.blocks[dead]
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
    return model


def _batches(n: int = 2, b: int = 6):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 7, (b,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("criterion", ["taylor", "taylor_weights", "hessian", "kl", "angular"])
def test_planted_dead_block_is_ranked_last(criterion):
    model = _dead_block_model(2)
    scores = vitopt.importance(model, criterion, groups=["blocks"], data=_batches())
    s = scores["blocks"]
    assert s.shape == (5,)
    assert int(torch.argmin(s)) == 2, s
    others = torch.cat([s[:2], s[3:]])
    assert float(s[2]) < float(others.min()) * 1e-3, s      # far below every live block, not a near-tie


def test_block_criteria_leave_the_model_unchanged():
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    for crit in ("taylor", "angular", "kl"):
        vitopt.importance(model, crit, groups=["blocks"], data=_batches(1))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_taylor_of_a_block_is_the_gradient_of_its_gate():
    """taylor's block score is |dL/ds| of a multiplier s on both residual branches: equal to the sum of
    w * dL/dw over attn.proj and mlp.fc2 (weight and bias) of the block."""
    model = make()
    (x, y), = _batches(1)
    scores = vitopt.importance(model, "taylor", groups=["blocks"], data=[(x, y)])["blocks"]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    params = [p for i in range(5) for lin in (model.blocks[i].attn.proj, model.blocks[i].mlp.fc2)
              for p in (lin.weight, lin.bias)]
    grads = torch.autograd.grad(loss, params)
    want = torch.stack([sum((p * g).sum() for p, g in zip(params[4 * i:4 * i + 4], grads[4 * i:4 * i + 4]))
                        for i in range(5)]).abs().double()
    assert torch.allclose(scores, want, rtol=1e-4, atol=1e-9), (scores, want)


def test_criteria_that_cannot_score_blocks_say_so():
    model = make()
    with pytest.raises(VitoptError, match="criterion 'l1' cannot score group kind\\(s\\) blocks.*angular"):
        vitopt.importance(model, "l1", groups=["blocks"])
    with pytest.raises(VitoptError, match="criterion 'angular' cannot score group kind\\(s\\) heads"):
        vitopt.importance(model, "angular", groups=["blocks", "heads"], data=_batches(1))


def test_blocks_are_opt_in():
    st = vitopt.structure(make())
    assert "blocks" in {g.kind for g in st.groups.values()}
    scores = vitopt.importance(make(), "taylor", data=_batches(1))
    assert "blocks" not in scores
    assert list(vitopt.importance(make(), "angular", data=_batches(1))) == ["blocks"]


# ---------------------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("metric", ["flops", "params"])
@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_depth_and_width_meet_the_budget_within_half_a_percent(metric, target):
    model = make("dinov2_style")
    dense = vitopt.structure(model).cost(metric)
    result = prune_with_report(
        model, target={metric: target}, criterion="taylor", data=_batches(1),
        groups=("blocks", "embed", "heads", "head_dim", "mlp"),
        round_to={"heads": 1, "head_dim": 4, "mlp": 4, "embed": 4})
    pruned = result.model
    achieved = vitopt.structure(pruned).cost(metric) / dense
    assert target - 0.005 <= achieved <= target, achieved
    assert result.rounds[0]["achieved"] == pytest.approx(achieved * dense)
    # dims_after speaks the names of the model as given: removed blocks keep 0 units
    kept = getattr(pruned, "vitopt_kept_units", {}).get("blocks", list(range(5)))
    assert result.dims_after["blocks"] == len(pruned.blocks) == len(kept)
    for i in range(5):
        assert (result.dims_after[f"blocks.{i}.mlp"] == 0) == (i not in kept)
    for j, i in enumerate(kept):
        assert result.dims_after[f"blocks.{i}.mlp"] == pruned.blocks[j].mlp.fc1.out_features


def test_depth_only_allocation_removes_the_lowest_scored_blocks():
    model = make()
    st = vitopt.structure(model)
    scores = {"blocks": torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0])}
    budget = st.cost("flops", {"blocks": 3, "blocks.1": 0, "blocks.3": 0})
    plan = allocate_budget(st, scores, st.cost_model.flops, budget)
    assert plan.keep == {"blocks": [0, 2, 4]}


def test_shape_target_keeps_a_number_of_blocks():
    model = make()
    pruned = vitopt.prune(model, target={"shape": {"blocks": 3}}, criterion="angular", data=_batches(1))
    assert len(pruned.blocks) == 3


# ------------------------------------------------------------------------------------------ recipe
RECIPE = """
name: depth
seed: 1
output_dir: {out}
model:
  name: vit_small_patch14_reg4_dinov2
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 4, num_heads: 2, init_values: 0.1,
           num_classes: 10, dynamic_img_size: false}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 1, lr: 2.0e-3}}
  - type: prune
    criterion: {criterion}
    target: {{flops: 0.5}}
    groups: {groups}
    round_to: {{heads: 1, mlp: 8}}
    min_fraction: {{heads: 1.0, mlp: 0.75}}
    calibration: {{batches: 2, batch_size: 32}}
  - {{type: finetune, epochs: 1}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("criterion,groups", [("taylor", "[blocks, heads, mlp]"), ("angular", "[blocks]")])
def test_prune_stage_with_blocks_end_to_end(tmp_path, criterion, groups):
    """The recipe path: groups [blocks, heads, mlp] in the prune stage; arch.json records the kept blocks
    (relative to the recipe's model) and vitopt.load rebuilds the pruned model after fine-tuning. Width is
    floored (min_fraction) so that 0.5 of the FLOPs cannot be met without removing blocks."""
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(out=tmp_path, criterion=criterion, groups=groups))
    run = run_recipe(load_recipe(path))
    m = json.loads((run / "01_prune" / "metrics.json").read_text())["metrics"]
    assert m["flops_ratio"] <= 0.5 and m["depth"]["before"] == 4
    arch = json.loads((run / "02_finetune" / "model" / "arch.json").read_text())
    model = vitopt.load(run / "02_finetune" / "model")
    assert len(model.blocks) == m["depth"]["after"] == arch["dims"]["blocks"] < 4
    assert len(arch["kept_units"]["blocks"]) == m["depth"]["after"]
    removed = set(range(4)) - set(arch["kept_units"]["blocks"])
    assert all(m["blocks"][i]["mlp_kept"] == 0 for i in removed)
    assert all(m["blocks"][i]["mlp_kept"] > 0 for i in arch["kept_units"]["blocks"])
    assert f"depth 4 -> {m['depth']['after']}" in (run / "summary.md").read_text()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


# ------------------------------------------------------------------------------- hierarchical: per stage
HIER = {
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                                  depths=(2, 3), num_heads=(2, 4), num_classes=7)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                               depths=(2, 3), num_heads=(2, 4), num_classes=7)),
    "pvt_v2": ("pvt_v2_b0", dict(img_size=32, depths=(2, 3), embed_dims=(16, 32), num_heads=(2, 4), sr_ratios=(2, 1),
                                 mlp_ratios=(4, 4), num_classes=7)),
}


@functools.cache
def _hier(family: str) -> torch.nn.Module:
    from vitopt.arch.config import create_model

    torch.manual_seed(0)
    model = create_model(*HIER[family]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family", list(HIER))
def test_hierarchical_depth_is_per_stage_and_reloads(family, tmp_path):
    """One ``blocks`` group per stage; removing the first block of stage 1 (the later, shifted Swin block moves
    to index 0) reloads equal from arch.json saved with the dense kwargs, and (Swin v2, whose kwargs can be
    read back in full) with kwargs read back from the pruned model."""
    model = copy.deepcopy(_hier(family))
    st = vitopt.structure(model)
    depth_groups = [g.name for g in st.of_kind("blocks")]
    assert len(depth_groups) == 2 and [st.groups[g].stage for g in depth_groups] == [0, 1]
    g1 = depth_groups[1]
    pruned = apply_plan(model, KeepPlan({g1: [1, 2]}))
    assert len(pruned.get_submodule(g1)) == 2
    x = torch.randn(2, 3, 32, 32)
    name, kw = HIER[family]
    save_pruned(pruned, tmp_path / "a", name, kw)
    saved = ["a"]
    if family == "swinv2":
        vitopt.save(pruned, tmp_path / "b", model_name=name)
        saved.append("b")
    with torch.no_grad():
        ref = pruned(x)
        for d in saved:
            assert torch.equal(load_pruned(tmp_path / d)(x), ref), d


@pytest.mark.parametrize("family", list(HIER))
@pytest.mark.parametrize("criterion", ["taylor", "kl", "angular"])
def test_planted_dead_block_is_ranked_last_in_its_stage(family, criterion):
    """Block 1 of stage 1 made the identity (pre-norm: attn.proj and mlp.fc2 zeroed; Swin v2's post-norm:
    norm1 and norm2 zeroed) is ranked last in its stage."""
    model = copy.deepcopy(_hier(family))
    st = vitopt.structure(model)
    g1 = st.of_kind("blocks")[1].name
    blk = model.get_submodule(f"{g1}.1")
    with torch.no_grad():
        mods = (blk.norm1, blk.norm2) if family == "swinv2" else (blk.attn.proj, blk.mlp.fc2)
        for mod in mods:
            mod.weight.zero_()
            if mod.bias is not None:
                mod.bias.zero_()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 7, (4,), generator=g))]
    s = vitopt.importance(model, criterion, groups=[g1], data=data)[g1]
    assert int(torch.argmin(s)) == 1 and float(s[1]) < 1e-3 * float(torch.cat([s[:1], s[2:]]).min()), s


def test_recipe_accepts_blocks_for_prune_and_refuses_them_for_sparse_training(tmp_path):
    from vitopt.stages import recipe_choices

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(out=tmp_path, criterion="angular", groups="[blocks]"))
    recipe = load_recipe(path, choices=recipe_choices())
    assert list(recipe.stages[1].groups) == ["blocks"] and recipe.stages[1].round_for("blocks") == 1
    text = RECIPE.format(out=tmp_path, criterion="taylor", groups="[blocks, heads, mlp]").replace(
        "  - {type: finetune, epochs: 1}", "  - {type: sparse_train, method: vtp, epochs: 1, groups: [blocks, mlp]}")
    path.write_text(text)
    with pytest.raises(VitoptError, match="blocks"):
        load_recipe(path, choices=recipe_choices())


@pytest.mark.parametrize("family", ["swin", "pvt_v2"])
def test_onnx_parity_of_a_depth_pruned_hierarchical_model(family, tmp_path):
    model = copy.deepcopy(_hier(family))
    st = vitopt.structure(model)
    g1 = st.of_kind("blocks")[1].name
    pruned = apply_plan(model, KeepPlan({g1: [0, 2], st.of_kind("blocks")[0].name: [1]}))
    info = export_onnx(pruned, tmp_path / f"{family}.onnx", (3, 32, 32))
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    torch_rt, ort_rt = TorchRuntime(pruned), OrtRuntime(info["path"], threads=1)
    try:
        a, b = torch_rt(x), ort_rt(x)
    finally:
        torch_rt.close()
        ort_rt.close()
    cmp = compare_logits(a, b)
    assert cmp["max_abs_diff"] <= 1e-4, cmp
    assert np.array_equal(a.argmax(1), b.argmax(1)) and np.abs(a).max() > 0.1


SWINV2_RECIPE = """
name: sv2
seed: 0
output_dir: {out}
model:
  name: swinv2_tiny_window8_256
  kwargs: {{img_size: 16, patch_size: 2, window_size: 4, in_chans: 1, embed_dim: 16, depths: [2, 2], num_heads: [2, 2],
           num_classes: 10}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 1, lr: 2.0e-3}}
  - type: prune
    criterion: taylor
    target: {{shape: {{blocks: 1, heads: 1}}}}
    groups: [heads, mlp, blocks]
    calibration: {{batches: 1, batch_size: 32}}
  - {{type: finetune, epochs: 1}}
"""


@pytest.mark.slow
def test_swinv2_prune_stage_reports_depth_and_no_head_dim(tmp_path):
    """The prune stage and summary.md on a family without a head_dim group (Swin v2), with per-stage depth."""
    path = tmp_path / "r.yaml"
    path.write_text(SWINV2_RECIPE.format(out=tmp_path))
    run = run_recipe(load_recipe(path))
    m = json.loads((run / "01_prune" / "metrics.json").read_text())["metrics"]
    assert m["depth"] == {"before": 4, "after": 2}
    assert all("head_dim" not in row for row in m["blocks"])
    summary = (run / "summary.md").read_text()
    assert "depth 4 -> 2" in summary and "| block | heads | mlp hidden |" in summary
    model = vitopt.load(run / "02_finetune" / "model")
    assert [len(st.blocks) for st in model.layers] == [1, 1]


def test_depth_surgery_refuses_a_model_with_a_token_selector():
    from vitopt.arch.token_selector import attach_token_selector

    model = make()
    attach_token_selector(model, keep=4, after_block=1)
    with pytest.raises(VitoptError, match="token selector .* after block 1.*width only"):
        apply_plan(model, KeepPlan({"blocks": [0, 1, 2]}))
    assert apply_plan(model, KeepPlan({"blocks.0.mlp": list(range(64))})) is not None


def test_provenance_survives_when_the_skeleton_holds_exactly_the_kept_blocks(tmp_path):
    """Blocks 3 and 4 removed: kwargs read back build a 3-block skeleton (nothing to drop on load); the loaded
    model still knows it kept blocks [0, 1, 2] of a deeper model, so a later save with the dense kwargs is right."""
    name, kw = VARIANTS["vit_cls"]
    pruned = apply_plan(make(), KeepPlan({"blocks": [0, 1, 2]}))
    vitopt.save(pruned, tmp_path / "a", model_name=name)
    loaded = vitopt.load(tmp_path / "a")
    assert len(loaded.blocks) == 3 and loaded.vitopt_kept_units == {"blocks": [0, 1, 2]}
    assert save_pruned(loaded, tmp_path / "b", name, {**SMALL, **kw}).kept_units == {"blocks": [0, 1, 2]}
