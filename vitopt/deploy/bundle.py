"""``vitopt deploy bundle``: a folder to copy to a Jetson (or any TensorRT host) that builds and measures there.

Contents (see ``vitopt/deploy/jetson_kit/README.md``): the run's fp32 ONNX and its quantized variants, a
validation sample (``sample.npz``: model-ready float32 images and int64 labels), ``labels.txt``, one
``build_<target>_<precision>.sh`` trtexec command per precision the target and the graphs allow,
``bundle.json`` (target profile, the derived build settings per precision, batch sizes, the host's
validate numbers, the model's input preprocessing and class names), the standalone ``vitopt_jetson.py``
(Python + NumPy + TensorRT only) and its ``requirements.txt``. The kit files ship inside the package (package
data), so a wheel install finds them as well as a source checkout.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from vitopt.deploy.sample import save_sample
from vitopt.deploy.targets import get_target
from vitopt.deploy.tensorrt_build import (
    BuildConfig,
    check_graph_precision,
    derive_build_config,
    onnx_info,
    trtexec_command,
)
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["write_bundle", "KIT_DIR", "BUNDLE_FORMAT"]

#: the standalone kit, shipped as package data (``pyproject.toml`` ``[tool.setuptools.package-data]``).
KIT_DIR = Path(__file__).resolve().parent / "jetson_kit"
KIT_FILES = ("vitopt_jetson.py", "README.md", "requirements.txt")
BUNDLE_FORMAT = "vitopt-bundle/1"
_ORDER = ("fp16", "int8", "fp8", "bf16", "fp32")


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


def write_bundle(target: str, out_dir: str | os.PathLike, *, onnx: Path, images: np.ndarray, labels: np.ndarray,
                 class_names: list[str], quantized: dict[str, Path] | None = None, model_name: str = "model",
                 host: dict[str, Any] | None = None, precision: str | None = None,
                 trt_major: int | None = None, profile: tuple[int, int, int] | None = None,
                 preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a deployment bundle for ``target`` into ``out_dir``.

    Args:
        target: target profile key (``orin-agx``...).
        out_dir: destination folder (created).
        onnx: the fp32 ONNX model.
        images, labels: validation sample, float32 ``[N, C, H, W]`` model-ready and int ``[N]``.
        class_names: class names, index = label (``labels.txt``).
        quantized: precision -> quantized ONNX (``int8``, ``fp16``...) from quantize stages.
        model_name: recorded in ``bundle.json`` (the run's name).
        host: the host's validate numbers (recorded for comparison on the device), or None.
        precision: the precision the script builds by default; default fp16 (fp32 where fp16 is
            not buildable from the graphs).
        trt_major: TensorRT line; default the target's (Jetson: 10).
        profile: ``(min, opt, max)`` batch; default the target's.
        preprocessing: the model's input preprocessing record (:func:`vitopt.arch.config.set_preprocessing`:
            input_size, mean, std, crop_pct, interpolation, image_mode, class_names), recorded in
            ``bundle.json`` so images on the device can be prepared as ``sample.npz`` was; or None.

    Returns:
        the ``bundle.json`` manifest plus ``"path"`` (the folder).

    Raises:
        VitoptError: an unknown target, a precision the target or the graphs cannot build, an empty
            sample, or the kit files missing.
    """
    if len(labels) < 1 or len(images) != len(labels):
        raise VitoptError(f"the bundle sample needs N >= 1 images and as many labels; got {len(images)} and "
                          f"{len(labels)}.")
    t = get_target(target)
    builds = _builds(t, Path(onnx), dict(quantized or {}), trt_major, profile)
    default = precision or next((p for p in ("fp16", "fp32") if p in builds), None)
    if default not in builds:
        can = ", ".join(builds) or "none"
        raise VitoptError(f"{model_name} cannot be built at {default or 'fp16'} for {t.key} (buildable: {can}); "
                          "an int8/fp8 build needs a quantize stage of that precision, a TensorRT 11 fp16 build "
                          "a quantize stage with precision fp16.")
    missing = [f for f in KIT_FILES if not (KIT_DIR / f).is_file()]
    if missing:
        raise VitoptError(f"the Jetson kit files {missing} are missing from {KIT_DIR}; reinstall vitopt.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_sample(out / "sample.npz", images, labels)
    atomic_write_text(out / "labels.txt", "\n".join(class_names) + "\n")
    manifest_builds: dict[str, dict[str, Any]] = {}
    for p, (cfg, src) in builds.items():
        atomic_write_bytes(out / src.name, src.read_bytes())
        cmd = shlex.join(trtexec_command(cfg, src.name, f"{t.key}_{p}.engine", "timing.cache"))
        atomic_write_text(out / f"build_{t.key}_{p}.sh", "#!/bin/sh\n# built for " + t.name + "\n" + cmd + "\n")
        manifest_builds[p] = {"onnx": src.name, "config": cfg.to_json(), "trtexec": cmd}
    for f in KIT_FILES:
        shutil.copyfile(KIT_DIR / f, out / f)
    manifest = {"format": BUNDLE_FORMAT, "target": t.key, "target_profile": t.model_dump(mode="json"),
                "model": model_name, "default_precision": default, "builds": manifest_builds,
                "batch_sizes": list(t.batch_sizes), "sample": "sample.npz", "num_images": int(len(labels)),
                "labels": "labels.txt", "host": host, "preprocessing": preprocessing}
    atomic_write_json(out / "bundle.json", manifest)
    return {**manifest, "path": str(out)}
