"""Deployment: ONNX export, runtimes behind one interface, latency measurement.

TensorRT, quantization and ``torch.compile`` runtimes plug into :func:`register_runtime` later and
import their optional packages lazily.
"""

from vitopt.deploy.latency import measure_latency
from vitopt.deploy.onnx_export import check_onnx, eager_attention, export_mode, export_onnx, op_counts
from vitopt.deploy.runtimes import (
    OrtRuntime,
    Runtime,
    TorchRuntime,
    compare_logits,
    evaluate_runtime,
    known_runtimes,
    make_runtime,
    register_runtime,
)

__all__ = [
    "export_onnx", "check_onnx", "eager_attention", "export_mode", "op_counts",
    "Runtime", "TorchRuntime", "OrtRuntime", "make_runtime", "register_runtime", "known_runtimes",
    "evaluate_runtime", "compare_logits",
    "measure_latency",
]
