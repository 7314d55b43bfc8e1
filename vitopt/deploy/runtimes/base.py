"""What every runtime is, and how a runtime kind is registered: :class:`Runtime` and :class:`RuntimeSpec`.

A runtime takes a float32 NCHW batch as a NumPy array and returns float32 logits ``[B, classes]``
as a NumPy array, so accuracy (:func:`vitopt.deploy.accuracy.evaluate_runtime`) and latency
(:func:`vitopt.deploy.latency.measure_latency`) are measured the same way for PyTorch, ONNX Runtime
and TensorRT. A :class:`RuntimeSpec` is the one registration of a runtime kind: its name, what
artifact it runs (a PyTorch model, an ONNX file, a TensorRT engine or a Torch-TensorRT program),
whether it runs on a GPU, and
the factory that builds it. Validation, the recipe schema and the CLI read these specs, so a new
runtime is one module with one spec plus one line in :data:`vitopt.deploy.runtimes.RUNTIMES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from vitopt.errors import VitoptError

__all__ = ["Runtime", "RuntimeSpec", "as_batch", "no_extra_options"]


@runtime_checkable
class Runtime(Protocol):
    """What every runtime provides.

    Attributes:
        name: the registry kind it was made as (``"pytorch"``, ``"onnxruntime"``, ...).

    ``__call__(x)``: ``x`` is a float32 array ``[B, C, H, W]``; returns float32 logits ``[B, classes]``.
    ``close()``: release sessions/threads settings; the runtime must not be called afterwards.

    Optional: ``max_batch`` (the largest batch it accepts, e.g. an engine's optimization-profile
    maximum; validation caps its batches there), ``sync()`` (wait for queued device work), and
    ``stage_input(x)`` / ``launch()`` / ``event()`` (device-resident timing of the compute alone,
    :func:`vitopt.deploy.latency.measure_device_latency`).
    """

    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def _as_batch(x: np.ndarray, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise VitoptError(f"{where} expects a batch of shape [B, C, H, W]; got an array of shape {x.shape}.")
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class RuntimeSpec:
    """One registered runtime kind.

    Attributes:
        name: the kind, as recipes and ``vitopt validate --runtime`` name it (``"onnxruntime"``).
        needs: the artifact it runs: ``"model"`` (an ``nn.Module``), ``"onnx"`` (an ``.onnx`` file),
            ``"engine"`` (a serialized TensorRT engine) or ``"program"`` (a Torch-TensorRT ``.ep``).
        gpu: True when it always runs on a CUDA device (latency is then timed with CUDA events).
        factory: ``factory(*, model, onnx_path, engine_path, threads, **options) -> Runtime`` (program
            runtimes also receive ``program_path``); raises
            :class:`VitoptError` when its artifact or an optional package is missing.
        description: one line for help texts.
    """

    name: str
    needs: Literal["model", "onnx", "engine", "program"]
    gpu: bool
    factory: Callable[..., Runtime]
    description: str = ""


def as_batch(x: np.ndarray, where: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[B, C, H, W]`` array.

    Raises:
        VitoptError: ``x`` is not 4-D (``where`` names the runtime).
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise VitoptError(f"{where} expects a batch of shape [B, C, H, W]; got an array of shape {x.shape}.")
    return np.ascontiguousarray(x, dtype=np.float32)


def no_extra_options(kind: str, options: dict[str, Any]) -> None:
    """Raise VitoptError when a runtime factory got options it does not take."""
    if options:
        raise VitoptError(f"runtime {kind!r} does not take option(s) {', '.join(sorted(options))}.")
