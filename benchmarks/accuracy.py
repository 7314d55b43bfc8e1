"""Accuracy after pruning + KD fine-tuning: vitopt's criteria vs Torch-Pruning, mean ± std over seeds.

Per seed: train the quickstart model (``recipes/quickstart.yaml``: DeiT-tiny layout, 16 px, 4 px
patches, width 128, depth 6, 4 heads; AdamW lr 1e-3, 2 warm-up epochs) densely on scikit-learn's
digits (or ``--imagefolder PATH``, e.g. a folder from ``benchmarks/shapes.py``), then for each FLOPs
target (default 50% and 30% of dense) and each method prune a copy of that dense model and
fine-tune it with the same budget (``--finetune-epochs``, lr 3e-4, KD from the dense model with
alpha 0.7, tau 2, the same seed and batch order for every method). Methods:

* vitopt, groups heads/head_dim/mlp, global scope: ``l1``, ``taylor``, ``hessian`` (NViT), ``kl``
  (UP-ViTs), and ``gate`` (VTP: ``sparse_train`` with L1-penalised gates for ``--sparse-epochs``
  first, as in the quickstart recipe, then the ``gate`` criterion - it trains that much longer);
* ``l1+embed``, ``taylor+embed``, ``kl+embed`` - that criterion with the residual width (embed) also prunable;
* Torch-Pruning (documented timm-ViT recipe, ratio searched to the same FLOPs as in speedup.py):
  ``tp-magnitude`` / ``tp-taylor`` (GroupMagnitudeImportance / GroupTaylorImportance, embed
  pruned) and ``tp-magnitude-bottleneck`` / ``tp-taylor-bottleneck`` (every fc2 ignored: the
  residual width kept, like vitopt's default groups).

Data-driven criteria get the same calibration data: ``--calib-batches`` shuffled training batches
(taylor, hessian, tp-taylor) or ``--kl-per-class`` images per class (kl). The validation split is
fixed across seeds (``--split-seed``); seeds change initialisation and batch order.

    python benchmarks/accuracy.py [--quick] [--seeds 3] [--imagefolder PATH] [--out benchmarks/results/accuracy.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import variants as V  # noqa: E402

SCRIPT = "accuracy"
VITOPT_METHODS = {"l1": ("l1", ("heads", "head_dim", "mlp")), "taylor": ("taylor", ("heads", "head_dim", "mlp")),
                  "hessian": ("hessian", ("heads", "head_dim", "mlp")), "kl": ("kl", ("heads", "head_dim", "mlp")),
                  "gate": ("gate", ("heads", "head_dim", "mlp")),
                  "l1+embed": ("l1", ("embed", "heads", "head_dim", "mlp")),
                  "taylor+embed": ("taylor", ("embed", "heads", "head_dim", "mlp")),
                  "kl+embed": ("kl", ("embed", "heads", "head_dim", "mlp"))}
TP_METHODS = {"tp-magnitude": ("magnitude", False), "tp-taylor": ("taylor", False),
              "tp-magnitude-bottleneck": ("magnitude", True), "tp-taylor-bottleneck": ("taylor", True)}
ALL_METHODS = [*VITOPT_METHODS, *TP_METHODS]
DEFAULTS = dict(seeds=3, dense_epochs=30, finetune_epochs=15, sparse_epochs=6, calib_batches=8, kl_per_class=5,
                tp_max_iter=12, tp_grid=11, depth=6)
QUICK = dict(seeds=1, dense_epochs=2, finetune_epochs=1, sparse_epochs=1, calib_batches=2, kl_per_class=1,
             tp_max_iter=5, tp_grid=6, depth=2)
#: quickstart.yaml's model
QUICKSTART_MODEL = ("deit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 128,
                                              "depth": 6, "num_heads": 4})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 seed, depth-2 model, 2 dense + 1 fine-tune epochs, target 0.5")
    ap.add_argument("--imagefolder", type=Path, help="ImageNet-layout folder (train/ val/) instead of digits")
    ap.add_argument("--img-size", type=int, help="model input size (default 16 for digits, 32 for a folder)")
    ap.add_argument("--depth", type=int, help="transformer blocks (default 6 as quickstart; quick 2)")
    ap.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default 3)")
    ap.add_argument("--split-seed", type=int, default=0, help="digits train/val split seed (fixed across seeds)")
    ap.add_argument("--targets", nargs="+", type=float, help="FLOPs fractions (default 0.5 0.3; quick 0.5)")
    ap.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    ap.add_argument("--dense-epochs", type=int, help="dense training epochs (default 30, as quickstart)")
    ap.add_argument("--finetune-epochs", type=int, help="KD fine-tuning epochs per method (default 15)")
    ap.add_argument("--sparse-epochs", type=int, help="VTP gate-training epochs of 'gate' (default 6)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="dense peak lr")
    ap.add_argument("--warmup-epochs", type=float, default=2.0)
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning peak lr (also VTP's)")
    ap.add_argument("--ft-warmup-epochs", type=float, default=1.0)
    ap.add_argument("--kd-alpha", type=float, default=0.7)
    ap.add_argument("--kd-tau", type=float, default=2.0)
    ap.add_argument("--vtp-lambda", type=float, default=1e-4)
    ap.add_argument("--gate-lr", type=float, default=1e-2)
    ap.add_argument("--calib-batches", type=int, help="calibration batches for taylor/hessian/tp-taylor (default 8)")
    ap.add_argument("--kl-per-class", type=int, help="proxy images per class for kl (default 5)")
    ap.add_argument("--tp-norm", type=int, default=2, help="p of GroupMagnitudeImportance")
    ap.add_argument("--tp-attn", choices=["head_dims", "heads", "both"], default="head_dims")
    ap.add_argument("--tp-tol", type=float, default=0.01)
    ap.add_argument("--tp-grid", type=int)
    ap.add_argument("--tp-max-iter", type=int)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    return ap


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    if args.targets is None:
        args.targets = [0.5] if args.quick else [0.5, 0.3]
    if args.img_size is None:
        args.img_size = 32 if args.imagefolder else 16
    return args


# ------------------------------------------------------------------------------------ pieces
def make_model(args, num_classes: int) -> torch.nn.Module:
    from vitopt.arch.config import create_model

    name, kw = QUICKSTART_MODEL
    kw = {**kw, "img_size": args.img_size, "num_classes": num_classes, "depth": args.depth}
    if args.imagefolder is not None:
        kw["in_chans"] = 3
    return create_model(name, kw)


def load(args, model) -> Any:
    from vitopt.train.data import load_data, model_input

    cfg = (SimpleNamespace(type="imagefolder", root=args.imagefolder, num_workers=0) if args.imagefolder
           else SimpleNamespace(type="digits", val_fraction=0.2))
    return load_data(cfg, model_input(model), args.split_seed)


def loaders(args, data, seed: int):
    from vitopt.train.data import make_loader

    train = make_loader(data.train, args.batch_size, shuffle=True, seed=seed, num_workers=data.num_workers,
                        drop_last=len(data.train) > args.batch_size)
    val = make_loader(data.val, 256, shuffle=False, seed=0, num_workers=data.num_workers)
    return train, val


def calibration(args, data, seed: int) -> dict[str, list]:
    """The prune stage's calibration sets: shuffled batches (taylor/hessian) and a per-class proxy set (kl)."""
    from vitopt.pruning.calibration import dataset_labels as _labels
    from vitopt.train.data import make_loader

    batches = []
    for b in make_loader(data.train, args.batch_size, shuffle=True, seed=seed + 7, num_workers=data.num_workers):
        batches.append(b)
        if len(batches) == args.calib_batches:
            break
    labels = _labels(data.train)
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([(labels == c).nonzero().squeeze(1)[torch.randperm(int((labels == c).sum()), generator=g)
                                                         [:args.kl_per_class]] for c in labels.unique()])
    proxy = list(make_loader(torch.utils.data.Subset(data.train, idx.tolist()), 256, shuffle=False, seed=seed))
    return {"batches": batches, "proxy": proxy}


def hparams(args, *, dense: bool, epochs: int | None = None):
    from vitopt.train.loop import TrainHParams

    if dense:
        return TrainHParams(epochs=args.dense_epochs, lr=args.lr, warmup_epochs=args.warmup_epochs)
    return TrainHParams(epochs=epochs or args.finetune_epochs, lr=args.ft_lr,
                        warmup_epochs=min(args.ft_warmup_epochs, epochs or args.finetune_epochs))


def vtp_gates(args, model, data, seed: int) -> dict[str, torch.Tensor]:
    """VTP sparse training on ``model`` in place (as the sparse_train stage); returns the gate values."""
    from vitopt.arch.families import family_of
    from vitopt.arch.gates import UnitGates
    from vitopt.train.loop import TrainHParams, default_param_groups, fit

    structure = family_of(model).structure(model)
    gates = UnitGates(structure, ("heads", "head_dim", "mlp"))
    groups = default_param_groups(model, 0.05)
    groups.append({"params": list(gates.parameters()), "weight_decay": 0.0, "lr": args.gate_lr})
    train, _ = loaders(args, data, seed * 1000 + 1)
    hp = TrainHParams(epochs=args.sparse_epochs, lr=args.ft_lr, warmup_epochs=0.0)
    with gates.attach(model):
        fit(model, train, None, hp, param_groups=groups, extra_loss=lambda: args.vtp_lambda * gates.l1(),
            desc="vtp")
    values = gates.values()
    gates.fold_into(model)
    return values


def prune(args, method: str, dense, data, calib, target: float, seed: int) -> tuple[torch.nn.Module, dict]:
    """A pruned copy of ``dense`` at ``target`` FLOPs by ``method``."""
    model = copy.deepcopy(dense).eval()
    if method in VITOPT_METHODS:
        criterion, groups = VITOPT_METHODS[method]
        gates = None
        if criterion == "gate":
            gates = vtp_gates(args, model, data, seed)
            model.eval()
        batches = calib["proxy"] if criterion == "kl" else calib["batches"] if criterion in ("taylor", "hessian") else None
        info = V.vitopt_prune(model, target, groups, criterion=criterion, batches=batches, gates=gates)
        return model, info
    imp, bottleneck = TP_METHODS[method]
    extra = {"grad_batches": calib["batches"]} if imp == "taylor" else {}
    res = V.tp_prune_to_flops(model, target, tol=args.tp_tol, max_iter=args.tp_max_iter, grid=args.tp_grid,
                              bottleneck=bottleneck, importance=imp, norm_p=args.tp_norm, attn=args.tp_attn, **extra)
    return res.model, res.info


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON payload (also written to ``--out``)."""
    from vitopt.train.loop import evaluate, fit, set_seed

    args = resolve_args(argv)
    threads = common.set_threads(args.threads)
    tp_ok, tp_msg = common.tp_status()
    methods = [m for m in args.methods if tp_ok or m not in TP_METHODS]
    skipped = {m: tp_msg for m in args.methods if m not in methods}
    if skipped:
        common.console.print(f"[yellow]skipping {', '.join(skipped)}: {tp_msg}[/]")
    t_start = time.perf_counter()
    runs: list[dict] = []
    dense_runs: list[dict] = []
    data_name = None
    for seed in range(args.seeds):
        set_seed(seed)
        model = make_model(args, 10)
        data = load(args, model)
        data_name = data.name
        if model.num_classes != data.num_classes:
            model.reset_classifier(data.num_classes)
        common.console.rule(f"seed {seed}: dense training on {data.name} ({len(data.train)} train / {len(data.val)} val)")
        train, val = loaders(args, data, seed * 1000)
        t0 = time.perf_counter()
        fit(model, train, None, hparams(args, dense=True), desc=f"dense s{seed}")
        model.eval()
        dense_cost = V.cost(model)
        dense_top1 = evaluate(model, val)["top1"]
        dense_runs.append({"seed": seed, "top1": dense_top1, **dense_cost, "seconds": time.perf_counter() - t0})
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        calib = calibration(args, data, seed)
        for target in args.targets:
            for method in methods:
                common.console.rule(f"seed {seed} target {target} {method}")
                set_seed(seed)
                t0 = time.perf_counter()
                run: dict[str, Any] = {"seed": seed, "target": target, "method": method,
                                       "tool": "torch-pruning" if method in TP_METHODS else "vitopt"}
                try:
                    pruned, info = prune(args, method, model, data, calib, target, seed)
                except Exception as exc:  # one failing method must not hide the others
                    run["error"] = common.first_line(exc)
                    common.console.print(f"[red]{method} @ {target}: {run['error']}[/]")
                    runs.append(run)
                    continue
                t_prune = time.perf_counter() - t0
                c = V.cost(pruned)
                run.update({"flops_ratio": c["flops"] / dense_cost["flops"], "params_ratio": c["params"] / dense_cost["params"],
                            "dims": V.dims_summary(pruned), "prune": info, "prune_seconds": t_prune,
                            "top1_pruned": evaluate(pruned, val)["top1"]})
                ft_train, _ = loaders(args, data, seed * 1000 + 2)
                set_seed(seed)
                fit(pruned, ft_train, None, hparams(args, dense=False), teacher=teacher, kd_alpha=args.kd_alpha,
                    kd_tau=args.kd_tau, desc=f"{method}@{target}")
                run["top1"] = evaluate(pruned, val)["top1"]
                run["seconds"] = time.perf_counter() - t0
                common.console.print(f"{method} @ {target}: FLOPs {run['flops_ratio']:.3f}, top-1 one-shot "
                                     f"{run['top1_pruned']:.1f} -> fine-tuned {run['top1']:.1f}")
                runs.append(run)
                del pruned
    summary = summarize(runs, dense_runs, methods, args.targets)
    print_summary(summary, dense_runs, data_name, args)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "data": data_name, "threads": threads, "tp_available": tp_ok, "tp_skipped": skipped,
               "dense": dense_runs, "runs": runs, "summary": summary, "seconds": time.perf_counter() - t_start}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


def summarize(runs: list[dict], dense_runs: list[dict], methods: list[str], targets: list[float]) -> list[dict]:
    import statistics

    def stats(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                "n": len(vals), "values": vals}

    out = []
    for target in targets:
        for method in methods:
            rs = [r for r in runs if r["target"] == target and r["method"] == method]
            ok = [r for r in rs if "top1" in r]
            out.append({"target": target, "method": method, "top1": stats([r["top1"] for r in ok]),
                        "top1_pruned": stats([r["top1_pruned"] for r in ok]),
                        "flops_ratio": stats([r["flops_ratio"] for r in ok]),
                        "params_ratio": stats([r["params_ratio"] for r in ok]),
                        "errors": [r["error"] for r in rs if "error" in r]})
    return out


def print_summary(summary: list[dict], dense_runs: list[dict], data_name: str | None, args) -> None:
    def pm(s, digits=1):
        return "-" if s is None else common.fmt_pm(s["values"], digits)

    rows = [["dense", "-", 1.0, common.fmt_pm([d["top1"] for d in dense_runs]), "-", ""]]
    for s in summary:
        rows.append([s["method"], s["target"], None if s["flops_ratio"] is None else s["flops_ratio"]["mean"],
                     pm(s["top1"]), pm(s["top1_pruned"]), "; ".join(s["errors"])[:80]])
    common.print_table(f"top-1 (%) on {data_name} val, mean ± std over {args.seeds} seed(s); "
                       f"fine-tune {args.finetune_epochs} epochs with KD from dense",
                       [("method", "left"), "target", "FLOPs ratio", "top-1 fine-tuned", "top-1 one-shot",
                        ("error", "left")], rows,
                       caption="one-shot = right after pruning, before fine-tuning; FLOPs ratio = achieved / dense")


if __name__ == "__main__":
    main()
