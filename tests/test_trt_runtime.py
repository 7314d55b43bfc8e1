"""The tensorrt runtime's own logic on a stand-in for the TensorRT API (buffers, profile limits, return
checks, current device), engine-only CUDA-event timing, and batch capping in validation."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from fake_tensorrt import FakeTrt, NumpyMemory

from vitopt.deploy.latency import measure_device_latency
from vitopt.deploy.runtimes import RUNTIMES, RuntimeSpec, make_runtime, register_runtime
from vitopt.deploy.runtimes.tensorrt import TrtRuntime, load_engine, profile_batches
from vitopt.deploy.validation import batch_plan, measure_runtimes
from vitopt.errors import VitoptError


@pytest.fixture()
def trt(monkeypatch):
    fake = FakeTrt()
    fake.memory = NumpyMemory()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


@pytest.fixture()
def engine_file(tmp_path):
    p = tmp_path / "m.engine"
    p.write_bytes(b"fake-engine")
    return p


def _x(b, seed=0):
    return np.random.default_rng(seed).standard_normal((b, 1, 2, 3)).astype(np.float32)


def test_runtime_runs_batches_inside_the_profile_from_preallocated_buffers(trt, engine_file):
    rt = TrtRuntime(engine_file, memory=trt.memory)
    assert rt.profile == (1, 4, 8) and rt.max_batch == 8
    dev_ids = {k: id(v) for k, v in rt._dev.items()}
    for b in (3, 8, 1):
        x = _x(b, seed=b)
        out = rt(x)
        assert out.dtype == np.float32 and out.shape == (b, 4)
        assert np.array_equal(out, 2 * x.reshape(b, -1)[:, :4])
    assert {k: id(v) for k, v in rt._dev.items()} == dev_ids          # no allocation per call
    assert rt._dev["input"].shape == (8, 1, 2, 3)                     # sized for the profile's max batch
    assert ("execute_async_v3", trt.memory.stream_handle) in trt.context.calls   # the runtime's own stream


def test_a_batch_outside_the_profile_is_one_sentence(trt, engine_file):
    rt = TrtRuntime(engine_file, memory=trt.memory)
    with pytest.raises(VitoptError, match=r"batch 9 is outside the optimization profile .* \(batches 1\.\.8\)"):
        rt(_x(9))
    with pytest.raises(VitoptError, match=r"expects a batch of shape \[B, 1, 2, 3\]"):
        rt(np.zeros((2, 3, 2, 1), np.float32))


def test_set_input_shape_false_is_an_error(trt, engine_file):
    trt.refuse_shapes = True
    with pytest.raises(VitoptError, match="TensorRT refused batch 8"):
        TrtRuntime(engine_file, memory=trt.memory)


def test_execute_async_v3_false_is_an_error_not_garbage(trt, engine_file):
    rt = TrtRuntime(engine_file, memory=trt.memory)
    trt.fail_execute = True
    with pytest.raises(VitoptError, match="execute_async_v3 failed"):
        rt(_x(2))


def test_every_tensorrt_call_runs_with_the_device_current(trt, engine_file):
    rt = TrtRuntime(engine_file, device=1, memory=trt.memory)        # the fakes assert memory.activate() is open
    rt(_x(2))
    assert trt.memory.active == 0


def test_engines_load_with_host_code_allowed_and_profiles_are_read(trt):
    runtime, engine = load_engine(trt, b"blob")
    assert trt.host_code_at_deserialize is True and runtime.engine_host_code_allowed
    assert profile_batches(engine, "input") == (1, 4, 8)
    trt.static = True
    trt.profile = (16, 16, 16)
    assert profile_batches(load_engine(trt, b"blob")[1], "input") == (16, 16, 16)


def test_unloadable_engine_and_ep_files(trt, engine_file, tmp_path):
    trt.refuse_engine = True
    with pytest.raises(VitoptError, match="could not deserialize"):
        TrtRuntime(engine_file, memory=trt.memory)
    ep = tmp_path / "m.ep"
    ep.write_bytes(b"x")
    with pytest.raises(VitoptError, match="Torch-TensorRT program.*'torch-tensorrt'"):
        TrtRuntime(ep, memory=trt.memory)


def test_device_latency_brackets_only_the_engine(trt, engine_file):
    """Events on the runtime's stream around launch() only: the fake copy costs 100 ms, the engine 5 ms."""
    rt = TrtRuntime(engine_file, memory=trt.memory)
    res = measure_device_latency(rt, (1, 2, 3), [2, 8], warmup=2, repeats=7)
    for b in (2, 8):
        assert res[b]["p50_ms"] == 5.0 and res[b]["max_ms"] == 5.0 and res[b]["repeats"] == 7
        assert res[b]["h2d_p50_ms"] == 100.0 and res[b]["timed"] == "device"
    launches = [c for c in trt.context.calls if c[0] == "execute_async_v3"]
    assert len(launches) == 2 * (2 + 7)
    with pytest.raises(VitoptError, match="outside the optimization profile"):
        measure_device_latency(rt, (1, 2, 3), [16], warmup=0, repeats=1)


# ------------------------------------------------------------------------------------ validation caps batches
class _ProfileRuntime:
    """A runtime that, like an engine, refuses batches outside ``profile`` and logs what it was called with."""

    name = "fake-engine"
    log: list[int] = []

    def __init__(self, profile):
        self.profile, self.max_batch = profile, profile[2]

    def __call__(self, x):
        if not self.profile[0] <= len(x) <= self.profile[2]:
            raise VitoptError(f"batch {len(x)} is outside the profile")
        _ProfileRuntime.log.append(len(x))
        return np.eye(10, dtype=np.float32)[x[:, 0, 0, 0].astype(int)]          # the label is in pixel 0

    def close(self):
        pass


@pytest.fixture()
def fake_kind():
    def make(profile):
        register_runtime(RuntimeSpec("fake-engine", "engine", False,
                                     lambda **kw: _ProfileRuntime(profile), "test"))
    yield make
    RUNTIMES.pop("fake-engine", None)


def test_validation_caps_evaluation_and_latency_at_the_profile(fake_kind, tmp_path):
    fake_kind((1, 16, 32))                                      # a Jetson-like profile: max 32
    _ProfileRuntime.log = []
    labels = np.arange(70) % 10
    images = np.zeros((70, 1, 2, 3), np.float32)
    images[:, 0, 0, 0] = labels
    res = measure_runtimes(["fake-engine"], images, labels, batch_sizes=[1, 32, 64], engine_path=tmp_path / "e",
                           warmup=0, repeats=2)
    r = res["runtimes"]["fake-engine"]
    assert r["top1"] == 100.0
    assert sorted(r["latency"]) == ["1", "32"] and max(_ProfileRuntime.log) == 32
    assert r["batches"] == {"profile": (1, 16, 32), "eval_batch": 32, "latency": [1, 32], "capped": True,
                            "requested": [1, 32, 64]}


def test_static_profile_pads_the_last_evaluation_batch(fake_kind, tmp_path):
    fake_kind((4, 4, 4))                                        # a fixed-batch or DLA engine
    _ProfileRuntime.log = []
    labels = np.arange(18) % 10
    images = np.zeros((18, 1, 2, 3), np.float32)
    images[:, 0, 0, 0] = labels
    res = measure_runtimes(["fake-engine"], images, labels, batch_sizes=[1, 32], engine_path=tmp_path / "e",
                           warmup=0, repeats=1)
    r = res["runtimes"]["fake-engine"]
    assert r["top1"] == 100.0 and set(_ProfileRuntime.log) == {4}          # 18 images: 4 full + 1 padded batch
    assert list(r["latency"]) == ["4"] and r["batches"]["eval_batch"] == 4


def test_batch_plan_leaves_unbounded_runtimes_alone():
    class Free:
        pass

    assert batch_plan(Free(), [1, 64]) == {"profile": None, "eval_batch": 64, "latency": [1, 64], "capped": False}
    bounded = type("B", (), {"max_batch": 16})()
    assert batch_plan(bounded, [1, 64])["latency"] == [1, 16]


def test_program_runtime_needs_its_artifact_and_package(monkeypatch, tmp_path):
    with pytest.raises(VitoptError, match="needs a Torch-TensorRT program"):
        make_runtime("torch-tensorrt")
    ep = tmp_path / "m.ep"
    ep.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(VitoptError, match=r"vitopt\[torch-tensorrt\]"):
        make_runtime("torch-tensorrt", program_path=ep)
    assert RUNTIMES["torch-tensorrt"].needs == "program" and RUNTIMES["tensorrt"].needs == "engine"


def test_summary_says_when_batches_were_capped_and_what_the_engine_timing_covers():
    from vitopt.report.summary import _compare_table

    stats = {"p50_ms": 1.0, "p90_ms": 1.5}
    val = {"final": {"params": 1e6, "flops": 2e6, "runtimes": {
        "tensorrt": {"top1": 90.0, "latency": {"1": {**stats, "h2d_p50_ms": 0.02}, "32": {**stats, "h2d_p50_ms": 0.5}},
                     "batches": {"profile": [1, 16, 32], "eval_batch": 32, "latency": [1, 32], "capped": True,
                                 "requested": [1, 32, 64]}},
        "pytorch": {"top1": 90.0, "latency": {"1": stats}, "batches": {"profile": None, "capped": False}}}}}
    text = _compare_table(val, None)
    assert ("tensorrt: its optimization profile takes batches 1..32, so latency was measured at 1, 32 (asked: 1, 32, "
            "64) and top-1 in batches of 32.") in text
    assert "host-to-device copy p50 is 0.020 ms at batch 1, 0.500 ms at batch 32" in text
    assert "pytorch: its optimization profile" not in text
