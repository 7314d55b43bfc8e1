"""Width, depth or both at the same FLOPs: which buys the most ONNX Runtime CPU speed per point of top-1?

ModelOpt's guidance and NVIDIA's MDP (Sun et al., "Multidimensional Vision Model Pruning with Latency
Constraint", CVPR 2025) find that removing whole blocks buys more real latency per point of accuracy
than width at the same cost. This script tests that on the embedded digits data with a DINOv2-style
ViT (``--model dinov2``: LayerScale, 4 register tokens with ``no_embed_class``) or an EVA-02-style Eva
(``--model eva02``: RoPE, q/v bias, packed SwiGLU; head_dim is fixed under RoPE, so width is embed, heads
and mlp); 16 px, width 128, ``--depth`` blocks, one seed:

1. the dense model is trained on digits (the quickstart recipe's dense training);
2. one set of ``taylor`` scores (8 calibration batches of 64) prices every kind; each variant is
   pruned one-shot with :func:`vitopt.prune` to ``--flops`` (0.5) of the dense FLOPs (global allocation,
   FLOPs priced analytically, the budget met from below):

   * ``width``: the default kinds (embed, heads, head_dim, mlp);
   * ``depth``: blocks only (taylor: the gradient of a gate on both residual branches of a block);
   * ``depth (angular)``: blocks only, ranked by the angular distance between a block's input and output
     tokens (Gromov et al. 2024, arXiv 2403.17887), the depth-only criterion of the literature;
   * ``width+depth``: blocks and every width kind under the one budget;
   * ``width @ depth FLOPs``: width only, pruned to the FLOPs the ``depth`` variant reached. A block is a
     big chunk (1/depth of the model): depth-only meets 0.5 from below by removing one block more than
     half, so it lands well under the target; this row compares width and depth at equal FLOPs;

3. every pruned model gets the same fine-tune budget (``--finetune-epochs`` of KD from the dense model,
   alpha 0.7, tau 2, lr 3e-4: the quickstart's fine-tune, same seed and batch order);
4. dense and all variants are exported to ONNX and timed together on ONNX Runtime CPU at batch 1 with
   ``--threads`` (1) thread, interleaved (:mod:`vitopt.deploy.timing`: warm-up, ``--final-rounds`` rounds,
   the median of per-round ratios to dense with min-max).

"Speed per point" is ``(dense ms / ms - 1) / (dense top-1 - top-1)``: the fractional speed-up bought per
point of top-1 given up after fine-tuning (``inf`` when no point was lost). One seed: read top-1 gaps
under ~1 point as no difference.

    python benchmarks/depth_width.py [--quick] [--threads 1] [--out benchmarks/results/depth_width.json]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = "depth_width"
#: --model -> (timm name, kwargs) at 16 px, width 128, 4 heads
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # DINOv2-style: LayerScale (init_values), 4 register tokens, no_embed_class, class token, pos_embed
    "dinov2": ("vit_small_patch14_reg4_dinov2", {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 128,
                                                 "num_heads": 4, "num_classes": 10, "init_values": 1e-5,
                                                 "dynamic_img_size": False}),
    # EVA-02-style (eva family): rotary position embedding (head_dim fixed), fused qkv with q/v bias, packed SwiGLU
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 128,
                                         "num_heads": 4, "num_classes": 10}),
}
WIDTH = ["embed", "heads", "head_dim", "mlp"]
#: variant -> (criterion, groups, FLOPs target: None = --flops, else the variant whose achieved FLOPs to match)
VARIANTS: dict[str, tuple[str, list[str], str | None]] = {
    "width": ("taylor", WIDTH, None),
    "depth": ("taylor", ["blocks"], None),
    "depth (angular)": ("angular", ["blocks"], None),
    "width+depth": ("taylor", ["blocks", *WIDTH], None),
    "width @ depth FLOPs": ("taylor", WIDTH, "depth"),
}
ROUND_TO = {"heads": 1, "head_dim": 8, "mlp": 16, "embed": 8, "blocks": 1}
DEFAULTS = dict(depth=8, dense_epochs=20, finetune_epochs=10, final_rounds=15, round_ms=100.0, warmup=3)
QUICK = dict(depth=4, dense_epochs=1, finetune_epochs=1, final_rounds=3, round_ms=5.0, warmup=1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 blocks, 1 epoch each, short timings (smoke run)")
    ap.add_argument("--flops", type=float, default=0.5, help="FLOPs target as a fraction of dense (default 0.5)")
    ap.add_argument("--depth", type=int, help="transformer blocks of the dense model (default 8; quick 4)")
    ap.add_argument("--dense-epochs", type=int, help="dense training on digits (default 20)")
    ap.add_argument("--finetune-epochs", type=int, help="KD fine-tune of each pruned model (default 10)")
    ap.add_argument("--final-rounds", type=int, help="interleaved rounds of the final timing (default 15)")
    common.add_timing_args(ap)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime / torch CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="dinov2", choices=list(MODELS), help="dense model style (default dinov2)")
    ap.add_argument("--compare", default="normalized", choices=["normalized", "calibrated", "isomorphic"],
                    help="how width and depth units compete (default normalized, as the committed results were made; "
                         "the library default is calibrated)")
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    return ap


def _loader(data, train: bool, seed: int):
    from vitopt.train.data import make_loader

    return (make_loader(data.train, 64, shuffle=True, seed=seed, drop_last=True) if train
            else make_loader(data.val, 256, shuffle=False, seed=0))


def _train_dense(model, data, args) -> float:
    """The quickstart recipe's dense training (AdamW lr 3e-3, 2 warm-up epochs, label smoothing 0.1)."""
    from vitopt.train.loop import TrainHParams, evaluate, fit, set_seed

    set_seed(args.seed)
    fit(model, _loader(data, True, args.seed), None,
        TrainHParams(epochs=args.dense_epochs, lr=3e-3, warmup_epochs=min(2.0, args.dense_epochs / 2)), desc="dense")
    model.eval()
    return evaluate(model, _loader(data, False, 0))["top1"]


def _finetune(model, teacher, data, args) -> float:
    """The quickstart's fine-tune: KD (alpha 0.7, tau 2) from the dense model, lr 3e-4, 1 warm-up epoch."""
    from vitopt.train.loop import TrainHParams, evaluate, fit, set_seed

    set_seed(args.seed + 1)
    fit(model, _loader(data, True, args.seed + 2), None,
        TrainHParams(epochs=args.finetune_epochs, lr=3e-4, warmup_epochs=min(1.0, args.finetune_epochs / 2)),
        teacher=teacher, kd_alpha=0.7, kd_tau=2.0, desc="finetune")
    model.eval()
    return evaluate(model, _loader(data, False, 0))["top1"]


def _top1(model, data) -> float:
    from vitopt.train.loop import evaluate

    return evaluate(model.eval(), _loader(data, False, 0))["top1"]


def speed_per_point(speedup: float, drop: float) -> float:
    """``(speedup - 1) / drop``: fractional speed-up per point of top-1 lost (inf when none was lost)."""
    if drop <= 0:
        return math.inf if speedup > 1 else 0.0
    return (speedup - 1) / drop


def run(args, tmp: Path) -> dict[str, Any]:
    import vitopt
    from vitopt.arch.config import create_model
    from vitopt.deploy.runtimes import OrtRuntime
    from vitopt.pruning.calibration import calibration_batches
    from vitopt.pruning.prune import prune_with_report
    from vitopt.train.data import load_data
    from vitopt.train.inputs import model_input

    timm_name, kwargs = MODELS[args.model]
    kwargs = {**kwargs, "depth": args.depth}
    torch.manual_seed(args.seed)
    dense = create_model(timm_name, dict(kwargs)).eval()
    mi = model_input(dense)
    shape = (mi.in_chans, *mi.img_size)
    out: dict[str, Any] = {"model": args.model, "timm": timm_name, "kwargs": kwargs, "compare": args.compare, "input_shape": list(shape), "flops_target": args.flops}
    data = load_data(SimpleNamespace(type="digits", val_fraction=0.2), mi, args.seed)
    t0 = time.perf_counter()
    dense_top1 = _train_dense(dense, data, args)
    out["train_seconds"] = time.perf_counter() - t0
    calib = calibration_batches(data.train, "taylor", batches=8, batch_size=64, seed=args.seed + 5)
    base = vitopt.structure(dense)
    dense_flops, dense_params = base.cost("flops"), base.cost("params")
    kinds = {g.kind for g in base.groups.values()}
    teacher = copy.deepcopy(dense).eval().requires_grad_(False)
    models = {"dense": dense}
    rows: dict[str, dict[str, Any]] = {"dense": {"criterion": None, "groups": [], "flops_ratio": 1.0,
                                                 "params_ratio": 1.0, "blocks": args.depth, "top1": dense_top1,
                                                 "top1_one_shot": dense_top1}}
    for label, (criterion, groups, match) in VARIANTS.items():
        target = args.flops if match is None else rows[match]["flops_ratio"]
        common.console.rule(f"{label}: prune to {target:.3f} of dense FLOPs ({criterion}, {groups})")
        t1 = time.perf_counter()
        groups = [g for g in groups if g in kinds]     # Eva under RoPE has no head_dim group
        res = prune_with_report(dense, target={"flops": target}, criterion=criterion, groups=groups, data=calib,
                                round_to=ROUND_TO, compare=args.compare)
        m = res.model.eval()
        st = vitopt.structure(m)
        row = {"criterion": criterion, "groups": groups, "flops_target": target, "flops_ratio": st.cost("flops") / dense_flops,
               "params_ratio": st.cost("params") / dense_params, "blocks": len(m.blocks),
               "kept_blocks": list(getattr(m, "vitopt_kept_units", {}).get("blocks", range(args.depth))),
               "embed": int(m.embed_dim), "prune_seconds": time.perf_counter() - t1,
               "top1_one_shot": _top1(m, data)}
        t1 = time.perf_counter()
        row["top1"] = _finetune(m, teacher, data, args)
        row["finetune_seconds"] = time.perf_counter() - t1
        rows[label], models[label] = row, m
    common.console.rule("final timing (ONNX Runtime CPU, batch 1, interleaved)")
    paths = {}
    for i, (label, m) in enumerate(models.items()):
        paths[label] = tmp / f"m{i}.onnx"
        vitopt.export_onnx(m, paths[label], shape, exporter="torchscript", simplify=False)
    rts = {n: OrtRuntime(p, threads=args.threads) for n, p in paths.items()}
    try:
        final = common.timed_runtimes(rts, shape, 1, args, what="depth_width final", rounds=args.final_rounds,
                                      reference="dense")
    finally:
        for rt in rts.values():
            rt.close()
    for label, row in rows.items():
        c = final.candidates[label]
        row["ms"] = c["ms"]
        row["ratio_to_dense"] = {k: c["ratio"][k] for k in ("median", "min", "max", "q1", "q3")}
        speedup = 1.0 / row["ratio_to_dense"]["median"]
        row["speedup"] = speedup
        row["top1_drop"] = dense_top1 - row["top1"]
        row["speed_per_point"] = None if label == "dense" else speed_per_point(speedup, row["top1_drop"])
    out.update(rows=rows, dense_top1=dense_top1, final_timing=final.to_json(), verdict=verdict(rows))
    return out


def verdict(rows: dict[str, dict]) -> str:
    """One sentence: which variant bought the most measured speed per point of top-1 (one seed)."""
    pruned = {k: r for k, r in rows.items() if k != "dense"}
    best = max(pruned, key=lambda k: (pruned[k]["speed_per_point"], pruned[k]["speedup"]))
    parts = [f"{k}: {r['flops_ratio']:.2f} FLOPs, {r['speedup']:.2f}x faster, {r['top1_drop']:+.2f} points lost"
             for k, r in pruned.items()]
    return f"{best} buys the most measured speed per point of top-1 ({'; '.join(parts)}; one seed)."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; print the table; write the JSON."""
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    args.threads = common.set_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitopt-depthwidth-") as tmp:
        res = run(args, Path(tmp))
    table = [[label, r["flops_ratio"], r["params_ratio"], r["blocks"], r.get("top1_one_shot"), r["top1"], r["ms"],
              common.fmt_ratio(r["ratio_to_dense"], 3), r["speed_per_point"]] for label, r in res["rows"].items()]
    style = {"dinov2": "DINOv2-style ViT", "eva02": "EVA-02-style Eva"}[args.model]
    common.print_table(f"Width vs depth at {args.flops} of dense FLOPs, {style} on digits (ONNX Runtime CPU, "
                       f"batch 1, {args.threads} thread(s); {args.final_rounds} interleaved rounds; one seed)",
                       [("variant", "left"), "FLOPs ratio", "params ratio", "blocks", "top-1 one-shot",
                        "top-1 fine-tuned", "ms", ("x dense (min-max)", "left"), "speed per point"], table)
    common.console.print(res["verdict"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "result": res, "seconds": time.perf_counter() - t0}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


if __name__ == "__main__":
    main()
