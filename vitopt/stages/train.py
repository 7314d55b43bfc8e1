"""``train``: dense training from scratch (or from the loaded weights) - for when no pretrained model exists.

AdamW, per-step cosine schedule with linear warmup, label smoothing, optional AMP / gradient clipping /
EMA (see :func:`vitopt.train.loop.fit`). The stage checkpoints at every epoch end into
``<stage>/checkpoints/`` and a re-run continues from there (:attr:`StageDir.checkpoint_dir`).
"""

from __future__ import annotations

from vitopt.sparsity.attention import attention_reg_callbacks
from vitopt.stages.base import StageDir, State
from vitopt.train.data import make_loader
from vitopt.train.distributed import training_device, world_size
from vitopt.train.images import make_mixup
from vitopt.train.loop import TrainHParams, fit

__all__ = ["run", "hparams", "loaders"]


def hparams(cfg) -> TrainHParams:
    """The loop's hyper-parameters from a training stage config (epochs, lr, min_lr, wd, warmup, amp, ema...)."""
    return TrainHParams(epochs=cfg.epochs, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing,
                        grad_clip=cfg.grad_clip, amp=getattr(cfg, "amp", None),
                        ema_decay=getattr(cfg, "ema", None))


def loaders(cfg, state: State, stage_index: int):
    """Seeded train/val DataLoaders; the seed differs per stage so stages see different orders.

    ``cfg.batch_size`` is the global batch (split across torchrun processes by
    :func:`~vitopt.train.data.make_loader`).
    """
    seed = state.seed * 1000 + stage_index
    data = state.data
    train = make_loader(data.train, cfg.batch_size, shuffle=True, seed=seed, num_workers=data.num_workers,
                        drop_last=len(data.train) > cfg.batch_size)
    val_bs = max(cfg.batch_size, 128)
    val_bs -= val_bs % world_size()
    val = make_loader(data.val, val_bs, shuffle=False, seed=seed, num_workers=data.num_workers)
    return train, val


def run(cfg, state: State, sd: StageDir) -> State:
    """Train ``state.model`` densely (resuming from the stage's epoch checkpoint); save it and the history."""
    train, val = loaders(cfg, state, sd.index)
    with attention_reg_callbacks(getattr(cfg, "attention_reg", None), state.model) as reg:  # Sparse-then-Prune
        history = fit(state.model, train, val, hparams(cfg), on_epoch_end=state.epoch_hook(sd.label), desc=sd.label,
                      checkpoint_dir=sd.checkpoint_dir, device=training_device(),
                      mixup=make_mixup(state.data.augment, state.data.num_classes, cfg.label_smoothing),
                      callbacks=reg)
    sd.save_model(state)
    final = history[-1]
    metrics = {"val_top1": final["val_top1"], "val_loss": final["val_loss"], **state.cost(),
               "skipped_images": state.data.skipped_images(), "history": history}
    state.results[sd.label] = sd.finish(cfg, metrics, {"model": f"{sd.label}/model"})
    return state
