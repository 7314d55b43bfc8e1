"""ONNX export of timm Vision Transformers, shaped for TensorRT.

What the exported graph keeps (invariant 4 of docs/architecture.md, each one a test):

* **One ``LayerNormalization`` node per LayerNorm.** The operator exists from opset 17 on
  (https://onnx.ai/onnx/operators/onnx__LayerNormalization.html); below 17 the exporters decompose
  it into ReduceMean/Sub/Pow/Sqrt/Div, which TensorRT then has to pattern-match back. ``opset`` must
  therefore be >= 17.
* **The attention as MatMul -> Softmax -> MatMul** (``Mul(q, scale) -> MatMul(q, k^T) -> Softmax ->
  MatMul(., v)``), the pattern TensorRT's multi-head-attention fusion recognises ("Fused Attention"
  in the TensorRT developer guide,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/transformers-fused-attention.html
  : Q or K multiplied by the attention scale, or both by its square root, before the first batched
  MatMul; see also the TensorRT best-practices guide on MHA fusion).

Exporter choice (measured with torch 2.14.1, onnx 1.23, onnxscript 0.7, on ``deit_tiny``):

* timm's ``Attention`` has a ``fused_attn`` flag; when it is on (timm's default) the forward calls
  ``F.scaled_dot_product_attention`` (SDPA).
* ``dynamo=True`` (torch.export-based, the default since torch 2.9): at opset 17/18 SDPA is
  decomposed into ``Mul(q, sqrt(scale))``, ``Mul(k^T, sqrt(scale))``, MatMul, Softmax, MatMul (it
  exports at opset 18 and converts down to 17 with the ONNX C API). At opset >= 23 it emits one ONNX
  ``Attention`` node instead, which is *not* the MatMul/Softmax/MatMul pattern and which older
  TensorRT ONNX parsers reject.
* ``dynamo=False`` (legacy TorchScript exporter; deprecated, warns that it will be removed): SDPA
  becomes MatMul/Softmax/MatMul, but the scale is computed at run time from the tensor shape
  (``Shape -> Cast -> Sqrt -> Div -> Sqrt`` on both q and k), plus dozens of Constant/Identity nodes.

We use **the dynamo exporter with ``fused_attn`` temporarily switched off** on every module that
has it (:func:`eager_attention`). timm's eager branch is exactly ``q * scale; q @ k^T; softmax;
@ v``, so the graph has the canonical pattern with a constant scale whatever the opset and torch
version. To keep the exported maths identical to what the model computes with SDPA, the context
manager also pins ``attn.scale`` to ``head_dim ** -0.5`` (SDPA's default scale) on timm
``Attention`` modules that had ``fused_attn`` on, and restores both afterwards. The legacy exporter
is kept as a fallback (``exporter="auto"``) for models that ``torch.export`` cannot trace.

Every export is verified: onnxruntime runs the graph on the trace input and its logits are compared
with the PyTorch model's (original flags, eval mode); a mismatch raises :class:`VitoptError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from vitopt.arch.config import preprocessing_of
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_bytes

__all__ = ["export_onnx", "check_onnx", "eager_attention", "export_mode", "op_counts", "MIN_OPSET",
           "EXPORTERS", "ONNXSIM_SKIPPED_PASSES", "PREPROCESSING_METADATA_KEY"]

log = logging.getLogger(__name__)

#: LayerNormalization is an ONNX operator from opset 17 on.
MIN_OPSET = 17
#: ``exporter`` values accepted by :func:`export_onnx`.
EXPORTERS = ("auto", "dynamo", "torchscript")
# protobuf cannot serialise a message over 2 GiB; larger models are written with external data.
_PROTO_LIMIT = 2**31 - 2**26
#: onnxsim passes we skip: they rewrite every 3-D ``MatMul + Add`` (each Linear on [B, N, D]
#: tokens) into ``Reshape -> Gemm -> Reshape``, a rewrite aimed at onnxruntime's CPU Gemm kernel.
#: TensorRT fuses the bias Add itself, and keeping the graph as torch emitted it (MatMul + Add)
#: leaves fewer nodes and the plain MatMul inputs that Q/DQ quantizers annotate. Unknown names
#: are ignored by older onnxsim versions.
ONNXSIM_SKIPPED_PASSES = ("fuse_matmul_add_bias_into_gemm", "fuse_matmul_add_bias_into_gemm_batched")
#: ONNX ``metadata_props`` key holding the model's preprocessing record as JSON
#: (:func:`vitopt.arch.config.set_preprocessing`: input_size, mean, std, crop_pct, interpolation, image_mode,
#: class_names), read back with ``onnx.load(path).metadata_props`` or ORT's ``get_modelmeta().custom_metadata_map``.
PREPROCESSING_METADATA_KEY = "vitopt.preprocessing"


# ------------------------------------------------------------------------------------ contexts
@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration, then restore every submodule's ``training`` flag.

    ``model.train(mode)`` would set one flag on all submodules; restoring per module keeps mixed
    states (e.g. a frozen, eval-mode backbone inside a training model) exactly as they were.
    """
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in saved:
            m.training = training


def _is_timm_vit_attention(module: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import Attention
    except Exception:  # pragma: no cover - timm is a dependency, but stay importable without it
        return False
    return isinstance(module, Attention)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[list[str]]:
    """Switch ``fused_attn`` off on every module that has it, keeping the maths; restore afterwards.

    With ``fused_attn`` off, timm's ``Attention.forward`` runs ``q * self.scale; q @ k^T; softmax;
    @ v``, which exports as Mul -> MatMul -> Softmax -> MatMul: the pattern TensorRT's MHA fusion
    matches (TensorRT developer guide, "Fused Attention"). The fused path instead calls
    ``scaled_dot_product_attention`` with its *default* scale ``1/sqrt(head_dim)``, which ignores
    ``self.scale``; so on timm ``Attention`` modules that were fused, ``scale`` is pinned to
    ``head_dim ** -0.5`` while the flag is off, and the eager graph computes what the fused model
    computes even if ``scale`` is stale (e.g. a hand-pruned model whose ``head_dim`` changed).

    Yields the qualified names of the modules whose flag was switched. ``fused_attn`` and ``scale``
    are restored on exit, also when the body raises.
    """
    saved: list[tuple[nn.Module, bool, Any]] = []
    names: list[str] = []
    try:
        for name, m in model.named_modules():
            if not hasattr(m, "fused_attn"):
                continue
            fused = bool(m.fused_attn)
            scale = getattr(m, "scale", None)
            saved.append((m, m.fused_attn, scale))
            if not fused:
                continue
            m.fused_attn = False
            head_dim = getattr(m, "head_dim", None)
            if _is_timm_vit_attention(m) and isinstance(head_dim, int) and head_dim > 0:
                m.scale = head_dim ** -0.5
            names.append(name)
        yield names
    finally:
        for m, fused, scale in saved:
            m.fused_attn = fused
            if scale is not None:
                m.scale = scale


# ------------------------------------------------------------------------------------ helpers
def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Number of nodes per ONNX op type in the main graph, sorted by op type."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return -1


def _split_sizes_below_opset_18(proto: onnx.ModelProto) -> None:
    """Rewrite ``Split(num_outputs=k)`` as opset-13 ``Split(x, sizes)`` in a graph below opset 18, in place.

    ``num_outputs`` is an opset-18 attribute (https://onnx.ai/onnx/operators/onnx__Split.html); the
    dynamo exporter's 18 -> 17 conversion leaves it on the Split that ``torch.chunk`` becomes (the
    packed SwiGLU / GluMlp of DINOv2), and the checker then rejects the graph. Sizes follow opset 18's
    rule: ``ceil(n / k)`` per output, the last one smaller. A split axis of unknown length is left alone.
    """
    if _opset_of(proto) >= 18:
        return
    nodes = [n for n in proto.graph.node
             if n.op_type == "Split" and any(a.name == "num_outputs" for a in n.attribute)]
    if not nodes:
        return
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: v.type.tensor_type.shape
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    for i, node in enumerate(nodes):
        attrs = {a.name: a for a in node.attribute}
        k, axis = int(attrs["num_outputs"].i), int(attrs["axis"].i) if "axis" in attrs else 0
        shape = shapes.get(node.input[0])
        if shape is None or len(node.input) > 1 or not shape.dim or not shape.dim[axis].HasField("dim_value"):
            continue
        n = int(shape.dim[axis].dim_value)
        step = -(-n // k)
        name = f"vitopt_split_sizes_{i}"
        proto.graph.initializer.append(onnx.numpy_helper.from_array(
            np.array([step] * (k - 1) + [n - step * (k - 1)], dtype=np.int64), name))
        node.input.append(name)
        node.attribute.remove(attrs["num_outputs"])


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {msg[:limit]}"


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise VitoptError(f"ONNX output path {path} is a directory; give a file path such as {path / 'model.onnx'}.")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VitoptError(f"cannot create the folder {parent} for the ONNX file ({exc.strerror or exc}).") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VitoptError(f"cannot write the ONNX file {path}: folder {parent} is not writable.")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _run_torch(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise VitoptError(f"{type(model).__name__} returned {type(out).__name__} in eval mode; export needs a "
                          "model that returns one logits tensor [batch, classes].")
    return out


def _torch_export(model: nn.Module, dummy: torch.Tensor, f: Path, *, opset: int, dynamic_batch: bool,
                  dynamo: bool) -> None:
    kw: dict[str, Any] = dict(input_names=["input"], output_names=["logits"], opset_version=opset)
    if dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        kw["verbose"] = False
        kw["external_data"] = True  # needed past 2 GiB; reloaded into memory below
    elif dynamic_batch:
        kw["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings(), _quiet_exporter_logs():
        # the legacy exporter's deprecation notice and TracerWarnings are expected here
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(model, (dummy,), str(f), dynamo=dynamo, **kw)


# Loggers that announce the expected opset 18 -> 17 down-conversion on every dynamo export; we
# report the opset actually written instead (``info["opset"]``, and a warning when it differs).
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._compat", "onnxscript.version_converter")


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    saved = [(lg, lg.level) for lg in map(logging.getLogger, _NOISY_LOGGERS)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """onnxsim the model; returns (model, None) or (original model, reason) when onnxsim fails."""
    try:
        import onnxsim
    except Exception as exc:  # pragma: no cover - onnxsim is a dependency
        return model, f"onnxsim is not importable ({_first_line(exc)})"
    if model.ByteSize() > _PROTO_LIMIT:
        return model, "the model is over 2 GiB, which onnxsim cannot take in memory"
    try:
        simplified, ok = onnxsim.simplify(model, skipped_optimizers=list(ONNXSIM_SKIPPED_PASSES))
    except Exception as exc:
        return model, f"onnxsim raised {_first_line(exc)}"
    if not ok:
        return model, "onnxsim's own check of the simplified graph failed"
    return simplified, None


def _write_model(model: onnx.ModelProto, path: Path) -> int:
    """Write ``model`` atomically; returns the size in bytes (graph file plus external data)."""
    if model.ByteSize() <= _PROTO_LIMIT:
        data = model.SerializeToString()
        atomic_write_bytes(path, data)
        stale = path.with_name(path.name + ".data")
        if stale.exists():  # a previous large export at this path; its data no longer belongs
            stale.unlink()
        return len(data)
    # > 2 GiB: weights go to "<name>.data" beside the graph (ONNX external data format); both are
    # written in a temp folder on the same filesystem, then renamed (data first, graph last).
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        location = path.name + ".data"
        onnx.save_model(model, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location)
        size = (tmp / path.name).stat().st_size + (tmp / location).stat().st_size
        os.replace(tmp / location, path.parent / location)
        os.replace(tmp / path.name, path)
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _set_metadata(proto: onnx.ModelProto, model: nn.Module) -> None:
    """Write ``model``'s preprocessing record (if it has one) into ``metadata_props`` under
    :data:`PREPROCESSING_METADATA_KEY` (ONNX IR ``ModelProto.metadata_props``: string key/value pairs)."""
    prep = preprocessing_of(model)
    if prep is None:
        return
    kept = [p for p in proto.metadata_props if p.key != PREPROCESSING_METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=PREPROCESSING_METADATA_KEY, value=json.dumps(prep, sort_keys=True))


def _ort_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


# ------------------------------------------------------------------------------------ public API
def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, int, int], *,
                opset: int = MIN_OPSET, dynamic_batch: bool = True, simplify: bool = True,
                exporter: str = "auto", verify: bool = True) -> dict[str, Any]:
    """Export a timm VisionTransformer (or any image classifier) to ONNX for TensorRT / onnxruntime.

    The graph has one input ``input`` of shape ``[batch, C, H, W]`` (float32 for an fp32 model) and
    one output ``logits`` of shape ``[batch, num_classes]``; ``batch`` is a symbolic dimension when
    ``dynamic_batch`` is true, else fixed to 1. The model is exported in eval mode with timm's fused
    attention switched off (see :func:`eager_attention` and the module docstring for why), so each
    attention block is Mul -> MatMul -> Softmax -> MatMul (TensorRT MHA fusion pattern) and each
    LayerNorm is one ``LayerNormalization`` node (ONNX operator docs, opset >= 17). Afterwards the
    model's ``training`` flags, ``fused_attn`` flags and ``scale`` attributes are as they were.

    Steps: export into a temp folder -> optional onnxsim, without the MatMul+Add -> Gemm passes
    (:data:`ONNXSIM_SKIPPED_PASSES`; on failure: keep the unsimplified graph, log a warning, record
    ``simplify_error``) -> ``onnx.checker.check_model`` -> optional
    verification with onnxruntime against the PyTorch logits -> the model's preprocessing record as
    metadata (:data:`PREPROCESSING_METADATA_KEY`) -> atomic write (temp file + rename)
    to ``path``. Models over 2 GiB are written with ONNX external data in ``<path>.data``.

    Args:
        model: the ``nn.Module``; it is exported on its own device and dtype.
        path: destination ``.onnx`` file; parent folders are created.
        input_shape: ``(C, H, W)`` of one image, in pixels.
        opset: default-domain ONNX opset, >= 17 (``LayerNormalization``). The dynamo exporter
            builds opset 18 and converts down to 17 when asked; the opset actually written is
            returned as ``opset``.
        dynamic_batch: make the batch dimension symbolic (``"batch"``); else batch is 1.
        simplify: run onnxsim (https://github.com/daquexian/onnx-simplifier).
        exporter: ``"dynamo"`` (torch.export-based ``torch.onnx.export(dynamo=True)``),
            ``"torchscript"`` (legacy tracer, deprecated by PyTorch) or ``"auto"``: dynamo, falling
            back to torchscript with a logged warning if torch.export cannot trace the model.
        verify: run the exported graph in onnxruntime (CPU) on the trace input and require
            ``max|logits_ort - logits_torch| <= 1e-4 + 1e-3 * max|logits_torch|`` (fp32 models).

    Returns:
        ``{"path": str, "opset": int, "exporter": "dynamo"|"torchscript", "simplified": bool,
        "simplify_error": str|None, "node_counts": {op_type: count}, "num_nodes": int,
        "file_size_bytes": int, "input_shape": [batch|"batch", C, H, W], "dynamic_batch": bool,
        "eager_attention_modules": [names], "max_abs_diff": float|None, "export_seconds": float,
        "exporter_fallback_reason": str|None}``.

    Raises:
        VitoptError: ``opset`` < 17, bad ``input_shape`` or ``exporter``, an unwritable ``path``,
            a model that rejects the input or does not return one tensor, an export failure, a
            graph that fails the ONNX checker, or a verification mismatch.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise VitoptError(f"ONNX opset {opset} is too old; use opset >= {MIN_OPSET} so LayerNorm exports as one "
                          "LayerNormalization node.")
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3
            or not all(isinstance(d, (int, np.integer)) and d > 0 for d in input_shape)):
        raise VitoptError(f"input_shape {input_shape!r} must be three positive integers (C, H, W).")
    if exporter not in EXPORTERS:
        raise VitoptError(f"unknown ONNX exporter {exporter!r}; allowed: {', '.join(EXPORTERS)}.")
    _check_target(path)

    c, h, w = (int(d) for d in input_shape)
    device, dtype = _model_device_dtype(model)
    trace_batch = 2 if dynamic_batch else 1  # batch 1 would invite torch.export to specialise it
    gen = torch.Generator().manual_seed(0)
    dummy = torch.randn(trace_batch, c, h, w, generator=gen).to(device=device, dtype=dtype)

    with export_mode(model):
        try:
            reference = _run_torch(model, dummy)
        except VitoptError:
            raise
        except Exception as exc:
            raise VitoptError(f"{type(model).__name__} rejects an input of shape {[trace_batch, c, h, w]} "
                              f"({_first_line(exc)}); check input_shape (C, H, W).") from None
        with eager_attention(model) as switched, tempfile.TemporaryDirectory(prefix="vitopt-onnx-") as tmp:
            tmp_file = Path(tmp) / "model.onnx"
            order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
            used, fallback_reason, errors = None, None, []
            for name in order:
                try:
                    _torch_export(model, dummy, tmp_file, opset=opset, dynamic_batch=dynamic_batch,
                                  dynamo=name == "dynamo")
                    used = name
                    break
                except Exception as exc:
                    errors.append(f"{name}: {_first_line(exc)}")
                    if exporter == "auto" and name == "dynamo":
                        fallback_reason = errors[-1]
                        log.warning("dynamo ONNX export of %s failed (%s); falling back to the TorchScript exporter",
                                    type(model).__name__, fallback_reason)
            if used is None:
                raise VitoptError(f"exporting {type(model).__name__} to ONNX failed ({'; '.join(errors)}).")
            try:
                proto = onnx.load(str(tmp_file))  # loads external data, if any, into memory
            except Exception as exc:
                raise VitoptError(f"the exporter wrote an unreadable ONNX file ({_first_line(exc)}).") from None
            _split_sizes_below_opset_18(proto)

    simplify_error = None
    if simplify:
        proto, simplify_error = _simplify(proto)
        if simplify_error:
            log.warning("onnxsim failed on %s (%s); keeping the unsimplified graph", path, simplify_error)

    try:
        if proto.ByteSize() <= _PROTO_LIMIT:
            onnx.checker.check_model(proto, full_check=False)
    except Exception as exc:
        raise VitoptError(f"the exported ONNX graph for {path} fails the checker ({_first_line(exc)}).") from None

    max_abs_diff = None
    if verify and dtype == torch.float32 and proto.ByteSize() <= _PROTO_LIMIT:
        ref = reference.detach().float().cpu().numpy()
        try:
            got = _ort_logits(proto, dummy.detach().cpu().numpy())
        except Exception as exc:
            raise VitoptError(f"onnxruntime cannot run the exported graph for {path} ({_first_line(exc)}).") from None
        max_abs_diff = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else math.inf
        tol = 1e-4 + 1e-3 * float(np.max(np.abs(ref)))
        if not max_abs_diff <= tol:
            raise VitoptError(f"the exported ONNX graph differs from the PyTorch model (max abs logit diff "
                              f"{max_abs_diff:.3g} > {tol:.3g}, output shapes {got.shape} vs {ref.shape}); "
                              "nothing was written.")

    _set_metadata(proto, model)
    try:
        size = _write_model(proto, path)
    except OSError as exc:
        raise VitoptError(f"cannot write the ONNX file {path} ({exc.strerror or exc}).") from None
    if proto.ByteSize() > _PROTO_LIMIT:
        check_onnx(path)

    if _opset_of(proto) != opset:
        log.warning("%s was written at ONNX opset %d (asked for %d): the %s exporter could not convert to the "
                    "requested opset", path, _opset_of(proto), opset, used)
    counts = op_counts(proto)
    return {
        "path": str(path),
        "opset": _opset_of(proto),
        "exporter": used,
        "exporter_fallback_reason": fallback_reason,
        "simplified": bool(simplify and simplify_error is None),
        "simplify_error": simplify_error,
        "node_counts": counts,
        "num_nodes": sum(counts.values()),
        "file_size_bytes": int(size),
        "input_shape": ["batch" if dynamic_batch else 1, c, h, w],
        "dynamic_batch": bool(dynamic_batch),
        "eager_attention_modules": switched,
        "max_abs_diff": max_abs_diff,
        "export_seconds": round(time.perf_counter() - t0, 3),
    }


def check_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file and run ``onnx.checker.check_model`` on it.

    Follows the ONNX checker docs (https://onnx.ai/onnx/api/checker.html). A file with external data
    (``<name>.data`` beside it) is checked by path, so models over 2 GiB work.

    Returns:
        the loaded ``onnx.ModelProto`` (with external data loaded).

    Raises:
        VitoptError: ``ONNX file X does not exist.`` or ``ONNX file X fails the checker: ...``
            (also for a file that is not an ONNX protobuf at all).
    """
    path = Path(path)
    if not path.is_file():
        raise VitoptError(f"ONNX file {path} does not exist.")
    try:
        model = onnx.load(str(path))
        if model.ByteSize() > _PROTO_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except Exception as exc:
        raise VitoptError(f"ONNX file {path} fails the checker: {_first_line(exc)}.") from None
    return model
