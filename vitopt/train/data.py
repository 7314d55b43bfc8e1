"""Datasets that yield model-ready tensors: scikit-learn digits (embedded) and ImageNet-layout folders.

Every dataset goes through one preprocessing function, :func:`to_model_input`, so a model sees the
same channel conversion, resize and normalization whether its images came from ``load_digits``, a
folder of PNGs, or (in the deploy layer) NumPy arrays fed to ONNX Runtime / TensorRT. What a model
expects (channels, spatial size, mean/std) is read once from the timm model by :func:`model_input`.

Sources: scikit-learn ``load_digits`` (UCI optical recognition of handwritten digits, 1,797 8x8
images); torchvision ``ImageFolder``; timm ``pretrained_cfg`` for mean/std; ITU-R BT.601 luma weights
for RGB -> grayscale.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from vitopt.errors import VitoptError
from vitopt.train.distributed import rank, world_size
from vitopt.train.images import (
    EVAL_CROP_MODE,
    EVAL_INTERPOLATION,
    ArrayImages,
    ImageFiles,
    SkipCounter,
    image_mode,
    make_transforms,
    read_cifar,
    resolve_augment,
)
from vitopt.train.inputs import LUMA_601, ModelInput, model_input, to_model_input

__all__ = [
    "ModelInput",
    "model_input",
    "to_model_input",
    "DataBundle",
    "DataCheck",
    "load_data",
    "val_arrays",
    "make_loader",
    "EpochSampler",
    "ShardSampler",
    "IMAGE_EXTENSIONS",
    "LUMA_601",
]

#: File suffixes (lower case) that the imagefolder dataset treats as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
#: PIL modes with one colour channel (``LA``: gray + alpha).
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclass
class DataCheck:
    """What loading the data found out about it (printed by ``vitopt recipe check`` and at the start of a run).

    Attributes:
        name: dataset name (``digits``, ``cifar10``, the image folder's name).
        class_names: class names, index = label.
        counts: split -> number of images used (``train``, ``val``).
        unreadable: image files PIL cannot open, in path order (left out with ``skip_corrupt``).
        checked: image files whose header was read (imagefolder; 0 for in-memory data).
        gray: every image looked at has one channel.
        image_side: median shorter side of the images looked at, in pixels (None if none was).
        image_size: the most common ``(width, height)`` of those images (None if none was).
        seconds: wall time of the check.
    """

    name: str
    class_names: list[str]
    counts: dict[str, int]
    unreadable: list[str] = field(default_factory=list)
    checked: int = 0
    gray: bool = False
    image_side: int | None = None
    image_size: tuple[int, int] | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        """One line: classes, images per split, image size and mode, unreadable files."""
        size = f"{self.image_size[0]}x{self.image_size[1]}" if self.image_size else "?"
        parts = [f"{len(self.class_names)} classes", f"{self.counts.get('train', 0)} train / "
                 f"{self.counts.get('val', 0)} val images", f"mostly {size} px {'gray' if self.gray else 'colour'}"]
        if self.checked:
            parts.append(f"{self.checked} files opened in {self.seconds:.1f} s, "
                         + (f"{len(self.unreadable)} unreadable left out" if self.unreadable else "all readable"))
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "class_names": list(self.class_names), "counts": dict(self.counts),
                "unreadable": list(self.unreadable), "checked": self.checked, "gray": self.gray,
                "image_side": self.image_side, "image_size": list(self.image_size) if self.image_size else None,
                "seconds": round(self.seconds, 3)}


@dataclass
class DataBundle:
    """Train and validation sets, already model-ready.

    Attributes:
        train, val: datasets yielding ``(image, label)``; image is float32 [in_chans, H, W]
            normalized by :func:`to_model_input`, label an ``int`` in ``[0, num_classes)``.
        num_classes: number of classes.
        class_names: class names, index = label.
        name: short dataset name for logs and reports ("digits", or the folder's name).
        num_workers: suggested DataLoader workers (0 for in-memory datasets).
        meta: provenance: for digits ``train_indices``/``val_indices`` (int arrays into
            ``load_digits()``), for imagefolder and cifar ``root``.
        augment: the data config's ``augment`` (for :func:`~vitopt.train.images.make_mixup`), or None.
        skipped: (train, val) :class:`~vitopt.train.images.SkipCounter` of unreadable images skipped
            (``skip_corrupt``), or None for in-memory data.
        check: what the data check found (:class:`DataCheck`).
        preprocessing: the eval preprocessing the validation split gets, in timm's data-config keys
            (``input_size`` [C, H, W], ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``) plus
            ``image_mode`` (the PIL mode images are converted to first: ``L`` or ``RGB``); see
            :func:`vitopt.arch.config.set_preprocessing`.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    name: str
    num_workers: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    augment: Any = None
    skipped: Any = None
    check: DataCheck | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def skipped_images(self) -> int:
        """Unreadable images skipped so far (0 without ``skip_corrupt``)."""
        return sum(c.count for c in self.skipped) if self.skipped is not None else 0


def _load_digits(cfg: Any, mi: ModelInput, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    vf = getattr(cfg, "val_fraction", None)
    val_fraction = 0.2 if vf is None else float(vf)
    if not 0.0 < val_fraction < 1.0:
        raise VitoptError(f"data.val_fraction must be between 0 and 1 (exclusive); got {val_fraction}.")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr_idx, va_idx = train_test_split(idx, test_size=val_fraction, stratify=y, random_state=seed)
    tr_idx, va_idx = np.sort(tr_idx), np.sort(va_idx)
    xm = to_model_input(x, mi)
    yt = torch.from_numpy(y)
    names = [str(i) for i in range(10)]
    return DataBundle(
        train=TensorDataset(xm[tr_idx], yt[tr_idx]),
        val=TensorDataset(xm[va_idx], yt[va_idx]),
        num_classes=10,
        class_names=names,
        name="digits",
        meta={"train_indices": tr_idx, "val_indices": va_idx},
        check=DataCheck("digits", names, {"train": len(tr_idx), "val": len(va_idx)}, gray=True, image_side=8,
                        image_size=(8, 8)),
        preprocessing=_preprocessing(mi, 1.0),
    )


def _preprocessing(mi: ModelInput, crop_pct: float) -> dict[str, Any]:
    """The eval preprocessing record of :attr:`DataBundle.preprocessing`."""
    return {"input_size": [mi.in_chans, *mi.img_size], "interpolation": EVAL_INTERPOLATION, "mean": list(mi.mean),
            "std": list(mi.std), "crop_pct": float(crop_pct), "crop_mode": EVAL_CROP_MODE, "image_mode": image_mode(mi)}


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(p: str | Path) -> bool:
    p = Path(p)
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _imagefolder_layout(raw_root: Any) -> tuple[Path, dict[str, list[tuple[str, int]]], list[str]]:
    """Check an ImageNet-layout folder and index it: ``(root, split -> [(file, label)], class names)``.

    Raises:
        VitoptError: no root, a missing split, a split without class folders, a class folder without image
            files, or train and val class lists that differ.
    """
    from torchvision.datasets import ImageFolder

    if raw_root is None:
        raise VitoptError("data.root is required for an imagefolder dataset (a folder holding train/ and val/).")
    root = Path(raw_root).expanduser()
    if not root.is_dir():
        raise VitoptError(f"data.root {root} does not exist or is not a folder; point it at a folder holding train/ and val/.")
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        sd = root / split
        if not sd.is_dir():
            raise VitoptError(
                f"data.root {root} has no {split}/ subfolder; the layout is {root}/train/<class>/*.png and {root}/val/<class>/*.png."
            )
        names = _class_dirs(sd)
        if not names:
            raise VitoptError(f"{sd} has no class subfolders; put images in {sd}/<class>/ (ImageNet layout).")
        for n in names:
            if not any(_is_image(p) for p in (sd / n).rglob("*")):
                raise VitoptError(
                    f"{sd / n} contains no images; allowed suffixes are {', '.join(IMAGE_EXTENSIONS)}."
                )
        classes[split] = names
    if classes["train"] != classes["val"]:
        only_t = sorted(set(classes["train"]) - set(classes["val"]))
        only_v = sorted(set(classes["val"]) - set(classes["train"]))
        raise VitoptError(
            f"the class folders of {root / 'train'} and {root / 'val'} differ "
            f"(only in train: {only_t or 'none'}; only in val: {only_v or 'none'}); both must list the same classes."
        )
    try:
        index = {split: ImageFolder(str(root / split), is_valid_file=_is_image).samples for split in ("train", "val")}
    except (FileNotFoundError, OSError) as e:  # pragma: no cover - guarded by the checks above
        raise VitoptError(f"cannot read the image folders under {root}: {e}.") from e
    return root, index, classes["train"]


def _open_header(path: str) -> tuple[tuple[int, int], str] | str:
    """``((width, height), PIL mode)`` from the file's header, or why PIL cannot open it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return tuple(im.size), im.mode
    except (OSError, ValueError, SyntaxError, EOFError) as exc:   # UnidentifiedImageError is an OSError
        return f"{type(exc).__name__}: {exc}"


def _check_images(root: Path, samples: dict[str, list[tuple[str, int]]], classes: list[str], how: str,
                  skip_corrupt: bool) -> tuple[dict[str, list[tuple[str, int]]], DataCheck]:
    """Open image headers (every file of a split with ``how="all"``, of val with ``"val"``, else until one per
    class opens); returns the samples to use (unreadable ones left out) and the :class:`DataCheck`.

    Raises:
        VitoptError: a class folder where no file opens, or unreadable files without ``skip_corrupt``.
    """
    t0 = time.perf_counter()
    unreadable: list[tuple[str, str]] = []
    sizes: list[tuple[int, int]] = []
    gray: list[bool] = []
    kept: dict[str, list[tuple[str, int]]] = {}
    for split, items in samples.items():
        full = how == "all" or (how == "val" and split == "val")
        readable: set[int] = set()
        keep = []
        for path, label in items:
            if not full and label in readable:
                keep.append((path, label))
                continue
            got = _open_header(path)
            if isinstance(got, str):
                unreadable.append((path, got))
                continue
            readable.add(label)
            sizes.append(got[0])
            gray.append(got[1] in GRAY_MODES)
            keep.append((path, label))
        missing = [c for c in range(len(classes)) if c not in readable]
        if missing:
            folder = root / split / classes[missing[0]]
            bad = next((f"{p} ({why})" for p, why in unreadable if Path(p).parent == folder), "")
            raise VitoptError(f"{folder} has no image PIL can open (e.g. {bad}); add readable images to it or remove "
                              f"the class folder from train/ and val/.")
        kept[split] = keep
    checked = len(sizes) + len(unreadable)
    if unreadable and not skip_corrupt:
        path, why = unreadable[0]
        raise VitoptError(f"{len(unreadable)} of the {checked} image files opened under {root} cannot be read as "
                          f"images (first: {path}: {why}); replace or delete them, or set data.skip_corrupt: true "
                          "to leave them out.")
    size = Counter(sizes).most_common(1)[0][0] if sizes else None
    check = DataCheck(root.name or str(root), list(classes), {k: len(v) for k, v in kept.items()},
                      unreadable=[p for p, _ in unreadable], checked=checked, gray=bool(gray) and all(gray),
                      image_side=int(statistics.median(min(s) for s in sizes)) if sizes else None,
                      image_size=size, seconds=time.perf_counter() - t0)
    return kept, check


def _load_imagefolder(cfg: Any, mi: ModelInput) -> DataBundle:
    root, samples, classes = _imagefolder_layout(getattr(cfg, "root", None))
    skip = bool(getattr(cfg, "skip_corrupt", False))
    samples, check = _check_images(root, samples, classes, getattr(cfg, "check_images", None) or "all", skip)
    augment = resolve_augment(getattr(cfg, "augment", None), mi, gray=check.gray, image_side=check.image_side)
    train_tf, val_tf = make_transforms(mi, augment)
    train_skips, val_skips = SkipCounter(len(samples["train"])), SkipCounter(len(samples["val"]))
    return DataBundle(
        train=ImageFiles(samples["train"], train_tf, skip, train_skips),
        val=ImageFiles(samples["val"], val_tf, skip, val_skips),
        num_classes=len(classes),
        class_names=list(classes),
        name=check.name,
        num_workers=int(getattr(cfg, "num_workers", 0) or 0),
        meta={"root": str(root)},
        augment=augment,
        skipped=(train_skips, val_skips),
        check=check,
        preprocessing=_preprocessing(mi, augment.crop_pct if augment is not None else 1.0),
    )


def _load_cifar(cfg: Any, mi: ModelInput) -> DataBundle:
    raw_root = getattr(cfg, "root", None)
    if raw_root is None:
        raise VitoptError(f"data.root is required for a {cfg.type} dataset (the folder holding the python batches).")
    xtr, ytr, xte, yte, names = read_cifar(cfg.type, Path(raw_root))
    augment = resolve_augment(getattr(cfg, "augment", None), mi, gray=False, image_side=32)
    train_tf, val_tf = make_transforms(mi, augment)
    return DataBundle(
        train=ArrayImages(xtr, ytr, train_tf),
        val=ArrayImages(xte, yte, val_tf),
        num_classes=len(names),
        class_names=names,
        name=cfg.type,
        num_workers=int(getattr(cfg, "num_workers", 0) or 0),
        meta={"root": str(raw_root)},
        augment=augment,
        check=DataCheck(cfg.type, names, {"train": len(ytr), "val": len(yte)}, image_side=32, image_size=(32, 32)),
        preprocessing=_preprocessing(mi, augment.crop_pct if augment is not None else 1.0),
    )


def load_data(cfg: Any, mi: ModelInput, seed: int) -> DataBundle:
    """Load a dataset as model-ready train/val sets.

    Args:
        cfg: an object with ``.type``:
            ``"digits"``: scikit-learn ``load_digits`` (1,797 8x8 gray images, pixel values 0..16
            scaled to [0, 1]), split with ``train_test_split(stratify=y, random_state=seed,
            test_size=cfg.val_fraction)`` (default 0.2 -> 1,437 train / 360 val), preprocessed once
            into in-memory ``TensorDataset`` s.
            ``"imagefolder"``: ``cfg.root/train/<class>/*`` and ``cfg.root/val/<class>/*`` (ImageNet
            layout) indexed with torchvision ``ImageFolder``. Before anything is trained, the header of
            every image file (``cfg.check_images: "all"``; ``"val"``: every val file, train files until one
            per class opens; ``"one_per_class"``) is opened with PIL: a class folder where none opens is an
            error; other unreadable files are an error naming the first, or with ``cfg.skip_corrupt`` are
            left out and listed in :attr:`DataBundle.check`. Each file is decoded by PIL when loaded
            (:class:`~vitopt.train.images.ImageFiles`: a file broken after its header raises with its
            name, or is skipped and counted with ``cfg.skip_corrupt``). With ``cfg.augment`` the transforms come
            from timm's factory (train: RandomResizedCrop, flip, RandAugment, random erasing; eval:
            resize + center crop, model mean/std), its ``"auto"`` settings resolved for the images found
            (:func:`~vitopt.train.images.resolve_augment`); without it, each image is converted to RGB, scaled
            to [0, 1] and passed through :func:`to_model_input`. ``cfg.num_workers`` is kept in
            :attr:`DataBundle.num_workers` for :func:`make_loader`.
            ``"cifar10"`` / ``"cifar100"``: the python-pickle batches under ``cfg.root``
            (:func:`~vitopt.train.images.read_cifar`; 50,000 train / 10,000 test = val images), same
            transforms as imagefolder.
        mi: the model's input (:func:`model_input`).
        seed: split seed (digits); the same seed gives the same split.

    Returns:
        :class:`DataBundle`.

    Raises:
        VitoptError: unknown type; bad val_fraction; CIFAR files missing or corrupt; imagefolder
            root missing, no train/ or val/ subfolder, a split without class folders, a class folder without images
            (or none PIL can open), train and val class lists that differ, or unreadable image files without
            ``skip_corrupt``.
    """
    kind = getattr(cfg, "type", None)
    if kind == "digits":
        return _load_digits(cfg, mi, seed)
    if kind == "imagefolder":
        return _load_imagefolder(cfg, mi)
    if kind in ("cifar10", "cifar100"):
        return _load_cifar(cfg, mi)
    raise VitoptError(f"unknown data type {kind!r}; allowed types are 'digits', 'imagefolder', 'cifar10' and "
                      "'cifar100'.")


def val_arrays(bundle: DataBundle, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The validation set as NumPy arrays, for runtimes outside PyTorch (ONNX Runtime, TensorRT).

    Returns:
        ``(images, labels)``: float32 [N, C, H, W] (already normalized, model-ready) and int64 [N].
    """
    ds = bundle.val
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors[0], ds.tensors[1]
        return x.numpy().astype(np.float32, copy=True), y.numpy().astype(np.int64, copy=True)
    xs, ys = [], []
    for xb, yb in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=bundle.num_workers):
        xs.append(xb.numpy())
        ys.append(np.asarray(yb))
    return np.concatenate(xs).astype(np.float32, copy=False), np.concatenate(ys).astype(np.int64, copy=False)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose order also advances when nobody calls ``set_epoch``.

    Epoch ``e`` of rank ``r`` of ``W`` is ``randperm(N, seed + e)`` (wrapped to a multiple of ``W``)
    taken at positions ``r, r + W, r + 2W, ...``; so the ``k``-th per-rank batches of all ranks together
    hold exactly the samples of the ``k``-th batch of a single process (``W = 1``) with the global batch
    size: a torchrun job sees the same global batches as one process. :func:`~vitopt.train.loop.fit`
    calls ``set_epoch(e)`` before every epoch (so a resumed run reproduces the order); iterating
    without it moves to the next epoch after each pass.
    """

    def __iter__(self):
        it = super().__iter__()
        self.epoch += 1
        return it


class ShardSampler(Sampler[int]):
    """Contiguous, unpadded shard ``r`` of ``W`` of ``range(n)`` for evaluation (no sample twice).

    Rank ``r`` gets ``range(r * n // W, (r + 1) * n // W)``; summing counts over ranks gives exactly
    the single-process result (``DistributedSampler`` would pad with repeats).
    """

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        self.lo, self.hi = rank * n // num_replicas, (rank + 1) * n // num_replicas

    def __iter__(self):
        return iter(range(self.lo, self.hi))

    def __len__(self) -> int:
        return self.hi - self.lo


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose order and worker seeds are a function of ``seed`` (and the epoch) alone.

    Training (``shuffle=True``) uses an :class:`EpochSampler` (a ``DistributedSampler`` with ``seed``)
    in every process, 1 replica without torch.distributed and ``WORLD_SIZE`` replicas under torchrun;
    each rank then loads ``batch_size / WORLD_SIZE`` images per step, so the global batch equals a
    single-process run's. Evaluation (``shuffle=False``) reads in order, sharded without padding by
    :class:`ShardSampler` across ranks. Workers are not persistent: each epoch's workers are seeded
    from the loader's generator, which :func:`~vitopt.train.loop.fit` reseeds per epoch, so a resumed
    run gets the same augmentation randomness. Pinned memory is used when CUDA is available.

    Args:
        dataset: any map-style dataset.
        batch_size: global samples per batch (> 0, divisible by the number of ranks).
        shuffle: reshuffle every epoch.
        seed: sampler and generator seed.
        num_workers: worker processes per rank (0 = load in the main process).
        drop_last: drop the last incomplete batch.

    Raises:
        VitoptError: ``batch_size`` < 1, or not divisible by the number of ranks.
    """
    if batch_size < 1:
        raise VitoptError(f"batch_size must be at least 1; got {batch_size}.")
    ws, r = world_size(), rank()
    if batch_size % ws:
        raise VitoptError(f"batch_size {batch_size} is not divisible by the {ws} distributed processes; "
                          f"use a multiple of {ws} (each process loads batch_size / {ws} images).")
    if shuffle:
        sampler: Sampler | None = EpochSampler(dataset, num_replicas=ws, rank=r, shuffle=True, seed=int(seed))
    else:
        sampler = ShardSampler(len(dataset), ws, r) if ws > 1 else None
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size // ws,
        sampler=sampler,
        generator=g,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
