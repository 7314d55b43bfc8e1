"""Runtimes: one interface for running an image classifier on a batch, whatever executes it.

A runtime takes a float32 NCHW batch as a NumPy array and returns float32 logits ``[B, classes]``
as a NumPy array, so accuracy (:func:`evaluate_runtime`) and latency
(:func:`vitopt.deploy.latency.measure_latency`) are measured the same way for PyTorch, onnxruntime
``torch.compile`` and TensorRT (:mod:`vitopt.deploy.tensorrt_runtime`, imported lazily). Registered
kinds: ``pytorch``, ``pytorch-compile``, ``onnxruntime``, ``onnxruntime-cuda``, ``tensorrt``. New
runtimes are added with :func:`register_runtime`::

    @register_runtime("my-runtime")
    def _make_mine(*, model=None, onnx_path=None, threads=2, **options) -> Runtime:
        from my_package import MyRuntime   # lazy: optional packages may be missing
        return MyRuntime(onnx_path, **options)

A GPU runtime should also expose ``sync()`` (e.g. ``torch.cuda.synchronize``) for
:func:`~vitopt.deploy.latency.measure_latency`'s ``sync`` hook.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from vitopt.errors import VitoptError

__all__ = ["Runtime", "TorchRuntime", "OrtRuntime", "make_runtime", "register_runtime", "known_runtimes",
           "evaluate_runtime", "compare_logits"]


@runtime_checkable
class Runtime(Protocol):
    """What every runtime provides.

    Attributes:
        name: the registry kind it was made as (``"pytorch"``, ``"onnxruntime"``, ...).

    ``__call__(x)``: ``x`` is a float32 array ``[B, C, H, W]``; returns float32 logits ``[B, classes]``.
    ``close()``: release sessions/threads settings; the runtime must not be called afterwards.
    """

    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def _as_batch(x: np.ndarray, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise VitoptError(f"{where} expects a batch of shape [B, C, H, W]; got an array of shape {x.shape}.")
    return np.ascontiguousarray(x, dtype=np.float32)


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
        x = _as_batch(x, "the pytorch runtime")
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


class OrtRuntime:
    """Run an ONNX file with onnxruntime.

    Session options follow the ORT performance docs
    (https://onnxruntime.ai/docs/performance/tune-performance/threading.html and
    https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html):
    ``intra_op_num_threads = threads``, ``inter_op_num_threads = 1``, sequential execution,
    ``graph_optimization_level = ORT_ENABLE_ALL``.

    Args:
        onnx_path: an ``.onnx`` file with one input ``[B, C, H, W]`` and logits as first output.
        threads: intra-op threads (>= 1).
        providers: ORT execution providers, in priority order; default ``["CPUExecutionProvider"]``.

    Calling: float32 ``[B, C, H, W]`` ndarray -> float32 ``[B, classes]`` ndarray.

    Raises:
        VitoptError: the file is missing or onnxruntime cannot load it, a provider that this
            onnxruntime build lacks, ``threads`` < 1, a bad input, or a call after :meth:`close`.
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, threads: int = 2, providers: list[Any] | None = None) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise VitoptError(f"ONNX file {path} does not exist.")
        if not isinstance(threads, int) or threads < 1:
            raise VitoptError(f"threads must be a positive integer; got {threads!r}.")
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        missing = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
        if missing:
            raise VitoptError(f"onnxruntime execution provider(s) {missing} are not available in this build; "
                              f"available: {', '.join(available)}.")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise VitoptError(f"onnxruntime cannot load ONNX file {path} ({first}).") from None
        self.path = path
        self.threads = threads
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise VitoptError("this onnxruntime runtime was closed; make a new one.")
        x = _as_batch(x, "the onnxruntime runtime")
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        """Drop the inference session (frees its memory and thread pool)."""
        self.session = None


# ------------------------------------------------------------------------------------ registry
RuntimeFactory = Callable[..., Runtime]
_REGISTRY: dict[str, RuntimeFactory] = {}


def register_runtime(kind: str) -> Callable[[RuntimeFactory], RuntimeFactory]:
    """Decorator: register ``factory(*, model, onnx_path, threads, **options) -> Runtime`` as ``kind``.

    The factory raises :class:`VitoptError` when an input it needs is missing (and, for optional
    backends like TensorRT, when the package is not installed, saying how to install it).
    """

    def deco(factory: RuntimeFactory) -> RuntimeFactory:
        _REGISTRY[kind] = factory
        return factory

    return deco


def known_runtimes() -> list[str]:
    """Registered runtime kinds, sorted."""
    return sorted(_REGISTRY)


@register_runtime("pytorch")
def _make_torch(*, model: nn.Module | None = None, onnx_path: Any = None, threads: int | None = 2,
                device: str | torch.device = "cpu", dtype: str = "fp32", **options: Any) -> Runtime:
    if model is None:
        raise VitoptError("runtime 'pytorch' needs a model (make_runtime('pytorch', model=...)).")
    _no_extra("pytorch", options)
    return TorchRuntime(model, device=device, threads=threads, dtype=dtype)


@register_runtime("pytorch-compile")
def _make_torch_compile(*, model: nn.Module | None = None, onnx_path: Any = None, threads: int | None = 2,
                        device: str | torch.device = "cpu", dtype: str = "fp32", compile_backend: str = "inductor",
                        **options: Any) -> Runtime:
    if model is None:
        raise VitoptError("runtime 'pytorch-compile' needs a model (make_runtime('pytorch-compile', model=...)).")
    _no_extra("pytorch-compile", options)
    return TorchRuntime(model, device=device, threads=threads, dtype=dtype, compile=True,
                        compile_backend=compile_backend)


@register_runtime("onnxruntime-cuda")
def _make_ort_cuda(*, model: nn.Module | None = None, onnx_path: Any = None, threads: int = 2, **options: Any) -> Runtime:
    if onnx_path is None:
        raise VitoptError("runtime 'onnxruntime-cuda' needs an ONNX file (make_runtime('onnxruntime-cuda', "
                          "onnx_path=...); export one first).")
    _no_extra("onnxruntime-cuda", options)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise VitoptError("runtime 'onnxruntime-cuda' needs onnxruntime's CUDAExecutionProvider, which this "
                          "onnxruntime lacks; replace it with `pip uninstall -y onnxruntime && pip install "
                          "onnxruntime-gpu`.")
    rt = OrtRuntime(onnx_path, threads=threads, providers=["CUDAExecutionProvider"])
    rt.name = "onnxruntime-cuda"
    return rt


@register_runtime("tensorrt")
def _make_trt(*, model: nn.Module | None = None, onnx_path: Any = None, threads: int = 2,
              engine_path: Any = None, device: int = 0, **options: Any) -> Runtime:
    if engine_path is None:
        raise VitoptError("runtime 'tensorrt' needs an engine file (make_runtime('tensorrt', engine_path=...); "
                          "build one with `vitopt build` or a build stage).")
    _no_extra("tensorrt", options)
    from vitopt.deploy.tensorrt_runtime import TrtRuntime  # lazy: tensorrt may be missing

    return TrtRuntime(engine_path, device=device)


@register_runtime("onnxruntime")
def _make_ort(*, model: nn.Module | None = None, onnx_path: Any = None, threads: int = 2,
              providers: list[Any] | None = None, **options: Any) -> Runtime:
    if onnx_path is None:
        raise VitoptError("runtime 'onnxruntime' needs an ONNX file (make_runtime('onnxruntime', onnx_path=...); "
                          "export one first).")
    _no_extra("onnxruntime", options)
    return OrtRuntime(onnx_path, threads=threads, providers=providers)


def _no_extra(kind: str, options: dict[str, Any]) -> None:
    if options:
        raise VitoptError(f"runtime {kind!r} does not take option(s) {', '.join(sorted(options))}.")


def make_runtime(kind: str, *, model: nn.Module | None = None, onnx_path: str | os.PathLike | None = None,
                 threads: int = 2, **options: Any) -> Runtime:
    """Build a registered runtime by kind.

    Args:
        kind: ``"pytorch"`` / ``"pytorch-compile"`` (need ``model``; options ``device``, ``dtype``,
            and ``compile_backend`` for the latter), ``"onnxruntime"`` (needs ``onnx_path``; option
            ``providers``), ``"onnxruntime-cuda"`` (ORT's CUDA execution provider) or ``"tensorrt"``
            (needs option ``engine_path``; option ``device``); more kinds via :func:`register_runtime`.
        model: the ``nn.Module`` for model-based runtimes.
        onnx_path: the ``.onnx`` file for ONNX-based runtimes.
        threads: CPU threads (intra-op) the runtime may use.
        options: kind-specific keyword options.

    Raises:
        VitoptError: an unknown kind (the message lists the known ones), or a missing/unknown input.
    """
    factory = _REGISTRY.get(kind)
    if factory is None:
        raise VitoptError(f"unknown runtime kind {kind!r}; known kinds: {', '.join(known_runtimes())}.")
    return factory(model=model, onnx_path=onnx_path, threads=threads, **options)


# ------------------------------------------------------------------------------------ accuracy
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
    """Agreement of two runtimes' logits for the same inputs (DESIGN.md invariant 4).

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
