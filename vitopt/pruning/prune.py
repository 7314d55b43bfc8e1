"""``vitopt.prune``: the one prune loop (one-shot and iterative) over importance, allocation and surgery.

Every path that prunes a model calls :func:`prune_with_report` (``vitopt.prune`` returns its model):
the ``prune`` stage of a recipe, the benchmarks, and a user's own training script. One round is

1. importance of every unit of the selected groups (:func:`vitopt.pruning.importance.importance`);
2. allocation of kept units under the round's budget (:func:`vitopt.pruning.allocation.allocate_budget`)
   with hardware rounding, or an exact shape;
3. surgery (:func:`vitopt.arch.surgery.apply_plan`): the same timm class, physically smaller.

``schedule="iterative"`` repeats 1-3 ``rounds`` times, each round removing an equal share of the cost
between the model's cost and the target, with an optional recovery step between rounds (NViT, Yang et
al. CVPR 2023: prune, fine-tune briefly with KD, re-score, prune again); :func:`kd_recovery` builds
the usual recovery (a few KD steps from the unpruned model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitopt.arch.cost import structure_of
from vitopt.arch.plan import KeepPlan
from vitopt.arch.structure import Structure
from vitopt.arch.surgery import apply_plan
from vitopt.errors import VitoptError
from vitopt.pruning.allocation import COMPARE, allocate_budget, parse_target, shape_sizes, target_cost
from vitopt.pruning.criteria import get_criterion
from vitopt.pruning.importance import as_batches, default_groups, importance, select_groups
from vitopt.pruning.reconstruction import mean_error
from vitopt.pruning.reconstruction import reconstruct as refit_consumers
from vitopt.pruning.sensitivity import CURVE_PROBES, calibrate_by_curves, sensitivity_curves
from vitopt.train.loop import TrainHParams, fit

__all__ = ["prune", "prune_with_report", "PruneResult", "kd_recovery", "SCHEDULES", "CALIBRATED"]

#: ``compare`` values that measure each kind's loss on the calibration data -> the removal fractions probed.
CALIBRATED = {"calibrated": (0.25,), "calibrated_curve": CURVE_PROBES}

#: ``schedule`` values.
SCHEDULES = ("one_shot", "iterative")

#: ``recover(model, round, teacher)``: train the model in place between iterative rounds.
Recovery = Callable[[nn.Module, int, nn.Module], Any]


@dataclass
class PruneResult:
    """What :func:`prune_with_report` did.

    Attributes:
        model: the pruned model (the same timm class, physically smaller).
        structure_before: the Structure of the model as given (group names and sizes before pruning).
        dims_before, dims_after: group name -> units before / after, both in the names of
            ``structure_before`` (after depth pruning the kept blocks are renumbered; ``dims_after`` maps
            them back, and gives 0 units to every group of a removed block).
        plans: the KeepPlan of each round (indices relative to the model entering that round).
        rounds: one record per round: ``round``, ``budget`` and ``achieved`` (in the target's
            metric: FLOPs, params or ms; None for a shape), ``criterion_cost`` (the criterion's
            passes/images/seconds) and ``recovery`` (what ``recover`` returned, if it ran).
    """

    model: nn.Module
    structure_before: Structure
    dims_before: dict[str, int]
    dims_after: dict[str, int]
    plans: list[KeepPlan] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _renames(structure: Structure, plan: KeepPlan) -> dict[str, str | None]:
    """Group name before ``plan`` -> its name after surgery (None: its block was removed). Depth
    renumbers the kept units of a whole-module group: ``blocks.5.heads`` becomes ``blocks.3.heads``
    when blocks 1 and 3 go."""
    out: dict[str, str | None] = {name: name for name in structure.groups}
    for g, paths in structure.units.items():
        kept = plan.keep.get(g)
        if kept is None or len(kept) == len(paths):
            continue
        new_pos = {i: j for j, i in enumerate(sorted(kept))}
        for name in structure.groups:
            for i, path in enumerate(paths):
                if name.startswith(path + "."):
                    out[name] = f"{g}.{new_pos[i]}{name[len(path):]}" if i in new_pos else None
    return out


def _criterion_options(criterion: str, options: Mapping[str, Any] | None, structure: Structure,
                       cost: Callable | None, budget: float | None) -> dict[str, Any]:
    """Options for the criterion; ``search`` also gets the cost function and the round's target fraction."""
    opts = dict(options or {})
    if criterion == "search":
        cost = cost or structure.cost_model.flops
        if budget is None:
            raise VitoptError("criterion 'search' trains its gates towards a cost fraction; give a flops or params "
                              "target (not a shape).")
        opts.setdefault("cost", cost)
        opts.setdefault("target", min(1.0, max(budget / float(cost(structure.sizes())), 1e-6)))
    return opts


def prune_with_report(model: nn.Module, *, target: Mapping[str, Any], criterion: str = "taylor",
                      groups: Sequence[str] | None = None, data: Any = None, teacher: nn.Module | None = None,
                      gates: dict[str, torch.Tensor] | None = None, scope: str = "global",
                      round_to: Mapping[str, int] | None = None, min_keep: Mapping[str, int] | None = None,
                      schedule: str = "one_shot", rounds: int = 4, recover: Recovery | None = None,
                      calibration_batches: int | None = None, criterion_options: Mapping[str, Any] | None = None,
                      compare: str = "calibrated", min_fraction: Mapping[str, float] | None = None,
                      fill: bool = True, rank: str = "per_cost", reconstruct: bool = False,
                      inplace: bool = False) -> PruneResult:
    """Prune ``model`` to ``target``; returns the pruned model and a report of every round.

    Args:
        model: a timm model of a registered family (``vitopt.structure(model)`` shows its groups).
        target: ``{"flops": f}`` / ``{"params": f}`` (keep that fraction of ``model``'s cost, in (0, 1]),
            ``{"latency_ms": ms, "lut": PATH}`` (a table from ``vitopt measure-lut``) or
            ``{"shape": {"embed": 192, "heads": 3, "head_dim": 64, "mlp": 768}}`` (exact; one-shot).
        criterion: importance criterion (:data:`vitopt.pruning.criteria.CRITERIA`).
        groups: group kinds (or names) to prune; default every kind the criterion can price: embed
            (the residual width), heads, head_dim and mlp (:func:`vitopt.pruning.importance.default_groups`).
        data: calibration batches for data-driven criteria: a DataLoader or an iterable of
            ``(images [B, C, H, W], labels [B])``; the first ``calibration_batches`` are used.
        teacher: reference model for ``kl``/``search`` (default: the model itself) and for the KD loss of
            ``taylor``/``hessian`` (default: cross-entropy on the labels). Iterative recovery gets the
            model as given (unpruned) when None.
        gates: trained VTP gates (criterion ``gate``; one-shot only, they index the unpruned dims).
        scope: ``"global"``, ``"uniform"`` or ``"per_kind"`` (:func:`vitopt.pruning.allocation.allocate_budget`).
        round_to, min_keep: kind -> kept-count multiple / minimum per group.
        schedule: ``"one_shot"`` or ``"iterative"``.
        rounds: rounds of the iterative schedule (>= 2).
        recover: ``recover(model, round, teacher)`` trains the model in place after every round but
            the last (iterative only), e.g. :func:`kd_recovery`; its return value is recorded.
        calibration_batches: batches of ``data`` to use (None: all of it).
        criterion_options: criterion options (``max_rows`` for kl; ``steps``, ``lr``, ``penalty`` for search).
        compare: how units of different kinds are compared: ``"normalized"``, ``"isomorphic"``,
            ``"raw"`` (see :func:`vitopt.pruning.allocation.allocate_budget`), ``"calibrated"``: each
            kind's scores are converted to measured loss per unit on the calibration data first
            (:mod:`vitopt.pruning.sensitivity`, one probe removing 25% of every group), then ranked by
            loss per cost saved, or ``"calibrated_curve"``: the same with a rate per removal depth
            (probes at 25/50/75%, lower convex hull), so deep cuts of one block are priced at their
            measured, steeper marginal loss.
        min_fraction: kind -> minimum kept fraction of every group (a per-block floor).
        fill: re-add removed chunks that still fit under the budget (lands just under it).
        rank: allocation ranking, ``"per_cost"`` (default) or ``"score"``.
        reconstruct: before each cut, refit the layers that consume removed heads / head_dim / MLP
            units (``attn.proj``, ``mlp.fc2``) by least squares on the calibration activations
            (:mod:`vitopt.pruning.reconstruction`; Kwon et al. NeurIPS 2022); needs ``data``. Off by
            default: it keeps far more accuracy one-shot, but not after the benchmark's fine-tune
            (notes/allocation.md). Each round's report gets ``reconstruction``: the mean relative
            output error of those layers with the units simply dropped (``before``) and after the
            refit (``after``).
        inplace: prune ``model`` itself; by default a deep copy is pruned and ``model`` is untouched.

    Returns:
        :class:`PruneResult` (``.model`` is the pruned model).

    Raises:
        VitoptError: an unsupported model, a malformed target or schedule, an unknown criterion or
            group, missing data/gates the criterion needs, or a budget that cannot be met.
    """
    t = parse_target(target)
    crit = get_criterion(criterion)
    if schedule not in SCHEDULES:
        raise VitoptError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)}).")
    n_rounds = 1 if schedule == "one_shot" else int(rounds)
    if schedule == "iterative" and n_rounds < 2:
        raise VitoptError(f"schedule 'iterative' needs rounds >= 2; got {rounds}.")
    if schedule == "iterative" and t.metric == "shape":
        raise VitoptError("a shape target is applied in one shot (schedule 'one_shot').")
    if schedule == "iterative" and "gates" in crit.needs:
        raise VitoptError("schedule 'iterative' re-scores after every round, but gates only score the unpruned "
                          "model; use criterion l1, taylor, hessian, kl or search.")
    batches = as_batches(data, calibration_batches)
    if compare not in (*COMPARE, *CALIBRATED):
        raise VitoptError(f"unknown compare {compare!r} (known: {', '.join((*COMPARE, *CALIBRATED))}).")
    calibrated = compare in CALIBRATED and t.metric != "shape"      # a shape target compares nothing
    if not batches and ("data" in crit.needs or calibrated or reconstruct):
        what = ([f"criterion {criterion!r}"] * ("data" in crit.needs) + [f"compare={compare!r}"] * calibrated
                + ["reconstruct=True"] * bool(reconstruct))
        raise VitoptError(f"{' and '.join(what)} needs data: pass data= (a DataLoader or a list of (images, labels) "
                          "batches from the training set), or prune without data with criterion='l1', "
                          "compare='normalized'.")
    reference = teacher
    if reference is None and recover is not None and n_rounds > 1:   # recovery distils from the unpruned model
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    structure = structure_of(model)
    before = structure.sizes()
    if groups is None:
        groups = default_groups(structure, criterion, gates)
    result = PruneResult(model, structure, before, before)
    current = {name: name for name in before}          # original group name -> its name now (None: removed)

    def follow(structure: Structure, plan: KeepPlan) -> None:
        renames = _renames(structure, plan)
        for name, now in current.items():
            current[name] = renames.get(now) if now is not None else None
    if t.metric == "shape":
        names = select_groups(structure, groups)
        sizes = shape_sizes(structure, t.shape, names)
        scores = importance(model, criterion, groups=list(sizes), data=batches, teacher=teacher, gates=gates,
                            structure=structure, **_criterion_options(criterion, criterion_options, structure,
                                                                     None, None))
        plan = KeepPlan.from_scores(scores, sizes)
        refit = {"reconstruction": _refit(model, structure, plan, batches)} if reconstruct else {}
        follow(structure, plan)
        apply_plan(model, plan, inplace=True)
        result.plans.append(plan)
        result.rounds.append({"round": 1, "shape": dict(t.shape), "budget": None, "achieved": None,
                              "criterion_cost": scores.cost, **refit})
    else:
        cost, final = target_cost(structure, t)
        start = float(cost(before))
        for rnd in range(1, n_rounds + 1):
            structure = structure_of(model) if rnd > 1 else structure
            cost, _ = target_cost(structure, t)
            budget = start - (start - final) * rnd / n_rounds
            names = select_groups(structure, groups)
            opts = _criterion_options(criterion, criterion_options, structure, cost if t.metric != "latency_ms"
                                      else None, budget)
            scores = importance(model, criterion, groups=names, data=batches, teacher=teacher, gates=gates,
                                structure=structure, **opts)
            entry: dict[str, Any] = {"round": rnd, "budget": budget, "criterion_cost": scores.cost}
            ranked, how = scores, compare
            if compare in CALIBRATED:
                probes = CALIBRATED[compare]
                curves = sensitivity_curves(model, structure, scores, batches or [], probes=probes)
                ranked, how = calibrate_by_curves(scores, structure, curves, probes), "raw"
                entry["exchange_rates"] = {k: c[0] for k, c in curves.items()}
                if len(probes) > 1:
                    entry["rate_curves"] = curves
            plan = allocate_budget(structure, ranked, cost, budget, scope=scope, round_to=round_to,
                                   min_keep=min_keep, min_fraction=min_fraction, compare=how, rank=rank, fill=fill)
            entry["achieved"] = float(cost(plan.cost_dims(structure)))
            if reconstruct:
                entry["reconstruction"] = _refit(model, structure, plan, batches)
            follow(structure, plan)
            apply_plan(model, plan, inplace=True)
            if rnd < n_rounds and recover is not None:
                model.train(was_training)
                entry["recovery"] = recover(model, rnd, reference)
                model.eval()
            result.plans.append(plan)
            result.rounds.append(entry)
    model.train(was_training)
    now = structure_of(model).sizes()
    result.dims_after = {name: now[cur] if cur is not None else 0 for name, cur in current.items()}
    return result


def _refit(model: nn.Module, structure: Structure, plan: KeepPlan, batches: Any) -> dict[str, float]:
    """Refit the consumers of the units ``plan`` removes, in place; the mean errors before/after."""
    return mean_error(refit_consumers(model, structure, plan, batches, inplace=True)[1])


def prune(model: nn.Module, *, target: Mapping[str, Any], criterion: str = "taylor", groups: Sequence[str] | None = None,
          data: Any = None, teacher: nn.Module | None = None, gates: dict[str, torch.Tensor] | None = None,
          scope: str = "global", round_to: Mapping[str, int] | None = None, min_keep: Mapping[str, int] | None = None,
          schedule: str = "one_shot", rounds: int = 4, recover: Recovery | None = None,
          calibration_batches: int | None = None, criterion_options: Mapping[str, Any] | None = None,
          compare: str = "calibrated", min_fraction: Mapping[str, float] | None = None, fill: bool = True,
          reconstruct: bool = False, inplace: bool = False) -> nn.Module:
    """Prune ``model`` to ``target`` and return the pruned model (``vitopt.prune``).

    The same timm class, physically smaller, with ``num_heads``, ``head_dim``, ``embed_dim`` and the
    Linear/LayerNorm attributes updated; ``model`` itself is untouched unless ``inplace=True``. Arguments
    as :func:`prune_with_report`, which also returns the per-round report. Example::

        pruned = vitopt.prune(model, target={"flops": 0.5}, criterion="taylor", data=train_loader,
                              calibration_batches=8)

    Raises:
        VitoptError: as :func:`prune_with_report`.
    """
    return prune_with_report(model, target=target, criterion=criterion, groups=groups, data=data, teacher=teacher,
                             gates=gates, scope=scope, round_to=round_to, min_keep=min_keep, schedule=schedule,
                             rounds=rounds, recover=recover, calibration_batches=calibration_batches,
                             criterion_options=criterion_options, compare=compare, min_fraction=min_fraction,
                             fill=fill, reconstruct=reconstruct, inplace=inplace).model


class _Limited:
    """The first ``steps`` batches of a loader, cycling over it as often as needed."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        n = 0
        while n < self.steps:
            empty = True
            for batch in self.loader:
                if n == self.steps:
                    return
                empty = False
                n += 1
                yield batch
            if empty:
                return


def kd_recovery(data: Any, *, steps: int = 50, lr: float = 1e-4, kd_alpha: float = 0.5, kd_tau: float = 4.0,
                weight_decay: float = 0.05, label_smoothing: float = 0.1) -> Recovery:
    """A ``recover`` for :func:`prune` that trains ``steps`` optimizer steps with KD from the teacher.

    AdamW at peak ``lr`` with a cosine decay to ``lr / 10`` over the steps, loss
    ``kd_alpha * tau^2 * KL(teacher || student) + (1 - kd_alpha) * CE`` (Hinton et al. 2015,
    arXiv 1503.02531), as NViT recovers between pruning rounds.

    Args:
        data: training batches ``(images, labels)`` (a DataLoader), cycled if shorter than ``steps``.
        steps: optimizer steps per recovery (>= 1).

    Returns:
        ``recover(model, round, teacher) -> {"train_loss": float, "steps": int}``.

    Raises:
        VitoptError: ``steps`` < 1 or ``lr`` <= 0.
    """
    if steps < 1 or not lr > 0 or not math.isfinite(lr):
        raise VitoptError(f"kd_recovery needs steps >= 1 and lr > 0; got steps={steps}, lr={lr}.")

    def recover(model: nn.Module, rnd: int, teacher: nn.Module) -> dict[str, Any]:
        hp = TrainHParams(epochs=1, lr=lr, min_lr=lr * 0.1, weight_decay=weight_decay, warmup_epochs=0.0,
                          label_smoothing=label_smoothing, grad_clip=None)
        model.train()
        rec = fit(model, _Limited(data, steps), None, hp, teacher=teacher, kd_alpha=kd_alpha, kd_tau=kd_tau,
                  desc=f"recover {rnd}")[-1]
        return {"train_loss": rec["train_loss"], "steps": steps}

    return recover
