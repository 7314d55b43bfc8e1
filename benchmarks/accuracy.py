"""Accuracy after pruning + KD fine-tuning at equal FLOPs: vitopt vs Torch-Pruning over seeds.

Per seed: train a small DeiT densely (digits: the quickstart model, width 128, depth 6, 16 px; an image
folder such as ``benchmarks/fashion_mnist.py``'s or ``benchmarks/shapes.py``'s: width 128, depth 2,
32 px), then for each FLOPs target and each method prune a copy of that dense model and fine-tune it
with the same budget (``--finetune-epochs``, lr 3e-4, KD from the dense model, alpha 0.7, tau 2, the
same seed and batch order for every method).
Every method gets the same calibration data (``vitopt.pruning.calibration.calibration_batches``: 8 shuffled
batches, or for ``kl`` UP-ViTs' proxy set of 5 images per class, as the prune stage draws them).

Methods:

* ``vitopt`` - ``vitopt.prune`` with its defaults (what a recipe's prune stage does by default): the
  library's one default criterion and allocation, residual width included;
* ``CRITERION:COMPARE[:noembed][:noheads][:minF][:recon][:perkind]`` - a vitopt configuration for
  comparisons (e.g. ``taylor:calibrated``, ``l1:normalized:noembed``, ``kl:isomorphic:min0.25``): criterion,
  how kinds are compared (``vitopt.pruning.prune.prune_with_report``'s ``compare``), the residual width or
  whole heads excluded (every head kept, as the Torch-Pruning variants keep them),
  a per-block minimum kept fraction of heads and MLP neurons, least-squares reconstruction of the
  layers consuming removed units (``reconstruct=True``), one kept fraction per kind in every block
  (``scope="per_kind"``; without it such a name allocates with ``scope="global"``, whatever the default);
* ``vitopt-iterative`` - the defaults with NViT's schedule: 3 rounds with KD recovery between them,
  the recovery steps taken out of the fine-tune budget so the total number of training steps is the same;
* Torch-Pruning 1.6 (its documented timm-ViT recipe, ratio searched to the same achieved FLOPs):
  ``tp-magnitude`` / ``tp-taylor`` (GroupMagnitudeImportance / GroupTaylorImportance, residual width
  pruned), ``-bottleneck`` (every fc2 ignored: residual width kept) and ``-iso`` (isomorphic pruning,
  Fang et al. ECCV 2024). A variant whose ratio search cannot reach the target within 1% is reported so.

Each run also records ``top1_by_epoch``, the top-1 after each fine-tune epoch (one point of the same
cosine schedule per epoch, not a run with a shorter budget), and ``epochs_before_finetune`` (the
recovery epochs ``vitopt-iterative`` spent inside the prune), so ``benchmarks/plot_recovery.py`` can draw
how fast each method's model recovers.

The summary gives mean ± std of top-1 over seeds, the achieved FLOPs of every method, the best
Torch-Pruning variant per target, and the paired difference ``vitopt - best TP`` per seed with its spread.

``--reference tp-VARIANT`` compares with one Torch-Pruning variant named in advance instead of the best
on the mean, and the paired differences carry a standard error and a 95% Student-t interval.
``--merge A.json B.json --out C.json`` combines files of the same settings and dense models without
training. ``--reuse EARLIER.json`` takes the runs of the methods not named in ``--methods`` from an earlier file
made with the same settings, once each seed's dense model has reproduced that file's dense top-1 and
FLOPs exactly (training here is deterministic at a fixed thread count); the methods run again and also
present there are compared run by run (``reused.reproduced``). ``vitopt`` and ``vitopt-iterative`` mean
the library defaults of their day, recorded as ``defaults``, and are reused only under the same ones.

    python benchmarks/accuracy.py [--quick] [--seeds 0 1 2] [--imagefolder PATH] [--out benchmarks/results/accuracy.json]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import variants as V  # noqa: E402

import vitopt  # noqa: E402
from vitopt.arch.config import create_model  # noqa: E402
from vitopt.pruning.calibration import calibration_batches  # noqa: E402
from vitopt.train.data import load_data, make_loader  # noqa: E402
from vitopt.train.inputs import model_input  # noqa: E402
from vitopt.train.loop import TrainHParams, evaluate, fit, set_seed  # noqa: E402

SCRIPT = "accuracy"
TP_METHODS = {"tp-magnitude": ("magnitude", False, False), "tp-taylor": ("taylor", False, False),
              "tp-magnitude-bottleneck": ("magnitude", True, False), "tp-taylor-bottleneck": ("taylor", True, False),
              "tp-magnitude-iso": ("magnitude", False, True), "tp-taylor-iso": ("taylor", False, True)}
DEFAULT_METHODS = ["vitopt", "vitopt-iterative", *TP_METHODS]
ALL_KINDS = ("embed", "heads", "head_dim", "mlp")
ROUND_TO = {"heads": 1, "head_dim": 8, "mlp": 8, "embed": 8}
DEFAULTS = dict(seeds=[0, 1, 2], dense_epochs=20, finetune_epochs=5, calib_batches=8, tp_max_iter=12, tp_grid=11)
QUICK = dict(seeds=[0], dense_epochs=2, finetune_epochs=1, calib_batches=2, tp_max_iter=4, tp_grid=5)
#: dataset -> (timm name, kwargs) of the dense model
MODELS = {"digits": ("deit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 128,
                                               "depth": 6, "num_heads": 4}),
          "imagefolder": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 128,
                                                    "depth": 2, "num_heads": 4})}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, depth-2 model, 2 dense + 1 fine-tune epochs")
    ap.add_argument("--imagefolder", type=Path, help="ImageNet-layout folder (train/ val/) instead of digits")
    ap.add_argument("--depth", type=int, help="transformer blocks (default: 6 digits, 2 image folder; quick 2)")
    ap.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2)")
    ap.add_argument("--split-seed", type=int, default=0, help="digits train/val split seed (fixed across seeds)")
    ap.add_argument("--targets", nargs="+", type=float, help="FLOPs fractions (default 0.5 0.3 0.15; quick 0.5)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                    help="vitopt, vitopt-iterative, CRITERION:COMPARE[:noembed][:noheads][:minF][:recon][:perkind], "
                         "or a tp-* variant")
    ap.add_argument("--dense-epochs", type=int, help="dense training epochs (default 20, as the quickstart)")
    ap.add_argument("--finetune-epochs", type=int, help="KD fine-tuning epochs per method (default 5)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="dense peak lr (the quickstart recipe's)")
    ap.add_argument("--warmup-epochs", type=float, default=2.0)
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tuning peak lr")
    ap.add_argument("--kd-alpha", type=float, default=0.7)
    ap.add_argument("--kd-tau", type=float, default=2.0)
    ap.add_argument("--calib-batches", type=int, help="calibration batches (default 8)")
    ap.add_argument("--iterative-rounds", type=int, default=3)
    ap.add_argument("--tp-tol", type=float, default=0.01, help="Torch-Pruning ratio search tolerance (relative)")
    ap.add_argument("--tp-over", type=float, default=0.02,
                    help="a Torch-Pruning variant counts as 'best TP' only if its achieved FLOPs are at most "
                         "target x (1 + this) on every seed (default 0.02)")
    ap.add_argument("--reference", choices=sorted(TP_METHODS),
                    help="compare vitopt with this Torch-Pruning variant in the paired differences, named in "
                         "advance, instead of the variant with the best mean on the same seeds (an upward-biased "
                         "reference); also with --merge and --summarize")
    ap.add_argument("--tp-grid", type=int)
    ap.add_argument("--tp-max-iter", type=int)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    ap.add_argument("--reuse", type=Path, metavar="RESULTS_JSON",
                    help="take the runs of every method of an earlier results file that is not in --methods, "
                         "instead of running them again: same settings required, and every seed's dense model must "
                         "reproduce that file's dense top-1 and FLOPs exactly (methods run in both are compared too)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                    help="combine the runs of results files made with the same settings and the same dense models "
                         "(equal dense top-1 and FLOPs per seed) into --out, with a new summary (no training)")
    ap.add_argument("--summarize", type=Path, metavar="RESULTS_JSON",
                    help="recompute the summary and paired differences of an earlier results file from its runs "
                         "(rewrites that file; no training)")
    return ap


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    if args.targets is None:
        args.targets = [0.5] if args.quick else [0.5, 0.3, 0.15]
    if args.depth is None:
        args.depth = 2 if (args.quick or args.imagefolder) else 6
    return args


# ------------------------------------------------------------------------------------ methods
def vitopt_config(method: str) -> dict[str, Any]:
    """``vitopt.prune`` keyword arguments of a vitopt method name (see the module docstring).

    Raises:
        ValueError: a malformed name.
    """
    if method == "vitopt":
        return {}
    if method == "vitopt-iterative":
        return {"schedule": "iterative"}
    parts = method.split(":")
    if len(parts) < 2:
        raise ValueError(f"unknown method {method!r}")
    cfg: dict[str, Any] = {"criterion": parts[0], "compare": parts[1], "groups": ALL_KINDS, "round_to": ROUND_TO,
                           "reconstruct": False, "scope": "global"}
    for extra in parts[2:]:
        if extra == "noembed":
            cfg["groups"] = tuple(g for g in cfg["groups"] if g != "embed")
        elif extra == "noheads":
            cfg["groups"] = tuple(g for g in cfg["groups"] if g != "heads")
        elif extra == "recon":
            cfg["reconstruct"] = True
        elif extra == "perkind":
            cfg["scope"] = "per_kind"
        elif extra.startswith("min"):
            f = float(extra[3:])
            cfg["min_fraction"] = {"heads": f, "mlp": f}
        else:
            raise ValueError(f"unknown method option {extra!r} in {method!r}")
    return cfg


def hparams(args, epochs: int, dense: bool = False) -> TrainHParams:
    if dense:
        return TrainHParams(epochs=epochs, lr=args.lr, warmup_epochs=args.warmup_epochs)
    return TrainHParams(epochs=epochs, lr=args.ft_lr, warmup_epochs=min(1.0, epochs))


def prune(args, method: str, dense, data, calib, target: float, seed: int, teacher) -> tuple[torch.nn.Module, dict, int]:
    """A pruned copy of ``dense`` at ``target`` FLOPs by ``method``; returns it, its info, and the
    fine-tune epochs left for it (iterative pruning spends part of the budget on recovery)."""
    model = copy.deepcopy(dense).eval()
    ft_epochs = args.finetune_epochs
    if method in TP_METHODS:
        imp, bottleneck, iso = TP_METHODS[method]
        extra = {"grad_batches": calib["taylor"]} if imp == "taylor" else {}
        res = V.tp_prune_to_flops(model, target, tol=args.tp_tol, max_iter=args.tp_max_iter, grid=args.tp_grid,
                                  bottleneck=bottleneck, importance=imp, isomorphic=iso, **extra)
        return res.model, res.info, ft_epochs
    cfg = vitopt_config(method)
    recover = None
    if cfg.get("schedule") == "iterative":
        cfg["rounds"] = args.iterative_rounds
        train = make_loader(data.train, args.batch_size, shuffle=True, seed=seed * 1000 + 3,
                            drop_last=len(data.train) > args.batch_size)
        steps_per_epoch = len(train)
        recovery_epochs = ft_epochs // 2                       # half of the budget, spread over the gaps
        ft_epochs -= recovery_epochs
        recover = vitopt.kd_recovery(train, steps=max(1, recovery_epochs * steps_per_epoch // (args.iterative_rounds - 1)),
                                     lr=args.ft_lr, kd_alpha=args.kd_alpha, kd_tau=args.kd_tau)
    t0 = time.perf_counter()
    # the prune stage's calibration: a per-class proxy set for criteria that calibrate per class (kl),
    # shuffled batches otherwise
    data_for = calib["kl"] if cfg.get("criterion") == "kl" else calib["taylor"]
    res = vitopt.prune_with_report(model, target={"flops": target}, data=data_for, teacher=None, recover=recover,
                                   inplace=True, **cfg)
    info = {"config": {k: v for k, v in cfg.items() if k != "round_to"}, "seconds": time.perf_counter() - t0,
            "rounds": [{k: r[k] for k in ("budget", "achieved") if k in r} for r in res.rounds],
            "exchange_rates": res.rounds[-1].get("exchange_rates"), "rate_curves": res.rounds[-1].get("rate_curves"),
            "reconstruction": [r["reconstruction"] for r in res.rounds if "reconstruction" in r] or None}
    return res.model, info, ft_epochs


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON payload (also written to ``--out``)."""
    args = resolve_args(argv)
    if args.summarize:
        return resummarize(args.summarize, args.reference)
    if args.merge:
        return merge(args.merge, args.out, argv, args.reference)
    threads = common.set_threads(args.threads)
    tp_ok, tp_msg = common.tp_status()
    methods = [m for m in args.methods if tp_ok or m not in TP_METHODS]
    skipped = {m: tp_msg for m in args.methods if m not in methods}
    for m in methods:
        if m not in TP_METHODS:
            vitopt_config(m)                                   # fail early on a malformed name
    if skipped:
        common.console.print(f"[yellow]skipping {', '.join(skipped)}: {tp_msg}[/]")
    reuse = load_reuse(args.reuse, args) if args.reuse else None
    t_start = time.perf_counter()
    load_start = common.load_average()
    runs: list[dict] = []
    dense_runs: list[dict] = []
    kind = "imagefolder" if args.imagefolder else "digits"
    name, kwargs = MODELS[kind]
    kwargs = {**kwargs, "depth": args.depth}
    cfg = (SimpleNamespace(type="imagefolder", root=args.imagefolder, num_workers=0, augment=None, skip_corrupt=False)
           if args.imagefolder else SimpleNamespace(type="digits", val_fraction=0.2))
    data_name = None
    for seed in args.seeds:
        set_seed(seed)
        model = create_model(name, {**kwargs, "num_classes": 10})
        data = load_data(cfg, model_input(model), args.split_seed)
        data_name = data.name
        if model.num_classes != data.num_classes:
            model.reset_classifier(data.num_classes)
        common.console.rule(f"seed {seed}: dense training on {data.name} ({len(data.train)} train / {len(data.val)} val)")
        train = make_loader(data.train, args.batch_size, shuffle=True, seed=seed * 1000,
                            drop_last=len(data.train) > args.batch_size)
        val = make_loader(data.val, 256, shuffle=False, seed=0)
        t0 = time.perf_counter()
        fit(model, train, None, hparams(args, args.dense_epochs, dense=True), desc=f"dense s{seed}")
        model.eval()
        dense_cost = V.cost(model)
        dense_runs.append({"seed": seed, "top1": evaluate(model, val)["top1"], **dense_cost,
                           "seconds": time.perf_counter() - t0})
        common.console.print(f"dense s{seed}: top-1 {dense_runs[-1]['top1']:.1f}, {dense_cost['flops'] / 1e6:.1f} MFLOPs")
        if reuse is not None:
            runs += reused_runs(reuse, args.reuse, seed, dense_runs[-1], methods, args.targets)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        calib = {c: calibration_batches(data.train, c, batches=args.calib_batches, batch_size=args.batch_size,
                                        seed=seed * 1000 + 7, always=True) for c in ("taylor", "kl")}
        for target in args.targets:
            for method in methods:
                set_seed(seed)
                t0 = time.perf_counter()
                run: dict[str, Any] = {"seed": seed, "target": target, "method": method,
                                       "tool": "torch-pruning" if method in TP_METHODS else "vitopt"}
                try:
                    pruned, info, ft_epochs = prune(args, method, model, data, calib, target, seed, teacher)
                except Exception as exc:  # one failing method must not hide the others
                    run["error"] = common.first_line(exc)
                    common.console.print(f"[red]{method} @ {target}: {run['error']}[/]")
                    runs.append(run)
                    continue
                c = V.cost(pruned)
                run.update({"flops_ratio": c["flops"] / dense_cost["flops"],
                            "params_ratio": c["params"] / dense_cost["params"], "dims": V.dims_summary(pruned),
                            "prune": info, "prune_seconds": time.perf_counter() - t0,
                            "top1_pruned": evaluate(pruned, val)["top1"], "finetune_epochs": ft_epochs})
                if method in TP_METHODS and not info.get("within_tol", True):
                    run["note"] = f"Torch-Pruning could not reach {target} within {args.tp_tol:.0%}"
                ft_train = make_loader(data.train, args.batch_size, shuffle=True, seed=seed * 1000 + 2,
                                       drop_last=len(data.train) > args.batch_size)
                set_seed(seed)
                history = []
                if ft_epochs > 0:                      # validation per epoch reads no RNG: training is unchanged
                    history = fit(pruned, ft_train, val, hparams(args, ft_epochs), teacher=teacher,
                                  kd_alpha=args.kd_alpha, kd_tau=args.kd_tau, desc=f"{method}@{target}")
                run["top1_by_epoch"] = [h["val_top1"] for h in history]
                run["epochs_before_finetune"] = args.finetune_epochs - ft_epochs
                run["top1"] = evaluate(pruned, val)["top1"]
                run["seconds"] = time.perf_counter() - t0
                common.console.print(f"{method} @ {target}: FLOPs {run['flops_ratio']:.4f}, top-1 one-shot "
                                     f"{run['top1_pruned']:.1f} -> fine-tuned {run['top1']:.1f}")
                runs.append(run)
                del pruned
    all_methods = list(dict.fromkeys([*methods, *(r["method"] for r in runs)]))
    summary = summarize(runs, all_methods, args.targets, args.tp_over)
    paired = paired_differences(runs, summary, args.targets, reference=args.reference)
    print_summary(summary, paired, dense_runs, data_name, args)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    checks = reproduced(reuse, runs)
    if checks:
        same = sum(c["equal"] for c in checks)
        common.console.print(f"reproduced {same}/{len(checks)} runs of {args.reuse} exactly (top-1)")
    payload = {"config": config, "defaults": library_defaults(), "data": data_name, "threads": threads, "tp_available": tp_ok, "tp_skipped": skipped,
               "reused": {"from": str(args.reuse), "methods": sorted({r["method"] for r in runs if "reused_from" in r}),
                          "reproduced": checks} if reuse is not None else None,
               "load_average": {"start": load_start, "end": common.load_average()},
               "dense": dense_runs, "runs": runs, "summary": summary, "paired": paired,
               "paired_each": paired_each(runs, args.targets),
               "seconds": time.perf_counter() - t_start}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


#: settings that must be equal for runs of an earlier results file to be reused (``--reuse``)
SAME_FOR_REUSE = ("imagefolder", "depth", "split_seed", "dense_epochs", "finetune_epochs", "batch_size", "lr",
                  "warmup_epochs", "ft_lr", "kd_alpha", "kd_tau", "calib_batches", "iterative_rounds", "tp_tol",
                  "tp_grid", "tp_max_iter", "threads")


def library_defaults() -> dict[str, Any]:
    """``vitopt.prune_with_report``'s default criterion, compare, scope and reconstruct: what the methods
    ``vitopt`` and ``vitopt-iterative`` meant when a results file was written."""
    sig = inspect.signature(vitopt.prune_with_report).parameters
    return {k: sig[k].default for k in ("criterion", "compare", "scope", "reconstruct")}


def recorded_defaults(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The library defaults a results file was written under (files older than ``reconstruct`` had it off,
    files older than ``scope`` in the record allocated globally)."""
    d = doc.get("defaults")
    return None if d is None else {"reconstruct": False, "scope": "global", **d}


def _same_meaning(doc: dict[str, Any], method: str) -> bool:
    """Whether ``method`` in the results file ``doc`` names the configuration it names now (``vitopt`` and
    ``vitopt-iterative`` follow the library defaults, which a file records since ``defaults`` exists)."""
    return method not in ("vitopt", "vitopt-iterative") or recorded_defaults(doc) == library_defaults()


def load_reuse(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The earlier results file ``path`` checked against ``args``: same settings, its seeds and targets
    covering ours. Raises SystemExit with one sentence otherwise."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cfg = doc["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--reuse {path}: not a readable accuracy results file ({common.first_line(exc)}).") from None
    ours = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    differ = [f"{k} ({cfg.get(k)!r} there, {ours[k]!r} here)" for k in SAME_FOR_REUSE if cfg.get(k) != ours[k]]
    missing = [f"seed {x}" for x in args.seeds if x not in cfg["seeds"]] + \
              [f"target {t}" for t in args.targets if t not in cfg["targets"]]
    if differ or missing:
        raise SystemExit(f"--reuse {path}: its runs were made differently: {', '.join(differ + missing)}.")
    return doc


def reused_runs(doc: dict[str, Any], path: Path, seed: int, dense: dict[str, Any], methods: list[str],
                targets: list[float]) -> list[dict]:
    """The runs of ``doc`` for ``seed`` whose method is not in ``methods`` (and means what it means now,
    see :func:`_same_meaning`), after checking that ``dense``
    (this run's dense model) reproduces ``doc``'s dense top-1 and FLOPs for that seed exactly."""
    earlier = next((d for d in doc["dense"] if d["seed"] == seed), None)
    if earlier is None or earlier["top1"] != dense["top1"] or earlier["flops"] != dense["flops"]:
        raise SystemExit(f"--reuse {path}: the dense model of seed {seed} does not reproduce ({dense['top1']} top-1 "
                         f"here, {earlier and earlier['top1']} there); its runs cannot be reused.")
    return [{**r, "reused_from": str(path)} for r in doc["runs"]
            if r["seed"] == seed and r["target"] in targets and r["method"] not in methods
            and _same_meaning(doc, r["method"])]


def reproduced(doc: dict[str, Any] | None, runs: list[dict]) -> list[dict]:
    """For every run made here whose (seed, target, method) the reused file also has: both top-1 values."""
    if doc is None:
        return []
    earlier = {(r["seed"], r["target"], r["method"]): r for r in doc["runs"] if "top1" in r
               and _same_meaning(doc, r["method"])}
    out = []
    for r in runs:
        e = earlier.get((r["seed"], r["target"], r["method"]))
        if e is not None and "top1" in r and "reused_from" not in r:
            out.append({"seed": r["seed"], "target": r["target"], "method": r["method"], "top1_here": r["top1"],
                        "top1_there": e["top1"], "equal": r["top1"] == e["top1"]})
    return out


def merge(paths: list[Path], out: Path, argv: list[str] | None, reference: str | None = None) -> dict[str, Any]:
    """One results file from several made with the same settings and dense models (``--merge``); its paired
    differences are against ``reference`` when given (see :func:`paired_differences`).

    Raises SystemExit with one sentence when two files differ in a setting of :data:`SAME_FOR_REUSE`
    or in a shared seed's dense model, or give one (seed, target, method) two different results. When one
    file ran a (seed, target, method) and another only reused it (``--reuse``), the run that was made is
    kept: it has the same top-1 and may carry more (``top1_by_epoch``)."""
    docs = []
    for p in paths:
        try:
            docs.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--merge {p}: not a readable results file ({common.first_line(exc)}).") from None
    first, cfg = docs[0], dict(docs[0]["config"])
    # 'vitopt' / 'vitopt-iterative' mean the library defaults of the file they were run in: every file
    # that has such runs must have been written under the same ones, which the merged file then records
    named = [(p, d) for p, d in zip(paths, docs) if {r["method"] for r in d["runs"]} & {"vitopt", "vitopt-iterative"}]
    defaults = recorded_defaults(named[0][1]) if named else recorded_defaults(first)
    for p, doc in named[1:]:
        if recorded_defaults(doc) != defaults:
            raise SystemExit(f"--merge {p}: written under other library defaults than {named[0][0]}, and both have "
                             "runs of vitopt / vitopt-iterative, which follow them.")
    dense: dict[Any, dict] = {}
    runs: dict[tuple, dict] = {}
    for p, doc in zip(paths, docs):
        differ = [k for k in SAME_FOR_REUSE if doc["config"].get(k) != cfg.get(k)]
        if differ:
            raise SystemExit(f"--merge {p}: made with other settings than {paths[0]} ({', '.join(differ)}).")
        for d in doc["dense"]:
            seen = dense.setdefault(d["seed"], d)
            if (seen["top1"], seen["flops"]) != (d["top1"], d["flops"]):
                raise SystemExit(f"--merge {p}: the dense model of seed {d['seed']} differs from another file's.")
        for r in doc["runs"]:
            key = (r["seed"], r["target"], r["method"])
            if key in runs and runs[key].get("top1") != r.get("top1"):
                raise SystemExit(f"--merge {p}: seed {key[0]}, target {key[1]}, {key[2]} has another result in "
                                 "another file.")
            if key not in runs or ("reused_from" in runs[key] and "reused_from" not in r):
                runs[key] = r                  # a run made in its file beats a copy another file reused
    runs = {k: {f: v for f, v in r.items() if f != "reused_from"} for k, r in runs.items()}
    merged = list(runs.values())
    cfg["seeds"] = sorted(dense)
    cfg["targets"] = sorted({r["target"] for r in merged}, reverse=True)
    cfg["methods"] = list(dict.fromkeys(r["method"] for r in merged))
    cfg["reference"] = reference
    summary = summarize(merged, cfg["methods"], cfg["targets"], cfg.get("tp_over", 0.02))
    paired = paired_differences(merged, summary, cfg["targets"], reference=reference)
    print_summary(summary, paired, list(dense.values()), first.get("data"), SimpleNamespace(**cfg))
    payload = {"config": cfg, "defaults": defaults, "data": first.get("data"),
               "merged_from": [{"path": str(p), "command": d.get("command"), "date": d.get("date"),
                                "load_average": d.get("load_average"), "seconds": d.get("seconds")}
                               for p, d in zip(paths, docs)], "dense": [dense[k] for k in sorted(dense)], "runs": merged,
               "summary": summary, "paired": paired, "paired_each": paired_each(merged, cfg["targets"])}
    common.write_json(out, payload, script=SCRIPT, args={"merge": [str(p) for p in paths], "out": str(out)}, argv=argv)
    return payload


def resummarize(path: Path, reference: str | None = None) -> dict[str, Any]:
    """Recompute ``summary`` and ``paired`` of the results file ``path`` from its raw ``runs`` (in place),
    the paired differences against ``reference`` when given, else against the file's recorded one."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    cfg = doc["config"]
    cfg["reference"] = reference or cfg.get("reference")
    methods = list(dict.fromkeys(r["method"] for r in doc["runs"]))
    doc["summary"] = summarize(doc["runs"], methods, cfg["targets"], cfg.get("tp_over", 0.02))
    doc["paired"] = paired_differences(doc["runs"], doc["summary"], cfg["targets"], reference=cfg["reference"])
    doc["paired_each"] = paired_each(doc["runs"], cfg["targets"])
    print_summary(doc["summary"], doc["paired"], doc["dense"], doc.get("data"), SimpleNamespace(**cfg))
    doc["summarized_by"] = f"python benchmarks/accuracy.py --summarize {path}" + \
        (f" --reference {cfg['reference']}" if cfg["reference"] else "")
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return doc


def _stats(vals: list[float]) -> dict | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}


def recovery(runs: list[dict]) -> dict | None:
    """Mean top-1 over seeds at each epoch after pruning began: the one-shot model, then each fine-tune epoch.

    ``epochs`` starts at ``epochs_before_finetune`` (the recovery epochs inside an iterative prune, else 0)
    for the one-shot top-1 and counts the fine-tune epochs from there; ``top1`` / ``std`` are the mean and
    population std (%) per epoch. None when a run has no ``top1_by_epoch`` (files written before stop 25)
    or the runs' curves differ in length or start."""
    if not runs or any("top1_by_epoch" not in r for r in runs):
        return None
    starts = {r["epochs_before_finetune"] for r in runs}
    lengths = {len(r["top1_by_epoch"]) for r in runs}
    if len(starts) != 1 or len(lengths) != 1:
        return None
    start = starts.pop()
    cols = list(zip(*([r["top1_pruned"], *r["top1_by_epoch"]] for r in runs)))     # one tuple per epoch
    return {"epochs": [start + k for k in range(len(cols))], "top1": [statistics.fmean(c) for c in cols],
            "std": [statistics.pstdev(c) for c in cols], "n": len(runs)}


def summarize(runs: list[dict], methods: list[str], targets: list[float], over: float = 0.02) -> list[dict]:
    """Per target and method: top-1 (fine-tuned and one-shot), achieved FLOPs and params ratios over seeds.

    ``reached_target``: every seed's achieved FLOPs ratio is at most ``target x (1 + over)``. vitopt lands
    under its budget; Torch-Pruning's ratio search moves in steps, so a variant may be allowed ``over``
    (default 2%) above it, never more: a variant further over was compared at a higher cost."""
    out = []
    for target in targets:
        for method in methods:
            rs = [r for r in runs if r["target"] == target and r["method"] == method]
            ok = [r for r in rs if "top1" in r]
            out.append({"target": target, "method": method, "tool": rs[0]["tool"] if rs else None,
                        "top1": _stats([r["top1"] for r in ok]),
                        "top1_pruned": _stats([r["top1_pruned"] for r in ok]),
                        "flops_ratio": _stats([r["flops_ratio"] for r in ok]),
                        "params_ratio": _stats([r["params_ratio"] for r in ok]),
                        "notes": sorted({r["note"] for r in rs if "note" in r}),
                        "recovery": recovery(ok),
                        "reached_target": bool(ok) and all(r["flops_ratio"] <= target * (1 + over) for r in ok),
                        "errors": [r["error"] for r in rs if "error" in r]})
    return out


def paired_differences(runs: list[dict], summary: list[dict], targets: list[float],
                       ours: str = "vitopt", reference: str | None = None) -> list[dict]:
    """Per target: the best Torch-Pruning variant (highest mean top-1 among those that reached the target,
    see :func:`summarize`) and ``ours - best TP`` per seed, in top-1 points.

    ``reference`` fixes the Torch-Pruning method instead (``best_tp`` then names it and ``reference_fixed``
    is true, and ``reference_reached_target`` says whether it stayed within the target's tolerance): choosing
    the best of several variants on the same seeds biases the reference upward, so a test planned in advance
    names it. ``diff`` holds mean / population std / min / max over seeds, and
    :func:`mean_interval`'s standard error and two-sided 95% Student-t interval of the mean."""
    out = []
    for target in targets:
        tp = [s for s in summary if s["target"] == target and s["tool"] == "torch-pruning" and s["top1"]
              and (s.get("reached_target", True) if reference is None else s["method"] == reference)]
        if not tp:
            continue
        best = max(tp, key=lambda s: s["top1"]["mean"])
        seeds, diffs = _paired(runs, target, ours, best["method"])
        if not seeds:
            continue
        out.append({"target": target, "ours": ours, "best_tp": best["method"], "reference_fixed": reference is not None,
                    "reference_reached_target": best.get("reached_target", True),
                    "seeds": seeds, "diff": {**_stats(diffs), **mean_interval(diffs)},
                    "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)})
    return out


def paired_each(runs: list[dict], targets: list[float], ours: str = "vitopt") -> list[dict]:
    """``ours`` minus every other method, per target, paired over the seeds both have: mean, spread, standard
    error and 95% t-interval (:func:`mean_interval`) in top-1 points. Every variant is listed, whether or
    not it reached the target, so that no comparison is left out; with several variants, one interval
    excluding 0 by chance is expected more often than 5% of the time."""
    out = []
    for target in targets:
        others = dict.fromkeys(r["method"] for r in runs if r["target"] == target and r["method"] != ours)
        for method in others:
            seeds, diffs = _paired(runs, target, ours, method)
            if seeds:
                out.append({"target": target, "ours": ours, "other": method, "seeds": seeds,
                            "diff": {**_stats(diffs), **mean_interval(diffs)}})
    return out


def _paired(runs: list[dict], target: float, ours: str, other: str) -> tuple[list[int], list[float]]:
    """The seeds where both ``ours`` and ``other`` have a fine-tuned top-1 at ``target``, and ``ours - other``
    on each (top-1 points)."""
    def top1(method):
        return {r["seed"]: r["top1"] for r in runs if r["target"] == target and r["method"] == method and "top1" in r}

    mine, theirs = top1(ours), top1(other)
    seeds = sorted(set(mine) & set(theirs))
    return seeds, [mine[s] - theirs[s] for s in seeds]


def mean_interval(vals: list[float], level: float = 0.95) -> dict[str, Any]:
    """Standard error of the mean of ``vals`` and its two-sided Student-t interval at ``level``.

    ``se = s / sqrt(n)`` with the sample standard deviation ``s`` (n - 1 in the denominator); the interval
    is ``mean ± t_{(1+level)/2, n-1} se`` (scipy.stats.t). Returns ``{"se": None, "ci95": None}`` for fewer
    than two values, where neither is defined."""
    if len(vals) < 2:
        return {"se": None, "ci95": None}
    from scipy import stats

    mean, se = statistics.fmean(vals), statistics.stdev(vals) / len(vals) ** 0.5
    half = float(stats.t.ppf((1 + level) / 2, len(vals) - 1)) * se
    return {"se": se, "ci95": [mean - half, mean + half]}


def print_summary(summary: list[dict], paired: list[dict], dense_runs: list[dict], data_name: str | None,
                  args) -> None:
    def pm(s, digits=1):
        return "-" if s is None else common.fmt_pm(s["values"], digits)

    rows = [["dense", "-", "1.000", common.fmt_pm([d["top1"] for d in dense_runs]), "-", ""]]
    for s in summary:
        rows.append([s["method"], s["target"], "-" if s["flops_ratio"] is None else f"{s['flops_ratio']['mean']:.3f}",
                     pm(s["top1"]), pm(s["top1_pruned"]), "; ".join(s["notes"] + s["errors"])[:70]])
    common.print_table(f"top-1 (%) on {data_name} val, mean ± std over seeds {args.seeds}; "
                       f"fine-tune {args.finetune_epochs} epochs with KD from dense",
                       [("method", "left"), "target", "FLOPs ratio", "top-1 fine-tuned", "top-1 one-shot",
                        ("note", "left")], rows,
                       caption="one-shot = right after pruning, before fine-tuning; FLOPs ratio = achieved / dense")
    curves = [s for s in summary if s.get("recovery")]
    if curves:
        width = max(len(s["recovery"]["epochs"]) + s["recovery"]["epochs"][0] for s in curves)
        common.print_table("mean top-1 (%) by epoch since pruning (0 = one-shot)",
                           [("method", "left"), "target", *(str(e) for e in range(width))],
                           [[s["method"], s["target"], *recovery_cells(s["recovery"], width)] for s in curves])
    if paired:
        common.print_table("vitopt (defaults) minus the best Torch-Pruning variant, paired by seed (top-1 points)",
                           ["target", ("best TP", "left"), "mean diff", "95% CI", "min", "max", "wins"],
                           [[p["target"], p["best_tp"] + (" (fixed)" if p.get("reference_fixed") else ""),
                             f"{p['diff']['mean']:+.2f}", _ci(p["diff"]), f"{p['diff']['min']:+.2f}",
                             f"{p['diff']['max']:+.2f}", f"{p['wins']}/{len(p['seeds'])}"] for p in paired])


def recovery_cells(rec: dict, width: int) -> list[str]:
    """``rec["top1"]`` placed at its epochs in ``width`` columns (``-`` before a curve starts and after it ends)."""
    by_epoch = dict(zip(rec["epochs"], rec["top1"]))
    return [f"{by_epoch[e]:.1f}" if e in by_epoch else "-" for e in range(width)]


def _ci(diff: dict) -> str:
    ci = diff.get("ci95")
    return "-" if ci is None else f"{ci[0]:+.2f} .. {ci[1]:+.2f}"


if __name__ == "__main__":
    main()
