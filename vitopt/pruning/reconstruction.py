"""Least-squares reconstruction of the layers that consume removed channels.

Removing MLP hidden neurons, heads or head_dim channels deletes input columns of one Linear each
(``mlp.fc2``, ``attn.proj``): its output loses ``W[:, removed] x_removed``. Post-training pruning of
transformers (Kwon et al., "A Fast Post-Training Pruning Framework for Transformers", NeurIPS 2022,
mask tuning; FLAP, An et al. AAAI 2024, bias compensation) recovers most of that loss with a linear
least-squares fit on calibration activations: the kept columns and the bias are re-solved so that the
layer's output on the kept inputs matches its dense output,

    [W'_K, b'] = argmin E || W x + b - (W'_K x_K + b') ||^2
               = [W, b] C[:, K1] (C[K1, K1] + lambda I)^-1,

with ``C = E[x~ x~^T]`` the second moment of the input augmented by a constant 1 (``x~ = [x; 1]``),
``K1`` the kept columns plus that constant, and a ridge ``lambda = ridge * mean(diag C[K1, K1])``.
Only consumers whose input axis is made of heads / head_dim / MLP units are refitted: the residual
width (``embed``) feeds LayerNorms whose statistics change with the cut, which a linear fit of one
layer does not model. Activations are those of the model before the cut (every layer is fitted on
the same dense input, so the fits are independent and need one calibration pass).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from vitopt.arch.plan import KeepPlan
from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError
from vitopt.pruning.criteria.base import Batches, device_of, eval_mode

__all__ = ["reconstruct", "lstsq_refit", "mean_error", "RECONSTRUCTED_KINDS", "MOMENT_BUDGET"]

#: group kinds whose removal is compensated in the consuming Linear.
RECONSTRUCTED_KINDS = ("heads", "head_dim", "mlp")


def lstsq_refit(weight: torch.Tensor, bias: torch.Tensor | None, moment: torch.Tensor, keep: torch.Tensor,
                ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-solve a Linear's kept input columns (and bias) to match its full output in least squares.

    Args:
        weight: ``[out, in]`` weight of the dense layer.
        bias: ``[out]`` bias, or None (then no constant is fitted).
        moment: ``[in + 1, in + 1]`` float64 second moment ``E[x~ x~^T]`` of the input augmented by a
            trailing constant 1 (its last row/column are the input mean and 1).
        keep: int64 ``[k]`` kept input columns (sorted, unique).
        ridge: relative ridge ``lambda / mean(diag C[K1, K1])`` (>= 0) that keeps the solve stable
            when kept inputs are collinear.

    Returns:
        ``(weight [out, k], bias [out] or None)``: the refitted kept columns, in ``weight``'s dtype.

    Raises:
        VitoptError: shapes that do not match, or ``ridge`` < 0.
    """
    out_f, in_f = weight.shape
    if moment.shape != (in_f + 1, in_f + 1) or ridge < 0:
        raise VitoptError(f"lstsq_refit: moment {tuple(moment.shape)} does not match a weight of {in_f} inputs "
                          f"(needs [{in_f + 1}, {in_f + 1}]), or ridge {ridge} < 0.")
    cols = keep.long() if bias is None else torch.cat([keep.long(), torch.tensor([in_f])])
    full = weight.double() if bias is None else torch.cat([weight.double(), bias.double()[:, None]], 1)
    rows = torch.arange(in_f) if bias is None else torch.arange(in_f + 1)
    c_kk = moment[cols][:, cols]
    lam = ridge * float(c_kk.diagonal().mean().clamp_min(1e-12))
    rhs = full @ moment[rows][:, cols]                                   # [out, |K1|]
    sol = torch.linalg.solve(c_kk + lam * torch.eye(len(cols), dtype=c_kk.dtype), rhs.T).T
    if bias is None:
        return sol.to(weight.dtype), None
    return sol[:, :-1].to(weight.dtype), sol[:, -1].to(bias.dtype)


def _output_error(weight: torch.Tensor, moment: torch.Tensor) -> float:
    """``E || D x~ ||^2`` for the difference ``D = [dW, db]`` (``[out, in + 1]``) under ``moment``."""
    d = weight.double()
    return float(torch.einsum("oi,ij,oj->", d, moment, d))


def _consumers(model: nn.Module, structure: Structure, plan: KeepPlan) -> dict[str, torch.Tensor]:
    """Linear module name -> kept input columns, for every Linear whose input axis is laid out over
    heads / head_dim / MLP groups only and loses at least one column under ``plan``."""
    keep = plan.tensors()
    by_param: dict[str, list] = {}
    for lay in structure.layouts:
        if lay.axis == 1 and lay.param.endswith(".weight"):
            by_param.setdefault(lay.param, []).append(lay)
    out: dict[str, torch.Tensor] = {}
    for param, lays in by_param.items():
        groups = [g for lay in lays for g in lay.groups()]
        if any(structure.groups[g].kind not in RECONSTRUCTED_KINDS for g in groups):
            continue
        module_name = param[: -len(".weight")]
        module = model.get_submodule(module_name)
        if not isinstance(module, nn.Linear):
            continue
        idx = torch.arange(module.in_features)
        for lay in lays:
            idx = idx.index_select(0, lay.index(keep))
        if len(idx) < module.in_features:
            out[module_name] = idx
    return out


@torch.no_grad()
def _moments(model: nn.Module, names: list[str], batches: Batches) -> dict[str, torch.Tensor]:
    """float64 ``E[x~ x~^T]`` of each named Linear's input (every token of every image) over ``batches``."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook_for(name: str):
        def pre_hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
            sums[name] = sums.get(name, 0) + (x.T @ x).cpu()
            counts[name] += x.shape[0]
        return pre_hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    dev = device_of(model)
    try:
        with eval_mode(model):
            for x, _ in batches:
                model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in names if n in sums}


#: float64 second moments held at once (bytes); more layers take more calibration passes.
MOMENT_BUDGET = 1 << 30


def _chunks(model: nn.Module, names: list[str], budget: int) -> list[list[str]]:
    """``names`` split, in order, into runs whose float64 moments fit in ``budget`` bytes (at least one each)."""
    out: list[list[str]] = []
    used = budget + 1
    for n in names:
        size = 8 * (model.get_submodule(n).in_features + 1) ** 2
        if used + size > budget:
            out.append([])
            used = 0
        out[-1].append(n)
        used += size
    return out


def _refit_one(layer: nn.Linear, moment: torch.Tensor, keep: torch.Tensor,
               ridge: float) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """The refitted ``[out, in]`` weight (removed columns zero) and bias of one layer, on the CPU, and its
    relative output error with the units dropped / after the refit."""
    w = layer.weight.detach().cpu()
    b = None if layer.bias is None else layer.bias.detach().cpu()
    c = moment if b is not None else moment[:-1, :-1]
    full = w.double() if b is None else torch.cat([w.double(), b.double()[:, None]], 1)
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[keep] = False
    dropped = torch.zeros_like(full)                       # dense minus "units dropped": the removed columns
    dropped[:, : w.shape[1]][:, removed] = full[:, : w.shape[1]][:, removed]
    new_w, new_b = lstsq_refit(w, b, moment, keep, ridge)
    weight = torch.zeros_like(w)
    weight[:, keep] = new_w
    refit = weight.double() if new_b is None else torch.cat([weight.double(), new_b.double()[:, None]], 1)
    dense = max(_output_error(full, c), 1e-30)
    return weight, new_b, {"before": _output_error(dropped, c) / dense, "after": _output_error(full - refit, c) / dense}


@torch.no_grad()
def reconstruct(model: nn.Module, structure: Structure, plan: KeepPlan, batches: Batches, *, ridge: float = 1e-4,
                inplace: bool = False, moment_budget: int = MOMENT_BUDGET) -> tuple[nn.Module, dict[str, dict[str, float]]]:
    """Refit the consumers of the heads / head_dim / MLP units that ``plan`` removes (before surgery).

    The kept input columns and bias of each consuming Linear (``attn.proj``, ``mlp.fc2``) are re-solved
    by :func:`lstsq_refit` on the calibration activations of ``model`` as given (every layer on the same
    dense inputs; the new weights are written only after all moments are taken), and the removed
    columns are set to zero. The result computes what the cut model computes wherever only heads and
    MLP units are removed; apply the same ``plan`` to it with :func:`vitopt.arch.surgery.apply_plan`.

    Args:
        model: the model ``plan`` was made for (its current dims), not yet cut; any device.
        structure: ``model``'s Structure.
        plan: the kept units.
        batches: calibration ``(images [B, C, H, W], labels [B])`` batches (labels unused).
        ridge: relative ridge of the solve (see :func:`lstsq_refit`).
        inplace: refit ``model`` itself; by default a deep copy is refitted.
        moment_budget: bytes of float64 input moments (``8 (in + 1)^2`` per layer, on the CPU) held at
            once; layers beyond it are measured in further passes over ``batches``.

    Returns:
        ``(model, report)``: report maps each refitted Linear to ``before`` / ``after``, its output error
        ``E||y_dense - y_cut||^2 / E||y_dense||^2`` on the calibration data with the removed columns simply
        dropped and after the refit.

    Raises:
        VitoptError: no calibration batches.
    """
    if not batches:
        raise VitoptError("reconstruction refits layers on calibration activations: pass data= (calibration "
                          "batches), or prune with reconstruct=False.")
    if not inplace:
        model = copy.deepcopy(model)
    targets = _consumers(model, structure, plan)
    new: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    report: dict[str, dict[str, float]] = {}
    for chunk in _chunks(model, list(targets), moment_budget):
        for name, moment in _moments(model, chunk, batches).items():
            weight, bias, report[name] = _refit_one(model.get_submodule(name), moment, targets[name], ridge)
            new[name] = (weight, bias)
    for name, (weight, bias) in new.items():
        layer = model.get_submodule(name)
        layer.weight.data.copy_(weight.to(layer.weight.device))
        if bias is not None:
            layer.bias.data.copy_(bias.to(layer.bias.device))
    return model, report


def mean_error(report: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean ``before`` / ``after`` relative output error (dimensionless, ``E||dy||^2 / E||y||^2``) over the
    refitted layers of a :func:`reconstruct` report, and their count as ``layers``; zeros for an empty
    report (nothing refitted). Raises nothing."""
    if not report:
        return {"before": 0.0, "after": 0.0, "layers": 0}
    n = len(report)
    return {"before": sum(r["before"] for r in report.values()) / n,
            "after": sum(r["after"] for r in report.values()) / n, "layers": n}
