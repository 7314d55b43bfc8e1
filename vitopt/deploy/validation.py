"""One validation interface across runtimes: the same images through PyTorch, ONNX Runtime and TensorRT.

:func:`measure_runtimes` measures top-1, agreement with the PyTorch reference (max |logit diff|,
argmax agreement) and latency percentiles per batch size for any registered runtime
(:mod:`vitopt.deploy.runtimes`); the ``validate`` stage and ``vitopt.validate`` (which resolves run
directories and their data first, :mod:`vitopt.rundir`) both call it. It receives a model, file paths
and arrays, never a recipe.

Latency method: :func:`vitopt.deploy.latency.measure_latency` (fixed input, warm-up, timed repeats,
fixed CPU threads); runtimes on a GPU are synchronised after every call and timed with CUDA events;
runtimes that keep their I/O on the device (the ``tensorrt`` runtime) are timed by
:func:`vitopt.deploy.latency.measure_device_latency` - the engine alone between CUDA events on its
stream, the host-to-device copy reported beside it.

Batches and optimization profiles: an engine accepts only the batches of its optimization profile
(a Jetson profile stops at 32/16/8, a fixed-batch or DLA engine takes one batch). A runtime that
reports ``max_batch`` (and ``profile``) gets evaluation batches of at most ``max_batch`` (a short last
batch padded up to the profile's minimum and trimmed back), and latency batches clipped into the
profile; the result says so under ``"batches"``.

Latency of models *compared* (the validate stage's final vs dense model): :func:`compare_models`,
the one timing method of :mod:`vitopt.deploy.timing` (warm-up, interleaved rounds, median of per-round
ratios with its spread, load recorded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitopt.deploy.accuracy import compare_logits, evaluate_runtime
from vitopt.deploy.latency import measure_device_latency, measure_latency
from vitopt.deploy.runtimes import make_runtime, runtime_spec
from vitopt.deploy.timing import compare_runtimes
from vitopt.errors import VitoptError

__all__ = ["measure_runtimes", "compare_models", "check_artifacts", "ARTIFACT_WORDS", "batch_plan", "EVAL_BATCH"]

#: how a runtime's artifact is named in messages (``RuntimeSpec.needs`` -> words).
ARTIFACT_WORDS = {"model": "a model folder (arch.json)", "onnx": "an .onnx file", "engine": "a TensorRT engine",
                  "program": "a Torch-TensorRT program (.ep)"}
#: images per call when measuring top-1 (capped at a runtime's ``max_batch``).
EVAL_BATCH = 64


def batch_plan(runtime: Any, batch_sizes: list[int], eval_batch: int = EVAL_BATCH) -> dict[str, Any]:
    """The batches a runtime can take: evaluation batch and latency batches within its profile.

    Args:
        runtime: any runtime; ``profile`` ``(min, opt, max)`` or ``max_batch`` attributes bound it.
        batch_sizes: the latency batches asked for.
        eval_batch: the evaluation batch asked for.

    Returns:
        ``{"profile": (min, opt, max) | None, "eval_batch", "latency": [clipped, deduplicated],
        "capped": bool}``; ``capped`` is True when any batch was changed.
    """
    prof = getattr(runtime, "profile", None)
    mx = getattr(runtime, "max_batch", None)
    lo, hi = (int(prof[0]), int(prof[2])) if prof else (1, int(mx) if mx else None)
    if hi is None:
        return {"profile": None, "eval_batch": eval_batch, "latency": list(batch_sizes), "capped": False}
    latency = list(dict.fromkeys(min(max(int(b), lo), hi) for b in batch_sizes))
    ev = min(max(eval_batch, lo), hi)
    return {"profile": tuple(prof) if prof else (1, hi, hi), "eval_batch": ev, "latency": latency,
            "capped": latency != list(batch_sizes) or ev != eval_batch}


class _PadToMin:
    """Calls ``runtime`` with batches of at least ``minimum`` rows (repeating the last row) and trims the output."""

    def __init__(self, runtime: Any, minimum: int) -> None:
        self.runtime, self.minimum = runtime, minimum
        self.name = getattr(runtime, "name", "runtime")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n >= self.minimum:
            return self.runtime(x)
        pad = np.concatenate([x, np.repeat(x[-1:], self.minimum - n, axis=0)])
        return np.asarray(self.runtime(pad))[:n]


def check_artifacts(runtimes: list[str], have: dict[str, Any], where: str) -> None:
    """Raise VitoptError unless every runtime kind's artifact (``RuntimeSpec.needs``) is in ``have``.

    Args:
        runtimes: runtime kinds; an unknown one raises with the list of known kinds.
        have: ``{"model": ..., "onnx": ..., "engine": ...}``, None where absent.
        where: what the artifacts came from, for the message (a path, "the recipe").
    """
    if not runtimes:
        raise VitoptError("give at least one runtime (--runtime), e.g. onnxruntime.")
    for kind in runtimes:
        needs = runtime_spec(kind).needs
        if have.get(needs) is None:
            raise VitoptError(f"runtime {kind!r} needs {ARTIFACT_WORDS[needs]}, and {where} provides none; give one, "
                              "or a run directory that holds one.")


def measure_runtimes(kinds: list[str], images: np.ndarray, labels: np.ndarray, *, batch_sizes: list[int],
                     model=None, onnx_path: Path | None = None, engine_path: Path | None = None,
                     program_path: Path | None = None, input_chw: tuple[int, int, int] | None = None,
                     threads: int = 2, device: str = "cpu", warmup: int = 10, repeats: int = 50,
                     latency: bool = True) -> dict[str, Any]:
    """Top-1, latency and parity with PyTorch of each runtime kind on the same images.

    Args:
        kinds: runtime kinds (:data:`vitopt.deploy.runtimes.RUNTIMES`).
        images, labels: float32 ``[N, C, H, W]`` model-ready images and int ``[N]`` labels.
        batch_sizes: latency batch sizes.
        model: the PyTorch model (for ``pytorch``/``pytorch-compile`` and as parity reference).
        onnx_path, engine_path, program_path: artifacts of the ONNX, TensorRT and Torch-TensorRT runtimes.
        input_chw: ``(C, H, W)``; default ``images.shape[1:]``.
        threads: CPU intra-op threads; device: ``cpu``/``cuda[:i]`` for the PyTorch runtimes (its
            index also picks the GPU of the engine runtimes).
        warmup, repeats: latency warm-up and timed calls per batch size.
        latency: False skips the latency measurement (``latency`` is then ``{}``), e.g. when the
            caller times several models against each other with :func:`compare_models`.

    Returns:
        ``{"runtimes": {kind: {"top1", "latency": {bs: stats}, "batches": batch_plan(...),
        "vs_pytorch": {...}?}}, "parity": ORT-vs-PyTorch agreement (when both ran)}``; ``vs_pytorch`` is
        :func:`compare_logits` of that runtime against the PyTorch reference: the eager runtime in
        ``kinds`` or, when absent, an extra eager pass of ``model``.

    Raises:
        VitoptError: a runtime lacking its artifact, or any runtime's own error.
    """
    shape = tuple(input_chw or images.shape[1:])
    out: dict[str, Any] = {"runtimes": {}}
    logits: dict[str, np.ndarray] = {}
    for kind in kinds:
        opts: dict[str, Any] = {}
        spec = runtime_spec(kind)
        if spec.needs == "model":
            opts["device"] = device
        elif spec.needs in ("engine", "program"):
            opts["device"] = int(str(device).partition(":")[2] or 0)
        runtime = make_runtime(kind, model=model, onnx_path=onnx_path, engine_path=engine_path,
                               program_path=program_path, threads=threads, **opts)
        on_gpu = spec.gpu or (spec.needs == "model" and str(device).startswith("cuda"))
        try:
            plan = batch_plan(runtime, list(batch_sizes))
            lo = plan["profile"][0] if plan["profile"] else 1
            acc = evaluate_runtime(_PadToMin(runtime, lo) if lo > 1 else runtime, images, labels,
                                   batch_size=plan["eval_batch"])
            if not latency:
                lat = {}
            elif all(hasattr(runtime, a) for a in ("stage_input", "launch", "event")):
                lat = measure_device_latency(runtime, shape, plan["latency"], warmup=warmup, repeats=repeats)
            else:
                lat = measure_latency(runtime, shape, plan["latency"], warmup=warmup, repeats=repeats,
                                      sync=getattr(runtime, "sync", None) if on_gpu else None,
                                      timer="cuda" if on_gpu else "wall")
        finally:
            runtime.close()
        logits[kind] = acc["logits"]
        out["runtimes"][kind] = {"top1": acc["top1"], "latency": {str(b): v for b, v in lat.items()},
                                 "batches": {**plan, "requested": list(batch_sizes)}}
    ref = logits.get("pytorch")
    if ref is None and model is not None and any(k != "pytorch" for k in kinds):
        rt = make_runtime("pytorch", model=model, threads=threads)
        try:
            ref = evaluate_runtime(rt, images, labels)["logits"]
        finally:
            rt.close()
    if ref is not None:
        for kind in kinds:
            if kind != "pytorch":
                out["runtimes"][kind]["vs_pytorch"] = compare_logits(logits[kind], ref)
    if "pytorch" in logits and "onnxruntime" in logits:
        out["parity"] = compare_logits(logits["onnxruntime"], logits["pytorch"])
    return out


def compare_models(kinds: list[str], models: dict[str, dict[str, Any]], *, batch_sizes: list[int],
                   input_chw: tuple[int, int, int], reference: str, threads: int = 2, device: str = "cpu",
                   warmup: int = 10, rounds: int = 10, round_ms: float = 100.0) -> dict[str, dict[str, Any]]:
    """Latency of several models on each runtime kind, timed against each other in interleaved rounds.

    For every kind and batch size, one runtime per model is opened and all are timed together with
    :func:`vitopt.deploy.timing.compare_runtimes` (warm-up, ``rounds`` interleaved rounds, the median of
    per-round ratios to ``reference`` with its spread, the machine's load); GPU runtimes are
    synchronised after every call.

    Args:
        kinds: runtime kinds (:data:`vitopt.deploy.runtimes.RUNTIMES`) every model has the artifact of.
        models: label -> ``{"model": nn.Module, "onnx_path": Path | None, "engine_path": Path | None}``.
        batch_sizes: batch sizes; input_chw: ``(C, H, W)`` of one image.
        reference: the label the ratios are taken against (e.g. the dense model).
        threads, device: CPU intra-op threads (fixed during timing); device of the PyTorch runtimes.
        warmup, rounds, round_ms: see :func:`vitopt.deploy.timing.compare`.

    Returns:
        ``{kind: {str(batch): Comparison.to_json()}}`` (candidates keyed by the labels of ``models``).

    Raises:
        VitoptError: a runtime lacking its artifact, an unknown ``reference``, or any runtime's own error.
    """
    if reference not in models:
        raise VitoptError(f"reference {reference!r} is not one of the models ({', '.join(models)}).")
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        spec = runtime_spec(kind)
        on_gpu = spec.gpu or (spec.needs == "model" and str(device).startswith("cuda"))
        opts: dict[str, Any] = ({"device": device} if spec.needs == "model" else
                                {"device": int(str(device).partition(":")[2] or 0)} if spec.needs in ("engine", "program")
                                else {})
        opened: dict[str, Any] = {}
        try:
            for label, arts in models.items():
                opened[label] = make_runtime(kind, model=arts.get("model"), onnx_path=arts.get("onnx_path"),
                                             engine_path=arts.get("engine_path"), program_path=arts.get("program_path"),
                                             threads=threads, **opts)
            syncs = {k: getattr(rt, "sync", None) for k, rt in opened.items()} if on_gpu else None
            out[kind] = {str(b): compare_runtimes(opened, input_chw, b, syncs=syncs, reference=reference,
                                                  warmup=warmup, rounds=rounds, round_ms=round_ms,
                                                  threads=threads if not on_gpu else None, warn_load=False).to_json()
                         for b in batch_sizes}
        finally:
            for rt in reversed(list(opened.values())):
                rt.close()
    return out
