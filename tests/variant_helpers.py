"""Checks shared by the ViT-variant and Eva tests (not collected: no ``test_`` prefix).

Each check is one invariant of docs/architecture.md on one small random-init model: masked == surgered,
analytic MACs == ``torch.utils.flop_counter``, ONNX parity with the MatMul-Softmax-MatMul attention
pattern, and the arch.json round trip.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from hier_helpers import random_plan, set_fused
from torch.utils.flop_counter import FlopCounterMode

import vitopt
from vitopt.arch.cost import CostModel
from vitopt.arch.families import family_of
from vitopt.arch.masks import apply_masks
from vitopt.arch.surgery import apply_plan

ALL = ("embed", "heads", "head_dim", "mlp")


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add N(0, 0.1) noise to every parameter (LayerScale, norms, biases, gates and the latent all matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def check_masked_equals_surgered(model, kinds, x, fused: bool, seeds=(1, 2)) -> None:
    """For seeded random plans over ``kinds``: hard-masked logits == surgered logits (<= 1e-5), something
    really changed, the class is kept, dims and params are what the plan and the cost model say."""
    set_fused(model, fused)
    for seed in seeds:
        plan = random_plan(model, kinds, seed)
        with torch.no_grad():
            dense = model(x)
            with apply_masks(model, plan):
                masked = model(x)
            pruned = apply_plan(model, plan)
            set_fused(pruned, fused)
            out = pruned(x)
        assert out.shape == dense.shape
        diff = (masked - out).abs().max().item()
        assert diff <= 1e-5, (kinds, fused, seed, diff)
        assert (masked - dense).abs().max().item() > 1e-4          # something was really removed
        assert type(pruned) is type(model)
        dims = plan.dims(family_of(model).structure(model))
        assert family_of(pruned).read_dims(pruned) == dims
        assert sum(p.numel() for p in pruned.parameters()) == CostModel(model).params(dims)


def counted_flops(model, x) -> int:
    """FLOPs of ``model(x)`` by ``torch.utils.flop_counter`` (eager attention: its matmuls are counted)."""
    set_fused(model, False)
    # with grad on: under no_grad the MAP head's latent.expand() is a grad-requiring view without a grad_fn,
    # which FlopCounterMode's module tracker rejects
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def analytic_flops(model) -> int:
    fam = family_of(model)
    return 2 * fam.macs(model, fam.read_dims(model))["total"]


def check_flops(model, x, seed: int = 9) -> None:
    """Analytic FLOPs of the dense model and of a randomly pruned one == the counter's, within 0.5%
    (they are in fact equal: the assertion message shows the difference)."""
    pruned = apply_plan(model, random_plan(model, ALL, seed))
    for m in (model, pruned):
        analytic, counted = analytic_flops(m), counted_flops(m, x)
        assert abs(analytic - counted) <= 0.005 * counted, (analytic, counted, analytic - counted)


def attention_softmaxes_follow_scaled_matmul(graph: onnx.GraphProto) -> int:
    """Number of Softmax nodes fed by MatMul(Mul(q, scale), k^T) and feeding a MatMul (TensorRT's MHA pattern)."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    count = 0
    for sm in (n for n in graph.node if n.op_type == "Softmax"):
        mm = producer.get(sm.input[0])
        if mm is None or mm.op_type != "MatMul":
            continue
        scaled = any(producer.get(i) is not None and producer[i].op_type == "Mul" for i in mm.input)
        after = any(c.op_type == "MatMul" for c in consumers.get(sm.output[0], []))
        count += scaled and after
    return count


def check_onnx(pruned, path, input_shape, attention_modules: int) -> None:
    """Export ``pruned``; onnxruntime logits within 1e-4 of PyTorch, same argmax, one scaled
    MatMul-Softmax-MatMul per attention module."""
    pruned = pruned.eval()
    info = vitopt.export_onnx(pruned, path, input_shape=input_shape, opset=17)
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pruned(x).numpy()
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4, np.abs(got - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    graph = onnx.load(info["path"]).graph
    assert attention_softmaxes_follow_scaled_matmul(graph) == attention_modules
    layernorms = sum(isinstance(m, torch.nn.LayerNorm) for m in pruned.modules())
    assert sum(n.op_type == "LayerNormalization" for n in graph.node) == layernorms
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}       # RoPE, GLU gates: plain standard ops


def check_reload(pruned, tmp_path, model_name: str, x) -> dict:
    """``vitopt.save`` (kwargs read back from the model) then ``vitopt.load``: same class, dims and logits."""
    arch = vitopt.save(pruned, tmp_path / "m", model_name=model_name)
    loaded = vitopt.load(tmp_path / "m")
    assert type(loaded) is type(pruned)
    assert family_of(loaded).read_dims(loaded) == arch.dims
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
    return arch.model_kwargs
