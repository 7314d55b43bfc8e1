"""Top-1 of every ``sparse_train`` method at matched FLOPs, against plain magnitude (l1) pruning.

Per dataset (scikit-learn's digits, or ``--imagefolder PATH``, e.g. the synthetic shapes set from
``benchmarks/shapes.py``): train the quickstart-style ViT densely, then from that model, with the
same training budget for every method (``--sparse-epochs`` + ``--finetune-epochs``; fine-tuning uses
KD from the dense model, alpha 0.7, tau 2, and the same seed and batch order):

* ``l1`` - baseline: one-shot prune of heads and MLP neurons by weight L1 (global allocation) to the
  FLOPs S2ViTE reaches, then ``sparse + finetune`` epochs of KD fine-tuning;
* ``l1+attn_reg`` - the same, fine-tuned with Sparse-then-Prune's attention regularizer
  (Prasetyo et al. 2023, arXiv 2307.11988, weight ``--attn-weight``);
* ``vtp`` - VTP gates for ``--sparse-epochs`` (Zhu et al. 2021), ``gate`` prune to the same FLOPs, KD;
* ``s2vite`` - S2ViTE structured DST (Chen et al. 2021) with ``--head-density``/``--mlp-density``
  for ``--sparse-epochs``, surgery, KD - its FLOPs after surgery set the budget of the others;
* ``svite`` - SViTE unstructured DST (ERK, RigL) at the weight density that removes the same
  Linear MACs; its FLOPs are *effective* (non-zero MACs of the block Linears; a dense kernel runs all);
* ``semi24`` - 2:4 masks fixed while fine-tuning (effective FLOPs: half the block Linear MACs);
* ``svite_plus`` - SViTE+ token selector after block 0 with the keep count whose FLOPs come
  closest to the budget (real FLOPs: later blocks run fewer tokens).

One seed per dataset (the CPU budget of this benchmark is ~20 minutes for both datasets).

    python benchmarks/sparse_accuracy.py [--quick] [--imagefolder PATH] [--out benchmarks/results/sparse_accuracy.json]
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

SCRIPT = "sparse_accuracy"
METHODS = ("l1", "l1+attn_reg", "vtp", "s2vite", "svite", "semi24", "svite_plus")
DEFAULTS = dict(depth=4, dense_epochs=15, sparse_epochs=5, finetune_epochs=3, interval=10)
QUICK = dict(depth=2, dense_epochs=1, sparse_epochs=1, finetune_epochs=1, interval=4)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: depth 2, one epoch per phase")
    ap.add_argument("--imagefolder", type=Path, help="ImageNet-layout folder (train/ val/) instead of digits")
    ap.add_argument("--depth", type=int, help="transformer blocks (default 4)")
    ap.add_argument("--dense-epochs", type=int, help="dense training epochs (default 15)")
    ap.add_argument("--sparse-epochs", type=int, help="sparse-training epochs (default 5)")
    ap.add_argument("--finetune-epochs", type=int, help="KD fine-tuning epochs after pruning (default 3)")
    ap.add_argument("--interval", type=int, help="DST update interval in steps (default 10)")
    ap.add_argument("--head-density", type=float, default=0.5)
    ap.add_argument("--mlp-density", type=float, default=0.5)
    ap.add_argument("--attn-weight", type=float, default=1e-2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="dense peak lr")
    ap.add_argument("--ft-lr", type=float, default=5e-4, help="sparse-training / fine-tuning peak lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/sparse_accuracy_<data>.json")
    return ap


# ------------------------------------------------------------------------------------ pieces
def make_model(args, num_classes: int) -> torch.nn.Module:
    from vitopt.arch.config import create_model

    kw = {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 128, "depth": args.depth, "num_heads": 4,
          "num_classes": num_classes}
    if args.imagefolder is not None:        # 32 px RGB, 8 px patches: the same 16 + 1 tokens as digits
        kw.update(img_size=32, patch_size=8, in_chans=3)
    return create_model("deit_tiny_patch16_224", kw)


def load(args, model):
    from vitopt.train.data import load_data, model_input

    cfg = (SimpleNamespace(type="imagefolder", root=args.imagefolder, num_workers=0) if args.imagefolder
           else SimpleNamespace(type="digits", val_fraction=0.2))
    return load_data(cfg, model_input(model), 0)


def loaders(args, data, seed: int):
    from vitopt.train.data import make_loader

    train = make_loader(data.train, args.batch_size, shuffle=True, seed=seed, num_workers=0,
                        drop_last=len(data.train) > args.batch_size)
    val = make_loader(data.val, 256, shuffle=False, seed=0, num_workers=0)
    return train, val


def hp(args, epochs: int, lr: float | None = None):
    from vitopt.train.loop import TrainHParams

    return TrainHParams(epochs=epochs, lr=lr or args.ft_lr, warmup_epochs=0.0 if lr is None else 1.0)


def effective_flops(model) -> int:
    """FLOPs with zero weights of the block Linears skipped (2 x non-zero MACs; everything else dense)."""
    from vitopt.sparsity.masked import block_linears

    dense = V.cost(model)["flops"]
    tokens = sel.num_prefix + sel.keep if (sel := getattr(model, "token_selector", None)) else None
    n = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)
    zeros = 0
    for i, _blk in enumerate(model.blocks):
        n_i = tokens if tokens is not None and i > sel.after_block else n
        for _name, lin in block_linears(model, f"blocks.{i}.").items():
            zeros += n_i * int((lin.weight == 0).sum())
    return dense - 2 * zeros


def run_method(args, method: str, dense, teacher, data, budget: float | None, seed: int) -> tuple[Any, dict]:
    """Train/prune a copy of ``dense`` with ``method``; returns (model, info). ``budget``: FLOPs fraction."""
    from vitopt.sparsity.attention import AttentionSparsityReg
    from vitopt.sparsity.dst import SViTE
    from vitopt.sparsity.semi24 import Semi24
    from vitopt.sparsity.structured_dst import S2ViTE
    from vitopt.sparsity.token_selector import SViTEPlus
    from vitopt.sparsity.vtp import VTP
    from vitopt.train.loop import default_param_groups, fit, set_seed

    model = copy.deepcopy(dense).train()
    train, _ = loaders(args, data, seed * 1000 + 7)
    total = args.sparse_epochs + args.finetune_epochs
    info: dict[str, Any] = {}

    def kd(m, epochs, callbacks=()):
        set_seed(seed)
        fit(m, train, None, hp(args, epochs), teacher=teacher, kd_alpha=0.7, kd_tau=2.0, callbacks=list(callbacks),
            desc=method)

    if method in ("l1", "l1+attn_reg"):
        info["prune"] = V.vitopt_prune(model.eval(), budget, ("heads", "mlp"), criterion="l1")
        cbs = [AttentionSparsityReg(model, args.attn_weight)] if method == "l1+attn_reg" else []
        kd(model, total, cbs)
        for cb in cbs:
            cb.close()
    elif method == "vtp":
        vtp = VTP(model, 1e-4, ("heads", "mlp"))
        groups = default_param_groups(model, 0.05) + [{"params": vtp.parameters(), "weight_decay": 0.0, "lr": 1e-2}]
        set_seed(seed)
        fit(model, train, None, hp(args, args.sparse_epochs), param_groups=groups, callbacks=[vtp], desc="vtp")
        values = vtp.finish()
        info["prune"] = V.vitopt_prune(model.eval(), budget * V.cost(dense)["flops"] / V.cost(model)["flops"],
                                       ("heads", "mlp"), criterion="gate", gates=values)
        kd(model, args.finetune_epochs)
    elif method == "s2vite":
        cb = S2ViTE(model, args.head_density, args.mlp_density, update_interval=args.interval, t_end=0.8)
        set_seed(seed)
        fit(model, train, None, hp(args, args.sparse_epochs), callbacks=[cb], desc="s2vite")
        info["plan_sizes"] = {g: len(k) for g, k in cb.finish().keep.items()}
        info["updates"] = cb.updates
        kd(model, args.finetune_epochs)
    elif method == "svite":
        density = args.linear_density
        cb = SViTE(model, density, update_interval=args.interval, t_end=0.8, seed=seed)
        kd(model, total, [cb])
        cb.finish()
        info.update(density=cb.masks.density()["overall"], updates=cb.updates)
    elif method == "semi24":
        cb = Semi24(model)
        kd(model, total, [cb])
        cb.finish()
    elif method == "svite_plus":
        keep = args.selector_keep
        kd(model, total, [SViTEPlus(model, keep=keep, after_block=0, tau=1.0, tau_end=0.1)])
        info["keep"] = keep
    return model.eval(), info


@torch.no_grad()
def predictions(model, val) -> torch.Tensor:
    """Top-1 class of every validation image (to compare methods with the dense model)."""
    model.eval()
    return torch.cat([model(x).argmax(-1) for x, _ in val])


def selector_keep_for(dense, budget: float) -> int:
    """The keep count (after block 0) whose FLOPs ratio is closest to ``budget``."""
    from vitopt.arch.cost import CostModel
    from vitopt.sparsity.token_selector import attach_token_selector

    base = V.cost(dense)["flops"]
    best, best_err = 1, float("inf")
    for k in range(1, int(dense.patch_embed.num_patches) + 1):
        m = copy.deepcopy(dense)
        attach_token_selector(m, keep=k, after_block=0)
        err = abs(CostModel(m).flops({}) / base - budget)
        if err < best_err:
            best, best_err = k, err
    return best


def linear_density_for(dense, budget: float) -> float:
    """Weight density of the block Linears that brings effective FLOPs to ``budget`` x dense."""
    from vitopt.sparsity.masked import block_linears

    base = V.cost(dense)["flops"]
    n = int(dense.patch_embed.num_patches) + int(dense.num_prefix_tokens)
    linear = 2 * n * sum(lin.weight.numel() for lin in block_linears(dense).values())
    return max(0.01, min(0.99, 1.0 - (1.0 - budget) * base / linear))


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark on one dataset; returns the JSON payload (also written to ``--out``)."""
    from vitopt.train.loop import evaluate, fit, set_seed

    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    threads = common.set_threads(args.threads)
    t_start = time.perf_counter()
    seed = args.seed
    set_seed(seed)
    model = make_model(args, 10)
    data = load(args, model)
    if model.num_classes != data.num_classes:
        model.reset_classifier(data.num_classes)
    common.console.rule(f"dense training on {data.name} ({len(data.train)} train / {len(data.val)} val)")
    train, val = loaders(args, data, seed * 1000)
    set_seed(seed)
    fit(model, train, None, hp(args, args.dense_epochs, lr=args.lr), desc="dense")
    dense = model.eval()
    dense_cost = V.cost(dense)
    dense_top1 = evaluate(dense, val)["top1"]
    dense_pred = predictions(dense, val)
    teacher = copy.deepcopy(dense).requires_grad_(False)
    # the budget: what S2ViTE's densities give after surgery (computed on a pruned copy)
    from vitopt.arch.surgery import apply_plan
    from vitopt.sparsity.structured_dst import S2ViTE

    probe = apply_plan(dense, S2ViTE(copy.deepcopy(dense), args.head_density, args.mlp_density).plan())
    budget = V.cost(probe)["flops"] / dense_cost["flops"]
    args.linear_density = linear_density_for(dense, budget)
    args.selector_keep = selector_keep_for(dense, budget)
    common.console.print(f"dense top-1 {dense_top1:.2f}; FLOPs budget {budget:.3f} (S2ViTE heads "
                         f"{args.head_density}, mlp {args.mlp_density}); SViTE density {args.linear_density:.3f}; "
                         f"selector keep {args.selector_keep}")
    runs = []
    for method in args.methods:
        common.console.rule(method)
        t0 = time.perf_counter()
        try:
            pruned, info = run_method(args, method, dense, teacher, data, budget, seed)
        except Exception as exc:  # one failing method must not hide the others
            runs.append({"method": method, "error": common.first_line(exc)})
            common.console.print(f"[red]{method}: {runs[-1]['error']}[/]")
            continue
        c = V.cost(pruned)
        eff = effective_flops(pruned)
        runs.append({"method": method, "top1": evaluate(pruned, val)["top1"],
                     "agree_dense": (predictions(pruned, val) == dense_pred).double().mean().item(),
                     "flops_ratio": c["flops"] / dense_cost["flops"], "effective_flops_ratio": eff / dense_cost["flops"],
                     "params_ratio": c["params"] / dense_cost["params"], "dims": V.dims_summary(pruned),
                     "info": info, "seconds": time.perf_counter() - t0})
        common.console.print(f"{method}: top-1 {runs[-1]['top1']:.2f}, FLOPs {runs[-1]['flops_ratio']:.3f} "
                             f"(effective {runs[-1]['effective_flops_ratio']:.3f})")
        del pruned
    rows = [[r["method"], r.get("top1"), r.get("top1", float("nan")) - dense_top1 if "top1" in r else None,
             r.get("agree_dense"), r.get("flops_ratio"), r.get("effective_flops_ratio"), r.get("params_ratio"),
             r.get("error", "")] for r in runs]
    common.print_table(f"top-1 at matched FLOPs ({data.name}; dense {dense_top1:.2f}%, budget {budget:.3f} x dense; "
                       f"{args.sparse_epochs} + {args.finetune_epochs} epochs per method, seed {seed})",
                       [("method", "left"), "top-1 %", "vs dense", "agree w/ dense", "FLOPs x", "effective FLOPs x", "params x",
                        ("error", "left")], rows,
                       caption="FLOPs x: dense-kernel FLOPs after surgery / token selection; effective: non-zero "
                               "MACs of the block Linears (unstructured and 2:4 sparsity only save these with "
                               "sparse kernels, e.g. 2:4 on Sparse Tensor Cores)")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "data": data.name, "threads": threads, "dense": {"top1": dense_top1, **dense_cost},
               "budget_flops_ratio": budget, "runs": runs, "seconds": time.perf_counter() - t_start}
    name = "digits" if args.imagefolder is None else Path(args.imagefolder).name
    out = args.out or common.default_out(f"{SCRIPT}_{name}")
    common.write_json(out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


if __name__ == "__main__":
    main()
