"""Kill-and-resume equivalence of ``vitopt run``: SIGKILL at random moments, resume, compare with a straight run.

Issue #6's acceptance test. One reference run goes straight through; then each of ``--kills`` runs is
SIGKILLed once and resumed with the same command (which continues from the last finished stage and
the interrupted stage's last epoch checkpoint). Two kinds of kill:

* ``time``: after a uniformly random delay in (5%, 95%) of the reference's wall time (anywhere:
  start-up, a training step, validation, a stage boundary, export, ...); when the run finishes before
  the kill (a busy machine makes the reference slow), it is redone in a fresh folder with a delay
  drawn within that run's own time (at most 3 tries);
* ``write``: inside the K-th epoch-checkpoint write (K random), after the temp file is written and
  fsync'd but before its rename - the moment atomic writes exist for.

Every run must end with bitwise-equal weights in every stage's ``model/model.safetensors`` and the
same metrics as the reference: every number in every ``metrics.json`` except wall-clock and latency
measurements (keys with ``seconds``, ``latency``, ``_ms``, ``p50``/``p90``/``p99``, ``throughput``),
compared exactly (paths inside the run directory compared relative to it). Subprocesses run with one thread (``OMP_NUM_THREADS=1``) for determinism.

Usage (the reduced quickstart used for issue #6's report)::

    python benchmarks/kill_resume.py --kills 10 \\
        --set stages[0].epochs=4 --set stages[1].epochs=2 --set stages[3].epochs=2

Prints a table and writes ``benchmarks/results/kill_resume.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import console, default_out, print_table, write_json  # noqa: E402

#: Wraps the CLI; KILL_AT_WRITE=K SIGKILLs the process during the K-th write of an epoch checkpoint
#: (between fsync of the temp file and the rename).
WRAPPER = """
import os, signal, sys
k = int(os.environ.get("KILL_AT_WRITE", "0"))
if k:
    real, seen = os.replace, [0]
    def replace(src, dst):
        if str(dst).endswith("last.pt"):
            seen[0] += 1
            if seen[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
from vitopt.cli import main
sys.argv = ["vitopt", "run", *sys.argv[1:]]
main()
"""

_VOLATILE = ("seconds", "latency", "_ms", "p50", "p90", "p99", "throughput", "environment", "created")


def _cmd(recipe: Path, out_dir: Path, sets: list[str]) -> list[str]:
    args = [str(recipe), "--set", f"output_dir={out_dir}"]
    for s in sets:
        args += ["--set", s]
    return [sys.executable, "-c", WRAPPER, *args]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], log: Path, kill_after: float | None = None, **env: str) -> tuple[int, float]:
    """Run ``cmd`` (optionally SIGKILL it after ``kill_after`` s); returns (returncode, seconds)."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=fh, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return proc.returncode, time.perf_counter() - t0


def _comparable(obj: Any, key: str = "") -> Any:
    """``obj`` without wall-clock/latency fields (see module docstring)."""
    if isinstance(obj, dict):
        return {k: _comparable(v, k) for k, v in obj.items() if not any(t in k for t in _VOLATILE)}
    if isinstance(obj, list):
        return [_comparable(v, key) for v in obj]
    return obj


def outcome(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(stage -> {tensor name -> tensor}, stage -> comparable metrics) of a finished run directory."""
    from safetensors.torch import load_file

    weights = {p.parent.parent.name: load_file(str(p)) for p in sorted(run_dir.glob("*/model/model.safetensors"))}
    metrics = {p.parent.name: _comparable(json.loads(p.read_text().replace(str(run_dir), "<run>"))["metrics"])
               for p in sorted(run_dir.glob("*/metrics.json"))}           # paths inside the run dir: relative
    return weights, metrics


def compare(run: tuple, ref: tuple) -> list[str]:
    """Differences between two outcomes (empty: bitwise-equal weights and equal metrics)."""
    import torch

    diffs = []
    (w, m), (rw, rm) = run, ref
    if w.keys() != rw.keys():
        diffs.append(f"model folders differ: {sorted(w)} vs {sorted(rw)}")
    for stage in sorted(set(w) & set(rw)):
        for k, t in rw[stage].items():
            if k not in w[stage] or not torch.equal(w[stage][k], t):
                diffs.append(f"{stage}/{k}")
    if m != rm:
        diffs.append(f"metrics differ in {sorted(s for s in set(m) | set(rm) if m.get(s) != rm.get(s))}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override (repeatable)")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--write-kills", type=int, default=None,
                    help="how many of the kills hit a checkpoint write (default: kills // 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp dir, deleted)")
    ap.add_argument("--out", type=Path, default=default_out("kill_resume"))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    name = _recipe_name(args.recipe, args.sets)
    console.print(f"reference run of {args.recipe} {' '.join(args.sets)} in {work}")
    rc, ref_s = _run(_cmd(args.recipe, work / "ref", args.sets), work / "ref.log")
    if rc != 0:
        console.print(f"[red]reference run failed (exit {rc}); see {work / 'ref.log'}[/]")
        return 1
    ref = outcome(work / "ref" / name)
    n_writes = sum(1 for _ in (work / "ref.log").read_text().splitlines() if " epoch " in _)
    n_write_kills = args.kills // 3 if args.write_kills is None else args.write_kills
    rows, records = [], []
    for i in range(args.kills):
        out = work / f"kill{i:02d}"
        cmd = _cmd(args.recipe, out, args.sets)
        if i < n_write_kills:
            k = rng.randint(1, max(1, n_writes))
            kind, at = "write", f"checkpoint write {k}/{n_writes}"
            rc1, t1 = _run(cmd, work / f"kill{i:02d}.log", KILL_AT_WRITE=str(k))
        else:
            span = ref_s
            for _attempt in range(3):                         # a run faster than the reference may finish first
                delay = rng.uniform(0.05, 0.95) * span
                kind, at = "time", f"{delay:.1f} s"
                rc1, t1 = _run(cmd, work / f"kill{i:02d}.log", kill_after=delay)
                if rc1 == -signal.SIGKILL:
                    break
                shutil.rmtree(out, ignore_errors=True)        # finished before the kill: draw again within its time
                span = t1
        killed = rc1 == -signal.SIGKILL
        stage = _interrupted_at(out / name)
        rc2, t2 = _run(cmd, work / f"kill{i:02d}.log")
        log = (work / f"kill{i:02d}.log").read_text()
        resumed_epoch = "resumed from" in log
        diffs = compare(outcome(out / name), ref) if rc2 == 0 else [f"resume exited {rc2}"]
        records.append({"i": i, "kind": kind, "at": at, "killed": killed, "killed_in_stage": stage,
                        "resumed_from_epoch_checkpoint": resumed_epoch, "resume_exit": rc2,
                        "seconds_before_kill": round(t1, 2), "seconds_resume": round(t2, 2),
                        "equal": not diffs, "diffs": diffs[:10]})
        rows.append([str(i), kind, at, "yes" if killed else "no (finished)", stage, "yes" if resumed_epoch else "no",
                     "[green]equal[/]" if not diffs else f"[red]{len(diffs)} diffs[/]"])
        console.print(f"kill {i}: {kind} at {at}, killed={killed}, resume exit {rc2}, "
                      f"{'equal' if not diffs else diffs[:3]}")
        _write(args, argv, ref_s, ref[1], records)             # after every kill: partial results survive
    print_table(f"kill and resume vs the straight run ({ref_s:.0f} s)",
                ["#", "kind", "kill at", "killed", "interrupted stage@checkpoint", "epoch resume", "final weights+metrics"],
                rows)
    ok = all(r["equal"] for r in records)
    _write(args, argv, ref_s, ref[1], records)
    console.print(f"{sum(r['equal'] for r in records)}/{len(records)} resumed runs equal the straight run; "
                  f"wrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def _write(args, argv, ref_s: float, ref_metrics: dict, records: list[dict]) -> None:
    write_json(args.out, {"recipe": str(args.recipe), "overrides": args.sets, "reference_seconds": ref_s,
                          "reference_metrics": ref_metrics, "runs": records,
                          "all_equal": all(r["equal"] for r in records), "kills_done": len(records)},
               script="kill_resume", args={k: str(v) for k, v in vars(args).items()}, argv=argv)


def _recipe_name(recipe: Path, sets: list[str]) -> str:
    import yaml

    name = (yaml.safe_load(recipe.read_text()) or {}).get("name", "run")
    for s in sets:
        if s.startswith("name="):
            name = s.split("=", 1)[1]
    return name


def _interrupted_at(run_dir: Path) -> str:
    """The first unfinished stage after the kill, with the epoch of its checkpoint (``03_finetune@2``)."""
    import torch

    for d in sorted(p for p in run_dir.glob("[0-9][0-9]_*") if p.is_dir()):
        if not (d / "metrics.json").is_file():
            ck = d / "checkpoints" / "last.pt"
            if ck.is_file():
                return f"{d.name}@epoch {torch.load(ck, map_location='cpu', weights_only=True)['epoch']}"
            return d.name
    return "-" if run_dir.is_dir() else "(not started)"


if __name__ == "__main__":
    sys.exit(main())
