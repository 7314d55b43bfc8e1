"""Reading run directories: the one module (besides :mod:`vitopt.pipeline`, which writes them) that knows
their layout and their recipe.

A run directory (``recipe.yaml`` + ``NN_stage`` folders, each with ``metrics.json`` when finished)
yields its last saved model (``NN_stage/model``), last exported ONNX (``NN_export/model.onnx``), last
quantized ONNX per precision, last engine and last Torch-TensorRT program (``.ep``); a model folder
(``arch.json``), an ``.onnx``, an ``.engine``/``.plan`` or an ``.ep`` file yields itself plus, when it
sits inside a run directory, that run's files.
The validation data of a run is rebuilt from its recipe here, so :mod:`vitopt.deploy` only ever
receives models, paths and arrays.

Public entry points (also exported as ``vitopt.load``, ``vitopt.validate``): :func:`load`,
:func:`validate`, :func:`bundle`, :func:`resolve_artifact`, :func:`model_dir`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from vitopt.arch.config import ARCH_FILE, load_pruned, preprocessing_of
from vitopt.deploy.bundle import write_bundle
from vitopt.deploy.sample import load_sample
from vitopt.deploy.validation import check_artifacts, measure_runtimes
from vitopt.errors import VitoptError
from vitopt.io import read_json
from vitopt.recipe import Recipe, load_recipe
from vitopt.stages.base import MODEL_DIR, RECIPE_FILE, STAGE_GLOB
from vitopt.train.data import load_data, val_arrays
from vitopt.train.inputs import model_input

__all__ = ["Artifact", "resolve_artifact", "model_dir", "first_model_dir", "load", "run_recipe", "validation_data",
           "host_numbers", "validate", "bundle", "ENGINE_SUFFIXES", "PROGRAM_SUFFIX"]

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
#: a Torch-TensorRT program (ExportedProgram) saved by the torch_tensorrt build backend.
PROGRAM_SUFFIX = ".ep"


@dataclass
class Artifact:
    """Resolved files of one artifact path.

    Attributes:
        kind: ``"run"``, ``"model"``, ``"onnx"``, ``"engine"`` or ``"program"`` (what the path itself is).
        path: the path given.
        run_dir: the enclosing run directory (has ``recipe.yaml``), or None.
        model_dir: a model folder (``arch.json`` + weights), or None.
        onnx: an fp32 ONNX file, or None.
        quantized: precision -> quantized ONNX of the run (``int8``, ``fp16``...).
        engine: a TensorRT engine file, or None.
        program: a Torch-TensorRT program (``.ep``), or None.
    """

    kind: str
    path: Path
    run_dir: Path | None = None
    model_dir: Path | None = None
    onnx: Path | None = None
    quantized: dict[str, Path] = field(default_factory=dict)
    engine: Path | None = None
    program: Path | None = None


def _last(paths) -> Path | None:
    paths = sorted(paths)
    return paths[-1] if paths else None


def _run_files(run_dir: Path, art: Artifact) -> None:
    art.run_dir = run_dir
    if art.model_dir is None:
        m = _last(run_dir.glob(f"{STAGE_GLOB}/{MODEL_DIR}/{ARCH_FILE}"))
        art.model_dir = m.parent if m else None
    if art.onnx is None:
        art.onnx = _last(run_dir.glob(f"{STAGE_GLOB}/model.onnx"))
    for p in sorted(run_dir.glob(f"{STAGE_GLOB}/model_*.onnx")):
        art.quantized[p.stem.split("_", 1)[1]] = p
    if art.engine is None and art.kind == "run":
        art.engine = _last(p for s in ENGINE_SUFFIXES for p in run_dir.glob(f"{STAGE_GLOB}/*{s}"))
    if art.program is None and art.kind == "run":
        art.program = _last(run_dir.glob(f"{STAGE_GLOB}/*{PROGRAM_SUFFIX}"))


def _enclosing_run(path: Path) -> Path | None:
    for parent in list(path.parents)[:3]:
        if (parent / RECIPE_FILE).is_file():
            return parent
    return None


def resolve_artifact(path: str | os.PathLike) -> Artifact:
    """Resolve a run directory, model folder, ``.onnx`` or engine file (see the module docstring).

    Raises:
        VitoptError: the path does not exist or is none of these.
    """
    p = Path(path)
    if not p.exists():
        raise VitoptError(f"{p} does not exist; give a run directory, a model folder, an .onnx or an .engine file.")
    if p.is_dir() and (p / RECIPE_FILE).is_file():
        art = Artifact("run", p)
        _run_files(p, art)
        return art
    if p.is_dir() and (p / ARCH_FILE).is_file():
        art = Artifact("model", p, model_dir=p)
    elif p.is_file() and p.suffix == ".onnx":
        art = Artifact("onnx", p, onnx=p)
    elif p.is_file() and p.suffix in ENGINE_SUFFIXES:
        art = Artifact("engine", p, engine=p)
    elif p.is_file() and p.suffix == PROGRAM_SUFFIX:
        art = Artifact("program", p, program=p)
    else:
        raise VitoptError(f"{p} is not a run directory, a model folder (arch.json), an .onnx file, an engine "
                          f"({', '.join(ENGINE_SUFFIXES)}) or a Torch-TensorRT program ({PROGRAM_SUFFIX}).")
    run = _enclosing_run(p.resolve())
    if run is not None:
        _run_files(run, art)
    return art


# ------------------------------------------------------------------------------------ models
def model_dir(path: str | os.PathLike) -> Path:
    """A model folder as given, or the last saved model of a run directory.

    Raises:
        VitoptError: ``path`` holds no ``arch.json`` and no stage model.
    """
    path = Path(path)
    if path.name == ARCH_FILE and path.is_file():
        return path.parent
    if (path / ARCH_FILE).is_file():
        return path
    candidates = sorted(path.glob(f"{STAGE_GLOB}/{MODEL_DIR}/{ARCH_FILE}")) if path.is_dir() else []
    if not candidates:
        raise VitoptError(f"{path} holds no {ARCH_FILE} (give a model folder with {ARCH_FILE} + model.safetensors, "
                          "or a run directory).")
    return candidates[-1].parent


def first_model_dir(path: str | os.PathLike) -> Path:
    """A model folder as given, or the FIRST saved model of a run directory (its dense widths).

    Raises:
        VitoptError: as :func:`model_dir`.
    """
    path = Path(path)
    last = model_dir(path)
    if last == path or path.name == ARCH_FILE:
        return last
    return sorted(path.glob(f"{STAGE_GLOB}/{MODEL_DIR}/{ARCH_FILE}"))[0].parent


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a (pruned) timm model from a model folder, its ``arch.json``, or a run directory (its last model).

    Args:
        path: a folder with ``arch.json`` + ``model.safetensors`` (what :func:`vitopt.save` writes), the
            path of that ``arch.json``, or a run directory written by ``vitopt run``.

    Returns:
        The timm model in eval mode, on CPU, with the stored weights.

    Raises:
        VitoptError: no model at ``path``, malformed files, an unknown family or model, or weights that
            do not match the architecture (see :func:`vitopt.arch.config.load_pruned`).
    """
    return load_pruned(model_dir(path))


# ------------------------------------------------------------------------------------ runs
def run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The resolved recipe a run directory was made with (its ``recipe.yaml``).

    Raises:
        VitoptError: ``run_dir`` has no readable ``recipe.yaml``.
    """
    return load_recipe(Path(run_dir) / RECIPE_FILE)


def validation_data(run_dir: str | os.PathLike, model: nn.Module,
                    samples: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """The validation split of a run, preprocessed for ``model``, as arrays.

    Args:
        run_dir: a run directory.
        model: the model the images are prepared for (channels, size, mean/std of the recipe).
        samples: keep the first ``samples`` images (None: all).

    Returns:
        ``(images float32 [N, C, H, W], labels int64 [N], class names, description)``.

    Raises:
        VitoptError: no recipe, or the recipe's data cannot be loaded (missing folders...).
    """
    recipe = run_recipe(run_dir)
    bundle = load_data(recipe.data, model_input(model, recipe.data.mean, recipe.data.std), recipe.seed)
    images, labels = val_arrays(bundle)
    if samples is not None:
        images, labels = images[:samples], labels[:samples]
    return images, labels, list(bundle.class_names), f"{bundle.name} validation split of {run_dir}"


def host_numbers(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last ``validate`` stage's threads, FLOPs, params and per-runtime results of a run, or None."""
    for path in reversed(sorted(Path(run_dir).glob(f"{STAGE_GLOB}/metrics.json"))):
        rec = read_json(path, "stage metrics file")
        if rec.get("type") == "validate":
            m = rec["metrics"]
            return {"stage": rec["stage"], "threads": m.get("threads"),
                    "final": {k: m["final"].get(k) for k in ("flops", "params", "runtimes")}}
    return None


# ------------------------------------------------------------------------------------ public verbs
def validate(artifact: str | os.PathLike, runtimes: Sequence[str] = ("onnxruntime",), *,
             data: str | os.PathLike | tuple[np.ndarray, np.ndarray] | None = None,
             batch_sizes: Sequence[int] = (1, 32), threads: int = 2, device: str = "cpu", warmup: int = 10,
             repeats: int = 50) -> dict[str, Any]:
    """Top-1, agreement with PyTorch and latency of an artifact on one or more runtimes (``vitopt validate``).

    Args:
        artifact: a run directory, model folder, ``.onnx``, engine or ``.ep`` file. Inside a run directory the
            run's last saved model is the PyTorch reference and its recipe gives the validation data.
        runtimes: runtime kinds (:data:`vitopt.deploy.runtimes.RUNTIMES`); each needs its artifact.
        data: validation images: a sample ``.npz`` (``images`` float32 ``[N, C, H, W]``, model-ready,
            and ``labels`` ``[N]``), an ``(images, labels)`` pair of arrays, or None for the run's
            validation split.
        batch_sizes: latency batch sizes.
        threads: CPU intra-op threads; device: ``cpu``/``cuda`` for the PyTorch runtimes.
        warmup, repeats: untimed and timed calls per batch size.

    Returns:
        :func:`vitopt.deploy.validation.measure_runtimes`' result plus ``"artifact"`` (resolved paths),
        ``"data"``, ``"num_images"``, ``"batch_sizes"``, ``"threads"``, ``"device"``.

    Raises:
        VitoptError: a missing/unknown artifact, an unknown runtime, a runtime whose artifact is
            absent, no validation data, or a runtime's own error.
    """
    runtimes = list(dict.fromkeys(runtimes))
    art = resolve_artifact(artifact)
    check_artifacts(runtimes, {"model": art.model_dir, "onnx": art.onnx, "engine": art.engine,
                               "program": art.program}, str(art.path))
    model = load_pruned(art.model_dir).eval() if art.model_dir is not None else None
    if isinstance(data, tuple):
        images, labels, where = np.asarray(data[0], dtype=np.float32), np.asarray(data[1]), "given arrays"
    elif data is not None:
        images, labels = load_sample(data)
        where = str(data)
    elif art.run_dir is not None and model is not None:
        images, labels, _, where = validation_data(art.run_dir, model)
    else:
        raise VitoptError(f"{art.path} has no validation data: pass --data SAMPLE.npz (images, labels) or give an "
                          "artifact inside a run directory.")
    res = measure_runtimes(runtimes, images, labels, batch_sizes=list(batch_sizes), model=model, onnx_path=art.onnx,
                           engine_path=art.engine, program_path=art.program, threads=threads, device=device,
                           warmup=warmup, repeats=repeats)
    res.update(artifact={k: str(v) if v is not None else None for k, v in
                         (("kind", art.kind), ("run_dir", art.run_dir), ("model_dir", art.model_dir),
                          ("onnx", art.onnx), ("engine", art.engine), ("program", art.program))},
               data=where, num_images=int(len(labels)), batch_sizes=list(batch_sizes), threads=threads,
               device=device)
    return res


def bundle(run_dir: str | os.PathLike, target: str, out_dir: str | os.PathLike | None = None, *,
           precision: str | None = None, samples: int = 512, trt_major: int | None = None,
           profile: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Write a deployment bundle for ``target`` from a finished run (``vitopt deploy bundle``).

    Gathers the run's ONNX (and quantized variants), the first ``samples`` validation images, the
    host's validate numbers and the model's preprocessing record (from its ``arch.json``), then calls :func:`vitopt.deploy.bundle.write_bundle`.

    Args:
        run_dir: a run directory with an export stage.
        target: target profile key (``orin-agx``...).
        out_dir: destination folder; default ``RUN_DIR/bundle-<target>``.
        precision, trt_major, profile: as :func:`vitopt.deploy.bundle.write_bundle`.
        samples: validation images in ``sample.npz`` (>= 1).

    Returns:
        the ``bundle.json`` manifest plus ``"path"``.

    Raises:
        VitoptError: not a run directory, no exported ONNX, ``samples`` < 1, or what ``write_bundle`` raises.
    """
    art = resolve_artifact(run_dir)
    if art.kind != "run":
        raise VitoptError(f"{run_dir} is not a run directory (no {RECIPE_FILE}); deploy bundle needs a finished run.")
    if art.onnx is None or art.model_dir is None:
        raise VitoptError(f"run {run_dir} has no exported ONNX model; add an export stage and run it again.")
    if not isinstance(samples, int) or samples < 1:
        raise VitoptError(f"samples must be a positive integer; got {samples!r}.")
    model = load_pruned(art.model_dir)
    images, labels, names, _ = validation_data(art.run_dir, model, samples)
    out = Path(out_dir) if out_dir else art.run_dir / f"bundle-{target}"
    return write_bundle(target, out, onnx=art.onnx, quantized=art.quantized, images=images, labels=labels,
                        class_names=names, model_name=art.run_dir.name, host=host_numbers(art.run_dir),
                        precision=precision, trt_major=trt_major, profile=profile,
                        preprocessing=preprocessing_of(model))
