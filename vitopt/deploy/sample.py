"""Validation samples as files: ``.npz`` with model-ready ``images`` and ``labels`` (``vitopt validate --data``,
the Jetson bundle's ``sample.npz``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vitopt.errors import VitoptError

__all__ = ["load_sample", "save_sample"]


def load_sample(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a validation sample ``.npz`` with ``images`` float32 ``[N, C, H, W]`` and ``labels`` int ``[N]``.

    Raises:
        VitoptError: a missing file, missing keys or mismatched shapes.
    """
    p = Path(path)
    if not p.is_file():
        raise VitoptError(f"sample file {p} does not exist.")
    try:
        with np.load(p, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except KeyError:
        raise VitoptError(f"sample file {p} must hold arrays 'images' [N, C, H, W] and 'labels' [N].") from None
    except Exception as exc:
        raise VitoptError(f"sample file {p} is not a readable .npz ({str(exc).splitlines()[0][:200]}).") from None
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels) or len(labels) == 0:
        raise VitoptError(f"sample file {p}: images {images.shape} and labels {labels.shape} must be [N, C, H, W] "
                          "and [N] with the same N >= 1.")
    return images.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)


def save_sample(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``images`` (float32 ``[N, C, H, W]``) and ``labels`` (int64 ``[N]``) to ``path`` atomically.

    Returns:
        the path written (read back with :func:`load_sample`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, images=np.asarray(images, dtype=np.float32), labels=np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)
    return path
