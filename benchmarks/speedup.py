"""Speed-up per FLOPs saved: vitopt vs Torch-Pruning on DeiT-S/16 and DeiT-B/16 at 224 px.

For every model (random init) and FLOPs target (default 70%, 50%, 30% of dense) it builds:

* ``vitopt`` / ``vitopt+embed`` - criterion l1, global scope, groups heads/head_dim/mlp (+ embed),
  kept counts rounded to head_dim 8 / mlp 8 / embed 16 (heads by one);
* ``tp`` / ``tp-bottleneck`` - Torch-Pruning's documented timm-ViT recipe (GroupMagnitudeImportance,
  ``num_heads`` for the qkv layers, ``round_to=8``, ``ignored_layers=[model.head]``; bottleneck also
  ignores every fc2), its pruning ratio searched until its FLOPs are within ``--tp-tol`` (0.5%) of
  the FLOPs its vitopt partner *achieved* (``vitopt`` for ``tp-bottleneck``, ``vitopt+embed`` for
  ``tp``; see ``variants.py``), so the two tools are compared at equal achieved FLOPs;

and measures params, FLOPs (vitopt's analytic counter for every model, cross-checked with
``torch.utils.flop_counter``), and latency with the one timing method of
:mod:`vitopt.deploy.timing`: all models of one target (dense included) are built and exported first,
then timed together in interleaved rounds per runtime and batch (ONNX Runtime CPU of the file
``export_onnx`` wrote and verified, PyTorch CPU eager, CUDA fp16 eager when a GPU is present).
Reported per model: the median per-call time over rounds and its per-round ratio to dense (median,
min-max); ``latency ratio / FLOPs ratio`` (1.0 = the whole FLOPs saving became speed); and for each
like-for-like pair the per-round ratio vitopt / Torch-Pruning. A pair whose achieved FLOPs differ by
more than 0.5% is compared by latency per FLOP instead, and the table says so.

    python benchmarks/speedup.py [--quick] [--models deit_s deit_b] [--out benchmarks/results/speedup.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
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
DEFAULTS = dict(models=["deit_s", "deit_b"], warmup=3, rounds=7, round_ms=200.0, exporter="auto",
                tp_max_iter=12, tp_grid=11)
QUICK = dict(models=["tiny"], warmup=2, rounds=3, round_ms=20.0, exporter="torchscript", tp_max_iter=8, tp_grid=7)
#: two tools are compared by latency only when their achieved FLOPs are this close (relative).
FLOPS_MATCH = 0.005


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
    common.add_timing_args(ap)
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
    ap.add_argument("--tp-tol", type=float, default=FLOPS_MATCH,
                    help="relative FLOPs tolerance of the ratio search around the vitopt partner's achieved FLOPs")
    ap.add_argument("--tp-grid", type=int, help="ratios scanned before bisecting (default 11; quick 7)")
    ap.add_argument("--tp-max-iter", type=int, help="bisection steps per target (default 12; quick 8)")
    ap.add_argument("--onnx-dir", type=Path, help="keep the ONNX files here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT), help="JSON output path")
    return ap


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    return args


# ------------------------------------------------------------------------------------ building
def build_group(dense: torch.nn.Module, target: float, variants: list[str], args: argparse.Namespace,
                caches: dict[str, dict[float, float]]) -> list[tuple[str, torch.nn.Module | None, dict]]:
    """``(variant, model, info)`` for every pruned variant at ``target``: vitopt's first, then Torch-Pruning's
    searched to the FLOPs its vitopt partner achieved (within ``--tp-tol``), so pairs meet at equal FLOPs."""
    out: list[tuple[str, torch.nn.Module | None, dict]] = []
    achieved: dict[str, float] = {}
    base = V.cost(dense)["flops"]
    for variant in (v for v in variants if v in V.VITOPT_VARIANTS):
        try:
            m = copy.deepcopy(dense)
            info = V.vitopt_prune(m, target, V.VITOPT_VARIANTS[variant],
                                  scope="uniform" if variant.endswith("-uniform") else "global")
            info["achieved"] = achieved[variant] = V.cost(m)["flops"] / base
            out.append((variant, m.eval(), info))
        except Exception as exc:  # one failing tool must not hide the others
            out.append((variant, None, {"error": common.first_line(exc)}))
    for variant in (v for v in variants if v in V.TP_VARIANTS):
        partner = next((a for a, b in V.PAIRS if b == variant and a in achieved), None)
        goal = achieved[partner] if partner else target
        try:
            res = V.tp_prune_to_flops(dense, goal, tol=args.tp_tol, max_iter=args.tp_max_iter, grid=args.tp_grid,
                                      cache=caches.setdefault(variant, {}), bottleneck=V.TP_VARIANTS[variant],
                                      importance="magnitude", norm_p=args.tp_norm, attn=args.tp_attn,
                                      global_pruning=not args.tp_local)
            out.append((variant, res.model.eval(), {**res.info, "matched_to": partner, "goal": goal}))
        except Exception as exc:
            out.append((variant, None, {"error": common.first_line(exc)}))
    return out


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Cost and structure of one model (the counter cross-check's error is recorded, never raised)."""
    row: dict[str, Any] = {**V.cost(model), "dims": V.dims_summary(model), "errors": {}}
    try:
        row["flops_counter"] = V.counter_flops(model)
    except Exception as exc:
        row["errors"]["flops_counter"] = common.first_line(exc)
    return row


def export(model: torch.nn.Module, tag: str, args: argparse.Namespace, onnx_dir: Path) -> tuple[Path | None, dict]:
    """Export with :func:`vitopt.export_onnx` (verified in ONNX Runtime); ``(path, info)`` or ``(None, {"error"})``."""
    from vitopt.deploy.onnx_export import export_onnx

    path = onnx_dir / f"{tag}.onnx"
    try:
        info = export_onnx(model, path, V.input_shape(model), exporter=args.exporter, simplify=not args.no_simplify)
    except Exception as exc:  # an export/verify failure of one variant is a result
        return None, {"error": common.first_line(exc)}
    return path, {k: info[k] for k in ("exporter", "opset", "num_nodes", "max_abs_diff", "simplified",
                                       "file_size_bytes", "export_seconds")}


# ------------------------------------------------------------------------------------ measuring
def latency_keys(args: argparse.Namespace) -> list[str]:
    keys = []
    if not args.no_onnx:
        keys += [f"ort_cpu_b{b}" for b in args.cpu_batches]
    if not args.no_torch_cpu:
        keys += [f"torch_cpu_b{b}" for b in args.cpu_batches]
    if not args.no_cuda and torch.cuda.is_available():
        keys += [f"cuda_fp16_b{b}" for b in args.cuda_batches]
    return keys


def _runtimes(kind: str, models: dict[str, torch.nn.Module], onnx: dict[str, Path | None], threads: int):
    """name -> runtime of ``kind`` (ort_cpu / torch_cpu / cuda_fp16) for every model that has what it needs."""
    from vitopt.deploy.runtimes import OrtRuntime, TorchRuntime

    if kind == "ort_cpu":
        return {n: OrtRuntime(onnx[n], threads=threads) for n in models if onnx.get(n) is not None}
    if kind == "torch_cpu":
        return {n: TorchRuntime(m, device="cpu", threads=threads) for n, m in models.items()}
    return {n: common.CudaHalfRuntime(copy.deepcopy(m)) for n, m in models.items()}


def time_group(models: dict[str, torch.nn.Module], onnx: dict[str, Path | None], keys: list[str],
               args: argparse.Namespace, threads: int, what: str) -> dict[str, Any]:
    """Every model of one target (``dense`` first, the reference) timed together, per runtime and batch:
    ``{key: Comparison JSON}``; a runtime that fails records ``{"error"}``."""
    out: dict[str, Any] = {}
    shape = V.input_shape(models["dense"])
    for key in keys:
        kind, b = key.rsplit("_b", 1)
        rts = {}
        try:
            rts = _runtimes(kind, models, onnx, threads)
            if "dense" not in rts:
                out[key] = {"error": "the dense model has no runtime of this kind (export failed?)"}
                continue
            syncs = {n: rt.sync for n, rt in rts.items()} if kind == "cuda_fp16" else None
            out[key] = common.timed_runtimes(rts, shape, int(b), args, what=f"{what} {key}", reference="dense",
                                             syncs=syncs).to_json()
        except Exception as exc:
            out[key] = {"error": common.first_line(exc)}
        finally:
            for rt in reversed(list(rts.values())):
                rt.close()
    return out


def fill_latencies(rows: list[dict], timings: dict[str, Any], keys: list[str]) -> None:
    """``latency_ms`` (median per-call ms over rounds), ``latency_ratio`` (per-round ratio to dense: median,
    min, max, q1, q3) and ``efficiency`` (median latency ratio / FLOPs ratio) of each row of one target."""
    for r in rows:
        name = r["variant"]
        r.setdefault("latency_ms", {})
        r.setdefault("latency_ratio", {})
        for key in keys:
            c = timings.get(key, {}).get("candidates", {}).get(name)
            r["latency_ms"][key] = None if c is None else c["ms"]
            r["latency_ratio"][key] = None if c is None else {k: c["ratio"][k] for k in ("median", "min", "max", "q1", "q3")}
        if "flops_ratio" in r:
            r["efficiency"] = {k: (None if v is None else v["median"] / r["flops_ratio"])
                               for k, v in r["latency_ratio"].items()}


def pair_results(model: str, target: float, rows: list[dict], timings: dict[str, Any], keys: list[str]) -> list[dict]:
    """Per like-for-like pair: achieved FLOPs of both, and per runtime/batch the per-round ratio
    vitopt / Torch-Pruning (median, spread). At FLOPs within :data:`FLOPS_MATCH` the latency ratio decides
    (``faster``: the tool whose ratio's whole IQR is on its side of 1, else ``no clear winner``); otherwise
    the ratio of latency per FLOP is reported and ``basis`` says so."""
    from vitopt.deploy.timing import spread

    by = {r["variant"]: r for r in rows}
    out = []
    for a, b in V.PAIRS:
        ra, rb = by.get(a), by.get(b)
        if ra is None or rb is None or "flops" not in ra or "flops" not in rb:
            continue
        gap = ra["flops"] / rb["flops"] - 1.0
        entry = {"model": model, "target": target, "vitopt": a, "tp": b,
                 "flops_ratio": {a: ra["flops_ratio"], b: rb["flops_ratio"]}, "flops_gap": gap,
                 "basis": "latency at equal FLOPs" if abs(gap) <= FLOPS_MATCH else "latency per FLOP",
                 "ratio": {}, "faster": {}}
        for key in keys:
            cands = timings.get(key, {}).get("candidates", {})
            if a not in cands or b not in cands:
                entry["ratio"][key] = entry["faster"][key] = None
                continue
            per_round = [x / y for x, y in zip(cands[a]["rounds_ms"], cands[b]["rounds_ms"])]
            if abs(gap) > FLOPS_MATCH:
                per_round = [q / (1.0 + gap) for q in per_round]      # (t_a / F_a) / (t_b / F_b)
            r = spread(per_round)
            entry["ratio"][key] = r
            entry["faster"][key] = a if r["q3"] < 1 else b if r["q1"] > 1 else "no clear winner"
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------ printing
_SHORT = {"ort_cpu": "ORT", "torch_cpu": "torch", "cuda_fp16": "cuda16"}


def _short(key: str) -> str:
    kind, b = key.rsplit("_b", 1)
    return f"{_SHORT.get(kind, kind)} b{b}"


def print_results(rows: list[dict], pairs: list[dict], keys: list[str], rounds: int) -> None:
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
        common.print_table(f"{model}: latency (ms per call, median of {rounds} interleaved rounds), "
                           f"threads={rows[0].get('threads')}", cols, table_rows,
                           caption="FLOPs = 2 x MACs per image (vitopt.arch.cost); every model of a target timed "
                                   "together with dense (vitopt.deploy.timing)")
        ratio_rows = [[r["target"], r["variant"], r.get("flops_ratio"),
                       *[common.fmt_ratio(r.get("latency_ratio", {}).get(k)) for k in keys]]
                      for r in mrows if "flops" in r and r["variant"] != "dense"]
        common.print_table(f"{model}: latency / dense latency, median of per-round ratios (min-max)",
                           ["target", ("variant", "left"), "FLOPs ratio", *[(_short(k), "left") for k in keys]],
                           ratio_rows, caption="efficiency = this / FLOPs ratio (1.0: all of the FLOPs saving became "
                                               "speed); in the JSON under efficiency")
        prow = []
        for w in (w for w in pairs if w["model"] == model):
            cells = []
            for k in keys:
                r = w["ratio"].get(k)
                cells.append("-" if r is None else f"{common.fmt_ratio(r)} {w['faster'][k]}")
            prow.append([w["target"], f"{w['vitopt']} vs {w['tp']}", f"{100 * w['flops_gap']:+.2f}%", w["basis"],
                         *cells])
        if prow:
            common.print_table(f"{model}: vitopt / Torch-Pruning per round (median, min-max) and the faster tool",
                               ["target", ("pair", "left"), "FLOPs gap", ("basis", "left"),
                                *[(_short(k), "left") for k in keys]], prow,
                               caption=f"equal FLOPs: within {100 * FLOPS_MATCH:.1f}%; otherwise the ratio is of "
                                       "latency per FLOP. faster: the tool whose side of 1 holds the whole IQR")


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON payload (also written to ``--out``)."""
    args = resolve_args(argv)
    threads = common.set_threads(args.threads)
    args.threads = threads
    variants, skipped = common.available_variants(args.variants, V.TP_VARIANTS)
    keys = latency_keys(args)
    rows: list[dict] = []
    pairs: list[dict] = []
    timings: list[dict] = []
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="vitopt-speedup-")
    onnx_dir = Path(args.onnx_dir or tmp.name)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.models:
            dense = V.build_model(name, seed=args.seed)
            common.console.rule(f"{name} ({type(dense).__name__}, input {V.input_shape(dense)})")
            dense_row = {"model": name, "target": None, "variant": "dense", "tool": "dense", "threads": threads,
                         "prune": {"tool": "dense"}, **describe(dense)}
            dense_onnx = None
            if not args.no_onnx:
                dense_onnx, dense_row["onnx"] = export(dense, f"{name}_dense", args, onnx_dir)
            dense_row["flops_ratio"], dense_row["params_ratio"] = 1.0, 1.0
            dense_ms: dict[str, list[float]] = {}
            rows.append(dense_row)
            caches: dict[str, dict[float, float]] = {}
            for target in args.targets:
                group = build_group(dense, target, [v for v in variants if v != "dense"], args, caches)
                models, onnx, trows = {"dense": dense}, {"dense": dense_onnx}, []
                for variant, model, info in group:
                    row: dict[str, Any] = {"model": name, "target": target, "variant": variant,
                                           "tool": "torch-pruning" if variant in V.TP_VARIANTS else "vitopt",
                                           "threads": threads, "prune": info}
                    if model is None:
                        row["error"] = info.get("error")
                        common.console.print(f"[red]{name} {variant} @ {target}: {row['error']}[/]")
                    else:
                        row.update(describe(model))
                        row["flops_ratio"] = row["flops"] / dense_row["flops"]
                        row["params_ratio"] = row["params"] / dense_row["params"]
                        models[variant] = model
                        if not args.no_onnx:
                            tag = f"{name}_{variant}_{target}".replace("+", "_").replace(".", "p")
                            onnx[variant], row["onnx"] = export(model, tag, args, onnx_dir)
                            if onnx[variant] is None:
                                row["errors"]["onnx"] = row["onnx"]["error"]
                        common.console.print(f"{name} {variant:14s} target={target} "
                                             f"FLOPs ratio={row['flops_ratio']:.4f} ({time.perf_counter() - t_start:.0f} s)")
                    trows.append(row)
                t0 = time.perf_counter()
                tim = time_group(models, onnx, keys, args, threads, f"{name}@{target}")
                timings.append({"model": name, "target": target, "comparisons": tim,
                                 "seconds": time.perf_counter() - t0})
                fill_latencies(trows, tim, keys)
                for key in keys:
                    c = tim.get(key, {}).get("candidates", {}).get("dense")
                    if c is not None:
                        dense_ms.setdefault(key, []).append(c["ms"])
                pairs += pair_results(name, target, trows, tim, keys)
                rows += trows
                for p in onnx.values():
                    if p is not None and args.onnx_dir is None and p != dense_onnx:
                        p.unlink(missing_ok=True)
                del models, group
                gc.collect()
            # dense: the median of its per-target medians (it is timed with every target's group)
            dense_row["latency_ms"] = {k: statistics.median(v) if (v := dense_ms.get(k)) else None for k in keys}
            dense_row["latency_ms_per_target"] = dense_ms
            del dense
            gc.collect()
    finally:
        tmp.cleanup()
    print_results(rows, pairs, keys, args.rounds)
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "latency_keys": keys, "timing": "vitopt.deploy.timing (interleaved rounds, per-round ratios)",
               "tp_available": common.tp_status()[0], "tp_skipped": skipped, "rows": rows, "pairs": pairs,
               "timings": timings, "seconds": time.perf_counter() - t_start}
    common.write_json(args.out, payload, script=SCRIPT, args=payload["config"], argv=argv)
    return payload


if __name__ == "__main__":
    main()
