"""The ``pytorch`` and ``pytorch-compile`` runtimes: an ``nn.Module`` eagerly or through ``torch.compile``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vitopt.deploy.runtimes.base import Runtime, RuntimeSpec, as_batch, no_extra_options
from vitopt.errors import VitoptError

__all__ = ["TorchRuntime", "PYTORCH", "PYTORCH_COMPILE"]

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime:
    """Run an ``nn.Module`` in eval mode under ``torch.no_grad()``, eagerly or through ``torch.compile``.

    Args:
        model: the classifier; it returns logits ``[B, classes]`` in eval mode. It is moved to
            ``device`` (``nn.Module.to`` is in place) and switched to eval mode; :meth:`close`
            restores each submodule's ``training`` flag.
        device: torch device for the model and inputs (``"cpu"``, ``"cuda:0"``).
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"``: the model's parameters and the input are cast to it
            (restored by :meth:`close`); fp16 is meant for CUDA.
        compile: wrap the model in ``torch.compile`` (PyTorch docs, "torch.compile"); the first
            calls compile (count them as warm-up). The runtime's name becomes ``"pytorch-compile"``.
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` for tests).
        threads: if given, ``torch.set_num_threads(threads)`` while the runtime is open; the previous
            value is restored by :meth:`close` (PyTorch docs, "CPU threading and TorchScript
            inference"). Set once, not per call: re-sizing the intra-op pool costs far more than a
            small model's forward pass.

    Calling: float32 ``[B, C, H, W]`` ndarray -> float32 ``[B, classes]`` ndarray.

    Raises:
        VitoptError: ``threads`` < 1, an unknown dtype, a CUDA device without CUDA, a bad input
            array, a model output that is not one tensor, or a call after :meth:`close`.
    """

    name = "pytorch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", threads: int | None = None,
                 dtype: str = "fp32", compile: bool = False, compile_backend: str = "inductor") -> None:
        if not isinstance(model, nn.Module):
            raise VitoptError(f"the pytorch runtime needs an nn.Module; got {type(model).__name__}.")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise VitoptError(f"threads must be a positive integer or None; got {threads!r}.")
        if dtype not in _TORCH_DTYPES:
            raise VitoptError(f"pytorch runtime dtype {dtype!r} is not supported; allowed: {', '.join(_TORCH_DTYPES)}.")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise VitoptError(f"device {device!r} was asked for but no CUDA device is visible; use device 'cpu'.")
        self.threads = threads
        self.dtype = _TORCH_DTYPES[dtype]
        self._saved_training = [(m, m.training) for m in model.modules()]
        self._saved_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        self._saved_threads = torch.get_num_threads()
        if threads is not None and threads != self._saved_threads:
            torch.set_num_threads(threads)
        self.model: nn.Module | None = model.to(self.device, self.dtype).eval()
        self._forward = torch.compile(self.model, backend=compile_backend) if compile else self.model
        if compile:
            self.name = "pytorch-compile"

    def sync(self) -> None:
        """Wait for queued device work (CUDA); a no-op on CPU. Pass as ``measure_latency(sync=...)``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise VitoptError("this pytorch runtime was closed; make a new one.")
        x = as_batch(x, "the pytorch runtime")
        with torch.no_grad():
            out = self._forward(torch.from_numpy(x).to(self.device, self.dtype))
        if not isinstance(out, torch.Tensor):
            raise VitoptError(f"{type(self.model).__name__} returned {type(out).__name__} in eval mode; the pytorch "
                              "runtime needs one logits tensor [B, classes].")
        return out.detach().float().cpu().numpy()

    def close(self) -> None:
        """Restore the model's training flags and the thread count, and drop the reference to the model."""
        if self.model is None:
            return
        if torch.get_num_threads() != self._saved_threads:
            torch.set_num_threads(self._saved_threads)
        for m, training in self._saved_training:
            m.training = training
        if self.dtype != self._saved_dtype:
            self.model.to(self._saved_dtype)
        self._saved_training = []
        self.model = None
        self._forward = None


def _make_torch(*, model: nn.Module | None = None, threads: int | None = 2, device: str | torch.device = "cpu",
                dtype: str = "fp32", onnx_path: Any = None, engine_path: Any = None, **options: Any) -> Runtime:
    if model is None:
        raise VitoptError("runtime 'pytorch' needs a model (make_runtime('pytorch', model=...)).")
    no_extra_options("pytorch", options)
    return TorchRuntime(model, device=device, threads=threads, dtype=dtype)


def _make_torch_compile(*, model: nn.Module | None = None, threads: int | None = 2,
                        device: str | torch.device = "cpu", dtype: str = "fp32", compile_backend: str = "inductor",
                        onnx_path: Any = None, engine_path: Any = None, **options: Any) -> Runtime:
    if model is None:
        raise VitoptError("runtime 'pytorch-compile' needs a model (make_runtime('pytorch-compile', model=...)).")
    no_extra_options("pytorch-compile", options)
    return TorchRuntime(model, device=device, threads=threads, dtype=dtype, compile=True,
                        compile_backend=compile_backend)


#: PyTorch eager (options ``device``, ``dtype``).
PYTORCH = RuntimeSpec("pytorch", "model", False, _make_torch, "PyTorch eager (CPU or CUDA)")
#: ``torch.compile`` (options ``device``, ``dtype``, ``compile_backend``).
PYTORCH_COMPILE = RuntimeSpec("pytorch-compile", "model", False, _make_torch_compile,
                              "PyTorch torch.compile (CPU or CUDA)")
