"""Explicit registry of the model families vitopt can prune.

Each family is one module implementing :class:`~vitopt.arch.families.base.Family` and one entry of
:data:`FAMILIES`: ViT/DeiT (:mod:`~vitopt.arch.families.vit`), Swin v1
(:mod:`~vitopt.arch.families.swin`), PVTv2 (:mod:`~vitopt.arch.families.pvt`), Swin v2
(:mod:`~vitopt.arch.families.swinv2`) and Eva / EVA-02 / DINOv3 (:mod:`~vitopt.arch.families.eva`).
"""

from __future__ import annotations

from torch import nn

from vitopt.arch.families.base import Family
from vitopt.arch.families.eva import EvaFamily
from vitopt.arch.families.pvt import PvtV2Family
from vitopt.arch.families.swin import SwinFamily
from vitopt.arch.families.swinv2 import SwinV2Family
from vitopt.arch.families.vit import VitFamily
from vitopt.errors import VitoptError

__all__ = ["FAMILIES", "Family", "family_of", "get_family"]

#: family key -> family object, in the order they are tried.
FAMILIES: dict[str, Family] = {f.name: f for f in (VitFamily(), SwinFamily(), PvtV2Family(), SwinV2Family(),
                                                   EvaFamily())}


def family_of(model: nn.Module) -> Family:
    """Return the family object for ``model``.

    Raises:
        VitoptError: no family matches; the message lists what is supported.
    """
    for fam in FAMILIES.values():
        if fam.matches(model):
            return fam
    supported = "; ".join(f"{k}: {f.description}" for k, f in FAMILIES.items())
    raise VitoptError(f"model class {type(model).__name__} is not supported for pruning (supported: {supported}).")


def get_family(name: str) -> Family:
    """Return the family registered as ``name``; VitoptError lists the known names otherwise."""
    if name not in FAMILIES:
        raise VitoptError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)}).")
    return FAMILIES[name]
