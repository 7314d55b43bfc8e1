"""The ``vitopt`` command line (typer): run, recipe check|schema, inspect, export, report.

Every command turns bad input into one sentence on stderr and exit code 2 (never a traceback);
an interrupted ``run`` keeps its finished stages and says how to resume.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from vitopt.errors import VitoptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Vision Transformers small and fast: prune, fine-tune, export, validate.")
recipe_app = typer.Typer(no_args_is_help=True, help="Validate recipes and print their JSON Schema.")
app.add_typer(recipe_app, name="recipe")
console = Console()

SET_HELP = "Override a recipe value, e.g. --set stages[2].target.flops=0.4 (repeatable)."


@app.command()
def run(recipe: Path = typer.Argument(..., help="YAML recipe."),
        set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Run directory to continue (default: "
                                              "output_dir/name, which also resumes when it exists).")) -> None:
    """Run a recipe's stages; finished stages of an existing run directory are skipped."""
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe

    r = load_recipe(recipe, set_)
    try:
        run_recipe(r, run_dir=resume, console=console)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; finished stages are kept - run the same command to resume.[/]")
        raise typer.Exit(130)


@recipe_app.command("check")
def recipe_check(recipe: Path = typer.Argument(..., help="YAML recipe."),
                 set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP)) -> None:
    """Validate a recipe and print its stages."""
    from vitopt.recipe import load_recipe

    r = load_recipe(recipe, set_)
    console.print(f"{recipe}: ok - {r.model.name} on {r.data.type}, stages: "
                  + " -> ".join(s.type for s in r.stages))


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe JSON Schema."""
    from vitopt.recipe import recipe_json_schema

    sys.stdout.write(json.dumps(recipe_json_schema(), indent=2) + "\n")


def _model_dir(path: Path) -> Path:
    """A model folder, or a run folder (-> its last stage's model)."""
    if (path / "arch.json").is_file():
        return path
    candidates = sorted(path.glob("[0-9][0-9]_*/model/arch.json"))
    if not candidates:
        raise VitoptError(f"{path} holds no arch.json (give a model folder or a run directory).")
    return candidates[-1].parent


@app.command()
def inspect(path: Path = typer.Argument(..., help="Model folder (arch.json + model.safetensors) or run directory.")) -> None:
    """Print per-block heads, head_dim, mlp hidden, MFLOPs and params of a saved model."""
    from vitopt.arch.config import load_pruned
    from vitopt.arch.cost import CostModel

    mdir = _model_dir(path)
    model = load_pruned(mdir)
    cm = CostModel(model)
    dims = cm.structure.sizes()
    macs = cm.family.macs(model, dims)
    table = Table(title=f"{mdir}  ({type(model).__name__}, embed_dim {dims['embed']})")
    for col in ("block", "heads", "head_dim", "mlp hidden", "MFLOPs"):
        table.add_column(col, justify="right")
    for i in range(len(model.blocks)):
        table.add_row(str(i), *(str(dims[f"blocks.{i}.{k}"]) for k in ("heads", "head_dim", "mlp")),
                      f"{2 * macs[f'blocks.{i}'] / 1e6:.2f}")
    table.caption = (f"total {cm.flops(dims) / 1e6:.2f} MFLOPs (2 x MACs, one image), "
                     f"{cm.params(dims) / 1e6:.4f} M params")
    console.print(table)


@app.command()
def export(path: Path = typer.Argument(..., help="Model folder or run directory."),
           out: Path = typer.Option(..., "--out", "-o", help="Destination .onnx file."),
           opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
           static_batch: bool = typer.Option(False, help="Fix batch to 1 instead of a dynamic axis.")) -> None:
    """Export a saved model to ONNX (simplified, checked, verified against PyTorch)."""
    from vitopt.arch.config import load_pruned
    from vitopt.deploy.onnx_export import export_onnx
    from vitopt.stages.export import input_shape

    model = load_pruned(_model_dir(path))
    info = export_onnx(model, out, input_shape(model), opset=opset, dynamic_batch=not static_batch)
    console.print(f"wrote {info['path']} (opset {info['opset']}, {info['exporter']} exporter)")


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="One or more run directories."),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report .html file or folder "
                                              "(default: inside the first run directory).")) -> None:
    """Write summary.md of each run and one self-contained HTML report (plots embedded) across them."""
    from vitopt.report import write_report
    from vitopt.report.summary import write_summary

    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise VitoptError(f"run directory {run_dir} does not exist.")
        write_summary(run_dir)
    paths = write_report(list(run_dirs), out)
    console.print(f"wrote {paths['html']} and {paths['markdown']}")


def _dense_model_dir(path: Path) -> Path:
    """A model folder, or a run folder's FIRST stage model (the dense widths a latency table must cover)."""
    if (path / "arch.json").is_file():
        return path
    _model_dir(path)                                        # same error for a folder with no model
    return sorted(path.glob("[0-9][0-9]_*/model/arch.json"))[0].parent


@app.command("measure-lut")
def measure_lut_cmd(path: Path = typer.Argument(..., help="Model folder, or run directory (its first stage's model)."),
                    out: Path = typer.Option(..., "--out", "-o", help="Destination JSON file."),
                    runtime: str = typer.Option("onnxruntime", help="Runtime to time: onnxruntime or pytorch."),
                    batch_size: int = typer.Option(1, min=1, help="Images per call."),
                    threads: int = typer.Option(2, min=1, help="CPU threads of the runtime."),
                    grid_points: int = typer.Option(4, min=2, help="Grid points per axis (embed, attn, mlp)."),
                    device: str = typer.Option("cpu", help="cpu, or cuda for the PyTorch runtime on a GPU."),
                    statistic: str = typer.Option("min", help="Timing statistic per probe: min or median.")) -> None:
    """Measure a latency lookup table for target.latency_ms budgets (NViT / HALP style)."""
    from vitopt.arch.config import ArchConfig, load_pruned
    from vitopt.io import read_json
    from vitopt.pruning.latency_lut import measure_lut, measure_model_latency

    mdir = _dense_model_dir(path)
    arch = ArchConfig.from_json(read_json(mdir / "arch.json", "architecture file"))
    model = load_pruned(mdir)
    opts = dict(runtime=runtime, batch_size=batch_size, threads=threads, device=device, statistic=statistic)
    table = measure_lut(model, grid_points=grid_points, model_name=arch.model_name, model_kwargs=arch.model_kwargs,
                        **opts)
    table.reference_ms = measure_model_latency(model, **opts)
    table.save(out)
    summary = Table(title=f"latency table for {mdir} ({runtime}, {table.device}, batch {batch_size})")
    summary.add_column("whole model", justify="left")
    summary.add_column("ms", justify="right")
    summary.add_row("predicted by the table", f"{table.predicted_model_ms:.3f}")
    summary.add_row("measured", f"{table.reference_ms:.3f}")
    console.print(summary)
    console.print(f"wrote {out}")


def main() -> None:
    """Console-script entry point: run the app; VitoptError -> one sentence on stderr, exit 2."""
    try:
        app(standalone_mode=False)
    except VitoptError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(VitoptError.EXIT_CODE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
