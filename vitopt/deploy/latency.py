"""Latency of a runtime per batch size: percentiles of wall-clock time per call.

Method (as in the TensorRT best-practices guide, "Measuring performance", and trtexec's report):
a fixed random input per batch size, ``warmup`` untimed calls (lazy initialisation, allocator and
cache warm-up, ORT/TensorRT tactic selection), then ``repeats`` calls each timed on its own with
``time.perf_counter``; statistics over those samples. A GPU runtime passes ``sync`` (e.g.
``torch.cuda.synchronize``) so that each sample covers the device work and not just the launch.

:func:`measure_device_latency` is the CUDA path for runtimes that keep their I/O on the device (the
``tensorrt`` runtime): the input is staged once into the runtime's preallocated device buffer, and
each sample is the elapsed time of two CUDA events recorded on the runtime's own stream immediately
before and after the engine launch (``execute_async_v3``), so it measures the engine and nothing of
the host: no pageable copies, casts or host syncs inside the bracket (CUDA C++ best practices guide,
"Using CUDA GPU Timers"; TensorRT best practices, "CUDA Events"). The host-to-device copy of the
batch (pinned memory) is timed the same way and reported separately.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vitopt.errors import VitoptError

__all__ = ["measure_latency", "measure_device_latency", "summarize_ms"]


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def measure_latency(runtime: Callable[[np.ndarray], Any], input_shape: Sequence[int], batch_sizes: Sequence[int], *,
                    warmup: int = 10, repeats: int = 50, seed: int = 0,
                    sync: Callable[[], Any] | None = None, timer: str = "wall") -> dict[int, dict[str, float]]:
    """Measure per-call latency of ``runtime`` at each batch size.

    Args:
        runtime: a :class:`vitopt.deploy.runtimes.Runtime` (any callable taking a float32
            ``[B, C, H, W]`` array).
        input_shape: ``(C, H, W)`` of one image.
        batch_sizes: batch sizes to measure, each >= 1 (duplicates measured once).
        warmup: untimed calls before timing, >= 0.
        repeats: timed calls, >= 1.
        seed: seed of the fixed standard-normal input (``numpy.random.default_rng``).
        sync: called after every call, warm-up included, inside the timed region; pass the
            device's synchronize for asynchronous (GPU) runtimes. ``None`` for CPU runtimes.
        timer: ``"wall"`` (``time.perf_counter``) or ``"cuda"``: each sample is the elapsed time
            between two ``torch.cuda.Event(enable_timing=True)`` recorded before and after the call
            on the current stream (CUDA best-practices guide, "Using CUDA GPU timers"), after
            synchronizing on the end event.

    Returns:
        ``{batch_size: {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms",
        "throughput_img_s", "repeats"}}`` with times in milliseconds per call (percentiles by
        ``numpy.percentile``, linear interpolation; ``std_ms`` is the population standard
        deviation) and ``throughput_img_s = batch_size / p50`` in images per second.

    Raises:
        VitoptError: a bad ``input_shape``, batch size, ``warmup``, ``repeats`` or ``timer``, or
            ``timer="cuda"`` without a CUDA device.
    """
    if len(input_shape) != 3 or not all(_positive_int(d) for d in input_shape):
        raise VitoptError(f"input_shape {tuple(input_shape)!r} must be three positive integers (C, H, W).")
    if not batch_sizes or not all(_positive_int(b) for b in batch_sizes):
        raise VitoptError(f"batch_sizes {list(batch_sizes)!r} must be a non-empty list of positive integers.")
    if not isinstance(warmup, int) or warmup < 0:
        raise VitoptError(f"warmup must be an integer >= 0; got {warmup!r}.")
    if not isinstance(repeats, int) or repeats < 1:
        raise VitoptError(f"repeats must be an integer >= 1; got {repeats!r}.")

    if timer not in ("wall", "cuda"):
        raise VitoptError(f"timer {timer!r} is not known; allowed: 'wall' or 'cuda'.")
    clock = _cuda_clock() if timer == "cuda" else _wall_clock
    results: dict[int, dict[str, float]] = {}
    for bs in dict.fromkeys(int(b) for b in batch_sizes):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((bs, *(int(d) for d in input_shape)), dtype=np.float32)
        for _ in range(warmup):
            runtime(x)
            if sync is not None:
                sync()
        samples = np.empty(repeats, dtype=np.float64)
        for i in range(repeats):
            samples[i] = clock(lambda x=x: (runtime(x), sync() if sync is not None else None))
        results[bs] = summarize_ms(samples * 1e3, bs)
    return results


def summarize_ms(ms: np.ndarray, batch: int) -> dict[str, float]:
    """Statistics of per-call times ``ms`` (milliseconds) of batches of ``batch`` images.

    Returns:
        ``{"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms", "throughput_img_s",
        "repeats"}`` (percentiles by ``numpy.percentile``, linear interpolation; population std;
        ``throughput_img_s = batch / p50``).
    """
    ms = np.asarray(ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()), "std_ms": float(ms.std()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "throughput_img_s": batch / (p50 / 1e3) if p50 > 0 else float("inf"), "repeats": int(ms.size)}


def measure_device_latency(runtime: Any, input_shape: Sequence[int], batch_sizes: Sequence[int], *,
                           warmup: int = 10, repeats: int = 50, seed: int = 0) -> dict[int, dict[str, float]]:
    """Engine-only latency of a device-resident runtime, timed with CUDA events on the runtime's stream.

    The runtime provides ``stage_input(x)`` (queue the host-to-device copy into its preallocated
    buffer), ``launch()`` (queue the compute; raises on failure), ``event()`` (an event on its stream
    with ``record()``, ``synchronize()``, ``elapsed_ms(end)``) and ``sync()`` - as
    :class:`vitopt.deploy.runtimes.tensorrt.TrtRuntime` does. Per batch size: stage a fixed
    standard-normal batch, ``warmup`` untimed launches, then ``repeats`` launches each bracketed by
    two events (compute only), then ``repeats`` copies bracketed the same way (host-to-device).

    Returns:
        ``{batch: stats}`` as :func:`summarize_ms` for the compute, plus ``"h2d_p50_ms"`` and
        ``"h2d_p90_ms"`` (host-to-device copy of the batch from pinned memory) and
        ``"timed": "device"``.

    Raises:
        VitoptError: bad shapes, batch sizes, ``warmup`` or ``repeats``, or the runtime's own error
            (e.g. a batch outside its optimization profile).
    """
    if len(input_shape) != 3 or not all(_positive_int(d) for d in input_shape):
        raise VitoptError(f"input_shape {tuple(input_shape)!r} must be three positive integers (C, H, W).")
    if not batch_sizes or not all(_positive_int(b) for b in batch_sizes):
        raise VitoptError(f"batch_sizes {list(batch_sizes)!r} must be a non-empty list of positive integers.")
    if not isinstance(warmup, int) or warmup < 0 or not isinstance(repeats, int) or repeats < 1:
        raise VitoptError(f"warmup must be >= 0 and repeats >= 1; got {warmup!r} and {repeats!r}.")
    results: dict[int, dict[str, float]] = {}
    for bs in dict.fromkeys(int(b) for b in batch_sizes):
        x = np.random.default_rng(seed).standard_normal((bs, *(int(d) for d in input_shape)), dtype=np.float32)
        runtime.stage_input(x)
        for _ in range(warmup):
            runtime.launch()
        runtime.sync()
        compute = np.empty(repeats)
        for i in range(repeats):
            compute[i] = _bracket(runtime, runtime.launch)
        copies = np.empty(repeats)
        for i in range(repeats):
            copies[i] = _bracket(runtime, lambda x=x: runtime.stage_input(x))
        stats = summarize_ms(compute, bs)
        h2d = np.percentile(copies, [50, 90])
        stats.update(h2d_p50_ms=float(h2d[0]), h2d_p90_ms=float(h2d[1]), timed="device")
        results[bs] = stats
    return results


def _bracket(runtime: Any, call: Callable[[], Any]) -> float:
    """Milliseconds between two events recorded on the runtime's stream around ``call()``."""
    start, end = runtime.event(), runtime.event()
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_ms(end)


def _wall_clock(call: Callable[[], Any]) -> float:
    """Seconds ``call()`` takes by ``time.perf_counter``."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _cuda_clock() -> Callable[[Callable[[], Any]], float]:
    """A clock timing ``call()`` with a pair of CUDA events (seconds)."""
    import torch

    if not torch.cuda.is_available():
        raise VitoptError("timer 'cuda' needs a CUDA device and none is visible; use timer 'wall'.")

    def clock(call: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return clock
