"""``gate``: VTP gate magnitudes as importance."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError
from vitopt.pruning.criteria.base import Criterion, Scores

__all__ = ["gate_scores", "CRITERION"]


@torch.no_grad()
def gate_scores(model: nn.Module, structure: Structure, groups: list[str], *,
                gates: dict[str, torch.Tensor] | None = None, **unused: Any) -> Scores:
    """VTP importance: the magnitude of each unit's learned gate (Zhu, Tang, Han 2021, arXiv 2104.08500).

    Args:
        gates: group -> trained gate values [group size] (``UnitGates.values()``).
        unused: ``batches``, ``teacher`` (ignored).

    Returns:
        group -> float64 tensor [group size], |gate|.

    Raises:
        VitoptError: no gates were trained (no ``sparse_train`` stage before), or a group has none.
    """
    if gates is None:
        raise VitoptError("criterion 'gate' needs gates from an earlier sparse_train stage.")
    start = time.perf_counter()
    out = {}
    for g in groups:
        value = gates.get(g)
        if value is None or value.shape != (structure.groups[g].size,):
            raise VitoptError(f"criterion 'gate' has no gate for group {g!r}; add its kind to sparse_train.groups.")
        out[g] = value.detach().abs().double().cpu()
    return Scores(out, criterion="gate", cost={"seconds": time.perf_counter() - start})


#: registry entry
CRITERION = Criterion("gate", gate_scores, needs=frozenset({"gates"}),
                      description="|gate| learned by VTP sparse training (sparse_train method vtp)",
                      source="Zhu, Tang, Han 2021, arXiv 2104.08500")
