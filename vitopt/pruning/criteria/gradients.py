"""Per-unit sums of ``w * dL/dw`` per calibration batch: the shared core of ``taylor`` and ``hessian``.

For a width unit the sum runs over its coupled slices (the Structure's layouts). A block (kind
``blocks``, depth) owns no slice of a shared tensor; its sum is taken through a gate instead: a
multiplier ``s_u = 1`` on both residual branches of block u (its choke points, the outputs of
``attn.proj`` and ``mlp.fc2``) has ``dL/ds_u = sum over those Linears' weight and bias of w * dL/dw``,
the first-order change of the loss when the block becomes the identity.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.hooks import attach_scalers
from vitopt.arch.structure import Structure
from vitopt.pruning.criteria.base import (
    Batches,
    device_of,
    eval_mode,
    logits_of,
    need_batches,
    teacher_log_probs,
)

__all__ = ["weight_gradient_sums"]


def weight_gradient_sums(name: str, model: nn.Module, structure: Structure, groups: list[str], batches: Batches,
                         teacher: nn.Module | None, *, elementwise_abs: bool = False
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per batch b and unit u: s[b, u] = sum over u's coupled elements of w * dL_b/dw (float64, CPU).

    L_b is the mean cross-entropy of batch b against its labels, or, with a teacher,
    KL(softmax(teacher) || softmax(model)) averaged over the batch's images (temperature 1).

    With ``elementwise_abs`` the batches are averaged per element first and the absolute value is taken
    per element: s[0, u] = sum over u's elements of |w * mean_b dL_b/dw| (Torch-Pruning's
    GroupTaylorImportance); a ``blocks`` group, which owns no elements, gets |mean_b dL_b/ds_u|.

    Returns:
        ``(sums, cost)``: group -> float64 ``[batches, group size]`` (``[1, group size]`` with
        ``elementwise_abs``), and the passes/images/seconds it took.

    Raises:
        VitoptError: ``batches`` is None or empty; teacher logits of another shape.
    """
    need_batches(name, batches)
    start = time.perf_counter()
    gated = [g for g in groups if g in structure.units]            # depth: scored through a gate
    names = list(dict.fromkeys(lay.param for g in groups for lay in structure.layouts_of(g)))
    params = [model.get_parameter(n) for n in names]
    flags = [p.requires_grad for p in params]
    dev = device_of(model)
    sums: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in zip(names, params)} if elementwise_abs else {}
    rows = 0
    gates = {g: torch.ones(structure.groups[g].size, device=dev, requires_grad=True) for g in gated}
    handle = attach_scalers(model, structure, gates) if gates else None
    try:
        for p in params:
            p.requires_grad_(True)
        with eval_mode(model, teacher), torch.enable_grad():
            for x, y in batches:
                x = x.to(dev)
                out = logits_of(model(x))
                if teacher is None:
                    loss = F.cross_entropy(out, y.to(dev))
                else:
                    logp_t = teacher_log_probs(teacher, x, out.shape, name).to(dev)
                    loss = F.kl_div(F.log_softmax(out.double(), -1), logp_t, log_target=True, reduction="batchmean")
                grads = torch.autograd.grad(loss, [*params, *gates.values()], allow_unused=True)
                wg = {n: (p.detach().double() * g.double()).cpu() if g is not None
                      else torch.zeros(p.shape, dtype=torch.float64)
                      for n, p, g in zip(names, params, grads)}
                for g, grad in zip(gates, grads[len(params):]):
                    sums[g].append(grad.detach().double().cpu() if grad is not None
                                   else torch.zeros(structure.groups[g].size, dtype=torch.float64))
                for n in acc:
                    acc[n] += wg[n]
                for g in groups:
                    if g in gates or elementwise_abs:
                        continue
                    s = torch.zeros(structure.groups[g].size, dtype=torch.float64)
                    for lay in structure.layouts_of(g):
                        s += lay.reduce(wg[lay.param], g)
                    sums[g].append(s)
                rows += x.shape[0]
    finally:
        if handle is not None:
            handle.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    if elementwise_abs:
        for g in groups:
            if g in gates:
                sums[g] = [torch.stack(sums[g]).mean(0).abs()]
                continue
            s = torch.zeros(structure.groups[g].size, dtype=torch.float64)
            for lay in structure.layouts_of(g):
                s += lay.reduce(acc[lay.param].abs() / len(batches), g)
            sums[g] = [s]
    cost = {"forward_passes": len(batches), "backward_passes": len(batches),
            "teacher_forward_passes": len(batches) if teacher is not None else 0, "rows": rows, "images": rows,
            "units": sum(structure.groups[g].size for g in groups), "seconds": time.perf_counter() - start}
    return {g: torch.stack(v) for g, v in sums.items()}, cost
