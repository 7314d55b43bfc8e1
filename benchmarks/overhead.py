"""Overheads: a training step with VTP gates vs without, and the time to prune DeiT-B to 50% FLOPs.

1. Training step (forward, cross-entropy, backward, AdamW step; median ms over ``--steps`` timed
   steps after ``--warmup`` untimed ones) of the same model on the same random batch, dense vs with
   ``vitopt.arch.gates.UnitGates`` attached to heads/head_dim/mlp (VTP, Zhu et al. 2021: the
   gates are forward hooks at each group's choke point, plus the ``lambda * sum|gate|`` penalty and
   the gate parameters in the optimizer). On CUDA when available (``--device``), else CPU.
2. Surgery: wall time to prune DeiT-B/16-224 (random init) to 50% of its FLOPs with vitopt - l1
   importance, global allocation with rounding, physical surgery, each timed (median over
   ``--surgery-repeats``) - for groups heads/head_dim/mlp and with embed; and with Torch-Pruning
   (dependency-graph build + pruning at the ratio found by the FLOPs search, plus the search itself).

    python benchmarks/overhead.py [--quick] [--out results/overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import variants as V  # noqa: E402

SCRIPT = "overhead"
DEFAULTS = dict(model="deit_s", batch=32, steps=20, warmup=3, surgery_model="deit_b", surgery_repeats=3)
QUICK = dict(model="tiny", batch=32, steps=10, warmup=2, surgery_model="tiny", surgery_repeats=2)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny ViT for both parts")
    ap.add_argument("--model", help="model of the training-step part (default deit_s)")
    ap.add_argument("--batch", type=int, help="training batch size (default 32)")
    ap.add_argument("--steps", type=int, help="timed training steps (default 20)")
    ap.add_argument("--warmup", type=int, help="untimed training steps (default 3)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--vtp-lambda", type=float, default=1e-4)
    ap.add_argument("--surgery-model", help="model of the surgery part (default deit_b)")
    ap.add_argument("--surgery-target", type=float, default=0.5)
    ap.add_argument("--surgery-repeats", type=int, help="vitopt prunes timed per variant (default 3)")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning's surgery timing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    return ap


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def train_step_times(args) -> dict[str, Any]:
    from vitopt.arch.families import family_of
    from vitopt.arch.gates import UnitGates
    from vitopt.train.loop import default_param_groups

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    base = V.build_model(args.model, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, *V.input_shape(base), generator=gen).to(dev)
    y = torch.randint(0, base.num_classes, (args.batch,), generator=gen).to(dev)
    out: dict[str, Any] = {"model": args.model, "batch": args.batch, "device": str(dev)}
    for kind in ("dense", "vtp_gates"):
        model = copy.deepcopy(base).to(dev).train()
        groups = default_param_groups(model, 0.05)
        handle, gates = None, None
        if kind == "vtp_gates":
            gates = UnitGates(family_of(model).structure(model), ("heads", "head_dim", "mlp")).to(dev)
            groups.append({"params": list(gates.parameters()), "weight_decay": 0.0})
            handle = gates.attach(model)
        opt = torch.optim.AdamW(groups, lr=1e-4)

        def step(model=model, gates=gates, opt=opt):
            loss = F.cross_entropy(model(x), y)
            if gates is not None:
                loss = loss + args.vtp_lambda * gates.l1()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        try:
            out[kind] = common.median_ms(step, steps=args.steps, warmup=args.warmup, sync=sync)
            if gates is not None:
                out[kind]["gate_params"] = sum(p.numel() for p in gates.parameters())
        finally:
            if handle is not None:
                handle.remove()
        del model, opt
    out["overhead_percent"] = 100.0 * (out["vtp_gates"]["median_ms"] / out["dense"]["median_ms"] - 1.0)
    return out


def surgery_times(args) -> dict[str, Any]:
    dense = V.build_model(args.surgery_model, seed=args.seed)
    out: dict[str, Any] = {"model": args.surgery_model, "target": args.surgery_target, "params": V.cost(dense)["params"],
                           "vitopt": {}, "torch_pruning": {}}
    for variant in ("vitopt", "vitopt+embed"):
        samples = []
        for _ in range(args.surgery_repeats):
            m = copy.deepcopy(dense)
            info = V.vitopt_prune(m, args.surgery_target, V.VITOPT_VARIANTS[variant])
            samples.append(info["seconds"])
            achieved = V.cost(m)["flops"] / V.cost(dense)["flops"]
            del m
        out["vitopt"][variant] = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        out["vitopt"][variant]["achieved"] = achieved
    tp_ok, tp_msg = common.tp_status()
    if args.no_tp or not tp_ok:
        out["torch_pruning"] = {"skipped": "--no-tp" if args.no_tp else tp_msg}
        return out
    for variant, bottleneck in V.TP_VARIANTS.items():
        res = V.tp_prune_to_flops(dense, args.surgery_target, bottleneck=bottleneck, importance="magnitude",
                                  max_iter=12 if not args.quick else 6, grid=11 if not args.quick else 6)
        out["torch_pruning"][variant] = {**res.info["seconds"], "search_seconds": res.info["search_seconds"],
                                         "trials": len(res.info["trials"]), "ratio": res.info["ratio"],
                                         "achieved": res.info["achieved"]}
        del res
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts; returns the JSON payload (also written to ``--out``)."""
    args = resolve_args(argv)
    threads = common.set_threads(args.threads)
    t0 = time.perf_counter()
    common.console.rule(f"training step: {args.model}, batch {args.batch}, {args.device}")
    steps = train_step_times(args)
    common.print_table(f"training step time ({steps['model']}, batch {steps['batch']}, {steps['device']}, "
                       f"threads={threads}; median over {args.steps} steps)",
                       [("variant", "left"), "median ms", "mean ms", "min ms", "overhead %"],
                       [["dense", steps["dense"]["median_ms"], steps["dense"]["mean_ms"], steps["dense"]["min_ms"], 0.0],
                        ["VTP gates (heads, head_dim, mlp)", steps["vtp_gates"]["median_ms"],
                         steps["vtp_gates"]["mean_ms"], steps["vtp_gates"]["min_ms"], steps["overhead_percent"]]])
    common.console.rule(f"surgery: {args.surgery_model} to {args.surgery_target:.0%} FLOPs")
    surg = surgery_times(args)
    f3 = "{:.3f}".format
    rows = [[v, f3(s["importance"]), f3(s["allocation"]), f3(s["surgery"]), None, f3(s["total"]), s["achieved"]]
            for v, s in surg["vitopt"].items()]
    for v, s in surg["torch_pruning"].items():
        if isinstance(s, dict):
            rows.append([f"Torch-Pruning {v}", None, f3(s["dependency_graph"]), f3(s["prune"]),
                         f3(s["search_seconds"]), f3(s["total"]), s["achieved"]])
    common.print_table(f"time to prune {surg['model']} to {args.surgery_target:.0%} FLOPs (s, one prune; "
                       f"vitopt: median of {args.surgery_repeats})",
                       [("tool", "left"), "importance", "allocation / dep. graph", "surgery / prune",
                        "FLOPs search", "total (one prune)", "FLOPs ratio"], rows,
                       caption="Torch-Pruning takes a channel ratio, so reaching a FLOPs target needs a search "
                               "(many prunes); vitopt allocates against the FLOPs model directly"
                       + (f"; Torch-Pruning skipped: {surg['torch_pruning']['skipped']}"
                          if "skipped" in surg["torch_pruning"] else ""))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "threads": threads, "train_step": steps, "surgery": surg,
               "seconds": time.perf_counter() - t0}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


if __name__ == "__main__":
    main()
