"""Put importance scores of different group kinds on one scale: measured loss per unit of score.

A criterion ranks units well *within* a kind (which MLP neurons of a block matter least), but its
numbers are not comparable *across* kinds: an L1 norm sums over a different number of weights for a
head, a head dim, an MLP neuron and an embedding channel, and even loss-based scores (Taylor,
Hessian) are first-order estimates whose error differs by kind. Allocation must still trade an
embedding channel against MLP neurons under one budget.

:func:`exchange_rates` measures, for each kind, what its scores are worth in loss: it removes
(with exact hard masks, :func:`vitopt.arch.hooks.attach_scalers`) the lowest-scored ``probe``
fraction of every group of that kind at once and measures ``KL(model || masked model)`` on
calibration images; the kind's rate is that loss divided by the scores it removed.
:func:`calibrate_scores` multiplies each kind's scores by its rate, so a unit's calibrated score is
an estimate of the loss (nats per image) its removal adds, on one scale for every kind. Allocation
then ranks chunks by loss per cost saved (``compare="raw"``). This is the classic per-layer
sensitivity analysis (Li et al. 2017, arXiv 1608.08710, section 3.2) applied per group kind, used to
calibrate the criterion instead of replacing it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.hooks import attach_scalers
from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError
from vitopt.pruning.criteria.base import Batches, device_of, eval_mode, logits_of

__all__ = ["exchange_rates", "calibrate_scores"]


@torch.no_grad()
def _kl(model: nn.Module, batches: Batches, ref: list[torch.Tensor]) -> float:
    """Mean KL(ref || model) in nats per image over ``batches`` (``ref``: log-probabilities per batch)."""
    total, n = 0.0, 0
    dev = device_of(model)
    for (x, _), lp_ref in zip(batches, ref):
        lp = F.log_softmax(logits_of(model(x.to(dev))).double(), -1)
        total += float((lp_ref.exp() * (lp_ref - lp)).sum())
        n += x.shape[0]
    return total / max(n, 1)


def exchange_rates(model: nn.Module, structure: Structure, scores: Mapping[str, torch.Tensor], batches: Batches,
                   probe: float = 0.25) -> dict[str, float]:
    """Loss (nats per image) per unit of score, for each kind present in ``scores``.

    Args:
        model: the model the scores were computed on (left unchanged: hooks are removed, eval mode
            restored per module).
        structure: its Structure.
        scores: group -> per-unit importance (any criterion).
        batches: calibration ``(images [B, C, H, W], labels)`` batches (labels unused).
        probe: fraction of each group's units removed in the measurement, in (0, 1).

    Returns:
        kind -> rate >= 0. A kind whose removed units score 0 (dead units) gets rate 1 and a kind whose
        removal does not raise the loss gets rate 0: its scores are then free to remove.

    Raises:
        VitoptError: no batches, or ``probe`` outside (0, 1).
    """
    if not batches:
        raise VitoptError("calibrating scores across kinds needs calibration batches (data=...).")
    if not 0 < probe < 1:
        raise VitoptError(f"probe must be in (0, 1); got {probe}.")
    by_kind: dict[str, list[str]] = {}
    for g in scores:
        by_kind.setdefault(structure.groups[g].kind, []).append(g)
    rates = {}
    with eval_mode(model):
        with torch.no_grad():
            ref = [F.log_softmax(logits_of(model(x.to(device_of(model)))).double(), -1) for x, _ in batches]
        for kind, gs in by_kind.items():
            masks, removed = {}, 0.0
            for g in gs:
                s = torch.as_tensor(scores[g]).double().cpu()
                k = min(len(s) - 1, int(math.floor(probe * len(s))))
                m = torch.ones(len(s))
                if k > 0:
                    drop = torch.argsort(s, stable=True)[:k]
                    m[drop] = 0.0
                    removed += float(s[drop].abs().sum())
                masks[g] = m.to(device_of(model))
            with attach_scalers(model, structure, masks, renorm=True):
                loss = max(_kl(model, batches, ref), 0.0)
            rates[kind] = loss / removed if removed > 0 else 1.0
    return rates


def calibrate_scores(scores: Mapping[str, torch.Tensor], structure: Structure,
                     rates: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """``scores`` with each kind's values multiplied by its rate (float64 CPU tensors, same shapes)."""
    return {g: torch.as_tensor(s).double().cpu() * float(rates[structure.groups[g].kind]) for g, s in scores.items()}
