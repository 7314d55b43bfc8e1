"""Stage registry: recipe ``type`` -> the function that runs it; and the registries' names for recipes.

Each stage is ``run(config, State, StageDir) -> State`` in its own small module. :func:`recipe_choices`
collects the names the registries allow (criteria, runtimes, group kinds) so the recipe schema, which
imports no registry, checks them (:class:`vitopt.recipe.Choices`).
"""

from __future__ import annotations

from vitopt.arch.structure import GROUP_KINDS
from vitopt.deploy.runtimes import RUNTIMES
from vitopt.pruning.criteria import CRITERIA
from vitopt.recipe import Choices
from vitopt.stages import (
    build,
    export,
    finetune,
    prune,
    quantize,
    sparse_train,
    train,
    validate,
)

#: recipe stage type -> run function.
STAGES = {
    "train": train.run,
    "sparse_train": sparse_train.run,
    "prune": prune.run,
    "finetune": finetune.run,
    "export": export.run,
    "quantize": quantize.run,
    "build": build.run,
    "validate": validate.run,
}

__all__ = ["STAGES", "recipe_choices"]


def recipe_choices() -> Choices:
    """The names recipes may use, read from the registries now (so user registrations count too)."""
    return Choices(criteria=tuple(CRITERIA), runtimes={k: s.needs for k, s in RUNTIMES.items()},
                   group_kinds=tuple(GROUP_KINDS))
