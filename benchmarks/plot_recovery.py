"""Plot how fast each method's pruned model recovers during the KD fine-tune of ``benchmarks/accuracy.py``.

One row per results file (one dataset each), one panel per FLOPs target: mean top-1 (%) over seeds against
the epochs spent since pruning began (0 = one-shot, then one point per fine-tune epoch; ``vitopt-iterative``
starts after the recovery epochs its prune spent), std as error bars, the dense models' mean top-1 as a
dashed line. The points are those of one cosine fine-tune schedule, not of runs with shorter budgets.
Colours match ``plot_accuracy.py``. Also prints, per target and method, the first epoch at which the mean
is within ``--within`` points (default 0.5) of the dense model's.

Reads the ``recovery`` field of each summary row, which ``accuracy.py`` writes from stop 25 on (files
without it have nothing to draw and are refused).

    python benchmarks/plot_recovery.py benchmarks/results/accuracy_fashion_recovery.json --out docs/img/recovery.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plot_accuracy import OURS, dense_top1, method_colors, read_titled


def curves(doc: dict[str, Any]) -> dict[float, dict[str, dict[str, Any]]]:
    """``{target: {method: summary row}}`` for every summary row with a ``recovery`` curve, targets in
    descending order. Raises ``KeyError`` when ``doc`` has no ``summary`` (not an accuracy.py results file)."""
    out: dict[float, dict[str, dict[str, Any]]] = {}
    for row in doc["summary"]:
        if row.get("recovery"):
            out.setdefault(row["target"], {})[row["method"]] = row
    return dict(sorted(out.items(), reverse=True))


def epochs_to_reach(rec: dict[str, list], level: float) -> int | None:
    """The first epoch at which the mean top-1 is at least ``level`` (%), or None if it never is."""
    return next((e for e, t in zip(rec["epochs"], rec["top1"]) if t >= level), None)


def draw(docs: list[tuple[str, dict[str, Any]]], out: Path):
    """Write the figure for ``(title, results)`` pairs to ``out`` (PNG) and return it (matplotlib ``Figure``).

    Row ``i`` holds file ``i``'s targets, left to right in descending order; each method is one
    ``ErrorbarContainer`` labelled with its name (with the FLOPs it
    reached, dotted, when it missed the target by more than accuracy.py's ``--tp-over``). Raises ``ValueError`` when no file has a curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_doc = [curves(doc) for _, doc in docs]
    cols = max((len(c) for c in per_doc), default=0)
    if cols == 0:
        raise ValueError("no recovery curves in these files (written by accuracy.py before stop 25?)")
    fig, axes = plt.subplots(len(docs), cols, figsize=(4.2 * cols, 3.4 * len(docs)), squeeze=False,
                             layout="constrained")
    color = method_colors({m for c in per_doc for by in c.values() for m in by})
    for (title, doc), by_target, row in zip(docs, per_doc, axes):
        for ax, (target, by_method) in zip(row, by_target.items()):
            for m in [m for m in color if m in by_method]:
                row_m, ours = by_method[m], m == OURS
                rec, missed = row_m["recovery"], row_m.get("reached_target") is False
                label = f"{m} (missed: {row_m['flops_ratio']['mean']:.2f} FLOPs)" if missed else m
                ax.errorbar(rec["epochs"], rec["top1"], yerr=rec["std"], label=label, color=color[m],
                            ls=":" if missed else "-",
                            lw=2.6 if ours else 1.0, marker="o" if m.startswith("vitopt") else "s",
                            ms=6 if ours else 4, capsize=2, alpha=1.0 if ours else 0.75, zorder=3 if ours else 2)
            ax.axhline(dense_top1(doc), color="0.3", ls="--", lw=1.0, label="dense (mean)")
            ax.set_xlabel("epochs since pruning began (0 = one-shot)")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{title}: {target:g} of dense FLOPs", loc="left", fontsize=10)
            ax.grid(alpha=0.3)
        for ax in row[len(by_target):]:
            ax.set_visible(False)
        for ax in row[:len(by_target)]:
            ax.legend(fontsize=6.5, loc="lower right")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def print_reach(title: str, doc: dict[str, Any], within: float) -> None:
    """Print, per target and method, the first epoch whose mean top-1 is within ``within`` of dense."""
    level = dense_top1(doc) - within
    print(f"{title}: first epoch with mean top-1 >= dense - {within:g} ({level:.1f}%); '-' = never")
    for target, by_method in curves(doc).items():
        reach = {m: epochs_to_reach(r["recovery"], level) for m, r in by_method.items()}
        cells = [f"{m} {'-' if e is None else e}" for m, e in reach.items()]
        print(f"  {target:g}: " + ", ".join(cells))


def _has_curves(doc: dict[str, Any]) -> None:
    if not curves(doc):
        raise ValueError("no recovery curves (written by accuracy.py before stop 25?)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="accuracy.py results files, one per dataset")
    ap.add_argument("--title", nargs="+", help="one title per file (default: the file's dataset name)")
    ap.add_argument("--within", type=float, default=0.5, help="points below dense that count as recovered")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    docs = read_titled(args.results, args.title, _has_curves, " with recovery curves")
    if docs is None:
        return 2
    draw(docs, args.out)
    for title, doc in docs:
        print_reach(title, doc, args.within)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
