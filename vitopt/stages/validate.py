"""``validate``: accuracy, runtime parity and latency of the final model beside the dense reference.

For the current (pruned) model and, when a ``prune`` ran, the dense model as it entered the first
prune: top-1 on the validation set with each runtime (PyTorch, ONNX Runtime CPU), max |logit diff|
and argmax agreement between ONNX Runtime and PyTorch, latency p50/p90/p99 per batch size (warm-up,
repeats, fixed CPU threads), and FLOPs (= 2 x MACs) and params.
"""

from __future__ import annotations

from pathlib import Path

from vitopt.arch.config import load_pruned
from vitopt.deploy.latency import measure_latency
from vitopt.deploy.onnx_export import export_onnx
from vitopt.deploy.runtimes import compare_logits, evaluate_runtime, make_runtime
from vitopt.errors import VitoptError
from vitopt.stages.base import StageDir, State
from vitopt.stages.export import input_shape
from vitopt.train.data import val_arrays

__all__ = ["run", "measure_model"]


def measure_model(cfg, model, onnx_path: Path | None, images, labels) -> dict:
    """Top-1, latency and (with ONNX) parity of one model on every runtime in ``cfg.runtimes``."""
    model = model.eval()
    shape = input_shape(model)
    out: dict = {"runtimes": {}}
    logits = {}
    for kind in cfg.runtimes:
        if kind == "onnxruntime" and onnx_path is None:
            raise VitoptError("validate with runtime 'onnxruntime' needs an export stage before it.")
        runtime = make_runtime(kind, model=model, onnx_path=onnx_path, threads=cfg.threads)
        try:
            acc = evaluate_runtime(runtime, images, labels)
            lat = measure_latency(runtime, shape, cfg.batch_sizes, warmup=cfg.warmup, repeats=cfg.repeats)
        finally:
            runtime.close()
        logits[kind] = acc["logits"]
        out["runtimes"][kind] = {"top1": acc["top1"], "latency": {str(b): v for b, v in lat.items()}}
    if "pytorch" in logits and "onnxruntime" in logits:
        out["parity"] = compare_logits(logits["onnxruntime"], logits["pytorch"])
    return out


def run(cfg, state: State, sd: StageDir) -> State:
    """Measure the current model (and the dense reference, if any) and record everything."""
    images, labels = val_arrays(state.data)
    metrics = {"threads": cfg.threads, "batch_sizes": cfg.batch_sizes, "num_images": int(len(labels))}
    metrics["final"] = {**state.cost(), **measure_model(cfg, state.model, state.onnx_path, images, labels)}
    if state.reference_dir is not None:
        ref = load_pruned(state.reference_dir)
        ref_onnx = None
        if "onnxruntime" in cfg.runtimes:
            ref_onnx = sd.path / "reference.onnx"
            export_onnx(ref, ref_onnx, input_shape(ref))
        metrics["reference"] = {**state.cost(ref), **measure_model(cfg, ref, ref_onnx, images, labels)}
    state.model.train()
    state.results[sd.label] = sd.finish(cfg, metrics, {})
    return state
