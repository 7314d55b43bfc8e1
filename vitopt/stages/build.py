"""``build``: a TensorRT engine of the exported (or quantized) ONNX for a target profile.

Picks the ONNX (int8/fp8: the Q/DQ model of the last quantize stage of that precision; fp16/bf16:
the last AutoCast model of that precision if any, else the export), derives the builder settings
from the target profile and the recipe (:func:`vitopt.deploy.tensorrt_build.derive_build_config`),
writes the equivalent trtexec command first (useful even where TensorRT is missing), then builds
with the TensorRT Python API - or with Torch-TensorRT's dynamo path where only that is installed.
The timing cache lives in the run directory so every build for a target reuses it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from vitopt.deploy.tensorrt_build import (
    TRT_EXTRA_HINT,
    build_backend,
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


def run(cfg, state: State, sd: StageDir) -> State:
    """Build ``<stage>/<target>_<precision>.engine`` (+ ``.trtexec.sh``, ``.build.json``)."""
    run_dir = sd.path.parent
    onnx = _source_onnx(cfg, state, run_dir)
    info = onnx_info(onnx)
    backend = build_backend()
    major = cfg.trt_major
    if major is None and backend == "tensorrt":
        major = tensorrt_major(require_tensorrt())
    bc = derive_build_config(cfg.target, cfg.precision, input_name=info.input_name, input_chw=info.input_chw,
                             trt_major=major, profile=tuple(cfg.profile) if cfg.profile else None,
                             fixed_batch=info.batch, workspace_mib=cfg.workspace_mib, opt_level=cfg.opt_level,
                             sparsity=cfg.sparsity, dla_core=cfg.dla_core, version_compatible=cfg.version_compatible)
    check_graph_precision(bc, info)
    cache = cfg.timing_cache or run_dir / f"timing_{bc.target}_trt{bc.trt_major}.cache"
    paths = build_paths(sd.path, bc, cache)
    sd.path.mkdir(parents=True, exist_ok=True)
    cmd = shlex.join(trtexec_command(bc, onnx, paths["engine"], cache))
    atomic_write_text(paths["trtexec"], "#!/bin/sh\n" + cmd + "\n")
    if backend == "tensorrt":
        record = build_engine(onnx, bc, sd.path, timing_cache=cache)
    elif backend == "torch_tensorrt":
        record = compile_torch_tensorrt(state.model, bc, sd.path)
        state.model.cpu().train()
    else:
        raise VitoptError(f"TensorRT is not installed, so the build stage cannot run here; {TRT_EXTRA_HINT}, or run "
                          f"the trtexec command written to {paths['trtexec']} on the target.")
    record["onnx"] = str(onnx)
    rel = Path(record["engine"]).relative_to(run_dir).as_posix()
    state.results[sd.label] = sd.finish(cfg, record, {"engine": rel})
    return state
