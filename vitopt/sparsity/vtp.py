"""VTP gates as a training :class:`~vitopt.train.callbacks.Callback`, with cheap gate application.

Vision Transformer Pruning (Zhu, Tang, Han 2021, arXiv 2104.08500): one learnable gate per unit
(head, head dim, MLP neuron), loss = task loss + ``lambda * sum |gate|`` (lambda ~ 1e-4). The gates
themselves are :class:`~vitopt.arch.gates.UnitGates`; this module

* :func:`attach_gates_to_weights`: applies each gate to the *weights* at its choke point (a
  ``torch.nn.utils.parametrize`` parametrization: a gate on a Linear's input scales the weight's
  columns, on its output the weight's rows and the bias) instead of multiplying the activations in
  a forward hook, as the generic :func:`vitopt.arch.hooks.attach_scalers` does. ``F.linear(x, W * g)``
  equals ``F.linear(x * g, W)`` up to float rounding (tested to 1e-5), but the multiplication touches
  ``out x in`` weights instead of ``batch x tokens x in`` activations, forward and backward, which
  removes most of the gate overhead of a training step;
* :class:`VTP`: the method: gates on the model's weights, the L1 penalty as its ``loss()``, gate
  statistics per epoch, the gate tensors as its ``state_dict`` for epoch checkpoints, ``finish()``
  folding them into the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitopt.arch.families import family_of
from vitopt.arch.gates import UnitGates
from vitopt.arch.hooks import ScalerHandle
from vitopt.arch.structure import AxisLayout
from vitopt.train.callbacks import Callback

__all__ = ["attach_gates_to_weights", "VTP", "GATED_KINDS"]

#: group kinds VTP gates by default.
GATED_KINDS = ("heads", "head_dim", "mlp")


def _unit_index(factors, group: str, size: int) -> Tensor:
    """For each position of a choke point's last dim, the index of ``group``'s unit it belongs to."""
    ids = torch.arange(size, dtype=torch.float64)
    return AxisLayout("", -1, factors).expand({group: ids}).round().long()


class _GateScale(nn.Module):
    """Parametrization ``W -> W * gate[idx]`` along ``axis`` (1: weight columns, 0: rows or a bias)."""

    def __init__(self, gate: Tensor, idx: Tensor, axis: int) -> None:
        super().__init__()
        # a plain attribute, not a registered Parameter: the gates stay outside the model's parameters
        object.__setattr__(self, "gate", gate)
        self.axis = axis
        self.register_buffer("idx", idx, persistent=False)

    def forward(self, w: Tensor) -> Tensor:
        v = self.gate[self.idx].to(w.dtype)
        if w.dim() == 1:
            return w * v
        return w * (v[None, :] if self.axis == 1 else v[:, None])


class _ParamHandle(ScalerHandle):
    """Handle of :func:`attach_gates_to_weights`: ``remove()`` restores the plain weights."""

    def __init__(self, modules: list[tuple[nn.Module, str]], hooks: ScalerHandle | None = None) -> None:
        super().__init__()
        self._modules = modules
        self._hooks = hooks

    def remove(self) -> None:
        from torch.nn.utils import parametrize

        for mod, name in self._modules:
            if parametrize.is_parametrized(mod, name):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=False)
        self._modules = []
        if self._hooks is not None:
            self._hooks.remove()


def attach_gates_to_weights(model: nn.Module, gates: UnitGates) -> ScalerHandle:
    """Apply ``gates`` to the weights of their choke-point Linears (same function as :meth:`UnitGates.attach`).

    Input-side choke (e.g. ``attn.proj`` for heads, ``mlp.fc2`` for MLP neurons): ``W[:, j] *= g[unit(j)]``;
    output-side (``attn.qkv`` for head_dim): ``W[j, :] *= g[unit(j)]`` and ``b[j] *= g[unit(j)]``. The
    original Parameters stay the ones the optimizer holds (``parametrizations.weight.original``);
    gradients reach both them and the gates. If a choke point is not an ``nn.Linear``, every gate
    falls back to the activation hooks of :meth:`UnitGates.attach`.

    Returns:
        a handle whose ``remove()`` drops the parametrizations (the weights are the unscaled originals).
    """
    from torch.nn.utils import parametrize

    structure = gates.structure
    chokes = [(g, c) for g in gates.groups for c in structure.chokes[g]]
    if not all(isinstance(model.get_submodule(c.module), nn.Linear) for _, c in chokes):
        return gates.attach(model)
    done: list[tuple[nn.Module, str]] = []
    for group, choke in chokes:
        lin = model.get_submodule(choke.module)
        gate = gates.value(group)
        idx = _unit_index(choke.factors, group, structure.groups[group].size).to(gate.device)
        if choke.side == "input":
            parametrize.register_parametrization(lin, "weight", _GateScale(gate, idx, 1), unsafe=True)
            done.append((lin, "weight"))
        else:
            parametrize.register_parametrization(lin, "weight", _GateScale(gate, idx, 0), unsafe=True)
            done.append((lin, "weight"))
            if lin.bias is not None:
                parametrize.register_parametrization(lin, "bias", _GateScale(gate, idx, 0), unsafe=True)
                done.append((lin, "bias"))
    return _ParamHandle(done)


class VTP(Callback):
    """VTP gate training (Zhu, Tang, Han 2021, arXiv 2104.08500), usable in :func:`vitopt.train.loop.fit`
    or in any PyTorch loop.

    Construction puts one learnable gate (init 1) on every unit of the groups of the chosen kinds and
    applies them to the choke-point weights (:func:`attach_gates_to_weights`); train with the gates
    in the optimizer (:meth:`parameters`, usually without weight decay) and the L1 penalty
    :meth:`loss` added to the task loss; :meth:`finish` folds the gates into the weights (the model
    keeps computing the gated function) and returns them as importance scores for
    ``vitopt.prune(..., criterion="gate", gates=...)``.

    Args:
        model: a timm model of a registered family (trained in place).
        lam: L1 factor lambda (VTP: ~1e-4).
        groups: group kinds to gate (default heads, head_dim, mlp).
        threshold: |gate| below which a unit counts as off in the epoch statistics.

    Raises:
        VitoptError: the model is not supported (its family names the feature).
    """

    def __init__(self, model: nn.Module, lam: float = 1e-4, groups: tuple[str, ...] | list[str] = GATED_KINDS,
                 threshold: float = 0.05) -> None:
        self.model_ref = model
        self.gates = UnitGates(family_of(model).structure(model), tuple(groups))
        self.lam, self.threshold = float(lam), float(threshold)
        self._params = list(self.gates.gates.values())
        self._handle: ScalerHandle | None = attach_gates_to_weights(model, self.gates)

    def parameters(self) -> list[nn.Parameter]:
        """The gate tensors (one per gated group); add them to the optimizer."""
        return list(self._params)

    def loss(self) -> Tensor | None:
        """``lambda * sum |gate|`` over every gate (None when lambda is 0)."""
        if self.lam == 0:
            return None
        return self.lam * torch.cat([p.reshape(-1) for p in self._params]).abs().sum()

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Add mean |gate| and the fraction below ``threshold`` (overall and per kind) to the record."""
        record.update(self.gates.stats(self.threshold))

    @torch.no_grad()
    def finish(self) -> dict[str, Tensor]:
        """Detach the gates, fold them into the model's weights and return their trained values.

        Returns:
            group -> CPU gate values ``[size]`` (the ``gate`` criterion's input).
        """
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.gates.to("cpu")
        values = self.gates.values()
        self.gates.to(next(self.model_ref.parameters()).device)
        self.gates.fold_into(self.model_ref)
        return values

    def state_dict(self) -> dict[str, Any]:
        """``gate/<group>`` -> gate tensor (CPU copy)."""
        return {f"gate/{g}": v.cpu() for g, v in self.gates.values().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy saved gate values into the live gate parameters (unknown groups raise KeyError)."""
        for key, value in state.items():
            if key.startswith("gate/"):
                g = key[len("gate/"):]
                p = self.gates.value(g)
                if p is None:
                    raise KeyError(f"no gate for group {g!r}")
                p.copy_(torch.as_tensor(value).to(p))
