"""What every importance criterion is: the :class:`Criterion` record, the :class:`Scores` it returns, helpers.

A criterion scores every unit of the groups it is given, higher = more important, and returns its
cost (forward / backward passes, images, seconds) with the scores as one value, :class:`Scores`.
Criteria are generic over the :class:`~vitopt.arch.structure.Structure` (its layouts and choke points),
so each is written once for every family and group kind. Each declares what it needs
(``"data"`` calibration batches, ``"gates"`` from VTP training) and what it can use (``"teacher"``);
:func:`vitopt.pruning.importance.importance` checks those before calling it.

Data-driven criteria take ``batches``: a list of ``(images [B, C, H, W], labels [B])`` tuples, and
leave the model as they found it: parameters, ``requires_grad`` flags, ``.grad`` (never written:
gradients come from :func:`torch.autograd.grad`), every module's training flag, no hooks. They run
the model in eval mode (no dropout / drop-path) so scores are deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.structure import GROUP_KINDS, Structure
from vitopt.errors import VitoptError

__all__ = ["Batches", "Scores", "Criterion", "WIDTH_KINDS", "ALL_KINDS", "need_batches", "eval_mode", "logits_of", "device_of",
           "teacher_log_probs", "coupled_counts"]

log = logging.getLogger("vitopt.pruning.criteria")

#: the width kinds (every kind but depth): what a criterion scores unless its record says more.
WIDTH_KINDS: frozenset[str] = frozenset(k for k in GROUP_KINDS if k != "blocks")
#: every group kind, depth included.
ALL_KINDS: frozenset[str] = frozenset(GROUP_KINDS)

#: calibration data: a list of ``(images [B, C, H, W], labels [B] int64)``.
Batches = list[tuple[torch.Tensor, torch.Tensor]]


class Scores(dict):
    """group name -> float64 CPU tensor ``[group size]`` of importance (higher = keep), plus what it cost.

    A ``dict`` (so ``scores["blocks.0.heads"]`` works) with two attributes:

    Attributes:
        criterion: the criterion's name.
        cost: what computing the scores took: ``seconds`` (wall time) and, for data-driven criteria,
            ``forward_passes`` (model forward calls, each on R*B rows for ``kl``), ``backward_passes``,
            ``teacher_forward_passes``, ``rows`` (images pushed through the model, replicas counted),
            ``images`` (distinct images seen), ``units`` (units scored), ``max_replicas`` (``kl``).
    """

    def __init__(self, scores: dict[str, torch.Tensor], *, criterion: str, cost: dict[str, Any] | None = None) -> None:
        super().__init__(scores)
        self.criterion = criterion
        self.cost: dict[str, Any] = {"criterion": criterion, **(cost or {})}
        log.info("importance %s: %s", criterion,
                 ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.cost.items()
                           if k != "criterion"))


@dataclass(frozen=True)
class Criterion:
    """One registered importance criterion.

    Attributes:
        name: the name recipes and :func:`vitopt.importance` use (``"taylor"``).
        fn: ``fn(model, structure, groups, *, batches=None, teacher=None, gates=None, **options) -> Scores``.
        needs: inputs it cannot run without: ``"data"`` (calibration batches), ``"gates"`` (trained VTP gates).
        uses: optional inputs it takes: ``"teacher"`` (a reference model), ``"target"`` (the cost
            target, for ``search``).
        options: its tunable options and their defaults (passed through as keyword arguments).
        calibration: how its data is drawn from a training set (:func:`vitopt.pruning.calibration.calibration_batches`):
            ``"batches"`` (shuffled batches) or ``"per_class"`` (a few images of every class).
        description: one line for help texts and the recipe schema.
        source: the paper it follows.
        kinds: the group kinds it can score (default :data:`WIDTH_KINDS`; ``blocks`` only where a block's
            score means something: taylor, hessian, kl, gate, angular).
    """

    name: str
    fn: Callable[..., Scores]
    needs: frozenset[str] = frozenset()
    uses: frozenset[str] = frozenset()
    options: dict[str, Any] = field(default_factory=dict)
    calibration: str = "batches"
    description: str = ""
    source: str = ""
    kinds: frozenset[str] = WIDTH_KINDS


def need_batches(name: str, batches: Any) -> None:
    """Raise VitoptError when a data-driven criterion got no batches."""
    if not batches:
        raise VitoptError(f"criterion {name!r} needs data batches (a non-empty list of (images [B, C, H, W], "
                          "labels [B]) from the training data); none were given.")


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put ``models`` in eval mode; restore every module's own training flag afterwards."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def logits_of(out: Any) -> torch.Tensor:
    """Model output -> logits; a (cls, dist) tuple is averaged as timm does at inference."""
    if isinstance(out, (tuple, list)):
        return torch.stack(list(out)).mean(0)
    return out


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a parameterless model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def teacher_log_probs(teacher: nn.Module, x: torch.Tensor, like: torch.Size | None, name: str) -> torch.Tensor:
    """log-softmax of ``teacher``'s float64 logits on ``x``, ``[B, classes]``.

    Raises:
        VitoptError: ``like`` is given and the teacher's logits have another shape.
    """
    with torch.no_grad():
        t = logits_of(teacher(x.to(device_of(teacher)))).double()
    if like is not None and t.shape != like:
        raise VitoptError(f"criterion {name!r}: the teacher's logits have shape {tuple(t.shape)} but the model's "
                          f"have {tuple(like)}; the teacher must predict the same classes.")
    return F.log_softmax(t, dim=-1)


def coupled_counts(model: nn.Module, structure: Structure, groups: list[str]) -> dict[str, int]:
    """Number of parameter elements one unit of each group owns across its coupled slices.

    ``sum over structure.layouts_of(g) of numel(param) / size(g)``: for a head of block i,
    ``3*d*D`` (qkv weight) + ``3*d`` (qkv bias) + ``D*d`` (proj weight); for an MLP neuron
    ``2*D + 1``; for an embed channel one entry of every LayerNorm weight/bias, token and pos_embed
    row, one column of every qkv/fc1/head and one row (+ bias) of every proj/fc2. This is exactly
    the number of ``w * dL/dw`` terms the layouts' ``reduce`` sums per unit. Used by
    :func:`hessian_scores`.

    A block (kind ``blocks``) owns every parameter under its module; its count is the mean over the
    group's blocks (one constant per group, so the ranking of blocks is unchanged by it).

    Returns:
        group -> int (elements per unit).
    """
    out = {}
    for g in groups:
        size = structure.groups[g].size
        if g in structure.units:
            owned = [sum(p.numel() for p in model.get_submodule(u).parameters()) for u in structure.units[g]]
            out[g] = max(1, round(sum(owned) / len(owned)))
            continue
        out[g] = sum(model.get_parameter(lay.param).numel() // size for lay in structure.layouts_of(g))
    return out
