"""``validate``: accuracy, runtime parity and latency of the final model beside the dense reference.

For the current (pruned) model and, when a ``prune`` ran, the dense model as it entered the first
prune: top-1 on the validation set with each runtime in the recipe (PyTorch eager or
``torch.compile``, ONNX Runtime CPU or CUDA EP, TensorRT), max |logit diff| and argmax agreement of
every runtime with the PyTorch reference, latency p50/p90/p99 and throughput per batch size
(warm-up, repeats, fixed CPU threads; CUDA events and synchronisation on GPU; an engine's batches
capped at its optimization profile, recorded under ``batches``), and FLOPs (= 2 x MACs)
and params. :func:`vitopt.deploy.validation.measure_runtimes` is the one measurement used by this
stage and by ``vitopt validate ARTIFACT``.
"""

from __future__ import annotations

from pathlib import Path

from vitopt.arch.config import load_pruned
from vitopt.deploy.onnx_export import export_onnx
from vitopt.deploy.runtimes import runtime_spec
from vitopt.deploy.validation import check_artifacts, measure_runtimes
from vitopt.stages.base import StageDir, State, latest_output
from vitopt.train.data import val_arrays
from vitopt.train.inputs import input_shape

__all__ = ["run", "measure_model"]

#: the stage that makes each kind of artifact, for messages.
_MADE_BY = {"model": "train or prune", "onnx": "export", "engine": "build", "program": "build (backend: torch_tensorrt)"}


def measure_model(cfg, model, onnx_path: Path | None, images, labels, engine_path: Path | None = None,
                  program_path: Path | None = None) -> dict:
    """Top-1, latency and parity of one model on every runtime in ``cfg.runtimes`` (a ValidateStage)."""
    model = model.eval()
    needed = {runtime_spec(k).needs for k in cfg.runtimes}
    check_artifacts(list(cfg.runtimes), {"model": model, "onnx": onnx_path, "engine": engine_path,
                                         "program": program_path},
                    "the run so far (add " + " and ".join(f"a {_MADE_BY[n]} stage" for n in sorted(needed)) + " before it)")
    return measure_runtimes(list(cfg.runtimes), images, labels, batch_sizes=cfg.batch_sizes, model=model,
                            onnx_path=onnx_path, engine_path=engine_path, program_path=program_path,
                            input_chw=input_shape(model), threads=cfg.threads, device=getattr(cfg, "device", "cpu"),
                            warmup=cfg.warmup, repeats=cfg.repeats)


def run(cfg, state: State, sd: StageDir) -> State:
    """Measure the current model (and the dense reference, if any) and record everything."""
    images, labels = val_arrays(state.data)
    needs = {runtime_spec(k).needs for k in cfg.runtimes}
    engine = latest_output(state, sd.path.parent, "engine") if "engine" in needs else None
    program = latest_output(state, sd.path.parent, "program") if "program" in needs else None
    metrics = {"threads": cfg.threads, "batch_sizes": cfg.batch_sizes, "num_images": int(len(labels)),
               "device": getattr(cfg, "device", "cpu")}
    metrics["final"] = {**state.cost(), **measure_model(cfg, state.model, state.onnx_path, images, labels, engine,
                                                        program)}
    if state.reference_dir is not None:
        ref = load_pruned(state.reference_dir)
        ref_onnx = None
        if any(runtime_spec(k).needs == "onnx" for k in cfg.runtimes):
            ref_onnx = sd.path / "reference.onnx"
            export_onnx(ref, ref_onnx, input_shape(ref))
        ref_cfg = cfg.model_copy(update={"runtimes": [k for k in cfg.runtimes
                                                      if runtime_spec(k).needs not in ("engine", "program")]})
        if ref_cfg.runtimes:
            metrics["reference"] = {**state.cost(ref), **measure_model(ref_cfg, ref, ref_onnx, images, labels)}
    state.model.train()
    state.results[sd.label] = sd.finish(cfg, metrics, {})
    return state
