"""Learnable per-unit gates trained with an L1 penalty: Vision Transformer Pruning (VTP).

Zhu, Tang, Han 2021 (arXiv 2104.08500) put a learnable scalar on every dimension and train with
``loss + lambda * sum |gate|`` (lambda ~ 1e-4), then prune the dimensions whose gates are smallest
under a global threshold and fine-tune. vitopt places the gates at each group's choke point
(:mod:`vitopt.arch.hooks`), so the same gates cover heads, head dims and MLP neurons of every block,
and :meth:`UnitGates.fold_into` folds trained gates into the adjacent Linear weights so the gated
function survives their removal exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from vitopt.arch.hooks import ScalerHandle, attach_scalers
from vitopt.arch.structure import Structure

__all__ = ["UnitGates"]


def _key(group: str) -> str:
    return group.replace(".", "__")


class UnitGates(nn.Module):
    """One learnable gate per unit for every group of the selected kinds.

    Args:
        structure: Structure of the model the gates will attach to.
        kinds: group kinds to gate, e.g. ``("heads", "head_dim", "mlp")``.
        init: initial gate value (1.0 leaves the model's function unchanged).
        groups: gate exactly these group names instead (``kinds`` is then ignored); used by the
            ``search`` criterion, which gates the groups a prune stage selects.

    Attributes:
        groups: gated group names, in structure order.

    Raises:
        KeyError: ``groups`` names a group the structure does not have.
    """

    def __init__(self, structure: Structure, kinds: tuple[str, ...] | list[str] = (), init: float = 1.0, *,
                 groups: list[str] | None = None) -> None:
        super().__init__()
        self.structure = structure
        if groups is not None:
            missing = [g for g in groups if g not in structure.groups]
            if missing:
                raise KeyError(f"groups not in the structure: {missing[:5]}")
            chosen = set(groups)
            self.groups = [g for g in structure.groups if g in chosen]
        else:
            self.groups = [g.name for g in structure.of_kind(*kinds)]
        self.gates = nn.ParameterDict({_key(g): nn.Parameter(torch.full((structure.groups[g].size,), float(init)))
                                       for g in self.groups})

    def value(self, group: str) -> torch.Tensor | None:
        """The gate vector of ``group`` (shape [size]), or None if that group is not gated."""
        return self.gates[_key(group)] if _key(group) in self.gates else None

    def values(self) -> dict[str, torch.Tensor]:
        """group -> detached copy of its gate vector (what the ``gate`` criterion scores)."""
        return {g: self.gates[_key(g)].detach().clone() for g in self.groups}

    def attach(self, model: nn.Module) -> ScalerHandle:
        """Hook the gates onto ``model`` (built from the same Structure); returns the removable handle."""
        return attach_scalers(model, self.structure, {g: self.gates[_key(g)] for g in self.groups})

    def l1(self) -> torch.Tensor:
        """Sum of |gate| over every gate (the VTP sparsity penalty before the lambda factor)."""
        return sum(p.abs().sum() for p in self.gates.values())

    def soft_sizes(self) -> dict[str, torch.Tensor]:
        """group -> differentiable kept count ``sum_u |gate_u|`` (a 0-dim tensor).

        With gates kept in [0, 1] (:meth:`clamp_` after each step) this equals the group's size when
        every gate is 1 and counts a unit fractionally as its gate shrinks; the ``search`` criterion
        prices these soft dims with the closed-form FLOPs. (No clamp inside: its gradient vanishes at
        exactly 1, where every gate starts.)
        """
        return {g: self.gates[_key(g)].abs().sum() for g in self.groups}

    @torch.no_grad()
    def clamp_(self, low: float = 0.0, high: float = 1.0) -> None:
        """Project every gate into ``[low, high]`` in place (after an optimizer step)."""
        for p in self.gates.values():
            p.clamp_(low, high)

    @torch.no_grad()
    def stats(self, threshold: float) -> dict[str, float]:
        """Gate statistics for logging: mean |gate| and fraction below ``threshold``, overall and per kind."""
        out: dict[str, float] = {}
        per_kind: dict[str, list[torch.Tensor]] = {}
        for g in self.groups:
            per_kind.setdefault(self.structure.groups[g].kind, []).append(self.gates[_key(g)].abs())
        every = torch.cat([torch.cat(v) for v in per_kind.values()])
        out["gate_mean"] = every.mean().item()
        out["gate_frac_below"] = (every < threshold).double().mean().item()
        for kind, vals in per_kind.items():
            v = torch.cat(vals)
            out[f"gate_mean/{kind}"] = v.mean().item()
            out[f"gate_frac_below/{kind}"] = (v < threshold).double().mean().item()
        return out

    @torch.no_grad()
    def fold_into(self, model: nn.Module) -> None:
        """Multiply the gates into the Linear layers at their choke points, then reset gates to 1.

        A gate on a Linear's input scales that weight's columns; on its output, the weight's rows and
        the bias. After folding, the ungated model computes what the gated one did.

        Raises:
            TypeError: a choke point is not an ``nn.Linear`` (families must declare foldable ones).
        """
        for g in self.groups:
            gate = self.gates[_key(g)]
            for choke in self.structure.chokes[g]:
                lin = model.get_submodule(choke.module)
                if not isinstance(lin, nn.Linear):
                    raise TypeError(f"cannot fold a gate into {choke.module} ({type(lin).__name__})")
                mult = choke.multiplier(g, gate).to(lin.weight)
                if choke.side == "input":
                    lin.weight.mul_(mult[None, :])
                else:
                    lin.weight.mul_(mult[:, None])
                    if lin.bias is not None:
                        lin.bias.mul_(mult)
            gate.fill_(1.0)
