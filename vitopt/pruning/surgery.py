"""Surgery: physically remove pruned units from every coupled tensor.

Generic over the family's Structure: each parameter axis is index-selected by the product of its
factors' kept indices, then the family updates module attributes (``num_heads``, ``head_dim``,
``attn_dim``, ``in/out_features``, ``embed_dim``...) and folds constants that depend on the dims
(the attention scale of a head_dim prune, DESIGN.md invariant 2). The result is the same timm class,
smaller, and equal to the hard-masked model (invariant 1).
"""

from __future__ import annotations

import torch
from torch import nn

from vitopt.arch.config import _set_param
from vitopt.arch.families import family_of
from vitopt.pruning.plan import KeepPlan

__all__ = ["prune_model"]


@torch.no_grad()
def prune_model(model: nn.Module, plan: KeepPlan) -> nn.Module:
    """Remove every unit not in ``plan`` from ``model``, in place; returns the model.

    Args:
        model: a model of a registered family (dense or already pruned).
        plan: kept indices per group, relative to the model's current dims.

    Raises:
        VitoptError: unsupported model, or a plan that names unknown groups / empties a group.
    """
    fam = family_of(model)
    structure = fam.structure(model)
    plan.validate(structure)
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
        _set_param(model, name, value.contiguous(), p.requires_grad)
    fam.set_dims(model, new_dims)
    return model
