"""``prune``: the recipe adapter of :func:`vitopt.pruning.prune.prune_with_report` (``vitopt.prune``).

It turns the stage config into one call of the public prune loop: calibration data from the training
split (:func:`vitopt.pruning.calibration.calibration_batches`), the target as a fraction of the
recipe's *dense* model (converted to a fraction of the model entering the stage), KD recovery between
iterative rounds (:func:`vitopt.pruning.prune.kd_recovery`) from the model as it entered the stage.
The model before pruning becomes the KD teacher of a later ``finetune``. A per-block table of kept
units is printed and stored in metrics.json.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from vitopt.arch.families import family_of
from vitopt.arch.structure import GROUP_KINDS
from vitopt.deploy.kernel_rules import round_rules
from vitopt.pruning.calibration import calibration_batches
from vitopt.pruning.prune import kd_recovery, prune_with_report
from vitopt.stages.base import MODEL_DIR, StageDir, State, embed_widths, structure_table
from vitopt.train.data import make_loader
from vitopt.train.loop import evaluate

__all__ = ["run", "stage_target", "round_to_for"]


def _print_table(rows: list[dict], embed: tuple, title: str, depth: tuple | None = None) -> None:
    table = Table(title=title)
    table.add_column("block", justify="right")
    staged = any("stage" in r for r in rows)
    if staged:
        table.add_column("stage", justify="right")
    for kind in ("heads", "head_dim", "mlp"):
        table.add_column(kind, justify="right")
    for r in rows:   # a kind the family has no group of (Swin v2: head_dim) shows "-"
        table.add_row(str(r["block"]), *([str(r["stage"])] if staged else []),
                      *(f"{r[k]} -> {r[k + '_kept']}" if k in r else "-" for k in ("heads", "head_dim", "mlp")))
    table.caption = f"embed_dim {embed[0]} -> {embed[1]}" + (f", depth {depth[0]} -> {depth[1]}" if depth else "")
    Console().print(table)


def stage_target(cfg: Any, state: State) -> dict[str, Any]:
    """The stage's target for ``vitopt.prune``: flops/params fractions of the recipe's dense model become
    fractions of the model entering the stage; latency and shape targets pass through."""
    t = cfg.target
    if t.metric in ("flops", "params"):
        current = state.cost()[t.metric]
        return {t.metric: min(1.0, getattr(t, t.metric) * state.dense[t.metric] / current)}
    if t.metric == "latency_ms":
        out = {"latency_ms": t.latency_ms, "lut": cfg.lut}
        if cfg.deploy_target is not None:                 # issue 15: refuse a LUT of another target
            out.update(deploy_target=cfg.deploy_target, deploy_precision=cfg.deploy_precision)
        return out
    return {"shape": {k: v for k, v in t.shape.model_dump().items() if v is not None}}


# --- issue 15: round_to: auto
def round_to_for(cfg: Any, model: Any) -> dict[str, Any]:
    """``round_to`` per pruned kind: the recipe's multiples, or with ``round_to: auto`` the sizes the fused
    TensorRT kernels of ``cfg.deploy_target`` accept at ``cfg.deploy_precision`` (:mod:`vitopt.deploy.kernel_rules`;
    the model's token count decides the int8/fp8 MHA sequence limits)."""
    if cfg.round_to != "auto":
        return {k: cfg.round_for(k) for k in GROUP_KINDS}
    rules = round_rules(cfg.deploy_target, cfg.deploy_precision, num_tokens=family_of(model).num_tokens(model))
    return {k: rules.get(k, cfg.round_for(k)) for k in GROUP_KINDS}
# --- end issue 15


def run(cfg, state: State, sd: StageDir) -> State:
    """Prune ``state.model`` to the configured target; save the pruned model and the teacher."""
    teacher_dir = sd.save_model(state, "teacher")
    if state.reference_dir is None:            # the first prune's teacher is the dense reference
        state.reference_dir = teacher_dir
    state.teacher, state.teacher_dir = state.frozen_copy(), teacher_dir
    seed = state.seed * 1000 + sd.index
    cal = cfg.calibration
    calib = calibration_batches(state.data.train, cfg.criterion, batches=cal.batches, batch_size=cal.batch_size,
                                per_class=cal.per_class, seed=seed, num_workers=state.data.num_workers,
                                always=cfg.compare.startswith("calibrated") or cfg.reconstruct)
    recover = None
    if cfg.schedule == "iterative" and cfg.iterative.train_steps > 0:
        it = cfg.iterative
        loader = make_loader(state.data.train, it.batch_size, shuffle=True, seed=seed * 10,
                             num_workers=state.data.num_workers, drop_last=len(state.data.train) > it.batch_size)
        recover = kd_recovery(loader, steps=it.train_steps, lr=it.lr)
    options = cfg.search.model_dump() if cfg.criterion == "search" else {}
    # only kl compares against the teacher: for taylor/hessian a teacher equal to the model gives zero
    # gradients, and search defaults to the ungated model itself
    teacher = state.teacher if cfg.criterion == "kl" else None
    kinds = GROUP_KINDS
    result = prune_with_report(
        state.model, target=stage_target(cfg, state), criterion=cfg.criterion,
        groups=list(cfg.groups) if cfg.groups else None, data=calib, teacher=teacher, gates=state.gates,
        scope=cfg.scope, round_to=round_to_for(cfg, state.model), min_keep={k: cfg.min_keep_for(k) for k in kinds},
        min_fraction=dict(cfg.min_fraction), compare=cfg.compare, fill=cfg.fill, reconstruct=cfg.reconstruct,
        schedule=cfg.schedule,
        rounds=cfg.iterative.rounds, recover=recover, criterion_options=options, inplace=True)
    model = result.model
    before, after, structure_before = result.dims_before, result.dims_after, result.structure_before
    rows = structure_table(structure_before, after)
    embed = (embed_widths(structure_before, before), embed_widths(structure_before, after))
    units = list(structure_before.units)      # depth: one blocks group (ViT) or one per stage
    depth = (sum(before[g] for g in units), sum(after[g] for g in units)) if units else None
    _print_table(rows, embed, f"{sd.label}: kept units ({cfg.criterion}, {cfg.scope})", depth)
    for r in result.rounds:
        if r.get("reconstruction", {}).get("layers"):
            rec = r["reconstruction"]
            Console().print(f"round {r['round']}: refitted {rec['layers']} layers (attn.proj / mlp.fc2); relative output "
                            f"error on the calibration data {rec['before']:.4f} with the units dropped -> "
                            f"{rec['after']:.4f} after the least-squares refit")
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
               **({"depth": {"before": depth[0], "after": depth[1]}} if depth else {}),
               "rounds": [{**r, "shape": cfg.target.shape.model_dump()} if cfg.target.metric == "shape" else r
                          for r in result.rounds]}
    state.model.train()
    outputs = {"model": f"{sd.label}/{MODEL_DIR}", "teacher": f"{sd.label}/teacher",
               "reference": str(state.reference_dir.relative_to(sd.path.parent)), "gates": None}
    state.results[sd.label] = sd.finish(cfg, metrics, outputs)
    return state
