"""Explicit registry of model families that vitopt can prune.

A family knows one timm model class: it builds the :class:`~vitopt.arch.structure.Structure`, reads
and writes dims (module attributes), folds family-specific constants before surgery, and counts
MACs analytically: ViT/DeiT (:mod:`vitopt.arch.vit`), Swin v1 (:mod:`vitopt.arch.swin`) and PVTv2
(:mod:`vitopt.arch.pvt`).
"""

from __future__ import annotations

from torch import nn

from vitopt.arch.pvt import PvtV2Family
from vitopt.arch.swin import SwinFamily
from vitopt.arch.vit import VitFamily
from vitopt.errors import VitoptError

__all__ = ["FAMILIES", "family_of", "get_family"]

#: family key -> family object, in the order they are tried.
FAMILIES = {"vit": VitFamily(), "swin": SwinFamily(), "pvt_v2": PvtV2Family()}


def family_of(model: nn.Module):
    """Return the family object for ``model``.

    Raises:
        VitoptError: no family matches; the message lists what is supported.
    """
    for fam in FAMILIES.values():
        if fam.matches(model):
            return fam
    supported = "; ".join(f"{k}: {f.description}" for k, f in FAMILIES.items())
    raise VitoptError(f"model class {type(model).__name__} is not supported for pruning (supported: {supported}).")


def get_family(name: str):
    """Return the family registered as ``name``; VitoptError lists the known names otherwise."""
    if name not in FAMILIES:
        raise VitoptError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)}).")
    return FAMILIES[name]
