"""The HTML/Markdown report: figures, tables, Pareto points, skipped pieces and bad input.

A real run (the small end-to-end recipe of test_pipeline.py) checks that every figure and table is
there and that the final-vs-dense table carries the metrics.json numbers; hand-made metrics files
cover the rest quickly.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vitopt.errors import VitoptError
from vitopt.report import SECTIONS, build_report, collect_environment, pareto_points, write_report
from vitopt.report.html import parse_markdown_blocks
from vitopt.report.summary import render_summary

PNG = "data:image/png;base64,"


# ------------------------------------------------------------------------------------------ helpers
class _Tables(HTMLParser):
    """Collect ``<table data-key=...>`` cells and ``<img src>`` values of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._key = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._key = a.get("data-key")
            self.tables[self._key] = []
        elif tag == "tr" and self._key is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._key].append(self._row)
            self._row = None
        elif tag == "table":
            self._key = None


def _parse(html_text: str) -> _Tables:
    p = _Tables()
    p.feed(html_text)
    return p


def _history(epochs: int, top1: float, gates: bool = False) -> list[dict]:
    out = []
    for e in range(1, epochs + 1):
        h = {"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "val_top1": top1 - (epochs - e), "lr": 1e-3,
             "seconds": 0.5}
        if gates:
            h.update({"gate_mean": 0.9, "gate_frac_below": min(1.0, 0.05 * e), "gate_mean/heads": 1.0, "gate_frac_below/heads": 0.0,
                      "gate_mean/head_dim": 0.95, "gate_frac_below/head_dim": 0.05, "gate_mean/mlp": 0.8,
                      "gate_frac_below/mlp": 0.2})
        out.append(h)
    return out


def _latency(p50: float) -> dict:
    return {str(b): {"p50_ms": p50 * b, "p90_ms": p50 * b * 1.2, "p99_ms": p50 * b * 1.3, "mean_ms": p50 * b,
                     "throughput_img_s": 1000 / p50} for b in (1, 32)}


def _measured(flops: float, top1: float, p50: float) -> dict:
    return {"flops": flops, "macs": flops / 2, "params": flops / 40,
            "runtimes": {"pytorch": {"top1": top1, "latency": _latency(p50)},
                         "onnxruntime": {"top1": top1, "latency": _latency(p50 / 2)}},
            "parity": {"max_abs_diff": 1e-6, "argmax_agreement": 1.0}}


def _write_run(root: Path, name: str, *, dense=(4.6e9, 79.8), final=(2.3e9, 78.0), depth=12,
               validate=True, prune=True, epochs=(3, 2, 3)) -> Path:
    """A run directory with hand-made metrics: train, sparse_train, prune, finetune, validate."""
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(f"name: {name}\nmodel: {{name: deit_small_patch16_224}}\ndata: {{type: digits}}\n")
    stages = [("00_train", "train", {"val_top1": dense[1], "val_loss": 1.0, "flops": dense[0], "macs": dense[0] / 2,
                                      "params": 22e6, "history": _history(epochs[0], dense[1])})]
    if prune:
        stages.append(("01_sparse_train", "sparse_train",
                       {"val_top1": dense[1], "val_loss": 1.0, "gate_mean": 0.9, "gate_frac_below": 0.2, "lambda": 1e-4,
                        "flops": dense[0], "macs": dense[0] / 2, "params": 22e6,
                        "history": _history(epochs[1], dense[1], gates=True)}))
        blocks = [{"block": i, "heads": 6, "heads_kept": 6 - i % 3, "head_dim": 64, "head_dim_kept": 64 - 8 * (i % 2),
                   "mlp": 1536, "mlp_kept": 1536 - 128 * i} for i in range(depth)]
        stages.append(("02_prune", "prune",
                       {"criterion": "gate", "scope": "global", "schedule": "one_shot", "target_metric": "flops",
                        "target": 0.5, "flops": final[0], "macs": final[0] / 2, "params": 11e6,
                        "flops_ratio": final[0] / dense[0], "params_ratio": 0.5, "val_top1_before_finetune": 40.0,
                        "embed": {"before": 384, "after": 320}, "blocks": blocks, "rounds": []}))
        stages.append(("03_finetune", "finetune", {"val_top1": final[1], "val_loss": 1.1, "flops": final[0],
                                                   "macs": final[0] / 2, "params": 11e6,
                                                   "history": _history(epochs[2], final[1])}))
    if validate:
        m = {"threads": 2, "batch_sizes": [1, 32], "num_images": 1000, "final": _measured(*final, p50=5.0)}
        if prune:
            m["reference"] = _measured(*dense, p50=9.0)
        stages.append((f"{len(stages):02d}_validate", "validate", m))
    for label, typ, metrics in stages:
        (run / label).mkdir()
        (run / label / "metrics.json").write_text(json.dumps(
            {"stage": label, "type": typ, "seconds": 1.5, "config": {"type": typ, "threshold": 0.05},
             "outputs": {}, "metrics": metrics}))
    return run


def _num(cell: str) -> float:
    return float(cell)


# ------------------------------------------------------------------------------------------ real run
@pytest.fixture(scope="module")
def real_run(e2e_run) -> Path:
    return e2e_run[0]


@pytest.mark.slow
def test_real_run_report_has_every_figure_section_and_table(real_run):
    paths = write_report([real_run])
    assert paths == {"html": real_run / "report.html", "markdown": real_run / "report.md"}
    text = paths["html"].read_text()
    # self-contained: images inline, no external request
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    for _, title in SECTIONS:
        assert f"{title}</h2>" in text, title
    page = _parse(text)
    assert all(src.startswith(PNG) for src in page.images)
    # kept units (1 prune) + training curves + gates + accuracy vs FLOPs + latency
    assert text.count(f'<img src="{PNG}') == len(page.images) == 5
    report = build_report([real_run])
    assert [f.key for f in report.figures()] == [
        "e2e:kept-units:02_prune", "e2e:training", "e2e:gates:01_sparse_train",
        "accuracy-vs-flops", "e2e:latency:05_validate"]
    assert all(f.png.startswith(b"\x89PNG") for f in report.figures())
    assert report.notes() == []
    for key in ("runs", "accuracy-vs-flops", "e2e:stages", "e2e:final-vs-dense",
                "e2e:kept-units-per-block", "environment"):
        assert key in page.tables, key
    md = paths["markdown"].read_text()
    for _, title in SECTIONS:
        assert title in md
    # the Markdown carries the summary tables verbatim
    summary = render_summary(real_run)
    for block in parse_markdown_blocks(summary, "x"):
        if getattr(block, "markdown", None):
            assert block.markdown in md


@pytest.mark.slow
def test_real_run_final_vs_dense_table_matches_metrics(real_run):
    val = json.loads((real_run / "05_validate" / "metrics.json").read_text())["metrics"]
    rows = {r[0]: r[1:] for r in _parse(write_report([real_run])["html"].read_text()).tables["e2e:final-vs-dense"]}
    assert rows["metric"][:2] == ["final (pruned)", "dense reference"]
    final, ref = val["final"], val["reference"]
    for i, m in enumerate((final, ref)):
        assert _num(rows["params (M)"][i]) == pytest.approx(m["params"] / 1e6, abs=5e-5)
        assert _num(rows["FLOPs (M, 2 x MACs)"][i]) == pytest.approx(m["flops"] / 1e6, abs=5e-3)
        for kind, rt in m["runtimes"].items():
            assert _num(rows[f"top-1 {kind} (%)"][i]) == pytest.approx(rt["top1"], abs=5e-3)
            for bs, lat in rt["latency"].items():
                assert _num(rows[f"{kind} latency batch {bs} p50 (ms)"][i]) == pytest.approx(lat["p50_ms"], abs=5e-4)
                assert _num(rows[f"{kind} latency batch {bs} p90 (ms)"][i]) == pytest.approx(lat["p90_ms"], abs=5e-4)
        assert _num(rows["max abs logit diff ORT vs PyTorch"][i]) == pytest.approx(m["parity"]["max_abs_diff"], rel=1e-2)
    assert _num(rows["FLOPs (M, 2 x MACs)"][2]) == pytest.approx(final["flops"] / ref["flops"], abs=5e-4)
    # the accuracy-vs-FLOPs points are the validate numbers too
    pts = {p.model: p for p in pareto_points([real_run])}
    assert pts["final"].flops == final["flops"] and pts["final"].top1 == final["runtimes"]["pytorch"]["top1"]
    assert pts["dense"].flops == ref["flops"] and pts["dense"].top1 == ref["runtimes"]["pytorch"]["top1"]


@pytest.mark.slow
def test_two_runs_give_four_pareto_points(real_run, tmp_path):
    # a second run: the real one with the final model made cheaper and more accurate than the first's
    other = tmp_path / "other"
    shutil.copytree(real_run, other, ignore=shutil.ignore_patterns("*.onnx", "*.safetensors", "report.*"))
    vfile = other / "05_validate" / "metrics.json"
    rec = json.loads(vfile.read_text())
    final = rec["metrics"]["final"]
    final["flops"] = int(final["flops"] * 0.8)
    for rt in final["runtimes"].values():
        rt["top1"] = 99.0
    vfile.write_text(json.dumps(rec))

    points = pareto_points([real_run, other])
    assert [(p.run, p.model) for p in points] == [("e2e", "dense"), ("e2e", "final"),
                                                  ("other", "dense"), ("other", "final")]
    assert [p.on_front for p in points] == [False, False, False, True]
    out = tmp_path / "cmp" / "both.html"
    paths = write_report([real_run, other], out)
    assert paths == {"html": out, "markdown": out.with_suffix(".md")}
    page = _parse(out.read_text())
    rows = page.tables["accuracy-vs-flops"][1:]
    assert len(rows) == 4 and [r[-1] for r in rows] == ["", "", "", "yes"]
    assert len(page.images) == 2 * 4 + 1            # per run: kept units, curves, gates, latency; + one Pareto


# -------------------------------------------------------------------------------------- hand-made
def test_pareto_front_on_hand_made_runs(tmp_path):
    a = _write_run(tmp_path, "a", dense=(4.0e9, 80.0), final=(2.0e9, 78.0))
    b = _write_run(tmp_path, "b", dense=(4.0e9, 80.0), final=(1.0e9, 70.0))
    c = _write_run(tmp_path, "c", dense=(4.0e9, 80.0), final=(3.0e9, 77.0))    # dominated by a's final
    pts = pareto_points([a, b, c])
    assert len(pts) == 6
    front = {(p.run, p.model) for p in pts if p.on_front}
    # the three identical dense models tie and none is beaten; c's final is
    assert front == {("a", "dense"), ("b", "dense"), ("c", "dense"), ("a", "final"), ("b", "final")}
    assert all(p.source == "04_validate (pytorch)" for p in pts)


def test_pareto_points_fall_back_to_stage_metrics(tmp_path):
    run = _write_run(tmp_path, "nv", dense=(4e9, 80.0), final=(2e9, 75.0), validate=False)
    pts = pareto_points([run])
    assert [(p.model, p.flops, p.top1, p.source) for p in pts] == [
        ("dense", 4e9, 80.0, "01_sparse_train"), ("final", 2e9, 75.0, "03_finetune")]
    assert all(p.on_front for p in pts)


def test_hand_made_full_run_renders_every_piece(tmp_path):
    run = _write_run(tmp_path, "deit_s", depth=12)
    report = build_report([run])
    assert report.notes() == []
    assert len(report.figures()) == 5
    rows = {r[0]: r[1:] for r in _parse(write_report([run])["html"].read_text()).tables["deit_s:final-vs-dense"]}
    assert rows["pytorch latency batch 32 p50 (ms)"] == ["160.000", "288.000", "0.556"]


def test_train_only_run_renders_with_notes(tmp_path):
    run = _write_run(tmp_path, "dense_only", prune=False, validate=False)
    paths = write_report([run])
    text = paths["html"].read_text()
    page = _parse(text)
    assert len(page.images) == 2                     # training curves + a one-point accuracy plot
    notes = " ".join(build_report([run]).notes())
    for needle in ("no finished prune stage", "no latency measurement", "no validate stage", "one point only"):
        assert needle in notes, needle
    for _, title in SECTIONS:
        assert f"{title}</h2>" in text
    assert 'class="note"' in text
    assert "no final-vs-dense table" in paths["markdown"].read_text()


def test_run_without_any_finished_stage_and_malformed_metrics(tmp_path):
    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "recipe.yaml").write_text("name: fresh\n")
    report = build_report([empty])
    assert report.figures() == [] and report.points == []
    assert any("no training stage" in n for n in report.notes())
    broken = _write_run(tmp_path, "broken")
    f = broken / "02_prune" / "metrics.json"
    rec = json.loads(f.read_text())
    del rec["metrics"]["blocks"]
    f.write_text(json.dumps(rec))
    notes = build_report([broken]).notes()
    assert any("Kept-units heatmap" in n and "incomplete" in n for n in notes)


def test_bad_input_is_one_sentence(tmp_path):
    with pytest.raises(VitoptError, match="does not exist") as exc:
        write_report([tmp_path / "nope"])
    assert "\n" not in str(exc.value)
    with pytest.raises(VitoptError, match="not a vitopt run directory"):
        write_report([tmp_path])
    with pytest.raises(VitoptError, match="no run directory"):
        write_report([])
    run = _write_run(tmp_path, "r", prune=False, validate=False)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(VitoptError, match="not .html"):
        write_report([run], tmp_path / "x.txt")
    assert write_report([run], tmp_path / "outdir")["html"] == tmp_path / "outdir" / "report.html"


def test_environment_has_the_versions():
    env = collect_environment()
    for key in ("python", "torch", "timm", "onnx", "onnxruntime", "cpu", "cpu_cores", "cuda_device", "date"):
        assert key in env and env[key] not in (None, ""), key
    json.dumps(env)


def test_markdown_blocks_keep_tables_verbatim():
    md = "# t\n\n## Final vs dense\n\nsome `x` text\n\n| a | b |\n|---|---:|\n| 1 | 2 |\n\n| c |\n|---|\n| 3 |\n"
    blocks = parse_markdown_blocks(md, "run")
    tables = [b for b in blocks if hasattr(b, "rows")]
    assert [t.key for t in tables] == ["run:final-vs-dense", "run:final-vs-dense-2"]
    assert tables[0].rows == [["1", "2"]] and tables[0].align == ["left", "right"]
    assert tables[0].markdown == "| a | b |\n|---|---:|\n| 1 | 2 |"


# ------------------------------------------------------------------------------------------ device results
def _device_results(top1: float = 97.5, p50: float = 1.5) -> dict:
    lat = {str(b): {"p50_ms": p50 * b, "p90_ms": p50 * b * 1.1, "p99_ms": p50 * b * 1.2, "mean_ms": p50 * b,
                    "throughput_img_s": 1000 / p50} for b in (1, 8)}
    return {"format": "vitopt-jetson-results/1", "target": "orin-agx", "precision": "fp16", "runtime": "tensorrt",
            "device": "Jetson AGX Orin", "top1": top1, "num_images": 360, "latency": lat}


def test_jetson_results_json_is_a_measurement_source(tmp_path):
    from vitopt.report.jetson import find_results
    from vitopt.report.plots import load_run, measurements

    run = _write_run(tmp_path, "dev")
    (run / "bundle-orin-agx").mkdir()
    (run / "bundle-orin-agx" / "results.json").write_text(json.dumps(_device_results()))
    (run / "bundle-orin-agx" / "bundle.json").write_text(json.dumps({"format": "vitopt-bundle/1"}))
    (run / "other").mkdir()
    (run / "other" / "results.json").write_text(json.dumps({"format": "something-else", "top1": 1.0}))
    (run / "broken").mkdir()
    (run / "broken" / "results.json").write_text("{not json")
    assert find_results(run) == [run / "bundle-orin-agx" / "results.json"]
    ms = measurements(load_run(run))
    dev = [m for m in ms if m.source == "bundle-orin-agx/results.json"]
    assert len(dev) == 1 and [m.source for m in ms][0].endswith("validate")       # host numbers first
    d = dev[0]
    assert d.model == "final" and d.top1 == {"tensorrt fp16": 97.5} and d.device == "orin-agx / Jetson AGX Orin"
    assert d.latency["tensorrt fp16"][8]["p50_ms"] == pytest.approx(12.0)
    assert d.flops == pytest.approx(2.3e9)                                        # the host's final model


def test_report_shows_device_latency_beside_host(tmp_path):
    run = _write_run(tmp_path, "dev2")
    (run / "results.json").write_text(json.dumps(_device_results(p50=0.8)))
    paths = write_report([run], tmp_path / "out")
    html = Path(paths["html"]).read_text()
    assert "results.json" in html and "orin-agx / Jetson AGX Orin" in html
    assert "05_validate" in html or "04_validate" in html
