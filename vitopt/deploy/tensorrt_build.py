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
  the graph, so ``fp16``/``bf16`` need an ONNX converted by ModelOpt AutoCast (the ``quantize``
  stage with ``precision: fp16``, or :func:`autocast_for_build`, which the build runs by itself when
  it is handed an fp32 graph) and ``int8``/``fp8`` a Q/DQ ONNX.

DLA (TensorRT developer guide, "Working with DLA"): DLA runs FP16 and INT8 with static shapes, so a
DLA build gets the static profile ``(b, b, b)``; with GPU fallback, layers DLA cannot run (a ViT's
GELU, LayerNorm, 3-D MatMuls) silently run on the GPU, so the build records the placement of every
network layer (``IBuilderConfig.can_run_on_DLA``) and refuses an engine in which fewer than
``dla_min_fraction`` of the layers run on DLA. TensorRT 11.0-11.3 have no DLA; 11.4.1 runs it on AGX
Orin with JetPack >= 7.2.2 (TensorRT 11.4.1 release notes).

Timing caches (TensorRT developer guide, "Timing Cache"): a cache holds tactic timings of one GPU and
one TensorRT build, and ``IBuilderConfig.set_timing_cache`` returns False for a cache from another
device, so the default cache file is keyed by the device name, compute capability and the full
TensorRT version (:func:`timing_cache_key`); both ``set_timing_cache``'s return and a None from
``get_timing_cache`` after the build are handled.

Every build writes the engine, the trtexec command, ``build.json`` and, built with detailed profiling
verbosity, the engine inspector's layer JSON (``.layers.json``, read by ``vitopt doctor``).
:func:`build_engine` imports ``tensorrt`` lazily (extra ``vitopt[trt]``) and fails with one sentence
when it is missing. :func:`compile_torch_tensorrt` is the ``torch_tensorrt`` backend: Torch-TensorRT's
dynamo path with the API of the installed version, saved as a program the ``torch-tensorrt`` runtime
loads.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vitopt.deploy.quantize import quantize_onnx
from vitopt.deploy.targets import PRECISIONS, TargetProfile, get_target
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["BuildConfig", "OnnxInfo", "BACKENDS", "DLA_MIN_FRACTION", "derive_build_config", "onnx_info",
           "check_graph_precision", "trtexec_command", "build_paths", "timing_cache_key", "require_tensorrt",
           "tensorrt_major", "version_tuple", "check_tensorrt_version", "dla_placement", "check_dla_placement",
           "attach_timing_cache", "autocast_for_build", "build_engine", "engine_layer_info",
           "torch_tensorrt_settings", "compile_torch_tensorrt", "TRT_EXTRA_HINT", "TORCH_TRT_EXTRA_HINT"]

TRT_EXTRA_HINT = ("install TensorRT with `pip install 'vitopt[trt]' --extra-index-url https://pypi.nvidia.com` "
                  "(on Jetson: JetPack's python3-libnvinfer)")
TORCH_TRT_EXTRA_HINT = "install Torch-TensorRT with `pip install 'vitopt[torch-tensorrt]'`"

#: build backends: the TensorRT Python API from ONNX, or Torch-TensorRT's dynamo path from the model.
BACKENDS = ("tensorrt", "torch_tensorrt")
#: default least fraction of network layers that must run on DLA for a DLA engine to be built.
DLA_MIN_FRACTION = 0.5

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
        qdq_nodes: number of DequantizeLinear nodes (explicit quantization when > 0; ModelOpt's default
            ``dq_only`` graphs keep weights as DequantizeLinear of int8/fp8 initializers).
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
    qdq = sum(n.op_type == "DequantizeLinear" for n in graph.node)
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
        profile: ``(min, opt, max)`` batch sizes of the optimization profile (``(b, b, b)`` on DLA).
        workspace_mib: workspace memory-pool limit (MiB).
        opt_level: builder optimization level 0-5 (TensorRT default 3; higher searches longer).
        sparsity: set SPARSE_WEIGHTS (2:4 structured-sparse weights on sm >= 80).
        dla_core: DLA core to run on with GPU fallback, or None for the GPU.
        version_compatible: build a version-compatible engine (runs on later TensorRT of the same
            major with the lean runtime; the runtime must allow engine host code).
        backend: ``"tensorrt"`` (Python API from ONNX) or ``"torch_tensorrt"`` (dynamo path).
        dla_min_fraction: the least fraction of network layers that must run on DLA (DLA builds).
        detailed_profile: build with ``ProfilingVerbosity.DETAILED`` so the engine inspector reports
            every layer's tactic, precision and formats (read by ``vitopt doctor``).
        min_tensorrt: the oldest TensorRT release the config runs on (``"11.4.1"`` for DLA on 11.x).
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
    backend: str = "tensorrt"
    dla_min_fraction: float = DLA_MIN_FRACTION
    detailed_profile: bool = True
    min_tensorrt: str | None = None

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
                        strongly_typed: bool | None = None, backend: str = "tensorrt",
                        dla_min_fraction: float = DLA_MIN_FRACTION) -> BuildConfig:
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
        dla_core: run on this DLA core with GPU fallback (Orin; FP16 or INT8 only). DLA needs static
            shapes (TensorRT "DLA supported layers and restrictions"), so the profile becomes
            ``(b, b, b)`` with ``b`` the fixed batch or the profile's opt batch.
        version_compatible: ask for a version-compatible engine (not with DLA).
        strongly_typed: TensorRT 10 only: build a strongly typed network (the precision then
            comes from the graph, as on 11.x); 11.x is always strongly typed.
        backend: one of :data:`BACKENDS`; ``torch_tensorrt`` builds fp32/fp16/bf16 on the GPU only.
        dla_min_fraction: for DLA builds, the least fraction of layers that must run on DLA, in [0, 1].

    Raises:
        VitoptError: one sentence for an unknown target, a precision the target lacks, a TensorRT
            line the target does not support, a bad profile/opt level/workspace, sparsity below
            sm80, a DLA request the target or TensorRT line cannot serve, version-compatible on DLA,
            an unknown backend or one that cannot serve the request.
    """
    t = get_target(target) if isinstance(target, str) else target
    if precision not in PRECISIONS:
        raise VitoptError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}.")
    if precision not in t.precisions:
        raise VitoptError(f"target {t.key} ({t.name}) does not support {precision}; it supports "
                          f"{', '.join(t.precisions)}.")
    if backend not in BACKENDS:
        raise VitoptError(f"unknown build backend {backend!r}; allowed: {', '.join(BACKENDS)}.")
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
    if not (0.0 <= float(dla_min_fraction) <= 1.0):
        raise VitoptError(f"dla_min_fraction {dla_min_fraction!r} must be a fraction in [0, 1].")
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
    min_trt = None
    if dla_core is not None:
        if t.dla_cores == 0:
            raise VitoptError(f"target {t.key} has no DLA cores; drop dla_core or pick orin-agx / orin-nx.")
        if not (isinstance(dla_core, int) and 0 <= dla_core < t.dla_cores):
            raise VitoptError(f"target {t.key} has DLA cores 0..{t.dla_cores - 1}; got dla_core {dla_core!r}.")
        if major >= 11 and t.dla_tensorrt11 is None:
            raise VitoptError(f"TensorRT 11.x does not run DLA on {t.key}; build for TensorRT 10.x (trt_major 10).")
        if major >= 11:
            min_trt = t.dla_tensorrt11
        if precision not in ("fp16", "int8"):
            raise VitoptError(f"DLA runs fp16 and int8 only, not {precision}.")
        if version_compatible:
            raise VitoptError("version-compatible engines cannot run on DLA; drop one of the two.")
        if backend != "tensorrt":
            raise VitoptError("DLA engines are built from ONNX with the TensorRT Python API (backend: tensorrt).")
        b = prof[1]
        prof = (b, b, b)
        flags.append("GPU_FALLBACK")
    if version_compatible:
        flags.append("VERSION_COMPATIBLE")
    if backend == "torch_tensorrt" and precision not in ("fp32", "fp16", "bf16"):
        raise VitoptError(f"the torch_tensorrt backend builds fp32/fp16/bf16; build {precision} from the Q/DQ ONNX "
                          "with backend: tensorrt.")
    return BuildConfig(target=t.key, precision=precision, trt_major=major, strongly_typed=strongly,
                       builder_flags=tuple(flags), graph_needs=needs, input_name=input_name,
                       input_chw=tuple(int(d) for d in input_chw), profile=prof, workspace_mib=workspace,
                       opt_level=opt_level, sparsity=sparsity, dla_core=dla_core,
                       version_compatible=version_compatible, backend=backend,
                       dla_min_fraction=float(dla_min_fraction), min_tensorrt=min_trt)


def check_graph_precision(cfg: BuildConfig, info: OnnxInfo) -> None:
    """Check that the ONNX carries the precision ``cfg`` needs (Q/DQ nodes, or fp16/bf16 weights when strongly typed).

    Raises:
        VitoptError: an int8/fp8 build from a graph without Q/DQ nodes, or a strongly typed
            fp16/bf16 build from an fp32 graph (says which quantize stage makes the right one).
    """
    if cfg.graph_needs == "qdq" and info.qdq_nodes == 0:
        raise VitoptError(f"{info.path} has no Q/DQ nodes, but building {cfg.precision} needs explicit quantization; "
                          f"run a quantize stage with precision: {cfg.precision} and build its model.")
    want = {"fp16": "FLOAT16", "bf16": "BFLOAT16"}.get(cfg.graph_needs)
    if want and want not in info.float_types:
        raise VitoptError(f"{info.path} has {'/'.join(info.float_types) or 'no float'} weights but a strongly typed "
                          f"TensorRT {cfg.trt_major} {cfg.precision} build takes its precision from the graph; run a "
                          f"quantize stage with precision: {cfg.precision} (ModelOpt AutoCast) and build its model.")


def timing_cache_key(device: str, compute_capability: str | None, trt_version: str) -> str:
    """A file-name-safe key of one GPU model and one TensorRT build: ``nvidia-h200_sm90_trt10.3.0.26``.

    TensorRT's timing cache is valid for one device and one TensorRT version (TensorRT developer guide,
    "Timing Cache"); H100 SXM, H100 PCIe and H200 share compute capability 9.0 but not tactic timings,
    so the device name is part of the key.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", str(device).lower()).strip("-") or "unknown-device"
    sm = f"_sm{str(compute_capability).replace('.', '')}" if compute_capability else ""
    return f"{slug}{sm}_trt{trt_version}"


def build_paths(out_dir: str | os.PathLike, cfg: BuildConfig, timing_cache: str | os.PathLike | None = None,
                cache_key: str | None = None) -> dict[str, Path]:
    """Where a build writes: ``{out_dir}/{target}_{precision}[_dla{n}]`` + ``.engine``, ``.trtexec.sh``,
    ``.build.json``, ``.layers.json`` (engine inspector), ``.ep`` (torch_tensorrt program).

    The timing cache defaults to ``{out_dir}/timing_{cache_key}.cache`` (:func:`timing_cache_key`)
    when the device and TensorRT version are known, else ``timing_{target}_trt{major}.cache`` (the
    name written into trtexec scripts for the device to fill).
    """
    out = Path(out_dir)
    stem = f"{cfg.target}_{cfg.precision}" + (f"_dla{cfg.dla_core}" if cfg.dla_core is not None else "")
    default = f"timing_{cache_key}.cache" if cache_key else f"timing_{cfg.target}_trt{cfg.trt_major}.cache"
    cache = Path(timing_cache) if timing_cache else out / default
    return {"engine": out / f"{stem}.engine", "trtexec": out / f"{stem}.trtexec.sh",
            "build_json": out / f"{stem}.build.json", "layers_json": out / f"{stem}.layers.json",
            "program": out / f"{stem}.ep", "timing_cache": cache}


def trtexec_command(cfg: BuildConfig, onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                    timing_cache: str | os.PathLike | None = None,
                    layers_json: str | os.PathLike | None = None) -> list[str]:
    """The ``trtexec`` argument list that builds the same engine as :func:`build_engine` with ``cfg``.

    Flags follow the trtexec documentation of the config's TensorRT line: shapes as
    ``name:BxCxHxW``, ``--memPoolSize=workspace:NM``, ``--builderOptimizationLevel``; on 10.x the
    precision flags (``--fp16``, ``--int8``...) or ``--stronglyTyped``; on 11.x no precision flag
    (strong typing is always on); ``--sparsity=enable``; ``--useDLACore=N --allowGPUFallback``;
    ``--versionCompatible``; ``--timingCacheFile``; ``--profilingVerbosity=detailed`` and, given
    ``layers_json``, ``--exportLayerInfo`` (the engine inspector's JSON for ``vitopt doctor``).
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
    if cfg.detailed_profile:
        cmd.append("--profilingVerbosity=detailed")
        if layers_json is not None:
            cmd.append(f"--exportLayerInfo={layers_json}")
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


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; non-numeric suffixes (``"2.14.0+cu130"``) are dropped."""
    out = []
    for part in str(version).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def check_tensorrt_version(cfg: BuildConfig, version: str) -> None:
    """Raise VitoptError unless TensorRT ``version`` can build ``cfg`` (its major; DLA on 11.x needs 11.4.1+).

    Raises:
        VitoptError: another major line, or a release older than ``cfg.min_tensorrt``.
    """
    v = version_tuple(version)
    if not v or v[0] != cfg.trt_major:
        raise VitoptError(f"the build config is for TensorRT {cfg.trt_major}.x but TensorRT {version} is installed; "
                          f"derive it with trt_major={v[0] if v else '?'}.")
    if cfg.min_tensorrt and v < version_tuple(cfg.min_tensorrt):
        raise VitoptError(f"DLA on TensorRT 11 needs TensorRT >= {cfg.min_tensorrt} (with JetPack >= 7.2.2 on AGX "
                          f"Orin); TensorRT {version} is installed; build for TensorRT 10.x instead.")


def _cuda_device() -> tuple[str, str | None]:
    """``(name, "major.minor")`` of CUDA device 0, or ``("unknown", None)`` without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:  # pragma: no cover - torch is a core dependency
        pass
    return "unknown", None


def dla_placement(trt: Any, network: Any, config: Any) -> dict[str, Any]:
    """Where each network layer of a DLA build will run: DLA when ``config.can_run_on_DLA(layer)``, else
    the GPU (GPU fallback). TensorRT developer guide, "Working with DLA" > "GPU fallback mode".

    Returns:
        ``{"dla_layers": n, "gpu_layers": m, "fraction": n / (n + m), "gpu_layer_types": {type: count},
        "gpu_layer_names": [first 50 names]}``.
    """
    dla, gpu, types, names = 0, 0, {}, []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if config.can_run_on_DLA(layer):
            dla += 1
        else:
            gpu += 1
            kind = str(getattr(layer.type, "name", layer.type))
            types[kind] = types.get(kind, 0) + 1
            if len(names) < 50:
                names.append(str(layer.name))
    total = dla + gpu
    return {"dla_layers": dla, "gpu_layers": gpu, "fraction": dla / total if total else 0.0,
            "gpu_layer_types": dict(sorted(types.items(), key=lambda kv: -kv[1])), "gpu_layer_names": names}


def check_dla_placement(cfg: BuildConfig, placement: dict[str, Any]) -> None:
    """Refuse a DLA build whose layers mostly fall back to the GPU (an engine named ``*_dla0`` would time the GPU).

    Raises:
        VitoptError: ``placement["fraction"] < cfg.dla_min_fraction``; names the GPU layer types.
    """
    if cfg.dla_core is None or placement["fraction"] >= cfg.dla_min_fraction:
        return
    kinds = ", ".join(f"{k} x{n}" for k, n in list(placement["gpu_layer_types"].items())[:6])
    raise VitoptError(f"only {placement['dla_layers']} of {placement['dla_layers'] + placement['gpu_layers']} layers "
                      f"({placement['fraction']:.0%}) can run on DLA core {cfg.dla_core} (GPU fallback: {kinds}), "
                      f"below dla_min_fraction {cfg.dla_min_fraction:g}, so the engine would mostly report GPU "
                      "latency; build for the GPU (no dla_core) or lower dla_min_fraction to accept it.")


def attach_timing_cache(trt: Any, config: Any, path: Path) -> dict[str, Any]:
    """Load ``path`` (if present) into ``config`` with strict device checking; returns what happened.

    ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False)`` returns False when the cache was
    made on another device; the build then starts from an empty cache (recorded as ``"mismatch"``)
    instead of silently timing nothing.

    Returns:
        ``{"path": str, "loaded": "file" | "new" | "mismatch"}``.

    Raises:
        VitoptError: TensorRT refuses even an empty cache.
    """
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return {"path": str(path), "loaded": "file" if data else "new"}
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise VitoptError("TensorRT refused a new, empty timing cache; see the TensorRT log above.")
    return {"path": str(path), "loaded": "mismatch"}


def autocast_for_build(cfg: BuildConfig, info: OnnxInfo, out_dir: str | os.PathLike) -> OnnxInfo:
    """The ONNX a strongly typed fp16/bf16 build needs: ``info`` itself, or ModelOpt AutoCast of it.

    TensorRT 11 takes its precision from the graph (migration guide 10.x -> 11.x), so an fp16 build
    from an fp32 ONNX first converts it with ``modelopt.onnx.autocast`` (graph I/O kept fp32) into
    ``{out_dir}/model_{precision}.onnx``.

    Raises:
        VitoptError: ModelOpt is not installed (names the extra), or the conversion fails.
    """
    want = {"fp16": "FLOAT16", "bf16": "BFLOAT16"}.get(cfg.graph_needs)
    if want is None or want in info.float_types:
        return info
    out = Path(out_dir) / f"model_{cfg.precision}.onnx"
    quantize_onnx(info.path, out, cfg.precision)
    return onnx_info(out)


def engine_layer_info(trt: Any, engine: Any) -> str:
    """The engine inspector's JSON of all layers (``LayerInformationFormat.JSON``; TensorRT developer
    guide, "Engine Inspector"). Detailed only for engines built with ``ProfilingVerbosity.DETAILED``."""
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def build_engine(onnx_path: str | os.PathLike, cfg: BuildConfig, out_dir: str | os.PathLike, *,
                 timing_cache: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build a serialized TensorRT engine from ONNX with the TensorRT Python API.

    Follows the TensorRT developer guide ("The Python API": Builder -> network (STRONGLY_TYPED when
    ``cfg.strongly_typed``) -> OnnxParser -> BuilderConfig with workspace pool, flags, optimization
    profile, builder optimization level, profiling verbosity, DLA core, timing cache ->
    ``build_serialized_network``). A strongly typed fp16/bf16 build from an fp32 ONNX is AutoCast
    first (:func:`autocast_for_build`). DLA builds record the placement of every layer and are refused
    below ``cfg.dla_min_fraction`` (:func:`check_dla_placement`). The timing cache is keyed by device
    and TensorRT version and saved back after the build when TensorRT returns it.

    Writes the engine, the equivalent trtexec command, the inspector's layer JSON (detailed
    profiling) and ``build.json`` (:func:`build_paths`). The timing cache is ``timing_cache`` if given,
    else ``{cache_dir or out_dir}/timing_{key}.cache`` with :func:`timing_cache_key`.

    Returns:
        the ``build.json`` record: ``{"engine", "onnx", "trtexec", "tensorrt_version", "device",
        "compute_capability", "build_seconds", "engine_bytes", "timing_cache", "layers_json",
        "dla_placement", "backend", "config"}``.

    Raises:
        VitoptError: a missing ONNX, TensorRT not installed, a config for another TensorRT line,
            a graph without the precision the config needs, too few DLA layers, a parser error or a
            failed build.
    """
    info = onnx_info(onnx_path)
    trt = require_tensorrt()
    version = str(trt.__version__)
    check_tensorrt_version(cfg, version)
    info = autocast_for_build(cfg, info, out_dir)
    check_graph_precision(cfg, info)
    device, cc = _cuda_device()
    key = timing_cache_key(device, cc, version)
    if timing_cache is None and cache_dir is not None:
        timing_cache = Path(cache_dir) / f"timing_{key}.cache"
    paths = build_paths(out_dir, cfg, timing_cache, cache_key=key)
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
    if cfg.detailed_profile:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in cfg.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    placement = None
    if cfg.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = cfg.dla_core
        placement = dla_placement(trt, network, config)
        check_dla_placement(cfg, placement)
    profile = builder.create_optimization_profile()
    profile.set_shape(info.input_name, *(cfg.shape(b) for b in cfg.profile))
    config.add_optimization_profile(profile)
    cache_path = paths["timing_cache"]
    cache_state = attach_timing_cache(trt, config, cache_path)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise VitoptError(f"TensorRT could not build an engine from {info.path} for {cfg.target} {cfg.precision}; "
                          "see the TensorRT log above.")
    engine_bytes = bytes(serialized)
    atomic_write_bytes(paths["engine"], engine_bytes)
    cache = config.get_timing_cache()
    cache_state["saved"] = cache is not None
    if cache is not None:
        atomic_write_bytes(cache_path, bytes(cache.serialize()))
    layers = None
    if cfg.detailed_profile:
        runtime = trt.Runtime(logger)
        runtime.engine_host_code_allowed = bool(cfg.version_compatible)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is not None:
            atomic_write_text(paths["layers_json"], engine_layer_info(trt, engine))
            layers = str(paths["layers_json"])
    cmd = trtexec_command(cfg, info.path, paths["engine"], cache_path, paths["layers_json"])
    atomic_write_text(paths["trtexec"], "#!/bin/sh\n" + shlex.join(cmd) + "\n")
    record = {"engine": str(paths["engine"]), "onnx": str(info.path), "trtexec": shlex.join(cmd),
              "tensorrt_version": version, "device": device, "compute_capability": cc,
              "build_seconds": round(seconds, 3), "engine_bytes": len(engine_bytes), "timing_cache": cache_state,
              "layers_json": layers, "dla_placement": placement, "backend": "tensorrt", "config": cfg.to_json()}
    atomic_write_json(paths["build_json"], record)
    return record


# ------------------------------------------------------------------------------ Torch-TensorRT backend
def torch_tensorrt_settings(version: str, cfg: BuildConfig) -> dict[str, Any]:
    """Keyword arguments of ``torch_tensorrt.compile(ir="dynamo")`` for ``cfg`` on Torch-TensorRT ``version``.

    Torch-TensorRT >= 2.10 builds strongly typed engines whose precision comes from the model's
    dtypes: 2.10-2.12 default ``use_explicit_typing=True`` and assert when ``enabled_precisions`` is
    anything but fp32, and 2.13+ dropped both arguments (an ``enabled_precisions`` there is ignored
    and the engine stays fp32) - Torch-TensorRT sources, ``py/torch_tensorrt/dynamo/_compiler.py``
    and ``_defaults.py`` of v2.10.0-v2.13.0. So vitopt never passes ``enabled_precisions``: the model
    itself is cast to the precision (:func:`compile_torch_tensorrt`), ``use_explicit_typing=True``
    is passed where the argument exists.

    Raises:
        VitoptError: Torch-TensorRT older than 2.10.
    """
    v = version_tuple(version)
    if v < (2, 10):
        raise VitoptError(f"Torch-TensorRT {version} is too old; vitopt needs >= 2.10 (strongly typed builds); "
                          f"{TORCH_TRT_EXTRA_HINT}.")
    kwargs: dict[str, Any] = {"workspace_size": cfg.workspace_mib << 20, "optimization_level": cfg.opt_level,
                              "sparse_weights": cfg.sparsity, "version_compatible": cfg.version_compatible}
    if v < (2, 13):
        kwargs["use_explicit_typing"] = True
    return kwargs


def _cast_wrapper(model: Any, dtype: Any) -> Any:
    """``model`` (already in ``dtype``) behind fp32 I/O: input cast to ``dtype``, logits cast back to fp32."""
    import torch

    class CastIO(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.to(dtype)).float()

    return CastIO(model)


def compile_torch_tensorrt(model: Any, cfg: BuildConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``torch_tensorrt`` backend: lower the PyTorch model with Torch-TensorRT's dynamo path.

    The model (a copy; the caller's is untouched) is cast to ``cfg.precision`` and wrapped so the
    program takes and returns fp32 (the cast runs inside the engine), compiled with
    :func:`torch_tensorrt_settings` for the installed version and the optimization profile of ``cfg``,
    and saved as an ExportedProgram ``{stem}.ep`` with ``torch_tensorrt.save`` - the artifact the
    ``torch-tensorrt`` runtime (:mod:`vitopt.deploy.runtimes.torch_tensorrt`) loads. Torch-TensorRT
    docs: "Compiling Exported Programs", "Saving models compiled with Torch-TensorRT".

    Returns:
        the ``build.json`` record with ``"program"`` (the ``.ep`` path; no ``"engine"``).

    Raises:
        VitoptError: Torch-TensorRT missing or too old, no CUDA device, or a precision / DLA request
            the backend cannot build.
    """
    try:
        import torch
        import torch_tensorrt
    except ImportError:
        raise VitoptError(f"Torch-TensorRT is not installed; {TORCH_TRT_EXTRA_HINT}.") from None
    if cfg.precision not in ("fp32", "fp16", "bf16") or cfg.dla_core is not None:
        raise VitoptError(f"the Torch-TensorRT path builds fp32/fp16/bf16 on the GPU only; build {cfg.precision}"
                          f"{' on DLA' if cfg.dla_core is not None else ''} from ONNX with backend: tensorrt.")
    if not torch.cuda.is_available():
        raise VitoptError("Torch-TensorRT needs a CUDA device; none is visible.")
    version = str(getattr(torch_tensorrt, "__version__", "0"))
    settings = torch_tensorrt_settings(version, cfg)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision]
    paths = build_paths(out_dir, cfg)
    wrapped = _cast_wrapper(copy.deepcopy(model).eval().to("cuda", dtype), dtype).eval()
    inputs = [torch_tensorrt.Input(min_shape=cfg.shape(cfg.profile[0]), opt_shape=cfg.shape(cfg.profile[1]),
                                   max_shape=cfg.shape(cfg.profile[2]), dtype=torch.float32)]
    t0 = time.perf_counter()
    try:
        trt_gm = torch_tensorrt.compile(wrapped, ir="dynamo", inputs=inputs,
                                        timing_cache_path=str(paths["timing_cache"]), **settings)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise VitoptError(f"Torch-TensorRT {version} could not compile the model ({first}).") from None
    seconds = time.perf_counter() - t0
    paths["program"].parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(cfg.shape(cfg.profile[1]), device="cuda")
    torch_tensorrt.save(trt_gm, str(paths["program"]), output_format="exported_program", arg_inputs=[example])
    device, cc = _cuda_device()
    record = {"program": str(paths["program"]), "torch_tensorrt_version": version,
              "tensorrt_version": _tensorrt_version(), "device": device, "compute_capability": cc,
              "build_seconds": round(seconds, 3), "backend": "torch_tensorrt", "settings": _jsonable(settings),
              "timing_cache": {"path": str(paths["timing_cache"])}, "config": cfg.to_json()}
    atomic_write_json(paths["build_json"], record)
    return record


def _tensorrt_version() -> str | None:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v)) for k, v in d.items()}
