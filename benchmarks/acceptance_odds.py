"""How often a k-seed acceptance rule is met by chance: every k-seed subset of a many-seed accuracy file.

Issue 13's acceptance asks, per target, that vitopt's mean top-1 over 3 seeds be at or above the best
Torch-Pruning variant's (the highest mean among the variants within 2% of the target). When the methods
are equally good, the best of six means is biased upward, and a 3-seed mean is one noisy draw. This
script measures how often the rule holds on data: for every k-subset of the seeds of an
``accuracy.py`` results file, it applies the rule exactly as ``accuracy.py`` does (its ``summarize`` and
``paired_differences``, so the 2% tolerance is judged on the subset) and counts the subsets where the
mean difference is >= 0. It does so for each contestant in turn (vitopt and every Torch-Pruning variant),
each against the best of all the others, so the rate of a method that is no better than the field can
be read next to vitopt's: if all were equal, each would pass in about 1 / (number of contestants) of the
subsets, a little more with ties.

    python benchmarks/acceptance_odds.py benchmarks/results/accuracy_power_digits50_all15.json [--k 3] \\
        [--targets 0.5] [--out benchmarks/results/acceptance_odds_digits50.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy as A  # noqa: E402
import common  # noqa: E402

SCRIPT = "acceptance_odds"
#: a mean difference above -EPS counts as "at or above" (the values are sums of multiples of 100 / n_val)
EPS = 1e-9


def as_contestant(runs: list[dict], method: str) -> list[dict]:
    """A copy of ``runs`` where ``method`` plays vitopt's part: its runs are tagged ``tool="vitopt"`` and
    every other contestant's ``tool="torch-pruning"``, so ``paired_differences(..., ours=method)`` takes the
    best of all the others as the reference."""
    return [{**r, "tool": "vitopt" if r["method"] == method else "torch-pruning"} for r in runs]


def passes(runs: list[dict], methods: list[str], target: float, ours: str, over: float) -> bool | None:
    """Whether ``ours`` is at or above the best other contestant on the mean at ``target`` under the
    acceptance's rule (``accuracy.summarize`` with tolerance ``over``, then ``accuracy.paired_differences``).
    A contestant more than ``over`` above the target on one of the seeds does not pass (it spent more
    FLOPs). None when no other contestant reached the target on these seeds."""
    runs = as_contestant(runs, ours)
    summary = A.summarize(runs, methods, [target], over)
    paired = A.paired_differences(runs, summary, [target], ours=ours)
    if not paired:
        return None
    mine = next(s for s in summary if s["method"] == ours)
    return mine["reached_target"] and paired[0]["diff"]["mean"] > -EPS


def odds(doc: dict[str, Any], k: int = 3, contestants: list[str] | None = None,
         targets: list[float] | None = None) -> list[dict[str, Any]]:
    """Per target and contestant: over every k-subset of the seeds that all contestants share, the number
    of subsets where the rule holds (``passed``), is undecidable (``undecided``) and the pass ``rate``.

    ``contestants`` defaults to ``vitopt`` and the Torch-Pruning variants present, ``targets`` to every
    target of the file. Raises ``ValueError`` when fewer than ``k`` seeds are shared."""
    over = doc.get("config", {}).get("tp_over", 0.02)
    runs = [r for r in doc["runs"] if "top1" in r]
    out = []
    for target in targets or sorted({r["target"] for r in runs}, reverse=True):
        at = [r for r in runs if r["target"] == target]
        names = contestants or [m for m in ["vitopt", *A.TP_METHODS] if any(r["method"] == m for r in at)]
        at = [r for r in at if r["method"] in names]
        seeds = sorted(set.intersection(*({r["seed"] for r in at if r["method"] == m} for m in names)))
        if len(seeds) < k:
            raise ValueError(f"target {target}: only {len(seeds)} seeds have every contestant, fewer than k={k}")
        subsets = list(itertools.combinations(seeds, k))
        for ours in names:
            verdicts = [passes([r for r in at if r["seed"] in s], names, target, ours, over) for s in subsets]
            decided = [v for v in verdicts if v is not None]
            out.append({"target": target, "method": ours, "k": k, "seeds": seeds, "subsets": len(subsets),
                        "passed": sum(decided), "undecided": len(verdicts) - len(decided),
                        "rate": sum(decided) / len(decided) if decided else None, "contestants": names})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="an accuracy.py results file with more than k seeds")
    ap.add_argument("--k", type=int, default=3, help="seeds per subset (the acceptance's 3)")
    ap.add_argument("--targets", nargs="+", type=float, help="FLOPs targets (default: every target of the file)")
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    args = ap.parse_args(argv)
    try:
        doc = json.loads(args.results.read_text())
        rows = odds(doc, args.k, targets=args.targets)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {args.results}: {e}", file=sys.stderr)
        return 2
    common.print_table(f"at or above the best of the others on the mean, over every {args.k}-seed subset",
                       ["target", ("method", "left"), "subsets", "passed", "rate (%)"],
                       [(r["target"], r["method"], r["subsets"] - r["undecided"], r["passed"],
                         None if r["rate"] is None else 100 * r["rate"]) for r in rows])
    common.write_json(args.out, {"source": str(args.results), "rows": rows}, script=SCRIPT, args=vars(args), argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
