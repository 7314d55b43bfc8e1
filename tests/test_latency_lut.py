"""Latency lookup table (NViT / HALP): interpolation, monotone repair, files, measurement, allocation, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from vitopt.arch.config import resize_to, save_pruned
from vitopt.arch.cost import CostModel
from vitopt.arch.families import family_of
from vitopt.arch.latency_table import LatencyTable, cost_fn, grid_values, make_monotone
from vitopt.deploy.lut import measure_lut, measure_model_latency
from vitopt.errors import VitoptError
from vitopt.pruning.allocation import allocate_budget

TINY = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, mlp_ratio=4.0, num_classes=10)
SMALL = dict(img_size=32, patch_size=8, num_classes=5, depth=4, embed_dim=96, num_heads=6, mlp_ratio=4.0)


def _vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **kw).eval()


def _table(D, A, M, block, stem, *, depth=2, num_tokens=17, head_dim=16, **kw) -> LatencyTable:
    """Synthetic table (no timing): block(D, A, M) and stem(D) evaluated on the grid."""
    grid = [[[block(d, a, m) for m in M] for a in A] for d in D]
    return LatencyTable(runtime="synthetic", device="none", threads=1, batch_size=1, num_tokens=num_tokens,
                        depth=depth, head_dim=head_dim, embed_grid=list(D), attn_grid=list(A), mlp_grid=list(M),
                        block_ms=grid, stem_ms=[stem(d) for d in D], **kw)


def linear_block(d, a, m):
    return 0.3 + 0.011 * d + 0.007 * a + 0.002 * m


def linear_stem(d):
    return 0.5 + 0.004 * d


D_GRID, A_GRID, M_GRID = [16, 48, 64], [16, 32, 64], [32, 96, 128, 256]


def _dims(D, blocks):
    out = {"embed": D}
    for i, (h, hd, m) in enumerate(blocks):
        out.update({f"blocks.{i}.heads": h, f"blocks.{i}.head_dim": hd, f"blocks.{i}.mlp": m})
    return out


# ------------------------------------------------------------------------------------ interpolation
def test_grid_values():
    assert grid_values(384, 4, 8) == [96, 192, 288, 384]
    assert grid_values(384, 3, 64) == [128, 256, 384]
    assert grid_values(32, 2, 8) == [16, 32]
    assert grid_values(20, 4, 8) == [8, 16, 20]          # merged neighbours, last is the width itself
    assert grid_values(4, 3, 8) == [4]


def _random_block(rng, a_lo, a_hi, m_lo, m_hi):
    """(heads, head_dim, mlp) with a_lo <= heads * head_dim <= a_hi and m_lo <= mlp <= m_hi."""
    while True:
        h, hd = rng.randint(1, 6), rng.randint(1, 64)
        if a_lo <= h * hd <= a_hi:
            return h, hd, rng.randint(m_lo, m_hi)


def test_linear_function_is_reproduced_off_grid():
    tab = _table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem)
    rng = random.Random(0)
    for _ in range(300):
        D = rng.uniform(16, 64)
        blocks = [_random_block(rng, 16, 64, 32, 256) for _ in range(2)]
        want = linear_stem(D) + sum(linear_block(D, h * hd, m) for h, hd, m in blocks)
        assert tab.latency_ms(_dims(D, blocks)) == pytest.approx(want, abs=1e-9, rel=0)
    assert tab.block_latency_ms(40, 40, 100) == pytest.approx(linear_block(40, 40, 100), abs=1e-9, rel=0)
    assert tab.block_latency_ms(48, 32, 96) == pytest.approx(linear_block(48, 32, 96), abs=1e-9, rel=0)  # on grid


def test_clamping_outside_the_grid():
    tab = _table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem, depth=1)
    assert tab.block_latency_ms(1, 1, 1) == pytest.approx(linear_block(16, 16, 32), abs=1e-12)
    assert tab.block_latency_ms(10_000, 10_000, 10_000) == pytest.approx(linear_block(64, 64, 256), abs=1e-12)
    assert tab.block_latency_ms(8, 40, 1000) == pytest.approx(linear_block(16, 40, 256), abs=1e-12)
    assert tab.stem_latency_ms(4) == pytest.approx(linear_stem(16)) and tab.stem_latency_ms(99) == pytest.approx(
        linear_stem(64))
    below = tab.latency_ms(_dims(8, [(1, 8, 8)]))
    assert below == pytest.approx(linear_stem(16) + linear_block(16, 16, 32), abs=1e-12)


def test_mac_proportional_table_matches_cost_model_exactly():
    """A block's MACs are multilinear in (D, A, M) and the stem's linear in D: trilinear is exact."""
    model = _vit(**SMALL)
    fam = family_of(model)
    cm = CostModel(model)
    n = fam.num_tokens(model)
    conv = model.patch_embed.proj
    k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    D, A, M = grid_values(96, 3, 8), grid_values(96, 3, 16), grid_values(384, 3, 8)
    tab = _table(D, A, M, lambda d, a, m: 1e-6 * (n * d * 3 * a + 2 * n * n * a + n * a * d + 2 * n * d * m),
                 lambda d: 1e-6 * (model.patch_embed.num_patches * d * k + d * model.head.out_features),
                 depth=4, num_tokens=n, head_dim=16)
    cost = cost_fn(tab, model)
    rng = random.Random(1)
    for _ in range(100):
        blocks = [_random_block(rng, 32, 96, 128, 384) for _ in range(4)]
        dims = _dims(rng.randint(32, 96), blocks)
        assert cost(dims) == pytest.approx(1e-6 * cm.macs(dims), rel=1e-12)
    assert cost({}) == pytest.approx(1e-6 * cm.macs(cm.base_dims), rel=1e-12)


def test_monotone_repair_on_noisy_grid():
    rng = np.random.default_rng(0)
    D, A, M = np.meshgrid(np.arange(4), np.arange(3), np.arange(5), indexing="ij")
    clean = 1.0 + D + 0.5 * A + 0.25 * M
    noisy = clean + rng.normal(0, 0.8, clean.shape)
    assert any((np.diff(noisy, axis=ax) < 0).any() for ax in range(3))
    fixed = make_monotone(noisy)
    for ax in range(3):
        assert (np.diff(fixed, axis=ax) >= 0).all()
    assert (fixed >= noisy).all()
    np.testing.assert_array_equal(make_monotone(fixed), fixed)          # idempotent
    np.testing.assert_array_equal(make_monotone(clean), clean)          # monotone input unchanged
    assert make_monotone([3.0, 1.0, 2.0, 5.0]).tolist() == [3.0, 3.0, 3.0, 5.0]

    # the interpolated latency is then non-decreasing in every coordinate
    grids = ([8, 16, 24, 32], [16, 32, 48], [32, 64, 96, 128, 160])
    tab = LatencyTable(runtime="synthetic", device="none", threads=1, batch_size=1, num_tokens=5, depth=1,
                       head_dim=16, embed_grid=grids[0], attn_grid=grids[1], mlp_grid=grids[2],
                       block_ms=np.abs(fixed).tolist(), stem_ms=make_monotone(rng.uniform(0, 1, 4)).tolist())
    pyr = random.Random(0)
    for _ in range(500):
        p = [pyr.uniform(0, 40), pyr.uniform(0, 60), pyr.uniform(0, 200)]
        q = list(p)
        ax = pyr.randrange(3)
        q[ax] += pyr.uniform(0, 30)
        assert tab.block_latency_ms(*q) >= tab.block_latency_ms(*p) - 1e-12
        assert tab.stem_latency_ms(q[0]) >= tab.stem_latency_ms(p[0]) - 1e-12


# ------------------------------------------------------------------------------------ files, errors
def test_json_round_trip(tmp_path):
    tab = _table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem, model_name="vit_tiny_patch16_224",
                 model_kwargs={"img_size": 16}, model_dims=_dims(64, [(4, 16, 256), (4, 16, 256)]),
                 reference_ms=1.5, call_overhead_ms=0.01)
    path = tab.save(tmp_path / "sub" / "lut.json")
    back = LatencyTable.load(path)
    assert back == tab
    dims = _dims(40, [(2, 16, 100), (3, 12, 200)])
    assert back.latency_ms(dims) == tab.latency_ms(dims)
    assert back.predicted_model_ms == tab.predicted_model_ms
    assert json.loads(path.read_text())["format"] == "vitopt-latency-table"


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "something-else"}',
                                     "BAD_SHAPE", "BAD_VERSION", "NEGATIVE", "EXTRA_FIELD"])
def test_malformed_file_is_one_sentence(tmp_path, content):
    good = _table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem).to_json()
    if content == "BAD_SHAPE":
        content = json.dumps({**good, "block_ms": good["block_ms"][:2]})
    elif content == "BAD_VERSION":
        content = json.dumps({**good, "format_version": 99})
    elif content == "NEGATIVE":
        content = json.dumps({**good, "stem_ms": [-1.0, 0.0, 1.0]})
    elif content == "EXTRA_FIELD":
        content = json.dumps({**good, "surprise": 1})
    path = tmp_path / "lut.json"
    path.write_text(content)
    with pytest.raises(VitoptError) as err:
        LatencyTable.load(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(VitoptError, match="does not exist"):
        LatencyTable.load(tmp_path / "nope.json")


def test_mismatched_model_is_rejected():
    model = _vit(**TINY)  # 2 blocks, 17 tokens
    ok = _table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem, depth=2, num_tokens=17)
    assert cost_fn(ok, model)({}) > 0
    with pytest.raises(VitoptError, match="17 tokens"):
        cost_fn(_table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem, depth=2, num_tokens=65), model)
    with pytest.raises(VitoptError, match="2 blocks"):
        cost_fn(_table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem, depth=12, num_tokens=17), model)
    with pytest.raises(VitoptError, match="blocks.1.heads"):
        ok.latency_ms({"embed": 32, "blocks.0.heads": 2, "blocks.0.head_dim": 16, "blocks.0.mlp": 64})


def test_bad_settings():
    model = _vit(**TINY)
    with pytest.raises(VitoptError, match="grid_points"):
        measure_lut(model, grid_points=1, progress=False)
    with pytest.raises(VitoptError, match="known kinds"):
        measure_lut(model, runtime="tensorrt-nope", progress=False)
    with pytest.raises(VitoptError, match="exporter"):
        measure_lut(model, exporter="magic", progress=False)
    with pytest.raises(VitoptError, match="statistic"):
        measure_lut(model, statistic="max", progress=False)


# ------------------------------------------------------------------------------------ measuring
def _macs(module: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from vitopt.deploy.onnx_export import eager_attention

    with eager_attention(module), FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return fc.get_total_flops() // 2


def test_lut_prediction_is_exact_when_latency_is_affine_in_macs(monkeypatch):
    """The table's machinery (probes, null-probe overhead subtraction, stem/head, interpolation, sum over
    blocks) predicts a whole model exactly when every call costs ``c0 + c1 x MACs``: a fake clock,
    so this checks the arithmetic, not the machine. Prediction accuracy on real timings is a measurement,
    not a test: ``benchmarks/latency_aware.py`` records predicted vs interleaved-measured latency."""
    import vitopt.deploy.lut as lut_mod

    c0, c1 = 0.05, 1e-6                              # ms per call, ms per MAC

    def fake_measure_latency(rt, input_shape, batch_sizes, **_):
        (bs,) = batch_sizes
        ms = c0 + c1 * _macs(rt.model, torch.zeros(bs, *input_shape))
        return {bs: {"min_ms": ms, "p50_ms": ms, "mean_ms": ms}}

    monkeypatch.setattr(lut_mod, "measure_latency", fake_measure_latency)
    model = _vit(**SMALL)
    tab = measure_lut(model, runtime="pytorch", grid_points=2, warmup=0, repeats=1, threads=1, progress=False)
    assert tab.call_overhead_ms == pytest.approx(c0, rel=1e-12)
    whole = measure_model_latency(model, runtime="pytorch", warmup=0, repeats=1, threads=1)
    assert tab.predicted_model_ms == pytest.approx(whole, rel=1e-9)
    # off the grid points (inside the grid's range; outside it the table clamps): a pruned model with
    # different widths per block
    pruned = _vit(**SMALL)
    resize_to(pruned, {"embed": 56, "blocks.0.heads": 5, "blocks.1.mlp": 200, "blocks.2.head_dim": 8,
                       "blocks.3.heads": 3, "blocks.3.mlp": 232})
    dims = family_of(pruned).read_dims(pruned)
    want = measure_model_latency(pruned, runtime="pytorch", warmup=0, repeats=1, threads=1)
    assert tab.latency_ms(dims) == pytest.approx(want, rel=1e-9)
    assert cost_fn(tab, model)(dims) == pytest.approx(want, rel=1e-9)


@pytest.fixture(scope="module")
def tiny_measured():
    model = _vit(**TINY)
    tab = measure_lut(model, runtime="onnxruntime", grid_points=2, warmup=2, repeats=3, threads=2,
                      statistic="min", progress=False)
    return model, tab


def test_real_measurement_tiny_model(tiny_measured, tmp_path):
    model, tab = tiny_measured
    assert (tab.embed_grid, tab.attn_grid, tab.mlp_grid) == ([16, 32], [16, 32], [64, 128])
    assert (tab.num_tokens, tab.depth, tab.head_dim, tab.runtime, tab.exporter) == (17, 2, 16, "onnxruntime",
                                                                                    "torchscript")
    raw = np.asarray(tab.block_ms_raw)
    # every probe was timed (the arrays start as zeros) and the stored table is the repaired raw one
    assert raw.shape == (2, 2, 2) and np.isfinite(raw).all() and (raw > 0).all() and (np.asarray(tab.stem_ms_raw) > 0).all()
    np.testing.assert_allclose(tab.block_ms, make_monotone(np.maximum(raw - tab.call_overhead_ms, 0.0)), rtol=1e-12)
    np.testing.assert_allclose(tab.stem_ms, make_monotone(tab.stem_ms_raw), rtol=1e-12)
    assert tab.statistic == "min" and tab.repeats == 3
    assert tab.onnxruntime_version and tab.torch_version and tab.date
    assert tab.model_dims == family_of(model).read_dims(model)
    assert LatencyTable.load(tab.save(tmp_path / "lut.json")) == tab
    assert cost_fn(tab, model)({}) == pytest.approx(tab.predicted_model_ms)


def test_real_measurement_pytorch_runtime():
    model = _vit(**TINY)
    threads = torch.get_num_threads()  # switching the pool size per call would dominate sub-ms probes
    tab = measure_lut(model, runtime="pytorch", grid_points=2, warmup=1, repeats=3, threads=threads, progress=False)
    assert tab.exporter is None and tab.runtime == "pytorch"
    assert np.isfinite(tab.block_ms_raw).all() and (np.asarray(tab.block_ms_raw) > 0).all()
    assert tab.model_dims == family_of(model).read_dims(model)
    assert tab.predicted_model_ms == pytest.approx(tab.latency_ms(tab.model_dims))
    assert not model.training and next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_real_measurement_pytorch_cuda():
    model = _vit(**TINY)
    tab = measure_lut(model, runtime="pytorch", device="cuda", grid_points=2, warmup=3, repeats=5, progress=False)
    ref = measure_model_latency(model, runtime="pytorch", device="cuda", warmup=3, repeats=10)
    assert "cuda" in tab.device and tab.predicted_model_ms > 0 and ref > 0
    assert next(model.parameters()).device.type == "cpu"  # the user's model is not moved


# ------------------------------------------------------------------------------------ allocation
@pytest.mark.parametrize("scope", ["global", "uniform"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_meets_latency_budget(scope, seed):
    """allocate() with cost_fn(table) reaches 70 % of the dense predicted latency on random scores."""
    model = _vit(**SMALL)
    st = family_of(model).structure(model)
    n = family_of(model).num_tokens(model)
    # a noisy but monotone-repaired table, as measure_lut produces
    rng = np.random.default_rng(seed)
    D, A, M = grid_values(96, 4, 8), grid_values(96, 4, 16), grid_values(384, 4, 8)
    clean = np.array([[[1e-4 * (n * d * 4 * a + 2 * n * n * a + 2 * n * d * m) for m in M] for a in A] for d in D])
    block = make_monotone(clean * rng.uniform(0.8, 1.2, clean.shape))
    tab = LatencyTable(runtime="synthetic", device="none", threads=1, batch_size=1, num_tokens=n, depth=4,
                       head_dim=16, embed_grid=D, attn_grid=A, mlp_grid=M, block_ms=block.tolist(),
                       stem_ms=[0.01 * d for d in D])
    cost = cost_fn(tab, model)
    g = torch.Generator().manual_seed(seed)
    groups = st.of_kind("heads", "head_dim", "mlp")
    scores = {grp.name: torch.rand(grp.size, generator=g) for grp in groups}
    dense = cost(st.sizes())
    plan = allocate_budget(st, scores, cost, 0.7 * dense, scope=scope, min_keep={"head_dim": 8})
    dims = plan.dims(st)
    assert cost(dims) <= 0.7 * dense
    assert dims != st.sizes()


# ------------------------------------------------------------------------------------ CLI
def test_cli_measure_lut_uses_first_stage_of_a_run_dir(tmp_path):
    from typer.testing import CliRunner

    from vitopt.cli import app

    dense = _vit(**TINY)
    save_pruned(dense, tmp_path / "run" / "00_train" / "model", "vit_tiny_patch16_224", TINY)
    pruned = _vit(**TINY)
    resize_to(pruned, {"blocks.0.mlp": 64, "blocks.1.heads": 1})
    save_pruned(pruned, tmp_path / "run" / "01_prune" / "model", "vit_tiny_patch16_224", TINY)
    out = tmp_path / "lut.json"
    res = CliRunner().invoke(app, ["measure-lut", str(tmp_path / "run"), "--out", str(out), "--grid-points", "2",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    tab = LatencyTable.load(out)
    assert tab.model_dims == family_of(dense).read_dims(dense)
    assert tab.model_name == "vit_tiny_patch16_224" and tab.model_kwargs["embed_dim"] == 32
    # the command prints the table's prediction and the measured whole model it wrote into the file
    assert f"{tab.predicted_model_ms:.3f}" in res.output and f"{tab.reference_ms:.3f}" in res.output

    res = CliRunner().invoke(app, ["measure-lut", str(tmp_path), "--out", str(out)])
    assert res.exit_code != 0 and isinstance(res.exception, VitoptError)


# ------------------------------------------------------------------------------------ TensorRT tables (issue 15)
def test_target_fields_round_trip_and_version_1_files_still_load(tmp_path):
    tab = _table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem, precision="fp16", target="orin-agx",
                 tensorrt_version="10.3.0.30")
    back = LatencyTable.load(tab.save(tmp_path / "t.json"))
    assert (back.runtime, back.precision, back.target, back.tensorrt_version) == ("synthetic", "fp16", "orin-agx",
                                                                                   "10.3.0.30")
    old = _table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem).to_json()
    for key in ("precision", "target", "tensorrt_version"):
        del old[key]
    (tmp_path / "v1.json").write_text(json.dumps({**old, "format_version": 1}))
    v1 = LatencyTable.load(tmp_path / "v1.json")
    assert v1.precision == "fp32" and v1.target is None


def test_allocation_refuses_a_table_of_another_target():
    from vitopt.arch.cost import structure_of
    from vitopt.pruning.allocation import allocate

    model = _vit(**TINY)
    st = structure_of(model)
    scores = {g.name: torch.rand(g.size) for g in st.of_kind("mlp")}
    D, A, M = grid_values(32, 2, 8), grid_values(32, 2, 16), grid_values(128, 4, 8)
    orin = _table(D, A, M, linear_block, linear_stem, num_tokens=17, precision="fp16", target="orin-agx")
    budget = 0.97 * cost_fn(orin, model)({})
    with pytest.raises(VitoptError, match="measured for target orin-agx .* pruned for h100"):
        allocate(st, scores, target={"latency_ms": budget, "lut": orin, "deploy_target": "h100"})
    with pytest.raises(VitoptError, match="measured at fp16 but the model is pruned for int8"):
        allocate(st, scores, target={"latency_ms": budget, "lut": orin, "deploy_target": "orin-agx",
                                     "deploy_precision": "int8"})
    plan = allocate(st, scores, target={"latency_ms": budget, "lut": orin, "deploy_target": "orin-agx",
                                        "deploy_precision": "fp16"})
    assert cost_fn(orin, model)(plan.dims(st)) <= budget
    host = _table(D, A, M, linear_block, linear_stem, num_tokens=17)        # no target recorded: any target
    allocate(st, scores, target={"latency_ms": budget, "lut": host, "deploy_target": "h100"})


def test_tensorrt_table_settings():
    model = _vit(**TINY)
    with pytest.raises(VitoptError, match="give target"):
        measure_lut(model, runtime="tensorrt", progress=False)
    with pytest.raises(VitoptError, match="does not run fp8"):
        measure_lut(model, runtime="tensorrt", target="a100", precision="fp8", progress=False)
    with pytest.raises(VitoptError, match="apply to runtime 'tensorrt'"):
        measure_lut(model, runtime="onnxruntime", precision="fp16", progress=False)
    with pytest.raises(VitoptError, match="not 'onnxruntime-cuda'|measured on"):
        measure_lut(model, runtime="torch-tensorrt", progress=False)


def test_tensorrt_table_builds_one_static_engine_per_probe_and_records_the_target(monkeypatch, tmp_path):
    """The TensorRT path's wiring, with the builder and the engine replaced (no TensorRT here): every probe is
    built for the target at the precision with a static profile at the table's batch, timed device-only, and
    the table records runtime, device, precision, target and TensorRT version."""
    import vitopt.deploy.lut as lut

    builds = []

    def fake_build(onnx_path, cfg, out_dir, **kw):
        builds.append(cfg)
        out = tmp_path / f"e{len(builds)}.engine"
        out.write_bytes(b"e")
        return {"engine": str(out), "device": "NVIDIA H200", "compute_capability": "9.0",
                "tensorrt_version": "10.3.0.26"}

    class DeviceRuntime:
        def __init__(self, engine_path, device):
            self.d = int(Path(engine_path).stem[1:])          # the n-th engine built
            self.t = 0.0

        def stage_input(self, x):
            pass

        def launch(self):
            self.t += 0.001 * self.d

        def sync(self):
            pass

        def event(self):
            rt = self

            class E:
                def record(self):
                    self.t = rt.t

                def synchronize(self):
                    pass

                def elapsed_ms(self, end):
                    return end.t - self.t

            return E()

        def close(self):
            pass

    monkeypatch.setattr(lut, "build_engine", fake_build)
    monkeypatch.setattr(lut, "make_runtime", lambda kind, engine_path, device: DeviceRuntime(engine_path, device))
    monkeypatch.setattr(lut, "_check_device", lambda device: None)
    tab = measure_lut(_vit(**TINY), runtime="tensorrt", target="h200", precision="fp16", batch_size=4,
                      grid_points=2, warmup=0, repeats=2, progress=False)
    assert len(builds) == 2 * 2 * 2 + 2 + 1                          # blocks, stems, null probe
    assert {(c.target, c.precision, c.profile) for c in builds} == {("h200", "fp16", (4, 4, 4))}
    assert (tab.runtime, tab.target, tab.precision, tab.tensorrt_version) == ("tensorrt", "h200", "fp16", "10.3.0.26")
    assert tab.device == "NVIDIA H200 (sm 9.0)" and tab.batch_size == 4
    assert tab.stem_ms_raw == pytest.approx([0.001 * 2, 0.001 * 7])   # stems were the 2nd and 7th engines


def test_depth_pruned_model_is_priced_by_the_table_of_the_model_it_was_cut_from():
    """Depth: removed blocks cost nothing in the table, a block is priced at its own widths, and a table of the
    dense model still prices the depth-pruned model (iterative rounds), which a plain 2-block model is not."""
    from vitopt.arch.plan import KeepPlan
    from vitopt.arch.surgery import apply_plan

    model = _vit(**SMALL)
    n = family_of(model).num_tokens(model)
    tab = _table(D_GRID, A_GRID, M_GRID, linear_block, linear_stem, depth=4, num_tokens=n)
    plan = KeepPlan({"blocks": [0, 2], "blocks.2.mlp": list(range(96))})
    st = family_of(model).structure(model)
    dense_cost = cost_fn(tab, model)
    pruned = apply_plan(model, plan)
    after = cost_fn(tab, pruned)({})
    assert after == pytest.approx(dense_cost(plan.cost_dims(st)), rel=1e-12)
    # widths above the grid clamp to its last point (D 96 -> 64, A 96 -> 64, M 384 -> 256; M 96 is on the grid)
    assert after == pytest.approx(linear_stem(64) + linear_block(64, 64, 256) + linear_block(64, 64, 96), rel=1e-9)
    with pytest.raises(VitoptError, match="2 blocks"):
        cost_fn(tab, _vit(**{**SMALL, "depth": 2}))
