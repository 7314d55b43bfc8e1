"""Latency lookup table (LUT): price ViT architectures in milliseconds measured on a target runtime.

Latency-aware pruning ranks units by importance per unit of *latency* saved, with latency read from a
table measured once on the deployment target: NViT (Yang et al., "Global Vision Transformer Pruning
with Hessian-Aware Saliency", CVPR 2023) and HALP (Shen et al., "Structural Pruning via
Latency-Saliency Knapsack", NeurIPS 2022). :func:`measure_lut` builds such a table for a timm
``VisionTransformer``; :func:`cost_fn` turns it into the ``cost(dims) -> float`` that
:func:`vitopt.pruning.allocation.allocate` takes.

What is measured
----------------
* **One transformer block alone** on a 3-D grid of its widths: embedding width ``D``
  (``embed``), attention width ``A = heads * head_dim`` and MLP hidden width ``M``, at the
  model's token count ``N`` (patches + prefix tokens) and the table's batch size. Each probe is a
  1-block copy of the model (same timm ``Block`` class, qkv bias, LayerScale, norm eps, activation,
  ``fused_attn`` flag) resized with :func:`vitopt.arch.config.resize_to` to
  ``embed = D, heads = A / head_dim, head_dim = head_dim, mlp = M``, where ``head_dim`` is the
  model's (largest) head dim; this is the module ``timm``'s ``Attention(dim=D, num_heads=h,
  attn_head_dim=head_dim)`` builds. The LUT therefore prices attention by ``A`` only: pruning a
  head and pruning ``head_dim`` by the same total width cost the same (matmul FLOPs agree exactly;
  kernel efficiency at a smaller ``head_dim`` may differ a little).
* The probe wraps the block as ``[B, 1, 1, D] -> expand to [B, N, D] -> Block -> mean over tokens
  -> [B, D]`` so that only ``B * D`` floats cross the host/device boundary per call (a probe that
  took and returned the full ``[B, N, D]`` token tensor would count that transfer once per block on
  a GPU). The fixed cost of one call (runtime dispatch, the expand and the mean) is measured once on
  a *null probe* (the same wrapper without a block, at the largest ``D``) and subtracted from every
  block measurement (clamped at 0), so that a model's blocks plus its stem/head count that cost once,
  as a whole-model call does.
* **Stem and head** (patch embedding, class/distillation/register tokens, position embedding, the
  final norm and the classifier heads: everything but the blocks) per ``D``, measured as a copy of
  the model with no blocks, resized to ``embed = D``, fed real images.

Every probe is exported to ONNX (:func:`vitopt.deploy.onnx_export.export_onnx` with
``simplify=False, verify=False``) for the ``onnxruntime`` runtime, or run eagerly by the
``pytorch`` runtime (on CPU, or on CUDA with ``device="cuda"``, synchronised per call), and timed
with :func:`vitopt.deploy.latency.measure_latency`. A probe's latency is, by default, the **minimum**
over its timed calls (``statistic="min"``; ``"p50"`` and ``"mean"`` are available). Interference from
other processes only ever adds time, so the minimum is the most reproducible estimate of what the
kernels cost (the advice of Python's ``timeit`` docs) and on a quiet target it is close to the
median. Measured on this project's loaded 2-core machine (tiny ViT, 8 repeated measurements,
``repeats=3``): predicted/measured whole-model latency ranged 0.67-2.0 with ``"min"`` but 1.5-12
with ``"p50"``; for DeiT-S (grid 3, ``repeats=20``, load average 3-6) 0.54-1.3 over four runs with
``"min"`` and 0.97-1.74 over three with ``"p50"``. The spread comes from the load changing between
measurements; under heavy load a long whole-model call is preempted more often than a short probe,
so the table then tends to under-predict. Probes and models are timed in float32.

Exporter (measured on this project's 2-core CPU machine, torch 2.14.1, one DeiT-S block): the legacy
TorchScript exporter takes ~0.2-0.4 s per probe and the dynamo exporter ~2.3-3.3 s (a full DeiT-S:
3.6 s vs 12 s), while onnxruntime runs both graphs of a block equally fast (18.0 vs 18.7 ms p50 in
one round, 33.3 vs 32.7 ms in the next, under load). Probes therefore use ``exporter="torchscript"``
by default, falling back to dynamo if the TorchScript exporter fails (it is deprecated by PyTorch);
``exporter="dynamo"`` builds the graphs exactly as the ``export`` stage does, ~10x slower.

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
import contextlib
import copy
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitopt.errors import VitoptError
from vitopt.io import atomic_write_json, read_json

__all__ = ["LatencyTable", "measure_lut", "measure_model_latency", "cost_fn", "make_monotone", "grid_values",
           "LUT_FORMAT", "LUT_FORMAT_VERSION", "PROBE_EXPORTERS"]

log = logging.getLogger(__name__)

#: ``format`` tag written into every table file.
LUT_FORMAT = "vitopt-latency-table"
#: Version of the JSON layout written by :meth:`LatencyTable.save`.
LUT_FORMAT_VERSION = 1
#: ``statistic`` values: which summary of a probe's timed calls is its latency (measure_latency keys).
STATISTICS = {"p50": "p50_ms", "min": "min_ms", "mean": "mean_ms"}
#: ``exporter`` values :func:`measure_lut` accepts for the onnxruntime runtime.
PROBE_EXPORTERS = ("torchscript", "dynamo")


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
        runtime: runtime kind it was measured with (``"onnxruntime"``, ``"pytorch"``).
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
        mlp_i)`` plus :meth:`stem_latency_ms` at ``D``. Non-decreasing in every coordinate
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
            for i in range(self.depth):
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

    # ------------------------------------------------------------------------------- files
    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`save` writes (``format``, ``format_version`` and every field)."""
        return {"format": LUT_FORMAT, "format_version": LUT_FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, obj: Any, where: str = "latency table") -> "LatencyTable":
        """Parse :meth:`to_json`'s object.

        Raises:
            VitoptError: ``obj`` is not a version-1 vitopt latency table; the sentence names ``where``.
        """
        if not isinstance(obj, dict) or obj.get("format") != LUT_FORMAT:
            raise VitoptError(f"{where} is not a vitopt latency table (no \"format\": \"{LUT_FORMAT}\"); "
                              "write one with `vitopt measure-lut`.")
        if obj.get("format_version") != LUT_FORMAT_VERSION:
            raise VitoptError(f"{where} has latency-table format_version {obj.get('format_version')!r}; this vitopt "
                              f"reads version {LUT_FORMAT_VERSION}.")
        fields = {k: v for k, v in obj.items() if k not in ("format", "format_version")}
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise VitoptError(f"{where} is not a valid vitopt latency table ({exc}).") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON to ``path`` atomically (temp file + rename); returns the path."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
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
        table: a LUT measured for this model (or one with the same token count and depth).
        model: the timm VisionTransformer being pruned.

    Returns:
        ``cost(dims) -> float`` in milliseconds per call of ``table.batch_size`` images.

    Raises:
        VitoptError: the model is not a supported ViT, or the table was measured for another token
            count ``N`` or depth.
    """
    from vitopt.arch.families import family_of

    fam = family_of(model)
    n, depth = fam.num_tokens(model), len(model.blocks)
    if table.num_tokens != n or table.depth != depth:
        raise VitoptError(f"the latency table was measured for {table.depth} blocks at {table.num_tokens} tokens, "
                          f"but the model has {depth} blocks at {n} tokens; measure a table for this model "
                          "(vitopt measure-lut).")
    base = fam.read_dims(model)

    def cost(dims: dict[str, int]) -> float:
        return table.latency_ms({**base, **dims})

    return cost


# ------------------------------------------------------------------------------------ probes
class _BlockProbe(nn.Module):
    """``[B, 1, 1, D] -> expand [B, N, D] -> block -> mean over tokens [B, D]`` (block=None: null probe)."""

    def __init__(self, block: nn.Module | None, num_tokens: int) -> None:
        super().__init__()
        self.block = block if block is not None else nn.Identity()
        self.num_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d = x.shape[0], x.shape[-1]
        tokens = x.reshape(b, 1, d).expand(b, self.num_tokens, d)
        return self.block(tokens).mean(dim=1)


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    pe = model.patch_embed
    h, w = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
    return int(pe.proj.in_channels), int(h), int(w)


@torch.no_grad()
def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite uninitialised storage from resize_to: LayerNorm (1, 0), everything else N(0, 0.02).

    Values do not change dense kernel timings, but garbage memory can hold NaN/denormal floats,
    which are slow on CPUs.
    """
    gen = torch.Generator().manual_seed(seed)
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.LayerNorm):
                p.fill_(1.0 if name == "weight" else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(p))
    return module.eval()


def _skeleton(model: nn.Module) -> nn.Module:
    """A CPU float32 copy of ``model`` keeping only its first block (copies no other block)."""
    blocks = model.blocks
    model.blocks = nn.Sequential(blocks[0])
    try:
        skel = copy.deepcopy(model)
    finally:
        model.blocks = blocks
    return skel.float().cpu().eval()


def _block_probe(skel: nn.Module, D: int, heads: int, head_dim: int, M: int, num_tokens: int) -> nn.Module:
    from vitopt.arch.config import resize_to

    m = copy.deepcopy(skel)
    resize_to(m, {"embed": D, "blocks.0.heads": heads, "blocks.0.head_dim": head_dim, "blocks.0.mlp": M})
    return _BlockProbe(_randomise(m.blocks[0]), num_tokens).eval()


def _stem_probe(skel: nn.Module, D: int) -> nn.Module:
    from vitopt.arch.config import resize_to

    m = copy.deepcopy(skel)
    m.blocks = nn.Sequential()
    resize_to(m, {"embed": D})
    return _randomise(m)


def _device_string(runtime: str, device: str) -> str:
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else "CUDA (unavailable)"
        return f"{name} ({device})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical cores"


def _ort_version() -> str | None:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except Exception:
        return None


@contextlib.contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """Hide export_onnx's per-file opset notices while dozens of probes are exported."""
    lg = logging.getLogger("vitopt.deploy.onnx_export")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


class _Timer:
    """Times probe modules on one runtime; owns the temp folder for ONNX files."""

    def __init__(self, runtime: str, *, device: str, threads: int, batch_size: int, warmup: int, repeats: int,
                 exporter: str, tmp: Path, statistic: str = "min") -> None:
        self.runtime, self.device, self.threads, self.statistic = runtime, device, threads, statistic
        self.batch_size, self.warmup, self.repeats = batch_size, warmup, repeats
        self.exporter, self.tmp, self.count = exporter, tmp, 0

    def __call__(self, module: nn.Module, input_shape: tuple[int, int, int]) -> float:
        """Latency (ms per call, ``statistic``) of ``module`` on ``[batch_size, *input_shape]`` float32 inputs."""
        from vitopt.deploy.latency import measure_latency
        from vitopt.deploy.runtimes import make_runtime

        options: dict[str, Any] = {}
        if self.runtime == "onnxruntime":
            path = self.tmp / f"probe{self.count}.onnx"
            self.count += 1
            self._export(module, path, input_shape)
            if str(self.device).startswith("cuda"):
                options["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            rt = make_runtime("onnxruntime", onnx_path=path, threads=self.threads, **options)
        else:
            if self.runtime == "pytorch":
                options["device"] = self.device
            rt = make_runtime(self.runtime, model=module, threads=self.threads, **options)
        try:
            res = measure_latency(rt, input_shape, [self.batch_size], warmup=self.warmup, repeats=self.repeats,
                                  sync=getattr(rt, "sync", None))
        finally:
            rt.close()
            if self.runtime == "onnxruntime":
                with contextlib.suppress(OSError):
                    path.unlink()
        return float(res[self.batch_size][STATISTICS[self.statistic]])

    def _export(self, module: nn.Module, path: Path, input_shape: tuple[int, int, int]) -> None:
        from vitopt.deploy.onnx_export import export_onnx

        kw = dict(simplify=False, verify=False, dynamic_batch=self.batch_size != 1)
        with _quiet_export_logs():
            try:
                export_onnx(module, path, input_shape, exporter=self.exporter, **kw)
            except VitoptError as exc:
                if self.exporter != "torchscript":
                    raise
                log.warning("TorchScript ONNX export of a LUT probe failed (%s); using the dynamo exporter", exc)
                self.exporter = "dynamo"
                export_onnx(module, path, input_shape, exporter="dynamo", **kw)


def _check_settings(runtime: str, batch_size: int, threads: int, grid_points: int, warmup: int, repeats: int,
                    exporter: str, statistic: str) -> None:
    from vitopt.deploy.runtimes import known_runtimes

    if runtime not in known_runtimes():
        raise VitoptError(f"unknown runtime kind {runtime!r}; known kinds: {', '.join(known_runtimes())}.")
    for name, v, lo in (("batch_size", batch_size, 1), ("threads", threads, 1), ("grid_points", grid_points, 2),
                        ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise VitoptError(f"{name} must be an integer >= {lo}; got {v!r}.")
    if exporter not in PROBE_EXPORTERS:
        raise VitoptError(f"unknown probe exporter {exporter!r}; allowed: {', '.join(PROBE_EXPORTERS)}.")
    if statistic not in STATISTICS:
        raise VitoptError(f"unknown latency statistic {statistic!r}; allowed: {', '.join(STATISTICS)}.")


def _check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise VitoptError(f"device {device!r} was asked for, but CUDA is not available on this machine; "
                          "use device 'cpu'.")
    if not (str(device) == "cpu" or str(device).startswith("cuda")):
        raise VitoptError(f"unknown device {device!r}; use 'cpu' or 'cuda[:index]'.")


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]LUT[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)


# ------------------------------------------------------------------------------------ measuring
def measure_lut(model: nn.Module, *, runtime: str = "onnxruntime", batch_size: int = 1, threads: int = 2,
                grid_points: int = 4, warmup: int = 5, repeats: int = 20, progress: bool = True,
                device: str = "cpu", exporter: str = "torchscript", statistic: str = "min",
                model_name: str | None = None, model_kwargs: dict[str, Any] | None = None) -> LatencyTable:
    """Measure a latency lookup table for a timm ViT on one runtime (NViT, CVPR 2023; HALP, NeurIPS 2022).

    Builds ``nD * nA * nM`` block probes, ``nD`` stem/head probes and one null probe (module
    docstring), times each with :func:`vitopt.deploy.latency.measure_latency` on a runtime from
    :func:`vitopt.deploy.runtimes.make_runtime`, subtracts the null probe's call overhead from the
    block latencies, and repairs monotonicity (:func:`make_monotone`). ``model`` is not modified
    (it is copied one block at a time; its ``blocks`` attribute is swapped for the copy and restored).

    Args:
        model: a timm ``VisionTransformer`` (dense or pruned); the grids end at its current widths
            (largest ``heads * head_dim`` and ``mlp`` over blocks).
        runtime: ``"onnxruntime"`` (probes exported to ONNX in a temp folder) or ``"pytorch"``
            (eager; other registered model-based runtimes also work).
        batch_size: images per timed call (ONNX graphs get a dynamic batch axis when != 1).
        threads: intra-op CPU threads of the runtime.
        grid_points: grid values per axis (>= 2): ``k / grid_points`` of the current width.
        warmup, repeats: untimed and timed calls per probe.
        statistic: ``"min"`` (default), ``"p50"`` or ``"mean"`` of the timed calls (module docstring).
        progress: show a rich progress bar on stderr.
        device: ``"cpu"`` or ``"cuda[:i]"``: pytorch runs there (synchronised per call);
            onnxruntime uses its CUDA execution provider (needs onnxruntime-gpu).
        exporter: ``"torchscript"`` (fast; falls back to dynamo on failure) or ``"dynamo"``.
        model_name, model_kwargs: timm name/kwargs recorded as metadata (default: the model's
            ``pretrained_cfg["architecture"]`` and ``{}``).

    Returns:
        A :class:`LatencyTable` (latencies in ms per call of ``batch_size`` images).

    Raises:
        VitoptError: an unsupported model, bad settings, an unknown runtime, CUDA asked for but not
            available, or an export/runtime failure of a probe.
    """
    from vitopt.arch.families import family_of

    t_start = time.perf_counter()
    _check_settings(runtime, batch_size, threads, grid_points, warmup, repeats, exporter, statistic)
    _check_device(device)
    fam = family_of(model)
    fam.check_supported(model)
    dims = fam.read_dims(model)
    depth = len(model.blocks)
    if depth < 1:
        raise VitoptError("the model has no transformer blocks; a latency table needs at least one.")
    num_tokens = fam.num_tokens(model)
    head_dim = max(dims[f"blocks.{i}.head_dim"] for i in range(depth))
    max_heads = max(dims[f"blocks.{i}.heads"] for i in range(depth))
    D_grid = grid_values(dims["embed"], grid_points, 8)
    A_grid = grid_values(max_heads * head_dim, grid_points, head_dim)
    M_grid = grid_values(max(dims[f"blocks.{i}.mlp"] for i in range(depth)), grid_points, 8)
    image = _image_shape(model)
    skel = _skeleton(model)

    raw = np.zeros((len(D_grid), len(A_grid), len(M_grid)))
    stem_raw = np.zeros(len(D_grid))
    total = raw.size + len(D_grid) + 1
    with tempfile.TemporaryDirectory(prefix="vitopt-lut-") as tmp, _progress(progress) as bar:
        timer = _Timer(runtime, device=device, threads=threads, batch_size=batch_size, warmup=warmup,
                       repeats=repeats, exporter=exporter, tmp=Path(tmp), statistic=statistic)
        task = bar.add_task("null probe", total=total)
        overhead = timer(_BlockProbe(None, num_tokens).eval(), (1, 1, D_grid[-1]))
        bar.advance(task)
        for i, D in enumerate(D_grid):
            bar.update(task, description=f"stem/head D={D}")
            stem_raw[i] = timer(_stem_probe(skel, D), image)
            bar.advance(task)
            for j, A in enumerate(A_grid):
                for k, M in enumerate(M_grid):
                    bar.update(task, description=f"block D={D} A={A} M={M}")
                    raw[i, j, k] = timer(_block_probe(skel, D, A // head_dim, head_dim, M, num_tokens), (1, 1, D))
                    bar.advance(task)
    used_exporter = timer.exporter if runtime == "onnxruntime" else None
    if model_name is None:
        model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return LatencyTable(
        runtime=runtime, device=_device_string(runtime, device), threads=threads, batch_size=batch_size,
        num_tokens=num_tokens, depth=depth, head_dim=head_dim,
        embed_grid=D_grid, attn_grid=A_grid, mlp_grid=M_grid,
        block_ms=make_monotone(np.maximum(raw - overhead, 0.0)).tolist(),
        stem_ms=make_monotone(stem_raw).tolist(),
        block_ms_raw=raw.tolist(), stem_ms_raw=stem_raw.tolist(), call_overhead_ms=float(overhead),
        model_name=model_name, model_kwargs=dict(model_kwargs or {}), model_dims=dims,
        torch_version=str(torch.__version__), onnxruntime_version=_ort_version(), exporter=used_exporter,
        warmup=warmup, repeats=repeats, statistic=statistic, measure_seconds=round(time.perf_counter() - t_start, 2),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def measure_model_latency(model: nn.Module, *, runtime: str = "onnxruntime", batch_size: int = 1, threads: int = 2,
                          warmup: int = 5, repeats: int = 20, device: str = "cpu",
                          exporter: str = "torchscript", statistic: str = "min") -> float:
    """Measured latency of the whole ``model`` (ms per call of ``batch_size`` images, ``statistic``).

    Timed exactly as :func:`measure_lut` times its probes (same export path, runtime settings and
    statistic), so it is the reference that :attr:`LatencyTable.predicted_model_ms` is compared with.
    The model's weights are used as they are (they do not change timings of dense kernels).

    Raises:
        VitoptError: bad settings, an unknown runtime, CUDA not available, or an export/runtime failure.
    """
    _check_settings(runtime, batch_size, threads, 2, warmup, repeats, exporter, statistic)
    _check_device(device)
    module = copy.deepcopy(model).float().cpu().eval()  # the runtime may move it to the device
    with tempfile.TemporaryDirectory(prefix="vitopt-lut-") as tmp:
        timer = _Timer(runtime, device=device, threads=threads, batch_size=batch_size, warmup=warmup,
                       repeats=repeats, exporter=exporter, tmp=Path(tmp), statistic=statistic)
        return timer(module, _image_shape(model))
