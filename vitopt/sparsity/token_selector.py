"""SViTE+ token selection as a training method: attach the selector, anneal its Gumbel temperature.

Chen et al., "Chasing Sparsity in Vision Transformers", NeurIPS 2021 (arXiv 2106.04533), SViTE+. The
selector module itself (:class:`vitopt.arch.token_selector.TokenSelector`, attached with
:func:`vitopt.arch.token_selector.attach_token_selector`) is part of the model's architecture and is
recorded in ``arch.json``; this module holds what only training needs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitopt.arch.token_selector import TokenSelector, attach_token_selector
from vitopt.train.callbacks import Callback

__all__ = ["SViTEPlus", "TokenSelector", "attach_token_selector"]


class SViTEPlus(Callback):
    """Learnable top-k token selection trained inside any loop (SViTE+).

    Construction attaches ``model.token_selector`` after block ``after_block`` (its scorer's weights
    are model parameters, so the model's optimizer trains them). The Gumbel temperature decays
    linearly from ``tau`` to ``tau_end`` over the training steps:
    ``tau(step) = tau + (tau_end - tau) * step / max(1, total_steps - 1)``, a pure function of the
    step, so ``state_dict`` is empty and a resumed fit continues the schedule.

    Args:
        model: a timm VisionTransformer (trained in place).
        keep: patch tokens to keep: an int, or a fraction in (0, 1) of the patch tokens.
        after_block: the block after which tokens are selected (0 <= after_block < depth - 1).
        tau, tau_end: initial and final Gumbel-softmax temperatures.

    Raises:
        VitoptError: not a timm ViT, ``keep`` or ``after_block`` out of range.
    """

    def __init__(self, model: nn.Module, keep: int | float, after_block: int, tau: float = 1.0,
                 tau_end: float = 0.1) -> None:
        self.selector: TokenSelector = attach_token_selector(model, keep=keep, after_block=after_block, tau=tau)
        self.model_ref = model
        self.tau, self.tau_end = float(tau), float(tau_end)

    def on_fit_start(self, model, optimizer, total_steps) -> None:
        """Set the temperature of step 0."""
        super().on_fit_start(model, optimizer, total_steps)
        self.selector.tau = self.tau

    def after_step(self, step: int) -> None:
        """Set the temperature for the next step."""
        frac = min(1.0, (step + 1) / max(1, self.total_steps - 1))
        self.selector.tau = self.tau + (self.tau_end - self.tau) * frac

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Add ``selector_tau`` and ``tokens_kept`` to the epoch record."""
        record["selector_tau"] = self.selector.tau
        record["tokens_kept"] = self.selector.num_prefix + self.selector.keep

    def finish(self) -> TokenSelector:
        """Nothing to fold: the selector stays on the model (deterministic top-k in eval mode); returns it."""
        return self.selector
