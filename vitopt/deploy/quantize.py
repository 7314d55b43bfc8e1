"""Post-training quantization of an ONNX model with NVIDIA ModelOpt (optional extra ``vitopt[quant]``).

- ``int8`` / ``fp8``: ``modelopt.onnx.quantization.quantize`` inserts QuantizeLinear/DequantizeLinear
  (Q/DQ) pairs with scales calibrated on real images (ModelOpt docs, "ONNX PTQ"; TensorRT developer
  guide, "Explicit quantization"). The result is what TensorRT builds INT8/FP8 engines from - on
  TensorRT 10 with the INT8/FP8 flag, on TensorRT 11 (strongly typed) as is. FP8 needs compute
  capability >= 8.9 (H100, L4); ONNX Runtime CPU cannot run FP8 Q/DQ, so its accuracy is measured on
  the target.
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

__all__ = ["QUANT_MODES", "require_modelopt", "calibration_batches", "quantize_onnx", "qdq_counts",
           "QUANT_EXTRA_HINT"]

QUANT_MODES = ("int8", "fp8", "fp16", "bf16")
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


def quantize_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike, mode: str, *,
                  calibration: np.ndarray | None = None, calibration_method: str = "entropy",
                  high_precision_dtype: str = "fp32", op_types_to_exclude: list[str] | None = None) -> dict[str, Any]:
    """Quantize (int8/fp8) or down-cast (fp16/bf16) an ONNX classifier with ModelOpt.

    Args:
        onnx_path: the fp32 ONNX (input ``[batch, C, H, W]``).
        out_path: destination ``.onnx`` (written atomically).
        mode: one of :data:`QUANT_MODES`.
        calibration: float32 ``[N, C, H, W]`` model-ready images, required for int8/fp8.
        calibration_method: ``"entropy"`` or ``"max"`` for int8 (ModelOpt; fp8 always uses max).
        high_precision_dtype: dtype ModelOpt leaves unquantized ops in: ``"fp32"`` keeps them
            runnable by ONNX Runtime CPU (for the accuracy check); ``"fp16"`` is ModelOpt's default
            for TensorRT.
        op_types_to_exclude: ONNX op types left unquantized.

    Returns:
        ``{"path", "mode", "calibration_images", "calibration_method", "QuantizeLinear",
        "DequantizeLinear", "float16_initializers"}``.

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
    mo = require_modelopt()
    out = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="vitopt-quant-") as tmp:
        tmp_out = Path(tmp) / "model.onnx"
        try:
            if mode in ("int8", "fp8"):
                mo.quantization.quantize(
                    onnx_path=str(src), quantize_mode=mode,
                    calibration_data=np.ascontiguousarray(calibration, dtype=np.float32),
                    calibration_method=("max" if mode == "fp8" else calibration_method),
                    calibration_eps=["cpu"], high_precision_dtype=high_precision_dtype,
                    op_types_to_exclude=op_types_to_exclude, output_path=str(tmp_out), log_level="WARNING")
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
            **qdq_counts(out)}
