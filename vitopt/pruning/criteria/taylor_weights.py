"""``taylor_weights``: first-order Taylor importance summed over a unit's weights, one absolute value per weight."""

from __future__ import annotations

from typing import Any

from torch import nn

from vitopt.arch.structure import Structure
from vitopt.pruning.criteria.base import ALL_KINDS, Batches, Criterion, Scores
from vitopt.pruning.criteria.gradients import weight_gradient_sums

__all__ = ["taylor_weights_scores", "CRITERION"]


def taylor_weights_scores(model: nn.Module, structure: Structure, groups: list[str], *,
                          batches: Batches | None = None, teacher: nn.Module | None = None,
                          **unused: Any) -> Scores:
    """Per-weight first-order Taylor importance: ``sum_{e in unit} |w_e * mean_b dL_b/dw_e|``.

    The estimator of Torch-Pruning's ``GroupTaylorImportance`` (Fang et al., "DepGraph", CVPR 2023,
    arXiv 2301.12900; the per-weight Taylor term of Molchanov et al. 2019, arXiv 1906.10771): the
    gradient is averaged over the calibration batches, multiplied by the weight, and the absolute value
    is taken per weight before summing over the unit's coupled slices. :func:`taylor_scores` instead
    sums ``w * g`` over the unit first and takes one absolute value per batch, so weights whose
    first-order effects cancel count for nothing there and fully here. Depth (``blocks``):
    ``|mean_b dL_b/ds_u|`` through a gate on the block's residual branches.

    Args, loss, model handling: as :func:`vitopt.pruning.criteria.taylor.taylor_scores`.

    Returns:
        group -> float64 CPU tensor [group size], in loss units (nats), >= 0.

    Raises:
        VitoptError: ``batches`` is None or empty; teacher logits of another shape.
    """
    sums, cost = weight_gradient_sums("taylor_weights", model, structure, groups, batches, teacher,
                                      elementwise_abs=True)
    return Scores({g: s[0] for g, s in sums.items()}, criterion="taylor_weights", cost=cost)


#: registry entry
CRITERION = Criterion("taylor_weights", taylor_weights_scores, needs=frozenset({"data"}),
                      uses=frozenset({"teacher"}),
                      description="per-weight first-order Taylor sum |w*mean dL/dw| (Torch-Pruning's group Taylor)",
                      source="Fang et al., CVPR 2023, arXiv 2301.12900",
                      kinds=ALL_KINDS)
