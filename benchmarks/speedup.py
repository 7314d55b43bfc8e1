"""Speed-up per FLOPs saved: vitopt vs Torch-Pruning on DeiT-S/16 and DeiT-B/16 at 224 px.

For every model (random init) and FLOPs target (default 70%, 50%, 30% of dense) it builds:

* ``vitopt`` / ``vitopt+embed`` - criterion l1, global scope, groups heads/head_dim/mlp (+ embed),
  kept counts rounded to head_dim 8 / mlp 8 / embed 16 (heads by one);
* ``tp`` / ``tp-bottleneck`` - Torch-Pruning's documented timm-ViT recipe (GroupMagnitudeImportance,
  ``num_heads`` for the qkv layers, ``round_to=8``, ``ignored_layers=[model.head]``; bottleneck also
  ignores every fc2), its pruning ratio bisected until the FLOPs are within ``--tp-tol`` of the
  target (see ``variants.py``);

and measures params, FLOPs (vitopt's analytic counter for every model, cross-checked with
``torch.utils.flop_counter``), ONNX Runtime CPU p50 latency (export with
``vitopt.deploy.onnx_export.export_onnx``, verified against PyTorch), PyTorch CPU eager p50
latency, and CUDA fp16 eager p50 latency when a GPU is present. ``latency ratio / FLOPs ratio``
(1.0 = the whole FLOPs saving became speed) is reported per runtime, and for each like-for-like
pair which tool is faster.

    python benchmarks/speedup.py [--quick] [--models deit_s deit_b] [--out results/speedup.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import variants as V  # noqa: E402

SCRIPT = "speedup"
DEFAULTS = dict(models=["deit_s", "deit_b"], warmup=10, repeats=50, budget_s=20.0, exporter="auto",
                tp_max_iter=12, tp_grid=11)
QUICK = dict(models=["tiny"], warmup=2, repeats=10, budget_s=1.0, exporter="torchscript", tp_max_iter=8, tp_grid=7)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny ViT (32 px, width 64, depth 2), few repeats, TorchScript exporter: < 2 min on 2 cores")
    ap.add_argument("--models", nargs="+", help=f"presets ({', '.join(V.PRESETS)}) or timm names; default deit_s deit_b")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3], help="FLOPs fractions of dense")
    ap.add_argument("--variants", nargs="+", default=["dense", "vitopt", "vitopt+embed", "tp", "tp-bottleneck"])
    ap.add_argument("--seed", type=int, default=0, help="random init seed")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ORT (default: torch's)")
    ap.add_argument("--cpu-batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--cuda-batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--warmup", type=int, help="untimed calls per measurement (default 10; quick 2)")
    ap.add_argument("--repeats", type=int, help="max timed calls per measurement (default 50; quick 10)")
    ap.add_argument("--budget-s", type=float, help="seconds per measurement that cap the repeats (default 20)")
    ap.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"],
                    help="export_onnx exporter (default auto = dynamo; quick torchscript, ~20x faster to export)")
    ap.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX export and ONNX Runtime")
    ap.add_argument("--no-torch-cpu", action="store_true", help="skip PyTorch CPU eager latency")
    ap.add_argument("--no-cuda", action="store_true", help="skip CUDA fp16 latency even if a GPU is present")
    ap.add_argument("--tp-attn", choices=["head_dims", "heads", "both"], default="head_dims",
                    help="Torch-Pruning attention pruning: head_dims (recipe default), heads, or both")
    ap.add_argument("--tp-norm", type=int, default=2, help="p of GroupMagnitudeImportance (TP default 2)")
    ap.add_argument("--tp-local", action="store_true", help="Torch-Pruning uniform (local) instead of global")
    ap.add_argument("--tp-tol", type=float, default=0.01, help="relative FLOPs tolerance of the ratio bisection")
    ap.add_argument("--tp-grid", type=int, help="ratios scanned before bisecting (default 11; quick 7)")
    ap.add_argument("--tp-max-iter", type=int, help="bisection steps per target (default 12; quick 8)")
    ap.add_argument("--onnx-dir", type=Path, help="keep the ONNX files here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT), help="JSON output path")
    return ap


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    return args


# ------------------------------------------------------------------------------------ measuring
def measure(model: torch.nn.Module, tag: str, args: argparse.Namespace, onnx_dir: Path, threads: int) -> dict[str, Any]:
    """Cost, structure and latencies of one model variant (errors recorded, never raised)."""
    from vitopt.deploy.onnx_export import export_onnx
    from vitopt.deploy.runtimes import OrtRuntime, TorchRuntime
    from vitopt.errors import VitoptError

    shape = V.input_shape(model)
    row: dict[str, Any] = {**V.cost(model), "dims": V.dims_summary(model), "latency_ms": {}, "errors": {}}
    try:
        row["flops_counter"] = V.counter_flops(model)
    except Exception as exc:
        row["errors"]["flops_counter"] = common.first_line(exc)
    lat = row["latency_ms"]
    timing = dict(warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s)

    if not args.no_onnx:
        path = onnx_dir / f"{tag}.onnx"
        try:
            info = export_onnx(model, path, shape, exporter=args.exporter, simplify=not args.no_simplify)
            row["onnx"] = {k: info[k] for k in ("exporter", "opset", "num_nodes", "max_abs_diff", "simplified",
                                                 "file_size_bytes", "export_seconds")}
            rt = OrtRuntime(path, threads=threads)
            try:
                for bs in args.cpu_batches:
                    lat[f"ort_cpu_b{bs}"] = common.latency_p50(rt, shape, bs, **timing)["p50_ms"]
            finally:
                rt.close()
        except (VitoptError, Exception) as exc:  # export/verify failure of one variant is a result
            row["onnx"] = {"error": common.first_line(exc)}
            row["errors"]["onnx"] = common.first_line(exc)
        finally:
            if args.onnx_dir is None:
                path.unlink(missing_ok=True)

    if not args.no_torch_cpu:
        rt = TorchRuntime(model, device="cpu", threads=threads)
        try:
            for bs in args.cpu_batches:
                lat[f"torch_cpu_b{bs}"] = common.latency_p50(rt, shape, bs, **timing)["p50_ms"]
        except Exception as exc:
            row["errors"]["torch_cpu"] = common.first_line(exc)
        finally:
            rt.close()

    if args.no_cuda or not torch.cuda.is_available():
        row["cuda_skipped"] = "--no-cuda" if args.no_cuda else "torch.cuda.is_available() is False"
    else:
        rt = None
        try:
            rt = common.CudaHalfRuntime(copy.deepcopy(model))
            for bs in args.cuda_batches:
                lat[f"cuda_fp16_b{bs}"] = common.latency_p50(rt, shape, bs, sync=rt.sync, **timing)["p50_ms"]
        except Exception as exc:
            row["errors"]["cuda_fp16"] = common.first_line(exc)
        finally:
            if rt is not None:
                rt.close()
    return row


def latency_keys(args: argparse.Namespace) -> list[str]:
    keys = []
    if not args.no_onnx:
        keys += [f"ort_cpu_b{b}" for b in args.cpu_batches]
    if not args.no_torch_cpu:
        keys += [f"torch_cpu_b{b}" for b in args.cpu_batches]
    if not args.no_cuda and torch.cuda.is_available():
        keys += [f"cuda_fp16_b{b}" for b in args.cuda_batches]
    return keys


def add_ratios(rows: list[dict], keys: list[str]) -> None:
    """flops_ratio, params_ratio, latency ratio and efficiency (latency ratio / FLOPs ratio) vs dense."""
    dense = {r["model"]: r for r in rows if r["variant"] == "dense" and "flops" in r}
    for r in rows:
        d = dense.get(r["model"])
        if d is None or "flops" not in r:
            continue
        r["flops_ratio"] = r["flops"] / d["flops"]
        r["params_ratio"] = r["params"] / d["params"]
        r["latency_ratio"] = {k: common.ratio(r["latency_ms"].get(k), d["latency_ms"].get(k)) for k in keys}
        r["efficiency"] = {k: common.ratio(v, r["flops_ratio"]) for k, v in r["latency_ratio"].items()}


def winners(rows: list[dict], keys: list[str]) -> list[dict]:
    """Per model, target and like-for-like pair: which tool has the lower p50 at each runtime/batch."""
    out = []
    by = {(r["model"], r["target"], r["variant"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for target in dict.fromkeys(r["target"] for r in rows if r["target"] is not None):
            for a, b in V.PAIRS:
                ra, rb = by.get((model, target, a)), by.get((model, target, b))
                if ra is None or rb is None:
                    continue
                entry = {"model": model, "target": target, "vitopt": a, "tp": b,
                         "flops_ratio": {a: ra.get("flops_ratio"), b: rb.get("flops_ratio")}, "faster": {}}
                for k in keys:
                    la, lb = ra.get("latency_ms", {}).get(k), rb.get("latency_ms", {}).get(k)
                    if la is None or lb is None:
                        entry["faster"][k] = None
                        continue
                    win = a if la < lb else b
                    entry["faster"][k] = {"tool": win, "by_percent": 100.0 * abs(la - lb) / max(la, lb),
                                          a: la, b: lb}
                out.append(entry)
    return out


# ------------------------------------------------------------------------------------ printing
_SHORT = {"ort_cpu": "ORT", "torch_cpu": "torch", "cuda_fp16": "cuda16"}


def _short(key: str) -> str:
    kind, b = key.rsplit("_b", 1)
    return f"{_SHORT.get(kind, kind)} b{b}"


def print_results(rows: list[dict], wins: list[dict], keys: list[str]) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        cols = ["target", ("variant", "left"), "FLOPs ratio", "MFLOPs", "params M", "embed", "head_dim (min-max)",
                *[f"{_short(k)} ms" for k in keys], ("note", "left")]
        table_rows = []
        for r in mrows:
            if "flops" not in r:
                table_rows.append([r["target"], r["variant"], *[None] * (5 + len(keys)), r.get("error", "failed")])
                continue
            hd = r["dims"]["head_dim"]
            note = "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items())
            if r.get("prune", {}).get("within_tol") is False:
                note = (note + "; " if note else "") + f"TP ratio {r['prune']['ratio']:.3f} misses tol"
            table_rows.append([r["target"], r["variant"], r.get("flops_ratio"), r["flops"] / 1e6, r["params"] / 1e6,
                               r["dims"]["embed"], f"{min(hd)}-{max(hd)}",
                               *[r["latency_ms"].get(k) for k in keys], note])
        common.print_table(f"{model}: p50 latency (ms), threads={rows[0].get('threads')}", cols, table_rows,
                           caption="FLOPs = 2 x MACs per image (vitopt.arch.cost); ms = p50 per call")
        eff_rows = [[r["target"], r["variant"], r.get("flops_ratio"),
                     *[r.get("efficiency", {}).get(k) for k in keys]] for r in mrows if "flops" in r]
        common.print_table(f"{model}: latency ratio / FLOPs ratio (1.0 = all of the FLOPs saving became speed; "
                           "> 1 = less speed-up than FLOPs)", ["target", ("variant", "left"), "FLOPs ratio",
                                                               *[_short(k) for k in keys]], eff_rows)
        wrows = []
        for w in (w for w in wins if w["model"] == model):
            cells = []
            for k in keys:
                f = w["faster"].get(k)
                cells.append("-" if f is None else f"{f['tool']} ({f['by_percent']:.0f}%)")
            wrows.append([w["target"], f"{w['vitopt']} vs {w['tp']}", *cells])
        if wrows:
            common.print_table(f"{model}: faster tool per FLOPs target (p50 lower by N%)",
                               ["target", ("pair", "left"), *[(_short(k), "left") for k in keys]], wrows)


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON payload (also written to ``--out``)."""
    args = resolve_args(argv)
    threads = common.set_threads(args.threads)
    variants, skipped = common.available_variants(args.variants, V.TP_VARIANTS)
    keys = latency_keys(args)
    rows: list[dict] = []
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="vitopt-speedup-")
    onnx_dir = Path(args.onnx_dir or tmp.name)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.models:
            dense = V.build_model(name, seed=args.seed)
            common.console.rule(f"{name} ({type(dense).__name__}, input {V.input_shape(dense)})")
            for target, variant, model, info in V.pruned_variants(
                    dense, args.targets, variants, tp_attn=args.tp_attn, tp_norm=args.tp_norm, tp_tol=args.tp_tol,
                    tp_max_iter=args.tp_max_iter, tp_grid=args.tp_grid, tp_global=not args.tp_local):
                row: dict[str, Any] = {"model": name, "target": target, "variant": variant,
                                       "tool": "torch-pruning" if variant in V.TP_VARIANTS else
                                       ("vitopt" if variant in V.VITOPT_VARIANTS else "dense"),
                                       "threads": threads, "prune": info}
                if model is None:
                    row["error"] = info.get("error")
                    common.console.print(f"[red]{name} {variant} @ {target}: {row['error']}[/]")
                else:
                    tag = f"{name}_{variant}_{target}".replace("+", "_").replace(".", "p")
                    t0 = time.perf_counter()
                    row.update(measure(model, tag, args, onnx_dir, threads))
                    row["measure_seconds"] = time.perf_counter() - t0
                    common.console.print(f"{name} {variant:14s} target={target} MFLOPs={row['flops'] / 1e6:.1f} "
                                         f"({time.perf_counter() - t_start:.0f} s)")
                rows.append(row)
                if model is not dense:
                    del model
                gc.collect()
            del dense
            gc.collect()
    finally:
        tmp.cleanup()
    add_ratios(rows, keys)
    wins = winners(rows, keys)
    print_results(rows, wins, keys)
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "latency_keys": keys, "tp_available": common.tp_status()[0], "tp_skipped": skipped, "rows": rows, "winners": wins,
               "seconds": time.perf_counter() - t_start}
    common.write_json(args.out, payload, script=SCRIPT, args=payload["config"], argv=argv)
    return payload


if __name__ == "__main__":
    main()
