"""``hessian``: NViT's Hessian-aware saliency of coupled units."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitopt.arch.structure import Structure
from vitopt.pruning.criteria.base import ALL_KINDS, Batches, Criterion, Scores, coupled_counts
from vitopt.pruning.criteria.gradients import weight_gradient_sums

__all__ = ["hessian_scores", "CRITERION"]


def hessian_scores(model: nn.Module, structure: Structure, groups: list[str], *, batches: Batches | None = None,
                   teacher: nn.Module | None = None, **unused: Any) -> Scores:
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
    sums, cost = weight_gradient_sums("hessian", model, structure, groups, batches, teacher)
    counts = coupled_counts(model, structure, groups)
    return Scores({g: s.pow(2).mean(0) / counts[g] for g, s in sums.items()}, criterion="hessian", cost=cost)


#: registry entry
CRITERION = Criterion("hessian", hessian_scores, needs=frozenset({"data"}), uses=frozenset({"teacher"}),
                      description="NViT Hessian-aware saliency (sum w*dL/dw)^2 per coupled element",
                      source="Yang et al., CVPR 2023, arXiv 2110.04869",
                      kinds=ALL_KINDS)
