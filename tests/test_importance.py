"""Data-driven importance criteria (taylor, hessian, kl) and per-replica masks.

Tiny models only (img 16, patch 4, 1 channel, D=32, depth 2): the whole file runs in seconds on one
CPU thread.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from vitopt.arch.families import family_of
from vitopt.arch.hooks import attach_replica_masks
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError
from vitopt.pruning.criteria import get_criterion
from vitopt.pruning.criteria.base import coupled_counts

KW = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=4)
KINDS = ["heads", "head_dim", "mlp", "embed"]
DEAD = 2


def compute_scores(name, model, structure, groups, **kw):
    """The registered criterion ``name`` called directly (what vitopt.importance calls)."""
    return get_criterion(name).fn(model, structure, groups, **kw)


def _sharpen(m: torch.nn.Module) -> None:
    """Re-initialise with larger weights so predictions are confident and KLs are O(0.01..1)."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("norm1.weight", "norm2.weight")) or n == "norm.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() >= 2 and n.endswith("weight"):
                p.normal_(0, 1.5 / math.sqrt(p[0].numel()))
            else:
                p.normal_(0, 0.3)


def _make(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", **KW).eval()
    _sharpen(m)
    return m


@pytest.fixture(scope="module")
def base():
    return _make(0)


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (10,), generator=g)
    return [(x[:6], y[:6]), (x[6:], y[6:])]


def _kl_ref(lp: torch.Tensor, model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        lq = F.log_softmax(model(x).double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def _plant_dead(model, st, group: str, unit: int) -> None:
    """Zero every coupled weight of ``unit`` (for embed this includes LayerNorm weight/bias, tokens,
    pos_embed, patch_embed, proj/fc2 outputs: the channel carries nothing downstream)."""
    with torch.no_grad():
        for lay in st.layouts_of(group):
            p = model.get_parameter(lay.param)
            p.index_fill_(lay.axis, lay.index({group: torch.tensor([unit])}), 0.0)


# --------------------------------------------------------------------------------- dead unit last
@pytest.mark.parametrize("kind", KINDS)
def test_every_criterion_ranks_dead_unit_last(base, batches, kind):
    m = copy.deepcopy(base)
    st = family_of(m).structure(m)
    grp = st.of_kind(kind)[-1] if kind != "embed" else st.groups["embed"]
    _plant_dead(m, st, grp.name, DEAD)
    gate = torch.rand(grp.size, generator=torch.Generator().manual_seed(3)) + 0.1
    gate[DEAD] = 0.0
    for name, kw in [("l1", {}), ("gate", {"gates": {grp.name: gate}}), ("taylor", {"batches": batches}),
                     ("taylor_weights", {"batches": batches}), ("hessian", {"batches": batches}),
                     ("kl", {"batches": batches})]:
        s = compute_scores(name, m, st, [grp.name], **kw)[grp.name]
        assert s.shape == (grp.size,) and s.dtype == torch.float64, name
        others = torch.cat([s[:DEAD], s[DEAD + 1:]])
        if name in ("l1", "gate"):
            assert s[DEAD].item() == 0.0 and s.argmin().item() == DEAD, name
        else:
            assert s[DEAD].item() <= others.min().item(), (name, s)
            # non-degenerate: other units matter
            assert others.max().item() > 0, name
        if name in ("taylor", "taylor_weights", "hessian"):
            assert s[DEAD].item() == 0.0, name  # w == 0 on every coupled element
        if name == "kl" and kind != "embed":
            assert abs(s[DEAD].item()) < 1e-9  # removing a unit that outputs 0 changes nothing


# ---------------------------------------------------------------------------- kl == surgery
@pytest.mark.parametrize("fused", [True, False])
def test_kl_replica_masks_equal_surgery(base, batches, fused):
    m = copy.deepcopy(base)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    st = family_of(m).structure(m)
    groups = list(st.groups)
    scores = compute_scores("kl", m, st, groups, batches=batches, max_rows=24)
    cost = scores.cost
    n_units = sum(g.size for g in st.groups.values())
    assert cost["criterion"] == "kl" and cost["units"] == n_units and cost["images"] == 10
    assert cost["max_replicas"] == 6 and cost["seconds"] > 0
    # 6-image batch: R=4, 4-image batch: R=6
    assert cost["forward_passes"] == math.ceil(n_units / 4) + math.ceil(n_units / 6)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        lp_all = F.log_softmax(m(x).double(), -1)
    for g in groups:
        for u in (0, st.groups[g].size - 1):
            c = apply_plan(m, KeepPlan({g: [i for i in range(st.groups[g].size) if i != u]}))
            ref = _kl_ref(lp_all, c, x)
            assert scores[g][u].item() == pytest.approx(ref, abs=1e-5, rel=1e-4), (g, u)
    assert min(s.min().item() for s in scores.values()) > -1e-9


def test_replica_masks_with_random_keep_sets_equal_surgery(base):
    """Each replica with its own multi-unit mask equals the physically pruned model (all kinds)."""
    m = copy.deepcopy(base)
    st = family_of(m).structure(m)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(7)
    for g in ("embed", "blocks.0.heads", "blocks.1.head_dim", "blocks.0.mlp", "blocks"):
        n = st.groups[g].size
        keeps = [sorted(torch.randperm(n, generator=gen)[: max(1, n // 2 + r)].tolist()) for r in range(3)]
        masks = torch.zeros(3, n)
        for r, k in enumerate(keeps):
            masks[r, k] = 1.0
        with torch.no_grad(), attach_replica_masks(m, st, g, masks):
            out = m(x.repeat(3, 1, 1, 1)).reshape(3, 3, -1)
        for r, k in enumerate(keeps):
            c = apply_plan(m, KeepPlan({g: k}))
            with torch.no_grad():
                assert (out[r] - c(x)).abs().max().item() <= 1e-5, (g, r)
    # hooks are gone
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_replica_masks_reject_bad_shapes(base):
    st = family_of(base).structure(base)
    with pytest.raises(ValueError, match="expected"):
        attach_replica_masks(base, st, "blocks.0.mlp", torch.ones(2, 3))
    with attach_replica_masks(base, st, "blocks.0.mlp", torch.ones(2, st.groups["blocks.0.mlp"].size)):
        with pytest.raises(ValueError, match="replicas"):
            base(torch.randn(3, 1, 16, 16))


# ---------------------------------------------------------------------- hand-computed references
def _manual_wg(model, batches):
    """Per batch: {param name: w * dL/dw} with plain autograd on a copy."""
    out = []
    for x, y in batches:
        c = copy.deepcopy(model).eval()
        loss = F.cross_entropy(c(x), y)
        loss.backward()
        out.append({n: (p.detach().double() * p.grad.double()) for n, p in c.named_parameters()})
    return out


def test_taylor_and_hessian_match_hand_computation(base, batches):
    m = copy.deepcopy(base)
    st = family_of(m).structure(m)
    wgs = _manual_wg(m, batches)
    b = 1
    H, d, D = m.blocks[b].attn.num_heads, m.blocks[b].attn.head_dim, m.embed_dim
    A = H * d
    M = m.blocks[0].mlp.fc1.out_features

    def head_sum(wg, h):
        rows = torch.cat([torch.arange(s * A + h * d, s * A + (h + 1) * d) for s in range(3)])
        p = f"blocks.{b}.attn."
        return (wg[p + "qkv.weight"][rows].sum() + wg[p + "qkv.bias"][rows].sum()
                + wg[p + "proj.weight"][:, h * d:(h + 1) * d].sum())

    def mlp_sum(wg, j):
        p = "blocks.0.mlp."
        return wg[p + "fc1.weight"][j].sum() + wg[p + "fc1.bias"][j] + wg[p + "fc2.weight"][:, j].sum()

    heads = torch.tensor([[head_sum(wg, h) for h in range(H)] for wg in wgs], dtype=torch.float64)
    mlp = torch.tensor([[mlp_sum(wg, j) for j in range(M)] for wg in wgs], dtype=torch.float64)
    hg, mg = f"blocks.{b}.heads", "blocks.0.mlp"
    taylor = compute_scores("taylor", m, st, [hg, mg], batches=batches)
    assert taylor.cost["forward_passes"] == 2 and taylor.cost["backward_passes"] == 2
    hess = compute_scores("hessian", m, st, [hg, mg], batches=batches)
    counts = coupled_counts(m, st, [hg, mg])
    assert counts == {hg: 3 * d * D + 3 * d + D * d, mg: 2 * D + 1}
    torch.testing.assert_close(taylor[hg], heads.abs().mean(0), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(taylor[mg], mlp.abs().mean(0), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(hess[hg], heads.pow(2).mean(0) / counts[hg], rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(hess[mg], mlp.pow(2).mean(0) / counts[mg], rtol=1e-6, atol=1e-15)


def test_taylor_weights_match_hand_computation(base, batches):
    """taylor_weights = sum over the unit's elements of |w * mean_b g_b|: batches averaged per element,
    one absolute value per element (not per unit and batch, which is taylor)."""
    m = copy.deepcopy(base)
    st = family_of(m).structure(m)
    wgs = _manual_wg(m, batches)
    mean = {k: sum(wg[k] for wg in wgs) / len(wgs) for k in wgs[0]}
    b, H, d = 1, m.blocks[1].attn.num_heads, m.blocks[1].attn.head_dim
    A, M = H * d, m.blocks[0].mlp.fc1.out_features
    p, q = f"blocks.{b}.attn.", "blocks.0.mlp."

    def head(h):
        rows = torch.cat([torch.arange(s * A + h * d, s * A + (h + 1) * d) for s in range(3)])
        return (mean[p + "qkv.weight"][rows].abs().sum() + mean[p + "qkv.bias"][rows].abs().sum()
                + mean[p + "proj.weight"][:, h * d:(h + 1) * d].abs().sum())

    heads = torch.stack([head(h) for h in range(H)])
    mlp = torch.stack([mean[q + "fc1.weight"][j].abs().sum() + mean[q + "fc1.bias"][j].abs()
                       + mean[q + "fc2.weight"][:, j].abs().sum() for j in range(M)])
    hg, mg = f"blocks.{b}.heads", "blocks.0.mlp"
    got = compute_scores("taylor_weights", m, st, [hg, mg], batches=batches)
    torch.testing.assert_close(got[hg], heads.double(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got[mg], mlp.double(), rtol=1e-6, atol=1e-12)
    taylor = compute_scores("taylor", m, st, [mg], batches=batches)[mg]
    assert (got[mg] > taylor).any()            # cancelling elements count here, not in taylor


def test_taylor_with_teacher_uses_kl(base, batches):
    m = copy.deepcopy(base)
    st = family_of(m).structure(m)
    # a teacher equal to the model: KL at its minimum, zero gradient, zero scores
    same = compute_scores("taylor", m, st, ["blocks.0.mlp"], batches=batches, teacher=copy.deepcopy(m))
    assert same["blocks.0.mlp"].abs().max().item() < 1e-6
    other = compute_scores("taylor", m, st, ["blocks.0.mlp"], batches=batches, teacher=_make(1))
    assert other["blocks.0.mlp"].max().item() > 1e-4
    assert other.cost["teacher_forward_passes"] == 2


# ---------------------------------------------------------------------------- model left unchanged
@pytest.mark.parametrize("name", ["taylor", "taylor_weights", "hessian", "kl"])
def test_criteria_leave_model_unchanged(base, batches, name):
    m = copy.deepcopy(base)
    m.train()
    m.blocks[1].eval()  # mixed training flags must come back per module
    m.pos_embed.requires_grad_(False)
    teacher = _make(2).train()
    st = family_of(m).structure(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = {n: mod.training for n, mod in m.named_modules()}
    req = {n: p.requires_grad for n, p in m.named_parameters()}
    for t in (None, teacher):
        compute_scores(name, m, st, list(st.groups), batches=batches, teacher=t)
        after = m.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in m.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        assert {n: mod.training for n, mod in m.named_modules()} == flags
        assert {n: p.requires_grad for n, p in m.named_parameters()} == req
        assert all(mod.training for mod in teacher.modules())
        assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["taylor", "taylor_weights", "hessian", "kl"])
@pytest.mark.parametrize("given", [None, []])
def test_missing_batches_raise(base, name, given):
    st = family_of(base).structure(base)
    with pytest.raises(VitoptError, match=f"criterion '{name}' needs data batches"):
        compute_scores(name, base, st, ["blocks.0.mlp"], batches=given)


def test_data_free_criteria_ignore_data_kwargs(base, batches):
    st = family_of(base).structure(base)
    a = compute_scores("l1", base, st, ["blocks.0.mlp"])
    b = compute_scores("l1", base, st, ["blocks.0.mlp"], batches=batches, teacher=base)
    assert torch.equal(a["blocks.0.mlp"], b["blocks.0.mlp"])
    assert set(b.cost) == {"criterion", "seconds"} and b.criterion == "l1"
