"""Run a recipe's stages over a run directory: the one place that orders work.

``run_recipe`` creates (or re-opens) ``output_dir/name``, writes the resolved recipe, builds the model
and data, then runs each stage in order. A stage whose ``metrics.json`` exists already finished: it
is skipped, and the State is restored from the outputs it recorded (model, teacher, gates, ONNX),
so re-running a killed recipe continues from the first unfinished stage (DESIGN.md invariant 5).
Finished stage folders are never rewritten.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from vitopt.arch.config import create_model, load_pruned
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_text, load_weights
from vitopt.recipe import Recipe, dump_resolved
from vitopt.report.summary import write_summary
from vitopt.stages import STAGES
from vitopt.stages.base import StageDir, State
from vitopt.train.data import load_data, model_input
from vitopt.train.loop import set_seed

__all__ = ["run_recipe", "stage_dirs", "RECIPE_FILE"]

RECIPE_FILE = "recipe.yaml"


def stage_dirs(recipe: Recipe, run_dir: Path) -> list[StageDir]:
    """The StageDir of every stage: ``NN_<name or type>`` inside ``run_dir``."""
    out = []
    for i, cfg in enumerate(recipe.stages):
        label = f"{i:02d}_{cfg.name or cfg.type}"
        out.append(StageDir(run_dir / label, label, i))
    return out


def _check_resumable(recipe: Recipe, run_dir: Path, dirs: list[StageDir]) -> None:
    """Finished stages are reused only for the same model, data and seed, each with its same config."""
    previous = run_dir / RECIPE_FILE
    if previous.is_file() and any(sd.done for sd in dirs):
        old = yaml.safe_load(previous.read_text(encoding="utf-8")) or {}
        new = yaml.safe_load(dump_resolved(recipe))
        changed = [k for k in ("model", "data", "seed") if old.get(k) != new.get(k)]
        if changed:
            raise VitoptError(f"run directory {run_dir} holds finished stages made with a different "
                              f"{' and '.join(changed)}; use a new name/output_dir or delete the run directory.")
    for sd, cfg in zip(dirs, recipe.stages):
        if sd.done:
            old = sd.read().get("config")
            new = cfg.model_dump(mode="json", by_alias=True)
            if old != new:
                raise VitoptError(f"run directory {run_dir} holds a finished stage {sd.label} that ran with a "
                                  "different config; use a new name/output_dir or delete that stage folder.")


def _build(recipe: Recipe) -> tuple[Any, dict, Any]:
    m = recipe.model
    kwargs = dict(m.kwargs)
    model = create_model(m.name, kwargs, pretrained=m.pretrained, checkpoint=m.checkpoint)
    data = load_data(recipe.data, model_input(model, recipe.data.mean, recipe.data.std), recipe.seed)
    if model.num_classes != data.num_classes:
        if "num_classes" in kwargs:
            raise VitoptError(f"model.kwargs.num_classes is {kwargs['num_classes']} but the {data.name} data has "
                              f"{data.num_classes} classes; make them equal or drop num_classes.")
        model.reset_classifier(data.num_classes)
        kwargs["num_classes"] = data.num_classes
    return model, kwargs, data


def _restore(state: State, record: dict, run_dir: Path) -> None:
    """Apply a finished stage's recorded outputs to the State."""
    for kind, rel in record.get("outputs", {}).items():
        path = run_dir / rel if rel else None
        if kind == "model":
            state.model = load_pruned(path).train()
        elif kind == "teacher":
            state.teacher_dir = path
            state.teacher = load_pruned(path).eval().requires_grad_(False) if path else None
        elif kind == "reference":
            state.reference_dir = path
        elif kind == "gates":
            state.gates = load_weights(path) if path else None
        elif kind == "onnx":
            state.onnx_path = path
    state.results[record["stage"]] = record


def run_recipe(recipe: Recipe, *, run_dir: Path | None = None, console: Console | None = None) -> Path:
    """Run every unfinished stage of ``recipe``; returns the run directory.

    Args:
        recipe: a validated :class:`~vitopt.recipe.Recipe`.
        run_dir: where to run (default ``recipe.output_dir / recipe.name``); an existing one resumes.
        console: rich console for stage headers.

    Raises:
        VitoptError: bad input (model, data, a run dir that holds a different recipe) or a stage
            failure caused by its config; finished stages stay on disk.
    """
    console = console or Console()
    run_dir = Path(run_dir or recipe.output_dir / recipe.name)
    dirs = stage_dirs(recipe, run_dir)
    _check_resumable(recipe, run_dir, dirs)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RECIPE_FILE, dump_resolved(recipe))
    set_seed(recipe.seed)
    model, kwargs, data = _build(recipe)
    state = State(model=model, model_name=recipe.model.name, model_kwargs=kwargs, data=data,
                  seed=recipe.seed, dense={})
    state.dense = state.cost()
    if recipe.log.tensorboard:
        from vitopt.train.tensorboard import TensorBoardLog

        state.logger = TensorBoardLog(run_dir / "tensorboard")
    console.print(f"[bold]vitopt[/] {recipe.name}: {recipe.model.name} on {data.name} "
                  f"({len(data.train)} train / {len(data.val)} val, {data.num_classes} classes), "
                  f"{state.dense['flops'] / 1e6:.1f} MFLOPs, {state.dense['params'] / 1e6:.3f} M params -> {run_dir}")
    try:
        state = _run_stages(recipe, state, dirs, run_dir, console)
    finally:
        if state.logger is not None:
            state.logger.close()
    summary = write_summary(run_dir)
    console.print(f"summary: {summary}")
    return run_dir


def _run_stages(recipe: Recipe, state: State, dirs: list[StageDir], run_dir: Path, console: Console) -> State:
    """Run (or restore) each stage in order; returns the final State."""
    for cfg, sd in zip(recipe.stages, dirs):
        if sd.done:
            _restore(state, sd.read(), run_dir)
            console.print(f"[dim]{sd.label}: finished earlier, skipped[/]")
            continue
        console.rule(f"{sd.label}")
        set_seed(recipe.seed + sd.index)
        sd.path.mkdir(parents=True, exist_ok=True)
        sd.started = time.time()
        state = STAGES[cfg.type](cfg, state, sd)
    return state
