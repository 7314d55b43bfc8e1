"""Latency lookup table (LUT): price ViT architectures in milliseconds measured on a target runtime.

Latency-aware pruning ranks units by importance per unit of *latency* saved, with latency read from a
table measured once on the deployment target: NViT (Yang et al., "Global Vision Transformer Pruning
with Hessian-Aware Saliency", CVPR 2023) and HALP (Shen et al., "Structural Pruning via
Latency-Saliency Knapsack", NeurIPS 2022). :class:`LatencyTable` is the table (one block on a grid of
its widths plus the stem/head per embedding width); :func:`cost_fn` turns it into the
``cost(dims) -> float`` that :func:`vitopt.pruning.allocation.allocate` takes. The table is measured
by :func:`vitopt.deploy.lut.measure_lut` (deploy measures, arch prices: the table is a cost model
like :class:`vitopt.arch.cost.CostModel`).

Grid and interpolation
----------------------
Grids hold ``grid_points`` values ``k / grid_points`` (k = 1..grid_points) of the model's current
widths: ``D`` and ``M`` rounded to multiples of 8, ``A`` to whole heads (multiples of ``head_dim``);
the largest point is the current width itself. :meth:`LatencyTable.latency_ms` sums, over blocks, a
trilinear interpolation of the block grid at ``(D, A_i, M_i)`` and adds the stem/head latency
linearly interpolated at ``D``. Coordinates outside a grid are **clamped** to its ends: below the
smallest grid point a width costs what the smallest measured one costs, above the largest what the
largest costs. Trilinear interpolation reproduces any function that is linear in each coordinate
(e.g. ``a + b*D + c*A + d*M``, or a block's MAC count) exactly inside the grid. Because of the
clamping, removing units below the smallest grid point (``1 / grid_points`` of the width) saves
nothing, so latency-driven allocation does not shrink a group below it: raise ``grid_points`` for
aggressive pruning.

Monotone repair: timing noise can make a wider probe measure faster than a narrower one, and
allocation needs a cost that never increases as units are removed. After measuring, a running
maximum is taken along each axis of the block grid in turn (D, then A, then M) and along the stem
vector (:func:`make_monotone`). The result is non-decreasing along every axis (a running max along
one axis keeps monotonicity along the axes already repaired), and trilinear interpolation of such a
grid, with clamping, is non-decreasing in each coordinate; so is the sum over blocks. The raw
measurements are kept in the table (``block_ms_raw``, ``stem_ms_raw``) for inspection. The repair
only ever raises values, so noise biases the table upwards a little (the dense corner becomes the
largest of all its dominated probes).
"""


from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from vitopt.arch.families import family_of
from vitopt.arch.structure import KEPT_UNITS_ATTR, removed_units
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_json, read_json

__all__ = ["LatencyTable", "cost_fn", "make_monotone", "grid_values", "LUT_FORMAT", "LUT_FORMAT_VERSION"]


#: ``format`` tag written into every table file.
LUT_FORMAT = "vitopt-latency-table"
#: Version of the JSON layout written by :meth:`LatencyTable.save` (2 added precision, target and
#: tensorrt_version; version-1 files still load, as fp32 tables of no particular target).
LUT_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


# ------------------------------------------------------------------------------------ grid helpers
def grid_values(n: int, points: int, step: int) -> list[int]:
    """Grid of ``points`` widths up to ``n``: ``k * n / points`` rounded to multiples of ``step``.

    Args:
        n: the largest width (the model's current width); always the last grid value.
        points: number of fractions ``k / points``, k = 1..points (>= 1).
        step: rounding multiple (8 for ``embed``/``mlp``, ``head_dim`` for attention width).

    Returns:
        Strictly increasing widths, each >= ``min(step, n)``, last == ``n``; fewer than ``points``
        values when rounding merges neighbours.

    >>> grid_values(384, 4, 8)
    [96, 192, 288, 384]
    >>> grid_values(384, 4, 64)
    [128, 192, 320, 384]
    """
    out = {n}
    for k in range(1, points):
        v = math.floor(n * k / points / step + 0.5) * step  # round half up
        out.add(min(max(v, min(step, n)), n))
    return sorted(out)


def make_monotone(grid: Any) -> np.ndarray:
    """Running maximum along every axis of ``grid``, in axis order: the smallest non-decreasing majorant.

    Used on measured latencies to remove timing noise (a wider probe that happened to time faster),
    so the LUT's cost never increases when units are removed (HALP and NViT rank by latency saved).

    Args:
        grid: array-like of any shape (``[nD, nA, nM]`` block grid, ``[nD]`` stem vector), in ms.

    Returns:
        float64 array of the same shape, non-decreasing along every axis and >= ``grid`` everywhere;
        a grid that already is non-decreasing comes back unchanged.
    """
    out = np.array(grid, dtype=np.float64, copy=True)
    for axis in range(out.ndim):
        out = np.maximum.accumulate(out, axis=axis)
    return out


def _bracket(values: Sequence[int], x: float) -> tuple[int, int, float]:
    """Indices (i0, i1) around ``x`` in sorted ``values`` and the weight of i1; x is clamped to the ends."""
    if x <= values[0]:
        return 0, 0, 0.0
    if x >= values[-1]:
        last = len(values) - 1
        return last, last, 0.0
    i1 = bisect.bisect_right(values, x)
    i0 = i1 - 1
    return i0, i1, (x - values[i0]) / (values[i1] - values[i0])


# ------------------------------------------------------------------------------------ the table
@dataclass
class LatencyTable:
    """A latency lookup table of one ViT model family member on one runtime (NViT, HALP).

    All latencies are milliseconds per call (one batch of ``batch_size`` images; ``statistic`` of
    ``repeats`` timed calls after ``warmup`` untimed ones).

    Attributes:
        runtime: runtime kind it was measured with (``"onnxruntime"``, ``"pytorch"``, ``"tensorrt"``).
        device: the hardware, in words (CPU model and core count, or the CUDA device name).
        threads: intra-op CPU threads the runtime used.
        batch_size: images per call.
        num_tokens: sequence length ``N`` the blocks saw (patches + prefix tokens).
        depth: number of transformer blocks of the model.
        head_dim: per-head width used to build attention probes (attention is priced by ``A``).
        embed_grid: ``D`` values, strictly increasing, length ``nD``.
        attn_grid: ``A = heads * head_dim`` values, strictly increasing, length ``nA``.
        mlp_grid: ``M`` values, strictly increasing, length ``nM``.
        block_ms: ``[nD][nA][nM]`` latency of one block (call overhead removed), monotone-repaired.
        stem_ms: ``[nD]`` latency of everything but the blocks at each ``D``, monotone-repaired.
        block_ms_raw, stem_ms_raw: the same before overhead removal and repair (as measured).
        call_overhead_ms: the null probe's latency, subtracted from every raw block latency.
        model_name, model_kwargs: the timm model it was measured for (metadata; may be None / {}).
        model_dims: the dims of the measured model (``read_dims``), e.g. the dense model's.
        reference_ms: measured whole-model latency at ``model_dims`` on the same runtime, if known.
        torch_version, onnxruntime_version: library versions (onnxruntime None when not installed).
        exporter: ONNX exporter used for the probes (None for the pytorch runtime).
        warmup, repeats: timing settings.
        statistic: which summary of a probe's timed calls is its latency (``"min"``, ``"p50"``, ``"mean"``).
        measure_seconds: wall time :func:`measure_lut` took.
        date: ISO-8601 UTC time of the measurement.
        precision: the precision the probes ran in (``"fp32"``, ``"fp16"``...; TensorRT engine precision).
        target: the deployment target profile it was measured for (``"h100"``), or None (the host).
        tensorrt_version: TensorRT version of the probe engines (``runtime="tensorrt"``), else None.
    """

    runtime: str
    device: str
    threads: int
    batch_size: int
    num_tokens: int
    depth: int
    head_dim: int
    embed_grid: list[int]
    attn_grid: list[int]
    mlp_grid: list[int]
    block_ms: list[list[list[float]]]
    stem_ms: list[float]
    block_ms_raw: list[list[list[float]]] | None = None
    stem_ms_raw: list[float] | None = None
    call_overhead_ms: float = 0.0
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model_dims: dict[str, int] = field(default_factory=dict)
    reference_ms: float | None = None
    torch_version: str = ""
    onnxruntime_version: str | None = None
    exporter: str | None = None
    warmup: int = 0
    repeats: int = 0
    statistic: str = "min"
    measure_seconds: float = 0.0
    date: str = ""
    precision: str = "fp32"
    target: str | None = None
    tensorrt_version: str | None = None

    def __post_init__(self) -> None:
        self._check()

    # ------------------------------------------------------------------------------- validation
    def _check(self) -> None:
        """Raise ValueError when grids and values are inconsistent (the loader rewraps it)."""
        for name in ("embed_grid", "attn_grid", "mlp_grid"):
            g = getattr(self, name)
            if not g or any(int(v) != v or v < 1 for v in g) or any(b <= a for a, b in zip(g, g[1:])):
                raise ValueError(f"{name} must be a non-empty, strictly increasing list of positive integers")
            setattr(self, name, [int(v) for v in g])
        arr = np.asarray(self.block_ms, dtype=np.float64)
        shape = (len(self.embed_grid), len(self.attn_grid), len(self.mlp_grid))
        if arr.shape != shape:
            raise ValueError(f"block_ms has shape {list(arr.shape)}, expected {list(shape)} from the grids")
        stem = np.asarray(self.stem_ms, dtype=np.float64)
        if stem.shape != (len(self.embed_grid),):
            raise ValueError(f"stem_ms has shape {list(stem.shape)}, expected [{len(self.embed_grid)}]")
        if not (np.isfinite(arr).all() and np.isfinite(stem).all()) or (arr < 0).any() or (stem < 0).any():
            raise ValueError("block_ms and stem_ms must be finite and >= 0")
        for name in ("threads", "batch_size", "num_tokens", "depth", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer")
            setattr(self, name, int(v))
        self.block_ms = arr.tolist()
        self.stem_ms = stem.tolist()
        self.model_dims = {str(k): int(v) for k, v in dict(self.model_dims).items()}
        self._blk = self.block_ms  # nested lists: fastest scalar indexing in the hot path

    # ------------------------------------------------------------------------------- lookups
    def block_latency_ms(self, embed: float, attn: float, mlp: float) -> float:
        """Latency of one block at widths (D, A, M), ms: trilinear interpolation, clamped to the grid.

        Args:
            embed: embedding width ``D``.
            attn: attention width ``A = heads * head_dim``.
            mlp: MLP hidden width ``M``.
        """
        d0, d1, wd = _bracket(self.embed_grid, embed)
        a0, a1, wa = _bracket(self.attn_grid, attn)
        m0, m1, wm = _bracket(self.mlp_grid, mlp)
        g = self._blk

        def along_m(i: int, j: int) -> float:
            row = g[i][j]
            return row[m0] + wm * (row[m1] - row[m0])

        def along_a(i: int) -> float:
            lo = along_m(i, a0)
            return lo + wa * (along_m(i, a1) - lo)

        lo = along_a(d0)
        return lo + wd * (along_a(d1) - lo)

    def stem_latency_ms(self, embed: float) -> float:
        """Latency of everything but the blocks at embedding width ``embed``, ms (linear, clamped)."""
        i0, i1, w = _bracket(self.embed_grid, embed)
        return self.stem_ms[i0] + w * (self.stem_ms[i1] - self.stem_ms[i0])

    def latency_ms(self, dims: dict[str, int]) -> float:
        """Predicted whole-model latency at ``dims``, ms per call of ``batch_size`` images.

        Sum over the ``depth`` blocks of :meth:`block_latency_ms` at ``(D, heads_i * head_dim_i,
        mlp_i)`` plus :meth:`stem_latency_ms` at ``D``; blocks removed at ``dims`` (depth,
        :func:`vitopt.arch.structure.removed_units`) are skipped. Non-decreasing in every coordinate
        (monotone-repaired grid, trilinear weights, clamping).

        Args:
            dims: ``{"embed": D, "blocks.i.heads": h, "blocks.i.head_dim": d, "blocks.i.mlp": m}``
                for every block i < ``depth`` (as ``VitFamily.read_dims`` returns).

        Raises:
            VitoptError: a required key is missing (use :func:`cost_fn` to fill unchanged groups).
        """
        try:
            D = dims["embed"]
            total = self.stem_latency_ms(D)
            gone = removed_units({"blocks": [f"blocks.{i}" for i in range(self.depth)]}, dims)
            for i in range(self.depth):
                if f"blocks.{i}" in gone:                 # depth: a removed block costs nothing
                    continue
                p = f"blocks.{i}."
                total += self.block_latency_ms(D, dims[p + "heads"] * dims[p + "head_dim"], dims[p + "mlp"])
        except KeyError as exc:
            raise VitoptError(f"dims lack {exc.args[0]!r}; LatencyTable.latency_ms needs 'embed' and every block's "
                              f"heads, head_dim and mlp for {self.depth} blocks (cost_fn(table, model) fills "
                              "unchanged groups).") from None
        return float(total)

    @property
    def predicted_model_ms(self) -> float | None:
        """:meth:`latency_ms` at ``model_dims`` (the measured model), or None when those are unknown."""
        return self.latency_ms(self.model_dims) if self.model_dims else None

    def check_for(self, target: str | None, precision: str | None = None, where: str = "the latency table") -> None:
        """Refuse to price a model for ``target`` / ``precision`` with a table measured for others.

        A table with no recorded target (a host measurement, or a version-1 file) is accepted for any
        target; a table of one target prices nothing else (TensorRT milliseconds of an Orin say
        nothing about an H100).

        Raises:
            VitoptError: the recorded target or precision differs from the one asked for.
        """
        if target is not None and self.target is not None and self.target != target:
            raise VitoptError(f"{where} was measured for target {self.target} ({self.runtime}, {self.device}) but the "
                              f"model is pruned for {target}; measure one there (vitopt measure-lut --runtime tensorrt "
                              f"--target {target}).")
        if (target is not None and precision is not None and self.target is not None
                and self.precision != precision):
            raise VitoptError(f"{where} was measured at {self.precision} but the model is pruned for {precision} on "
                              f"{target}; measure one at that precision (--precision {precision}).")

    # ------------------------------------------------------------------------------- files
    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`save` writes (``format``, ``format_version`` and every field)."""
        return {"format": LUT_FORMAT, "format_version": LUT_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, obj: Any, where: str = "latency table") -> LatencyTable:
        """Parse :meth:`to_json`'s object.

        Raises:
            VitoptError: ``obj`` is not a version-1 vitopt latency table; the sentence names ``where``.
        """
        if not isinstance(obj, dict) or obj.get("format") != LUT_FORMAT:
            raise VitoptError(f"{where} is not a vitopt latency table (no \"format\": \"{LUT_FORMAT}\"); "
                              "write one with `vitopt measure-lut`.")
        if obj.get("format_version") not in _READABLE_VERSIONS:
            raise VitoptError(f"{where} has latency-table format_version {obj.get('format_version')!r}; this vitopt "
                              f"reads versions {', '.join(map(str, _READABLE_VERSIONS))}.")
        fields = {k: v for k, v in obj.items() if k not in ("format", "format_version")}
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise VitoptError(f"{where} is not a valid vitopt latency table ({exc}).") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON to ``path`` atomically (temp file + rename); returns the path."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by :meth:`save`.

        Raises:
            VitoptError: the file is missing, not JSON, or not a valid latency table (names the file).
        """
        return cls.from_json(read_json(path, "latency table"), f"latency table {path}")


# ------------------------------------------------------------------------------------ allocation
def cost_fn(table: LatencyTable, model: nn.Module) -> Callable[[dict[str, int]], float]:
    """Adapter for :func:`vitopt.pruning.allocation.allocate`: ``dims -> predicted latency (ms)``.

    Groups absent from ``dims`` keep ``model``'s current size (as :class:`vitopt.arch.cost.CostModel`
    does), so allocation may pass partial dims. Latency-aware allocation as in NViT (Yang et al.,
    CVPR 2023) and HALP (Shen et al., NeurIPS 2022).

    Args:
        table: a LUT measured for this model (or one with the same token count and depth), or for the
            model it was depth-pruned from: a model whose kept blocks are recorded (``vitopt_kept_units``,
            see :func:`vitopt.arch.config.drop_units`) within the table's depth is priced with the table's
            blocks beyond its own depth removed (a block's latency depends on its widths, not its index).
        model: the timm VisionTransformer being pruned.

    Returns:
        ``cost(dims) -> float`` in milliseconds per call of ``table.batch_size`` images.

    Raises:
        VitoptError: the model is not a supported ViT, or the table was measured for another token
            count ``N`` or depth.
    """
    fam = family_of(model)
    n, depth = fam.num_tokens(model), len(model.blocks)
    kept = (getattr(model, KEPT_UNITS_ATTR, None) or {}).get("blocks")
    cut_from_table = bool(kept) and len(kept) == depth and table.depth > max(kept)
    if table.num_tokens != n or (table.depth != depth and not cut_from_table):
        raise VitoptError(f"the latency table was measured for {table.depth} blocks at {table.num_tokens} tokens, "
                          f"but the model has {depth} blocks at {n} tokens; measure a table for this model "
                          "(vitopt measure-lut).")
    # a fixed head_dim (Eva under RoPE) is no group but the table still prices heads x head_dim
    base = {**{f"blocks.{i}.head_dim": int(blk.attn.head_dim) for i, blk in enumerate(model.blocks)},
            **fam.read_dims(model), **{f"blocks.{i}": 0 for i in range(depth, table.depth)}}

    def cost(dims: dict[str, int]) -> float:
        return table.latency_ms({**base, **dims})

    return cost
