"""Measure latency lookup tables (:class:`vitopt.arch.latency_table.LatencyTable`) on a runtime.

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
with :func:`vitopt.deploy.latency.measure_latency`.

With ``runtime="tensorrt"`` the table is measured on the deployment target in TensorRT milliseconds:
each probe's ONNX is built into an engine for ``target`` at ``precision`` with the builder settings
of :func:`vitopt.deploy.tensorrt_build.derive_build_config` (static profile at the table's batch size;
fp16/bf16 on TensorRT 11 are AutoCast first; int8/fp8 probes are quantized by ModelOpt with random
calibration data - the scales do not change kernel timings), loaded by the ``tensorrt`` runtime and
timed engine-only with CUDA events (:func:`vitopt.deploy.latency.measure_device_latency`). The table
records the runtime, device, precision, target and TensorRT version, and allocation refuses to price
a model for another target with it (:meth:`vitopt.arch.latency_table.LatencyTable.check_for`). One
engine build per probe: ``grid_points**3 + grid_points + 1`` builds (69 at the default 4), so a
lower ``trt_opt_level`` shortens it. A probe's latency is, by default, the **minimum**
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
"""


from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from vitopt.arch.config import resize_to
from vitopt.arch.families import family_of
from vitopt.arch.latency_table import LatencyTable, grid_values, make_monotone
from vitopt.deploy.latency import measure_device_latency, measure_latency
from vitopt.deploy.onnx_export import export_onnx
from vitopt.deploy.quantize import quantize_onnx
from vitopt.deploy.runtimes import known_runtimes, make_runtime
from vitopt.deploy.targets import get_target
from vitopt.deploy.tensorrt_build import build_engine, derive_build_config, onnx_info
from vitopt.errors import VitoptError

__all__ = ["measure_lut", "measure_model_latency", "PROBE_EXPORTERS", "STATISTICS", "LUT_RUNTIMES"]

log = logging.getLogger(__name__)

#: ``statistic`` values: which summary of a probe's timed calls is its latency (measure_latency keys).
STATISTICS = {"p50": "p50_ms", "min": "min_ms", "mean": "mean_ms"}
#: ``exporter`` values :func:`measure_lut` accepts for the onnxruntime runtime.
PROBE_EXPORTERS = ("torchscript", "dynamo")


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
    m = copy.deepcopy(skel)
    want = {"embed": D, "blocks.0.heads": heads, "blocks.0.head_dim": head_dim, "blocks.0.mlp": M}
    groups = family_of(m).read_dims(m)                 # no head_dim group where it is fixed (Eva under RoPE)
    resize_to(m, {k: v for k, v in want.items() if k in groups})
    return _BlockProbe(_randomise(m.blocks[0]), num_tokens).eval()


def _stem_probe(skel: nn.Module, D: int) -> nn.Module:
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
    """Times probe modules on one runtime; owns the temp folder for ONNX files (and engines)."""

    def __init__(self, runtime: str, *, device: str, threads: int, batch_size: int, warmup: int, repeats: int,
                 exporter: str, tmp: Path, statistic: str = "min", target: str | None = None,
                 precision: str = "fp32", trt_opt_level: int = 3) -> None:
        self.runtime, self.device, self.threads, self.statistic = runtime, device, threads, statistic
        self.batch_size, self.warmup, self.repeats = batch_size, warmup, repeats
        self.exporter, self.tmp, self.count = exporter, tmp, 0
        self.target, self.precision, self.trt_opt_level = target, precision, trt_opt_level
        self.build_record: dict[str, Any] | None = None

    def _engine(self, module: nn.Module, input_shape: tuple[int, int, int]) -> Path:
        """Export ``module`` and build a TensorRT engine of it for the table's target and precision."""
        path = self.tmp / f"probe{self.count}.onnx"
        self.count += 1
        self._export(module, path, input_shape)
        if self.precision in ("int8", "fp8"):
            cal = np.random.default_rng(self.count).standard_normal((self.batch_size, *input_shape), dtype=np.float32)
            qpath = path.with_name(path.stem + f"_{self.precision}.onnx")
            quantize_onnx(path, qpath, self.precision, calibration=cal, calibration_batch=self.batch_size)
            path = qpath
        info = onnx_info(path)
        b = self.batch_size
        cfg = derive_build_config(self.target, self.precision, input_name=info.input_name, input_chw=info.input_chw,
                                  profile=(b, b, b), opt_level=self.trt_opt_level)
        self.build_record = build_engine(path, cfg, self.tmp / f"engine{self.count}", cache_dir=self.tmp)
        return Path(self.build_record["engine"])

    def __call__(self, module: nn.Module, input_shape: tuple[int, int, int]) -> float:
        """Latency (ms per call, ``statistic``) of ``module`` on ``[batch_size, *input_shape]`` float32 inputs."""

        options: dict[str, Any] = {}
        if self.runtime == "tensorrt":
            engine = self._engine(module, input_shape)
            rt = make_runtime("tensorrt", engine_path=engine, device=int(str(self.device).partition(":")[2] or 0))
            try:
                res = measure_device_latency(rt, input_shape, [self.batch_size], warmup=self.warmup,
                                             repeats=self.repeats)
            finally:
                rt.close()
            return float(res[self.batch_size][STATISTICS[self.statistic]])
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
        kw = dict(simplify=False, verify=False, dynamic_batch=self.batch_size != 1 or self.runtime == "tensorrt")
        with _quiet_export_logs():
            try:
                export_onnx(module, path, input_shape, exporter=self.exporter, **kw)
            except VitoptError as exc:
                if self.exporter != "torchscript":
                    raise
                log.warning("TorchScript ONNX export of a LUT probe failed (%s); using the dynamo exporter", exc)
                self.exporter = "dynamo"
                export_onnx(module, path, input_shape, exporter="dynamo", **kw)


#: runtimes a latency table can be measured on (probes are modules, ONNX files or engines).
LUT_RUNTIMES = ("onnxruntime", "pytorch", "pytorch-compile", "tensorrt")


def _check_settings(runtime: str, batch_size: int, threads: int, grid_points: int, warmup: int, repeats: int,
                    exporter: str, statistic: str, target: str | None = None, precision: str = "fp32") -> None:
    if runtime not in known_runtimes():
        raise VitoptError(f"unknown runtime kind {runtime!r}; known kinds: {', '.join(known_runtimes())}.")
    if runtime not in LUT_RUNTIMES:
        raise VitoptError(f"latency tables are measured on {', '.join(LUT_RUNTIMES)}, not {runtime!r}.")
    if runtime == "tensorrt":
        if target is None:
            raise VitoptError("a TensorRT latency table is measured for a target profile: give target (--target), "
                              "e.g. h100 or orin-agx.")
        t = get_target(target)
        if precision not in t.precisions:
            raise VitoptError(f"target {t.key} does not run {precision}; it runs {', '.join(t.precisions)}.")
    elif precision != "fp32" or target is not None:
        raise VitoptError(f"target and precision apply to runtime 'tensorrt'; runtime {runtime!r} measures fp32 on "
                          "this machine.")
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

    return Progress(TextColumn("[bold]LUT[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)


# ------------------------------------------------------------------------------------ measuring
def measure_lut(model: nn.Module, *, runtime: str = "onnxruntime", batch_size: int = 1, threads: int = 2,
                grid_points: int = 4, warmup: int = 5, repeats: int = 20, progress: bool = True,
                device: str = "cpu", exporter: str = "torchscript", statistic: str = "min",
                model_name: str | None = None, model_kwargs: dict[str, Any] | None = None,
                target: str | None = None, precision: str = "fp32", trt_opt_level: int = 3) -> LatencyTable:
    """Measure a latency lookup table for a timm ViT on one runtime (NViT, CVPR 2023; HALP, NeurIPS 2022).

    Builds ``nD * nA * nM`` block probes, ``nD`` stem/head probes and one null probe (module
    docstring), times each with :func:`vitopt.deploy.latency.measure_latency` on a runtime from
    :func:`vitopt.deploy.runtimes.make_runtime`, subtracts the null probe's call overhead from the
    block latencies, and repairs monotonicity (:func:`make_monotone`). ``model`` is not modified
    (it is copied one block at a time; its ``blocks`` attribute is swapped for the copy and restored).

    Args:
        model: a timm ``VisionTransformer`` (dense or pruned); the grids end at its current widths
            (largest ``heads * head_dim`` and ``mlp`` over blocks).
        runtime: ``"onnxruntime"`` (probes exported to ONNX in a temp folder), ``"pytorch"`` (eager),
            ``"pytorch-compile"``, or ``"tensorrt"`` (a TensorRT engine per probe, built for
            ``target`` at ``precision``, timed engine-only with CUDA events; needs TensorRT and the
            target's GPU).
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
        target: the target profile (``runtime="tensorrt"`` only; required there).
        precision: the engine precision (``runtime="tensorrt"``; fp32 elsewhere).
        trt_opt_level: builder optimization level of the probe engines (0-5).

    Returns:
        A :class:`LatencyTable` (latencies in ms per call of ``batch_size`` images).

    Raises:
        VitoptError: an unsupported model, bad settings, an unknown runtime, CUDA asked for but not
            available, or an export/runtime failure of a probe.
    """
    t_start = time.perf_counter()
    _check_settings(runtime, batch_size, threads, grid_points, warmup, repeats, exporter, statistic, target, precision)
    _check_device("cuda" if runtime == "tensorrt" and device == "cpu" else device)
    fam = family_of(model)
    fam.check_supported(model)
    # a family without head_dim groups (Eva under RoPE: head_dim fixed) still has one per block
    dims = {**{f"blocks.{i}.head_dim": int(blk.attn.head_dim) for i, blk in enumerate(model.blocks)},
            **fam.read_dims(model)}
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
                       repeats=repeats, exporter=exporter, tmp=Path(tmp), statistic=statistic, target=target,
                       precision=precision, trt_opt_level=trt_opt_level)
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
    used_exporter = timer.exporter if runtime in ("onnxruntime", "tensorrt") else None
    if model_name is None:
        model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    rec = timer.build_record or {}
    dev = (f"{rec.get('device')} (sm {rec.get('compute_capability')})" if runtime == "tensorrt"
           else _device_string(runtime, device))
    return LatencyTable(
        runtime=runtime, device=dev, threads=threads, batch_size=batch_size,
        num_tokens=num_tokens, depth=depth, head_dim=head_dim,
        embed_grid=D_grid, attn_grid=A_grid, mlp_grid=M_grid,
        block_ms=make_monotone(np.maximum(raw - overhead, 0.0)).tolist(),
        stem_ms=make_monotone(stem_raw).tolist(),
        block_ms_raw=raw.tolist(), stem_ms_raw=stem_raw.tolist(), call_overhead_ms=float(overhead),
        model_name=model_name, model_kwargs=dict(model_kwargs or {}), model_dims=dims,
        torch_version=str(torch.__version__), onnxruntime_version=_ort_version(), exporter=used_exporter,
        warmup=warmup, repeats=repeats, statistic=statistic, measure_seconds=round(time.perf_counter() - t_start, 2),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        precision=precision, target=target, tensorrt_version=rec.get("tensorrt_version"),
    )


def measure_model_latency(model: nn.Module, *, runtime: str = "onnxruntime", batch_size: int = 1, threads: int = 2,
                          warmup: int = 5, repeats: int = 20, device: str = "cpu",
                          exporter: str = "torchscript", statistic: str = "min", target: str | None = None,
                          precision: str = "fp32", trt_opt_level: int = 3) -> float:
    """Measured latency of the whole ``model`` (ms per call of ``batch_size`` images, ``statistic``).

    Timed exactly as :func:`measure_lut` times its probes (same export path, runtime settings and
    statistic), so it is the reference that :attr:`LatencyTable.predicted_model_ms` is compared with.
    The model's weights are used as they are (they do not change timings of dense kernels).

    Raises:
        VitoptError: bad settings, an unknown runtime, CUDA not available, or an export/runtime failure.
    """
    _check_settings(runtime, batch_size, threads, 2, warmup, repeats, exporter, statistic, target, precision)
    _check_device("cuda" if runtime == "tensorrt" and device == "cpu" else device)
    module = copy.deepcopy(model).float().cpu().eval()  # the runtime may move it to the device
    with tempfile.TemporaryDirectory(prefix="vitopt-lut-") as tmp:
        timer = _Timer(runtime, device=device, threads=threads, batch_size=batch_size, warmup=warmup,
                       repeats=repeats, exporter=exporter, tmp=Path(tmp), statistic=statistic, target=target,
                       precision=precision, trt_opt_level=trt_opt_level)
        return timer(module, _image_shape(model))
