"""Epoch checkpoints and resume: in-process equivalence, corrupt checkpoints, and SIGKILL of a real run.

A run interrupted at an epoch boundary (or SIGKILLed anywhere, including while it writes a
checkpoint) and resumed must end with bitwise-equal weights and the same metrics as the run that went
straight through (deterministic CPU, same seed, one thread).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

from vitopt.errors import VitoptError
from vitopt.train import Callback
from vitopt.train.checkpoint import checkpoint_path, load_checkpoint
from vitopt.train.data import load_data, make_loader, model_input
from vitopt.train.loop import TrainHParams, default_param_groups, fit, set_seed

ROOT = Path(__file__).resolve().parents[1]


def _tiny():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                             num_classes=10, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1)


class _Stop(Exception):
    pass


class _RandomMask(Callback):
    """Stateful callback: re-draws a random weight mask every 5 updates from the global torch RNG."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.mask, self.updates = stop_at, None, 0

    def on_fit_start(self, model, optimizer, total_steps):
        super().on_fit_start(model, optimizer, total_steps)
        if self.mask is None:
            self.mask = torch.ones_like(model.blocks[0].mlp.fc1.weight)

    def after_step(self, step):
        if self.stop_at is not None and step == self.stop_at:
            raise _Stop()
        self.updates += 1
        if self.updates % 5 == 0:
            self.mask = (torch.rand_like(self.mask) > 0.2).float()
        self.model.blocks[0].mlp.fc1.weight.data.mul_(self.mask)

    def state_dict(self):
        return {"mask": self.mask.clone(), "updates": self.updates}

    def load_state_dict(self, state):
        self.mask, self.updates = state["mask"].clone(), int(state["updates"])


def _setup(seed=0):
    """Fresh model, gate parameter outside the model, param groups, loaders (all deterministic)."""
    set_seed(seed)
    m = _tiny()
    b = load_data(SimpleNamespace(type="digits", val_fraction=0.2), model_input(m), seed=0)
    train = torch.utils.data.Subset(b.train, range(320))
    gate = torch.nn.Parameter(torch.ones(16))
    groups = default_param_groups(m, 0.05) + [{"params": [gate], "lr": 1e-2, "weight_decay": 0.0}]
    tl = make_loader(train, 32, shuffle=True, seed=7, drop_last=True)
    vl = make_loader(b.val, 128, shuffle=False, seed=7)
    return m, gate, groups, tl, vl


HP = TrainHParams(epochs=3, lr=2e-3, warmup_epochs=0.5, ema_decay=0.9, grad_clip=1.0)


def _run(ckpt_dir, stop_at=None, seed=0):
    m, gate, groups, tl, vl = _setup(seed)
    cb = _RandomMask(stop_at)
    hist = fit(m, tl, vl, HP, param_groups=groups, extra_loss=lambda: 1e-3 * gate.abs().sum(), callbacks=[cb],
               checkpoint_dir=ckpt_dir)
    return m, gate, cb, hist


def _strip(hist):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist]


def test_fit_resumed_after_interruption_is_bitwise_equal(tmp_path):
    """Straight 3 epochs == (killed in epoch 2 after a checkpoint of epoch 1) + resume: weights, gate,
    callback state, EMA-final weights and every epoch record equal bitwise."""
    ref_m, ref_gate, ref_cb, ref_hist = _run(tmp_path / "ref")
    with pytest.raises(_Stop):
        _run(tmp_path / "cut", stop_at=10 + 3)          # 10 steps per epoch: dies in epoch 2
    ck = load_checkpoint(tmp_path / "cut")
    assert ck["epoch"] == 1 and ck["global_step"] == 10 and len(json.loads(ck["history"])) == 1
    # a different seed proves the resumed state comes from the checkpoint, not from re-seeding
    m, gate, cb, hist = _run(tmp_path / "cut", seed=123)
    for k, v in ref_m.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    assert torch.equal(gate, ref_gate) and torch.equal(cb.mask, ref_cb.mask) and cb.updates == ref_cb.updates
    assert _strip(hist) == _strip(ref_hist) and len(hist) == 3
    assert all("val_top1_ema" in r for r in hist)
    # the finished run's checkpoint says so, and fitting again from it trains nothing
    again, *_ = _run(tmp_path / "cut", seed=5)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ref_m.state_dict().items())


def test_epoch_order_depends_only_on_seed_and_epoch():
    from vitopt.train.loop import _begin_epoch

    ds = torch.utils.data.TensorDataset(torch.arange(50))
    a = make_loader(ds, 10, shuffle=True, seed=3)
    b = make_loader(ds, 10, shuffle=True, seed=3)
    orders = []
    for loader, epochs in ((a, [1, 2, 3]), (b, [3])):
        base = loader.generator.initial_seed()
        for e in epochs:
            _begin_epoch(loader, base, e)
            orders.append(torch.cat([x[0] for x in loader]).tolist())
    assert orders[2] == orders[3] and orders[0] != orders[1] and sorted(orders[0]) == list(range(50))


def test_nan_loss_keeps_last_good_checkpoint(tmp_path):
    m, gate, groups, tl, vl = _setup()
    calls = {"n": 0}

    def bad():
        calls["n"] += 1
        return torch.tensor(float("inf")) if calls["n"] == 15 else torch.tensor(0.0)

    with pytest.raises(VitoptError, match=r"training loss became inf at epoch 2 step 5 .*last epoch checkpoint is kept"):
        fit(m, tl, vl, TrainHParams(epochs=3, lr=1e-3), extra_loss=bad, checkpoint_dir=tmp_path)
    assert load_checkpoint(tmp_path)["epoch"] == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_checkpoint"])
def test_corrupt_checkpoint_is_one_sentence(tmp_path, damage):
    m, gate, groups, tl, vl = _setup()
    fit(m, tl, None, TrainHParams(epochs=1, lr=1e-3), checkpoint_dir=tmp_path)
    p = checkpoint_path(tmp_path)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        p.write_bytes(os.urandom(2000))
    elif damage == "empty":
        p.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, p)
    with pytest.raises(VitoptError, match=rf"epoch checkpoint {p} .*delete {p}") as ei:
        fit(m, tl, None, TrainHParams(epochs=1, lr=1e-3), checkpoint_dir=tmp_path)
    assert "\n" not in str(ei.value)


def test_checkpoint_of_another_schedule_or_model_is_refused(tmp_path):
    m, gate, groups, tl, vl = _setup()
    fit(m, tl, None, TrainHParams(epochs=1, lr=1e-3), checkpoint_dir=tmp_path)
    with pytest.raises(VitoptError, match="written for 1 epochs of 10 steps but this run has 2 epochs"):
        fit(m, tl, None, TrainHParams(epochs=2, lr=1e-3), checkpoint_dir=tmp_path)
    other = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              num_classes=10, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(VitoptError, match="does not match this model or optimizer"):
        fit(other, tl, None, TrainHParams(epochs=1, lr=1e-3), checkpoint_dir=tmp_path)


# ------------------------------------------------------------------ SIGKILL of the real command line

RECIPE = """
name: kr
seed: 1
output_dir: {out}
model:
  name: deit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 4, lr: 2.0e-3, batch_size: 64}}
  - {{type: prune, criterion: l1, target: {{flops: 0.6}}, round_to: {{heads: 1, head_dim: 8, mlp: 16}}}}
  - {{type: finetune, epochs: 2, lr: 1.0e-3, batch_size: 64, ema: 0.9, kd: {{alpha: 0.5, tau: 2.0}}}}
"""

#: Runs the CLI; KILL_AT_WRITE=N SIGKILLs the process inside the N-th epoch-checkpoint write, after
#: the temp file is written and fsync'd but before its rename (the worst moment for atomicity).
WRAPPER = """
import os, signal, sys
n = int(os.environ.get("KILL_AT_WRITE", "0"))
if n:
    real, seen = os.replace, [0]
    def replace(src, dst):
        if str(dst).endswith("last.pt"):
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
from vitopt.cli import main
sys.argv = ["vitopt", "run", sys.argv[1]]
main()
"""


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    env.pop("WORLD_SIZE", None)
    return env


def _start(recipe: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRAPPER, str(recipe)], cwd=ROOT, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final(run: Path) -> tuple[dict, list]:
    from safetensors.torch import load_file

    weights = load_file(str(run / "02_finetune" / "model" / "model.safetensors"))
    metrics = [json.loads((run / d / "metrics.json").read_text())["metrics"] for d in
               ("00_train", "01_prune", "02_finetune")]
    return weights, _no_timings(metrics)


def _no_timings(obj):
    """Drop wall-clock fields (``seconds``) at any depth: they are the only legitimate difference."""
    if isinstance(obj, dict):
        return {k: _no_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_no_timings(v) for v in obj]
    return obj


def _recipe(tmp: Path, name: str) -> Path:
    out = tmp / name
    out.mkdir()
    p = out / "r.yaml"
    p.write_text(RECIPE.format(out=out))
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    p = _recipe(tmp_path_factory.mktemp("kill"), "ref")
    proc = _start(p)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return _final(p.parent / "kr")


def _assert_same(run: Path, reference) -> None:
    weights, metrics = _final(run)
    ref_w, ref_m = reference
    assert weights.keys() == ref_w.keys()
    for k in ref_w:
        assert torch.equal(weights[k], ref_w[k]), k
    assert metrics == ref_m
    assert not any(run.glob("*/checkpoints")), "finished stages keep no epoch checkpoints"


@pytest.mark.slow
def test_sigkill_during_epoch_then_resume_matches(tmp_path, reference):
    p = _recipe(tmp_path, "cut")
    ck = p.parent / "kr" / "00_train" / "checkpoints" / "last.pt"
    proc = _start(p)
    deadline = time.time() + 300
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)                                     # somewhere inside epoch 2 (or later)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (p.parent / "kr" / "02_finetune" / "metrics.json").exists()
    resumed = _start(p)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out or "finished earlier" in out
    _assert_same(p.parent / "kr", reference)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume_matches(tmp_path, reference):
    p = _recipe(tmp_path, "write")
    proc = _start(p, KILL_AT_WRITE="2")                 # dies renaming epoch 2's checkpoint of 00_train
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out
    ckdir = p.parent / "kr" / "00_train" / "checkpoints"
    assert load_checkpoint(ckdir)["epoch"] == 1            # the old checkpoint is intact
    assert list(ckdir.glob(".last.pt.*.tmp"))              # the interrupted write left only a temp file
    resumed = _start(p)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    _assert_same(p.parent / "kr", reference)
