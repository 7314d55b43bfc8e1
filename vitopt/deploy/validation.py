"""One validation interface across runtimes: the same images through PyTorch, ONNX Runtime and TensorRT.

:func:`measure_runtimes` measures top-1, agreement with the PyTorch reference (max |logit diff|,
argmax agreement) and latency percentiles per batch size for any registered runtime
(:mod:`vitopt.deploy.runtimes`); the ``validate`` stage and ``vitopt.validate`` (which resolves run
directories and their data first, :mod:`vitopt.rundir`) both call it. It receives a model, file paths
and arrays, never a recipe.

Latency of one model alone: :func:`vitopt.deploy.latency.measure_latency` (fixed input, warm-up, timed
repeats, fixed CPU threads; runtimes on a GPU are synchronised after every call and timed with CUDA
events). Latency of models *compared* (the validate stage's final vs dense model): :func:`compare_models`,
the one timing method of :mod:`vitopt.deploy.timing` (warm-up, interleaved rounds, median of per-round
ratios with its spread, load recorded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vitopt.deploy.accuracy import compare_logits, evaluate_runtime
from vitopt.deploy.latency import measure_latency
from vitopt.deploy.runtimes import make_runtime, runtime_spec
from vitopt.deploy.timing import compare_runtimes
from vitopt.errors import VitoptError

__all__ = ["measure_runtimes", "compare_models", "check_artifacts", "ARTIFACT_WORDS"]

#: how a runtime's artifact is named in messages (``RuntimeSpec.needs`` -> words).
ARTIFACT_WORDS = {"model": "a model folder (arch.json)", "onnx": "an .onnx file", "engine": "a TensorRT engine"}


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
                     input_chw: tuple[int, int, int] | None = None, threads: int = 2, device: str = "cpu",
                     warmup: int = 10, repeats: int = 50, latency: bool = True) -> dict[str, Any]:
    """Top-1, latency and parity with PyTorch of each runtime kind on the same images.

    Args:
        kinds: runtime kinds (:data:`vitopt.deploy.runtimes.RUNTIMES`).
        images, labels: float32 ``[N, C, H, W]`` model-ready images and int ``[N]`` labels.
        batch_sizes: latency batch sizes.
        model: the PyTorch model (for ``pytorch``/``pytorch-compile`` and as parity reference).
        onnx_path, engine_path: artifacts of the ONNX and TensorRT runtimes.
        input_chw: ``(C, H, W)``; default ``images.shape[1:]``.
        threads: CPU intra-op threads; device: ``cpu``/``cuda`` for the PyTorch runtimes.
        warmup, repeats: latency warm-up and timed calls per batch size.
        latency: False skips the latency measurement (``latency`` is then ``{}``), e.g. when the
            caller times several models against each other with :func:`compare_models`.

    Returns:
        ``{"runtimes": {kind: {"top1", "latency": {bs: stats}, "vs_pytorch": {...}?}},
        "parity": ORT-vs-PyTorch agreement (when both ran)}``; ``vs_pytorch`` is
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
        runtime = make_runtime(kind, model=model, onnx_path=onnx_path, engine_path=engine_path, threads=threads,
                               **opts)
        on_gpu = spec.gpu or (spec.needs == "model" and device == "cuda")
        try:
            acc = evaluate_runtime(runtime, images, labels)
            lat = {} if not latency else measure_latency(
                runtime, shape, batch_sizes, warmup=warmup, repeats=repeats,
                sync=getattr(runtime, "sync", None) if on_gpu else None, timer="cuda" if on_gpu else "wall")
        finally:
            runtime.close()
        logits[kind] = acc["logits"]
        out["runtimes"][kind] = {"top1": acc["top1"], "latency": {str(b): v for b, v in lat.items()}}
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
        on_gpu = spec.gpu or (spec.needs == "model" and device == "cuda")
        opts: dict[str, Any] = {"device": device} if spec.needs == "model" else {}
        opened: dict[str, Any] = {}
        try:
            for label, arts in models.items():
                opened[label] = make_runtime(kind, model=arts.get("model"), onnx_path=arts.get("onnx_path"),
                                             engine_path=arts.get("engine_path"), threads=threads, **opts)
            syncs = {k: getattr(rt, "sync", None) for k, rt in opened.items()} if on_gpu else None
            out[kind] = {str(b): compare_runtimes(opened, input_chw, b, syncs=syncs, reference=reference,
                                                  warmup=warmup, rounds=rounds, round_ms=round_ms,
                                                  threads=threads if not on_gpu else None, warn_load=False).to_json()
                         for b in batch_sizes}
        finally:
            for rt in reversed(list(opened.values())):
                rt.close()
    return out
