"""What stages share: the State passed from stage to stage and the stage's own folder.

A stage is a function ``(config, State, StageDir) -> State`` (docs/architecture.md). It reads the model and
data from the State, writes its outputs (checkpoint, metrics.json, ONNX...) into its StageDir, and
returns the State for the next stage. ``metrics.json`` is written last and atomically, so its
presence marks a finished stage; :mod:`vitopt.pipeline` skips finished stages on resume and restores
the State from what they recorded under ``"outputs"``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitopt.arch.config import load_pruned, save_pruned
from vitopt.arch.cost import CostModel
from vitopt.arch.structure import Structure
from vitopt.io import atomic_write_json, read_json
from vitopt.train.data import make_loader
from vitopt.train.distributed import world_size
from vitopt.train.loop import TrainHParams

__all__ = ["State", "StageDir", "MODEL_DIR", "RECIPE_FILE", "STAGE_GLOB", "hparams", "loaders", "structure_table",
           "embed_widths", "latest_output"]

#: a stage's saved model folder (arch.json + model.safetensors), inside its stage folder.
MODEL_DIR = "model"
#: the resolved recipe a run directory was made with.
RECIPE_FILE = "recipe.yaml"
#: glob of the stage folders of a run directory (``00_train``, ``01_prune``...).
STAGE_GLOB = "[0-9][0-9]_*"


@dataclass
class State:
    """Everything one stage hands to the next.

    Attributes:
        model: the current model (timm class, possibly pruned), on CPU.
        model_name, model_kwargs: how to re-create the dense model with timm (for arch.json).
        data: the :class:`~vitopt.train.data.DataBundle`.
        seed: the recipe's seed.
        dense: cost of the recipe's dense model: ``{"flops": int, "macs": int, "params": int}``.
        reference_dir: model folder of the dense model as it entered the first prune (for the
            dense-vs-pruned comparison in ``validate``), or None before any prune.
        teacher: KD teacher (the model as it was before the last prune), or None.
        teacher_dir: the folder it was saved in (so a resumed run can reload it).
        gates: trained gate values from ``sparse_train`` (group -> [size]), or None.
        onnx_path: the ONNX file written by ``export``, or None.
        results: stage label -> the metrics that stage recorded.
        logger: a :class:`~vitopt.train.tensorboard.TensorBoardLog` when the recipe asks for one.
    """

    model: nn.Module
    model_name: str
    model_kwargs: dict[str, Any]
    data: Any
    seed: int
    dense: dict[str, int]
    reference_dir: Path | None = None
    teacher: nn.Module | None = None
    teacher_dir: Path | None = None
    gates: dict[str, torch.Tensor] | None = None
    onnx_path: Path | None = None
    results: dict[str, dict] = field(default_factory=dict)
    logger: Any = None

    def epoch_hook(self, stage: str, extra=None):
        """An ``on_epoch_end(epoch, record)`` for :func:`~vitopt.train.loop.fit`: runs ``extra`` (which may
        add keys to the record), then logs the record to TensorBoard when enabled."""
        def hook(epoch: int, record: dict) -> None:
            if extra is not None:
                extra(epoch, record)
            if self.logger is not None:
                self.logger.log_epoch(stage, record)
        return hook

    def cost(self, model: nn.Module | None = None) -> dict[str, int]:
        """FLOPs (= 2 x MACs), MACs and params of ``model`` (default: the current model), one image."""
        model = model if model is not None else self.model
        cm = CostModel(model)
        dims = cm.structure.sizes()
        return {"flops": cm.flops(dims), "macs": cm.macs(dims), "params": cm.params(dims)}

    def frozen_copy(self) -> nn.Module:
        """A deep copy of the current model in eval mode with gradients off (a KD teacher)."""
        teacher = copy.deepcopy(self.model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher


@dataclass
class StageDir:
    """The folder of one stage inside the run directory (``runs/NAME/02_prune``).

    Attributes:
        path: the folder.
        label: ``"02_prune"`` - index and name, used as the key in summaries.
        index: position in the recipe's ``stages`` list.
        started: wall-clock start (``time.time()``), for the ``seconds`` the stage took.
    """

    path: Path
    label: str
    index: int
    started: float = field(default_factory=time.time)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def checkpoint_dir(self) -> Path:
        """Where a training stage keeps its epoch checkpoint (``<stage>/checkpoints/last.pt``).

        The pipeline deletes this folder once the stage's metrics.json exists (the finished model is
        saved separately), trading the ability to re-open a finished stage's optimizer for disk space.
        """
        return self.path / "checkpoints"

    @property
    def done(self) -> bool:
        """True when the stage finished (its metrics.json exists)."""
        return self.metrics_file.is_file()

    def save_model(self, state: State, sub: str = MODEL_DIR) -> Path:
        """Write ``state.model`` as arch.json + model.safetensors into ``path/sub``; returns that folder."""
        save_pruned(state.model, self.path / sub, state.model_name, state.model_kwargs)
        return self.path / sub

    def load_model(self, sub: str = MODEL_DIR) -> nn.Module:
        """Rebuild the model saved by :meth:`save_model` (train mode, CPU)."""
        return load_pruned(self.path / sub).train()

    def finish(self, config: Any, metrics: dict[str, Any], outputs: dict[str, str]) -> dict[str, Any]:
        """Write metrics.json (marks the stage done). ``outputs`` maps kinds to files relative to the run dir."""
        record = {"stage": self.label, "type": config.type, "seconds": round(time.time() - self.started, 2),
                  "config": config.model_dump(mode="json", by_alias=True),
                  "outputs": outputs, "metrics": metrics}
        atomic_write_json(self.metrics_file, record)
        return record

    def read(self) -> dict[str, Any]:
        """The record written by :meth:`finish`."""
        return read_json(self.metrics_file, "stage metrics file")


# ------------------------------------------------------------------------------------ training stages
def hparams(cfg: Any) -> TrainHParams:
    """The loop's hyper-parameters from a training stage config (epochs, lr, min_lr, wd, warmup, amp, ema...)."""
    return TrainHParams(epochs=cfg.epochs, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                        warmup_epochs=cfg.warmup_epochs, label_smoothing=cfg.label_smoothing,
                        grad_clip=cfg.grad_clip, amp=getattr(cfg, "amp", None),
                        ema_decay=getattr(cfg, "ema", None))


def loaders(cfg: Any, state: State, stage_index: int):
    """Seeded ``(train, val)`` DataLoaders; the seed differs per stage so stages see different orders.

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


# ------------------------------------------------------------------------------------ pruning stages
def structure_table(structure: Structure, after: dict[str, int]) -> list[dict[str, int]]:
    """Rows ``{block, [stage,] heads, heads_kept, head_dim, head_dim_kept, mlp, mlp_kept}`` per block of any
    family, from the Structure taken before pruning (``Group.block`` counts blocks over the whole model).

    ``after`` maps group name (of ``structure``) -> kept units; a block removed by depth pruning has 0 kept
    (:attr:`vitopt.pruning.prune.PruneResult.dims_after` maps renumbered blocks back).
    """
    rows: dict[int, dict[str, int]] = {}
    for g in structure.groups.values():
        if g.block is None or g.kind not in ("heads", "head_dim", "mlp"):
            continue
        row = rows.setdefault(g.block, {"block": g.block, **({"stage": g.stage} if g.stage is not None else {})})
        row[g.kind], row[f"{g.kind}_kept"] = g.size, after[g.name]
    return [rows[b] for b in sorted(rows)]


def embed_widths(structure: Structure, dims: dict[str, int]) -> int | list[int]:
    """The residual width (ViT) or the per-stage widths (Swin, PVTv2) in ``dims``."""
    names = [g.name for g in structure.of_kind("embed")]
    return dims[names[0]] if len(names) == 1 and structure.groups[names[0]].stage is None else [dims[n] for n in names]


# ------------------------------------------------------------------------------------ deployment stages
def latest_output(state: State, run_dir: Path, kind: str) -> Path | None:
    """The file the last finished stage recorded under output ``kind`` (e.g. ``onnx_int8``, ``engine``)."""
    found = None
    for record in state.results.values():
        rel = record.get("outputs", {}).get(kind)
        if rel:
            found = run_dir / rel
    return found
