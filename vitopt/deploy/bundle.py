"""``vitopt deploy bundle``: a folder to copy to a Jetson (or any TensorRT host) that builds and measures there.

Contents (see ``deploy/jetson/README.md``): the run's fp32 ONNX and its quantized variants, a
validation sample (``sample.npz``: model-ready float32 images and int64 labels), ``labels.txt``, one
``build_<target>_<precision>.sh`` trtexec command per precision the target and the graphs allow,
``bundle.json`` (target profile, the derived build settings per precision, batch sizes, the host's
validate numbers) and the standalone ``vitopt_jetson.py`` (Python + NumPy + TensorRT only).
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from vitopt.deploy.artifacts import resolve_artifact
from vitopt.deploy.targets import get_target
from vitopt.deploy.tensorrt_build import (
    BuildConfig,
    check_graph_precision,
    derive_build_config,
    onnx_info,
    trtexec_command,
)
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

__all__ = ["write_bundle", "KIT_DIR", "BUNDLE_FORMAT"]

#: the standalone kit shipped at the repository's top level.
KIT_DIR = Path(__file__).resolve().parents[2] / "deploy" / "jetson"
KIT_FILES = ("vitopt_jetson.py", "README.md")
BUNDLE_FORMAT = "vitopt-bundle/1"
_ORDER = ("fp16", "int8", "fp8", "bf16", "fp32")


def _val_sample(run_dir: Path, model_dir: Path, samples: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from vitopt.arch.config import load_pruned
    from vitopt.recipe import load_recipe
    from vitopt.train.data import load_data, model_input, val_arrays

    recipe = load_recipe(run_dir / "recipe.yaml")
    model = load_pruned(model_dir)
    data = load_data(recipe.data, model_input(model, recipe.data.mean, recipe.data.std), recipe.seed)
    images, labels = val_arrays(data)
    return images[:samples], labels[:samples], list(data.class_names)


def _host_numbers(run_dir: Path) -> dict[str, Any] | None:
    recs = sorted(run_dir.glob("[0-9][0-9]_*/metrics.json"))
    for path in reversed(recs):
        rec = read_json(path, "stage metrics file")
        if rec.get("type") == "validate":
            m = rec["metrics"]
            return {"stage": rec["stage"], "threads": m.get("threads"),
                    "final": {k: m["final"].get(k) for k in ("flops", "params", "runtimes")}}
    return None


def _builds(target, onnx: Path, quantized: dict[str, Path], trt_major: int | None,
            profile: tuple[int, int, int] | None) -> dict[str, tuple[BuildConfig, Path]]:
    """(build config, ONNX) per precision that the target runs and the run's graphs carry."""
    builds = {}
    for precision in _ORDER:
        if precision not in target.precisions:
            continue
        source = quantized.get(precision) if precision in ("int8", "fp8", "fp16", "bf16") else None
        if precision in ("int8", "fp8") and source is None:
            continue
        info = onnx_info(onnx)
        cfg = derive_build_config(target, precision, input_name=info.input_name, input_chw=info.input_chw,
                                  trt_major=trt_major, profile=profile, fixed_batch=info.batch)
        path = source if (source is not None and (cfg.strongly_typed or precision in ("int8", "fp8"))) else onnx
        try:
            check_graph_precision(cfg, onnx_info(path))
        except VitoptError:
            continue
        builds[precision] = (cfg, path)
    return builds


def write_bundle(run_dir: str | os.PathLike, target: str, out_dir: str | os.PathLike | None = None, *,
                 precision: str | None = None, samples: int = 512, trt_major: int | None = None,
                 profile: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Write a deployment bundle for ``target`` from a finished run (needs an export stage).

    Args:
        run_dir: a run directory written by ``vitopt run``.
        target: target profile key (``orin-agx``...).
        out_dir: destination folder; default ``RUN_DIR/bundle-<target>``.
        precision: the precision the script builds by default; default fp16 (fp32 where fp16 is
            not buildable from the run's graphs).
        samples: validation images in ``sample.npz`` (the first N of the validation split).
        trt_major: TensorRT line; default the target's (Jetson: 10).
        profile: ``(min, opt, max)`` batch; default the target's.

    Returns:
        the ``bundle.json`` manifest plus ``"path"`` (the folder).

    Raises:
        VitoptError: not a run directory, no exported ONNX, an unknown target, a precision the target
            or the run's graphs cannot build, ``samples`` < 1, or the kit files missing.
    """
    art = resolve_artifact(run_dir)
    if art.kind != "run":
        raise VitoptError(f"{run_dir} is not a run directory (no recipe.yaml); deploy bundle needs a finished run.")
    if art.onnx is None or art.model_dir is None:
        raise VitoptError(f"run {run_dir} has no exported ONNX model; add an export stage and run it again.")
    if not isinstance(samples, int) or samples < 1:
        raise VitoptError(f"samples must be a positive integer; got {samples!r}.")
    t = get_target(target)
    builds = _builds(t, art.onnx, art.quantized, trt_major, profile)
    default = precision or next((p for p in ("fp16", "fp32") if p in builds), None)
    if default not in builds:
        can = ", ".join(builds) or "none"
        raise VitoptError(f"run {run_dir} cannot be built at {default or 'fp16'} for {t.key} (buildable: {can}); "
                          "an int8/fp8 build needs a quantize stage of that precision, a TensorRT 11 fp16 build "
                          "a quantize stage with precision fp16.")
    missing = [f for f in KIT_FILES if not (KIT_DIR / f).is_file()]
    if missing:
        raise VitoptError(f"the Jetson kit files {missing} are missing from {KIT_DIR}; reinstall vitopt from source.")
    out = Path(out_dir) if out_dir else art.run_dir / f"bundle-{t.key}"
    out.mkdir(parents=True, exist_ok=True)
    images, labels, names = _val_sample(art.run_dir, art.model_dir, samples)
    buf = out / "sample.npz"
    with open(buf.with_suffix(".tmp"), "wb") as f:
        np.savez_compressed(f, images=images.astype(np.float32), labels=labels.astype(np.int64))
    os.replace(buf.with_suffix(".tmp"), buf)
    atomic_write_text(out / "labels.txt", "\n".join(names) + "\n")
    manifest_builds: dict[str, dict[str, Any]] = {}
    for p, (cfg, src) in builds.items():
        atomic_write_bytes(out / src.name, src.read_bytes())
        cmd = shlex.join(trtexec_command(cfg, src.name, f"{t.key}_{p}.engine", "timing.cache"))
        atomic_write_text(out / f"build_{t.key}_{p}.sh", "#!/bin/sh\n# built for " + t.name + "\n" + cmd + "\n")
        manifest_builds[p] = {"onnx": src.name, "config": cfg.to_json(), "trtexec": cmd}
    for f in KIT_FILES:
        shutil.copyfile(KIT_DIR / f, out / f)
    manifest = {"format": BUNDLE_FORMAT, "target": t.key, "target_profile": t.model_dump(mode="json"),
                "model": art.run_dir.name, "default_precision": default, "builds": manifest_builds,
                "batch_sizes": list(t.batch_sizes), "sample": "sample.npz", "num_images": int(len(labels)),
                "labels": "labels.txt", "host": _host_numbers(art.run_dir)}
    atomic_write_json(out / "bundle.json", manifest)
    return {**manifest, "path": str(out)}
