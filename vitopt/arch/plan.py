"""KeepPlan: which units of each group survive a prune.

The output of allocation and the input of surgery and of masked simulation. Indices are sorted and
unique; a group absent from the plan keeps all its units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError

__all__ = ["KeepPlan"]


@dataclass
class KeepPlan:
    """group name -> sorted kept unit indices.

    Attributes:
        keep: e.g. ``{"blocks.0.heads": [0, 2, 3], "blocks.0.mlp": [...]}``.
    """

    keep: dict[str, list[int]] = field(default_factory=dict)

    def validate(self, structure: Structure) -> None:
        """Raise VitoptError if a group is unknown, empty, or has out-of-range / repeated indices."""
        for g, idx in self.keep.items():
            if g not in structure.groups:
                raise VitoptError(f"keep plan names group {g!r}, which the model does not have.")
            n = structure.groups[g].size
            if not idx:
                raise VitoptError(f"keep plan removes every unit of {g!r}; keep at least one.")
            if len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= n:
                raise VitoptError(f"keep plan for {g!r} must hold unique indices in [0, {n}).")

    def tensors(self) -> dict[str, torch.Tensor]:
        """group -> int64 tensor of sorted kept indices."""
        return {g: torch.as_tensor(sorted(idx), dtype=torch.long) for g, idx in self.keep.items()}

    def dims(self, structure: Structure) -> dict[str, int]:
        """Group sizes after the plan is applied (all groups of ``structure``)."""
        return {g: len(self.keep[g]) if g in self.keep else grp.size for g, grp in structure.groups.items()}

    def cost_dims(self, structure: Structure) -> dict[str, int]:
        """:meth:`dims` plus, for depth, ``unit path -> 0`` for every removed block (``"blocks.3": 0``), the
        key convention of :func:`vitopt.arch.structure.removed_units`: what a cost model needs to price
        *which* blocks go, not only how many."""
        out = self.dims(structure)
        for g, paths in structure.units.items():
            if g in self.keep:
                kept = set(self.keep[g])
                out.update({p: 0 for i, p in enumerate(paths) if i not in kept})
        return out

    def masks(self, structure: Structure) -> dict[str, torch.Tensor]:
        """group -> float 0/1 mask of shape [group size], for the groups in the plan."""
        out = {}
        for g, idx in self.tensors().items():
            m = torch.zeros(structure.groups[g].size)
            m[idx] = 1.0
            out[g] = m
        return out

    @classmethod
    def from_scores(cls, scores: dict[str, torch.Tensor], sizes: dict[str, int]) -> KeepPlan:
        """Keep the ``sizes[g]`` highest-scoring units of each group (ties broken by lower index)."""
        keep = {}
        for g, k in sizes.items():
            s = scores[g]
            order = torch.argsort(-s.double(), stable=True)
            keep[g] = sorted(order[:k].tolist())
        return cls(keep)
