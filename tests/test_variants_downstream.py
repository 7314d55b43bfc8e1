"""Downstream of the new structures (issue 16 item 5): every criterion through ``vitopt.prune`` on a DINOv2-style
ViT, a SigLIP ViT, an EVA-02 model and an AIMv2 (RmsNorm) ViT; a recipe run (prune + export) by model name string for each; and
``vitopt inspect`` on the result."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from typer.testing import CliRunner

import vitopt
from vitopt.cli import app
from vitopt.pipeline import run_recipe
from vitopt.recipe import load_recipe
from vitopt.stages import recipe_choices

#: digits are 1 x 8 x 8: patch 2 gives 16 tokens
DIGITS = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)
MODELS = {
    "dinov2": ("vit_giant_patch14_reg4_dinov2", dict(DIGITS, mlp_ratio=4.0)),
    "siglip": ("vit_base_patch16_siglip_224", dict(DIGITS)),
    "eva02": ("eva02_tiny_patch14_224", dict(DIGITS, scale_attn_inner=True)),
    "aimv2": ("aimv2_large_patch14_224", dict(DIGITS)),          # RmsNorm everywhere, split SwiGLU
}


def _batches(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("criterion", ["l1", "taylor", "hessian", "kl"])
def test_every_criterion_prunes_the_new_structures(key, criterion):
    name, kw = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, **kw).eval()
    dense = vitopt.structure(model).cost("flops")
    data = None if criterion == "l1" else _batches()
    pruned = vitopt.prune(model, target={"flops": 0.6}, criterion=criterion, data=data,
                          compare="calibrated" if data else "normalized", round_to={"heads": 1, "head_dim": 2, "mlp": 2, "embed": 2})
    assert vitopt.structure(pruned).cost("flops") <= 0.6 * dense
    with torch.no_grad():
        assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("key", list(MODELS))
def test_recipe_prune_export_and_inspect(key, tmp_path):
    name, kw = MODELS[key]
    kwargs = ", ".join(f"{k}: {v}" for k, v in kw.items())
    text = f"""
name: {key}
seed: 1
output_dir: {tmp_path}
model:
  name: {name}
  kwargs: {{{kwargs}}}
data: {{type: digits}}
stages:
  - type: prune
    criterion: taylor
    target: {{flops: 0.5}}
    calibration: {{batches: 2, batch_size: 16}}
  - type: export
"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    run_dir = run_recipe(load_recipe(path, choices=recipe_choices()))
    export = json.loads((run_dir / "01_export" / "metrics.json").read_text())["metrics"]
    assert export["max_abs_diff"] <= 1e-4
    model = vitopt.load(run_dir)
    assert type(model).__name__ == type(timm.create_model(name, **kw)).__name__
    res = CliRunner().invoke(app, ["inspect", str(run_dir)], terminal_width=200)
    assert res.exit_code == 0, res.output
    flops = vitopt.structure(model).cost("flops")
    assert f"total {flops / 1e6:.2f} MFLOPs" in res.output
    summary = (run_dir / "summary.md").read_text()
    assert "## Kept units per block" in summary
    if key == "eva02":
        assert "head_dim fixed under RoPE" in res.output
        # summary.md leaves out the head_dim column no block has (as for Swin v2)
        assert "| block | heads | mlp hidden |" in summary, summary
