"""Post-training quantization of an ONNX model with NVIDIA ModelOpt (optional extra ``vitopt[quant]``).

- ``int8`` / ``fp8``: ``modelopt.onnx.quantization.quantize`` inserts QuantizeLinear/DequantizeLinear
  (Q/DQ) pairs with scales calibrated on real images (ModelOpt docs, "ONNX PTQ"; TensorRT developer
  guide, "Explicit quantization"). The result is what TensorRT builds INT8/FP8 engines from - on
  TensorRT 10 with the INT8/FP8 flag, on TensorRT 11 (strongly typed) as is. FP8 needs compute
  capability >= 8.9 (H100, L4); ONNX Runtime CPU cannot run FP8 Q/DQ, so its accuracy is measured on
  the target.

  The ops left unquantized (LayerNorm, Softmax, GELU, residual adds) run in ``high_precision_dtype``.
  Under strong typing (TensorRT 11, always) the graph's types are final, so an fp32 choice would run
  them in fp32 and an int8 engine could be slower than an fp16 one; the default is therefore ModelOpt's
  own default ``"fp16"`` (``modelopt.onnx.quantization.quantize(high_precision_dtype=...)``), and
  ``"fp32"`` remains for graphs meant for an ONNX Runtime CPU check. Calibration runs with a static
  batch (``calibration_shapes="input:BxCxHxW"``), so a dynamic-batch ONNX is not calibrated one image
  at a time.
- ``fp16`` / ``bf16``: ``modelopt.onnx.autocast.convert_to_mixed_precision`` (AutoCast) converts
  weights and activations, keeping numerically sensitive nodes in fp32 and the graph I/O in fp32;
  strongly typed TensorRT 11 builds take their precision from such a graph.

``modelopt`` is imported lazily; a missing package is one sentence naming the extra. Calibration
images come from the recipe's training split (:func:`calibration_batches`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vitopt.errors import VitoptError
from vitopt.io import atomic_write_bytes

__all__ = ["QUANT_MODES", "HIGH_PRECISION_DTYPES", "require_modelopt", "calibration_batches", "quantize_onnx",
           "qdq_counts", "calibration_plan", "QUANT_EXTRA_HINT"]

QUANT_MODES = ("int8", "fp8", "fp16", "bf16")
#: dtypes ModelOpt may leave the unquantized ops in: fp16 for TensorRT targets, fp32 for ORT CPU checks.
HIGH_PRECISION_DTYPES = ("fp16", "fp32")
QUANT_EXTRA_HINT = "install the extra with `pip install 'vitopt[quant]'`"


def require_modelopt() -> Any:
    """Import and return ``modelopt.onnx``.

    Raises:
        VitoptError: nvidia-modelopt is not installed (says which extra to install).
    """
    try:
        import modelopt.onnx  # noqa: F401
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as exc:
        raise VitoptError(f"quantization needs nvidia-modelopt, which is not importable ({exc.name or exc}); "
                          f"{QUANT_EXTRA_HINT}.") from None
    import modelopt.onnx

    return modelopt.onnx


def calibration_batches(dataset: Any, num_images: int, seed: int = 0) -> np.ndarray:
    """Draw ``num_images`` model-ready images from ``dataset`` without replacement (seeded).

    Args:
        dataset: a map-style dataset of ``(image [C, H, W] tensor, label)`` (a DataBundle split).
        num_images: how many (capped at ``len(dataset)``), >= 1.
        seed: ``numpy.random.default_rng`` seed of the draw.

    Returns:
        float32 ``[N, C, H, W]``.

    Raises:
        VitoptError: ``num_images`` < 1 or an empty dataset.
    """
    if not isinstance(num_images, int) or num_images < 1:
        raise VitoptError(f"calibration needs at least one image; got num_images={num_images!r}.")
    n = len(dataset)
    if n == 0:
        raise VitoptError("the calibration dataset is empty.")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(num_images, n), replace=False))
    return np.stack([np.asarray(dataset[int(i)][0], dtype=np.float32) for i in idx])


def qdq_counts(path: str | os.PathLike) -> dict[str, int]:
    """Number of ``QuantizeLinear`` and ``DequantizeLinear`` nodes and FLOAT16 initializers of an ONNX file."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear"),
            "float16_initializers": sum(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)}


def calibration_plan(onnx_path: str | os.PathLike, num_images: int, batch: int) -> tuple[int, str]:
    """``(images used, calibration_shapes)`` for ModelOpt: a static batch ``min(batch, num_images)`` and a
    whole number of batches (``num_images`` rounded down to a multiple of it).

    Returns e.g. ``(480, "input:32x3x224x224")`` for 500 images in batches of 32.

    Raises:
        VitoptError: the ONNX's first input is not ``[B, C, H, W]`` with static C, H, W, or ``batch`` < 1.
    """
    import onnx

    if not isinstance(batch, int) or batch < 1:
        raise VitoptError(f"calibration batch must be a positive integer; got {batch!r}.")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inp = next((i for i in model.graph.input if i.name not in inits), None)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim] if inp else []
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise VitoptError(f"{onnx_path}: the first input must be [batch, C, H, W] with static C, H, W; got {dims}.")
    b = dims[0] if dims[0] else min(batch, num_images)      # a fixed-batch graph calibrates at its own batch
    used = num_images // b * b
    if used == 0:
        raise VitoptError(f"{onnx_path} has a fixed batch of {b} but only {num_images} calibration images were given.")
    return used, f"{inp.name}:" + "x".join(str(d) for d in (b, *dims[1:]))


def quantize_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike, mode: str, *,
                  calibration: np.ndarray | None = None, calibration_method: str = "entropy",
                  high_precision_dtype: str = "fp16", calibration_batch: int = 32,
                  calibration_eps: list[str] | None = None,
                  op_types_to_exclude: list[str] | None = None) -> dict[str, Any]:
    """Quantize (int8/fp8) or down-cast (fp16/bf16) an ONNX classifier with ModelOpt.

    Args:
        onnx_path: the fp32 ONNX (input ``[batch, C, H, W]``).
        out_path: destination ``.onnx`` (written atomically).
        mode: one of :data:`QUANT_MODES`.
        calibration: float32 ``[N, C, H, W]`` model-ready images, required for int8/fp8.
        calibration_method: ``"entropy"`` or ``"max"`` for int8 (ModelOpt; fp8 always uses max).
        high_precision_dtype: dtype ModelOpt leaves unquantized ops in: ``"fp16"`` (default; ModelOpt's
            default, what a strongly typed TensorRT engine should run) or ``"fp32"`` (for graphs checked
            with ONNX Runtime CPU).
        calibration_batch: images per calibration batch (static ``calibration_shapes``); the images
            used are rounded down to a whole number of batches (:func:`calibration_plan`).
        calibration_eps: ModelOpt calibration execution providers; default ``["cpu"]``
            (``["cuda:0", "cpu"]`` on a GPU machine is faster).
        op_types_to_exclude: ONNX op types left unquantized.

    Returns:
        ``{"path", "mode", "calibration_images", "calibration_method", "calibration_shapes",
        "high_precision_dtype", "QuantizeLinear", "DequantizeLinear", "float16_initializers"}``.

    Raises:
        VitoptError: unknown mode, missing ONNX, missing/ill-shaped calibration data, ModelOpt not
            installed, or a ModelOpt failure (its first line).
    """
    src = Path(onnx_path)
    if mode not in QUANT_MODES:
        raise VitoptError(f"unknown quantization mode {mode!r}; allowed: {', '.join(QUANT_MODES)}.")
    if not src.is_file():
        raise VitoptError(f"ONNX file {src} does not exist; export one first.")
    if mode in ("int8", "fp8"):
        if calibration is None or np.asarray(calibration).ndim != 4 or len(calibration) == 0:
            raise VitoptError(f"{mode} quantization needs calibration images of shape [N, C, H, W] with N >= 1.")
        if calibration_method not in ("entropy", "max"):
            raise VitoptError(f"calibration_method {calibration_method!r} is not known; allowed: entropy, max.")
    if high_precision_dtype not in HIGH_PRECISION_DTYPES:
        raise VitoptError(f"high_precision_dtype {high_precision_dtype!r} is not known; allowed: "
                          f"{', '.join(HIGH_PRECISION_DTYPES)}.")
    shapes = None
    if mode in ("int8", "fp8"):
        used, shapes = calibration_plan(src, len(calibration), calibration_batch)
        calibration = np.ascontiguousarray(np.asarray(calibration)[:used], dtype=np.float32)
    mo = require_modelopt()
    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="vitopt-quant-") as tmp:
        tmp_out = Path(tmp) / "model.onnx"
        try:
            if mode in ("int8", "fp8"):
                mo.quantization.quantize(
                    onnx_path=str(src), quantize_mode=mode, calibration_data=calibration,
                    calibration_method=("max" if mode == "fp8" else calibration_method),
                    calibration_shapes=shapes, calibration_eps=list(calibration_eps or ["cpu"]),
                    high_precision_dtype=high_precision_dtype, op_types_to_exclude=op_types_to_exclude,
                    output_path=str(tmp_out), log_level="WARNING")
            else:
                import onnx
                from modelopt.onnx.autocast import convert_to_mixed_precision

                model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type=mode, keep_io_types=True,
                                                   providers=["cpu"])
                onnx.save(model, str(tmp_out))
        except VitoptError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise VitoptError(f"ModelOpt could not {mode}-convert {src} ({first}).") from None
        if not tmp_out.is_file():
            raise VitoptError(f"ModelOpt wrote no {mode} model for {src}.")
        atomic_write_bytes(out, tmp_out.read_bytes())
    n_cal = 0 if calibration is None or mode not in ("int8", "fp8") else int(len(calibration))
    return {"path": str(out), "mode": mode, "calibration_images": n_cal,
            "calibration_method": ("max" if mode == "fp8" else calibration_method) if n_cal else None,
            "calibration_shapes": shapes, "high_precision_dtype": high_precision_dtype if n_cal else None,
            **qdq_counts(out)}
