"""Importance criteria: one score vector per group, higher = more important.

Every criterion has the signature ``criterion(model, structure, groups, *, gates=None) -> dict[str,
Tensor]`` and is registered in :data:`CRITERIA`. Scores are computed from the Structure's layouts,
so a criterion is written once for every family and group kind.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError

__all__ = ["CRITERIA", "l1_scores", "gate_scores", "compute_scores"]


@torch.no_grad()
def l1_scores(model: nn.Module, structure: Structure, groups: list[str], *, gates=None) -> dict[str, torch.Tensor]:
    """Weight-magnitude importance: sum of |w| over every coupled slice of each unit.

    For a head: its q/k/v rows of qkv and its columns of proj; for an MLP neuron: its fc1 row (and
    bias) and fc2 column. The L1-norm filter criterion of Li et al. 2017 (arXiv 1608.08710), applied
    to coupled groups as in Torch-Pruning's GroupMagnitudeImportance (Fang et al. 2023).

    Returns:
        group -> float64 tensor [group size].
    """
    out = {}
    for g in groups:
        score = torch.zeros(structure.groups[g].size, dtype=torch.float64)
        for lay in structure.layouts_of(g):
            score += lay.reduce(model.get_parameter(lay.param).detach().abs().double(), g)
        out[g] = score
    return out


@torch.no_grad()
def gate_scores(model: nn.Module, structure: Structure, groups: list[str], *, gates=None) -> dict[str, torch.Tensor]:
    """VTP importance: the magnitude of each unit's learned gate (Zhu, Tang, Han 2021, arXiv 2104.08500).

    Args:
        gates: group -> trained gate values [group size] (``UnitGates.values()``).

    Raises:
        VitoptError: no gates were trained (no ``sparse_train`` stage before), or a group has none.
    """
    if gates is None:
        raise VitoptError("criterion 'gate' needs gates from an earlier sparse_train stage.")
    out = {}
    for g in groups:
        value = gates.get(g)
        if value is None or value.shape != (structure.groups[g].size,):
            raise VitoptError(f"criterion 'gate' has no gate for group {g!r}; add its kind to sparse_train.groups.")
        out[g] = value.detach().abs().double().cpu()
    return out


#: criterion name -> function. Names are the recipe's ``prune.criterion`` values.
CRITERIA: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "l1": l1_scores,
    "gate": gate_scores,
}


def compute_scores(name: str, model: nn.Module, structure: Structure, groups: list[str], **kwargs) -> dict[str, torch.Tensor]:
    """Run criterion ``name`` on ``groups``; VitoptError lists the known criteria for an unknown name."""
    if name not in CRITERIA:
        raise VitoptError(f"unknown importance criterion {name!r} (known: {', '.join(CRITERIA)}).")
    return CRITERIA[name](model, structure, groups, **kwargs)
