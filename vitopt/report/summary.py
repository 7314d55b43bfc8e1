"""``summary.md``: the run's results as Markdown tables, rebuilt from the stage metrics files.

Tables: the stages (val top-1, FLOPs, params, wall time); dense vs final model (params, FLOPs,
top-1 in PyTorch and ONNX Runtime, ORT-vs-PyTorch parity, latency p50/p90 per batch size and
runtime, speed-up); and the per-block kept heads / head_dim / mlp of every prune.
FLOPs are 2 x MACs of matmuls and convolutions for one image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitopt.io import atomic_write_text, read_json

__all__ = ["write_summary", "load_stage_records", "render_summary", "summary_tables", "stage_line"]

SUMMARY_FILE = "summary.md"


def load_stage_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished stage's metrics.json in ``run_dir``, in stage order."""
    run_dir = Path(run_dir)
    return [read_json(p, "stage metrics file") for p in sorted(run_dir.glob("[0-9][0-9]_*/metrics.json"))]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _mflops(v: float | None) -> str:
    return "" if v is None else f"{v / 1e6:.2f}"


def _stages_rows(records: list[dict]) -> tuple[list[str], list[list[Any]]]:
    rows = []
    for r in records:
        m = r["metrics"]
        top1 = m.get("val_top1", m.get("val_top1_before_finetune"))
        rows.append([r["stage"], r["type"], "" if top1 is None else f"{top1:.2f}", _mflops(m.get("flops")),
                     "" if m.get("params") is None else f"{m['params'] / 1e6:.4f}", f"{r.get('seconds', 0):.1f}"])
    return ["stage", "type", "val top-1 (%)", "MFLOPs", "params (M)", "seconds"], rows


def _compare_rows(val: dict) -> tuple[list[str], list[list[Any]]]:
    final, ref = val["final"], val.get("reference")
    cols = [("final (pruned)", final)] + ([("dense reference", ref)] if ref else [])
    header = ["metric"] + [c for c, _ in cols] + (["ratio (final / dense)"] if ref else [])

    def row(name, get, fmt, ratio=True):
        vals = [get(m) for _, m in cols]
        out = [name] + [fmt(v) if v is not None else "" for v in vals]
        if ref:
            out.append(f"{vals[0] / vals[1]:.3f}" if ratio and None not in vals and vals[1] else "")
        return out

    rows = [row("params (M)", lambda m: m["params"] / 1e6, "{:.4f}".format),
            row("FLOPs (M, 2 x MACs)", lambda m: m["flops"] / 1e6, "{:.2f}".format)]
    for kind in final["runtimes"]:
        rows.append(row(f"top-1 {kind} (%)", lambda m, k=kind: m["runtimes"].get(k, {}).get("top1"), "{:.2f}".format, False))
    if "parity" in final:
        rows.append(row("max abs logit diff ORT vs PyTorch", lambda m: m.get("parity", {}).get("max_abs_diff"), "{:.2e}".format, False))
        rows.append(row("argmax agreement ORT vs PyTorch", lambda m: m.get("parity", {}).get("argmax_agreement"), "{:.4f}".format, False))
    for kind, rt in final["runtimes"].items():
        for bs in rt["latency"]:
            for q in ("p50_ms", "p90_ms"):
                rows.append(row(f"{kind} latency batch {bs} {q[:3]} (ms)",
                                lambda m, k=kind, b=bs, qq=q: m["runtimes"].get(k, {}).get("latency", {}).get(b, {}).get(qq),
                                "{:.3f}".format))
    return header, rows


def _stages_table(records: list[dict]) -> str:
    return _table(*_stages_rows(records))


def _compare_table(val: dict, dense_top1: float | None) -> str:
    text = _table(*_compare_rows(val))
    final = val["final"]
    for kind, rt in final["runtimes"].items():
        plan = rt.get("batches") or {}
        if plan.get("capped"):
            lo, _, hi = plan["profile"]
            text += (f"\n\n{kind}: its optimization profile takes batches {lo}..{hi}, so latency was measured at "
                     f"{', '.join(map(str, plan['latency']))} (asked: {', '.join(map(str, plan['requested']))}) and "
                     f"top-1 in batches of {plan['eval_batch']}.")
        h2d = {b: v["h2d_p50_ms"] for b, v in rt["latency"].items() if "h2d_p50_ms" in v}
        if h2d:
            text += (f"\n\n{kind} latency is the engine alone (CUDA events on its stream); the host-to-device copy "
                     "p50 is " + ", ".join(f"{v:.3f} ms at batch {b}" for b, v in h2d.items()) + ".")
    if dense_top1 is not None:
        text += f"\n\nDense model trained in this run: val top-1 {dense_top1:.2f}%."
    return text


def summary_tables(run_dir: str | Path) -> list[tuple[str, list[str], list[list[Any]]]]:
    """``(title, header, rows)`` of the stages table and, when a validate stage finished, the final-vs-dense
    table of ``summary.md`` (the console prints them at the end of every run)."""
    records = load_stage_records(run_dir)
    out = [("Stages", *_stages_rows(records))]
    validate = [r for r in records if r["type"] == "validate"]
    if validate:
        v = validate[-1]["metrics"]
        out.append((f"Final vs dense ({validate[-1]['stage']}: {v['num_images']} validation images, "
                    f"latency with {v['threads']} CPU threads)", *_compare_rows(v)))
    return out


def stage_line(record: dict[str, Any]) -> str:
    """One line on what a finished stage recorded (printed by the pipeline when the stage ends)."""
    m, typ, head = record.get("metrics", {}), record.get("type"), f"{record.get('stage')}: done in {record.get('seconds', 0):.1f} s"
    parts = []
    if m.get("val_top1") is not None:
        parts.append(f"val top-1 {m['val_top1']:.2f}%")
    if typ == "prune":
        parts.append(f"FLOPs ratio {m['flops_ratio']:.3f}, params ratio {m['params_ratio']:.3f}, val top-1 before "
                     f"finetune {m['val_top1_before_finetune']:.2f}%")
    elif m.get("flops") is not None:
        parts.append(f"{m['flops'] / 1e6:.2f} MFLOPs, {m['params'] / 1e6:.4f} M params")
    if typ == "export":
        diff = m.get("max_abs_diff")
        parts.append(f"wrote {record.get('outputs', {}).get('onnx')} (opset {m.get('opset')}, {m.get('num_nodes')} "
                     f"nodes" + (f", max abs logit diff vs PyTorch {diff:.1e})" if diff is not None else ")"))
    if typ == "validate":
        for model in ("final", "reference"):
            for kind, rt in (m.get(model) or {}).get("runtimes", {}).items():
                lat = ", ".join(f"p50 {s['p50_ms']:.3f} ms @ batch {b}" for b, s in rt.get("latency", {}).items())
                parts.append(f"{'dense' if model == 'reference' else 'final'} {kind} top-1 {rt.get('top1', 0):.2f}%"
                             + (f", {lat}" if lat else ""))
    if m.get("skipped_images"):
        parts.append(f"{m['skipped_images']} unreadable images skipped")
    return head + (": " + "; ".join(parts) if parts else "")


def _blocks_table(record: dict) -> str:
    m = record["metrics"]
    rows = [[b["block"]] + [f"{b[k]} -> {b[k + '_kept']}" for k in ("heads", "head_dim", "mlp")] for b in m["blocks"]]
    target = m["target"]
    target = ", ".join(f"{k} {v}" for k, v in target.items() if v is not None) if isinstance(target, dict) else f"{target:g}"
    head = (f"### {record['stage']}: criterion `{m['criterion']}`, scope `{m['scope']}`, "
            f"schedule `{m.get('schedule', 'one_shot')}`, target {m['target_metric']} {target} "
            f"-> achieved FLOPs ratio {m['flops_ratio']:.3f}, params ratio {m['params_ratio']:.3f}; "
            f"embed_dim {m['embed']['before']} -> {m['embed']['after']}\n\n")
    return head + _table(["block", "heads", "head_dim", "mlp hidden"], rows)


def render_summary(run_dir: str | Path) -> str:
    """The Markdown text of ``summary.md`` for ``run_dir``."""
    run_dir = Path(run_dir)
    records = load_stage_records(run_dir)
    parts = [f"# vitopt run `{run_dir.name}`", "", "## Stages", "", _stages_table(records)]
    dense_top1 = next((r["metrics"]["val_top1"] for r in records if r["type"] == "train"), None)
    validate = [r for r in records if r["type"] == "validate"]
    if validate:
        v = validate[-1]["metrics"]
        parts += ["", "## Final vs dense", "",
                  f"Validation on {v['num_images']} images; latency with {v['threads']} CPU threads.", "",
                  _compare_table(v, dense_top1)]
    prunes = [r for r in records if r["type"] == "prune"]
    if prunes:
        parts += ["", "## Kept units per block", ""]
        for r in prunes:
            parts += [_blocks_table(r), ""]
    return "\n".join(parts).rstrip() + "\n"


def write_summary(run_dir: str | Path) -> Path:
    """Write ``summary.md`` into ``run_dir`` (atomically); returns its path."""
    return atomic_write_text(Path(run_dir) / SUMMARY_FILE, render_summary(run_dir))
