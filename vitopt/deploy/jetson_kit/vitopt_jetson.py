#!/usr/bin/env python3
"""Build a TensorRT engine from a vitopt bundle on the device, then measure top-1 and latency.

Needs only Python 3.8+, NumPy and TensorRT's Python API (JetPack: ``python3-libnvinfer``) with
cuda-python or pycuda for device buffers (``requirements.txt``: JetPack 6.x is CUDA 12.6 and Python
3.10, so ``cuda-python~=12.6``). ``--runtime onnxruntime`` runs the same measurement with ONNX Runtime
instead (for a host without TensorRT, or to compare). Writes ``results.json``, which ``vitopt report
RUN_DIR`` shows beside the host's numbers when copied into the run directory (any
``RUN_DIR/*/results.json`` or ``RUN_DIR/results.json``).

Usage (inside the bundle folder copied to the device)::

    python3 vitopt_jetson.py                      # fp16 engine, batch sizes from bundle.json
    python3 vitopt_jetson.py --precision int8     # the Q/DQ model (explicit quantization)
    python3 vitopt_jetson.py --dla-core 0         # on DLA core 0 with GPU fallback (static batch)

Method: the engine is built with the optimization profile, workspace and flags that ``vitopt``
derived for the target (bundle.json ``builds``); with ``--dla-core`` the profile becomes static
(min = opt = max, as DLA requires; TensorRT developer guide "Working with DLA") and the build refuses
an engine in which fewer than ``--dla-min-fraction`` of the layers can run on DLA (the rest would run
on the GPU under GPU fallback). Batches outside the engine's optimization profile are capped to it
(and said so in results.json); ``set_input_shape`` and ``execute_async_v3`` results are checked.
The CUDA context exists before the engine is deserialized. Top-1 is the argmax of the logits over the
bundled validation sample; latency is wall-clock per call (host->device copy, ``execute_async_v3``,
device->host copy, stream sync) after warm-up, with p50/p90/p99 by linear interpolation and
throughput = batch / p50. This file is standalone: it imports nothing from vitopt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMAT = "vitopt-jetson-results/1"


# ---------------------------------------------------------------------------------- pure parts
def load_manifest(bundle: Path) -> dict:
    """``bundle.json`` of a bundle folder (raises SystemExit with one sentence when missing)."""
    path = bundle / "bundle.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; run this script inside a folder written by "
                         "`vitopt deploy bundle` or pass --bundle.")
    return json.loads(path.read_text())


def load_sample(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 ``[N, C, H, W]`` (model-ready) and labels int64 ``[N]`` from the bundle's npz."""
    if not path.is_file():
        raise SystemExit(f"error: validation sample {path} does not exist.")
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["images"].astype(np.float32), z["labels"].astype(np.int64)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise SystemExit(f"error: {path}: images {images.shape} / labels {labels.shape} are not [N,C,H,W] / [N].")
    return images, labels


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent: share of rows whose argmax equals the label."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise ValueError(f"logits {logits.shape} do not match {len(labels)} labels")
    return 100.0 * float(np.mean(logits.argmax(axis=1) == labels))


def evaluate(infer, images: np.ndarray, labels: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Run ``infer`` over the sample in batches of ``batch``; returns (top-1 %, logits [N, classes])."""
    chunks = [np.asarray(infer(images[i:i + batch]), dtype=np.float32) for i in range(0, len(images), batch)]
    logits = np.concatenate(chunks)
    return top1(logits, labels), logits


def latency_stats(samples_s, batch: int) -> dict:
    """p50/p90/p99/mean/min/max in ms per call and throughput (images/s = batch / p50) of timed calls."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "throughput_img_s": batch / (p50 / 1e3) if p50 > 0 else float("inf"),
            "repeats": int(ms.size)}


def measure(infer, shape, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Latency of ``infer`` on a fixed standard-normal batch of ``shape`` ``(B, C, H, W)``."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        infer(x)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        infer(x)
        samples.append(time.perf_counter() - t0)
    return latency_stats(samples, shape[0])


def write_results(path: Path, results: dict) -> Path:
    """Write ``results`` as JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------- ONNX Runtime
class OrtRunner:
    """ONNX Runtime CPU session (``--runtime onnxruntime``)."""

    def __init__(self, onnx_path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name
        self.version = ort.__version__

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.name: np.ascontiguousarray(x, dtype=np.float32)})[0]


# ---------------------------------------------------------------------------------- TensorRT
def _trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise SystemExit("error: TensorRT's Python API is not importable; on Jetson install JetPack's "
                         "python3-libnvinfer (or use --runtime onnxruntime).") from None
    return trt


def dla_build(build: dict, core: int) -> dict:
    """The build settings of ``build`` (bundle.json ``builds[p]["config"]``) moved to DLA core ``core``.

    DLA runs FP16 and INT8 with static shapes: the profile becomes (opt, opt, opt) and GPU_FALLBACK is
    set (TensorRT developer guide, "Working with DLA").
    """
    if build["precision"] not in ("fp16", "int8"):
        raise SystemExit(f"error: DLA runs fp16 and int8 only, not {build['precision']}; pick --precision fp16.")
    opt = int(build["profile"][1])
    flags = [f for f in build["builder_flags"] if f != "VERSION_COMPATIBLE"]
    return {**build, "dla_core": int(core), "profile": [opt, opt, opt], "version_compatible": False,
            "builder_flags": flags + ([] if "GPU_FALLBACK" in flags else ["GPU_FALLBACK"])}


def build_engine(onnx_path: Path, engine_path: Path, build: dict, cache_path: Path,
                 dla_min_fraction: float = 0.5) -> dict:
    """Build an engine with the settings vitopt derived (``bundle.json`` ``builds[precision]["config"]``)."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if build["strongly_typed"] and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"error: TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build["workspace_mib"]) << 20)
    config.builder_optimization_level = int(build["opt_level"])
    for flag in build["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    record = {}
    if build.get("dla_core") is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(build["dla_core"])
        on_dla = sum(bool(config.can_run_on_DLA(network.get_layer(i))) for i in range(network.num_layers))
        fraction = on_dla / max(network.num_layers, 1)
        record["dla_layers"] = {"on_dla": on_dla, "total": network.num_layers, "fraction": round(fraction, 4)}
        if fraction < dla_min_fraction:
            raise SystemExit(f"error: only {on_dla} of {network.num_layers} layers can run on DLA core "
                             f"{build['dla_core']}; the engine would mostly time the GPU (lower --dla-min-fraction "
                             "to build it anyway).")
    profile = builder.create_optimization_profile()
    chw = tuple(build["input_chw"])
    profile.set_shape(build["input_name"], *((b, *chw) for b in build["profile"]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):   # a cache from another device: start empty
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if blob is None:
        raise SystemExit("error: TensorRT could not build the engine; see its log above.")
    engine_path.write_bytes(bytes(blob))
    saved = config.get_timing_cache()
    if saved is not None:
        cache_path.write_bytes(bytes(saved.serialize()))
    return {"build_seconds": round(seconds, 3), "tensorrt_version": trt.__version__, **record}


class _CudaPython:
    """Device memory and copies through cuda-python's runtime bindings."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6 layout
        self.rt = cudart
        self.stream = self._ok(cudart.cudaStreamCreate())

    def _ok(self, res):
        err, *rest = res
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if rest else None

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(nbytes)))

    def htod(self, dst: int, arr: np.ndarray) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def dtoh(self, arr: np.ndarray, src: int) -> None:
        self._ok(self.rt.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    @property
    def handle(self) -> int:
        return int(self.stream)


class _PyCuda:
    """Device memory and copies through pycuda."""

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda

        self.cuda = cuda
        self._stream = cuda.Stream()
        self._keep = []

    def malloc(self, nbytes: int) -> int:
        buf = self.cuda.mem_alloc(nbytes)
        self._keep.append(buf)
        return int(buf)

    def htod(self, dst: int, arr: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(dst, arr, self._stream)

    def dtoh(self, arr: np.ndarray, src: int) -> None:
        self.cuda.memcpy_dtoh_async(arr, src, self._stream)

    def sync(self) -> None:
        self._stream.synchronize()

    @property
    def handle(self) -> int:
        return self._stream.handle


def _cuda():
    for cls in (_CudaPython, _PyCuda):
        try:
            return cls()
        except ImportError:
            continue
    raise SystemExit("error: neither cuda-python nor pycuda is importable; `pip install -r requirements.txt` "
                     "(cuda-python~=12.6 on JetPack 6) or pycuda.")


def plan_batches(batch_sizes, profile) -> list:
    """Latency batch sizes clipped into the engine's ``(min, opt, max)`` profile, duplicates dropped."""
    lo, hi = int(profile[0]), int(profile[2])
    return list(dict.fromkeys(min(max(int(b), lo), hi) for b in batch_sizes))


class TrtRunner:
    """Run a serialized engine: buffers sized for the profile's largest batch, name-based I/O, ``execute_async_v3``.

    The CUDA helper (and with it pycuda's context) is created before the engine is deserialized, so the
    engine and its execution context live in that context. ``profile`` is the engine's ``(min, opt, max)``
    batch; a batch outside it, a refused ``set_input_shape`` or a failed ``execute_async_v3`` ends the
    script with one sentence instead of reading uninitialised memory. Short batches are padded to the
    profile's minimum (static DLA profiles) and the padding is dropped from the logits.
    """

    def __init__(self, engine_path: Path, trt=None, cuda=None) -> None:
        trt = trt or _trt()
        self.cuda = cuda or _cuda()                     # the CUDA context first, then the engine
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        runtime.engine_host_code_allowed = True         # version-compatible engines carry host code
        self._runtime = runtime
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise SystemExit(f"error: TensorRT could not load {engine_path} (built for another TensorRT or GPU?).")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output)))
        self.chw = tuple(int(d) for d in tuple(self.engine.get_tensor_shape(self.input))[1:])
        static = int(tuple(self.engine.get_tensor_shape(self.input))[0])
        self.profile = ((static,) * 3 if static > 0 else
                        tuple(int(tuple(s)[0]) for s in self.engine.get_tensor_profile_shape(self.input, 0)))
        self._shape(self.profile[2])
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        self.d_in = self.cuda.malloc(int(np.prod((self.profile[2], *self.chw))) * self.in_dtype.itemsize)
        self.d_out = self.cuda.malloc(int(np.prod(out_shape)) * self.out_dtype.itemsize)
        self.context.set_tensor_address(self.input, self.d_in)
        self.context.set_tensor_address(self.output, self.d_out)

    def _shape(self, batch: int) -> None:
        if not self.context.set_input_shape(self.input, (batch, *self.chw)):
            raise SystemExit(f"error: the engine refused batch {batch}; its optimization profile takes "
                             f"{self.profile[0]}..{self.profile[2]}.")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n > self.profile[2]:
            raise SystemExit(f"error: batch {n} is above the engine's optimization profile (max {self.profile[2]}).")
        if n < self.profile[0]:
            x = np.concatenate([x, np.repeat(x[-1:], self.profile[0] - n, axis=0)])
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        self._shape(len(x))
        out = np.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype)
        self.cuda.htod(self.d_in, x)
        if not self.context.execute_async_v3(self.cuda.handle):
            raise SystemExit("error: TensorRT's execute_async_v3 failed; see its log above.")
        self.cuda.dtoh(out, self.d_out)
        self.cuda.sync()
        return out[:n].astype(np.float32)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring); ``argv`` defaults to ``sys.argv[1:]``."""
    ap = argparse.ArgumentParser(description="Build and measure a vitopt bundle's model on this device.")
    ap.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent, help="bundle folder")
    ap.add_argument("--runtime", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    ap.add_argument("--precision", default=None, help="fp16 (default), int8, ... (a key of bundle.json builds)")
    ap.add_argument("--engine", type=Path, default=None, help="use this engine instead of building one")
    ap.add_argument("--dla-core", type=int, default=None, help="build for this DLA core with GPU fallback "
                                                                "(static batch: the profile's opt)")
    ap.add_argument("--dla-min-fraction", type=float, default=0.5, help="refuse a DLA engine with fewer layers "
                                                                        "on DLA than this fraction")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated; default bundle.json batch_sizes")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=4, help="ONNX Runtime CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="results file (default BUNDLE/results.json)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Build (TensorRT) or load (ONNX Runtime) the model, measure top-1 and latency, write results.json."""
    args = parse_args(argv)
    bundle = args.bundle
    manifest = load_manifest(bundle)
    precision = args.precision or manifest["default_precision"]
    if precision not in manifest["builds"]:
        raise SystemExit(f"error: precision {precision!r} is not in this bundle; available: "
                         f"{', '.join(manifest['builds'])}.")
    build = manifest["builds"][precision]
    onnx_path = bundle / build["onnx"]
    batch_sizes = ([int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
                   else [int(b) for b in manifest["batch_sizes"]])
    images, labels = load_sample(bundle / manifest["sample"])
    # ONNX Runtime runs the graph as stored: fp32 for model.onnx, the Q/DQ or fp16 graph otherwise.
    graph_precision = precision if args.runtime == "tensorrt" or build["onnx"] != "model.onnx" else "fp32"
    results = {"format": FORMAT, "target": manifest["target"], "precision": graph_precision, "runtime": args.runtime,
               "model": manifest.get("model"), "onnx": build["onnx"], "host": platform.node(),
               "machine": platform.machine(), "python": platform.python_version(), "num_images": int(len(labels)),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.runtime == "onnxruntime":
        runner = OrtRunner(onnx_path, args.threads)
        results.update(device=f"CPU, {args.threads} threads", onnxruntime_version=runner.version)
    else:
        config = build["config"] if args.dla_core is None else dla_build(build["config"], args.dla_core)
        suffix = "" if args.dla_core is None else f"_dla{args.dla_core}"
        engine = args.engine or bundle / f"{manifest['target']}_{precision}{suffix}.engine"
        if args.engine is None:
            results.update(build_engine(onnx_path, engine, config, bundle / "timing.cache", args.dla_min_fraction))
        results["engine"] = engine.name
        results["dla_core"] = args.dla_core
        runner = TrtRunner(engine)
        results["device"] = _device_name()
        results["profile"] = list(runner.profile)
        planned = plan_batches(batch_sizes, runner.profile)
        if planned != batch_sizes:
            results["batches_capped"] = {"requested": batch_sizes, "measured": planned}
            print(f"note: the engine's optimization profile takes batches {runner.profile[0]}..{runner.profile[2]}; "
                  f"measuring {planned} instead of {batch_sizes}")
        batch_sizes = planned
    eval_batch = min(max(batch_sizes), len(labels))
    results["top1"], _ = evaluate(runner, images, labels, eval_batch)
    chw = images.shape[1:]
    results["latency"] = {str(b): measure(runner, (b, *chw), args.warmup, args.repeats) for b in batch_sizes}
    out = args.out or bundle / "results.json"
    write_results(out, results)
    print(f"{manifest['target']} {precision} {args.runtime}: top-1 {results['top1']:.2f}% on {len(labels)} images; "
          + ", ".join(f"batch {b}: p50 {s['p50_ms']:.3f} ms" for b, s in results["latency"].items())
          + f" -> {out}")
    return results


def _device_name() -> str:
    model = Path("/proc/device-tree/model")
    if model.is_file():
        return model.read_text(errors="ignore").strip("\x00 \n")
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
