"""TensorRT build derivation (every target x precision x TensorRT major), trtexec lines, file layout, errors.

The TensorRT builder cannot be installed on CI machines; everything around it is tested here, and the
tests that build and run a real engine skip with that reason where ``tensorrt`` is absent.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from fake_tensorrt import FakeLayer, FakeTrt
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
    # DLA: static shapes, min = opt = max = the profile's opt batch
    assert tb.trtexec_command(c10, "q.onnx", "e.engine", "t.cache", "e.layers.json") == [
        "trtexec", "--onnx=q.onnx", "--saveEngine=e.engine", "--minShapes=input:8x1x16x16",
        "--optShapes=input:8x1x16x16", "--maxShapes=input:8x1x16x16", "--memPoolSize=workspace:4096M",
        "--builderOptimizationLevel=4", "--int8", "--fp16", "--sparsity=enable", "--useDLACore=1",
        "--allowGPUFallback", "--timingCacheFile=t.cache", "--profilingVerbosity=detailed",
        "--exportLayerInfo=e.layers.json"]
    c11 = tb.derive_build_config("h100", "fp16", trt_major=11, profile=(2, 4, 8), workspace_mib=1024,
                                 version_compatible=True, input_name="images")
    assert tb.trtexec_command(c11, "m.onnx", "e.engine") == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=e.engine", "--minShapes=images:2x3x224x224",
        "--optShapes=images:4x3x224x224", "--maxShapes=images:8x3x224x224", "--memPoolSize=workspace:1024M",
        "--builderOptimizationLevel=3", "--versionCompatible", "--profilingVerbosity=detailed"]
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
        (dict(target="orin-nx", precision="fp16", trt_major=11), "TensorRT 10.x, not 11.x"),
        (dict(target="orin-nx", precision="fp16", dla_min_fraction=1.5), "dla_min_fraction"),
        (dict(target="h100", precision="int8", backend="torch_tensorrt"), "torch_tensorrt backend builds"),
        (dict(target="orin-agx", precision="fp16", dla_core=0, backend="torch_tensorrt"), "backend: tensorrt"),
        (dict(target="h100", precision="fp16", backend="onnx2trt"), "unknown build backend"),
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
    assert p["layers_json"] == tmp_path / "orin-nx_int8_dla1.layers.json"
    assert p["timing_cache"] == tmp_path / "timing_orin-nx_trt10.cache"   # device unknown: the trtexec script's name
    assert tb.build_paths(tmp_path, cfg, tmp_path / "c.cache")["timing_cache"] == tmp_path / "c.cache"
    key = tb.timing_cache_key("NVIDIA H200", "9.0", "10.3.0.26")
    assert tb.build_paths(tmp_path, cfg, cache_key=key)["timing_cache"] == tmp_path / f"timing_{key}.cache"


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
                                                        tmp_path / "timing_orin-agx_trt10.cache",
                                                        tmp_path / "orin-agx_fp16.layers.json")


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
    cache = Path(rec["timing_cache"]["path"])
    assert Path(rec["engine"]).is_file() and cache.is_file() and rec["build_seconds"] > 0
    assert rec["timing_cache"]["saved"] and Path(rec["layers_json"]).is_file()
    x = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    trt_rt = make_runtime("tensorrt", engine_path=rec["engine"])
    ort_rt = make_runtime("onnxruntime", onnx_path=tiny_onnx, threads=1)
    diff = compare_logits(trt_rt(x), ort_rt(x))
    assert diff["max_abs_diff"] <= (1e-3 if precision == "fp32" else 5e-2)
    assert trt_rt.max_batch == 8 and trt_rt(x[:3]).shape == (3, 10)
    # the timing cache is reused by the next build on this device and TensorRT
    size = cache.stat().st_size
    again = tb.build_engine(tiny_onnx, cfg, tmp_path)
    assert again["timing_cache"]["loaded"] == "file" and cache.stat().st_size >= size


# ------------------------------------------------------------------------------------ issue 15: builds that hold


def test_dla_builds_get_a_static_profile_and_trt11_needs_11_4_1():
    cfg = tb.derive_build_config("orin-agx", "fp16", profile=(1, 8, 32), dla_core=0)
    assert cfg.profile == (8, 8, 8)                          # DLA: min = opt = max
    assert tb.derive_build_config("orin-agx", "int8", dla_core=1, fixed_batch=4).profile == (4, 4, 4)
    assert tb.derive_build_config("orin-agx", "fp16").profile == (1, 8, 32)      # GPU keeps the dynamic profile
    c11 = tb.derive_build_config("orin-agx", "fp16", trt_major=11, dla_core=0)
    assert c11.strongly_typed and c11.builder_flags == ("GPU_FALLBACK",) and c11.min_tensorrt == "11.4.1"
    assert c11.graph_needs == "fp16"
    tb.check_tensorrt_version(c11, "11.4.1.2")
    with pytest.raises(VitoptError, match=r"needs TensorRT >= 11\.4\.1"):
        tb.check_tensorrt_version(c11, "11.3.0")
    with pytest.raises(VitoptError, match="TensorRT 10.3.0 is installed"):
        tb.check_tensorrt_version(c11, "10.3.0")
    tb.check_tensorrt_version(tb.derive_build_config("orin-agx", "fp16", trt_major=11), "11.0.0")   # GPU: any 11.x


def test_timing_cache_key_tells_h100_variants_and_versions_apart():
    sxm = tb.timing_cache_key("NVIDIA H100 80GB HBM3", "9.0", "10.3.0.26")
    pcie = tb.timing_cache_key("NVIDIA H100 PCIe", "9.0", "10.3.0.26")
    h200 = tb.timing_cache_key("NVIDIA H200", "9.0", "10.3.0.26")
    newer = tb.timing_cache_key("NVIDIA H200", "9.0", "10.3.0.30")
    assert len({sxm, pcie, h200, newer}) == 4
    assert h200 == "nvidia-h200_sm90_trt10.3.0.26" and "/" not in sxm


def test_attach_timing_cache_checks_the_return(tmp_path):
    trt = FakeTrt()
    cfg = trt.Builder(None).create_builder_config()
    path = tmp_path / "t.cache"
    assert tb.attach_timing_cache(trt, cfg, path) == {"path": str(path), "loaded": "new"}
    path.write_bytes(b"mine")
    trt.cache_accepts = b"mine"
    assert tb.attach_timing_cache(trt, cfg, path)["loaded"] == "file"
    trt.cache_accepts = b"other-gpu"                          # set_timing_cache returns False: start empty
    assert tb.attach_timing_cache(trt, cfg, path)["loaded"] == "mismatch"
    assert cfg.set_cache_calls[-2:] == [b"mine", b""] and cfg.timing_cache.data == b""
    cfg.set_timing_cache = lambda cache, ignore_mismatch: False
    with pytest.raises(VitoptError, match="refused a new, empty timing cache"):
        tb.attach_timing_cache(trt, cfg, path)


VIT_LAYERS = [FakeLayer("patch_embed/Conv", "CONVOLUTION", True), FakeLayer("norm1", "NORMALIZATION", False),
              FakeLayer("qkv", "MATRIX_MULTIPLY", False), FakeLayer("softmax", "SOFTMAX", True),
              FakeLayer("gelu", "UNARY", False), FakeLayer("fc2", "MATRIX_MULTIPLY", False)]


def test_dla_placement_and_refusal():
    trt = FakeTrt(layers=VIT_LAYERS)
    net = trt.Builder(None).create_network(0)
    placement = tb.dla_placement(trt, net, trt.Builder(None).create_builder_config())
    assert (placement["dla_layers"], placement["gpu_layers"]) == (2, 4)
    assert placement["fraction"] == pytest.approx(2 / 6)
    assert placement["gpu_layer_types"] == {"MATRIX_MULTIPLY": 2, "NORMALIZATION": 1, "UNARY": 1}
    cfg = tb.derive_build_config("orin-agx", "fp16", dla_core=0)
    with pytest.raises(VitoptError, match=r"only 2 of 6 layers \(33%\) can run on DLA core 0") as err:
        tb.check_dla_placement(cfg, placement)
    assert "MATRIX_MULTIPLY x2" in str(err.value) and "\n" not in str(err.value)
    tb.check_dla_placement(tb.derive_build_config("orin-agx", "fp16", dla_core=0, dla_min_fraction=0.3), placement)
    tb.check_dla_placement(tb.derive_build_config("orin-agx", "fp16"), placement)       # GPU build: no check


@pytest.fixture()
def fake_trt(monkeypatch):
    trt = FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tb, "_cuda_device", lambda: ("NVIDIA H200", "9.0"))
    return trt


def test_build_engine_with_the_api_stand_in(tmp_path, tiny_onnx, fake_trt):
    cfg = tb.derive_build_config("h200", "fp32", trt_major=10, input_chw=(1, 16, 16), profile=(1, 4, 8),
                                 version_compatible=True)
    fake_trt.layer_info = {"Layers": [{"Name": "x", "LayerType": "gemm"}], "Bindings": ["input", "logits"]}
    rec = tb.build_engine(tiny_onnx, cfg, tmp_path / "b", cache_dir=tmp_path)
    key = "nvidia-h200_sm90_trt10.3.0.26"
    assert rec["timing_cache"] == {"path": str(tmp_path / f"timing_{key}.cache"), "loaded": "new", "saved": True}
    assert (tmp_path / f"timing_{key}.cache").read_bytes() == b"new-cache"
    assert fake_trt.config.profiling_verbosity == "DETAILED" and "VERSION_COMPATIBLE" in fake_trt.config.flags
    assert fake_trt.config.profiles == [{"input": ((1, 1, 16, 16), (4, 1, 16, 16), (8, 1, 16, 16))}]
    assert fake_trt.host_code_at_deserialize is True           # engine_host_code_allowed before deserializing
    assert json.loads(Path(rec["layers_json"]).read_text()) == fake_trt.layer_info
    assert json.loads(Path(tmp_path / "b" / "h200_fp32.build.json").read_text())["device"] == "NVIDIA H200"
    # get_timing_cache() returning None after the build is recorded, not a crash
    fake_trt.drop_timing_cache = True
    assert tb.build_engine(tiny_onnx, cfg, tmp_path / "c", cache_dir=tmp_path)["timing_cache"]["saved"] is False
    with pytest.raises(VitoptError, match="TensorRT 10.3.0.26 is installed"):
        tb.build_engine(tiny_onnx, tb.derive_build_config("h200", "fp32", trt_major=11, input_chw=(1, 16, 16)),
                        tmp_path / "d")


def test_build_engine_refuses_a_mostly_gpu_dla_engine_before_building(tmp_path, tiny_onnx, fake_trt):
    fake_trt.layers = VIT_LAYERS
    cfg = tb.derive_build_config("orin-agx", "fp16", trt_major=10, input_chw=(1, 16, 16), dla_core=0)
    with pytest.raises(VitoptError, match="can run on DLA core 0"):
        tb.build_engine(tiny_onnx, cfg, tmp_path)
    assert fake_trt.built == 0 and fake_trt.config.DLA_core == 0
    fake_trt.layers = [FakeLayer("conv", "CONVOLUTION", True)] * 3 + [VIT_LAYERS[1]]
    rec = tb.build_engine(tiny_onnx, cfg, tmp_path)
    assert rec["dla_placement"]["fraction"] == 0.75 and fake_trt.built == 1
    assert fake_trt.config.profiles[0]["input"][0] == fake_trt.config.profiles[0]["input"][2]   # static


def test_trt11_fp16_build_autocasts_an_fp32_graph(tmp_path, tiny_onnx, monkeypatch):
    calls = []

    def fake_autocast(src, out, mode, **kw):
        calls.append((Path(src), mode))
        Path(out).write_bytes(_graph(tmp_path, "half.onnx", fp16=True).read_bytes())
        return {"path": str(out)}

    monkeypatch.setattr(tb, "quantize_onnx", fake_autocast)
    info = tb.onnx_info(tiny_onnx)
    c11 = tb.derive_build_config("h100", "fp16", trt_major=11, input_chw=info.input_chw)
    cast = tb.autocast_for_build(c11, info, tmp_path)
    assert calls == [(tiny_onnx, "fp16")] and "FLOAT16" in cast.float_types
    assert cast.path == tmp_path / "model_fp16.onnx"
    tb.check_graph_precision(c11, cast)
    assert tb.autocast_for_build(c11, cast, tmp_path) is cast                       # already fp16: untouched
    c10 = tb.derive_build_config("h100", "fp16", trt_major=10, input_chw=info.input_chw)
    assert tb.autocast_for_build(c10, info, tmp_path) is info and len(calls) == 1   # 10.x: the FP16 flag


@pytest.mark.parametrize("version, explicit", [("2.10.0", True), ("2.12.1", True), ("2.13.0", None),
                                               ("2.14.0+cu130", None)])
def test_torch_tensorrt_settings_follow_the_installed_api(version, explicit):
    cfg = tb.derive_build_config("h100", "fp16", backend="torch_tensorrt", workspace_mib=512, opt_level=2)
    kw = tb.torch_tensorrt_settings(version, cfg)
    assert "enabled_precisions" not in kw                      # 2.10-2.12 assert on it, 2.13+ ignore it
    assert kw.get("use_explicit_typing") is explicit
    assert kw["workspace_size"] == 512 << 20 and kw["optimization_level"] == 2


def test_torch_tensorrt_too_old_or_missing(monkeypatch):
    cfg = tb.derive_build_config("h100", "fp16", backend="torch_tensorrt")
    with pytest.raises(VitoptError, match="too old"):
        tb.torch_tensorrt_settings("2.9.1", cfg)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(VitoptError, match=r"vitopt\[torch-tensorrt\]"):
        tb.compile_torch_tensorrt(torch.nn.Linear(2, 2), cfg, ".")


@pytest.mark.parametrize("stages, match", [
    ("  - {type: export}\n  - {type: build, target: h100, backend: torch_tensorrt}\n"
     "  - {type: validate, runtimes: [tensorrt]}\n", "runtime 'tensorrt' needs an earlier build stage with backend "
                                                    "tensorrt"),
    ("  - {type: export}\n  - {type: build, target: h100}\n  - {type: validate, runtimes: [torch-tensorrt]}\n",
     "runtime 'torch-tensorrt' needs an earlier build stage with backend torch_tensorrt"),
])
def test_recipe_matches_runtimes_to_build_backends(tmp_path, stages, match):
    from vitopt.recipe import load_recipe
    from vitopt.stages import recipe_choices

    with pytest.raises(VitoptError, match=match):
        load_recipe(_recipe(tmp_path, stages), choices=recipe_choices())


def test_extras_pin_the_tensorrt_lines():
    import tomllib
    from packaging.requirements import Requirement

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = {k: [Requirement(r) for r in v] for k, v in meta["optional-dependencies"].items()}
    trt = next(r for r in extras["trt"] if r.name == "tensorrt")
    assert "10.3.0" in trt.specifier and "11.0.0" not in trt.specifier         # 11 needs AutoCast: its own extra
    trt11 = next(r for r in extras["trt11"] if r.name == "tensorrt")
    assert "11.4.1" in trt11.specifier and any(r.name == "vitopt" and "quant" in r.extras for r in extras["trt11"])
    torch_pin = next(Requirement(r) for r in meta["dependencies"] if r.startswith("torch=="))
    (ttrt,) = extras["torch-tensorrt"]
    major, minor = (int(v) for v in next(iter(torch_pin.specifier)).version.split(".")[:2])
    assert ttrt.name == "torch-tensorrt"                                         # its version follows torch's
    assert f"{major}.{minor}.0" in ttrt.specifier and f"{major}.{minor + 1}.0" not in ttrt.specifier


def test_cli_dry_run_of_a_trt11_fp16_build_names_the_autocast_model(tmp_path, tiny_onnx):
    res = _cli("build", tiny_onnx, "--target", "h200", "--precision", "fp16", "--trt-major", "11", "--out", tmp_path,
               "--dry-run")
    assert res.exit_code == 0, res.output
    assert "AutoCast" in res.output
    script = (tmp_path / "h200_fp16.trtexec.sh").read_text()
    assert f"--onnx={tmp_path / 'model_fp16.onnx'}" in script and "--fp16" not in script
    res = _cli("build", tiny_onnx, "--target", "h200", "--precision", "int8", "--trt-major", "11", "--dry-run")
    assert isinstance(res.exception, VitoptError) and "no Q/DQ nodes" in str(res.exception)
