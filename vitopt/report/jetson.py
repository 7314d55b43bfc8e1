"""Measurements taken on the device: the Jetson kit's ``results.json`` as a report measurement source.

``deploy/jetson/vitopt_jetson.py`` (copied by ``vitopt deploy bundle``) writes ``results.json`` with
``"format": "vitopt-jetson-results/1"``. Copied back into a run directory - ``RUN_DIR/results.json``
or ``RUN_DIR/<any folder>/results.json`` (e.g. the bundle folder) - it becomes one more entry of
:data:`vitopt.report.plots.MEASUREMENT_SOURCES`, so ``vitopt report`` plots the device's latency per
batch size and lists its top-1 beside the host's validate numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from vitopt.report.plots import MEASUREMENT_SOURCES, ModelMeasurement, RunData

__all__ = ["RESULTS_FORMAT", "find_results", "jetson_source", "register"]

RESULTS_FORMAT = "vitopt-jetson-results/1"


def find_results(run_dir: Path) -> list[Path]:
    """``results.json`` files of the Jetson kit in ``run_dir`` or one folder below, sorted by path.

    Files that are not JSON objects with ``format == RESULTS_FORMAT`` are ignored.
    """
    out = []
    for path in sorted([run_dir / "results.json", *run_dir.glob("*/results.json")]):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == RESULTS_FORMAT:
            out.append(path)
    return out


def _final_cost(run: RunData) -> tuple[float | None, float | None]:
    recs = run.of_type("validate")
    final = recs[-1]["metrics"].get("final", {}) if recs else {}
    return final.get("flops"), final.get("params")


def jetson_source(run: RunData) -> list[ModelMeasurement]:
    """One ``final`` measurement per device ``results.json`` of ``run``.

    The runtime key is ``"<runtime> <precision>"`` (e.g. ``"tensorrt fp16"``); latency stats keep the
    file's ``p50_ms``/``p90_ms``/``p99_ms``; FLOPs and params are the host's validate numbers of the
    same (final) model; ``source`` is the file's path relative to the run directory.
    """
    flops, params = _final_cost(run)
    out = []
    for path in find_results(run.path):
        data = json.loads(path.read_text(encoding="utf-8"))
        key = f"{data.get('runtime', 'tensorrt')} {data.get('precision', '')}".strip()
        latency = {int(b): s for b, s in (data.get("latency") or {}).items()}
        top1 = {key: float(data["top1"])} if data.get("top1") is not None else {}
        device = " / ".join(str(x) for x in (data.get("target"), data.get("device")) if x)
        out.append(ModelMeasurement(run=run.label, source=path.relative_to(run.path).as_posix(), model="final",
                                    flops=flops, params=params, top1=top1, latency={key: latency} if latency else {},
                                    device=device or None))
    return out


def register() -> None:
    """Append :func:`jetson_source` to ``MEASUREMENT_SOURCES`` once (after the validate source)."""
    if jetson_source not in MEASUREMENT_SOURCES:
        MEASUREMENT_SOURCES.append(jetson_source)
