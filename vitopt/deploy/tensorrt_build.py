"""TensorRT engine builds: derive the build from a target profile, build with the Python API, write trtexec's twin.

Everything up to the builder call is plain Python and unit-tested: :func:`derive_build_config` turns a
target profile (:mod:`vitopt.deploy.targets`), a precision and the TensorRT major version into the
builder's settings - optimization profile (min/opt/max batch), workspace pool, builder optimization
level, builder flags, strong typing, DLA core with GPU fallback, version compatibility, 2:4 sparse
weights - and :func:`trtexec_command` writes the equivalent ``trtexec`` command line.

Precision by TensorRT line (TensorRT developer guide "Reduced precision", "Explicit quantization",
and the 10.x -> 11.x migration guide):

- TensorRT 10.x (weakly typed by default): ``fp16``/``bf16`` set the FP16/BF16 builder flag;
  ``int8``/``fp8`` need an ONNX with Q/DQ nodes (explicit quantization, from the ``quantize``
  stage) plus the INT8/FP8 flag and FP16 for the layers left unquantized.
- TensorRT 11.x is strongly typed: the precision flags are gone and every tensor's type comes from
  the graph, so ``fp16``/``bf16`` need an ONNX converted by ModelOpt AutoCast (``quantize`` with
  ``precision: fp16``) and ``int8``/``fp8`` a Q/DQ ONNX. DLA is not supported by 11.x.

:func:`build_engine` imports ``tensorrt`` lazily (extra ``vitopt[trt]``) and fails with one sentence
when it is missing. Where only ``torch_tensorrt`` is installed, :func:`compile_torch_tensorrt` lowers
the PyTorch model through its dynamo path instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vitopt.deploy.targets import PRECISIONS, TargetProfile, get_target
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["BuildConfig", "OnnxInfo", "derive_build_config", "onnx_info", "check_graph_precision",
           "trtexec_command", "build_paths", "require_tensorrt", "tensorrt_major", "build_backend",
           "build_engine", "compile_torch_tensorrt", "TRT_EXTRA_HINT"]

TRT_EXTRA_HINT = ("install TensorRT with `pip install 'vitopt[trt]' --extra-index-url https://pypi.nvidia.com` "
                  "(on Jetson: JetPack's python3-libnvinfer)")

_PRECISION_FLAGS_10 = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"],
                       "fp8": ["FP8", "FP16"]}
_TRTEXEC_FLAG = {"FP16": "--fp16", "BF16": "--bf16", "INT8": "--int8", "FP8": "--fp8"}


@dataclass(frozen=True)
class OnnxInfo:
    """What a build needs to know about an ONNX file.

    Attributes:
        path: the file.
        input_name: name of the first graph input (the image batch).
        input_chw: ``(C, H, W)`` of one image.
        batch: the fixed batch size, or None when the batch dimension is symbolic.
        qdq_nodes: number of QuantizeLinear nodes (explicit quantization when > 0).
        float_types: ONNX element types of the graph's float initializers (``"FLOAT"``, ``"FLOAT16"``,
            ``"BFLOAT16"``), i.e. the precision baked into the weights.
    """

    path: Path
    input_name: str
    input_chw: tuple[int, int, int]
    batch: int | None
    qdq_nodes: int
    float_types: tuple[str, ...]


def onnx_info(path: str | os.PathLike) -> OnnxInfo:
    """Read the input name/shape, fixed batch, Q/DQ count and weight precision of an ONNX file.

    Raises:
        VitoptError: the file is missing or not ONNX, or its first input is not ``[B, C, H, W]``
            with static C, H, W.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise VitoptError(f"ONNX file {p} does not exist; export one first (`vitopt export` or an export stage).")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise VitoptError(f"{p} is not a readable ONNX file ({str(exc).splitlines()[0][:200]}).") from None
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if not inputs:
        raise VitoptError(f"ONNX file {p} has no graph input.")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or any(s is None for s in shape[1:]):
        raise VitoptError(f"ONNX file {p}: input {inputs[0].name!r} has shape {shape}; expected [batch, C, H, W] "
                          "with static C, H and W.")
    tp = onnx.TensorProto
    names = {tp.FLOAT: "FLOAT", tp.FLOAT16: "FLOAT16", tp.BFLOAT16: "BFLOAT16"}
    floats = sorted({names[i.data_type] for i in graph.initializer if i.data_type in names})
    qdq = sum(n.op_type == "QuantizeLinear" for n in graph.node)
    return OnnxInfo(path=p, input_name=inputs[0].name, input_chw=(shape[1], shape[2], shape[3]), batch=shape[0],
                    qdq_nodes=qdq, float_types=tuple(floats))


@dataclass(frozen=True)
class BuildConfig:
    """Everything the TensorRT builder (and trtexec) is told, derived by :func:`derive_build_config`.

    Attributes:
        target: target profile key.
        precision: ``fp32``, ``fp16``, ``bf16``, ``int8`` or ``fp8``.
        trt_major: TensorRT major version the config is for (10 or 11).
        strongly_typed: network created with the STRONGLY_TYPED flag (always on 11.x): tensor types
            come from the graph and no precision flags are set.
        builder_flags: ``tensorrt.BuilderFlag`` member names to set (``FP16``, ``INT8``,
            ``SPARSE_WEIGHTS``, ``GPU_FALLBACK``, ``VERSION_COMPATIBLE``...).
        graph_needs: what the ONNX must carry: ``"any"``, ``"fp16"``/``"bf16"`` (weights converted by
            ModelOpt AutoCast) or ``"qdq"`` (Q/DQ nodes from the quantize stage).
        input_name, input_chw: the optimization profile's tensor and its per-image shape.
        profile: ``(min, opt, max)`` batch sizes of the optimization profile.
        workspace_mib: workspace memory-pool limit (MiB).
        opt_level: builder optimization level 0-5 (TensorRT default 3; higher searches longer).
        sparsity: set SPARSE_WEIGHTS (2:4 structured-sparse weights on sm >= 80).
        dla_core: DLA core to run on with GPU fallback, or None for the GPU.
        version_compatible: build a version-compatible engine (runs on later TensorRT of the same
            major with the lean runtime).
    """

    target: str
    precision: str
    trt_major: int
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    graph_needs: str
    input_name: str
    input_chw: tuple[int, int, int]
    profile: tuple[int, int, int]
    workspace_mib: int
    opt_level: int = 3
    sparsity: bool = False
    dla_core: int | None = None
    version_compatible: bool = False

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        """The input shape ``(batch, C, H, W)``."""
        return (batch, *self.input_chw)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


def derive_build_config(target: TargetProfile | str, precision: str, *, input_name: str = "input",
                        input_chw: tuple[int, int, int] = (3, 224, 224), trt_major: int | None = None,
                        profile: tuple[int, int, int] | None = None, fixed_batch: int | None = None,
                        workspace_mib: int | None = None, opt_level: int = 3, sparsity: bool = False,
                        dla_core: int | None = None, version_compatible: bool = False,
                        strongly_typed: bool | None = None) -> BuildConfig:
    """Derive the builder settings for ``target`` at ``precision`` (see the module docstring for the rules).

    Args:
        target: a profile or its key (``"h100"``, ``"orin-agx"``...).
        precision: one of :data:`~vitopt.deploy.targets.PRECISIONS` that the target runs.
        input_name, input_chw: the ONNX input tensor and its ``(C, H, W)``.
        trt_major: TensorRT major version (10 or 11); default the target's ``tensorrt_default``.
        profile: ``(min, opt, max)`` batch; default the target's (first, middle, last) batch sizes.
        fixed_batch: the ONNX's static batch size, if it has one: the profile becomes (b, b, b).
        workspace_mib: workspace pool limit; default the target's.
        opt_level: builder optimization level, 0-5.
        sparsity: enable 2:4 sparse weights (needs compute capability >= 8.0).
        dla_core: run on this DLA core with GPU fallback (Orin; TensorRT 10; FP16 or INT8 only).
        version_compatible: ask for a version-compatible engine (not with DLA).
        strongly_typed: TensorRT 10 only: build a strongly typed network (the precision then
            comes from the graph, as on 11.x); 11.x is always strongly typed.

    Raises:
        VitoptError: one sentence for an unknown target, a precision the target lacks, a TensorRT
            line the target does not support, a bad profile/opt level/workspace, sparsity below
            sm80, a DLA request the target or TensorRT line cannot serve, or version-compatible on DLA.
    """
    t = get_target(target) if isinstance(target, str) else target
    if precision not in PRECISIONS:
        raise VitoptError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}.")
    if precision not in t.precisions:
        raise VitoptError(f"target {t.key} ({t.name}) does not support {precision}; it supports "
                          f"{', '.join(t.precisions)}.")
    major = t.tensorrt_default if trt_major is None else int(trt_major)
    if major not in t.tensorrt_majors:
        lines = " and ".join(f"{m}.x" for m in t.tensorrt_majors)
        raise VitoptError(f"target {t.key} is supported by TensorRT {lines}, not {major}.x.")
    if fixed_batch is not None:
        profile = (fixed_batch, fixed_batch, fixed_batch)
    prof = tuple(int(b) for b in (profile or t.profile))
    if len(prof) != 3 or not (1 <= prof[0] <= prof[1] <= prof[2]):
        raise VitoptError(f"optimization profile {prof} must be three batch sizes with 1 <= min <= opt <= max.")
    if not (isinstance(opt_level, int) and 0 <= opt_level <= 5):
        raise VitoptError(f"builder optimization level {opt_level!r} must be an integer from 0 to 5.")
    workspace = t.workspace_mib if workspace_mib is None else int(workspace_mib)
    if workspace < 1:
        raise VitoptError(f"workspace {workspace} MiB must be positive.")
    if major >= 11:
        if strongly_typed is False:
            raise VitoptError("TensorRT 11.x networks are always strongly typed; drop strongly_typed: false.")
        strongly = True
    else:
        strongly = bool(strongly_typed)
    flags: list[str] = [] if strongly else list(_PRECISION_FLAGS_10[precision])
    if precision in ("int8", "fp8"):
        needs = "qdq"
    elif precision in ("fp16", "bf16") and strongly:
        needs = precision
    else:
        needs = "any"
    if sparsity:
        if not t.supports_sparsity:
            raise VitoptError(f"target {t.key} (sm {t.compute_capability}) has no 2:4 sparse tensor cores "
                              "(needs >= 8.0).")
        flags.append("SPARSE_WEIGHTS")
    if dla_core is not None:
        if t.dla_cores == 0:
            raise VitoptError(f"target {t.key} has no DLA cores; drop dla_core or pick orin-agx / orin-nx.")
        if not (isinstance(dla_core, int) and 0 <= dla_core < t.dla_cores):
            raise VitoptError(f"target {t.key} has DLA cores 0..{t.dla_cores - 1}; got dla_core {dla_core!r}.")
        if major >= 11:
            raise VitoptError("TensorRT 11.x does not support DLA; build for TensorRT 10.x (trt_major 10).")
        if precision not in ("fp16", "int8"):
            raise VitoptError(f"DLA runs fp16 and int8 only, not {precision}.")
        if version_compatible:
            raise VitoptError("version-compatible engines cannot run on DLA; drop one of the two.")
        flags.append("GPU_FALLBACK")
    if version_compatible:
        flags.append("VERSION_COMPATIBLE")
    return BuildConfig(target=t.key, precision=precision, trt_major=major, strongly_typed=strongly,
                       builder_flags=tuple(flags), graph_needs=needs, input_name=input_name,
                       input_chw=tuple(int(d) for d in input_chw), profile=prof, workspace_mib=workspace,
                       opt_level=opt_level, sparsity=sparsity, dla_core=dla_core,
                       version_compatible=version_compatible)


def check_graph_precision(cfg: BuildConfig, info: OnnxInfo) -> None:
    """Check that the ONNX carries the precision ``cfg`` needs (Q/DQ nodes, or fp16/bf16 weights when strongly typed).

    Raises:
        VitoptError: an int8/fp8 build from a graph without QuantizeLinear nodes, or a strongly
            typed fp16/bf16 build from an fp32 graph (says which quantize stage makes the right one).
    """
    if cfg.graph_needs == "qdq" and info.qdq_nodes == 0:
        raise VitoptError(f"{info.path} has no Q/DQ nodes, but building {cfg.precision} needs explicit quantization; "
                          f"run a quantize stage with precision: {cfg.precision} and build its model.")
    want = {"fp16": "FLOAT16", "bf16": "BFLOAT16"}.get(cfg.graph_needs)
    if want and want not in info.float_types:
        raise VitoptError(f"{info.path} has {'/'.join(info.float_types) or 'no float'} weights but a strongly typed "
                          f"TensorRT {cfg.trt_major} {cfg.precision} build takes its precision from the graph; run a "
                          f"quantize stage with precision: {cfg.precision} (ModelOpt AutoCast) and build its model.")


def build_paths(out_dir: str | os.PathLike, cfg: BuildConfig,
                timing_cache: str | os.PathLike | None = None) -> dict[str, Path]:
    """Where a build writes: ``{out_dir}/{target}_{precision}.engine``, ``.trtexec.sh``, ``.build.json``.

    The timing cache defaults to ``{out_dir}/timing_{target}_trt{major}.cache`` so that builds of
    several models for one target reuse it (TensorRT reuses tactic timings per device and version).
    """
    out = Path(out_dir)
    stem = f"{cfg.target}_{cfg.precision}" + (f"_dla{cfg.dla_core}" if cfg.dla_core is not None else "")
    cache = Path(timing_cache) if timing_cache else out / f"timing_{cfg.target}_trt{cfg.trt_major}.cache"
    return {"engine": out / f"{stem}.engine", "trtexec": out / f"{stem}.trtexec.sh",
            "build_json": out / f"{stem}.build.json", "timing_cache": cache}


def trtexec_command(cfg: BuildConfig, onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                    timing_cache: str | os.PathLike | None = None) -> list[str]:
    """The ``trtexec`` argument list that builds the same engine as :func:`build_engine` with ``cfg``.

    Flags follow the trtexec documentation of the config's TensorRT line: shapes as
    ``name:BxCxHxW``, ``--memPoolSize=workspace:NM``, ``--builderOptimizationLevel``; on 10.x the
    precision flags (``--fp16``, ``--int8``...) or ``--stronglyTyped``; on 11.x no precision flag
    (strong typing is always on); ``--sparsity=enable``; ``--useDLACore=N --allowGPUFallback``;
    ``--versionCompatible``; ``--timingCacheFile``.
    """
    def dims(b: int) -> str:
        return f"{cfg.input_name}:" + "x".join(str(d) for d in cfg.shape(b))

    mn, opt, mx = cfg.profile
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", f"--minShapes={dims(mn)}",
           f"--optShapes={dims(opt)}", f"--maxShapes={dims(mx)}", f"--memPoolSize=workspace:{cfg.workspace_mib}M",
           f"--builderOptimizationLevel={cfg.opt_level}"]
    cmd += [_TRTEXEC_FLAG[f] for f in cfg.builder_flags if f in _TRTEXEC_FLAG]
    if cfg.strongly_typed and cfg.trt_major < 11:
        cmd.append("--stronglyTyped")
    if cfg.sparsity:
        cmd.append("--sparsity=enable")
    if cfg.dla_core is not None:
        cmd += [f"--useDLACore={cfg.dla_core}", "--allowGPUFallback"]
    if cfg.version_compatible:
        cmd.append("--versionCompatible")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


# ------------------------------------------------------------------------------ TensorRT (lazy)
def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module.

    Raises:
        VitoptError: TensorRT is not installed (says how to install it).
    """
    try:
        import tensorrt
    except ImportError:
        raise VitoptError(f"TensorRT is not installed; {TRT_EXTRA_HINT}.") from None
    return tensorrt


def tensorrt_major(trt: Any) -> int:
    """Major version of an imported ``tensorrt`` module (``"10.3.0"`` -> 10)."""
    return int(str(trt.__version__).split(".")[0])


def build_backend() -> str | None:
    """``"tensorrt"`` when the TensorRT Python API is importable, ``"torch_tensorrt"`` when only
    Torch-TensorRT is, else None (found with ``importlib.util.find_spec``, nothing imported)."""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    if importlib.util.find_spec("torch_tensorrt") is not None:
        return "torch_tensorrt"
    return None


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover - torch is a core dependency
        pass
    return "unknown"


def build_engine(onnx_path: str | os.PathLike, cfg: BuildConfig, out_dir: str | os.PathLike, *,
                 timing_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build a serialized TensorRT engine from ONNX with the TensorRT Python API.

    Follows the TensorRT developer guide ("The Python API": Builder -> network (STRONGLY_TYPED when
    ``cfg.strongly_typed``) -> OnnxParser -> BuilderConfig with workspace pool, flags, optimization
    profile, builder optimization level, DLA core, timing cache -> ``build_serialized_network``).
    The timing cache file is loaded when present and saved back after the build. Writes the
    engine, the equivalent trtexec command (a shell script) and ``build.json`` (:func:`build_paths`).

    Returns:
        the ``build.json`` record: ``{"engine", "trtexec", "tensorrt_version", "device",
        "build_seconds", "engine_bytes", "timing_cache", "config"}``.

    Raises:
        VitoptError: a missing ONNX, TensorRT not installed, a config for another TensorRT major,
            a graph without the precision the config needs, a parser error or a failed build.
    """
    info = onnx_info(onnx_path)
    check_graph_precision(cfg, info)
    paths = build_paths(out_dir, cfg, timing_cache)
    trt = require_tensorrt()
    if tensorrt_major(trt) != cfg.trt_major:
        raise VitoptError(f"the build config is for TensorRT {cfg.trt_major}.x but TensorRT {trt.__version__} is "
                          f"installed; derive it with trt_major={tensorrt_major(trt)}.")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net_flags = 0
    if cfg.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(info.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))[:300]
        raise VitoptError(f"TensorRT's ONNX parser rejected {info.path} ({errors}).")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    config.builder_optimization_level = cfg.opt_level
    for flag in cfg.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if cfg.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = cfg.dla_core
    profile = builder.create_optimization_profile()
    profile.set_shape(info.input_name, *(cfg.shape(b) for b in cfg.profile))
    config.add_optimization_profile(profile)
    cache_path = paths["timing_cache"]
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise VitoptError(f"TensorRT could not build an engine from {info.path} for {cfg.target} {cfg.precision}; "
                          "see the TensorRT log above.")
    engine = bytes(serialized)
    atomic_write_bytes(paths["engine"], engine)
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    cmd = trtexec_command(cfg, info.path, paths["engine"], cache_path)
    atomic_write_text(paths["trtexec"], "#!/bin/sh\n" + shlex.join(cmd) + "\n")
    record = {"engine": str(paths["engine"]), "trtexec": shlex.join(cmd), "tensorrt_version": str(trt.__version__),
              "device": _device_name(), "build_seconds": round(seconds, 3), "engine_bytes": len(engine),
              "timing_cache": str(cache_path), "backend": "tensorrt", "config": cfg.to_json()}
    atomic_write_json(paths["build_json"], record)
    return record


def compile_torch_tensorrt(model: Any, cfg: BuildConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Lower a PyTorch model with Torch-TensorRT's dynamo path (``torch_tensorrt.compile(ir="dynamo")``).

    Used where Torch-TensorRT is installed but the TensorRT ONNX workflow is not wanted. The
    optimization profile, workspace, optimization level, sparse weights, version compatibility and
    timing cache of ``cfg`` map to Torch-TensorRT's compile settings (Torch-TensorRT docs, "Dynamo
    frontend"); fp32/fp16/bf16 only (Q/DQ models go through :func:`build_engine`). Saves the
    compiled ExportedProgram as ``{target}_{precision}.ep`` next to ``build.json``.

    Raises:
        VitoptError: Torch-TensorRT missing, no CUDA device, or int8/fp8/DLA requested.
    """
    try:
        import torch
        import torch_tensorrt
    except ImportError:
        raise VitoptError(f"Torch-TensorRT is not installed; {TRT_EXTRA_HINT}, or "
                          "`pip install torch-tensorrt`.") from None
    if cfg.precision not in ("fp32", "fp16", "bf16") or cfg.dla_core is not None:
        raise VitoptError(f"the Torch-TensorRT path builds fp32/fp16/bf16 on the GPU only; build {cfg.precision}"
                          f"{' on DLA' if cfg.dla_core is not None else ''} from ONNX with the TensorRT Python API.")
    if not torch.cuda.is_available():
        raise VitoptError("Torch-TensorRT needs a CUDA device; none is visible.")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision]
    paths = build_paths(out_dir, cfg)
    inputs = [torch_tensorrt.Input(min_shape=cfg.shape(cfg.profile[0]), opt_shape=cfg.shape(cfg.profile[1]),
                                   max_shape=cfg.shape(cfg.profile[2]), dtype=torch.float32)]
    model = model.eval().cuda()
    t0 = time.perf_counter()
    trt_gm = torch_tensorrt.compile(model, ir="dynamo", inputs=inputs, enabled_precisions={dtype},
                                    workspace_size=cfg.workspace_mib << 20, optimization_level=cfg.opt_level,
                                    sparse_weights=cfg.sparsity, version_compatible=cfg.version_compatible,
                                    timing_cache_path=str(paths["timing_cache"]))
    seconds = time.perf_counter() - t0
    ep_path = paths["engine"].with_suffix(".ep")
    ep_path.parent.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(trt_gm, str(ep_path), inputs=[torch.randn(cfg.shape(cfg.profile[1]), device="cuda")])
    record = {"engine": str(ep_path), "tensorrt_version": getattr(torch_tensorrt, "__version__", "?"),
              "device": _device_name(), "build_seconds": round(seconds, 3), "backend": "torch_tensorrt",
              "timing_cache": str(paths["timing_cache"]), "config": cfg.to_json()}
    atomic_write_json(paths["build_json"], record)
    return record
