"""S2ViTE structured dynamic sparse training of heads and MLP neurons, ending in surgery.

Chen et al., "Chasing Sparsity in Vision Transformers: An End-to-End Exploration", NeurIPS 2021
(arXiv 2106.04533), S2ViTE: each block keeps a fixed number of attention heads and MLP hidden
neurons (``head_density`` x heads, ``mlp_density`` x neurons; the paper reports 40% structured
sparsity for DeiT-S/B). Every ``update_interval`` steps until ``t_end`` x the total steps, each block

* drops the fraction ``death_rate(t)`` (cosine-decayed, :func:`~vitopt.sparsity.dst.cosine_death_rate`)
  of its active heads with the smallest first-order Taylor score of the head output,
  ``|sum_{b,n,j} o_{h,j} * dL/do_{h,j}|`` (``o_h``: the head's slice of proj's input, Molchanov et al.
  2019; summed over the whole batch of all DDP ranks on the update step), and of its active MLP neurons with the smallest ``L1(fc1 row) + L1(fc2 column)``;
* regrows as many units, among those inactive before the update, with the largest L1 of the dense
  gradient of their incoming weights (qkv rows of the head, fc1 row of the neuron) - RigL-style
  (Evci et al. 2020, arXiv 1911.11134).

A removed unit's incoming weights (qkv rows, fc1 row) are masked - weights, gradients and AdamW
moments (:class:`~vitopt.sparsity.masked.WeightMasks`); biases are not, as in SViTE. Its output is
then constant over tokens: a head with zero q/k/v weights has uniform attention and, since softmax
rows sum to 1, outputs exactly its v-bias ``b_v``, which reaches the residual as
``proj.W[:, head cols] @ b_v``; a neuron outputs ``act(fc1.b_j)``, reaching it as
``fc2.W[:, j] * act(fc1.b_j)``. :func:`fold_removed_units` adds these into ``proj.bias`` /
``fc2.bias`` so that :func:`finalize` (masks -> :class:`~vitopt.arch.plan.KeepPlan` ->
:func:`~vitopt.arch.surgery.apply_plan`) yields a physically smaller model equal to the masked one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitopt.arch.families import family_of
from vitopt.arch.plan import KeepPlan
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError
from vitopt.sparsity.dst import cosine_death_rate, is_update_step
from vitopt.sparsity.masked import WeightMasks
from vitopt.train.callbacks import Callback
from vitopt.train.distributed import all_reduce_sum

__all__ = ["S2ViTE", "fold_removed_units", "keep_plan_of", "finalize"]


def _lowest(scores: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` units of ``among`` with the lowest ``scores`` (ties: lower index first)."""
    s = scores.double().masked_fill(~among, float("inf"))
    order = torch.argsort(s, stable=True)[:k]
    out = torch.zeros_like(among)
    out[order] = True
    return out


def _highest(scores: torch.Tensor, among: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` units of ``among`` with the highest ``scores`` (ties: lower index first)."""
    return _lowest(-scores.double(), among, k)


def keep_plan_of(head_masks: list[torch.Tensor], mlp_masks: list[torch.Tensor]) -> KeepPlan:
    """KeepPlan ``{"blocks.i.heads": kept heads, "blocks.i.mlp": kept neurons}`` from per-block bool masks."""
    keep: dict[str, list[int]] = {}
    for i, (h, m) in enumerate(zip(head_masks, mlp_masks)):
        keep[f"blocks.{i}.heads"] = h.nonzero().flatten().tolist()
        keep[f"blocks.{i}.mlp"] = m.nonzero().flatten().tolist()
    return KeepPlan(keep)


@torch.no_grad()
def fold_removed_units(model: nn.Module, plan: KeepPlan) -> None:
    """Fold the constant output of every unit the plan removes into the next Linear's bias.

    Exact when the removed units' incoming weights are zero (the masked S2ViTE model): a removed head
    outputs its v-bias (softmax rows sum to 1), adding ``proj.W[:, cols_h] @ b_v[h]`` to proj's output;
    a removed MLP neuron j adds ``fc2.W[:, j] * act(fc1.b[j])`` to fc2's output. Afterwards the removed
    v-biases / fc1 biases are zeroed, so the masked model and the surgered one compute the same.

    Raises:
        VitoptError: a non-zero constant must be folded into a Linear without a bias.
    """
    for i, blk in enumerate(model.blocks):
        attn, mlp = blk.attn, blk.mlp
        H, d = attn.num_heads, attn.head_dim
        kept_h = set(plan.keep.get(f"blocks.{i}.heads", range(H)))
        gone = [h for h in range(H) if h not in kept_h]
        if gone and attn.qkv.bias is not None:
            v_bias = attn.qkv.bias[2 * H * d:].view(H, d)
            W = attn.proj.weight.view(attn.proj.out_features, H, d)
            add = torch.einsum("ohd,hd->o", W[:, gone], v_bias[gone])
            _add_bias(attn.proj, add, f"blocks.{i}.attn.proj")
            v_bias[gone] = 0
        M = mlp.fc1.out_features
        kept_m = set(plan.keep.get(f"blocks.{i}.mlp", range(M)))
        gone = [j for j in range(M) if j not in kept_m]
        if gone and mlp.fc1.bias is not None:
            act = mlp.act(mlp.fc1.bias[gone])
            _add_bias(mlp.fc2, mlp.fc2.weight[:, gone] @ act, f"blocks.{i}.mlp.fc2")
            mlp.fc1.bias[gone] = 0


def _add_bias(lin: nn.Linear, add: torch.Tensor, where: str) -> None:
    if lin.bias is None:
        if torch.any(add != 0):
            raise VitoptError(f"{where} has no bias to fold the removed units' constant output into; "
                              "S2ViTE surgery needs proj/fc2 with bias (timm's default).")
        return
    lin.bias.add_(add.to(lin.bias.dtype))


class S2ViTE(Callback):
    """S2ViTE prune-and-grow of heads and MLP neurons as a :class:`~vitopt.train.callbacks.Callback`.

    Args:
        model: a timm ViT (its blocks' ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``).
        head_density: kept fraction of heads per block, in (0, 1] (at least 1 head kept).
        mlp_density: kept fraction of MLP hidden neurons per block, in (0, 1] (at least 1 kept).
        death_rate: initial drop/regrow fraction of the active units (cosine-decayed to 0 at ``t_end``).
        update_interval: optimizer steps between updates (>= 1).
        t_end: fraction of the total steps after which masks are frozen, in (0, 1].

    Initial masks keep the units with the largest weight L1 (qkv rows + proj columns per head; fc1
    row + fc2 column per neuron). Attributes ``head_masks`` / ``mlp_masks`` are per-block bool vectors;
    ``history`` has one record per update (step, death rate, heads and neurons swapped).

    Raises:
        VitoptError: bad option values or a model without timm ViT blocks.
    """

    def __init__(self, model: nn.Module, head_density: float = 0.6, mlp_density: float = 0.6, *,
                 death_rate: float = 0.5, update_interval: int = 100, t_end: float = 0.8) -> None:
        if not (0 < head_density <= 1 and 0 < mlp_density <= 1):
            raise VitoptError("s2vite head_density and mlp_density must be in (0, 1].")
        if update_interval < 1 or not 0.0 < t_end <= 1.0 or not 0.0 <= death_rate < 1.0:
            raise VitoptError("s2vite needs update_interval >= 1, t_end in (0, 1] and death_rate in [0, 1).")
        if family_of(model).name != "vit":
            raise VitoptError(f"s2vite supports timm VisionTransformer models (family 'vit'); got "
                              f"{type(model).__name__} (family {family_of(model).name!r}).")
        self.death_rate, self.update_interval, self.t_end = death_rate, update_interval, t_end
        self.model_ref = model
        self.blocks = list(model.blocks)
        self.head_masks: list[torch.Tensor] = []
        self.mlp_masks: list[torch.Tensor] = []
        for blk in self.blocks:
            H, M = blk.attn.num_heads, blk.mlp.fc1.out_features
            h_keep = max(1, int(round(head_density * H)))
            m_keep = max(1, int(round(mlp_density * M)))
            everything_h = torch.ones(H, dtype=torch.bool)
            everything_m = torch.ones(M, dtype=torch.bool)
            self.head_masks.append(_highest(self._head_l1(blk), everything_h, h_keep))
            self.mlp_masks.append(_highest(self._mlp_l1(blk), everything_m, m_keep))
        params = {}
        for i, blk in enumerate(self.blocks):
            params[f"blocks.{i}.attn.qkv.weight"] = blk.attn.qkv.weight
            params[f"blocks.{i}.mlp.fc1.weight"] = blk.mlp.fc1.weight
        self.masks = WeightMasks(params, self._weight_masks())
        self.updates = 0
        self.history: list[dict[str, Any]] = []
        self._taylor: dict[int, torch.Tensor] = {}
        self._grad_l1: dict[str, torch.Tensor] = {}
        self._probes: list = []
        self.optimizer = None

    # ------------------------------------------------------------------------------ scores
    @staticmethod
    @torch.no_grad()
    def _head_l1(blk) -> torch.Tensor:
        H, d = blk.attn.num_heads, blk.attn.head_dim
        qkv = blk.attn.qkv.weight.abs().view(3, H, d, -1).sum(dim=(0, 2, 3))
        proj = blk.attn.proj.weight.abs().view(-1, H, d).sum(dim=(0, 2))
        return (qkv + proj).float().cpu()

    @staticmethod
    @torch.no_grad()
    def _mlp_l1(blk) -> torch.Tensor:
        return (blk.mlp.fc1.weight.abs().sum(1) + blk.mlp.fc2.weight.abs().sum(0)).float().cpu()

    def _weight_masks(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, blk in enumerate(self.blocks):
            H, d = blk.attn.num_heads, blk.attn.head_dim
            rows = self.head_masks[i][None, :, None].expand(3, H, d).reshape(-1)
            out[f"blocks.{i}.attn.qkv.weight"] = rows[:, None].expand_as(blk.attn.qkv.weight)
            out[f"blocks.{i}.mlp.fc1.weight"] = self.mlp_masks[i][:, None].expand_as(blk.mlp.fc1.weight)
        return out

    # ------------------------------------------------------------------------------ Taylor probe
    def _attach_probe(self) -> None:
        """Record ``|sum o_h * dL/do_h|`` per head at proj's input during the next forward/backward."""
        self._remove_probe()
        self._taylor = {}
        for i, blk in enumerate(self.blocks):
            H = blk.attn.num_heads

            def pre_hook(module, args, i=i, H=H):
                x = args[0]
                if x.requires_grad:
                    xd = x.detach()

                    def grad_hook(g, i=i):
                        s = (xd * g).reshape(-1, H, xd.shape[-1] // H).sum(dim=(0, 2))
                        self._taylor[i] = s.double().cpu()          # signed; |.| after the DDP sum
                    x.register_hook(grad_hook)
            self._probes.append(blk.attn.proj.register_forward_pre_hook(pre_hook))

    def _remove_probe(self) -> None:
        for h in self._probes:
            h.remove()
        self._probes.clear()

    # ------------------------------------------------------------------------------ fit hooks
    def on_fit_start(self, model, optimizer, total_steps) -> None:
        """Apply the masks to weights and optimizer state; arm the Taylor probe for the first step.

        The probe is armed whatever the step a (resumed) fit starts at, so an update on that step
        scores heads exactly as an uninterrupted run; it is removed after the step if no update came.
        """
        super().on_fit_start(model, optimizer, total_steps)
        self.masks.apply(optimizer)
        self._attach_probe()

    @property
    def t_end_steps(self) -> int:
        """Step count after which masks stop changing: ``ceil(t_end * total_steps)``."""
        return int(math.ceil(self.t_end * self.total_steps))

    def after_backward(self, step: int) -> None:
        """On an update step keep the dense-gradient L1 of each unit's incoming weights; mask gradients."""
        if is_update_step(step, self.update_interval, self.t_end_steps):
            self._grad_l1 = {}
            for i, blk in enumerate(self.blocks):
                H, d = blk.attn.num_heads, blk.attn.head_dim
                g = blk.attn.qkv.weight.grad
                if g is not None:
                    self._grad_l1[f"{i}.heads"] = g.abs().view(3, H, d, -1).sum(dim=(0, 2, 3)).float().cpu()
                g = blk.mlp.fc1.weight.grad
                if g is not None:
                    self._grad_l1[f"{i}.mlp"] = g.abs().sum(1).float().cpu()
        self.masks.mask_grads()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Swap units every ``update_interval`` steps until ``t_end``; re-arm the probe for the next update."""
        if is_update_step(step, self.update_interval, self.t_end_steps):
            rate = cosine_death_rate(step + 1, self.t_end_steps, self.death_rate)
            swapped_h = swapped_m = 0
            taylor_all = self._global_taylor()
            for i, blk in enumerate(self.blocks):
                taylor = taylor_all.get(i, self._head_l1(blk))
                self.head_masks[i], n = self._swap(self.head_masks[i], taylor, self._grad_l1.get(f"{i}.heads"), rate)
                swapped_h += n
                self.mlp_masks[i], n = self._swap(self.mlp_masks[i], self._mlp_l1(blk),
                                                  self._grad_l1.get(f"{i}.mlp"), rate)
                swapped_m += n
            self._refresh(changed_only=True)
            self._taylor, self._grad_l1 = {}, {}
            self.updates += 1
            self.history.append({"step": step + 1, "death_rate": rate, "heads_swapped": swapped_h,
                                 "mlp_swapped": swapped_m})
        self._remove_probe()
        if is_update_step(step + 1, self.update_interval, self.t_end_steps):
            self._attach_probe()

    def _global_taylor(self) -> dict[int, torch.Tensor]:
        """Per-block |sum o*dL/do| over the whole (all-rank) batch; {} unless every block was probed.

        Under DDP each rank sees its own shard of the batch, so the signed per-rank sums are added
        over ranks before taking |.|; every rank then ranks heads identically.
        """
        if len(self._taylor) != len(self.blocks):
            return {}
        flat = torch.cat([self._taylor[i] for i in range(len(self.blocks))])
        summed = torch.tensor(all_reduce_sum(flat.tolist()), dtype=torch.float64).abs()
        out, start = {}, 0
        for i in range(len(self.blocks)):
            n = self._taylor[i].numel()
            out[i] = summed[start:start + n]
            start += n
        return out

    @staticmethod
    def _swap(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor | None,
              rate: float) -> tuple[torch.Tensor, int]:
        inactive = ~mask
        k = min(int(round(rate * int(mask.sum()))), int(inactive.sum()))
        if k <= 0 or grow_score is None:
            return mask, 0
        drop = _lowest(drop_score, mask, k)
        grow = _highest(grow_score, inactive, k)
        return (mask & ~drop) | grow, k

    def _refresh(self, changed_only: bool = False) -> None:
        old = {n: m.clone() for n, m in self.masks.masks.items()}
        for n, m in self._weight_masks().items():
            self.masks.set(n, m)
        self.masks.apply(self.optimizer)
        for n, m in self.masks.masks.items():
            grown = m & ~old[n].to(m.device)
            if grown.any():
                self.masks.zero_state_at(self.optimizer, n, grown)
                self.masks.params[n].masked_fill_(grown, 0.0)

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Add ``heads_kept`` / ``mlp_kept`` (totals) and ``mask_updates`` to the epoch record."""
        record["heads_kept"] = int(sum(int(m.sum()) for m in self.head_masks))
        record["mlp_kept"] = int(sum(int(m.sum()) for m in self.mlp_masks))
        record["mask_updates"] = self.updates

    def plan(self) -> KeepPlan:
        """The current masks as a :class:`~vitopt.arch.plan.KeepPlan` (heads and mlp of every block)."""
        return keep_plan_of(self.head_masks, self.mlp_masks)

    def close(self) -> None:
        """Remove the Taylor probe hooks (if armed)."""
        self._remove_probe()

    # ------------------------------------------------------------------------------ state
    def finish(self) -> KeepPlan:
        """End S2ViTE: fold the removed units' constant outputs and cut them from the model, in place.

        The model this method was built on (and trained) becomes physically smaller: the same timm
        class with fewer heads / MLP neurons, computing what the masked model computed (fp32, <= 1e-5).

        Returns:
            the :class:`~vitopt.arch.plan.KeepPlan` applied.
        """
        return finalize(self.model_ref, self)

    def state_dict(self) -> dict[str, Any]:
        """``heads/<i>`` and ``mlp/<i>`` bool unit masks and ``updates``."""
        out: dict[str, Any] = {f"heads/{i}": m.clone() for i, m in enumerate(self.head_masks)}
        out.update({f"mlp/{i}": m.clone() for i, m in enumerate(self.mlp_masks)})
        out["updates"] = self.updates
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore unit masks and counter; re-apply weight masks (weights and optimizer state)."""
        for i in range(len(self.blocks)):
            self.head_masks[i] = torch.as_tensor(state[f"heads/{i}"]).bool().cpu()
            self.mlp_masks[i] = torch.as_tensor(state[f"mlp/{i}"]).bool().cpu()
        self.updates = int(state.get("updates", 0))
        for n, m in self._weight_masks().items():
            self.masks.set(n, m)
        self.masks.apply(self.optimizer)


@torch.no_grad()
def finalize(model: nn.Module, dst: S2ViTE) -> KeepPlan:
    """End S2ViTE: apply the masks, fold removed units' constant outputs, and run surgery in place.

    ``model`` may be the model ``dst`` was built on or a copy of it (weight masks are looked up by
    parameter name). Returns the KeepPlan used; the model is the same timm class with fewer heads /
    MLP neurons and computes what the masked model computed (fp32, <= 1e-5).
    """
    dst.close()
    for name, mask in dst.masks.masks.items():
        p = model.get_parameter(name)
        p.mul_(mask.to(device=p.device, dtype=p.dtype))
    plan = dst.plan()
    fold_removed_units(model, plan)
    apply_plan(model, plan, inplace=True)
    return plan
