"""The benchmark scripts in benchmarks/ run end to end in --quick mode on a tiny ViT (in-process).

``speedup.py`` and ``parity.py`` are called through their ``main(argv)`` with one FLOPs target,
one thread and a handful of timed calls, writing JSON into a temp folder. The Torch-Pruning parts
need the optional ``bench`` extra (``pip install -e ".[bench]"``); without it the scripts skip the
``tp*`` variants and record why, and the Torch-Pruning tests here are skipped with that reason.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import parity  # noqa: E402
import speedup  # noqa: E402

TARGET = 0.5
TP_OK, TP_MSG = common.tp_status()
needs_tp = pytest.mark.skipif(not TP_OK, reason=f"Torch-Pruning parts skipped: {TP_MSG}")
VITOPT_VARIANTS = ("vitopt", "vitopt+embed")
TP_VARIANTS = ("tp", "tp-bottleneck")
FAST = ["--quick", "--threads", "1", "--targets", str(TARGET)]


@pytest.fixture(scope="module")
def speedup_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "speedup.json"
    payload = speedup.main([*FAST, "--warmup", "1", "--repeats", "3", "--budget-s", "0.2", "--tp-grid", "5",
                            "--tp-max-iter", "4", "--no-cuda", "--out", str(out)])
    assert out.is_file()
    doc = json.loads(out.read_text())
    assert [(r["variant"], r["target"]) for r in doc["rows"]] == [(r["variant"], r["target"]) for r in payload["rows"]]
    return doc


@pytest.fixture(scope="module")
def parity_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "parity.json"
    parity.main([*FAST, "--samples", "8", "--batch", "4", "--tp-grid", "5", "--tp-max-iter", "4", "--out", str(out)])
    return json.loads(out.read_text())


def _rows(doc, variant):
    return [r for r in doc["rows"] if r["variant"] == variant]


def test_speedup_quick_vitopt_rows(speedup_json):
    doc = speedup_json
    assert doc["script"] == "speedup" and doc["environment"]["torch"] == torch.__version__
    assert doc["latency_keys"] == ["ort_cpu_b1", "ort_cpu_b32", "torch_cpu_b1", "torch_cpu_b32"]
    (dense,) = _rows(doc, "dense")
    assert dense["target"] is None and dense["flops_ratio"] == 1.0
    # the analytic counter agrees with torch.utils.flop_counter (eager attention)
    assert dense["flops_counter"] == dense["flops"]
    for variant in VITOPT_VARIANTS:
        (row,) = _rows(doc, variant)
        assert row["target"] == TARGET and row["tool"] == "vitopt"
        assert row["flops_ratio"] <= TARGET + 0.01
        assert row["flops"] < dense["flops"] and row["params"] < dense["params"]
        assert row["dims"]["head_dim_uniform_in_block"]
        assert "error" not in row["onnx"], row["onnx"]
        for key in doc["latency_keys"]:
            assert row["latency_ms"][key] > 0
            assert math.isfinite(row["efficiency"][key])
    if not TP_OK:
        assert set(doc["tp_skipped"]) == set(TP_VARIANTS)


@needs_tp
def test_speedup_quick_torch_pruning_rows(speedup_json):
    doc = speedup_json
    dense = _rows(doc, "dense")[0]
    for variant in TP_VARIANTS:
        (row,) = _rows(doc, variant)
        assert row["tool"] == "torch-pruning" and "error" not in row, row.get("error")
        info = row["prune"]
        assert 0.0 < info["ratio"] < 1.0 and info["trials"]
        # same counter for both tools: the searched FLOPs are the reported FLOPs
        assert row["flops_ratio"] == pytest.approx(info["achieved"])
        assert row["flops_counter"] == row["flops"]
        assert abs(row["flops_ratio"] - TARGET) < 0.1
        assert row["dims"]["head_dim_uniform_in_block"]
        if variant == "tp-bottleneck":
            assert row["dims"]["embed"] == dense["dims"]["embed"]  # fc2 ignored: residual width kept
    pairs = {(w["vitopt"], w["tp"]) for w in doc["winners"]}
    assert ("vitopt", "tp-bottleneck") in pairs and ("vitopt+embed", "tp") in pairs
    for w in doc["winners"]:
        for _key, f in w["faster"].items():
            assert f is None or f["tool"] in (w["vitopt"], w["tp"])


def test_parity_quick_vitopt(parity_json):
    doc = parity_json
    assert doc["script"] == "parity"
    for variant in ("dense", *VITOPT_VARIANTS):
        (row,) = _rows(doc, variant)
        assert "error" not in row, row.get("error")
        assert row["max_abs_diff"] <= 1e-4 and row["argmax_agreement"] == 1.0 and row["pass"]
        if variant != "dense":
            assert row["flops_ratio"] <= TARGET + 0.01


@needs_tp
def test_parity_quick_torch_pruning(parity_json):
    for variant in TP_VARIANTS:
        (row,) = _rows(parity_json, variant)
        # an export failure would be recorded as a result; on the tiny ViT both export and match
        assert "error" not in row, row.get("error")
        assert row["max_abs_diff"] <= 1e-4 and row["argmax_agreement"] == 1.0


def test_common_helpers(tmp_path):
    assert common.fmt_pm([1.0, 3.0]) == "2.0 ± 1.0"
    assert common.fmt_pm([2.0]) == "2.0"
    assert common.fmt(None) == "-" and common.fmt(float("nan")) == "-"
    assert common.ratio(1.0, 0.0) is None
    path = common.write_json(tmp_path / "x.json", {"v": float("nan"), "t": torch.tensor([1.5])}, script="t", argv=[])
    doc = json.loads(path.read_text())
    assert doc["v"] is None and doc["t"] == [1.5] and doc["argv"] == []
