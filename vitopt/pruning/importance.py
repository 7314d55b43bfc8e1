"""``vitopt.importance``: score every unit of a model's groups with a registered criterion.

One entry point over :data:`vitopt.pruning.criteria.CRITERIA`: it resolves which groups to score
(kinds such as ``("heads", "mlp")`` or explicit group names), turns the user's data (a DataLoader, any
iterable of ``(images, labels)`` batches, or a list) into calibration batches, checks that the
criterion gets what it declares it needs (data, gates), and returns the criterion's
:class:`~vitopt.pruning.criteria.base.Scores` (a dict with the cost report as ``.cost``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from vitopt.arch.cost import structure_of
from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError
from vitopt.pruning.criteria import CRITERIA, get_criterion
from vitopt.pruning.criteria.base import Batches, Scores

__all__ = ["importance", "select_groups", "default_groups", "as_batches", "DEFAULT_GROUPS"]

#: group kinds pruned when none are named: the residual width (embed), attention heads, per-head dims and
#: MLP hidden neurons. A criterion that can only price some kinds (``gate``: the kinds its gates cover)
#: gets those of them it can price (:func:`default_groups`). Depth (``blocks``) is opt-in: name it
#: (``groups=["blocks", "heads", "mlp"]``), except for ``angular``, which scores nothing else.
DEFAULT_GROUPS: tuple[str, ...] = ("embed", "heads", "head_dim", "mlp")


def default_groups(structure: Structure, criterion: str, gates: dict[str, torch.Tensor] | None = None) -> list[str]:
    """The group kinds pruned when none are named: :data:`DEFAULT_GROUPS` that ``structure`` has and
    ``criterion`` can price (for criteria that need gates, the kinds of the gated groups); for a criterion
    that prices none of them (``angular``), the kinds it can price."""
    crit = get_criterion(criterion)
    kinds = [k for k in DEFAULT_GROUPS if structure.of_kind(k) and k in crit.kinds]
    if not kinds:
        return [k for k in sorted(crit.kinds) if structure.of_kind(k)]
    if "gates" in get_criterion(criterion).needs and gates is not None:
        gated = {structure.groups[g].kind for g in gates if g in structure.groups}
        kinds = [k for k in kinds if k in gated]
    return kinds


def select_groups(structure: Structure, groups: Sequence[str] | None = None) -> list[str]:
    """Group names to score: every group of the named kinds, plus any group named explicitly.

    Args:
        structure: the model's Structure.
        groups: kinds (``"embed"``, ``"heads"``, ``"head_dim"``, ``"mlp"``, ...) and/or group names
            (``"blocks.3.mlp"``); default :data:`DEFAULT_GROUPS`.

    Returns:
        group names in structure order.

    Raises:
        VitoptError: a name that is neither a kind of this model nor one of its groups, or no groups.
    """
    wanted = list(DEFAULT_GROUPS if groups is None else groups)
    kinds = {g.kind for g in structure.groups.values()}
    bad = [w for w in wanted if w not in kinds and w not in structure.groups]
    fixed = [w for w in bad if w in structure.fixed_kinds]
    if fixed:
        raise VitoptError(structure.fixed_kinds[fixed[0]])
    if bad:
        raise VitoptError(f"groups {bad} are neither group kinds of this {structure.family} model "
                          f"({', '.join(sorted(kinds))}) nor its group names (e.g. {next(iter(structure.groups))!r}).")
    out = [g.name for g in structure.groups.values() if g.kind in wanted or g.name in wanted]
    if not out:
        raise VitoptError("no groups selected to score; name at least one group kind.")
    return out


def as_batches(data: Any, limit: int | None = None) -> Batches | None:
    """The first ``limit`` batches (all when None) of ``data`` as a list of ``(images, labels)`` tensors.

    ``data`` may be a DataLoader, any iterable of ``(images [B, C, H, W], labels [B])`` pairs, a single
    ``(images, labels)`` pair of tensors, or None (returned as None).

    Raises:
        VitoptError: ``data`` does not yield ``(images, labels)`` pairs of 4-D and 1-D tensors.
    """
    if data is None:
        return None
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor) and data[0].dim() == 4:
        data = [data]
    if not isinstance(data, Iterable):
        raise VitoptError(f"data must be a DataLoader or an iterable of (images, labels) batches; got "
                          f"{type(data).__name__}.")
    out = []
    for batch in itertools.islice(data, limit):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
                and batch[0].dim() == 4):
            raise VitoptError("data must yield (images [B, C, H, W], labels [B]) batches; got "
                              f"{type(batch).__name__}" + (f" with images of shape {tuple(batch[0].shape)}"
                                                         if isinstance(batch, (tuple, list)) and batch
                                                         and isinstance(batch[0], torch.Tensor) else "") + ".")
        out.append((batch[0], torch.as_tensor(batch[1])))
    return out


def importance(model: nn.Module, criterion: str = "l1", *, groups: Sequence[str] | None = None, data: Any = None,
               teacher: nn.Module | None = None, gates: dict[str, torch.Tensor] | None = None,
               structure: Structure | None = None, max_batches: int | None = None, **options: Any) -> Scores:
    """Importance of every unit of the selected groups (``vitopt.importance``).

    Args:
        model: a timm model of a registered family; left unchanged (criteria restore parameters,
            flags and hooks).
        criterion: a name in :data:`vitopt.pruning.criteria.CRITERIA`: ``l1``, ``gate``, ``taylor``,
            ``hessian``, ``kl``, ``search``, ``angular`` (blocks only).
        groups: kinds and/or group names (default :func:`default_groups`).
        data: calibration batches for data-driven criteria (see :func:`as_batches`).
        teacher: reference model for ``kl``, ``taylor``/``hessian`` (KD loss) and ``search``.
        gates: trained VTP gates, group -> ``[size]`` (criterion ``gate``).
        structure: the model's Structure, if already built (default: built here).
        max_batches: use at most this many batches of ``data``.
        options: criterion options (``max_rows`` for kl; ``steps``, ``lr``, ``penalty``, ``target``,
            ``cost`` for search).

    Returns:
        :class:`~vitopt.pruning.criteria.base.Scores`: group -> float64 CPU tensor ``[size]``,
        higher = more important, with ``.cost`` (passes, images, seconds).

    Raises:
        VitoptError: an unknown criterion or group, a group kind the criterion cannot score (``blocks``
            with ``l1``/``gate``/``search``, width with ``angular``), missing data or gates the criterion
            needs, an unknown option, or the criterion's own errors.
    """
    crit = get_criterion(criterion)
    structure = structure if structure is not None else structure_of(model)
    names = select_groups(structure, groups if groups is not None else default_groups(structure, criterion, gates))
    unscorable = sorted({structure.groups[g].kind for g in names} - crit.kinds)
    if unscorable:
        able = sorted(c.name for c in CRITERIA.values() if set(unscorable) <= c.kinds)
        raise VitoptError(f"criterion {criterion!r} cannot score group kind(s) {', '.join(unscorable)} (it scores "
                          f"{', '.join(sorted(crit.kinds))}); use {', '.join(able) or 'another criterion'} for them.")
    batches = as_batches(data, max_batches)
    if "data" in crit.needs and not batches:
        raise VitoptError(f"criterion {criterion!r} needs data: pass data= a DataLoader or a list of "
                          "(images, labels) batches from the training set.")
    if "gates" in crit.needs and gates is None:
        raise VitoptError(f"criterion {criterion!r} needs gates= trained VTP gates (vitopt.sparsity.VTP(...).finish()).")
    unknown = [k for k in options if k not in crit.options and k not in crit.uses]
    if unknown:
        raise VitoptError(f"criterion {criterion!r} does not take option(s) {', '.join(unknown)} "
                          f"(it takes: {', '.join([*crit.options, *sorted(crit.uses - {'teacher'})]) or 'none'}).")
    return crit.fn(model, structure, names, batches=batches, teacher=teacher, gates=gates, **options)
