"""``finetune``: train the pruned model, with knowledge distillation from the model before ``prune``.

Loss = alpha * tau^2 * KL(teacher || student at temperature tau) + (1 - alpha) * CE (Hinton, Vinyals,
Dean 2015, arXiv 1503.02531), as UP-ViTs and NViT fine-tune their pruned models. Checkpoints at every
epoch end into ``<stage>/checkpoints/``; a re-run continues from there. The teacher runs on every rank
of a torchrun job.
"""

from __future__ import annotations

from vitopt.errors import VitoptError
from vitopt.sparsity.attention import attention_reg_callbacks
from vitopt.stages.base import StageDir, State, hparams, loaders
from vitopt.train.distributed import training_device
from vitopt.train.images import make_mixup
from vitopt.train.loop import fit

__all__ = ["run"]


def run(cfg, state: State, sd: StageDir) -> State:
    """Fine-tune ``state.model`` (KD from ``state.teacher`` when ``cfg.kd.enabled``); save it."""
    teacher = state.teacher if cfg.kd.enabled else None
    if cfg.kd.enabled and teacher is None:
        raise VitoptError(f"stages[{sd.index}] (finetune) uses kd but no earlier prune stage left a teacher; "
                          "add a prune stage before it or set kd.enabled: false.")
    train, val = loaders(cfg, state, sd.index)
    with attention_reg_callbacks(getattr(cfg, "attention_reg", None), state.model) as reg:  # Sparse-then-Prune
        history = fit(state.model, train, val, hparams(cfg), teacher=teacher, kd_alpha=cfg.kd.alpha,
                      kd_tau=cfg.kd.tau, on_epoch_end=state.epoch_hook(sd.label), desc=sd.label,
                      checkpoint_dir=sd.checkpoint_dir, device=training_device(),
                      mixup=make_mixup(state.data.augment, state.data.num_classes, cfg.label_smoothing),
                      callbacks=reg)
    sd.save_model(state)
    final = history[-1]
    metrics = {"val_top1": final["val_top1"], "val_loss": final["val_loss"], **state.cost(),
               "skipped_images": state.data.skipped_images(), "history": history}
    state.results[sd.label] = sd.finish(cfg, metrics, {"model": f"{sd.label}/model"})
    return state
