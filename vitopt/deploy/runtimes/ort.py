"""The ``onnxruntime`` and ``onnxruntime-cuda`` runtimes: an ONNX file in ONNX Runtime (CPU or CUDA EP)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vitopt.deploy.runtimes.base import Runtime, RuntimeSpec, as_batch, no_extra_options
from vitopt.errors import VitoptError

__all__ = ["OrtRuntime", "ONNXRUNTIME", "ONNXRUNTIME_CUDA"]


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
        x = as_batch(x, "the onnxruntime runtime")
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        """Drop the inference session (frees its memory and thread pool)."""
        self.session = None


def _make_ort(*, onnx_path: Any = None, threads: int = 2, providers: list[Any] | None = None, model: Any = None,
              engine_path: Any = None, **options: Any) -> Runtime:
    if onnx_path is None:
        raise VitoptError("runtime 'onnxruntime' needs an ONNX file (make_runtime('onnxruntime', onnx_path=...); "
                          "export one first).")
    no_extra_options("onnxruntime", options)
    return OrtRuntime(onnx_path, threads=threads, providers=providers)


def _make_ort_cuda(*, onnx_path: Any = None, threads: int = 2, model: Any = None, engine_path: Any = None,
                   **options: Any) -> Runtime:
    if onnx_path is None:
        raise VitoptError("runtime 'onnxruntime-cuda' needs an ONNX file (make_runtime('onnxruntime-cuda', "
                          "onnx_path=...); export one first).")
    no_extra_options("onnxruntime-cuda", options)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise VitoptError("runtime 'onnxruntime-cuda' needs onnxruntime's CUDAExecutionProvider, which this "
                          "onnxruntime lacks; replace it with `pip uninstall -y onnxruntime && pip install "
                          "onnxruntime-gpu`.")
    rt = OrtRuntime(onnx_path, threads=threads, providers=["CUDAExecutionProvider"])
    rt.name = "onnxruntime-cuda"
    return rt


#: ONNX Runtime, CPU execution provider by default (option ``providers``).
ONNXRUNTIME = RuntimeSpec("onnxruntime", "onnx", False, _make_ort, "ONNX Runtime (CPU EP)")
#: ONNX Runtime with the CUDA execution provider (needs onnxruntime-gpu).
ONNXRUNTIME_CUDA = RuntimeSpec("onnxruntime-cuda", "onnx", True, _make_ort_cuda, "ONNX Runtime CUDA EP")
