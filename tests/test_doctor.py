"""`vitopt doctor`: engine-inspector JSON (hand-written fixtures in the documented format, see
tests/data/inspector/README.md) -> per-block fusion and precisions, sparsity, Q/DQ, DLA, verdict."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitopt.cli import app
from vitopt.deploy.doctor import classify_layer, diagnose, doctor, layer_precision
from vitopt.errors import VitoptError

DATA = Path(__file__).parent / "data" / "inspector"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _load(stem):
    build = DATA / f"{stem}.build.json"
    return (json.loads((DATA / f"{stem}.layers.json").read_text()),
            json.loads(build.read_text()) if build.is_file() else None)


# stem -> (per block: (fused, softmax, layernorm, gemms)), verdict words
EXPECTED = {
    "h100_fp16": ([(True, "fused", "fp16", "fp16"), (False, "fp16", "fp16", "fp16")],
                  "attention is not fused in 1 of 2 blocks (e.g. block 1)"),
    "a100_fp16": ([(True, "fused", "fp16", "fp16")] * 2, "no obvious loss: 2/2 attention blocks fused"),
    "l4_fp16": ([(True, "fused", "fp16", "fp16")] * 2, "2:4 sparsity was asked for but no sparse tactic was chosen"),
    "h100_int8": ([(True, "fused", "fp32", "fp16/int8")] * 2, "1 Q/DQ layers did not fuse"),
    "h200_fp16": ([(False, "fp32", "fp32", "fp32")] * 2, "fp16 was asked for but every GEMM runs in fp32"),
    "orin-agx_fp16_dla0": ([(True, "fused", "fp16", "fp16")] * 2, "10 layers fell back from DLA to the GPU"),
}


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_fixture_diagnosis(stem):
    layers, build = _load(stem)
    d = diagnose(layers, build, stem)
    rows, verdict = EXPECTED[stem]
    assert [(r["mha_fused"], r["softmax"], r["layernorm"], r["gemms"]) for r in d["blocks"]] == rows
    assert d["verdict"].startswith(verdict), d["verdict"]
    assert d["detailed"] and d["layers"] == len(layers["Layers"])


def test_sparsity_qdq_and_dla_details():
    d = diagnose(*_load("a100_fp16"))
    assert d["sparse"] == {"asked": True, "sparse_layers": 6, "gemms": 8}
    q = diagnose(*_load("h100_int8"))
    assert q["qdq"]["standalone"] == 1 and q["qdq"]["fused"] is False and q["gemm_precisions"] == {"int8": 6}
    assert q["layernorm_precisions"] == {"fp32": 2}
    dla = diagnose(*_load("orin-agx_fp16_dla0"))["dla"]
    assert (dla["asked"], dla["dla_layers"], dla["gpu_layers"]) == (0, 1, 10)
    assert not any("nvm" in n for n in dla["fallback"])                    # the DLA copies are not fallback
    assert diagnose(*_load("h100_fp16"))["dla"] is None


def test_names_only_engine_says_to_rebuild():
    d = diagnose(json.loads((DATA / "names_only.layers.json").read_text()))
    assert not d["detailed"] and "detailed profiling verbosity" in d["verdict"]


@pytest.mark.parametrize("fmt, prec", [
    ("Row major linear FP32", "fp32"), ("Channel major FP16 format where channel % 8 == 0", "fp16"),
    ("Thirty-two wide channel vectorized row major Int8 format", "int8"), ("Row major linear BFloat16 format", "bf16"),
    ("Row major linear FP8 format", "fp8"), ("Half", "fp16"), ("Float", "fp32"), ("Int32", None),
])
def test_layer_precision_reads_the_format_strings(fmt, prec):
    assert layer_precision({"Inputs": [{"Name": "x", "Format/Datatype": fmt}]}) == prec


@pytest.mark.parametrize("layer, kind", [
    ({"Name": "layer_3", "LayerType": "gemm", "TacticName": "_gemm_mha_v2_0xab"}, "mha"),
    ({"Name": "flash_layer", "LayerType": "gemm", "TacticName": "fmha_v2_flash_attention_fp16_64_S_64"}, "mha"),
    ({"Name": "x", "LayerType": "kgen", "Metadata": "[ONNX Layer: a/MatMul]\x1e[ONNX Layer: a/Softmax]"
      "\x1e[ONNX Layer: a/MatMul_1]"}, "mha"),
    ({"Name": "__myl_Softmax_myl0_1", "LayerType": "kgen", "Metadata": "[ONNX Layer: b/attn/Softmax]"}, "softmax"),
    ({"Name": "__myl_Mean", "LayerType": "kgen", "Metadata": "[ONNX Layer: b/norm1/LayerNormalization]"},
     "layernorm"),
    ({"Name": "fc1", "LayerType": "CaskGemmMatrixMultiply"}, "gemm"),
    ({"Name": "q", "LayerType": "Scale", "ParameterType": "Scale"}, "qdq"),
    ({"Name": "{ForeignNode[/patch_embed/proj/Conv]}", "LayerType": "DLA"}, "dla"),
    ({"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat"}, "reformat"),
])
def test_classify_layer(layer, kind):
    assert classify_layer(layer) == kind


def test_doctor_paths(tmp_path):
    assert [d["engine"] for d in doctor(DATA)] == sorted(p.name.split(".")[0] for p in DATA.glob("*.layers.json"))
    shutil.copy(DATA / "h100_int8.layers.json", tmp_path / "h100_int8.layers.json")
    shutil.copy(DATA / "h100_int8.build.json", tmp_path / "h100_int8.build.json")
    (tmp_path / "h100_int8.engine").write_bytes(b"engine")
    (d,) = doctor(tmp_path / "h100_int8.engine")                       # an engine with its sidecar JSON
    assert d["asked"]["precision"] == "int8" and d["qdq"]["standalone"] == 1
    with pytest.raises(VitoptError, match="does not exist"):
        doctor(tmp_path / "nope.engine")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitoptError, match="holds no"):
        doctor(tmp_path / "empty")
    (tmp_path / "bad.layers.json").write_text("{not json")
    with pytest.raises(VitoptError, match="cannot be read as JSON"):
        doctor(tmp_path / "bad.layers.json")
    (tmp_path / "list.layers.json").write_text("[1, 2]")
    with pytest.raises(VitoptError, match="not engine-inspector JSON"):
        doctor(tmp_path / "list.layers.json")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: a bare engine is inspected live")
def test_bare_engine_without_tensorrt_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "x.engine").write_bytes(b"engine")
    with pytest.raises(VitoptError, match="TensorRT is not installed to inspect it live"):
        doctor(tmp_path / "x.engine")


def test_cli_doctor_prints_blocks_and_verdicts():
    res = CliRunner().invoke(app, ["doctor", str(DATA)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert res.output.count("verdict:") == len(list(DATA.glob("*.layers.json")))
    assert "NOT fused" in res.output and "fused MHA" in res.output and "DLA: 1 DLA subgraphs" in res.output


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed here (the registry's tensorrt wheel downloads from "
                                        "NVIDIA's index, unreachable); the live inspector path needs it and a GPU")
def test_live_engine_inspection(tmp_path):
    import timm
    import torch

    from vitopt.deploy import tensorrt_build as tb
    from vitopt.deploy.onnx_export import export_onnx

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for TensorRT")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=10, embed_dim=64, depth=2, num_heads=2).eval()
    export_onnx(model, tmp_path / "m.onnx", (3, 32, 32), simplify=False)
    trt = tb.require_tensorrt()
    cfg = tb.derive_build_config("h100", "fp32", trt_major=tb.tensorrt_major(trt), input_chw=(3, 32, 32),
                                 profile=(1, 2, 4), opt_level=0)
    rec = tb.build_engine(tmp_path / "m.onnx", cfg, tmp_path / "b")
    Path(rec["layers_json"]).unlink()
    (d,) = doctor(rec["engine"])                                       # no sidecar: TensorRT asked live
    assert d["detailed"] and len(d["blocks"]) == 2
