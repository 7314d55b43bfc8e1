"""Importance criteria: one score vector per group, higher = more important.

Every criterion has the signature::

    criterion(model, structure, groups, *, gates=None, batches=None, teacher=None, **options)
        -> dict[str, Tensor]   # group -> float64 [group size], on CPU

and is registered in :data:`CRITERIA`. Scores are computed from the Structure's layouts (and, for
``kl``, its choke points), so a criterion is written once for every family and group kind.

* ``l1`` - weight magnitude (no data).
* ``gate`` - learned VTP gates (``gates=``, no data).
* ``taylor`` - first-order Taylor, |sum w*dL/dw| per unit (Molchanov et al. 2019, arXiv 1906.10771).
* ``hessian`` - NViT's Hessian-aware saliency, (sum w*dL/dw)^2 per unit, normalised by the unit's
  number of coupled elements (Yang et al., CVPR 2023, arXiv 2110.04869).
* ``kl`` - UP-ViTs: KL(teacher || model without the unit) on a proxy set (Yu & Wu 2021,
  arXiv 2111.15127), many units per forward via replicated batches.
* ``search`` - SiDT-style dimension search (Xue et al. 2022, arXiv 2204.07722): gates on every unit
  trained under a FLOPs target, scored by their final magnitude (:mod:`vitopt.pruning.search`).

Data-driven criteria (``taylor``, ``hessian``, ``kl``) take ``batches``: a list of
``(images [B, C, H, W], labels [B])`` tuples, and raise :class:`VitoptError` when it is missing or
empty. They leave the model as they found it: parameters, ``requires_grad`` flags, ``.grad`` (never
written: gradients come from :func:`torch.autograd.grad`), every module's training flag, no hooks.
They run the model in eval mode (no dropout / drop-path) so scores are deterministic.

Cost: :func:`compute_scores` clears the module-level :data:`LAST_COST` dict and every data-driven
criterion fills it (forward/backward passes, images, seconds); the same numbers are logged at INFO
on the ``vitopt.pruning.importance`` logger. Read it right after the call, e.g.
``importance.LAST_COST["forward_passes"]``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.hooks import attach_replica_masks
from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError

__all__ = ["CRITERIA", "LAST_COST", "l1_scores", "gate_scores", "taylor_scores", "hessian_scores", "kl_scores",
           "search_scores",
           "compute_scores", "coupled_counts", "DATA_CRITERIA"]

log = logging.getLogger(__name__)

#: Cost of the last data-driven criterion run (cleared by :func:`compute_scores`). Keys:
#: ``criterion``; ``forward_passes`` (model forward calls, each on R*B rows for ``kl``);
#: ``backward_passes``; ``teacher_forward_passes``; ``rows`` (images pushed through the model,
#: replicas counted); ``images`` (distinct images seen); ``units`` (units scored); ``max_replicas``
#: (largest R used, ``kl`` only); ``seconds`` (wall time).
LAST_COST: dict = {}

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _set_cost(**cost) -> None:
    LAST_COST.clear()
    LAST_COST.update(cost)
    log.info("importance %s: %s", cost.get("criterion"),
             ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in cost.items()
                       if k != "criterion"))


@torch.no_grad()
def l1_scores(model: nn.Module, structure: Structure, groups: list[str], *, gates=None, batches=None,
              teacher=None) -> dict[str, torch.Tensor]:
    """Weight-magnitude importance: sum of |w| over every coupled slice of each unit.

    For a head: its q/k/v rows of qkv and its columns of proj; for an MLP neuron: its fc1 row (and
    bias) and fc2 column. The L1-norm filter criterion of Li et al. 2017 (arXiv 1608.08710), applied
    to coupled groups as in Torch-Pruning's GroupMagnitudeImportance (Fang et al. 2023,
    arXiv 2301.12900). ``gates``, ``batches`` and ``teacher`` are ignored.

    Returns:
        group -> float64 tensor [group size] (units of |w|, summed).
    """
    out = {}
    for g in groups:
        score = torch.zeros(structure.groups[g].size, dtype=torch.float64)
        for lay in structure.layouts_of(g):
            score += lay.reduce(model.get_parameter(lay.param).detach().abs().double().cpu(), g)
        out[g] = score
    return out


@torch.no_grad()
def gate_scores(model: nn.Module, structure: Structure, groups: list[str], *, gates=None, batches=None,
                teacher=None) -> dict[str, torch.Tensor]:
    """VTP importance: the magnitude of each unit's learned gate (Zhu, Tang, Han 2021, arXiv 2104.08500).

    Args:
        gates: group -> trained gate values [group size] (``UnitGates.values()``).
        batches, teacher: ignored.

    Returns:
        group -> float64 tensor [group size], |gate|.

    Raises:
        VitoptError: no gates were trained (no ``sparse_train`` stage before), or a group has none.
    """
    if gates is None:
        raise VitoptError("criterion 'gate' needs gates from an earlier sparse_train stage.")
    out = {}
    for g in groups:
        value = gates.get(g)
        if value is None or value.shape != (structure.groups[g].size,):
            raise VitoptError(f"criterion 'gate' has no gate for group {g!r}; add its kind to sparse_train.groups.")
        out[g] = value.detach().abs().double().cpu()
    return out


# ------------------------------------------------------------------------------------- data helpers
def _need_batches(name: str, batches) -> None:
    if not batches:
        raise VitoptError(f"criterion {name!r} needs data batches (a non-empty list of (images [B, C, H, W], "
                          "labels [B]) from the training data); none were given.")


@contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
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


def _logits(out) -> torch.Tensor:
    """Model output -> logits; a (cls, dist) tuple is averaged as timm does at inference."""
    if isinstance(out, (tuple, list)):
        return torch.stack(list(out)).mean(0)
    return out


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _teacher_log_probs(teacher: nn.Module, x: torch.Tensor, like: torch.Size | None, name: str) -> torch.Tensor:
    with torch.no_grad():
        t = _logits(teacher(x.to(_device(teacher)))).double()
    if like is not None and t.shape != like:
        raise VitoptError(f"criterion {name!r}: the teacher's logits have shape {tuple(t.shape)} but the model's "
                          f"have {tuple(like)}; the teacher must predict the same classes.")
    return F.log_softmax(t, dim=-1)


def _wg_sums(name: str, model: nn.Module, structure: Structure, groups: list[str], batches: Batches,
             teacher: nn.Module | None) -> dict[str, torch.Tensor]:
    """Per batch b and unit u: s[b, u] = sum over u's coupled elements of w * dL_b/dw (float64, CPU).

    L_b is the mean cross-entropy of batch b against its labels, or, with a teacher,
    KL(softmax(teacher) || softmax(model)) averaged over the batch's images (temperature 1).
    """
    _need_batches(name, batches)
    start = time.perf_counter()
    names = list(dict.fromkeys(lay.param for g in groups for lay in structure.layouts_of(g)))
    params = [model.get_parameter(n) for n in names]
    flags = [p.requires_grad for p in params]
    dev = _device(model)
    sums: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
    rows = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with _eval_mode(model, teacher), torch.enable_grad():
            for x, y in batches:
                x = x.to(dev)
                out = _logits(model(x))
                if teacher is None:
                    loss = F.cross_entropy(out, y.to(dev))
                else:
                    logp_t = _teacher_log_probs(teacher, x, out.shape, name).to(dev)
                    loss = F.kl_div(F.log_softmax(out.double(), -1), logp_t, log_target=True, reduction="batchmean")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                wg = {n: (p.detach().double() * g.double()).cpu() if g is not None
                      else torch.zeros(p.shape, dtype=torch.float64)
                      for n, p, g in zip(names, params, grads)}
                for g in groups:
                    s = torch.zeros(structure.groups[g].size, dtype=torch.float64)
                    for lay in structure.layouts_of(g):
                        s += lay.reduce(wg[lay.param], g)
                    sums[g].append(s)
                rows += x.shape[0]
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    _set_cost(criterion=name, forward_passes=len(batches), backward_passes=len(batches),
              teacher_forward_passes=len(batches) if teacher is not None else 0, rows=rows, images=rows,
              units=sum(structure.groups[g].size for g in groups), seconds=time.perf_counter() - start)
    return {g: torch.stack(v) for g, v in sums.items()}


def coupled_counts(model: nn.Module, structure: Structure, groups: list[str]) -> dict[str, int]:
    """Number of parameter elements one unit of each group owns across its coupled slices.

    ``sum over structure.layouts_of(g) of numel(param) / size(g)``: for a head of block i,
    ``3*d*D`` (qkv weight) + ``3*d`` (qkv bias) + ``D*d`` (proj weight); for an MLP neuron
    ``2*D + 1``; for an embed channel one entry of every LayerNorm weight/bias, token and pos_embed
    row, one column of every qkv/fc1/head and one row (+ bias) of every proj/fc2. This is exactly
    the number of ``w * dL/dw`` terms the layouts' ``reduce`` sums per unit. Used by
    :func:`hessian_scores`.

    Returns:
        group -> int (elements per unit).
    """
    out = {}
    for g in groups:
        size = structure.groups[g].size
        out[g] = sum(model.get_parameter(lay.param).numel() // size for lay in structure.layouts_of(g))
    return out


def taylor_scores(model: nn.Module, structure: Structure, groups: list[str], *, gates=None,
                  batches: Batches | None = None, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """First-order Taylor importance: ``mean_b |sum_{e in unit} w_e * dL_b/dw_e|``.

    The group-Taylor criterion of Molchanov et al. 2019 ("Importance Estimation for Neural Network
    Pruning", arXiv 1906.10771), the base of NViT: the first-order estimate of the loss change when
    every coupled weight of the unit is zeroed. For each batch b the sum runs over all of the unit's
    coupled slices (``structure.layouts_of(group)``, reduced with ``AxisLayout.reduce``); the
    absolute value is taken per batch, then averaged over batches (unweighted).

    Loss: mean cross-entropy against the batch labels; with ``teacher`` given, KL(teacher || model)
    on soft labels (softmax at temperature 1, averaged over images) instead, labels unused. Note that
    a teacher identical to the model gives zero gradients (the KL is at its minimum) and so all-zero
    scores: pass a teacher only if it differs from the model (e.g. a larger or unpruned one).

    Args:
        model: the model ``structure`` was built from; run in eval mode, left unchanged.
        structure: its :class:`Structure`.
        groups: group names to score.
        gates: ignored.
        batches: non-empty list of ``(images [B, C, H, W], labels [B] int64)``.
        teacher: optional teacher with the same classes.

    Returns:
        group -> float64 CPU tensor [group size], in loss units (nats).

    Raises:
        VitoptError: ``batches`` is None or empty; teacher logits of another shape.
    """
    sums = _wg_sums("taylor", model, structure, groups, batches, teacher)
    return {g: s.abs().mean(0) for g, s in sums.items()}


def hessian_scores(model: nn.Module, structure: Structure, groups: list[str], *, gates=None,
                   batches: Batches | None = None, teacher: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """NViT Hessian-aware saliency: ``mean_b (sum_{e in unit} w_e * dL_b/dw_e)^2 / n_unit``.

    Yang et al., "Global Vision Transformer Pruning with Hessian-Aware Saliency", CVPR 2023
    (arXiv 2110.04869). With the Fisher (outer product of gradients) approximation of the Hessian,
    the second-order loss change of removing a unit's weights ``w_S`` is
    ``1/2 w_S^T H w_S ~ 1/2 E_b[(g_S^T w_S)^2]``: the squared group sum of ``w * dL/dw`` per batch,
    averaged over batches (not the square of the average, which would be the Taylor score).

    Normalisation: the result is divided by ``n_unit`` = :func:`coupled_counts` (the number of
    parameter elements one unit of that group owns, i.e. the number of terms in the sum). Units of
    different kinds share very different amounts of the network (an embed channel touches every
    block, a head ``4*d*D`` elements, an MLP neuron ``2*D+1``); dividing by the coupled-element
    count makes scores per-parameter saliencies that are comparable across kinds for NViT's global
    ranking, and it is constant within a group, so the ranking inside a group is unchanged.

    Args, loss, model handling: as :func:`taylor_scores`.

    Returns:
        group -> float64 CPU tensor [group size] (nats^2 per coupled element).

    Raises:
        VitoptError: ``batches`` is None or empty; teacher logits of another shape.
    """
    sums = _wg_sums("hessian", model, structure, groups, batches, teacher)
    counts = coupled_counts(model, structure, groups)
    return {g: s.pow(2).mean(0) / counts[g] for g, s in sums.items()}


@torch.no_grad()
def kl_scores(model: nn.Module, structure: Structure, groups: list[str], *, gates=None,
              batches: Batches | None = None, teacher: nn.Module | None = None,
              max_rows: int = 512) -> dict[str, torch.Tensor]:
    """UP-ViTs importance: ``KL(teacher || model with only this unit removed)`` on a proxy set.

    Yu & Wu 2021, "A Unified Pruning Framework for Vision Transformers" (arXiv 2111.15127): each unit
    is removed on its own and scored by how much the prediction distribution moves,
    ``mean over images of sum_c p_t(c) (log p_t(c) - log p_{-u}(c))``. ``teacher`` defaults to the
    unmasked model itself. Removal is simulated exactly with per-replica hard masks
    (:func:`vitopt.arch.hooks.attach_replica_masks`; for ``embed`` LayerNorm statistics are taken over
    the kept channels), equal to physical surgery up to float error: each batch of B images is
    replicated R = max(1, max_rows // B) times and each replica removes a different unit (units of all
    requested groups are packed together), so one forward scores R units.

    Cost per batch: 1 teacher forward + ceil(U / R) model forwards of R*B rows (U = units in
    ``groups``); recorded in :data:`LAST_COST` and logged. Keep batches small (e.g. the whole
    5-images-per-class proxy set split into batches of <= max_rows) and lower ``max_rows`` to bound
    activation memory.

    Args:
        model: the model ``structure`` was built from; run in eval mode, left unchanged.
        structure: its :class:`Structure`.
        groups: group names to score.
        gates: ignored.
        batches: non-empty list of ``(images [B, C, H, W], labels)``; labels are unused.
        teacher: reference model with the same classes; default the model itself, unmasked.
        max_rows: bound on rows (R*B) per forward pass.

    Returns:
        group -> float64 CPU tensor [group size], KL in nats per image (>= 0 up to float error).

    Raises:
        VitoptError: ``batches`` is None or empty; ``max_rows < 1``; teacher logits of another shape.
    """
    _need_batches("kl", batches)
    if max_rows < 1:
        raise VitoptError(f"criterion 'kl': max_rows must be >= 1, got {max_rows}.")
    start = time.perf_counter()
    units = [(g, u) for g in groups for u in range(structure.groups[g].size)]
    total = {g: torch.zeros(structure.groups[g].size, dtype=torch.float64) for g in groups}
    dev = _device(model)
    forwards = rows = images = max_r = 0
    with _eval_mode(model, teacher):
        for x, _ in batches:
            x = x.to(dev)
            B = x.shape[0]
            if teacher is None:
                logp_t = F.log_softmax(_logits(model(x)).double(), -1)
            else:
                logp_t = _teacher_log_probs(teacher, x, None, "kl").to(dev)
            p_t = logp_t.exp()
            R = max(1, max_rows // B)
            for lo in range(0, len(units), R):
                chunk = units[lo:lo + R]
                r = len(chunk)
                masks: dict[str, torch.Tensor] = {}
                for i, (g, u) in enumerate(chunk):
                    if g not in masks:
                        masks[g] = torch.ones(r, structure.groups[g].size, device=dev)
                    masks[g][i, u] = 0.0
                handles = [attach_replica_masks(model, structure, g, m) for g, m in masks.items()]
                try:
                    out = _logits(model(x.repeat(r, *([1] * (x.dim() - 1)))))
                finally:
                    for h in handles:
                        h.remove()
                if out.shape[0] != r * B or out.shape[1:] != logp_t.shape[1:]:
                    raise VitoptError(f"criterion 'kl': the model's logits have shape {tuple(out.shape[1:])} but "
                                      f"the teacher's have {tuple(logp_t.shape[1:])}; they must match.")
                logq = F.log_softmax(out.double(), -1).reshape(r, B, -1)
                kl = (p_t[None] * (logp_t[None] - logq)).sum(-1).sum(-1).cpu()  # [r], summed over images
                for i, (g, u) in enumerate(chunk):
                    total[g][u] += kl[i]
                forwards += 1
                rows += r * B
                max_r = max(max_r, r)
            images += B
    _set_cost(criterion="kl", forward_passes=forwards, backward_passes=0, teacher_forward_passes=len(batches),
              rows=rows, images=images, units=len(units), max_replicas=max_r, seconds=time.perf_counter() - start)
    return {g: t / images for g, t in total.items()}


def search_scores(model: nn.Module, structure: Structure, groups: list[str], **kwargs) -> dict[str, torch.Tensor]:
    """SiDT-style dimension search (Xue et al. 2022, arXiv 2204.07722): gates trained under a FLOPs
    target, scored by their final magnitude. See :func:`vitopt.pruning.search.search_scores`."""
    from vitopt.pruning.search import search_scores as run_search

    return run_search(model, structure, groups, **kwargs)


#: criterion name -> function. Names are the recipe's ``prune.criterion`` values.
CRITERIA: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "l1": l1_scores,
    "gate": gate_scores,
    "taylor": taylor_scores,
    "hessian": hessian_scores,
    "kl": kl_scores,
    "search": search_scores,
}

#: criteria that need ``batches``.
DATA_CRITERIA = frozenset({"taylor", "hessian", "kl", "search"})


def compute_scores(name: str, model: nn.Module, structure: Structure, groups: list[str], **kwargs) -> dict[str, torch.Tensor]:
    """Run criterion ``name`` on ``groups``, passing ``kwargs`` (``gates``, ``batches``, ``teacher``,
    criterion options such as ``max_rows``) through.

    Clears :data:`LAST_COST` first; data-driven criteria refill it.

    Returns:
        group -> float64 tensor [group size], higher = more important.

    Raises:
        VitoptError: unknown ``name`` (the message lists the known criteria), or whatever the
            criterion raises (e.g. missing ``batches``/``gates``).
    """
    if name not in CRITERIA:
        raise VitoptError(f"unknown importance criterion {name!r} (known: {', '.join(CRITERIA)}).")
    LAST_COST.clear()
    return CRITERIA[name](model, structure, groups, **kwargs)
