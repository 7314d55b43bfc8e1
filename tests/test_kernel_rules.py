"""Kernel-friendly kept sizes (vitopt.deploy.kernel_rules): every documented rule on a table of cases."""

from __future__ import annotations

import itertools

import pytest

from vitopt.deploy.kernel_rules import SOURCES, kernel_rules, round_rules, rules_table
from vitopt.deploy.targets import PRECISIONS, load_targets
from vitopt.errors import VitoptError
from vitopt.pruning.allocation import allowed_sizes

# (target, precision, num_tokens, sparsity, kind, size, allowed, the rule that decides it)
CASES = [
    # fp16 / bf16 fused MHA: 16 <= head_dim <= 256, % 8 (TensorRT MHA fusion restrictions)
    ("h100", "fp16", 197, False, "head_dim", 64, True, "fp16-fused-mha"),
    ("h100", "fp16", 197, False, "head_dim", 72, True, "fp16-fused-mha"),
    ("h100", "fp16", 197, False, "head_dim", 16, True, "fp16-fused-mha"),
    ("h100", "fp16", 197, False, "head_dim", 256, True, "fp16-fused-mha"),
    ("h100", "fp16", 197, False, "head_dim", 8, False, "fp16-fused-mha"),
    ("h100", "fp16", 197, False, "head_dim", 12, False, "fp16-fused-mha"),
    ("h100", "fp16", 197, False, "head_dim", 264, False, "fp16-fused-mha"),
    ("a100", "bf16", 197, False, "head_dim", 24, True, "bf16-fused-mha"),
    ("a100", "bf16", 197, False, "head_dim", 20, False, "bf16-fused-mha"),
    # tensor-core alignment of GEMM K/N: 8 dense fp16/bf16, 16 with 2:4 sparse weights
    ("h100", "fp16", 197, False, "mlp", 1544, True, "tc-align-x8"),
    ("h100", "fp16", 197, False, "mlp", 1540, False, "tc-align-x8"),
    ("h100", "fp16", 197, False, "embed", 388, False, "tc-align-x8"),
    ("h100", "fp16", 197, True, "mlp", 1544, False, "tc-align-x16"),
    ("h100", "fp16", 197, True, "mlp", 1552, True, "tc-align-x16"),
    # int8: fused MHA head_dim in {16, 32, 64} while the sequence is <= 512
    ("h100", "int8", 197, False, "head_dim", 64, True, "int8-fused-mha"),
    ("h100", "int8", 197, False, "head_dim", 32, True, "int8-fused-mha"),
    ("h100", "int8", 197, False, "head_dim", 48, False, "int8-fused-mha"),
    ("h100", "int8", 197, False, "head_dim", 128, False, "int8-fused-mha"),
    ("orin-agx", "int8", 197, False, "head_dim", 16, True, "int8-fused-mha"),
    # ... above 512 tokens ModelOpt leaves the MHA in fp16: the fp16 rule decides
    ("h100", "int8", 785, False, "head_dim", 48, True, "int8-model-fp16-mha(seq>512)"),
    ("h100", "int8", 785, False, "head_dim", 12, False, "int8-model-fp16-mha(seq>512)"),
    # int8 GEMMs: multiples of 32 and K, N >= 16 for Q/DQ
    ("h100", "int8", 197, False, "mlp", 1536, True, "tc-align-x32"),
    ("h100", "int8", 197, False, "mlp", 1544, False, "tc-align-x32"),
    ("h100", "int8", 785, False, "head_dim", 8, False, "qdq-gemm-min16"),
    ("h100", "int8", 197, False, "embed", 32, True, "qdq-gemm-min16"),
    # fp8: Hopper 16..256 % 8, Ada 16..64 % 8 up to 3072 tokens; GEMMs multiples of 16 (cuBLASLt)
    ("h100", "fp8", 197, False, "head_dim", 128, True, "fp8-fused-mha"),
    ("h200", "fp8", 197, False, "head_dim", 256, True, "fp8-fused-mha"),
    ("h100", "fp8", 197, False, "head_dim", 264, False, "fp8-fused-mha"),
    ("l4", "fp8", 197, False, "head_dim", 64, True, "fp8-ada-fused-mha"),
    ("l4", "fp8", 197, False, "head_dim", 72, False, "fp8-ada-fused-mha"),
    ("l4", "fp8", 4000, False, "head_dim", 128, True, "fp8-ada-fp16-mha(seq>3072)"),
    ("l4", "fp8", 4000, False, "head_dim", 260, False, "fp8-ada-fp16-mha(seq>3072)"),
    ("h100", "fp8", 197, False, "mlp", 1544, False, "tc-align-x16"),
    ("h100", "fp8", 197, False, "mlp", 1552, True, "tc-align-x16"),
    ("h100", "fp8", 197, False, "embed", 16, True, "qdq-gemm-min16"),
    # fp32: no fused MHA; TF32 alignment 4
    ("h100", "fp32", 197, False, "head_dim", 12, True, "tf32-align-x4"),
    ("h100", "fp32", 197, False, "head_dim", 6, False, "tf32-align-x4"),
    ("h100", "fp32", 197, False, "mlp", 1538, False, "tc-align-x4"),
    ("orin-nano", "fp32", 197, False, "embed", 20, True, "tc-align-x4"),
]


@pytest.mark.parametrize("target, precision, tokens, sparse, kind, size, allowed, rule", CASES)
def test_rule_table(target, precision, tokens, sparse, kind, size, allowed, rule):
    rules = kernel_rules(target, precision, num_tokens=tokens, sparsity=sparse)
    by_name = {r.name: r for r in rules if r.kind == kind}
    assert rule in by_name, f"{rule} is not among the {kind} rules {sorted(by_name)}"
    assert by_name[rule](size) is allowed
    combined = round_rules(target, precision, num_tokens=tokens, sparsity=sparse)[kind]
    assert combined(size) is (allowed and all(r(size) for r in by_name.values()))


def test_the_table_checks_every_rule_there_is():
    every = set()
    for key, t in load_targets().items():
        for precision, tokens, sparse in itertools.product(t.precisions, (197, 785, 4000), (False, True)):
            every |= {r.name for r in kernel_rules(key, precision, num_tokens=tokens, sparsity=sparse)}
    assert every == {c[-1] for c in CASES}


def test_every_rule_cites_a_document():
    for key, t in load_targets().items():
        for precision in t.precisions:
            for row in rules_table(key, precision, num_tokens=197):
                assert row["source"] in SOURCES.values() and row["rule"]


def test_round_rules_feed_allocation_ladders():
    int8 = round_rules("h100", "int8", num_tokens=197)
    assert int8["heads"] == 1
    assert allowed_sizes(64, int8["head_dim"], 1) == [64, 32, 16]
    fp16 = round_rules("orin-agx", "fp16", num_tokens=197)
    assert allowed_sizes(64, fp16["head_dim"], 1) == [64, 56, 48, 40, 32, 24, 16]
    assert allowed_sizes(100, round_rules("h100", "int8")["mlp"], 1) == [100, 96, 64, 32]
    assert "head_dim" in repr(fp16["head_dim"])


def test_bad_requests_are_one_sentence():
    with pytest.raises(VitoptError, match="does not run fp8"):
        kernel_rules("a100", "fp8")
    with pytest.raises(VitoptError, match="unknown precision 'int4'"):
        kernel_rules("h100", "int4")
    with pytest.raises(VitoptError, match="unknown target"):
        kernel_rules("gtx1080", "fp16")
    assert set(PRECISIONS) >= set(load_targets()["h100"].precisions)


# ------------------------------------------------------------------------------------ round_to: auto in a recipe
def _prune_cfg(**kw):
    from vitopt.recipe.schema import PruneStage

    return PruneStage(target={"flops": 0.5}, groups=["head_dim", "mlp", "embed"], **kw)


def test_recipe_round_to_auto_needs_a_deploy_target():
    with pytest.raises(ValueError, match="round_to: auto needs deploy_target"):
        _prune_cfg(round_to="auto")
    cfg = _prune_cfg(round_to="auto", deploy_target="h100", deploy_precision="int8")
    assert cfg.round_for("mlp") == 8 and cfg.round_for("heads") == 1       # plain defaults until the stage resolves


@pytest.mark.parametrize("target, precision", [("h100", "int8"), ("orin-agx", "fp16"), ("l4", "fp8")])
def test_auto_pruned_shapes_obey_the_target_rules(target, precision):
    """The prune stage's round_to: auto gives allocation the kernel rules; every kept size then obeys them."""
    import timm

    from vitopt.arch.families import family_of
    from vitopt.pruning.prune import prune
    from vitopt.stages.prune import round_to_for

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=256,
                              depth=2, num_heads=2, num_classes=10).eval()          # head_dim 128, mlp 1024
    cfg = _prune_cfg(round_to="auto", deploy_target=target, deploy_precision=precision)
    rto = round_to_for(cfg, model)
    pruned = prune(model, target={"flops": 0.4}, criterion="l1", compare="normalized", groups=list(cfg.groups), round_to=rto)
    dims = family_of(pruned).read_dims(pruned)
    rules = kernel_rules(target, precision, num_tokens=family_of(model).num_tokens(model))
    for name, size in dims.items():
        kind = name.rsplit(".", 1)[-1]
        for r in rules:
            if r.kind == kind:
                assert r(size), f"{name} = {size} breaks {r.name} ({r.text})"
    assert dims != family_of(model).read_dims(model)
    plain = round_to_for(_prune_cfg(round_to={"mlp": 16}), model)
    assert plain == {"heads": 1, "head_dim": 8, "mlp": 16, "embed": 8, "blocks": 1}
