"""GPU latency of dense vs structurally pruned DeiT-S/16-224 (PyTorch CUDA, fp16, eager and torch.compile).

What it measures: the latency a user sees from structured pruning on a data-center GPU. The pruned
model keeps DeiT-S's embedding width (384) and depth (12) and, in every block, the first ``heads``
heads (head_dim 64) and the first ``mlp`` hidden neurons, with ``(heads, mlp)`` chosen as the uniform
shape whose FLOPs (2 x MACs of matmuls/convs, one 224x224 image; :func:`deit_flops`) are closest to
``--flops`` (default 0.5) of the dense model - 3 heads and MLP 768 at 50%. Weights are random (the
shape, not the accuracy, sets the latency), sliced from one dense model so both share values.

Timing: the one method of :mod:`vitopt.deploy.timing`: dense and pruned are timed together, per runtime
and batch size, with warm-up (``--warmup`` calls, which also trigger torch.compile's compilation) and
``--rounds`` interleaved rounds (dense block, pruned block, dense block, ...); inputs live on the GPU and
every call is followed by ``torch.cuda.synchronize`` inside the timed region (CUDA best-practices guide:
a wall-clock timer must synchronise with the device). Reported: p50/p90 per call over all timed calls,
throughput = batch / p50, and the speed-up as the inverse of the median per-round ratio pruned / dense
with its min-max. With ``--ort-cpu`` it also times ONNX Runtime CPU (fp32, ``--threads`` intra-op
threads) on the same two shapes.

Needs torch, timm, numpy and vitopt importable from this repository (for the timing method;
onnxruntime for ``--ort-cpu``). Without CUDA it says so, skips the GPU rows and exits 0.

    python benchmarks/gpu_latency.py --out benchmarks/results/gpu_latency.json
    python benchmarks/gpu_latency.py --ort-cpu --no-cuda --threads 2      # the CPU side only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vitopt.deploy.timing import Candidate, compare, machine_load  # noqa: E402

DEIT_S = {"embed": 384, "depth": 12, "heads": 6, "head_dim": 64, "mlp": 1536, "img": 224, "patch": 16,
          "in_chans": 3, "classes": 1000}


def deit_flops(heads: int, mlp: int, cfg: dict = DEIT_S) -> int:
    """FLOPs (2 x MACs) of one image through a DeiT with ``heads`` x head_dim attention and ``mlp`` hidden per block.

    Counted: patch-embedding conv, qkv, q@k^T, attn@v, proj, fc1, fc2 per block and the head (norms,
    softmax, GELU not counted, as fvcore counts).
    """
    e, d = cfg["embed"], cfg["head_dim"]
    patches = (cfg["img"] // cfg["patch"]) ** 2
    n = patches + 1
    attn = heads * d
    block = n * e * 3 * attn + 2 * n * n * attn + n * attn * e + 2 * n * e * mlp
    macs = patches * e * cfg["in_chans"] * cfg["patch"] ** 2 + cfg["depth"] * block + e * cfg["classes"]
    return 2 * macs


def pruned_shape(ratio: float = 0.5, mlp_step: int = 64, cfg: dict = DEIT_S) -> dict:
    """Uniform ``(heads, mlp)`` at about ``ratio`` x dense FLOPs, pruning attention and MLP alike.

    ``heads = round(ratio * heads)`` (at least 1); then the multiple of ``mlp_step`` whose total
    FLOPs are closest to ``ratio`` x dense. Returns ``{"heads", "mlp", "flops", "dense_flops", "ratio"}``.

    Raises:
        ValueError: ``ratio`` outside (0, 1].
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    dense = deit_flops(cfg["heads"], cfg["mlp"], cfg)
    h = max(1, round(ratio * cfg["heads"]))
    m = min(range(mlp_step, cfg["mlp"] + 1, mlp_step), key=lambda m: abs(deit_flops(h, m, cfg) / dense - ratio))
    f = deit_flops(h, m, cfg)
    return {"heads": h, "mlp": m, "flops": f, "dense_flops": dense, "ratio": f / dense}


def dense_model():
    """timm ``deit_small_patch16_224`` with random weights (no download), eval mode."""
    import timm

    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


def slice_model(model, heads: int, mlp: int):
    """Keep the first ``heads`` heads and ``mlp`` hidden neurons of every block (in place; returns the model).

    Slices qkv rows (per q/k/v, per head), proj columns, fc1 rows and fc2 columns, and sets the
    attention's ``num_heads`` / ``attn_dim``; head_dim and the attention scale stay as they were.
    """
    import torch
    from torch import nn

    for blk in model.blocks:
        a = blk.attn
        d = a.head_dim
        e = a.qkv.in_features
        rows = torch.cat([torch.arange(s * a.num_heads * d, s * a.num_heads * d + heads * d) for s in range(3)])
        qkv = nn.Linear(e, 3 * heads * d, bias=a.qkv.bias is not None)
        proj = nn.Linear(heads * d, a.proj.out_features, bias=a.proj.bias is not None)
        with torch.no_grad():
            qkv.weight.copy_(a.qkv.weight[rows])
            if a.qkv.bias is not None:
                qkv.bias.copy_(a.qkv.bias[rows])
            proj.weight.copy_(a.proj.weight[:, : heads * d])
            if a.proj.bias is not None:
                proj.bias.copy_(a.proj.bias)
        a.qkv, a.proj, a.num_heads = qkv, proj, heads
        if hasattr(a, "attn_dim"):
            a.attn_dim = heads * d
        m = blk.mlp
        fc1 = nn.Linear(m.fc1.in_features, mlp)
        fc2 = nn.Linear(mlp, m.fc2.out_features)
        with torch.no_grad():
            fc1.weight.copy_(m.fc1.weight[:mlp])
            fc1.bias.copy_(m.fc1.bias[:mlp])
            fc2.weight.copy_(m.fc2.weight[:, :mlp])
            fc2.bias.copy_(m.fc2.bias)
        m.fc1, m.fc2 = fc1, fc2
    return model


def _rows(res, runtime: str, batch: int) -> list[dict]:
    """Table rows (dense, pruned) of one :class:`vitopt.deploy.timing.Comparison`."""
    out = []
    for name in ("dense", "pruned"):
        c = res.candidates[name]
        row = {"model": name, "runtime": runtime, "batch": batch, "p50_ms": c["p50_ms"], "p90_ms": c["p90_ms"],
               "p99_ms": c["p99_ms"], "mean_ms": c["mean_ms"], "ms": c["ms"], "rounds_ms": c["rounds_ms"],
               "calls_per_round": c["calls"], "throughput_img_s": batch / (c["p50_ms"] / 1e3)}
        if name == "pruned":
            row["ratio"] = {k: c["ratio"][k] for k in ("median", "min", "max", "q1", "q3")}
        out.append(row)
    return out


def time_cuda(fns: dict, xs: dict, args) -> object:
    """dense vs pruned on CUDA, interleaved (``fns[name](xs[name])``), synchronised after every call."""
    import torch

    cands = {n: Candidate(lambda f=fns[n], x=xs[n]: f(x), sync=torch.cuda.synchronize) for n in ("dense", "pruned")}
    with torch.inference_mode():
        return compare(cands, rounds=args.rounds, warmup=args.warmup, round_ms=args.round_ms)


def _export_ort(model, path: str):
    import torch

    torch.onnx.export(model.float().cpu().eval(), torch.randn(1, 3, 224, 224), path, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}},
                      dynamo=False)


def time_ort_cpu(models: dict, batch: int, args) -> object:
    """ONNX Runtime CPU (fp32) of dense vs pruned exported to ONNX (opset 17, dynamic batch), interleaved."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, model in models.items():
            path = os.path.join(tmp, f"{name}.onnx")
            _export_ort(model, path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
            sessions[name] = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        cands = {n: (lambda s=s: s.run(None, {"input": x})) for n, s in sessions.items()}
        return compare(cands, rounds=args.rounds, warmup=2, round_ms=args.round_ms, threads=args.threads)


def format_table(rows: list[dict]) -> str:
    """Markdown table: one row per (model, runtime, batch) with p50/p90 and speed-up over dense.

    The speed-up is 1 / (median per-round ratio pruned / dense) with its range over rounds when the row
    carries the ratio (it was timed interleaved with dense), else dense p50 / this p50.
    """
    dense = {(r["runtime"], r["batch"]): r["p50_ms"] for r in rows if r["model"] == "dense"}
    lines = ["| model | runtime | batch | p50 ms | p90 ms | img/s | speed-up vs dense |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = dense.get((r["runtime"], r["batch"]))
        sp = ""
        if r["model"] != "dense" and "ratio" in r:
            q = r["ratio"]
            sp = f"{1 / q['median']:.2f}x ({1 / q['max']:.2f}-{1 / q['min']:.2f})"
        elif r["model"] != "dense" and ref:
            sp = f"{ref / r['p50_ms']:.2f}x"
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['throughput_img_s']:.0f} | {sp} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flops", type=float, default=0.5, help="FLOPs fraction of the pruned model")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls per model (also compiles)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (dense, pruned, dense, ...)")
    ap.add_argument("--round-ms", type=float, default=100.0, help="target ms of one model's block in a round")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows")
    ap.add_argument("--ort-cpu", action="store_true", help="also time ONNX Runtime CPU (fp32)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_latency.json")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Measure, print the table and write the JSON; returns the JSON record."""
    args = parse_args(argv)
    import torch

    batches = [int(b) for b in args.batch_sizes.split(",")]
    shape = pruned_shape(args.flops)
    torch.manual_seed(0)
    dense = dense_model()
    pruned = slice_model(_copy(dense), shape["heads"], shape["mlp"])
    record = {"model": "deit_small_patch16_224", "pruned_shape": shape, "batch_sizes": batches, "rows": [],
              "torch": torch.__version__, "cuda": None, "skipped": []}
    if args.no_cuda or not torch.cuda.is_available():
        record["skipped"].append("CUDA rows: " + ("--no-cuda" if args.no_cuda else "no CUDA device is visible"))
        print(f"skipping the PyTorch CUDA measurement: {record['skipped'][-1]}")
    else:
        record["cuda"] = torch.cuda.get_device_name(0)
        on_gpu = {n: _copy(m).cuda().half().eval() for n, m in (("dense", dense), ("pruned", pruned))}
        modes = [("eager", dict(on_gpu))]
        if not args.no_compile:
            modes.append(("compile", {n: torch.compile(m) for n, m in on_gpu.items()}))
        for mode, fns in modes:
            for b in batches:
                xs = {n: torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.float16) for n in fns}
                res = time_cuda(fns, xs, args)
                record["rows"] += _rows(res, f"pytorch-cuda-fp16-{mode}", b)
                record.setdefault("timings", []).append({"runtime": f"pytorch-cuda-fp16-{mode}", "batch": b,
                                                         **res.to_json()})
        del on_gpu, modes
        torch.cuda.empty_cache()
    if args.ort_cpu:
        for b in batches:
            res = time_ort_cpu({"dense": _copy(dense), "pruned": _copy(pruned)}, b, args)
            record["rows"] += _rows(res, f"onnxruntime-cpu-fp32-{args.threads}t", b)
            record.setdefault("timings", []).append({"runtime": f"onnxruntime-cpu-fp32-{args.threads}t", "batch": b,
                                                     **res.to_json()})
    table = format_table(record["rows"])
    print(f"DeiT-S/16-224 dense {shape['dense_flops'] / 1e9:.2f} GFLOPs vs pruned (heads {shape['heads']}, "
          f"mlp {shape['mlp']}) {shape['flops'] / 1e9:.2f} GFLOPs = {shape['ratio']:.3f}; GPU: {record['cuda']}")
    print(table)
    import datetime
    import platform
    import shlex

    record["command"] = shlex.join(["python", "benchmarks/gpu_latency.py",
                                    *(sys.argv[1:] if argv is None else [str(a) for a in argv])])
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record["machine"] = {"cpu": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
                         "gpu": record["cuda"]}
    record["load"] = machine_load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return record


def _copy(model):
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()
    sys.exit(0)
