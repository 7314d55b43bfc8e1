"""``finetune``: train the pruned model, with knowledge distillation from the model before ``prune``.

Loss = alpha * tau^2 * KL(teacher || student at temperature tau) + (1 - alpha) * CE (Hinton, Vinyals,
Dean 2015, arXiv 1503.02531), as UP-ViTs and NViT fine-tune their pruned models.
"""

from __future__ import annotations

from vitopt.errors import VitoptError
from vitopt.stages.base import StageDir, State
from vitopt.stages.train import hparams, loaders
from vitopt.train.loop import fit

__all__ = ["run"]


def run(cfg, state: State, sd: StageDir) -> State:
    """Fine-tune ``state.model`` (KD from ``state.teacher`` when ``cfg.kd.enabled``); save it."""
    teacher = state.teacher if cfg.kd.enabled else None
    if cfg.kd.enabled and teacher is None:
        raise VitoptError(f"stages[{sd.index}] (finetune) uses kd but no earlier prune stage left a teacher; "
                          "add a prune stage before it or set kd.enabled: false.")
    train, val = loaders(cfg, state, sd.index)
    history = fit(state.model, train, val, hparams(cfg), teacher=teacher, kd_alpha=cfg.kd.alpha,
                  kd_tau=cfg.kd.tau, on_epoch_end=state.epoch_hook(sd.label), desc=sd.label)
    sd.save_model(state)
    final = history[-1]
    metrics = {"val_top1": final["val_top1"], "val_loss": final["val_loss"], **state.cost(), "history": history}
    state.results[sd.label] = sd.finish(cfg, metrics, {"model": f"{sd.label}/model"})
    return state
