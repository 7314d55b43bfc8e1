"""The attention-sparsity regularizer of Sparse-then-Prune: ``weight * mean log(1 + A^2)``.

Prasetyo, Yudistira, Widodo, "Sparse then Prune: Toward Efficient Vision Transformers", 2023
(arXiv 2307.11988) add to the task loss a sparsity penalty on the softmax attention maps
``A = softmax(q k^T * scale)`` of shape ``[B, heads, N, N]``: ``log(1 + A^2)`` (a smooth, log-shaped
sparsity measure, cf. the Cauchy / log penalty), averaged over all entries, then prune. Their reference
code penalizes only the last block's map; :class:`AttentionSparsityReg` offers both
(``blocks="all"``, the default: the mean over every block's map entries, or ``"last"``).

Caveat, measured and left as the paper states it: ``log(1 + a^2)`` is convex on [0, 1], so over a
softmax row (entries summing to 1) the mean is smallest for *uniform* attention; the term does not by
itself push rows towards one-hot. At ``weight`` 1e-2 it changed no top-1 in our digits/shapes runs.

timm's fused attention (``scaled_dot_product_attention``) never materialises ``A``, so while the
regularizer is attached the regularized blocks run timm's explicit path (``fused_attn = False``, the
same maths with ``attn.scale``) and a forward hook on ``attn.attn_drop`` reads ``A`` (its input, before
dropout). Maps are only collected in training mode. :meth:`AttentionSparsityReg.close` removes the hooks
and restores ``fused_attn``; :func:`attention_reg_callbacks` does that around a ``fit`` call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vitopt.errors import VitoptError
from vitopt.train.callbacks import Callback

__all__ = ["attention_penalty", "AttentionSparsityReg", "attention_reg_callbacks"]


def attention_penalty(attn: Tensor) -> Tensor:
    """``mean(log(1 + A^2))`` of attention maps ``A`` (any shape, e.g. ``[B, heads, N, N]``); a scalar."""
    return torch.log1p(attn.float().square()).mean()


class AttentionSparsityReg(Callback):
    """Adds ``weight * mean log(1 + A^2)`` over the attention maps of the selected blocks to the loss.

    Args:
        model: a timm ViT (``model.blocks[i].attn`` with ``attn_drop`` and ``fused_attn``).
        weight: factor of the penalty (> 0).
        blocks: ``"all"`` (every block; the mean over all map entries) or ``"last"`` (the last block,
            as the reference code of Prasetyo et al. 2023).

    Raises:
        VitoptError: ``weight`` <= 0, unknown ``blocks``, or a model without timm attention blocks.
    """

    def __init__(self, model: nn.Module, weight: float = 1e-2, blocks: Literal["all", "last"] = "all") -> None:
        if weight <= 0:
            raise VitoptError(f"attention_reg.weight must be > 0; got {weight}.")
        if blocks not in ("all", "last"):
            raise VitoptError(f"attention_reg.blocks must be 'all' or 'last'; got {blocks!r}.")
        attns = [b.attn for b in getattr(model, "blocks", [])
                 if hasattr(getattr(b, "attn", None), "attn_drop") and hasattr(b.attn, "fused_attn")]
        if not attns:
            raise VitoptError(f"attention_reg needs a timm ViT whose blocks have attention with attn_drop; "
                              f"got {type(model).__name__}.")
        self.weight = float(weight)
        self.attns = attns if blocks == "all" else attns[-1:]
        self._sum: Tensor | None = None
        self._count = 0
        self._handles: list = []
        self._fused: list[bool] = []
        self.last_penalty: float | None = None
        self._attach()

    def _attach(self) -> None:
        for attn in self.attns:
            self._fused.append(bool(attn.fused_attn))
            attn.fused_attn = False
            self._handles.append(attn.attn_drop.register_forward_hook(self._collect))

    def _collect(self, module: nn.Module, args, out) -> None:
        if not module.training:
            return
        a = args[0]
        s = torch.log1p(a.float().square()).sum()
        self._sum = s if self._sum is None else self._sum + s
        self._count += a.numel()

    def loss(self) -> Tensor | None:
        """``weight * mean log(1 + A^2)`` of the maps seen since the last call (None if none were seen)."""
        if self._sum is None:
            return None
        value = self._sum / self._count
        self._sum, self._count = None, 0
        self.last_penalty = float(value.detach())
        return self.weight * value

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Add ``attn_sparsity`` (the last step's mean log(1 + A^2)) to the epoch record."""
        if self.last_penalty is not None:
            record["attn_sparsity"] = self.last_penalty

    def finish(self) -> None:
        """Remove the hooks and restore each block's ``fused_attn`` (same as :meth:`close`)."""
        self.close()

    def close(self) -> None:
        """Remove the hooks and restore each block's ``fused_attn``."""
        for h in self._handles:
            h.remove()
        for attn, fused in zip(self.attns, self._fused):
            attn.fused_attn = fused
        self._handles.clear()
        self._fused.clear()


@contextlib.contextmanager
def attention_reg_callbacks(cfg: Any, model: nn.Module) -> Iterator[list[Callback]]:
    """Yield ``[AttentionSparsityReg]`` built from a recipe's ``attention_reg`` (or ``[]`` when it is None).

    ``cfg`` has ``weight`` and ``blocks`` (:class:`vitopt.recipe.schema.AttentionReg`). The hooks are
    removed and ``fused_attn`` restored on exit, also when training raises.
    """
    if cfg is None:
        yield []
        return
    reg = AttentionSparsityReg(model, weight=cfg.weight, blocks=cfg.blocks)
    try:
        yield [reg]
    finally:
        reg.close()
