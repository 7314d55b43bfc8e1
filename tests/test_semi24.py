"""2:4 semi-structured sparsity: exact pattern, fixed during fine-tuning, visible in ONNX, cuSPARSELt parity."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitopt.errors import VitoptError
from vitopt.sparsity.semi24 import Semi24, check_semi_structured, is_24, mask_24, onnx_24_fraction, semi24_masks
from vitopt.train.loop import TrainHParams, fit

KW = dict(img_size=16, patch_size=4, in_chans=1, num_classes=4, depth=2, embed_dim=32, num_heads=4)


def tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **KW)


def test_mask_24_keeps_two_largest_of_every_four():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, -0.2, -5.0]])
    assert mask_24(w).tolist() == [[False, True, True, False, True, False, False, True]]
    w = torch.randn(48, 64)
    m = mask_24(w)
    assert torch.all(m.reshape(48, -1, 4).sum(-1) == 2)
    kept_min = (w.abs() * m).reshape(48, -1, 4).topk(2, -1).values.min(-1).values
    dropped_max = (w.abs() * ~m).reshape(48, -1, 4).max(-1).values
    assert torch.all(kept_min >= dropped_max)
    with pytest.raises(VitoptError):
        mask_24(torch.randn(4, 6))


def test_finetune_keeps_exact_24_pattern():
    model = tiny()
    cb = Semi24(model)
    masks = {n: m.clone() for n, m in cb.masks.masks.items()}
    assert len(masks) == 8                                           # qkv, proj, fc1, fc2 x 2 blocks
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(48, 1, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g)),
                      batch_size=16)
    hist = fit(model, data, None, TrainHParams(epochs=2, lr=1e-2, warmup_epochs=0), callbacks=[cb])
    for n, m in masks.items():
        p = model.get_parameter(n)
        assert torch.equal(cb.masks.masks[n], m)                     # mask fixed
        assert torch.all(p[~m] == 0)
        nz = (p != 0).reshape(p.shape[0], -1, 4).sum(-1)
        assert torch.all(nz <= 2) and nz.float().mean() > 1.9        # 2 non-zeros per group (barring exact 0s)
        assert is_24(p)
    assert hist[-1]["density"] == pytest.approx(0.5)


def test_onnx_24_fraction(tmp_path):
    from vitopt.deploy.onnx_export import export_onnx

    model = tiny().eval()
    dense = export_onnx(model, tmp_path / "dense.onnx", (1, 16, 16), exporter="torchscript")
    assert onnx_24_fraction(dense["path"])["sparse_24"] == 0
    Semi24(model)
    sparse = export_onnx(model, tmp_path / "sparse.onnx", (1, 16, 16), exporter="torchscript")
    rep = onnx_24_fraction(sparse["path"])
    # the 8 block Linears are 2:4, the classifier head (32 x 4) is not
    assert rep["weights"] == 9 and rep["sparse_24"] == 8
    n_block = sum(m.numel() for m in semi24_masks(model).values())
    assert rep["fraction"] == pytest.approx(n_block / (n_block + 32 * 4))
    with pytest.raises(VitoptError):
        onnx_24_fraction(tmp_path / "missing.onnx")


def test_semi_structured_cuda_matches_dense():
    if not torch.cuda.is_available():
        pytest.skip("torch.sparse.to_sparse_semi_structured needs a CUDA GPU (sm80+); this machine has none")
    torch.manual_seed(0)
    w = torch.randn(3072, 768)
    rep = check_semi_structured(w, tokens=2048, repeats=20)
    assert rep["max_abs_weight_diff"] == 0.0
    assert rep["max_abs_out_diff"] <= 1e-2 * rep["max_abs_out"]
    assert rep["sparse_ms"] > 0 and rep["dense_ms"] > 0
