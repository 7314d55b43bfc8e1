"""``kl``: UP-ViTs' one-at-a-time KL importance."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitopt.arch.hooks import attach_replica_masks
from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError
from vitopt.pruning.criteria.base import (
    ALL_KINDS,
    Batches,
    Criterion,
    Scores,
    device_of,
    eval_mode,
    logits_of,
    need_batches,
    teacher_log_probs,
)

__all__ = ["kl_scores", "CRITERION"]


@torch.no_grad()
def kl_scores(model: nn.Module, structure: Structure, groups: list[str], *, batches: Batches | None = None,
              teacher: nn.Module | None = None, max_rows: int = 512, **unused: Any) -> Scores:
    """UP-ViTs importance: ``KL(teacher || model with only this unit removed)`` on a proxy set.

    Yu & Wu 2021, "A Unified Pruning Framework for Vision Transformers" (arXiv 2111.15127): each unit
    is removed on its own and scored by how much the prediction distribution moves,
    ``mean over images of sum_c p_t(c) (log p_t(c) - log p_{-u}(c))``. ``teacher`` defaults to the
    unmasked model itself. Removal is simulated exactly with per-replica hard masks
    (:func:`vitopt.arch.hooks.attach_replica_masks`; for ``embed`` LayerNorm statistics are taken over
    the kept channels; a block, kind ``blocks``, has both residual branches zeroed, i.e. the model
    without that block), equal to physical surgery up to float error: each batch of B images is
    replicated R = max(1, max_rows // B) times and each replica removes a different unit (units of all
    requested groups are packed together), so one forward scores R units.

    Cost per batch: 1 teacher forward + ceil(U / R) model forwards of R*B rows (U = units in
    ``groups``); returned in :attr:`Scores.cost` and logged. Keep batches small (e.g. the whole
    5-images-per-class proxy set split into batches of <= max_rows) and lower ``max_rows`` to bound
    activation memory.

    Args:
        model: the model ``structure`` was built from; run in eval mode, left unchanged.
        structure: its :class:`Structure`.
        groups: group names to score.
        unused: ``gates`` (ignored).
        batches: non-empty list of ``(images [B, C, H, W], labels)``; labels are unused.
        teacher: reference model with the same classes; default the model itself, unmasked.
        max_rows: bound on rows (R*B) per forward pass.

    Returns:
        group -> float64 CPU tensor [group size], KL in nats per image (>= 0 up to float error).

    Raises:
        VitoptError: ``batches`` is None or empty; ``max_rows < 1``; teacher logits of another shape.
    """
    need_batches("kl", batches)
    if max_rows < 1:
        raise VitoptError(f"criterion 'kl': max_rows must be >= 1, got {max_rows}.")
    start = time.perf_counter()
    units = [(g, u) for g in groups for u in range(structure.groups[g].size)]
    total = {g: torch.zeros(structure.groups[g].size, dtype=torch.float64) for g in groups}
    dev = device_of(model)
    forwards = rows = images = max_r = 0
    with eval_mode(model, teacher):
        for x, _ in batches:
            x = x.to(dev)
            B = x.shape[0]
            if teacher is None:
                logp_t = F.log_softmax(logits_of(model(x)).double(), -1)
            else:
                logp_t = teacher_log_probs(teacher, x, None, "kl").to(dev)
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
                    out = logits_of(model(x.repeat(r, *([1] * (x.dim() - 1)))))
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
    cost = {"forward_passes": forwards, "backward_passes": 0, "teacher_forward_passes": len(batches), "rows": rows,
            "images": images, "units": len(units), "max_replicas": max_r, "seconds": time.perf_counter() - start}
    return Scores({g: t / images for g, t in total.items()}, criterion="kl", cost=cost)


#: registry entry
CRITERION = Criterion("kl", kl_scores, needs=frozenset({"data"}), uses=frozenset({"teacher"}),
                      options={"max_rows": 512}, calibration="per_class",
                      description="UP-ViTs: KL(teacher || model without the unit) on a proxy set",
                      source="Yu & Wu 2021, arXiv 2111.15127",
                      kinds=ALL_KINDS)
