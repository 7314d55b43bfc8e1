"""S2ViTE structured DST: fixed head/neuron counts, Taylor/grad scores, masked == surgered with folded biases."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitopt.arch.plan import KeepPlan
from vitopt.sparsity.structured_dst import S2ViTE, finalize, fold_removed_units
from vitopt.train.loop import TrainHParams, fit

KW = dict(img_size=16, patch_size=4, in_chans=1, num_classes=4, depth=2, embed_dim=48, num_heads=4, mlp_ratio=2.0)


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", **KW)


def loader(n: int = 64, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=batch)


@pytest.fixture(scope="module")
def trained():
    """A tiny ViT after 2 epochs of S2ViTE with an update every 2 steps (so masks moved)."""
    model = tiny()
    with torch.no_grad():                       # non-zero biases, so the folded constants matter
        for blk in model.blocks:
            blk.attn.qkv.bias.normal_(0, 0.5)
            blk.mlp.fc1.bias.normal_(0, 0.5)
    dst = S2ViTE(model, head_density=0.5, mlp_density=0.5, death_rate=0.5, update_interval=2, t_end=1.0)
    initial = ([m.clone() for m in dst.head_masks], [m.clone() for m in dst.mlp_masks])
    fit(model, loader(), None, TrainHParams(epochs=2, lr=1e-2, warmup_epochs=0), callbacks=[dst])
    return model, dst, initial


def test_counts_fixed_and_masks_moved(trained):
    model, dst, (h0, m0) = trained
    assert dst.updates == 3                                        # steps 2, 4, 6 of 8 (t_end excludes 8)
    for i in range(len(model.blocks)):
        assert int(dst.head_masks[i].sum()) == 2 and int(dst.mlp_masks[i].sum()) == 48
    assert sum(h["heads_swapped"] + h["mlp_swapped"] for h in dst.history) > 0
    assert any(not torch.equal(a, b) for a, b in zip(h0 + m0, dst.head_masks + dst.mlp_masks))


def test_removed_units_incoming_weights_are_zero(trained):
    model, dst, _ = trained
    for i, blk in enumerate(model.blocks):
        H, d = blk.attn.num_heads, blk.attn.head_dim
        qkv = blk.attn.qkv.weight.view(3, H, d, -1)
        assert torch.all(qkv[:, ~dst.head_masks[i]] == 0)
        assert torch.all(qkv[:, dst.head_masks[i]].abs().sum(dim=(0, 2, 3)) > 0)
        assert torch.all(blk.mlp.fc1.weight[~dst.mlp_masks[i]] == 0)


@pytest.mark.parametrize("fused", [True, False])
def test_masked_equals_surgered_with_folded_bias(trained, fused):
    model, dst, _ = trained
    masked = copy.deepcopy(model).eval()
    surgered = copy.deepcopy(model).eval()
    plan = finalize(surgered, dst)
    for m in (masked, surgered):
        for blk in m.blocks:
            blk.attn.fused_attn = fused
    assert [blk.attn.num_heads for blk in surgered.blocks] == [2, 2]
    assert [blk.mlp.fc1.out_features for blk in surgered.blocks] == [48, 48]
    assert plan.keep["blocks.0.heads"] == dst.head_masks[0].nonzero().flatten().tolist()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        ref, out = masked(x), surgered(x)
    assert (ref - out).abs().max().item() <= 1e-5


def test_without_fold_the_v_bias_leak_is_visible(trained):
    """Surgery alone (no fold) changes the logits: the removed heads' v-bias reached proj through softmax."""
    from vitopt.arch.surgery import apply_plan

    model, dst, _ = trained
    masked = copy.deepcopy(model).eval()
    cut = apply_plan(model, dst.plan()).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert (masked(x) - cut(x)).abs().max().item() > 1e-3


def test_fold_removed_head_is_proj_w_times_v_bias():
    model = tiny().eval()
    blk = model.blocks[0]
    H, d = blk.attn.num_heads, blk.attn.head_dim
    with torch.no_grad():
        blk.attn.qkv.bias.normal_()
        blk.attn.qkv.weight.view(3, H, d, -1)[:, 1] = 0              # head 1 has zero q/k/v weights
    expect = blk.attn.proj.bias + blk.attn.proj.weight[:, d:2 * d] @ blk.attn.qkv.bias[2 * H * d + d: 2 * H * d + 2 * d]
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
        plan = KeepPlan({"blocks.0.heads": [0, 2, 3]})
        fold_removed_units(model, plan)
        assert torch.allclose(blk.attn.proj.bias, expect, atol=1e-6)
        assert (model(x) - ref).abs().max().item() <= 1e-5          # fold alone keeps the function


def test_state_dict_round_trip(trained):
    model, dst, _ = trained
    other = S2ViTE(copy.deepcopy(model), head_density=0.5, mlp_density=0.5)
    other.load_state_dict(dst.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.head_masks, dst.head_masks))
    assert all(torch.equal(a, b) for a, b in zip(other.mlp_masks, dst.mlp_masks))
    assert other.updates == dst.updates


def test_taylor_probe_is_head_output_times_its_gradient():
    """The probe's score equals d loss / d (per-head multiplier at proj's input) = sum o_h * dL/do_h."""
    from vitopt.arch.families import family_of
    from vitopt.arch.hooks import attach_scalers

    model = tiny()
    dst = S2ViTE(model, 0.5, 0.5, update_interval=1)
    dst.on_fit_start(model, torch.optim.AdamW(model.parameters(), lr=1e-3), total_steps=4)
    x, y = next(iter(loader()))
    st = family_of(model).structure(model)
    ones = {f"blocks.{i}.heads": torch.ones(4, requires_grad=True) for i in range(2)}
    with attach_scalers(model, st, ones):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    dst.close()
    taylor = dst._global_taylor()
    for i in range(2):
        assert torch.allclose(taylor[i].float(), ones[f"blocks.{i}.heads"].grad.abs(), rtol=1e-4, atol=1e-8)
