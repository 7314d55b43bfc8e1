"""A stand-in for the parts of the TensorRT Python API vitopt calls, so the logic around them runs on CPU.

Only names and call signatures follow the TensorRT 10.x Python API (Builder, INetworkDefinition,
OnnxParser, IBuilderConfig, Runtime, ICudaEngine, IExecutionContext, IEngineInspector); the objects
record what they were told and return what a test programs. Nothing here imitates TensorRT's
numerics beyond a trivial "engine" that doubles its input, which lets the runtime's buffer handling
be checked end to end. Install with ``monkeypatch.setitem(sys.modules, "tensorrt", FakeTrt(...))``.
"""

from __future__ import annotations

import enum
import json
import types

import numpy as np


class _Flag(enum.IntEnum):
    FP16 = 0
    BF16 = 1
    INT8 = 2
    FP8 = 3
    SPARSE_WEIGHTS = 4
    GPU_FALLBACK = 5
    VERSION_COMPATIBLE = 6


class FakeLayer:
    def __init__(self, name: str, kind: str, dla: bool) -> None:
        self.name = name
        self.type = types.SimpleNamespace(name=kind)
        self.dla = dla


class FakeNetwork:
    def __init__(self, layers: list[FakeLayer]) -> None:
        self.layers = layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data or b"new-cache"


class FakeConfig:
    def __init__(self, trt: FakeTrt) -> None:
        self.trt = trt
        self.flags: set = set()
        self.profiles: list = []
        self.profiling_verbosity = None
        self.default_device_type = None
        self.DLA_core = None
        self.timing_cache = None
        self.set_cache_calls: list[bytes] = []

    def set_memory_pool_limit(self, pool, size) -> None:
        self.workspace = size

    def set_flag(self, flag) -> None:
        self.flags.add(flag.name)

    def can_run_on_DLA(self, layer: FakeLayer) -> bool:
        return layer.dla

    def add_optimization_profile(self, profile) -> None:
        self.profiles.append(profile.shapes)

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(data)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.set_cache_calls.append(cache.data)
        ok = not (cache.data and cache.data != self.trt.cache_accepts)
        if ok:
            self.timing_cache = cache
        return ok

    def get_timing_cache(self):
        return None if self.trt.drop_timing_cache else self.timing_cache


class FakeProfile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, mn, opt, mx) -> None:
        self.shapes[name] = (mn, opt, mx)


class FakeBuilder:
    def __init__(self, trt: FakeTrt, logger) -> None:
        self.trt = trt

    def create_network(self, flags: int) -> FakeNetwork:
        self.trt.network_flags = flags
        return FakeNetwork(list(self.trt.layers))

    def create_builder_config(self) -> FakeConfig:
        self.trt.config = FakeConfig(self.trt)
        return self.trt.config

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network, config):
        self.trt.built += 1
        return b"fake-engine"


class FakeParser:
    def __init__(self, network, logger) -> None:
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        return True


class FakeInspector:
    def __init__(self, trt: FakeTrt) -> None:
        self.trt = trt

    def get_engine_information(self, fmt) -> str:
        return json.dumps(self.trt.layer_info)


class FakeContext:
    """Runs a trivial engine: ``logits = 2 * input.reshape(B, -1)[:, :classes]``."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shape = None
        self.addr: dict = {}
        self.calls: list = []

    def _active(self) -> None:
        mem = self.engine.trt.memory
        if mem is not None:
            assert mem.active > 0, "a TensorRT call ran outside memory.activate() (device not current)"

    def set_input_shape(self, name, shape) -> bool:
        self.calls.append(("set_input_shape", tuple(shape)))
        if self.engine.trt.refuse_shapes:
            return False
        lo, hi = self.engine.profile[0], self.engine.profile[2]
        if not lo <= shape[0] <= hi:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], self.engine.classes)

    def set_tensor_address(self, name, ptr) -> None:
        self.addr[name] = ptr

    def execute_async_v3(self, stream) -> bool:
        self._active()
        self.calls.append(("execute_async_v3", stream))
        mem = self.engine.trt.memory
        if self.engine.trt.fail_execute:
            return False
        b = self.shape[0]
        x = mem.read(self.addr["input"], (b, *self.engine.trt.chw))
        mem.write(self.addr["logits"], 2 * x.reshape(b, -1)[:, :self.engine.classes])
        mem.clock += mem.launch_ms
        return True


class FakeEngine:
    def __init__(self, trt: FakeTrt) -> None:
        self.trt = trt
        self.profile = trt.profile
        self.classes = trt.classes
        self.num_io_tensors = 2

    def get_tensor_name(self, i: int) -> str:
        return ["input", "logits"][i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == "input" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_shape(self, name):
        b = self.profile[0] if self.trt.static else -1
        return (b, *self.trt.chw) if name == "input" else (b, self.classes)

    def get_tensor_profile_shape(self, name, index):
        return [(b, *self.trt.chw) for b in self.profile]

    def create_execution_context(self) -> FakeContext:
        mem = self.trt.memory
        if mem is not None and not mem.active:
            raise AssertionError("execution context created outside memory.activate() (device not current)")
        self.trt.context = FakeContext(self)
        return self.trt.context

    def create_engine_inspector(self) -> FakeInspector:
        return FakeInspector(self.trt)


class FakeRuntime:
    def __init__(self, trt: FakeTrt, logger=None) -> None:
        self.trt = trt
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, blob: bytes):
        self.trt.order.append("engine")
        self.trt.host_code_at_deserialize = self.engine_host_code_allowed
        return None if self.trt.refuse_engine else FakeEngine(self.trt)


class FakeTrt(types.ModuleType):
    """``import tensorrt`` replacement; attributes are the knobs a test turns."""

    def __init__(self, version: str = "10.3.0.26", layers: list[FakeLayer] | None = None) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.layers = layers or [FakeLayer("conv", "CONVOLUTION", True)]
        self.cache_accepts = b""            # the only non-empty cache set_timing_cache accepts
        self.drop_timing_cache = False      # get_timing_cache() -> None
        self.refuse_shapes = False          # set_input_shape -> False
        self.fail_execute = False           # execute_async_v3 -> False
        self.refuse_engine = False          # deserialize -> None
        self.static = False
        self.profile = (1, 4, 8)
        self.chw = (1, 2, 3)
        self.classes = 4
        self.memory = None
        self.built = 0
        self.config = None
        self.context = None
        self.host_code_at_deserialize = None
        self.order: list[str] = []          # "cuda" / "engine" in the order they were created
        self.layer_info = {"Layers": [], "Bindings": ["input", "logits"]}
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=None: None})
        self.Builder = lambda logger: FakeBuilder(self, logger)
        self.OnnxParser = FakeParser
        self.Runtime = lambda logger=None: FakeRuntime(self, logger)
        self.BuilderFlag = _Flag
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
        self.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED", LAYER_NAMES_ONLY="NAMES")
        self.LayerInformationFormat = types.SimpleNamespace(JSON="JSON", ONELINE="ONELINE")
        self.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype)


class NumpyMemory:
    """The memory backend of TrtRuntime on host arrays; a fake clock stands in for CUDA events."""

    def __init__(self, stage_ms: float = 100.0, launch_ms: float = 5.0) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.active = 0
        self.stream_handle = 1234
        self.clock = 0.0
        self.stage_ms, self.launch_ms = stage_ms, launch_ms
        self.synced = 0

    def activate(self):
        mem = self

        class _Ctx:
            def __enter__(self):
                mem.active += 1

            def __exit__(self, *exc):
                mem.active -= 1

        return _Ctx()

    def device_buffer(self, shape, dtype):
        buf = np.zeros(shape, dtype=dtype)
        self.buffers[id(buf)] = buf
        return buf

    def host_buffer(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def address(buf) -> int:
        return id(buf)

    def h2d(self, dst, src, rows) -> None:
        assert self.active > 0
        dst[:rows] = src[:rows]
        self.clock += self.stage_ms

    def d2h(self, dst, src, rows) -> None:
        dst[:rows] = src[:rows]

    def read(self, addr, shape):
        """The leading elements of device buffer ``addr`` as an array of ``shape`` (what a kernel reads)."""
        return self.buffers[addr].reshape(-1)[:int(np.prod(shape))].reshape(shape).copy()

    def write(self, addr, arr) -> None:
        self.buffers[addr].reshape(-1)[:arr.size] = arr.ravel()

    def synchronize(self) -> None:
        self.synced += 1

    def event(self):
        mem = self

        class _Event:
            t = None

            def record(self):
                self.t = mem.clock

            def synchronize(self):
                pass

            def elapsed_ms(self, end):
                return end.t - self.t

        return _Event()


class KitCuda:
    """The kit's CUDA helper interface (``malloc``, ``htod``, ``dtoh``, ``sync``, ``handle``) on host arrays."""

    def __init__(self, trt: FakeTrt) -> None:
        trt.order.append("cuda")
        self.buffers: dict[int, np.ndarray] = {}
        self.active = 1
        self.clock = 0.0
        self.launch_ms = 0.0
        self.handle = 99

    def malloc(self, nbytes: int) -> int:
        key = len(self.buffers) + 1
        self.buffers[key] = np.zeros(nbytes // 4, np.float32)
        return key

    def htod(self, dst: int, arr: np.ndarray) -> None:
        self.buffers[dst][:arr.size] = arr.ravel()

    def dtoh(self, arr: np.ndarray, src: int) -> None:
        arr[...] = self.buffers[src][:arr.size].reshape(arr.shape)

    def sync(self) -> None:
        pass

    read = NumpyMemory.read
    write = NumpyMemory.write
