"""Deploy layer: ONNX export (invariant 4 of docs/architecture.md), runtimes, latency.

Models are tiny timm ViTs built from scratch (16x16 single-channel images, 4x4 patches, width 64,
depth 2, 4 heads) with randomised weights, so biases and norms are non-trivial and nothing is
folded away by the simplifier.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from vitopt.deploy import (
    OrtRuntime,
    Runtime,
    RuntimeSpec,
    TorchRuntime,
    check_onnx,
    compare_logits,
    eager_attention,
    evaluate_runtime,
    export_onnx,
    known_runtimes,
    make_runtime,
    measure_latency,
    register_runtime,
)
from vitopt.deploy import runtimes as runtimes_mod
from vitopt.errors import VitoptError

INPUT = (1, 16, 16)
DEPTH = 2
KW = dict(pretrained=False, img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=DEPTH,
          num_heads=4)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _vit(name: str = "deit_tiny_patch16_224", seed: int = 0) -> nn.Module:
    return _randomize(timm.create_model(name, **KW), seed)


def _pruned_vit(seed: int = 0) -> nn.Module:
    """Non-uniform blocks, as channel surgery leaves them: 2 heads in block 0, MLP 40 in block 1."""
    model = timm.create_model("deit_tiny_patch16_224", **KW)
    attn = model.blocks[0].attn
    attn.qkv = nn.Linear(64, 3 * 2 * 16)
    attn.proj = nn.Linear(32, 64)
    attn.num_heads, attn.head_dim, attn.attn_dim = 2, 16, 32
    mlp = model.blocks[1].mlp
    mlp.fc1, mlp.fc2 = nn.Linear(64, 40), nn.Linear(40, 64)
    return _randomize(model, seed)


def _fused_flags(model: nn.Module) -> dict[str, bool]:
    return {n: bool(m.fused_attn) for n, m in model.named_modules() if hasattr(m, "fused_attn")}


def _training_flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *INPUT), dtype=np.float32)


# ---------------------------------------------------------------------------------- exported models
KINDS = ["deit", "distilled", "pruned"]


def _export(kind: str, folder) -> tuple[str, nn.Module, dict, dict]:
    """(kind, model, export info, state before export) for one model kind."""
    model = {"deit": lambda: _vit(),
             "distilled": lambda: _vit("deit_tiny_distilled_patch16_224", seed=1),
             "pruned": lambda: _pruned_vit(seed=2)}[kind]()
    # A state export must leave alone: training mode with one submodule in eval, mixed fused flags.
    model.train()
    model.head.eval()
    model.blocks[1].attn.fused_attn = False
    before = {"fused": _fused_flags(model), "training": _training_flags(model),
              "scale": [b.attn.scale for b in model.blocks],
              "state": {k: v.clone() for k, v in model.state_dict().items()}}
    # The distilled model goes out at opset 23, where the dynamo exporter would turn a fused
    # (SDPA) attention into one ONNX ``Attention`` node; the others at the default opset 17.
    opset = 23 if kind == "distilled" else 17
    info = export_onnx(model, folder / "sub" / f"{kind}.onnx", INPUT, opset=opset)
    assert info["opset"] == opset
    return kind, model, info, before


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``exports(kind)``: each model kind is exported once per module (dynamo export takes seconds)."""
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = _export(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


@pytest.fixture(params=KINDS)
def exported(request, exports):
    return exports(request.param)


def test_export_leaves_the_model_unchanged(exported):
    _, model, info, before = exported
    assert _fused_flags(model) == before["fused"] == {"blocks.0.attn": True, "blocks.1.attn": False}
    assert _training_flags(model) == before["training"]
    assert model.training and not model.head.training
    assert [b.attn.scale for b in model.blocks] == before["scale"]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before["state"].items())
    # only the module that was fused had to be switched to the eager path
    assert info["eager_attention_modules"] == ["blocks.0.attn"]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch):
    _, model, info, _ = exported
    x = _batch(batch, seed=batch)
    torch_rt, ort_rt = TorchRuntime(model), OrtRuntime(info["path"], threads=1)
    try:
        a, b = torch_rt(x), ort_rt(x)
    finally:
        torch_rt.close()
        ort_rt.close()
    assert a.shape == b.shape == (batch, 10)
    cmp = compare_logits(a, b)
    assert cmp["max_abs_diff"] <= 1e-4, cmp
    assert cmp["argmax_agreement"] == 1.0
    assert np.array_equal(a.argmax(1), b.argmax(1))
    assert np.abs(a).max() > 0.1  # non-trivial logits, so the comparison means something


def test_distilled_export_is_the_average_of_both_heads(exports):
    _, model, info, _ = exports("distilled")
    x = torch.from_numpy(_batch(2, seed=7))
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    got = OrtRuntime(info["path"])(x.numpy())
    assert np.abs(got - expected.numpy()).max() <= 1e-4


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _fed_by_matmul(name: str, producers: dict, hops: int = 3) -> bool:
    node = producers.get(name)
    if node is None:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type in ("Mul", "Add", "Div") and hops > 0:
        return any(_fed_by_matmul(i, producers, hops - 1) for i in node.input)
    return False


def _assert_vit_graph(model_proto: onnx.ModelProto, depth: int) -> None:
    graph = model_proto.graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("LayerNormalization") == 2 * depth + 1, "LayerNorm was decomposed or duplicated"
    assert "ReduceMean" not in ops and "Attention" not in ops
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == depth
    producers = _producers(graph)
    for sm in softmaxes:
        assert _fed_by_matmul(sm.input[0], producers), f"{sm.name} is not fed by MatMul(q, k^T)"
        consumers = [n.op_type for n in graph.node if sm.output[0] in n.input]
        assert consumers == ["MatMul"], f"{sm.name} feeds {consumers}, not MatMul(attn, v)"
    opset = {i.domain: i.version for i in model_proto.opset_import}
    assert opset.get("", opset.get("ai.onnx")) >= 17


def test_graph_keeps_layernorm_and_attention_pattern(exported):
    _, _, info, _ = exported
    proto = check_onnx(info["path"])
    _assert_vit_graph(proto, DEPTH)
    assert info["exporter"] == "dynamo" and info["simplified"] and info["opset"] >= 17
    assert info["node_counts"]["LayerNormalization"] == 2 * DEPTH + 1
    assert sum(info["node_counts"].values()) == len(proto.graph.node) == info["num_nodes"]
    assert info["file_size_bytes"] == os.path.getsize(info["path"]) > 0
    # I/O contract: input [batch, C, H, W] with a symbolic batch, output logits [batch, classes]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and [d.dim_value for d in in_dims[1:]] == list(INPUT)
    assert out.type.tensor_type.shape.dim[0].dim_param == in_dims[0].dim_param


# ---------------------------------------------------------------------------------- eager attention
def test_eager_attention_keeps_sdpa_scale_after_head_dim_change():
    """A hand-pruned block whose head_dim shrank but whose ``scale`` is stale: the fused path uses
    1/sqrt(new head_dim), so the eager path used for export must too."""
    model = _vit(seed=3).eval()
    attn = model.blocks[0].attn
    attn.qkv, attn.proj = nn.Linear(64, 3 * 4 * 8), nn.Linear(32, 64)
    attn.head_dim, attn.attn_dim = 8, 32  # scale stays 16 ** -0.5
    _randomize(attn, seed=4)
    x = torch.from_numpy(_batch(2, seed=5))
    with torch.no_grad():
        fused = model(x)
        with eager_attention(model) as switched:
            assert switched == ["blocks.0.attn", "blocks.1.attn"]
            assert not any(_fused_flags(model).values())
            eager = model(x)
        assert attn.fused_attn and attn.scale == 16 ** -0.5  # restored
        attn.fused_attn = False  # plain switch, without pinning the scale, changes the maths
        naive = model(x)
        attn.fused_attn = True
    assert (eager - fused).abs().max() <= 1e-5
    assert (naive - fused).abs().max() > 1e-3


def test_eager_attention_restores_flags_on_error():
    model = _vit()
    with pytest.raises(RuntimeError):
        with eager_attention(model):
            raise RuntimeError("boom")
    assert all(_fused_flags(model).values())


# ---------------------------------------------------------------------------------- export paths
def test_torchscript_static_batch_and_simplifier_fallback(tmp_path, monkeypatch, caplog):
    import onnxsim

    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxsim crash")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    model = _vit(seed=6)
    with caplog.at_level(logging.WARNING, logger="vitopt.deploy.onnx_export"):
        info = export_onnx(model, tmp_path / "m.onnx", INPUT, exporter="torchscript", dynamic_batch=False)
    assert info["exporter"] == "torchscript" and info["simplified"] is False
    assert "simulated onnxsim crash" in info["simplify_error"]
    assert any("onnxsim failed" in r.getMessage() for r in caplog.records)
    proto = check_onnx(info["path"])
    _assert_vit_graph(proto, DEPTH)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, *INPUT]
    x = _batch(1, seed=8)
    assert compare_logits(TorchRuntime(model)(x), OrtRuntime(info["path"])(x))["max_abs_diff"] <= 1e-4
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] <= 1e-4
    assert not list(tmp_path.glob(".*"))  # no temp files left next to the result


def test_export_errors_are_one_sentence(tmp_path):
    model = _vit()
    with pytest.raises(VitoptError, match="opset 16 is too old"):
        export_onnx(model, tmp_path / "m.onnx", INPUT, opset=16)
    with pytest.raises(VitoptError, match="is a directory"):
        export_onnx(model, tmp_path, INPUT)
    (tmp_path / "file").write_text("x")
    with pytest.raises(VitoptError, match="cannot create the folder"):
        export_onnx(model, tmp_path / "file" / "m.onnx", INPUT)
    with pytest.raises(VitoptError, match="rejects an input of shape"):
        export_onnx(model, tmp_path / "m.onnx", (3, 16, 16))
    with pytest.raises(VitoptError, match="three positive integers"):
        export_onnx(model, tmp_path / "m.onnx", (16, 16))
    with pytest.raises(VitoptError, match="unknown ONNX exporter"):
        export_onnx(model, tmp_path / "m.onnx", INPUT, exporter="magic")
    assert not (tmp_path / "m.onnx").exists()


class _ExportDiffers(nn.Module):
    """Logits 0 as PyTorch runs it (``fused_attn`` on) but ``delta`` (+ one class with ``extra_class``) as
    export_onnx traces it (it switches ``fused_attn`` off): a model whose ONNX graph must fail verification."""

    def __init__(self, delta: float, extra_class: bool = False) -> None:
        super().__init__()
        self.fused_attn = True
        self.delta, self.extra_class = delta, extra_class
        self.lin = nn.Linear(INPUT[1] * INPUT[2], 10)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x):
        y = self.lin(x.flatten(1))
        if self.fused_attn:
            return y
        y = y + self.delta
        return torch.cat([y, y[:, :1]], dim=1) if self.extra_class else y


def test_export_verification_rejects_a_graph_that_differs(tmp_path):
    """verify=True runs the graph in ONNX Runtime: logits off by more than 1e-4 (+ 1e-3 x max|logit|, here
    0) or of another shape raise and write nothing; within the tolerance they pass and are recorded."""
    path = tmp_path / "m.onnx"
    ok = export_onnx(_ExportDiffers(5e-5), path, INPUT, exporter="torchscript", simplify=False)
    assert ok["max_abs_diff"] == pytest.approx(5e-5, rel=1e-3) and path.is_file()
    path.unlink()
    with pytest.raises(VitoptError, match=r"differs from the PyTorch model \(max abs logit diff 0.0002 > 0.0001"):
        export_onnx(_ExportDiffers(2e-4), path, INPUT, exporter="torchscript", simplify=False)
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(VitoptError, match=r"output shapes \(2, 11\) vs \(2, 10\)"):
        export_onnx(_ExportDiffers(0.0, extra_class=True), path, INPUT, exporter="torchscript", simplify=False)
    assert not path.exists()
    # verify=False writes the mismatching graph and says it did not check
    off = export_onnx(_ExportDiffers(1.0), path, INPUT, exporter="torchscript", simplify=False, verify=False)
    assert off["max_abs_diff"] is None and path.is_file()


def test_check_onnx_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(VitoptError, match="does not exist"):
        check_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an ONNX protobuf \x00\x01\x02\xff")
    with pytest.raises(VitoptError, match=r"bad\.onnx fails the checker"):
        check_onnx(bad)
    # a well-formed protobuf that is not a valid model (no opset, no graph) fails too
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(onnx.ModelProto().SerializeToString())
    with pytest.raises(VitoptError, match="fails the checker"):
        check_onnx(empty)


# ---------------------------------------------------------------------------------- runtimes
def test_make_runtime_registry(tmp_path, monkeypatch):
    with pytest.raises(VitoptError) as err:
        make_runtime("tensorrt-but-typo")
    assert "onnxruntime" in str(err.value) and "pytorch" in str(err.value)
    with pytest.raises(VitoptError, match="needs a model"):
        make_runtime("pytorch")
    with pytest.raises(VitoptError, match="needs an ONNX file"):
        make_runtime("onnxruntime")
    with pytest.raises(VitoptError, match="does not exist"):
        make_runtime("onnxruntime", onnx_path=tmp_path / "nope.onnx")
    rt = make_runtime("pytorch", model=_vit(), threads=1)
    assert isinstance(rt, Runtime) and rt.name == "pytorch"

    # new runtimes are registry entries
    monkeypatch.setattr(runtimes_mod, "RUNTIMES", runtimes_mod.RUNTIMES)
    monkeypatch.setitem(runtimes_mod.RUNTIMES, "constant", None)

    def _make(*, model=None, onnx_path=None, engine_path=None, threads=2, classes=3):
        class _Const:
            name = "constant"

            def __call__(self, x):
                return np.zeros((x.shape[0], classes), np.float32)

            def close(self):
                pass

        return _Const()

    register_runtime(RuntimeSpec("constant", "onnx", False, _make))
    assert "constant" in known_runtimes()
    assert make_runtime("constant", classes=5)(np.zeros((2, *INPUT), np.float32)).shape == (2, 5)


def test_torch_runtime_restores_threads_and_training():
    model = _vit().train()
    before = torch.get_num_threads()
    rt = TorchRuntime(model, threads=1)
    assert not model.training
    out = rt(_batch(2, seed=0))
    assert out.dtype == np.float32 and out.shape == (2, 10)
    assert torch.get_num_threads() == before
    rt.close()
    assert model.training
    with pytest.raises(VitoptError, match="closed"):
        rt(_batch(1, seed=0))
    with pytest.raises(VitoptError, match=r"\[B, C, H, W\]"):
        TorchRuntime(_vit())(np.zeros(INPUT, np.float32))


def test_ort_runtime_session_options(exports):
    _, _, info, _ = exports("deit")
    rt = OrtRuntime(info["path"], threads=2)
    opts = rt.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    import onnxruntime as ort

    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert rt.session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(VitoptError, match="not available"):
        OrtRuntime(info["path"], providers=["NoSuchExecutionProvider"])


class _EchoLogits:
    """A runtime whose logits are the images themselves: image i is [1, 1, classes]."""

    name = "echo"

    def __init__(self):
        self.batches = []

    def __call__(self, x):
        self.batches.append(x.shape[0])
        return x.reshape(x.shape[0], -1).copy()

    def close(self):
        pass


def test_evaluate_runtime_top1_by_hand():
    logits = np.array([[0.1, 0.9, 0.0],    # argmax 1
                       [2.0, 1.0, 0.0],    # argmax 0
                       [0.0, 0.0, 3.0],    # argmax 2
                       [0.5, 0.4, 0.1],    # argmax 0
                       [0.0, 1.0, 2.0]],   # argmax 2
                      dtype=np.float32)
    labels = np.array([1, 0, 1, 2, 2])     # right, right, wrong, wrong, right -> 3/5
    rt = _EchoLogits()
    res = evaluate_runtime(rt, logits.reshape(5, 1, 1, 3), labels, batch_size=2)
    assert res["top1"] == pytest.approx(60.0)
    assert np.array_equal(res["logits"], logits)
    assert rt.batches == [2, 2, 1]
    with pytest.raises(VitoptError, match="labels must have shape"):
        evaluate_runtime(rt, logits.reshape(5, 1, 1, 3), labels[:4])


def test_compare_logits_by_hand():
    a = np.array([[1.0, 2.0], [3.0, 0.0]])
    b = np.array([[1.0, 2.5], [0.0, 3.0]])
    assert compare_logits(a, b) == {"max_abs_diff": 3.0, "argmax_agreement": 0.5}
    with pytest.raises(VitoptError, match="same shape"):
        compare_logits(a, b[:1])


# ---------------------------------------------------------------------------------- latency
def test_measure_latency_percentiles_and_sync_hook():
    calls = {"run": 0, "sync": 0}
    model = _vit()
    rt = TorchRuntime(model, threads=1)

    def runtime(x):
        calls["run"] += 1
        return rt(x)

    def sync():
        calls["sync"] += 1

    res = measure_latency(runtime, INPUT, [1, 4, 1], warmup=2, repeats=7, sync=sync)
    assert list(res) == [1, 4]
    assert calls == {"run": 2 * 9, "sync": 2 * 9}
    for bs, r in res.items():
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["mean_ms"] > 0 and r["std_ms"] >= 0 and r["repeats"] == 7
        assert r["throughput_img_s"] == pytest.approx(bs / (r["p50_ms"] / 1e3))
    with pytest.raises(VitoptError, match="repeats"):
        measure_latency(runtime, INPUT, [1], repeats=0)
    with pytest.raises(VitoptError, match="batch_sizes"):
        measure_latency(runtime, INPUT, [0])


# ---------------------------------------------------------------------------------- more runtimes
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_torch_compile_runtime_matches_eager():
    model = _pruned_vit(seed=5)
    x = _batch(3, 5)
    eager = make_runtime("pytorch", model=model, threads=1)
    ref = eager(x)
    eager.close()
    # the aot_eager backend traces through torch.compile's frontend without a C++ toolchain (inductor on GPUs)
    rt = make_runtime("pytorch-compile", model=model, threads=1, compile_backend="aot_eager")
    assert rt.name == "pytorch-compile" and isinstance(rt, Runtime)
    out = rt(x)
    rt.close()
    assert compare_logits(out, ref)["max_abs_diff"] <= 1e-5


def test_torch_runtime_dtype_is_restored():
    model = _pruned_vit(seed=6)
    x = _batch(4, 6)
    ref = make_runtime("pytorch", model=model, threads=1)(x)
    rt = make_runtime("pytorch", model=model, threads=1, dtype="bf16")
    out = rt(x)
    assert next(model.parameters()).dtype == torch.bfloat16
    rt.close()
    assert next(model.parameters()).dtype == torch.float32
    d = compare_logits(out, ref)
    assert 0 < d["max_abs_diff"] < 0.1 * float(np.abs(ref).max())    # bf16 rounding: close, not equal
    with pytest.raises(VitoptError, match="dtype 'int8'"):
        make_runtime("pytorch", model=model, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(VitoptError, match="no CUDA device"):
            make_runtime("pytorch", model=model, device="cuda")


def test_gpu_runtimes_fail_with_one_sentence(tmp_path, exports):
    import onnxruntime as ort

    onnx_path = exports("pruned")[2]["path"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(VitoptError, match="onnxruntime-gpu"):
            make_runtime("onnxruntime-cuda", onnx_path=onnx_path)
    with pytest.raises(VitoptError, match="needs an engine file"):
        make_runtime("tensorrt")
    with pytest.raises(VitoptError, match="does not exist"):
        make_runtime("tensorrt", engine_path=tmp_path / "missing.engine")
    if not HAS_TRT:
        fake = tmp_path / "x.engine"
        fake.write_bytes(b"\0" * 16)
        with pytest.raises(VitoptError, match=r"vitopt\[trt\]"):
            make_runtime("tensorrt", engine_path=fake)
    assert {"pytorch", "pytorch-compile", "onnxruntime", "onnxruntime-cuda", "tensorrt"} <= set(known_runtimes())


def test_latency_timer_choice():
    with pytest.raises(VitoptError, match="timer 'gpu'"):
        measure_latency(lambda x: x, INPUT, [1], timer="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(VitoptError, match="needs a CUDA device"):
            measure_latency(lambda x: x, INPUT, [1], timer="cuda")


def test_measure_runtimes_parity_on_a_pruned_model(exports):
    from vitopt.deploy.validation import measure_runtimes

    _, model, info, _ = exports("pruned")
    x = _batch(24, 7)
    labels = np.arange(24) % 10
    res = measure_runtimes(["pytorch", "onnxruntime"], x, labels, batch_sizes=[1, 4], model=model.eval(),
                           onnx_path=info["path"], threads=1, warmup=1, repeats=5)
    ort_r, pt_r = res["runtimes"]["onnxruntime"], res["runtimes"]["pytorch"]
    assert ort_r["vs_pytorch"]["max_abs_diff"] <= 1e-4 and ort_r["vs_pytorch"]["argmax_agreement"] == 1.0
    assert res["parity"] == ort_r["vs_pytorch"] and "vs_pytorch" not in pt_r
    assert ort_r["top1"] == pt_r["top1"]
    for r in (ort_r, pt_r):
        for s in r["latency"].values():
            assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    # without the eager runtime in the list, the reference is an extra eager pass of the model
    only = measure_runtimes(["onnxruntime"], x, labels, batch_sizes=[2], model=model, onnx_path=info["path"],
                            threads=1, warmup=0, repeats=2)
    assert only["runtimes"]["onnxruntime"]["vs_pytorch"] == pytest.approx(ort_r["vs_pytorch"])


def test_validate_artifact_onnx_with_sample(tmp_path, exports):
    from typer.testing import CliRunner

    from vitopt.cli import app
    from vitopt.rundir import validate as validate_artifact

    onnx_path = exports("pruned")[2]["path"]
    x = _batch(12, 8)
    ref = make_runtime("onnxruntime", onnx_path=onnx_path, threads=1)(x)
    labels = ref.argmax(1)
    np.savez(tmp_path / "s.npz", images=x, labels=labels)
    res = validate_artifact(onnx_path, ["onnxruntime"], batch_sizes=[1, 3], data=tmp_path / "s.npz", threads=1,
                            warmup=0, repeats=3)
    assert res["runtimes"]["onnxruntime"]["top1"] == 100.0 and res["num_images"] == 12
    assert res["artifact"]["kind"] == "onnx" and set(res["runtimes"]["onnxruntime"]["latency"]) == {"1", "3"}
    with pytest.raises(VitoptError, match="has no validation data"):
        validate_artifact(onnx_path, ["onnxruntime"], batch_sizes=[1])
    with pytest.raises(VitoptError, match="runtime 'pytorch' needs a model folder"):
        validate_artifact(onnx_path, ["pytorch"], batch_sizes=[1], data=tmp_path / "s.npz")
    with pytest.raises(VitoptError, match="unknown runtime kind 'tensorflow'"):
        validate_artifact(onnx_path, ["tensorflow"], batch_sizes=[1])
    with pytest.raises(VitoptError, match="is not a run directory"):
        validate_artifact(tmp_path / "s.npz", ["onnxruntime"], batch_sizes=[1])
    runner = CliRunner()
    out = runner.invoke(app, ["validate", str(onnx_path), "--data", str(tmp_path / "s.npz"), "--batch-sizes", "2",
                              "--threads", "1", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path / "v.json")],
                        env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "v.json").read_text())["runtimes"]["onnxruntime"]["top1"] == 100.0
    bad = runner.invoke(app, ["validate", str(onnx_path), "--batch-sizes", "0,x"])
    assert isinstance(bad.exception, VitoptError) and "--batch-sizes" in str(bad.exception)


# ---------------------------------------------------------------------------------- benchmarks/gpu_latency.py
def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_latency", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "gpu_latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_latency_shapes_and_flops():
    from torch.utils.flop_counter import FlopCounterMode

    g = _gpu_bench()
    shape = g.pruned_shape(0.5)
    assert (shape["heads"], shape["mlp"]) == (3, 768) and abs(shape["ratio"] - 0.5) < 0.01
    with pytest.raises(ValueError):
        g.pruned_shape(0)
    dense = g.dense_model()
    pruned = g.slice_model(g._copy(dense), 3, 768)
    x = torch.randn(1, 3, 224, 224)
    for m, (h, mlp) in ((dense, (6, 1536)), (pruned, (3, 768))):
        for blk in m.blocks:
            blk.attn.fused_attn = False          # count q@k^T and attn@v as matmuls
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            y = m(x)
        assert y.shape == (1, 1000)
        assert fc.get_total_flops() == pytest.approx(g.deit_flops(h, mlp), rel=0.01)
    # the pruned model is the dense one with units removed: same values in the kept slices
    assert torch.equal(pruned.blocks[0].mlp.fc1.weight, dense.blocks[0].mlp.fc1.weight[:768])
    assert pruned.blocks[0].attn.qkv.weight.shape == (3 * 3 * 64, 384)


def test_gpu_latency_skips_cleanly_without_cuda(tmp_path):
    g = _gpu_bench()
    rec = g.main(["--no-cuda", "--out", str(tmp_path / "g.json")])
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["rows"] == [] and saved["skipped"] and saved["pruned_shape"]["heads"] == 3 and rec == saved
    rows = [{"model": "dense", "runtime": "r", "batch": 1, "p50_ms": 2.0, "p90_ms": 3.0, "throughput_img_s": 500},
            {"model": "pruned", "runtime": "r", "batch": 1, "p50_ms": 1.0, "p90_ms": 1.5, "throughput_img_s": 1000}]
    assert g.format_table(rows).splitlines()[-1].endswith("| 2.00x |")
    # rows timed interleaved with dense carry the per-round ratio: speed-up = 1 / ratio, range from its min-max
    rows[1]["ratio"] = {"median": 0.5, "min": 0.4, "max": 0.8, "q1": 0.45, "q3": 0.6}
    assert g.format_table(rows).splitlines()[-1].endswith("| 2.00x (1.25-2.50) |")
    assert saved["command"] == f"python benchmarks/gpu_latency.py --no-cuda --out {tmp_path / 'g.json'}"
    assert saved["load"]["cpu_count"] >= 1 and saved["date"]
