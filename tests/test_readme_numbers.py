"""README figures come from results files: the marked tables of README.md, the checker and renderers of
benchmarks/readme_numbers.py, the committed benchmarks/results/ folder, and the README's quickstart recipe."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_numbers as rn  # noqa: E402


def test_every_number_in_the_readme_result_tables_is_in_a_results_file():
    problems = rn.check(ROOT / "README.md")
    assert problems == [], "\n".join(problems)


def test_every_committed_results_file_renders_and_checks(tmp_path):
    """Each results file the README may quote renders to tables whose numbers the checker finds in it."""
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    for f in files:
        doc = json.loads(f.read_text())
        assert {"command", "date", "machine", "load"} <= set(doc), f
        assert doc["command"].startswith("python benchmarks/"), f
        readme = tmp_path / f"{f.stem}.md"
        readme.write_text(rn.render(f) + "\n")
        assert rn.check(readme) == [], f


DOC = {"script": "noise_floor", "command": "python benchmarks/noise_floor.py", "date": "2026-01-01T00:00:00+00:00",
       "machine": {"cpu": "x"}, "load": {"loadavg": [1.5, 1.0, 1.0], "cpu_count": 2},
       "rows": [{"model": "quickstart", "runtime": "onnxruntime", "batch": 32, "ms": 1.23456,
                 "ratio": {"median": 1.0123, "min": 0.9871, "max": 1.0412, "q1": 1.0, "q3": 1.02}}]}


def _readme(tmp_path: Path, table: str, files: str = "results/nf.json") -> Path:
    (tmp_path / "results").mkdir(exist_ok=True)
    (tmp_path / "results" / "nf.json").write_text(json.dumps(DOC))
    path = tmp_path / "README.md"
    path.write_text(f"# x\n\nText 97.2% outside tables is not checked.\n\n<!-- numbers: {files} -->\n\n{table}\n\nafter\n")
    return path


def test_checker_finds_typed_numbers(tmp_path):
    rendered = "\n\n".join(rn.render_noise_floor(DOC))
    assert rendered.splitlines()[-1] == "| quickstart | onnxruntime | 32 | 1.235 | 1.012x (0.987-1.041) |"
    assert rn.check(_readme(tmp_path, rendered), root=tmp_path) == []
    # forms: percent of a fraction, a speed-up 1 / ratio, a rounding to fewer decimals
    ok = "| a | b |\n|---|---:|\n| x | 101.2% |\n| y | 0.99x |\n| z | 1.2 |"
    assert rn.check(_readme(tmp_path, ok), root=tmp_path) == []
    # a typed number that no script wrote is reported, with the file and line of the marker
    typed = rendered.replace("1.012x", "0.690x")
    problems = rn.check(_readme(tmp_path, typed), root=tmp_path)
    assert len(problems) == 1 and "README.md:5" in problems[0] and "0.690" in problems[0]
    assert "97.2" not in problems[0]
    missing = rn.check(_readme(tmp_path, rendered, files="results/none.json"), root=tmp_path)
    assert missing and "results/none.json does not exist" in missing[0]


def test_marked_tables_are_found_after_blank_lines():
    text = "<!-- numbers: a.json, b.json -->\n\n| h |\n|---|\n| 1 |\ntext\n| not marked | 3 |\n"
    assert rn.marked_tables(text) == [(["a.json", "b.json"], "| h |\n|---|\n| 1 |", 1)]


def test_results_folder_is_committed_not_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "check-ignore", "-q", "--no-index", "benchmarks/results/speedup.json"], cwd=ROOT)
    assert res.returncode == 1, "benchmarks/results/*.json is ignored by .gitignore"


def test_readme_quickstart_recipe_is_the_shipped_one():
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if re.search(r"^name: quickstart$", b, re.M)]
    assert blocks, "README.md shows no quickstart recipe"
    shipped = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    for b in blocks:
        assert yaml.safe_load(b) == shipped


def test_accuracy_recovery_table_places_each_curve_at_its_epochs():
    """The recovery table has one column per epoch since pruning; a curve that starts after recovery
    epochs (vitopt-iterative) leaves the earlier cells empty instead of shifting left."""
    def row(method, epochs, top1):
        return {"method": method, "target": 0.5, "tool": "vitopt", "flops_ratio": {"mean": 0.498, "std": 0.0, "n": 1},
                "top1": None,
                "top1_pruned": None, "recovery": {"epochs": epochs, "top1": top1, "std": [0.0] * len(top1), "n": 1}}

    doc = {"dense": [], "summary": [row("vitopt", [0, 1, 2, 3], [70.0, 80.0, 81.0, 82.0]),
                                    row("vitopt-iterative", [2, 3], [78.0, 83.0])]}
    table = rn.render_accuracy(doc)[-1].splitlines()
    assert table[0] == "| method | target | FLOPs ratio | epoch 0 | epoch 1 | epoch 2 | epoch 3 |"
    assert table[2] == "| vitopt | 0.5 | 0.498 | 70.0 | 80.0 | 81.0 | 82.0 |"
    assert table[3] == "| vitopt-iterative | 0.5 | 0.498 |  |  | 78.0 | 83.0 |"
