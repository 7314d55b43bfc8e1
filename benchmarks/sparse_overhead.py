"""Training-step overhead of every ``sparse_train`` method relative to a dense step (same model, same batch).

A step is what :func:`vitopt.train.loop.fit` does per batch: forward, cross-entropy plus the
callbacks' ``loss()`` terms, backward, ``after_backward``, AdamW step, ``after_step``. Variants:

* ``dense`` - no callback;
* ``vtp (hooks)`` - VTP gates (Zhu et al. 2021) applied to the activations by forward hooks
  (:meth:`UnitGates.attach`, the generic mechanism used before); ``vtp (weights)`` - the same gates
  applied to the choke-point weights (:class:`vitopt.sparsity.vtp.VTP`, what the
  ``sparse_train`` stage uses now);
* ``svite (rigl)`` / ``svite (set)`` - SViTE unstructured DST (Chen et al. 2021) with gradient / random
  regrow; ``s2vite`` - structured DST of heads and MLP neurons; each with a mask update every
  ``--interval`` steps, timed over whole intervals (so the update cost is averaged in);
* ``semi24`` - fixed 2:4 masks; ``token selector`` - SViTE+ top-k Gumbel selection after block 0
  (fewer tokens afterwards, so it can be faster than dense); ``attention reg`` - Sparse-then-Prune's
  ``mean log(1 + A^2)`` (forces timm's explicit attention path to read the maps).

Timing: the one method of :mod:`vitopt.deploy.timing`: ``--warmup`` untimed steps per variant, then
``--repeats`` interleaved rounds; in each round every variant runs a block of ``--intervals`` x
``--interval`` steps (so each block holds exactly ``--intervals`` mask updates of every DST variant),
variant after variant, so slow drifts of a shared machine hit all of them alike. Reported: the median
over rounds of each block's mean step time (wall clock, and process CPU time, which other processes on
a shared machine disturb much less) and the median of per-round ratios to dense with min-max. Run with
``OMP_NUM_THREADS=1`` (and ``--threads 1``) on a quiet machine for stable numbers.

    python benchmarks/sparse_overhead.py [--quick] [--out benchmarks/results/sparse_overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = "sparse_overhead"
#: quickstart.yaml's model (DeiT-tiny layout at 16 px, 4 px patches: 17 tokens, width 128, depth 6)
MODEL = ("deit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 128, "depth": 6,
                                   "num_heads": 4, "num_classes": 10})
DEFAULTS = dict(batch=64, interval=20, intervals=1, repeats=5, warmup=3)
QUICK = dict(batch=16, interval=4, intervals=1, repeats=2, warmup=1)
VARIANTS = ("dense", "vtp (hooks)", "vtp (weights)", "svite (rigl)", "svite (set)", "s2vite", "semi24",
            "token selector", "attention reg")
#: variants and the goal of the issue (ratio to dense), for the table
GOALS = {"vtp (weights)": 1.10, "vtp (hooks)": 1.10, "s2vite": 1.10, "svite (rigl)": 1.15, "svite (set)": 1.15}


def _noop() -> None:
    """Nothing to clean up."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 16, short blocks, 2 rounds")
    ap.add_argument("--batch", type=int, help="images per step (default 64)")
    ap.add_argument("--interval", type=int, help="DST mask update interval in steps (default 20)")
    ap.add_argument("--intervals", type=int, help="update intervals per timed block (default 1)")
    ap.add_argument("--repeats", type=int, help="rounds over all variants (default 5)")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant before the first round (default 3)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    return ap


def make_variant(name: str, base: torch.nn.Module, interval: int, total_steps: int, seed: int):
    """``(model, optimizer, callbacks, cleanup)`` for one variant, on a fresh copy of ``base``."""
    from vitopt.sparsity.attention import AttentionSparsityReg
    from vitopt.sparsity.dst import SViTE
    from vitopt.sparsity.semi24 import Semi24
    from vitopt.sparsity.structured_dst import S2ViTE
    from vitopt.sparsity.token_selector import SViTEPlus
    from vitopt.sparsity.vtp import VTP
    from vitopt.train.loop import default_param_groups

    model = copy.deepcopy(base).train()
    groups = default_param_groups(model, 0.05)
    callbacks: list = []
    cleanup: Callable[[], None] = _noop
    if name.startswith("vtp"):
        vtp = VTP(model, 1e-4)
        if name == "vtp (hooks)":               # the generic activation hooks instead of weight parametrizations
            vtp._handle.remove()
            vtp._handle = vtp.gates.attach(model)
        groups.append({"params": vtp.parameters(), "weight_decay": 0.0})
        callbacks.append(vtp)
        cleanup = vtp.finish
    elif name.startswith("svite"):
        callbacks.append(SViTE(model, 0.5, growth="gradient" if "rigl" in name else "random",
                                         update_interval=interval, t_end=1.0, seed=seed))
    elif name == "s2vite":
        cb = S2ViTE(model, 0.5, 0.5, update_interval=interval, t_end=1.0)
        callbacks.append(cb)
        cleanup = cb.close
    elif name == "semi24":
        callbacks.append(Semi24(model))
    elif name == "token selector":
        plus = SViTEPlus(model, keep=0.5, after_block=0)
        groups = default_param_groups(model, 0.05)
        callbacks.append(plus)
    elif name == "attention reg":
        cb = AttentionSparsityReg(model, 1e-2)
        callbacks.append(cb)
        cleanup = cb.close
    opt = torch.optim.AdamW(groups, lr=1e-4)
    for cb in callbacks:
        cb.on_fit_start(model, opt, total_steps)
    return model, opt, callbacks, cleanup


def train_step(model, opt, callbacks, x, y, step: int) -> None:
    """One step in :func:`vitopt.train.loop.fit`'s order (forward, loss terms, backward, hooks, AdamW)."""
    loss = F.cross_entropy(model(x), y)
    terms = [t for t in (cb.loss() for cb in callbacks) if t is not None]
    if terms:
        loss = loss + torch.stack([t.reshape(()) for t in terms]).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for cb in callbacks:
        cb.after_backward(step)
    opt.step()
    for cb in callbacks:
        cb.after_step(step)


def measure(args) -> dict[str, Any]:
    from vitopt.arch.config import create_model
    from vitopt.deploy.timing import spread

    torch.manual_seed(args.seed)
    base = create_model(MODEL[0], dict(MODEL[1]))
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 1, 16, 16, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    block = args.interval * args.intervals
    total = args.warmup + block * args.repeats + 1
    live = {v: make_variant(v, base, args.interval, total, args.seed) for v in args.variants}
    steps = {v: 0 for v in live}

    def stepper(v):
        model, opt, cbs, _ = live[v]

        def step():
            train_step(model, opt, cbs, x, y, steps[v])
            steps[v] += 1
        return step

    try:
        res = common.timed({v: stepper(v) for v in live}, args, what="training steps", rounds=args.repeats,
                           calls=block, reference="dense")
    finally:
        for _, (_, _, _, cleanup) in live.items():
            cleanup()
    out = {}
    dense_cpu = res.candidates["dense"]["cpu_rounds_ms"]
    for v, c in res.candidates.items():
        cpu_ratio = spread([a / b for a, b in zip(c["cpu_rounds_ms"], dense_cpu)])
        out[v] = {"median_ms": c["ms"], "min_ms": min(c["rounds_ms"]), "max_ms": max(c["rounds_ms"]),
                  "samples_ms": c["rounds_ms"], "ratio": c["ratio"], "cpu_median_ms": c["cpu_ms"],
                  "cpu_samples_ms": c["cpu_rounds_ms"], "cpu_ratio": cpu_ratio, "goal": GOALS.get(v)}
    return {"variants": out, "timing": res.to_json()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON payload (also written to ``--out``)."""
    args = common.parse_with_defaults(build_parser(), argv, QUICK, DEFAULTS)
    if "dense" not in args.variants:
        args.variants = ["dense", *args.variants]
    threads = common.set_threads(args.threads)
    t0 = time.perf_counter()
    measured = measure(args)
    res = measured["variants"]
    rows = []
    for v, r in res.items():
        goal = r["goal"]
        met = None if goal is None else ("yes" if max(r["ratio"]["median"], r["cpu_ratio"]["median"]) <= goal else "no")
        rows.append([v, r["median_ms"], r["min_ms"], r["max_ms"], common.fmt_ratio(r["ratio"]), r["cpu_median_ms"],
                     common.fmt_ratio(r["cpu_ratio"]), goal, met])
    common.print_table(f"training step vs dense (quickstart ViT, batch {args.batch}, CPU, threads={threads}; "
                       f"{args.repeats} interleaved rounds of {args.intervals} x {args.interval} steps)",
                       [("variant", "left"), "median ms", "min ms", "max ms", ("x dense (min-max)", "left"), "CPU ms",
                        ("CPU x dense", "left"), "goal", "met"], rows,
                       caption="DST variants update their masks every --interval steps; each timed block spans "
                               "whole intervals, so the update cost is included in the mean. x dense: median of "
                               "per-round ratios. CPU ms: process CPU time per step (robust to other processes on a "
                               "shared machine); met: both median ratios within the goal")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"config": config, "threads": threads, "model": {"name": MODEL[0], "kwargs": MODEL[1]},
               "results": res, "timing": measured["timing"], "seconds": time.perf_counter() - t0}
    common.write_json(args.out, payload, script=SCRIPT, args=config, argv=argv)
    return payload


if __name__ == "__main__":
    main()
