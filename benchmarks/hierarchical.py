"""Hierarchical ViTs on digits: a small Swin and a small PVTv2, pruned to 60% and 40% of FLOPs.

For each model: train dense on the embedded digits (8x8 images upsampled to ``--img-size``); then for
each FLOPs target prune with the ``search`` criterion (SiDT-style gates under the FLOPs target,
Xue et al. 2022, arXiv 2204.07722; :mod:`vitopt.pruning.search`) over every group - per-stage embed
widths, per-block heads, head_dim and MLP hidden - with global allocation, then fine-tune with KD from
the dense model (Hinton et al. 2015). Reported per model: top-1 (validation split), FLOPs (2 x MACs,
one image), params, ONNX Runtime CPU latency at batch 1 and 32 (``vitopt.deploy`` export; all variants
of a model timed together with the one method of :mod:`vitopt.deploy.timing`: warm-up, interleaved
rounds, ms per call = median over rounds, latency ratio = median of per-round ratios to dense with
min-max), the kept dims per stage, and the pruned multi-scale backbone's channels.

    OMP_NUM_THREADS=1 python benchmarks/hierarchical.py [--quick] [--out benchmarks/results/hierarchical.json]

Numbers from a shared 2-core CPU are noisy; the JSON records the environment.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

#: timm name and kwargs of the two small hierarchical models (img_size / in_chans / classes added).
MODELS = {
    "swin": ("swin_tiny_patch4_window7_224",
             dict(patch_size=4, window_size=4, embed_dim=48, depths=(2, 2), num_heads=(3, 6), drop_path_rate=0.0)),
    "pvt_v2": ("pvt_v2_b0",
               dict(depths=(2, 2), embed_dims=(48, 96), num_heads=(3, 6), sr_ratios=(2, 1), mlp_ratios=(4, 4))),
}

QUICK = dict(dense_epochs=1, finetune_epochs=1, search_steps=5, rounds=2, warmup=1, round_ms=10.0)
FULL = dict(dense_epochs=20, finetune_epochs=8, search_steps=60, rounds=10, warmup=3, round_ms=100.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (numbers mean nothing)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.4], help="FLOPs fractions to keep")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--dense-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--search-steps", type=int)
    common.add_timing_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--rank", default="per_cost", choices=["per_cost", "score"],
                   help="allocation ranking of the gate scores (vitopt.pruning.allocation.allocate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=common.default_out("hierarchical"))
    return p


def _model(name: str, args) -> torch.nn.Module:
    from vitopt.arch.config import create_model

    timm_name, kw = MODELS[name]
    return create_model(timm_name, {**kw, "img_size": args.img_size, "in_chans": 1, "num_classes": 10})


def _cost(model) -> dict[str, int]:
    from vitopt.arch.cost import CostModel

    cm = CostModel(model)
    dims = cm.structure.sizes()
    return {"flops": cm.flops(dims), "params": cm.params(dims)}


def _dims(model) -> dict[str, Any]:
    """Per stage: embed width, and per block heads x head_dim / mlp."""
    from vitopt.arch.families import family_of

    st = family_of(model).structure(model)
    out: dict[str, Any] = {}
    for s in st.stages():
        embed = [g for g in st.of_kind("embed") if g.stage == s][0]
        blocks = sorted({g.block for g in st.groups.values() if g.stage == s and g.block is not None})
        out[f"stage{s}"] = {"embed": embed.size, "blocks": [
            {k: next(g.size for g in st.groups.values() if g.block == b and g.kind == k) for k in ("heads", "head_dim", "mlp")}
            for b in blocks]}
    return out


def _export(model, input_shape, tmp: Path, tag: str) -> dict[str, Any]:
    from vitopt.deploy.onnx_export import export_onnx

    path = tmp / f"{tag}.onnx"
    info = export_onnx(model, path, input_shape)
    return {"onnx": path, "onnx_max_abs_diff": info.get("max_abs_diff")}


def _latencies(rows: list[dict], input_shape, args) -> None:
    """ONNX Runtime latency of every row's ONNX file, all variants of a model timed together per batch size
    (:func:`vitopt.deploy.timing.compare_runtimes`, dense the reference): ``ms_b{B}`` per call (median over
    rounds), ``ratio_b{B}`` (per-round ratio to dense: median, min, max, q1, q3), and the comparison."""
    from vitopt.deploy.runtimes import make_runtime

    runtimes = {f"{r['variant']}@{r['target']}": make_runtime("onnxruntime", onnx_path=r["onnx"], threads=args.threads)
                for r in rows}
    ref = next(iter(runtimes))
    try:
        for b in (1, 32):
            res = common.timed_runtimes(runtimes, input_shape, b, args, what=f"{rows[0]['model']} b{b}", reference=ref)
            for r, name in zip(rows, runtimes):
                c = res.candidates[name]
                r[f"ms_b{b}"] = c["ms"]
                r[f"ratio_b{b}"] = {k: c["ratio"][k] for k in ("median", "min", "max", "q1", "q3")}
                r.setdefault("timing", {})[f"b{b}"] = {k: c[k] for k in ("rounds_ms", "calls", "p50_ms", "p90_ms")}
            rows[0].setdefault("timings", {})[f"b{b}"] = {k: v for k, v in res.to_json().items() if k != "candidates"}
    finally:
        for rt in runtimes.values():
            rt.close()
    for r in rows:
        r["onnx"] = Path(r["onnx"]).name


def _prune(model, data, args, target: float) -> tuple[torch.nn.Module, dict]:
    """``vitopt.prune_with_report`` with the ``search`` criterion on 8 calibration batches."""
    import vitopt
    from vitopt.pruning.calibration import calibration_batches

    calib = calibration_batches(data.train, "search", batches=8, batch_size=args.batch_size, seed=args.seed + 7)
    t0 = time.perf_counter()
    res = vitopt.prune_with_report(model.eval(), target={"flops": target}, criterion="search",
                                   groups=["embed", "heads", "head_dim", "mlp"], data=calib,
                                   round_to={"heads": 1, "head_dim": 8, "mlp": 16, "embed": 8}, rank=args.rank,
                                   criterion_options={"steps": args.search_steps})
    return res.model, {"search": res.rounds[0]["criterion_cost"], "prune_seconds": time.perf_counter() - t0}


def run_model(name: str, args, tmp: Path) -> dict[str, Any]:
    from vitopt.deploy.backbone import feature_specs, make_backbone
    from vitopt.train.data import load_data, make_loader, model_input
    from vitopt.train.loop import TrainHParams, evaluate, fit, set_seed

    set_seed(args.seed)
    dense = _model(name, args)
    mi = model_input(dense)
    input_shape = (mi.in_chans, *mi.img_size)
    data = load_data(SimpleNamespace(type="digits", val_fraction=0.2), mi, args.seed)
    val = make_loader(data.val, 256, shuffle=False, seed=0)

    def train_loader(seed: int):
        return make_loader(data.train, args.batch_size, shuffle=True, seed=seed, drop_last=True)

    t0 = time.perf_counter()
    fit(dense, train_loader(args.seed), None, TrainHParams(epochs=args.dense_epochs, lr=args.lr, warmup_epochs=1.0),
        desc=f"{name} dense")
    dense.eval()
    dense_cost = _cost(dense)
    rows = [{"model": name, "variant": "dense", "target": 1.0, "flops": dense_cost["flops"], "params": dense_cost["params"],
             "flops_ratio": 1.0, "top1": evaluate(dense, val)["top1"], "train_seconds": time.perf_counter() - t0,
             "dims": _dims(dense), **_export(dense, input_shape, tmp, f"{name}_dense")}]
    common.console.print(f"{name} dense: top-1 {rows[0]['top1']:.2f}, {dense_cost['flops'] / 1e6:.2f} MFLOPs")
    teacher = copy.deepcopy(dense).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for target in args.targets:
        t0 = time.perf_counter()
        pruned, info = _prune(dense, data, args, target)
        top1_oneshot = evaluate(pruned, val)["top1"]
        set_seed(args.seed + 1)
        fit(pruned, train_loader(args.seed + 2), None,
            TrainHParams(epochs=args.finetune_epochs, lr=args.ft_lr, warmup_epochs=0.0),
            teacher=teacher, kd_alpha=0.7, kd_tau=2.0, desc=f"{name}@{target}")
        pruned.eval()
        c = _cost(pruned)
        backbone = make_backbone(pruned)
        row = {"model": name, "variant": "search+KD", "target": target, "flops": c["flops"], "params": c["params"],
               "flops_ratio": c["flops"] / dense_cost["flops"], "top1_oneshot": top1_oneshot,
               "top1": evaluate(pruned, val)["top1"], "seconds": time.perf_counter() - t0, "dims": _dims(pruned),
               "backbone": feature_specs(backbone, input_shape), **info,
               **_export(pruned, input_shape, tmp, f"{name}_{target}")}
        common.console.print(f"{name} @ {target}: FLOPs ratio {row['flops_ratio']:.3f}, top-1 {top1_oneshot:.1f} -> "
                             f"{row['top1']:.2f}")
        rows.append(row)
    _latencies(rows, input_shape, args)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = common.parse_with_defaults(parser, argv, QUICK, FULL)
    common.set_threads(args.threads)
    rows: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += run_model(name, args, Path(tmp))["rows"]
    table = []
    for r in rows:
        stages = " / ".join(str(v["embed"]) for v in r["dims"].values())
        table.append([r["model"], r["variant"], r["target"], r["flops"] / 1e6, r["flops_ratio"], r["params"] / 1e3,
                      r.get("top1_oneshot"), r["top1"], r["ms_b1"], r["ms_b32"], common.fmt_ratio(r["ratio_b32"]),
                      stages])
    common.print_table(f"Hierarchical ViTs on digits: SiDT-style search + KD (ONNX Runtime CPU, {args.threads} thread(s), "
                       f"{args.rounds} interleaved rounds)",
                       ["model", "variant", "target", "MFLOPs", "FLOPs ratio", "kparams", "top-1 one-shot",
                        "top-1", "ORT b1 ms", "ORT b32 ms", ("latency ratio b32 (min-max)", "left"),
                        ("embed per stage", "left")], table)
    payload = {"rows": rows, "seconds": time.perf_counter() - start}
    common.write_json(args.out, payload, script="hierarchical.py", args=vars(args), argv=argv)
    return payload


if __name__ == "__main__":
    main()
