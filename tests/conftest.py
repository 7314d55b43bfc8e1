"""Shared fixtures: one small end-to-end run of every stage, made once per test session."""

from __future__ import annotations

import pytest

#: A recipe through every stage on digits, small enough for CI (~1 minute on 2 cores).
E2E_RECIPE = """
name: e2e
seed: 3
output_dir: {out}
model:
  name: deit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 64, depth: 2, num_heads: 4}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 2, lr: 2.0e-3}}
  - {{type: sparse_train, epochs: 1, lambda: 1.0e-3, gate_lr: 1.0e-2}}
  - type: prune
    criterion: gate
    target: {{flops: 0.6}}
    round_to: {{heads: 1, head_dim: 8, mlp: 16}}
  - {{type: finetune, epochs: 1, kd: {{alpha: 0.5, tau: 2.0}}}}
  - {{type: export}}
  - {{type: validate, batch_sizes: [1, 4], warmup: 1, repeats: 3, rounds: 3, round_ms: 5}}
"""


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory):
    """``(run_dir, recipe_path)`` of :data:`E2E_RECIPE` run through the pipeline once."""
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe

    out = tmp_path_factory.mktemp("runs")
    path = out / "e2e.yaml"
    path.write_text(E2E_RECIPE.format(out=out))
    return run_recipe(load_recipe(path)), path
