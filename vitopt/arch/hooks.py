"""Per-unit multipliers at choke points: the one mechanism behind gates and hard masks.

:func:`attach_scalers` registers forward hooks (never edits timm's source) that multiply, at each
choke point of a group, the module's input or output by one value per unit, expanded over the
choke point's layout. With 0/1 values this is a hard mask equal to removing the units (DESIGN.md
invariant 1); with learnable values it is a VTP gate (Zhu, Tang, Han 2021, arXiv 2104.08500).

For the residual width (``embed``), a hard mask must also take LayerNorm statistics over the kept
channels only; with ``renorm=True`` the LayerNorms listed in ``Structure.norms`` are recomputed that
way (the UP-ViTs consistency requirement, Yu & Wu 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.structure import AxisLayout, ChokePoint, Structure

__all__ = ["ScalerHandle", "attach_scalers"]


@dataclass
class ScalerHandle:
    """Hooks registered by :func:`attach_scalers`; call :meth:`remove` to detach them all."""

    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> "ScalerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _multiplier(choke: ChokePoint, group: str, value: torch.Tensor) -> torch.Tensor:
    return AxisLayout(choke.module, -1, choke.factors).expand({group: value})


def _scale_hook(choke: ChokePoint, group: str, value: torch.Tensor):
    if choke.side == "input":
        def pre_hook(module, args):
            x = args[0]
            return (x * _multiplier(choke, group, value).to(x.dtype),) + tuple(args[1:])
        return "pre", pre_hook

    def hook(module, args, out):
        return out * _multiplier(choke, group, value).to(out.dtype)
    return "post", hook


def _renorm_hook(mask: torch.Tensor):
    """LayerNorm forward over the channels where ``mask != 0``; removed channels output 0."""
    def hook(module: nn.LayerNorm, args, out):
        x = args[0]
        keep = (mask != 0).nonzero().squeeze(1).to(x.device)
        y = torch.zeros_like(out)
        w = module.weight[keep] if module.weight is not None else None
        b = module.bias[keep] if module.bias is not None else None
        y[..., keep] = F.layer_norm(x[..., keep], (keep.numel(),), w, b, module.eps)
        return y
    return hook


def attach_scalers(model: nn.Module, structure: Structure, values: dict[str, torch.Tensor],
                   *, renorm: bool = False) -> ScalerHandle:
    """Multiply every choke point of each group in ``values`` by that group's per-unit values.

    Args:
        model: the model ``structure`` was built from.
        structure: its :class:`Structure`.
        values: group name -> tensor of shape ``[group.size]`` (a live tensor: gates may be
            ``nn.Parameter`` s that train through the hooks; the hooks read them at every forward).
        renorm: treat values as a hard 0/1 mask and recompute the group's LayerNorms over kept
            units (required for exact masked simulation of ``embed``).

    Returns:
        A :class:`ScalerHandle`; ``remove()`` restores the unhooked model.

    Raises:
        KeyError: a group name is not in the structure.
    """
    handle = ScalerHandle()
    for group, value in values.items():
        if value.shape != (structure.groups[group].size,):
            raise ValueError(f"values[{group!r}] has shape {tuple(value.shape)}, "
                             f"expected ({structure.groups[group].size},)")
        for choke in structure.chokes[group]:
            module = model.get_submodule(choke.module)
            kind, fn = _scale_hook(choke, group, value)
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handle.handles.append(register(fn))
        if renorm:
            for name in structure.norms.get(group, []):
                handle.handles.append(model.get_submodule(name).register_forward_hook(_renorm_hook(value)))
    return handle
