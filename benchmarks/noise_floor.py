"""Noise floor of the timing method: the same model timed against itself.

Every latency comparison in vitopt (the ``validate`` stage, every benchmark) is measured with
:mod:`vitopt.deploy.timing`: warm-up, then interleaved rounds, and the median of per-round ratios with
its spread. Two runtimes of the *same* model (two ONNX Runtime sessions of one file; two PyTorch runtimes
of one model) timed that way should give a ratio of 1; how far the median and the spread stray from 1
on this machine is the noise floor that every claimed speed-up must exceed.

Models: the quickstart's ViT (``recipes/quickstart.yaml``: 16x16 digits, width 128, depth 6; random
init, which does not change dense kernel timings) at batch 1 and 32, and DeiT-S/16-224 (random init)
at batch 1 (a batch of 32 takes seconds per call on 2 shared cores), on ONNX Runtime CPU and PyTorch
eager CPU, with the validate stage's defaults (10 rounds, 100 ms blocks)
unless told otherwise.

    python benchmarks/noise_floor.py [--quick] [--threads 2] [--out benchmarks/results/noise_floor.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = "noise_floor"
#: the quickstart recipe's model (recipes/quickstart.yaml), 10 classes
QUICKSTART = ("deit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 128, "depth": 6,
                                        "num_heads": 4, "num_classes": 10})
MODELS = {"quickstart": QUICKSTART, "deit_s": ("deit_small_patch16_224", {})}
#: default batch sizes per model (``--batches`` sets them for every model)
BATCHES = {"quickstart": [1, 32], "deit_s": [1]}
DEFAULTS = dict(models=["quickstart", "deit_s"], rounds=10, round_ms=100.0, warmup=5)
QUICK = dict(models=["quickstart"], batches=[1], rounds=3, round_ms=5.0, warmup=1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quickstart model at batch 1, 3 short rounds")
    ap.add_argument("--models", nargs="+", choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, help="batch sizes for every model (default: quickstart 1 32, "
                                                           "deit_s 1)")
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "pytorch"], choices=["onnxruntime", "pytorch"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the validate stage's default: 2)")
    common.add_timing_args(ap)
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    return ap


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (model, runtime, batch): the per-round ratio 'A again' / 'A' and the comparison."""
    import timm
    import torch

    from vitopt.deploy.onnx_export import export_onnx
    from vitopt.deploy.runtimes import OrtRuntime, TorchRuntime

    rows = []
    with tempfile.TemporaryDirectory(prefix="vitopt-noise-") as tmp:
        for name in args.models:
            timm_name, kw = MODELS[name]
            torch.manual_seed(0)
            model = timm.create_model(timm_name, pretrained=False, **kw).eval()
            pe = model.patch_embed
            shape = (pe.proj.in_channels, *pe.img_size)
            onnx = Path(tmp) / f"{name}.onnx"
            if "onnxruntime" in args.runtimes:
                export_onnx(model, onnx, shape, exporter="torchscript")
            for kind in args.runtimes:
                for b in args.batches or BATCHES[name]:
                    if kind == "onnxruntime":
                        rts = {"A": OrtRuntime(onnx, threads=args.threads), "A again": OrtRuntime(onnx, threads=args.threads)}
                    else:
                        rts = {"A": TorchRuntime(model, threads=args.threads),
                               "A again": TorchRuntime(model, threads=args.threads)}
                    try:
                        res = common.timed_runtimes(rts, shape, b, args, what=f"{name} {kind} b{b}")
                    finally:
                        for rt in reversed(list(rts.values())):
                            rt.close()
                    r = res.ratio("A again")
                    rows.append({"model": name, "runtime": kind, "batch": b, "ms": res.candidates["A"]["ms"],
                                 "ratio": {k: r[k] for k in ("median", "min", "max", "q1", "q3")},
                                 "median_off_by": abs(r["median"] - 1.0),
                                 "spread": r["max"] - r["min"], "comparison": res.to_json()})
                    common.console.print(f"{name} {kind} b{b}: {common.fmt_ratio(r, 3)}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print and write the noise floor; returns the JSON payload."""
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    args.threads = common.set_threads(args.threads)
    t0 = time.perf_counter()
    rows = measure(args)
    common.print_table(f"Noise floor: the same model against itself ({args.rounds} interleaved rounds, "
                       f"{args.threads} threads)",
                       [("model", "left"), ("runtime", "left"), "batch", "ms per call",
                        ("ratio, median (min-max)", "left"), "IQR"],
                       [[r["model"], r["runtime"], r["batch"], r["ms"], common.fmt_ratio(r["ratio"], 3),
                         f"{r['ratio']['q1']:.3f}-{r['ratio']['q3']:.3f}"] for r in rows],
                       caption="A claimed latency ratio means something only when its spread clears this one")
    worst = {"median_off_by": max(r["median_off_by"] for r in rows),
             "min": min(r["ratio"]["min"] for r in rows), "max": max(r["ratio"]["max"] for r in rows)}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "rows": rows, "worst": worst, "seconds": time.perf_counter() - t0}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


if __name__ == "__main__":
    main()
