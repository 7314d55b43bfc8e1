"""PyTorch vs ONNX Runtime parity of every pruned model (vitopt and Torch-Pruning) of a speedup config.

Rebuilds the dense and pruned models exactly as ``speedup.py`` does (same presets, targets,
variants, seed and Torch-Pruning settings; ``--from-json benchmarks/results/speedup.json`` takes them from a
speedup run), exports each with ``vitopt.deploy.onnx_export.export_onnx`` (``verify=False``, so a
mismatch is measured rather than raised), then runs ``--samples`` standard-normal images through
PyTorch (eval, fp32, timm's default fused attention) and ONNX Runtime (CPU) and reports the max
abs logit difference, the max relative to the largest |logit|, and the fraction of images whose
top-1 class agrees. invariant 4 of docs/architecture.md asks for max abs diff <= 1e-4 and the same top-1.

Random-init models produce nearly flat logits, so an argmax can flip on float noise alone; the
``margin`` column (smallest top-1 minus top-2 logit gap among the inputs) shows how close to a tie
the inputs came.

    python benchmarks/parity.py [--quick] [--from-json benchmarks/results/speedup.json] [--out benchmarks/results/parity.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import variants as V  # noqa: E402

SCRIPT = "parity"
#: settings shared with speedup.py (taken from --from-json when given).
SHARED = ("models", "targets", "variants", "seed", "tp_attn", "tp_norm", "tp_local", "tp_tol", "tp_max_iter",
          "tp_grid", "exporter")
DEFAULTS = dict(models=["deit_s", "deit_b"], exporter="auto", tp_max_iter=12, tp_grid=11, samples=64, batch=16)
QUICK = dict(models=["tiny"], exporter="torchscript", tp_max_iter=8, tp_grid=7, samples=32, batch=16)
TOL = 1e-4


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny ViT of speedup.py --quick")
    ap.add_argument("--from-json", type=Path, help="take models/targets/variants/TP settings from a speedup JSON")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--variants", nargs="+", default=["dense", "vitopt", "vitopt+embed", "tp", "tp-bottleneck"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, help="random images compared per model (default 64; quick 32)")
    ap.add_argument("--batch", type=int, help="images per call (default 16)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"])
    ap.add_argument("--no-simplify", action="store_true")
    ap.add_argument("--tp-attn", choices=["head_dims", "heads", "both"], default="head_dims")
    ap.add_argument("--tp-norm", type=int, default=2)
    ap.add_argument("--tp-local", action="store_true")
    ap.add_argument("--tp-tol", type=float, default=0.01)
    ap.add_argument("--tp-grid", type=int)
    ap.add_argument("--tp-max-iter", type=int)
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    return ap


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        cfg = json.loads(Path(args.from_json).read_text()).get("config", {})
        for k in SHARED:
            if k in cfg and cfg[k] is not None:
                setattr(args, k, cfg[k])
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def compare(model: torch.nn.Module, onnx_path: Path, samples: int, batch: int, seed: int, threads: int) -> dict:
    from vitopt.deploy.accuracy import compare_logits
    from vitopt.deploy.runtimes import OrtRuntime, TorchRuntime

    shape = V.input_shape(model)
    x = np.random.default_rng(seed).standard_normal((samples, *shape), dtype=np.float32)
    pt, ort = TorchRuntime(model, threads=threads), OrtRuntime(onnx_path, threads=threads)
    try:
        a = np.concatenate([pt(x[i:i + batch]) for i in range(0, samples, batch)])
        b = np.concatenate([ort(x[i:i + batch]) for i in range(0, samples, batch)])
    finally:
        pt.close()
        ort.close()
    out = compare_logits(a, b)
    top2 = np.sort(a, axis=1)[:, -2:]
    out["max_rel_diff"] = out["max_abs_diff"] / max(float(np.abs(a).max()), 1e-12)
    out["min_top1_margin"] = float((top2[:, 1] - top2[:, 0]).min())
    out["max_abs_logit"] = float(np.abs(a).max())
    out["samples"] = samples
    out["pass"] = bool(out["max_abs_diff"] <= TOL and out["argmax_agreement"] == 1.0)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the parity check; returns the JSON payload (also written to ``--out``)."""
    from vitopt.deploy.onnx_export import export_onnx

    args = resolve_args(argv)
    threads = common.set_threads(args.threads)
    variants, skipped = common.available_variants(args.variants, V.TP_VARIANTS)
    rows: list[dict] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitopt-parity-") as tmp:
        for name in args.models:
            dense = V.build_model(name, seed=args.seed)
            for target, variant, model, info in V.pruned_variants(
                    dense, args.targets, variants, tp_attn=args.tp_attn, tp_norm=args.tp_norm, tp_tol=args.tp_tol,
                    tp_max_iter=args.tp_max_iter, tp_grid=args.tp_grid, tp_global=not args.tp_local):
                row: dict[str, Any] = {"model": name, "target": target, "variant": variant,
                                       "tool": "torch-pruning" if variant in V.TP_VARIANTS else
                                       ("vitopt" if variant in V.VITOPT_VARIANTS else "dense")}
                if model is None:
                    row["error"] = info.get("error")
                else:
                    row["flops_ratio"] = V.cost(model)["flops"] / V.cost(dense)["flops"]
                    row["dims"] = V.dims_summary(model)
                    if "ratio" in info:
                        row["tp_ratio"] = info["ratio"]
                    path = Path(tmp) / f"m{len(rows)}.onnx"
                    try:
                        exp = export_onnx(model, path, V.input_shape(model), exporter=args.exporter,
                                          simplify=not args.no_simplify, verify=False)
                        row["exporter"] = exp["exporter"]
                        row.update(compare(model, path, args.samples, args.batch, args.seed + 1, threads))
                    except Exception as exc:  # export failure of one variant is a result
                        row["error"] = common.first_line(exc)
                    finally:
                        path.unlink(missing_ok=True)
                rows.append(row)
                common.console.print(f"{name} {variant:14s} target={target} "
                                     f"{'max_abs_diff={:.2e}'.format(row['max_abs_diff']) if 'max_abs_diff' in row else row.get('error')}")
                if model is not dense:
                    del model
                gc.collect()
    table = [[r["model"], r["target"], r["variant"], r.get("flops_ratio"),
              None if "max_abs_diff" not in r else f"{r['max_abs_diff']:.2e}",
              None if "max_rel_diff" not in r else f"{r['max_rel_diff']:.1e}",
              r.get("argmax_agreement"), None if "min_top1_margin" not in r else f"{r['min_top1_margin']:.1e}",
              {True: "yes", False: "NO"}.get(r.get("pass")), r.get("error", "")] for r in rows]
    common.print_table(f"PyTorch (fp32, eager) vs ONNX Runtime (CPU): {args.samples} random inputs per model",
                       [("model", "left"), "target", ("variant", "left"), "FLOPs ratio", "max abs diff",
                        "max rel diff", "argmax agree", "min margin", "pass", ("error", "left")], table,
                       caption=f"pass: max abs logit diff <= {TOL:g} and every top-1 equal (invariant 4 of docs/architecture.md)")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "tolerance": TOL, "tp_available": common.tp_status()[0], "tp_skipped": skipped, "rows": rows,
               "seconds": time.perf_counter() - t_start}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


if __name__ == "__main__":
    main()
