"""The ``tensorrt`` runtime: run a serialized engine with the TensorRT Python API.

Follows the TensorRT developer guide ("Performing inference" with the name-based I/O API of 8.5+):
deserialize with ``Runtime.deserialize_cuda_engine`` (``engine_host_code_allowed`` set, so the
version-compatible engines of ``build --version-compatible`` load - "Version Compatibility"),
``create_execution_context``, then per call ``set_input_shape`` (its False return is an error: a
batch outside the optimization profile) -> ``set_tensor_address`` -> ``execute_async_v3`` on the
runtime's own CUDA stream (its False return is an error, never uninitialised logits).

The I/O buffers are allocated once for the profile's largest batch: device buffers plus pinned host
staging buffers, so a call is one asynchronous host-to-device copy, the engine, and one
device-to-host copy on one stream. :meth:`TrtRuntime.stage_input`, :meth:`TrtRuntime.launch` and
:meth:`TrtRuntime.event` let :func:`vitopt.deploy.latency.measure_device_latency` time the engine
alone with CUDA events recorded on that stream and the host-to-device copy separately (CUDA C++ best
practices guide, "Using CUDA GPU Timers"; TensorRT best practices, "CUDA Events"). The device is made
current (``torch.cuda.device``) around everything that touches it, so ``device != 0`` works.

Device memory comes from a small backend (:class:`TorchCudaMemory`: torch CUDA tensors, torch being
a core dependency, so no pycuda is needed); tests pass a NumPy stand-in with the same methods.
``tensorrt`` is imported lazily; a missing package is one sentence naming the extra.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from vitopt.deploy.runtimes.base import RuntimeSpec, no_extra_options
from vitopt.deploy.tensorrt_build import require_tensorrt
from vitopt.errors import VitoptError

__all__ = ["TrtRuntime", "TorchCudaMemory", "TENSORRT", "load_engine", "profile_batches"]


class TorchCudaMemory:
    """Device buffers, pinned host buffers, one stream and CUDA events on CUDA device ``index`` (torch).

    Methods used by :class:`TrtRuntime`: :meth:`activate` (the device as the current one),
    :meth:`device_buffer`, :meth:`host_buffer`, :meth:`h2d`, :meth:`d2h`, :meth:`event`,
    :meth:`synchronize` and the attribute :attr:`stream_handle`.

    Raises:
        VitoptError: no CUDA device, or ``index`` out of range.
    """

    def __init__(self, index: int = 0) -> None:
        import torch

        if not torch.cuda.is_available():
            raise VitoptError("the tensorrt runtime needs a CUDA device; none is visible.")
        if not 0 <= int(index) < torch.cuda.device_count():
            raise VitoptError(f"CUDA device {index} does not exist; this machine has {torch.cuda.device_count()}.")
        self._torch = torch
        self.index = int(index)
        self.device = torch.device("cuda", self.index)
        with self.activate():
            self.stream = torch.cuda.Stream(self.device)
        self.stream_handle = int(self.stream.cuda_stream)
        self._keep: list[Any] = []

    def activate(self):
        """A context in which this device is the current CUDA device."""
        return self._torch.cuda.device(self.index)

    def _dtype(self, np_dtype: np.dtype):
        return self._torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype

    def device_buffer(self, shape: tuple[int, ...], np_dtype: np.dtype) -> Any:
        """A device tensor; ``int(buf.data_ptr())`` is the address given to TensorRT."""
        buf = self._torch.empty(shape, dtype=self._dtype(np_dtype), device=self.device)
        self._keep.append(buf)
        return buf

    def host_buffer(self, shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
        """A pinned (page-locked) host array, so copies are truly asynchronous (CUDA best practices)."""
        t = self._torch.empty(shape, dtype=self._dtype(np_dtype), pin_memory=True)
        self._keep.append(t)
        return t.numpy()

    @staticmethod
    def address(buf: Any) -> int:
        return int(buf.data_ptr())

    def h2d(self, dst: Any, src: np.ndarray, rows: int) -> None:
        """Copy the first ``rows`` rows of pinned ``src`` into device ``dst``, asynchronously on the stream."""
        with self._torch.cuda.stream(self.stream):
            dst[:rows].copy_(self._torch.from_numpy(src[:rows]), non_blocking=True)

    def d2h(self, dst: np.ndarray, src: Any, rows: int) -> None:
        """Copy the first ``rows`` rows of device ``src`` into pinned ``dst``, asynchronously on the stream."""
        with self._torch.cuda.stream(self.stream):
            self._torch.from_numpy(dst[:rows]).copy_(src[:rows], non_blocking=True)

    def event(self) -> Any:
        """A timing event recorded on the stream: ``.record()``, ``.synchronize()``, ``.elapsed_ms(end)``."""
        torch, stream = self._torch, self.stream

        class _Event:
            def __init__(self) -> None:
                self.e = torch.cuda.Event(enable_timing=True)

            def record(self) -> None:
                self.e.record(stream)

            def synchronize(self) -> None:
                self.e.synchronize()

            def elapsed_ms(self, end: _Event) -> float:
                return float(self.e.elapsed_time(end.e))

        return _Event()

    def synchronize(self) -> None:
        """Wait for everything queued on the stream."""
        self.stream.synchronize()


def load_engine(trt: Any, blob: bytes, logger: Any = None) -> tuple[Any, Any]:
    """Deserialize ``blob``; returns ``(runtime, engine)`` (engine None when TensorRT refuses it).

    ``IRuntime.engine_host_code_allowed`` is set first: version-compatible engines carry the lean
    runtime as host code and do not load without it (TensorRT developer guide, "Version
    Compatibility"). The runtime must outlive the engine, so it is returned too.
    """
    runtime = trt.Runtime(logger if logger is not None else trt.Logger(trt.Logger.WARNING))
    runtime.engine_host_code_allowed = True
    return runtime, runtime.deserialize_cuda_engine(blob)


def profile_batches(engine: Any, name: str, profile_index: int = 0) -> tuple[int, int, int]:
    """``(min, opt, max)`` batch of input ``name`` in optimization profile ``profile_index``.

    Reads ``ICudaEngine.get_tensor_profile_shape`` (min/opt/max dims); an engine built from a
    fixed-batch ONNX has a static batch ``b`` and gives ``(b, b, b)``.
    """
    static = tuple(engine.get_tensor_shape(name))
    if static and int(static[0]) > 0:
        b = int(static[0])
        return b, b, b
    shapes = engine.get_tensor_profile_shape(name, profile_index)
    mn, opt, mx = (int(tuple(s)[0]) for s in shapes)
    return mn, opt, mx


class TrtRuntime:
    """Run a TensorRT engine (one image input ``[B, C, H, W]``, logits as first output).

    Args:
        engine_path: a serialized engine (``.engine`` / ``.plan``) built for this GPU and TensorRT.
        device: CUDA device index (made current for every TensorRT call).
        memory: the device-memory backend; default :class:`TorchCudaMemory` on ``device``.

    Attributes:
        profile: ``(min, opt, max)`` batch of the engine's optimization profile 0.
        max_batch: ``profile[2]``: larger batches are refused (validation caps its batches there).

    Calling: float32 ``[B, C, H, W]`` ndarray -> float32 ``[B, classes]`` ndarray (inputs cast to
    the engine's input dtype in the pinned staging buffer), synchronised.

    Raises:
        VitoptError: a missing file, TensorRT not installed, no CUDA device, an engine that does not
            deserialize, a batch outside the optimization profile (``set_input_shape`` returned
            False), or ``execute_async_v3`` returning False.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, device: int = 0, memory: Any = None) -> None:
        path = Path(engine_path)
        if not path.is_file():
            raise VitoptError(f"TensorRT engine {path} does not exist; build one with `vitopt build`.")
        if path.suffix == ".ep":
            raise VitoptError(f"{path} is a Torch-TensorRT program, not a TensorRT engine; validate it with runtime "
                              "'torch-tensorrt'.")
        trt = require_tensorrt()
        self.memory = memory if memory is not None else TorchCudaMemory(device)
        self.path = path
        self._logger = trt.Logger(trt.Logger.WARNING)
        with self.memory.activate():
            self._runtime, self.engine = load_engine(trt, path.read_bytes(), self._logger)
            if self.engine is None:
                raise VitoptError(f"TensorRT could not deserialize {path}; engines only load on the TensorRT version "
                                  "and GPU they were built for (rebuild it here).")
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise VitoptError(f"TensorRT could not create an execution context for {path} (out of device memory?).")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if len(self.inputs) != 1 or not self.outputs:
            raise VitoptError(f"{path} has inputs {self.inputs} and outputs {self.outputs}; the tensorrt runtime runs "
                              "engines with one image input and logits as first output.")
        self._np = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        inp = self.inputs[0]
        self.profile = profile_batches(self.engine, inp)
        self.max_batch = self.profile[2]
        self.chw = tuple(int(d) for d in tuple(self.engine.get_tensor_shape(inp))[1:])
        self._set_shape(self.max_batch)
        self._dev: dict[str, Any] = {}
        self._host: dict[str, np.ndarray] = {}
        with self.memory.activate():
            for n in names:
                shape = (self.max_batch, *self.chw) if n == inp else tuple(int(d) for d in
                                                                           self.context.get_tensor_shape(n))
                self._dev[n] = self.memory.device_buffer(shape, self._np[n])
                self._host[n] = self.memory.host_buffer(shape, self._np[n])
                self.context.set_tensor_address(n, self.memory.address(self._dev[n]))
        self._rows = 0

    # ------------------------------------------------------------------ the three steps of a call
    def _set_shape(self, batch: int) -> None:
        if not self.context.set_input_shape(self.inputs[0], (batch, *self.chw)):
            raise VitoptError(f"TensorRT refused batch {batch} for {self.path}: its optimization profile takes batches "
                              f"{self.profile[0]}..{self.profile[2]}.")

    def stage_input(self, x: np.ndarray) -> None:
        """Set the batch shape and queue the host-to-device copy of ``x`` on the runtime's stream.

        Raises:
            VitoptError: closed, not ``[B, C, H, W]`` with the engine's C, H, W, or ``B`` outside the
                optimization profile.
        """
        if self.context is None:
            raise VitoptError("this tensorrt runtime was closed; make a new one.")
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.chw:
            raise VitoptError(f"the tensorrt runtime expects a batch of shape [B, {', '.join(map(str, self.chw))}]; "
                              f"got {x.shape}.")
        b = int(x.shape[0])
        if not self.profile[0] <= b <= self.profile[2]:
            raise VitoptError(f"batch {b} is outside the optimization profile of {self.path} (batches "
                              f"{self.profile[0]}..{self.profile[2]}); use smaller batches or rebuild with a larger "
                              "profile.")
        if b != self._rows:
            self._set_shape(b)
            self._rows = b
        name = self.inputs[0]
        self._host[name][:b] = x
        with self.memory.activate():
            self.memory.h2d(self._dev[name], self._host[name], b)

    def launch(self) -> None:
        """Queue the engine on the runtime's stream (``execute_async_v3``).

        Raises:
            VitoptError: ``execute_async_v3`` returned False (the outputs would be uninitialised memory).
        """
        with self.memory.activate():
            ok = self.context.execute_async_v3(self.memory.stream_handle)
        if not ok:
            raise VitoptError(f"TensorRT's execute_async_v3 failed for {self.path} (batch {self._rows}); see the TensorRT "
                              "log above.")

    def fetch_output(self) -> np.ndarray:
        """Copy the logits back, wait for the stream and return them as float32 ``[B, classes]``."""
        out = self.outputs[0]
        with self.memory.activate():
            self.memory.d2h(self._host[out], self._dev[out], self._rows)
            self.memory.synchronize()
        return np.array(self._host[out][:self._rows], dtype=np.float32)

    def event(self) -> Any:
        """A CUDA event on the runtime's stream (for :func:`vitopt.deploy.latency.measure_device_latency`)."""
        return self.memory.event()

    def sync(self) -> None:
        """Wait for the engine's CUDA stream."""
        with self.memory.activate():
            self.memory.synchronize()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.stage_input(x)
        self.launch()
        return self.fetch_output()

    def close(self) -> None:
        """Release the execution context and engine."""
        with contextlib.suppress(Exception):
            self.sync()
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
