"""One timing method for every comparison: warm-up, then interleaved rounds, the median of per-round ratios.

Comparing two latencies measured one after the other on a shared machine compares two moments of
the machine's load as much as two models. Every comparison in vitopt (the ``validate`` stage's final
vs dense model, and every script in ``benchmarks/``) is therefore measured the same way:

1. **Fixed threads.** ``torch.set_num_threads(threads)`` for the duration when ``threads`` is given
   (PyTorch docs, "CPU threading and TorchScript inference"); ONNX Runtime sessions take their
   thread count when they are created (``OrtRuntime(threads=...)``); the count is recorded.
2. **Warm-up.** Every candidate runs ``warmup`` untimed calls, interleaved like the rounds (lazy
   initialisation, allocator and cache warm-up; TensorRT best-practices guide, "Measuring
   performance"). The warm-up calls also give each candidate's per-call time, from which the number
   of calls per round is chosen (``calls="auto"``: enough calls for each block to last ``round_ms``,
   at most ``max_calls``).
3. **R interleaved rounds** ``A, B, C, A, B, C, ...``: in each round every candidate runs its block of
   calls, each call timed with ``time.perf_counter`` (after the candidate's ``sync``, for GPU work);
   the round's time of a candidate is the mean per call of its block. A slow drift of the machine's
   load hits every candidate of a round alike, so the **per-round ratio** ``t_X / t_ref`` cancels it.
4. **Summary**: per candidate the median over rounds of its per-call time (``ms``) and per-call
   percentiles over all timed calls (the keys of :func:`vitopt.deploy.latency.measure_latency`); per
   candidate against the reference, the **median of the per-round ratios** with its spread
   (min-max and the inter-quartile range, ``numpy.percentile`` with linear interpolation). A claim
   "X is faster than Y" needs the ratio's spread to clear the noise floor of the same model timed
   against itself (``benchmarks/noise_floor.py``).
5. **Load.** ``os.getloadavg()`` before and after; when the 1-minute load average exceeds the number
   of cores (``os.cpu_count()``) a :class:`LoadWarning` is issued and recorded (``load_warning``):
   the ratios then carry more noise than on a quiet machine.

The garbage collector is off during timed blocks (as ``timeit`` does) and collection runs between
rounds. :func:`vitopt.deploy.latency.measure_latency` remains the per-call percentile measurement of
one runtime alone (e.g. ``vitopt validate`` of a single artifact).
"""

from __future__ import annotations

import gc
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitopt.errors import VitoptError

__all__ = ["Candidate", "Comparison", "LoadWarning", "compare", "compare_runtimes", "machine_load", "spread",
           "format_ratio", "METHOD"]

#: One line naming the method, stored with every result.
METHOD = ("warm-up, then interleaved rounds (A, B, C, A, B, C, ...); per round the mean time per call of each "
          "candidate's block; median over rounds of per-round ratios to the reference, with min-max and IQR")


#: the clocks (module attributes so that tests can substitute deterministic ones)
_clock = time.perf_counter
_cpu_clock = time.process_time


class LoadWarning(RuntimeWarning):
    """The machine's 1-minute load average was above its core count while timing."""


@dataclass
class Candidate:
    """One thing to time.

    Attributes:
        fn: called once per timed call; with ``setup`` it receives ``setup()``'s result.
        setup: optional, called before every call and NOT timed (e.g. a fresh copy of a model that
            ``fn`` prunes in place).
        sync: optional, called after ``fn`` inside the timed region (e.g. ``torch.cuda.synchronize``
            for GPU work, so that a sample covers the device work, not only the launch).
    """

    fn: Callable[..., Any]
    setup: Callable[[], Any] | None = None
    sync: Callable[[], Any] | None = None

    def call(self) -> tuple[float, float]:
        """Run one call; returns (wall seconds, process CPU seconds) of ``fn`` (+ ``sync``)."""
        arg = self.setup() if self.setup is not None else None
        c0, t0 = _cpu_clock(), _clock()
        if self.setup is not None:
            self.fn(arg)
        else:
            self.fn()
        if self.sync is not None:
            self.sync()
        return _clock() - t0, _cpu_clock() - c0


def machine_load() -> dict[str, Any]:
    """``{"loadavg": [1, 5, 15 min] | None, "cpu_count": int}`` of this machine (``os.getloadavg``)."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not available on this platform
        load = None
    return {"loadavg": load, "cpu_count": os.cpu_count() or 1}


@dataclass
class Comparison:
    """The result of :func:`compare` (all times in milliseconds per call).

    Attributes:
        reference: name of the candidate the ratios are taken against.
        candidates: name -> ``{"ms": median over rounds of the per-call time, "rounds_ms": [per round],
            "calls": calls per round, "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms",
            "max_ms": over every timed call, "cpu_ms": median over rounds of process CPU time per call
            (``time.process_time``, all threads of this process), "cpu_rounds_ms": per round,
            "ratio": {"median", "min", "max", "q1", "q3", "rounds": [per-round ratios]}}``
            (``ratio`` to the reference; 1.0 for the reference itself).
        rounds, warmup, threads: the settings used (threads: torch's intra-op count during timing).
        load_before, load_after: :func:`machine_load` around the measurement.
        load_warning: a sentence when the load average exceeded the core count, else None.
        seconds: wall time of the whole measurement, warm-up included.
    """

    reference: str
    candidates: dict[str, dict[str, Any]]
    rounds: int
    warmup: int
    threads: int | None
    load_before: dict[str, Any]
    load_after: dict[str, Any]
    load_warning: str | None
    seconds: float
    method: str = field(default=METHOD)

    def ratio(self, name: str) -> dict[str, Any]:
        """The ratio summary of candidate ``name`` against the reference."""
        return self.candidates[name]["ratio"]

    def pair_ratio(self, a: str, b: str) -> dict[str, Any]:
        """Median and spread over rounds of ``t_a / t_b`` (two candidates timed in the same rounds)."""
        return spread(np.asarray(self.candidates[a]["rounds_ms"]) / np.asarray(self.candidates[b]["rounds_ms"]))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything above."""
        return {"method": self.method, "reference": self.reference, "rounds": self.rounds, "warmup": self.warmup,
                "threads": self.threads, "load_before": self.load_before, "load_after": self.load_after,
                "load_warning": self.load_warning, "seconds": round(self.seconds, 3), "candidates": self.candidates}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "q1", "q3", "rounds"}`` of per-round values (``numpy.percentile``, linear)."""
    v = np.asarray(values, dtype=np.float64)
    q1, med, q3 = (float(x) for x in np.percentile(v, [25, 50, 75]))
    return {"median": med, "min": float(v.min()), "max": float(v.max()), "q1": q1, "q3": q3,
            "rounds": [float(x) for x in v]}


def _per_call(samples_ms: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()), "std_ms": float(ms.std()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise VitoptError(f"{name} must be an integer >= {lo}; got {value!r}.")


def compare(candidates: Mapping[str, Candidate | Callable[[], Any]], *, rounds: int = 10, warmup: int = 3,
            calls: int | str = "auto", round_ms: float = 50.0, max_calls: int = 1000, reference: str | None = None,
            threads: int | None = None, warn_load: bool = True) -> Comparison:
    """Time ``candidates`` against each other with warm-up and interleaved rounds (module docstring).

    Args:
        candidates: name -> :class:`Candidate` or a zero-argument callable, in the order they run
            within a round. One candidate is allowed (then only its own times are meaningful).
        rounds: R, the number of interleaved rounds (>= 1; use >= 5 for a spread worth reading).
        warmup: untimed calls per candidate before the first round (>= 0; at least one is run when
            ``calls="auto"`` to size the blocks).
        calls: timed calls per candidate per round, or ``"auto"``: ``ceil(round_ms / t_warm)`` per
            candidate from its last warm-up call, clamped to ``[1, max_calls]``.
        round_ms: target length of one candidate's block with ``calls="auto"`` (ms).
        reference: the candidate ratios are taken against (default: the first).
        threads: if given, ``torch.set_num_threads(threads)`` during the measurement (restored after).
        warn_load: issue a :class:`LoadWarning` when the load average exceeds the core count.

    Returns:
        a :class:`Comparison`.

    Raises:
        VitoptError: no candidates, an unknown ``reference``, or bad ``rounds``/``warmup``/``calls``/
            ``round_ms``/``max_calls``/``threads``.
    """
    if not candidates:
        raise VitoptError("compare needs at least one candidate to time.")
    cands = {str(k): (v if isinstance(v, Candidate) else Candidate(v)) for k, v in candidates.items()}
    reference = next(iter(cands)) if reference is None else reference
    if reference not in cands:
        raise VitoptError(f"reference {reference!r} is not one of the candidates ({', '.join(cands)}).")
    _check_int("rounds", rounds, 1)
    _check_int("warmup", warmup, 0)
    _check_int("max_calls", max_calls, 1)
    if calls != "auto":
        _check_int("calls", calls, 1)
    if not (isinstance(round_ms, (int, float)) and math.isfinite(round_ms) and round_ms > 0):
        raise VitoptError(f"round_ms must be a positive number of milliseconds; got {round_ms!r}.")
    if threads is not None:
        _check_int("threads", threads, 1)

    saved_threads = torch.get_num_threads()
    if threads is not None and threads != saved_threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()
    load_before = machine_load()
    gc_was = gc.isenabled()
    try:
        last: dict[str, float] = {}
        for _ in range(max(warmup, 1 if calls == "auto" else 0)):
            for name, c in cands.items():
                last[name] = c.call()[0]
        if calls == "auto":
            n_calls = {n: int(min(max_calls, max(1, math.ceil(round_ms / 1e3 / max(last[n], 1e-9))))) for n in cands}
        else:
            n_calls = {n: int(calls) for n in cands}
        per_round = {n: [] for n in cands}
        cpu_round = {n: [] for n in cands}
        samples = {n: [] for n in cands}
        for _ in range(rounds):
            gc.collect(0)                  # young garbage of the last round, outside the timed blocks
            gc.disable()
            try:
                for name, c in cands.items():
                    wall = cpu = 0.0
                    for _ in range(n_calls[name]):
                        w, p = c.call()
                        samples[name].append(w * 1e3)
                        wall += w
                        cpu += p
                    per_round[name].append(wall * 1e3 / n_calls[name])
                    cpu_round[name].append(cpu * 1e3 / n_calls[name])
            finally:
                if gc_was:
                    gc.enable()
    finally:
        if gc_was:
            gc.enable()
        if torch.get_num_threads() != saved_threads:
            torch.set_num_threads(saved_threads)
    load_after = machine_load()
    ref = np.asarray(per_round[reference])
    out: dict[str, dict[str, Any]] = {}
    for name in cands:
        t = np.asarray(per_round[name])
        out[name] = {"ms": float(np.median(t)), "rounds_ms": [float(x) for x in t], "calls": n_calls[name],
                     "cpu_ms": float(np.median(cpu_round[name])), "cpu_rounds_ms": [float(x) for x in cpu_round[name]],
                     **_per_call(samples[name]),
                     "ratio": spread(t / ref)}
    loads = [lo["loadavg"][0] for lo in (load_before, load_after) if lo["loadavg"]]
    cores = load_before["cpu_count"]
    load_warning = None
    if loads and max(loads) > cores:
        load_warning = (f"load average {max(loads):.2f} was above the {cores} cores while timing; the ratios carry "
                        "more noise than on a quiet machine.")
        if warn_load:
            warnings.warn(load_warning, LoadWarning, stacklevel=2)
    return Comparison(reference=reference, candidates=out, rounds=rounds, warmup=warmup,
                      threads=torch.get_num_threads() if threads is None else int(threads),
                      load_before=load_before, load_after=load_after, load_warning=load_warning,
                      seconds=time.perf_counter() - t_start)


def compare_runtimes(runtimes: Mapping[str, Callable[[np.ndarray], Any]], input_shape: Sequence[int], batch_size: int,
                     *, seed: int = 0, syncs: Mapping[str, Callable[[], Any] | None] | None = None,
                     **kwargs: Any) -> Comparison:
    """:func:`compare` of runtimes on one fixed standard-normal float32 batch ``[batch_size, *input_shape]``.

    Args:
        runtimes: name -> a :class:`vitopt.deploy.runtimes.Runtime` (any callable taking the batch).
        input_shape: ``(C, H, W)`` of one image; batch_size: images per call (>= 1).
        seed: seed of the input (``numpy.random.default_rng``), the same for every runtime.
        syncs: name -> the runtime's device synchronize (GPU runtimes), default none.
        **kwargs: passed to :func:`compare` (rounds, warmup, calls, round_ms, reference, threads...).

    Returns:
        a :class:`Comparison`; every candidate also gets ``throughput_img_s = batch_size / p50``.

    Raises:
        VitoptError: a bad ``input_shape`` or ``batch_size``, or any :func:`compare` error.
    """
    if len(input_shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in input_shape):
        raise VitoptError(f"input_shape {tuple(input_shape)!r} must be three positive integers (C, H, W).")
    _check_int("batch_size", batch_size, 1)
    x = np.random.default_rng(seed).standard_normal((int(batch_size), *(int(d) for d in input_shape)),
                                                    dtype=np.float32)
    syncs = syncs or {}
    cands = {name: Candidate(lambda rt=rt: rt(x), sync=syncs.get(name)) for name, rt in runtimes.items()}
    res = compare(cands, **kwargs)
    for c in res.candidates.values():
        c["throughput_img_s"] = batch_size / (c["p50_ms"] / 1e3) if c["p50_ms"] > 0 else float("inf")
        c["batch_size"] = int(batch_size)
    return res


def format_ratio(ratio: Mapping[str, Any], digits: int = 2) -> str:
    """``"0.69x (0.65-0.72)"``: the median ratio and its min-max spread over rounds."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(ratio['median'])}x ({f.format(ratio['min'])}-{f.format(ratio['max'])})"
