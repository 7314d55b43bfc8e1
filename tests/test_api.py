"""The public Python API: vitopt.structure / importance / allocate / apply_plan / prune / save / load.

Random-init models only. FLOPs are checked against ``torch.utils.flop_counter`` (attention in its
eager form, which the counter sees on CPU), not against vitopt's own cost model.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitopt
from vitopt.arch.config import create_model
from vitopt.deploy.onnx_export import eager_attention
from vitopt.errors import VitoptError
from vitopt.pruning.calibration import calibration_batches

SWIN = ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2),
                                             num_heads=(2, 4), num_classes=10))
PVT = ("pvt_v2_b0", dict(img_size=64, embed_dims=(32, 64), depths=(1, 2), num_heads=(1, 2), mlp_ratios=(4, 4),
                         sr_ratios=(2, 1), num_classes=10))
TINY = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=3, num_heads=4)


def _counted_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    model.eval()
    with torch.no_grad(), eager_attention(model), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *shape))
    return int(counter.get_total_flops())


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, kwargs, shape", [
    ("deit_small_patch16_224", {}, (3, 224, 224)),
    (*SWIN, (3, 32, 32)),
    (*PVT, (3, 64, 64)),
])
def test_prune_meets_the_flops_target_counted_by_torch(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, kwargs).eval()            # timm, recording PVTv2's input size
    before = _state(model)
    groups = ("embed", "heads", "head_dim", "mlp")
    pruned = vitopt.prune(model, target={"flops": 0.5}, criterion="l1", compare="normalized", groups=groups)
    assert type(pruned) is type(model)
    ratio = _counted_flops(pruned, shape) / _counted_flops(model, shape)
    assert ratio <= 0.5, ratio
    assert ratio >= 0.495, ratio         # allocation lands within 0.5% of dense under the budget
    after = model.state_dict()           # the input model is untouched (no inplace)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # still a working timm model
    with torch.no_grad():
        out = pruned.forward_head(pruned.forward_features(torch.randn(2, *shape)))
    assert out.shape == (2, 10 if "num_classes" in kwargs else 1000)


def test_inplace_prunes_the_given_model():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", **TINY)
    same = vitopt.prune(model, target={"flops": 0.6}, criterion="l1", compare="normalized", inplace=True)
    assert same is model and vitopt.structure(model).cost("flops") <= 0.6 * vitopt.structure(
        timm.create_model("deit_tiny_patch16_224", **TINY)).cost("flops")


@pytest.mark.parametrize("reconstruct", [False, True])
def test_prune_equals_the_recipe_path(tmp_path, reconstruct):
    """The prune stage and vitopt.prune give the same kept units (the same weights) for the same seed and data,
    also with the least-squares refit of the consumers (``reconstruct``) that the stage passes through."""
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe
    from vitopt.stages import recipe_choices
    from vitopt.train.data import load_data
    from vitopt.train.inputs import model_input

    recipe_text = f"""
name: api
seed: 5
output_dir: {tmp_path}
model:
  name: deit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 64, depth: 2, num_heads: 4}}
data: {{type: digits}}
stages:
  - type: prune
    criterion: taylor
    target: {{flops: 0.5}}
    groups: [embed, heads, head_dim, mlp]
    calibration: {{batches: 3, batch_size: 32}}
    reconstruct: {str(reconstruct).lower()}
"""
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text)
    recipe = load_recipe(path, choices=recipe_choices())
    run_dir = run_recipe(recipe)
    stage_model = vitopt.load(run_dir)                        # a run directory loads its last model
    dense = vitopt.load(run_dir / "00_prune" / "teacher")     # the model as it entered the stage
    data = load_data(recipe.data, model_input(dense), recipe.seed)
    calib = calibration_batches(data.train, "taylor", batches=3, batch_size=32, seed=recipe.seed * 1000 + 0)
    api_model = vitopt.prune(dense, target={"flops": 0.5}, criterion="taylor", data=calib,
                             groups=("embed", "heads", "head_dim", "mlp"),
                             round_to={"heads": 1, "head_dim": 8, "mlp": 8, "embed": 8}, reconstruct=reconstruct)
    a, b = api_model.state_dict(), stage_model.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def test_lower_level_steps_compose_to_prune():
    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_patch16_224", **TINY)
    structure = vitopt.structure(model)
    assert "blocks.0.heads" in repr(structure) and "MFLOPs/unit" in structure.table()
    scores = vitopt.importance(model, "l1", groups=["heads", "mlp"])
    assert set(scores) == {g for g in structure.groups if g.endswith((".heads", ".mlp"))}
    plan = vitopt.allocate(structure, scores, target={"flops": 0.7})
    pruned = vitopt.apply_plan(model, plan)
    assert vitopt.structure(pruned).cost("flops") <= 0.7 * structure.cost("flops")
    direct = vitopt.prune(model, target={"flops": 0.7}, criterion="l1", compare="normalized", groups=["heads", "mlp"])
    assert vitopt.structure(direct).sizes() == vitopt.structure(pruned).sizes()
    shape = vitopt.allocate(structure, scores, target={"shape": {"heads": 2, "mlp": 64}})
    assert {len(v) for k, v in shape.keep.items() if k.endswith(".heads")} == {2}


def test_save_load_roundtrip_reads_the_kwargs_back(tmp_path):
    torch.manual_seed(2)
    model = timm.create_model("deit_tiny_patch16_224", **{**TINY, "reg_tokens": 2, "qkv_bias": False})
    pruned = vitopt.prune(model, target={"flops": 0.5}, criterion="l1", compare="normalized", groups=("embed", "heads", "mlp"))
    vitopt.save(pruned, tmp_path / "m")
    again = vitopt.load(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), pruned.eval()(x))


def test_save_refuses_kwargs_it_cannot_read_back(tmp_path):
    model = timm.create_model("deit_tiny_patch16_224", **TINY)
    model.blocks[0].mlp.fc2 = torch.nn.Linear(model.blocks[0].mlp.fc2.in_features, 64, bias=False)
    with pytest.raises(VitoptError, match="pass model_kwargs="):
        vitopt.save(model, tmp_path / "m")


def test_iterative_schedule_recovers_between_rounds():
    torch.manual_seed(3)
    model = timm.create_model("deit_tiny_patch16_224", **TINY)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    calls = []

    def recover(m, rnd, teacher):
        calls.append((rnd, type(teacher).__name__, vitopt.structure(m).cost("flops")))
        return {"round": rnd}

    res = vitopt.prune_with_report(model, target={"flops": 0.5}, criterion="taylor", data=batches,
                                   schedule="iterative", rounds=3, recover=recover)
    assert [c[0] for c in calls] == [1, 2] and len(res.rounds) == 3
    assert calls[0][2] > calls[1][2]                          # each round removes more
    assert res.rounds[-1]["achieved"] <= res.rounds[-1]["budget"]
    assert vitopt.structure(res.model).cost("flops") <= 0.5 * vitopt.structure(model).cost("flops")
    assert [r.get("recovery") for r in res.rounds] == [{"round": 1}, {"round": 2}, None]


def test_kd_recovery_trains_from_the_unpruned_teacher():
    torch.manual_seed(4)
    model = timm.create_model("deit_tiny_patch16_224", **TINY)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    res = vitopt.prune_with_report(model, target={"flops": 0.6}, criterion="l1", compare="normalized", schedule="iterative", rounds=2,
                                   recover=vitopt.kd_recovery(data, steps=3, lr=1e-4))
    assert res.rounds[0]["recovery"]["steps"] == 3 and res.rounds[0]["recovery"]["train_loss"] > 0


@pytest.mark.parametrize("call, message", [
    (lambda m: vitopt.prune(m, target={"flops": 0.5}, criterion="taylor"), "needs data"),
    (lambda m: vitopt.prune(m, target={"flops": 1.5}), "in \\(0, 1\\]"),
    (lambda m: vitopt.prune(m, target={"flop": 0.5}), "exactly one of"),
    (lambda m: vitopt.prune(m, target={"flops": 0.5}, schedule="greedy"), "unknown schedule"),
    (lambda m: vitopt.prune(m, target={"flops": 0.5}), "needs data"),                # the defaults calibrate on data
    (lambda m: vitopt.prune(m, target={"flops": 0.5}, criterion="l1"), "compare='calibrated' needs data"),
    (lambda m: vitopt.prune(m, target={"flops": 0.5}, criterion="l1", compare="normalized", groups=["tokens"]),
     "neither group kinds"),
    (lambda m: vitopt.importance(m, "kl", data=[(torch.randn(2, 3, 32, 32), torch.zeros(2))], bogus=1),
     "does not take option"),
    (lambda m: vitopt.prune(m, target={"flops": 0.5}, criterion="gate", compare="normalized"), "needs gates"),
    (lambda m: vitopt.prune(m, target={"latency_ms": 2.0}), "needs 'lut'"),
])
def test_bad_api_calls_are_one_sentence(call, message):
    model = timm.create_model("deit_tiny_patch16_224", **TINY)
    with pytest.raises(VitoptError, match=message):
        call(model)


def test_a_new_criterion_is_one_registration():
    """A criterion registered from user code is usable by name through the API and in recipes."""
    from vitopt.pruning.criteria import CRITERIA, Criterion, Scores, register_criterion
    from vitopt.stages import recipe_choices

    def reverse_index(model, structure, groups, **_):
        return Scores({g: torch.arange(structure.groups[g].size, 0, -1, dtype=torch.float64) for g in groups},
                      criterion="reverse")

    saved = dict(CRITERIA)
    try:
        register_criterion(Criterion("reverse", reverse_index))
        assert "reverse" in recipe_choices().criteria
        model = timm.create_model("deit_tiny_patch16_224", **TINY)
        pruned = vitopt.prune(model, target={"shape": {"mlp": 64}}, criterion="reverse", groups=["mlp"])
        kept = pruned.blocks[0].mlp.fc1.weight
        torch.testing.assert_close(kept, model.blocks[0].mlp.fc1.weight[:64])   # the 64 lowest indices
    finally:
        CRITERIA.clear()
        CRITERIA.update(saved)


def test_structure_unit_costs_price_one_unit():
    model = timm.create_model("deit_tiny_patch16_224", **TINY)
    st = vitopt.structure(model)
    costs = st.unit_costs()
    one = copy.deepcopy(st.sizes())
    one["blocks.1.mlp"] -= 1
    assert costs["blocks.1.mlp"]["flops"] == pytest.approx(st.cost("flops") - st.cost("flops", one))
    assert costs["blocks.1.mlp"]["params"] == 2 * 64 + 1      # fc1 row + bias, fc2 column
