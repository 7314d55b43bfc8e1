"""Latency of a runtime per batch size: percentiles of wall-clock time per call.

Method (as in the TensorRT best-practices guide, "Measuring performance", and trtexec's report):
a fixed random input per batch size, ``warmup`` untimed calls (lazy initialisation, allocator and
cache warm-up, ORT/TensorRT tactic selection), then ``repeats`` calls each timed on its own with
``time.perf_counter``; statistics over those samples. A GPU runtime passes ``sync`` (e.g.
``torch.cuda.synchronize``) so that each sample covers the device work and not just the launch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vitopt.errors import VitoptError

__all__ = ["measure_latency"]


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
        ms = samples * 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        results[bs] = {
            "p50_ms": p50,
            "p90_ms": p90,
            "p99_ms": p99,
            "mean_ms": float(ms.mean()),
            "std_ms": float(ms.std()),
            "min_ms": float(ms.min()),
            "max_ms": float(ms.max()),
            "throughput_img_s": bs / (p50 / 1e3) if p50 > 0 else float("inf"),
            "repeats": repeats,
        }
    return results


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
