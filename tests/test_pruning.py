"""Importance criteria, allocation under a budget with rounding, and VTP gates."""

from __future__ import annotations

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st_

from vitopt.arch.cost import CostModel
from vitopt.arch.families import family_of
from vitopt.arch.gates import UnitGates
from vitopt.errors import VitoptError
from vitopt.pruning.allocation import allocate_budget, allowed_sizes
from vitopt.pruning.criteria import get_criterion
from vitopt.pruning.importance import importance

KW = dict(img_size=32, patch_size=8, num_classes=5, depth=4, embed_dim=96, num_heads=6, mlp_ratio=4.0)


def compute_scores(name, model, structure, groups, **kw):
    """The registered criterion ``name`` called directly (what vitopt.importance calls)."""
    return get_criterion(name).fn(model, structure, groups, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **KW).eval()


def test_allowed_sizes():
    assert allowed_sizes(20, 8, 8) == [20, 16, 8]
    assert allowed_sizes(6, 1, 1) == [6, 5, 4, 3, 2, 1]
    assert allowed_sizes(64, 16, 32) == [64, 48, 32]


@pytest.mark.parametrize("kind", ["heads", "head_dim", "mlp", "embed"])
def test_l1_ranks_dead_unit_last(model, kind):
    st = family_of(model).structure(model)
    grp = st.of_kind(kind)[0]
    dead = 3
    with torch.no_grad():
        for lay in st.layouts_of(grp.name):
            p = model.get_parameter(lay.param)
            idx = lay.index({grp.name: torch.tensor([dead])})
            p.index_fill_(lay.axis, idx, 0.0)
    scores = compute_scores("l1", model, st, [grp.name])[grp.name]
    assert scores.shape == (grp.size,)
    assert scores.argmin().item() == dead and scores[dead].item() == 0.0


def test_unknown_criterion(model):
    with pytest.raises(VitoptError, match="known: l1, gate"):
        importance(model, "nope")


@settings(max_examples=40, deadline=None)
@given(seed=st_.integers(0, 10_000), target=st_.floats(0.3, 0.95), scope=st_.sampled_from(["global", "uniform"]),
       metric=st_.sampled_from(["flops", "params"]), r_mlp=st_.sampled_from([8, 16, 32]))
def test_allocation_meets_budget_and_rounding(model, seed, target, scope, metric, r_mlp):
    st = family_of(model).structure(model)
    cm = CostModel(model, st)
    g = torch.Generator().manual_seed(seed)
    groups = st.of_kind("heads", "head_dim", "mlp")
    scores = {grp.name: torch.rand(grp.size, generator=g) for grp in groups}
    cost = getattr(cm, metric)
    dense = cost(st.sizes())
    plan = allocate_budget(st, scores, cost, target * dense, scope=scope, round_to={"mlp": r_mlp}, min_keep={"head_dim": 8})
    dims = plan.dims(st)
    assert cost(dims) <= target * dense
    for grp in groups:
        n = dims[grp.name]
        step = {"heads": 1, "head_dim": 8, "mlp": r_mlp}[grp.kind]
        assert n == grp.size or n % step == 0
        assert n >= {"heads": 1, "head_dim": 8, "mlp": r_mlp}[grp.kind]
        kept = plan.keep[grp.name]
        # kept units are the top-scoring ones of their group
        top = torch.argsort(scores[grp.name], descending=True)[:n].sort().values.tolist()
        assert kept == top
    if scope == "uniform":
        ratios = {round(dims[grp.name] / grp.size, 1) for grp in st.of_kind("mlp")}
        assert len(ratios) == 1


def test_global_allocation_moves_capacity_to_important_blocks(model):
    """Blocks whose units score high keep more than blocks whose units score low."""
    st = family_of(model).structure(model)
    cm = CostModel(model, st)
    scores = {grp.name: torch.full((grp.size,), 1.0 if grp.block % 2 == 0 else 0.1) + 0.01 * torch.rand(grp.size)
              for grp in st.of_kind("mlp")}
    plan = allocate_budget(st, scores, cm.flops, 0.7 * cm.flops(st.sizes()))
    dims = plan.dims(st)
    assert dims["blocks.0.mlp"] > dims["blocks.1.mlp"] and dims["blocks.2.mlp"] > dims["blocks.3.mlp"]


def test_impossible_budget_is_explained(model):
    st = family_of(model).structure(model)
    cm = CostModel(model, st)
    scores = {grp.name: torch.rand(grp.size) for grp in st.of_kind("mlp")}
    with pytest.raises(VitoptError, match="cannot be met"):
        allocate_budget(st, scores, cm.flops, 0.05 * cm.flops(st.sizes()))


def test_gates_fold_and_stats(model):
    import copy

    m = copy.deepcopy(model)
    st = family_of(m).structure(m)
    gates = UnitGates(st, ("heads", "head_dim", "mlp"))
    with torch.no_grad():
        for p in gates.gates.values():
            p.uniform_(0.0, 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = m(x)
        with gates.attach(m):
            gated = m(x)
        assert (gated - base).abs().max() > 1e-3
        stats = gates.stats(threshold=0.5)
        every = torch.cat([p for p in gates.gates.values()])
        assert stats["gate_mean"] == pytest.approx(every.mean().item())
        assert stats["gate_frac_below"] == pytest.approx((every < 0.5).double().mean().item())
        assert gates.l1().item() == pytest.approx(every.abs().sum().item(), rel=1e-6)
        values = gates.values()
        gates.fold_into(m)
        assert (m(x) - gated).abs().max().item() <= 1e-5
        assert all(torch.all(p == 1) for p in gates.gates.values())
    scores = compute_scores("gate", m, st, gates.groups, gates=values)
    assert set(scores) == set(gates.groups)
    assert all(torch.equal(scores[g], values[g].double()) for g in gates.groups)


def test_gate_criterion_needs_gates(model):
    st = family_of(model).structure(model)
    with pytest.raises(VitoptError, match="sparse_train"):
        compute_scores("gate", model, st, ["blocks.0.mlp"])
