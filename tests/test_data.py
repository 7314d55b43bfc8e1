"""Data pipelines on disk: CIFAR python batches, timm transforms, corrupt images, Mixup/CutMix."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vitopt.errors import VitoptError
from vitopt.recipe.schema import Augment
from vitopt.train.data import ModelInput, load_data, make_loader, val_arrays
from vitopt.train.images import make_mixup, make_transforms

MI3 = ModelInput(in_chans=3, img_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _cifar(root: Path, kind: str, n_per_batch: int = 4) -> tuple[np.ndarray, list[int]]:
    """Write a tiny CIFAR tree in the official python-pickle layout (py2-style bytes keys)."""
    rng = np.random.default_rng(0)
    if kind == "cifar10":
        folder, train, test, meta, lk, nk, k = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            ["test_batch"], "batches.meta", b"labels", b"label_names", 10
    else:
        folder, train, test, meta, lk, nk, k = root / "cifar-100-python", ["train"], ["test"], "meta", \
            b"fine_labels", b"fine_label_names", 100
    folder.mkdir(parents=True)
    all_data, all_labels = [], []
    for f in train + test:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, k, size=n_per_batch)]
        labels[0] = k - 1                                 # every class index up to k-1 appears
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": data, lk: labels, b"batch_label": b"x"}, fh, protocol=2)
        all_data.append(data)
        all_labels += labels
    with open(folder / meta, "wb") as fh:
        pickle.dump({nk: [f"c{i}".encode() for i in range(k)]}, fh, protocol=2)
    return np.concatenate(all_data), all_labels


@pytest.mark.parametrize("kind,n_train", [("cifar10", 20), ("cifar100", 4)])
def test_cifar_python_layout_reads_pixels_in_channel_planes(tmp_path, kind, n_train):
    data, labels = _cifar(tmp_path, kind)
    b = load_data(SimpleNamespace(type=kind, root=tmp_path, augment=None, num_workers=0), MI3, seed=0)
    assert len(b.train) == n_train and len(b.val) == 4
    assert b.num_classes == (10 if kind == "cifar10" else 100) and b.class_names[3] == "c3"
    xs, ys = val_arrays(b)
    assert xs.shape == (4, 3, 32, 32) and ys.tolist() == labels[n_train:]
    # CIFAR stores 1024 red, then 1024 green, then 1024 blue values, row-major
    raw = data[n_train:].reshape(4, 3, 32, 32).astype(np.float32) / 255.0
    assert np.allclose(xs, (raw - 0.5) / 0.25, atol=1e-5)
    # the root may also be the batches folder itself
    sub = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(load_data(SimpleNamespace(type=kind, root=sub, augment=None), MI3, seed=0).train) == n_train


def test_cifar_refuses_pickled_code_and_names_bad_files(tmp_path):
    _cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil()}, fh, protocol=2)
    with pytest.raises(VitoptError, match=r"data_batch_3 is corrupt or not a CIFAR python batch .*not allowed"):
        load_data(SimpleNamespace(type="cifar10", root=tmp_path), MI3, seed=0)
    assert not marker.exists()
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00(")          # truncated pickle
    with pytest.raises(VitoptError, match="data_batch_3 is corrupt"):
        load_data(SimpleNamespace(type="cifar10", root=tmp_path), MI3, seed=0)
    (folder / "data_batch_3").unlink()
    with pytest.raises(VitoptError, match="data_batch_3 does not exist"):
        load_data(SimpleNamespace(type="cifar10", root=tmp_path), MI3, seed=0)
    with pytest.raises(VitoptError, match="does not exist or is not a folder"):
        load_data(SimpleNamespace(type="cifar100", root=tmp_path / "none"), MI3, seed=0)


def _folder(root: Path, corrupt: int = 0) -> list[Path]:
    bad = []
    for split in ("train", "val"):
        for c, v in (("a", 40), ("b", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (v, v, v)).save(d / f"{i}.png")
    for i in range(corrupt):
        p = root / "train" / "a" / f"{i}.png"
        p.write_bytes(p.read_bytes()[:60])                # truncated PNG
        bad.append(p)
    return bad


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_fails_with_its_name(tmp_path, workers):
    bad = _folder(tmp_path, corrupt=1)
    b = load_data(SimpleNamespace(type="imagefolder", root=tmp_path, num_workers=workers, augment=None), MI3, seed=0)
    with pytest.raises(VitoptError) as ei:
        for _ in make_loader(b.train, 8, shuffle=True, seed=0, num_workers=workers):
            pass
    msg = str(ei.value)
    assert f"image {bad[0]} cannot be read" in msg and "skip_corrupt: true" in msg
    assert "Traceback" not in msg and "\n" not in msg     # also when re-raised from a worker process


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_corrupt_skips_and_counts(tmp_path, workers):
    _folder(tmp_path, corrupt=2)
    cfg = SimpleNamespace(type="imagefolder", root=tmp_path, num_workers=workers, augment=None, skip_corrupt=True)
    b = load_data(cfg, MI3, seed=0)
    xs = [x for x, _ in make_loader(b.train, 4, shuffle=False, seed=0, num_workers=workers)]
    assert sum(len(x) for x in xs) == 8                   # every sample index still yields an image
    assert b.skipped_images() == 2                        # counted across worker processes
    assert torch.isfinite(torch.cat(xs)).all()


def test_timm_transforms_train_random_eval_center_crop(tmp_path):
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (16, 16, 48, 48))          # white center, black border
    aug = Augment(crop_pct=0.5, re_prob=1.0)
    train_tf, val_tf = make_transforms(MI3, aug)
    v = val_tf(img)
    assert v.shape == (3, 32, 32)
    assert torch.allclose(v, torch.full_like(v, (1.0 - 0.5) / 0.25), atol=1e-4)   # only the center survives
    a, b = train_tf(img), train_tf(img)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)
    gray = ModelInput(in_chans=1, img_size=(16, 16), mean=(0.5,), std=(0.5,))
    assert make_transforms(gray, aug)[0](img).shape == (1, 16, 16)
    with pytest.raises(VitoptError, match="not a timm policy"):
        make_transforms(MI3, Augment(auto_augment="bogus-policy"))


def test_mixup_cutmix_soft_targets():
    torch.manual_seed(0)
    np.random.seed(0)
    assert make_mixup(Augment(), 10, 0.1) is None
    mix = make_mixup(Augment(mixup=0.8, cutmix=1.0), 10, 0.1)
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8)
    xm, t = mix(x.clone(), y)
    assert t.shape == (8, 10) and torch.allclose(t.sum(1), torch.ones(8))
    assert ((t > 0.06).sum(1) == 2).all()                 # each row mixes its own class with its partner's
    assert not torch.equal(xm, x)
