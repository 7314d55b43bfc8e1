"""End to end: a small recipe through every stage, resume, and the CLI's bad-input contract."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import yaml

import vitopt
from vitopt.pipeline import run_recipe
from vitopt.recipe import load_recipe


@pytest.fixture(scope="module")
def run_dir(e2e_run):
    return e2e_run


@pytest.mark.slow
def test_every_stage_leaves_its_outputs(run_dir):
    run, _ = run_dir
    labels = ["00_train", "01_sparse_train", "02_prune", "03_finetune", "04_export", "05_validate"]
    for label in labels:
        assert (run / label / "metrics.json").is_file(), label
    for label in ("00_train", "01_sparse_train", "02_prune", "03_finetune"):
        assert (run / label / "model" / "arch.json").is_file()
    assert (run / "01_sparse_train" / "gates.safetensors").is_file()
    assert (run / "04_export" / "model.onnx").is_file()
    assert (run / "recipe.yaml").is_file()

    prune = json.loads((run / "02_prune" / "metrics.json").read_text())["metrics"]
    assert prune["flops_ratio"] <= 0.6
    assert len(prune["blocks"]) == 2
    for b in prune["blocks"]:
        assert 1 <= b["heads_kept"] <= b["heads"] and b["mlp_kept"] % 16 == 0 and b["head_dim_kept"] % 8 == 0

    val = json.loads((run / "05_validate" / "metrics.json").read_text())["metrics"]
    final = val["final"]
    assert final["parity"]["max_abs_diff"] <= 1e-4
    assert final["parity"]["argmax_agreement"] == 1.0
    assert final["runtimes"]["onnxruntime"]["top1"] == final["runtimes"]["pytorch"]["top1"]
    assert val["reference"]["flops"] > final["flops"]
    # final and dense timed against each other in 3 interleaved rounds per runtime and batch size; the
    # recorded ratio is the median of the per-round ratios, and each model's ms come from the same rounds
    for kind in ("pytorch", "onnxruntime"):
        for b in ("1", "4"):
            r = val["latency_vs_reference"][kind][b]
            assert len(r["rounds"]) == 3 and r["median"] == pytest.approx(statistics.median(r["rounds"]))
            assert (r["min"], r["max"]) == (min(r["rounds"]), max(r["rounds"]))
            f, d = final["runtimes"][kind]["latency"][b], val["reference"]["runtimes"][kind]["latency"][b]
            assert f["rounds"] == d["rounds"] == 3
    assert val["timing"]["rounds"] == 3 and val["timing"]["load_after"]["cpu_count"] >= 1

    summary = (run / "summary.md").read_text()
    r = val["latency_vs_reference"]["onnxruntime"]["4"]
    for needle in ("## Stages", "## Final vs dense", "## Kept units per block", "top-1 onnxruntime",
                   "onnxruntime latency batch 4 p50", "median of 3 interleaved rounds",
                   f"| onnxruntime latency batch 4, final / dense per round (min-max) |  |  | "
                   f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f}) |"):
        assert needle in summary, needle
    numbers = json.loads((run / "summary.json").read_text())
    assert numbers["flops_ratio"] == prune["flops_ratio"]
    assert numbers["validate"]["latency_ratio"]["onnxruntime"]["4"]["median"] == r["median"]
    assert numbers["final_top1"] == json.loads((run / "03_finetune" / "metrics.json").read_text())["metrics"]["val_top1"]


@pytest.mark.slow
def test_saved_model_reloads_without_recipe(run_dir):
    run, _ = run_dir
    model = vitopt.load(run / "03_finetune" / "model")
    dims = json.loads((run / "03_finetune" / "model" / "arch.json").read_text())["dims"]
    assert model.blocks[0].mlp.fc1.out_features == dims["blocks.0.mlp"]
    logits = model(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10)


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_resumes_the_rest(run_dir):
    run, recipe_path = run_dir
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/metrics.json")}
    (run / "05_validate" / "metrics.json").unlink()          # as if killed during validate
    run_recipe(load_recipe(recipe_path))
    for p, t in stamps.items():
        if p.parent.name != "05_validate":
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    assert (run / "05_validate" / "metrics.json").is_file()
    # a run made before an option existed (its stored configs lack the key) is still the same run
    for f in (run / "recipe.yaml", run / "00_train" / "metrics.json"):
        stamps[f] = f.stat().st_mtime_ns
    rec = json.loads((run / "00_train" / "metrics.json").read_text())
    del rec["config"]["grad_clip"]
    (run / "00_train" / "metrics.json").write_text(json.dumps(rec))
    stamps[run / "00_train" / "metrics.json"] = (run / "00_train" / "metrics.json").stat().st_mtime_ns
    old_recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    del old_recipe["data"]["num_workers"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(old_recipe))
    (run / "05_validate" / "metrics.json").unlink()
    run_recipe(load_recipe(recipe_path))
    for p, t in stamps.items():
        if p.parent.name != "05_validate" and p.name == "metrics.json":
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten"
    # a different config for a finished stage is refused rather than silently mixed
    with pytest.raises(vitopt.errors.VitoptError, match="different config"):
        run_recipe(load_recipe(recipe_path, ["stages[0].epochs=3"]))
    with pytest.raises(vitopt.errors.VitoptError, match="different model and seed"):
        run_recipe(load_recipe(recipe_path, ["seed=4", "model.kwargs.depth=3"]))


def _cli(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "vitopt.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_bad_recipe_is_one_sentence(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: deit_tiny_patch16_224}\ndata: {type: digits}\nstages:\n  - {type: prune, target: {flops: 1.5}}\n")
    res = _cli("recipe", "check", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"{bad}:4: stages[0].target.flops" in " ".join(res.stderr.split())
    res = _cli("run", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_cli_unknown_model_and_inspect(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nmodel: {{name: deit_tinyy}}\ndata: {{type: digits}}\nstages:\n  - {{type: export}}\n")
    res = _cli("run", str(recipe))
    assert res.returncode == 2 and "not a timm model name" in res.stderr and "Traceback" not in res.stderr

    import timm

    from vitopt.arch.config import save_pruned

    model = timm.create_model("deit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2,
                              num_heads=2, num_classes=10)
    save_pruned(model, tmp_path / "m", "deit_tiny_patch16_224",
                dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10))
    res = _cli("inspect", str(tmp_path / "m"))
    assert res.returncode == 0, res.stderr
    from vitopt.arch.cost import CostModel

    cm = CostModel(model)
    assert f"{cm.flops(cm.structure.sizes()) / 1e6:.2f} MFLOPs" in res.stdout


def test_cli_schema_is_json():
    res = _cli("recipe", "schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert "stages" in schema["properties"]


ISSUE3 = """
name: {name}
seed: 1
output_dir: {out}
model:
  name: deit3_small_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 64, depth: 2, num_heads: 4, init_values: 0.1}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 1, lr: 2.0e-3}}
  - type: prune
    criterion: {criterion}
    target: {target}
    groups: [embed, heads, head_dim, mlp]
    round_to: {{heads: 1, head_dim: 8, mlp: 16, embed: 16}}
    schedule: {schedule}
    iterative: {{rounds: 2, train_steps: 3}}
    calibration: {{batches: 2, batch_size: 32, per_class: 2}}
  - {{type: finetune, epochs: 1}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("criterion,target,schedule", [
    ("kl", "{shape: {embed: 48, heads: 2, head_dim: 16, mlp: 128}}", "one_shot"),
    ("taylor", "{flops: 0.5}", "iterative"),
    ("hessian", "{params: 0.6}", "one_shot"),
])
def test_prune_targets_and_criteria_end_to_end(tmp_path, criterion, target, schedule):
    path = tmp_path / "r.yaml"
    path.write_text(ISSUE3.format(name=criterion, out=tmp_path, criterion=criterion, target=target, schedule=schedule))
    run = run_recipe(load_recipe(path))
    m = json.loads((run / "01_prune" / "metrics.json").read_text())["metrics"]
    model = vitopt.load(run / "02_finetune" / "model")
    if criterion == "kl":   # the exact shape, in every block
        assert model.embed_dim == 48 and m["embed"]["after"] == 48
        for blk in model.blocks:
            assert (blk.attn.num_heads, blk.attn.head_dim, blk.mlp.fc1.out_features) == (2, 16, 128)
            assert blk.ls1.gamma.shape == (48,)
        assert m["rounds"][0]["criterion_cost"]["forward_passes"] > 0
    elif criterion == "taylor":
        assert m["flops_ratio"] <= 0.5 and len(m["rounds"]) == 2
        assert m["rounds"][0]["budget"] > m["rounds"][1]["budget"]
        assert "recovery" in m["rounds"][0]
    else:
        assert m["params_ratio"] <= 0.6
    assert model.embed_dim % 16 == 0
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_tensorboard_logs_every_epoch_of_every_training_stage(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "tb.yaml"
    path.write_text(f"""
name: tb
output_dir: {tmp_path}
log: {{tensorboard: true}}
model:
  name: deit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 4, in_chans: 1, embed_dim: 32, depth: 1, num_heads: 2}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 2}}
  - {{type: sparse_train, epochs: 1}}
""")
    run = run_recipe(load_recipe(path))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"00_train/val_top1", "00_train/train_loss", "01_sparse_train/gate_mean"} <= tags
    top1 = [e.value for e in acc.Scalars("00_train/val_top1")]
    history = json.loads((run / "00_train" / "metrics.json").read_text())["metrics"]["history"]
    assert top1 == pytest.approx([h["val_top1"] for h in history])


TEACHER_RECIPE = """
name: kd
seed: 1
output_dir: {out}
model:
  name: deit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 1, lr: 3.0e-3, batch_size: 128}}
  - {{type: prune, criterion: l1, target: {{flops: 0.6}}, round_to: {{heads: 1, head_dim: 8, mlp: 16}}}}
  - {{type: finetune, epochs: 1, lr: 1.0e-3, batch_size: 128, kd: {{alpha: 0.5, tau: 2.0}}}}
"""


@pytest.mark.slow
def test_finetune_distills_from_the_model_before_prune(tmp_path, monkeypatch):
    """The finetune stage's KD teacher is the model as it entered prune (the trained dense model), both in
    the run that pruned it and in a run resumed after prune, never a copy of the pruned student."""
    import vitopt.stages.finetune as finetune_stage

    seen = []
    real_fit = finetune_stage.fit

    def spy(model, *args, teacher=None, **kwargs):
        seen.append(teacher)
        return real_fit(model, *args, teacher=teacher, **kwargs)

    monkeypatch.setattr(finetune_stage, "fit", spy)
    path = tmp_path / "kd.yaml"
    path.write_text(TEACHER_RECIPE.format(out=tmp_path))
    run = run_recipe(load_recipe(path))
    (run / "02_finetune" / "metrics.json").unlink()              # resume: the teacher comes back from disk
    run_recipe(load_recipe(path))
    assert len(seen) == 2
    dense = vitopt.load(run / "00_train" / "model").eval()
    pruned = vitopt.load(run / "01_prune" / "model").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want, student = dense(x), pruned(x)
    assert vitopt.structure(pruned).sizes() != vitopt.structure(dense).sizes()
    for teacher in seen:
        assert teacher is not None and not teacher.training
        assert vitopt.structure(teacher).sizes() == vitopt.structure(dense).sizes()
        with torch.no_grad():
            got = teacher(x)
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
        assert not torch.allclose(got, student, atol=1e-3)
