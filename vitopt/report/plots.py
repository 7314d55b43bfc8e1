"""The report's figures: what each one shows (plain data, testable) and how it is drawn (matplotlib).

Data (no matplotlib):

- :func:`load_run` / :func:`load_runs` read a run directory's stage metrics into a :class:`RunData`;
- :func:`measurements` collects per-model measurements (top-1, FLOPs, latency per runtime and batch
  size) from every registered source in :data:`MEASUREMENT_SOURCES` - today the ``validate`` stage;
  another source (a Jetson ``results.json``, a TensorRT build) is one more function appended there;
- :func:`kept_units`, :func:`training_curves`, :func:`gate_stats` and :func:`pareto_points` turn
  records into what the figures plot.

Drawing (``draw_*``) returns PNG bytes. It uses matplotlib's object API with the Agg canvas
(``Figure`` + ``FigureCanvasAgg``), so it never touches pyplot's global state or the process's
backend; matplotlib is imported only when a figure is drawn.

FLOPs are 2 x MACs of matmuls and convolutions for one image (as everywhere in vitopt).
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitopt.errors import VitoptError
from vitopt.report.summary import load_stage_records

__all__ = [
    "RunData", "load_run", "load_runs", "ModelMeasurement", "MEASUREMENT_SOURCES", "measurements",
    "KeptUnits", "kept_units", "TrainingCurves", "training_curves", "GateStats", "gate_stats",
    "ParetoPoint", "pareto_points", "TRAINING_TYPES",
    "draw_kept_units", "draw_training_curves", "draw_gate_stats", "draw_accuracy_vs_flops", "draw_latency",
    "latency_figure",
]

#: stage types that train and record a per-epoch ``history``.
TRAINING_TYPES = ("train", "sparse_train", "finetune")
#: unit kinds of a prune's ``blocks`` rows, in display order (unknown kinds follow).
KIND_ORDER = ("heads", "head_dim", "mlp")
KIND_LABELS = {"heads": "heads", "head_dim": "head_dim", "mlp": "mlp hidden"}

DPI = 110


# =============================================================================================== data
@dataclass
class RunData:
    """One run directory, read.

    Attributes:
        path: the run directory.
        label: the name the report shows (the folder name; parent/name when two runs share one).
        records: every finished stage's metrics.json record, in stage order.
        recipe: the parsed ``recipe.yaml`` (empty when missing or unreadable).
        environment: ``environment.json`` of the run when present (where it was measured), else None.
    """

    path: Path
    label: str
    records: list[dict[str, Any]]
    recipe: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] | None = None

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        """The records whose ``type`` is one of ``types``, in stage order."""
        return [r for r in self.records if r.get("type") in types]


def load_run(run_dir: str | Path, label: str | None = None) -> RunData:
    """Read a run directory written by ``vitopt run``.

    Args:
        run_dir: the folder holding ``recipe.yaml`` and ``NN_<stage>/metrics.json``.
        label: display name (default: the folder name).

    Returns:
        A :class:`RunData`; a run with no finished stage yet has ``records == []``.

    Raises:
        VitoptError: the folder does not exist, is not a folder, holds neither ``recipe.yaml`` nor any
            stage metrics, or a metrics.json is not valid JSON.
    """
    path = Path(run_dir)
    if not path.exists():
        raise VitoptError(f"run directory {path} does not exist; pass a folder written by `vitopt run` "
                          "(it holds recipe.yaml and NN_<stage>/metrics.json).")
    if not path.is_dir():
        raise VitoptError(f"run directory {path} is not a folder; pass a folder written by `vitopt run`.")
    records = load_stage_records(path)
    if not records and not (path / "recipe.yaml").is_file():
        raise VitoptError(f"{path} is not a vitopt run directory: it holds neither recipe.yaml nor any "
                          "NN_<stage>/metrics.json.")
    recipe: dict[str, Any] = {}
    try:
        import yaml

        recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except Exception:  # the report must not depend on the recipe being readable
        recipe = {}
    env = None
    env_file = path / "environment.json"
    if env_file.is_file():
        try:
            env = json.loads(env_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            env = None
    return RunData(path=path, label=label or path.name, records=records,
                   recipe=recipe if isinstance(recipe, dict) else {}, environment=env)


def load_runs(run_dirs: Iterable[str | Path]) -> list[RunData]:
    """:func:`load_run` for each folder, with unique labels (``parent/name`` when names repeat).

    Raises:
        VitoptError: as :func:`load_run`, or when ``run_dirs`` is empty.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise VitoptError("no run directory given; pass at least one folder written by `vitopt run`.")
    names = [p.name for p in paths]
    labels = []
    for i, p in enumerate(paths):
        label = p.name if names.count(p.name) == 1 else f"{p.parent.name}/{p.name}"
        while label in labels:
            label = f"{label}#{i}"
        labels.append(label)
    return [load_run(p, lab) for p, lab in zip(paths, labels)]


def _as_runs(runs: Sequence[RunData | str | Path]) -> list[RunData]:
    if all(isinstance(r, RunData) for r in runs):
        return list(runs)  # type: ignore[arg-type]
    loaded = load_runs([r for r in runs if not isinstance(r, RunData)])
    it = iter(loaded)
    return [r if isinstance(r, RunData) else next(it) for r in runs]


# ------------------------------------------------------------------------------------ measurements
@dataclass
class ModelMeasurement:
    """What one source measured for one model of a run.

    Attributes:
        run: the run's label.
        source: where it comes from, e.g. ``"05_validate"`` (later: ``"jetson results.json"``).
        model: ``"dense"`` (the dense reference) or ``"final"`` (the pruned model).
        flops, params: cost of one image (None when the source does not say).
        top1: runtime -> top-1 (%).
        latency: runtime -> batch size -> stats with at least ``p50_ms`` and ``p90_ms``.
        device: where it was measured, in words (e.g. ``"CPU, 2 threads"``).
    """

    run: str
    source: str
    model: str
    flops: float | None = None
    params: float | None = None
    top1: dict[str, float] = field(default_factory=dict)
    latency: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    device: str | None = None


def _validate_source(run: RunData) -> list[ModelMeasurement]:
    """The last ``validate`` stage of the run: its ``final`` and (when present) ``reference`` models."""
    recs = run.of_type("validate")
    if not recs:
        return []
    rec = recs[-1]
    m = rec["metrics"]
    device = f"CPU, {m['threads']} threads" if m.get("threads") else None
    env = run.environment or {}
    if device and env.get("cpu") and m.get("device", "cpu") == "cpu":   # the machine that measured (environment.json)
        device = f"{env['cpu']} ({env.get('cpu_cores_usable', '?')} cores), {m['threads']} threads"
    out = []
    for model, key in (("dense", "reference"), ("final", "final")):
        d = m.get(key)
        if not d:
            continue
        rts = d.get("runtimes", {})
        out.append(ModelMeasurement(
            run=run.label, source=rec["stage"], model=model, flops=d.get("flops"), params=d.get("params"),
            top1={k: v["top1"] for k, v in rts.items() if v.get("top1") is not None},
            latency={k: {int(b): s for b, s in v.get("latency", {}).items()} for k, v in rts.items()},
            device=device))
    return out


#: functions ``RunData -> list[ModelMeasurement]``; append one to add a source of measurements.
MEASUREMENT_SOURCES: list[Callable[[RunData], list[ModelMeasurement]]] = [_validate_source]


def measurements(run: RunData) -> list[ModelMeasurement]:
    """Every measurement of ``run`` from every source in :data:`MEASUREMENT_SOURCES`, in source order."""
    out: list[ModelMeasurement] = []
    for source in MEASUREMENT_SOURCES:
        out += source(run)
    return out


# -------------------------------------------------------------------------------------- kept units
@dataclass
class KeptUnits:
    """Kept units per block of one prune stage.

    Attributes:
        stage: the prune stage label.
        kinds: unit kinds (columns), e.g. ``["heads", "head_dim", "mlp"]``.
        blocks: block indices (rows).
        kept, total: ``kept[i][j]`` / ``total[i][j]`` units of kind j in block i.
        embed: ``(before, after)`` embedding width.
        title: what the prune was asked for (criterion, scope, target).
        ratios: achieved ``flops_ratio`` and ``params_ratio``.
    """

    stage: str
    kinds: list[str]
    blocks: list[int]
    kept: list[list[int]]
    total: list[list[int]]
    embed: tuple[int, int] | None
    title: str
    ratios: dict[str, float]

    def fraction(self) -> list[list[float]]:
        """kept / total per cell (1.0 where total is 0)."""
        return [[k / t if t else 1.0 for k, t in zip(kr, tr)] for kr, tr in zip(self.kept, self.total)]


def kept_units(record: dict[str, Any]) -> KeptUnits:
    """The per-block kept units of a ``prune`` record (its ``metrics.blocks`` rows).

    Raises:
        KeyError: the record has no ``blocks`` (not a prune record).
    """
    m = record["metrics"]
    rows = m["blocks"]
    present = {k[: -len("_kept")] for r in rows for k in r if k.endswith("_kept")}
    kinds = [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))
    target = m.get("target")
    if isinstance(target, dict):
        target = ", ".join(f"{k} {v}" for k, v in target.items() if v is not None)
    elif isinstance(target, float):
        target = f"{target:g}"
    title = f"{record['stage']}: criterion {m.get('criterion', '?')}, {m.get('scope', '?')} scope"
    if target is not None:
        title += f", target {m.get('target_metric', '')} {target}".replace("  ", " ")
    embed = m.get("embed")
    return KeptUnits(
        stage=record["stage"], kinds=kinds, blocks=[r["block"] for r in rows],
        kept=[[int(r[f"{k}_kept"]) for k in kinds] for r in rows],
        total=[[int(r[k]) for k in kinds] for r in rows],
        embed=(int(embed["before"]), int(embed["after"])) if embed else None, title=title,
        ratios={k: m[k] for k in ("flops_ratio", "params_ratio") if m.get(k) is not None})


# ---------------------------------------------------------------------------------- training curves
@dataclass
class TrainingCurves:
    """The training stages of a run laid end to end on one epoch axis.

    Attributes:
        segments: per training stage ``{"stage", "type", "x", "train_loss", "train_kd_loss", "val_loss",
            "val_top1"}`` (x: global epoch positions 1, 2, ...; missing values are None). ``train_loss`` is the
            cross-entropy (for a KD stage the student's CE, ``train_ce_loss``); ``train_kd_loss`` is a KD
            stage's objective (None elsewhere).
        boundaries: ``(x, label)`` of every boundary between stages (x is half-way between epochs).
        prunes: ``(x, val_top1_before_finetune, stage)`` of each prune stage, at its boundary.
    """

    segments: list[dict[str, Any]]
    boundaries: list[tuple[float, str]]
    prunes: list[tuple[float, float | None, str]]


def training_curves(run: RunData) -> TrainingCurves | None:
    """Per-epoch loss and val top-1 of all training stages of ``run``, end to end; None without any."""
    segments, boundaries, prunes = [], [], []
    cursor = 0
    for rec in run.records:
        typ, m = rec.get("type"), rec.get("metrics", {})
        if typ in TRAINING_TYPES and m.get("history"):
            hist = m["history"]
            if cursor:
                boundaries.append((cursor + 0.5, rec["stage"]))
            segments.append({"stage": rec["stage"], "type": typ,
                             "x": [cursor + i + 1 for i in range(len(hist))],
                             **{k: [h.get(k) for h in hist] for k in ("val_loss", "val_top1")},
                             # a KD stage's train_loss is its KD objective: plot its CE part beside the other CEs
                             "train_loss": [h.get("train_ce_loss", h.get("train_loss")) for h in hist],
                             "train_kd_loss": [h.get("train_loss") if h.get("train_loss_kind") else None
                                               for h in hist]})
            cursor += len(hist)
        elif typ == "prune" and segments:
            prunes.append((cursor + 0.5, m.get("val_top1_before_finetune"), rec["stage"]))
    if not segments:
        return None
    return TrainingCurves(segments, boundaries, prunes)


@dataclass
class GateStats:
    """Per-epoch gate statistics of one ``sparse_train`` stage.

    Attributes:
        stage: stage label.
        epochs: 1, 2, ...
        mean, frac_below: kind (``"all"`` for every gate together) -> per-epoch values.
        threshold: the gate threshold of ``frac_below`` (None when the config does not say).
        lam: the L1 strength lambda (None when unknown).
    """

    stage: str
    epochs: list[int]
    mean: dict[str, list[float | None]]
    frac_below: dict[str, list[float | None]]
    threshold: float | None
    lam: float | None


def gate_stats(record: dict[str, Any]) -> GateStats | None:
    """Gate statistics from a ``sparse_train`` record's history; None when it logged none."""
    hist = record.get("metrics", {}).get("history") or []
    if not any("gate_mean" in h for h in hist):
        return None
    kinds = sorted({k.split("/", 1)[1] for h in hist for k in h if k.startswith("gate_mean/")},
                   key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))
    mean = {"all": [h.get("gate_mean") for h in hist], **{k: [h.get(f"gate_mean/{k}") for h in hist] for k in kinds}}
    below = {"all": [h.get("gate_frac_below") for h in hist],
             **{k: [h.get(f"gate_frac_below/{k}") for h in hist] for k in kinds}}
    cfg = record.get("config", {})
    return GateStats(stage=record["stage"], epochs=[h.get("epoch", i + 1) for i, h in enumerate(hist)],
                     mean=mean, frac_below=below, threshold=cfg.get("threshold"),
                     lam=record["metrics"].get("lambda", cfg.get("lambda")))


# ------------------------------------------------------------------------------------------- pareto
@dataclass
class ParetoPoint:
    """One model of one run on the accuracy-vs-FLOPs plane.

    Attributes:
        run: the run's label.
        model: ``"dense"`` or ``"final"``.
        flops: FLOPs of one image.
        top1: top-1 (%).
        source: where the numbers come from (``"05_validate (pytorch)"``, ``"03_finetune"``).
        on_front: True when no other point has fewer-or-equal FLOPs and higher-or-equal top-1 with one
            of the two strictly better (the Pareto front of all points given together).
    """

    run: str
    model: str
    flops: float
    top1: float
    source: str
    on_front: bool = False


def _top1_of(m: ModelMeasurement) -> tuple[float, str] | None:
    for rt in ("pytorch", *sorted(m.top1)):
        if rt in m.top1:
            return m.top1[rt], rt
    return None


def _stage_points(run: RunData) -> list[ParetoPoint]:
    """Dense/final points from stage metrics, for a run without measurements."""
    scored = [r for r in run.records if r.get("type") in (*TRAINING_TYPES, "prune")
              and r.get("metrics", {}).get("flops") is not None
              and r["metrics"].get("val_top1", r["metrics"].get("val_top1_before_finetune")) is not None]
    first_prune = next((i for i, r in enumerate(run.records) if r.get("type") == "prune"), None)

    def point(rec, model):
        m = rec["metrics"]
        return ParetoPoint(run.label, model, float(m["flops"]),
                           float(m.get("val_top1", m.get("val_top1_before_finetune"))), rec["stage"])

    if first_prune is None:
        return [point(scored[-1], "dense")] if scored else []
    before = [r for r in scored if run.records.index(r) < first_prune and r["type"] != "prune"]
    after = [r for r in scored if run.records.index(r) >= first_prune]
    return ([point(before[-1], "dense")] if before else []) + ([point(after[-1], "final")] if after else [])


def _run_points(run: RunData) -> list[ParetoPoint]:
    by_source: dict[str, list[ModelMeasurement]] = {}
    for m in measurements(run):
        by_source.setdefault(m.source, []).append(m)
    for source, ms in by_source.items():         # the first source that has accuracy and FLOPs wins
        pts = []
        for m in ms:
            t = _top1_of(m)
            if t is not None and m.flops is not None:
                pts.append(ParetoPoint(run.label, m.model, float(m.flops), float(t[0]), f"{source} ({t[1]})"))
        if pts:
            return pts
    return _stage_points(run)


def pareto_points(runs: Sequence[RunData | str | Path]) -> list[ParetoPoint]:
    """Accuracy-vs-FLOPs points of every run (its dense reference and final model), front marked.

    Args:
        runs: :class:`RunData` objects or run directories. Per run, the points come from the first
            measurement source with top-1 and FLOPs (top-1 of the PyTorch runtime when measured),
            else from the stage metrics: the last trained model before the first prune (dense) and
            the last scored model after it (final); a run without a prune gives one dense point.

    Returns:
        The points in run order (dense before final), ``on_front`` set over all of them together.

    Raises:
        VitoptError: a run directory does not exist (see :func:`load_run`).
    """
    points = [p for run in _as_runs(runs) for p in _run_points(run)]
    for p in points:
        p.on_front = not any(q.flops <= p.flops and q.top1 >= p.top1 and (q.flops < p.flops or q.top1 > p.top1)
                             for q in points)
    return points


# ============================================================================================ drawing
_STYLE = {"font.size": 9.5, "axes.titlesize": 10.5, "axes.labelsize": 9.5, "legend.fontsize": 8.5,
          "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
          "figure.titlesize": 11.5, "figure.titleweight": "bold"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _styled(fn):
    """Run a drawing function with the report's rc style (rcParams are read while artists are made)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib as mpl

        with mpl.rc_context(_STYLE):
            return fn(*args, **kwargs)
    return wrapper


@_styled
def draw_kept_units(data: KeptUnits) -> bytes:
    """Heatmap of the fraction of dense units kept per block and kind, cells annotated ``kept/total``.

    A last row sums every block. The title gives the prune's target and the embedding width
    before -> after. Returns PNG bytes.
    """
    frac = [[100 * v for v in row] for row in data.fraction()]
    labels = [[f"{k}/{t}" for k, t in zip(kr, tr)] for kr, tr in zip(data.kept, data.total)]
    ylabels = [f"block {b}" for b in data.blocks]
    if len(data.blocks) > 1:
        kept = [sum(col) for col in zip(*data.kept)]
        total = [sum(col) for col in zip(*data.total)]
        frac.append([100 * k / t if t else 100.0 for k, t in zip(kept, total)])
        labels.append([f"{k}/{t}" for k, t in zip(kept, total)])
        ylabels.append("all blocks")
    nrows, ncols = len(frac), len(data.kinds)
    fig = _figure(max(6.0, 1.9 * ncols + 2.6), max(2.6, 0.36 * nrows + 1.6))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.grid(False)
    for i, row in enumerate(labels):
        for j, text in enumerate(row):
            ax.text(j, i, f"{text}\n({frac[i][j]:.0f}%)" if nrows <= 16 else text, ha="center", va="center",
                    fontsize=9.5 if nrows <= 16 else 8, color="white" if frac[i][j] < 55 else "black")
    if len(data.blocks) > 1:
        ax.axhline(nrows - 1.5, color="white", linewidth=3)
    ax.set_xticks(range(ncols), [f"{KIND_LABELS.get(k, k)}" for k in data.kinds])
    ax.xaxis.tick_top()
    ax.set_yticks(range(nrows), ylabels)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    cbar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    cbar.set_label("dense units kept (%)")
    sub = []
    if data.embed:
        b, a = data.embed
        sub.append(f"embed_dim {b} \u2192 {a} ({100 * a / b:.0f}%)" if b else f"embed_dim {b} \u2192 {a}")
    sub += [f"{k.replace('_ratio', '')} ratio {v:.3f}" for k, v in data.ratios.items()]
    ax.set_title(data.title + ("\n" + ", ".join(sub) if sub else ""), loc="left", fontsize=10)
    return _png(fig)


def _plot_series(ax, x, y, **kw):
    pts = [(a, b) for a, b in zip(x, y) if b is not None]
    if pts:
        ax.plot(*zip(*pts), **kw)


@_styled
def draw_training_curves(curves: TrainingCurves, title: str) -> bytes:
    """Loss (train and val) and val top-1 (%) per epoch over all training stages, end to end.

    The train loss is the cross-entropy in every stage (a KD stage's CE part); a KD stage's objective
    (alpha tau^2 KL + (1 - alpha) CE, not comparable with a CE) is drawn dotted beside it.

    Stage boundaries are dashed lines with the stage names along the top axis; a prune stage is a
    red boundary with the val top-1 right after pruning marked. Returns PNG bytes.
    """
    fig = _figure(12.0, 4.0)
    ax_loss, ax_acc = fig.subplots(1, 2)
    colors = {"train_loss": "C0", "val_loss": "C1", "val_top1": "C2"}
    ms_all = 4 if curves.segments[-1]["x"][-1] <= 60 else 0  # markers only while epochs stay apart
    kd_labelled = False
    for i, seg in enumerate(curves.segments):
        first = i == 0
        ms = ms_all if ms_all or len(seg["x"]) > 2 else 4     # a 1-2 epoch stage stays visible
        _plot_series(ax_loss, seg["x"], seg["train_loss"], color=colors["train_loss"], marker="o", ms=ms,
                     label="train loss (cross-entropy)" if first else None)
        if any(v is not None for v in seg.get("train_kd_loss", ())):
            _plot_series(ax_loss, seg["x"], seg["train_kd_loss"], color=colors["train_loss"], marker="^", ms=ms,
                         ls=":", label="train KD objective (not a CE)" if not kd_labelled else None)
            kd_labelled = True
        _plot_series(ax_loss, seg["x"], seg["val_loss"], color=colors["val_loss"], marker="s", ms=ms, ls="--",
                     label="val loss" if first else None)
        _plot_series(ax_acc, seg["x"], seg["val_top1"], color=colors["val_top1"], marker="o", ms=ms,
                     label="val top-1" if first else None)
    last = curves.segments[-1]["x"][-1]
    prune_x = {x for x, _, _ in curves.prunes}
    for ax in (ax_loss, ax_acc):
        for x, _ in curves.boundaries:
            if x not in prune_x:
                ax.axvline(x, color="0.45", ls=":", lw=1.2)
        for x, _, _ in curves.prunes:
            ax.axvline(x, color="C3", ls="--", lw=1.3)
        ax.set_xlim(0.5, last + 0.5)
        ax.set_xlabel("epoch (training stages end to end)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        top = ax.secondary_xaxis("top")
        centers = [(s["x"][0] + s["x"][-1]) / 2 for s in curves.segments]
        top.set_xticks(centers, [s["stage"] for s in curves.segments], fontsize=8.5)
        top.tick_params(length=0)
        top.spines["top"].set_visible(False)
    first_prune = True
    for x, top1, stage in curves.prunes:
        if top1 is not None:
            ax_acc.plot([x], [top1], marker="v", color="C3", ms=8, ls="none",
                        label="after prune (before fine-tune)" if first_prune else None)
            ax_acc.annotate(f"{stage}\n{top1:.1f}%", (x, top1), textcoords="offset points", xytext=(6, -4),
                            fontsize=8, color="C3", va="top")
            first_prune = False
    ax_loss.set_ylabel("loss (nats)")
    ax_acc.set_ylabel("val top-1 (%)")
    ax_loss.set_title("loss", loc="left")
    ax_acc.set_title("val top-1", loc="left")
    ax_loss.legend(loc="best")
    ax_acc.legend(loc="best")
    fig.suptitle(title, x=0.01, ha="left")
    return _png(fig)


@_styled
def draw_gate_stats(stats: GateStats, title: str) -> bytes:
    """Mean gate value and fraction of gates below the threshold (%) per epoch, per unit kind.

    Returns PNG bytes.
    """
    fig = _figure(12.0, 3.6)
    ax_mean, ax_below = fig.subplots(1, 2)
    thr = f" {stats.threshold:g}" if stats.threshold is not None else " threshold"
    lam = f" (L1 lambda {stats.lam:g})" if stats.lam is not None else ""
    fig.suptitle(f"{title}{lam}", x=0.01, ha="left")
    ax_mean.set_ylabel("mean gate value")
    ax_below.set_ylabel(f"gates below{thr} (%)")
    ax_mean.set_title("mean gate per kind", loc="left")
    ax_below.set_title(f"fraction of gates below{thr}", loc="left")
    if len(stats.epochs) == 1:                  # one epoch: bars per kind read better than lone dots
        kinds = list(stats.mean)
        colors = ["0.25" if k == "all" else f"C{i}" for i, k in enumerate(kinds)]
        for ax, values, fmt in ((ax_mean, [stats.mean[k][0] for k in kinds], "{:.3f}"),
                                (ax_below, [None if stats.frac_below.get(k, [None])[0] is None
                                            else 100 * stats.frac_below[k][0] for k in kinds], "{:.1f}%")):
            heights = [0.0 if v is None else v for v in values]
            bars = ax.bar(kinds, heights, color=colors, width=0.6)
            ax.bar_label(bars, [("n/a" if v is None else fmt.format(v)) for v in values], padding=2, fontsize=8.5)
            ax.set_xlabel(f"unit kind (after the only epoch of {stats.stage})")
            ax.grid(axis="x", visible=False)
            ax.margins(y=0.15)
        ax_below.set_ylim(0, max(10.0, *(h * 1.2 for h in ax_below.containers[0].datavalues)))
        return _png(fig)
    for i, kind in enumerate(stats.mean):
        style = dict(color="black", ls="--", marker="s") if kind == "all" else dict(color=f"C{i}", marker="o")
        _plot_series(ax_mean, stats.epochs, stats.mean[kind], ms=5, label=kind, **style)
        _plot_series(ax_below, stats.epochs, [None if v is None else 100 * v for v in stats.frac_below.get(kind, [])],
                     ms=5, label=kind, **style)
    ax_below.set_ylim(-3, 103)
    for ax in (ax_mean, ax_below):
        ax.set_xlabel(f"epoch of {stats.stage}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(title="unit kind", loc="best")
    return _png(fig)


@_styled
def draw_accuracy_vs_flops(points: list[ParetoPoint]) -> bytes:
    """Top-1 (%) against MFLOPs for every run's dense and final model; the Pareto front ringed and joined.

    One color per run; hollow squares are dense references, filled circles final models, an arrow
    joins them. Returns PNG bytes.
    """
    fig = _figure(9.0, 5.2)
    ax = fig.add_subplot()
    runs = list(dict.fromkeys(p.run for p in points))
    color = {r: f"C{i % 10}" for i, r in enumerate(runs)}
    for run in runs:
        pts = {p.model: p for p in points if p.run == run}
        d, f = pts.get("dense"), pts.get("final")
        if d and f:
            ax.annotate("", (f.flops / 1e6, f.top1), (d.flops / 1e6, d.top1),
                        arrowprops=dict(arrowstyle="->", color=color[run], lw=1.2, alpha=0.7, shrinkA=6, shrinkB=6))
        for p in pts.values():
            dense = p.model == "dense"
            ax.scatter([p.flops / 1e6], [p.top1], s=70, marker="s" if dense else "o", zorder=3,
                       facecolors="white" if dense else color[run], edgecolors=color[run], linewidths=1.8)
    front = sorted((p for p in points if p.on_front), key=lambda p: p.flops)
    if front:
        ax.plot([p.flops / 1e6 for p in front], [p.top1 for p in front], color="0.3", ls="--", lw=1.2,
                drawstyle="steps-post", zorder=2)
        ax.scatter([p.flops / 1e6 for p in front], [p.top1 for p in front], s=260, facecolors="none",
                   edgecolors="0.15", linewidths=1.2, zorder=4)
    # one label per distinct position, so runs sharing a dense model do not print over each other
    at: dict[tuple[float, float], list[str]] = {}
    for p in points:
        at.setdefault((round(p.flops / 1e6, 6), round(p.top1, 6)), []).append(f"{p.run} {p.model}")
    for (x, y), names in at.items():
        ax.annotate(f"{', '.join(names)}: {y:.1f}%, {x:,.0f} MFLOPs" if x >= 100 else
                    f"{', '.join(names)}: {y:.1f}%, {x:.3g} MFLOPs", (x, y), textcoords="offset points",
                    xytext=(11, 0), va="center", ha="left", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75))
    flops = [p.flops for p in points]
    if min(flops) > 0 and max(flops) / min(flops) > 8:     # models of very different size: log axis
        ax.set_xscale("log")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", color=color[r], ls="none", ms=7, label=f"run {r}") for r in runs]
    handles += [Line2D([], [], marker="s", mfc="white", mec="0.2", ls="none", ms=7, label="dense reference"),
                Line2D([], [], marker="o", color="0.2", ls="none", ms=7, label="final (pruned)"),
                Line2D([], [], marker="o", mfc="none", mec="0.15", ls="--", color="0.3", ms=13, label="Pareto front")]
    ax.legend(handles=handles, loc="best")
    ax.margins(x=0.3, y=0.2)
    if ax.get_xscale() == "linear":
        ax.set_xlim(left=max(0.0, ax.get_xlim()[0]))
    ax.set_xlabel("FLOPs per image (MFLOPs, 2 x MACs)" + (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy vs FLOPs (up and left is better)", loc="left")
    return _png(fig)


#: horizontal offset (a factor on the batch size) of the dense and final points, so their error bars do not overlap.
_DODGE = {"dense": 0.92, "final": 1.08}


@_styled
def draw_latency(ms: list[ModelMeasurement], title: str) -> bytes:
    """Latency per batch (p50, error bar up to p90) against batch size, one panel per runtime (PNG bytes).

    See :func:`latency_figure`.
    """
    return _png(latency_figure(ms, title))


def latency_figure(ms: list[ModelMeasurement], title: str):
    """The matplotlib figure of :func:`draw_latency`.

    ``ms`` are the measurements of one run from one source (dense and final). Every panel has the same
    y axis (shared limits; logarithmic when the values of all panels together span more than a factor
    8), so PyTorch and ONNX Runtime panels compare at a glance. Points are separate measurements: no
    line joins them (neither across batch sizes nor between the dense and the final model). Final
    points carry the speed-up over dense (dense p50 / final p50).
    """
    runtimes = list(dict.fromkeys(rt for m in ms for rt in m.latency))
    fig = _figure(max(6.0, 5.6 * len(runtimes)), 4.2)
    axes = fig.subplots(1, len(runtimes), squeeze=False, sharey=True)[0]
    style = {"dense": dict(color="0.45", marker="s", mfc="white"), "final": dict(color="C0", marker="o")}
    every: list[float] = []
    for ax, rt in zip(axes, runtimes):
        series = {}
        for m in sorted(ms, key=lambda m: m.model != "dense"):
            lat = m.latency.get(rt)
            if not lat:
                continue
            bs = sorted(lat)
            p50 = [lat[b]["p50_ms"] for b in bs]
            p90 = [lat[b].get("p90_ms", lat[b]["p50_ms"]) for b in bs]
            series[m.model] = dict(zip(bs, p50))
            every += p50 + p90
            ax.errorbar([b * _DODGE.get(m.model, 1.0) for b in bs], p50, yerr=[[0] * len(bs), [max(0.0, hi - lo) for lo, hi in zip(p50, p90)]], capsize=4,
                        ms=7, ls="none", elinewidth=1.5, label=f"{m.model} model: p50, bar up to p90",
                        **style.get(m.model, {}))
        batches = sorted({b for s in series.values() for b in s})
        if len(batches) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        if len(batches) == 1:
            ax.set_xlim(batches[0] * 0.5, batches[0] * 1.5)
        if "dense" in series and "final" in series:
            for b, v in series["final"].items():
                d = series["dense"].get(b)
                if d and v:
                    ax.annotate(f"{d / v:.2f}x faster" if d >= v else f"{v / d:.2f}x slower", (b * _DODGE["final"], v),
                                textcoords="offset points", xytext=(6, -8), fontsize=8.5, color="C0",
                                fontweight="bold", va="top", ha="left",
                                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        ax.margins(x=0.25, y=0.15)
        ax.set_xlabel("batch size (images)")
        ax.set_title(f"runtime: {rt}", loc="left")
        ax.tick_params(labelleft=True)
    positive = [v for v in every if v > 0]
    if positive and max(positive) / min(positive) > 8:
        axes[0].set_yscale("log")                            # shared: every panel
    axes[0].set_ylabel("latency per batch (ms)")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title, x=0.01, ha="left")
    return fig
