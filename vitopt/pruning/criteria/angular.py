"""``angular``: how far a block turns its tokens, the depth-pruning criterion of Gromov et al. / ShortGPT."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError
from vitopt.pruning.criteria.base import Batches, Criterion, Scores, device_of, eval_mode, need_batches

__all__ = ["angular_scores", "CRITERION"]


@torch.no_grad()
def angular_scores(model: nn.Module, structure: Structure, groups: list[str], *, batches: Batches | None = None,
                   **unused: Any) -> Scores:
    """Angular distance between each block's input and output tokens, averaged over tokens and images.

    Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv 2403.17887),
    score a block (n = 1 consecutive layers) by ``d(x, y) = arccos(cos(x, y)) / pi`` between the residual
    stream entering it (``x``) and leaving it (``y``); ShortGPT's Block Influence (Men et al. 2024,
    arXiv 2403.03853) is ``1 - cos(x, y)``, the same order. A block that barely turns the residual
    stream can go: a block whose residual branches output zero (``y == x``) scores 0. vitopt takes the
    distance per token (``x, y: [B, N, D]``, cosine over ``D``, in float64) and averages it over all N
    tokens (class, register and patch tokens) and over the calibration images. One forward per batch,
    no labels, no gradients.

    Args:
        model: the model ``structure`` was built from; run in eval mode, left unchanged (hooks removed).
        structure: its :class:`Structure`.
        groups: group names to score; each must be a whole-module group (kind ``blocks``).
        batches: non-empty list of ``(images [B, C, H, W], labels)``; labels are unused.
        unused: ``teacher``, ``gates`` (ignored).

    Returns:
        group -> float64 CPU tensor [number of blocks], angular distance in [0, 1] (higher = keep).

    Raises:
        VitoptError: ``batches`` is None or empty; a group is not a ``blocks`` group; a block whose
            output is not shaped like its input.
    """
    need_batches("angular", batches)
    bad = [g for g in groups if g not in structure.units]
    if bad:
        raise VitoptError(f"criterion 'angular' scores blocks (depth) only; {bad[0]!r} is a "
                          f"{structure.groups[bad[0]].kind} group. Use groups: [blocks] with it, or taylor, "
                          "hessian or kl for width.")
    start = time.perf_counter()
    dev = device_of(model)
    total = {g: torch.zeros(structure.groups[g].size, dtype=torch.float64) for g in groups}
    handles = []

    def hook(g: str, u: int, path: str):
        def fn(module, args, out):
            x, y = args[0], out
            if not (isinstance(y, torch.Tensor) and y.shape == x.shape):
                raise VitoptError(f"criterion 'angular': {path} returns {type(y).__name__} "
                                  f"{tuple(getattr(y, 'shape', ()))} for input {tuple(x.shape)}; it needs a block "
                                  "that maps tokens to tokens of the same shape.")
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)
            dist = torch.arccos(cos) / math.pi                               # [B, N]
            total[g][u] += dist.reshape(dist.shape[0], -1).mean(-1).sum().cpu()
        return fn

    images = 0
    try:
        for g in groups:
            for u, path in enumerate(structure.units[g]):
                handles.append(model.get_submodule(path).register_forward_hook(hook(g, u, path)))
        with eval_mode(model):
            for x, _ in batches:
                model(x.to(dev))
                images += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    cost = {"forward_passes": len(batches), "backward_passes": 0, "teacher_forward_passes": 0, "rows": images,
            "images": images, "units": sum(structure.groups[g].size for g in groups),
            "seconds": time.perf_counter() - start}
    return Scores({g: t / images for g, t in total.items()}, criterion="angular", cost=cost)


#: registry entry
CRITERION = Criterion("angular", angular_scores, needs=frozenset({"data"}),
                      description="angular distance arccos(cos(x_in, x_out))/pi a block turns its tokens (depth only)",
                      source="Gromov et al. 2024, arXiv 2403.17887; Men et al. 2024 (ShortGPT), arXiv 2403.03853",
                      kinds=frozenset({"blocks"}))
