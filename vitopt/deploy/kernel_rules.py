"""Kept sizes that a target's TensorRT kernels accept: the rules behind ``round_to: auto``.

Structured pruning chooses how many heads, head dims, MLP neurons and embedding channels to keep.
TensorRT runs a ViT block fastest when its attention fuses into one multi-head-attention (MHA) kernel
and its GEMMs hit tensor-core tiles; both depend on the kept sizes, the precision and the GPU.
:func:`kernel_rules` returns the documented constraints for a target profile
(:mod:`vitopt.deploy.targets`) and an engine precision as :class:`SizeRule` objects, one per
(group kind, document); :func:`round_rules` folds them per kind into the predicates
``size -> bool`` that :func:`vitopt.pruning.allocation.allowed_sizes` takes as ``round_to``.

The rules, each with the document it follows (:data:`SOURCES`):

* **Fused MHA, fp16/bf16** - ``16 <= head_dim <= 256`` and ``head_dim % 8 == 0`` (sm >= 75).
  TensorRT developer guide 10.x, "Working with Transformers" > "Multi-Head Attention Fusion".
* **Fused MHA, int8** - ``head_dim`` in {16, 32, 64} and sequence length <= 512; INT8 MHA also needs
  Q/DQ before BMM1, after the Softmax and after BMM2 (same section). ModelOpt's ONNX PTQ leaves the
  MHA of a model with more than 512 tokens unquantized, so there the fp16 rule applies.
* **Fused MHA, fp8** - ModelOpt adds FP8 Q/DQ to an MHA only when ``8 < head_dim <= 256``; TensorRT
  10.6.0 enabled FP8 MHA on Ada (sm 8.9) for sequence lengths up to 3072 and head sizes up to 64.
  On Ada the rule is therefore ``16 <= head_dim <= 64``, ``% 8`` (longer sequences: the MHA stays
  fp16 and the fp16 rule applies); on Hopper ``16 <= head_dim <= 256``, ``% 8`` (the fp16 kernel
  constraints, which no document we found relaxes for FP8).
* **fp32** - no fused MHA (the MHA section requires FP16, BF16 or INT8 BMM inputs); only the TF32
  tensor-core alignment applies.
* **Tensor-core alignment of GEMM K and N** (``mlp``, ``embed``) - multiples of 4 (TF32), 8 (FP16 /
  BF16 dense), 16 (FP16 / BF16 with 2:4 sparse weights), 32 (INT8): TensorRT developer guide,
  "Performance Best Practices" > "Optimizing for Tensor Cores"; 16 for FP8 (cuBLASLt FP8 GEMMs
  need dimensions that are multiples of 16, cuBLAS docs "cublasLtMatmul").
* **Q/DQ GEMMs** (int8, fp8; ``mlp``, ``embed``, ``head_dim``) - ``K, N >= 16``: ModelOpt does not
  quantize smaller MatMuls because INT8/FP8 tensor-core kernels need K and N >= 16
  (``modelopt/onnx/quantization/graph_utils.py``, ``find_nodes_from_matmul_to_exclude``).

Heads carry no kernel constraint of their own (``heads * head_dim`` is aligned whenever
``head_dim`` is), so ``heads`` rounds by one. Everything here is plain Python; no TensorRT needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vitopt.deploy.targets import PRECISIONS, TargetProfile, get_target
from vitopt.errors import VitoptError

__all__ = ["SizeRule", "AllOf", "SOURCES", "kernel_rules", "round_rules", "rules_table", "ROUNDED_KINDS"]

#: group kinds :func:`round_rules` returns a rule for.
ROUNDED_KINDS = ("heads", "head_dim", "mlp", "embed")

#: the documents the rules follow, by short key.
SOURCES = {
    "trt-mha": 'TensorRT Developer Guide 10.x, "Working with Transformers" > "Multi-Head Attention Fusion" '
               "(restrictions for fusing an MHA into one kernel)",
    "trt-tc": 'TensorRT Developer Guide 10.x, "Performance Best Practices" > "Optimizing for Tensor Cores" '
              "(suggested dimension alignment: TF32 4, FP16/BF16 8 dense or 16 sparse, INT8 32 elements)",
    "trt-10.6-fp8-mha": 'TensorRT 10.6.0 Release Notes, "FP8 Multi-Head Attention (MHA) on Ada GPUs" '
                        "(sequence lengths up to 3072, head sizes up to 64)",
    "modelopt-mha": "NVIDIA ModelOpt ONNX PTQ, modelopt/onnx/quantization/graph_utils.py "
                    "find_nodes_from_mha_to_exclude (int8: no MHA Q/DQ when seq_len > 512; fp8: none when "
                    "head_size > 256 or head_size <= 8)",
    "modelopt-gemm": "NVIDIA ModelOpt ONNX PTQ, modelopt/onnx/quantization/graph_utils.py "
                     "find_nodes_from_matmul_to_exclude (no Q/DQ on MatMuls with K or N < 16)",
    "cublas-fp8": 'cuBLAS documentation, "cublasLtMatmul()" FP8 requirements (dimensions multiples of 16)',
}

#: tensor-core alignment (elements) of GEMM K and N per precision, dense weights.
_ALIGN = {"fp32": 4, "fp16": 8, "bf16": 8, "int8": 32, "fp8": 16}


@dataclass(frozen=True)
class SizeRule:
    """One documented constraint on the kept count of a group kind.

    Attributes:
        kind: the group kind it constrains (``head_dim``, ``mlp``, ``embed``).
        name: a short identifier (``"fp16-fused-mha"``).
        text: the rule in words (``"16 <= head_dim <= 256 and head_dim % 8 == 0"``).
        source: key of :data:`SOURCES` (the document the rule follows).
        test: ``size -> bool``.

    Calling the rule with a size returns ``test(size)``.
    """

    kind: str
    name: str
    text: str
    source: str
    test: Callable[[int], bool]

    def __call__(self, size: int) -> bool:
        return bool(self.test(int(size)))


@dataclass(frozen=True)
class AllOf:
    """A predicate ``size -> bool`` that holds when every rule holds (what ``round_to`` receives).

    Attributes:
        rules: the :class:`SizeRule` objects, all of one kind.
    """

    rules: tuple[SizeRule, ...]

    def __call__(self, size: int) -> bool:
        return all(r(size) for r in self.rules)

    def __repr__(self) -> str:
        return " and ".join(r.text for r in self.rules) or "any size"


def _multiple(kind: str, k: int, why: str, source: str) -> SizeRule:
    return SizeRule(kind, f"{why}-x{k}", f"{kind} % {k} == 0", source, lambda s, k=k: s % k == 0)


def _at_least(kind: str, k: int, source: str) -> SizeRule:
    return SizeRule(kind, f"qdq-gemm-min{k}", f"{kind} >= {k}", source, lambda s, k=k: s >= k)


def _mha_fp16(name: str, hi: int = 256, source: str = "trt-mha") -> SizeRule:
    return SizeRule("head_dim", name, f"16 <= head_dim <= {hi} and head_dim % 8 == 0", source,
                    lambda s, hi=hi: 16 <= s <= hi and s % 8 == 0)


def _mha_rule(t: TargetProfile, precision: str, num_tokens: int | None) -> list[SizeRule]:
    """The head_dim rule of the fused MHA kernel for ``precision`` on ``t`` (empty: no fused MHA)."""
    if t.sm < 75 or precision == "fp32":
        return []
    if precision in ("fp16", "bf16"):
        return [_mha_fp16(f"{precision}-fused-mha")]
    if precision == "int8":
        if num_tokens is not None and num_tokens > 512:       # ModelOpt leaves this MHA in fp16
            return [_mha_fp16("int8-model-fp16-mha(seq>512)", source="modelopt-mha")]
        return [SizeRule("head_dim", "int8-fused-mha", "head_dim in {16, 32, 64} (sequence <= 512)", "trt-mha",
                         lambda s: s in (16, 32, 64))]
    if precision == "fp8":
        if t.sm == 89:                                         # Ada: TensorRT 10.6 FP8 MHA limits
            if num_tokens is not None and num_tokens > 3072:
                return [_mha_fp16("fp8-ada-fp16-mha(seq>3072)", source="trt-10.6-fp8-mha")]
            return [_mha_fp16("fp8-ada-fused-mha", hi=64, source="trt-10.6-fp8-mha")]
        return [_mha_fp16("fp8-fused-mha", source="modelopt-mha")]
    return []


def kernel_rules(target: TargetProfile | str, precision: str, *, num_tokens: int | None = None,
                 sparsity: bool = False) -> list[SizeRule]:
    """The documented kept-size constraints for ``target`` at ``precision`` (module docstring).

    Args:
        target: a target profile or its key (``"h100"``, ``"orin-agx"``).
        precision: the engine precision, one of :data:`~vitopt.deploy.targets.PRECISIONS`.
        num_tokens: the model's sequence length (patches + prefix tokens), for the int8 and fp8 MHA
            sequence limits; None assumes the limits hold.
        sparsity: the engine will use 2:4 sparse weights (fp16/bf16 alignment becomes 16).

    Returns:
        the rules, in the order ``head_dim`` (MHA, Q/DQ), ``mlp``, ``embed``.

    Raises:
        VitoptError: an unknown target or precision, or a precision the target does not run.
    """
    t = get_target(target) if isinstance(target, str) else target
    if precision not in PRECISIONS:
        raise VitoptError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}.")
    if precision not in t.precisions:
        raise VitoptError(f"target {t.key} ({t.name}) does not run {precision}; it runs {', '.join(t.precisions)}.")
    rules = _mha_rule(t, precision, num_tokens)
    qdq = precision in ("int8", "fp8")
    if qdq:
        rules.append(_at_least("head_dim", 16, "modelopt-gemm"))
    if precision == "fp32":
        rules.append(_multiple("head_dim", 4, "tf32-align", "trt-tc"))
    align = 16 if sparsity and precision in ("fp16", "bf16") else _ALIGN[precision]
    source = "cublas-fp8" if precision == "fp8" else "trt-tc"
    for kind in ("mlp", "embed"):
        rules.append(_multiple(kind, align, "tc-align", source))
        if qdq:
            rules.append(_at_least(kind, 16, "modelopt-gemm"))
    return rules


def round_rules(target: TargetProfile | str, precision: str, *, num_tokens: int | None = None,
                sparsity: bool = False) -> dict[str, int | AllOf]:
    """``round_to`` per group kind for :func:`vitopt.pruning.allocation.allocate` (``round_to: auto``).

    Returns:
        ``{"heads": 1, "head_dim": AllOf(...), "mlp": AllOf(...), "embed": AllOf(...)}``; each
        :class:`AllOf` is a predicate ``size -> bool`` (a kind without rules keeps multiples of 1).

    Raises:
        VitoptError: as :func:`kernel_rules`.
    """
    rules = kernel_rules(target, precision, num_tokens=num_tokens, sparsity=sparsity)
    out: dict[str, int | AllOf] = {"heads": 1}
    for kind in ROUNDED_KINDS[1:]:
        own = tuple(r for r in rules if r.kind == kind)
        out[kind] = AllOf(own) if own else 1
    return out


def rules_table(target: TargetProfile | str, precision: str, *, num_tokens: int | None = None,
                sparsity: bool = False) -> list[dict[str, str]]:
    """The rules as rows ``{"kind", "rule", "name", "source"}`` (source: the document, in words)."""
    return [{"kind": r.kind, "rule": r.text, "name": r.name, "source": SOURCES[r.source]}
            for r in kernel_rules(target, precision, num_tokens=num_tokens, sparsity=sparsity)]
