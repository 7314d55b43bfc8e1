"""benchmarks/plot_recovery.py: the drawn curves are the summary's recovery fields, one panel per target."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plot_recovery as R  # noqa: E402


def _row(method, target, epochs, top1, reached=True):
    return {"method": method, "target": target, "reached_target": reached, "flops_ratio": {"mean": target + 0.1},
            "recovery": {"epochs": epochs, "top1": top1, "std": [0.5] * len(top1), "n": 3}}


DOC = {"dense": [{"top1": 90.0}, {"top1": 92.0}],
       "summary": [_row("vitopt", 0.15, [0, 1, 2], [40.0, 80.0, 86.0]),
                   _row("vitopt", 0.5, [0, 1, 2], [85.0, 90.0, 91.0]),
                   _row("tp-taylor", 0.5, [0, 1, 2], [60.0, 89.0, 90.8], reached=False),
                   _row("vitopt-iterative", 0.5, [1, 2], [88.0, 90.0]),
                   {"method": "tp-taylor", "target": 0.15, "recovery": None}]}


def test_curves_group_by_descending_target_and_skip_rows_without_a_curve():
    c = R.curves(DOC)
    assert list(c) == [0.5, 0.15]
    assert set(c[0.5]) == {"vitopt", "tp-taylor", "vitopt-iterative"} and set(c[0.15]) == {"vitopt"}


def test_epochs_to_reach_is_the_first_epoch_at_or_above_the_level():
    c = R.curves(DOC)[0.5]
    c = {m: row["recovery"] for m, row in c.items()}
    assert R.epochs_to_reach(c["vitopt"], 90.5) == 2          # dense mean 91 - 0.5
    assert R.epochs_to_reach(c["tp-taylor"], 90.5) == 2
    assert R.epochs_to_reach(c["vitopt"], 90.0) == 1          # reached exactly counts
    assert R.epochs_to_reach(c["vitopt-iterative"], 88.0) == 1  # its curve starts after its recovery epoch
    assert R.epochs_to_reach(c["tp-taylor"], 95.0) is None


def test_the_drawn_lines_are_the_curves_at_their_epochs(tmp_path):
    fig = R.draw([("x", DOC)], tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for ax, (target, by_method) in zip(fig.axes, R.curves(DOC).items()):
        drawn = {c.get_label().split(" (")[0]: (c.lines[0].get_xdata().tolist(), c.lines[0].get_ydata().tolist())
                 for c in ax.containers}
        assert drawn == {m: (r["recovery"]["epochs"], r["recovery"]["top1"]) for m, r in by_method.items()}, target
    missed = {c.get_label(): c.lines[0].get_linestyle() for c in fig.axes[0].containers}
    assert missed["tp-taylor (missed: 0.60 FLOPs)"] == ":" and missed["vitopt"] == "-"


def test_a_file_without_recovery_curves_gets_one_sentence_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "old.json").write_text('{"summary": [{"method": "vitopt", "target": 0.5, "top1": {"mean": 1}}]}')
    assert R.main([str(tmp_path / "old.json"), "--out", str(tmp_path / "r.png")]) == 2
    assert "with recovery curves" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()
