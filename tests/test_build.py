"""TensorRT build derivation (every target x precision x TensorRT major), trtexec lines, file layout, errors.

The TensorRT builder cannot be installed on CI machines; everything around it is tested here, and the
tests that build and run a real engine skip with that reason where ``tensorrt`` is absent.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from vitopt.cli import app
from vitopt.deploy import tensorrt_build as tb
from vitopt.deploy.onnx_export import export_onnx
from vitopt.deploy.targets import PRECISIONS, load_targets
from vitopt.errors import VitoptError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "TensorRT is not installed here (the registry's tensorrt wheel downloads from NVIDIA's index, unreachable)"
TARGETS = list(load_targets())
FLAGS_10 = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16"), "fp8": ("FP8", "FP16")}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, (1, 16, 16), exporter="torchscript", simplify=False)
    return path


def _graph(tmp_path: Path, name: str, *, qdq: bool = False, fp16: bool = False, batch="batch") -> Path:
    """A one-node image graph: x [batch,3,8,8] -> (Q/DQ) -> Mul by a weight initializer."""
    wtype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    w = helper.make_tensor("w", wtype, [1], [1.0])
    nodes, inits, src = [], [w], "x"
    if fp16:
        nodes.append(helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT16))
        src = "xc"
    if qdq:
        inits += [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                  helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", [src, "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        src = "dq"
    nodes.append(helper.make_node("Mul", [src, "w"], ["y"]))
    out_t = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", out_t, [batch, 3, 8, 8])], inits)
    path = tmp_path / name
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# ------------------------------------------------------------------------------------ derivation
@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("key", TARGETS)
def test_build_config_for_every_target_precision_and_major(key, precision, major):
    t = load_targets()[key]
    if precision not in t.precisions:
        with pytest.raises(VitoptError, match=f"does not support {precision}"):
            tb.derive_build_config(key, precision, trt_major=major)
        return
    if major not in t.tensorrt_majors:
        with pytest.raises(VitoptError, match=f"not {major}.x"):
            tb.derive_build_config(key, precision, trt_major=major)
        return
    cfg = tb.derive_build_config(key, precision, trt_major=major, input_name="input", input_chw=(3, 224, 224))
    assert cfg.trt_major == major and cfg.profile == t.profile and cfg.workspace_mib == t.workspace_mib
    if major == 10:
        assert not cfg.strongly_typed and cfg.builder_flags == FLAGS_10[precision]
        assert cfg.graph_needs == ("qdq" if precision in ("int8", "fp8") else "any")
    else:  # TensorRT 11: strongly typed, precision flags removed, precision from the graph
        assert cfg.strongly_typed and cfg.builder_flags == ()
        assert cfg.graph_needs == {"int8": "qdq", "fp8": "qdq", "fp16": "fp16", "bf16": "bf16"}.get(precision, "any")
    cmd = tb.trtexec_command(cfg, "m.onnx", "m.engine")
    assert not ({"--fp16", "--int8", "--bf16", "--fp8", "--stronglyTyped"} & set(cmd)) if major == 11 else True
    assert f"--maxShapes=input:{t.profile[2]}x3x224x224" in cmd


def test_default_major_is_the_targets():
    assert tb.derive_build_config("orin-agx", "fp16").trt_major == 10
    assert tb.derive_build_config("h100", "fp16").trt_major == 11


def test_trtexec_lines_by_hand():
    c10 = tb.derive_build_config("orin-agx", "int8", trt_major=10, input_chw=(1, 16, 16), sparsity=True,
                                 dla_core=1, opt_level=4)
    assert tb.trtexec_command(c10, "q.onnx", "e.engine", "t.cache") == [
        "trtexec", "--onnx=q.onnx", "--saveEngine=e.engine", "--minShapes=input:1x1x16x16",
        "--optShapes=input:8x1x16x16", "--maxShapes=input:32x1x16x16", "--memPoolSize=workspace:4096M",
        "--builderOptimizationLevel=4", "--int8", "--fp16", "--sparsity=enable", "--useDLACore=1",
        "--allowGPUFallback", "--timingCacheFile=t.cache"]
    c11 = tb.derive_build_config("h100", "fp16", trt_major=11, profile=(2, 4, 8), workspace_mib=1024,
                                 version_compatible=True, input_name="images")
    assert tb.trtexec_command(c11, "m.onnx", "e.engine") == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=e.engine", "--minShapes=images:2x3x224x224",
        "--optShapes=images:4x3x224x224", "--maxShapes=images:8x3x224x224", "--memPoolSize=workspace:1024M",
        "--builderOptimizationLevel=3", "--versionCompatible"]
    c10s = tb.derive_build_config("a100", "fp16", trt_major=10, strongly_typed=True)
    assert c10s.builder_flags == () and "--stronglyTyped" in tb.trtexec_command(c10s, "a", "b")


def test_options_and_bad_requests():
    agx = tb.derive_build_config("orin-agx", "fp16", dla_core=0)
    assert agx.builder_flags == ("FP16", "GPU_FALLBACK") and agx.dla_core == 0
    assert tb.derive_build_config("l4", "fp16", trt_major=10, version_compatible=True).builder_flags == \
        ("FP16", "VERSION_COMPATIBLE")
    assert tb.derive_build_config("h100", "fp32", fixed_batch=1).profile == (1, 1, 1)
    bad = [
        (dict(target="orin-agx", precision="fp16", dla_core=2), "DLA cores 0..1"),
        (dict(target="orin-nano", precision="fp16", dla_core=0), "has no DLA cores"),
        (dict(target="h100", precision="fp16", dla_core=0), "has no DLA cores"),
        (dict(target="orin-agx", precision="bf16", dla_core=0), "DLA runs fp16 and int8 only"),
        (dict(target="orin-nx", precision="fp16", dla_core=0, version_compatible=True), "cannot run on DLA"),
        (dict(target="h100", precision="fp16", trt_major=11, strongly_typed=False), "always strongly typed"),
        (dict(target="h100", precision="fp16", profile=(8, 4, 16)), "1 <= min <= opt <= max"),
        (dict(target="h100", precision="fp16", opt_level=6), "from 0 to 5"),
        (dict(target="h100", precision="int4"), "unknown precision"),
        (dict(target="orin-agx", precision="fp16", trt_major=11), "TensorRT 10.x, not 11.x"),
        (dict(target="nope", precision="fp16"), "unknown target 'nope'"),
    ]
    for kwargs, match in bad:
        with pytest.raises(VitoptError, match=match) as err:
            tb.derive_build_config(kwargs.pop("target"), kwargs.pop("precision"), **kwargs)
        assert "\n" not in str(err.value)


def test_build_paths_layout(tmp_path):
    cfg = tb.derive_build_config("orin-nx", "int8", dla_core=1)
    p = tb.build_paths(tmp_path, cfg)
    assert p["engine"] == tmp_path / "orin-nx_int8_dla1.engine"
    assert p["trtexec"] == tmp_path / "orin-nx_int8_dla1.trtexec.sh"
    assert p["build_json"] == tmp_path / "orin-nx_int8_dla1.build.json"
    assert p["timing_cache"] == tmp_path / "timing_orin-nx_trt10.cache"   # shared by every build for the target
    assert tb.build_paths(tmp_path, cfg, tmp_path / "c.cache")["timing_cache"] == tmp_path / "c.cache"


# ------------------------------------------------------------------------------------ the ONNX side
def test_onnx_info_and_graph_precision(tmp_path, tiny_onnx):
    info = tb.onnx_info(tiny_onnx)
    assert (info.input_name, info.input_chw, info.batch, info.qdq_nodes) == ("input", (1, 16, 16), None, 0)
    assert info.float_types == ("FLOAT",)
    qdq = tb.onnx_info(_graph(tmp_path, "q.onnx", qdq=True, batch=4))
    assert qdq.qdq_nodes == 1 and qdq.batch == 4 and qdq.input_chw == (3, 8, 8)
    half = tb.onnx_info(_graph(tmp_path, "h.onnx", fp16=True))
    assert "FLOAT16" in half.float_types

    int8 = tb.derive_build_config("h100", "int8", trt_major=10)
    tb.check_graph_precision(int8, qdq)
    with pytest.raises(VitoptError, match="no Q/DQ nodes"):
        tb.check_graph_precision(int8, info)
    fp16_11 = tb.derive_build_config("h100", "fp16", trt_major=11)
    tb.check_graph_precision(fp16_11, half)
    with pytest.raises(VitoptError, match="strongly typed TensorRT 11 fp16 build"):
        tb.check_graph_precision(fp16_11, info)
    tb.check_graph_precision(tb.derive_build_config("h100", "fp16", trt_major=10), info)   # 10.x: FP16 flag

    with pytest.raises(VitoptError, match="does not exist"):
        tb.onnx_info(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(VitoptError, match="not a readable ONNX file"):
        tb.onnx_info(junk)


def test_missing_tensorrt_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)     # import tensorrt -> ImportError
    with pytest.raises(VitoptError) as err:
        tb.require_tensorrt()
    assert "vitopt[trt]" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ CLI
def _cli(*args):
    return CliRunner().invoke(app, list(map(str, args)), env={"COLUMNS": "400"})


def test_cli_build_dry_run_writes_trtexec(tmp_path, tiny_onnx):
    res = _cli("build", tiny_onnx, "--target", "orin-agx", "--precision", "fp16", "--out", tmp_path,
               "--profile", "1,4,16", "--dry-run")
    assert res.exit_code == 0, res.output
    script = (tmp_path / "orin-agx_fp16.trtexec.sh").read_text().splitlines()
    assert script[0] == "#!/bin/sh"
    cfg = tb.derive_build_config("orin-agx", "fp16", input_chw=(1, 16, 16), profile=(1, 4, 16))
    assert shlex.split(script[1]) == tb.trtexec_command(cfg, tiny_onnx, tmp_path / "orin-agx_fp16.engine",
                                                        tmp_path / "timing_orin-agx_trt10.cache")


@pytest.mark.parametrize("args, match", [
    (["build", "missing.onnx", "--target", "h100"], "does not exist"),
    (["build", "MODEL", "--target", "b300"], "unknown target 'b300'"),
    (["build", "MODEL", "--target", "a100", "--precision", "fp8"], "does not support fp8"),
    (["build", "MODEL", "--target", "orin-nano", "--precision", "int8"], "no Q/DQ nodes"),
])
def test_cli_build_bad_input_is_one_sentence(tiny_onnx, tmp_path, args, match):
    argv = [str(tiny_onnx) if a == "MODEL" else str(tmp_path / a) if a.endswith(".onnx") else a for a in args]
    res = _cli(*argv)
    assert isinstance(res.exception, VitoptError) and match in str(res.exception)
    assert "\n" not in str(res.exception)


def test_cli_main_turns_bad_input_into_exit_2(tmp_path):
    import subprocess

    res = subprocess.run([sys.executable, "-c", "from vitopt.cli import main; main()", "build",
                          str(tmp_path / "missing.onnx"), "--target", "h100"], capture_output=True, text=True,
                         env={"COLUMNS": "400", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0], res.stderr


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the build really runs (see the engine test)")
def test_cli_build_without_tensorrt_names_the_extra(tmp_path, tiny_onnx):
    res = _cli("build", tiny_onnx, "--target", "h100", "--precision", "fp32", "--out", tmp_path)
    assert res.exit_code != 0 and isinstance(res.exception, VitoptError)
    assert "vitopt[trt]" in str(res.exception)
    assert (tmp_path / "h100_fp32.trtexec.sh").is_file()     # the command is written before the builder is needed


# ------------------------------------------------------------------------------------ recipe order
def _recipe(tmp_path, stages: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\nmodel: {name: deit_tiny_patch16_224, kwargs: {img_size: 16, patch_size: 4, in_chans: 1, "
                 "embed_dim: 32, depth: 2, num_heads: 2}}\ndata: {type: digits}\nstages:\n" + stages)
    return p


@pytest.mark.parametrize("stages, match", [
    ("  - {type: build, target: h100}\n", "stages[0]: a build stage needs an earlier export stage"),
    ("  - {type: quantize}\n", "stages[0]: a quantize stage needs an earlier export stage"),
    ("  - {type: export}\n  - {type: build, target: orin-agx, precision: int8}\n",
     "stages[1]: a build with precision int8 needs an earlier quantize stage"),
    ("  - {type: export}\n  - {type: validate, runtimes: [tensorrt]}\n",
     "stages[1]: a validate stage with runtime 'tensorrt' needs an earlier build stage"),
    ("  - {type: export}\n  - {type: build, target: h100, opt_level: 9}\n", "opt_level"),
])
def test_recipe_stage_order(tmp_path, stages, match):
    from vitopt.recipe import load_recipe

    with pytest.raises(VitoptError) as err:
        load_recipe(_recipe(tmp_path, stages))
    assert match in str(err.value)


def test_recipe_accepts_a_full_deploy_chain(tmp_path):
    from vitopt.recipe import load_recipe

    r = load_recipe(_recipe(tmp_path, "  - {type: export}\n  - {type: quantize, precision: int8}\n"
                                      "  - {type: build, target: orin-agx, precision: int8, dla_core: 0}\n"
                                      "  - {type: validate, runtimes: [pytorch, onnxruntime, tensorrt]}\n"))
    assert [s.type for s in r.stages] == ["export", "quantize", "build", "validate"]
    assert r.stages[2].dla_core == 0 and r.stages[3].device == "cpu"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the stage builds for real")
def test_build_stage_without_tensorrt_fails_after_writing_trtexec(tmp_path):
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe

    r = load_recipe(_recipe(tmp_path, "  - {type: export, simplify: false}\n"
                                      "  - {type: build, target: orin-agx, precision: fp16, profile: [1, 2, 4]}\n"),
                    [f"output_dir={tmp_path}"])
    with pytest.raises(VitoptError, match=r"TensorRT is not installed.*orin-agx_fp16\.trtexec\.sh"):
        run_recipe(r)
    script = (tmp_path / "r" / "01_build" / "orin-agx_fp16.trtexec.sh").read_text()
    assert "--maxShapes=input:4x1x16x16" in script and "--fp16" in script
    assert not (tmp_path / "r" / "01_build" / "metrics.json").exists()       # not marked done


# ------------------------------------------------------------------------------------ real engines
def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.skipif(not (HAS_TRT and _cuda()), reason=NO_TRT if not HAS_TRT else "no CUDA device for TensorRT")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_matches_onnxruntime(tmp_path, tiny_onnx, precision):
    from vitopt.deploy.accuracy import compare_logits
    from vitopt.deploy.runtimes import make_runtime

    trt = tb.require_tensorrt()
    cfg = tb.derive_build_config("h100", precision, trt_major=tb.tensorrt_major(trt), input_chw=(1, 16, 16),
                                 profile=(1, 4, 8), workspace_mib=256, opt_level=0, strongly_typed=None)
    if cfg.graph_needs == "fp16":
        pytest.skip("a strongly typed TensorRT 11 fp16 engine needs an AutoCast ONNX (see test_quantize)")
    rec = tb.build_engine(tiny_onnx, cfg, tmp_path)
    assert Path(rec["engine"]).is_file() and Path(rec["timing_cache"]).is_file() and rec["build_seconds"] > 0
    x = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    trt_rt = make_runtime("tensorrt", engine_path=rec["engine"])
    ort_rt = make_runtime("onnxruntime", onnx_path=tiny_onnx, threads=1)
    diff = compare_logits(trt_rt(x), ort_rt(x))
    assert diff["max_abs_diff"] <= (1e-3 if precision == "fp32" else 5e-2)
    # the timing cache is reused by the next build for the target
    size = Path(rec["timing_cache"]).stat().st_size
    tb.build_engine(tiny_onnx, cfg, tmp_path)
    assert Path(rec["timing_cache"]).stat().st_size >= size
