"""Latency-aware vs FLOPs-aware allocation at the same measured latency (the claim of NViT, CVPR 2023).

NViT (Yang et al., "Global Vision Transformer Pruning with Hessian-Aware Saliency", CVPR 2023) prices
units by a latency lookup table instead of FLOPs and reports better accuracy at the same latency.
This script tests that claim on ONNX Runtime CPU, on two models:

* ``quickstart`` - the quickstart recipe's ViT (16x16 digits, width 128, depth 6), trained on the
  embedded digits, so top-1 means something;
* ``deit_s`` - DeiT-S/16-224 with random weights: latency and FLOPs only (no accuracy).

For each model, with one set of importance scores (``--criterion``: ``taylor`` on 8 training batches for
the trained model, ``l1`` for the random one) over heads, head_dim and MLP hidden:

1. a latency lookup table is measured on the dense model (:func:`vitopt.deploy.lut.measure_lut`,
   ONNX Runtime CPU, batch 1, ``--threads``); a table that prices the smallest sizes at 98% of the dense
   model or more (per-call overhead, noise) stops the run with one sentence: there is nothing to trade;
2. **latency-aware**: :func:`vitopt.allocate` with ``target={"latency_ms": f_lat x predicted dense ms,
   "lut": table}``;
3. **FLOPs-aware**: :func:`vitopt.allocate` with ``target={"flops": f}``, ``f`` chosen to reach the
   *same measured latency*: first the ``f`` whose table-predicted latency equals the latency-aware
   model's, then up to ``--match-steps`` corrections from interleaved measurements of the two models
   (stop when the median per-round ratio is within ``--match-tol`` of 1); the ``f`` whose measured
   ratio came closest to 1 is kept;
4. (trained model) both fine-tuned with the same budget: ``--finetune-epochs`` (10) of KD from the dense
   model (alpha 0.7, tau 2, lr 3e-4, the quickstart's fine-tune), same seed and batch order;
5. dense, latency-aware and FLOPs-aware timed together (:mod:`vitopt.deploy.timing`, ``--final-rounds``
   interleaved rounds, ONNX Runtime CPU at batch 1, the table's batch): ms per call and the per-round
   ratio FLOPs-aware / latency-aware (median, min-max), beside the table's predictions.

The claim holds here when, at a measured latency ratio whose spread includes 1, the latency-aware
model keeps more FLOPs and (trained model) reaches a higher top-1 than the FLOPs-aware one by more than
the seed-to-seed noise (one seed here: read small top-1 gaps as no difference).

    python benchmarks/latency_aware.py [--quick] [--threads 1] [--out benchmarks/results/latency_aware.json]
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

SCRIPT = "latency_aware"
#: model -> (timm name, kwargs, trained on digits?, criterion)
MODELS: dict[str, tuple[str, dict[str, Any], bool, str]] = {
    "quickstart": ("deit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 128,
                                             "depth": 6, "num_heads": 4, "num_classes": 10}, True, "taylor"),
    "deit_s": ("deit_small_patch16_224", {}, False, "l1"),
    # for --quick and tests: 2 blocks of width 64 on 64 tokens (enough compute that the smallest sizes time
    # clearly below the dense ones over ONNX Runtime's per-call overhead)
    "tiny": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "in_chans": 1, "embed_dim": 64,
                                       "depth": 2, "num_heads": 2, "num_classes": 10}, True, "taylor"),
}
GROUPS = ["heads", "head_dim", "mlp"]
ROUND_TO = {"heads": 1, "head_dim": 8, "mlp": 16}
DEFAULTS = dict(models=["quickstart", "deit_s"], dense_epochs=20, finetune_epochs=10, grid_points=4, lut_repeats=20,
                match_steps=4, rounds=11, final_rounds=15, round_ms=100.0, warmup=3)
QUICK = dict(models=["tiny"], dense_epochs=1, finetune_epochs=1, grid_points=2, lut_repeats=20, match_steps=1,
             rounds=2, final_rounds=3, round_ms=5.0, warmup=1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2-block ViT, 1 epoch each, short timings (smoke run)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS))
    ap.add_argument("--latency", type=float, default=0.6,
                    help="latency target as a fraction of the table's predicted dense latency (default 0.6)")
    ap.add_argument("--dense-epochs", type=int, help="dense training on digits (trained models; default 20)")
    ap.add_argument("--finetune-epochs", type=int, help="KD fine-tune of each pruned model (default 10)")
    ap.add_argument("--grid-points", type=int, help="LUT grid points per axis (default 4)")
    ap.add_argument("--lut-repeats", type=int, help="timed calls per LUT probe (default 20)")
    ap.add_argument("--match-steps", type=int, help="measured corrections of the FLOPs target (default 4)")
    ap.add_argument("--match-tol", type=float, default=0.03, help="stop when |median ratio - 1| <= this (0.03)")
    ap.add_argument("--final-rounds", type=int, help="interleaved rounds of the final timing (default 15)")
    common.add_timing_args(ap)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime / torch CPU threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    return ap


# ------------------------------------------------------------------------------------ pieces
def _train_dense(model, data, args) -> float:
    """The quickstart recipe's dense training (AdamW lr 3e-3, 2 warm-up epochs, label smoothing 0.1)."""
    from vitopt.train.data import make_loader
    from vitopt.train.loop import TrainHParams, evaluate, fit, set_seed

    set_seed(args.seed)
    fit(model, make_loader(data.train, 64, shuffle=True, seed=args.seed, drop_last=True), None,
        TrainHParams(epochs=args.dense_epochs, lr=3e-3, warmup_epochs=min(2.0, args.dense_epochs / 2)),
        desc="dense")
    model.eval()
    return evaluate(model, make_loader(data.val, 256, shuffle=False, seed=0))["top1"]


def _finetune(model, teacher, data, args) -> float:
    """The quickstart's fine-tune: KD (alpha 0.7, tau 2) from the dense model, lr 3e-4, 1 warm-up epoch."""
    from vitopt.train.data import make_loader
    from vitopt.train.loop import TrainHParams, evaluate, fit, set_seed

    set_seed(args.seed + 1)
    fit(model, make_loader(data.train, 64, shuffle=True, seed=args.seed + 2, drop_last=True), None,
        TrainHParams(epochs=args.finetune_epochs, lr=3e-4, warmup_epochs=min(1.0, args.finetune_epochs / 2)),
        teacher=teacher, kd_alpha=0.7, kd_tau=2.0, desc="finetune")
    model.eval()
    return evaluate(model, make_loader(data.val, 256, shuffle=False, seed=0))["top1"]


def _top1(model, data) -> float:
    from vitopt.train.data import make_loader
    from vitopt.train.loop import evaluate

    return evaluate(model.eval(), make_loader(data.val, 256, shuffle=False, seed=0))["top1"]


class Timer:
    """Exports models to ONNX and times them against each other on ONNX Runtime CPU (batch 1)."""

    def __init__(self, shape, args, tmp: Path) -> None:
        self.shape, self.args, self.tmp, self.count = shape, args, tmp, 0

    def export(self, model) -> Path:
        import vitopt

        self.count += 1
        path = self.tmp / f"m{self.count}.onnx"
        vitopt.export_onnx(model, path, self.shape, exporter="torchscript", simplify=False)
        return path

    def time(self, paths: dict[str, Path], *, rounds: int, reference: str, what: str):
        from vitopt.deploy.runtimes import OrtRuntime

        rts = {n: OrtRuntime(p, threads=self.args.threads) for n, p in paths.items()}
        try:
            return common.timed_runtimes(rts, self.shape, 1, self.args, what=what, rounds=rounds, reference=reference)
        finally:
            for rt in rts.values():
                rt.close()


def _flops_for_predicted_latency(structure, scores, table, ms: float, dense_dims) -> float:
    """The FLOPs fraction whose allocation the table prices at ``ms`` (bisection; FLOPs-aware plans)."""
    import vitopt

    lo, hi = 0.02, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        try:
            plan = vitopt.allocate(structure, scores, target={"flops": mid}, round_to=ROUND_TO)
        except vitopt.VitoptError:     # below the minimum sizes: a noisy table can price them above ``ms``
            lo = mid
            continue
        if table.latency_ms(plan.dims(structure)) > ms:
            hi = mid
        else:
            lo = mid
    return lo


def run_model(name: str, args, tmp: Path) -> dict[str, Any]:
    import vitopt
    from vitopt.deploy.lut import measure_lut
    from vitopt.pruning.calibration import calibration_batches
    from vitopt.train.data import load_data
    from vitopt.train.inputs import model_input

    timm_name, kwargs, trained, criterion = MODELS[name]
    from vitopt.arch.config import create_model

    torch.manual_seed(args.seed)
    dense = create_model(timm_name, dict(kwargs)).eval()
    mi = model_input(dense)
    shape = (mi.in_chans, *mi.img_size)
    out: dict[str, Any] = {"model": name, "timm": timm_name, "kwargs": kwargs, "criterion": criterion,
                           "trained": trained, "input_shape": list(shape)}
    t0 = time.perf_counter()
    data = calib = None
    if trained:
        data = load_data(SimpleNamespace(type="digits", val_fraction=0.2), mi, args.seed)
        out["dense_top1"] = _train_dense(dense, data, args)
        calib = calibration_batches(data.train, criterion, batches=8, batch_size=64, seed=args.seed + 5)
    out["train_seconds"] = time.perf_counter() - t0
    common.console.rule(f"{name}: latency table")
    t0 = time.perf_counter()
    table = measure_lut(dense, runtime="onnxruntime", threads=args.threads, grid_points=args.grid_points,
                        repeats=args.lut_repeats, progress=False, model_name=timm_name, model_kwargs=kwargs)
    out["lut"] = {"grid_points": args.grid_points, "repeats": args.lut_repeats, "statistic": table.statistic,
                  "seconds": time.perf_counter() - t0, "predicted_dense_ms": table.predicted_model_ms}
    structure = vitopt.structure(dense)
    scores = vitopt.importance(dense, criterion, groups=GROUPS, data=calib)
    # the least the table can price (every group at its minimum, widths below the grid clamp to its first
    # point); a target under it cannot be met, so it is raised to a quarter of the way up the range
    smallest = {g.name: (1 if g.kind == "heads" else ROUND_TO[g.kind]) for g in structure.of_kind(*GROUPS)}
    floor_ms = table.latency_ms({**structure.sizes(), **smallest})
    target_ms = args.latency * table.predicted_model_ms
    out["lut"]["floor_ms"] = floor_ms
    if floor_ms >= 0.98 * table.predicted_model_ms:
        raise SystemExit(f"{name}: the latency table prices the smallest sizes at {floor_ms:.3f} ms, not below the dense "
                         f"model's {table.predicted_model_ms:.3f} ms: at this size the runtime's timings are overhead "
                         f"or noise, so there is no latency to trade (use a larger model or more --lut-repeats)")
    if target_ms < floor_ms * 1.02:
        target_ms = floor_ms + 0.25 * (table.predicted_model_ms - floor_ms)
        out["target_raised"] = (f"{args.latency} x dense is below what the table can price ({floor_ms:.3f} ms at the "
                                f"minimum sizes); target raised to {target_ms:.3f} ms")
        common.console.print(f"[yellow]{name}: {out['target_raised']}[/]")
    plan_lat = vitopt.allocate(structure, scores, target={"latency_ms": target_ms, "lut": table}, round_to=ROUND_TO)
    lat_model = vitopt.apply_plan(dense, plan_lat)
    f = _flops_for_predicted_latency(structure, scores, table, table.latency_ms(plan_lat.dims(structure)),
                                     structure.sizes())
    timer = Timer(shape, args, tmp)
    paths = {"dense": timer.export(dense), "latency-aware": timer.export(lat_model)}
    matching = []
    for step in range(args.match_steps + 1):
        plan_fl = vitopt.allocate(structure, scores, target={"flops": f}, round_to=ROUND_TO)
        fl_model = vitopt.apply_plan(dense, plan_fl)
        paths["flops-aware"] = timer.export(fl_model)
        res = timer.time({k: paths[k] for k in ("latency-aware", "flops-aware")}, rounds=args.rounds,
                         reference="latency-aware", what=f"{name} match {step}")
        r = res.ratio("flops-aware")
        matching.append({"flops_target": f, "ratio": {k: r[k] for k in ("median", "min", "max", "q1", "q3")},
                         "flops_ratio": vitopt.structure(fl_model).cost_model.flops({}) / structure.cost_model.flops({})})
        common.console.print(f"{name}: FLOPs target {f:.4f}: FLOPs-aware / latency-aware {common.fmt_ratio(r, 3)}")
        if abs(r["median"] - 1) <= args.match_tol or step == args.match_steps:
            break
        # latency is close to affine in the kept FLOPs: scale the FLOPs target by the measured ratio
        f = min(1.0, max(0.02, f * (1 + (1 / r["median"] - 1) * 1.2)))
    # the measurements are noisy: keep the FLOPs target whose measured ratio came closest to 1
    best = min(matching, key=lambda m: abs(m["ratio"]["median"] - 1))
    if best is not matching[-1]:
        f = best["flops_target"]
        fl_model = vitopt.apply_plan(dense, vitopt.allocate(structure, scores, target={"flops": f}, round_to=ROUND_TO))
        paths["flops-aware"] = timer.export(fl_model)
    out["matching"] = matching
    out["flops_target"] = f
    models = {"dense": dense, "latency-aware": lat_model, "flops-aware": fl_model}
    dense_flops = structure.cost_model.flops({})
    rows = {}
    for label, m in models.items():
        st = vitopt.structure(m)
        dims = st.sizes()
        rows[label] = {"flops": st.cost_model.flops({}), "params": st.cost_model.params({}),
                       "flops_ratio": st.cost_model.flops({}) / dense_flops,
                       "predicted_ms": table.latency_ms(dims), "dims": dims}
    if trained:
        teacher = copy.deepcopy(dense).eval().requires_grad_(False)
        for label in ("latency-aware", "flops-aware"):
            rows[label]["top1_one_shot"] = _top1(models[label], data)
            t1 = time.perf_counter()
            rows[label]["top1"] = _finetune(models[label], teacher, data, args)
            rows[label]["finetune_seconds"] = time.perf_counter() - t1
            paths[label] = timer.export(models[label])      # the fine-tuned weights (timings do not change)
        rows["dense"]["top1"] = out["dense_top1"]
    common.console.rule(f"{name}: final timing")
    final = timer.time(paths, rounds=args.final_rounds, reference="dense", what=f"{name} final")
    for label, row in rows.items():
        c = final.candidates[label]
        row["ms"] = c["ms"]
        row["ratio_to_dense"] = {k: c["ratio"][k] for k in ("median", "min", "max", "q1", "q3")}
        row["predicted_over_measured"] = row["predicted_ms"] / c["ms"]
    pair = final.pair_ratio("flops-aware", "latency-aware")
    out.update(rows=rows, target_ms=target_ms, final_timing=final.to_json(),
               flops_over_latency_aware={k: pair[k] for k in ("median", "min", "max", "q1", "q3")},
               verdict=verdict(rows, pair, trained))
    return out


def verdict(rows: dict[str, dict], pair: dict[str, float], trained: bool) -> str:
    """One sentence: does latency-aware allocation win at the same measured latency here?"""
    same = pair["min"] <= 1.0 <= pair["max"]
    lat, fl = rows["latency-aware"], rows["flops-aware"]
    where = ("at the same measured latency (the per-round ratio's min-max includes 1)" if same else
             f"although the measured latencies differ (FLOPs-aware / latency-aware {pair['median']:.3f}, "
             f"{pair['min']:.3f}-{pair['max']:.3f})")
    flops = (f"latency-aware keeps {lat['flops_ratio']:.3f} of the FLOPs vs {fl['flops_ratio']:.3f} for FLOPs-aware "
             f"{where}")
    if not trained:
        return flops + "."
    gap = lat["top1"] - fl["top1"]
    acc = (f"top-1 after the same fine-tune: {lat['top1']:.2f}% vs {fl['top1']:.2f}% "
           f"({'+' if gap >= 0 else ''}{gap:.2f} points for latency-aware, one seed)")
    return f"{flops}; {acc}."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every model; print the table; write the JSON."""
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    args.threads = common.set_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="vitopt-lataware-") as tmp:
        for name in args.models:
            results.append(run_model(name, args, Path(tmp)))
    table = []
    for res in results:
        for label, r in res["rows"].items():
            table.append([res["model"], label, r["flops_ratio"], r["flops"] / 1e6, r.get("top1_one_shot"),
                          r.get("top1"), r["ms"], common.fmt_ratio(r["ratio_to_dense"], 3), r["predicted_ms"]])
    common.print_table(f"Latency-aware vs FLOPs-aware at the same latency (ONNX Runtime CPU, batch 1, "
                       f"{args.threads} thread(s); {args.final_rounds} interleaved rounds)",
                       [("model", "left"), ("allocation", "left"), "FLOPs ratio", "MFLOPs", "top-1 one-shot",
                        "top-1 fine-tuned", "ms", ("x dense (min-max)", "left"), "LUT-predicted ms"], table)
    for res in results:
        common.console.print(f"[bold]{res['model']}[/]: FLOPs-aware / latency-aware per round "
                             f"{common.fmt_ratio(res['flops_over_latency_aware'], 3)}; {res['verdict']}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "results": results, "seconds": time.perf_counter() - t0}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


if __name__ == "__main__":
    main()
