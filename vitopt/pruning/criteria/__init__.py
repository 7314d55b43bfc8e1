"""Importance criteria in one explicit registry: :data:`CRITERIA`.

Each criterion is one module defining a :class:`~vitopt.pruning.criteria.base.Criterion` record and
one line below: ``l1`` (weight magnitude), ``gate`` (VTP gates), ``taylor`` (first-order Taylor),
``taylor_weights`` (Torch-Pruning's per-weight Taylor), ``hessian`` (NViT saliency), ``kl`` (UP-ViTs), ``search`` (SiDT-style gate search) and ``angular``
(depth only: how far a block turns its tokens, Gromov et al. 2024). The recipe
schema, the CLI and :func:`vitopt.importance` take their allowed names from here.
"""

from __future__ import annotations

from vitopt.errors import VitoptError
from vitopt.pruning.criteria import angular, gate, hessian, kl, l1, search, taylor, taylor_weights
from vitopt.pruning.criteria.base import Batches, Criterion, Scores

__all__ = ["CRITERIA", "Criterion", "Scores", "Batches", "get_criterion", "register_criterion"]

#: criterion name -> record.
CRITERIA: dict[str, Criterion] = {c.name: c for c in (l1.CRITERION, gate.CRITERION, taylor.CRITERION,
                                                       taylor_weights.CRITERION, hessian.CRITERION, kl.CRITERION,
                                                       search.CRITERION, angular.CRITERION)}


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``.

    Raises:
        VitoptError: an unknown name; the message lists the known criteria.
    """
    if name not in CRITERIA:
        raise VitoptError(f"unknown importance criterion {name!r} (known: {', '.join(CRITERIA)}).")
    return CRITERIA[name]


def register_criterion(criterion: Criterion) -> Criterion:
    """Add (or replace) a criterion from user code; returns it."""
    CRITERIA[criterion.name] = criterion
    return criterion
