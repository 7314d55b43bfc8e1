"""The training loop: AdamW, per-step cosine schedule with linear warmup, label smoothing, KD.

Sources: I. Loshchilov, F. Hutter, "Decoupled Weight Decay Regularization" (AdamW), ICLR 2019;
I. Loshchilov, F. Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (cosine
schedule), ICLR 2017; C. Szegedy et al., "Rethinking the Inception Architecture" (label
smoothing), CVPR 2016; G. Hinton, O. Vinyals, J. Dean, arXiv 1503.02531 (distillation); timm docs
(``timm.optim.param_groups_weight_decay``, ``timm.scheduler.CosineLRScheduler``).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from vitopt.errors import VitoptError
from vitopt.train.callbacks import Callback
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
]


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
    """

    epochs: int = 10
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = None
    warmup_lr_init: float = 1e-6


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
) -> list[dict]:
    """Train ``model`` in place and return one record per epoch.

    Per step: forward, loss = label-smoothed CE (Szegedy et al. 2016) or, with ``teacher``,
    :func:`~vitopt.train.losses.kd_loss` (Hinton et al. 2015; the teacher runs in eval mode under
    ``no_grad``), plus ``extra_loss()`` when given (e.g. an L1 gate penalty, VTP); backward; optional
    global-norm clipping; an AdamW step (Loshchilov & Hutter 2019; groups from
    :func:`default_param_groups` or ``param_groups``); then the per-step cosine schedule with linear
    warmup (SGDR, via timm ``CosineLRScheduler``; formula in :func:`make_scheduler`).

    Batches are moved to the device of the model's parameters (the teacher is moved there too). A
    rich progress bar over steps is shown when stdout is a TTY; one line per epoch is printed.

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

    Returns:
        list of per-epoch dicts: ``epoch`` (1-based), ``train_loss`` (mean total loss per sample,
        nats, including ``extra_loss``), ``train_extra_loss`` (mean of ``extra_loss``, when given),
        ``val_loss`` (nats, no smoothing), ``val_top1`` (percent), ``lr`` (of group 0 at the last
        step of the epoch), ``seconds`` (wall time of the epoch incl. validation), plus what
        ``on_epoch_end`` adds. ``val_loss``/``val_top1`` are None without ``val_loader``.

    Raises:
        VitoptError: the loss becomes nan/inf (message names epoch and step), the train loader is
            empty, ``hp.epochs`` < 1, or nothing is trainable.
    """
    if hp.epochs < 1:
        raise VitoptError(f"epochs must be at least 1; got {hp.epochs}.")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise VitoptError("the training data loader yields no batches (dataset empty, or smaller than the batch size with drop_last).")
    device = _device_of(model)
    optimizer = make_optimizer(model, hp, param_groups)
    scheduler = make_scheduler(optimizer, hp, steps_per_epoch)
    clip_params = [p for g in optimizer.param_groups for p in g["params"]]
    for cb in callbacks:
        cb.on_fit_start(model, optimizer, hp.epochs * steps_per_epoch)
    has_extra = extra_loss is not None or any(type(cb).loss is not Callback.loss for cb in callbacks)
    if teacher is not None:
        teacher.to(device)
        teacher.eval()
    history: list[dict] = []
    global_step = 0
    for epoch in range(1, hp.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if teacher is not None:
            teacher.eval()
        sum_loss, sum_extra, n_seen = 0.0, 0.0, 0
        lr_now = optimizer.param_groups[0]["lr"]
        with _progress(steps_per_epoch, desc) as progress:
            task = progress.add_task(f"{desc} {epoch}/{hp.epochs}", total=steps_per_epoch, loss="-")
            for step, (x, y) in enumerate(train_loader, start=1):
                x = x.to(device, non_blocking=True)
                y = torch.as_tensor(y).to(device, non_blocking=True)
                lr_now = optimizer.param_groups[0]["lr"]
                out = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                    loss = kd_loss(out, t_out, y, alpha=kd_alpha, tau=kd_tau,
                                   label_smoothing=hp.label_smoothing)
                else:
                    loss = F.cross_entropy(merge_heads(out), y, label_smoothing=hp.label_smoothing)
                terms = [extra_loss()] if extra_loss is not None else []
                terms += [t for t in (cb.loss() for cb in callbacks) if t is not None]
                if terms:
                    extra = torch.stack([t.reshape(()) for t in terms]).sum()
                    loss = loss + extra
                    sum_extra += float(extra.detach()) * y.numel()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    what = "nan" if math.isnan(loss_value) else "inf"
                    raise VitoptError(
                        f"training loss became {what} at epoch {epoch} step {step} ({desc}); "
                        "lower the learning rate, set grad_clip, or check the data and the extra loss terms."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for cb in callbacks:
                    cb.after_backward(global_step)
                if hp.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(clip_params, hp.grad_clip)
                optimizer.step()
                for cb in callbacks:
                    cb.after_step(global_step)
                global_step += 1
                scheduler.step_update(num_updates=global_step)
                sum_loss += loss_value * y.numel()
                n_seen += y.numel()
                progress.update(task, advance=1, loss=f"{loss_value:.4f}")
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": sum_loss / max(1, n_seen),
        }
        if has_extra:
            record["train_extra_loss"] = sum_extra / max(1, n_seen)
        if val_loader is not None:
            ev = evaluate(model, val_loader)
            record["val_loss"], record["val_top1"] = ev["loss"], ev["top1"]
        else:
            record["val_loss"], record["val_top1"] = None, None
        record["lr"] = lr_now
        record["seconds"] = time.perf_counter() - t0
        for cb in callbacks:
            cb.on_epoch_end(epoch, record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        history.append(record)
        print(_epoch_line(desc, epoch, hp.epochs, record), flush=True)
    return history


def _epoch_line(desc: str, epoch: int, epochs: int, r: dict) -> str:
    parts = [f"{desc} epoch {epoch}/{epochs}", f"train_loss {r['train_loss']:.4f}"]
    if r.get("val_loss") is not None:
        parts.append(f"val_loss {r['val_loss']:.4f}")
        parts.append(f"val_top1 {r['val_top1']:.2f}%")
    parts.append(f"lr {r['lr']:.2e}")
    parts.append(f"{r['seconds']:.1f}s")
    return " | ".join(parts)
