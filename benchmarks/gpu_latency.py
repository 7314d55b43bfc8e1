"""GPU latency of dense vs structurally pruned DeiT-S/16-224 (PyTorch CUDA, fp16, eager and torch.compile).

What it measures: the latency a user sees from structured pruning on a data-center GPU. The pruned
model keeps DeiT-S's embedding width (384) and depth (12) and, in every block, the first ``heads``
heads (head_dim 64) and the first ``mlp`` hidden neurons, with ``(heads, mlp)`` chosen as the uniform
shape whose FLOPs (2 x MACs of matmuls/convs, one 224x224 image; :func:`deit_flops`) are closest to
``--flops`` (default 0.5) of the dense model - 3 heads and MLP 768 at 50%. Weights are random (the
shape, not the accuracy, sets the latency), sliced from one dense model so both share values.

Timing (CUDA best-practices guide, "Using CUDA GPU timers"): inputs live on the GPU, ``--warmup``
untimed calls (these also trigger torch.compile's compilation), then ``--repeats`` calls each
bracketed by CUDA events; p50/p90 in ms and throughput = batch / p50. With ``--ort-cpu`` it also
times ONNX Runtime CPU (fp32, ``--threads`` intra-op threads) on the same two shapes.

Needs only torch, timm and numpy (onnxruntime for ``--ort-cpu``), so it runs on a GPU machine
without the rest of vitopt. Without CUDA it says so, skips the GPU rows and exits 0.

    python benchmarks/gpu_latency.py --out results/gpu_latency.json
    python benchmarks/gpu_latency.py --ort-cpu --no-cuda --threads 2      # the CPU side only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def stats(samples_ms, batch: int) -> dict:
    """p50/p90/p99/mean (ms) and throughput (images/s = batch / p50) of timed samples."""
    ms = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()),
            "throughput_img_s": batch / (p50 / 1e3), "repeats": int(ms.size)}


def time_cuda(fn, x, warmup: int, repeats: int) -> dict:
    """CUDA-event latency of ``fn(x)`` (x on the GPU)."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(x)
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e))
    return stats(out, x.shape[0])


def time_ort_cpu(model, batch: int, threads: int, warmup: int, repeats: int) -> dict:
    """ONNX Runtime CPU (fp32) latency of ``model`` exported to ONNX (opset 17, dynamic batch)."""
    import onnxruntime as ort
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(model.float().cpu().eval(), torch.randn(1, 3, 224, 224), path, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}},
                          dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for _ in range(warmup):
            sess.run(None, {"input": x})
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, {"input": x})
            out.append((time.perf_counter() - t0) * 1e3)
    return stats(out, batch)


def format_table(rows: list[dict]) -> str:
    """Markdown table: one row per (model, runtime, batch) with p50/p90 and speed-up over dense."""
    dense = {(r["runtime"], r["batch"]): r["p50_ms"] for r in rows if r["model"] == "dense"}
    lines = ["| model | runtime | batch | p50 ms | p90 ms | img/s | speed-up vs dense |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = dense.get((r["runtime"], r["batch"]))
        sp = f"{ref / r['p50_ms']:.2f}x" if ref and r["model"] != "dense" else ""
        lines.append(f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['throughput_img_s']:.0f} | {sp} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flops", type=float, default=0.5, help="FLOPs fraction of the pruned model")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows")
    ap.add_argument("--ort-cpu", action="store_true", help="also time ONNX Runtime CPU (fp32)")
    ap.add_argument("--ort-repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads")
    ap.add_argument("--out", type=Path, default=Path("results/gpu_latency.json"))
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
        for name, model in (("dense", dense), ("pruned", pruned)):
            m = _copy(model).cuda().half().eval()
            modes = [("eager", m)] + ([] if args.no_compile else [("compile", torch.compile(m))])
            for mode, fn in modes:
                for b in batches:
                    x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.float16)
                    s = time_cuda(fn, x, args.warmup, args.repeats)
                    record["rows"].append({"model": name, "runtime": f"pytorch-cuda-fp16-{mode}", "batch": b, **s})
            del m, modes
            torch.cuda.empty_cache()
    if args.ort_cpu:
        for name, model in (("dense", dense), ("pruned", pruned)):
            for b in batches:
                s = time_ort_cpu(_copy(model), b, args.threads, warmup=2, repeats=args.ort_repeats)
                record["rows"].append({"model": name, "runtime": f"onnxruntime-cpu-fp32-{args.threads}t",
                                       "batch": b, **s})
    table = format_table(record["rows"])
    print(f"DeiT-S/16-224 dense {shape['dense_flops'] / 1e9:.2f} GFLOPs vs pruned (heads {shape['heads']}, "
          f"mlp {shape['mlp']}) {shape['flops'] / 1e9:.2f} GFLOPs = {shape['ratio']:.3f}; GPU: {record['cuda']}")
    print(table)
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
