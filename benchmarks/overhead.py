"""Overheads: a training step with VTP gates vs without, and the time to prune DeiT-B to 50% FLOPs.

Both parts use the one timing method of :mod:`vitopt.deploy.timing` (warm-up, interleaved rounds,
median of per-round ratios with min-max):

1. Training step (forward, cross-entropy, backward, AdamW step) of the same model on the same random
   batch, dense vs with ``vitopt.arch.gates.UnitGates`` attached to heads/head_dim/mlp (VTP, Zhu et
   al. 2021: the gates are forward hooks at each group's choke point, plus the ``lambda * sum|gate|``
   penalty and the gate parameters in the optimizer): ``--rounds`` rounds of ``--steps`` steps each,
   interleaved. On CUDA when available (``--device``, synchronised per step), else CPU.
2. Surgery: wall time to prune DeiT-B/16-224 (random init) to 50% of its FLOPs, every tool timed in
   the same ``--surgery-repeats`` interleaved rounds (one prune of a fresh copy per round; copying is
   not timed): vitopt (l1 importance, global allocation with rounding, physical surgery) for groups
   heads/head_dim/mlp and with embed; Torch-Pruning (dependency-graph build + pruning) at the ratio its
   FLOPs search found, and the FLOPs search itself (which Torch-Pruning needs to hit a FLOPs target).

    python benchmarks/overhead.py [--quick] [--out benchmarks/results/overhead.json]
"""

from __future__ import annotations

import argparse
import copy
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
DEFAULTS = dict(model="deit_s", batch=32, steps=4, rounds=7, warmup=3, surgery_model="deit_b", surgery_repeats=3)
QUICK = dict(model="tiny", batch=32, steps=2, rounds=3, warmup=2, surgery_model="tiny", surgery_repeats=2)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny ViT for both parts")
    ap.add_argument("--model", help="model of the training-step part (default deit_s)")
    ap.add_argument("--batch", type=int, help="training batch size (default 32)")
    ap.add_argument("--steps", type=int, help="training steps per variant per round (default 4)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds of the training-step part (default 7)")
    ap.add_argument("--warmup", type=int, help="untimed training steps per variant (default 3)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--vtp-lambda", type=float, default=1e-4)
    ap.add_argument("--surgery-model", help="model of the surgery part (default deit_b)")
    ap.add_argument("--surgery-target", type=float, default=0.5)
    ap.add_argument("--surgery-repeats", type=int, help="interleaved rounds of the surgery part (default 3)")
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
    steps, handles, gate_params = {}, [], 0
    for kind in ("dense", "vtp_gates"):
        model = copy.deepcopy(base).to(dev).train()
        groups = default_param_groups(model, 0.05)
        gates = None
        if kind == "vtp_gates":
            gates = UnitGates(family_of(model).structure(model), ("heads", "head_dim", "mlp")).to(dev)
            groups.append({"params": list(gates.parameters()), "weight_decay": 0.0})
            handles.append(gates.attach(model))
            gate_params = sum(p.numel() for p in gates.parameters())
        opt = torch.optim.AdamW(groups, lr=1e-4)

        def step(model=model, gates=gates, opt=opt):
            loss = F.cross_entropy(model(x), y)
            if gates is not None:
                loss = loss + args.vtp_lambda * gates.l1()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[kind] = common.Candidate(step, sync=sync)
    try:
        res = common.timed(steps, args, what="training step", calls=args.steps)
    finally:
        for h in handles:
            h.remove()
    out["timing"] = res.to_json()
    out["gate_params"] = gate_params
    out["overhead"] = res.ratio("vtp_gates")
    out["overhead_percent"] = 100.0 * (out["overhead"]["median"] - 1.0)
    return out


def surgery_times(args) -> dict[str, Any]:
    dense = V.build_model(args.surgery_model, seed=args.seed)
    base = V.cost(dense)["flops"]
    out: dict[str, Any] = {"model": args.surgery_model, "target": args.surgery_target, "params": V.cost(dense)["params"],
                           "achieved": {}}
    cands: dict[str, common.Candidate] = {}
    for variant in ("vitopt", "vitopt+embed"):
        m = copy.deepcopy(dense)
        V.vitopt_prune(m, args.surgery_target, V.VITOPT_VARIANTS[variant])
        out["achieved"][variant] = V.cost(m)["flops"] / base
        del m
        cands[variant] = common.Candidate(
            lambda m, g=V.VITOPT_VARIANTS[variant]: V.vitopt_prune(m, args.surgery_target, g),
            setup=lambda: copy.deepcopy(dense))
    tp_ok, tp_msg = common.tp_status()
    if args.no_tp or not tp_ok:
        out["torch_pruning_skipped"] = "--no-tp" if args.no_tp else tp_msg
    else:
        grid, max_iter = (6, 6) if args.quick else (11, 12)
        for variant, bottleneck in V.TP_VARIANTS.items():
            res = V.tp_prune_to_flops(dense, args.surgery_target, bottleneck=bottleneck, importance="magnitude",
                                      max_iter=max_iter, grid=grid)
            out["achieved"][variant] = res.info["achieved"]
            out.setdefault("tp_search", {})[variant] = {"ratio": res.info["ratio"], "trials": len(res.info["trials"])}
            del res
            ratio = out["tp_search"][variant]["ratio"]
            cands[f"{variant} (one prune)"] = common.Candidate(
                lambda m, r=ratio, b=bottleneck: V.tp_prune(m, r, bottleneck=b), setup=lambda: copy.deepcopy(dense))
            cands[f"{variant} (FLOPs search)"] = common.Candidate(
                lambda b=bottleneck: V.tp_prune_to_flops(dense, args.surgery_target, bottleneck=b,
                                                         importance="magnitude", max_iter=max_iter, grid=grid))
    res = common.timed(cands, args, what="surgery", rounds=args.surgery_repeats, warmup=1, calls=1)
    out["timing"] = res.to_json()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts; returns the JSON payload (also written to ``--out``)."""
    args = resolve_args(argv)
    threads = common.set_threads(args.threads)
    t0 = time.perf_counter()
    common.console.rule(f"training step: {args.model}, batch {args.batch}, {args.device}")
    steps = train_step_times(args)
    c = steps["timing"]["candidates"]
    common.print_table(f"training step time ({steps['model']}, batch {steps['batch']}, {steps['device']}, "
                       f"threads={threads}; {args.rounds} interleaved rounds of {args.steps} steps)",
                       [("variant", "left"), "median ms", "min ms", "max ms", ("x dense (min-max)", "left")],
                       [["dense", c["dense"]["ms"], min(c["dense"]["rounds_ms"]), max(c["dense"]["rounds_ms"]), "1"],
                        ["VTP gates (heads, head_dim, mlp)", c["vtp_gates"]["ms"], min(c["vtp_gates"]["rounds_ms"]),
                         max(c["vtp_gates"]["rounds_ms"]), common.fmt_ratio(steps["overhead"])]],
                       caption="ms per step: median over rounds of each round's mean; x dense: median of per-round "
                               "ratios")
    common.console.rule(f"surgery: {args.surgery_model} to {args.surgery_target:.0%} FLOPs")
    surg = surgery_times(args)
    sc = surg["timing"]["candidates"]
    rows = [[name, c["ms"] / 1e3, min(c["rounds_ms"]) / 1e3, max(c["rounds_ms"]) / 1e3,
             surg["achieved"].get(name.split(" (")[0])] for name, c in sc.items()]
    common.print_table(f"time to prune {surg['model']} to {args.surgery_target:.0%} FLOPs (s; median of "
                       f"{args.surgery_repeats} interleaved rounds, one prune of a fresh copy per round)",
                       [("tool", "left"), "median s", "min s", "max s", "FLOPs ratio"], rows,
                       caption="Torch-Pruning takes a channel ratio, so reaching a FLOPs target needs a search "
                               "(many prunes); vitopt allocates against the FLOPs model directly"
                       + (f"; Torch-Pruning skipped: {surg['torch_pruning_skipped']}"
                          if "torch_pruning_skipped" in surg else ""))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "threads": threads, "train_step": steps, "surgery": surg,
               "seconds": time.perf_counter() - t0}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


if __name__ == "__main__":
    main()
