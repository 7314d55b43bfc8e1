"""Helpers shared by the Swin and PVTv2 structure tests (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import torch

from vitopt.arch.families import family_of
from vitopt.arch.plan import KeepPlan


def random_plan(model, kinds, seed: int) -> KeepPlan:
    """A seeded random strict subset (>= 1 unit) of every group of ``kinds`` (a group of 1 keeps it)."""
    st = family_of(model).structure(model)
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in st.of_kind(*kinds):
        k = int(torch.randint(1, grp.size, (1,), generator=g)) if grp.size > 1 else 1
        keep[grp.name] = sorted(torch.randperm(grp.size, generator=g)[:k].tolist())
    return KeepPlan(keep)


def set_fused(model, fused: bool) -> None:
    """Switch timm's fused (SDPA) attention on or off in every module that has the flag."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
