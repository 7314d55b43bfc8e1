"""``validate``: accuracy, runtime parity and latency of the final model beside the dense reference.

For the current (pruned) model and, when a ``prune`` ran, the dense model as it entered the first
prune: top-1 on the validation set with each runtime in the recipe (PyTorch eager or
``torch.compile``, ONNX Runtime CPU or CUDA EP, TensorRT), max |logit diff| and argmax agreement of
every runtime with the PyTorch reference, latency per batch size (an engine's batches capped at its
optimization profile, recorded under ``batches``), and FLOPs (= 2 x MACs) and params.
:func:`vitopt.deploy.validation.measure_runtimes` is the accuracy and parity measurement used by this
stage and by ``vitopt validate ARTIFACT``.

Latency: with a dense reference, the final and dense models are timed against each other on every
runtime both can run, with the one timing method of :mod:`vitopt.deploy.timing`
(:func:`vitopt.deploy.validation.compare_models`: warm-up, ``rounds`` interleaved rounds, fixed CPU
threads, load recorded): ``latency_vs_reference`` holds the median of per-round ratios final / dense
with its min-max and IQR, and each model's per-call percentiles come from the same rounds. A model
alone (no prune ran, or a runtime only the final model has, e.g. its TensorRT engine) is measured with
:func:`vitopt.deploy.latency.measure_latency` (warm-up, ``repeats`` timed calls).
"""

from __future__ import annotations

from pathlib import Path

from vitopt.arch.config import load_pruned
from vitopt.deploy.onnx_export import export_onnx
from vitopt.deploy.runtimes import runtime_spec
from vitopt.deploy.validation import check_artifacts, compare_models, measure_runtimes
from vitopt.stages.base import StageDir, State, latest_output
from vitopt.train.data import val_arrays
from vitopt.train.inputs import input_shape

__all__ = ["run", "measure_model"]

#: the stage that makes each kind of artifact, for messages.
_MADE_BY = {"model": "train or prune", "onnx": "export", "engine": "build", "program": "build (backend: torch_tensorrt)"}



def measure_model(cfg, model, onnx_path: Path | None, images, labels, engine_path: Path | None = None,
                  program_path: Path | None = None, latency: bool = True) -> dict:
    """Top-1, parity and (``latency``) latency of one model on every runtime in ``cfg.runtimes`` (a ValidateStage)."""
    model = model.eval()
    needed = {runtime_spec(k).needs for k in cfg.runtimes}
    check_artifacts(list(cfg.runtimes), {"model": model, "onnx": onnx_path, "engine": engine_path,
                                         "program": program_path},
                    "the run so far (add " + " and ".join(f"a {_MADE_BY[n]} stage" for n in sorted(needed)) + " before it)")
    return measure_runtimes(list(cfg.runtimes), images, labels, batch_sizes=cfg.batch_sizes, model=model,
                            onnx_path=onnx_path, engine_path=engine_path, program_path=program_path,
                            input_chw=input_shape(model), threads=cfg.threads, device=getattr(cfg, "device", "cpu"),
                            warmup=cfg.warmup, repeats=cfg.repeats, latency=latency)


def _fill_latency(result: dict, comparisons: dict, label: str) -> None:
    """Per-call statistics of ``label`` from the interleaved comparison, in measure_latency's keys."""
    keys = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "throughput_img_s")
    for kind, per_batch in comparisons.items():
        lat = result["runtimes"][kind]["latency"]
        for b, cmp in per_batch.items():
            c = cmp["candidates"][label]
            lat[b] = {**{k: c[k] for k in keys}, "ms": c["ms"], "rounds": cmp["rounds"], "calls_per_round": c["calls"]}


def run(cfg, state: State, sd: StageDir) -> State:
    """Measure the current model (and the dense reference, if any) and record everything."""
    images, labels = val_arrays(state.data)
    needs = {runtime_spec(k).needs for k in cfg.runtimes}
    engine = latest_output(state, sd.path.parent, "engine") if "engine" in needs else None
    program = latest_output(state, sd.path.parent, "program") if "program" in needs else None
    device = getattr(cfg, "device", "cpu")
    metrics = {"threads": cfg.threads, "batch_sizes": cfg.batch_sizes, "num_images": int(len(labels)),
               "device": device}
    if state.reference_dir is None:
        metrics["final"] = {**state.cost(), **measure_model(cfg, state.model, state.onnx_path, images, labels, engine,
                                                            program)}
    else:
        ref = load_pruned(state.reference_dir)
        # the dense model has no engine or compiled program
        shared = [k for k in cfg.runtimes if runtime_spec(k).needs not in ("engine", "program")]
        alone = [k for k in cfg.runtimes if k not in shared]
        ref_onnx = None
        if any(runtime_spec(k).needs == "onnx" for k in shared):
            ref_onnx = sd.path / "reference.onnx"
            export_onnx(ref, ref_onnx, input_shape(ref))
        final = {**state.cost(), **measure_model(cfg, state.model, state.onnx_path, images, labels, engine,
                                                 program, latency=False)}
        if alone:   # timed alone, as nothing else runs them
            solo = measure_model(cfg.model_copy(update={"runtimes": alone}), state.model, state.onnx_path, images,
                                 labels, engine, program)
            for k in alone:
                final["runtimes"][k]["latency"] = solo["runtimes"][k]["latency"]
        metrics["final"] = final
        if shared:
            ref_cfg = cfg.model_copy(update={"runtimes": shared})
            metrics["reference"] = {**state.cost(ref), **measure_model(ref_cfg, ref, ref_onnx, images, labels,
                                                                       latency=False)}
            models = {"final": {"model": state.model.eval(), "onnx_path": state.onnx_path},
                      "reference": {"model": ref.eval(), "onnx_path": ref_onnx}}
            comparisons = compare_models(shared, models, batch_sizes=cfg.batch_sizes, input_chw=input_shape(ref),
                                         reference="reference", threads=cfg.threads, device=device,
                                         warmup=cfg.warmup, rounds=cfg.rounds, round_ms=cfg.round_ms)
            _fill_latency(metrics["final"], comparisons, "final")
            _fill_latency(metrics["reference"], comparisons, "reference")
            metrics["latency_vs_reference"] = {
                kind: {b: {k: c["candidates"]["final"]["ratio"][k] for k in ("median", "min", "max", "q1", "q3", "rounds")}
                       for b, c in per_batch.items()} for kind, per_batch in comparisons.items()}
            flat = [c for per_batch in comparisons.values() for c in per_batch.values()]
            warnings_ = [c["load_warning"] for c in flat if c["load_warning"]]
            metrics["timing"] = {"method": flat[0]["method"], "rounds": cfg.rounds, "warmup": cfg.warmup,
                                 "threads": cfg.threads, "load_before": flat[0]["load_before"],
                                 "load_after": flat[-1]["load_after"],
                                 "load_warning": warnings_[0] if warnings_ else None}
            if warnings_:
                print(f"{sd.label}: warning: {warnings_[0]}", flush=True)
    state.model.train()
    state.results[sd.label] = sd.finish(cfg, metrics, {})
    return state
