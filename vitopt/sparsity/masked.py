"""Element-wise 0/1 weight masks kept on the weights, their gradients and the AdamW state.

Shared by every weight-mask method of ``sparse_train`` (SViTE / S2ViTE dynamic sparse training,
Chen et al. 2021, arXiv 2106.04533; 2:4 fine-tuning). A pruned weight must stay exactly zero while
training goes on: :meth:`WeightMasks.mask_grads` zeroes the pruned entries of each gradient before
the optimizer step, and :meth:`WeightMasks.apply` zeroes the weights and the optimizer's running
moments (AdamW ``exp_avg`` / ``exp_avg_sq``) at pruned entries. With zero gradient and zero moments,
AdamW's update of a zero weight is exactly zero (``0 / (sqrt(0) + eps)`` and decoupled decay of 0),
so masking the gradients each step is enough between mask changes; weights regrown by RigL start at
zero with zeroed optimizer state (Evci et al. 2020, arXiv 1911.11134).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["block_linears", "WeightMasks"]


def block_linears(model: nn.Module, prefix: str | None = None) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the transformer blocks: name -> module, in model order.

    A block is a module under a ``blocks`` container: for a timm ViT ``blocks.i.attn.qkv``,
    ``blocks.i.attn.proj``, ``blocks.i.mlp.fc1`` and ``blocks.i.mlp.fc2``; for Swin / PVT
    ``layers.s.blocks.i...`` / ``stages.s.blocks.i...``. The patch embedding, patch merging and the
    classifier head are left dense, as in SViTE. ``prefix`` restricts to names starting with it.
    """
    def in_block(name: str) -> bool:
        if prefix is not None:
            return name.startswith(prefix)
        return name.startswith("blocks.") or ".blocks." in name

    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and in_block(name)}


class WeightMasks:
    """Boolean masks (True = kept) over named weight tensors of one model.

    Args:
        params: parameter name -> parameter (e.g. ``blocks.0.attn.qkv.weight``).
        masks: parameter name -> bool tensor of the parameter's shape.

    Raises:
        ValueError: a mask's shape differs from its parameter's.
    """

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.masks: dict[str, torch.Tensor] = {}
        for name, m in masks.items():
            self.set(name, m)
        self._float: dict[str, torch.Tensor] = {}

    def set(self, name: str, mask: torch.Tensor) -> None:
        """Replace the mask of ``name`` (bool, same shape as the parameter)."""
        p = self.params[name]
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, expected {tuple(p.shape)}")
        self.masks[name] = mask.to(device=p.device, dtype=torch.bool)
        if hasattr(self, "_float"):
            self._float.pop(name, None)

    def _mult(self, name: str) -> torch.Tensor:
        p = self.params[name]
        m = self._float.get(name)
        if m is None or m.dtype != p.dtype or m.device != p.device:
            m = self.masks[name].to(device=p.device, dtype=p.dtype)
            self._float[name] = m
        return m

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradient of every pruned entry (parameters without a gradient are skipped)."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self._mult(name))

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None, names=None) -> None:
        """Zero pruned weights and, when ``optimizer`` is given, every same-shaped state tensor at them.

        Args:
            optimizer: e.g. AdamW; its per-parameter tensors shaped like the weight (``exp_avg``,
                ``exp_avg_sq``) are zeroed at pruned entries.
            names: restrict to these parameter names (default: all).
        """
        for name in (names if names is not None else self.params):
            p, m = self.params[name], self._mult(name)
            p.mul_(m)
            if optimizer is not None:
                for v in optimizer.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        v.mul_(m)

    @torch.no_grad()
    def zero_state_at(self, optimizer: torch.optim.Optimizer | None, name: str, where: torch.Tensor) -> None:
        """Zero the optimizer moments of ``name`` at the bool positions ``where`` (regrown weights)."""
        if optimizer is None:
            return
        p = self.params[name]
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.masked_fill_(where, 0)

    def density(self) -> dict[str, float]:
        """Kept fraction per parameter name, plus ``"overall"`` (kept / total over every mask)."""
        out = {n: m.float().mean().item() for n, m in self.masks.items()}
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        out["overall"] = kept / max(1, total)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> bool mask (CPU copies), for checkpoints."""
        return {n: m.detach().cpu().clone() for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore masks saved by :meth:`state_dict` (unknown names raise KeyError)."""
        for n, m in state.items():
            self.set(n, m)
