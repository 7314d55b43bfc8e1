"""``sparse_train``: training-time sparsity; ``method`` selects one of an explicit registry.

* ``vtp`` - learnable gates on every head, head dim and MLP neuron with ``lambda * sum |gate|``
  (Zhu, Tang, Han 2021, arXiv 2104.08500; lambda ~ 1e-4). The gates act on the choke-point weights
  (:class:`vitopt.sparsity.vtp.VTP`), are folded into the Linear weights at the
  end (the model keeps computing the gated function) and stay in the State as importance scores for
  a later ``prune`` with ``criterion: gate`` (``gates.safetensors``).
* ``svite`` - SViTE unstructured dynamic sparse training (Chen et al. 2021, arXiv 2106.04533): ERK
  masks on the blocks' Linear weights, magnitude drop, RigL / SET regrow, cosine death rate
  (:class:`vitopt.sparsity.dst.SViTE`); masks saved as ``masks.safetensors``.
* ``s2vite`` - S2ViTE structured DST of heads and MLP neurons; at the end the masks become a KeepPlan,
  removed units' constant outputs (v-bias through the softmax) are folded into proj / fc2 biases and
  surgery makes the model physically smaller (:mod:`vitopt.sparsity.structured_dst`). Like ``prune``
  it leaves the model it started from as the KD teacher of a later ``finetune``.
* ``svite_plus`` - SViTE+ learnable token selector (top-k Gumbel-softmax, fixed keep count at export),
  optionally with SViTE unstructured masks (:mod:`vitopt.sparsity.token_selector`).
* ``semi24`` - 2:4 semi-structured masks for Sparse Tensor Cores, fixed while fine-tuning
  (:mod:`vitopt.sparsity.semi24`).

Every method is a :class:`~vitopt.train.callbacks.Callback` of :func:`vitopt.train.loop.fit`, so
the epoch checkpoints save and resume its state (gates, masks, RNG, counters). ``attention_reg``
(Sparse-then-Prune's ``mean log(1 + A^2)``, Prasetyo et al. 2023, arXiv 2307.11988) combines with any.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vitopt.arch.cost import structure_of
from vitopt.io import save_weights
from vitopt.sparsity.attention import attention_reg_callbacks
from vitopt.sparsity.dst import SViTE
from vitopt.sparsity.semi24 import Semi24
from vitopt.sparsity.structured_dst import S2ViTE
from vitopt.sparsity.token_selector import SViTEPlus
from vitopt.sparsity.vtp import VTP
from vitopt.stages.base import (
    MODEL_DIR,
    StageDir,
    State,
    hparams,
    loaders,
    structure_table,
)
from vitopt.train.callbacks import Callback
from vitopt.train.distributed import training_device
from vitopt.train.images import make_mixup
from vitopt.train.loop import default_param_groups, fit

__all__ = ["run", "METHODS"]


def _fit(cfg, state: State, sd: StageDir, callbacks: list[Callback], param_groups=None) -> list[dict]:
    """fit() with the method's callbacks plus the optional attention regularizer; epoch checkpoints on."""
    train, val = loaders(cfg, state, sd.index)
    with attention_reg_callbacks(cfg.attention_reg, state.model) as reg:
        return fit(state.model, train, val, hparams(cfg), param_groups=param_groups, callbacks=[*callbacks, *reg],
                   on_epoch_end=state.epoch_hook(sd.label), desc=sd.label,
                   checkpoint_dir=sd.checkpoint_dir, device=training_device(),
                   mixup=make_mixup(state.data.augment, state.data.num_classes, cfg.label_smoothing))


def _finish(cfg, state: State, sd: StageDir, history: list[dict], metrics: dict[str, Any],
            outputs: dict[str, str | None]) -> State:
    final = history[-1]
    metrics = {"method": cfg.method, "val_top1": final["val_top1"], "val_loss": final["val_loss"], **metrics,
               **state.cost(), "history": history}
    if cfg.attention_reg is not None:
        metrics["attn_sparsity"] = final.get("attn_sparsity")
    sd.save_model(state)
    state.results[sd.label] = sd.finish(cfg, metrics, {"model": f"{sd.label}/{MODEL_DIR}", **outputs})
    return state


def _vtp(cfg, state: State, sd: StageDir) -> State:
    vtp = VTP(state.model, cfg.lambda_, tuple(cfg.groups), cfg.threshold)
    groups = default_param_groups(state.model, cfg.weight_decay)
    groups.append({"params": vtp.parameters(), "weight_decay": 0.0, "lr": cfg.gate_lr or cfg.lr})
    history = _fit(cfg, state, sd, [vtp], param_groups=groups)
    values = vtp.finish()
    save_weights(sd.path / "gates.safetensors", values)
    state.gates = values
    final = history[-1]
    return _finish(cfg, state, sd, history, {"gate_mean": final["gate_mean"],
                                             "gate_frac_below": final["gate_frac_below"], "lambda": cfg.lambda_},
                   {"gates": f"{sd.label}/gates.safetensors"})


def _save_masks(sd: StageDir, masks: dict[str, torch.Tensor]) -> str:
    save_weights(sd.path / "masks.safetensors", {n: m.to(torch.uint8).cpu().contiguous() for n, m in masks.items()})
    return f"{sd.label}/masks.safetensors"


def _svite(cfg, state: State, sd: StageDir) -> State:
    o = cfg.options
    cb = SViTE(state.model, o.density, growth=o.growth, death_rate=o.death_rate, update_interval=o.update_interval,
               t_end=o.t_end, distribution=o.distribution, seed=state.seed * 1000 + sd.index)
    history = _fit(cfg, state, sd, [cb])
    masks = cb.finish()                    # e.g. after EMA weights replaced the trained ones
    density = cb.masks.density()
    return _finish(cfg, state, sd, history,
                   {"density": density.pop("overall"), "density_per_layer": density, "mask_updates": cb.updates,
                    "updates": cb.history},
                   {"masks": _save_masks(sd, masks)})


def _s2vite(cfg, state: State, sd: StageDir) -> State:
    o = cfg.options
    before = structure_of(state.model)
    teacher_dir = sd.save_model(state, "teacher")
    if state.reference_dir is None:            # like prune: the first structural cut's input is the reference
        state.reference_dir = teacher_dir
    state.teacher, state.teacher_dir = state.frozen_copy(), teacher_dir
    cb = S2ViTE(state.model, o.head_density, o.mlp_density, death_rate=o.death_rate,
                update_interval=o.update_interval, t_end=o.t_end)
    try:
        history = _fit(cfg, state, sd, [cb])
    finally:
        cb.close()
    plan = cb.finish()
    state.gates = None
    cost = state.cost()
    return _finish(cfg, state, sd, history,
                   {"blocks": structure_table(before, plan.dims(before)), "mask_updates": cb.updates,
                    "updates": cb.history, "flops_ratio": cost["flops"] / state.dense["flops"],
                    "params_ratio": cost["params"] / state.dense["params"], "keep": plan.keep},
                   {"teacher": f"{sd.label}/teacher",
                    "reference": str(state.reference_dir.relative_to(sd.path.parent)), "gates": None})


def _svite_plus(cfg, state: State, sd: StageDir) -> State:
    o = cfg.options
    plus = SViTEPlus(state.model, keep=o.keep, after_block=o.after_block, tau=o.tau, tau_end=o.tau_end)
    selector = plus.selector
    callbacks: list[Callback] = [plus]
    dst = None
    if o.density is not None:
        dst = SViTE(state.model, o.density, seed=state.seed * 1000 + sd.index)
        callbacks.append(dst)
    history = _fit(cfg, state, sd, callbacks)
    plus.finish()
    metrics: dict[str, Any] = {"tokens_kept": selector.num_prefix + selector.keep,
                               "tokens_total": selector.num_prefix + selector.num_patches,
                               "flops_ratio": state.cost()["flops"] / state.dense["flops"]}
    outputs: dict[str, str | None] = {}
    if dst is not None:
        masks = dst.finish()
        metrics["density"] = dst.masks.density()["overall"]
        outputs["masks"] = _save_masks(sd, masks)
    return _finish(cfg, state, sd, history, metrics, outputs)


def _semi24(cfg, state: State, sd: StageDir) -> State:
    cb = Semi24(state.model, layers=tuple(cfg.options.layers))
    history = _fit(cfg, state, sd, [cb])
    masks = cb.finish()
    return _finish(cfg, state, sd, history, {"density": cb.masks.density()["overall"], "pattern": "2:4",
                                             "layers": list(cfg.options.layers)},
                   {"masks": _save_masks(sd, masks)})


#: method name -> stage implementation (explicit registry; the schema lists the same names).
METHODS: dict[str, Callable[[Any, State, StageDir], State]] = {
    "vtp": _vtp, "svite": _svite, "s2vite": _s2vite, "svite_plus": _svite_plus, "semi24": _semi24}


def run(cfg, state: State, sd: StageDir) -> State:
    """Run ``cfg.method`` on ``state.model``; save the model, the method's artifacts and metrics.json."""
    return METHODS[cfg.method](cfg, state, sd)
