"""What a model takes as input, and the one preprocessing path that produces it.

:func:`model_input` reads what a timm Vision Transformer expects (channels, spatial size, mean/std,
eval crop); :func:`to_model_input` turns [0, 1] images into exactly that, so a model sees the same
channel conversion, resize and normalization whether its images came from ``load_digits``, a folder
of PNGs, or (in the deploy layer) NumPy arrays fed to ONNX Runtime / TensorRT.

Sources: timm ``pretrained_cfg`` for mean/std and crop; ITU-R BT.601 luma weights for RGB -> gray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitopt.errors import VitoptError

__all__ = ["ModelInput", "model_input", "input_shape", "to_model_input", "ImageTransform", "LUMA_601"]

#: ITU-R BT.601 luma weights (R, G, B); they sum to 1, so a gray image stored as RGB maps back exactly.
LUMA_601: tuple[float, float, float] = (0.299, 0.587, 0.114)

# timm's IMAGENET_DEFAULT_MEAN / _STD, used when a model carries no pretrained_cfg.
_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInput:
    """What a model expects as input.

    Attributes:
        in_chans: number of input channels (1 for grayscale, 3 for RGB).
        img_size: (height, width) in pixels.
        mean: per-channel mean subtracted after scaling pixels to [0, 1]; length ``in_chans``.
        std: per-channel std divided after subtracting the mean; length ``in_chans``.
        crop_pct: eval center-crop fraction (``pretrained_cfg["crop_pct"]``, timm's default 0.875).
    """

    in_chans: int
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875


def _fit_stats(values: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    """Adapt a mean/std vector to ``n`` channels: keep, repeat a single value, or average to 1."""
    vals = tuple(float(v) for v in values)
    if len(vals) == n:
        return vals
    if len(vals) == 1:
        return vals * n
    if n == 1:
        return (sum(vals) / len(vals),)
    if len(vals) % n == 0:  # e.g. 6 -> 3: average consecutive groups
        k = len(vals) // n
        return tuple(sum(vals[i * k:(i + 1) * k]) / k for i in range(n))
    raise VitoptError(
        f"the {what} has {len(vals)} values but the model takes {n} input channels; "
        f"give {n} values (or 1, repeated to every channel)."
    )


def model_input(model: torch.nn.Module, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> ModelInput:
    """Read the input a timm Vision Transformer expects.

    Args:
        model: a timm model with ``patch_embed.img_size`` and ``patch_embed.proj`` (a Conv2d).
        mean, std: per-channel statistics in [0, 1] pixel units; default from
            ``model.pretrained_cfg`` (timm), else ImageNet's. If their length differs from the
            model's ``in_chans`` they are adapted: a 3-value ImageNet mean becomes its average for a
            1-channel model, a single value is repeated.

    Returns:
        :class:`ModelInput` with ``img_size`` as (H, W).

    Raises:
        VitoptError: the model has no ``patch_embed`` with an image size and a conv projection, or
            mean/std lengths cannot be adapted.
    """
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    in_chans = getattr(proj, "in_channels", None)
    if img_size is None or in_chans is None:
        raise VitoptError(
            f"model {type(model).__name__} has no patch_embed.img_size and patch_embed.proj.in_channels; "
            "vitopt reads its input size from a timm VisionTransformer-style patch embedding."
        )
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    img_size = (int(img_size[0]), int(img_size[1]))
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    if mean is None:
        mean = cfg.get("mean") or _DEFAULT_MEAN
    if std is None:
        std = cfg.get("std") or _DEFAULT_STD
    return ModelInput(
        in_chans=int(in_chans),
        img_size=img_size,
        mean=_fit_stats(mean, int(in_chans), "mean"),
        std=_fit_stats(std, int(in_chans), "std"),
        crop_pct=float(cfg.get("crop_pct") or 0.875),
    )


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input image of ``model`` (from :func:`model_input`).

    Raises:
        VitoptError: as :func:`model_input`.
    """
    mi = model_input(model)
    return (mi.in_chans, *mi.img_size)


def to_model_input(images: Tensor, mi: ModelInput) -> Tensor:
    """Turn [0, 1] images into what the model takes: channels, then size, then normalization.

    The one preprocessing path of vitopt (training, validation, export calibration all use it).

    Args:
        images: float tensor [B, C, H, W] with values in [0, 1]; C is 1 (gray), 3 (RGB) or 4 (RGBA,
            alpha dropped).
        mi: the model's input description (:func:`model_input`).

    Returns:
        float32 tensor [B, mi.in_chans, *mi.img_size]:
        gray -> RGB repeats the channel; RGB -> gray uses ITU-R BT.601 luma (0.299 R + 0.587 G +
        0.114 B); a size change uses bilinear interpolation with antialiasing
        (``align_corners=False``); then ``(x - mean[c]) / std[c]``.

    Raises:
        VitoptError: ``images`` is not 4-D or its channel count cannot be converted.
    """
    if images.ndim != 4:
        raise VitoptError(f"images must be a 4-D tensor [B, C, H, W]; got shape {tuple(images.shape)}.")
    x = images.float()
    c = x.shape[1]
    if c == 4:
        x, c = x[:, :3], 3
    if c != mi.in_chans:
        if c == 1:
            x = x.expand(-1, mi.in_chans, -1, -1)
        elif c == 3 and mi.in_chans == 1:
            w = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        else:
            raise VitoptError(
                f"cannot convert {c}-channel images to the model's {mi.in_chans} input channels; "
                "vitopt converts between 1 (gray), 3 (RGB) and 4 (RGBA) channels."
            )
    if tuple(x.shape[-2:]) != tuple(mi.img_size):
        x = F.interpolate(x, size=mi.img_size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(mi.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(mi.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


class ImageTransform:
    """PIL image -> model-ready tensor [in_chans, H, W] (module level so DataLoader workers can pickle it)."""

    def __init__(self, mi: ModelInput) -> None:
        self.mi = mi

    def __call__(self, img: Any) -> Tensor:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
        return to_model_input(x, self.mi)[0]
