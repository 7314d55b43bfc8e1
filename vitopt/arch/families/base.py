"""The contract every model family implements: the :class:`Family` protocol.

A family knows one timm model class and everything vitopt needs to prune it structurally: which
models it accepts (:meth:`Family.matches`, :meth:`Family.check_supported`), the current size of
every group (:meth:`Family.read_dims`), the groups of coupled slices
(:meth:`Family.structure`, see :mod:`vitopt.arch.structure`), the module attributes to update after
surgery (:meth:`Family.set_dims`), constants to fold before surgery so the pruned model computes what
the masked one did (:meth:`Family.fold_before_surgery`, e.g. the attention scale of a head_dim
prune), and an analytic MAC count (:meth:`Family.macs`) that allocation prices thousands of times.

Adding a family is one module in :mod:`vitopt.arch.families` implementing this protocol and one line
in :data:`vitopt.arch.families.FAMILIES`; everything else (masks, gates, criteria, allocation,
surgery, save/load, ONNX export) is generic over the Structure it returns. See
``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from vitopt.arch.structure import Structure

__all__ = ["Family"]


@runtime_checkable
class Family(Protocol):
    """What a model family provides (structural typing: families do not subclass it).

    Attributes:
        name: registry key written into ``arch.json`` (``"vit"``, ``"swin"``, ``"pvt_v2"``).
        description: one line naming the timm models it covers (shown when a model is rejected).
    """

    name: str
    description: str

    def matches(self, model: nn.Module) -> bool:
        """True when ``model`` is an instance of the timm class this family covers."""
        ...

    def check_supported(self, model: nn.Module) -> None:
        """Raise :class:`vitopt.errors.VitoptError` naming the module and feature this family cannot prune."""
        ...

    def read_dims(self, model: nn.Module) -> dict[str, int]:
        """Group name -> current number of units, e.g. ``{"embed": 384, "blocks.0.heads": 6, ...}``."""
        ...

    def structure(self, model: nn.Module) -> Structure:
        """The :class:`~vitopt.arch.structure.Structure` of ``model`` at its current dims."""
        ...

    def set_dims(self, model: nn.Module, dims: dict[str, int]) -> None:
        """Update module attributes (``num_heads``, ``in_features``, ...) after parameters were resized to ``dims``."""
        ...

    def fold_before_surgery(self, model: nn.Module, new_dims: dict[str, int]) -> None:
        """Fold dims-dependent constants into weights, in place, before surgery to ``new_dims``."""
        ...

    def constructor_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """``timm.create_model`` kwargs that rebuild ``model``'s skeleton (checked by :func:`vitopt.arch.config.save`)."""
        ...

    def num_tokens(self, model: nn.Module) -> int:
        """Tokens per image seen by the (first) blocks."""
        ...

    def macs(self, model: nn.Module, dims: dict[str, int]) -> dict[str, int]:
        """Multiply-accumulates of one image at ``dims``, by part, with ``"total"`` (FLOPs = 2 x MACs)."""
        ...
