"""Helpers shared by the benchmark scripts: rich tables, JSON results, timing, environment.

The scripts in this folder are run by hand (``python benchmarks/NAME.py [--quick] [--out FILE]``);
each prints rich tables and writes one JSON file. This module holds what they share and nothing
model-specific (model building and pruning live in :mod:`variants`).

Conventions used in every table and JSON file:

* FLOPs = 2 x MACs, matmuls and convolutions only (fvcore / ``torch.utils.flop_counter``
  convention), counted for one image;
* latency = wall-clock time per call in milliseconds, measured with the one timing method of
  :mod:`vitopt.deploy.timing` (warm-up, then interleaved rounds A, B, C, A, B, C, ...; per round the
  mean time per call of each candidate's block; the median over rounds, and every comparison as the
  median of per-round ratios with its min-max and IQR), threads fixed, load recorded;
* results go to ``benchmarks/results/NAME.json`` with the command, date, machine and load.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vitopt.deploy.timing import Candidate, Comparison, compare, compare_runtimes, format_ratio, machine_load

__all__ = ["console", "print_table", "write_json", "environment", "set_threads", "tp_status", "fmt", "fmt_pm",
           "add_timing_args", "timed", "timed_runtimes", "fmt_ratio", "machine", "CudaHalfRuntime", "default_out",
           "ratio", "first_line", "RESULTS_DIR", "Candidate"]

#: One console for every script (wide enough for the latency tables when piped to a file).
console = Console(width=max(160, Console().width))

#: where every script writes its JSON by default; the files the README quotes are committed here.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_out(name: str) -> Path:
    """``benchmarks/results/NAME.json`` (the default ``--out``)."""
    return RESULTS_DIR / f"{name}.json"


# ---------------------------------------------------------------------------------- formatting
def parse_with_defaults(parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict[str, Any],
                        defaults: dict[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; every option left at None takes its ``--quick`` or full-run default."""
    args = parser.parse_args(argv)
    for k, v in (quick if args.quick else defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for None/nan, fixed-point floats, str() otherwise."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_pm(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± std`` of ``values`` (population std over seeds; just the value for one seed)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.pstdev(vals):.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``ExcType: first line of the message`` (for recording errors in JSON)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:limit]}"


def print_table(title: str, columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[Any]],
                caption: str | None = None) -> Table:
    """Print a rich table; ``columns`` are names or ``(name, justify)``; cells are formatted by :func:`fmt`."""
    table = Table(title=title, caption=caption, caption_justify="left")
    for col in columns:
        name, justify = (col, "right") if isinstance(col, str) else col
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(*(fmt(c) for c in row))
    console.print(table)
    return table


# ---------------------------------------------------------------------------------- environment
def tp_status() -> tuple[bool, str]:
    """``(True, version)`` when Torch-Pruning imports, else ``(False, reason)``."""
    try:
        import torch_pruning as tp
    except Exception as exc:  # ImportError, or a broken install
        return False, f"torch_pruning is not importable ({first_line(exc)}); pip install torch-pruning (extra 'bench')"
    try:
        from importlib.metadata import version

        return True, version("torch-pruning")
    except Exception:
        return True, str(getattr(tp, "__version__", "unknown"))


def available_variants(requested: Sequence[str], tp_variants: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """The requested variants that can run, and {skipped variant: reason} (Torch-Pruning ones need the package)."""
    tp_ok, tp_msg = tp_status()
    tp_variants = set(tp_variants)
    variants = [v for v in requested if tp_ok or v not in tp_variants]
    skipped = {v: tp_msg for v in requested if v not in variants}
    if skipped:
        console.print(f"[yellow]skipping {', '.join(skipped)}: {tp_msg}[/]")
    return variants, skipped


def _pkg(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def environment() -> dict[str, Any]:
    """Versions, CPU/GPU and thread settings: stored in every JSON file so numbers stay comparable."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "timm": _pkg("timm"),
        "onnx": _pkg("onnx"),
        "onnxruntime": _pkg("onnxruntime"),
        "torch_pruning": _pkg("torch-pruning"),
        "vitopt": _pkg("vitopt"),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
    try:
        env["load_average"] = os.getloadavg()
    except (AttributeError, OSError):
        pass
    return env


def load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (``os.getloadavg``), or None where unavailable."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads)`` when given; returns the thread count in effect."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model, logical cores, memory, GPU (if any), OS."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out: dict[str, Any] = {"cpu": cpu, "logical_cores": os.cpu_count(), "os": platform.platform()}
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        out["memory_gib"] = round(kb / 2**20, 1)
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def write_json(path: str | os.PathLike | None, payload: dict[str, Any], *, script: str,
               args: dict[str, Any] | None = None, argv: list[str] | None = None) -> Path | None:
    """Write ``{"script", "command", "date", "machine", "load", "argv", "args", "environment", **payload}``
    atomically to ``path``.

    ``command`` is the command line that reproduces the file (``python benchmarks/SCRIPT.py ARGS``),
    ``date`` the UTC time of writing, ``load`` :func:`vitopt.deploy.timing.machine_load` at that time
    (1, 5 and 15-minute load averages and the core count). NumPy scalars/arrays, tensors, Paths and
    non-finite floats are converted (NaN/inf -> null). Returns the path written, or None when ``path``
    is None.
    """
    if path is None:
        return None
    from vitopt.io import atomic_write_text

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    name = script if script.endswith(".py") else f"{script}.py"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc = {"script": script, "command": shlex.join(["python", f"benchmarks/{name}", *argv]), "date": now,
           "created": now, "machine": machine(), "load": machine_load(), "argv": argv, "args": args or {},
           "environment": environment(), **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")
    console.print(f"[dim]wrote {path}[/]")
    return path


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return _clean(obj.detach().cpu().tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


# ---------------------------------------------------------------------------------- timing
def add_timing_args(ap: argparse.ArgumentParser, *, warmup: bool = True) -> None:
    """``--rounds``, ``--round-ms`` (and ``--warmup``) of :func:`vitopt.deploy.timing.compare`; defaults come
    from the script's QUICK/DEFAULTS dicts (see :func:`parse_with_defaults`)."""
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds (A, B, C, A, B, C, ...)")
    ap.add_argument("--round-ms", type=float, help="target ms of one candidate's block of calls in a round")
    if warmup:
        ap.add_argument("--warmup", type=int, help="untimed calls per candidate before the rounds")


def _timing_opts(args: argparse.Namespace) -> dict[str, Any]:
    return dict(rounds=getattr(args, "rounds", None) or 10, warmup=getattr(args, "warmup", None) or 0,
                round_ms=getattr(args, "round_ms", None) or 50.0, threads=getattr(args, "threads", None),
                warn_load=False)


def _report(res: Comparison, what: str) -> Comparison:
    if res.load_warning:
        console.print(f"[yellow]warning ({what}): {res.load_warning}[/]")
    return res


def timed(candidates: Mapping[str, Candidate | Callable[[], Any]], args: argparse.Namespace, *, what: str = "",
          **kwargs: Any) -> Comparison:
    """:func:`vitopt.deploy.timing.compare` with the script's ``--rounds/--warmup/--round-ms/--threads``;
    prints the load warning, if any. ``kwargs`` override (e.g. ``calls=1``, ``reference=...``)."""
    opts = _timing_opts(args)
    opts.update(kwargs)
    return _report(compare(candidates, **opts), what)


def timed_runtimes(runtimes: Mapping[str, Callable[[np.ndarray], Any]], input_shape: Sequence[int], batch: int,
                   args: argparse.Namespace, *, what: str = "", **kwargs: Any) -> Comparison:
    """:func:`vitopt.deploy.timing.compare_runtimes` with the script's timing options (see :func:`timed`)."""
    opts = _timing_opts(args)
    opts.update(kwargs)
    return _report(compare_runtimes(runtimes, input_shape, batch, **opts), what)


def fmt_ratio(r: Mapping[str, Any] | None, digits: int = 2) -> str:
    """A ratio summary as ``0.69x (0.65-0.72)`` (median, min-max over rounds); ``-`` when missing."""
    return "-" if r is None else format_ratio(r, digits)


class CudaHalfRuntime:
    """Run a model eagerly in fp16 on CUDA (``model.half().cuda()``, ``torch.no_grad``).

    The NumPy input is copied to the GPU once and reused while the same array is passed again (as
    :func:`vitopt.deploy.timing.compare_runtimes` does), so the timing covers the model and not the
    host-to-device copy; the logits stay on the GPU. ``sync`` is ``torch.cuda.synchronize``.
    """

    name = "cuda_fp16"

    def __init__(self, model: torch.nn.Module, device: str = "cuda") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).half().eval()
        self._key: tuple | None = None
        self._x: torch.Tensor | None = None

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def __call__(self, x: np.ndarray):
        key = (x.__array_interface__["data"][0], x.shape)
        if key != self._key:
            self._x = torch.from_numpy(np.ascontiguousarray(x)).to(self.device).half()
            self._key = key
        with torch.no_grad():
            return self.model(self._x)

    def close(self) -> None:
        self.model = None
        self._x = None
        torch.cuda.empty_cache()
