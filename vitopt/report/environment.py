"""The software and hardware a report (or a measurement) was made with.

:func:`collect_environment` gathers package versions (python, torch, timm, onnx, onnxruntime, ...),
the CPU model and core counts, the CUDA device when one is visible, the OS and the date. Package
versions are read from installed metadata, so nothing heavy is imported for them; torch is imported
only to ask for a CUDA device. Every probe is best-effort: what cannot be found reads
``"not installed"`` / ``"unknown"`` / ``"none"`` instead of raising.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

__all__ = ["collect_environment", "PACKAGES"]

#: distributions whose versions are reported, in display order.
PACKAGES = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy",
            "matplotlib", "vitopt")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cuda() -> dict[str, Any]:
    """``{"device": name or "none", "cuda": version or None, "count": n}``; never raises."""
    try:
        import torch
    except Exception:  # torch missing or broken: report it, do not fail the report
        return {"device": "none (torch not importable)", "cuda": None, "count": 0}
    try:
        if not torch.cuda.is_available():
            return {"device": "none", "cuda": torch.version.cuda, "count": 0}
        n = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        device = names[0] if len(set(names)) == 1 else ", ".join(names)
        return {"device": f"{n} x {device}" if n > 1 else device, "cuda": torch.version.cuda, "count": n}
    except Exception as exc:  # a broken driver must not break a report
        return {"device": f"unknown ({type(exc).__name__})", "cuda": None, "count": 0}


def collect_environment() -> dict[str, Any]:
    """Describe the machine and software this process runs on.

    Returns:
        A flat, JSON-serialisable dict with the keys ``date`` (UTC, ISO 8601), ``python``,
        ``platform`` (OS and architecture), ``cpu`` (model name), ``cpu_cores`` (logical cores of the
        machine), ``cpu_cores_usable`` (cores this process may run on), ``cuda_device`` (GPU name, or
        ``"none"``), ``cuda_version`` (the CUDA version torch was built with, or None), and one key
        per distribution in :data:`PACKAGES` whose value is its version or ``"not installed"``.

    Errors:
        None: every probe falls back to a placeholder string instead of raising.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    cuda = _cuda()
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "cuda_device": cuda["device"],
        "cuda_version": cuda["cuda"],
    }
    for dist in PACKAGES:
        env[dist] = _version(dist) or "not installed"
    env["python_executable"] = sys.executable
    return env
