"""Least-squares reconstruction of the layers that consume removed units (``reconstruct=True``).

What must hold: the refit is the least-squares solution (exact when the removed inputs are an affine
function of the kept ones); on a real model each refitted layer's output on the calibration data is
closer to its dense output than with the units simply dropped, and the report says by how much;
only consumers of heads / head_dim / MLP units are refitted; the input model is left untouched; and the
prune loop refits before every cut and refuses to run without data.
"""

from __future__ import annotations

import pytest
import timm
import torch
from prune_helpers import noise_batches, tiny_deit

import vitopt
from vitopt.arch.cost import structure_of
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError
from vitopt.pruning.reconstruction import lstsq_refit, reconstruct


def _tiny(seed: int = 0) -> torch.nn.Module:
    return tiny_deit(seed)


def _batches(n: int = 3) -> list:
    return noise_batches(n, 16)


def _moment(x: torch.Tensor) -> torch.Tensor:
    xt = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    return xt.T @ xt / x.shape[0]


def test_refit_is_exact_when_removed_inputs_are_affine_in_the_kept_ones():
    """x[:, removed] = x[:, kept] A + c: the refitted layer reproduces the dense output exactly."""
    g = torch.Generator().manual_seed(0)
    kept_x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    removed_x = kept_x @ torch.randn(6, 3, generator=g, dtype=torch.float64) + 0.7
    x = torch.cat([kept_x, removed_x], 1)[:, torch.tensor([0, 6, 1, 2, 7, 3, 4, 8, 5])]
    keep = torch.tensor([0, 2, 3, 5, 6, 8])
    w, b = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    new_w, new_b = lstsq_refit(w, b, _moment(x), keep, ridge=0.0)
    torch.testing.assert_close(x[:, keep] @ new_w.T + new_b, x @ w.T + b, rtol=0, atol=1e-9)
    dropped = x[:, keep] @ w[:, keep].T + b
    assert (dropped - (x @ w.T + b)).abs().max() > 0.1          # dropping alone is far off


def test_refit_matches_torch_lstsq_on_noisy_inputs():
    """Without structure in the inputs the refit equals the ordinary least-squares solution."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 10, generator=g, dtype=torch.float64) + 0.3
    w, b = torch.randn(5, 10, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 2, 4, 7, 9])
    new_w, new_b = lstsq_refit(w, b, _moment(x), keep, ridge=0.0)
    design = torch.cat([x[:, keep], torch.ones(400, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(design, x @ w.T + b).solution
    torch.testing.assert_close(new_w, ref[:-1].T, rtol=0, atol=1e-9)
    torch.testing.assert_close(new_b, ref[-1], rtol=0, atol=1e-9)


def _plan(structure) -> KeepPlan:
    """Half of every MLP, one of two heads in block 0, head_dim 16 -> 8 in block 1, residual width kept."""
    keep = {}
    for name, grp in structure.groups.items():
        if grp.kind == "mlp":
            keep[name] = list(range(0, grp.size, 2))
        elif name == "blocks.0.heads":
            keep[name] = [1]
        elif name == "blocks.1.head_dim":
            keep[name] = list(range(8))
    return KeepPlan(keep)


def _layer_io(model: torch.nn.Module, name: str, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []

    def keep_io(module, args, out) -> None:
        xs.append(args[0].reshape(-1, args[0].shape[-1]))
        ys.append(out.reshape(-1, out.shape[-1]))
    h = model.get_submodule(name).register_forward_hook(keep_io)
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    return torch.cat(xs), torch.cat(ys)


def test_refitted_layers_are_closer_to_dense_and_the_report_says_so():
    model, batches = _tiny(), _batches()
    structure = structure_of(model)
    plan = _plan(structure)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refit, report = reconstruct(model, structure, plan, batches, ridge=0.0)
    for k, v in model.state_dict().items():                       # input untouched
        assert torch.equal(v, before[k]), k
    assert set(report) == {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "blocks.0.attn.proj", "blocks.1.attn.proj"}
    changed = {k for k, v in refit.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.{p}" for n in report for p in ("weight", "bias")}   # qkv, fc1, norms, head kept
    keep = plan.tensors()
    for name, rec in report.items():
        x, y = _layer_io(model, name, batches)                   # dense input and output of the layer
        lay = next(lay for lay in structure.layouts if lay.param == f"{name}.weight" and lay.axis == 1)
        cols = lay.index(keep)
        dense_w, new = model.get_submodule(name), refit.get_submodule(name)
        with torch.no_grad():
            y_drop = x[:, cols] @ dense_w.weight[:, cols].T + dense_w.bias
            y_fit = x[:, cols] @ new.weight[:, cols].T + new.bias
        e_drop, e_fit = (float(((yy - y).double() ** 2).sum() / (y.double() ** 2).sum()) for yy in (y_drop, y_fit))
        assert e_fit < 0.9 * e_drop, name
        assert rec["before"] == pytest.approx(e_drop, rel=1e-4)
        assert rec["after"] == pytest.approx(e_fit, rel=1e-4)


def test_reconstruction_brings_the_cut_model_closer_to_the_dense_one():
    """End to end: the cut model's logits on the calibration images move towards the dense logits."""
    model, batches = _tiny(1), _batches()
    structure = structure_of(model)
    plan = _plan(structure)
    plain = apply_plan(model, plan)
    fitted = apply_plan(reconstruct(model, structure, plan, batches)[0], plan)
    with torch.no_grad():
        dense = torch.cat([model(x) for x, _ in batches])
        e_plain = float(((torch.cat([plain(x) for x, _ in batches]) - dense) ** 2).mean())
        e_fit = float(((torch.cat([fitted(x) for x, _ in batches]) - dense) ** 2).mean())
    assert e_fit < 0.7 * e_plain


def test_prune_loop_refits_every_round_and_needs_data():
    model, batches = _tiny(), _batches()
    with pytest.raises(VitoptError, match="reconstruct=True"):
        vitopt.prune(model, target={"flops": 0.6}, criterion="l1", compare="normalized", reconstruct=True)
    res = vitopt.prune_with_report(model, target={"flops": 0.6}, criterion="l1", compare="normalized",
                                   groups=["heads", "mlp"], data=batches, reconstruct=True, schedule="iterative",
                                   rounds=2)
    assert [set(r["reconstruction"]) for r in res.rounds] == [{"before", "after", "layers"}] * 2
    for r in res.rounds:
        assert r["reconstruction"]["layers"] > 0
        assert r["reconstruction"]["after"] < r["reconstruction"]["before"]
    on, off = (vitopt.prune_with_report(model, target={"flops": 0.6}, criterion="l1", compare="normalized",
                                        groups=["heads", "mlp"], data=batches, reconstruct=r) for r in (True, False))
    assert all("reconstruction" not in r for r in off.rounds)
    assert on.dims_after == off.dims_after                           # the refit does not change what is kept
    assert any(not torch.equal(a, b) for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values()))


def test_layers_fed_by_the_residual_width_are_not_refitted():
    """A residual-width cut removes input columns of qkv, fc1 and the head (after a LayerNorm whose statistics
    change): those are left to surgery; only attn.proj / mlp.fc2 are refitted."""
    model, batches = _tiny(), _batches()
    structure = structure_of(model)
    plan = KeepPlan({**_plan(structure).keep, "embed": list(range(0, 32, 2))})
    refit, report = reconstruct(model, structure, plan, batches)
    assert set(report) == {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2", "blocks.0.attn.proj", "blocks.1.attn.proj"}
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc1", "head", "patch_embed.proj"):
        assert torch.equal(refit.get_submodule(name).weight, model.get_submodule(name).weight), name


FAMILY_MODELS = {
    # packed SwiGLU (mlp.fc2 after fc1_g/fc1_x), RoPE: EVA-02 Ti on timm's Eva
    "eva02_swiglu": ("eva02_tiny_patch14_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                                    num_classes=5)),
    # windowed attention with a relative position table per head, two stages
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(1, 1),
                                               num_heads=(2, 4), num_classes=7)),
}


@pytest.mark.parametrize("variant", list(FAMILY_MODELS))
def test_every_family_refits_its_consumers(variant):
    """On other families too, every refitted layer's calibration error drops and the refitted model cuts cleanly."""
    name, kw = FAMILY_MODELS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, kw["img_size"], kw["img_size"], generator=g), torch.zeros(8, dtype=torch.long))
               for _ in range(2)]
    structure = structure_of(model)
    keep = {n: list(range(0, grp.size, 2)) if grp.kind == "mlp" else list(range(grp.size - 1))
            for n, grp in structure.groups.items() if grp.kind in ("mlp", "heads") and grp.size > 1}
    plan = KeepPlan(keep)
    refit, report = reconstruct(model, structure, plan, batches)
    n_blocks = sum(1 for grp in structure.groups.values() if grp.kind == "mlp")
    assert sum(n.endswith("fc2") for n in report) == n_blocks
    assert all(r["after"] < r["before"] for r in report.values()), report
    cut = apply_plan(refit, plan)
    with torch.no_grad():
        assert cut(batches[0][0]).shape == model(batches[0][0]).shape


def test_refit_model_computes_what_the_cut_model_computes():
    """The removed columns are zeroed, so before the cut the refitted model already equals the cut one (heads
    and MLP units removed; a head_dim cut also changes the attention logits, so it is left out here)."""
    model, batches = _tiny(), _batches()
    structure = structure_of(model)
    plan = KeepPlan({k: v for k, v in _plan(structure).keep.items() if not k.endswith("head_dim")})
    refit = reconstruct(model, structure, plan, batches)[0]
    cut = apply_plan(refit, plan)
    with torch.no_grad():
        torch.testing.assert_close(refit(batches[0][0]), cut(batches[0][0]), rtol=1e-5, atol=1e-5)


def test_moments_taken_in_several_passes_give_the_same_refit():
    """A small moment budget measures one layer per pass; every layer is still fitted on the dense model's
    inputs (no refit is written before all are measured), so the weights are the same."""
    model, batches = _tiny(), _batches()
    structure = structure_of(model)
    plan = _plan(structure)
    one, _ = reconstruct(model, structure, plan, batches)
    many, _ = reconstruct(model, structure, plan, batches, moment_budget=1)
    for (k, a), b in zip(one.state_dict().items(), many.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
