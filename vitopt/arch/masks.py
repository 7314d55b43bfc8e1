"""Masked simulation of a KeepPlan: hard 0/1 masks at each group's choke points.

``apply_masks(model, plan)`` must give the same logits as ``apply_plan(model, plan)`` (invariant 1 of
docs/architecture.md); the residual width uses LayerNorm statistics over kept channels to make that
exact.
"""

from __future__ import annotations

from torch import nn

from vitopt.arch.families import family_of
from vitopt.arch.hooks import ScalerHandle, attach_scalers
from vitopt.arch.plan import KeepPlan

__all__ = ["apply_masks"]


def apply_masks(model: nn.Module, plan: KeepPlan) -> ScalerHandle:
    """Hook hard masks for ``plan`` onto ``model``; ``handle.remove()`` undoes it.

    Raises:
        VitoptError: unsupported model or invalid plan.
    """
    structure = family_of(model).structure(model)
    plan.validate(structure)
    return attach_scalers(model, structure, plan.masks(structure), renorm=True)
