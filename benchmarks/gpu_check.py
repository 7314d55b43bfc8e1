"""The prepared GPU check: every CUDA path of vitopt exercised and timed in one run of under 8 minutes.

Written for an H100/H200 machine that has PyTorch (with CUDA, Triton and cuSPARSELt) preinstalled but
no TensorRT and no package registry. The few small wheels it needs besides PyTorch are listed in
``benchmarks/gpu_requirements.txt``; ``make gpu-wheels`` downloads them for Python 3.12 into ``.whl/``
beforehand. On the GPU machine, from a copy of the repository::

    pip install --no-index --no-deps --find-links .whl -r benchmarks/gpu_requirements.txt
    PYTHONPATH=$PWD python benchmarks/gpu_check.py              # ~7.5 min, writes results/gpu_check.{json,md}
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --dry-run    # the steps and their time estimates only

Steps (``--dry-run`` lists them with their estimates; the estimates are this script's planning
numbers for an H100/H200, not measurements):

1. ``environment`` - Python, PyTorch, CUDA, GPU, the packages found.
2. ``models`` - random-init DeiT-S/16-224 and DeiT-B/16-224; ``vitopt.prune`` (``l1``, heads and MLP
   neurons, global ranking) to 50% and 30% of the dense FLOPs with ``round_to`` from
   ``vitopt.deploy.kernel_rules`` for the detected target at fp16 (the sizes TensorRT's fused
   kernels accept), so six models; FLOPs = 2 x MACs (vitopt's analytic counter).
3. ``eager`` - PyTorch CUDA eager, fp16 and bf16, batch 1, 64 and 256: for each (size, dtype, batch)
   the dense and the two pruned models are timed in interleaved rounds (each round times every
   model once: warm-up, then ``--reps`` calls, each bracketed by CUDA events), so drift hits all
   three alike; reported: median over rounds of each round's median ms, and the median and range of
   the per-round ratio pruned / dense.
4. ``sparse24`` - ``vitopt.sparsity.semi24.check_semi_structured`` on DeiT-B's fc1 weight (2:4 mask,
   ``torch.sparse.to_sparse_semi_structured``): agreement with the dense masked GEMM and both times.
5. ``ddp`` - one training step of DeiT-S under a 1-process NCCL ``DistributedDataParallel``.
6. ``validate_stage`` - vitopt's ``validate`` stage on CUDA (pytorch runtime) on synthetic data: the
   stage function itself, writing its metrics.json.
7. ``tensorrt`` - only when ``import tensorrt`` works: fp16 engines of dense and 50% DeiT-S for the
   detected target (``vitopt.deploy.tensorrt_build.build_engine``), top-1 parity and engine-only
   latency through the ``tensorrt`` runtime (``vitopt.validate``), and ``vitopt doctor`` on each
   engine. Without TensorRT the step is listed as skipped with the reason.
8. ``compile`` - ``torch.compile`` (inductor, batch marked dynamic) of the six models in fp16 then
   bf16, timed like ``eager``; compiling is the slow part, so each (model, dtype) is compiled only
   while the time left (``--budget-s``, default 450 s for the whole run) covers the compiles measured
   so far; the rest is listed as skipped for time.

Writes ``results/gpu_check.json`` (every number, the environment, each step's status and seconds) and
``results/gpu_check.md`` (the tables). Without CUDA it says so, runs the environment step and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: (name, estimate in seconds on an H100/H200, needs, what) - the plan ``--dry-run`` prints.
STEPS: list[tuple[str, int, str, str]] = [
    ("environment", 5, "-", "Python, PyTorch, CUDA, GPU and package versions"),
    ("models", 40, "cuda", "random-init DeiT-S and DeiT-B; vitopt.prune (l1, heads+mlp) to 50% and 30% FLOPs with "
                           "the target's kernel rules (fp16)"),
    ("eager", 75, "cuda", "PyTorch CUDA eager, fp16 + bf16, batch 1/64/256, 6 models, interleaved rounds, CUDA events"),
    ("sparse24", 20, "cuda", "2:4 kernel check: to_sparse_semi_structured on DeiT-B fc1 (fp16), correctness and "
                             "speed vs dense"),
    ("ddp", 20, "cuda", "one DeiT-S training step under 1-process nccl DistributedDataParallel"),
    ("validate_stage", 25, "cuda", "vitopt's validate stage on CUDA (pytorch runtime) on synthetic images"),
    ("tensorrt", 150, "cuda+tensorrt", "fp16 engines of DeiT-S dense / 50% for the detected target, tensorrt-runtime "
                                       "parity and engine-only latency, vitopt doctor"),
    ("compile", 240, "cuda", "torch.compile (inductor, dynamic batch) fp16 then bf16 of the 6 models, batch "
                             "1/64/256, interleaved; as many (model, dtype) as --budget-s leaves time for"),
]
#: the default wall-clock budget of a full run (seconds); 8 minutes minus a margin.
BUDGET_S = 450
BATCHES = (1, 64, 256)
DTYPES = ("fp16", "bf16")
#: model key -> (timm name, timm kwargs, image size); random init.
SIZES = {"deit_s": ("deit_small_patch16_224", {}, 224), "deit_b": ("deit_base_patch16_224", {}, 224)}
FLOPS = {"dense": 1.0, "50%": 0.5, "30%": 0.3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (module docstring)."""
    ap = argparse.ArgumentParser(description="vitopt's prepared GPU check (H100/H200, no TensorRT needed).")
    ap.add_argument("--dry-run", action="store_true", help="list the steps and their time estimates, run nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.json", help="JSON results file")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget of the whole run (s)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per timing comparison")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per model per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per model per round")
    ap.add_argument("--steps", default=",".join(s[0] for s in STEPS), help="comma-separated steps to run")
    return ap.parse_args(argv)


def availability() -> dict[str, str | None]:
    """Why a requirement is missing here (None when met), found without importing torch or tensorrt."""
    out: dict[str, str | None] = {"-": None}
    if importlib.util.find_spec("torch") is None:
        out["cuda"] = "PyTorch is not installed"
    else:
        import torch

        out["cuda"] = None if torch.cuda.is_available() else "no CUDA device is visible"
    trt = None if importlib.util.find_spec("tensorrt") is not None else "TensorRT is not installed (import tensorrt fails)"
    out["cuda+tensorrt"] = out["cuda"] or trt
    return out


def dry_run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print (and return) every step with its estimate and whether it would run on this machine."""
    avail = availability()
    wanted = set(args.steps.split(","))
    rows = []
    print(f"gpu_check plan (estimates for an H100/H200; budget {args.budget_s:g} s for the whole run):")
    print(f"{'#':>2}  {'step':<15} {'estimate':>9}  {'here':<46} what")
    for i, (name, est, needs, what) in enumerate(STEPS, 1):
        reason = avail.get(needs) if name in wanted else "not in --steps"
        here = "would run" if reason is None else f"skip: {reason}"
        rows.append({"step": name, "estimate_s": est, "needs": needs, "here": here, "what": what})
        print(f"{i:>2}  {name:<15} {est:>7d} s  {here[:46]:<46} {what}")
    total = sum(r["estimate_s"] for r in rows if r["step"] in wanted)
    no_trt = sum(r["estimate_s"] for r in rows if r["step"] in wanted and r["step"] != "tensorrt")
    print(f"total estimate: {total} s with TensorRT, {no_trt} s without (the compile step shrinks to fit "
          f"--budget-s {args.budget_s:g}: a run ends within the budget)")
    return rows


# ---------------------------------------------------------------------------------- timing
def cuda_times(torch: Any, fn, reps: int, warmup: int) -> list[float]:
    """Milliseconds of ``reps`` calls of ``fn``, each between two CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


def interleaved(torch: Any, fns: dict[str, Any], rounds: int, reps: int, warmup: int) -> dict[str, Any]:
    """Time several callables in interleaved rounds; per name the median over rounds of each round's median.

    Returns ``{name: {"p50_ms", "round_medians"}, "ratios": {name: {"median", "min", "max"}}}`` with ratios
    of every name to the first one, taken per round.
    """
    per: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            per[name].append(statistics.median(cuda_times(torch, fn, reps, warmup if r == 0 else 1)))
    first = next(iter(fns))
    out: dict[str, Any] = {k: {"p50_ms": statistics.median(v), "round_medians": v} for k, v in per.items()}
    out["ratios"] = {}
    for k, v in per.items():
        ratios = [a / b for a, b in zip(v, per[first])]
        out["ratios"][k] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


# ---------------------------------------------------------------------------------- steps
class Check:
    """Runs the steps, keeps results and the clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {"steps": {}}
        self.models: dict[str, Any] = {}
        self.target = "h100"
        self.device = "cuda"                                # the tests run the CPU-capable steps with "cpu"
        #: the validate step's model, synthetic images and timing (the tests shrink it for CPU)
        self.validate_setup = {"model": "deit_small_patch16_224", "kwargs": {"img_size": 64, "num_classes": 10},
                               "images": 256, "batch_sizes": [1, 64], "warmup": 5, "repeats": 20}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def run(self) -> dict[str, Any]:
        avail = availability()
        wanted = set(self.args.steps.split(","))
        for name, est, needs, _what in STEPS:
            rec: dict[str, Any] = {"estimate_s": est}
            self.results["steps"][name] = rec
            reason = None if name in wanted else "not in --steps"
            reason = reason or avail.get(needs)
            if reason is None and name != "environment" and name != "compile" and self.left() < min(est, 20):
                reason = f"time budget: {self.left():.0f} s left"
            if reason is None and name in ("eager", "compile", "tensorrt") and not self.models:
                reason = "the models step did not finish"
            if reason is not None:
                rec.update(status="skipped", reason=reason)
                print(f"[{name}] skipped: {reason}", flush=True)
                continue
            t = time.perf_counter()
            print(f"[{name}] running (estimate {est} s, {self.left():.0f} s left)", flush=True)
            try:
                rec["results"] = getattr(self, f"step_{name}")()
                rec["status"] = "ok"
            except Exception as exc:                      # one failing step must not hide the others
                rec.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                           if str(exc) else type(exc).__name__, traceback=traceback.format_exc()[-3000:])
                print(f"[{name}] failed: {rec['error']}", flush=True)
            rec["seconds"] = round(time.perf_counter() - t, 2)
        self.results["total_seconds"] = round(time.perf_counter() - self.t0, 2)
        return self.results

    # ------------------------------------------------------------------------------ 1. environment
    def step_environment(self) -> dict[str, Any]:
        import torch

        env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
                               "cpu_count": os.cpu_count()}
        for pkg in ("timm", "numpy", "pydantic", "onnx", "onnxruntime", "triton", "tensorrt", "torch_tensorrt",
                    "modelopt"):
            spec = importlib.util.find_spec(pkg)
            env[pkg] = None
            if spec is not None:
                try:
                    env[pkg] = getattr(__import__(pkg), "__version__", "present")
                except Exception as exc:
                    env[pkg] = f"import failed: {exc}"
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            env.update(gpu=name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                       gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
            self.target = "h200" if "H200" in name else "h100"
            env["target"] = self.target
        import vitopt

        env["vitopt"] = str(Path(vitopt.__file__).parent)
        self.results["environment"] = env
        return env

    # ------------------------------------------------------------------------------ 2. models
    def step_models(self) -> dict[str, Any]:
        import timm
        import torch

        import vitopt
        from vitopt.arch.cost import CostModel
        from vitopt.arch.families import family_of
        from vitopt.deploy.kernel_rules import kernel_rules, round_rules

        out = {}
        for size, (timm_name, kwargs, _img) in SIZES.items():
            torch.manual_seed(0)
            dense = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
            tokens = family_of(dense).num_tokens(dense)
            rules = round_rules(self.target, "fp16", num_tokens=tokens)
            dense_flops = CostModel(dense).flops(CostModel(dense).structure.sizes())
            for label, frac in FLOPS.items():
                t = time.perf_counter()
                model = dense if frac == 1.0 else vitopt.prune(dense, target={"flops": frac}, criterion="l1",
                                                                compare="normalized", groups=["heads", "mlp"], round_to=rules)
                cm = CostModel(model)
                dims = cm.structure.sizes()
                broken = [f"{g}={n}" for g, n in dims.items() for r in kernel_rules(self.target, "fp16",
                                                                                      num_tokens=tokens)
                          if g.rsplit(".", 1)[-1] == r.kind and not r(n)]
                key = f"{size}_{label}"
                self.models[key] = model.eval()
                out[key] = {"flops": cm.flops(dims), "flops_ratio": cm.flops(dims) / dense_flops,
                            "params": cm.params(dims), "prune_seconds": round(time.perf_counter() - t, 2),
                            "heads": [dims[f"blocks.{i}.heads"] for i in range(len(model.blocks))],
                            "mlp": [dims[f"blocks.{i}.mlp"] for i in range(len(model.blocks))],
                            "kernel_rule_violations": broken}
        return out

    # ------------------------------------------------------------------------------ 3./8. latency
    def _latency(self, compiled: bool) -> dict[str, Any]:
        import copy

        import torch

        dt = {"fp16": torch.float16, "bf16": torch.bfloat16}
        out: dict[str, Any] = {"skipped_for_time": [], "compile_seconds": {}}
        avg_compile = 25.0                                  # first guess; replaced by what compiles really take
        for dtype in DTYPES:
            for size in SIZES:
                keys = [f"{size}_{label}" for label in FLOPS]
                fns = {}
                for key in keys:
                    m = copy.deepcopy(self.models[key]).to("cuda", dt[dtype]).eval()
                    if compiled:
                        if self.left() < avg_compile * 1.5:
                            out["skipped_for_time"].append(f"{key} {dtype}")
                            continue
                        t = time.perf_counter()
                        m = torch.compile(m)
                        img = SIZES[size][2]
                        x = torch.randn(2, 3, img, img, device="cuda", dtype=dt[dtype])
                        torch._dynamo.mark_dynamic(x, 0)
                        with torch.no_grad():
                            m(x)
                        torch.cuda.synchronize()
                        out["compile_seconds"][f"{key} {dtype}"] = round(time.perf_counter() - t, 1)
                        avg_compile = statistics.mean(out["compile_seconds"].values())
                    fns[key] = m
                if len(fns) < len(keys):
                    continue
                img = SIZES[size][2]
                for bs in BATCHES:
                    x = torch.randn(bs, 3, img, img, device="cuda", dtype=dt[dtype])
                    if compiled:
                        torch._dynamo.mark_dynamic(x, 0)
                    with torch.no_grad():
                        res = interleaved(torch, {k: (lambda m=m, x=x: m(x)) for k, m in fns.items()},
                                          self.args.rounds, self.args.reps, self.args.warmup)
                    for key in keys:
                        out[f"{key} {dtype} b{bs}"] = {"p50_ms": res[key]["p50_ms"],
                                                       "round_medians": res[key]["round_medians"],
                                                       "vs_dense": res["ratios"][key],
                                                       "throughput_img_s": bs / res[key]["p50_ms"] * 1e3}
                del fns
                torch.cuda.empty_cache()
        return out

    def step_eager(self) -> dict[str, Any]:
        return self._latency(compiled=False)

    def step_compile(self) -> dict[str, Any]:
        return self._latency(compiled=True)

    # ------------------------------------------------------------------------------ 4. 2:4
    def step_sparse24(self) -> dict[str, Any]:
        from vitopt.sparsity.semi24 import check_semi_structured

        fc1 = self.models.get("deit_b_dense")
        weight = fc1.blocks[0].mlp.fc1.weight if fc1 is not None else __import__("torch").randn(3072, 768)
        return {f"tokens_{n}": check_semi_structured(weight, tokens=n, repeats=50) for n in (197 * 64, 197 * 256)}

    # ------------------------------------------------------------------------------ 5. DDP
    def step_ddp(self) -> dict[str, Any]:
        import socket

        import timm
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            model = DDP(timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=10).cuda(),
                        device_ids=[0])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x, y = torch.randn(32, 3, 224, 224, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
            before = next(model.parameters()).detach().clone()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
            changed = not torch.equal(before, next(model.parameters()).detach())
            return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "loss": float(loss),
                    "step_seconds": round(time.perf_counter() - t, 3), "weights_changed": changed,
                    "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))}
        finally:
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------ 6. validate stage
    def step_validate_stage(self) -> dict[str, Any]:
        import timm
        import torch
        from torch.utils.data import TensorDataset

        from vitopt.recipe.schema import ValidateStage
        from vitopt.stages import validate
        from vitopt.stages.base import StageDir, State
        from vitopt.train.data import DataBundle

        v = self.validate_setup
        torch.manual_seed(0)
        kwargs = v["kwargs"]
        model = timm.create_model(v["model"], pretrained=False, **kwargs)
        img = kwargs["img_size"]
        x, y = torch.randn(v["images"], 3, img, img), torch.randint(0, 10, (v["images"],))
        data = DataBundle(train=TensorDataset(x, y), val=TensorDataset(x, y), num_classes=10,
                          class_names=[str(i) for i in range(10)], name="synthetic")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            state = State(model=model, model_name=v["model"], model_kwargs=kwargs, data=data, seed=0, dense={})
            state.dense = state.cost()
            cfg = ValidateStage(runtimes=["pytorch"], device=self.device, batch_sizes=v["batch_sizes"],
                                warmup=v["warmup"], repeats=v["repeats"])
            sd = StageDir(Path(tmp) / "00_validate", "00_validate", 0)
            sd.path.mkdir(parents=True)
            validate.run(cfg, state, sd)
            return json.loads(sd.metrics_file.read_text())["metrics"]

    # ------------------------------------------------------------------------------ 7. TensorRT
    def step_tensorrt(self) -> dict[str, Any]:
        import numpy as np
        import torch

        import vitopt
        from vitopt.deploy import tensorrt_build as tb
        from vitopt.deploy.doctor import doctor

        trt = tb.require_tensorrt()
        major = tb.tensorrt_major(trt)
        # TensorRT 11 builds fp16 from an AutoCast ONNX (ModelOpt); without ModelOpt the check builds fp32
        precision = "fp16" if major < 11 or importlib.util.find_spec("modelopt") is not None else "fp32"
        out: dict[str, Any] = {"tensorrt": str(trt.__version__), "target": self.target, "precision": precision}
        rng = np.random.default_rng(0)
        images = rng.standard_normal((256, 3, 224, 224), dtype=np.float32)
        with tempfile.TemporaryDirectory(prefix="gpu-check-trt-") as tmp:
            for key in ("deit_s_dense", "deit_s_50%"):
                model = self.models[key].float().cpu().eval()
                with torch.no_grad():
                    labels = model(torch.from_numpy(images[:64])).argmax(1).numpy()
                onnx = Path(tmp) / f"{key.replace('%', 'pct')}.onnx"
                vitopt.export_onnx(model, onnx, (3, 224, 224), exporter="torchscript", simplify=False)
                cfg = tb.derive_build_config(self.target, precision, trt_major=major, profile=(1, 64, 256),
                                             opt_level=3)
                rec = tb.build_engine(onnx, cfg, Path(tmp) / key.replace("%", "pct"))
                res = vitopt.validate(rec["engine"], ["tensorrt"], data=(images[:64], labels),
                                      batch_sizes=[1, 64, 256], warmup=10, repeats=50, device="cuda")
                r = res["runtimes"]["tensorrt"]
                out[key] = {"build_seconds": rec["build_seconds"], "top1_vs_pytorch_argmax": r["top1"],
                            "latency": r["latency"], "timing_cache": rec["timing_cache"],
                            "doctor": [{k: d[k] for k in ("blocks", "gemm_precisions", "verdict")}
                                       for d in doctor(rec["engine"])]}
        return out


# ---------------------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    """The run as Markdown tables: steps, then eager/compile latency with the pruned/dense ratios."""
    lines = ["# gpu_check", "", f"GPU: {results.get('environment', {}).get('gpu', 'none')}, "
             f"torch {results.get('environment', {}).get('torch', '?')}, total {results.get('total_seconds')} s", "",
             "| step | status | seconds | estimate | note |", "|---|---|---:|---:|---|"]
    for name, rec in results["steps"].items():
        note = rec.get("reason") or rec.get("error") or ""
        lines.append(f"| {name} | {rec.get('status')} | {rec.get('seconds', '')} | {rec['estimate_s']} | {note} |")
    for step in ("eager", "compile"):
        res = (results["steps"].get(step) or {}).get("results") or {}
        rows = [(k, v) for k, v in res.items() if isinstance(v, dict) and "p50_ms" in v]
        if not rows:
            continue
        lines += ["", f"## {step} (p50 ms; pruned/dense: median [min-max] over interleaved rounds)", "",
                  "| model | dtype | batch | p50 ms | img/s | / dense |", "|---|---|---:|---:|---:|---|"]
        for k, v in rows:
            model, dtype, batch = k.split(" ")
            r = v["vs_dense"]
            lines.append(f"| {model} | {dtype} | {batch[1:]} | {v['p50_ms']:.3f} | {v['throughput_img_s']:.0f} | "
                         f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check (or, with ``--dry-run``, print the plan) and write the JSON and Markdown files."""
    args = parse_args(argv)
    if args.dry_run:
        return {"plan": dry_run(args)}
    sys.path.insert(0, str(ROOT))
    check = Check(args)
    results = check.run()
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = markdown(results)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
