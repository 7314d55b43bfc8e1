"""``train``: dense training from scratch (or from the loaded weights) - for when no pretrained model exists.

AdamW, per-step cosine schedule with linear warmup, label smoothing (see :func:`vitopt.train.loop.fit`).
"""

from __future__ import annotations

from vitopt.stages.base import StageDir, State
from vitopt.train.data import make_loader
from vitopt.train.loop import TrainHParams, fit

__all__ = ["run", "hparams", "loaders"]


def hparams(cfg) -> TrainHParams:
    """The loop's hyper-parameters from a training stage config (epochs, lr, min_lr, wd, warmup, ...)."""
    return TrainHParams(epochs=cfg.epochs, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing,
                        grad_clip=cfg.grad_clip)


def loaders(cfg, state: State, stage_index: int):
    """Seeded train/val DataLoaders; the seed differs per stage so stages see different orders."""
    seed = state.seed * 1000 + stage_index
    data = state.data
    train = make_loader(data.train, cfg.batch_size, shuffle=True, seed=seed, num_workers=data.num_workers,
                        drop_last=len(data.train) > cfg.batch_size)
    val = make_loader(data.val, max(cfg.batch_size, 128), shuffle=False, seed=seed, num_workers=data.num_workers)
    return train, val


def run(cfg, state: State, sd: StageDir) -> State:
    """Train ``state.model`` densely; save it and the per-epoch history."""
    train, val = loaders(cfg, state, sd.index)
    history = fit(state.model, train, val, hparams(cfg), on_epoch_end=state.epoch_hook(sd.label), desc=sd.label)
    sd.save_model(state)
    final = history[-1]
    metrics = {"val_top1": final["val_top1"], "val_loss": final["val_loss"], **state.cost(), "history": history}
    state.results[sd.label] = sd.finish(cfg, metrics, {"model": f"{sd.label}/model"})
    return state
