"""Every kind of bad input issue #6 lists, through the real command line (``vitopt.cli.main``).

Each case must exit with code 2, print one sentence (``error: ...`` on one logical line: what,
where, what is allowed), show no traceback, and leave every file of an existing finished run
directory byte-for-byte unchanged. Recipes are mutations of the finished run's own recipe, so an
error that were caught too late would land in that run directory.

A property-based test (hypothesis) feeds mutated recipes to the loader: it returns a Recipe or
raises VitoptError, never anything else.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitopt.cli import main
from vitopt.errors import VitoptError
from vitopt.pipeline import DATA_FILE, ENVIRONMENT_FILE, LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "fin",
    "seed": 0,
    "model": {"name": "deit_tiny_patch16_224",
              "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2}},
    "data": {"type": "digits"},
    "stages": [{"type": "train", "epochs": 1, "batch_size": 128}, {"type": "export"}],
}


def _cli(args, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["vitopt", *map(str, args)])
    with pytest.raises(SystemExit) as ei:
        main()
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err


def _snapshot(root: Path, recipe: bool = True) -> dict[str, str]:
    """sha256 of every file under ``root``. ``recipe=False`` leaves out the run's records (``recipe.yaml``,
    ``data.json``, ``environment.json``): a valid recipe that appends a stage to a finished run legitimately
    re-records them before that stage starts and fails. The run directory's empty lock file (created by the
    first run that locks it) is left out too."""
    records = {"recipe.yaml", DATA_FILE, ENVIRONMENT_FILE}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and (recipe or p.name not in records)
            and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (train 1 epoch + export) of :data:`BASE`; tests work on copies of it."""
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe

    out = tmp_path_factory.mktemp("finished")
    p = out / "r.yaml"
    p.write_text(yaml.safe_dump({**BASE, "output_dir": str(out / "runs")}))
    run_recipe(load_recipe(p))
    return out / "runs" / "fin"


@pytest.fixture
def run(tmp_path, finished):
    """(a private copy of the finished run, a function writing a recipe dict that points at it)."""
    runs = tmp_path / "runs"
    shutil.copytree(finished, runs / "fin")

    def write(recipe: dict | str, name: str = "bad.yaml") -> Path:
        p = tmp_path / name
        if isinstance(recipe, dict):
            recipe = yaml.safe_dump({**recipe, "output_dir": str(runs)}, sort_keys=False)
        p.write_text(recipe)
        return p

    return runs / "fin", write


def _expect(code_out, *needles):
    """Exit 2, no traceback, and the output ends with exactly one ``error: <one sentence>``."""
    code, out = code_out
    assert code == 2, out
    assert "Traceback" not in out and "File \"" not in out, out
    assert out.count("error:") == 1, out
    sentence = " ".join(out[out.index("error:"):].split())
    assert sentence.endswith("."), out
    for n in needles:
        assert n in sentence, (n, out)


def _mut(fn) -> dict:
    r = copy.deepcopy(BASE)
    fn(r)
    return r


# recipe -> (where the mistake is made, words the sentence must contain)
RECIPE_CASES = {
    "malformed_yaml": ("name: fin\nstages: [ {type: train, epochs: 1\n", ["bad.yaml:", "YAML"]),
    "unknown_key": (_mut(lambda r: r["stages"][0].update(epochz=2)), ["stages[0].epochz", "epochs"]),
    "wrong_type": (_mut(lambda r: r["stages"][0].update(epochs="two")), ["stages[0].epochs", "integer"]),
    "unknown_stage_type": (_mut(lambda r: r["stages"].append({"type": "fintune", "epochs": 1})),
                           ["stages[2]", "'fintune'", "finetune"]),
    "stage_order": (_mut(lambda r: r["stages"].insert(0, {"type": "finetune", "epochs": 1})),
                    ["stages[0]", "prune stage before it"]),
    "duplicate_key": ("name: fin\nname: other\nmodel: {name: deit_tiny_patch16_224}\ndata: {type: digits}\n"
                      "stages: [{type: export}]\n", ["name"]),
    "not_a_mapping": ("- just\n- a list\n", ["bad.yaml"]),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe(case, run, capsys, monkeypatch):
    rd, write = run
    before = _snapshot(rd)
    recipe, needles = RECIPE_CASES[case]
    _expect(_cli(["run", write(recipe)], capsys, monkeypatch), *needles)
    assert _snapshot(rd) == before


def test_unknown_model(run, capsys, monkeypatch):
    rd, write = run
    before = _snapshot(rd)
    r = _mut(lambda r: r["model"].update(name="deit_tinyy_patch16_224"))
    _expect(_cli(["run", write(r)], capsys, monkeypatch), "deit_tinyy_patch16_224", "not a timm model name")
    assert _snapshot(rd) == before


def test_missing_data_path(run, capsys, monkeypatch, tmp_path):
    rd, write = run
    before = _snapshot(rd)
    r = _mut(lambda r: r.update(data={"type": "imagefolder", "root": str(tmp_path / "nowhere")}))
    _expect(_cli(["run", write(r)], capsys, monkeypatch), str(tmp_path / "nowhere"), "does not exist")
    assert _snapshot(rd) == before


def test_imagefolder_without_val(run, capsys, monkeypatch, tmp_path):
    from PIL import Image

    rd, write = run
    before = _snapshot(rd)
    for c in ("a", "b"):
        (tmp_path / "img" / "train" / c).mkdir(parents=True)
        Image.new("L", (8, 8), 10).save(tmp_path / "img" / "train" / c / "x.png")
    r = _mut(lambda r: r.update(data={"type": "imagefolder", "root": str(tmp_path / "img")}))
    _expect(_cli(["run", write(r)], capsys, monkeypatch), "has no val/ subfolder", "train/<class>")
    assert _snapshot(rd) == before


def test_truncated_model_checkpoint(run, capsys, monkeypatch, tmp_path):
    rd, write = run
    before = _snapshot(rd)
    good = (rd / "00_train" / "model" / "model.safetensors").read_bytes()
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(good[: len(good) // 3])
    r = _mut(lambda r: r["model"].update(checkpoint=str(bad)))
    _expect(_cli(["run", write(r)], capsys, monkeypatch), str(bad))
    assert _snapshot(rd) == before


def test_corrupt_epoch_checkpoint_in_run_dir(run, capsys, monkeypatch):
    rd, write = run
    ck = rd / "02_train" / "checkpoints" / "last.pt"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"PK\x03\x04 not really a zip")
    before = _snapshot(rd, recipe=False)
    r = _mut(lambda r: r["stages"].append({"type": "train", "epochs": 1, "batch_size": 128}))
    _expect(_cli(["run", write(r)], capsys, monkeypatch), str(ck), "truncated or corrupt", f"delete {ck}")
    assert _snapshot(rd, recipe=False) == before


def test_epoch_checkpoint_of_other_schedule(run, capsys, monkeypatch):
    """The interrupted stage's config was edited (epochs 1 -> 2): refuse rather than mix schedules."""
    from vitopt.train.checkpoint import save_checkpoint

    rd, write = run
    save_checkpoint(rd / "02_train" / "checkpoints", {"epoch": 1, "epochs": 1, "steps_per_epoch": 11,
                                                       "global_step": 11, "model": {}, "optimizer": {},
                                                       "history": "[]", "rng": {}})
    before = _snapshot(rd, recipe=False)
    r = _mut(lambda r: r["stages"].append({"type": "train", "epochs": 2, "batch_size": 128}))
    _expect(_cli(["run", write(r)], capsys, monkeypatch), "written for 1 epochs", "this run has 2 epochs")
    assert _snapshot(rd, recipe=False) == before


def test_arch_json_not_matching_weights(run, capsys, monkeypatch):
    rd, write = run
    arch = rd / "00_train" / "model" / "arch.json"
    arch.write_text(arch.read_text().replace('"blocks.0.mlp": 64', '"blocks.0.mlp": 48'))
    before = _snapshot(rd, recipe=False)
    _expect(_cli(["inspect", rd / "00_train" / "model"], capsys, monkeypatch), str(rd / "00_train" / "model"))
    r = _mut(lambda r: r["stages"].append({"type": "train", "epochs": 1, "batch_size": 128}))
    _expect(_cli(["run", write(r)], capsys, monkeypatch), str(rd / "00_train" / "model"))
    assert _snapshot(rd, recipe=False) == before


def test_onnx_failing_the_checker(run, capsys, monkeypatch):
    import onnx

    rd, write = run
    path = rd / "01_export" / "model.onnx"
    m = onnx.load(str(path))
    m.graph.node[0].input[0] = "no_such_tensor"        # dangling input: the checker rejects the graph
    path.write_bytes(m.SerializeToString())
    before = _snapshot(rd)
    r = _mut(lambda r: r["stages"].append({"type": "validate", "batch_sizes": [1], "warmup": 0, "repeats": 1}))
    _expect(_cli(["run", write(r)], capsys, monkeypatch), str(path), "ONNX checker")
    path.write_bytes(b"\x00garbage\xff" * 10)
    before = _snapshot(rd)
    _expect(_cli(["run", write(r)], capsys, monkeypatch), str(path), "ONNX checker")
    assert _snapshot(rd) == before


def test_run_dir_of_another_recipe_and_missing_resume_dir(run, capsys, monkeypatch, tmp_path):
    rd, write = run
    before = _snapshot(rd)
    _expect(_cli(["run", write(_mut(lambda r: r.update(seed=5)))], capsys, monkeypatch),
            str(rd), "different seed")
    _expect(_cli(["run", write(BASE), "--resume", tmp_path / "gone"], capsys, monkeypatch),
            str(tmp_path / "gone"), "does not exist")
    _expect(_cli(["run", write(BASE), "--set", "stages[0].epochz=3"], capsys, monkeypatch), "epochz")
    _expect(_cli(["run", tmp_path / "missing.yaml"], capsys, monkeypatch), "missing.yaml", "does not exist")
    assert _snapshot(rd) == before


def test_real_process_prints_one_sentence(tmp_path):
    """The same through a real interpreter: exit status 2 and no traceback on stderr."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_mut(lambda r: r["stages"][0].update(lr="fast"))))
    res = subprocess.run([sys.executable, "-m", "vitopt", "run", str(p)], capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "stages[0].lr" in " ".join(res.stderr.split())


# ------------------------------------------------------------------ property-based: mutated recipes

_values = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


FULL = {**copy.deepcopy(BASE), "stages": [
    {"type": "train", "epochs": 1}, {"type": "sparse_train", "epochs": 1, "lambda": 1e-4},
    {"type": "prune", "criterion": "gate", "target": {"flops": 0.5}, "round_to": {"heads": 1}},
    {"type": "finetune", "epochs": 1, "kd": {"alpha": 0.5}}, {"type": "export"}, {"type": "validate"}]}
ALL_PATHS = [p for p in _paths(FULL) if p]


@st.composite
def mutated(draw):
    r = copy.deepcopy(FULL)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        parent = r
        try:
            for k in path[:-1]:
                parent = parent[k]
            op = draw(st.sampled_from(["set", "delete", "add_key"]))
            if op == "set":
                parent[path[-1]] = draw(_values)
            elif op == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=8))] = draw(_values)
        except (KeyError, IndexError, TypeError):
            pass
    return r


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=mutated(), raw=st.booleans(), junk=st.text(max_size=40))
def test_loader_never_raises_anything_but_vitopt_error(tmp_path, recipe, raw, junk):
    from vitopt.recipe import load_recipe

    p = tmp_path / "m.yaml"
    p.write_text(junk if raw else yaml.safe_dump(recipe, allow_unicode=True))
    try:
        load_recipe(p)
    except VitoptError as exc:
        assert str(exc).strip() and "Traceback" not in str(exc)


def test_source_never_loads_untrusted_data_unsafely():
    """Security (issue #6, item 6): YAML only through safe_load, no eval/exec of recipe strings, no shell,
    torch.load only with weights_only=True, pickles only through the arrays-only CIFAR unpickler."""
    import re

    bad = re.compile(r"yaml\.load\(|yaml\.unsafe_load|(?<![\w.])eval\(|(?<![\w.])exec\(|shell=True|os\.system\(|"
                     r"pickle\.loads?\(|expandvars\(")
    found = []
    for path in sorted((ROOT / "vitopt").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if bad.search(line) or ("torch.load(" in line and "weights_only=True" not in line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert found == []
    assert "find_class" in (ROOT / "vitopt" / "train" / "images.py").read_text()
