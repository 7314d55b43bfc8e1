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

__all__ = ["exchange_rates", "calibrate_scores", "sensitivity_curves", "calibrate_by_curves", "CURVE_PROBES"]

#: removal fractions probed by :func:`sensitivity_curves` for ``compare="calibrated_curve"``.
CURVE_PROBES = (0.25, 0.5, 0.75)


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


def _probe_counts(n: int, probes: tuple[float, ...]) -> list[int]:
    """Units removed from a group of ``n`` at each probe fraction (never the whole group)."""
    return [min(n - 1, int(math.floor(p * n))) for p in probes]


def _lower_hull(removed: list[float], losses: list[float]) -> list[float]:
    """Slopes of the greatest convex minorant of the points ``(0, 0), (removed[i], losses[i])``.

    Pool-adjacent-violators on the segment slopes: a segment steeper than the next one is merged with it,
    so marginal loss per unit of score never falls as more is removed (one slope per input segment)."""
    blocks: list[list[float]] = []                  # [d_removed, d_loss, n_segments]
    prev_r, prev_l = 0.0, 0.0
    for r, loss in zip(removed, losses):
        blocks.append([r - prev_r, loss - prev_l, 1])
        prev_r, prev_l = r, loss
        while len(blocks) > 1 and _slope(blocks[-2]) > _slope(blocks[-1]):
            b = blocks.pop()
            blocks[-1] = [blocks[-1][0] + b[0], blocks[-1][1] + b[1], blocks[-1][2] + b[2]]
    out: list[float] = []
    for b in blocks:
        out += [_slope(b)] * int(b[2])
    return out


def _slope(block: list[float]) -> float:
    """Loss per unit of score of a ``[d_removed, d_loss, n]`` block (a segment that removes no score but
    raises the loss is infinitely steep; the hull merges it with the next)."""
    d_removed, d_loss = block[0], max(block[1], 0.0)
    if d_removed > 0:
        return d_loss / d_removed
    return math.inf if d_loss > 0 else 0.0


def sensitivity_curves(model: nn.Module, structure: Structure, scores: Mapping[str, torch.Tensor], batches: Batches,
                       probes: tuple[float, ...] = CURVE_PROBES) -> dict[str, list[float]]:
    """Marginal loss (nats per image) per unit of score of each kind, at increasing removal depth.

    For every probe fraction ``p`` (increasing), the lowest-scored ``p`` of every group of a kind is
    removed at once with exact masks and ``KL(model || masked model)`` is measured on ``batches``. The
    curve of loss against removed score is replaced by its lower convex hull, so the returned rates never
    decrease with depth: segment ``j`` covers the units ranked (ascending score, per group) between the
    counts removed at probes ``j - 1`` and ``j``; units past the last probe take the last rate. A single
    probe gives one rate per kind, :func:`exchange_rates`. Sensitivity as a function of pruning depth is
    Li et al. 2017 (arXiv 1608.08710, section 3.2, figure 2b), measured per group kind.

    Args:
        model: the model the scores were computed on (left unchanged: hooks removed, eval mode restored).
        structure: its Structure.
        scores: group -> per-unit importance (any criterion).
        batches: calibration ``(images [B, C, H, W], labels)`` batches (labels unused).
        probes: removal fractions, strictly increasing, each in (0, 1).

    Returns:
        kind -> one rate >= 0 per probe. A kind whose probes remove no score (single-unit groups, or dead
        units of score 0) gets rate 1, as :func:`exchange_rates`.

    Raises:
        VitoptError: no batches, or ``probes`` not strictly increasing in (0, 1).
    """
    if not batches:
        raise VitoptError("calibrating scores across kinds needs calibration batches (data=...).")
    probes = tuple(float(p) for p in probes)
    if not probes or not all(0 < p < 1 for p in probes) or any(b <= a for a, b in zip(probes, probes[1:])):
        raise VitoptError(f"probes must be strictly increasing fractions in (0, 1); got {probes}.")
    by_kind: dict[str, list[str]] = {}
    for g in scores:
        by_kind.setdefault(structure.groups[g].kind, []).append(g)
    curves = {}
    with eval_mode(model):
        with torch.no_grad():
            ref = [F.log_softmax(logits_of(model(x.to(device_of(model)))).double(), -1) for x, _ in batches]
        for kind, gs in by_kind.items():
            order = {g: torch.argsort(torch.as_tensor(scores[g]).double().cpu(), stable=True) for g in gs}
            removed, losses = [], []
            for j in range(len(probes)):
                masks, total = {}, 0.0
                for g in gs:
                    s = torch.as_tensor(scores[g]).double().cpu()
                    k = _probe_counts(len(s), probes)[j]
                    m = torch.ones(len(s))
                    if k > 0:
                        drop = order[g][:k]
                        m[drop] = 0.0
                        total += float(s[drop].abs().sum())
                    masks[g] = m.to(device_of(model))
                with attach_scalers(model, structure, masks, renorm=True):
                    losses.append(max(_kl(model, batches, ref), 0.0))
                removed.append(total)
            if removed[-1] == 0:                             # nothing probed, or only score-0 units
                curves[kind] = [1.0] * len(probes)
            else:
                hull = _lower_hull(removed, losses)
                top = max([r for r in hull if math.isfinite(r)], default=1.0)
                curves[kind] = [r if math.isfinite(r) else top for r in hull]   # score-0 units last in order
    return curves


def exchange_rates(model: nn.Module, structure: Structure, scores: Mapping[str, torch.Tensor], batches: Batches,
                   probe: float = 0.25) -> dict[str, float]:
    """Loss (nats per image) per unit of score, for each kind present in ``scores`` (one probe).

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
    if not 0 < probe < 1:
        raise VitoptError(f"probe must be in (0, 1); got {probe}.")
    curves = sensitivity_curves(model, structure, scores, batches, probes=(probe,))
    return {kind: c[0] for kind, c in curves.items()}


def calibrate_by_curves(scores: Mapping[str, torch.Tensor], structure: Structure,
                        curves: Mapping[str, list[float]],
                        probes: tuple[float, ...] = CURVE_PROBES) -> dict[str, torch.Tensor]:
    """``scores`` with each unit's value multiplied by its kind's rate at its depth (float64 CPU tensors).

    A unit ranked ``r`` (ascending score, 0-based) in a group of ``n`` falls in the first segment whose
    probe count ``floor(p * n)`` exceeds ``r`` (the last segment past the last probe), the same counts
    :func:`sensitivity_curves` removed. Rates never decrease with depth, so the order within a group is
    kept. Raises ``KeyError`` for a group whose kind has no curve."""
    out: dict[str, torch.Tensor] = {}
    for g, s in scores.items():
        s = torch.as_tensor(s).double().cpu()
        rates = list(curves[structure.groups[g].kind])
        counts = _probe_counts(len(s), probes[:len(rates)])
        per_rank = torch.empty(len(s), dtype=torch.float64)
        lo = 0
        for rate, hi in zip(rates, counts):
            per_rank[lo:max(lo, hi)] = rate
            lo = max(lo, hi)
        per_rank[lo:] = rates[-1]
        rank_rate = torch.empty_like(per_rank)
        rank_rate[torch.argsort(s, stable=True)] = per_rank
        out[g] = s * rank_rate
    return out


def calibrate_scores(scores: Mapping[str, torch.Tensor], structure: Structure,
                     rates: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """``scores`` with each kind's values multiplied by its rate (float64 CPU tensors, same shapes)."""
    return {g: torch.as_tensor(s).double().cpu() * float(rates[structure.groups[g].kind]) for g, s in scores.items()}
