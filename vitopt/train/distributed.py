"""torch.distributed helpers: process-group setup from torchrun, rank queries, reductions, rank checks.

``torchrun --nproc_per_node N -m vitopt run RECIPE`` starts N processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_from_env`
turns that into a process group (gloo on CPU, nccl on CUDA). Every rank runs the whole pipeline
(the same seed gives the same model and data everywhere); :func:`~vitopt.train.loop.fit` wraps the
model in ``DistributedDataParallel`` and the loaders shard each global batch across ranks. Only rank 0
writes files and prints (:func:`is_main`; :mod:`vitopt.io` writes nothing on other ranks).

Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op and a single process runs.

Sources: PyTorch docs "torchrun (Elastic Launch)", "Getting Started with Distributed Data Parallel",
``torch.distributed`` (``init_process_group``, ``all_reduce``, ``all_gather``, ``barrier``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

from vitopt.errors import VitoptError

__all__ = ["is_distributed", "world_size", "rank", "is_main", "barrier", "init_from_env", "shutdown",
           "all_reduce_sum", "fingerprint", "assert_same_across_ranks", "training_device"]


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files, logs and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def training_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env(timeout_minutes: float = 60.0) -> bool:
    """Join the process group torchrun describes in the environment; True when one was started here.

    Backend: nccl when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else gloo. Does nothing
    (returns False) when ``WORLD_SIZE`` is unset or 1, or a group already exists.

    Raises:
        VitoptError: ``WORLD_SIZE`` > 1 but ``RANK``/``MASTER_ADDR``/``MASTER_PORT`` are missing (the
            process was not started by torchrun).
    """
    ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if ws <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise VitoptError(f"WORLD_SIZE is {ws} but {', '.join(missing)} is not set; start distributed runs with "
                          "`torchrun --nproc_per_node N -m vitopt run RECIPE`.")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(training_device())
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def shutdown() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Iterable[float]) -> list[float]:
    """Sum each number over ranks (float64; on the current CUDA device under nccl); unchanged in one process."""
    vals = [float(v) for v in values]
    if not is_distributed():
        return vals
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def fingerprint(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers per tensor: its sum and a position-weighted sum (shape [2 * n_tensors]).

    Equal tensors give bitwise-equal fingerprints; a change of any single element changes them
    (up to float64 rounding of values below ~1e-16 relative).
    """
    out = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float64)
        w = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        out += [flat.sum(), (flat * w).sum() / max(1, flat.numel())]
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(out).cpu()


def assert_same_across_ranks(named: dict[str, torch.Tensor], what: str) -> None:
    """Raise RuntimeError unless every tensor in ``named`` is identical on every rank.

    Compares :func:`fingerprint` s gathered from all ranks (exact equality). Used at every epoch end of a
    distributed :func:`~vitopt.train.loop.fit` on the model parameters and the callbacks' state
    (gates, sparse-training masks), which DDP's all-reduced gradients must keep in lock-step.
    """
    if not is_distributed():
        return
    names = sorted(k for k, v in named.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                   or isinstance(v, torch.Tensor) and v.dtype in (torch.bool, torch.int64, torch.int32, torch.uint8))
    fp = fingerprint(named[k] for k in names)
    if dist.get_backend() == "nccl":
        fp = fp.cuda()
    gathered = [torch.empty_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fp)
    for r, other in enumerate(gathered):
        if not torch.equal(other.cpu(), gathered[0].cpu()):
            bad = (other.cpu() != gathered[0].cpu()).nonzero().reshape(-1).tolist()
            keys = sorted({names[i // 2] for i in bad})[:5]
            raise RuntimeError(f"{what} differ between rank 0 and rank {r} (first: {', '.join(keys)}); "
                               "distributed training lost lock-step.")
