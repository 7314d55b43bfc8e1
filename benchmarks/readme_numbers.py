"""The README's result tables, printed from the results files a script wrote (``make readme-numbers``).

Every number the README quotes must come from a file under ``benchmarks/results/`` that a script wrote
(with its command, date, machine and load). A table in README.md that quotes results is marked, on
the line(s) before it, with the files it comes from::

    <!-- numbers: benchmarks/results/quickstart.json -->
    | stage | ... |

* ``python benchmarks/readme_numbers.py`` prints, for every results file present, its table(s) with the
  marker line above, ready to paste into the README;
* ``python benchmarks/readme_numbers.py --check README.md`` checks every marked table: each number in it
  must appear in one of its files (exit code 1 and the numbers that do not otherwise).
  ``tests/test_readme_numbers.py`` runs the check on the repository's README.

A README number ``x`` written with ``d`` decimals "appears" in a file when some number ``v`` in the
file (any depth of its JSON) gives ``x`` when rounded to ``d`` decimals, as ``v``, ``100 v`` (a
fraction quoted in percent), ``1 / v`` (a ratio quoted as a speed-up), ``v / 1e6`` (FLOPs or params
quoted in millions) or ``v / 1e3`` (ms quoted in s); a number without decimals must equal one exactly,
or be a value of at least 10 rounded to an integer. A number's sign is part of it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!--\s*numbers:\s*(?P<files>[^>]*?)\s*-->")
#: a number token: not inside a word on its left (``b32``, ``deit_s``), any unit on its right (``0.69x``, ``49.9%``)
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\d.]*\d)")


# ------------------------------------------------------------------------------------ checking
def marked_tables(text: str) -> list[tuple[list[str], str, int]]:
    """``(files, table text, line number)`` of every Markdown table that follows a ``numbers`` marker."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = MARKER.search(lines[i])
        if not m:
            i += 1
            continue
        files = [f.strip() for f in m.group("files").split(",") if f.strip()]
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or MARKER.search(lines[j])):
            j += 1
        start = j
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            j += 1
        out.append((files, "\n".join(lines[start:j]), i + 1))
        i = max(j, i + 1)
    return out


def numbers_in(obj: Any) -> list[float]:
    """Every number at any depth of a JSON value (bools excluded; numeric strings included)."""
    out: list[float] = []
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            out.append(float(obj))
    elif isinstance(obj, str):
        out += [float(x) for x in NUMBER.findall(obj)]
    elif isinstance(obj, dict):
        for v in obj.values():
            out += numbers_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += numbers_in(v)
    return out


def _decimals(token: str) -> int:
    return len(token.split(".", 1)[1]) if "." in token else 0


def appears(token: str, values: Iterable[float]) -> bool:
    """Whether the README number ``token`` is some file number (module docstring for the forms)."""
    x = float(token)
    d = _decimals(token)
    for v in values:
        forms = [v, 100 * v, v / 1e6, v / 1e3] + ([1 / v] if v != 0 else [])
        for f in forms:
            if d > 0 and float(f"{f:.{d}f}") == x:
                return True
            if d == 0 and (f == x or (abs(f) >= 10 and float(f"{f:.0f}") == x)):
                return True
    return False


def table_numbers(table: str) -> list[str]:
    """The number tokens of a Markdown table's body (header and separator rows skipped)."""
    rows = [r for r in table.splitlines() if r.strip().startswith("|")]
    body = [r for k, r in enumerate(rows) if k != 0 and not re.fullmatch(r"\|?[\s:|-]+\|?", r.strip())]
    return [t for r in body for t in NUMBER.findall(r)]


def check(readme: Path, root: Path = ROOT) -> list[str]:
    """Problems with the marked tables of ``readme`` (empty when every number appears in its files)."""
    problems = []
    for files, table, line in marked_tables(readme.read_text(encoding="utf-8")):
        if not table:
            problems.append(f"{readme}:{line}: a numbers marker with no table after it")
            continue
        values: list[float] = []
        for f in files:
            path = root / f
            if not path.is_file():
                problems.append(f"{readme}:{line}: results file {f} does not exist")
                continue
            values += numbers_in(json.loads(path.read_text(encoding="utf-8")))
        missing = [t for t in table_numbers(table) if not appears(t, values)]
        if missing:
            problems.append(f"{readme}:{line}: numbers not in {', '.join(files)}: {', '.join(missing)}")
    return problems


# ------------------------------------------------------------------------------------ rendering
def _md(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _r(r: dict | None, d: int = 2) -> str:
    return "" if not r else f"{r['median']:.{d}f}x ({r['min']:.{d}f}-{r['max']:.{d}f})"


def _f(v: float | None, d: int = 1) -> str:
    return "" if v is None else f"{v:.{d}f}"


def _load(doc: dict) -> str:
    load = (doc.get("load") or {}).get("loadavg")
    cores = (doc.get("load") or {}).get("cpu_count")
    return f"{doc.get('date', '?')}, {(doc.get('machine') or {}).get('cpu', '?')}, load {load[0] if load else '?'} on {cores} cores"


def render_quickstart(doc: dict) -> list[str]:
    s = doc["summary"]
    rows = [["dense (train)", _f(s.get("dense_top1"), 2), "1.000"],
            ["after VTP (sparse_train)", _f(s.get("sparse_train_top1"), 2), ""],
            ["pruned (before fine-tune)", _f(s.get("pruned_top1_before_finetune"), 2), _f(s.get("flops_ratio"), 3)],
            ["fine-tuned with KD", _f(s.get("final_top1"), 2), _f(s.get("flops_ratio"), 3)]]
    out = [_md(["model", "val top-1 (%)", "FLOPs ratio"], rows)]
    v = s.get("validate") or {}
    lat = [[kind, b, _r(r, 2)] for kind, per in (v.get("latency_ratio") or {}).items() for b, r in per.items()]
    if lat:
        out.append(_md(["runtime", "batch", "latency final / dense (median, min-max)"], lat))
    out.append(_md(["stages (s)", "run, wall clock (s)"], [[_f(s.get("seconds_total"), 0), _f(doc.get("wall_seconds"), 0)]]))
    return out


def render_noise_floor(doc: dict) -> list[str]:
    rows = [[r["model"], r["runtime"], r["batch"], _f(r["ms"], 3), _r(r["ratio"], 3)] for r in doc["rows"]]
    return [_md(["model", "runtime", "batch", "ms per call", "same model / itself (median, min-max)"], rows)]


def render_latency_aware(doc: dict) -> list[str]:
    rows = []
    for res in doc["results"]:
        for label, r in res["rows"].items():
            rows.append([res["model"], label, _f(r["flops_ratio"], 3), _f(r.get("top1"), 2), _f(r["ms"], 3),
                         _r(r["ratio_to_dense"], 3)])
    pairs = [[res["model"], _r(res["flops_over_latency_aware"], 3)] for res in doc["results"]]
    return [_md(["model", "allocation", "FLOPs ratio", "top-1 (%)", "ms", "latency / dense (median, min-max)"], rows),
            _md(["model", "FLOPs-aware / latency-aware latency (median, min-max)"], pairs)]


def render_speedup(doc: dict) -> list[str]:
    keys = doc["latency_keys"]
    rows = [[w["model"], w["target"], f"{w['vitopt']} vs {w['tp']}", f"{100 * w['flops_gap']:+.2f}%", w["basis"],
             *[(f"{_r(w['ratio'].get(k))} {w['faster'].get(k)}" if w["ratio"].get(k) else "") for k in keys]]
            for w in doc["pairs"]]
    return [_md(["model", "target", "pair", "FLOPs gap", "basis", *keys], rows)]


def render_accuracy(doc: dict) -> list[str]:
    def pm(s, d=1):
        if not s:
            return ""
        return f"{s['mean']:.{d}f} ± {s['std']:.{d}f}" if s.get("n", 1) > 1 else f"{s['mean']:.{d}f}"

    dense = [d["top1"] for d in doc.get("dense", [])]
    def reached(s):
        return "" if s["tool"] != "torch-pruning" else ("yes" if s.get("reached_target") else "**no**")

    rows = [["dense (per seed)", "", "1.000", " / ".join(f"{v:.1f}" for v in dense), "", ""]]
    rows += [[s["method"], s["target"], pm(s["flops_ratio"], 3), pm(s["top1"]), pm(s["top1_pruned"]), reached(s)]
             for s in doc["summary"]]
    out = [_md(["method", "target", "FLOPs ratio", "top-1 fine-tuned (%)", "top-1 one-shot (%)",
                "TP at most 2% over target"], rows)]
    with_ci = any(p["diff"].get("ci95") for p in doc.get("paired", []))

    def ci(p):
        c = p["diff"].get("ci95")
        return ["-" if c is None else f"{c[0]:+.2f} .. {c[1]:+.2f}"] if with_ci else []

    paired = [[p["target"], p["best_tp"] + (" (named in advance)" if p.get("reference_fixed") else ""),
               f"{p['diff']['mean']:+.2f}", f"{p['diff']['std']:.2f}", *ci(p),
               f"{p['diff']['min']:+.2f}", f"{p['diff']['max']:+.2f}", f"{p['wins']}/{len(p['seeds'])}"]
              for p in doc.get("paired", [])]
    if paired:
        fixed = any(p.get("reference_fixed") for p in doc["paired"])
        out.append(_md(["target", "Torch-Pruning variant" if fixed else "best Torch-Pruning variant",
                        "vitopt - TP (mean)" if fixed else "vitopt - best TP (mean)", "std",
                        *(["95% CI of the mean"] if with_ci else []), "min", "max", "seeds won"], paired))
    each = [[p["target"], p["other"], f"{p['diff']['mean']:+.2f}", f"{p['diff']['std']:.2f}", *ci(p),
             f"{sum(d > 0 for d in p['diff']['values'])}/{sum(d < 0 for d in p['diff']['values'])}"]
            for p in doc.get("paired_each", []) if p["diff"]["n"] > 3]
    if each:
        out.append(_md(["target", "other method", "vitopt - other (mean)", "std",
                        *(["95% CI of the mean"] if with_ci else []), "seeds ahead / behind"], each))
    curves = [s for s in doc["summary"] if s.get("recovery")]
    if curves:
        width = max(c["recovery"]["epochs"][-1] for c in curves) + 1
        out.append(_md(["method", "target", "FLOPs ratio", *(f"epoch {e}" for e in range(width))],
                       [[c["method"], c["target"], pm(c["flops_ratio"], 3) + ("" if c.get("reached_target", True)
                                                                         or c["tool"] != "torch-pruning" else " (missed)"),
                         *_recovery_cells(c["recovery"], width)] for c in curves]))
    return out


def _recovery_cells(rec: dict, width: int) -> list[str]:
    by_epoch = dict(zip(rec["epochs"], rec["top1"]))
    return [f"{by_epoch[e]:.1f}" if e in by_epoch else "" for e in range(width)]


def render_overhead(doc: dict) -> list[str]:
    step = doc["train_step"]
    out = [_md(["training step", "x dense (median, min-max)"], [["VTP gates", _r(step["overhead"], 3)]])]
    c = doc["surgery"]["timing"]["candidates"]
    out.append(_md(["tool", "seconds (median)", "FLOPs ratio"],
                   [[n, _f(v["ms"] / 1e3, 3), _f(doc["surgery"]["achieved"].get(n.split(" (")[0]), 3)]
                    for n, v in c.items()]))
    return out


def render_sparse_overhead(doc: dict) -> list[str]:
    rows = [[v, _f(r["median_ms"], 1), _r(r["ratio"]), _r(r["cpu_ratio"])] for v, r in doc["results"].items()]
    return [_md(["method", "ms per step", "x dense (median, min-max)", "CPU x dense"], rows)]


def render_gpu_latency(doc: dict) -> list[str]:
    rows = [[r["model"], r["runtime"], r["batch"], _f(r["p50_ms"], 3),
             ("" if "ratio" not in r else f"{1 / r['ratio']['median']:.2f}x ({1 / r['ratio']['max']:.2f}-{1 / r['ratio']['min']:.2f})")]
            for r in doc["rows"]]
    return [_md(["model", "runtime", "batch", "p50 ms", "speed-up (median, range)"], rows)]


def render_hierarchical(doc: dict) -> list[str]:
    rows = [[r["model"], r["variant"], _f(r["flops_ratio"], 3), _f(r["top1"], 2), _r(r.get("ratio_b32"))]
            for r in doc["rows"]]
    return [_md(["model", "variant", "FLOPs ratio", "top-1 (%)", "ORT b32 latency / dense"], rows)]


def render_depth_width(doc: dict) -> list[str]:
    rows = [[label, _f(r["flops_ratio"], 3), r["blocks"], _f(r.get("top1_one_shot"), 2), _f(r["top1"], 2), _f(r["ms"], 3),
             _r(r["ratio_to_dense"], 3), "-" if r.get("speed_per_point") is None else _f(r["speed_per_point"], 2)]
            for label, r in doc["result"]["rows"].items()]
    return [_md(["variant", "FLOPs ratio", "blocks", "top-1 one-shot (%)", "top-1 fine-tuned (%)", "ms",
                 "latency / dense (median, min-max)", "speed-up per point lost"], rows)]


def render_acceptance_odds(doc: dict) -> list[str]:
    rows = [[f"{r['target']:g}", r["method"], r["subsets"] - r["undecided"], r["passed"],
             "" if r["rate"] is None else _f(100 * r["rate"], 1)] for r in doc["rows"]]
    return [_md(["target", "method", "3-seed subsets" if doc["rows"] and doc["rows"][0]["k"] == 3 else "subsets",
                 "at or above the best of the others", "rate (%)"], rows)]


#: results "script" -> renderer of its README table(s)
RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "quickstart": render_quickstart, "noise_floor": render_noise_floor, "latency_aware": render_latency_aware,
    "speedup": render_speedup, "accuracy": render_accuracy, "overhead": render_overhead,
    "sparse_overhead": render_sparse_overhead, "hierarchical": render_hierarchical,
    "hierarchical.py": render_hierarchical, "gpu_latency": render_gpu_latency, "depth_width": render_depth_width,
    "acceptance_odds": render_acceptance_odds,
}


def render(path: Path, root: Path = ROOT) -> str:
    """The marker line, the provenance line and the table(s) of one results file."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    script = doc.get("script") or ("gpu_latency" if "pruned_shape" in doc else path.stem)
    renderer = RENDERERS.get(script)
    rel = path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path
    head = f"<!-- numbers: {rel} -->"
    if renderer is None:
        return f"{head}\n(no README table for results of {script!r})"
    tables = "\n\n".join(renderer(doc))
    return f"{head}\n{tables}\n\n`{doc.get('command', '?')}` ({_load(doc)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="results files (default: every benchmarks/results/*.json)")
    ap.add_argument("--check", type=Path, help="check the marked tables of this README instead of printing")
    args = ap.parse_args(argv)
    if args.check is not None:
        problems = check(args.check)
        for p in problems:
            print(p)
        n = len(marked_tables(args.check.read_text(encoding="utf-8")))
        print(f"{n} marked table(s) checked, {len(problems)} problem(s)")
        return 1 if problems else 0
    files = args.files or sorted(RESULTS.glob("*.json"))
    if not files:
        print(f"no results files in {RESULTS}; run the benchmarks first")
        return 1
    for f in files:
        print(render(f))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
