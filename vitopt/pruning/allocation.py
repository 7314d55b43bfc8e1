"""Allocation: turn per-unit scores into a KeepPlan that meets a budget, with hardware rounding.

Three scopes:

* ``global`` - one ranking across all blocks and group kinds. Units are removed in chunks of
  ``round_to`` (so kept counts stay multiples that tensor cores like), always the chunk with the
  lowest importance per unit of cost saved, until the cost is within budget. Scores are normalised
  per kind (divided by the kind's mean score) so heads, head dims and neurons compete on one scale;
  cost is any closed-form function of the dims (FLOPs, params, or a latency table), in the spirit of
  NViT's latency-aware global ranking (Yang et al., CVPR 2023) and HALP (Shen et al., NeurIPS 2022).
* ``uniform`` - every selected group keeps the same fraction of its units; the fraction is the
  largest that meets the budget (bisection).
* ``per_kind`` - every group of one kind keeps the same fraction of its units (all blocks alike, as
  Torch-Pruning's uniform ratio does), but each kind has its own fraction: the kinds give up one rounding
  step at a time, always the kind whose step loses the least importance per unit of cost saved, until
  the cost is within budget.

Kept counts are multiples of ``round_to[kind]`` (or the group's full size) and at least
``min_keep[kind]``. ``rank="score"`` replaces the cost-normalised ranking by a global threshold on
raw scores (an option for scores that already weigh each unit's cost, such as the ``search``
criterion's gates; not the default anywhere).

Depth (``blocks`` groups, one unit per transformer block) competes in the same ranking: a kept count
``k`` of a blocks group means its ``k`` highest-scored blocks stay (as :meth:`KeepPlan.from_scores`
picks them), and the cost function is told which blocks go (``"blocks.3": 0``, see
:func:`vitopt.arch.structure.removed_units`), so a block is priced at its own current width in FLOPs,
params or LUT milliseconds, and one budget is met by width, depth or both (as MDP, Sun et al.,
"Multidimensional Vision Model Pruning with Latency Constraint", CVPR 2025, prunes both under one
latency budget).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitopt.arch.latency_table import LatencyTable, cost_fn
from vitopt.arch.plan import KeepPlan
from vitopt.arch.structure import Structure
from vitopt.errors import VitoptError

__all__ = ["allocate", "allocate_budget", "RoundRule", "parse_target", "Target", "allowed_sizes", "DEFAULT_ROUND_TO", "SCOPES",
           "TARGET_METRICS"]

#: Default rounding of kept counts per group kind (8 for dims, heads and blocks by one: tensor-core multiples).
DEFAULT_ROUND_TO = {"heads": 1, "head_dim": 8, "mlp": 8, "embed": 8, "blocks": 1}


#: how a kind's kept counts are rounded: a multiple (int), an explicit set of allowed sizes, or a
#: predicate ``size -> bool`` (e.g. the head sizes a target's fused attention kernels accept).
RoundRule = int | Sequence[int] | Callable[[int], bool]


def allowed_sizes(n: int, round_to: RoundRule, min_keep: int) -> list[int]:
    """Kept counts a group of ``n`` units may take, descending: ``n`` itself (no pruning), then every
    size below it that the rule allows and that is >= ``min_keep``.

    Args:
        n: the group's current size.
        round_to: a multiple (``8``: 8, 16, 24, ...), an explicit collection of sizes, or a predicate.
        min_keep: the smallest size allowed (>= 1).

    >>> allowed_sizes(20, 8, 8)
    [20, 16, 8]
    >>> allowed_sizes(64, [16, 32, 48], 1)
    [64, 48, 32, 16]
    >>> allowed_sizes(10, lambda k: k % 4 == 2, 1)
    [10, 6, 2]
    """
    if isinstance(round_to, bool) or not (isinstance(round_to, int) or callable(round_to)
                                          or isinstance(round_to, (list, tuple, set, frozenset))):
        raise VitoptError(f"round_to must be a positive int, a collection of sizes or a predicate; got {round_to!r}.")
    if isinstance(round_to, int):
        if round_to < 1:
            raise VitoptError(f"round_to must be >= 1; got {round_to}.")
        below = range((n - 1) // round_to * round_to, 0, -round_to)
    elif callable(round_to):
        below = [k for k in range(n - 1, 0, -1) if round_to(k)]
    else:
        below = [int(k) for k in round_to if 0 < int(k) < n]
    sizes = [n] + [k for k in below if k >= min_keep]
    return sorted(set(s for s in sizes if s >= 1), reverse=True)


def _normalise(scores: dict[str, torch.Tensor], kinds: dict[str, str], base: dict[str, int],
               cost: Callable) -> dict[str, torch.Tensor]:
    """Put every kind on one scale: score / mean score of the kind * mean cost of one unit of the kind.

    With uninformative scores (all equal within a kind) every unit then has the same importance per
    unit of cost, so global allocation reduces to a uniform one; only real score differences move
    capacity between blocks and kinds. Without this a whole head would weigh as much as one MLP
    neuron although it costs ~head_dim times more.
    """
    full = cost(base)
    unit_cost = {g: max(full - cost({**base, g: base[g] - 1}), 0.0) for g in scores if base[g] > 1}
    by_kind: dict[str, list[str]] = {}
    for g in scores:
        by_kind.setdefault(kinds[g], []).append(g)
    out = {}
    for _kind, gs in by_kind.items():
        mean_score = torch.cat([scores[g].double().abs() for g in gs]).mean().item() or 1.0
        costs = [unit_cost[g] for g in gs if g in unit_cost]
        mean_cost = (sum(costs) / len(costs)) if costs else 1.0
        for g in gs:
            out[g] = scores[g].double() / mean_score * mean_cost
    return out


#: how allocation puts scores of different kinds on one scale (see :func:`allocate_budget`).
COMPARE = ("normalized", "isomorphic", "raw")

#: allocation scopes (see :func:`allocate_budget`).
SCOPES = ("global", "uniform", "per_kind")


def allocate_budget(structure: Structure, scores: Mapping[str, torch.Tensor], cost: Callable[[dict[str, int]], float],
                    budget: float, *, scope: str = "global", round_to: Mapping[str, RoundRule] | None = None,
                    min_keep: Mapping[str, int] | None = None, min_fraction: Mapping[str, float] | None = None,
                    compare: str = "normalized", rank: str = "per_cost", fill: bool = True) -> KeepPlan:
    """Choose kept units for the groups in ``scores`` so that ``cost(dims) <= budget``, as close to it as
    the rounding allows.

    Args:
        structure: the model's Structure (current dims).
        scores: group -> importance per unit (higher = keep); only these groups are pruned.
        cost: dims -> cost (e.g. ``CostModel.flops``); must not increase as units go.
        budget: the cost to reach, in the units of ``cost``.
        scope: ``"global"`` (one ranking across blocks and kinds), ``"uniform"`` (every group keeps the
            same fraction) or ``"per_kind"`` (every group of a kind keeps the same fraction; the
            fractions of the kinds are chosen greedily by importance lost per cost saved, with the
            scores put on one scale as ``compare`` says).
        round_to: kind -> rounding of kept counts (:data:`RoundRule`; defaults :data:`DEFAULT_ROUND_TO`).
        min_keep: kind -> minimum kept count per group (defaults: 1 head, ``round_to`` otherwise).
        min_fraction: kind -> minimum kept fraction of each group (a per-block floor, e.g.
            ``{"heads": 0.25}`` keeps at least a quarter of every block's heads).
        compare: how ``global`` compares units of different kinds:

            * ``"normalized"`` - each kind's scores are divided by the kind's mean score and multiplied
              by the mean cost of one of its units, so an average unit of every kind is worth its cost
              and only the spread of the scores moves capacity between kinds and blocks;
            * ``"isomorphic"`` - units are ranked only against units of the same kind (across blocks),
              and every kind gives up the same fraction of its units (Fang et al., "Isomorphic Pruning
              for Vision Models", ECCV 2024, arXiv 2407.04616);
            * ``"raw"`` - the scores are already on one scale (e.g. loss units after
              :func:`vitopt.pruning.sensitivity.calibrate_scores`); chunks go by loss per cost saved.
        rank: ``"per_cost"`` (importance lost per cost saved, NViT / HALP) or ``"score"`` (importance
            lost per unit removed: a global threshold, for scores that already price their cost).
        fill: (``global`` and ``per_kind`` scopes) after the budget is met, re-add the most important
            removed chunks that still fit (a greedy knapsack pass), so the result lands just under the
            budget instead of one large chunk below it; under ``per_kind`` a few groups may then keep one
            rounding step more than the rest of their kind. ``uniform`` keeps its one fraction for every
            group instead.

    Returns:
        A :class:`KeepPlan` over the scored groups. Its cost is <= ``budget``; with ``fill`` the slack is
        smaller than the cheapest chunk that could still be re-added.

    Raises:
        VitoptError: the budget cannot be met at the minimum sizes, an unknown scope / compare / rank, or
            ``per_kind`` with ``compare="isomorphic"`` (which already gives every kind one fraction).
    """
    if scope not in SCOPES:
        raise VitoptError(f"unknown allocation scope {scope!r} (known: {', '.join(SCOPES)}).")
    if scope == "per_kind" and compare == "isomorphic":
        raise VitoptError("scope 'per_kind' chooses one kept fraction per kind by importance per cost; "
                          "compare 'isomorphic' has no cross-kind scale for it (use compare 'normalized' or 'raw').")
    if rank not in ("per_cost", "score"):
        raise VitoptError(f"unknown allocation rank {rank!r} (known: per_cost, score).")
    if compare not in COMPARE:
        raise VitoptError(f"unknown allocation compare {compare!r} (known: {', '.join(COMPARE)}).")
    groups = structure.groups
    scores = {g: torch.as_tensor(v).double().cpu() for g, v in scores.items()}
    cost = _pricing_units(structure, scores, cost)
    ladders = _ladders(structure, list(scores), round_to, min_keep, min_fraction)
    base = structure.sizes()
    floor_dims = {**base, **{g: lad[-1] for g, lad in ladders.items()}}
    if cost(floor_dims) > budget:
        raise VitoptError(f"the budget cannot be met: at the minimum sizes allowed by round_to/min_keep the model "
                          f"still costs {cost(floor_dims) / cost(base):.1%} of its current cost; lower "
                          "min_keep/round_to or prune more groups.")
    kinds = {g: groups[g].kind for g in scores}
    if scope == "uniform":                      # the scores only pick which units; no cross-kind value needed
        return KeepPlan.from_scores(scores, _uniform(ladders, base, cost, budget))
    value = _normalise(scores, kinds, base, cost) if compare == "normalized" else scores
    if scope == "per_kind":
        sizes = _per_kind(value, kinds, ladders, base, cost, budget)
    elif compare == "isomorphic":
        sizes = _isomorphic(scores, kinds, ladders, base, cost, budget)
    else:
        sizes = _global(value, ladders, base, cost, budget, groups, per_cost=rank == "per_cost")
    if fill:
        sizes = _fill(value, ladders, {**base, **sizes}, cost, budget)
    return KeepPlan.from_scores(scores, sizes)


def _pricing_units(structure: Structure, scores: Mapping[str, torch.Tensor],
                   cost: Callable[[dict[str, int]], float]) -> Callable[[dict[str, int]], float]:
    """``cost`` told which blocks a kept count removes: for each scored whole-module group (``blocks``) with
    count ``k``, every unit outside its ``k`` best-scored ones (the order :meth:`KeepPlan.from_scores` keeps)
    is passed as ``path: 0``. Returns ``cost`` itself when no such group is scored."""
    unit_groups = {g: structure.units[g] for g in scores if g in structure.units}
    if not unit_groups:
        return cost
    order = {g: torch.argsort(-scores[g].double(), stable=True).tolist() for g in unit_groups}

    def priced(dims: dict[str, int]) -> float:
        d = dict(dims)
        for g, paths in unit_groups.items():
            for i in order[g][int(d.get(g, len(paths))):]:
                d[paths[i]] = 0
        return cost(d)

    return priced


def _ladders(structure: Structure, names: list[str], round_to: Mapping[str, RoundRule] | None,
             min_keep: Mapping[str, int] | None, min_fraction: Mapping[str, float] | None) -> dict[str, list[int]]:
    """Allowed kept counts of every scored group, descending (see :func:`allowed_sizes`)."""
    rto = {**DEFAULT_ROUND_TO, **(round_to or {})}
    out = {}
    for g in names:
        grp = structure.groups[g]
        rule = rto.get(grp.kind, 1)
        low = (min_keep or {}).get(grp.kind, rule if isinstance(rule, int) and grp.kind != "heads" else 1)
        frac = (min_fraction or {}).get(grp.kind)
        if frac is not None:
            if not 0 <= frac <= 1:
                raise VitoptError(f"min_fraction for {grp.kind} must be in [0, 1]; got {frac}.")
            low = max(low, math.ceil(frac * grp.size - 1e-9))
        out[g] = allowed_sizes(grp.size, rule, low)
    return out


def _chunk_value(value: torch.Tensor, keep_from: int, keep_to: int) -> float:
    """Importance of the units a group gains going from ``keep_from`` to ``keep_to`` kept (top-scored first)."""
    top = torch.sort(value, descending=True).values
    return float(top[keep_from:keep_to].sum()) if keep_to > keep_from else 0.0


def _fill(value: dict[str, torch.Tensor], ladders: dict[str, list[int]], dims: dict[str, int], cost: Callable,
          budget: float) -> dict[str, int]:
    """Greedy knapsack fill: while a removed chunk still fits under ``budget``, re-add the one with the most
    importance per unit of cost (one ladder step up at a time)."""
    dims = dict(dims)
    current = cost(dims)
    while True:
        best, best_ratio = None, -math.inf
        for g, lad in ladders.items():
            i = lad.index(dims[g])
            if i == 0:
                continue
            up = lad[i - 1]
            added = cost({**dims, g: up}) - current
            if current + added > budget:
                continue
            gain = _chunk_value(value[g], dims[g], up)
            ratio = gain / added if added > 0 else math.inf
            if ratio > best_ratio:
                best, best_ratio = (g, up), ratio
        if best is None:
            break
        dims[best[0]] = best[1]
        current = cost(dims)
    return {g: dims[g] for g in ladders}


def _isomorphic(scores: dict[str, torch.Tensor], kinds: dict[str, str], ladders: dict[str, list[int]],
                base: dict[str, int], cost: Callable, budget: float) -> dict[str, int]:
    """Every kind removes the same fraction of its units; within a kind the lowest-scored units across all its
    groups go first (kept counts rounded down to each group's ladder). The fraction is bisected to the budget."""
    by_kind: dict[str, list[str]] = {}
    for g, k in kinds.items():
        by_kind.setdefault(k, []).append(g)
    order = {}
    for k, gs in by_kind.items():
        flat = torch.cat([scores[g] for g in gs])
        owner = torch.cat([torch.full((scores[g].numel(),), i) for i, g in enumerate(gs)])
        order[k] = owner[torch.argsort(flat, stable=True)].tolist()          # group index of units, weakest first

    def sizes_at(rho: float) -> dict[str, int]:
        out = {}
        for k, gs in by_kind.items():
            removed = [0] * len(gs)
            for i in order[k][:int(math.floor(rho * len(order[k]) + 1e-9))]:
                removed[i] += 1
            for i, g in enumerate(gs):
                want = ladders[g][0] - removed[i]
                fits = [s for s in ladders[g] if s <= want]
                out[g] = fits[0] if fits else ladders[g][-1]
        return out

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost({**base, **sizes_at(mid)}) <= budget:
            hi = mid
        else:
            lo = mid
    return sizes_at(hi)


def _global(norm: dict[str, torch.Tensor], ladders: dict[str, list[int]], base: dict[str, int],
            cost: Callable, budget: float, groups, per_cost: bool = True) -> dict[str, int]:
    """Greedy chunk removal by (importance lost) / (cost saved), lowest first; with ``per_cost=False``
    by (importance lost) / (units removed), i.e. a global threshold on the scores.

    The saving of a chunk depends only on its own block's dims and the model-wide groups (costs are
    sums over blocks), so after a removal only those candidates are re-priced.
    """
    prefix = {g: torch.cat([torch.zeros(1, dtype=torch.float64), torch.sort(s).values.cumsum(0)])
              for g, s in norm.items()}                                 # prefix[g][r] = loss of removing r units
    dims, step = dict(base), {g: 0 for g in ladders}
    current = cost(dims)
    cache: dict[str, tuple[float, float]] = {}                          # g -> (ratio, saving)

    def candidate(g: str) -> tuple[float, float]:
        if g not in cache:
            lad, i, n = ladders[g], step[g], groups[g].size
            if i + 1 >= len(lad):
                cache[g] = (math.inf, 0.0)
            else:
                lost = (prefix[g][n - lad[i + 1]] - prefix[g][n - lad[i]]).item()
                saving = current - cost({**dims, g: lad[i + 1]})
                denom = saving if per_cost else float(lad[i] - lad[i + 1])
                cache[g] = ((lost / denom) if saving > 0 else math.inf, saving)
        return cache[g]

    while current > budget:
        best = min(ladders, key=lambda g: candidate(g)[0])
        if math.isinf(candidate(best)[0]):
            break
        step[best] += 1
        dims[best] = ladders[best][step[best]]
        current = cost(dims)
        blk = groups[best].block
        for g in list(cache):
            if blk is None or groups[g].block in (blk, None):
                del cache[g]
    return {g: dims[g] for g in ladders}


def _per_kind(value: dict[str, torch.Tensor], kinds: dict[str, str], ladders: dict[str, list[int]],
              base: dict[str, int], cost: Callable, budget: float) -> dict[str, int]:
    """One kept fraction per kind, shared by all its groups; greedily lower the fraction of the kind whose
    next step loses the least ``value`` per cost saved (a step that saves nothing is merged with the next).

    A kind's fractions are the sizes its groups' ladders allow, divided by the group size; a group keeps
    the largest allowed size at or below its kind's fraction (its smallest size below the lowest)."""
    by_kind: dict[str, list[str]] = {}
    for g, k in kinds.items():
        by_kind.setdefault(k, []).append(g)
    grid = {k: sorted({s / ladders[g][0] for g in gs for s in ladders[g]}, reverse=True) for k, gs in by_kind.items()}
    prefix = {g: torch.cat([torch.zeros(1, dtype=torch.float64), torch.sort(v).values.cumsum(0)]).tolist()
              for g, v in value.items()}                                # prefix[g][r] = value of the r weakest units

    def kept(g: str, frac: float) -> int:
        fits = [s for s in ladders[g] if s <= frac * ladders[g][0] + 1e-9]
        return fits[0] if fits else ladders[g][-1]

    dims, step = dict(base), {k: 0 for k in by_kind}
    current = cost(dims)
    while current > budget:
        best, best_ratio = None, math.inf
        for k, gs in by_kind.items():
            for j in range(step[k] + 1, len(grid[k])):
                new = {g: kept(g, grid[k][j]) for g in gs}
                saving = current - cost({**dims, **new})
                if saving > 0:
                    lost = sum(prefix[g][ladders[g][0] - new[g]] - prefix[g][ladders[g][0] - dims[g]] for g in gs)
                    if lost / saving < best_ratio:
                        best, best_ratio = (k, j, new), lost / saving
                    break
        if best is None:
            break
        step[best[0]] = best[1]
        dims.update(best[2])
        current = cost(dims)
    return {g: dims[g] for g in ladders}


def _uniform(ladders: dict[str, list[int]], base: dict[str, int], cost: Callable, budget: float) -> dict[str, int]:
    def sizes_at(rho: float) -> dict[str, int]:
        out = {}
        for g, lad in ladders.items():
            want = rho * lad[0]
            fits = [s for s in lad if s <= math.ceil(want - 1e-9)]
            out[g] = fits[0] if fits else lad[-1]
        return out

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost({**base, **sizes_at(mid)}) <= budget:
            lo = mid
        else:
            hi = mid
    return sizes_at(lo)


# ------------------------------------------------------------------------------------ targets
#: the metrics a target may name.
TARGET_METRICS = ("flops", "params", "latency_ms", "shape")


@dataclass
class Target:
    """A parsed pruning target (see :func:`parse_target`).

    Attributes:
        metric: ``"flops"``, ``"params"``, ``"latency_ms"`` or ``"shape"``.
        value: the fraction of the current cost to keep (flops, params; in (0, 1]), or milliseconds
            (latency_ms); None for a shape.
        lut: the latency table pricing ``latency_ms`` (None otherwise).
        shape: group kind -> units to keep in every group of that kind (``shape`` only).
        deploy_target, deploy_precision: the target profile and precision the model is pruned for
            (``latency_ms``: a table measured for another target is refused), or None.
    """

    metric: str
    value: float | None = None
    lut: LatencyTable | None = None
    shape: dict[str, int] = field(default_factory=dict)
    deploy_target: str | None = None
    deploy_precision: str | None = None


def parse_target(target: Mapping[str, Any] | Target) -> Target:
    """Read a target mapping: ``{"flops": f}``, ``{"params": f}`` (fractions of the current model, in (0, 1]),
    ``{"latency_ms": ms, "lut": PATH or LatencyTable}`` (optionally with ``"deploy_target"`` and
    ``"deploy_precision"``) or ``{"shape": {"embed": 192, "heads": 3, ...}}``.

    Raises:
        VitoptError: not exactly one metric, a value out of range, a latency target without a table,
            or a malformed shape.
    """
    if isinstance(target, Target):
        return target
    if not isinstance(target, Mapping):
        raise VitoptError(f"target must be a mapping such as {{'flops': 0.5}}; got {target!r}.")
    metrics = [k for k in target if k in TARGET_METRICS]
    unknown = [k for k in target if k not in (*TARGET_METRICS, "lut", "deploy_target", "deploy_precision")]
    if unknown or len(metrics) != 1:
        raise VitoptError(f"target {dict(target)!r} must name exactly one of {', '.join(TARGET_METRICS)} "
                          "(plus 'lut' for latency_ms).")
    metric = metrics[0]
    value = target[metric]
    if metric == "shape":
        if not isinstance(value, Mapping) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values()):
            raise VitoptError(f"target shape {value!r} must map group kinds to positive integers, e.g. "
                              "{'embed': 192, 'heads': 3, 'head_dim': 64, 'mlp': 768}.")
        return Target("shape", shape={str(k): int(v) for k, v in value.items()})
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise VitoptError(f"target {metric} must be a positive number; got {value!r}.")
    if metric in ("flops", "params") and value > 1:
        raise VitoptError(f"target {metric} is a fraction of the model's current {metric}, in (0, 1]; got {value}.")
    if metric == "latency_ms":
        lut = target.get("lut")
        if lut is None:
            raise VitoptError("target latency_ms needs 'lut': a latency table (vitopt measure-lut) or its path.")
        table = lut if isinstance(lut, LatencyTable) else LatencyTable.load(os.fspath(lut))
        return Target("latency_ms", float(value), lut=table, deploy_target=target.get("deploy_target"),
                      deploy_precision=target.get("deploy_precision"))
    return Target(metric, float(value))


def target_cost(structure: Structure, target: Target) -> tuple[Callable[[dict[str, int]], float], float]:
    """``(cost(dims), budget)`` of a budget target, in FLOPs, params or LUT milliseconds.

    Raises:
        VitoptError: a shape target (it has no budget), a Structure without a cost model, or a latency
            table measured for another token count, depth, or deployment target/precision.
    """
    if target.metric == "shape":
        raise VitoptError("a shape target has no cost budget.")
    if structure.cost_model is None:
        raise VitoptError("allocation needs a Structure with costs: build it with vitopt.structure(model).")
    cm = structure.cost_model
    if target.metric == "latency_ms":
        if structure.family != "vit":
            raise VitoptError(f"target latency_ms prices units with a ViT block latency table; a {structure.family} "
                              "model is not supported there (allowed targets: flops, params, shape).")
        target.lut.check_for(target.deploy_target, target.deploy_precision)
        return cost_fn(target.lut, cm.model), float(target.value)
    fn = getattr(cm, target.metric)
    return fn, float(target.value) * float(fn(structure.sizes()))


def shape_sizes(structure: Structure, shape: Mapping[str, int], groups: list[str] | None = None) -> dict[str, int]:
    """group -> kept count for a shape target: every group whose kind the shape names (among ``groups``).

    Raises:
        VitoptError: a shape wider than a group, or a kind the model does not have.
    """
    kinds = {g.kind for g in structure.groups.values()}
    missing = [k for k in shape if k not in kinds]
    if missing:
        raise VitoptError(f"target shape names {missing}, which this {structure.family} model does not have "
                          f"(its kinds: {', '.join(sorted(kinds))}).")
    sizes = {}
    for grp in structure.groups.values():
        want = shape.get(grp.kind)
        if want is None or (groups is not None and grp.name not in groups):
            continue
        if want > grp.size:
            raise VitoptError(f"target shape {grp.kind} is {want} but {grp.name} has only {grp.size} units.")
        sizes[grp.name] = want
    return sizes


def allocate(structure: Structure, scores: Mapping[str, torch.Tensor], *, target: Mapping[str, Any] | Target,
             scope: str = "global", round_to: Mapping[str, RoundRule] | None = None,
             min_keep: Mapping[str, int] | None = None, min_fraction: Mapping[str, float] | None = None,
             compare: str = "normalized", rank: str = "per_cost", fill: bool = True) -> KeepPlan:
    """Choose the kept units of the scored groups so that the model meets ``target`` (``vitopt.allocate``).

    Args:
        structure: from :func:`vitopt.structure` (it carries the model's cost model).
        scores: group -> importance per unit (higher = keep), e.g. from :func:`vitopt.importance`; only
            these groups are pruned.
        target: ``{"flops": f}`` / ``{"params": f}`` (keep that fraction of the current cost),
            ``{"latency_ms": ms, "lut": PATH}`` (a latency table from ``vitopt measure-lut``) or
            ``{"shape": {kind: units}}`` (an exact shape; the scores pick which units).
        scope: ``"global"`` (one ranking across blocks and kinds), ``"uniform"`` (the same kept
            fraction in every group) or ``"per_kind"`` (one kept fraction per kind, chosen by importance
            per cost; see :func:`allocate_budget`).
        round_to: group kind -> multiple for kept counts (default :data:`DEFAULT_ROUND_TO`).
        min_keep: group kind -> minimum kept units per group (default 1 head, ``round_to`` otherwise).
        rank: ``"per_cost"`` or ``"score"`` (see :func:`allocate_budget`).

    Returns:
        A :class:`~vitopt.arch.plan.KeepPlan` over the scored groups; apply it with :func:`vitopt.apply_plan`.

    Raises:
        VitoptError: a malformed target, a budget that cannot be met at the minimum sizes, a Structure
            without costs, or an unknown scope / rank.
    """
    t = parse_target(target)
    scores = dict(scores)
    if t.metric == "shape":
        return KeepPlan.from_scores(scores, shape_sizes(structure, t.shape, list(scores)))
    cost, budget = target_cost(structure, t)
    return allocate_budget(structure, scores, cost, budget, scope=scope, round_to=round_to, min_keep=min_keep,
                           min_fraction=min_fraction, compare=compare, rank=rank, fill=fill)
