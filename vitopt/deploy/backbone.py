"""Pruned hierarchical backbones for dense tasks: multi-scale features and their ONNX export.

SiDT (Xue et al. 2022, arXiv 2204.07722) prunes transformer backbones for object detection; a
detection or segmentation neck (FPN, UPerNet, ...) is built on the backbone's per-stage feature maps
and needs their channel counts. A pruned Swin / PVTv2 keeps timm's ``forward_intermediates`` and its
``feature_info`` reports the new widths (the families' ``set_dims`` update them), so:

* :func:`make_backbone` wraps a (pruned) classifier in timm's ``FeatureGetterNet`` - the same wrapper
  ``timm.create_model(..., features_only=True)`` returns for these models - on a copy, leaving the
  classifier untouched; ``backbone.feature_info.channels()`` / ``.reduction()`` give what a neck needs.
* :func:`feature_specs` lists, per output stage, ``{index, module, num_chs, reduction, shape}``.
* :func:`export_backbone_onnx` exports the backbone with one ONNX output per stage (``feat0`` ...),
  NCHW, dynamic batch, fused attention off (Mul-MatMul-Softmax-MatMul, as
  :mod:`vitopt.deploy.onnx_export` does for classifiers), and verifies every output against PyTorch
  in ONNX Runtime.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitopt.deploy.onnx_export import MIN_OPSET, check_onnx, eager_attention, export_mode
from vitopt.errors import VitoptError
from vitopt.io import atomic_write_bytes

__all__ = ["make_backbone", "feature_specs", "export_backbone_onnx"]


def make_backbone(model: nn.Module, out_indices: Sequence[int] | int | None = None) -> nn.Module:
    """A ``timm.models.FeatureGetterNet`` over a copy of ``model`` returning NCHW maps of ``out_indices``.

    Args:
        model: a timm model with ``forward_intermediates`` and ``feature_info`` (SwinTransformer,
            PyramidVisionTransformerV2), dense or pruned by vitopt.
        out_indices: stage indices (default: every stage), or an int n for the last n stages.

    Returns:
        The backbone in eval mode; ``backbone(x)`` is a list of ``[B, C_s, H_s, W_s]`` tensors and
        ``backbone.feature_info.channels()`` their C_s.

    Raises:
        VitoptError: the model has no ``forward_intermediates`` / ``feature_info``, or an index is out of range.
    """
    from timm.models._features import FeatureGetterNet

    if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
        raise VitoptError(f"{type(model).__name__} has no forward_intermediates/feature_info; multi-scale "
                          "backbones need a hierarchical timm model (SwinTransformer, PyramidVisionTransformerV2).")
    n = len(model.feature_info)
    if out_indices is None:
        out_indices = tuple(range(n))
    elif not isinstance(out_indices, int):
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or any(not -n <= i < n for i in out_indices):
            raise VitoptError(f"out_indices {list(out_indices)} are not stage indices of a {n}-stage model "
                              f"(allowed: 0..{n - 1}).")
    return FeatureGetterNet(copy.deepcopy(model), out_indices=out_indices).eval()


def feature_specs(backbone: nn.Module, input_shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Per output stage ``{index, module, num_chs, reduction, shape}`` of ``backbone`` (from :func:`make_backbone`).

    ``shape`` is ``[C, H, W]`` measured by one forward of a zero image of ``input_shape`` (C, H, W),
    so a neck can be sized without running the model itself.
    """
    info = backbone.feature_info
    with torch.no_grad(), export_mode(backbone):
        feats = backbone(torch.zeros(1, *input_shape))
    return [{"index": int(i), "module": info.module_name()[k], "num_chs": int(info.channels()[k]),
             "reduction": int(info.reduction()[k]), "shape": list(f.shape[1:])}
            for k, (i, f) in enumerate(zip(backbone.out_indices, feats))]


class _TupleOut(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(x))


def _export(wrapper: nn.Module, dummy: torch.Tensor, f: Path, names: list[str], opset: int, dynamic_batch: bool,
            dynamo: bool) -> None:
    kw: dict[str, Any] = dict(input_names=["input"], output_names=names, opset_version=opset)
    if dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        kw["verbose"] = False
    elif dynamic_batch:
        kw["dynamic_axes"] = {"input": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (dummy,), str(f), dynamo=dynamo, **kw)


def export_backbone_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, int, int], *,
                         out_indices: Sequence[int] | None = None, opset: int = MIN_OPSET,
                         dynamic_batch: bool = True, simplify: bool = True, verify_batch: int = 2,
                         atol: float = 1e-4) -> dict[str, Any]:
    """Export the multi-scale backbone of ``model`` to ONNX, one output per stage, verified in ONNX Runtime.

    Graph: input ``input`` ``[batch, C, H, W]`` float32; outputs ``feat0``, ``feat1``, ... (one per
    entry of ``out_indices``) ``[batch, C_s, H_s, W_s]``; ``batch`` symbolic when ``dynamic_batch``.
    Exported with the dynamo exporter (the TorchScript exporter as a fallback when ``torch.export``
    cannot trace the model), fused attention switched off so every attention is
    Mul-MatMul-Softmax-MatMul, LayerNorm as ``LayerNormalization`` (opset >= 17), optionally simplified
    with onnxsim, checked with ``onnx.checker``, then run in ONNX Runtime (CPU) on a random batch of
    ``verify_batch`` images and compared output by output with PyTorch; written atomically.

    Args:
        model: a (pruned) SwinTransformer / PyramidVisionTransformerV2; not modified.
        path: the ``.onnx`` file to write.
        input_shape: (C, H, W) of one image.
        out_indices: stages to output (default all).
        opset: ONNX opset, >= 17.
        dynamic_batch: symbolic batch dimension.
        simplify: run onnxsim (skipped with a note in the result when it fails).
        verify_batch: images in the verification batch (>= 1).
        atol: largest allowed max abs difference per output.

    Returns:
        ``{"path", "outputs": [{"name", "num_chs", "reduction", "shape"}], "max_abs_diff": [...],
        "exporter", "opset", "simplified", "bytes"}``.

    Raises:
        VitoptError: opset < 17, a model without multi-scale features, an export that fails with both
            exporters, or ONNX Runtime outputs that differ from PyTorch by more than ``atol``.
    """
    import onnx
    import onnxruntime as ort

    if opset < MIN_OPSET:
        raise VitoptError(f"opset {opset} is too low for LayerNormalization (allowed: >= {MIN_OPSET}).")
    path = Path(path)
    backbone = make_backbone(model, out_indices)
    specs = feature_specs(backbone, input_shape)
    names = [f"feat{k}" for k in range(len(specs))]
    wrapper = _TupleOut(backbone).eval()
    dummy = torch.randn(max(1, verify_batch), *input_shape)
    exporter, errors = None, []
    with tempfile.TemporaryDirectory() as tmp, export_mode(wrapper), eager_attention(wrapper):
        f = Path(tmp) / "backbone.onnx"
        for dynamo in (True, False):
            try:
                _export(wrapper, dummy, f, names, opset, dynamic_batch, dynamo)
                exporter = "dynamo" if dynamo else "torchscript"
                break
            except Exception as exc:  # both exporters raise many types; report the first line of each
                errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {str(exc).strip().splitlines()[0][:200]}")
        if exporter is None:
            raise VitoptError(f"the backbone of {type(model).__name__} could not be exported to ONNX ({'; '.join(errors)}).")
        graph = onnx.load(str(f))
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(dummy)]
    simplified = False
    if simplify:
        try:
            import onnxsim

            graph2, ok = onnxsim.simplify(graph)
            if ok:
                graph, simplified = graph2, True
        except Exception:   # keep the unsimplified graph; onnxsim is an optimisation only
            simplified = False
    onnx.checker.check_model(graph)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(names, {"input": dummy.numpy()})
    diffs = []
    for name, a, b in zip(names, outs, ref):
        if a.shape != b.shape:
            raise VitoptError(f"ONNX output {name} has shape {a.shape} but PyTorch gives {b.shape}.")
        diffs.append(float(np.abs(a - b).max()))
    if max(diffs) > atol:
        raise VitoptError(f"ONNX Runtime differs from PyTorch by {max(diffs):.3g} (> {atol}) on the backbone outputs.")
    data = graph.SerializeToString()
    atomic_write_bytes(path, data)
    check_onnx(path)
    return {"path": str(path), "exporter": exporter, "opset": int(graph.opset_import[0].version),
            "simplified": simplified, "bytes": len(data), "max_abs_diff": diffs,
            "outputs": [{"name": n, "num_chs": s["num_chs"], "reduction": s["reduction"], "shape": s["shape"]}
                        for n, s in zip(names, specs)]}
