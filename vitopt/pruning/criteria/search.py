"""``search``: dimension search with learnable gates under a FLOPs target, in the spirit of SiDT.

SiDT ("Searching Intrinsic Dimensions of Vision Transformers", Xue, Yang, Qi, Xin 2022,
arXiv 2204.07722) prunes vision-transformer backbones for complex tasks such as object detection
"based on the search of transformer dimensions", and reports that backbones with 20% or 40% of
their dimensions/parameters pruned perform like the unpruned ones (CIFAR-100, COCO). That is what
we take from its abstract: search transformer dimensions of (hierarchical) backbones, prune to a
20-40% reduction, keep the backbone usable for dense tasks. Its full method text was not
available to us, so everything below is OUR design:

1. One learnable gate per unit of every selected group (per-stage embedding widths, per-block heads,
   head dims and MLP neurons), initialised at 1 and multiplied in at the groups' choke points
   (:class:`vitopt.arch.gates.UnitGates`, the same hooks as VTP gates and hard masks).
   The model's weights are frozen; only the gates train.
2. Loss per step = KL(dense model || gated model) on a calibration batch (label-free: the search
   keeps the function of the model it starts from) + ``penalty`` x |F(soft dims) / F(dense)
   - target|, where a group's soft dim is ``sum_u |gate_u|`` (gates stay in [0, 1]) and F is the family's
   closed-form cost (FLOPs by default, :class:`vitopt.arch.cost.CostModel`), evaluated on those
   fractional dims, so each gate is pushed down in proportion to the FLOPs its unit costs (a
   cost-weighted L1) while the expected cost is above the target, and back up when it is below;
   Adam keeps the sign of each gate's balance between its KL gradient and its cost, so the gates
   that stay high are those whose contribution to the prediction outweighs their FLOPs.
3. Adam on the gates, projected into [0, 1] after each step, for ``steps`` steps.
4. The final gate magnitudes are the importance (ties broken by the units' weight L1 magnitude);
   :func:`vitopt.pruning.allocation.allocate` then picks per-stage and per-block dims under the
   budget with hardware rounding, as for every criterion (default ranking: importance lost per
   FLOP saved). ``rank="score"`` - a plain global threshold on the gates, which are already priced
   by cost - is the alternative; on our digits Swin it kept less accuracy one-shot and after KD
   (``benchmarks/hierarchical.py --rank score``), so it is not the default.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.cost import CostModel
from vitopt.arch.gates import UnitGates
from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError
from vitopt.pruning.criteria.base import (
    Batches,
    Criterion,
    Scores,
    device_of,
    eval_mode,
    logits_of,
    need_batches,
)
from vitopt.pruning.criteria.l1 import l1_scores

__all__ = ["search_scores", "SEARCH_DEFAULTS", "CRITERION"]

#: Default options of the ``search`` criterion.
SEARCH_DEFAULTS = {"steps": 100, "lr": 0.02, "penalty": 5.0}


def search_scores(model: nn.Module, structure: Structure, groups: list[str], *, batches: Batches | None = None,
                  teacher: nn.Module | None = None, cost: Callable[[dict], object] | None = None,
                  target: float | None = None, steps: int = SEARCH_DEFAULTS["steps"], lr: float = SEARCH_DEFAULTS["lr"],
                  penalty: float = SEARCH_DEFAULTS["penalty"], **unused: Any) -> Scores:
    """Learn one gate per unit of ``groups`` under a cost target; return the gate magnitudes.

    Args:
        model: the model ``structure`` was built from; weights are frozen during the search and
            left unchanged (parameters, ``requires_grad``, ``.grad``, training flags, no hooks left).
        structure: its :class:`Structure`.
        groups: group names to search (e.g. every ``embed``, ``heads``, ``head_dim``, ``mlp`` group).
        unused: ``gates`` (ignored: the search trains its own).
        batches: non-empty list of ``(images [B, C, H, W], labels [B])``; cycled for ``steps`` steps.
        teacher: reference whose predictions the gated model must keep; default the model itself,
            ungated (KL at temperature 1).
        cost: dims -> cost, differentiable in the dims (``CostModel(model).flops``, the default).
        target: cost to reach as a fraction of ``cost(structure.sizes())``, in (0, 1].
        steps: optimisation steps (>= 1).
        lr: Adam learning rate of the gates.
        penalty: weight of ``|expected cost ratio - target|`` in the loss.

    Returns:
        group -> float64 CPU tensor [group size], gate magnitude in [0, 1] plus a tie-breaking
        term < 1e-6 from the units' weight L1 magnitude.

    Raises:
        VitoptError: missing/empty ``batches``, ``target`` not in (0, 1], ``steps < 1``, or ``lr``/``penalty``
            not positive.
    """
    need_batches("search", batches)
    if target is None or not 0 < target <= 1:
        raise VitoptError(f"criterion 'search' needs a cost target in (0, 1] (a fraction of the dense cost), got {target}.")
    if steps < 1 or lr <= 0 or penalty <= 0:
        raise VitoptError(f"criterion 'search': steps must be >= 1 and lr, penalty > 0 (got steps={steps}, "
                          f"lr={lr}, penalty={penalty}).")
    start = time.perf_counter()
    cost = cost or CostModel(model, structure).flops
    base = structure.sizes()
    full = float(cost(base))
    dev = device_of(model)
    unit_gates = UnitGates(structure, groups=list(groups)).to(dev)
    opt = torch.optim.Adam(unit_gates.parameters(), lr=lr)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    ratio = torch.tensor(1.0)
    forwards = 0
    try:
        for p in params:
            p.requires_grad_(False)
        with eval_mode(model, teacher), torch.enable_grad():
            for _step, (x, _) in zip(range(steps), itertools.cycle(batches)):
                x = x.to(dev)
                with torch.no_grad():                   # gates are not attached here: the dense reference
                    ref_model = model if teacher is None else teacher
                    ref = logits_of(ref_model(x.to(device_of(ref_model)))).to(dev)
                with unit_gates.attach(model):
                    out = logits_of(model(x))
                forwards += 1
                kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
                ratio = cost({**base, **unit_gates.soft_sizes()}) / full
                loss = kl + penalty * (ratio - target).abs()
                grads = torch.autograd.grad(loss, list(unit_gates.parameters()))
                for g, p in zip(grads, unit_gates.parameters()):
                    p.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
                unit_gates.clamp_()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    values = unit_gates.values()
    l1 = l1_scores(model, structure, list(groups))
    out = {}
    for g in groups:
        tie = l1[g] / (l1[g].max() + 1e-12) * 1e-6
        out[g] = values[g].abs().double().cpu() + tie
    cost_report = {"forward_passes": forwards * (2 if teacher is None else 1), "backward_passes": forwards,
                   "teacher_forward_passes": forwards if teacher is not None else 0,
                   "rows": forwards * batches[0][0].shape[0], "images": sum(b[0].shape[0] for b in batches[:steps]),
                   "units": sum(structure.groups[g].size for g in groups), "steps": steps,
                   "expected_cost_ratio": float(ratio.detach()), "seconds": time.perf_counter() - start}
    return Scores(out, criterion="search", cost=cost_report)


#: registry entry
CRITERION = Criterion("search", search_scores, needs=frozenset({"data"}), uses=frozenset({"teacher", "target", "cost"}),
                      options=dict(SEARCH_DEFAULTS),
                      description="SiDT-style dimension search: gates trained under the cost target",
                      source="Xue, Yang, Qi, Xin 2022, arXiv 2204.07722 (in spirit; see the module docstring)")
