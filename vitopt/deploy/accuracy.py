"""Accuracy of any runtime on a labelled image set, and agreement between two runtimes' logits."""

from __future__ import annotations

from typing import Any

import numpy as np

from vitopt.deploy.runtimes.base import Runtime
from vitopt.errors import VitoptError

__all__ = ["evaluate_runtime", "compare_logits"]


def evaluate_runtime(runtime: Runtime, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> dict[str, Any]:
    """Top-1 accuracy of ``runtime`` on a labelled image set.

    Args:
        runtime: any :class:`Runtime`.
        images: float32 ``[N, C, H, W]``, already normalised as the model expects.
        labels: integer class indices ``[N]``.
        batch_size: images per call (the last batch may be smaller).

    Returns:
        ``{"top1": percent in [0, 100], "logits": float32 [N, classes], "num_images": N}``.

    Raises:
        VitoptError: mismatched/empty inputs, ``batch_size`` < 1, or a runtime output whose batch
            size differs from its input.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise VitoptError(f"images must have shape [N, C, H, W]; got {images.shape}.")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise VitoptError(f"labels must have shape [N] with N = {images.shape[0]} images; got {labels.shape}.")
    if images.shape[0] == 0:
        raise VitoptError("evaluate_runtime got no images; give at least one.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise VitoptError(f"batch_size must be a positive integer; got {batch_size!r}.")
    chunks = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        out = np.asarray(runtime(x))
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise VitoptError(f"runtime {getattr(runtime, 'name', runtime)!r} returned shape {out.shape} for a batch of "
                              f"{x.shape[0]}; expected [batch, classes].")
        chunks.append(out.astype(np.float32, copy=False))
    logits = np.concatenate(chunks, axis=0)
    top1 = 100.0 * float(np.mean(logits.argmax(axis=1) == labels))
    return {"top1": top1, "logits": logits, "num_images": int(images.shape[0])}


def compare_logits(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Agreement of two runtimes' logits for the same inputs (invariant 4 of docs/architecture.md).

    Args:
        a, b: float arrays ``[N, classes]`` of the same shape.

    Returns:
        ``{"max_abs_diff": max |a - b| (logit units), "argmax_agreement": fraction in [0, 1] of rows
        whose top-1 class is the same}``.

    Raises:
        VitoptError: the shapes differ or are not ``[N, classes]`` with N >= 1.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise VitoptError(f"compare_logits needs two [N, classes] arrays of the same shape; got {a.shape} and {b.shape}.")
    return {
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "argmax_agreement": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))),
    }
