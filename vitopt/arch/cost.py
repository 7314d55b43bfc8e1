"""Analytic cost of an architecture: parameters and MACs, per group dims, without building a model.

Allocation prices candidate architectures thousands of times, so costs are closed-form:

* params: every parameter's element count scales with the factors its coupled axes carry
  (from the Structure's layouts), so ``params(dims)`` is exact for any dims; the parameters of a
  removed block (depth, :func:`vitopt.arch.structure.removed_units`) are not counted;
* MACs: the family's closed form (matmuls and convolutions only; FLOPs = 2 x MACs, the convention of
  fvcore and ``torch.utils.flop_counter``).

Tests check both against ``sum(p.numel())`` and ``torch.utils.flop_counter`` on surgered models.
"""

from __future__ import annotations

import math

from torch import nn

from vitopt.arch.families import family_of
from vitopt.arch.structure import Structure, removed_units

__all__ = ["CostModel", "structure_of"]


class CostModel:
    """Closed-form params and MACs of one model at any dims of its groups.

    Args:
        model: the (dense or pruned) model whose Structure defines the groups.
        structure: its Structure (built when omitted).

    ``params(dims)`` counts parameters (all of them, including those no group touches);
    ``macs(dims)`` returns the family's MAC count for one image; ``flops(dims) = 2 * macs(dims)``.
    """

    def __init__(self, model: nn.Module, structure: Structure | None = None) -> None:
        self.family = family_of(model)
        self.structure = structure or self.family.structure(model)
        self.model = model
        self.base_dims = self.structure.sizes()
        coupled: dict[str, list] = {}
        for lay in self.structure.layouts:
            coupled.setdefault(lay.param, []).append(lay)
        shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        self._fixed = sum(math.prod(s) for n, s in shapes.items() if n not in coupled)
        self._coupled = [(shapes[n], lays) for n, lays in coupled.items()]
        self._units = self.structure.units
        # unit path -> (fixed params under it, [(shape, layouts)] coupled params under it), for depth
        self._in_unit: dict[str, tuple[int, list]] = {}
        for paths in self._units.values():
            for u in paths:
                under = [n for n in shapes if n.startswith(u + ".")]
                self._in_unit[u] = (sum(math.prod(shapes[n]) for n in under if n not in coupled),
                                    [(shapes[n], coupled[n]) for n in under if n in coupled])

    @staticmethod
    def _count(coupled: list, dims: dict[str, int]) -> int:
        total = 0
        for shape, lays in coupled:
            shape = list(shape)
            for lay in lays:
                shape[lay.axis] = lay.new_length(dims)
            total += math.prod(shape)
        return total

    def params(self, dims: dict[str, int]) -> int:
        """Number of parameters at ``dims`` (groups absent from ``dims`` keep their current size; the
        parameters of removed blocks, :func:`~vitopt.arch.structure.removed_units`, are not counted)."""
        total = self._fixed + self._count(self._coupled, dims)
        if self._units:
            for u in removed_units(self._units, {**self.base_dims, **dims}):
                fixed, coupled = self._in_unit[u]
                total -= fixed + self._count(coupled, dims)
        return total

    def macs(self, dims: dict[str, int]) -> int:
        """MACs for one image at ``dims`` (groups absent keep their current size).

        A model with an SViTE+ token selector (``model.token_selector``, see
        :mod:`vitopt.sparsity.token_selector`) is counted by the selector, with the reduced token
        count in the blocks after it.
        """
        selector = getattr(self.model, "token_selector", None)
        if selector is not None:
            return selector.macs(self.model, {**self.base_dims, **dims})["total"]
        return self.family.macs(self.model, {**self.base_dims, **dims})["total"]

    def flops(self, dims: dict[str, int]) -> int:
        """FLOPs (= 2 x MACs) for one image at ``dims``."""
        return 2 * self.macs(dims)

    def __call__(self, metric: str, dims: dict[str, int]) -> float:
        """Cost of ``dims`` in ``metric`` (``"flops"``, ``"macs"`` or ``"params"``)."""
        return float(getattr(self, metric)(dims))


def structure_of(model: nn.Module) -> Structure:
    """The :class:`Structure` of ``model`` with its cost model attached (``vitopt.structure``).

    Groups with kind, block, stage and size; ``structure.cost(metric, dims)``,
    ``structure.unit_costs()`` (FLOPs and params one unit saves) and a readable ``repr`` / ``table()``.
    Allocation (:func:`vitopt.pruning.allocation.allocate`) prices candidate shapes with it.

    Raises:
        VitoptError: the model's class is not a registered family, or uses a feature its family
            cannot prune (the message names the module and feature).
    """
    cm = CostModel(model)
    cm.structure.cost_model = cm
    return cm.structure
