"""SViTE+ token selector: kept tokens, class token, gradients, FLOPs with reduced tokens, static ONNX parity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitopt.errors import VitoptError
from vitopt.sparsity.token_selector import SViTEPlus, attach_token_selector
from vitopt.train.loop import TrainHParams, fit

KW = dict(img_size=16, patch_size=4, in_chans=1, num_classes=4, depth=3, embed_dim=32, num_heads=4)


def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **KW)


def test_selects_top_k_and_keeps_class_token():
    model = tiny().eval()
    sel = attach_token_selector(model, keep=0.5, after_block=0)
    assert sel.keep == 8 and sel.num_patches == 16 and sel.num_prefix == 1
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        model(x)
        h = model.blocks[0].forward(model.norm_pre(model._pos_embed(model.patch_embed(x))))  # no hook
        top = sel.scores(h).topk(8, dim=1).indices
    got = seen["x"]
    assert got.shape == (2, 9, 32)
    assert torch.equal(got[:, 0], h[:, 0])                            # class token kept, first
    for b in range(2):
        assert torch.allclose(got[b, 1:], h[b, 1 + top[b]])


def test_training_is_stochastic_and_scorer_gets_gradients():
    model = tiny().train()
    sel = attach_token_selector(model, keep=6, after_block=1, tau=0.5)
    x = torch.randn(4, 1, 16, 16)
    out = model(x)
    out.square().sum().backward()
    assert sel.score.weight.grad is not None and sel.score.weight.grad.abs().sum() > 0
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)                                   # Gumbel noise changes the choice


def test_schedule_and_fit():
    model = tiny()
    sched = SViTEPlus(model, keep=0.5, after_block=0, tau=1.0, tau_end=0.1)
    sel = sched.selector
    assert model.token_selector is sel
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 4, (32,), generator=g)),
                      batch_size=8)
    hist = fit(model, data, data, TrainHParams(epochs=1, lr=1e-3, warmup_epochs=0), callbacks=[sched])
    assert sel.tau == pytest.approx(0.1)
    assert hist[-1]["tokens_kept"] == 9


def test_flops_count_reduced_tokens():
    from torch.utils.flop_counter import FlopCounterMode

    from vitopt.arch.cost import CostModel

    model = tiny().eval()
    dense = CostModel(model).flops({})
    sel = attach_token_selector(model, keep=4, after_block=0)
    cm = CostModel(model)
    flops = cm.flops({})
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        for blk in model.blocks:                                      # explicit q@k^T, attn@v are counted
            blk.attn.fused_attn = False
        model(torch.randn(1, 1, 16, 16))
    counted = fc.get_total_flops()
    assert flops < dense
    assert flops == counted, (flops, counted)
    assert sel.macs(model, cm.structure.sizes())["blocks.2"] < sel.macs(model, cm.structure.sizes())["blocks.0"]


def test_arch_json_round_trip(tmp_path):
    from vitopt.arch.config import load_pruned, save_pruned

    model = tiny().eval()
    attach_token_selector(model, keep=5, after_block=1)
    with torch.no_grad():
        model.token_selector.score.weight.normal_()
    save_pruned(model, tmp_path / "m", "deit_tiny_patch16_224", KW)
    again = load_pruned(tmp_path / "m")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), again(x), atol=1e-6)
    copy_ = copy.deepcopy(again)                                      # the copy's hook uses the copy's selector
    with torch.no_grad():
        copy_.token_selector.score.weight.neg_()
        assert torch.allclose(again(x), model(x), atol=1e-6)


def test_onnx_static_shapes_and_ort_parity(tmp_path):
    import onnx
    import onnxruntime as ort

    from vitopt.deploy.onnx_export import export_onnx

    model = tiny().eval()
    attach_token_selector(model, keep=6, after_block=0)
    with torch.no_grad():
        model.token_selector.score.weight.normal_()
    info = export_onnx(model, tmp_path / "ts.onnx", (1, 16, 16), dynamic_batch=False)
    graph = onnx.load(info["path"])
    topk = [n for n in graph.graph.node if n.op_type == "TopK"]
    assert len(topk) == 1
    inferred = onnx.shape_inference.infer_shapes(graph)
    dims = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in inferred.graph.value_info}
    assert all(None not in d for d in dims.values())                  # every intermediate shape is static
    assert [1, 7, 32] in dims.values()                                # 1 class token + 6 kept patches
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() <= 1e-4 and got.argmax() == ref.argmax()


def test_bad_options():
    with pytest.raises(VitoptError):
        attach_token_selector(tiny(), keep=0.5, after_block=2)
    with pytest.raises(VitoptError):
        attach_token_selector(tiny(), keep=17, after_block=0)
