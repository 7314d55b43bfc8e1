"""``taylor``: first-order Taylor importance of coupled units."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitopt.arch.structure import Structure
from vitopt.pruning.criteria.base import ALL_KINDS, Batches, Criterion, Scores
from vitopt.pruning.criteria.gradients import weight_gradient_sums

__all__ = ["taylor_scores", "CRITERION"]


def taylor_scores(model: nn.Module, structure: Structure, groups: list[str], *, batches: Batches | None = None,
                  teacher: nn.Module | None = None, **unused: Any) -> Scores:
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
        unused: ``gates`` (ignored).
        batches: non-empty list of ``(images [B, C, H, W], labels [B] int64)``.
        teacher: optional teacher with the same classes.

    Returns:
        group -> float64 CPU tensor [group size], in loss units (nats).

    Raises:
        VitoptError: ``batches`` is None or empty; teacher logits of another shape.
    """
    sums, cost = weight_gradient_sums("taylor", model, structure, groups, batches, teacher)
    return Scores({g: s.abs().mean(0) for g, s in sums.items()}, criterion="taylor", cost=cost)


#: registry entry
CRITERION = Criterion("taylor", taylor_scores, needs=frozenset({"data"}), uses=frozenset({"teacher"}),
                      description="first-order Taylor |sum w*dL/dw| per unit on calibration batches",
                      source="Molchanov et al. 2019, arXiv 1906.10771",
                      kinds=ALL_KINDS)
