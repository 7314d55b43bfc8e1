"""Atomic file writes and safe weight loading.

Finished work is never lost to a crash mid-write: every file is written to a temporary sibling,
flushed and fsync'd, then renamed over the target (``os.replace`` is atomic on POSIX). Weights are
stored with safetensors and read back with safetensors or ``torch.load(weights_only=True)``, so an
untrusted file is never unpickled (invariant 6 of docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitopt.errors import VitoptError

__all__ = ["is_writer", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_json",
           "save_weights", "load_weights"]


def is_writer() -> bool:
    """True unless this process is a non-zero rank of an initialized ``torch.distributed`` group.

    In a torchrun job every rank runs the same pipeline; only rank 0 writes files (checkpoints,
    metrics, models, logs), so the ranks never race on one path.
    """
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); parents are created.

    The temp file is a hidden sibling (``.NAME.XXXX.tmp``) so the rename never crosses filesystems;
    the parent directory is fsync'd after the rename so the new name itself survives a power loss.
    A process killed at any moment leaves either the old file or the new one (plus, at worst, a stale
    temp file), never a partial ``path``. On a non-zero rank of a torch.distributed job nothing is
    written (:func:`is_writer`).

    Returns the path written. Raises OSError from the filesystem unchanged.
    """
    path = Path(path)
    if not is_writer():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())        # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it is durable (best effort: not every OS allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file. Raises VitoptError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VitoptError(f"{what} {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VitoptError(f"{what} {path} is not valid JSON ({exc}).") from None


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Save a state dict as safetensors, atomically.

    Tensors are made contiguous and de-aliased (safetensors refuses shared storage).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load weights from a ``.safetensors`` file, or a torch file with ``weights_only=True``.

    A torch file may hold the state dict directly or under ``state_dict``/``model``/``state_dict_ema``
    (the layouts timm and common training scripts write).

    Raises:
        VitoptError: the file is missing, truncated/corrupt, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise VitoptError(f"weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises SafetensorError / OSError variants
            raise VitoptError(f"weights file {path} is not a readable safetensors file ({exc}).") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VitoptError(
            f"weights file {path} could not be read as a torch checkpoint with weights_only=True ({exc}); "
            "use safetensors or a plain state dict.") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VitoptError(f"weights file {path} does not hold a state dict of tensors.")
    return obj
