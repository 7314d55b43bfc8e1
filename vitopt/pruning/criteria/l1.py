"""``l1``: weight-magnitude importance of coupled units (no data)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from vitopt.arch.structure import Structure
from vitopt.pruning.criteria.base import Criterion, Scores

__all__ = ["l1_scores", "CRITERION"]


@torch.no_grad()
def l1_scores(model: nn.Module, structure: Structure, groups: list[str], **unused: Any) -> Scores:
    """Weight-magnitude importance: sum of |w| over every coupled slice of each unit.

    For a head: its q/k/v rows of qkv and its columns of proj; for an MLP neuron: its fc1 row (and
    bias) and fc2 column. The L1-norm filter criterion of Li et al. 2017 (arXiv 1608.08710), applied
    to coupled groups as in Torch-Pruning's GroupMagnitudeImportance (Fang et al. 2023,
    arXiv 2301.12900). Other keyword arguments (``batches``, ``teacher``, ``gates``) are ignored.

    Returns:
        group -> float64 tensor [group size] (units of |w|, summed).
    """
    start = time.perf_counter()
    out = {}
    for g in groups:
        score = torch.zeros(structure.groups[g].size, dtype=torch.float64)
        for lay in structure.layouts_of(g):
            score += lay.reduce(model.get_parameter(lay.param).detach().abs().double().cpu(), g)
        out[g] = score
    return Scores(out, criterion="l1", cost={"seconds": time.perf_counter() - start})


#: registry entry
CRITERION = Criterion("l1", l1_scores, description="L1 norm of the unit's coupled weights (no data)",
                      source="Li et al. 2017, arXiv 1608.08710; Fang et al. 2023, arXiv 2301.12900")
