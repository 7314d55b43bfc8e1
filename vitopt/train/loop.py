"""The training loop: AdamW, per-step cosine schedule with linear warmup, label smoothing, KD.

Sources: I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization" (AdamW), ICLR 2019;
I. Loshchilov, F. Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (cosine
schedule), ICLR 2017; C. Szegedy et al., "Rethinking the Inception Architecture" (label
smoothing), CVPR 2016; G. Hinton, O. Vinyals, J. Dean, arXiv 1503.02531 (distillation); timm docs
(``timm.optim.param_groups_weight_decay``, ``timm.scheduler.CosineLRScheduler``).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from vitopt.errors import VitoptError
from vitopt.io import _json_default
from vitopt.train.callbacks import Callback
from vitopt.train.checkpoint import capture_rng, checkpoint_path, load_checkpoint, restore_rng, save_checkpoint
from vitopt.train.data import ShardSampler
from vitopt.train.distributed import (
    all_reduce_sum,
    assert_same_across_ranks,
    barrier,
    is_distributed,
    is_main,
    world_size,
)
from vitopt.train.losses import kd_loss, merge_heads

__all__ = [
    "TrainHParams",
    "default_param_groups",
    "make_optimizer",
    "make_scheduler",
    "lr_at_step",
    "fit",
    "evaluate",
    "set_seed",
    "progress_interval",
]

#: environment variable: seconds between plain progress lines when stdout is not a terminal (default 30).
PROGRESS_ENV = "VITOPT_PROGRESS_SECONDS"


def progress_interval() -> float | None:
    """Seconds between plain-text progress lines, or None when stdout is a terminal (a live bar is drawn).

    When stdout is a file or pipe (a log, ``nohup``, a batch job) the rich progress bar is off, so
    :func:`fit` prints ``<desc> epoch e/E step i/n (p%): loss L, r img/s, ~s s left in the epoch`` at most
    every ``$VITOPT_PROGRESS_SECONDS`` seconds (default 30; 0 prints every step).
    """
    if sys.stdout.isatty():
        return None
    try:
        return max(0.0, float(os.environ.get(PROGRESS_ENV, "30")))
    except ValueError:
        return 30.0


@dataclass
class TrainHParams:
    """Hyper-parameters of :func:`fit`.

    Attributes:
        epochs: passes over the training loader (>= 1).
        lr: peak learning rate of AdamW (reached at the end of warmup).
        min_lr: final learning rate of the cosine decay (absolute, shared by all param groups).
        weight_decay: decoupled weight decay (AdamW) for matrices/convs; biases, norms, 1-d params
            and pos_embed/cls/dist/reg tokens get none (timm convention).
        warmup_epochs: linear warmup length in epochs; may be fractional, converted to
            ``round(warmup_epochs * steps_per_epoch)`` steps.
        label_smoothing: CE label smoothing in [0, 1) (Szegedy et al. 2016).
        grad_clip: max global L2 norm of the gradients, or None for no clipping.
        warmup_lr_init: learning rate at step 0 of the warmup.
        amp: automatic mixed precision of the forward pass: ``"bf16"`` (CUDA or CPU), ``"fp16"``
            (CUDA only, with a ``torch.amp.GradScaler``) or None (fp32).
        ema_decay: decay of an exponential moving average of the weights (timm ``ModelEmaV3``,
            e.g. 0.9998), or None; the model ends training with the EMA weights.
    """

    epochs: int = 10
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = None
    warmup_lr_init: float = 1e-6
    amp: str | None = None
    ema_decay: float | None = None


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def default_param_groups(model: nn.Module, weight_decay: float,
                         exclude: Iterable[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """AdamW parameter groups with timm's no-weight-decay convention.

    Biases, norm weights and every parameter with ndim <= 1 get ``weight_decay=0``, as do the names
    in ``model.no_weight_decay()`` (pos_embed, cls_token, dist_token, reg_token for timm ViTs); the
    rest get ``weight_decay``. Frozen parameters (``requires_grad=False``) and ``exclude`` (e.g.
    gates a caller puts in its own group) are left out. Built on
    ``timm.optim.param_groups_weight_decay``.

    Returns:
        list of ``{"params": [...], "weight_decay": float}`` dicts (empty groups dropped).
    """
    from timm.optim import param_groups_weight_decay

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    excluded = {id(p) for p in exclude}
    out = []
    for g in groups:
        params = [p for p in g["params"] if id(p) not in excluded]
        if params:
            out.append({**g, "params": params})
    return out


def make_optimizer(model: nn.Module, hp: TrainHParams,
                   param_groups: list[dict[str, Any]] | None = None) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over :func:`default_param_groups`, or over ``param_groups``.

    Caller groups are copied (the dicts are not mutated); a group without ``lr``/``weight_decay``
    gets ``hp.lr``/``hp.weight_decay``.

    Raises:
        VitoptError: there is no trainable parameter.
    """
    if param_groups is None:
        groups = default_param_groups(model, hp.weight_decay)
    else:
        groups = [{k: v for k, v in g.items() if k != "initial_lr"} for g in param_groups]
        for g in groups:
            g["params"] = list(g["params"])
        groups = [g for g in groups if g["params"]]
    if not groups:
        raise VitoptError("the model has no trainable parameters (every parameter has requires_grad=False).")
    return torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)


def _warmup_steps(hp: TrainHParams, steps_per_epoch: int) -> int:
    total = hp.epochs * steps_per_epoch
    w = int(round(max(0.0, hp.warmup_epochs) * steps_per_epoch))
    return min(w, max(0, total - 1))


def make_scheduler(optimizer: torch.optim.Optimizer, hp: TrainHParams, steps_per_epoch: int):
    """timm ``CosineLRScheduler`` stepped per optimizer step (``t_in_epochs=False``).

    Warmup is a prefix: for step ``s`` (0-based, the lr used by the s-th update) with ``W`` warmup
    steps and ``T = epochs * steps_per_epoch`` total steps, each group with peak ``lr_g`` gets

    - ``s < W``: ``warmup_lr_init + s * (lr_g - warmup_lr_init) / W``
    - ``s >= W``: ``min_lr + 0.5 * (lr_g - min_lr) * (1 + cos(pi * (s - W) / (T - W)))``

    (see :func:`lr_at_step`). Call ``scheduler.step_update(global_step)`` after every update.
    """
    from timm.scheduler import CosineLRScheduler

    total = hp.epochs * steps_per_epoch
    w = _warmup_steps(hp, steps_per_epoch)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - w),
        lr_min=hp.min_lr,
        warmup_t=w,
        warmup_lr_init=hp.warmup_lr_init,
        warmup_prefix=True,
        t_in_epochs=False,
        cycle_limit=1,
    )


def lr_at_step(step: int, hp: TrainHParams, steps_per_epoch: int, peak_lr: float | None = None) -> float:
    """The learning rate :func:`make_scheduler` gives update number ``step`` (0-based), in closed form."""
    lr = hp.lr if peak_lr is None else peak_lr
    total = hp.epochs * steps_per_epoch
    w = _warmup_steps(hp, steps_per_epoch)
    if step < w:
        return hp.warmup_lr_init + step * (lr - hp.warmup_lr_init) / w
    t_i = max(1, total - w)
    t = step - w
    if t >= t_i:
        return hp.min_lr
    return hp.min_lr + 0.5 * (lr - hp.min_lr) * (1 + math.cos(math.pi * t / t_i))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Mean cross-entropy (no label smoothing) and top-1 accuracy of ``model`` over ``loader``.

    The model runs in eval mode (its previous mode is restored); batches move to the model's device.
    A tuple output (two-head DeiT) is averaged, as timm's distilled DeiT does itself in eval mode.
    Under torch.distributed with a loader sharded by :class:`~vitopt.train.data.ShardSampler`, the sums
    are added over ranks, so every rank returns the metrics of the whole set.

    Returns:
        ``{"loss": nats per sample, "top1": percent in [0, 100], "n": samples}``.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_loss, correct, n = 0.0, 0, 0
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            logits = merge_heads(model(x)).float()
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == y).sum().item()
            n += y.numel()
    finally:
        model.train(was_training)
    if is_distributed() and isinstance(getattr(loader, "sampler", None), ShardSampler):
        total_loss, correct, n = all_reduce_sum([total_loss, correct, n])
        n = int(n)
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "n": 0}
    return {"loss": total_loss / n, "top1": 100.0 * correct / n, "n": n}


def _progress(total: int, desc: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        transient=True,
        disable=not sys.stdout.isatty(),
    )


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    hp: TrainHParams,
    *,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_tau: float = 4.0,
    extra_loss: Callable[[], Tensor] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    callbacks: Sequence[Callback] = (),
    desc: str = "train",
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    mixup: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> list[dict]:
    """Train ``model`` in place and return one record per epoch; checkpoint and resume at epoch ends.

    Output (rank 0): one line per epoch; when stdout is not a terminal, also a progress line at most every
    :func:`progress_interval` seconds (default 30) within an epoch.

    Per step: forward (under ``torch.autocast`` with ``hp.amp``), loss = label-smoothed CE (Szegedy
    et al. 2016) or, with ``teacher``, :func:`~vitopt.train.losses.kd_loss` (Hinton et al. 2015; the
    teacher runs in eval mode under ``no_grad``), plus ``extra_loss()`` and the callbacks' ``loss()``;
    backward (fp16: through a ``GradScaler``, unscaled before the callbacks see the gradients);
    ``after_backward``; optional global-norm clipping; an AdamW step (Loshchilov & Hutter 2019);
    ``after_step``; the per-step cosine schedule with linear warmup (SGDR, via timm
    ``CosineLRScheduler``; formula in :func:`make_scheduler`); the EMA update when ``hp.ema_decay``.

    Determinism and resume: before epoch ``e`` the train loader's sampler gets ``set_epoch(e)`` and
    its generator is reseeded from (its seed, ``e``), so the data order of an epoch does not depend on
    earlier epochs. With ``checkpoint_dir`` an epoch checkpoint (:mod:`vitopt.train.checkpoint`:
    model, optimizer, scheduler, grad scaler, EMA, parameters outside the model, every callback's
    ``state_dict()``, RNG states, epoch, global step, best top-1, history) is written atomically after
    every epoch, and an existing one is loaded first: training continues with the next epoch exactly
    as the uninterrupted run would (bitwise-equal weights on CPU). A nan/inf loss raises before the
    optimizer step, so the last checkpoint on disk stays the last good one.

    Distributed (inside a ``torch.distributed`` group of more than one rank, see
    :mod:`vitopt.train.distributed`): the model is wrapped in ``DistributedDataParallel`` (so
    callbacks see all-reduced gradients), gradients of optimizer parameters outside the model
    (e.g. gates) are all-reduced too, losses and validation counts are summed over ranks, only rank 0
    prints and writes the checkpoint, and at every epoch end the model parameters and callback
    states are checked to be identical on all ranks
    (:func:`~vitopt.train.distributed.assert_same_across_ranks`).

    Args:
        model: the network; returns [B, K] logits (or a tuple of heads, averaged).
        train_loader: yields ``(images [B, C, H, W], labels int64 [B])``; ``len()`` must be known.
        val_loader: same, evaluated after every epoch with :func:`evaluate`; None skips validation.
        hp: :class:`TrainHParams`.
        teacher: optional distillation teacher with the same number of classes.
        kd_alpha, kd_tau: KD weight and temperature (see ``kd_loss``).
        extra_loss: zero-argument callable returning a scalar tensor added to each step's loss.
        param_groups: AdamW groups to use instead of the model's (each may set its own ``lr`` and
            ``weight_decay``; missing ones default to ``hp``). Each group's ``lr`` is its peak; the
            cosine ends at ``hp.min_lr`` for every group.
        on_epoch_end: ``f(epoch, record)`` called after validation (after the callbacks' own
            ``on_epoch_end``); it may add keys to ``record``.
        callbacks: :class:`~vitopt.train.callbacks.Callback` objects acting inside each step (loss
            terms, gradient/weight masks, mask updates); their ``loss()`` terms count as extra loss.
        desc: label for the progress bar and the epoch lines.
        checkpoint_dir: folder of the epoch checkpoint (``last.pt``); None: no checkpoints.
        device: move the model (and teacher, and optimizer parameters outside the model) there for
            training and back to their original device afterwards; None trains where the model is.
        mixup: batch transform ``(x, y) -> (mixed x, soft targets [B, K])`` (timm ``Mixup``, see
            :func:`~vitopt.train.images.make_mixup`; it applies the label smoothing itself, so the CE
            uses the soft targets without further smoothing).

    Returns:
        list of per-epoch dicts: ``epoch`` (1-based), ``train_loss`` (mean total loss per sample,
        nats, including extra terms; with a ``teacher`` it is the KD objective, so the record also has
        ``train_loss_kind`` ``"kd(alpha=..., tau=...)"`` and ``train_ce_loss``, the student's label-smoothed
        cross-entropy, comparable with a training stage's ``train_loss``; the epoch line prints them as
        ``train_kd_loss`` and ``train_ce_loss``), ``train_extra_loss`` (mean of the extra terms, when any),
        ``val_loss`` (nats, no smoothing), ``val_top1`` (percent), ``val_top1_ema`` (with EMA),
        ``lr`` (of group 0 at the last step of the epoch), ``seconds`` (wall time of the epoch incl.
        validation), plus what ``on_epoch_end`` adds. ``val_*`` are None without ``val_loader``.
        With ``hp.ema_decay`` the model ends with the EMA weights.

    Raises:
        VitoptError: the loss becomes nan/inf (message names epoch and step), the train loader is
            empty, ``hp.epochs`` < 1, nothing is trainable, fp16 AMP off CUDA, or the checkpoint in
            ``checkpoint_dir`` is corrupt or was written for another model/schedule.
    """
    if hp.epochs < 1:
        raise VitoptError(f"epochs must be at least 1; got {hp.epochs}.")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise VitoptError("the training data loader yields no batches (dataset empty, or smaller than the batch size with drop_last).")
    home = _device_of(model)
    device = torch.device(device) if device is not None else home
    amp_dtype = _amp_dtype(hp.amp, device)
    model.to(device)
    optimizer = make_optimizer(model, hp, param_groups)
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch)
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    outside = _outside_params(model, opt_params)
    _move_params(outside, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = _make_ema(model, hp.ema_decay)
    for cb in callbacks:
        cb.on_fit_start(model, optimizer, hp.epochs * steps_per_epoch)
    has_extra = extra_loss is not None or any(type(cb).loss is not Callback.loss for cb in callbacks)
    if teacher is not None:
        teacher.to(device)
        teacher.eval()
    prog = {"epoch": 0, "global_step": 0, "best_val_top1": None, "history": []}
    ckpt = load_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        _resume(ckpt, checkpoint_dir, hp, steps_per_epoch, model, optimizer, scheduler, scaler, ema, outside,
                callbacks)
        prog = {k: ckpt[k] for k in prog}
        prog["history"] = json.loads(ckpt["history"])
        if is_main():
            print(f"{desc}: resumed from {checkpoint_path(checkpoint_dir)} after epoch {prog['epoch']}", flush=True)
    net = _wrap_ddp(model, device)
    base_seed = train_loader.generator.initial_seed() if getattr(train_loader, "generator", None) else None
    step = _Step(net, teacher, kd_alpha, kd_tau, hp, extra_loss, callbacks, optimizer, scheduler, scaler, ema,
                 outside, opt_params, amp_dtype, device, desc, mixup)
    history = prog["history"]
    for epoch in range(prog["epoch"] + 1, hp.epochs + 1):
        _begin_epoch(train_loader, base_seed, epoch)
        t0 = time.perf_counter()
        model.train()
        sums = step.run_epoch(train_loader, epoch, prog)
        n_seen = max(1.0, sums["n"])
        record: dict[str, Any] = {"epoch": epoch, "train_loss": sums["loss"] / n_seen}
        if teacher is not None:                 # train_loss is the KD objective: label it, keep the CE part
            record["train_loss_kind"] = f"kd(alpha={kd_alpha:g}, tau={kd_tau:g})"
            record["train_ce_loss"] = sums["ce"] / n_seen
        if has_extra:
            record["train_extra_loss"] = sums["extra"] / n_seen
        if val_loader is not None:
            ev = evaluate(model, val_loader)
            record["val_loss"], record["val_top1"] = ev["loss"], ev["top1"]
            if ema is not None:
                record["val_top1_ema"] = evaluate(ema.module, val_loader)["top1"]
        else:
            record["val_loss"], record["val_top1"] = None, None
        record["lr"] = sums["lr"]
        record["seconds"] = time.perf_counter() - t0
        for cb in callbacks:
            cb.on_epoch_end(epoch, record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        history.append(record)
        _check_lockstep(model, callbacks, desc, epoch)
        top1 = record["val_top1"]
        if top1 is not None and (prog["best_val_top1"] is None or top1 > prog["best_val_top1"]):
            prog["best_val_top1"] = top1
        prog["epoch"] = epoch
        if checkpoint_dir is not None:
            _save(checkpoint_dir, prog, hp, steps_per_epoch, model, optimizer, scheduler, scaler, ema, outside,
                  callbacks)
        if is_main():
            print(_epoch_line(desc, epoch, hp.epochs, record), flush=True)
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    model.to(home)
    _move_params(outside, home)
    if teacher is not None:
        teacher.to(home)
    return history


@dataclass
class _Step:
    """One epoch of optimizer updates (the body of :func:`fit`), kept apart so ``fit`` stays readable."""

    net: nn.Module
    teacher: nn.Module | None
    kd_alpha: float
    kd_tau: float
    hp: TrainHParams
    extra_loss: Callable[[], Tensor] | None
    callbacks: Sequence[Callback]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: Any
    outside: list[nn.Parameter]
    opt_params: list[nn.Parameter]
    amp_dtype: torch.dtype | None
    device: torch.device
    desc: str
    mixup: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None, float | None]:
        """``(total loss, extra terms, the student's cross-entropy when distilling)``."""
        smoothing = self.hp.label_smoothing
        if self.mixup is not None:
            x, y = self.mixup(x, y)
            smoothing = 0.0
        ce = None
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            out = self.net(x)
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(x)
                    ce = float(F.cross_entropy(merge_heads(out).float(), y, label_smoothing=smoothing))
                loss = kd_loss(out, t_out, y, alpha=self.kd_alpha, tau=self.kd_tau, label_smoothing=smoothing)
            else:
                loss = F.cross_entropy(merge_heads(out).float(), y, label_smoothing=smoothing)
        terms = [self.extra_loss()] if self.extra_loss is not None else []
        terms += [t for t in (cb.loss() for cb in self.callbacks) if t is not None]
        extra = torch.stack([t.reshape(()).float() for t in terms]).sum() if terms else None
        return (loss.float() + extra if extra is not None else loss.float()), extra, ce

    def run_epoch(self, loader: DataLoader, epoch: int, prog: dict) -> dict[str, float]:
        """Train one epoch; returns rank-summed ``loss``/``extra``/``ce`` (x samples), ``n`` and the last ``lr``."""
        sum_loss, sum_extra, sum_ce, n_seen = 0.0, 0.0, 0.0, 0
        lr_now = self.optimizer.param_groups[0]["lr"]
        interval, t0 = progress_interval(), time.perf_counter()
        last_line = t0
        with _progress(len(loader), self.desc) as progress:
            task = progress.add_task(f"{self.desc} {epoch}/{self.hp.epochs}", total=len(loader), loss="-")
            for i, (x, y) in enumerate(loader, start=1):
                x = x.to(self.device, non_blocking=True)
                y = torch.as_tensor(y).to(self.device, non_blocking=True)
                lr_now = self.optimizer.param_groups[0]["lr"]
                loss, extra, ce = self._loss(x, y)
                loss_value = float(loss.detach())
                _check_finite(loss_value, epoch, i, self.desc)
                self._update(loss, prog["global_step"])
                prog["global_step"] += 1
                self.scheduler.step_update(num_updates=prog["global_step"])
                sum_loss += loss_value * len(y)
                sum_extra += float(extra.detach()) * len(y) if extra is not None else 0.0
                sum_ce += float(ce) * len(y) if ce is not None else 0.0
                n_seen += len(y)
                progress.update(task, advance=1, loss=f"{loss_value:.4f}")
                now = time.perf_counter()
                if interval is not None and now - last_line >= interval and i < len(loader) and is_main():
                    last_line = now
                    rate = n_seen / max(now - t0, 1e-9)
                    print(f"{self.desc} epoch {epoch}/{self.hp.epochs} step {i}/{len(loader)} "
                          f"({100 * i / len(loader):.0f}%): {self.loss_name} {sum_loss / n_seen:.4f}, "
                          f"{rate * world_size():.1f} img/s, ~{(now - t0) * (len(loader) - i) / i:.0f} s left in "
                          "the epoch", flush=True)
        loss_sum, extra_sum, ce_sum, n = all_reduce_sum([sum_loss, sum_extra, sum_ce, n_seen])
        return {"loss": loss_sum, "extra": extra_sum, "ce": ce_sum, "n": n, "lr": lr_now}

    @property
    def loss_name(self) -> str:
        """``train_kd_loss`` with a teacher (the KD objective), else ``train_loss`` (cross-entropy)."""
        return "train_kd_loss" if self.teacher is not None else "train_loss"

    def _update(self, loss: Tensor, global_step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        _all_reduce_grads(self.outside)
        for cb in self.callbacks:
            cb.after_backward(global_step)
        if self.hp.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.opt_params, self.hp.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for cb in self.callbacks:
            cb.after_step(global_step)
        if self.ema is not None:
            self.ema.update(_unwrap(self.net), step=global_step)


def _check_finite(loss_value: float, epoch: int, step: int, desc: str) -> None:
    """Raise VitoptError when the loss of any rank is nan/inf (all ranks raise together)."""
    bad = 0.0 if math.isfinite(loss_value) else 1.0
    if is_distributed():
        bad = all_reduce_sum([bad])[0]
    if bad:
        what = "inf" if math.isinf(loss_value) else "nan" if math.isnan(loss_value) else "nan or inf on another rank"
        raise VitoptError(
            f"training loss became {what} at epoch {epoch} step {step} ({desc}); the last epoch checkpoint is kept - "
            "lower the learning rate, set grad_clip, or check the data and the extra loss terms."
        )


def _amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    if amp in (None, "none", "off"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise VitoptError(f"amp 'fp16' needs a CUDA device but training runs on {device}; "
                              "use amp: bf16 (CPU or CUDA) or amp: null.")
        return torch.float16
    raise VitoptError(f"amp {amp!r} is not supported; allowed: 'bf16', 'fp16' or null.")


def _make_ema(model: nn.Module, decay: float | None):
    """timm ``ModelEmaV3`` (exponential moving average of weights and buffers), or None."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def _outside_params(model: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Optimizer parameters that are not the model's (e.g. VTP gates in their own module), in order."""
    inside = {id(p) for p in model.parameters()}
    return [p for p in params if id(p) not in inside]


def _move_params(params: list[nn.Parameter], device: torch.device) -> None:
    for p in params:
        if p.device != device:
            p.data = p.data.to(device)


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group of > 1 rank, else the model itself."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of parameters DDP does not manage (outside the model) over ranks."""
    if not is_distributed():
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size())


def _begin_epoch(loader: DataLoader, base_seed: int | None, epoch: int) -> None:
    """Make epoch ``epoch``'s data order a function of (seed, epoch) only: ``set_epoch`` + generator reseed."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if base_seed is not None:
        loader.generator.manual_seed((base_seed * 1_000_003 + epoch) % (2 ** 63))


def _check_lockstep(model: nn.Module, callbacks: Sequence[Callback], desc: str, epoch: int) -> None:
    if not is_distributed():
        return
    named = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, cb in enumerate(callbacks):
        named.update({f"callback{i}.{k}": v for k, v in _flat(cb.state_dict()).items()})
    assert_same_across_ranks(named, f"{desc} epoch {epoch}: model parameters or callback states")


def _flat(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Tensors of a nested dict/list, keyed by their path."""
    if isinstance(obj, Tensor):
        return {prefix: obj}
    out: dict[str, Tensor] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _save(checkpoint_dir, prog, hp, steps_per_epoch, model, optimizer, scheduler, scaler, ema, outside,
          callbacks) -> None:
    """Rank 0 writes the epoch checkpoint (atomically); every rank waits for it."""
    if is_main():
        save_checkpoint(checkpoint_dir, {
            "epoch": prog["epoch"], "epochs": hp.epochs, "steps_per_epoch": steps_per_epoch,
            "global_step": prog["global_step"], "best_val_top1": prog["best_val_top1"],
            "history": json.dumps(prog["history"], default=_json_default),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "outside_params": [p.detach() for p in outside],
            "callbacks": [cb.state_dict() for cb in callbacks],
            "rng": capture_rng(),
        })
    barrier()


def _resume(ckpt, checkpoint_dir, hp, steps_per_epoch, model, optimizer, scheduler, scaler, ema, outside,
            callbacks) -> None:
    """Load an epoch checkpoint into the freshly built training objects; checks it belongs to this run."""
    where = checkpoint_path(checkpoint_dir)
    fix = f"delete {where} to restart the stage, or run it with the settings it was written with"
    if (ckpt.get("epochs"), ckpt.get("steps_per_epoch")) != (hp.epochs, steps_per_epoch):
        raise VitoptError(f"epoch checkpoint {where} was written for {ckpt.get('epochs')} epochs of "
                          f"{ckpt.get('steps_per_epoch')} steps but this run has {hp.epochs} epochs of "
                          f"{steps_per_epoch} steps; {fix}.")
    if len(ckpt.get("callbacks", [])) != len(callbacks) or len(ckpt.get("outside_params", [])) != len(outside):
        raise VitoptError(f"epoch checkpoint {where} holds state for {len(ckpt.get('callbacks', []))} callbacks and "
                          f"{len(ckpt.get('outside_params', []))} extra parameters but this run has {len(callbacks)} "
                          f"and {len(outside)}; {fix}.")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for p, t in zip(outside, ckpt["outside_params"]):
            p.data.copy_(t)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise VitoptError(f"epoch checkpoint {where} does not match this model or optimizer ({first}); {fix}.") from None
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.step_update(num_updates=ckpt["global_step"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])
    for cb, st in zip(callbacks, ckpt["callbacks"]):
        cb.load_state_dict(st)
    restore_rng(ckpt["rng"])


def _epoch_line(desc: str, epoch: int, epochs: int, r: dict) -> str:
    parts = [f"{desc} epoch {epoch}/{epochs}"]
    if r.get("train_loss_kind", "").startswith("kd"):   # not comparable with a CE train_loss: say what it is
        parts += [f"train_kd_loss {r['train_loss']:.4f} ({r['train_loss_kind']})",
                  f"train_ce_loss {r['train_ce_loss']:.4f}"]
    else:
        parts.append(f"train_loss {r['train_loss']:.4f}")
    if r.get("val_loss") is not None:
        parts.append(f"val_loss {r['val_loss']:.4f}")
        parts.append(f"val_top1 {r['val_top1']:.2f}%")
    parts.append(f"lr {r['lr']:.2e}")
    parts.append(f"{r['seconds']:.1f}s")
    return " | ".join(parts)
