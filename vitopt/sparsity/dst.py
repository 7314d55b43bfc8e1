"""SViTE unstructured dynamic sparse training: ERK masks, magnitude drop, RigL / SET regrow.

Chen et al., "Chasing Sparsity in Vision Transformers: An End-to-End Exploration", NeurIPS 2021
(arXiv 2106.04533), SViTE: every Linear weight of the transformer blocks (qkv, proj, fc1, fc2) gets a
0/1 mask at a fixed overall density, allocated across layers with Erdos-Renyi-Kernel (ERK,
:mod:`vitopt.sparsity.erk`). Every ``update_interval`` optimizer steps, until ``t_end`` x the total
steps, each layer drops the fraction ``death_rate(t)`` of its active weights with the smallest
magnitude and regrows as many inactive ones: by largest dense-gradient magnitude (RigL, Evci et al.
2020, arXiv 1911.11134; SViTE's ``--growth gradient``) or uniformly at random (SET, Mocanu et al.
2018; ``--growth random``). ``death_rate(t) = death_rate / 2 * (1 + cos(pi * t / t_end))``
(cosine decay; SViTE's default initial rate 0.5). SViTE's DeiT-S/ImageNet run uses density 0.4 and
an update every 15000 iterations over 600 epochs; the densities and intervals here are options.

Masks act on the weights, their gradients and the AdamW moments (:class:`~vitopt.sparsity.masked.WeightMasks`),
so a pruned weight stays exactly zero; a regrown weight starts at 0 with zeroed optimizer state.
All state (masks, the SET generator, update count) is in :meth:`SViTE.state_dict`, and mask
updates depend only on weights, gradients and that state, so DDP ranks (identical all-reduced
gradients) keep identical masks.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from vitopt.errors import VitoptError
from vitopt.sparsity.erk import erk_densities, kept_counts
from vitopt.sparsity.masked import WeightMasks, block_linears
from vitopt.train.callbacks import Callback

__all__ = ["cosine_death_rate", "is_update_step", "SViTE"]


def cosine_death_rate(step: int, t_end_steps: int, initial: float) -> float:
    """Death (prune-and-regrow) fraction at update ``step``: ``initial/2 * (1 + cos(pi*step/t_end_steps))``.

    0 at and after ``t_end_steps`` (SViTE / RigL cosine annealing of the update fraction).
    """
    if t_end_steps <= 0 or step >= t_end_steps:
        return 0.0
    return 0.5 * initial * (1.0 + math.cos(math.pi * step / t_end_steps))


def is_update_step(step: int, interval: int, t_end_steps: int) -> bool:
    """True when the update just made (0-based ``step``) ends an interval before ``t_end_steps``."""
    done = step + 1
    return done % interval == 0 and done < t_end_steps


def _topk_mask(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Bool mask of the ``k`` entries of ``scores`` with the largest (or smallest) values."""
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.reshape(-1), k, largest=largest, sorted=False).indices
        out[idx] = True
    return out.view_as(scores)


class SViTE(Callback):
    """SViTE unstructured prune-and-grow as a :class:`~vitopt.train.callbacks.Callback` for ``fit``.

    Args:
        model: the ViT (masks cover every ``nn.Linear`` weight under ``blocks.``).
        density: target overall kept fraction of those weights, in (0, 1).
        growth: ``"gradient"`` (RigL) or ``"random"`` (SET).
        death_rate: initial drop/regrow fraction of each layer's active weights (cosine-decayed).
        update_interval: optimizer steps between mask updates (>= 1).
        t_end: fraction of the total steps after which masks are frozen, in (0, 1].
        distribution: ``"erk"`` (default) or ``"uniform"`` (the same density in every layer).
        seed: seed of the generator used by ``growth="random"``.

    The initial mask keeps each layer's largest-magnitude weights (the stage starts from a trained
    or pretrained model). ``history`` lists one record per mask update (step, death rate, weights moved).

    Raises:
        VitoptError: bad option values, or a model without Linear layers in ``blocks``.
    """

    def __init__(self, model: nn.Module, density: float, *, growth: Literal["gradient", "random"] = "gradient",
                 death_rate: float = 0.5, update_interval: int = 100, t_end: float = 0.8,
                 distribution: Literal["erk", "uniform"] = "erk", seed: int = 0) -> None:
        if not 0.0 < density < 1.0:
            raise VitoptError(f"svite density must be in (0, 1); got {density}.")
        if growth not in ("gradient", "random"):
            raise VitoptError(f"svite growth must be 'gradient' or 'random'; got {growth!r}.")
        if update_interval < 1 or not 0.0 < t_end <= 1.0 or not 0.0 <= death_rate < 1.0:
            raise VitoptError("svite needs update_interval >= 1, t_end in (0, 1] and death_rate in [0, 1).")
        linears = block_linears(model)
        if not linears:
            raise VitoptError(f"svite found no nn.Linear inside transformer blocks of {type(model).__name__} "
                              "(allowed: timm ViT / DeiT / Swin / PVT models with a 'blocks' container).")
        self.growth, self.death_rate, self.update_interval, self.t_end = growth, death_rate, update_interval, t_end
        params = {f"{n}.weight": m.weight for n, m in linears.items()}
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        dens = erk_densities(shapes, density) if distribution == "erk" else {n: density for n in shapes}
        counts = kept_counts(shapes, dens)
        with torch.no_grad():
            masks = {n: _topk_mask(p.detach().abs(), counts[n], largest=True) for n, p in params.items()}
        self.masks = WeightMasks(params, masks)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.updates = 0
        self.history: list[dict[str, Any]] = []
        self._grad_scores: dict[str, torch.Tensor] = {}
        self.optimizer = None

    # ------------------------------------------------------------------------------ fit hooks
    def on_fit_start(self, model, optimizer, total_steps) -> None:
        """Apply the masks to the weights and the (possibly resumed) optimizer state."""
        super().on_fit_start(model, optimizer, total_steps)
        self.masks.apply(optimizer)

    @property
    def t_end_steps(self) -> int:
        """Step count after which masks stop changing: ``ceil(t_end * total_steps)``."""
        return int(math.ceil(self.t_end * self.total_steps))

    def after_backward(self, step: int) -> None:
        """On an update step, keep |dense gradient| as the RigL regrow score; then zero pruned gradients."""
        if self.growth == "gradient" and is_update_step(step, self.update_interval, self.t_end_steps):
            self._grad_scores = {n: p.grad.detach().abs().clone() for n, p in self.masks.params.items()
                                 if p.grad is not None}
        self.masks.mask_grads()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Prune-and-grow every ``update_interval`` steps until ``t_end``; zero moments of moved weights."""
        if not is_update_step(step, self.update_interval, self.t_end_steps):
            return
        rate = cosine_death_rate(step + 1, self.t_end_steps, self.death_rate)
        moved = 0
        for name, p in self.masks.params.items():
            moved += self._update_layer(name, p, rate)
        self._grad_scores = {}
        self.updates += 1
        self.history.append({"step": step + 1, "death_rate": rate, "moved": moved})

    def _update_layer(self, name: str, p: torch.Tensor, rate: float) -> int:
        mask = self.masks.masks[name].to(p.device)
        n_active = int(mask.sum())
        k = int(round(rate * n_active))
        if k <= 0:
            return 0
        w = p.detach().abs().masked_fill(~mask, float("inf"))
        drop = _topk_mask(w, k, largest=False)
        kept = mask & ~drop
        if self.growth == "gradient":
            score = self._grad_scores.get(name)
            score = torch.zeros_like(w) if score is None else score.clone()
        else:
            score = torch.rand(p.shape, generator=self.generator).to(p.device)
        score = score.masked_fill(kept, -float("inf"))
        grow = _topk_mask(score, k, largest=True)
        new = kept | grow
        self.masks.set(name, new)
        self.masks.apply(self.optimizer, names=[name])
        self.masks.zero_state_at(self.optimizer, name, grow)
        p.masked_fill_(grow, 0.0)
        return int((new & ~mask).sum())

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Add ``density`` (overall) and ``density/<layer>`` (per Linear weight) to the epoch record."""
        for name, d in self.masks.density().items():
            record["density" if name == "overall" else f"density/{name.removesuffix('.weight')}"] = d
        record["mask_updates"] = self.updates

    @torch.no_grad()
    def finish(self) -> dict[str, torch.Tensor]:
        """Zero the pruned weights once more (e.g. after EMA replaced the trained ones); returns the masks.

        Returns:
            parameter name -> bool mask (True = kept), shaped like the weight.
        """
        self.masks.apply()
        return dict(self.masks.masks)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``mask/<param>`` bool tensors, ``rng`` (SET generator state) and ``updates``."""
        out: dict[str, Any] = {f"mask/{n}": m for n, m in self.masks.state_dict().items()}
        out["rng"] = self.generator.get_state()
        out["updates"] = self.updates
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks, generator and counter; re-apply the masks (weights and optimizer state)."""
        self.masks.load_state_dict({k[len("mask/"):]: v for k, v in state.items() if k.startswith("mask/")})
        if "rng" in state:
            self.generator.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8))
        self.updates = int(state.get("updates", 0))
        self.masks.apply(self.optimizer)
