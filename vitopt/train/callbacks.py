"""Hooks into a training loop for training-time methods (gates, DST masks, regularizers).

One small base class instead of loose keyword callables: a method that needs to act inside the
training step (add a loss term, mask gradients, update masks after the optimizer step) subclasses
:class:`Callback` and overrides only what it needs. ``state_dict``/``load_state_dict`` let the loop
checkpoint and resume the callback's own state (masks, RNG, counters) with the model.

Order per step, in :func:`vitopt.train.loop.fit` or in a user's own loop: forward -> task loss + the
method's ``loss()`` -> backward -> ``after_backward(step)`` -> gradient clipping -> optimizer step ->
``after_step(step)`` -> scheduler. Before the first step call ``on_fit_start(model, optimizer,
total_steps)`` (with ``parameters()`` added to the optimizer); after the last, ``finish()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Callback"]


class Callback:
    """No-op base; override the hooks a training-time method needs.

    Attributes set by :meth:`on_fit_start` (available to every later hook):
        model: the module being trained (unwrapped, not the DDP wrapper).
        optimizer: the optimizer ``fit`` built.
        total_steps: optimizer updates the whole ``fit`` will make (epochs x steps per epoch).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Called once before the first step (and again after a resume, with the same arguments)."""
        self.model, self.optimizer, self.total_steps = model, optimizer, total_steps

    def loss(self) -> Tensor | None:
        """A scalar term added to this step's loss (e.g. lambda * L1 of gates), or None."""
        return None

    def after_backward(self, step: int) -> None:
        """After ``loss.backward()``, before clipping and the optimizer step (e.g. mask gradients).

        Args:
            step: 0-based index of the update about to be made.
        """

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()`` (e.g. re-apply weight masks, prune-and-grow every N updates).

        Args:
            step: 0-based index of the update just made.
        """

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """After validation of ``epoch`` (1-based); may add keys (e.g. density per layer) to ``record``."""

    def parameters(self) -> list[nn.Parameter]:
        """Trainable tensors the method adds outside the model (e.g. VTP gates); put them in the optimizer."""
        return []

    def finish(self) -> Any:
        """End the method after the last step (fold gates, apply masks, cut the model); returns what it made.

        Default: nothing to do, returns None.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """Tensors/numbers needed to resume (saved in the epoch checkpoint). Default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
