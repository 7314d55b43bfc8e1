"""Deployment: ONNX export, runtimes behind one interface, latency, target profiles, TensorRT, quantization.

- :mod:`~vitopt.deploy.onnx_export` - ONNX export (opset >= 17) verified in ONNX Runtime;
- :mod:`~vitopt.deploy.runtimes` - PyTorch (eager, ``torch.compile``), ONNX Runtime (CPU, CUDA EP),
  TensorRT and Torch-TensorRT behind one :class:`Runtime` interface, one registry of :class:`RuntimeSpec`;
- :mod:`~vitopt.deploy.accuracy` - top-1 of any runtime, agreement of two runtimes' logits;
- :mod:`~vitopt.deploy.latency` - p50/p90/p99 latency per batch size (wall clock or CUDA events);
- :mod:`~vitopt.deploy.lut` - latency lookup tables measured on a runtime (priced by
  :mod:`vitopt.arch.latency_table`);
- :mod:`~vitopt.deploy.validation` - the same images through any runtimes: top-1, parity, latency;
- :mod:`~vitopt.deploy.targets` - device profiles (``targets.yaml``);
- :mod:`~vitopt.deploy.kernel_rules` - kept sizes the targets' fused TensorRT kernels accept (``round_to: auto``);
- :mod:`~vitopt.deploy.tensorrt_build` - build settings per target and TensorRT line, trtexec lines,
  engine builds (TensorRT imported lazily, extra ``vitopt[trt]``), the Torch-TensorRT backend;
- :mod:`~vitopt.deploy.doctor` - an engine explained from its inspector JSON (``vitopt doctor``);
- :mod:`~vitopt.deploy.quantize` - ModelOpt INT8/FP8 Q/DQ PTQ and FP16 AutoCast (extra ``vitopt[quant]``);
- :mod:`~vitopt.deploy.bundle` - the Jetson kit folder (``vitopt deploy bundle``; the kit itself is package
  data in ``jetson_kit/``);
- :mod:`~vitopt.deploy.sample` - validation samples as ``.npz`` files.

Deploy receives models, arrays and paths, never recipes (run directories are read by :mod:`vitopt.rundir`).

Optional packages (tensorrt, modelopt, torch_tensorrt) are imported only when used.
"""

from vitopt.deploy.accuracy import compare_logits, evaluate_runtime
from vitopt.deploy.latency import measure_latency
from vitopt.deploy.onnx_export import check_onnx, eager_attention, export_mode, export_onnx, op_counts
from vitopt.deploy.runtimes import (
    RUNTIMES,
    OrtRuntime,
    Runtime,
    RuntimeSpec,
    TorchRuntime,
    known_runtimes,
    make_runtime,
    register_runtime,
)
from vitopt.deploy.targets import TargetProfile, get_target, load_targets
from vitopt.deploy.tensorrt_build import BuildConfig, derive_build_config, trtexec_command

__all__ = [
    "export_onnx", "check_onnx", "eager_attention", "export_mode", "op_counts",
    "RUNTIMES", "Runtime", "RuntimeSpec", "TorchRuntime", "OrtRuntime", "make_runtime", "register_runtime",
    "known_runtimes",
    "evaluate_runtime", "compare_logits",
    "measure_latency",
    "TargetProfile", "get_target", "load_targets", "BuildConfig", "derive_build_config", "trtexec_command",
]
