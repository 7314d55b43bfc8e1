"""Run a recipe's stages over a run directory: the one place that orders work.

``run_recipe`` creates (or re-opens) ``output_dir/name``, writes the resolved recipe, builds the model
and data, then runs each stage in order. A stage whose ``metrics.json`` exists already finished: it
is skipped, and the State is restored from the outputs it recorded (model, teacher, gates, ONNX),
so re-running a killed recipe continues from the first unfinished stage (invariant 5 of docs/architecture.md).
That stage (a training stage) continues from its last epoch checkpoint in ``<stage>/checkpoints/``
(:mod:`vitopt.train.checkpoint`) with the data order and RNG the uninterrupted run would have had;
the checkpoints of a stage are deleted once its metrics.json is written. Finished stage folders are
never rewritten.

One run at a time per run directory: ``run_recipe`` holds an exclusive OS file lock on
``RUN_DIR/.vitopt.lock`` (:mod:`filelock`: ``flock`` on POSIX, ``msvcrt.locking`` on Windows) from
before it compares the recipe with the finished stages until it returns. A second ``vitopt run`` into
the same directory stops at once with a VitoptError naming the holder (pid, host, start time from
``.vitopt.lock.json``), instead of skipping stages that the other run is writing with another config.
The operating system drops the lock when its process ends in any way (even SIGKILL), so a killed run
never leaves a stale lock; the empty lock file stays in the run directory.

Before anything is written, :func:`preflight` builds the model and loads the data (the data check:
layout, image files, augmentation defaults resolved for the images) and records the input
preprocessing on the model (:func:`vitopt.arch.config.set_preprocessing`, so every saved ``arch.json``
and exported ONNX carries it). Right before the first stage that runs, ``data.json`` (what the check
found, the augmentation in effect, the warnings) and ``environment.json`` (this machine and software)
are written into the run directory. The console gets a line per finished stage and, at the end of
every run, the stages and final-vs-dense tables of ``summary.md``.

Under ``torchrun`` (:mod:`vitopt.train.distributed`) every rank runs the training and prune stages
(:data:`ALL_RANK_STAGES`) in lock-step; other stages run on rank 0 and the rest restore their
recorded outputs. Only rank 0 writes files, holds the lock and prints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitopt.arch.config import create_model, load_pruned, preprocessing_of, set_preprocessing
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_json, atomic_write_text, load_weights, read_json
from vitopt.recipe import Recipe, dump_resolved
from vitopt.report.environment import collect_environment
from vitopt.report.summary import stage_line, summary_tables, write_summary
from vitopt.stages import STAGES, recipe_choices
from vitopt.stages.base import RECIPE_FILE, StageDir, State
from vitopt.train.data import load_data
from vitopt.train.distributed import all_reduce_sum, barrier, init_from_env, is_distributed, is_main, shutdown
from vitopt.train.inputs import ModelInput, model_input
from vitopt.train.loop import set_seed
from vitopt.train.tensorboard import TensorBoardLog

__all__ = ["run_recipe", "stage_dirs", "run_lock", "preflight", "Preflight", "run_warnings", "ALL_RANK_STAGES",
           "LOCK_FILE", "DATA_FILE", "ENVIRONMENT_FILE"]

#: Stage types every rank of a torchrun job runs (training, and prune, which changes the model every
#: rank trains next). Every other stage (export, validate, ...) runs on rank 0 while the others wait.
ALL_RANK_STAGES = frozenset({"train", "sparse_train", "finetune", "prune"})
#: what the data check found, the augmentation and preprocessing in effect, and the warnings (run directory).
DATA_FILE = "data.json"
#: the machine and software of the last invocation that ran stages (run directory).
ENVIRONMENT_FILE = "environment.json"
#: the run directory's lock file (held while a run works in it) and who holds it.
LOCK_FILE = ".vitopt.lock"
_LOCK_OWNER = ".vitopt.lock.json"


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
        with contextlib.suppress(Exception):  # re-dump through today's schema (new options get defaults)
            old = yaml.safe_load(dump_resolved(Recipe.model_validate(old)))
        new = yaml.safe_load(dump_resolved(recipe))
        changed = [k for k in ("model", "data", "seed") if old.get(k) != new.get(k)]
        if changed:
            raise VitoptError(f"run directory {run_dir} holds finished stages made with a different "
                              f"{' and '.join(changed)}; use a new name/output_dir or delete the run directory.")
    for sd, cfg in zip(dirs, recipe.stages):
        if sd.done:
            _check_same_config(sd, cfg, run_dir)


def _check_same_config(sd: StageDir, cfg: Any, run_dir: Path) -> None:
    """Raise VitoptError when finished stage ``sd`` ran with another config than ``cfg``."""
    old = _normalised(type(cfg), sd.read().get("config"))
    new = cfg.model_dump(mode="json", by_alias=True)
    if old != new:
        raise VitoptError(f"run directory {run_dir} holds a finished stage {sd.label} that ran with a "
                          "different config; use a new name/output_dir or delete that stage folder.")


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold the exclusive lock of ``run_dir`` (created if missing) for the body; see the module docstring.

    Under torchrun rank 0 takes the lock and every rank learns whether it got it (an all-reduce), so all
    ranks fail together.

    Raises:
        VitoptError: another process holds the lock (the message names its pid, host and start time).
    """
    run_dir = Path(run_dir)
    lock, busy = None, 0.0
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run_dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            lock, busy = None, 1.0
    if is_distributed():
        busy = all_reduce_sum([busy])[0]
    if busy:
        raise VitoptError(f"run directory {run_dir} is in use by another vitopt run ({_lock_owner(run_dir)}); wait "
                          "for it to finish, or give this run another name or output_dir.")
    try:
        if lock is not None:
            atomic_write_json(run_dir / _LOCK_OWNER, {
                "pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv})
        yield run_dir
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):
                (run_dir / _LOCK_OWNER).unlink()
            lock.release()


def _lock_owner(run_dir: Path) -> str:
    """``pid N on HOST since TIME`` of the lock holder, as far as its owner file tells."""
    try:
        info = read_json(run_dir / _LOCK_OWNER, "lock owner file")
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (VitoptError, KeyError, TypeError):
        return f"it holds {run_dir / LOCK_FILE}"


def _check_names(recipe: Recipe) -> None:
    """Check the recipe's registry names (criteria, runtimes, group kinds) before any work: a Recipe built
    in Python was not validated against the registries (the CLI's loader already was)."""
    try:
        Recipe.model_validate(recipe.model_dump(mode="json", by_alias=True, exclude_unset=True),
                              context={"choices": recipe_choices()})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"] if not str(p).endswith("]"))
        raise VitoptError(f"recipe {recipe.name}: {where}: {err['msg']}.") from None


def _normalised(schema: type, config: Any) -> Any:
    """``config`` as the current ``schema`` dumps it, so options added to a stage type since the stage
    ran (with their defaults) do not count as a change; a config the schema no longer accepts is
    returned as is (and so differs)."""
    try:
        return schema.model_validate(config).model_dump(mode="json", by_alias=True)
    except Exception:  # noqa: BLE001 - any validation failure means "changed"
        return config


@dataclass
class Preflight:
    """What a run starts from: the model, the data, and what vitopt makes of them (:func:`preflight`).

    Attributes:
        model: the timm model (its classifier sized to the data), with the preprocessing record set
            (:func:`vitopt.arch.config.set_preprocessing`).
        model_kwargs: ``timm.create_model`` kwargs (``num_classes`` added when the data set it).
        data: the :class:`~vitopt.train.data.DataBundle` (its ``check``, ``augment`` and ``preprocessing``).
        input: the model's :class:`~vitopt.train.inputs.ModelInput`.
        warnings: sentences about settings that run but probably are not what was meant.
        stats_source: where mean/std came from, in words.
    """

    model: Any
    model_kwargs: dict[str, Any]
    data: Any
    input: ModelInput
    warnings: list[str] = field(default_factory=list)
    stats_source: str = ""

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing record with the class names (what arch.json, the ONNX and the bundle get)."""
        return {**self.data.preprocessing, "class_names": list(self.data.class_names)}

    def lines(self, recipe: Recipe) -> list[str]:
        """What the data check found and the preprocessing in effect, one line each (``vitopt recipe check``)."""
        d, mi = self.data, self.input
        out = [f"data {d.name}: " + (d.check.describe() if d.check is not None else
                                     f"{len(d.train)} train / {len(d.val)} val images, {d.num_classes} classes")]
        if d.check is not None and d.check.unreadable:
            shown = ", ".join(d.check.unreadable[:3]) + (", ..." if len(d.check.unreadable) > 3 else "")
            out.append(f"left out (data.skip_corrupt): {len(d.check.unreadable)} unreadable files: {shown}")
        p = d.preprocessing
        out.append(f"model input: {mi.in_chans} x {mi.img_size[0]} x {mi.img_size[1]} (PIL mode {p['image_mode']}), "
                   f"mean {_fmt(p['mean'])}, std {_fmt(p['std'])} ({self.stats_source})")
        aug = d.augment
        if aug is not None:
            out.append(f"eval transform: resize to {mi.img_size[0]} / crop_pct {p['crop_pct']:g}, center crop "
                       f"{mi.img_size[0]} x {mi.img_size[1]}, {p['interpolation']}")
            out.append(f"train augmentation: {aug.describe()}")
        elif recipe.data.type == "digits":
            out.append("eval and train: the 8x8 digits scaled to [0, 1] and resized (bilinear) once, no augmentation")
        else:
            out.append("eval and train: resize (bilinear, antialiased) to the model input, no crop, no augmentation "
                       "(data.augment: null)")
        return out


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def preflight(recipe: Recipe, *, weights: bool = True) -> Preflight:
    """Build the recipe's model and load its data, checking both before anything is written.

    The data check (:func:`vitopt.train.data.load_data`: layout, image files, augmentation defaults
    resolved for the images found) runs here, so ``vitopt recipe check`` (``weights=False``) and every run
    (before its first stage) find the same problems.

    Args:
        recipe: a validated recipe.
        weights: load ``model.pretrained`` / ``model.checkpoint`` weights (False: architecture only).

    Returns:
        :class:`Preflight`, with :func:`run_warnings` in ``warnings``.

    Raises:
        VitoptError: an unknown model, bad kwargs or checkpoint, data that cannot be loaded, or
            ``model.kwargs.num_classes`` that differs from the data's classes.
    """
    m = recipe.model
    kwargs = dict(m.kwargs)
    model = create_model(m.name, kwargs, pretrained=m.pretrained and weights, checkpoint=m.checkpoint if weights else None)
    mi = model_input(model, recipe.data.mean, recipe.data.std)
    data = load_data(recipe.data, mi, recipe.seed)
    if model.num_classes != data.num_classes:
        if "num_classes" in kwargs:
            raise VitoptError(f"model.kwargs.num_classes is {kwargs['num_classes']} but the {data.name} data has "
                              f"{data.num_classes} classes; make them equal or drop num_classes.")
        model.reset_classifier(data.num_classes)
        kwargs["num_classes"] = data.num_classes
    pre = Preflight(model, kwargs, data, mi)
    if recipe.data.mean is not None or recipe.data.std is not None:
        pre.stats_source = "data.mean / data.std of the recipe"
    else:
        cfg_mean = (getattr(model, "pretrained_cfg", None) or {}).get("mean") or ()
        pre.stats_source = f"the pretrained_cfg of {m.name}" + (
            f": its {len(cfg_mean)}-channel values averaged to {mi.in_chans}" if len(cfg_mean) not in (0, mi.in_chans)
            else "")
    set_preprocessing(model, pre.preprocessing())
    pre.warnings = run_warnings(recipe, mi, data)
    return pre


#: stage types that train the model they get.
_TRAINING = ("train", "sparse_train", "finetune")


def run_warnings(recipe: Recipe, mi: ModelInput, data: Any) -> list[str]:
    """Sentences about a recipe that runs but probably does not do what was meant (printed, not raised).

    * single-channel images into a 3-channel model: each image is repeated into 3 identical channels;
    * a prune (or export / validate) that comes before any training, on a model with neither pretrained
      weights nor a checkpoint: it works on random weights, so its importance scores and its top-1
      (about 100 / classes %) say nothing.
    """
    out = []
    if data.check is not None and data.check.gray and mi.in_chans == 3:
        given = recipe.model.kwargs.get("in_chans")
        out.append(f"data {data.name}: every image opened is single-channel (gray) but the model takes 3 input "
                   f"channels (model.kwargs.in_chans {'3' if given is not None else 'not set, timm default 3'}), so "
                   "each image is repeated into 3 identical channels; set model.kwargs.in_chans: 1 unless the "
                   "model starts from RGB pretrained weights")
    if not recipe.model.pretrained and recipe.model.checkpoint is None:
        for i, st in enumerate(recipe.stages):
            if st.type in _TRAINING:
                break
            if st.type in ("prune", "export", "validate"):
                verb = {"prune": "prunes", "export": "exports", "validate": "validates"}[st.type]
                out.append(f"stages[{i}] ({st.type}) {verb} a randomly initialised model: model.pretrained is false, "
                           "model.checkpoint is not set and no train, sparse_train or finetune stage comes before "
                           f"it, so its {'importance scores and ' if st.type == 'prune' else ''}top-1 (chance is "
                           f"{100 / max(1, data.num_classes):.0f}%) say nothing about a trained model; add a train "
                           "stage before it, or set model.pretrained: true or model.checkpoint")
                break
    return out


def _restore(state: State, record: dict, run_dir: Path) -> None:
    """Apply a finished stage's recorded outputs to the State."""
    prep = preprocessing_of(state.model)        # runs made before the record existed get today's
    for kind, rel in record.get("outputs", {}).items():
        path = run_dir / rel if rel else None
        if kind == "model":
            state.model = _with_preprocessing(load_pruned(path).train(), prep)
        elif kind == "teacher":
            state.teacher_dir = path
            state.teacher = (_with_preprocessing(load_pruned(path).eval().requires_grad_(False), prep)
                             if path else None)
        elif kind == "reference":
            state.reference_dir = path
        elif kind == "gates":
            state.gates = load_weights(path) if path else None
        elif kind == "onnx":
            _check_onnx(path, record["stage"])
            state.onnx_path = path
    state.results[record["stage"]] = record


def _with_preprocessing(model: Any, prep: dict[str, Any] | None) -> Any:
    if prep is not None and preprocessing_of(model) is None:
        set_preprocessing(model, prep)
    return model


def _check_onnx(path: Path | None, stage: str) -> None:
    """A finished stage's ONNX file must still pass ``onnx.checker`` before later stages use it."""
    if path is None:
        return
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises ValidationError, or protobuf DecodeError for garbage
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise VitoptError(f"ONNX file {path} recorded by finished stage {stage} fails the ONNX checker ({first}); "
                          f"delete the {stage} folder to export it again.") from None


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
    started = init_from_env()
    try:
        with _quiet_unless_main():
            return _run_recipe(recipe, run_dir, console)
    finally:
        if started:
            shutdown()


@contextlib.contextmanager
def _quiet_unless_main():
    """On ranks other than 0 of a torchrun job, discard stdout (stage tables, epoch lines): rank 0 logs."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _run_recipe(recipe: Recipe, run_dir: Path | None, console: Console | None) -> Path:
    console = console if console is not None and is_main() else Console(quiet=not is_main())
    if run_dir is not None and not Path(run_dir).is_dir():
        raise VitoptError(f"--resume {run_dir}: that run directory does not exist; give an existing run directory, "
                          f"or leave --resume out to use output_dir/name.")
    run_dir = Path(run_dir or recipe.output_dir / recipe.name)
    _check_names(recipe)
    dirs = stage_dirs(recipe, run_dir)
    set_seed(recipe.seed)
    pre = preflight(recipe)                             # bad model/data fail before the run dir is touched
    model, kwargs, data = pre.model, pre.model_kwargs, pre.data
    with run_lock(run_dir):
        _check_resumable(recipe, run_dir, dirs)
        if is_main():
            atomic_write_text(run_dir / RECIPE_FILE, dump_resolved(recipe))
        state = State(model=model, model_name=recipe.model.name, model_kwargs=kwargs, data=data,
                      seed=recipe.seed, dense={})
        state.dense = state.cost()
        if recipe.log.tensorboard and is_main():
            state.logger = TensorBoardLog(run_dir / "tensorboard")
        console.print(f"[bold]vitopt[/] {recipe.name}: {recipe.model.name} on {data.name} "
                      f"({len(data.train)} train / {len(data.val)} val, {data.num_classes} classes), "
                      f"{state.dense['flops'] / 1e6:.1f} MFLOPs, {state.dense['params'] / 1e6:.3f} M params -> {run_dir}",
                      highlight=False, soft_wrap=True)
        for line in pre.lines(recipe):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        for w in pre.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}.", highlight=False, soft_wrap=True)

        def record() -> None:
            if is_main():
                _record_run(run_dir, pre, [sd.label for sd in dirs if not sd.done])

        try:
            state = _run_stages(recipe, state, dirs, run_dir, console, before_first=record)
        finally:
            if state.logger is not None:
                state.logger.close()
        if is_main():
            summary = write_summary(run_dir)
            _print_final(console, run_dir)
            console.print(f"summary: {summary}", highlight=False, soft_wrap=True)
    return run_dir


def _record_run(run_dir: Path, pre: Preflight, to_run: list[str]) -> None:
    """Write ``data.json`` (data check, augmentation, preprocessing, warnings) and ``environment.json`` (this
    machine and its software: the one that trains and measures the stages about to run, ``to_run``).
    Called right before the first stage that runs, so a re-run that only restores finished stages (or
    fails while restoring them) leaves both as the run that made those stages wrote them."""
    aug = pre.data.augment
    atomic_write_json(run_dir / DATA_FILE, {
        "check": pre.data.check.to_json() if pre.data.check is not None else None,
        "augment": ({**asdict(aug), "scale": list(aug.scale)} if aug is not None else None),
        "preprocessing": pre.preprocessing(), "warnings": pre.warnings})
    atomic_write_json(run_dir / ENVIRONMENT_FILE, {**collect_environment(), "stages_run_here": to_run})


def _print_final(console: Console, run_dir: Path) -> None:
    """The run's final tables (stages; final vs dense when a validate stage ran), as in summary.md. Off a
    terminal (a log file) they are drawn at least 120 columns wide, so their rows stay on one line."""
    saved = console.width
    if not console.is_terminal:
        console.width = max(saved, 120)
    try:
        for title, header, rows in summary_tables(run_dir):
            table = Table(title=title, title_justify="left")
            for i, col in enumerate(header):
                table.add_column(col, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*(str(c) for c in row))
            console.print(table)
    finally:
        console.width = saved


def _run_stages(recipe: Recipe, state: State, dirs: list[StageDir], run_dir: Path, console: Console,
                before_first: Any = None) -> State:
    """Run (or restore) each stage in order; returns the final State. ``before_first()`` is called once, right
    before the first stage that runs (not when every stage is restored)."""
    for cfg, sd in zip(recipe.stages, dirs):
        if sd.done:
            _check_same_config(sd, cfg, run_dir)         # it may have finished since the run started
            _restore(state, sd.read(), run_dir)
            _drop_checkpoints(sd)
            console.print(f"[dim]{sd.label}: finished earlier, skipped[/]")
            continue
        if before_first is not None:
            before_first()
            before_first = None
        console.rule(f"{sd.label}")
        set_seed(recipe.seed + sd.index)
        sd.path.mkdir(parents=True, exist_ok=True)
        sd.started = time.time()
        if cfg.type in ALL_RANK_STAGES or not is_distributed():
            state = STAGES[cfg.type](cfg, state, sd)
            barrier()
        else:
            state = _on_rank0(cfg, state, sd, run_dir)
        _drop_checkpoints(sd)
        if sd.label in state.results:
            console.print(stage_line(state.results[sd.label]), highlight=False, markup=False, soft_wrap=True)
    return state


def _on_rank0(cfg: Any, state: State, sd: StageDir, run_dir: Path) -> State:
    """Run a stage on rank 0 only; the other ranks then restore its recorded outputs from metrics.json."""
    failed = 0.0
    if is_main():
        try:
            state = STAGES[cfg.type](cfg, state, sd)
        except BaseException:
            all_reduce_sum([1.0])
            raise
    failed = all_reduce_sum([failed])[0]
    if failed:
        raise VitoptError(f"stage {sd.label} failed on rank 0 (its message is in rank 0's output).")
    if not is_main():
        _restore(state, sd.read(), run_dir)
    return state


def _drop_checkpoints(sd: StageDir) -> None:
    """Delete a finished stage's epoch checkpoints (rank 0): its model and metrics.json are what it keeps."""
    if sd.done and is_main() and sd.checkpoint_dir.is_dir():
        shutil.rmtree(sd.checkpoint_dir, ignore_errors=True)
