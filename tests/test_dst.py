"""SViTE unstructured dynamic sparse training: ERK densities, masks on weights/grads/AdamW, RigL/SET updates."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitopt.deploy import TorchRuntime, evaluate_runtime
from vitopt.errors import VitoptError
from vitopt.rundir import validation_data
from vitopt.sparsity.dst import SViTE, cosine_death_rate, is_update_step
from vitopt.sparsity.erk import erk_densities
from vitopt.train.loop import TrainHParams, fit

KW = dict(img_size=16, patch_size=4, in_chans=1, num_classes=4, depth=2, embed_dim=32, num_heads=4)


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", **KW)


def loader(n: int = 64, batch: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def test_erk_overall_density_and_rule():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=4,
                              embed_dim=96, num_heads=6)
    dst = SViTE(model, 0.3)
    d = dst.masks.density()
    assert abs(d["overall"] - 0.3) <= 0.005
    shapes = {n: tuple(p.shape) for n, p in dst.masks.params.items()}
    dens = erk_densities(shapes, 0.3)
    # ERK: density ratio of two non-dense layers equals the ratio of (n_in + n_out) / (n_in * n_out)
    a, b = "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight"
    rule = (sum(shapes[a]) / math.prod(shapes[a])) / (sum(shapes[b]) / math.prod(shapes[b]))
    assert dens[a] / dens[b] == pytest.approx(rule, rel=1e-9)
    assert d[a] == pytest.approx(dens[a], abs=1e-3)


def test_erk_caps_dense_layers_and_still_meets_target():
    shapes = {"small": (4, 4), "big": (512, 512)}
    dens = erk_densities(shapes, 0.2)
    assert dens["small"] == 1.0
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(dens[n] * math.prod(s) for n, s in shapes.items()) / total == pytest.approx(0.2, abs=1e-9)
    with pytest.raises(VitoptError):
        erk_densities(shapes, 1.5)


def test_cosine_death_rate():
    assert cosine_death_rate(0, 100, 0.5) == pytest.approx(0.5)
    assert cosine_death_rate(50, 100, 0.5) == pytest.approx(0.25)
    assert cosine_death_rate(100, 100, 0.5) == 0.0
    assert [s for s in range(20) if is_update_step(s, 5, 16)] == [4, 9, 14]


@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_pruned_weights_stay_zero_and_density_is_kept(growth):
    model = tiny()
    dst = SViTE(model, 0.4, growth=growth, death_rate=0.5, update_interval=2, t_end=0.9)
    before = {n: m.clone() for n, m in dst.masks.masks.items()}
    hist = fit(model, loader(), None, TrainHParams(epochs=2, lr=1e-2, weight_decay=0.05, warmup_epochs=0),
               callbacks=[dst])
    assert dst.updates == 3 and sum(h["moved"] for h in dst.history) > 0      # steps 2, 4, 6 of 8 (t_end 7.2)
    changed = sum(int((before[n] != m).sum()) for n, m in dst.masks.masks.items())
    assert changed > 0
    for name, p in dst.masks.params.items():
        mask = dst.masks.masks[name]
        assert int(mask.sum()) == int(before[name].sum())                     # per-layer count fixed
        assert torch.all(p[~mask] == 0)                                       # exactly zero
        assert int((p != 0).sum()) <= int(mask.sum())
        state = dst.optimizer.state[p]
        assert torch.all(state["exp_avg"][~mask] == 0) and torch.all(state["exp_avg_sq"][~mask] == 0)
    assert hist[-1]["density"] == pytest.approx(dst.masks.density()["overall"])
    assert "density/blocks.0.attn.qkv" in hist[-1]


def test_rigl_regrows_largest_gradients_at_zero():
    model = tiny()
    dst = SViTE(model, 0.5, growth="gradient", death_rate=0.3, update_interval=1, t_end=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dst.on_fit_start(model, opt, total_steps=10)
    x, y = next(iter(loader()))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    name = "blocks.1.mlp.fc1.weight"
    p = dst.masks.params[name]
    grad = p.grad.detach().abs().clone()
    old = dst.masks.masks[name].clone()
    dst.after_backward(0)
    opt.step()
    dst.after_step(0)
    new = dst.masks.masks[name]
    grown = new & ~old
    assert grown.any()
    assert torch.all(p[grown] == 0)                                   # regrown weights start at zero
    assert torch.all(opt.state[p]["exp_avg"][grown] == 0)
    # every grown entry has a gradient at least as large as any inactive entry that was not grown
    not_grown = ~new & ~old
    assert grad[grown].min() >= grad[not_grown].max()


def test_state_dict_resume_reproduces_set_updates():
    model = tiny()
    a = SViTE(model, 0.4, growth="random", update_interval=1, t_end=1.0, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    a.on_fit_start(model, opt, 10)
    a.after_step(0)
    saved = copy.deepcopy(a.state_dict())
    model_b = copy.deepcopy(model)
    b = SViTE(model_b, 0.4, growth="random", update_interval=1, t_end=1.0, seed=123)
    b.on_fit_start(model_b, torch.optim.AdamW(model_b.parameters(), lr=1e-3), 10)
    b.load_state_dict(saved)
    a.after_step(1)
    b.after_step(1)
    assert b.updates == a.updates == 2
    for n in a.masks.masks:
        assert torch.equal(a.masks.masks[n], b.masks.masks[n])


def test_bad_options_raise():
    with pytest.raises(VitoptError):
        SViTE(tiny(), 1.2)
    with pytest.raises(VitoptError):
        SViTE(tiny(), 0.5, growth="momentum")


# ------------------------------------------------------------------------------------ recipe + stage
RECIPE = """
name: {name}
seed: 1
output_dir: {out}
model:
  name: deit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 4}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 1, lr: 2.0e-3}}
  - {stage}
{tail}
"""

STAGES = {
    "vtp": ("{type: sparse_train, method: vtp, epochs: 1, lambda: 1.0e-3, attention_reg: {weight: 0.1}}", ""),
    "svite": ("{type: sparse_train, method: svite, epochs: 2, batch_size: 128, "
              "svite: {density: 0.3, update_interval: 3, growth: random}}", ""),
    "s2vite": ("{type: sparse_train, method: s2vite, epochs: 1, s2vite: {head_density: 0.5, mlp_density: 0.5, "
               "update_interval: 4}}", "  - {type: finetune, epochs: 1, kd: {alpha: 0.5, tau: 2.0}}"),
    "svite_plus": ("{type: sparse_train, method: svite_plus, epochs: 1, svite_plus: {keep: 0.5, after_block: 0}}", ""),
    "semi24": ("{type: sparse_train, method: semi24, epochs: 1, semi24: {layers: [fc1, fc2]}}", ""),
}


@pytest.mark.parametrize("method", list(STAGES))
def test_sparse_train_stage_runs_each_method(tmp_path, method):
    import json

    from vitopt.arch.config import load_pruned
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe

    stage, tail = STAGES[method]
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(name=method, out=tmp_path, stage=stage, tail=tail))
    run = run_recipe(load_recipe(path))
    rec = json.loads((run / "01_sparse_train" / "metrics.json").read_text())
    m = rec["metrics"]
    assert m["method"] == method and m["val_top1"] == m["history"][-1]["val_top1"]
    model = load_pruned(run / "01_sparse_train" / "model")
    # the recorded top-1 is the saved model's on the run's validation split (masks/gates folded as saved)
    images, labels, _, _ = validation_data(run, model)
    rt = TorchRuntime(model, threads=1)
    try:
        assert m["val_top1"] == pytest.approx(evaluate_runtime(rt, images, labels)["top1"], abs=1e-9)
    finally:
        rt.close()
    if method == "vtp":
        assert (run / "01_sparse_train" / "gates.safetensors").is_file() and m["attn_sparsity"] > 0
    if method == "svite":
        assert abs(m["density"] - 0.3) <= 0.005 and m["mask_updates"] >= 1
        w = [model.get_parameter(n) for n in m["density_per_layer"]]
        kept = sum(int((p != 0).sum()) for p in w) / sum(p.numel() for p in w)
        assert kept <= m["density"] + 1e-9
    if method == "s2vite":
        assert [blk.attn.num_heads for blk in model.blocks] == [2, 2]
        assert [blk.mlp.fc1.out_features for blk in model.blocks] == [64, 64]
        assert m["flops_ratio"] < 0.75
        assert (run / "02_finetune" / "metrics.json").is_file()     # KD from the pre-S2ViTE model
    if method == "svite_plus":
        assert model.token_selector.keep == 8 and m["tokens_kept"] == 9 and m["flops_ratio"] < 1.0
    if method == "semi24":
        from vitopt.sparsity.semi24 import is_24

        for blk in model.blocks:
            assert is_24(blk.mlp.fc1.weight) and is_24(blk.mlp.fc2.weight) and not is_24(blk.attn.qkv.weight)


@pytest.mark.parametrize("bad, needle", [
    ("{type: sparse_train, method: svite, epochs: 1, lambda: 1.0e-3}", "'lambda' is an option of method 'vtp'"),
    ("{type: sparse_train, method: s2vite, epochs: 1, svite: {density: 0.3}}", "holds options of method 'svite'"),
    ("{type: sparse_train, method: svite, epochs: 1, svite: {density: 1.5}}", "svite.density"),
    ("{type: sparse_train, method: magic, epochs: 1}", "method"),
])
def test_recipe_rejects_options_of_another_method(tmp_path, bad, needle):
    from vitopt.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(name="bad", out=tmp_path, stage=bad, tail=""))
    with pytest.raises(VitoptError) as exc:
        load_recipe(path)
    assert needle in str(exc.value) and "r.yaml" in str(exc.value)


# ------------------------------------------------------------------------------------ VTP as a callback
def test_vtp_gates_on_weights_match_activation_hooks():
    from vitopt.arch.families import family_of
    from vitopt.arch.gates import UnitGates
    from vitopt.sparsity.vtp import VTP, attach_gates_to_weights

    model = tiny().eval()
    keys = set(model.state_dict())
    gates = UnitGates(family_of(model).structure(model), ("heads", "head_dim", "mlp"))
    with torch.no_grad():
        for p in gates.parameters():
            p.uniform_(0.0, 1.5)
    x = torch.randn(3, 1, 16, 16)
    with gates.attach(model):
        ref = model(x)
        g_ref = torch.autograd.grad(ref.square().sum(), list(gates.parameters()))
    with attach_gates_to_weights(model, gates):
        assert not any(p is q for p in model.parameters() for q in gates.parameters())   # gates stay outside
        out = model(x)
        g = torch.autograd.grad(out.square().sum(), list(gates.parameters()))
    assert (out - ref).abs().max().item() <= 1e-5
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == keys                             # plain weights again after remove
    vtp = VTP(model, 1e-3)                                             # the method: gates on the weights
    with torch.no_grad():
        for p in vtp.parameters():
            p.uniform_(0.0, 1.5)
    assert vtp.loss().item() == pytest.approx(1e-3 * vtp.gates.l1().item(), rel=1e-6)
    saved = vtp.state_dict()
    with torch.no_grad():
        for p in vtp.parameters():
            p.fill_(1.0)
    vtp.load_state_dict(saved)
    assert all(torch.equal(vtp.gates.values()[k[5:]], v) for k, v in saved.items())
    with torch.no_grad():
        gated = model(x)
        values = vtp.finish()                                          # fold: plain weights compute the same
        assert set(model.state_dict()) == keys and (model(x) - gated).abs().max().item() <= 1e-5
    assert all(torch.equal(values[k[5:]], v) for k, v in saved.items())


def test_svite_and_semi24_cover_swin_blocks():
    from vitopt.sparsity.semi24 import semi24_masks

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, embed_dim=32,
                             depths=(2, 2), num_heads=(2, 4), num_classes=7)
    dst = SViTE(swin, 0.3)
    names = list(dst.masks.params)
    assert len(names) == 16 and all(".blocks." in n for n in names)      # 4 Linears x 4 blocks, no head/merging
    assert abs(dst.masks.density()["overall"] - 0.3) <= 0.005
    assert set(semi24_masks(swin)) == set(names)
