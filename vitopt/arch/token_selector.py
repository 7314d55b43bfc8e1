"""SViTE+ learnable token selector: top-k Gumbel-softmax in training, a fixed keep count at export.

Chen et al., "Chasing Sparsity in Vision Transformers", NeurIPS 2021 (arXiv 2106.04533), SViTE+:
a light scorer ranks the patch tokens after a block and only the top ``k`` of them go on to the
later blocks (the class / distillation / register tokens are always kept). In training the choice
is a top-k over Gumbel-perturbed scores ``(s + g) / tau`` (Gumbel-softmax, Jang et al. 2017,
arXiv 1611.01144), made differentiable with a straight-through estimator: the kept tokens are
multiplied by ``1 + p - stopgrad(p)`` (``p``: the softmax of the perturbed scores), which is exactly
1 in the forward pass and passes ``dL/dp`` to the scorer. ``tau`` decays linearly from ``tau`` to
``tau_end`` over the stage (:class:`vitopt.sparsity.token_selector.TokenSelectorSchedule`).

In eval mode the selection is a deterministic ``topk`` of the scores with the keep count fixed at
construction, so the exported ONNX graph has ``TopK`` with a constant K and static token counts
(``[batch, prefix + k, embed_dim]``) that TensorRT can build. The selector lives on the model as
``model.token_selector`` (a submodule, so its weights are in the state dict) and acts through a
forward hook on ``model.blocks[after_block]``; ``arch.json`` records its config so
:func:`vitopt.arch.config.load_pruned` re-attaches it. :meth:`TokenSelector.macs` counts the FLOPs
with the reduced token count in the later blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vitopt.errors import VitoptError

__all__ = ["TokenSelector", "attach_token_selector"]


class TokenSelector(nn.Module):
    """Scores patch tokens with ``LayerNorm -> Linear(embed_dim, 1)`` and keeps the top ``keep``.

    Args:
        embed_dim: token width D.
        num_prefix: class/dist/register tokens at the front of the sequence (always kept).
        num_patches: patch tokens entering the selector.
        keep: patch tokens kept (1 <= keep <= num_patches).
        after_block: index of the block whose output is selected.
        tau: Gumbel-softmax temperature used in training (see
            :class:`vitopt.sparsity.token_selector.TokenSelectorSchedule`).

    Shapes: ``forward(x [B, num_prefix + num_patches, D]) -> [B, num_prefix + keep, D]``.

    Raises:
        VitoptError: ``keep`` out of range.
    """

    def __init__(self, embed_dim: int, num_prefix: int, num_patches: int, keep: int, after_block: int,
                 tau: float = 1.0) -> None:
        super().__init__()
        if not 1 <= keep <= num_patches:
            raise VitoptError(f"token selector keep={keep} must be in [1, {num_patches}] (the patch tokens).")
        self.embed_dim, self.num_prefix, self.num_patches = int(embed_dim), int(num_prefix), int(num_patches)
        self.keep, self.after_block, self.tau = int(keep), int(after_block), float(tau)
        self.norm = nn.LayerNorm(embed_dim)
        self.score = nn.Linear(embed_dim, 1)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def config(self) -> dict[str, int]:
        """The constructor arguments that fix the architecture (stored in ``arch.json``)."""
        return {"embed_dim": self.embed_dim, "num_prefix": self.num_prefix, "num_patches": self.num_patches,
                "keep": self.keep, "after_block": self.after_block}

    def scores(self, x: Tensor) -> Tensor:
        """Scores ``[B, num_patches]`` of the patch tokens of ``x``."""
        return self.score(self.norm(x[:, self.num_prefix:])).squeeze(-1)

    def _hook(self, module: nn.Module, args, out: Tensor) -> Tensor:
        """Forward hook on the selected block: replace its output by the kept tokens."""
        return self(out)

    def forward(self, x: Tensor) -> Tensor:
        """Keep the prefix tokens and the top-``keep`` patch tokens (Gumbel top-k in training)."""
        P = self.num_prefix
        s = self.scores(x)
        patches = x[:, P:]
        if self.training:
            u = torch.rand_like(s).clamp_(1e-9, 1.0 - 1e-9)
            y = (s - torch.log(-torch.log(u))) / self.tau
            idx = torch.topk(y, self.keep, dim=1).indices
            p = torch.softmax(y, dim=1).gather(1, idx)
            st = (1.0 + p - p.detach()).unsqueeze(-1)
            kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])) * st
        else:
            idx = torch.topk(s, self.keep, dim=1).indices
            kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :P], kept], dim=1)

    def macs(self, model: nn.Module, dims: dict[str, int]) -> dict[str, int]:
        """MACs of one image of ``model`` (a timm ViT) at ``dims`` with the token reduction applied.

        Blocks ``<= after_block`` see ``num_prefix + num_patches`` tokens, later blocks
        ``num_prefix + keep``; per block ``N*D*3A + 2*N^2*A + N*A*D + 2*N*D*m`` (qkv, q@k^T, attn@v,
        proj, fc1+fc2; A = heads*head_dim, m = MLP hidden), plus the scorer's ``num_patches*D``, the
        patch embedding and the heads, as :meth:`vitopt.arch.families.vit.VitFamily.macs` counts them.
        FLOPs = 2 x MACs.
        """
        D = dims["embed"]
        conv = model.patch_embed.proj
        k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        out = {"patch_embed": int(model.patch_embed.num_patches) * D * k}
        full, reduced = self.num_prefix + self.num_patches, self.num_prefix + self.keep
        for i in range(len(model.blocks)):
            N = full if i <= self.after_block else reduced
            A = dims[f"blocks.{i}.heads"] * dims[f"blocks.{i}.head_dim"]
            m = dims[f"blocks.{i}.mlp"]
            out[f"blocks.{i}"] = N * D * 3 * A + 2 * N * N * A + N * A * D + 2 * N * D * m
        out["token_selector"] = self.num_patches * D
        out["head"] = sum(D * getattr(model, h).out_features for h in ("head", "head_dist")
                          if isinstance(getattr(model, h, None), nn.Linear))
        out["total"] = sum(out.values())
        return out


def attach_token_selector(model: nn.Module, keep: int | float, after_block: int, tau: float = 1.0,
                          **config: Any) -> TokenSelector:
    """Create ``model.token_selector`` and hook it onto ``model.blocks[after_block]``'s output.

    Args:
        model: a timm VisionTransformer (``patch_embed.num_patches``, ``num_prefix_tokens``, ``blocks``).
        keep: patch tokens to keep: an int, or a fraction in (0, 1) of the patch tokens (rounded, >= 1).
        after_block: the block after which tokens are selected (0 <= after_block < depth - 1).
        tau: initial Gumbel-softmax temperature.
        config: the rest of :meth:`TokenSelector.config` when rebuilding from ``arch.json``
            (checked against the model).

    Returns:
        the selector (also ``model.token_selector``). Calling this again replaces the old one.

    Raises:
        VitoptError: not a timm ViT, ``after_block`` out of range, or a config that does not match.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise VitoptError(f"the token selector needs a timm VisionTransformer; got {type(model).__name__}.")
    if not 0 <= after_block < len(blocks) - 1:
        raise VitoptError(f"token selector after_block={after_block} must be in [0, {len(blocks) - 2}] "
                          f"(the model has {len(blocks)} blocks and some must follow the selector).")
    num_patches = int(model.patch_embed.num_patches)
    if isinstance(keep, float) and not float(keep).is_integer():
        keep = max(1, int(round(keep * num_patches)))
    sel = TokenSelector(int(model.embed_dim), int(model.num_prefix_tokens), num_patches, int(keep), after_block, tau)
    for key, value in config.items():
        if sel.config().get(key) != value:
            raise VitoptError(f"token selector {key}={value} does not match the model ({sel.config().get(key)}).")
    for blk in blocks:                       # drop a previous selector's hook
        for key, fn in list(blk._forward_hooks.items()):
            if isinstance(getattr(fn, "__self__", None), TokenSelector):
                del blk._forward_hooks[key]
    p = next(model.parameters())
    model.token_selector = sel.to(device=p.device, dtype=p.dtype).train(model.training)
    # a bound method (not a closure over ``model``), so copy.deepcopy(model) hooks the copy's selector
    blocks[after_block].register_forward_hook(model.token_selector._hook)
    return model.token_selector
