"""Stage registry: recipe ``type`` -> the function that runs it.

Each stage is ``run(config, State, StageDir) -> State`` in its own small module.
"""

from __future__ import annotations

from vitopt.stages import build, export, finetune, prune, quantize, sparse_train, train, validate

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

__all__ = ["STAGES"]
