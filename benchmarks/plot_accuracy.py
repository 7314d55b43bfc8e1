"""Plot ``benchmarks/accuracy.py`` results: top-1 against achieved FLOPs, one-shot and after fine-tuning.

One row of two panels per results file (one dataset each): top-1 (%) right after pruning and after the
KD fine-tune, against the achieved FLOPs ratio (FLOPs = 2 x MACs, as a fraction of the dense model's),
mean over seeds with the std as error bars, one line per method across the targets and the dense
models' mean top-1 as a dashed line. vitopt's default is drawn thick in black; the other methods thin. A method
that missed a target shows where it landed.

    python benchmarks/plot_accuracy.py benchmarks/results/accuracy_xeon.json benchmarks/results/accuracy_fashion.json \\
        --out docs/img/accuracy_vs_torch_pruning.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

#: the method drawn thick, in black: the library defaults
OURS = "vitopt"
#: colours of the other methods (matplotlib's tab10 without red and grey, which mark nothing here)
COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9", "C3")


def series(doc: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    """Per method, its summary points sorted by achieved FLOPs ratio.

    Each point: ``flops`` (mean achieved ratio), ``top1`` / ``top1_std`` (fine-tuned, %), ``oneshot`` /
    ``oneshot_std`` (right after pruning, %). Methods or targets without runs are left out. Raises
    ``KeyError`` when ``doc`` has no ``summary`` (not an accuracy.py results file).
    """
    out: dict[str, list[dict[str, float]]] = {}
    for row in doc["summary"]:
        if not row.get("top1") or not row.get("flops_ratio"):
            continue
        pruned = row.get("top1_pruned") or {}
        out.setdefault(row["method"], []).append({
            "flops": row["flops_ratio"]["mean"], "top1": row["top1"]["mean"], "top1_std": row["top1"]["std"],
            "oneshot": pruned.get("mean", float("nan")), "oneshot_std": pruned.get("std", 0.0)})
    return {m: sorted(pts, key=lambda p: p["flops"]) for m, pts in out.items()}


def method_colors(methods) -> dict[str, str]:
    """A matplotlib colour per method, in drawing order: vitopt's defaults (black) first, then the other
    vitopt methods, then the rest, alphabetically within each; the same methods always get the same colours."""
    every = sorted(methods, key=lambda m: (m != OURS, not m.startswith("vitopt"), m))
    return {m: "black" if m == OURS else COLORS[i % len(COLORS)] for i, m in enumerate(every)}


def dense_top1(doc: dict[str, Any]) -> float:
    """Mean dense top-1 (%) over the file's seeds."""
    return statistics.fmean(d["top1"] for d in doc["dense"])


def draw(docs: list[tuple[str, dict[str, Any]]], out: Path):
    """Write the figure for ``(title, results)`` pairs to ``out`` (PNG) and return it (matplotlib ``Figure``).

    Axes ``2 i`` / ``2 i + 1`` are file ``i``'s one-shot / fine-tuned panels; each method is one
    ``ErrorbarContainer`` labelled with its name.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(docs), 2, figsize=(11, 3.6 * len(docs)), squeeze=False, layout="constrained")
    color = method_colors({m for _, doc in docs for m in series(doc)})           # the same in every row
    every = list(color)
    for (title, doc), row in zip(docs, axes):
        data = series(doc)
        methods = [m for m in every if m in data]
        for ax, key, label in ((row[0], "oneshot", "one-shot (right after pruning)"),
                               (row[1], "top1", "after the KD fine-tune")):
            for m in methods:
                pts = data[m]
                ours = m == OURS
                ax.errorbar([p["flops"] for p in pts], [p[key] for p in pts], yerr=[p[key + "_std"] for p in pts],
                            label=m, color=color[m], lw=2.6 if ours else 1.0,
                            marker="o" if m.startswith("vitopt") else "s", ms=6 if ours else 4, capsize=2,
                            alpha=1.0 if ours else 0.75, zorder=3 if ours else 2)
            ax.axhline(dense_top1(doc), color="0.3", ls="--", lw=1.0, label="dense (mean)")
            ax.set_xlabel("achieved FLOPs / dense FLOPs")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{title}: {label}", loc="left", fontsize=10)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=7.5, loc="lower right")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def read_titled(paths: list[Path], titles: list[str] | None, check, what: str) -> list[tuple[str, dict]] | None:
    """``(title, results)`` per file, the title from ``titles`` or else the file's dataset name; ``check(doc)``
    must accept each file (raising ``ValueError``/``KeyError``/``TypeError`` otherwise). On the first file
    that cannot be read or fails the check, prints one sentence naming it (``what`` ends the description
    of what was expected) to stderr and returns None."""
    docs = []
    for i, path in enumerate(paths):
        try:
            doc = json.loads(path.read_text())
            check(doc)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {path}: not a readable accuracy.py results file{what} ({e})", file=sys.stderr)
            return None
        docs.append((titles[i] if titles and i < len(titles) else str(doc.get("data", path.stem)), doc))
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="accuracy.py results files, one per dataset")
    ap.add_argument("--title", nargs="+", help="one title per file (default: the file's dataset name)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    docs = read_titled(args.results, args.title, series, "")
    if docs is None:
        return 2
    draw(docs, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
