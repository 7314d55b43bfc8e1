"""Per-unit multipliers at choke points: the one mechanism behind gates and hard masks.

:func:`attach_scalers` registers forward hooks (never edits timm's source) that multiply, at each
choke point of a group, the module's input or output by one value per unit, expanded over the
choke point's layout. With 0/1 values this is a hard mask equal to removing the units (invariant 1 of
docs/architecture.md); with learnable values it is a VTP gate (Zhu, Tang, Han 2021, arXiv 2104.08500).

For the residual width (``embed``), a hard mask must also take LayerNorm (or RMS norm) statistics over
the kept channels only; with ``renorm=True`` the LayerNorms listed in ``Structure.norms`` are recomputed that
way (the UP-ViTs consistency requirement, Yu & Wu 2021).

:func:`attach_replica_masks` is the batched variant used by one-at-a-time removal criteria (UP-ViTs'
KL importance, Yu & Wu 2021, arXiv 2111.15127): the input batch is replicated R times and replica
``r`` sees its own 0/1 mask, so R different "unit removed" models run in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.builder import is_rmsnorm
from vitopt.arch.structure import AxisLayout, ChokePoint, Structure

__all__ = ["ScalerHandle", "attach_scalers", "attach_replica_masks"]


@dataclass
class ScalerHandle:
    """Hooks registered by :func:`attach_scalers`; call :meth:`remove` to detach them all."""

    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> ScalerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _multiplier(choke: ChokePoint, group: str, value: torch.Tensor) -> torch.Tensor:
    return choke.multiplier(group, value)


def _scale_hook(choke: ChokePoint, group: str, value: torch.Tensor):
    if choke.side == "input":
        def pre_hook(module, args):
            x = args[0]
            return (x * _multiplier(choke, group, value).to(x.dtype),) + tuple(args[1:])
        return "pre", pre_hook

    def hook(module, args, out):
        return out * _multiplier(choke, group, value).to(out.dtype)
    return "post", hook


def _norm_mask(mask: torch.Tensor, factors, group: str) -> torch.Tensor:
    """``mask`` over a group's units -> mask over a LayerNorm's width laid out as ``factors`` (None: the same)."""
    return mask if factors is None else AxisLayout("", -1, factors).expand({group: mask})


#: attribute a renorm hook leaves on its output: the channels it kept, so that a second group's hook on
#: the same LayerNorm (an attention-output norm over ``(heads) x (head_dim)``) keeps the intersection.
_KEPT_ATTR = "_vitopt_renorm_kept"


def _renorm_hook(mask: torch.Tensor, factors=None, group: str = ""):
    """LayerNorm forward over the channels where ``mask != 0``; removed channels output 0.

    ``factors`` (from ``Structure.norm_factors``) expands a per-unit mask over a LayerNorm wider than
    the group, e.g. Swin's PatchMerging norm over ``4 x C``, or an attention-output norm over
    ``(heads) x (head_dim)``. When several groups renormalise the same LayerNorm, their hooks run in
    turn and the later ones keep the channels every group keeps (the product of the masks).
    """
    def hook(module: nn.LayerNorm, args, out):
        x = args[0]
        kept = _norm_mask(mask, factors, group).to(x.device) != 0
        prev = getattr(out, _KEPT_ATTR, None)          # another group's renorm ran first on this module
        if prev is not None:
            kept = kept & prev
        keep = kept.nonzero().squeeze(1)
        y = torch.zeros_like(out)
        w = module.weight[keep] if module.weight is not None else None
        if is_rmsnorm(module):
            y[..., keep] = F.rms_norm(x[..., keep], (keep.numel(),), w, module.eps)
        else:
            b = module.bias[keep] if module.bias is not None else None
            y[..., keep] = F.layer_norm(x[..., keep], (keep.numel(),), w, b, module.eps)
        setattr(y, _KEPT_ATTR, kept)
        return y
    return hook


def _attach(model: nn.Module, structure: Structure, group: str, scale_hook, norm_hook) -> list:
    """Register ``scale_hook(choke)`` at each choke point of ``group`` and, when ``norm_hook`` is given,
    ``norm_hook(name)`` on each LayerNorm of the group; returns the hook handles."""
    handles = []
    for choke in structure.chokes[group]:
        module = model.get_submodule(choke.module)
        kind, fn = scale_hook(choke)
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        handles.append(register(fn))
    if norm_hook is not None:
        for name in structure.norms.get(group, []):
            handles.append(model.get_submodule(name).register_forward_hook(norm_hook(name)))
    return handles


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
        handle.handles += _attach(model, structure, group,
                                  lambda choke, g=group, v=value: _scale_hook(choke, g, v),
                                  (lambda name, g=group, v=value: _renorm_hook(v, structure.norm_factors.get(name), g))
                                  if renorm else None)
    return handle


# ------------------------------------------------------------------------------------ replica masks
def _replica_multiplier(factors, group: str, masks: torch.Tensor, unit: int | None = None) -> torch.Tensor:
    """[R, L] per-replica multiplier: row r is the outer-product expansion of ``masks[r]`` over ``factors``;
    for a unit choke point (``unit`` given, depth) ``[R, 1]``: replica r's value of that unit."""
    if unit is not None:
        return masks[:, unit:unit + 1]
    R = masks.shape[0]
    out = torch.ones(R, 1, dtype=masks.dtype, device=masks.device)
    for g, size in factors:
        v = masks if g == group else torch.ones(R, size, dtype=masks.dtype, device=masks.device)
        out = (out[:, :, None] * v[:, None, :]).reshape(R, -1)
    return out


def _per_replica(x: torch.Tensor, mult: torch.Tensor, where: str) -> torch.Tensor:
    """Multiply ``x`` [R*B, ..., L] by ``mult`` [R, L] (or [R, 1], broadcast), replica r being rows r*B..(r+1)*B-1."""
    R, L = mult.shape
    if x.shape[0] % R != 0 or L not in (1, x.shape[-1]):
        raise ValueError(f"{where}: tensor of shape {tuple(x.shape)} cannot be split into {R} replicas "
                         f"with last dim {L}; the batch must be the input replicated R times (R-major).")
    return (x.reshape(R, -1, x.shape[-1]) * mult[:, None, :].to(x.dtype)).reshape(x.shape)


def _replica_scale_hook(choke: ChokePoint, group: str, masks: torch.Tensor):
    if choke.side == "input":
        def pre_hook(module, args):
            x = args[0]
            mult = _replica_multiplier(choke.factors, group, masks.to(device=x.device, dtype=x.dtype), choke.unit)
            return (_per_replica(x, mult, choke.module),) + tuple(args[1:])
        return "pre", pre_hook

    def hook(module, args, out):
        mult = _replica_multiplier(choke.factors, group, masks.to(device=out.device, dtype=out.dtype), choke.unit)
        return _per_replica(out, mult, choke.module)
    return "post", hook


def _replica_renorm_hook(name: str, masks: torch.Tensor, factors=None, group: str = ""):
    """LayerNorm over each replica's kept channels (masked mean / biased variance); removed channels -> 0.

    ``factors`` (from ``Structure.norm_factors``) expands each replica's per-unit mask over a LayerNorm
    wider than the group (Swin's PatchMerging norm over ``4 x C``)."""
    def hook(module: nn.LayerNorm, args, out):
        x = args[0]
        full = masks if factors is None else _replica_multiplier(factors, group, masks)
        R, D = full.shape
        if x.shape[0] % R != 0 or x.shape[-1] != D:
            raise ValueError(f"{name}: input of shape {tuple(x.shape)} cannot be split into {R} replicas of "
                             f"width {D}.")
        m = full.to(device=x.device, dtype=x.dtype)[:, None, :]           # [R, 1, D]
        prev = getattr(out, _KEPT_ATTR, None)                             # another group's hook ran first
        if prev is not None:
            m = m * prev
        xr = x.reshape(R, -1, D)                                          # [R, B*..., D]
        n = m.sum(-1, keepdim=True)
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        if is_rmsnorm(module):                                            # RMS over kept channels, no centring
            y = xr * torch.rsqrt((xr ** 2 * m).sum(-1, keepdim=True) / n + eps)
        else:
            mean = (xr * m).sum(-1, keepdim=True) / n
            var = ((xr - mean) ** 2 * m).sum(-1, keepdim=True) / n
            y = (xr - mean) * torch.rsqrt(var + eps)
        if module.weight is not None:
            y = y * module.weight
        if getattr(module, "bias", None) is not None:
            y = y + module.bias
        y = (y * m).reshape(x.shape)
        setattr(y, _KEPT_ATTR, m)
        return y
    return hook


def attach_replica_masks(model: nn.Module, structure: Structure, group: str, masks: torch.Tensor,
                         *, renorm: bool = True) -> ScalerHandle:
    """Hard-mask ``group`` with a different 0/1 mask per replica of a replicated batch.

    The caller feeds ``x.repeat(R, 1, 1, 1)`` (R-major: replica r is rows ``r*B .. (r+1)*B - 1``);
    at each choke point of ``group`` the module's input/output ``[R*B, ..., L]`` is viewed as
    ``[R, B*..., L]`` and replica r is multiplied by ``masks[r]`` expanded over the choke point's
    layout. Replica r therefore computes exactly what the model with the units where
    ``masks[r] == 0`` physically removed computes (invariant 1 of docs/architecture.md), R models per forward.
    Used by the UP-ViTs KL criterion (Yu & Wu 2021, arXiv 2111.15127).

    For a group with LayerNorms in ``structure.norms`` (the residual width ``embed``) and
    ``renorm=True``, those LayerNorms are recomputed per replica over its kept channels only:
    ``mean = sum(x*m)/sum(m)``, ``var = sum((x-mean)^2*m)/sum(m)``,
    ``y = ((x-mean)/sqrt(var+eps)*w + b)*m``.

    Several groups may be attached at once (one call each); their hooks compose, so replica r
    sees the product of its rows. Rows of all ones leave the replica unpruned.

    Args:
        model: the model ``structure`` was built from.
        structure: its :class:`Structure`.
        group: group name, e.g. ``"blocks.0.heads"`` or ``"embed"``.
        masks: float tensor ``[R, group.size]`` of 0/1 values (read at every forward), R >= 1;
            every row must keep at least one unit when ``renorm`` applies.
        renorm: recompute the group's LayerNorms over kept units (needed for exact ``embed``).

    Returns:
        A :class:`ScalerHandle`; ``remove()`` restores the unhooked model.

    Raises:
        KeyError: ``group`` is not in the structure.
        ValueError: ``masks`` is not ``[R, group.size]``; at forward time, a hooked tensor whose
            batch dim is not a multiple of R.
    """
    size = structure.groups[group].size
    if masks.dim() != 2 or masks.shape[1] != size or masks.shape[0] < 1:
        raise ValueError(f"masks for {group!r} has shape {tuple(masks.shape)}, expected (R, {size}) with R >= 1")
    return ScalerHandle(_attach(model, structure, group, lambda choke: _replica_scale_hook(choke, group, masks),
                                (lambda name: _replica_renorm_hook(name, masks, structure.norm_factors.get(name), group))
                                if renorm else None))
