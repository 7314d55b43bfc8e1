"""The quickstart's numbers as a results file: run ``recipes/quickstart.yaml`` (or read a finished run) and
write ``benchmarks/results/quickstart.json``.

The README quotes the quickstart (dense top-1, top-1 after VTP, achieved FLOPs ratio, fine-tuned top-1,
final / dense latency ratio, wall time). Those figures come from the run's ``summary.json``
(:func:`vitopt.report.summary.summary_numbers`), copied here with the command, date, machine and load
so that ``benchmarks/readme_numbers.py`` can print the README's table from it.

    python benchmarks/quickstart.py                       # runs the recipe into a fresh temp folder
    python benchmarks/quickstart.py --threads 1           # OMP_NUM_THREADS=1 and validate threads 1
    python benchmarks/quickstart.py --from runs/quickstart  # a run made by `make quickstart`

On a shared machine whose load exceeds its cores, OpenMP threads spin on busy cores: one thread is
then several times faster than two (``benchmarks/results/noise_floor*.json``), hence ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = "quickstart"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="run_dir", type=Path, help="a finished quickstart run directory to read")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe to run (default: the shipped one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE passed to vitopt run")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the run and threads of its validate stages")
    ap.add_argument("--out", type=Path, default=common.default_out(SCRIPT))
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or read) the quickstart and write its numbers; returns the JSON payload."""
    from vitopt.report.summary import summary_numbers

    args = build_parser().parse_args(argv)
    payload: dict[str, Any] = {"recipe": str(args.recipe.resolve().relative_to(ROOT)) if args.recipe.resolve()
                               .is_relative_to(ROOT) else str(args.recipe)}
    with tempfile.TemporaryDirectory(prefix="vitopt-quickstart-") as tmp:
        run_dir = args.run_dir
        if run_dir is None:
            overrides = list(args.overrides)
            env = dict(os.environ)
            if args.threads is not None:
                env["OMP_NUM_THREADS"] = str(args.threads)
                from vitopt.recipe import load_recipe

                overrides += [f"stages[{i}].threads={args.threads}"
                              for i, st in enumerate(load_recipe(args.recipe).stages) if st.type == "validate"]
            payload["overrides"] = overrides
            payload["omp_num_threads"] = env.get("OMP_NUM_THREADS")
            cmd = [sys.executable, "-m", "vitopt", "run", str(args.recipe), "--set", f"output_dir={tmp}",
                   *[x for kv in overrides for x in ("--set", kv)]]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, env=env)
            payload["wall_seconds"] = round(time.perf_counter() - t0, 1)
            run_dir = next(p for p in Path(tmp).iterdir() if p.is_dir())
        payload["run_dir"] = str(run_dir)
        payload["summary"] = summary_numbers(run_dir)
        payload["recipe_text"] = (run_dir / "recipe.yaml").read_text() if (run_dir / "recipe.yaml").is_file() else None
    s = payload["summary"]
    common.console.print(json.dumps({k: s.get(k) for k in ("dense_top1", "sparse_train_top1", "flops_ratio",
                                                           "final_top1", "seconds_total")}))
    common.write_json(args.out, payload, script=SCRIPT, args={k: str(v) for k, v in vars(args).items()}, argv=argv)
    return payload


if __name__ == "__main__":
    main()
