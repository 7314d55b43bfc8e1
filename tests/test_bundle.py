"""`vitopt deploy bundle` and the standalone Jetson kit script (its non-TensorRT parts run here)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from vitopt.cli import app
from vitopt.deploy import OrtRuntime, evaluate_runtime
from vitopt.deploy.bundle import KIT_DIR
from vitopt.errors import VitoptError
from vitopt.rundir import bundle as write_bundle

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = KIT_DIR / "vitopt_jetson.py"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None

RECIPE = """name: b
seed: 1
output_dir: {out}
model: {{name: deit_tiny_patch16_224, kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 2,
        num_heads: 2}}}}
data: {{type: digits}}
stages:
  - {{type: train, epochs: 2, batch_size: 128, lr: 3.0e-3}}
  - {{type: export, simplify: false}}
  - {{type: validate, batch_sizes: [1, 4], warmup: 1, repeats: 3, threads: 1}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from vitopt.pipeline import run_recipe
    from vitopt.recipe import load_recipe

    out = tmp_path_factory.mktemp("runs")
    (out / "b.yaml").write_text(RECIPE.format(out=out))
    return run_recipe(load_recipe(out / "b.yaml"))


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("vitopt_jetson", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _val(run: Path):
    from vitopt.arch.config import load_pruned
    from vitopt.recipe import load_recipe
    from vitopt.train.data import load_data, model_input, val_arrays

    r = load_recipe(run / "recipe.yaml")
    data = load_data(r.data, model_input(load_pruned(run / "00_train" / "model")), r.seed)
    return val_arrays(data)


def test_bundle_contents(run, tmp_path):
    out = tmp_path / "b"
    m = write_bundle(run, "orin-agx", out, samples=100)
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "sample.npz", "labels.txt", "bundle.json", "vitopt_jetson.py", "README.md",
            "requirements.txt", "build_orin-agx_fp16.sh"} <= names
    assert "cuda-python~=12.6" in (out / "requirements.txt").read_text().split()      # JetPack 6: CUDA 12.6
    assert (out / "model.onnx").read_bytes() == (run / "01_export" / "model.onnx").read_bytes()
    assert (out / "vitopt_jetson.py").read_bytes() == (KIT_DIR / "vitopt_jetson.py").read_bytes()
    images, labels = _val(run)
    with np.load(out / "sample.npz") as z:
        assert z["images"].dtype == np.float32 and z["labels"].dtype == np.int64
        assert np.array_equal(z["images"], images[:100]) and np.array_equal(z["labels"], labels[:100])
    assert (out / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest == {k: v for k, v in m.items() if k != "path"}
    # orin-agx: TensorRT 10 (JetPack 6), fp16 by builder flag from the fp32 graph; no int8 without a Q/DQ model
    assert manifest["default_precision"] == "fp16" and set(manifest["builds"]) == {"fp16", "bf16", "fp32"}
    fp16 = manifest["builds"]["fp16"]
    assert fp16["config"]["trt_major"] == 10 and fp16["config"]["builder_flags"] == ["FP16"]
    assert fp16["config"]["profile"] == [1, 8, 32] and fp16["config"]["input_chw"] == [1, 8, 8]
    cmd = shlex.split((out / "build_orin-agx_fp16.sh").read_text().splitlines()[-1])
    assert cmd == shlex.split(fp16["trtexec"]) and "--fp16" in cmd and "--onnx=model.onnx" in cmd
    # the host's numbers are the run's validate stage: its ONNX Runtime top-1 of this ONNX on these images
    ort = OrtRuntime(run / "01_export" / "model.onnx", threads=1)
    try:
        ort_top1 = evaluate_runtime(ort, images, labels)["top1"]
    finally:
        ort.close()
    assert manifest["host"]["final"]["runtimes"]["onnxruntime"]["top1"] == pytest.approx(ort_top1, abs=1e-9)
    assert manifest["target_profile"]["dla_cores"] == 2


def _qdq_copy(src: Path, dst: Path) -> None:
    """The fp32 graph with one Q/DQ pair on its input (enough for the bundle to see a Q/DQ model)."""
    m = onnx.load(str(src))
    g = m.graph
    name = g.input[0].name
    for node in g.node:
        node.input[:] = ["x_dq" if i == name else i for i in node.input]
    g.initializer.extend([helper.make_tensor("x_s", TensorProto.FLOAT, [], [0.05]),
                          helper.make_tensor("x_z", TensorProto.INT8, [], [0])])
    g.node.insert(0, helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]))
    g.node.insert(0, helper.make_node("QuantizeLinear", [name, "x_s", "x_z"], ["x_q"]))
    onnx.save(m, str(dst))


def test_bundle_includes_the_qdq_variant(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "09_quantize").mkdir()
    _qdq_copy(copy / "01_export" / "model.onnx", copy / "09_quantize" / "model_int8.onnx")
    m = write_bundle(copy, "orin-nano", tmp_path / "b", samples=10)
    assert m["builds"]["int8"]["onnx"] == "model_int8.onnx" and (tmp_path / "b" / "model_int8.onnx").is_file()
    assert m["builds"]["int8"]["config"]["builder_flags"] == ["INT8", "FP16"]
    assert "--int8" in (tmp_path / "b" / "build_orin-nano_int8.sh").read_text()


def test_kit_script_measures_with_onnxruntime_and_writes_results(run, tmp_path):
    from vitopt.deploy.accuracy import evaluate_runtime
    from vitopt.deploy.runtimes import make_runtime

    out = tmp_path / "b"
    write_bundle(run, "orin-nx", out, samples=64)
    res = subprocess.run([sys.executable, str(out / "vitopt_jetson.py"), "--runtime", "onnxruntime", "--threads", "1",
                          "--warmup", "1", "--repeats", "5", "--batch-sizes", "1,4"], capture_output=True, text=True,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["format"] == "vitopt-jetson-results/1" and r["target"] == "orin-nx" and r["precision"] == "fp32"
    with np.load(out / "sample.npz") as z:
        ref = evaluate_runtime(make_runtime("onnxruntime", onnx_path=out / "model.onnx", threads=1), z["images"],
                               z["labels"])
    assert r["top1"] == pytest.approx(ref["top1"]) and r["num_images"] == 64
    assert set(r["latency"]) == {"1", "4"}
    for s in r["latency"].values():
        assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"] and s["repeats"] == 5


def test_kit_pure_parts(kit, tmp_path):
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert kit.top1(logits, np.array([1, 0, 0, 0])) == 75.0
    s = kit.latency_stats(np.arange(1, 101) / 1e3, batch=4)                    # 1..100 ms
    assert s["p50_ms"] == pytest.approx(50.5) and s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01) and s["throughput_img_s"] == pytest.approx(4 / 0.0505)
    images = np.random.default_rng(0).standard_normal((10, 1, 2, 2)).astype(np.float32)
    labels = np.arange(10) % 4
    acc, out = kit.evaluate(lambda x: x.reshape(len(x), 4), images, labels, batch=3)
    assert out.shape == (10, 4) and acc == pytest.approx(100 * np.mean(images.reshape(10, 4).argmax(1) == labels))
    path = kit.write_results(tmp_path / "r" / "results.json", {"top1": acc})
    assert json.loads(path.read_text()) == {"top1": acc} and not list(path.parent.glob(".results-*"))
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    x, y = kit.load_sample(tmp_path / "s.npz")
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    with pytest.raises(SystemExit, match="does not exist"):
        kit.load_manifest(tmp_path)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the script would build an engine")
def test_kit_without_tensorrt_says_what_to_install(run, kit, tmp_path):
    write_bundle(run, "orin-agx", tmp_path / "b", samples=8)
    with pytest.raises(SystemExit, match="python3-libnvinfer"):
        kit.main(["--bundle", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="precision 'int8' is not in this bundle"):
        kit.main(["--bundle", str(tmp_path / "b"), "--precision", "int8"])


def test_bad_requests(run, tmp_path):
    with pytest.raises(VitoptError, match="unknown target 'jetson-tx2'"):
        write_bundle(run, "jetson-tx2", tmp_path / "x")
    with pytest.raises(VitoptError, match="cannot be built at int8"):
        write_bundle(run, "orin-agx", tmp_path / "x", precision="int8")
    with pytest.raises(VitoptError, match="not a run directory"):
        write_bundle(run / "01_export", "orin-agx", tmp_path / "x")
    with pytest.raises(VitoptError, match="does not exist"):
        write_bundle(tmp_path / "nope", "orin-agx")
    res = CliRunner().invoke(app, ["deploy", "bundle", str(run), "--target", "orin-agx", "--out", str(tmp_path / "c"),
                                   "--samples", "4"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "c" / "bundle.json").read_text())["num_images"] == 4


# ------------------------------------------------------------------------------------ the kit's TensorRT parts (issue 15)
def _runner(kit, trt, tmp_path, monkeypatch):
    """A TrtRunner on the API stand-in; its CUDA helper is made by the runner itself (kit._cuda)."""
    from fake_tensorrt import KitCuda

    engine = tmp_path / "e.engine"
    engine.write_bytes(b"e")

    def make_cuda():
        trt.memory = KitCuda(trt)
        return trt.memory

    monkeypatch.setattr(kit, "_cuda", make_cuda)
    return kit.TrtRunner(engine, trt=trt)


def test_kit_parses_dla_core_and_moves_the_build_to_dla(kit):
    args = kit.parse_args(["--dla-core", "1", "--dla-min-fraction", "0.25"])
    assert args.dla_core == 1 and args.dla_min_fraction == 0.25
    assert kit.parse_args([]).dla_core is None
    cfg = {"precision": "fp16", "profile": [1, 8, 32], "builder_flags": ["FP16"], "dla_core": None}
    dla = kit.dla_build(cfg, 1)
    assert dla["profile"] == [8, 8, 8] and dla["builder_flags"] == ["FP16", "GPU_FALLBACK"] and dla["dla_core"] == 1
    with pytest.raises(SystemExit, match="DLA runs fp16 and int8 only"):
        kit.dla_build({**cfg, "precision": "fp32"}, 0)
    assert kit.plan_batches([1, 8, 32, 64], (1, 8, 32)) == [1, 8, 32]
    assert kit.plan_batches([1, 32], (8, 8, 8)) == [8]


def test_kit_runner_context_before_engine_and_checked_calls(kit, tmp_path, monkeypatch):
    from fake_tensorrt import FakeTrt

    trt = FakeTrt()
    run = _runner(kit, trt, tmp_path, monkeypatch)
    assert trt.order == ["cuda", "engine"]                           # pycuda's context exists first
    assert run.profile == (1, 4, 8) and trt.host_code_at_deserialize is True
    x = np.random.default_rng(0).standard_normal((3, 1, 2, 3)).astype(np.float32)
    assert np.array_equal(run(x), 2 * x.reshape(3, -1)[:, :4])
    with pytest.raises(SystemExit, match=r"batch 9 is above the engine's optimization profile \(max 8\)"):
        run(np.zeros((9, 1, 2, 3), np.float32))
    trt.fail_execute = True
    with pytest.raises(SystemExit, match="execute_async_v3 failed"):
        run(x)
    trt2 = FakeTrt()
    trt2.refuse_shapes = True
    with pytest.raises(SystemExit, match="refused batch 8"):
        _runner(kit, trt2, tmp_path, monkeypatch)


def test_kit_runner_pads_short_batches_of_a_static_profile(kit, tmp_path, monkeypatch):
    from fake_tensorrt import FakeTrt

    trt = FakeTrt()
    trt.static, trt.profile = True, (4, 4, 4)
    run = _runner(kit, trt, tmp_path, monkeypatch)
    x = np.random.default_rng(1).standard_normal((3, 1, 2, 3)).astype(np.float32)
    assert run.profile == (4, 4, 4) and np.array_equal(run(x), 2 * x.reshape(3, -1)[:, :4])
    assert trt.context.shape[0] == 4


def test_kit_build_refuses_a_mostly_gpu_dla_engine(kit, tmp_path, monkeypatch):
    from fake_tensorrt import FakeLayer, FakeTrt

    trt = FakeTrt(layers=[FakeLayer("conv", "CONVOLUTION", True), FakeLayer("ln", "NORMALIZATION", False),
                          FakeLayer("gelu", "UNARY", False)])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cfg = kit.dla_build({"precision": "fp16", "profile": [1, 8, 32], "builder_flags": ["FP16"], "strongly_typed": False,
                         "workspace_mib": 64, "opt_level": 3, "input_chw": [1, 8, 8], "input_name": "input"}, 0)
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"x")
    with pytest.raises(SystemExit, match="only 1 of 3 layers can run on DLA core 0"):
        kit.build_engine(onnx_path, tmp_path / "e.engine", cfg, tmp_path / "t.cache")
    assert trt.built == 0
    trt.drop_timing_cache = True                                      # get_timing_cache() -> None: no crash
    rec = kit.build_engine(onnx_path, tmp_path / "e.engine", cfg, tmp_path / "t.cache", dla_min_fraction=0.3)
    assert rec["dla_layers"] == {"on_dla": 1, "total": 3, "fraction": 0.3333}
    assert trt.config.profiles == [{"input": ((8, 1, 8, 8),) * 3}] and "GPU_FALLBACK" in trt.config.flags
    assert not (tmp_path / "t.cache").exists()


def test_kit_ships_in_the_wheel(tmp_path):
    """`vitopt deploy bundle` from a wheel install finds the kit (package data), not only from a checkout."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "vitopt", src / "vitopt", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "whl"), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("vitopt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    code = ("from vitopt.deploy.bundle import KIT_DIR, KIT_FILES; import sys; "
            "sys.exit(0 if all((KIT_DIR / f).is_file() for f in KIT_FILES) and 'site' in str(KIT_DIR) else 1)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
