"""Image datasets read from disk: timm transforms, corrupt-image handling, CIFAR's python-pickle layout.

* :func:`make_transforms` builds the train / eval transforms with timm's factory
  (``timm.data.create_transform``): train = RandomResizedCrop + flip + RandAugment + normalize +
  random erasing; eval = resize to ``size / crop_pct`` + center crop + normalize, with the model's
  ``pretrained_cfg`` mean/std (:class:`~vitopt.train.data.ModelInput`). Without an ``augment`` config
  the eval-free legacy path (convert, resize, normalize: :func:`~vitopt.train.data.to_model_input`) is used.
  :func:`resolve_augment` turns the ``"auto"`` settings into values that fit the data (small or
  single-channel images get no flip, RandAugment, random erasing or eval crop).
* :class:`ImageFiles` decodes files with PIL; an unreadable file stops with its name, or with
  ``skip_corrupt`` is replaced by the next readable sample and counted (:class:`SkipCounter`, shared
  with DataLoader workers through fork-inherited shared memory).
* :func:`read_cifar` reads CIFAR-10 / CIFAR-100 python batches with an unpickler that only
  rebuilds NumPy arrays and plain containers (no arbitrary globals: invariant 6 of docs/architecture.md).

Sources: timm docs (``create_transform``, ``rand_augment_transform``, ``RandomErasing``, ``Mixup``);
A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009), CIFAR python format;
E. D. Cubuk et al., "RandAugment", CVPR-W 2020; Z. Zhong et al., "Random Erasing", AAAI 2020;
H. Zhang et al., "mixup", ICLR 2018; S. Yun et al., "CutMix", ICCV 2019.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from vitopt.errors import VitoptError
from vitopt.train.inputs import ImageTransform

__all__ = ["make_transforms", "resolve_augment", "ResolvedAugment", "image_mode", "make_mixup", "SkipCounter",
           "ImageFiles", "ArrayImages", "read_cifar", "IMAGENET_AUGMENT", "SMALL_AUGMENT", "SMALL_SIDE",
           "EVAL_INTERPOLATION", "EVAL_CROP_MODE"]


#: timm / DeiT ImageNet training augmentation: what an ``"auto"`` setting becomes for larger colour images
#: (Touvron et al. 2021, DeiT, table 9: RandAugment m9-mstd0.5, random erasing 0.25; timm's
#: RandomResizedCrop scale (0.08, 1) and horizontal flip 0.5).
IMAGENET_AUGMENT: dict[str, Any] = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "scale": (0.08, 1.0),
                                    "hflip": 0.5}
#: vitopt's choice for small or single-channel images (``"auto"`` settings): no RandAugment (its colour
#: and shear operations are tuned for ImageNet photos), no random erasing on small images (a 16 x 16
#: erased patch is a third of a 28 px digit), no horizontal flip (it changes the class of digits and
#: characters, and scans are rarely mirror-symmetric), crops of at least half the image, no eval crop.
SMALL_AUGMENT: dict[str, Any] = {"auto_augment": None, "re_prob": 0.0, "scale": (0.5, 1.0), "hflip": 0.0}
#: images (or model inputs) whose shorter side is at most this many pixels count as small.
SMALL_SIDE = 64
#: the eval transform vitopt builds (and records): resize, then center crop, bilinear interpolation.
EVAL_INTERPOLATION = "bilinear"
EVAL_CROP_MODE = "center"


@dataclass(frozen=True)
class ResolvedAugment:
    """An ``augment`` config with every ``"auto"`` replaced by the value used, and why.

    Attributes:
        auto_augment, re_prob, scale, hflip, mixup, cutmix: as :class:`vitopt.recipe.schema.Augment`.
        crop_pct: eval center-crop fraction actually used.
        reasons: field -> why it has its value (``"auto: 28 px single-channel images"``); fields the
            recipe set explicitly are absent.
    """

    auto_augment: str | None
    re_prob: float
    scale: tuple[float, float]
    hflip: float
    crop_pct: float
    mixup: float = 0.0
    cutmix: float = 0.0
    reasons: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the values, then which of them are ``"auto"`` and why (``RandomResizedCrop scale (0.5, 1.0),
        hflip 0.0, ... (scale, hflip, ...: auto: 28 px small single-channel images)``)."""
        text = (f"RandomResizedCrop scale {tuple(self.scale)}, hflip {self.hflip:g}, auto_augment "
                f"{self.auto_augment or 'none'}, re_prob {self.re_prob:g}, mixup {self.mixup:g}, cutmix {self.cutmix:g}, "
                f"eval crop_pct {self.crop_pct:g}")
        why: dict[str, list[str]] = {}
        for key, reason in self.reasons.items():
            why.setdefault(reason, []).append(key)
        return text + "".join(f" ({', '.join(keys)}: {reason})" for reason, keys in why.items())


def resolve_augment(augment: Any | None, mi: Any, *, gray: bool = False,
                    image_side: int | None = None) -> ResolvedAugment | None:
    """Replace the ``"auto"`` fields of ``augment`` by values that fit the data (None stays None: no augmentation).

    Small means the model input's or the images' (median) shorter side is <= :data:`SMALL_SIDE` pixels.
    ``"auto"`` gives :data:`SMALL_AUGMENT` to small images, and for single-channel (gray) images no
    RandAugment and no flip; other images get :data:`IMAGENET_AUGMENT`. ``crop_pct: "auto"`` is 1.0 (no
    eval crop) for small images, else the model's ``pretrained_cfg`` crop (``mi.crop_pct``); ``crop_pct:
    null`` is always the model's.

    Args:
        augment: an object with ``auto_augment``, ``re_prob``, ``scale``, ``hflip``, ``crop_pct``, ``mixup``,
            ``cutmix`` (:class:`vitopt.recipe.schema.Augment`), each a value or ``"auto"``; or None.
        mi: :class:`~vitopt.train.inputs.ModelInput` (``img_size``, ``crop_pct``).
        gray: every checked image has one channel.
        image_side: median shorter side of the images in pixels, or None when unknown.
    """
    if augment is None:
        return None
    model_side = min(mi.img_size)
    small = model_side <= SMALL_SIDE or (image_side is not None and image_side <= SMALL_SIDE)
    what = (f"{image_side} px" if image_side is not None else f"{model_side} px model input")
    facts = ("small " if small else "") + ("single-channel " if gray else "") + "images"
    reasons: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key in ("auto_augment", "re_prob", "scale", "hflip"):
        value = getattr(augment, key)
        if isinstance(value, str) and value == "auto":
            no_color_ops = key in ("auto_augment", "hflip") and gray
            value = SMALL_AUGMENT[key] if small or no_color_ops else IMAGENET_AUGMENT[key]
            reasons[key] = f"auto: {what} {facts}" if small or no_color_ops else f"auto: ImageNet default ({what})"
        values[key] = value
    crop = getattr(augment, "crop_pct", None)
    if isinstance(crop, str) and crop == "auto":
        crop = 1.0 if small else mi.crop_pct
        reasons["crop_pct"] = f"auto: {what} {facts}" if small else "auto: the model's pretrained_cfg"
    elif crop is None:
        crop = mi.crop_pct
        reasons["crop_pct"] = "the model's pretrained_cfg"
    return ResolvedAugment(auto_augment=values["auto_augment"], re_prob=float(values["re_prob"]),
                           scale=tuple(float(v) for v in values["scale"]), hflip=float(values["hflip"]),
                           crop_pct=float(crop), mixup=float(getattr(augment, "mixup", 0.0) or 0.0),
                           cutmix=float(getattr(augment, "cutmix", 0.0) or 0.0), reasons=reasons)


def image_mode(mi: Any) -> str:
    """The PIL mode images are converted to before the transforms: ``"L"`` for a 1-channel model, else ``"RGB"``
    (timm's ``train.py`` convention for ``input_img_mode``)."""
    return "L" if mi.in_chans == 1 else "RGB"


def make_transforms(mi: Any, augment: Any | None, *, gray: bool = False,
                    image_side: int | None = None) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)``: PIL image -> float tensor [in_chans, H, W], normalized.

    The image is converted to :func:`image_mode` first (PIL's ITU-R 601-2 luma for RGB -> L), then:
    train = RandomResizedCrop + flip + RandAugment + normalize + random erasing; eval = resize to
    ``size / crop_pct`` + center crop (bilinear) + normalize, exactly ``timm.data.create_transform(input_size,
    crop_pct=, interpolation="bilinear", crop_mode="center", mean=, std=)``, which is what
    :func:`~vitopt.arch.config.set_preprocessing` records for timm's ``resolve_data_config``.

    Args:
        mi: :class:`~vitopt.train.data.ModelInput` (channels, size, mean/std, crop_pct).
        augment: an ``augment`` config (``"auto"`` fields resolved by :func:`resolve_augment` with ``gray`` and
            ``image_side``), a :class:`ResolvedAugment`, or None for the plain path (convert, bilinear
            antialiased resize to the model size, normalize: :func:`~vitopt.train.inputs.to_model_input`).

    Raises:
        VitoptError: timm rejects the ``auto_augment`` policy string.
    """
    if augment is None:
        plain = ImageTransform(mi)
        return plain, plain
    from timm.data import create_transform

    if not isinstance(augment, ResolvedAugment):
        augment = resolve_augment(augment, mi, gray=gray, image_side=image_side)
    size = tuple(mi.img_size)
    try:
        train = create_transform(size, is_training=True, auto_augment=augment.auto_augment,
                                 re_prob=augment.re_prob, re_mode="pixel", scale=tuple(augment.scale),
                                 hflip=augment.hflip, color_jitter=None, mean=mi.mean, std=mi.std)
    except (AssertionError, ValueError, KeyError) as exc:
        raise VitoptError(f"data.augment.auto_augment {augment.auto_augment!r} is not a timm policy ({exc}); "
                          "allowed e.g. 'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', 'original', 'auto' or null.") from None
    val = create_transform(size, is_training=False, crop_pct=augment.crop_pct, interpolation=EVAL_INTERPOLATION,
                           crop_mode=EVAL_CROP_MODE, mean=mi.mean, std=mi.std)
    mode = image_mode(mi)
    return _Converted(train, mode), _Converted(val, mode)


class _Converted:
    """Convert a PIL image to ``mode`` ('L' or 'RGB') before a timm transform (picklable for workers)."""

    def __init__(self, transform: Callable, mode: str) -> None:
        self.transform, self.mode = transform, mode

    def __call__(self, img: Any) -> Tensor:
        return self.transform(img.convert(self.mode))


def make_mixup(augment: Any | None, num_classes: int, label_smoothing: float):
    """timm ``Mixup`` (batch-level Mixup / CutMix with smoothed soft targets), or None when both alphas are 0.

    The returned callable maps ``(x [B, C, H, W], y int64 [B]) -> (mixed x, soft targets [B, K])``;
    its randomness comes from NumPy's global RNG (saved in epoch checkpoints). B must be even.
    """
    if augment is None or (getattr(augment, "mixup", 0) <= 0 and getattr(augment, "cutmix", 0) <= 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, label_smoothing=label_smoothing,
                 num_classes=num_classes)


class SkipCounter:
    """Which samples were unreadable, shared by the main process and its forked DataLoader workers.

    One shared byte per sample (1.3 MB for ImageNet-1k's 1.28 M training images); :attr:`count` is the
    number of distinct unreadable files seen so far, however often and in whichever worker each was hit.
    """

    def __init__(self, n: int) -> None:
        self._flags = mp.get_context("fork").RawArray("b", max(1, n)) if sys.platform != "win32" else bytearray(max(1, n))

    def add(self, index: int) -> None:
        """Mark sample ``index`` as unreadable."""
        self._flags[index] = 1

    @property
    def count(self) -> int:
        """Distinct unreadable samples seen so far (all processes)."""
        return int(np.frombuffer(self._flags, dtype=np.int8).sum())


_IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError)


class ImageFiles(Dataset):
    """``(path, label)`` samples decoded with PIL and passed through ``transform``.

    Args:
        samples: list of (file path, class index).
        transform: PIL image -> tensor.
        skip_corrupt: on an unreadable file, use the next readable sample (cyclically) and count it in
            ``skipped`` instead of raising.
        skipped: the shared :class:`SkipCounter`.

    Raises (from ``__getitem__``):
        VitoptError: a file cannot be decoded and ``skip_corrupt`` is off (names the file), or no file
            of the dataset can be decoded.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, skip_corrupt: bool,
                 skipped: SkipCounter) -> None:
        self.samples, self.transform, self.skip_corrupt, self.skipped = list(samples), transform, skip_corrupt, skipped
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, path: str):
        from PIL import Image

        with open(path, "rb") as fh:
            img = Image.open(fh)
            img.load()
        return img

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for k in range(len(self.samples)):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                img = self._open(path)
            except _IMAGE_ERRORS as exc:
                if not self.skip_corrupt:
                    raise VitoptError(f"image {path} cannot be read ({type(exc).__name__}: {exc}); replace or "
                                      "delete it, or set data.skip_corrupt: true to skip and count unreadable "
                                      "images.") from None
                self.skipped.add((index + k) % len(self.samples))
                continue
            return self.transform(img), target
        raise VitoptError("no image of the dataset can be read (every file failed to decode).")


class ArrayImages(Dataset):
    """In-memory uint8 images [N, H, W, C] with labels, served as PIL images through ``transform``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.targets, self.transform = images, [int(v) for v in labels], transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.targets[index]


class _ArraysOnly(pickle.Unpickler):
    """Unpickler for CIFAR batches: rebuilds NumPy arrays and builtin containers, refuses every other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("builtins", "list"), ("builtins", "dict"),
                ("_codecs", "encode")}                     # protocol-2 pickles from Python 3 store bytes this way

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise VitoptError(f"CIFAR file {path} does not exist; data.root must hold the python version's folder as "
                          "extracted from the official archive.")
    try:
        with open(path, "rb") as fh:
            obj = _ArraysOnly(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise VitoptError(f"CIFAR file {path} is corrupt or not a CIFAR python batch ({exc}).") from None
    if not isinstance(obj, dict):
        raise VitoptError(f"CIFAR file {path} does not hold a dict of arrays (not a CIFAR python batch).")
    return obj


def read_cifar(kind: str, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Read CIFAR-10 (``kind="cifar10"``) or CIFAR-100 (fine labels) from the python-pickle layout.

    ``root`` is the folder holding ``cifar-10-batches-py/`` / ``cifar-100-python/``, or that folder itself.

    Returns:
        ``(train_images uint8 [N, 32, 32, 3], train_labels int64 [N], test_images, test_labels, class_names)``
        (50,000 / 10,000 images for the real sets).

    Raises:
        VitoptError: a file is missing, corrupt, holds a disallowed pickle global, or has the wrong shape.
    """
    sub, train_files, test_files, meta_file, label_key, names_key = _CIFAR[kind]
    root = Path(root).expanduser()
    folder = root / sub if (root / sub).is_dir() else root
    if not folder.is_dir():
        raise VitoptError(f"data.root {root} does not exist or is not a folder; point it at the folder holding {sub}/.")

    def split(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            d = _unpickle(folder / f)
            data, labels = d.get(b"data"), d.get(label_key)
            if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None \
                    or len(labels) != len(data):
                raise VitoptError(f"CIFAR file {folder / f} lacks 'data' [N, 3072] and as many "
                                  f"'{label_key.decode()}' (not a {kind} python batch).")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(labels, dtype=np.int64))
        return np.ascontiguousarray(np.concatenate(xs).astype(np.uint8)), np.concatenate(ys)

    xtr, ytr = split(train_files)
    xte, yte = split(test_files)
    meta = _unpickle(folder / meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    n_classes = int(max(ytr.max(), yte.max())) + 1
    if len(names) < n_classes:
        raise VitoptError(f"CIFAR meta file {folder / meta_file} names {len(names)} classes but the labels go up to "
                          f"{n_classes - 1}.")
    return xtr, ytr, xte, yte, names
