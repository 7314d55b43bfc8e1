"""``train``: dense training from scratch (or from the loaded weights) - for when no pretrained model exists.

AdamW, per-step cosine schedule with linear warmup, label smoothing, optional AMP / gradient clipping /
EMA (see :func:`vitopt.train.loop.fit`). The stage checkpoints at every epoch end into
``<stage>/checkpoints/`` and a re-run continues from there (:attr:`StageDir.checkpoint_dir`).
"""

from __future__ import annotations

from vitopt.sparsity.attention import attention_reg_callbacks
from vitopt.stages.base import StageDir, State, hparams, loaders
from vitopt.train.distributed import training_device
from vitopt.train.images import make_mixup
from vitopt.train.loop import fit

__all__ = ["run"]


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
