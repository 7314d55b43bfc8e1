"""The ``vitopt`` command line (typer): run, recipe check|schema, inspect, export, report.

Every command turns bad input into one sentence on stderr and exit code 2 (never a traceback);
an interrupted ``run`` keeps its finished stages and says how to resume.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vitopt import rundir
from vitopt.arch.config import ArchConfig, load_pruned
from vitopt.arch.cost import CostModel
from vitopt.deploy import tensorrt_build as tb
from vitopt.deploy.doctor import doctor as diagnose_path
from vitopt.deploy.lut import measure_lut, measure_model_latency
from vitopt.deploy.onnx_export import export_onnx
from vitopt.deploy.runtimes import RUNTIMES
from vitopt.deploy.targets import load_targets
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_json, atomic_write_text, read_json
from vitopt.pipeline import preflight, run_recipe
from vitopt.recipe import load_recipe, recipe_json_schema
from vitopt.report import write_report
from vitopt.report.summary import write_summary
from vitopt.stages import recipe_choices
from vitopt.train.inputs import input_shape

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Vision Transformers small and fast: prune, fine-tune, export, validate.")
recipe_app = typer.Typer(no_args_is_help=True, help="Validate recipes and print their JSON Schema.")
app.add_typer(recipe_app, name="recipe")
console = Console()

SET_HELP = "Override a recipe value, e.g. --set stages[2].target.flops=0.4 (repeatable)."


@app.command()
def run(recipe: Path = typer.Argument(..., help="YAML recipe."),
        set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
        resume: Path | None = typer.Option(None, "--resume", help="Run directory to continue (default: "
                                              "output_dir/name, which also resumes when it exists).")) -> None:
    """Run a recipe's stages; finished stages of an existing run directory are skipped and an interrupted
    training stage continues from its last epoch checkpoint. Under torchrun only rank 0 prints."""

    r = load_recipe(recipe, set_, choices=recipe_choices())
    try:
        run_recipe(r, run_dir=resume, console=console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; finished stages and the last epoch checkpoint are kept - run the same "
                      "command to resume.[/]")
        raise typer.Exit(130) from None


@recipe_app.command("check")
def recipe_check(recipe: Path = typer.Argument(..., help="YAML recipe."),
                 set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
                 no_data: bool = typer.Option(False, "--no-data", help="Validate the recipe only: build no model "
                                              "and open no data (on a machine without the dataset).")) -> None:
    """Validate a recipe, check its data (layout, image files), and print the preprocessing and augmentation in
    effect (every "auto" default resolved for the images found) and any warnings."""

    r = load_recipe(recipe, set_, choices=recipe_choices())
    pre = None if no_data else preflight(r, weights=False)   # the model's architecture and the data, as a run
    console.print(f"{recipe}: ok - {r.model.name} on {r.data.type}, stages: "
                  + " -> ".join(s.type for s in r.stages), highlight=False, soft_wrap=True)
    if pre is None:
        return
    for line in pre.lines(r):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for w in pre.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}.", highlight=False, soft_wrap=True)


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe JSON Schema."""

    sys.stdout.write(json.dumps(recipe_json_schema(recipe_choices()), indent=2) + "\n")


@app.command()
def inspect(path: Path = typer.Argument(..., help="Model folder (arch.json + model.safetensors) or run directory.")) -> None:
    """Print per-block heads, head_dim, mlp hidden, MFLOPs and params of a saved model (any family)."""

    mdir = rundir.model_dir(path)
    model = load_pruned(mdir)
    cm = CostModel(model)
    dims = cm.structure.sizes()
    macs = cm.family.macs(model, dims)
    rows: dict[int, dict] = {}
    for name, g in cm.structure.groups.items():
        if g.block is not None:
            row = rows.setdefault(g.block, {"prefix": name.rsplit(".", 1)[0], "stage": g.stage})
            row[g.kind] = dims[name]
    embed = [dims[n] for n, g in cm.structure.groups.items() if g.kind == "embed"]
    staged = any(r["stage"] is not None for r in rows.values())
    table = Table(title=f"{mdir}  ({type(model).__name__}, embed_dim {'/'.join(map(str, embed))})")
    for col in ("block", *(("stage",) if staged else ()), "heads", "head_dim", "mlp hidden", "MFLOPs"):
        table.add_column(col, justify="right")
    for b in sorted(rows):
        r = rows[b]
        table.add_row(str(b), *((str(r["stage"]),) if staged else ()),
                      *(str(r.get(k, "-")) for k in ("heads", "head_dim", "mlp")),
                      f"{2 * float(macs[r['prefix']]) / 1e6:.2f}")
    table.caption = (f"total {cm.flops(dims) / 1e6:.2f} MFLOPs (2 x MACs, one image), "
                     f"{cm.params(dims) / 1e6:.4f} M params"
                     + ("; head_dim fixed under RoPE" if "head_dim" in cm.structure.fixed_kinds else ""))
    console.print(table)


@app.command()
def export(path: Path = typer.Argument(..., help="Model folder or run directory."),
           out: Path = typer.Option(..., "--out", "-o", help="Destination .onnx file."),
           opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
           static_batch: bool = typer.Option(False, help="Fix batch to 1 instead of a dynamic axis.")) -> None:
    """Export a saved model to ONNX (simplified, checked, verified against PyTorch)."""

    model = load_pruned(rundir.model_dir(path))
    info = export_onnx(model, out, input_shape(model), opset=opset, dynamic_batch=not static_batch)
    console.print(f"wrote {info['path']} (opset {info['opset']}, {info['exporter']} exporter)")


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="One or more run directories."),
           out: Path | None = typer.Option(None, "--out", "-o", help="Report .html file or folder "
                                              "(default: inside the first run directory).")) -> None:
    """Write summary.md of each run and one self-contained HTML report (plots embedded) across them."""

    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise VitoptError(f"run directory {run_dir} does not exist.")
        write_summary(run_dir)
    paths = write_report(list(run_dirs), out)
    console.print(f"wrote {paths['html']} and {paths['markdown']}")


@app.command("measure-lut")
def measure_lut_cmd(path: Path = typer.Argument(..., help="Model folder, or run directory (its first stage's model)."),
                    out: Path = typer.Option(..., "--out", "-o", help="Destination JSON file."),
                    runtime: str = typer.Option("onnxruntime", help="Runtime to time: onnxruntime, pytorch, "
                                                                     "pytorch-compile or tensorrt (an engine per "
                                                                     "probe, on this GPU)."),
                    batch_size: int = typer.Option(1, min=1, help="Images per call."),
                    threads: int = typer.Option(2, min=1, help="CPU threads of the runtime."),
                    grid_points: int = typer.Option(4, min=2, help="Grid points per axis (embed, attn, mlp)."),
                    device: str = typer.Option("cpu", help="cpu, or cuda for the PyTorch runtime on a GPU."),
                    statistic: str = typer.Option("min", help="Timing statistic per probe: min, p50 or mean."),
                    target: str | None = typer.Option(None, "--target", "-t", help="With --runtime tensorrt: the "
                                                          "target profile the table prices (see `vitopt targets`)."),
                    precision: str = typer.Option("fp32", "--precision", "-p", help="With --runtime tensorrt: the "
                                                  "engine precision (fp32, fp16, bf16, int8, fp8)."),
                    trt_opt_level: int = typer.Option(3, min=0, max=5, help="Builder optimization level of the "
                                                      "probe engines (lower builds faster).")) -> None:
    """Measure a latency lookup table for target.latency_ms budgets (NViT / HALP style), on a CPU runtime or in
    TensorRT milliseconds on the deployment target."""

    mdir = rundir.first_model_dir(path)
    arch = ArchConfig.from_json(read_json(mdir / "arch.json", "architecture file"))
    model = load_pruned(mdir)
    opts = dict(runtime=runtime, batch_size=batch_size, threads=threads, device=device, statistic=statistic)
    if runtime == "tensorrt" or target is not None or precision != "fp32":
        opts.update(target=target, precision=precision, trt_opt_level=trt_opt_level)
    table = measure_lut(model, grid_points=grid_points, model_name=arch.model_name, model_kwargs=arch.model_kwargs,
                        **opts)
    table.reference_ms = measure_model_latency(model, **opts)
    table.save(out)
    summary = Table(title=f"latency table for {mdir} ({runtime}, {table.device}, {table.precision}, batch {batch_size}"
                          + (f", target {table.target}" if table.target else "") + ")")
    summary.add_column("whole model", justify="left")
    summary.add_column("ms", justify="right")
    summary.add_row("predicted by the table", f"{table.predicted_model_ms:.3f}")
    summary.add_row("measured", f"{table.reference_ms:.3f}")
    console.print(summary)
    console.print(f"wrote {out}")


# ------------------------------------------------------------------ deployment: validate, targets, build, bundle
deploy_app = typer.Typer(no_args_is_help=True, help="Deployment bundles for devices (Jetson).")
app.add_typer(deploy_app, name="deploy")


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise VitoptError(f"{what} {text!r} must be comma-separated positive integers, e.g. 1,32.")
    return values


@app.command()
def validate(artifact: Path = typer.Argument(..., help="Run directory, model folder, .onnx or .engine file."),
             runtime: list[str] = typer.Option(["onnxruntime"], "--runtime", "-r", help="A runtime kind (repeatable): "
                                               + ", ".join(RUNTIMES) + "."),
             batch_sizes: str = typer.Option("1,32", help="Latency batch sizes, comma-separated."),
             data: Path | None = typer.Option(None, help="Validation sample .npz (images, labels); default: the "
                                                 "validation split of the artifact's run."),
             threads: int = typer.Option(2, min=1, help="CPU threads of the CPU runtimes."),
             device: str = typer.Option("cpu", help="cpu or cuda for the PyTorch runtimes."),
             warmup: int = typer.Option(10, min=0, help="Untimed calls per batch size."),
             repeats: int = typer.Option(50, min=1, help="Timed calls per batch size."),
             out: Path | None = typer.Option(None, "--out", "-o", help="Write the measurements as JSON.")) -> None:
    """Top-1, agreement with PyTorch and latency p50/p90/p99 of an artifact on one or more runtimes."""

    res = rundir.validate(artifact, runtime, batch_sizes=_int_list(batch_sizes, "--batch-sizes"), data=data,
                          threads=threads, device=device, warmup=warmup, repeats=repeats)
    bss = [str(b) for b in res["batch_sizes"]]
    table = Table(title=f"{artifact} on {res['num_images']} images ({res['data']})")
    for col in ["runtime", "top-1 %", "max |dlogit| vs pytorch", "argmax agree"] + [f"p50/p90/p99 ms @{b}" for b in bss]:
        table.add_column(col, justify="right")
    notes = []
    for kind, r in res["runtimes"].items():
        par = r.get("vs_pytorch", {})
        lat = [f"{r['latency'][b]['p50_ms']:.3f}/{r['latency'][b]['p90_ms']:.3f}/{r['latency'][b]['p99_ms']:.3f}"
               if b in r["latency"] else "-" for b in bss]
        table.add_row(kind, f"{r['top1']:.2f}", f"{par['max_abs_diff']:.2e}" if par else "-",
                      f"{par['argmax_agreement']:.4f}" if par else "-", *lat)
        plan = r.get("batches") or {}
        if plan.get("capped"):
            notes.append(f"{kind}: its optimization profile takes batches {plan['profile'][0]}..{plan['profile'][2]}, "
                         f"so latency was measured at {', '.join(map(str, plan['latency']))} and top-1 in batches of "
                         f"{plan['eval_batch']}.")
        extra = [f"@{b}: {v['h2d_p50_ms']:.3f} ms" for b, v in r["latency"].items() if "h2d_p50_ms" in v]
        if extra:
            notes.append(f"{kind}: engine-only latency (CUDA events on its stream); host-to-device copy p50 "
                         + ", ".join(extra) + ".")
    console.print(table)
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)
    if out is not None:
        atomic_write_json(out, res)
        console.print(f"wrote {out}")


@app.command()
def targets() -> None:
    """List the deployment target profiles (GPUs and Jetson modules) builds and bundles use."""

    table = Table(title="deployment targets (vitopt/deploy/targets.yaml)")
    for col in ("target", "device", "sm", "memory", "precisions", "DLA", "TensorRT", "batch (min/opt/max)",
                "workspace"):
        table.add_column(col)
    for key, t in load_targets().items():
        trt = ", ".join(f"{m}.x" for m in t.tensorrt_majors) + (f" (JetPack {t.jetpack})" if t.jetpack else "")
        dla = str(t.dla_cores) + (f" (TensorRT 11: >= {t.dla_tensorrt11}, JetPack >= {t.dla_tensorrt11_jetpack})"
                                  if t.dla_tensorrt11 else "")
        table.add_row(key, t.name, t.compute_capability, f"{t.memory_gib:g} GiB", ", ".join(t.precisions),
                      dla, trt, "/".join(str(b) for b in t.profile), f"{t.workspace_mib} MiB")
    console.print(table)


@app.command()
def build(path: Path = typer.Argument(..., help="ONNX model (Q/DQ for int8/fp8); with --backend torch_tensorrt a model "
                                                "folder or run directory."),
          target: str = typer.Option(..., "--target", "-t", help="Target profile (see `vitopt targets`)."),
          precision: str = typer.Option("fp16", "--precision", "-p", help="fp32, fp16, bf16, int8 or fp8."),
          out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: next to the ONNX)."),
          backend: str = typer.Option("tensorrt", help="tensorrt (TensorRT Python API from ONNX) or torch_tensorrt "
                                                       "(Torch-TensorRT from the PyTorch model; a .ep program)."),
          trt_major: int | None = typer.Option(None, help="TensorRT major (10 or 11); default: installed, "
                                                  "else the target's."),
          profile: str | None = typer.Option(None, help="Batch sizes min,opt,max (default: the target's)."),
          workspace_mib: int | None = typer.Option(None, min=1, help="Workspace pool in MiB."),
          opt_level: int = typer.Option(3, min=0, max=5, help="Builder optimization level."),
          sparsity: bool = typer.Option(False, help="Enable 2:4 sparse weights."),
          dla_core: int | None = typer.Option(None, min=0, help="DLA core with GPU fallback (Orin); static profile."),
          dla_min_fraction: float = typer.Option(tb.DLA_MIN_FRACTION, min=0.0, max=1.0,
                                                 help="Refuse a DLA engine with fewer layers on DLA than this."),
          version_compatible: bool = typer.Option(False, help="Build a version-compatible engine."),
          timing_cache: Path | None = typer.Option(None, help="Timing cache file reused across builds (default: one "
                                                       "per GPU model and TensorRT version in the output folder)."),
          dry_run: bool = typer.Option(False, help="Only derive the build and write the trtexec command.")) -> None:
    """Build a TensorRT engine for a target (and write the equivalent trtexec command), or a Torch-TensorRT program."""
    import shlex

    major = trt_major
    if major is None and not dry_run and importlib.util.find_spec("tensorrt") is not None:
        major = tb.tensorrt_major(tb.require_tensorrt())
    opts = dict(trt_major=major, profile=tuple(_int_list(profile, "--profile")) if profile else None,
                workspace_mib=workspace_mib, opt_level=opt_level, sparsity=sparsity, dla_core=dla_core,
                version_compatible=version_compatible, backend=backend, dla_min_fraction=dla_min_fraction)
    if backend == "torch_tensorrt":
        model = load_pruned(rundir.model_dir(path))
        cfg = tb.derive_build_config(target, precision, input_chw=input_shape(model), **opts)
        if dry_run:
            console.print(f"torch_tensorrt build of {path}: {json.dumps(cfg.to_json())}", highlight=False,
                          soft_wrap=True)
            return
        rec = tb.compile_torch_tensorrt(model, cfg, out or rundir.model_dir(path))
        console.print(f"wrote {rec['program']} (Torch-TensorRT {rec['torch_tensorrt_version']}, {rec['device']}, "
                      f"{rec['build_seconds']:.1f} s); validate it with --runtime torch-tensorrt")
        return
    info = tb.onnx_info(path)
    cfg = tb.derive_build_config(target, precision, input_name=info.input_name, input_chw=info.input_chw,
                                 fixed_batch=info.batch, **opts)
    out_dir = out or path.parent
    source = info.path
    cast = {"fp16": "FLOAT16", "bf16": "BFLOAT16"}.get(cfg.graph_needs)
    if dry_run and cast and cast not in info.float_types:
        source = out_dir / f"model_{precision}.onnx"          # what the real build's AutoCast step writes
        console.print(f"note: a strongly typed TensorRT {cfg.trt_major} {precision} build first converts {path} with "
                      f"ModelOpt AutoCast into {source}", highlight=False, soft_wrap=True)
    else:
        if not dry_run:
            info = tb.autocast_for_build(cfg, info, out_dir)
            source = info.path
        tb.check_graph_precision(cfg, info)
    paths = tb.build_paths(out_dir, cfg, timing_cache)
    cmd = shlex.join(tb.trtexec_command(cfg, source, paths["engine"], paths["timing_cache"], paths["layers_json"]))
    atomic_write_text(paths["trtexec"], "#!/bin/sh\n" + cmd + "\n")
    console.print(f"trtexec equivalent ({paths['trtexec']}):\n  {cmd}", highlight=False, soft_wrap=True)
    if dry_run:
        return
    if importlib.util.find_spec("tensorrt") is None:
        raise VitoptError(f"TensorRT is not installed, so no engine was built; {tb.TRT_EXTRA_HINT}, or run the "
                          f"trtexec command above (--dry-run only writes it).")
    rec = tb.build_engine(info.path, cfg, out_dir, timing_cache=timing_cache)
    console.print(f"wrote {rec['engine']} (TensorRT {rec['tensorrt_version']}, {rec['device']}, "
                  f"{rec['build_seconds']:.1f} s); explain it with `vitopt doctor {out_dir}`")


@app.command()
def doctor(path: Path = typer.Argument(..., help="An engine, its .layers.json, or a build folder.")) -> None:
    """Explain an engine: fused attention per block, LayerNorm/Softmax/GEMM precisions, 2:4 tactics, Q/DQ fusion,
    DLA fallback, and a one-line verdict of why an expected speed-up may be missing."""

    for d in diagnose_path(path):
        asked = d["asked"]
        title = (f"{d['engine']}: {d['layers']} layers"
                 + (f", built for {asked['precision']}" if asked["precision"] else "")
                 + (" with 2:4 sparsity" if asked["sparsity"] else "")
                 + (f" on DLA core {asked['dla_core']}" if asked["dla_core"] is not None else ""))
        table = Table(title=title)
        for col in ("block", "attention", "softmax", "layernorm", "GEMMs"):
            table.add_column(col, justify="right")
        for r in d["blocks"]:
            table.add_row(str(r["block"]), "fused MHA" if r["mha_fused"] else "NOT fused", r["softmax"], r["layernorm"],
                          r["gemms"])
        console.print(table)
        if d["detailed"]:
            sp, qdq = d["sparse"], d["qdq"]
            console.print(f"  GEMM layers by precision: {d['gemm_precisions'] or '-'}; 2:4 sparse tactics: "
                          f"{sp['sparse_layers']} of {sp['gemms']} GEMM and attention layers{' (asked)' if sp['asked'] else ''}; "
                          f"stand-alone Q/DQ layers: {qdq['standalone']}", highlight=False, soft_wrap=True)
            if d["dla"] is not None:
                console.print(f"  DLA: {d['dla']['dla_layers']} DLA subgraphs, {d['dla']['gpu_layers']} layers on the "
                              f"GPU (fallback: {', '.join(d['dla']['fallback'][:5]) or '-'})", highlight=False,
                              soft_wrap=True)
        console.print(f"  verdict: {d['verdict']}", highlight=False, soft_wrap=True)


@deploy_app.command("bundle")
def deploy_bundle(run_dir: Path = typer.Argument(..., help="A finished run directory with an export stage."),
                  target: str = typer.Option(..., "--target", "-t", help="Target profile, e.g. orin-agx."),
                  out: Path | None = typer.Option(None, "--out", "-o", help="Bundle folder (default: "
                                                     "RUN_DIR/bundle-TARGET)."),
                  precision: str | None = typer.Option(None, help="Default precision of the kit's build."),
                  samples: int = typer.Option(512, min=1, help="Validation images in sample.npz.")) -> None:
    """Write a folder to copy to the device: ONNX (+ Q/DQ), sample, labels, trtexec commands, kit script."""

    m = rundir.bundle(run_dir, target, out, precision=precision, samples=samples)
    console.print(f"wrote {m['path']} ({m['target']}, precisions {', '.join(m['builds'])}, "
                  f"{m['num_images']} sample images); on the device: python3 vitopt_jetson.py")


def _is_click_error(exc: BaseException) -> bool:
    """True for click's usage and parameter errors, recognised by click's documented ``ClickException`` interface
    (``show()`` prints the usage line and ``Error: ...``; ``exit_code`` is 2 for usage errors), so it holds whether
    typer runs on the ``click`` package (typer < 0.22) or on its own copy of click (``typer._click``, typer >= 0.22)."""
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)


def main() -> None:
    """Console-script entry point: run the app and turn every way it can end into an exit status.

    * bad input (:class:`VitoptError`): one sentence ``error: ...`` on stderr, exit 2;
    * a command-line usage error (unknown option or command, missing argument, bad value): click's usage line,
      ``Try '... --help' for help.`` and one ``Error: ...`` line with click's suggestion (``Did you mean`` /
      ``Possible options``), exit 2 (click's ``UsageError.exit_code``), no traceback;
    * Ctrl-C / SIGINT: exit 130 (128 + SIGINT, the shell convention), also when a command turned it into
      ``typer.Exit(130)``: with ``standalone_mode=False`` click *returns* an ``Exit``'s code instead of exiting,
      so the returned code is passed to ``sys.exit``.
    """
    main_rank = os.environ.get("RANK", "0") == "0"           # torchrun: every rank fails alike; rank 0 says so
    try:
        code = app(standalone_mode=False)
    except VitoptError as exc:
        if main_rank:  # escape: messages may hold brackets, e.g. pip install 'vitopt[trt]'
            Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(VitoptError.EXIT_CODE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in standalone_mode=False
        if not _is_click_error(exc):
            raise
        if main_rank:
            exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)


if __name__ == "__main__":
    main()
