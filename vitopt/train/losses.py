"""Training losses: knowledge distillation (Hinton, Vinyals, Dean 2015) with label-smoothed CE.

Sources: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
arXiv 1503.02531 (2015); C. Szegedy et al., "Rethinking the Inception Architecture for Computer
Vision", CVPR 2016 (label smoothing); H. Touvron et al., "Training data-efficient image transformers
& distillation through attention" (DeiT), ICML 2021 (the distillation token / second head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Logits", "merge_heads", "kd_loss"]

#: What a classifier may return: logits [B, K], or a tuple of per-head logits (DeiT-distilled in
#: distilled-training mode returns ``(cls_logits, dist_logits)``).
Logits = Tensor | Sequence[Tensor]


def merge_heads(logits: Logits) -> Tensor:
    """Average a tuple/list of per-head logits into one [B, K] tensor; a tensor is returned as is.

    This is what timm's ``VisionTransformerDistilled`` itself does in eval mode ((cls + dist) / 2).
    """
    if isinstance(logits, (tuple, list)):
        if len(logits) == 1:
            return logits[0]
        return torch.stack(list(logits), dim=0).mean(dim=0)
    return logits


def kd_loss(student_logits: Logits, teacher_logits: Logits, labels: Tensor, *, alpha: float, tau: float,
            label_smoothing: float = 0.0) -> Tensor:
    """Soft-target distillation loss (Hinton et al. 2015) mixed with label-smoothed cross-entropy.

    ``loss = alpha * tau**2 * KL(softmax(t / tau) || softmax(s / tau)) + (1 - alpha) * CE_ls(s, y)``

    with the KL divergence averaged over the batch (``reduction="batchmean"``, i.e. summed over
    classes, mean over samples), and ``CE_ls`` the cross-entropy with label smoothing
    ``label_smoothing`` (Szegedy et al. 2016). The ``tau**2`` factor keeps the soft-target
    gradients on the same scale as the hard-target ones when ``tau`` changes (Hinton et al., sec. 2).

    Distilled DeiT (two heads): if the student or the teacher returns a tuple ``(cls, dist)`` (timm
    ``VisionTransformerDistilled`` with ``distilled_training=True`` in train mode), the heads'
    logits are AVERAGED into one [B, K] tensor first, and that average is used for both the CE and the
    KD term. This matches what the model predicts at inference ((cls + dist) / 2) rather than DeiT's
    split "CE on cls head, distillation on dist head" objective.

    Args:
        student_logits: [B, K] logits (or tuple of them), requires grad.
        teacher_logits: [B, K] logits (or tuple of them); detached here.
        labels: int64 [B] class indices, or float [B, K] soft targets (Mixup / CutMix; the CE then uses
            the probabilities as they are).
        alpha: weight of the KD term in [0, 1]; 0 gives plain (smoothed) CE.
        tau: softmax temperature (> 0).
        label_smoothing: CE label smoothing in [0, 1).

    Returns:
        scalar tensor (nats).

    Raises:
        ValueError: ``alpha`` outside [0, 1], ``tau`` <= 0, or student/teacher shapes that differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd alpha must be in [0, 1]; got {alpha}")
    if tau <= 0:
        raise ValueError(f"kd tau must be > 0; got {tau}")
    s = merge_heads(student_logits)
    t = merge_heads(teacher_logits).detach()
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    ce = F.cross_entropy(s, labels, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return ce
    kl = F.kl_div(
        F.log_softmax(s.float() / tau, dim=-1),
        F.log_softmax(t.float() / tau, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * (tau ** 2) * kl + (1.0 - alpha) * ce
