"""Calibration data for data-driven criteria, drawn from a training set the same way everywhere.

The ``prune`` stage and user scripts call :func:`calibration_batches`: ``batches`` shuffled training
batches for ``taylor``, ``hessian`` and ``search``; for ``kl``, UP-ViTs' proxy set of ``per_class``
images per class (Yu & Wu 2021, arXiv 2111.15127: a few images per class suffice to rank units).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from vitopt.errors import VitoptError
from vitopt.pruning.criteria import get_criterion
from vitopt.pruning.criteria.base import Batches
from vitopt.train.data import make_loader

__all__ = ["calibration_batches", "dataset_labels", "per_class_subset"]


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """int64 ``[N]`` labels of a map-style dataset (``TensorDataset``, ``ImageFolder``-like ``targets``,
    or by reading every item)."""
    if hasattr(dataset, "tensors"):
        return torch.as_tensor(dataset.tensors[1]).long()
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets).long()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])


def per_class_subset(dataset: Dataset, per_class: int, seed: int) -> Subset:
    """A seeded random draw of ``per_class`` items of every class (fewer where a class has fewer).

    Raises:
        VitoptError: ``per_class`` < 1 or an empty dataset.
    """
    if per_class < 1 or len(dataset) == 0:
        raise VitoptError(f"a proxy set needs per_class >= 1 and a non-empty dataset; got per_class={per_class}, "
                          f"{len(dataset)} items.")
    labels = dataset_labels(dataset)
    g = torch.Generator().manual_seed(int(seed))
    idx = [(labels == c).nonzero().squeeze(1)[torch.randperm(int((labels == c).sum()), generator=g)[:per_class]]
           for c in labels.unique()]
    return Subset(dataset, torch.cat(idx).tolist())


def calibration_batches(dataset: Dataset, criterion: str, *, batches: int = 8, batch_size: int = 64,
                        per_class: int = 5, seed: int = 0, num_workers: int = 0, always: bool = False) -> Batches | None:
    """The calibration batches ``criterion`` needs from ``dataset``, or None when it needs no data.

    Args:
        dataset: the training set (items ``(image [C, H, W], label)``, model-ready).
        criterion: a registered criterion name.
        batches: shuffled batches for criteria that calibrate on batches (>= 1).
        batch_size: images per batch.
        per_class: proxy images per class for criteria that calibrate per class (``kl``).
        seed: seed of the draw.
        num_workers: DataLoader worker processes.
        always: draw batches even for a criterion that needs no data (e.g. for
            ``compare="calibrated"``, which measures losses).

    Returns:
        a list of ``(images [B, C, H, W], labels [B])``, or None when the criterion needs no data and
        ``always`` is false.

    Raises:
        VitoptError: an unknown criterion, or bad counts.
    """
    crit = get_criterion(criterion)
    if "data" not in crit.needs and not always:
        return None
    if batches < 1 or batch_size < 1:
        raise VitoptError(f"calibration needs batches >= 1 and batch_size >= 1; got {batches}, {batch_size}.")
    if crit.calibration == "per_class":
        return list(make_loader(per_class_subset(dataset, per_class, seed), batch_size, shuffle=False, seed=seed))
    out = []
    for batch in make_loader(dataset, batch_size, shuffle=True, seed=seed, num_workers=num_workers):
        out.append(batch)
        if len(out) == batches:
            break
    return out
