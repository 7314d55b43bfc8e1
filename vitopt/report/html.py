"""``report.html`` + ``report.md``: one self-contained report over one or more run directories.

The report has six sections (:data:`SECTIONS`):

1. kept units per block - a heatmap per prune stage (fraction of dense units kept, cells annotated
   with the counts) and the embedding width before -> after;
2. training curves - loss and val top-1 per epoch over all training stages laid end to end (stage
   boundaries and prunes marked), and the gate statistics of every ``sparse_train``;
3. accuracy vs FLOPs - every run's dense reference and final model, the Pareto front marked;
4. latency by batch size per runtime - p50 with p90 as error bar, dense vs final;
5. tables - the tables of ``summary.md`` (stages, final vs dense, kept units), produced by
   :func:`vitopt.report.summary.render_summary` itself so the numbers are the same;
6. environment - of the machine that rendered the report (and of the run, when the run folder holds
   an ``environment.json``).

:func:`build_report` gathers everything into a :class:`Report` (figures as PNG bytes, tables as
rows, notes); :func:`render_html` and :func:`render_markdown` write it out. The HTML embeds every
image as base64 PNG with inline CSS and makes no external request. A piece a run lacks (no prune, no
validate, no history) is skipped with a one-line note instead of failing the report.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vitopt.errors import VitoptError
from vitopt.io import atomic_write_text
from vitopt.report import plots
from vitopt.report.environment import collect_environment
from vitopt.report.plots import ParetoPoint, RunData
from vitopt.report.summary import render_summary

__all__ = ["SECTIONS", "Figure", "Table", "Text", "Heading", "Section", "Report", "build_report",
           "render_html", "render_markdown", "write_report", "parse_markdown_blocks"]

#: (anchor, heading) of the report's sections, in order.
SECTIONS = (
    ("kept-units", "Kept units per block"),
    ("training", "Training curves"),
    ("accuracy", "Accuracy vs FLOPs"),
    ("latency", "Latency by batch size"),
    ("tables", "Tables"),
    ("environment", "Environment"),
)

HTML_FILE, MARKDOWN_FILE = "report.html", "report.md"

#: what a piece of malformed metrics raises while it is read; such a piece becomes a note.
_DATA_ERRORS = (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError)


# =========================================================================================== content
@dataclass
class Figure:
    """One embedded image: ``key`` (``"run:kind:stage"``), title, PNG bytes, caption."""

    key: str
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Table:
    """One table: ``key`` (``"run:section-slug"``), header, rows of cell strings, per-column alignment
    (``"left"``/``"right"``) and, when it came from Markdown, that Markdown verbatim."""

    key: str
    header: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)
    markdown: str | None = None


@dataclass
class Text:
    """A paragraph (Markdown inline code allowed); ``note`` marks a skipped piece."""

    text: str
    note: bool = False


@dataclass
class Heading:
    """A heading inside a section (level 3 = a run, 4 and 5 below it)."""

    text: str
    level: int = 3


Block = Figure | Table | Text | Heading


@dataclass
class Section:
    """One of :data:`SECTIONS` with its content blocks in display order."""

    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    """Everything the report shows, before it is written as HTML or Markdown.

    Attributes:
        runs: the runs, read.
        sections: one :class:`Section` per entry of :data:`SECTIONS`.
        points: the accuracy-vs-FLOPs points (see :func:`vitopt.report.plots.pareto_points`).
        environment: :func:`~vitopt.report.environment.collect_environment` at build time.
        created: UTC time of the build (ISO 8601).
    """

    runs: list[RunData]
    sections: list[Section]
    points: list[ParetoPoint]
    environment: dict[str, Any]
    created: str

    def section(self, key: str) -> Section:
        """The section with anchor ``key`` (see :data:`SECTIONS`). Raises KeyError for an unknown key."""
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(key)

    def figures(self) -> list[Figure]:
        """Every figure, in display order."""
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]

    def tables(self) -> dict[str, Table]:
        """Every table by key, in display order."""
        return {b.key: b for s in self.sections for b in s.blocks if isinstance(b, Table)}

    def notes(self) -> list[str]:
        """The text of every note (skipped pieces), in display order."""
        return [b.text for s in self.sections for b in s.blocks if isinstance(b, Text) and b.note]


# ------------------------------------------------------------------------------- markdown -> blocks
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_markdown_blocks(text: str, key_prefix: str, heading_offset: int = 2) -> list[Block]:
    """Blocks from the Markdown subset that ``summary.md`` uses (headings, pipe tables, paragraphs).

    Args:
        text: Markdown text, e.g. :func:`~vitopt.report.summary.render_summary`'s output.
        key_prefix: prefix of table keys; a table's key is ``prefix:<slug of the last level-2
            heading>``, with ``-2``, ``-3``... for further tables under the same heading.
        heading_offset: added to every heading level (``##`` becomes level 4 with the default).

    Returns:
        :class:`Heading`, :class:`Table` (with ``markdown`` set to the table's lines) and
        :class:`Text` blocks; a level-1 heading is dropped (the report names the run itself).
    """
    blocks: list[Block] = []
    lines = text.splitlines()
    section, count, i = "", {}, 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
            continue
        m = re.match(r"(#+)\s+(.*)", line)
        if m:
            level = len(m.group(1))
            if level == 2:
                section = _slug(m.group(2))
            if level > 1:
                blocks.append(Heading(m.group(2), level + heading_offset))
            i += 1
            continue
        if line.startswith("|"):
            tbl = []
            while i < len(lines) and lines[i].startswith("|"):
                tbl.append(lines[i].rstrip())
                i += 1
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in tbl]
            has_rule = len(cells) > 1 and all(re.fullmatch(r":?-+:?", c) for c in cells[1])
            align = ["right" if c.endswith(":") else "left" for c in cells[1]] if has_rule else []
            n = count[section] = count.get(section, 0) + 1
            key = f"{key_prefix}:{section or 'table'}" + (f"-{n}" if n > 1 else "")
            blocks.append(Table(key, cells[0], cells[2 if has_rule else 1:], align, "\n".join(tbl)))
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|")):
            para.append(lines[i].strip())
            i += 1
        blocks.append(Text(" ".join(para)))
    return blocks


# ------------------------------------------------------------------------------------ the sections
def _attempt(blocks: list[Block], what: str, fn) -> None:
    """Run ``fn()``; malformed metrics become a note in ``blocks`` instead of an exception."""
    try:
        fn()
    except _DATA_ERRORS as exc:
        blocks.append(Text(f"{what} skipped: its metrics are incomplete ({type(exc).__name__}: {exc}).", note=True))


def _kept_units_section(runs: list[RunData]) -> Section:
    sec = Section(*SECTIONS[0])
    for run in runs:
        sec.blocks.append(Heading(f"run {run.label}"))
        prunes = run.of_type("prune")
        if not prunes:
            sec.blocks.append(Text(f"Run `{run.label}` has no finished prune stage: no kept-units heatmap.", note=True))
        for rec in prunes:
            def add(rec=rec, run=run):
                data = plots.kept_units(rec)
                cap = ("Cells: kept / dense units of that block (percent kept); color: percent kept. "
                       "Last row: all blocks together.")
                if data.embed:
                    cap += f" Embedding width {data.embed[0]} -> {data.embed[1]}."
                sec.blocks.append(Figure(f"{run.label}:kept-units:{rec['stage']}",
                                         f"{run.label} {rec['stage']}: kept units per block",
                                         plots.draw_kept_units(data), cap))
            _attempt(sec.blocks, f"Kept-units heatmap of run `{run.label}` {rec['stage']}", add)
    return sec


def _training_section(runs: list[RunData]) -> Section:
    sec = Section(*SECTIONS[1])
    for run in runs:
        sec.blocks.append(Heading(f"run {run.label}"))

        def curves(run=run):
            data = plots.training_curves(run)
            if data is None:
                sec.blocks.append(Text(f"Run `{run.label}` has no training stage with a per-epoch history: "
                                       "no training curves.", note=True))
                return
            stages = " -> ".join(s["stage"] for s in data.segments)
            sec.blocks.append(Figure(f"{run.label}:training", f"{run.label}: training curves",
                                     plots.draw_training_curves(data, f"run {run.label}: training stages {stages}"),
                                     "Dotted lines: stage boundaries; red dashed line: a prune (triangle: val "
                                     "top-1 right after pruning, before fine-tuning). The train loss is what the "
                                     "stage optimizes: sparse_train adds the L1 gate penalty, finetune with KD "
                                     "mixes in the distillation loss, so it is not comparable across stages; "
                                     "the val loss is plain cross-entropy."))
        _attempt(sec.blocks, f"Training curves of run `{run.label}`", curves)
        for rec in run.of_type("sparse_train"):
            def gates(rec=rec, run=run):
                data = plots.gate_stats(rec)
                if data is None:
                    sec.blocks.append(Text(f"Run `{run.label}` {rec['stage']} logged no gate statistics.", note=True))
                    return
                sec.blocks.append(Figure(f"{run.label}:gates:{rec['stage']}", f"{run.label} {rec['stage']}: gates",
                                         plots.draw_gate_stats(data, f"run {run.label} {rec['stage']}: VTP gates"),
                                         "'all' is every gate together; the others are per unit kind."))
            _attempt(sec.blocks, f"Gate statistics of run `{run.label}` {rec['stage']}", gates)
    return sec


def _accuracy_section(runs: list[RunData], points: list[ParetoPoint]) -> Section:
    sec = Section(*SECTIONS[2])
    for run in runs:
        mine = [p for p in points if p.run == run.label]
        if not mine:
            sec.blocks.append(Text(f"Run `{run.label}` has no model with both top-1 and FLOPs recorded: "
                                   "it is not on the plot.", note=True))
        elif not plots.measurements(run):
            sec.blocks.append(Text(f"Run `{run.label}` has no validate stage: its points use the val top-1 "
                                   f"of the stage metrics ({', '.join(p.source for p in mine)}).", note=True))
        if len(mine) == 1:
            sec.blocks.append(Text(f"Run `{run.label}` was not pruned (or not measured after pruning): "
                                   "one point only.", note=True))
    if points:
        n_front = sum(p.on_front for p in points)
        sec.blocks.append(Figure("accuracy-vs-flops", "Accuracy vs FLOPs", plots.draw_accuracy_vs_flops(points),
                                 f"{len(points)} points from {len(runs)} run(s); {n_front} on the Pareto front "
                                 "(no other point has fewer or equal FLOPs and higher or equal top-1)."))
        rows = [[p.run, p.model, f"{p.flops / 1e6:.2f}", f"{p.top1:.2f}", p.source, "yes" if p.on_front else ""]
                for p in points]
        sec.blocks.append(Table("accuracy-vs-flops", ["run", "model", "MFLOPs", "top-1 (%)", "from", "Pareto front"],
                                rows, ["left", "left", "right", "right", "left", "left"]))
    return sec


def _latency_section(runs: list[RunData]) -> Section:
    sec = Section(*SECTIONS[3])
    for run in runs:
        sec.blocks.append(Heading(f"run {run.label}"))

        def add(run=run):
            by_source: dict[str, list[plots.ModelMeasurement]] = {}
            for m in plots.measurements(run):
                if m.latency:
                    by_source.setdefault(m.source, []).append(m)
            if not by_source:
                sec.blocks.append(Text(f"Run `{run.label}` has no latency measurement (no validate stage): "
                                       "no latency plot.", note=True))
            for source, ms in by_source.items():
                device = next((m.device for m in ms if m.device), None)
                models = " vs ".join(m.model for m in ms)
                title = f"run {run.label}: latency by batch size, {models} ({source}" + (f", {device})" if device else ")")
                cap = ("Points: median (p50) latency of one batch; error bars reach the p90; labels: speed-up of "
                       "the final model over the dense one (dense p50 / final p50).")
                if not any(m.model == "dense" for m in ms):
                    cap += " No dense reference was measured (no prune before this validate)."
                sec.blocks.append(Figure(f"{run.label}:latency:{source}", title, plots.draw_latency(ms, title), cap))
        _attempt(sec.blocks, f"Latency plot of run `{run.label}`", add)
    return sec


def _tables_section(runs: list[RunData]) -> Section:
    sec = Section(*SECTIONS[4])
    for run in runs:
        sec.blocks.append(Heading(f"run {run.label}"))
        try:
            blocks = parse_markdown_blocks(render_summary(run.path), run.label)
        except _DATA_ERRORS as exc:
            sec.blocks.append(Text(f"The summary tables of run `{run.label}` are skipped: its metrics are "
                                   f"incomplete ({type(exc).__name__}: {exc}).", note=True))
            continue
        sec.blocks += blocks
        if not run.of_type("validate"):
            sec.blocks.append(Text(f"Run `{run.label}` has no validate stage: no final-vs-dense table.", note=True))
    return sec


def _env_table(key: str, env: dict[str, Any]) -> Table:
    return Table(key, ["item", "value"], [[str(k), "" if v is None else str(v)] for k, v in env.items()],
                 ["left", "left"])


def _environment_section(runs: list[RunData], env: dict[str, Any]) -> Section:
    sec = Section(*SECTIONS[5])
    sec.blocks.append(Text("Where this report was rendered. The measurements above were taken where each run ran; "
                           "a run that recorded its own environment.json is listed below it."))
    sec.blocks.append(_env_table("environment", env))
    for run in runs:
        if run.environment:
            sec.blocks.append(Heading(f"run {run.label} (recorded with the run)"))
            sec.blocks.append(_env_table(f"{run.label}:environment", run.environment))
    return sec


def build_report(run_dirs: list[Path] | list[str] | list[RunData]) -> Report:
    """Read the runs and make every figure, table and note of the report (nothing is written).

    Args:
        run_dirs: run directories written by ``vitopt run`` (or :class:`RunData` already read).

    Returns:
        A :class:`Report`.

    Raises:
        VitoptError: no run given, a run directory does not exist or is not one, or a metrics.json
            is not valid JSON.
    """
    runs = list(run_dirs) if run_dirs and all(isinstance(r, RunData) for r in run_dirs) \
        else plots.load_runs(run_dirs)  # type: ignore[arg-type]
    points = plots.pareto_points(runs)
    env = collect_environment()
    sections = [_kept_units_section(runs), _training_section(runs), _accuracy_section(runs, points),
                _latency_section(runs), _tables_section(runs), _environment_section(runs, env)]
    return Report(runs=runs, sections=sections, points=points, environment=env,
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


# ============================================================================================= HTML
_CSS = """
:root { --fg:#1d232b; --muted:#5b6573; --line:#dde2e8; --bg:#ffffff; --soft:#f4f6f9; --accent:#1f5fa8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--soft); color:var(--fg);
       font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1380px; margin:0 auto; padding:24px 28px 60px; background:var(--bg); min-height:100vh; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:21px; margin:40px 0 12px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h3 { font-size:17px; margin:26px 0 8px; color:var(--accent); }
h4 { font-size:15px; margin:18px 0 6px; }
h5 { font-size:14px; margin:14px 0 6px; font-weight:600; color:var(--muted); }
p { margin:6px 0 10px; }
.meta { color:var(--muted); margin:0 0 14px; }
nav { background:var(--soft); border:1px solid var(--line); border-radius:6px; padding:8px 14px; margin:14px 0; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; white-space:nowrap; }
nav a:hover { text-decoration:underline; }
code { font:13px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background:var(--soft);
       padding:1px 4px; border-radius:3px; }
.note { color:#7a4b00; background:#fff7e6; border-left:4px solid #f0a020; padding:6px 10px; border-radius:3px; }
figure { margin:10px 0 22px; }
figure img { display:block; max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
.tablewrap { overflow-x:auto; margin:6px 0 16px; }
table { border-collapse:collapse; font-size:13.5px; }
th, td { border:1px solid var(--line); padding:4px 10px; }
th { background:var(--soft); text-align:left; font-weight:600; }
td.r, th.r { text-align:right; font-variant-numeric:tabular-nums; }
tbody tr:nth-child(even) td { background:#fafbfc; }
"""


def _inline(text: str) -> str:
    """HTML-escape ``text`` and turn Markdown `code` spans into <code>."""
    parts = re.split(r"`([^`]*)`", text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


_NUMERIC = re.compile(r"[-+]?[\d.]+(e[-+]?\d+)?\s*(%|x|ms)?(\s*->\s*[-+]?[\d.]+(e[-+]?\d+)?)?", re.I)


def _html_table(t: Table) -> str:
    """A <table>; a column marked right-aligned is right-aligned where its cells are numbers."""
    align = t.align or ["left"] * len(t.header)
    numeric = [j < len(align) and align[j] == "right"
               and any(j < len(r) and _NUMERIC.fullmatch(r[j]) for r in t.rows)
               and all(j >= len(r) or not r[j] or _NUMERIC.fullmatch(r[j]) for r in t.rows)
               for j in range(len(t.header))]
    cls = lambda j: ' class="r"' if j < len(numeric) and numeric[j] else ""  # noqa: E731
    head = "".join(f"<th{cls(j)}>{_inline(h)}</th>" for j, h in enumerate(t.header))
    body = "\n".join("<tr>" + "".join(f"<td{cls(j)}>{_inline(c)}</td>" for j, c in enumerate(r)) + "</tr>"
                     for r in t.rows)
    return (f'<div class="tablewrap"><table data-key="{html.escape(t.key)}">\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{body}\n</tbody></table></div>")


def _html_block(b: Block) -> str:
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        cap = f"<figcaption>{_inline(b.caption)}</figcaption>" if b.caption else ""
        return (f'<figure data-key="{html.escape(b.key)}"><img src="data:image/png;base64,{data}" '
                f'alt="{html.escape(b.title)}">{cap}</figure>')
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Heading):
        level = min(max(b.level, 3), 6)
        return f"<h{level}>{_inline(b.text)}</h{level}>"
    return f'<p class="note">{_inline(b.text)}</p>' if b.note else f"<p>{_inline(b.text)}</p>"


def _runs_table(report: Report) -> Table:
    rows = []
    for r in report.runs:
        model = (r.recipe.get("model") or {}).get("name", "") if isinstance(r.recipe.get("model"), dict) else ""
        data = (r.recipe.get("data") or {}).get("type", "") if isinstance(r.recipe.get("data"), dict) else ""
        stages = ", ".join(rec["stage"] for rec in r.records) or "none finished"
        rows.append([r.label, f"`{r.path}`", model, data, stages])
    return Table("runs", ["run", "folder", "model", "data", "finished stages"], rows)


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS, base64 PNG images, no external request)."""
    names = ", ".join(r.label for r in report.runs)
    nav = "".join(f'<a href="#{k}">{i}. {html.escape(t)}</a>' for i, (k, t) in enumerate(SECTIONS, 1))
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>vitopt report: {html.escape(names)}</title>", f"<style>{_CSS}</style></head><body><main>",
           f"<h1>vitopt report: {html.escape(names)}</h1>",
           f'<p class="meta">Generated {html.escape(report.created)} by vitopt '
           f'{html.escape(str(report.environment.get("vitopt", "")))}. FLOPs are 2 x MACs of one image.</p>',
           _html_table(_runs_table(report)), f"<nav>{nav}</nav>"]
    for i, sec in enumerate(report.sections, 1):
        out.append(f'<section id="{sec.key}"><h2>{i}. {html.escape(sec.title)}</h2>')
        out += [_html_block(b) for b in sec.blocks]
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# ========================================================================================= Markdown
def _md_table(t: Table) -> str:
    if t.markdown:
        return t.markdown
    rule = "|" + "|".join("---:" if a == "right" else "---" for a in (t.align or ["left"] * len(t.header))) + "|"
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return "\n".join(["| " + " | ".join(esc(h) for h in t.header) + " |", rule]
                     + ["| " + " | ".join(esc(c) for c in r) + " |" for r in t.rows])


def render_markdown(report: Report, html_name: str = HTML_FILE) -> str:
    """The report's text (tables and notes, no images) as Markdown; figures are in ``html_name``."""
    names = ", ".join(r.label for r in report.runs)
    out = [f"# vitopt report: {names}", "",
           f"Generated {report.created}. Figures: [{html_name}]({html_name}) in this folder. "
           "FLOPs are 2 x MACs of one image.", "", _md_table(_runs_table(report))]
    for i, sec in enumerate(report.sections, 1):
        body = []
        for b in sec.blocks:
            if isinstance(b, Figure):
                body += ["", f"Figure (in {html_name}): {b.title}."]
                continue
            if isinstance(b, Table):
                body += ["", _md_table(b)]
            elif isinstance(b, Heading):
                body += ["", "#" * min(b.level, 6) + " " + b.text]
            else:
                body += ["", f"> note: {b.text}" if b.note else b.text]
        out += ["", f"## {i}. {sec.title}"] + body
    return "\n".join(out).rstrip() + "\n"


def write_report(run_dirs: list[Path], out: Path | None = None) -> dict[str, Path]:
    """Write the HTML report and its Markdown companion for one or more run directories.

    Args:
        run_dirs: run directories written by ``vitopt run`` (str or Path); the first one is the
            default destination.
        out: where to write: a ``.html`` path (the Markdown goes next to it with ``.md``), or a
            folder (``report.html`` and ``report.md`` inside it). Default: the first run directory.

    Returns:
        ``{"html": path of report.html, "markdown": path of report.md}``. Both files are written
        atomically; nothing else in the run directories changes.

    Raises:
        VitoptError: no run directory given, one does not exist or is not a run directory, a
            metrics.json is not valid JSON, or ``out`` is an existing file that is not ``.html``.
    """
    report = build_report([Path(p) for p in run_dirs])
    if out is None:
        html_path = report.runs[0].path / HTML_FILE
    else:
        out = Path(out)
        if out.suffix.lower() in (".html", ".htm"):
            html_path = out
        elif out.exists() and not out.is_dir():
            raise VitoptError(f"report destination {out} is an existing file that is not .html; "
                              "pass a folder or a path ending in .html.")
        else:
            html_path = out / HTML_FILE
    md_path = html_path.with_suffix(".md")
    for path, text in ((html_path, render_html(report)), (md_path, render_markdown(report, html_path.name))):
        atomic_write_text(path, text)
        try:
            os.chmod(path, 0o644)       # a report is for sharing; the atomic temp file was created 0600
        except OSError:
            pass
    return {"html": html_path, "markdown": md_path}
