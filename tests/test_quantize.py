"""ModelOpt ONNX PTQ (int8 Q/DQ) and AutoCast fp16, the quantize stage, and the `quant` extra's environment.

The ModelOpt tests skip where nvidia-modelopt is absent (the default dev environment); install the
extra in a separate environment (`pip install -e '.[quant,dev]'`) to run them.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from vitopt.deploy.accuracy import compare_logits
from vitopt.deploy.onnx_export import export_onnx
from vitopt.deploy.quantize import calibration_batches, qdq_counts, quantize_onnx, require_modelopt
from vitopt.deploy.runtimes import make_runtime
from vitopt.errors import VitoptError

HAS_MODELOPT = importlib.util.find_spec("modelopt") is not None
NO_MODELOPT = "nvidia-modelopt is not installed (optional extra vitopt[quant])"
ROOT = Path(__file__).resolve().parents[1]


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 10


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    path = tmp_path_factory.mktemp("q") / "model.onnx"
    export_onnx(model, path, (1, 16, 16), exporter="torchscript", simplify=False)
    return path


def test_calibration_draw_is_seeded_and_without_replacement():
    ds = _Images(50)
    a, b = calibration_batches(ds, 20, seed=3), calibration_batches(ds, 20, seed=3)
    assert a.shape == (20, 1, 16, 16) and a.dtype == np.float32 and np.array_equal(a, b)
    assert len({x.tobytes() for x in a}) == 20                      # no image twice
    assert not np.array_equal(a, calibration_batches(ds, 20, seed=4))
    assert calibration_batches(ds, 500).shape[0] == 50              # capped at the dataset
    with pytest.raises(VitoptError, match="at least one image"):
        calibration_batches(ds, 0)


def test_bad_requests_fail_before_modelopt_is_needed(tmp_path, fp32_onnx):
    with pytest.raises(VitoptError, match="unknown quantization mode 'int4'"):
        quantize_onnx(fp32_onnx, tmp_path / "q.onnx", "int4")
    with pytest.raises(VitoptError, match="does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "q.onnx", "int8", calibration=np.zeros((1, 1, 16, 16)))
    with pytest.raises(VitoptError, match="needs calibration images"):
        quantize_onnx(fp32_onnx, tmp_path / "q.onnx", "int8")
    with pytest.raises(VitoptError, match="calibration_method 'minmax'"):
        quantize_onnx(fp32_onnx, tmp_path / "q.onnx", "int8", calibration=np.zeros((2, 1, 16, 16), np.float32),
                      calibration_method="minmax")


def test_missing_modelopt_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt", None)
    monkeypatch.setitem(sys.modules, "modelopt.onnx", None)
    with pytest.raises(VitoptError) as err:
        require_modelopt()
    assert "vitopt[quant]" in str(err.value) and "\n" not in str(err.value)


def test_environment_has_one_onnxruntime_and_a_working_onnx():
    """The invariant the `quant` extra is designed for (run it in the extra's environment too)."""
    dists = {d.metadata["Name"].lower() for d in md.distributions() if d.metadata["Name"]}
    ort = sorted(n for n in dists if re.fullmatch(r"onnxruntime(-gpu|-directml|-openvino|-qnn|-silicon)?", n))
    assert len(ort) == 1, f"more than one onnxruntime distribution: {ort}"
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)


def test_quant_extra_keeps_the_cpu_onnxruntime():
    """The extra must not pull nvidia-modelopt[onnx] (it pins onnxruntime-gpu beside our onnxruntime)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    quant = extras["quant"]
    assert any(r.startswith("nvidia-modelopt") for r in quant)
    assert not any("[onnx]" in r or r.lower().startswith("onnxruntime") for r in quant)


# ------------------------------------------------------------------------------------ with ModelOpt
@pytest.mark.skipif(not HAS_MODELOPT, reason=NO_MODELOPT)
def test_int8_qdq_model_runs_in_onnxruntime_and_agrees(tmp_path, fp32_onnx):
    cal = calibration_batches(_Images(64), 64)
    info = quantize_onnx(fp32_onnx, tmp_path / "int8.onnx", "int8", calibration=cal, calibration_method="max")
    assert info["QuantizeLinear"] > 0 and info["DequantizeLinear"] >= info["QuantizeLinear"]
    assert info["calibration_images"] == 64 and qdq_counts(tmp_path / "int8.onnx")["QuantizeLinear"] > 0
    onnx.checker.check_model(str(tmp_path / "int8.onnx"))
    x = np.random.default_rng(1).standard_normal((32, 1, 16, 16)).astype(np.float32)
    ref = make_runtime("onnxruntime", onnx_path=fp32_onnx, threads=1)(x)
    q = make_runtime("onnxruntime", onnx_path=tmp_path / "int8.onnx", threads=1)(x)
    d = compare_logits(q, ref)
    assert 0 < d["max_abs_diff"] < 0.2 * float(np.abs(ref).max())    # quantized: close, not identical
    assert d["argmax_agreement"] >= 0.8


@pytest.mark.skipif(not HAS_MODELOPT, reason=NO_MODELOPT)
def test_fp16_autocast_keeps_fp32_io(tmp_path, fp32_onnx):
    info = quantize_onnx(fp32_onnx, tmp_path / "fp16.onnx", "fp16")
    assert info["float16_initializers"] > 0 and info["QuantizeLinear"] == 0
    m = onnx.load(str(tmp_path / "fp16.onnx"))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    from vitopt.deploy.tensorrt_build import check_graph_precision, derive_build_config, onnx_info

    check_graph_precision(derive_build_config("h100", "fp16", trt_major=11, input_chw=(1, 16, 16)),
                          onnx_info(tmp_path / "fp16.onnx"))               # buildable strongly typed
    x = np.random.default_rng(2).standard_normal((8, 1, 16, 16)).astype(np.float32)
    d = compare_logits(make_runtime("onnxruntime", onnx_path=tmp_path / "fp16.onnx", threads=1)(x),
                       make_runtime("onnxruntime", onnx_path=fp32_onnx, threads=1)(x))
    assert d["max_abs_diff"] < 5e-2 and d["argmax_agreement"] == 1.0


@pytest.mark.skipif(not HAS_MODELOPT, reason=NO_MODELOPT)
def test_quantize_stage_reports_top1_drop(tmp_path):
    from vitopt.deploy.accuracy import evaluate_runtime
    from vitopt.io import read_json
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(f"name: q\noutput_dir: {tmp_path}\nmodel: {{name: deit_tiny_patch16_224, kwargs: {{img_size: 16, "
                 "patch_size: 4, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2}}\ndata: {type: digits}\n"
                 "stages:\n  - {type: train, epochs: 2, batch_size: 128, lr: 3.0e-3}\n"
                 "  - {type: export, simplify: false}\n"
                 "  - {type: quantize, precision: int8, calibration_images: 128, threads: 1}\n")
    run = run_recipe(load_recipe(p))
    rec = read_json(run / "02_quantize" / "metrics.json")
    m = rec["metrics"]["onnxruntime_cpu"]
    assert rec["outputs"] == {"onnx_int8": "02_quantize/model_int8.onnx"}
    assert rec["metrics"]["calibration_images"] == 128 and rec["metrics"]["QuantizeLinear"] > 0
    assert m["top1_drop"] == pytest.approx(m["top1_fp32"] - m["top1_quantized"])
    assert abs(m["top1_drop"]) <= 5.0 and m["argmax_agreement"] >= 0.9
    from vitopt.deploy.artifacts import resolve_artifact
    from vitopt.train.data import load_data, model_input, val_arrays

    art = resolve_artifact(run)
    assert art.quantized == {"int8": run / "02_quantize" / "model_int8.onnx"}
    r = load_recipe(p)
    from vitopt.arch.config import load_pruned

    data = load_data(r.data, model_input(load_pruned(art.model_dir)), r.seed)
    images, labels = val_arrays(data)
    top1 = evaluate_runtime(make_runtime("onnxruntime", onnx_path=art.onnx, threads=1), images, labels)["top1"]
    assert m["top1_fp32"] == pytest.approx(top1)                         # recomputed independently


@pytest.mark.skipif(not HAS_MODELOPT, reason=NO_MODELOPT)
def test_fp8_qdq_uses_e4m3_and_builds_only_for_fp8_targets(tmp_path, fp32_onnx):
    from vitopt.deploy.tensorrt_build import check_graph_precision, derive_build_config, onnx_info

    info = quantize_onnx(fp32_onnx, tmp_path / "fp8.onnx", "fp8", calibration=calibration_batches(_Images(32), 32))
    assert info["QuantizeLinear"] > 0 and info["calibration_method"] == "max"
    m = onnx.load(str(tmp_path / "fp8.onnx"))
    zp = {n.input[2] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    types = {i.data_type for i in m.graph.initializer if i.name in zp}
    assert types == {onnx.TensorProto.FLOAT8E4M3FN}
    for major in (10, 11):
        check_graph_precision(derive_build_config("h100", "fp8", trt_major=major, input_chw=(1, 16, 16)),
                              onnx_info(tmp_path / "fp8.onnx"))
    with pytest.raises(VitoptError, match="does not support fp8"):
        derive_build_config("orin-agx", "fp8")


# ------------------------------------------------------------------------------------ what vitopt asks ModelOpt for
class _FakeModelOpt:
    """Records the arguments of modelopt.onnx.quantization.quantize and writes a tiny Q/DQ graph."""

    def __init__(self):
        self.kwargs = None

    def install(self, monkeypatch):
        import types

        quantization = types.ModuleType("modelopt.onnx.quantization")
        quantization.quantize = self.quantize
        onnx_mod = types.ModuleType("modelopt.onnx")
        onnx_mod.quantization = quantization
        root = types.ModuleType("modelopt")
        root.onnx = onnx_mod
        for name, mod in (("modelopt", root), ("modelopt.onnx", onnx_mod), ("modelopt.onnx.quantization", quantization)):
            monkeypatch.setitem(sys.modules, name, mod)

    def quantize(self, **kwargs):
        self.kwargs = kwargs
        h = onnx.helper
        g = h.make_graph([h.make_node("QuantizeLinear", ["x", "s"], ["q"]), h.make_node("DequantizeLinear", ["q", "s"], ["y"])],
                         "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 1, 16, 16])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 1, 16, 16])],
                         [h.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.1])])
        onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 19)]), kwargs["output_path"])


def test_int8_defaults_to_fp16_high_precision_and_static_calibration_batches(tmp_path, fp32_onnx, monkeypatch):
    mo = _FakeModelOpt()
    mo.install(monkeypatch)
    cal = np.random.default_rng(0).standard_normal((70, 1, 16, 16)).astype(np.float32)
    info = quantize_onnx(fp32_onnx, tmp_path / "q.onnx", "int8", calibration=cal)
    kw = mo.kwargs
    assert kw["high_precision_dtype"] == "fp16"                       # ModelOpt's default; strong typing keeps it
    assert kw["calibration_shapes"] == "input:32x1x16x16"              # one static batch, not one image at a time
    assert kw["calibration_data"].shape == (64, 1, 16, 16)             # a whole number of batches
    assert np.array_equal(kw["calibration_data"], cal[:64])
    assert info["calibration_images"] == 64 and info["high_precision_dtype"] == "fp16"
    quantize_onnx(fp32_onnx, tmp_path / "q32.onnx", "int8", calibration=cal[:5], high_precision_dtype="fp32",
                  calibration_batch=8)
    assert mo.kwargs["high_precision_dtype"] == "fp32" and mo.kwargs["calibration_shapes"] == "input:5x1x16x16"
    with pytest.raises(VitoptError, match="high_precision_dtype 'fp64'"):
        quantize_onnx(fp32_onnx, tmp_path / "q.onnx", "int8", calibration=cal, high_precision_dtype="fp64")


def test_calibration_plan_for_fixed_batch_graphs(tmp_path):
    h = onnx.helper
    g = h.make_graph([h.make_node("Relu", ["images"], ["y"])], "g",
                     [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [8, 3, 4, 4])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 3, 4, 4])])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), tmp_path / "f.onnx")
    from vitopt.deploy.quantize import calibration_plan

    assert calibration_plan(tmp_path / "f.onnx", 20, 32) == (16, "images:8x3x4x4")   # the graph's own batch
    with pytest.raises(VitoptError, match="fixed batch of 8 but only 5"):
        calibration_plan(tmp_path / "f.onnx", 5, 32)
