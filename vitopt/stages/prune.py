"""``prune``: score units, allocate kept units under a budget, and cut them out.

1. importance per unit with ``criterion``: ``l1`` weight magnitude, ``gate`` (VTP gates from
   ``sparse_train``), ``taylor``/``hessian`` (first-order / NViT saliency on calibration batches) or
   ``kl`` (UP-ViTs: KL to the unpruned model when one unit is removed, on a few images per class);
2. allocation (:func:`vitopt.pruning.allocation.allocate`) to ``target.flops`` / ``target.params`` as a
   fraction of the recipe's dense model, or ``target.latency_ms`` priced by a latency lookup table;
   ``scope`` global or uniform, kept counts rounded to ``round_to`` and at least ``min_keep`` - or an
   exact ``target.shape`` (UP-ViTs' recipe, e.g. DeiT-T's dims from DeiT-B);
3. surgery (:func:`vitopt.pruning.surgery.prune_model`): the same timm class, physically smaller.

Criterion ``search`` (SiDT-style, :mod:`vitopt.pruning.search`) trains gates on the selected groups
towards the target's FLOPs (or params) fraction on ``calibration.batches`` batches, then allocates by
the gate magnitudes. Works for every family (ViT, Swin, PVTv2); the table lists blocks over all stages.

``schedule: iterative`` repeats 1-3 in ``rounds`` equal steps of cost, with KD recovery training
from the unpruned model between rounds (NViT, Yang et al. CVPR 2023). The model as it was before
pruning becomes the KD teacher of a later ``finetune``. A per-block table of kept units is printed
and stored in metrics.json.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from vitopt.arch.cost import CostModel
from vitopt.arch.families import family_of
from vitopt.errors import VitoptError
from vitopt.pruning import importance
from vitopt.pruning.allocation import allocate
from vitopt.pruning.plan import KeepPlan
from vitopt.pruning.surgery import prune_model
from vitopt.stages.base import MODEL_DIR, StageDir, State
from vitopt.train.data import make_loader
from vitopt.train.loop import TrainHParams, evaluate, fit

__all__ = ["run", "block_table", "structure_table", "embed_widths"]



def block_table(before: dict[str, int], after: dict[str, int], depth: int) -> list[dict[str, int]]:
    """Rows ``{block, heads, heads_kept, head_dim, head_dim_kept, mlp, mlp_kept}`` for each block of a ViT."""
    rows = []
    for i in range(depth):
        row = {"block": i}
        for kind in ("heads", "head_dim", "mlp"):
            row[kind] = before[f"blocks.{i}.{kind}"]
            row[f"{kind}_kept"] = after[f"blocks.{i}.{kind}"]
        rows.append(row)
    return rows


def structure_table(structure, after: dict[str, int]) -> list[dict[str, int]]:
    """Rows ``{block, [stage,] heads, heads_kept, head_dim, head_dim_kept, mlp, mlp_kept}`` per block of any
    family, from the Structure taken before pruning (``Group.block`` counts blocks over the whole model).

    ``after`` maps group name -> kept units; the group names of a model do not change when it is pruned.
    """
    rows: dict[int, dict[str, int]] = {}
    for g in structure.groups.values():
        if g.block is None or g.kind not in ("heads", "head_dim", "mlp"):
            continue
        row = rows.setdefault(g.block, {"block": g.block, **({"stage": g.stage} if g.stage is not None else {})})
        row[g.kind], row[f"{g.kind}_kept"] = g.size, after[g.name]
    return [rows[b] for b in sorted(rows)]


def embed_widths(structure, dims: dict[str, int]) -> int | list[int]:
    """The residual width (ViT) or the per-stage widths (Swin, PVTv2) in ``dims``."""
    names = [g.name for g in structure.of_kind("embed")]
    return dims[names[0]] if len(names) == 1 and structure.groups[names[0]].stage is None else [dims[n] for n in names]


def _print_table(rows: list[dict], embed: tuple, title: str) -> None:
    table = Table(title=title)
    table.add_column("block", justify="right")
    staged = any("stage" in r for r in rows)
    if staged:
        table.add_column("stage", justify="right")
    for kind in ("heads", "head_dim", "mlp"):
        table.add_column(kind, justify="right")
    for r in rows:
        table.add_row(str(r["block"]), *([str(r["stage"])] if staged else []),
                      *(f"{r[k]} -> {r[k + '_kept']}" for k in ("heads", "head_dim", "mlp")))
    table.caption = f"embed_dim {embed[0]} -> {embed[1]}"
    Console().print(table)


# ------------------------------------------------------------------------------------------- data
def _labels(dataset) -> torch.Tensor:
    if hasattr(dataset, "tensors"):
        return dataset.tensors[1]
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    return torch.as_tensor([dataset[i][1] for i in range(len(dataset))])


def _calibration(cfg, state: State, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Batches for data-driven criteria: ``calibration.batches`` shuffled training batches, or for
    ``kl`` a proxy set of ``calibration.per_class`` training images per class (UP-ViTs)."""
    if cfg.criterion not in importance.DATA_CRITERIA:
        return None
    train, cal = state.data.train, cfg.calibration
    if cfg.criterion == "kl":
        labels = _labels(train)
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([(labels == c).nonzero().squeeze(1)[torch.randperm(int((labels == c).sum()), generator=g)[:cal.per_class]]
                         for c in labels.unique()])
        subset = torch.utils.data.Subset(train, idx.tolist())
        return list(make_loader(subset, cal.batch_size, shuffle=False, seed=seed))
    loader = make_loader(train, cal.batch_size, shuffle=True, seed=seed, num_workers=state.data.num_workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == cal.batches:
            break
    return out


class _Limited:
    """The first ``steps`` batches of a loader, repeated over epochs of the loader as needed."""

    def __init__(self, loader, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        n = 0
        while True:
            for batch in self.loader:
                if n == self.steps:
                    return
                n += 1
                yield batch


def _recover(cfg, state: State, sd: StageDir, rnd: int) -> dict:
    it = cfg.iterative
    loader = make_loader(state.data.train, it.batch_size, shuffle=True, seed=state.seed * 1000 + sd.index * 10 + rnd,
                         num_workers=state.data.num_workers, drop_last=len(state.data.train) > it.batch_size)
    hp = TrainHParams(epochs=1, lr=it.lr, min_lr=it.lr * 0.1, weight_decay=0.05, warmup_epochs=0.0,
                      label_smoothing=0.1, grad_clip=None)
    state.model.train()
    rec = fit(state.model, _Limited(loader, it.train_steps), None, hp, teacher=state.teacher,
              desc=f"{sd.label} recover {rnd}")[-1]
    state.model.eval()
    return {"train_loss": rec["train_loss"]}


# --------------------------------------------------------------------------------------- planning
def _search_options(cfg, model, structure, budget: float | None) -> dict:
    """kwargs of the ``search`` criterion: its cost (the target's metric, closed form and differentiable)
    and the target as a fraction of the current model's cost."""
    metric = cfg.target.metric if cfg.target.metric in ("flops", "params") else "flops"
    cost = getattr(CostModel(model, structure), metric)
    if budget is None:                          # target.shape: the shape's cost fraction
        budget = cost({**structure.sizes(), **_shape_sizes(cfg, structure)})
    target = min(1.0, max(budget / cost(structure.sizes()), 1e-6))
    return {"cost": cost, "target": target, "steps": cfg.search.steps, "lr": cfg.search.lr,
            "penalty": cfg.search.penalty}


def _scores(cfg, model, structure, groups: list[str], state: State, calib, budget: float | None = None) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    # only kl compares against the teacher: for taylor/hessian a teacher equal to the model gives zero gradients
    extra = _search_options(cfg, model, structure, budget) if cfg.criterion == "search" else {}
    scores = importance.compute_scores(cfg.criterion, model, structure, groups, gates=state.gates, batches=calib,
                                       teacher=state.teacher if cfg.criterion == "kl" else None, **extra)
    cost = {"seconds": time.perf_counter() - t0}
    cost.update(getattr(importance, "LAST_COST", {}) if cfg.criterion in ("kl", "search") else {})
    return scores, cost


def _shape_sizes(cfg, structure) -> dict[str, int]:
    """group -> kept count for ``target.shape`` (every group whose kind the shape names)."""
    shape = cfg.target.shape.model_dump()
    sizes = {}
    for grp in structure.groups.values():
        want = shape.get(grp.kind)
        if want is None:
            continue
        if want > grp.size:
            raise VitoptError(f"target.shape.{grp.kind} is {want} but {grp.name} has only {grp.size} units.")
        sizes[grp.name] = want
    return sizes


def _shape_plan(cfg, model, state: State, calib) -> tuple[KeepPlan, dict]:
    """Keep exactly ``target.shape`` in every block, choosing units by the criterion."""
    structure = family_of(model).structure(model)
    sizes = _shape_sizes(cfg, structure)
    scores, cost = _scores(cfg, model, structure, list(sizes), state, calib)
    return KeepPlan.from_scores(scores, sizes), cost


def _cost_fn(cfg, model, structure):
    metric = cfg.target.metric
    if metric == "latency_ms":
        from vitopt.pruning.latency_lut import LatencyTable, cost_fn

        if structure.family != "vit":
            raise VitoptError(f"target.latency_ms prices units with a ViT block latency table; a {structure.family} "
                              "model is not supported there (allowed targets: flops, params, shape).")

        return cost_fn(LatencyTable.load(cfg.lut), model)
    return getattr(CostModel(model, structure), metric)


def _budget_rounds(cfg, state: State, sd: StageDir, calib) -> list[dict]:
    """Prune to the budget in ``rounds`` equal steps of cost (1 round for one_shot)."""
    model, fam = state.model, family_of(state.model)
    metric = cfg.target.metric
    rounds = cfg.iterative.rounds if cfg.schedule == "iterative" else 1
    structure = fam.structure(model)
    start = _cost_fn(cfg, model, structure)(structure.sizes())
    final = cfg.target.latency_ms if metric == "latency_ms" else getattr(cfg.target, metric) * state.dense[metric]
    log = []
    for rnd in range(1, rounds + 1):
        structure = fam.structure(model)
        budget = start - (start - final) * rnd / rounds
        groups = [g.name for g in structure.of_kind(*cfg.groups)]
        scores, score_cost = _scores(cfg, model, structure, groups, state, calib, budget)
        cost = _cost_fn(cfg, model, structure)
        plan = allocate(structure, scores, cost, budget, scope=cfg.scope,
                        round_to={k: cfg.round_for(k) for k in cfg.groups},
                        min_keep={k: cfg.min_keep_for(k) for k in cfg.groups})
        achieved = cost(plan.dims(structure))
        prune_model(model, plan)
        entry = {"round": rnd, "budget": budget, "achieved": achieved, "criterion_cost": score_cost}
        if rnd < rounds and cfg.iterative.train_steps > 0:
            entry["recovery"] = _recover(cfg, state, sd, rnd)
        log.append(entry)
    return log


def run(cfg, state: State, sd: StageDir) -> State:
    """Prune ``state.model`` in place to the configured target; save the pruned model and the teacher."""
    model = state.model.eval()
    fam = family_of(model)
    before = fam.read_dims(model)
    structure_before = fam.structure(model)
    teacher_dir = sd.save_model(state, "teacher")
    if state.reference_dir is None:            # the first prune's teacher is the dense reference
        state.reference_dir = teacher_dir
    state.teacher, state.teacher_dir = state.frozen_copy(), teacher_dir
    calib = _calibration(cfg, state, state.seed * 1000 + sd.index)

    if cfg.target.metric == "shape":
        plan, score_cost = _shape_plan(cfg, model, state, calib)
        prune_model(model, plan)
        rounds = [{"round": 1, "shape": cfg.target.shape.model_dump(), "criterion_cost": score_cost}]
    else:
        rounds = _budget_rounds(cfg, state, sd, calib)
    after = fam.read_dims(model)
    rows = structure_table(structure_before, after)
    embed = (embed_widths(structure_before, before), embed_widths(structure_before, after))
    _print_table(rows, embed, f"{sd.label}: kept units ({cfg.criterion}, {cfg.scope})")
    state.gates = None                         # gates indexed the old dims
    sd.save_model(state)
    val = make_loader(state.data.val, 256, shuffle=False, seed=0, num_workers=state.data.num_workers)
    pruned_cost = state.cost()
    target = getattr(cfg.target, cfg.target.metric)
    metrics = {"criterion": cfg.criterion, "scope": cfg.scope, "schedule": cfg.schedule,
               "target_metric": cfg.target.metric,
               "target": target.model_dump() if hasattr(target, "model_dump") else target,
               "val_top1_before_finetune": evaluate(model, val)["top1"],
               **pruned_cost, "flops_ratio": pruned_cost["flops"] / state.dense["flops"],
               "params_ratio": pruned_cost["params"] / state.dense["params"],
               "embed": {"before": embed[0], "after": embed[1]}, "blocks": rows,
               "rounds": rounds}
    state.model.train()
    outputs = {"model": f"{sd.label}/{MODEL_DIR}", "teacher": f"{sd.label}/teacher",
               "reference": str(state.reference_dir.relative_to(sd.path.parent)), "gates": None}
    state.results[sd.label] = sd.finish(cfg, metrics, outputs)
    return state
