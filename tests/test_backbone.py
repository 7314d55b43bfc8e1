"""Pruned multi-scale backbones: feature maps with the reported channels, and ONNX export parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from vitopt.arch.config import create_model
from vitopt.arch.families import family_of
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.deploy.backbone import export_backbone_onnx, feature_specs, make_backbone
from vitopt.errors import VitoptError

SWIN = ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2),
                                             num_heads=(2, 4), num_classes=5))
PVT = ("pvt_v2_b0", dict(img_size=32, depths=(1, 1), embed_dims=(16, 32), num_heads=(2, 4), sr_ratios=(2, 1),
                         mlp_ratios=(2, 2), num_classes=5))


def _pruned(spec, seed: int = 3):
    torch.manual_seed(0)
    model = create_model(*spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    st = family_of(model).structure(model)
    g = torch.Generator().manual_seed(seed)
    keep = {grp.name: sorted(torch.randperm(grp.size, generator=g)[: max(1, grp.size * 2 // 3)].tolist())
            for grp in st.of_kind("embed", "heads", "head_dim", "mlp")}
    return model, apply_plan(model, KeepPlan(keep))


@pytest.mark.parametrize("spec", [SWIN, PVT], ids=["swin", "pvt_v2"])
def test_pruned_feature_maps_have_reported_shapes(spec):
    dense, pruned = _pruned(spec)
    dims = family_of(pruned).read_dims(pruned)
    widths = [v for k, v in dims.items() if k.endswith(".embed")]
    assert widths == [16, 32] if spec is SWIN else widths == [10, 21]
    backbone = make_backbone(pruned)
    assert backbone.feature_info.channels() == widths
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = backbone(x)
    red = backbone.feature_info.reduction()
    assert [tuple(f.shape) for f in feats] == [(2, c, 32 // r, 32 // r) for c, r in zip(widths, red)]
    specs = feature_specs(backbone, (3, 32, 32))
    assert [s["shape"] for s in specs] == [list(f.shape[1:]) for f in feats]
    # the backbone is a copy: the classifier still works and is unchanged
    with torch.no_grad():
        assert pruned(x).shape == (2, 5)
    # the last-stage map is what the classifier pools
    with torch.no_grad():
        inter = pruned.forward_intermediates(x, intermediates_only=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(feats, inter))
    # a single stage on request
    one = make_backbone(pruned, out_indices=[1])
    assert one.feature_info.channels() == widths[1:]


@pytest.mark.parametrize("spec", [SWIN, PVT], ids=["swin", "pvt_v2"])
def test_backbone_onnx_parity(tmp_path, spec):
    _, pruned = _pruned(spec)
    info = export_backbone_onnx(pruned, tmp_path / "bb.onnx", (3, 32, 32), simplify=spec is SWIN)
    widths = make_backbone(pruned).feature_info.channels()
    assert [o["num_chs"] for o in info["outputs"]] == widths
    assert max(info["max_abs_diff"]) <= 1e-4
    graph = onnx.load(str(tmp_path / "bb.onnx"))
    assert [o.name for o in graph.graph.output] == ["feat0", "feat1"]
    ops = {n.op_type for n in graph.graph.node}
    assert "LayerNormalization" in ops and "Softmax" in ops and info["opset"] >= 17
    # dynamic batch: a batch of 3 runs and matches PyTorch
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "bb.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    outs = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        ref = make_backbone(pruned)(x)
    for a, b in zip(outs, ref):
        assert a.shape == tuple(b.shape) and np.abs(a - b.numpy()).max() <= 1e-4


def test_backbone_rejects_bad_requests(tmp_path):
    _, pruned = _pruned(PVT)
    with pytest.raises(VitoptError, match="out_indices"):
        make_backbone(pruned, out_indices=[5])
    with pytest.raises(VitoptError, match="opset"):
        export_backbone_onnx(pruned, tmp_path / "x.onnx", (3, 32, 32), opset=13)
    vit = create_model("vit_tiny_patch16_224", dict(img_size=16, patch_size=8, depth=1, num_classes=3))
    vit.feature_info = []
    with pytest.raises(VitoptError, match="hierarchical"):
        make_backbone(vit)


def test_pruned_swin_classifier_onnx_parity(tmp_path):
    """The classifier export of vitopt.deploy (fused attention off, LayerNormalization) matches a pruned Swin."""
    from vitopt.deploy.onnx_export import export_onnx

    _, pruned = _pruned(SWIN)
    info = export_onnx(pruned, tmp_path / "m.onnx", (3, 32, 32), simplify=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = pruned(x).numpy()
    assert np.abs(out - ref).max() <= 1e-4 and (out.argmax(1) == ref.argmax(1)).all()
    assert info["opset"] >= 17
