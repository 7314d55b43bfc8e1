"""``quantize``: post-training quantization of the exported ONNX with NVIDIA ModelOpt.

int8/fp8 add Q/DQ nodes calibrated on ``calibration_images`` training images (seeded draw, static
batches of ``calibration_batch``), leaving the other ops in ``high_precision_dtype`` (fp16 by default,
what a strongly typed TensorRT engine should run); fp16/bf16 convert with ModelOpt AutoCast (see
:mod:`vitopt.deploy.quantize`). For int8 and fp16 the quantized model's ONNX Runtime CPU top-1 on the
validation set is reported beside the fp32 ONNX model's (``top1_drop`` = fp32 - quantized, percentage
points), with max |logit diff| and argmax agreement; when ONNX Runtime CPU cannot run the graph (some
fp16 kernels are missing on CPU) the metrics say so instead (``high_precision_dtype: fp32`` makes a
CPU-checkable graph). ONNX Runtime CPU has no FP8/BF16 kernels for these graphs, so fp8/bf16 accuracy
is measured on the target (``validate`` with ``tensorrt``).
"""

from __future__ import annotations

from vitopt.deploy.accuracy import compare_logits, evaluate_runtime
from vitopt.deploy.quantize import calibration_batches, quantize_onnx
from vitopt.deploy.runtimes import make_runtime
from vitopt.errors import VitoptError
from vitopt.stages.base import StageDir, State
from vitopt.train.data import val_arrays

__all__ = ["run", "ort_accuracy"]

#: quantized precisions whose graphs ONNX Runtime CPU runs (accuracy measured on the host).
ORT_CPU_MODES = ("int8", "fp16")


def ort_accuracy(fp32_onnx, quant_onnx, images, labels, threads: int = 2) -> dict:
    """ONNX Runtime CPU top-1 (%) of the fp32 and quantized ONNX models and their logit agreement.

    Returns:
        ``{"top1_fp32", "top1_quantized", "top1_drop" (fp32 - quantized, points), "max_abs_diff",
        "argmax_agreement"}``.
    """
    out = {}
    for key, path in (("fp32", fp32_onnx), ("quantized", quant_onnx)):
        rt = make_runtime("onnxruntime", onnx_path=path, threads=threads)
        try:
            out[key] = evaluate_runtime(rt, images, labels)
        finally:
            rt.close()
    return {"top1_fp32": out["fp32"]["top1"], "top1_quantized": out["quantized"]["top1"],
            "top1_drop": out["fp32"]["top1"] - out["quantized"]["top1"],
            **compare_logits(out["quantized"]["logits"], out["fp32"]["logits"])}


def run(cfg, state: State, sd: StageDir) -> State:
    """Quantize ``state.onnx_path`` into ``<stage>/model_<precision>.onnx`` and measure its accuracy."""
    if state.onnx_path is None:
        raise VitoptError("the quantize stage needs an exported ONNX model; put an export stage before it.")
    out = sd.path / f"model_{cfg.precision}.onnx"
    cal = None
    if cfg.precision in ("int8", "fp8"):
        cal = calibration_batches(state.data.train, cfg.calibration_images, seed=state.seed)
    info = quantize_onnx(state.onnx_path, out, cfg.precision, calibration=cal,
                         calibration_method=cfg.calibration_method, high_precision_dtype=cfg.high_precision_dtype,
                         calibration_batch=cfg.calibration_batch)
    metrics = {k: v for k, v in info.items() if k != "path"}
    if cfg.precision in ORT_CPU_MODES:
        images, labels = val_arrays(state.data)
        try:
            metrics["onnxruntime_cpu"] = ort_accuracy(state.onnx_path, out, images, labels, cfg.threads)
        except VitoptError as exc:
            metrics["onnxruntime_cpu"] = {"skipped": str(exc)}
    state.results[sd.label] = sd.finish(cfg, metrics, {f"onnx_{cfg.precision}": f"{sd.label}/{out.name}"})
    return state
