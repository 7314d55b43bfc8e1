"""Erdos-Renyi(-Kernel) initial density allocation for a target overall density.

Mocanu et al. 2018 (SET, Nat. Commun. 9:2383) draw a layer's connections with probability
proportional to ``(n_in + n_out) / (n_in * n_out)``; Evci et al. 2020 (RigL, arXiv 1911.11134) extend
it to kernels (ERK: ``sum(shape) / prod(shape)``) and cap dense layers. SViTE (Chen et al. 2021,
arXiv 2106.04533, ``--sparse_init fixed_ERK``) uses ERK for every Linear of the transformer blocks.
"""

from __future__ import annotations

import math

from vitopt.errors import VitoptError

__all__ = ["erk_densities", "kept_counts"]


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float, *, power: float = 1.0) -> dict[str, float]:
    """Per-layer densities whose parameter-weighted mean is ``density`` (ERK allocation).

    ``d_l = min(1, eps * (sum(shape_l) / prod(shape_l)) ** power)``; ``eps`` is solved so that
    ``sum_l d_l * N_l = density * sum_l N_l``. Layers whose density would exceed 1 are made dense
    and ``eps`` is solved again over the others (RigL's procedure).

    Args:
        shapes: layer name -> weight shape (``[out_features, in_features]`` for a Linear).
        density: target overall kept fraction in (0, 1].
        power: ERK exponent (1 = the published rule).

    Returns:
        layer name -> density in (0, 1].

    Raises:
        VitoptError: ``density`` is not in (0, 1] or ``shapes`` is empty.
    """
    if not shapes:
        raise VitoptError("ERK needs at least one layer to allocate density to.")
    if not 0.0 < density <= 1.0:
        raise VitoptError(f"density must be in (0, 1]; got {density}.")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / numel[n]) ** power for n, s in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(numel[n] for n in dense)
        denom = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if denom <= 0:
            break
        eps = budget / denom
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else max(0.0, min(1.0, eps * raw[n])) for n in shapes}


def kept_counts(shapes: dict[str, tuple[int, ...]], densities: dict[str, float]) -> dict[str, int]:
    """Weights kept per layer: ``round(d_l * N_l)``, at least 1."""
    return {n: max(1, int(round(densities[n] * math.prod(s)))) for n, s in shapes.items()}
