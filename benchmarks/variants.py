"""Models and pruned variants shared by the benchmarks: vitopt and Torch-Pruning to a FLOPs target.

* :func:`build_model` - a randomly initialised timm ViT from a preset (``deit_s``, ``deit_b``,
  ``tiny``...) or any timm ``VisionTransformer`` name.
* :func:`vitopt_prune` - vitopt's path: :func:`vitopt.prune_with_report` (importance -> allocation
  under a FLOPs budget with hardware rounding -> surgery), the call the ``prune`` stage makes.
* :func:`tp_prune` / :func:`tp_prune_to_flops` - Torch-Pruning's documented timm-ViT recipe
  (``examples/transformers/prune_timm_vit.py`` in VainF/Torch-Pruning): ``BasePruner`` (called
  ``MetaPruner`` before v1.5) with ``GroupMagnitudeImportance`` / ``GroupTaylorImportance``, a
  ``num_heads`` dict keyed by each block's ``qkv`` Linear, ``prune_num_heads`` /
  ``prune_head_dims``, ``round_to=8``, ``ignored_layers=[model.head]``; afterwards the attention
  attributes are patched by hand, as the recipe does. Torch-Pruning takes a channel *ratio*, so
  :func:`tp_prune_to_flops` bisects it until the FLOPs (counted with the same
  :class:`vitopt.arch.cost.CostModel` as vitopt's models) are within a tolerance of the target.

Variant names used in tables and JSON:

==================  =====================================================================
``dense``           the unpruned model
``vitopt``          vitopt, groups heads + head_dim + mlp (the residual width is kept)
``vitopt+embed``    vitopt, groups embed + heads + head_dim + mlp
``tp``              Torch-Pruning's default recipe: every width it can reach, embedding
                    (residual width) included, attention by head dims (``prune_head_dims``)
``tp-bottleneck``   Torch-Pruning with each block's ``fc2`` in ``ignored_layers`` (the
                    recipe's ``--bottleneck`` option): only attention/MLP inner dims, so it
                    matches ``vitopt``'s groups
==================  =====================================================================

Pairs compared like for like: ``vitopt`` vs ``tp-bottleneck`` (residual width kept) and
``vitopt+embed`` vs ``tp`` (residual width may be pruned). Optional: ``vitopt-uniform`` and
``vitopt+embed-uniform`` (scope uniform; see :data:`VITOPT_VARIANTS`).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vitopt
from vitopt.arch.cost import CostModel

__all__ = ["PRESETS", "build_model", "input_shape", "cost", "dims_summary", "vitopt_prune", "tp_prune",
           "tp_prune_to_flops", "VITOPT_VARIANTS", "TP_VARIANTS", "PAIRS", "ROUND_TO", "counter_flops",
           "TpResult"]

#: preset -> (timm model name, kwargs). Random init (no download); ``tiny`` is for --quick and tests.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "deit_t": ("deit_tiny_patch16_224", {}),
    "deit_s": ("deit_small_patch16_224", {}),
    "deit_b": ("deit_base_patch16_224", {}),
    # 32x32 RGB, 16 tokens + cls, width 64, 2 heads of 32 dims, MLP 256: prunable with round_to 8/16.
    "tiny": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                                       "num_heads": 2, "num_classes": 10}),
}

#: vitopt variant -> group kinds it prunes.
VITOPT_VARIANTS: dict[str, tuple[str, ...]] = {
    "vitopt": ("heads", "head_dim", "mlp"),
    "vitopt+embed": ("embed", "heads", "head_dim", "mlp"),
    # not in the defaults: uniform scope (every group keeps the same fraction). On random-init weights
    # global l1 never removes embed channels or whole heads (their L1 sums over thousands of weights,
    # so after per-kind normalisation they all score ~1 while single MLP neurons / head dims spread),
    # so "vitopt+embed" equals "vitopt" there; the uniform variants force a pruned residual width.
    "vitopt-uniform": ("heads", "head_dim", "mlp"),
    "vitopt+embed-uniform": ("embed", "heads", "head_dim", "mlp"),
}
#: Torch-Pruning variant -> whether each block's fc2 is ignored (bottleneck: residual width kept).
TP_VARIANTS: dict[str, bool] = {"tp": False, "tp-bottleneck": True}
#: like-for-like pairs (vitopt variant, Torch-Pruning variant).
PAIRS: list[tuple[str, str]] = [("vitopt", "tp-bottleneck"), ("vitopt+embed", "tp"),
                                ("vitopt-uniform", "tp-bottleneck"), ("vitopt+embed-uniform", "tp")]
#: kept counts: heads by one, head dims and MLP neurons by 8, embedding channels by 16.
ROUND_TO: dict[str, int] = {"heads": 1, "head_dim": 8, "mlp": 8, "embed": 16}


# ------------------------------------------------------------------------------------ models
def build_model(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised model from a preset name or a timm model name, in eval mode."""
    import timm

    model_name, kwargs = PRESETS.get(name, (name, {}))
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **{**kwargs, **overrides})
    return model.eval()


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model takes."""
    pe = model.patch_embed
    h, w = (pe.img_size, pe.img_size) if isinstance(pe.img_size, int) else pe.img_size
    return int(pe.proj.in_channels), int(h), int(w)


def cost(model: nn.Module) -> dict[str, int]:
    """``{"flops", "macs", "params"}`` of one image with vitopt's analytic counter (FLOPs = 2 x MACs)."""
    cm = CostModel(model)
    macs = cm.macs({})
    return {"flops": 2 * macs, "macs": macs, "params": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def counter_flops(model: nn.Module) -> int:
    """FLOPs of one image counted by ``torch.utils.flop_counter`` (attention in its eager form, so the
    q@k^T and attn@v matmuls are seen on every device). A cross-check of :func:`cost`."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitopt.deploy.onnx_export import eager_attention

    p = next(model.parameters())
    x = torch.zeros(1, *input_shape(model), device=p.device, dtype=p.dtype)
    was = model.training
    model.eval()
    try:
        with eager_attention(model), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was)
    return int(counter.get_total_flops())


def dims_summary(model: nn.Module) -> dict[str, Any]:
    """The model's shape: embed width and per-block heads / head_dim / mlp lists, plus structure flags.

    ``head_dim_uniform_in_block``: every head of a block has the same dims (``qkv.out_features ==
    3 * num_heads * head_dim`` and ``proj.in_features == num_heads * head_dim``), which fused attention
    kernels need. ``head_dim_varies_across_blocks``: blocks differ in head_dim.
    """
    heads, hd, mlp, uniform = [], [], [], True
    for blk in model.blocks:
        a = blk.attn
        heads.append(int(a.num_heads))
        hd.append(int(a.head_dim))
        mlp.append(int(blk.mlp.fc1.out_features))
        uniform &= (a.qkv.out_features == 3 * a.num_heads * a.head_dim
                    and a.proj.in_features == a.num_heads * a.head_dim)
    return {"embed": int(model.patch_embed.proj.out_channels), "heads": heads, "head_dim": hd, "mlp": mlp,
            "head_dim_uniform_in_block": bool(uniform), "head_dim_varies_across_blocks": len(set(hd)) > 1}


# ------------------------------------------------------------------------------------ vitopt
def vitopt_prune(model: nn.Module, target: float, groups: tuple[str, ...], *, criterion: str = "l1",
                 scope: str = "global", round_to: dict[str, int] | None = None,
                 batches: list | None = None, teacher: nn.Module | None = None,
                 gates: dict[str, torch.Tensor] | None = None, compare: str | None = None) -> dict[str, Any]:
    """Prune ``model`` in place to ``target`` x its current FLOPs with :func:`vitopt.prune_with_report`
    (the same call the ``prune`` stage makes); returns timing and settings. ``round_to`` defaults to
    :data:`ROUND_TO`; min_keep is 1 for every kind. ``compare`` defaults to the library's ``calibrated``
    when ``batches`` are given and to ``normalized`` without data (random-init models)."""
    compare = compare or ("calibrated" if batches else "normalized")
    rto = {k: v for k, v in {**ROUND_TO, **(round_to or {})}.items() if k in groups}
    t0 = time.perf_counter()
    res = vitopt.prune_with_report(model, target={"flops": target}, criterion=criterion, groups=list(groups),
                                   data=batches, teacher=teacher, gates=gates, scope=scope, round_to=rto,
                                   min_keep={k: 1 for k in groups}, compare=compare, inplace=True)
    total = time.perf_counter() - t0
    return {"tool": "vitopt", "criterion": criterion, "compare": compare, "scope": scope, "groups": list(groups), "round_to": rto,
            "seconds": {"importance": res.rounds[0]["criterion_cost"]["seconds"], "total": total}}


# ------------------------------------------------------------------------------------ Torch-Pruning
def _tp():
    import torch_pruning as tp

    return tp


def tp_importance(kind: str, p: int = 2):
    """Torch-Pruning importance by name: ``magnitude`` (GroupMagnitudeImportance, L``p`` norm, TP's
    default p=2) or ``taylor`` (GroupTaylorImportance; needs gradients in ``.grad``)."""
    tp = _tp()
    imp = tp.importance
    if kind == "magnitude":
        cls = getattr(imp, "GroupMagnitudeImportance", None) or imp.GroupNormImportance  # name before v1.4
        return cls(p=p)
    if kind == "taylor":
        return imp.GroupTaylorImportance()
    raise ValueError(f"unknown Torch-Pruning importance {kind!r} (magnitude, taylor)")


def _sync_vit_attrs(model: nn.Module, pruner) -> None:
    """Patch module attributes that Torch-Pruning does not update.

    As in TP's ``prune_timm_vit.py``: ``num_heads`` from ``pruner.num_heads[qkv]`` and
    ``head_dim = qkv.out_features // (3 * num_heads)``. timm >= 1.0.20's ``Attention.forward``
    reshapes by ``attn_dim``, so that is set too (TP's example instead patches ``forward`` for
    older timm). ``scale`` is set to ``head_dim ** -0.5`` so timm's eager path computes what the
    fused SDPA path computes (SDPA always uses the new head_dim's default scale; TP does not keep the
    original scale - vitopt folds it into q, invariant 2 of docs/architecture.md). The model-level ``embed_dim`` /
    ``num_features`` are set from the pruned patch embedding.
    """
    from timm.models.vision_transformer import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.num_heads = int(pruner.num_heads.get(m.qkv, m.num_heads))
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
            m.scale = m.head_dim ** -0.5
    d = int(model.patch_embed.proj.out_channels)
    model.embed_dim = model.num_features = d
    if hasattr(model, "head_hidden_size"):
        model.head_hidden_size = d


def tp_prune(model: nn.Module, ratio: float, *, bottleneck: bool = False, importance: str = "magnitude",
             norm_p: int = 2, attn: str = "head_dims", global_pruning: bool = True, round_to: int = 8,
             grad_batches: list | None = None, isomorphic: bool = False) -> dict[str, Any]:
    """Prune ``model`` in place with Torch-Pruning at channel ratio ``ratio``; returns the settings used.

    Args:
        ratio: TP's ``pruning_ratio`` (fraction of channels removed; global over all groups when
            ``global_pruning``).
        bottleneck: put every block's ``mlp.fc2`` in ``ignored_layers`` (residual width kept).
        importance: ``magnitude`` or ``taylor`` (then ``grad_batches`` are back-propagated with
            cross-entropy first, as in TP's example).
        attn: ``head_dims`` (TP's default: ``prune_num_heads=False, prune_head_dims=True``),
            ``heads`` (``prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio``) or
            ``both`` (both on, ``head_pruning_ratio=ratio``).
        round_to: TP's ``round_to`` (one multiple for every pruned width).
        isomorphic: TP's ``isomorphic=True``: rank only within groups of identical structure
            (Fang et al., "Isomorphic Pruning for Vision Models", ECCV 2024).
    """
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention

    tp = _tp()
    Pruner = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
    ignored = [model.head]
    if bottleneck:
        ignored += [m.fc2 for m in model.modules() if isinstance(m, Mlp)]
    prune_heads = attn in ("heads", "both")
    prune_dims = attn in ("head_dims", "both")
    if attn not in ("heads", "head_dims", "both"):
        raise ValueError(f"attn must be heads, head_dims or both; got {attn!r}")
    imp = tp_importance(importance, norm_p)
    p = next(model.parameters())
    example = torch.randn(1, *input_shape(model), device=p.device, dtype=p.dtype)
    t0 = time.perf_counter()
    if importance == "taylor":
        if not grad_batches:
            raise ValueError("GroupTaylorImportance needs grad_batches")
        was = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for x, y in grad_batches:
                F.cross_entropy(model(x.to(p.device)), y.to(p.device)).backward()
        model.train(was)
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TP warns about unwrapped cls_token/pos_embed (pruned correctly)
        pruner = Pruner(model, example, importance=imp, global_pruning=global_pruning, pruning_ratio=ratio,
                        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=prune_heads,
                        prune_head_dims=prune_dims, head_pruning_ratio=ratio if prune_heads else 0.0,
                        round_to=round_to, isomorphic=isomorphic)
        t2 = time.perf_counter()
        for group in pruner.step(interactive=True):
            group.prune()
    _sync_vit_attrs(model, pruner)
    model.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"tool": "torch-pruning", "pruner": Pruner.__name__, "importance": type(imp).__name__,
            "norm_p": norm_p if importance == "magnitude" else None, "ratio": ratio, "bottleneck": bottleneck,
            "attn": attn, "prune_num_heads": prune_heads, "prune_head_dims": prune_dims,
            "head_pruning_ratio": ratio if prune_heads else 0.0, "global_pruning": global_pruning,
            "round_to": round_to, "isomorphic": isomorphic, "ignored_layers": ["head"] + (["blocks.*.mlp.fc2"] if bottleneck else []),
            "seconds": {"gradients": t1 - t0, "dependency_graph": t2 - t1, "prune": t3 - t2, "total": t3 - t0}}


@dataclass
class TpResult:
    """Outcome of :func:`tp_prune_to_flops`: the pruned model and how the ratio was found."""

    model: nn.Module
    info: dict[str, Any]


def tp_prune_to_flops(dense: nn.Module, target: float, *, tol: float = 0.01, max_iter: int = 16, grid: int = 11,
                      max_ratio: float = 0.95, prepare: Callable[[nn.Module], dict] | None = None,
                      cache: dict[float, float] | None = None, **tp_kwargs: Any) -> TpResult:
    """Search Torch-Pruning's ``pruning_ratio`` until ``flops(pruned) / flops(dense)`` is within ``tol``
    (relative: ``|achieved / target - 1| <= tol``) of ``target``; return the model pruned at that ratio.

    FLOPs are *not* monotonic in TP's ratio (measured with TP 1.6 on timm ViTs): TP applies
    ``round_to`` to an attention group's whole ``num_heads * head_dim`` width, and when that rounding
    would remove every dim of the heads the group fails ``check_pruning_group`` and the block's
    attention is left unpruned, so a larger ratio can give *more* FLOPs. A plain bisection over
    [0, max_ratio] can then walk away from the target. So: evaluate a ``grid`` of ratios first, take
    the first (least-pruning) grid interval whose FLOPs cross the target, and bisect inside it for
    at most ``max_iter`` steps. The trial closest to the target wins (ties: the one under it);
    ``within_tol`` records whether it met the tolerance.

    Every trial prunes a fresh ``copy.deepcopy(dense)``; FLOPs come from :func:`cost` (vitopt's analytic
    counter, the one used for vitopt's models too). ``cache`` (ratio -> achieved) lets several targets
    with the same TP settings share trials. ``prepare(model) -> kwargs`` may add per-trial arguments
    (e.g. ``grad_batches`` for Taylor importance). The chosen ratio is pruned once more at the end
    (TP's magnitude/Taylor selection is deterministic for fixed weights and gradients).

    Returns:
        :class:`TpResult`; ``info`` holds TP's settings and ``ratio``, ``achieved`` (FLOPs ratio),
        ``within_tol``, ``bracketed`` (false: no grid interval crossed the target, e.g. below the
        lowest FLOPs TP reached, ``min_achieved_on_grid``), ``trials`` [(ratio, achieved)] (this call's, in order), ``search_seconds``.
    """
    t0 = time.perf_counter()
    base = cost(dense)["flops"]
    cache = {} if cache is None else cache
    trials: list[tuple[float, float]] = []

    def achieved_at(ratio: float) -> float:
        ratio = round(ratio, 6)
        if ratio not in cache:
            m = copy.deepcopy(dense)
            extra = prepare(m) if prepare is not None else {}
            tp_prune(m, ratio, **tp_kwargs, **extra)
            cache[ratio] = cost(m)["flops"] / base
            del m
        trials.append((ratio, cache[ratio]))
        return cache[ratio]

    def key(r: float) -> tuple[float, bool]:
        return abs(cache[round(r, 6)] / target - 1), cache[round(r, 6)] > target

    ratios = [max_ratio * i / (grid - 1) for i in range(grid)]
    values = [achieved_at(r) for r in ratios]
    best = min(ratios, key=key)
    bracket = next(((ratios[i], ratios[i + 1]) for i in range(grid - 1)
                    if values[i] > target >= values[i + 1]), None)
    if bracket is not None and key(best)[0] > tol:
        lo, hi = bracket
        for _ in range(max_iter):
            mid = (lo + hi) / 2
            a = achieved_at(mid)
            if key(mid) < key(best):
                best = mid
            if abs(a / target - 1) <= tol:
                break
            if a > target:
                lo = mid
            else:
                hi = mid
    model = copy.deepcopy(dense)
    extra = prepare(model) if prepare is not None else {}
    info = tp_prune(model, round(best, 6), **tp_kwargs, **extra)
    achieved = cost(model)["flops"] / base
    info.update({"ratio": round(best, 6), "achieved": achieved, "target": target, "tol": tol,
                 "within_tol": abs(achieved / target - 1) <= tol, "bracketed": bracket is not None,
                 "min_achieved_on_grid": min(values), "trials": trials,
                 "search_seconds": time.perf_counter() - t0})
    return TpResult(model, info)


def pruned_variants(dense: nn.Module, targets: list[float], variants: list[str], *, tp_attn: str = "head_dims",
                    tp_norm: int = 2, tp_tol: float = 0.01, tp_max_iter: int = 16, tp_grid: int = 11,
                    tp_global: bool = True, criterion: str = "l1"):
    """Yield ``(target, variant, model, info)`` for every target and variant (``dense`` yields once,
    target None). Data-free criteria only (random-init models): vitopt ``criterion`` (``l1``) and
    TP's GroupMagnitudeImportance. Each pruned model starts from a deep copy of ``dense``; a variant
    that fails yields ``model=None`` and ``info={"error": ...}``.
    """
    caches: dict[str, dict[float, float]] = {}
    if "dense" in variants:
        yield None, "dense", dense, {"tool": "dense"}
    for target in targets:
        for variant in variants:
            if variant == "dense":
                continue
            try:
                if variant in VITOPT_VARIANTS:
                    m = copy.deepcopy(dense)
                    info = vitopt_prune(m, target, VITOPT_VARIANTS[variant], criterion=criterion,
                                        scope="uniform" if variant.endswith("-uniform") else "global")
                    info["achieved"] = cost(m)["flops"] / cost(dense)["flops"]
                elif variant in TP_VARIANTS:
                    res = tp_prune_to_flops(dense, target, tol=tp_tol, max_iter=tp_max_iter, grid=tp_grid,
                                            cache=caches.setdefault(variant, {}),
                                            bottleneck=TP_VARIANTS[variant], importance="magnitude", norm_p=tp_norm,
                                            attn=tp_attn, global_pruning=tp_global)
                    m, info = res.model, res.info
                else:
                    raise ValueError(f"unknown variant {variant!r} (known: dense, "
                                     f"{', '.join([*VITOPT_VARIANTS, *TP_VARIANTS])})")
            except Exception as exc:  # record and go on: one failing tool must not hide the others
                yield target, variant, None, {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}
                continue
            yield target, variant, m.eval(), info
