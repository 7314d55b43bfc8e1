"""2:4 semi-structured sparsity for NVIDIA Sparse Tensor Cores (Ampere and later).

Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (arXiv 2104.08378) and NVIDIA's
ASP recipe: in every group of 4 consecutive weights along a Linear's input (reduction) dimension keep
the 2 of largest magnitude, then fine-tune with that mask fixed. TensorRT builds sparse kernels for
such weights when the builder's ``SPARSE_WEIGHTS`` flag is set (``trtexec --sparsity=enable``;
TensorRT developer guide, "Structured Sparsity"); PyTorch runs them with
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS, CUDA only).

* :func:`mask_24` / :func:`semi24_masks`: the magnitude 2:4 masks of a weight / of every Linear of the
  transformer blocks;
* :class:`Semi24`: a :class:`~vitopt.train.callbacks.Callback` keeping those masks fixed on weights,
  gradients and AdamW state while fine-tuning;
* :func:`onnx_24_fraction`: how much of an ONNX model's MatMul/Gemm weight is 2:4, so a TensorRT build
  can decide whether to enable its sparsity flag;
* :func:`check_semi_structured`: on CUDA, compare ``to_sparse_semi_structured`` against the dense
  masked weight and time both.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitopt.errors import VitoptError
from vitopt.sparsity.masked import WeightMasks, block_linears
from vitopt.train.callbacks import Callback

__all__ = ["mask_24", "is_24", "semi24_masks", "Semi24", "onnx_24_fraction", "check_semi_structured"]


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Bool 2:4 mask of a Linear weight ``[out_features, in_features]``: the 2 largest |w| of every 4 inputs.

    Raises:
        VitoptError: the weight is not 2-D or ``in_features`` is not a multiple of 4.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise VitoptError(f"a 2:4 mask needs a 2-D weight whose input dim is a multiple of 4; "
                          f"got shape {tuple(weight.shape)}.")
    groups = weight.detach().abs().reshape(weight.shape[0], -1, 4)
    idx = torch.topk(groups, 2, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(weight.shape)


def is_24(weight: torch.Tensor, axis: int = -1) -> bool:
    """True when every group of 4 consecutive entries along ``axis`` has at most 2 non-zeros."""
    w = weight.movedim(axis, -1)
    if w.shape[-1] % 4:
        return False
    nz = (w != 0).reshape(*w.shape[:-1], -1, 4).sum(-1)
    return bool(torch.all(nz <= 2))


LAYERS = ("qkv", "proj", "fc1", "fc2")


def semi24_masks(model: nn.Module, layers: tuple[str, ...] = LAYERS) -> dict[str, torch.Tensor]:
    """``{param name: 2:4 mask}`` for the block Linears named in ``layers`` (default qkv, proj, fc1, fc2).

    Raises:
        VitoptError: a selected block Linear's input dim is not a multiple of 4 (names it).
    """
    out = {}
    for name, lin in block_linears(model).items():
        if name.rsplit(".", 1)[-1] not in layers:
            continue
        if lin.in_features % 4:
            raise VitoptError(f"{name} has in_features={lin.in_features}, not a multiple of 4; 2:4 sparsity "
                              "needs multiples of 4 (prune with round_to a multiple of 4 first).")
        out[f"{name}.weight"] = mask_24(lin.weight)
    return out


class Semi24(Callback):
    """Fine-tune with fixed 2:4 masks on every block Linear (weights, gradients and AdamW moments).

    Args:
        model: the ViT; the masks are computed once, from its current weight magnitudes.
        layers: which block Linears (``qkv``, ``proj``, ``fc1``, ``fc2``) become 2:4.

    ``state_dict`` holds the masks (``mask/<param>``), so a resumed run keeps the same pattern.
    """

    def __init__(self, model: nn.Module, layers: tuple[str, ...] = LAYERS) -> None:
        masks = semi24_masks(model, layers)
        self.masks = WeightMasks({n: model.get_parameter(n) for n in masks}, masks)
        self.masks.apply()
        self.optimizer = None

    def on_fit_start(self, model, optimizer, total_steps) -> None:
        """Apply the masks to the weights and the optimizer state."""
        super().on_fit_start(model, optimizer, total_steps)
        self.masks.apply(optimizer)

    def after_backward(self, step: int) -> None:
        """Zero the gradients of pruned weights (so AdamW keeps them at exactly zero)."""
        self.masks.mask_grads()

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Add ``density`` (0.5 for a complete 2:4 model) to the epoch record."""
        record["density"] = self.masks.density()["overall"]

    @torch.no_grad()
    def finish(self) -> dict[str, torch.Tensor]:
        """Zero the pruned weights once more; returns the 2:4 masks (parameter name -> bool, True = kept)."""
        self.masks.apply()
        return dict(self.masks.masks)

    def state_dict(self) -> dict[str, Any]:
        """``mask/<param>`` bool tensors."""
        return {f"mask/{n}": m for n, m in self.masks.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the masks and re-apply them."""
        self.masks.load_state_dict({k[len("mask/"):]: v for k, v in state.items() if k.startswith("mask/")})
        self.masks.apply(self.optimizer)


def onnx_24_fraction(path: str | Path) -> dict[str, Any]:
    """How much of an ONNX model's MatMul/Gemm weights follow the 2:4 pattern along the reduction dim.

    A weight is a 2-D initializer input of a ``MatMul`` (``B`` is ``[K, N]``: groups along axis 0) or
    ``Gemm`` (``transB=1``: ``[N, K]``, axis 1; else axis 0). TensorRT's sparse kernels need the 2:4
    pattern along K (TensorRT developer guide, "Structured Sparsity").

    Returns:
        ``{"weights": count, "sparse_24": count, "fraction": 2:4 elements / all weight elements,
        "tensors": {initializer name: bool}}``.

    Raises:
        VitoptError: the file is missing or not a readable ONNX model.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not path.is_file():
        raise VitoptError(f"ONNX model {path} does not exist.")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise VitoptError(f"cannot read ONNX model {path}: {str(exc).splitlines()[0] if str(exc) else exc}.") from exc
    inits = {i.name: i for i in model.graph.initializer}
    tensors: dict[str, bool] = {}
    sizes: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy())
        if w.dim() != 2:
            continue
        axis = 0
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 1 if trans_b else 0
        tensors[node.input[1]] = is_24(w, axis)
        sizes[node.input[1]] = w.numel()
    total = sum(sizes.values())
    sparse = sum(sizes[n] for n, ok in tensors.items() if ok)
    return {"weights": len(tensors), "sparse_24": sum(tensors.values()),
            "fraction": sparse / total if total else 0.0, "tensors": tensors}


def check_semi_structured(weight: torch.Tensor, *, tokens: int = 4096, repeats: int = 50,
                          device: str = "cuda") -> dict[str, Any]:
    """Compare ``torch.sparse.to_sparse_semi_structured`` with the dense 2:4-masked weight, and time both.

    The weight is masked with :func:`mask_24`, cast to fp16 on ``device``, compressed with
    ``to_sparse_semi_structured``; ``F.linear(x, W)`` with ``x`` of ``[tokens, in_features]`` is
    timed (median of ``repeats`` CUDA-event-timed calls after warm-up) for the dense and sparse weight.

    Returns:
        ``{"max_abs_weight_diff": float (to_dense vs dense), "max_abs_out_diff": float,
        "dense_ms": float, "sparse_ms": float, "speedup": dense/sparse, "shape": [out, in]}``.

    Raises:
        VitoptError: CUDA is not available (the caller skips), or PyTorch rejects the shape/GPU.
    """
    import statistics

    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise VitoptError("2:4 semi-structured kernels need a CUDA GPU (compute capability >= 8.0); none is available.")
    from torch.sparse import to_sparse_semi_structured

    w = (weight.detach() * mask_24(weight)).to(device=device, dtype=torch.float16)
    try:
        ws = to_sparse_semi_structured(w)
    except Exception as exc:
        raise VitoptError(f"to_sparse_semi_structured rejected a weight of shape {tuple(w.shape)}: "
                          f"{str(exc).splitlines()[0]}") from exc
    x = torch.randn(tokens, w.shape[1], device=device, dtype=torch.float16)
    with torch.no_grad():
        dense_out, sparse_out = F.linear(x, w), F.linear(x, ws)

    def timed(fn) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            samples.append(a.elapsed_time(b))
        return statistics.median(samples)

    with torch.no_grad():
        dense_ms = timed(lambda: F.linear(x, w))
        sparse_ms = timed(lambda: F.linear(x, ws))
    return {"shape": list(w.shape), "tokens": tokens,
            "max_abs_weight_diff": (ws.to_dense() - w).abs().max().item(),
            "max_abs_out_diff": (dense_out - sparse_out).abs().max().item(),
            "max_abs_out": dense_out.abs().max().item(),
            "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
            "device": torch.cuda.get_device_name(0), "measured_at": time.time()}
