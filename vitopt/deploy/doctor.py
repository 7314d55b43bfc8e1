"""``vitopt doctor``: explain a TensorRT engine from its engine-inspector JSON.

A build with detailed profiling verbosity (``ProfilingVerbosity.DETAILED``, which ``vitopt build``
sets, or trtexec's ``--profilingVerbosity=detailed --exportLayerInfo=FILE``) makes the engine
inspector report every fused layer: its type, tactic (kernel), inputs and outputs with their
formats/data types, and the ONNX nodes it implements (TensorRT developer guide, "Engine Inspector").
:func:`diagnose` reads that JSON and says, per attention block, whether the multi-head attention was
fused into one kernel, which precision LayerNorm, Softmax and the GEMMs run in; for the whole engine
whether 2:4 sparse tactics were chosen when sparsity was asked for, whether the Q/DQ pairs fused into
their GEMMs, which layers fell back from DLA to the GPU, and a one-line verdict of why an expected
speed-up may be missing.

The JSON layout read here - ``{"Layers": [...], "Bindings": [...]}``; per layer ``Name``,
``LayerType``, ``ParameterType``, ``Inputs``/``Outputs`` (``Name``, ``Location``, ``Dimensions``,
``Format/Datatype``), ``TacticName``, ``TacticValue``, ``Metadata`` (``[ONNX Layer: name]`` entries
joined by ``\\x1e``), ``HasSparseWeights`` - follows the TensorRT developer guide's "Engine Inspector"
section and NVIDIA's TensorRT Engine Explorer (``tools/experimental/trt-engine-explorer/trex/`` in
github.com/NVIDIA/TensorRT: ``parser.py``, ``layer.py``, ``activations.py``, ``lint.py``), whose
format-string table maps ``Format/Datatype`` to precisions. Myelin-compiled graphs (TensorRT 10) report
``LayerType`` ``gemm``/``kgen`` with ``Format/Datatype`` ``Half``/``Float``/``Int8``/``FP8``; a fused
MHA runs an ``mha`` kernel (e.g. ``_gemm_mha_v2``, ``fmha``). Detection is by these names and by the
ONNX nodes a layer covers, so it reads engines of TensorRT 10.x and 11.x alike.

:func:`doctor` finds the JSON for a path (a build folder, an engine with its ``.layers.json``, or the
JSON itself) and, where only an engine exists, asks TensorRT's inspector live (skipped with one
sentence when TensorRT is missing).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from vitopt.errors import VitoptError

__all__ = ["diagnose", "doctor", "layer_precision", "classify_layer", "parse_layer_info"]

_ONNX = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_BLOCK = re.compile(r"blocks?[._/]?(\d+)(?:[._/]|$)")
_GEMM_TYPES = {"gemm", "caskgemmmatrixmultiply", "caskgemmconvolution", "caskconvolution", "caskflattenconvolution",
               "matrixmultiply", "fullyconnected", "convolution", "caskgemmlayer"}
_QDQ_TYPES = {"quantize", "dequantize", "scale", "quantizelinear", "dequantizelinear"}
#: precision words in ``Format/Datatype`` strings, most specific first (trex activations.py table).
_FORMATS = (("fp8", "fp8"), ("bfloat16", "bf16"), ("int8", "int8"), ("fp16", "fp16"), ("half", "fp16"),
            ("fp32", "fp32"), ("float", "fp32"))


def parse_layer_info(text_or_obj: str | dict[str, Any], where: str = "layer information") -> dict[str, Any]:
    """The inspector JSON as a dict with ``"Layers"`` (list) and ``"Bindings"`` (list).

    Raises:
        VitoptError: not JSON, or not an object with a ``Layers`` list.
    """
    obj = text_or_obj
    if isinstance(text_or_obj, str):
        try:
            obj = json.loads(text_or_obj)
        except ValueError as exc:
            raise VitoptError(f"{where} is not JSON ({exc}).") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("Layers"), list):
        raise VitoptError(f"{where} is not engine-inspector JSON (expected an object with a \"Layers\" list).")
    return {"Layers": obj["Layers"], "Bindings": list(obj.get("Bindings") or [])}


def layer_precision(layer: dict[str, Any]) -> str | None:
    """Precision a layer computes in: the data type of its first float/int8/fp8 input (else output).

    ``"fp8"``, ``"int8"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``; None when no tensor says.
    """
    for side in ("Inputs", "Outputs"):
        for t in layer.get(side) or []:
            fmt = str(t.get("Format/Datatype", "")).lower() if isinstance(t, dict) else ""
            for word, prec in _FORMATS:
                if word in fmt:
                    return prec
    return None


def _onnx_nodes(layer: dict[str, Any]) -> list[str]:
    return _ONNX.findall(str(layer.get("Metadata", "")))


def classify_layer(layer: dict[str, Any]) -> str:
    """What a layer is: ``mha`` (fused attention), ``softmax``, ``layernorm``, ``gemm``, ``qdq`` (a
    stand-alone quantize/dequantize), ``dla``, ``reformat`` or ``other``."""
    ltype = str(layer.get("LayerType", "")).lower()
    ptype = str(layer.get("ParameterType", "")).lower()
    name = str(layer.get("Name", ""))
    tactic = str(layer.get("TacticName", "")).lower()
    nodes = " ".join(_onnx_nodes(layer)).lower()
    text = f"{name.lower()} {nodes}"
    if ltype == "dla":
        return "dla"
    if ("mha" in ltype or "attention" in ltype or "mha" in tactic or "fmha" in tactic or "flash" in tactic
            or "_mha" in name.lower() or ("softmax" in nodes and nodes.count("matmul") >= 2)):
        return "mha"
    if ltype in _QDQ_TYPES or ptype in _QDQ_TYPES or (
            nodes and all(("quantizelinear" in n.lower()) for n in _onnx_nodes(layer))):
        return "qdq"
    if ltype == "reformat" or "reformatting" in name.lower():
        return "reformat"
    if "softmax" in text or ptype == "softmax":
        return "softmax"
    if "layernorm" in text or "layer_norm" in text or "normalization" in ptype or ptype == "normalization":
        return "layernorm"
    if ltype in _GEMM_TYPES or ptype in _GEMM_TYPES or "matmul" in text or "gemm" in text:
        return "gemm"
    return "other"


def _block_of(layer: dict[str, Any]) -> int | None:
    for text in (*_onnx_nodes(layer), str(layer.get("Name", ""))):
        m = _BLOCK.search(text)
        if m:
            return int(m.group(1))
    return None


def _sparse(layer: dict[str, Any]) -> bool:
    tactic = str(layer.get("TacticName", "")).lower()
    return bool(layer.get("HasSparseWeights")) or "sparse" in tactic or "_sp_" in tactic


def _is_dla_copy(layer: dict[str, Any]) -> bool:
    name = str(layer.get("Name", "")).lower()
    return "to nvm" in name or "from nvm" in name or "copy finish" in name


def diagnose(layer_info: str | dict[str, Any], build: dict[str, Any] | None = None,
             name: str = "engine") -> dict[str, Any]:
    """Explain one engine from its inspector JSON (module docstring).

    Args:
        layer_info: the inspector JSON (text or parsed).
        build: the engine's ``build.json`` record (its ``config`` says which precision, sparsity and
            DLA core were asked for), or None (then nothing is "expected").
        name: how the engine is named in the report.

    Returns:
        ``{"engine", "detailed", "asked": {precision, sparsity, dla_core}, "layers", "blocks": [{block,
        mha_fused, mha_kernel, softmax, layernorm, gemms}], "gemm_precisions", "layernorm_precisions",
        "softmax_precisions", "sparse": {asked, sparse_layers, gemms}, "qdq": {asked, standalone,
        names, fused}, "dla": {asked, dla_layers, gpu_layers, fallback} | None, "verdict"}``.

    Raises:
        VitoptError: the JSON is not engine-inspector JSON.
    """
    info = parse_layer_info(layer_info, f"the layer information of {name}")
    cfg = dict((build or {}).get("config") or {})
    asked = {"precision": cfg.get("precision"), "sparsity": bool(cfg.get("sparsity")), "dla_core": cfg.get("dla_core")}
    layers = info["Layers"]
    detailed = bool(layers) and all(isinstance(lay, dict) for lay in layers)
    out: dict[str, Any] = {"engine": name, "detailed": detailed, "asked": asked, "layers": len(layers)}
    if not detailed:
        out.update(blocks=[], gemm_precisions={}, layernorm_precisions={}, softmax_precisions={},
                   sparse={"asked": asked["sparsity"], "sparse_layers": 0, "gemms": 0},
                   qdq={"asked": asked["precision"] in ("int8", "fp8"), "standalone": 0, "names": [], "fused": None},
                   dla=None,
                   verdict="the engine was built without detailed profiling verbosity, so its layers carry only names; "
                           "rebuild with `vitopt build` (or trtexec --profilingVerbosity=detailed --exportLayerInfo).")
        return out
    kinds = [classify_layer(lay) for lay in layers]
    blocks: dict[int, dict[str, Any]] = {}
    counts: dict[str, dict[str, int]] = {"gemm": {}, "layernorm": {}, "softmax": {}}
    for lay, kind in zip(layers, kinds):
        prec = layer_precision(lay) or "?"
        if kind in counts:
            counts[kind][prec] = counts[kind].get(prec, 0) + 1
        b = _block_of(lay)
        if b is None or kind not in ("mha", "softmax", "layernorm", "gemm"):
            continue
        row = blocks.setdefault(b, {"block": b, "mha_fused": False, "mha_kernel": None, "softmax": set(),
                                    "layernorm": set(), "gemms": set()})
        if kind == "mha":
            row["mha_fused"] = True
            row["mha_kernel"] = str(lay.get("TacticName") or lay.get("Name"))
            row["gemms"].add(prec)
        elif kind == "gemm":
            row["gemms"].add(prec)
        else:
            row[kind].add(prec)
    block_rows = []
    for b in sorted(blocks):
        row = blocks[b]
        block_rows.append({**row, "softmax": "fused" if row["mha_fused"] and not row["softmax"]
                           else "/".join(sorted(row["softmax"])) or "-",
                           "layernorm": "/".join(sorted(row["layernorm"])) or "-",
                           "gemms": "/".join(sorted(row["gemms"])) or "-"})
    gemm_layers = [lay for lay, k in zip(layers, kinds) if k in ("gemm", "mha")]
    sparse = {"asked": asked["sparsity"], "sparse_layers": sum(_sparse(lay) for lay in gemm_layers),
              "gemms": len(gemm_layers)}
    qdq_layers = [str(lay.get("Name")) for lay, k in zip(layers, kinds) if k == "qdq"]
    qdq = {"asked": asked["precision"] in ("int8", "fp8"), "standalone": len(qdq_layers), "names": qdq_layers[:20],
           "fused": not qdq_layers}
    dla = None
    if asked["dla_core"] is not None or "dla" in kinds:
        on_dla = [lay for lay, k in zip(layers, kinds) if k == "dla"]
        gpu = [lay for lay, k in zip(layers, kinds) if k not in ("dla", "reformat") and not _is_dla_copy(lay)]
        dla = {"asked": asked["dla_core"], "dla_layers": len(on_dla), "gpu_layers": len(gpu),
               "fallback": [str(lay.get("Name")) for lay in gpu][:30]}
    out.update(blocks=block_rows, gemm_precisions=counts["gemm"], layernorm_precisions=counts["layernorm"],
               softmax_precisions=counts["softmax"], sparse=sparse, qdq=qdq, dla=dla)
    out["verdict"] = _verdict(out)
    return out


def _verdict(d: dict[str, Any]) -> str:
    """The first reason, in order of how much latency it usually costs, why a speed-up may be missing."""
    asked = d["asked"]
    prec = asked["precision"]
    dla = d["dla"]
    if dla is not None and dla["asked"] is not None and dla["gpu_layers"] > dla["dla_layers"]:
        return (f"{dla['gpu_layers']} layers fell back from DLA to the GPU ({dla['dla_layers']} DLA subgraphs): this "
                "engine's latency is mostly GPU latency; run it on the GPU or keep only DLA-supported layers.")
    low = prec in ("fp16", "bf16", "int8", "fp8")
    if low and d["gemm_precisions"] and set(d["gemm_precisions"]) <= {"fp32", "?"}:
        return (f"{prec} was asked for but every GEMM runs in fp32: the graph carries no {prec} (TensorRT 11 takes "
                "precision from the ONNX: AutoCast it, or quantize for int8/fp8).")
    if d["qdq"]["asked"] and d["qdq"]["standalone"]:
        return (f"{d['qdq']['standalone']} Q/DQ layers did not fuse into their GEMMs (e.g. {d['qdq']['names'][0]}): "
                "they convert tensors in separate kernels; quantize with ModelOpt's default placement.")
    blocks = d["blocks"]
    unfused = [r["block"] for r in blocks if not r["mha_fused"]]
    if blocks and unfused:
        return (f"attention is not fused in {len(unfused)} of {len(blocks)} blocks (e.g. block {unfused[0]}): the "
                "head_dim or sequence length is outside the fused-MHA kernels' sizes for this precision; prune "
                "with round_to: auto and this deploy_target.")
    slow_norm = {"fp32"} & (set(d["layernorm_precisions"]) | set(d["softmax_precisions"]))
    if low and slow_norm:
        return (f"LayerNorm/Softmax run in fp32 in a {prec} engine: quantize with high_precision_dtype fp16 so the "
                "unquantized ops run in half precision.")
    if d["sparse"]["asked"] and d["sparse"]["sparse_layers"] == 0:
        return ("2:4 sparsity was asked for but no sparse tactic was chosen: the weights are not 2:4 sparse "
                "(run the semi24 sparse training) or the dense kernels were faster at these shapes.")
    fused = sum(r["mha_fused"] for r in blocks)
    return (f"no obvious loss: {fused}/{len(blocks)} attention blocks fused, GEMMs in "
            f"{'/'.join(sorted(d['gemm_precisions'])) or '-'}; compare latency against the dense engine.")


def _read(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VitoptError(f"{what} {path} cannot be read as JSON ({str(exc).splitlines()[0][:200]}).") from None


def _live_layer_info(engine_path: Path) -> str:
    """The inspector JSON of an engine file, asked from TensorRT (needs TensorRT and the engine's GPU)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise VitoptError(f"{engine_path} has no .layers.json beside it and TensorRT is not installed to inspect it "
                          "live; rebuild it with `vitopt build`, which writes the layer JSON.") from None
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise VitoptError(f"TensorRT could not deserialize {engine_path} on this machine (another GPU or version?).")
    return str(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))


def doctor(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Diagnose every engine at ``path``: a build folder (each ``*.layers.json`` with its ``*.build.json``),
    an engine file (its ``.layers.json``, or TensorRT's inspector live), or a ``.layers.json`` file.

    Returns:
        one :func:`diagnose` result per engine.

    Raises:
        VitoptError: a missing path, a folder without layer JSON, unreadable JSON, or an engine without
            layer JSON where TensorRT is missing.
    """
    p = Path(path)
    if not p.exists():
        raise VitoptError(f"{p} does not exist; give an engine, its .layers.json, or a build folder.")

    def record_for(stem_path: Path) -> dict[str, Any] | None:
        stem = stem_path.name.split(".")[0]
        rec = stem_path.with_name(f"{stem}.build.json")
        return _read(rec, "build record") if rec.is_file() else None

    if p.is_dir():
        found = sorted(p.glob("*.layers.json")) or sorted(p.glob("*/*.layers.json"))
        if not found:
            raise VitoptError(f"{p} holds no *.layers.json; build with `vitopt build` (detailed profiling) or pass "
                              "an engine file.")
        return [diagnose(_read(f, "layer information"), record_for(f), f.name.split(".")[0]) for f in found]
    if p.name.endswith(".json"):
        return [diagnose(_read(p, "layer information"), record_for(p), p.name.split(".")[0])]
    sidecar = p.with_name(p.name.split(".")[0] + ".layers.json")
    text = _read(sidecar, "layer information") if sidecar.is_file() else _live_layer_info(p)
    return [diagnose(text, record_for(p), p.name.split(".")[0])]
