"""``export``: the current model to ONNX (opset >= 17, dynamic batch, onnxsim, checker, ORT-verified).

See :func:`vitopt.deploy.onnx_export.export_onnx` for the graph guarantees (one LayerNormalization
per LayerNorm, attention as MatMul -> Softmax -> MatMul for TensorRT's MHA fusion).
"""

from __future__ import annotations

from vitopt.deploy.onnx_export import export_onnx
from vitopt.stages.base import StageDir, State
from vitopt.train.inputs import input_shape

__all__ = ["run"]


def run(cfg, state: State, sd: StageDir) -> State:
    """Export ``state.model`` to ``<stage>/model.onnx`` and record the graph's op counts."""
    path = sd.path / "model.onnx"
    info = export_onnx(state.model.eval(), path, input_shape(state.model), opset=cfg.opset,
                       dynamic_batch=cfg.dynamic_batch, simplify=cfg.simplify)
    state.model.train()
    state.onnx_path = path
    state.results[sd.label] = sd.finish(cfg, info, {"onnx": f"{sd.label}/model.onnx"})
    return state
