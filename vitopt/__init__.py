"""vitopt: make Vision Transformers small and fast for NVIDIA GPUs.

The public Python API (the CLI, every recipe stage and every benchmark call the same functions)::

    import timm, vitopt
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    print(vitopt.structure(model))                                 # groups, sizes, FLOPs/params per unit
    pruned = vitopt.prune(model, target={"flops": 0.5}, criterion="taylor", data=loader)
    vitopt.save(pruned, "out/"); again = vitopt.load("out/")       # arch.json + model.safetensors
    vitopt.export_onnx(pruned, "out/model.onnx", input_shape=(3, 224, 224))
    vitopt.validate("out/model.onnx", ["onnxruntime"], data=(images, labels))

Lower-level steps: :func:`importance` -> scores, :func:`allocate` -> :class:`KeepPlan`,
:func:`apply_plan` -> the pruned model. Training-time methods for a user's own loop live in
:mod:`vitopt.sparsity` (``VTP``, ``SViTE``, ``S2ViTE``, ``SViTEPlus``, ``Semi24``,
``AttentionSparsityReg``). See README.md ("Python API") and docs/architecture.md.
"""

from __future__ import annotations

from vitopt.arch.config import save
from vitopt.arch.cost import structure_of as structure
from vitopt.arch.plan import KeepPlan
from vitopt.arch.structure import Structure
from vitopt.arch.surgery import apply_plan
from vitopt.deploy.onnx_export import export_onnx
from vitopt.errors import VitoptError
from vitopt.pruning.allocation import allocate
from vitopt.pruning.importance import importance
from vitopt.pruning.prune import PruneResult, kd_recovery, prune, prune_with_report
from vitopt.rundir import load, validate

__version__ = "0.1.0"

__all__ = ["structure", "importance", "allocate", "apply_plan", "prune", "prune_with_report", "kd_recovery",
           "save", "load", "export_onnx", "validate", "Structure", "KeepPlan", "PruneResult", "VitoptError",
           "__version__"]
