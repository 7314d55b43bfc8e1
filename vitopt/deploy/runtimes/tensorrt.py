"""The ``tensorrt`` runtime: run a serialized engine with the TensorRT Python API.

Follows the TensorRT developer guide ("Performing inference" with the name-based I/O API of 8.5+):
deserialize with ``Runtime.deserialize_cuda_engine``, ``create_execution_context``, then per call
``set_input_shape`` -> ``set_tensor_address`` for every I/O tensor -> ``execute_async_v3`` on a CUDA
stream. Device buffers are torch CUDA tensors (torch is a core dependency), so no pycuda is needed.
``tensorrt`` is imported lazily; a missing package is one sentence naming the extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vitopt.deploy.runtimes.base import RuntimeSpec, no_extra_options
from vitopt.deploy.tensorrt_build import require_tensorrt
from vitopt.errors import VitoptError

__all__ = ["TrtRuntime", "TENSORRT"]


class TrtRuntime:
    """Run a TensorRT engine (one image input ``[B, C, H, W]``, logits as first output).

    Args:
        engine_path: a serialized engine (``.engine`` / ``.plan``) built for this GPU and TensorRT.
        device: CUDA device index.

    Calling: float32 ``[B, C, H, W]`` ndarray -> float32 ``[B, classes]`` ndarray (inputs cast to
    the engine's input dtype, e.g. fp16 for a strongly typed fp16 engine). Includes host<->device
    copies; :meth:`sync` waits for the stream.

    Raises:
        VitoptError: a missing file, TensorRT not installed, no CUDA device, an engine that does not
            deserialize, or a batch outside the engine's optimization profile.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, device: int = 0) -> None:
        path = Path(engine_path)
        if not path.is_file():
            raise VitoptError(f"TensorRT engine {path} does not exist; build one with `vitopt build`.")
        trt = require_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise VitoptError("the tensorrt runtime needs a CUDA device; none is visible.")
        self._torch = torch
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise VitoptError(f"TensorRT could not deserialize {path}; engines only load on the TensorRT version "
                              "and GPU they were built for (rebuild it here).")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self._dtype = {n: torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                       for n in names}
        self.stream = torch.cuda.Stream(self.device)
        self.path = path

    def sync(self) -> None:
        """Wait for the engine's CUDA stream."""
        self.stream.synchronize()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.context is None:
            raise VitoptError("this tensorrt runtime was closed; make a new one.")
        torch = self._torch
        x = np.asarray(x)
        if x.ndim != 4:
            raise VitoptError(f"the tensorrt runtime expects a batch of shape [B, C, H, W]; got {x.shape}.")
        name = self.inputs[0]
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, self._dtype[name])
        if not self.context.set_input_shape(name, tuple(xt.shape)):
            raise VitoptError(f"batch {x.shape[0]} is outside the engine's optimization profile ({self.path}).")
        self.context.set_tensor_address(name, xt.data_ptr())
        outs = {}
        for out in self.outputs:
            t = torch.empty(tuple(self.context.get_tensor_shape(out)), dtype=self._dtype[out], device=self.device)
            self.context.set_tensor_address(out, t.data_ptr())
            outs[out] = t
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return outs[self.outputs[0]].float().cpu().numpy()

    def close(self) -> None:
        """Release the execution context and engine."""
        self.context = None
        self.engine = None


def _make_trt(*, engine_path: Any = None, device: int = 0, model: Any = None, onnx_path: Any = None,
              threads: int = 2, **options: Any) -> TrtRuntime:
    if engine_path is None:
        raise VitoptError("runtime 'tensorrt' needs an engine file (make_runtime('tensorrt', engine_path=...); "
                          "build one with `vitopt build` or a build stage).")
    no_extra_options("tensorrt", options)
    return TrtRuntime(engine_path, device=device)


#: A serialized TensorRT engine (option ``device``: CUDA device index).
TENSORRT = RuntimeSpec("tensorrt", "engine", True, _make_trt, "TensorRT engine (needs the tensorrt package)")
