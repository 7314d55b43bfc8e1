"""Target profiles (vitopt/deploy/targets.yaml) and `vitopt targets`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vitopt.cli import app
from vitopt.deploy.targets import PRECISIONS, TARGETS_FILE, get_target, load_targets
from vitopt.errors import VitoptError

KEYS = ["h100", "h200", "a100", "l4", "orin-agx", "orin-nx", "orin-nano"]


def test_every_issue_target_is_shipped_as_package_data():
    targets = load_targets()
    assert list(targets) == KEYS
    assert TARGETS_FILE.name == "targets.yaml" and TARGETS_FILE.parent.name == "deploy"


@pytest.mark.parametrize("key", KEYS)
def test_profile_facts(key):
    t = get_target(key)
    assert t.key == key
    # FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper) only
    assert ("fp8" in t.precisions) == (t.sm >= 89)
    assert {"fp16", "int8"} <= set(t.precisions)
    # JetPack 6 stays on TensorRT 10.x; TensorRT 11.4.1 runs DLA again on AGX Orin only (JetPack >= 7.2.2)
    if t.kind == "jetson":
        assert t.tensorrt_default == 10 and t.sm == 87 and t.jetpack
        assert t.tensorrt_majors == ([10, 11] if key == "orin-agx" else [10])
        assert (t.dla_tensorrt11, t.dla_tensorrt11_jetpack) == (("11.4.1", "7.2.2") if key == "orin-agx"
                                                                  else (None, None))
    else:
        assert 11 in t.tensorrt_majors and t.dla_cores == 0
    assert t.dla_cores == {"orin-agx": 2, "orin-nx": 2}.get(key, 0)
    mn, opt, mx = t.profile
    assert 1 == mn <= opt <= mx and mx == t.batch_sizes[-1]
    assert t.supports_sparsity


def test_specific_numbers():
    assert get_target("h100").compute_capability == "9.0" and get_target("h100").memory_gib == 80
    assert get_target("h200").sm == 90 and get_target("h200").memory_gib == 141 and "fp8" in get_target("h200").precisions
    assert get_target("a100").sm == 80 and "fp8" not in get_target("a100").precisions
    assert get_target("l4").sm == 89 and get_target("l4").memory_gib == 24
    assert get_target("orin-nano").memory_gib == 8
    assert set(get_target("orin-agx").precisions) <= set(PRECISIONS)


def test_unknown_target_lists_known_ones():
    with pytest.raises(VitoptError) as err:
        get_target("b300")
    msg = str(err.value)
    assert "'b300'" in msg and all(k in msg for k in KEYS) and msg.count("\n") == 0


def test_malformed_profile_file_names_target_and_field(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("x1:\n  name: X\n  kind: server\n  compute_capability: '8.0'\n  memory_gib: 1\n"
                   "  precisions: [fp32, fp8]\n  dla_cores: 0\n  tensorrt_majors: [10]\n  tensorrt_default: 10\n"
                   "  batch_sizes: [1, 2]\n  workspace_mib: 64\n")
    with pytest.raises(VitoptError, match="fp8 needs compute capability >= 8.9"):
        load_targets(bad)
    bad.write_text("x2:\n  name: X\n  kind: phone\n")
    with pytest.raises(VitoptError, match=r"target 'x2' field kind"):
        load_targets(bad)
    bad.write_text("x3:\n  name: X\n  kind: jetson\n  compute_capability: '8.7'\n  memory_gib: 1\n"
                   "  precisions: [fp16]\n  dla_cores: 0\n  tensorrt_majors: [10, 11]\n  tensorrt_default: 10\n"
                   "  dla_tensorrt11: '11.4.1'\n  batch_sizes: [1, 2]\n  workspace_mib: 64\n")
    with pytest.raises(VitoptError, match="dla_tensorrt11 needs dla_cores > 0"):
        load_targets(bad)
    with pytest.raises(VitoptError, match="does not exist"):
        load_targets(tmp_path / "missing.yaml")


def test_targets_command_lists_all():
    res = CliRunner().invoke(app, ["targets"], env={"COLUMNS": "240"})
    assert res.exit_code == 0, res.output
    for key in KEYS:
        assert key in res.output
    assert "JetPack 6.2" in res.output and "9.0" in res.output
