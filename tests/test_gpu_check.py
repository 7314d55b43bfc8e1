"""benchmarks/gpu_check.py: the dry-run plan, the run's skeleton without CUDA, interleaved timing on a clock
stand-in, and the steps that also run on CPU (models with kernel rules, the validate stage)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402


def test_dry_run_lists_every_step_with_an_estimate_and_fits_8_minutes(capsys):
    plan = gpu_check.main(["--dry-run"])["plan"]
    assert [r["step"] for r in plan] == [s[0] for s in gpu_check.STEPS]
    assert all(isinstance(r["estimate_s"], int) and r["estimate_s"] > 0 for r in plan)
    without_trt = sum(r["estimate_s"] for r in plan if r["step"] != "tensorrt")
    assert without_trt <= gpu_check.BUDGET_S < 8 * 60        # no TensorRT on the GPU machine: within budget
    out = capsys.readouterr().out
    assert all(r["step"] in out for r in plan) and "total estimate" in out
    if not torch.cuda.is_available():
        assert all(r["here"] == "skip: no CUDA device is visible" for r in plan if r["needs"] != "-")


def test_dry_run_as_a_script_needs_no_vitopt_import(tmp_path):
    res = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(" s  ") >= len(gpu_check.STEPS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the full check would run")
def test_without_cuda_the_run_records_why_and_writes_both_files(tmp_path):
    out = tmp_path / "gc.json"
    res = gpu_check.main(["--out", str(out), "--steps", "environment,models,eager,compile"])
    doc = json.loads(out.read_text())
    assert doc["steps"]["environment"]["status"] == "ok" and doc["environment"]["cuda_available"] is False
    for name in ("models", "eager", "compile"):
        assert doc["steps"][name] == {"estimate_s": dict((s[0], s[1]) for s in gpu_check.STEPS)[name],
                                      "status": "skipped", "reason": "no CUDA device is visible"}
    assert doc["steps"]["ddp"]["reason"] == "not in --steps"
    md = out.with_suffix(".md").read_text()
    assert "| models | skipped |" in md and res["total_seconds"] >= doc["steps"]["environment"]["seconds"] >= 0


class _Clock:
    """torch.cuda stand-in: events read a clock that the timed callables advance."""

    def __init__(self):
        self.t = 0.0
        clock = self

        class Event:
            def __init__(self, enable_timing=True):
                self.at = None

            def record(self):
                self.at = clock.t

            def elapsed_time(self, end):
                return end.at - self.at

        self.cuda = types.SimpleNamespace(Event=Event, synchronize=lambda: None)


def test_interleaved_rounds_and_ratios_on_a_clock():
    clock = _Clock()
    order = []

    def fn(name, ms):
        def call():
            order.append(name)
            clock.t += ms
        return call

    res = gpu_check.interleaved(clock, {"dense": fn("dense", 4.0), "half": fn("half", 2.0), "third": fn("third", 1.0)},
                                rounds=3, reps=2, warmup=1)
    assert res["dense"]["p50_ms"] == 4.0 and res["half"]["round_medians"] == [2.0, 2.0, 2.0]
    assert res["ratios"]["half"] == {"median": 0.5, "min": 0.5, "max": 0.5} and res["ratios"]["third"]["median"] == 0.25
    # interleaved: each round runs every model (warm-up + timed calls) before the next round starts
    assert order[:9] == ["dense"] * 3 + ["half"] * 3 + ["third"] * 3


def test_models_step_prunes_to_the_flops_targets_within_the_kernel_rules(monkeypatch):
    monkeypatch.setattr(gpu_check, "SIZES", {"tiny": ("deit_tiny_patch16_224", dict(
        img_size=32, patch_size=8, embed_dim=256, depth=2, num_heads=4, num_classes=10), 32)})
    check = gpu_check.Check(gpu_check.parse_args([]))
    res = check.step_models()
    assert set(res) == {"tiny_dense", "tiny_50%", "tiny_30%"} and set(check.models) == set(res)
    assert res["tiny_dense"]["flops_ratio"] == 1.0
    for label, frac in (("50%", 0.5), ("30%", 0.3)):
        r = res[f"tiny_{label}"]
        assert r["flops_ratio"] <= frac + 1e-9 and r["kernel_rule_violations"] == []
        assert all(m % 8 == 0 for m in r["mlp"])                  # h100 fp16: GEMM K/N multiples of 8


def test_validate_stage_step_runs_the_stage(monkeypatch):
    check = gpu_check.Check(gpu_check.parse_args([]))
    check.device = "cpu"                                       # the same stage call, on CPU and smaller here
    check.validate_setup = {"model": "deit_tiny_patch16_224", "images": 32, "batch_sizes": [1, 8], "warmup": 1,
                            "repeats": 3, "kwargs": dict(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                         num_heads=2, num_classes=10)}
    metrics = check.step_validate_stage()
    assert metrics["device"] == "cpu" and metrics["num_images"] == 32
    assert set(metrics["final"]["runtimes"]["pytorch"]["latency"]) == {"1", "8"}
    assert metrics["final"]["flops"] > 0


#: what gpu_check imports directly (the rest of the closure follows from their metadata)
GPU_ROOTS = ["timm", "pydantic", "pyyaml", "typer", "rich", "safetensors", "onnx", "onnxruntime", "onnxsim"]
#: what a PyTorch installation already brings
WITH_TORCH = {"torch", "torchvision", "numpy", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2",
              "markupsafe", "filelock", "fsspec", "triton", "setuptools", "pillow"}


def _norm(name):
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def test_gpu_requirements_pin_the_whole_closure_at_the_tested_versions():
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
    closure, stack = {}, list(GPU_ROOTS)
    while stack:
        name = _norm(stack.pop())
        if name in closure or name in WITH_TORCH or name.startswith("nvidia-"):
            continue
        dist = md.distribution(name)
        closure[name] = dist.version
        stack += [Requirement(r).name for r in dist.requires or []
                  if not Requirement(r).marker or Requirement(r).marker.evaluate(env)]
    pins = {}
    for line in (BENCH / "gpu_requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[_norm(req.name)] = next(iter(req.specifier)).version
    assert pins == closure


def test_the_check_imports_nothing_outside_the_requirements():
    """Importing vitopt and every module gpu_check uses pulls in no package missing from gpu_requirements.txt."""
    code = ("import sys, gpu_check, vitopt, vitopt.stages.validate, vitopt.deploy.doctor, vitopt.deploy.kernel_rules, "
            "vitopt.sparsity.semi24, vitopt.deploy.tensorrt_build; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    import os

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{BENCH.parent}:{BENCH}"})
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = set(res.stdout.split())
    for heavy in ("sklearn", "scipy", "matplotlib", "onnxscript", "tensorboard", "torch_pruning"):
        assert heavy not in loaded, f"{heavy} is imported but not in gpu_requirements.txt"
