"""benchmarks/plot_accuracy.py: the plotted points are the summary's, one-shot and fine-tuned kept apart."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plot_accuracy as P  # noqa: E402


def _row(method, target, flops, top1, top1_std, oneshot):
    return {"method": method, "target": target, "flops_ratio": {"mean": flops},
            "top1": {"mean": top1, "std": top1_std}, "top1_pruned": {"mean": oneshot, "std": 0.5}}


DOC = {"dense": [{"top1": 90.0}, {"top1": 92.0}],
       "summary": [_row("vitopt", 0.5, 0.498, 88.0, 1.0, 80.0), _row("vitopt", 0.15, 0.147, 70.0, 2.0, 30.0),
                   _row("tp-taylor", 0.5, 0.51, 87.0, 0.7, 60.0),
                   {"method": "tp-taylor", "target": 0.15, "top1": None, "flops_ratio": None}]}


def test_series_sorts_by_achieved_flops_and_keeps_one_shot_apart_from_fine_tuned():
    s = P.series(DOC)
    assert [p["flops"] for p in s["vitopt"]] == [0.147, 0.498]
    assert [(p["top1"], p["top1_std"], p["oneshot"]) for p in s["vitopt"]] == [(70.0, 2.0, 30.0), (88.0, 1.0, 80.0)]
    assert len(s["tp-taylor"]) == 1                          # the target without runs is left out
    assert P.dense_top1(DOC) == 91.0


def test_the_drawn_lines_are_the_series(tmp_path):
    fig = P.draw([("x", DOC)], tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ax, key in zip(fig.axes, ("oneshot", "top1")):
        drawn = {c.get_label(): c.lines[0].get_ydata().tolist() for c in ax.containers}
        assert drawn == {m: [p[key] for p in pts] for m, pts in P.series(DOC).items()}


def test_a_file_that_is_not_accuracy_results_gets_one_sentence_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"runs": []}')
    assert P.main([str(tmp_path / "x.json"), "--out", str(tmp_path / "a.png")]) == 2
    assert "not a readable accuracy.py results file" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
