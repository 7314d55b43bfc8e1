"""``build``: a TensorRT engine (or Torch-TensorRT program) of the model for a target profile.

``backend: tensorrt`` (default) builds the exported ONNX with the TensorRT Python API: it picks the
ONNX (int8/fp8: the Q/DQ model of the last quantize stage of that precision; fp16/bf16: the last
AutoCast model of that precision if any, else the export - AutoCast by the build itself when a
strongly typed TensorRT 11 build needs it), derives the builder settings from the target profile and
the recipe (:func:`vitopt.deploy.tensorrt_build.derive_build_config`), writes the equivalent trtexec
command first (useful even where TensorRT is missing), then builds. The timing cache lives in the run
directory, one file per GPU model and TensorRT version, so every build there reuses it. The stage
records the engine under output ``engine``.

``backend: torch_tensorrt`` compiles the PyTorch model with Torch-TensorRT and records the saved
program (``.ep``) under output ``program``, which the ``torch-tensorrt`` runtime runs (the ``tensorrt``
runtime cannot load it).
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

from vitopt.deploy.tensorrt_build import (
    TRT_EXTRA_HINT,
    autocast_for_build,
    build_engine,
    build_paths,
    check_graph_precision,
    compile_torch_tensorrt,
    derive_build_config,
    onnx_info,
    require_tensorrt,
    tensorrt_major,
    trtexec_command,
)
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_text
from vitopt.stages.base import StageDir, State, latest_output
from vitopt.train.inputs import input_shape

__all__ = ["run"]


def _source_onnx(cfg, state: State, run_dir: Path) -> Path:
    if cfg.precision in ("int8", "fp8"):
        path = latest_output(state, run_dir, f"onnx_{cfg.precision}")
        if path is None:
            raise VitoptError(f"a build with precision {cfg.precision} needs a quantize stage with precision "
                              f"{cfg.precision} before it.")
        return path
    cast = latest_output(state, run_dir, f"onnx_{cfg.precision}") if cfg.precision in ("fp16", "bf16") else None
    if cast is not None:
        return cast
    if state.onnx_path is None:
        raise VitoptError("the build stage needs an exported ONNX model; put an export stage before it.")
    return state.onnx_path


def _major(cfg) -> int | None:
    """The recipe's TensorRT major, else the installed one, else None (the target's default)."""
    if cfg.trt_major is not None:
        return cfg.trt_major
    if importlib.util.find_spec("tensorrt") is not None:
        return tensorrt_major(require_tensorrt())
    return None


def _options(cfg) -> dict:
    return dict(trt_major=_major(cfg), profile=tuple(cfg.profile) if cfg.profile else None,
                workspace_mib=cfg.workspace_mib, opt_level=cfg.opt_level, sparsity=cfg.sparsity, dla_core=cfg.dla_core,
                version_compatible=cfg.version_compatible, backend=cfg.backend, dla_min_fraction=cfg.dla_min_fraction)


def run(cfg, state: State, sd: StageDir) -> State:
    """Build ``<stage>/<target>_<precision>.engine`` (or ``.ep``) plus ``.trtexec.sh`` and ``.build.json``."""
    run_dir = sd.path.parent
    sd.path.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "torch_tensorrt":
        bc = derive_build_config(cfg.target, cfg.precision, input_chw=input_shape(state.model), **_options(cfg))
        record = compile_torch_tensorrt(state.model, bc, sd.path)
        rel = Path(record["program"]).relative_to(run_dir).as_posix()
        state.results[sd.label] = sd.finish(cfg, record, {"program": rel})
        return state
    onnx = _source_onnx(cfg, state, run_dir)
    info = onnx_info(onnx)
    bc = derive_build_config(cfg.target, cfg.precision, input_name=info.input_name, input_chw=info.input_chw,
                             fixed_batch=info.batch, **_options(cfg))
    info = autocast_for_build(bc, info, sd.path)
    check_graph_precision(bc, info)
    paths = build_paths(sd.path, bc, cfg.timing_cache)
    cmd = shlex.join(trtexec_command(bc, info.path, paths["engine"], paths["timing_cache"], paths["layers_json"]))
    atomic_write_text(paths["trtexec"], "#!/bin/sh\n" + cmd + "\n")
    if importlib.util.find_spec("tensorrt") is None:
        raise VitoptError(f"TensorRT is not installed, so the build stage cannot run here; {TRT_EXTRA_HINT}, or run "
                          f"the trtexec command written to {paths['trtexec']} on the target.")
    record = build_engine(info.path, bc, sd.path, timing_cache=cfg.timing_cache or None, cache_dir=run_dir)
    rel = Path(record["engine"]).relative_to(run_dir).as_posix()
    state.results[sd.label] = sd.finish(cfg, record, {"engine": rel})
    return state
