"""Recipe schema and loader: defaults, aliases, overrides, stage order, error sentences, JSON Schema."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitopt.errors import VitoptError
from vitopt.pruning.criteria import CRITERIA
from vitopt.recipe import (
    STAGE_TYPES,
    PruneStage,
    Recipe,
    SparseTrainStage,
    dump_resolved,
    load_recipe,
    recipe_json_schema,
)
from vitopt.recipe.schema import DATA_TYPES
from vitopt.stages import recipe_choices

#: the registered criteria, as the loader lists them (criteria are added over time)
_CRITERIA = ", ".join(repr(c) for c in CRITERIA)

# Line numbers below refer to this text; keep them in sync when editing it.
VALID = """\
name: quick
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 32, depth: 4}
data:
  type: digits
stages:
  - type: train
    epochs: 2
  - type: sparse_train
    epochs: 2
    lambda: 2.0e-4
  - type: prune
    criterion: gate
    target:
      flops: 0.5
  - type: finetune
    epochs: 2
  - type: export
  - type: validate
"""
LINE = {"stages[1].lambda": 12, "stages[2]": 13, "stages[2].criterion": 14, "stages[2].target": 15,
        "stages[2].target.flops": 16, "stages[4]": 19, "stages[5]": 20, "data.type": 6}

MINIMAL = {"model": {"name": "vit_tiny_patch16_224"}, "data": {"type": "digits"},
           "stages": [{"type": "train", "epochs": 1}]}


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(VitoptError) as info:
        load_recipe(path, overrides, choices=recipe_choices())
    return str(info.value)


def edit(tmp_path: Path, old: str, new: str) -> Path:
    assert old in VALID
    return write(tmp_path, VALID.replace(old, new, 1))


# ----------------------------------------------------------------------------- valid recipes


def test_minimal_recipe_gets_defaults(tmp_path):
    r = load_recipe(write(tmp_path, yaml.safe_dump(MINIMAL)))
    assert (r.name, r.seed, r.output_dir, r.run_dir) == ("run", 0, Path("runs"), Path("runs/run"))
    assert r.model.kwargs == {} and r.model.pretrained is False and r.model.checkpoint is None
    assert r.data.type == "digits" and r.data.val_fraction == 0.2 and r.data.mean is None
    assert r.log.tensorboard is False
    s = r.stages[0]
    assert (s.batch_size, s.lr, s.min_lr, s.weight_decay, s.warmup_epochs, s.label_smoothing, s.grad_clip) == \
        (64, 1e-3, 1e-5, 0.05, 0, 0.1, None)


def test_full_recipe_stage_classes_and_defaults(tmp_path):
    r = load_recipe(write(tmp_path, VALID))
    assert [type(s) for s in r.stages] == [STAGE_TYPES[t] for t in
                                           ("train", "sparse_train", "prune", "finetune", "export", "validate")]
    sparse, prune, finetune, export, validate = r.stages[1:]
    assert sparse.lambda_ == 2e-4 and sparse.groups == ["heads", "head_dim", "mlp"] and sparse.threshold == 0.05
    assert prune.target.flops == 0.5 and prune.target.params is None and prune.scope == "global"
    assert finetune.kd.enabled and (finetune.kd.alpha, finetune.kd.tau) == (0.5, 4.0)
    assert (export.opset, export.dynamic_batch, export.simplify) == (17, True, True)
    assert validate.runtimes == ["pytorch", "onnxruntime"] and validate.batch_sizes == [1, 32]


def test_lambda_alias_round_trips(tmp_path):
    stage = SparseTrainStage.model_validate({"epochs": 1, "lambda": 3e-4})
    assert stage.lambda_ == 3e-4
    assert SparseTrainStage(epochs=1, lambda_=5e-4).lambda_ == 5e-4  # populate_by_name
    assert stage.model_dump(by_alias=True)["lambda"] == 3e-4
    r = load_recipe(write(tmp_path, VALID))
    text = dump_resolved(r)
    assert "lambda: 0.0002" in text and "lambda_" not in text
    assert load_recipe(write(tmp_path, text, "resolved.yaml")) == r


def test_round_for_and_min_keep():
    target = {"flops": 0.5}
    assert [PruneStage(target=target).round_for(g) for g in ("heads", "head_dim", "mlp")] == [1, 8, 8]
    assert PruneStage(target=target, round_to=16).round_for("mlp") == 16
    by_group = PruneStage(target=target, round_to={"heads": 2, "mlp": 32})
    assert [by_group.round_for(g) for g in ("heads", "head_dim", "mlp")] == [2, 8, 32]
    assert PruneStage(target=target, min_keep={"heads": 2}).min_keep_for("heads") == 2
    assert PruneStage(target=target).min_keep_for("mlp") == 1


# ----------------------------------------------------------------------------- error sentences


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"recipe file {tmp_path / 'nope.yaml'} does not exist."


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: a\nmodel:\n  name: [1,\n  2\nstages: x: y\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:5: the file is not valid YAML: ")


def test_unsafe_tag_is_rejected_not_executed(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['true']\n")
    assert error_of(path).startswith(f"{path}:1: the file is not valid YAML: could not determine a constructor")


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("", "empty"), ("hello\n", "a string")])
def test_top_level_must_be_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    assert error_of(path) == (f"{path}:1: the recipe must be a mapping with keys such as model, data and stages, "
                              f"not {kind}.")


def test_duplicate_key(tmp_path):
    path = edit(tmp_path, "  type: digits\n", "  type: digits\n  type: imagefolder\n")
    assert error_of(path) == (f"{path}:7: data.type: key 'type' appears twice in the same mapping "
                              f"(allowed: each key once).")


def test_number_bound_names_line_path_and_both_bounds(tmp_path):
    path = edit(tmp_path, "flops: 0.5", "flops: 1.5")
    assert error_of(path) == f"{path}:16: stages[2].target.flops: 1.5 is too large (allowed: > 0 and <= 1)."


def test_alias_bound(tmp_path):
    path = edit(tmp_path, "lambda: 2.0e-4", "lambda: -1")
    assert error_of(path) == f"{path}:12: stages[1].lambda: -1 is too small (allowed: >= 0)."


def test_literal_lists_allowed_values(tmp_path):
    path = edit(tmp_path, "criterion: gate", "criterion: magnitude")
    assert error_of(path) == f"{path}:14: stages[2].criterion: 'magnitude' is not allowed (allowed: {_CRITERIA})."


def test_unknown_key_did_you_mean(tmp_path):
    path = edit(tmp_path, "lambda: 2.0e-4", "lamda: 2.0e-4")
    assert error_of(path) == f"{path}:12: stages[1].lamda: unknown key 'lamda' (did you mean 'lambda'?)."
    path = edit(tmp_path, "flops: 0.5", "flop: 0.5")
    assert error_of(path) == f"{path}:16: stages[2].target.flop: unknown key 'flop' (did you mean 'flops'?)."


def test_unknown_key_without_close_match_lists_keys(tmp_path):
    path = edit(tmp_path, "  type: digits\n", "  type: digits\n  zzzzzz: 1\n")
    assert error_of(path) == (f"{path}:7: data.zzzzzz: unknown key 'zzzzzz' "
                              f"(allowed: mean, std, num_workers, type, val_fraction).")


def test_unknown_stage_type_lists_known_types(tmp_path):
    """Issue 17 item 12: a misspelt stage type gets a did-you-mean, like a misspelt key; no close match, none."""
    path = edit(tmp_path, "type: export", "type: exprot")
    assert error_of(path) == (f"{path}:19: stages[4]: unknown stage type 'exprot' "
                              f"(did you mean 'export'? allowed: {', '.join(STAGE_TYPES)}).")
    path = edit(tmp_path, "type: export", "type: compile")
    assert error_of(path) == (f"{path}:19: stages[4]: unknown stage type 'compile' "
                              f"(allowed: {', '.join(STAGE_TYPES)}).")


def test_missing_stage_type(tmp_path):
    path = edit(tmp_path, "  - type: export\n", "  - opset: 17\n")
    assert error_of(path) == (f"{path}:19: stages[4]: missing key 'type' "
                              f"(allowed: {', '.join(STAGE_TYPES)}).")


def test_unknown_data_type(tmp_path):
    path = edit(tmp_path, "type: digits", "type: mnist")
    assert error_of(path) == f"{path}:5: data: unknown type 'mnist' (allowed: {', '.join(DATA_TYPES)})."


def test_missing_required_key_points_at_parent(tmp_path):
    path = edit(tmp_path, "  - type: finetune\n    epochs: 2\n", "  - type: finetune\n")
    assert error_of(path) == f"{path}:17: stages[3].epochs: this required key is missing."


def test_target_needs_exactly_one(tmp_path):
    path = edit(tmp_path, "flops: 0.5", "flops: 0.5\n      params: 0.5")
    assert error_of(path) == f"{path}:15: stages[2].target: set exactly one of target.flops, target.params, target.latency_ms or target.shape."


def test_wrong_type_and_error_count(tmp_path):
    path = edit(tmp_path, "    epochs: 2\n  - type: sparse", "    epochs: two\n    lr: -1\n  - type: sparse")
    assert error_of(path) == f"{path}:9: stages[0].epochs: expected an integer, got 'two' (and 1 more)."


def test_round_to_union_reports_the_matching_member(tmp_path):
    path = edit(tmp_path, "criterion: gate", "criterion: gate\n    round_to: {foo: 16}")
    assert error_of(path) == (f"{path}:15: stages[2].round_to: key 'foo' is not allowed "
                              f"(allowed: 'embed', 'heads', 'head_dim', 'mlp', 'blocks').")
    path = edit(tmp_path, "criterion: gate", "criterion: gate\n    round_to: 0")
    assert error_of(path) == f"{path}:15: stages[2].round_to: 0 is too small (allowed: >= 1)."


def test_duplicate_groups(tmp_path):
    path = edit(tmp_path, "criterion: gate", "criterion: gate\n    groups: [mlp, heads, mlp]")
    assert error_of(path) == f"{path}:15: stages[2].groups: 'mlp' is listed twice (allowed: each item once)."


def test_unsafe_run_name(tmp_path):
    path = edit(tmp_path, "name: quick", "name: ../escape")
    assert error_of(path).startswith(f"{path}:1: name: '../escape' is not allowed (allowed: letters, digits")


# ----------------------------------------------------------------------------- stage order


def test_gate_prune_needs_earlier_sparse_train(tmp_path):
    path = edit(tmp_path, "  - type: sparse_train\n    epochs: 2\n    lambda: 2.0e-4\n", "")
    msg = error_of(path)
    assert msg.startswith(f"{path}:10: stages[1]: a prune stage with criterion 'gate' needs an earlier "
                          f"sparse_train stage")
    assert "allowed: criterion 'l1'" in msg


def test_onnxruntime_validate_needs_earlier_export(tmp_path):
    path = edit(tmp_path, "  - type: export\n", "")
    assert error_of(path).startswith(f"{path}:19: stages[4]: a validate stage with runtime 'onnxruntime' needs "
                                     f"an earlier export stage")
    path = edit(tmp_path, "  - type: export\n  - type: validate\n", "  - type: validate\n    runtimes: [pytorch]\n")
    assert load_recipe(path).stages[-1].runtimes == ["pytorch"]


def test_kd_finetune_needs_earlier_prune(tmp_path):
    path = edit(tmp_path, "  - type: train\n", "  - type: finetune\n")
    assert error_of(path).startswith(f"{path}:8: stages[0]: a finetune stage with kd.enabled needs an earlier "
                                     f"prune stage")
    assert load_recipe(path, ["stages[0].kd.enabled=false"]).stages[0].kd.enabled is False


def test_order_is_checked_for_python_construction_too():
    data = {**MINIMAL, "stages": [{"type": "prune", "criterion": "gate", "target": {"params": 0.5}}]}
    with pytest.raises(Exception, match=r"stages\[0\]: a prune stage with criterion 'gate'"):
        Recipe.model_validate(data)


# ----------------------------------------------------------------------------- overrides


def test_overrides_change_values_and_types(tmp_path):
    path = write(tmp_path, VALID)
    r = load_recipe(path, ["model.kwargs.depth=6", "stages[2].target.flops=0.4", "stages.1.lambda=1e-3",
                           "stages[-1].batch_sizes=[1, 8]", "log.tensorboard=true", "name=other"])
    assert r.model.kwargs == {"img_size": 32, "depth": 6}
    assert r.stages[2].target.flops == 0.4 and isinstance(r.stages[2].target.flops, float)
    assert r.stages[1].lambda_ == 1e-3
    assert r.stages[-1].batch_sizes == [1, 8]
    assert r.log.tensorboard is True and r.name == "other"
    assert load_recipe(path).model.kwargs["depth"] == 4  # the file is untouched


def test_override_creates_missing_mappings(tmp_path):
    r = load_recipe(write(tmp_path, yaml.safe_dump(MINIMAL)), ["model.kwargs.depth=2"])
    assert r.model.kwargs == {"depth": 2}


def test_override_value_error_says_from_set(tmp_path):
    path = write(tmp_path, VALID)
    assert error_of(path, ["stages[2].target.flops=2"]) == (
        f"{path} (from --set): stages[2].target.flops: 2 is too large (allowed: > 0 and <= 1).")


@pytest.mark.parametrize("override, expected", [
    ("stages[9].lr=1", "override 'stages[9].lr=1': index 9 is out of range for stages (allowed: 0 to 5)."),
    ("nokey", "override 'nokey' is not of the form key.path=value (e.g. stages[2].target.flops=0.4)."),
    ("stages[1]lr=1", "override 'stages[1]lr=1' has a malformed key path 'stages[1]lr' "
                      "(allowed: names separated by '.', list indices as [i] or .i)."),
    ("name.x=1", "override 'name.x=1': name is a string, not a mapping or list, so it has no key 'x'."),
    ("stages.lr=1", "override 'stages.lr=1': stages is a list, so 'lr' must be an index (allowed: 0 to 5)."),
    ("stages[0].epochs.x=1", "override 'stages[0].epochs.x=1': stages[0].epochs is a number, not a mapping or "
                             "list, so it has no key 'x'."),
])
def test_bad_override_names_it(tmp_path, override, expected):
    assert error_of(write(tmp_path, VALID), [override]) == expected


# ----------------------------------------------------------------------------- JSON Schema


def test_json_schema_has_every_stage_and_discriminator():
    schema = recipe_json_schema()
    stages = schema["properties"]["stages"]
    assert stages["minItems"] == 1
    items = stages["items"]
    assert items["discriminator"]["propertyName"] == "type"
    assert set(items["discriminator"]["mapping"]) == set(STAGE_TYPES)
    defs = schema["$defs"]
    for cls in STAGE_TYPES.values():
        assert cls.__name__ in defs and defs[cls.__name__]["description"]
    sparse = defs["SparseTrainStage"]["properties"]
    assert "lambda" in sparse and "lambda_" not in sparse and "2104.08500" in sparse["lambda"]["description"]
    assert "Hinton" in defs["KDConfig"]["description"]
    assert set(schema["properties"]["data"]["discriminator"]["mapping"]) == set(DATA_TYPES) >= {"digits", "imagefolder", "cifar10", "cifar100"}
    undocumented = [f"{name}.{key}" for name, d in defs.items() for key, p in d.get("properties", {}).items()
                    if not p.get("description")]
    assert undocumented == []


# ----------------------------------------------------------------------------- property test

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True),
                 st.text(alphabet="abcxyz_.[]=: -1", max_size=8), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(alphabet="abtype", max_size=5), st.integers(), max_size=2),
                 st.sampled_from(["train", "prune", "gate", "digits", "heads", "lambda", "type"]))
KEYS = st.one_of(st.sampled_from(["type", "name", "epochs", "lambda", "target", "flops", "stages", "kd", "x"]),
                 st.text(alphabet="abcz_", min_size=1, max_size=6), st.integers(0, 3), st.none())


def _containers(node, found):
    """Every dict and list inside ``node`` (including itself)."""
    if isinstance(node, (dict, list)):
        found.append(node)
        for child in (node.values() if isinstance(node, dict) else node):
            _containers(child, found)
    return found


@st.composite
def mutated_recipe(draw):
    data = yaml.safe_load(VALID)
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(_containers(data, [])))
        action = draw(st.sampled_from(["drop", "replace", "insert"]))
        if isinstance(target, dict):
            keys = list(target)
            if action == "insert" or not keys:
                target[draw(KEYS)] = draw(JUNK)
            elif action == "drop":
                del target[draw(st.sampled_from(keys))]
            else:
                target[draw(st.sampled_from(keys))] = draw(JUNK)
        elif target:
            i = draw(st.integers(0, len(target) - 1))
            if action == "drop":
                del target[i]
            elif action == "replace":
                target[i] = draw(JUNK)
            else:
                target.insert(i, copy.deepcopy(draw(JUNK)))
    overrides = draw(st.lists(st.sampled_from(["stages[0].epochs=3", "stages[2].target.flops=x", "seed=-1",
                                               "stages[7].lr=1", "model.kwargs.depth=2", "data.type=[1]"]),
                              max_size=2))
    return data, overrides


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_recipe())
def test_mutated_recipes_load_or_raise_vitopt_error(case):
    data, overrides = case
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), yaml.safe_dump(data, sort_keys=False))
        try:
            recipe = load_recipe(path, overrides)
        except VitoptError as e:
            msg = str(e)
            assert msg.endswith(".") and "\n" not in msg and "Traceback" not in msg
            assert msg.startswith((str(path), "override ")), msg
        else:
            assert isinstance(recipe, Recipe)
            again = write(Path(tmp), dump_resolved(recipe), "resolved.yaml")
            assert load_recipe(again) == recipe


def test_prune_combinations_are_checked(tmp_path):
    """Issue 3 options: a latency target needs a LUT; iterative pruning cannot re-score with gates."""
    base = ("model: {name: deit_tiny_patch16_224}\ndata: {type: digits}\nstages:\n"
            "  - {type: sparse_train, epochs: 1}\n  - type: prune\n    criterion: %s\n    target: %s\n%s")
    cases = {
        ("l1", "{latency_ms: 2.0}", ""): "target.latency_ms needs lut",
        ("gate", "{flops: 0.5}", "    schedule: iterative\n"): "schedule 'iterative' re-scores",
        ("l1", "{shape: {embed: 64}}", "    schedule: iterative\n"): "target.shape is applied in one shot",
    }
    for (crit, target, extra), needle in cases.items():
        path = tmp_path / "r.yaml"
        path.write_text(base % (crit, target, extra))
        with pytest.raises(VitoptError) as err:
            load_recipe(path)
        assert needle in str(err.value) and "stages[1]" in str(err.value)
    path.write_text(base % ("kl", "{shape: {embed: 64, heads: 2, mlp: 128}}", "    groups: [embed, heads, mlp]\n"))
    stage = load_recipe(path).stages[1]
    assert stage.target.metric == "shape" and stage.target.shape.embed == 64 and stage.groups[0] == "embed"


def test_every_shipped_recipe_validates():
    """recipes/*.yaml are documentation users copy: each must pass the schema as shipped."""
    folder = Path(__file__).resolve().parents[1] / "recipes"
    files = sorted(folder.glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        recipe = load_recipe(path)
        assert recipe.stages, path
        # the resolved recipe a run directory keeps (vitopt validate / bundle re-read it) loads back equal
        with tempfile.TemporaryDirectory() as tmp:
            assert load_recipe(write(Path(tmp), dump_resolved(recipe), "resolved.yaml")) == recipe, path


def test_prune_stage_scopes_are_the_allocation_scopes():
    """A recipe accepts exactly the scopes the allocator implements (the schema avoids importing torch)."""
    from typing import get_args

    from vitopt.pruning.allocation import SCOPES
    assert set(get_args(PruneStage.model_fields["scope"].annotation)) == set(SCOPES)
    assert PruneStage.model_validate({"target": {"flops": 0.5}, "scope": "per_kind"}).scope == "per_kind"
