"""One validation interface across runtimes: the same images through PyTorch, ONNX Runtime and TensorRT.

:func:`measure_runtimes` measures top-1, agreement with the PyTorch reference (max |logit diff|,
argmax agreement) and latency percentiles per batch size for any registered runtime
(:mod:`vitopt.deploy.runtimes`); the ``validate`` stage and ``vitopt validate ARTIFACT`` both call it.
:func:`validate_artifact` resolves an artifact path (run directory, model folder, ``.onnx``,
``.engine``; :mod:`vitopt.deploy.artifacts`) and its validation data first.

Latency method: :func:`vitopt.deploy.latency.measure_latency` (fixed input, warm-up, timed repeats,
fixed CPU threads); runtimes on a GPU are synchronised after every call and timed with CUDA events.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vitopt.deploy.artifacts import load_sample, resolve_artifact
from vitopt.deploy.latency import measure_latency
from vitopt.deploy.runtimes import compare_logits, evaluate_runtime, known_runtimes, make_runtime
from vitopt.errors import VitoptError

__all__ = ["measure_runtimes", "validate_artifact", "GPU_RUNTIMES", "NEEDS"]

#: runtimes that always run on a CUDA device (timed with CUDA events).
GPU_RUNTIMES = ("onnxruntime-cuda", "tensorrt")
#: what each runtime kind runs: a PyTorch model, an ONNX file or a TensorRT engine.
NEEDS = {"pytorch": "model", "pytorch-compile": "model", "onnxruntime": "onnx", "onnxruntime-cuda": "onnx",
         "tensorrt": "engine"}


def measure_runtimes(kinds: list[str], images: np.ndarray, labels: np.ndarray, *, batch_sizes: list[int],
                     model=None, onnx_path: Path | None = None, engine_path: Path | None = None,
                     input_chw: tuple[int, int, int] | None = None, threads: int = 2, device: str = "cpu",
                     warmup: int = 10, repeats: int = 50) -> dict[str, Any]:
    """Top-1, latency and parity with PyTorch of each runtime kind on the same images.

    Args:
        kinds: runtime kinds (:func:`vitopt.deploy.runtimes.known_runtimes`).
        images, labels: float32 ``[N, C, H, W]`` model-ready images and int ``[N]`` labels.
        batch_sizes: latency batch sizes.
        model: the PyTorch model (for ``pytorch``/``pytorch-compile`` and as parity reference).
        onnx_path, engine_path: artifacts of the ONNX and TensorRT runtimes.
        input_chw: ``(C, H, W)``; default ``images.shape[1:]``.
        threads: CPU intra-op threads; device: ``cpu``/``cuda`` for the PyTorch runtimes.
        warmup, repeats: latency warm-up and timed calls per batch size.

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
        if kind in ("pytorch", "pytorch-compile"):
            opts["device"] = device
        if kind == "tensorrt":
            opts["engine_path"] = engine_path
        runtime = make_runtime(kind, model=model, onnx_path=onnx_path, threads=threads, **opts)
        on_gpu = kind in GPU_RUNTIMES or (kind.startswith("pytorch") and device == "cuda")
        try:
            acc = evaluate_runtime(runtime, images, labels)
            lat = measure_latency(runtime, shape, batch_sizes, warmup=warmup, repeats=repeats,
                                  sync=getattr(runtime, "sync", None) if on_gpu else None,
                                  timer="cuda" if on_gpu else "wall")
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



def _data(art, model, data: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray, str]:
    if data is not None:
        images, labels = load_sample(data)
        return images, labels, str(data)
    if art.run_dir is None or model is None:
        raise VitoptError(f"{art.path} has no validation data: pass --data SAMPLE.npz (images, labels) or give an "
                          "artifact inside a run directory.")
    from vitopt.recipe import load_recipe
    from vitopt.train.data import load_data, model_input, val_arrays

    recipe = load_recipe(art.run_dir / "recipe.yaml")
    bundle = load_data(recipe.data, model_input(model, recipe.data.mean, recipe.data.std), recipe.seed)
    images, labels = val_arrays(bundle)
    return images, labels, f"{bundle.name} validation split of {art.run_dir}"


def validate_artifact(path: str | os.PathLike, runtimes: list[str], *, batch_sizes: list[int],
                      data: str | os.PathLike | None = None, threads: int = 2, device: str = "cpu",
                      warmup: int = 10, repeats: int = 50) -> dict[str, Any]:
    """Measure an artifact on each runtime (``vitopt validate ARTIFACT --runtime R``).

    Args:
        path: a run directory, model folder, ``.onnx`` or engine file. Inside a run directory the
            run's last saved model is the PyTorch reference and its recipe gives the validation data.
        runtimes: runtime kinds; each needs its artifact (:data:`NEEDS`).
        batch_sizes: latency batch sizes.
        data: a sample ``.npz`` (``images`` ``[N, C, H, W]``, ``labels`` ``[N]``) instead of the run's split.
        threads, device, warmup, repeats: as in :func:`measure_runtimes`.

    Returns:
        :func:`measure_runtimes`' result plus ``"artifact"`` (resolved paths), ``"data"``,
        ``"num_images"``, ``"batch_sizes"``, ``"threads"``, ``"device"``.

    Raises:
        VitoptError: a missing/unknown artifact, an unknown runtime, a runtime whose artifact is
            absent, no validation data, or a runtime's own error.
    """
    if not runtimes:
        raise VitoptError("give at least one runtime (--runtime), e.g. onnxruntime.")
    unknown = [r for r in runtimes if r not in known_runtimes()]
    if unknown:
        raise VitoptError(f"unknown runtime {unknown[0]!r}; known runtimes: {', '.join(known_runtimes())}.")
    art = resolve_artifact(path)
    have = {"model": art.model_dir, "onnx": art.onnx, "engine": art.engine}
    for kind in runtimes:
        if have[NEEDS[kind]] is None:
            what = {"model": "a model folder (arch.json)", "onnx": "an .onnx file",
                    "engine": "a TensorRT engine"}[NEEDS[kind]]
            raise VitoptError(f"runtime {kind!r} needs {what}, and {art.path} provides none; give one, or a run "
                              "directory that holds one.")
    model = None
    if art.model_dir is not None:
        from vitopt.arch.config import load_pruned

        model = load_pruned(art.model_dir).eval()
    images, labels, where = _data(art, model, data)
    res = measure_runtimes(list(dict.fromkeys(runtimes)), images, labels, batch_sizes=batch_sizes, model=model,
                           onnx_path=art.onnx, engine_path=art.engine, threads=threads, device=device,
                           warmup=warmup, repeats=repeats)
    res.update(artifact={k: str(v) if v is not None else None for k, v in
                         (("kind", art.kind), ("run_dir", art.run_dir), ("model_dir", art.model_dir),
                          ("onnx", art.onnx), ("engine", art.engine))},
               data=where, num_images=int(len(labels)), batch_sizes=list(batch_sizes), threads=threads,
               device=device)
    return res
