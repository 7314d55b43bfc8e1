"""``sparse_train`` (method ``vtp``): learnable per-unit gates trained with an L1 penalty.

VTP (Zhu, Tang, Han 2021, arXiv 2104.08500): a gate on every head, head dim and MLP neuron of every
block, loss = task loss + lambda * sum |gate| (lambda ~ 1e-4). Each epoch logs the mean gate and the
fraction of gates below ``threshold``. At the end the gates are folded into the adjacent Linear
weights (the model keeps computing the gated function, exactly) and their values are kept in the
State as importance scores for a later ``prune`` with ``criterion: gate``.
"""

from __future__ import annotations

from vitopt.arch.families import family_of
from vitopt.io import save_weights
from vitopt.sparsity.gates import UnitGates
from vitopt.stages.base import StageDir, State
from vitopt.stages.train import hparams, loaders
from vitopt.train.loop import default_param_groups, fit

__all__ = ["run"]


def run(cfg, state: State, sd: StageDir) -> State:
    """Train ``state.model`` with VTP gates on ``cfg.groups``; fold them; save model + gates.safetensors."""
    model = state.model
    structure = family_of(model).structure(model)
    gates = UnitGates(structure, tuple(cfg.groups))
    groups = default_param_groups(model, cfg.weight_decay)
    groups.append({"params": list(gates.parameters()), "weight_decay": 0.0, "lr": cfg.gate_lr or cfg.lr})
    lam = cfg.lambda_
    train, val = loaders(cfg, state, sd.index)
    with gates.attach(model):
        history = fit(model, train, val, hparams(cfg), param_groups=groups,
                      extra_loss=lambda: lam * gates.l1(),
                      on_epoch_end=state.epoch_hook(sd.label, lambda epoch, rec: rec.update(gates.stats(cfg.threshold))),
                      desc=sd.label)
    values = gates.values()
    gates.fold_into(model)
    save_weights(sd.path / "gates.safetensors", values)
    sd.save_model(state)
    state.gates = values
    final = history[-1]
    metrics = {"val_top1": final["val_top1"], "val_loss": final["val_loss"], "gate_mean": final["gate_mean"],
               "gate_frac_below": final["gate_frac_below"], "lambda": lam, **state.cost(), "history": history}
    state.results[sd.label] = sd.finish(cfg, metrics, {"model": f"{sd.label}/model",
                                                       "gates": f"{sd.label}/gates.safetensors"})
    return state
