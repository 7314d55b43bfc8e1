"""vitopt: make Vision Transformers small and fast for NVIDIA GPUs.

One YAML recipe carries a timm ViT through sparse training, structured pruning with channel surgery,
fine-tuning with distillation, ONNX export and validation. See README.md and ../shared/DESIGN.md.

Public entry points: :func:`load` (rebuild a pruned model from ``arch.json`` + ``model.safetensors``)
and the ``vitopt`` command line (:mod:`vitopt.cli`).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(path):
    """Rebuild a (pruned) timm model from a directory with ``arch.json`` and ``model.safetensors``.

    See :func:`vitopt.arch.config.load_pruned`; raises :class:`vitopt.errors.VitoptError` on bad files.
    """
    from vitopt.arch.config import load_pruned

    return load_pruned(path)
