"""Groups of coupled slices: the one description of what can be pruned in a model.

A structured unit (one head, one head-dim index, one MLP neuron, one embedding channel) lives in
several tensors at once. A :class:`Structure` lists, for a concrete model:

* its :class:`Group` s (``blocks.3.heads`` with 6 units, ``embed`` with 384 units, ...);
* for every parameter axis the groups touch, an :class:`AxisLayout`: how that axis factorises into
  unit factors. ``blocks.0.attn.qkv.weight`` axis 0 is ``(3) x (heads) x (head_dim)``; axis 1 is
  ``(embed)``. Slicing, resizing, importance and cost are all computed from these layouts alone;
* for every group its :class:`ChokePoint` s: the module inputs/outputs where multiplying by one value
  per unit applies a gate or a hard mask with the same effect as removing the unit (docs/architecture.md,
  "The Structure");
* for the residual width, the LayerNorms whose statistics must be taken over kept channels when the
  group is masked rather than removed.

Everything downstream (masks, gates, importance, allocation, surgery) is generic over this list.
The layout idea follows the dependency groups of Torch-Pruning (Fang et al., CVPR 2023,
arXiv 2301.12900), made explicit and static per model family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vitopt.errors import VitoptError

__all__ = ["Group", "AxisLayout", "ChokePoint", "Structure", "Factor", "GROUP_KINDS", "UNIT_KINDS", "removed_units",
           "KEPT_UNITS_ATTR", "skeleton_depth"]

#: The kinds of group a family may declare, in the order tables print them. ``blocks`` is depth: one
#: unit per transformer block (see :attr:`Structure.units`).
GROUP_KINDS = ("embed", "heads", "head_dim", "mlp", "blocks")

#: Group kinds whose units are whole modules (removed from their container by surgery, not sliced).
UNIT_KINDS = ("blocks",)

#: attribute of a depth-pruned model: group -> indices of its kept units (blocks) in the model it was cut
#: from (set by :func:`vitopt.arch.config.drop_units`, written to ``arch.json`` as ``kept_units``).
KEPT_UNITS_ATTR = "vitopt_kept_units"

#: One factor of an axis: (group name, size), or (None, size) for a fixed factor that is never pruned
#: (e.g. the 3 of q/k/v in a fused qkv projection).
Factor = tuple["str | None", int]


@dataclass(frozen=True)
class Group:
    """A set of interchangeable structured units pruned together.

    Attributes:
        name: unique key, e.g. ``"blocks.3.heads"`` or ``"embed"``.
        kind: one of :data:`GROUP_KINDS`.
        block: transformer block index (counted over the whole model, across stages), or None for
            groups that span blocks (``embed``, or a hierarchical model's per-stage ``stages.1.embed``).
        size: current number of units.
        stage: stage index of a hierarchical model (Swin, PVTv2), or None for single-stage models (ViT).
    """

    name: str
    kind: str
    block: int | None
    size: int
    stage: int | None = None


@dataclass(frozen=True)
class AxisLayout:
    """How one axis of one parameter factorises into unit factors (row-major).

    Example: ``AxisLayout("blocks.0.attn.qkv.weight", 0, ((None, 3), ("blocks.0.heads", 6),
    ("blocks.0.head_dim", 64)))`` says the 1152 rows are laid out as [qkv][head][head_dim].
    The product of the factor sizes equals the axis length.
    """

    param: str
    axis: int
    factors: tuple[Factor, ...]

    @property
    def length(self) -> int:
        return math.prod(s for _, s in self.factors)

    def groups(self) -> list[str]:
        return [g for g, _ in self.factors if g is not None]

    def index(self, keep: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flat indices (int64, sorted) along the axis that survive when each group keeps ``keep[g]``.

        Groups absent from ``keep`` keep all their units.
        """
        idx = torch.zeros(1, dtype=torch.long)
        for g, size in self.factors:
            sel = keep[g] if (g is not None and g in keep) else torch.arange(size)
            idx = (idx[:, None] * size + sel[None, :].long()).reshape(-1)
        return idx

    def new_length(self, sizes: dict[str, int]) -> int:
        """Axis length after each group ``g`` is resized to ``sizes[g]`` (absent groups unchanged)."""
        return math.prod(sizes.get(g, s) if g is not None else s for g, s in self.factors)

    def expand(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-element multiplier of length :attr:`length` from per-unit values (outer product).

        Groups absent from ``values`` (and fixed factors) contribute ones.
        """
        ref = next((values[g] for g, _ in self.factors if g is not None and g in values), None)
        kw = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
        out = None
        for g, size in self.factors:
            v = values.get(g) if g is not None else None
            v = torch.ones(size, **kw) if v is None else v
            out = v if out is None else (out[:, None] * v[None, :]).reshape(-1)
        return out

    def reduce(self, tensor: torch.Tensor, group: str) -> torch.Tensor:
        """Sum ``tensor`` (shaped like the parameter) over everything except ``group``'s factor.

        Returns a vector with one entry per unit of ``group``. Used by importance criteria.
        """
        t = tensor.movedim(self.axis, 0)
        t = t.reshape(*[s for _, s in self.factors], -1)
        pos = [g for g, _ in self.factors].index(group)
        dims = [d for d in range(t.dim()) if d != pos]
        return t.sum(dim=dims)


@dataclass(frozen=True)
class ChokePoint:
    """A place where one value per unit, multiplied in, acts like keeping/removing the unit.

    Attributes:
        module: dotted module name (``blocks.0.attn.proj``).
        side: ``"input"`` (multiply the module's first positional input along its last dim) or
            ``"output"`` (multiply its output along the last dim).
        factors: layout of that last dim, as in :class:`AxisLayout`.
        unit: for a group whose units are whole modules (kind ``blocks``): the one unit this choke
            point belongs to; the module's input/output is then multiplied by that unit's value alone
            (a scalar, broadcast), and ``factors`` is unused. None for width groups.
    """

    module: str
    side: Literal["input", "output"]
    factors: tuple[Factor, ...]
    unit: int | None = None

    def multiplier(self, group: str, value: torch.Tensor) -> torch.Tensor:
        """What the choke point multiplies into the last dim: ``value`` (shape ``[group size]``) expanded
        over :attr:`factors` (shape ``[L]``), or, for a unit choke point, ``value[unit]`` as shape ``[1]``
        (broadcast over the last dim)."""
        if self.unit is not None:
            return value[self.unit:self.unit + 1]
        return AxisLayout(self.module, -1, self.factors).expand({group: value})


@dataclass
class Structure:
    """The prunable groups of one concrete model and every tensor slice coupled to them.

    Built by a family (:mod:`vitopt.arch.families`) from a live model; it describes the model's
    *current* dims, so rebuild it after surgery.

    Attributes:
        family: family key, e.g. ``"vit"``.
        groups: name -> :class:`Group`, in a stable order (embed first, then block by block).
        layouts: every coupled parameter axis.
        chokes: group name -> choke points where gates / hard masks act.
        norms: group name -> LayerNorm modules that normalise over that group's units (the residual
            width; also an MLP's hidden norm, qk_norm over head_dim, an attention-output norm over heads
            and head_dim); masked simulation recomputes their statistics over kept units.
        norm_factors: LayerNorm module -> layout of its normalised dim, for a LayerNorm whose width is
            not just its group's units. Swin's PatchMerging norm spans ``4 x C`` channels of the
            previous stage, ``((None, 4), ("layers.0.embed", C))``. A LayerNorm absent from this map
            normalises exactly the units of the group it is listed under in ``norms``.
        units: for a group whose units are whole modules (kind ``blocks``, depth pruning): the dotted
            path of each unit's module, in unit order. The group's name is the path of the
            ``nn.Sequential`` / ``nn.ModuleList`` holding them and unit ``i`` is ``f"{group}.{i}"``
            (``"blocks.3"``). Surgery removes dropped units from the container (the residual stream
            passes through: a removed block is the identity); costs price removed units by the key
            convention of :func:`removed_units`.
    """

    family: str
    groups: dict[str, Group]
    layouts: list[AxisLayout]
    chokes: dict[str, list[ChokePoint]] = field(default_factory=dict)
    norms: dict[str, list[str]] = field(default_factory=dict)
    norm_factors: dict[str, tuple[Factor, ...]] = field(default_factory=dict)
    units: dict[str, list[str]] = field(default_factory=dict)
    #: group kind -> the sentence saying why this model has no groups of that kind although its family
    #: prunes it elsewhere (Eva's head_dim under RoPE); :func:`vitopt.pruning.importance.select_groups` raises it.
    fixed_kinds: dict[str, str] = field(default_factory=dict)
    #: the :class:`vitopt.arch.cost.CostModel` of the model this Structure describes, set by
    #: :func:`vitopt.arch.cost.structure_of` (``vitopt.structure``); None for a bare family Structure.
    cost_model: Any = field(default=None, repr=False, compare=False)

    def of_kind(self, *kinds: str) -> list[Group]:
        """Groups whose kind is in ``kinds``, in structure order."""
        return [g for g in self.groups.values() if g.kind in kinds]

    def sizes(self) -> dict[str, int]:
        """Group name -> current number of units."""
        return {name: g.size for name, g in self.groups.items()}

    def stages(self) -> list[int]:
        """Stage indices of a hierarchical model, sorted (``[]`` for single-stage models)."""
        return sorted({g.stage for g in self.groups.values() if g.stage is not None})

    def layouts_of(self, group: str) -> list[AxisLayout]:
        """Every parameter axis that ``group`` appears in."""
        return [lay for lay in self.layouts if group in lay.groups()]

    # ------------------------------------------------------------------------------------ costs
    def _costs(self) -> Any:
        if self.cost_model is None:
            raise VitoptError("this Structure carries no cost model; build it with vitopt.structure(model) "
                              "(vitopt.arch.cost.structure_of).")
        return self.cost_model

    def cost(self, metric: str = "flops", dims: dict[str, int] | None = None) -> float:
        """Cost of one image at ``dims`` (default: the current dims) in ``metric``: ``"flops"`` (2 x MACs),
        ``"macs"`` or ``"params"``.

        Raises:
            VitoptError: the Structure has no cost model (see :attr:`cost_model`).
        """
        return float(self._costs()(metric, dict(dims or {})))

    def unit_costs(self) -> dict[str, dict[str, float]]:
        """group -> ``{"flops", "params"}`` saved by removing ONE unit of it at the current dims.

        Raises:
            VitoptError: the Structure has no cost model.
        """
        cm = self._costs()
        base = self.sizes()
        full = {m: cm(m, base) for m in ("flops", "params")}
        out = {}
        for name, g in self.groups.items():
            smaller = {**base, name: g.size - 1}
            out[name] = {m: full[m] - cm(m, smaller) for m in ("flops", "params")}
        return out

    def table(self) -> str:
        """A plain-text table: one row per group (name, kind, stage, block, size, MFLOPs and params per
        unit), then the model's total MFLOPs and params. FLOPs = 2 x MACs of one image."""
        costs = self.unit_costs() if self.cost_model is not None else {}
        rows = [("group", "kind", "stage", "block", "units", "MFLOPs/unit", "params/unit")]
        for name, g in self.groups.items():
            c = costs.get(name)
            rows.append((name, g.kind, "-" if g.stage is None else str(g.stage), "-" if g.block is None else str(g.block),
                         str(g.size), f"{c['flops'] / 1e6:.3f}" if c else "-", f"{c['params']:.0f}" if c else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.cost_model is not None:
            lines.append(f"total: {self.cost('flops') / 1e6:.2f} MFLOPs (2 x MACs, one image), "
                         f"{self.cost('params') / 1e6:.4f} M params")
        return "\n".join(lines)

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for g in self.groups.values():
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
        head = (f"Structure(family={self.family!r}, {len(self.groups)} groups: "
                + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")")
        return head + "\n" + self.table()


def removed_units(units: dict[str, list[str]], dims: dict[str, int]) -> set[str]:
    """Module paths of the whole-module units (kind ``blocks``) removed at ``dims``.

    The cost convention for depth: ``dims[path] == 0`` marks unit ``path`` removed (``{"blocks": 10,
    "blocks.3": 0, "blocks.7": 0}``); allocation and :meth:`vitopt.arch.plan.KeepPlan.cost_dims` name
    the removed units this way, because which blocks go matters once blocks differ in width. When
    ``dims[group]`` is smaller than the number of units not marked, the last unmarked units are removed
    too (count-only dims, e.g. ``Structure.unit_costs``: one block less prices the last block).

    Args:
        units: ``Structure.units`` (group -> unit module paths).
        dims: group sizes, optionally with unit keys.

    Returns:
        The removed unit paths (empty when ``dims`` removes none).
    """
    out: set[str] = set()
    for group, paths in units.items():
        kept = [p for p in paths if dims.get(p, 1) != 0]
        out.update(p for p in paths if dims.get(p, 1) == 0)
        extra = len(kept) - int(dims.get(group, len(paths)))
        if extra > 0:
            out.update(kept[len(kept) - extra:])
    return out


def skeleton_depth(model: Any, group: str, current: int) -> int:
    """Blocks a rebuilt skeleton needs in ``group`` so that every kept block sits at its original index.

    ``current`` (the blocks the model has) when it was never depth-pruned, else ``max(kept) + 1``: the
    smallest model whose blocks ``kept`` are the ones this model kept. Families use it in
    ``constructor_kwargs`` so that position-dependent blocks (Swin's shifted windows alternate by index)
    come back at their positions; loading then drops the others (:func:`vitopt.arch.config.resize_to`).
    """
    kept = (getattr(model, KEPT_UNITS_ATTR, None) or {}).get(group)
    return int(max(kept)) + 1 if kept else int(current)
