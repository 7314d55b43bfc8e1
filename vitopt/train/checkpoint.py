"""Epoch checkpoints of :func:`vitopt.train.loop.fit`: everything needed to continue bit-for-bit.

One file per training stage, ``<checkpoint_dir>/last.pt``, rewritten at every epoch end with
:func:`vitopt.io.atomic_write_bytes` (temp file + fsync + rename), so a SIGKILL at any moment leaves
either the previous epoch's checkpoint or the new one, never a torn file. It holds the model's and
the optimizer's state dicts, the scheduler's, the values of optimizer parameters that live outside
the model (e.g. VTP gates in their own module), each callback's ``state_dict()``, the RNG states
(Python ``random``, NumPy's global generator, torch CPU and every CUDA device), the finished epoch,
the global step, the best validation top-1 and the per-epoch history so far.

The file is written with ``torch.save`` and read back with ``torch.load(weights_only=True)``, so a
checkpoint from elsewhere is never unpickled (invariant 6 of docs/architecture.md); RNG states are therefore kept
as tensors and plain Python numbers, not NumPy objects.

Sources: PyTorch "Saving and loading a general checkpoint" and reproducibility notes
(``torch.get_rng_state``, ``torch.cuda.get_rng_state_all``); POSIX ``rename(2)`` atomicity.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitopt.errors import VitoptError
from vitopt.io import atomic_write_bytes

__all__ = ["CHECKPOINT_FILE", "FORMAT_VERSION", "checkpoint_path", "capture_rng", "restore_rng",
           "save_checkpoint", "load_checkpoint"]

#: File name of the epoch checkpoint inside a stage's checkpoint directory.
CHECKPOINT_FILE = "last.pt"
#: Bumped when the layout of the checkpoint dict changes.
FORMAT_VERSION = 1

_REQUIRED = ("version", "epoch", "global_step", "model", "optimizer", "history", "rng")


def checkpoint_path(checkpoint_dir: str | Path) -> Path:
    """``checkpoint_dir / last.pt``: where :func:`save_checkpoint` writes."""
    return Path(checkpoint_dir) / CHECKPOINT_FILE


def capture_rng() -> dict[str, Any]:
    """The state of every RNG training touches, as tensors and plain numbers (``weights_only``-safe).

    Returns:
        ``{"python": (version, [625 ints], gauss), "numpy": {...}, "torch": uint8 tensor,
        "cuda": [uint8 tensor per device]}`` (``cuda`` empty without CUDA).
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned (CUDA states only when CUDA is available)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def save_checkpoint(checkpoint_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (see the module docstring for its keys) to ``checkpoint_dir/last.pt`` atomically.

    Tensors are moved to CPU first, so a GPU run resumes on any device. The whole file is serialized
    in memory and handed to :func:`vitopt.io.atomic_write_bytes` (temp + fsync + rename).

    Returns:
        the path written.
    """
    buf = io.BytesIO()
    torch.save(_to_cpu({"version": FORMAT_VERSION, **state}), buf)
    return atomic_write_bytes(checkpoint_path(checkpoint_dir), buf.getvalue())


def load_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """Read the epoch checkpoint in ``checkpoint_dir``, or None when there is none.

    Read with ``torch.load(weights_only=True, map_location="cpu")``.

    Raises:
        VitoptError: the file exists but is truncated, corrupt, not a vitopt checkpoint, or of another
            format version; the sentence names the file and says to delete it to restart the stage.
    """
    path = checkpoint_path(checkpoint_dir)
    if not path.is_file():
        return None
    fix = f"delete {path} to restart this stage from its first epoch"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/unpickler errors vary by torch version and damage
        raise VitoptError(f"epoch checkpoint {path} is truncated or corrupt ({type(exc).__name__}); {fix}.") from None
    if not isinstance(obj, dict) or any(k not in obj for k in _REQUIRED):
        raise VitoptError(f"epoch checkpoint {path} is not a vitopt epoch checkpoint (missing keys); {fix}.")
    if obj["version"] != FORMAT_VERSION:
        raise VitoptError(f"epoch checkpoint {path} has format version {obj['version']!r} but this vitopt reads "
                          f"version {FORMAT_VERSION}; {fix}.")
    return obj


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
