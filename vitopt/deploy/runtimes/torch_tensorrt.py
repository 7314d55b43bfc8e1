"""The ``torch-tensorrt`` runtime: run the program the ``torch_tensorrt`` build backend saves.

:func:`vitopt.deploy.tensorrt_build.compile_torch_tensorrt` saves an ExportedProgram (``.ep``) whose
TensorRT engines are embedded as ``tensorrt::execute_engine`` ops; ``torch_tensorrt.load`` reads it back
(Torch-TensorRT docs, "Saving models compiled with Torch-TensorRT") and ``.module()`` is callable like
the PyTorch model. The program takes and returns fp32 (the precision cast happens inside it), so this
runtime is a thin wrapper: NumPy in, CUDA tensor through the program, NumPy out. It reads the
``build.json`` written next to the program for the optimization profile, so validation caps its
batches at the profile's maximum as for the ``tensorrt`` runtime. ``torch_tensorrt`` is imported
lazily; a missing package is one sentence naming the extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vitopt.deploy.runtimes.base import RuntimeSpec, as_batch, no_extra_options
from vitopt.errors import VitoptError

__all__ = ["TorchTrtRuntime", "TORCH_TENSORRT", "program_profile"]


def program_profile(program_path: str | os.PathLike) -> tuple[int, int, int] | None:
    """The ``(min, opt, max)`` batch recorded in the ``build.json`` beside a ``.ep`` program, or None."""
    p = Path(program_path)
    record = p.with_name(p.stem + ".build.json")
    if not record.is_file():
        return None
    try:
        prof = json.loads(record.read_text())["config"]["profile"]
        return int(prof[0]), int(prof[1]), int(prof[2])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class TorchTrtRuntime:
    """Run a Torch-TensorRT program (``.ep``) on CUDA device ``device``.

    Attributes:
        profile, max_batch: from the program's ``build.json`` (None when absent).

    Calling: float32 ``[B, C, H, W]`` ndarray -> float32 ``[B, classes]`` ndarray, synchronised.

    Raises:
        VitoptError: a missing file, Torch-TensorRT not installed, no CUDA device, a file that is not
            a Torch-TensorRT program, a batch above the profile, or a call after :meth:`close`.
    """

    name = "torch-tensorrt"

    def __init__(self, program_path: str | os.PathLike, device: int = 0) -> None:
        path = Path(program_path)
        if not path.is_file():
            raise VitoptError(f"Torch-TensorRT program {path} does not exist; build one with backend: torch_tensorrt.")
        try:
            import torch
            import torch_tensorrt
        except ImportError:
            raise VitoptError("runtime 'torch-tensorrt' needs Torch-TensorRT; install it with "
                              "`pip install 'vitopt[torch-tensorrt]'`.") from None
        if not torch.cuda.is_available():
            raise VitoptError("the torch-tensorrt runtime needs a CUDA device; none is visible.")
        self._torch = torch
        self.device = torch.device("cuda", int(device))
        try:
            with torch.cuda.device(self.device):
                self.module = torch_tensorrt.load(str(path)).module()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise VitoptError(f"{path} is not a loadable Torch-TensorRT program ({first}).") from None
        self.path = path
        self.profile = program_profile(path)
        self.max_batch = self.profile[2] if self.profile else None

    def sync(self) -> None:
        """Wait for the device."""
        self._torch.cuda.synchronize(self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.module is None:
            raise VitoptError("this torch-tensorrt runtime was closed; make a new one.")
        x = as_batch(x, "the torch-tensorrt runtime")
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise VitoptError(f"batch {x.shape[0]} is above the optimization profile of {self.path} (max "
                              f"{self.max_batch}).")
        torch = self._torch
        with torch.no_grad(), torch.cuda.device(self.device):
            out = self.module(torch.from_numpy(x).to(self.device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float().cpu().numpy()

    def close(self) -> None:
        """Drop the loaded program."""
        self.module = None


def _make_torch_trt(*, program_path: Any = None, device: int = 0, model: Any = None, onnx_path: Any = None,
                    engine_path: Any = None, threads: int = 2, **options: Any) -> TorchTrtRuntime:
    if program_path is None:
        raise VitoptError("runtime 'torch-tensorrt' needs a Torch-TensorRT program (.ep); build one with a build "
                          "stage with backend: torch_tensorrt.")
    no_extra_options("torch-tensorrt", options)
    return TorchTrtRuntime(program_path, device=device)


#: A Torch-TensorRT ExportedProgram (option ``device``: CUDA device index).
TORCH_TENSORRT = RuntimeSpec("torch-tensorrt", "program", True, _make_torch_trt,
                             "Torch-TensorRT program (.ep; needs torch-tensorrt)")
