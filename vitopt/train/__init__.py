"""Training: model-ready datasets, the AdamW + cosine training loop, and distillation losses.

See :mod:`vitopt.train.data`, :mod:`vitopt.train.loop` and :mod:`vitopt.train.losses`.
"""

from vitopt.train.callbacks import Callback
from vitopt.train.data import (
    DataBundle,
    ModelInput,
    load_data,
    make_loader,
    model_input,
    to_model_input,
    val_arrays,
)
from vitopt.train.loop import (
    TrainHParams,
    default_param_groups,
    evaluate,
    fit,
    lr_at_step,
    make_optimizer,
    make_scheduler,
    set_seed,
)
from vitopt.train.losses import kd_loss, merge_heads

__all__ = [
    "Callback",
    "DataBundle",
    "ModelInput",
    "load_data",
    "make_loader",
    "model_input",
    "to_model_input",
    "val_arrays",
    "TrainHParams",
    "default_param_groups",
    "evaluate",
    "fit",
    "lr_at_step",
    "make_optimizer",
    "make_scheduler",
    "set_seed",
    "kd_loss",
    "merge_heads",
]
