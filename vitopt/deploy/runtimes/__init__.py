"""Runtimes behind one interface, in one explicit registry.

:data:`RUNTIMES` maps each kind to its :class:`~vitopt.deploy.runtimes.base.RuntimeSpec`:
``pytorch`` / ``pytorch-compile`` (:mod:`~vitopt.deploy.runtimes.pytorch`), ``onnxruntime`` /
``onnxruntime-cuda`` (:mod:`~vitopt.deploy.runtimes.ort`), ``tensorrt``
(:mod:`~vitopt.deploy.runtimes.tensorrt`, TensorRT imported only when an engine is opened) and
``torch-tensorrt`` (:mod:`~vitopt.deploy.runtimes.torch_tensorrt`, the program of the
``torch_tensorrt`` build backend). A new
runtime is one module defining a ``RuntimeSpec`` and one line in :data:`RUNTIMES` (or, from user
code, :func:`register_runtime`); validation, the ``validate`` stage, the recipe schema and the CLI
read the specs. A GPU runtime also exposes ``sync()`` for :func:`vitopt.deploy.latency.measure_latency`.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from vitopt.deploy.runtimes.base import Runtime, RuntimeSpec
from vitopt.deploy.runtimes.ort import ONNXRUNTIME, ONNXRUNTIME_CUDA, OrtRuntime
from vitopt.deploy.runtimes.pytorch import PYTORCH, PYTORCH_COMPILE, TorchRuntime
from vitopt.deploy.runtimes.tensorrt import TENSORRT
from vitopt.deploy.runtimes.torch_tensorrt import TORCH_TENSORRT
from vitopt.errors import VitoptError

__all__ = ["RUNTIMES", "Runtime", "RuntimeSpec", "TorchRuntime", "OrtRuntime", "make_runtime", "register_runtime",
           "known_runtimes", "runtime_spec"]

#: runtime kind -> spec.
RUNTIMES: dict[str, RuntimeSpec] = {s.name: s for s in (PYTORCH, PYTORCH_COMPILE, ONNXRUNTIME, ONNXRUNTIME_CUDA,
                                                         TENSORRT, TORCH_TENSORRT)}


def register_runtime(spec: RuntimeSpec) -> RuntimeSpec:
    """Add (or replace) a runtime kind from user code; returns ``spec``."""
    RUNTIMES[spec.name] = spec
    return spec


def known_runtimes() -> list[str]:
    """Registered runtime kinds, sorted."""
    return sorted(RUNTIMES)


def runtime_spec(kind: str) -> RuntimeSpec:
    """The spec of ``kind``.

    Raises:
        VitoptError: an unknown kind; the message lists the known ones.
    """
    spec = RUNTIMES.get(kind)
    if spec is None:
        raise VitoptError(f"unknown runtime kind {kind!r}; known kinds: {', '.join(known_runtimes())}.")
    return spec


def make_runtime(kind: str, *, model: nn.Module | None = None, onnx_path: str | os.PathLike | None = None,
                 engine_path: str | os.PathLike | None = None, program_path: str | os.PathLike | None = None,
                 threads: int = 2, **options: Any) -> Runtime:
    """Build a registered runtime by kind.

    Args:
        kind: ``"pytorch"`` / ``"pytorch-compile"`` (need ``model``; options ``device``, ``dtype``,
            and ``compile_backend`` for the latter), ``"onnxruntime"`` (needs ``onnx_path``; option
            ``providers``), ``"onnxruntime-cuda"`` (ORT's CUDA execution provider), ``"tensorrt"``
            (needs ``engine_path``; option ``device``) or ``"torch-tensorrt"`` (needs ``program_path``;
            option ``device``); more kinds via :func:`register_runtime`.
        model: the ``nn.Module`` for model-based runtimes.
        onnx_path: the ``.onnx`` file for ONNX-based runtimes.
        engine_path: the serialized engine for engine-based runtimes.
        program_path: the Torch-TensorRT program (``.ep``) for program-based runtimes (passed to the
            factory only when given, so factories of the other kinds need not accept it).
        threads: CPU threads (intra-op) the runtime may use.
        options: kind-specific keyword options.

    Raises:
        VitoptError: an unknown kind (the message lists the known ones), or a missing/unknown input.
    """
    if program_path is not None:
        options["program_path"] = program_path
    return runtime_spec(kind).factory(model=model, onnx_path=onnx_path, engine_path=engine_path, threads=threads,
                                      **options)
