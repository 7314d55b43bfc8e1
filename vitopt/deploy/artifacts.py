"""What a path given to ``vitopt validate`` / ``vitopt deploy bundle`` holds: model, ONNX, engine, run.

A run directory (``recipe.yaml`` + ``NN_stage`` folders) yields its last saved model, last exported
ONNX (``NN_export/model.onnx``), last quantized ONNX per precision and last engine; a model folder
(``arch.json``), an ``.onnx`` or an ``.engine``/``.plan`` file yields itself plus, when it sits inside a
run directory, that run's recipe (for the validation data and the PyTorch reference).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitopt.errors import VitoptError

__all__ = ["Artifact", "resolve_artifact", "load_sample", "ENGINE_SUFFIXES"]

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
RECIPE_FILE = "recipe.yaml"


@dataclass
class Artifact:
    """Resolved files of one artifact path.

    Attributes:
        kind: ``"run"``, ``"model"``, ``"onnx"`` or ``"engine"`` (what the path itself is).
        path: the path given.
        run_dir: the enclosing run directory (has ``recipe.yaml``), or None.
        model_dir: a model folder (``arch.json`` + weights), or None.
        onnx: an fp32 ONNX file, or None.
        quantized: precision -> quantized ONNX of the run (``int8``, ``fp16``...).
        engine: a TensorRT engine file, or None.
    """

    kind: str
    path: Path
    run_dir: Path | None = None
    model_dir: Path | None = None
    onnx: Path | None = None
    quantized: dict[str, Path] = field(default_factory=dict)
    engine: Path | None = None


def _last(paths) -> Path | None:
    paths = sorted(paths)
    return paths[-1] if paths else None


def _run_files(run_dir: Path, art: Artifact) -> None:
    art.run_dir = run_dir
    if art.model_dir is None:
        m = _last(run_dir.glob("[0-9][0-9]_*/model/arch.json"))
        art.model_dir = m.parent if m else None
    if art.onnx is None:
        art.onnx = _last(run_dir.glob("[0-9][0-9]_*/model.onnx"))
    for p in sorted(run_dir.glob("[0-9][0-9]_*/model_*.onnx")):
        art.quantized[p.stem.split("_", 1)[1]] = p
    if art.engine is None and art.kind == "run":
        art.engine = _last(p for s in ENGINE_SUFFIXES for p in run_dir.glob(f"[0-9][0-9]_*/*{s}"))


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
    if p.is_dir() and (p / "arch.json").is_file():
        art = Artifact("model", p, model_dir=p)
    elif p.is_file() and p.suffix == ".onnx":
        art = Artifact("onnx", p, onnx=p)
    elif p.is_file() and p.suffix in ENGINE_SUFFIXES:
        art = Artifact("engine", p, engine=p)
    else:
        raise VitoptError(f"{p} is not a run directory, a model folder (arch.json), an .onnx file or an engine "
                          f"({', '.join(ENGINE_SUFFIXES)}).")
    run = _enclosing_run(p.resolve())
    if run is not None:
        _run_files(run, art)
    return art


def load_sample(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a validation sample ``.npz`` with ``images`` float32 ``[N, C, H, W]`` and ``labels`` int ``[N]``.

    Raises:
        VitoptError: a missing file, missing keys or mismatched shapes.
    """
    p = Path(path)
    if not p.is_file():
        raise VitoptError(f"sample file {p} does not exist.")
    try:
        with np.load(p, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except KeyError:
        raise VitoptError(f"sample file {p} must hold arrays 'images' [N, C, H, W] and 'labels' [N].") from None
    except Exception as exc:
        raise VitoptError(f"sample file {p} is not a readable .npz ({str(exc).splitlines()[0][:200]}).") from None
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels) or len(labels) == 0:
        raise VitoptError(f"sample file {p}: images {images.shape} and labels {labels.shape} must be [N, C, H, W] "
                          "and [N] with the same N >= 1.")
    return images.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)
