"""Surgery: physically remove pruned units from every coupled tensor.

Generic over the family's Structure: each parameter axis is index-selected by the product of its
factors' kept indices, then the family updates module attributes (``num_heads``, ``head_dim``,
``attn_dim``, ``in/out_features``, ``embed_dim``...) and folds constants that depend on the dims
(the attention scale of a head_dim prune, invariant 2 of ``docs/architecture.md``). The result is the
same timm class, smaller, and equal to the hard-masked model (invariant 1). Whole-module groups
(``blocks``, depth) are applied last: the dropped blocks leave their container and the kept ones are
renumbered (``blocks.0 .. blocks.k-1``), so group names of a depth-pruned model refer to its new blocks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitopt.arch.config import drop_units, set_param
from vitopt.arch.families import family_of
from vitopt.arch.plan import KeepPlan
from vitopt.errors import VitoptError

__all__ = ["apply_plan"]


@torch.no_grad()
def apply_plan(model: nn.Module, plan: KeepPlan, *, inplace: bool = False) -> nn.Module:
    """Remove every unit not in ``plan`` from ``model``; returns the pruned model.

    Args:
        model: a model of a registered family (dense or already pruned).
        plan: kept indices per group, relative to the model's current dims (groups absent from the
            plan keep every unit).
        inplace: cut ``model`` itself (its Parameters are replaced by smaller ones, so an optimizer
            holding the old ones must be rebuilt). By default a deep copy is pruned and ``model``
            is left exactly as it was.

    Returns:
        The pruned model: the same timm class with smaller tensors and updated attributes (``model``
        itself when ``inplace``). Its training flag and device are those of ``model``.

    Raises:
        VitoptError: unsupported model, a plan that names unknown groups / empties a group, or removes
            blocks of a model with an SViTE+ token selector.
    """
    fam = family_of(model)
    structure = fam.structure(model)
    plan.validate(structure)
    drops = [g for g in structure.units if g in plan.keep and len(plan.keep[g]) < structure.groups[g].size]
    if drops and getattr(model, "token_selector", None) is not None:
        raise VitoptError("depth pruning of a model with an SViTE+ token selector (model.token_selector, hooked "
                          f"after block {model.token_selector.after_block}) is not supported; prune width only.")
    if not inplace:
        model = copy.deepcopy(model)
    keep = plan.tensors()
    new_dims = plan.dims(structure)
    fam.fold_before_surgery(model, new_dims)
    by_param: dict[str, list] = {}
    for lay in structure.layouts:
        if any(g in keep for g in lay.groups()):
            by_param.setdefault(lay.param, []).append(lay)
    for name, lays in by_param.items():
        p = model.get_parameter(name)
        value = p.data
        for lay in lays:
            value = value.index_select(lay.axis, lay.index(keep).to(value.device))
        set_param(model, name, value.contiguous(), p.requires_grad)
    fam.set_dims(model, new_dims)
    for group in drops:                           # depth last: set_dims above uses the old block names
        drop_units(model, group, keep[group].tolist())
    return model
