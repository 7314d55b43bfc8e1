"""A small helper that families use to assemble a :class:`~vitopt.arch.structure.Structure`.

The hierarchical families (Swin, PVTv2) declare many coupled axes per block; :class:`StructureBuilder`
keeps that declaration short: ``lay`` records an axis only when the parameter exists (optional biases,
LayerScale), ``ln`` records a LayerNorm's weight/bias and lists it for renormalisation under its group,
``choke`` adds a choke point.
"""

from __future__ import annotations

from timm.layers import RmsNorm
from torch import nn

from vitopt.arch.structure import AxisLayout, ChokePoint, Factor, Group, Structure

__all__ = ["StructureBuilder", "is_layernorm", "is_rmsnorm", "is_token_norm"]


def is_layernorm(module: nn.Module | None) -> bool:
    """True for ``nn.LayerNorm`` and its subclasses (timm's ``LayerNorm`` included)."""
    return isinstance(module, nn.LayerNorm)


def is_rmsnorm(module: nn.Module | None) -> bool:
    """True for RMS norms over the last dim: timm ``RmsNorm`` and ``torch.nn.RMSNorm`` (Zhang & Sennrich 2019)."""
    return isinstance(module, (RmsNorm, nn.RMSNorm))


def is_token_norm(module: nn.Module | None) -> bool:
    """True for a per-token norm over the last dim whose weight (and bias) follow a group: LayerNorm or RMS norm.

    The masked-norm hooks (:mod:`vitopt.arch.hooks`) recompute either over kept channels only.
    """
    return is_layernorm(module) or is_rmsnorm(module)


class StructureBuilder:
    """Collects groups, layouts, choke points and LayerNorms of one model, then builds the Structure.

    Args:
        family: family key written into the Structure.
        model: the live model (its parameter names decide which optional layouts exist).
    """

    def __init__(self, family: str, model: nn.Module) -> None:
        self.family = family
        self.model = model
        self.params = dict(model.named_parameters())
        self.groups: dict[str, Group] = {}
        self.layouts: list[AxisLayout] = []
        self.chokes: dict[str, list[ChokePoint]] = {}
        self.norms: dict[str, list[str]] = {}
        self.norm_factors: dict[str, tuple[Factor, ...]] = {}
        self.units: dict[str, list[str]] = {}

    def group(self, name: str, kind: str, size: int, *, block: int | None = None,
              stage: int | None = None) -> Factor:
        """Declare a group; returns its factor ``(name, size)`` for use in layouts."""
        self.groups[name] = Group(name, kind, block, int(size), stage)
        self.chokes.setdefault(name, [])
        return (name, int(size))

    def depth(self, name: str, size: int, *, stage: int | None = None) -> Factor:
        """Declare a ``blocks`` group ``name`` whose ``size`` units are the modules ``name.0`` ... (depth);
        its choke points are added per block with :meth:`unit_choke`."""
        factor = self.group(name, "blocks", size, stage=stage)
        self.units[name] = [f"{name}.{j}" for j in range(int(size))]
        return factor

    def patch_embed(self, prefix: str, embed: Factor) -> None:
        """Lay out a patch-embedding convolution ``prefix.proj`` (output channels = ``embed``) and its norm."""
        self.lay(f"{prefix}.proj.weight", 0, embed)
        self.lay(f"{prefix}.proj.bias", 0, embed)
        self.ln(f"{prefix}.norm", embed)

    def lay(self, param: str, axis: int, *factors: Factor) -> None:
        """Record that axis ``axis`` of ``param`` factorises as ``factors`` (skipped if ``param`` is absent)."""
        if param in self.params:
            self.layouts.append(AxisLayout(param, axis, tuple(factors)))

    def mlp(self, prefix: str, embed: Factor, hidden: Factor, hidden_convs: tuple[str, ...] = ()) -> None:
        """Lay out a two-layer timm MLP at ``prefix`` (``fc1``: embed -> hidden, ``fc2``: hidden -> embed).

        ``hidden_convs`` names per-channel modules between them (PVTv2's depth-wise ``dwconv``) whose
        weight and bias follow the hidden width on axis 0. Choke points are left to the caller.
        """
        self.lay(f"{prefix}.fc1.weight", 0, hidden)
        self.lay(f"{prefix}.fc1.bias", 0, hidden)
        self.lay(f"{prefix}.fc1.weight", 1, embed)
        for conv in hidden_convs:
            self.lay(f"{prefix}.{conv}.weight", 0, hidden)
            self.lay(f"{prefix}.{conv}.bias", 0, hidden)
        self.lay(f"{prefix}.fc2.weight", 1, hidden)
        self.lay(f"{prefix}.fc2.weight", 0, embed)
        self.lay(f"{prefix}.fc2.bias", 0, embed)

    def ln(self, module: str, *factors: Factor) -> None:
        """Record a LayerNorm or RMS norm over ``factors`` (default one group): its weight/bias, and renorm
        under the factors' only group. Skipped when ``module`` is neither (e.g. Identity)."""
        mod = self.model.get_submodule(module)
        if not is_token_norm(mod):
            return
        self.lay(f"{module}.weight", 0, *factors)
        self.lay(f"{module}.bias", 0, *factors)
        (group,) = [g for g, _ in factors if g is not None]
        self.norms.setdefault(group, []).append(module)
        if len(factors) > 1:
            self.norm_factors[module] = tuple(factors)

    def choke(self, group: str, module: str, side: str, *factors: Factor) -> None:
        """Add a choke point of ``group`` at ``module``'s ``side`` (``"input"``/``"output"``) laid out as ``factors``."""
        self.chokes[group].append(ChokePoint(module, side, tuple(factors)))

    def unit_choke(self, group: str, module: str, side: str, unit: int) -> None:
        """Add a choke point of a whole-module group (``blocks``) that scales ``module``'s ``side`` by unit ``unit``."""
        self.chokes[group].append(ChokePoint(module, side, (), unit=unit))

    def build(self) -> Structure:
        """The :class:`Structure` of everything declared."""
        return Structure(self.family, self.groups, self.layouts, self.chokes, self.norms, self.norm_factors,
                         units=self.units)
