"""``prune``: score units, allocate kept units under a FLOPs/params budget, and cut them out.

1. importance per unit with ``criterion`` (``l1`` weight magnitude, or ``gate`` from ``sparse_train``);
2. allocation (:func:`vitopt.pruning.allocation.allocate`) to ``target.flops`` / ``target.params`` as a
   fraction of the recipe's dense model, ``scope`` global or uniform, kept counts rounded to
   ``round_to`` and at least ``min_keep``;
3. surgery (:func:`vitopt.pruning.surgery.prune_model`), after which the model is the same timm class,
   physically smaller.

The model as it was before pruning becomes the KD teacher of a later ``finetune``. A per-block table
of heads / head_dim / mlp before and after is printed and stored in metrics.json.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vitopt.arch.cost import CostModel
from vitopt.arch.families import family_of
from vitopt.pruning.allocation import allocate
from vitopt.pruning.importance import compute_scores
from vitopt.pruning.surgery import prune_model
from vitopt.stages.base import MODEL_DIR, StageDir, State
from vitopt.train.data import make_loader
from vitopt.train.loop import evaluate

__all__ = ["run", "block_table"]


def block_table(before: dict[str, int], after: dict[str, int], depth: int) -> list[dict[str, int]]:
    """Rows ``{block, heads, heads_kept, head_dim, head_dim_kept, mlp, mlp_kept}`` for each block."""
    rows = []
    for i in range(depth):
        row = {"block": i}
        for kind in ("heads", "head_dim", "mlp"):
            row[kind] = before[f"blocks.{i}.{kind}"]
            row[f"{kind}_kept"] = after[f"blocks.{i}.{kind}"]
        rows.append(row)
    return rows


def _print_table(rows: list[dict], embed: tuple[int, int], title: str) -> None:
    table = Table(title=title)
    table.add_column("block", justify="right")
    for kind in ("heads", "head_dim", "mlp"):
        table.add_column(kind, justify="right")
    for r in rows:
        table.add_row(str(r["block"]), *(f"{r[k]} -> {r[k + '_kept']}" for k in ("heads", "head_dim", "mlp")))
    table.caption = f"embed_dim {embed[0]} -> {embed[1]}"
    Console().print(table)


def run(cfg, state: State, sd: StageDir) -> State:
    """Prune ``state.model`` in place to the configured budget; save the pruned model and the teacher."""
    model = state.model.eval()
    fam = family_of(model)
    structure = fam.structure(model)
    before = structure.sizes()
    teacher_dir = sd.save_model(state, "teacher")
    if state.reference_dir is None:            # the first prune's teacher is the dense reference
        state.reference_dir = teacher_dir
    state.teacher, state.teacher_dir = state.frozen_copy(), teacher_dir

    groups = [g.name for g in structure.of_kind(*cfg.groups)]
    scores = compute_scores(cfg.criterion, model, structure, groups, gates=state.gates)
    metric = "flops" if cfg.target.flops is not None else "params"
    fraction = cfg.target.flops if metric == "flops" else cfg.target.params
    cost = CostModel(model, structure)
    plan = allocate(structure, scores, getattr(cost, metric), fraction * state.dense[metric],
                    scope=cfg.scope, round_to={k: cfg.round_for(k) for k in cfg.groups},
                    min_keep={k: cfg.min_keep_for(k) for k in cfg.groups})
    prune_model(model, plan)
    after = fam.read_dims(model)
    rows = block_table(before, after, len(model.blocks))
    _print_table(rows, (before["embed"], after["embed"]), f"{sd.label}: kept units ({cfg.criterion}, {cfg.scope})")
    state.gates = None                         # gates indexed the old dims
    sd.save_model(state)
    val = make_loader(state.data.val, 256, shuffle=False, seed=0, num_workers=state.data.num_workers)
    pruned_cost = state.cost()
    metrics = {"criterion": cfg.criterion, "scope": cfg.scope, "target_metric": metric, "target": fraction,
               "val_top1_before_finetune": evaluate(model, val)["top1"],
               **pruned_cost, "flops_ratio": pruned_cost["flops"] / state.dense["flops"],
               "params_ratio": pruned_cost["params"] / state.dense["params"],
               "embed": {"before": before["embed"], "after": after["embed"]}, "blocks": rows,
               "keep": plan.keep}
    state.model.train()
    outputs = {"model": f"{sd.label}/{MODEL_DIR}", "teacher": f"{sd.label}/teacher",
               "reference": str(state.reference_dir.relative_to(sd.path.parent)), "gates": None}
    state.results[sd.label] = sd.finish(cfg, metrics, outputs)
    return state
