"""The SiDT-style ``search`` criterion: it finds planted dead units, meets its FLOPs target, leaves the model
untouched, rejects bad input, and runs as a prune stage on hierarchical models."""

from __future__ import annotations

import json

import pytest
import torch

from vitopt.arch.config import create_model
from vitopt.arch.cost import CostModel
from vitopt.arch.families import family_of
from vitopt.errors import VitoptError
from vitopt.pruning.allocation import allocate_budget
from vitopt.pruning.criteria.search import search_scores

SWIN = ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                                             num_heads=(2, 4), num_classes=5))
PVT = ("pvt_v2_b0", dict(img_size=32, depths=(1, 1), embed_dims=(16, 32), num_heads=(2, 4), sr_ratios=(2, 1),
                         mlp_ratios=(4, 4), num_classes=5))


def _model(spec, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(*spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batches(n: int = 3, b: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 5, (b,), generator=g)) for _ in range(n)]


def test_search_ranks_planted_dead_neurons_last():
    """MLP neurons whose fc2 column is zero cannot change the output: the search must rank them mostly below live
    ones (the gates interact, so a few weak live neurons may fall below the dead ones)."""
    model = _model(SWIN)
    st = family_of(model).structure(model)
    groups = [g.name for g in st.of_kind("mlp")]
    dead = {}
    with torch.no_grad():
        for g in groups:
            fc2 = model.get_submodule(g.replace(".mlp", ".mlp.fc2"))
            idx = torch.randperm(fc2.in_features, generator=torch.Generator().manual_seed(len(dead)))[: fc2.in_features // 2]
            fc2.weight[:, idx] = 0.0
            fc2.weight.mul_(3.0)
            dead[g] = set(idx.tolist())
        model.head.fc.weight.mul_(30.0)     # confident predictions, as a trained model makes them
    scores = search_scores(model, st, groups, batches=_batches(), target=0.75, steps=40,
                                       lr=0.02)
    assert abs(scores.cost["expected_cost_ratio"] - 0.75) <= 0.03
    for g in groups:
        s = scores[g]
        live = [u for u in range(s.numel()) if u not in dead[g]]
        top = set(torch.argsort(-s)[: len(live)].tolist())
        # random scores would give 0.5 and equal means; dead units have no KL gradient, only the FLOPs push
        assert len(top & set(live)) / len(live) >= 0.7, g
        assert s[live].mean() > s[list(dead[g])].mean() + 0.02, g
        assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("spec", [SWIN, PVT], ids=["swin", "pvt_v2"])
def test_search_meets_target_and_leaves_model_untouched(spec):
    model = _model(spec)
    model.train()                                   # the search must restore training flags
    st = family_of(model).structure(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    groups = [g.name for g in st.of_kind("embed", "heads", "head_dim", "mlp")]
    cm = CostModel(model, st)
    scores = search_scores(model, st, groups, batches=_batches(), cost=cm.flops, target=0.5,
                                       steps=60)
    cost = scores.cost
    assert cost["criterion"] == "search" and cost["steps"] == 60 and cost["backward_passes"] == 60
    assert abs(cost["expected_cost_ratio"] - 0.5) <= 0.05      # the gates' soft dims reach the FLOPs target
    assert {g: s.shape for g, s in scores.items()} == {g: (st.groups[g].size,) for g in groups}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    budget = 0.5 * cm.flops(st.sizes())
    plan = allocate_budget(st, scores, cm.flops, budget, round_to={"heads": 1, "head_dim": 4, "mlp": 8, "embed": 4})
    assert cm.flops(plan.dims(st)) <= budget


def test_search_rejects_bad_input():
    model = _model(SWIN)
    st = family_of(model).structure(model)
    groups = [g.name for g in st.of_kind("mlp")]
    with pytest.raises(VitoptError, match="needs data batches"):
        search_scores(model, st, groups, batches=None, target=0.5)
    with pytest.raises(VitoptError, match="target in"):
        search_scores(model, st, groups, batches=_batches(1), target=1.5)
    with pytest.raises(VitoptError, match="steps must be"):
        search_scores(model, st, groups, batches=_batches(1), target=0.5, steps=0)


def test_schema_search_needs_a_cost_fraction():
    from vitopt.recipe.schema import PruneStage

    stage = PruneStage(criterion="search", target={"flops": 0.6}, search={"steps": 7})
    assert stage.search.steps == 7 and stage.search.lr == pytest.approx(0.02)
    with pytest.raises(ValueError, match="criterion 'search'"):
        PruneStage(criterion="search", target={"latency_ms": 1.0}, lut="x.json")


RECIPE = """
name: {name}
seed: 0
output_dir: {out}
model:
  name: {model}
  kwargs: {kwargs}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 1, lr: 2.0e-3}}
  - type: prune
    criterion: {criterion}
    target: {{flops: 0.6}}
    groups: [embed, heads, head_dim, mlp]
    round_to: {{heads: 1, head_dim: 4, mlp: 8, embed: 4}}
    search: {{steps: 5}}
    calibration: {{batches: 2, batch_size: 32, per_class: 1}}
"""


@pytest.mark.parametrize("name,model,kwargs,criterion", [
    ("swin_search", "swin_tiny_patch4_window7_224",
     "{img_size: 16, patch_size: 4, window_size: 2, in_chans: 1, embed_dim: 16, depths: [2, 1], num_heads: [2, 2]}",
     "search"),
    ("pvt_kl", "pvt_v2_b0",
     "{img_size: 16, in_chans: 1, depths: [1, 1], embed_dims: [16, 16], num_heads: [2, 2], sr_ratios: [2, 1], "
     "mlp_ratios: [2, 2]}", "kl"),
])
def test_prune_stage_on_hierarchical_models(tmp_path, name, model, kwargs, criterion):
    """train -> prune through the pipeline: the stage table lists every block with its stage, the saved model
    reloads from arch.json, and the FLOPs target is met."""
    from vitopt.arch.config import load_pruned
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(name=name, out=tmp_path, model=model, kwargs=kwargs, criterion=criterion))
    run_dir = run_recipe(load_recipe(path))
    prune_dir = next(p for p in run_dir.iterdir() if p.name.endswith("_prune"))
    metrics = json.loads((prune_dir / "metrics.json").read_text())
    m = metrics.get("metrics", metrics)
    assert m["flops_ratio"] <= 0.6 + 1e-9
    assert [r["stage"] for r in m["blocks"]] == ([0, 0, 1] if name == "swin_search" else [0, 1])
    assert len(m["embed"]["after"]) == 2
    loaded = load_pruned(prune_dir / "model")
    dims = family_of(loaded).read_dims(loaded)
    assert [dims[k] for k in dims if k.endswith(".embed")] == m["embed"]["after"]
    assert [i["num_chs"] for i in loaded.feature_info] == m["embed"]["after"]


def test_score_rank_is_a_global_threshold():
    """rank='score' removes the lowest-scored chunks first, whatever they cost (the search gates are already
    priced by cost); the default per-cost ranking may prefer cheaper chunks; unknown ranks are rejected."""
    model = _model(SWIN)
    st = family_of(model).structure(model)
    cm = CostModel(model, st)
    scores = {g.name: torch.full((g.size,), 0.9, dtype=torch.float64) for g in st.of_kind("mlp", "heads")}
    low = "layers.0.blocks.1.mlp"
    scores[low] = torch.linspace(0.1, 0.2, st.groups[low].size, dtype=torch.float64)
    full = cm.flops(st.sizes())
    plan = allocate_budget(st, scores, cm.flops, full * 0.97, rank="score", round_to={"heads": 1, "mlp": 8})
    dims = plan.dims(st)
    assert dims[low] < st.groups[low].size
    assert all(dims[g] == st.groups[g].size for g in scores if g != low)
    assert plan.keep[low] == list(range(st.groups[low].size - len(plan.keep[low]), st.groups[low].size))
    with pytest.raises(VitoptError, match="rank"):
        allocate_budget(st, scores, cm.flops, full * 0.9, rank="bogus")


@pytest.mark.parametrize("spec", [SWIN, PVT], ids=["swin", "pvt_v2"])
def test_vtp_gates_fold_exactly_on_hierarchical_models(spec):
    """UnitGates on heads / head_dim / mlp of every block fold into the Linears at their choke points (PVTv2's
    head_dim gate sits on both q and kv): the ungated folded model computes the gated function."""
    from vitopt.arch.gates import UnitGates

    model = _model(spec)
    st = family_of(model).structure(model)
    gates = UnitGates(st, ("heads", "head_dim", "mlp"))
    with torch.no_grad():
        for p in gates.parameters():
            p.uniform_(0.2, 1.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with gates.attach(model):
            gated = model(x)
        dense = model(x)
        gates.fold_into(model)
        folded = model(x)
    assert (gated - dense).abs().max() > 1e-3
    assert (folded - gated).abs().max() <= 1e-5
