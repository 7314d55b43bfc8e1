"""The benchmark scripts in benchmarks/ run end to end in --quick mode on a tiny ViT (in-process).

``speedup.py`` and ``parity.py`` are called through their ``main(argv)`` with one FLOPs target,
one thread and a few interleaved timing rounds, writing JSON into a temp folder. Torch-Pruning is in
the ``dev`` extra, so its comparison code (``tp_prune``, the ratio search, the attribute sync) runs
here; where it is missing the Torch-Pruning tests skip with the reason.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import parity  # noqa: E402
import speedup  # noqa: E402

TARGET = 0.5
TP_OK, TP_MSG = common.tp_status()
needs_tp = pytest.mark.skipif(not TP_OK, reason=f"Torch-Pruning parts skipped: {TP_MSG}")
VITOPT_VARIANTS = ("vitopt", "vitopt+embed")
TP_VARIANTS = ("tp", "tp-bottleneck")
FAST = ["--quick", "--threads", "1", "--targets", str(TARGET)]


@pytest.fixture(scope="module")
def speedup_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "speedup.json"
    payload = speedup.main([*FAST, "--warmup", "1", "--rounds", "3", "--round-ms", "5", "--tp-grid", "5",
                            "--tp-max-iter", "4", "--no-cuda", "--out", str(out)])
    assert out.is_file()
    doc = json.loads(out.read_text())
    assert [(r["variant"], r["target"]) for r in doc["rows"]] == [(r["variant"], r["target"]) for r in payload["rows"]]
    return doc


@pytest.fixture(scope="module")
def parity_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "parity.json"
    parity.main([*FAST, "--samples", "8", "--batch", "4", "--tp-grid", "5", "--tp-max-iter", "4", "--out", str(out)])
    return json.loads(out.read_text())


def _rows(doc, variant):
    return [r for r in doc["rows"] if r["variant"] == variant]


def _timing(doc, key):
    (group,) = [t for t in doc["timings"] if t["target"] == TARGET]
    return group["comparisons"][key]


def test_speedup_quick_vitopt_rows(speedup_json):
    doc = speedup_json
    assert doc["script"] == "speedup" and doc["environment"]["torch"] == torch.__version__
    assert doc["command"].startswith("python benchmarks/speedup.py --quick") and doc["load"]["cpu_count"] >= 1
    assert doc["latency_keys"] == ["ort_cpu_b1", "ort_cpu_b32", "torch_cpu_b1", "torch_cpu_b32"]
    (dense,) = _rows(doc, "dense")
    assert dense["target"] is None and dense["flops_ratio"] == 1.0
    # the analytic counter agrees with torch.utils.flop_counter (eager attention)
    assert dense["flops_counter"] == dense["flops"]
    for variant in VITOPT_VARIANTS:
        (row,) = _rows(doc, variant)
        assert row["target"] == TARGET and row["tool"] == "vitopt"
        assert row["flops_ratio"] <= TARGET + 0.01
        assert row["flops"] < dense["flops"] and row["params"] < dense["params"]
        assert row["flops_counter"] == row["flops"]
        assert row["dims"]["head_dim_uniform_in_block"]
        assert "error" not in row["onnx"], row["onnx"]
        for key in doc["latency_keys"]:
            # timed in the same interleaved rounds as dense; the row's ratio is the median of per-round ratios
            cmp = _timing(doc, key)
            t, d = cmp["candidates"][variant]["rounds_ms"], cmp["candidates"]["dense"]["rounds_ms"]
            assert cmp["reference"] == "dense" and len(t) == len(d) == 3
            assert row["latency_ratio"][key]["median"] == pytest.approx(statistics.median(a / b for a, b in zip(t, d)))
            assert row["latency_ms"][key] == pytest.approx(statistics.median(t))
            assert row["efficiency"][key] == pytest.approx(row["latency_ratio"][key]["median"] / row["flops_ratio"])
    if not TP_OK:
        assert set(doc["tp_skipped"]) == set(TP_VARIANTS)


@needs_tp
def test_speedup_quick_torch_pruning_rows(speedup_json):
    doc = speedup_json
    dense = _rows(doc, "dense")[0]
    partner = {"tp-bottleneck": "vitopt", "tp": "vitopt+embed"}
    for variant in TP_VARIANTS:
        (row,) = _rows(doc, variant)
        assert row["tool"] == "torch-pruning" and "error" not in row, row.get("error")
        info = row["prune"]
        assert 0.0 < info["ratio"] < 1.0 and info["trials"]
        # searched to the FLOPs its vitopt partner achieved, with the same counter
        (p,) = _rows(doc, partner[variant])
        assert info["matched_to"] == partner[variant] and info["goal"] == pytest.approx(p["flops_ratio"])
        assert row["flops_ratio"] == pytest.approx(info["achieved"])
        assert info["within_tol"] == (abs(info["achieved"] / info["goal"] - 1) <= 0.005)
        assert row["flops_counter"] == row["flops"]
        assert row["dims"]["head_dim_uniform_in_block"]
        if variant == "tp-bottleneck":
            assert row["dims"]["embed"] == dense["dims"]["embed"]  # fc2 ignored: residual width kept
    pairs = {(w["vitopt"], w["tp"]): w for w in doc["pairs"]}
    assert set(pairs) == {("vitopt", "tp-bottleneck"), ("vitopt+embed", "tp")}
    for (a, b), w in pairs.items():
        (ra,), (rb,) = _rows(doc, a), _rows(doc, b)
        assert w["flops_gap"] == pytest.approx(ra["flops"] / rb["flops"] - 1)
        equal = abs(w["flops_gap"]) <= 0.005
        assert w["basis"] == ("latency at equal FLOPs" if equal else "latency per FLOP")
        for key, r in w["ratio"].items():
            cmp = _timing(doc, key)["candidates"]
            per_round = [x / y / (1 if equal else ra["flops"] / rb["flops"])
                         for x, y in zip(cmp[a]["rounds_ms"], cmp[b]["rounds_ms"])]
            assert r["median"] == pytest.approx(statistics.median(per_round))
            assert w["faster"][key] == (a if r["q3"] < 1 else b if r["q1"] > 1 else "no clear winner")


def test_parity_quick_vitopt(parity_json):
    doc = parity_json
    assert doc["script"] == "parity"
    for variant in ("dense", *VITOPT_VARIANTS):
        (row,) = _rows(doc, variant)
        assert "error" not in row, row.get("error")
        assert row["max_abs_diff"] <= 1e-4 and row["argmax_agreement"] == 1.0 and row["pass"]
        if variant != "dense":
            assert row["flops_ratio"] <= TARGET + 0.01


@needs_tp
def test_parity_quick_torch_pruning(parity_json):
    for variant in TP_VARIANTS:
        (row,) = _rows(parity_json, variant)
        # an export failure would be recorded as a result; on the tiny ViT both export and match
        assert "error" not in row, row.get("error")
        assert row["max_abs_diff"] <= 1e-4 and row["argmax_agreement"] == 1.0


def test_common_helpers(tmp_path):
    assert common.fmt_pm([1.0, 3.0]) == "2.0 ± 1.0"
    assert common.fmt_pm([2.0]) == "2.0"
    assert common.fmt(None) == "-" and common.fmt(float("nan")) == "-"
    assert common.ratio(1.0, 0.0) is None
    path = common.write_json(tmp_path / "x.json", {"v": float("nan"), "t": torch.tensor([1.5])}, script="t", argv=[])
    doc = json.loads(path.read_text())
    assert doc["v"] is None and doc["t"] == [1.5] and doc["argv"] == []
    assert doc["command"] == "python benchmarks/t.py" and doc["date"] and doc["machine"]["logical_cores"] >= 1
    assert set(doc["load"]) == {"loadavg", "cpu_count"}


# ---------------------------------------------------------------------------------- Torch-Pruning itself
import variants as V  # noqa: E402


def _paths_agree(model, x):
    """Max |logits| difference between timm's fused (SDPA) and explicit attention paths."""
    from timm.models.vision_transformer import Attention

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        for a in attns:
            a.fused_attn = True
        fused = model(x)
        for a in attns:
            a.fused_attn = False
        eager = model(x)
        for a in attns:
            a.fused_attn = True
    return (fused - eager).abs().max().item(), fused.abs().max().item()


@needs_tp
@pytest.mark.parametrize("bottleneck, attn", [(False, "head_dims"), (True, "head_dims"), (False, "heads"),
                                              (True, "both")])
def test_torch_pruning_model_is_exact_after_attribute_sync(bottleneck, attn):
    """Torch-Pruning's model, after the benchmark's attribute sync (_sync_vit_attrs), computes the same
    logits on timm's fused and explicit attention paths, and vitopt's analytic FLOPs count it exactly.
    Without the sync's scale (TP's recipe patches num_heads/head_dim only) the two paths disagree."""
    dense = V.build_model("tiny", seed=3)
    with torch.no_grad():                       # spread the weights so pruning decisions are not ties
        for p in dense.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = copy.deepcopy(dense)
    info = V.tp_prune(model, 0.4, bottleneck=bottleneck, attn=attn)
    x = torch.randn(4, *V.input_shape(model))
    dims = V.dims_summary(model)
    assert V.cost(model)["flops"] < V.cost(dense)["flops"] and dims["head_dim_uniform_in_block"]
    if attn != "head_dims":
        assert sum(dims["heads"]) < 2 * len(dims["heads"]), dims      # heads were removed
    if attn == "head_dims":
        assert min(dims["head_dim"]) < 32, dims                         # head dims were removed
    assert (dims["embed"] == 64) == bottleneck                           # bottleneck keeps the residual width
    diff, scale = _paths_agree(model, x)
    assert diff <= 1e-5 * max(1.0, scale), (diff, info)
    assert V.counter_flops(model) == V.cost(model)["flops"]
    # the sync is what makes this true: restore the stale scale TP leaves behind and the paths part
    if min(dims["head_dim"]) < 32:
        from timm.models.vision_transformer import Attention

        for m in model.modules():
            if isinstance(m, Attention):
                m.scale = 32 ** -0.5
        assert _paths_agree(model, x)[0] > 1e-3


@needs_tp
def test_torch_pruning_ratio_search_reaches_the_flops_target():
    dense = V.build_model("tiny", seed=0)
    base = V.cost(dense)["flops"]
    cache: dict[float, float] = {}
    res = V.tp_prune_to_flops(dense, 0.6, tol=0.01, grid=6, max_iter=8, bottleneck=True, cache=cache)
    info = res.info
    assert info["achieved"] == pytest.approx(V.cost(res.model)["flops"] / base)
    assert info["within_tol"] and abs(info["achieved"] / 0.6 - 1) <= 0.01, info
    # every trial is in the cache and the chosen ratio is the trial closest to the target
    assert {r for r, _ in info["trials"]} <= set(cache)
    assert abs(cache[info["ratio"]] - info["achieved"]) < 1e-12
    assert min(abs(a / 0.6 - 1) for _, a in info["trials"]) == pytest.approx(abs(info["achieved"] / 0.6 - 1))
    assert V.cost(dense)["flops"] == base                                   # the dense model is untouched


# ---------------------------------------------------------------------------------- latency-aware, noise floor
import latency_aware  # noqa: E402
import noise_floor  # noqa: E402


@pytest.fixture(scope="module")
def latency_aware_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "latency_aware.json"
    latency_aware.main(["--quick", "--out", str(out)])
    return json.loads(out.read_text())


def test_latency_aware_quick(latency_aware_json):
    doc = latency_aware_json
    (res,) = doc["results"]
    rows = res["rows"]
    assert set(rows) == {"dense", "latency-aware", "flops-aware"}
    # the latency-aware plan meets its table-priced target; the FLOPs-aware one its FLOPs target
    assert rows["latency-aware"]["predicted_ms"] <= res["target_ms"] * (1 + 1e-9)
    assert rows["flops-aware"]["flops_ratio"] <= res["flops_target"] + 1e-9
    assert rows["dense"]["predicted_ms"] == pytest.approx(res["lut"]["predicted_dense_ms"])
    # one final comparison of the three; the pair ratio is the median of its per-round ratios
    cands = res["final_timing"]["candidates"]
    per_round = [a / b for a, b in zip(cands["flops-aware"]["rounds_ms"], cands["latency-aware"]["rounds_ms"])]
    assert res["flops_over_latency_aware"]["median"] == pytest.approx(statistics.median(per_round))
    assert len(per_round) == doc["config"]["final_rounds"]
    # both pruned models were fine-tuned with the same budget and evaluated
    assert rows["latency-aware"]["flops_ratio"] < 1
    for label in ("latency-aware", "flops-aware"):
        assert "top1" in rows[label] and "top1_one_shot" in rows[label]
    assert f"{rows['latency-aware']['top1']:.2f}%" in res["verdict"]


def test_latency_aware_refuses_a_table_that_prices_no_saving(tmp_path, monkeypatch):
    """A table whose smallest sizes cost what the dense model costs (overhead, noise) is a clear error, not a
    comparison of two unpruned models."""
    import dataclasses

    import vitopt.deploy.lut as lut

    real = lut.measure_lut

    def flat(*a, **k):
        t = real(*a, **k)
        top = max(v for plane in t.block_ms for row in plane for v in row)
        return dataclasses.replace(t, block_ms=[[[top] * len(row) for row in plane] for plane in t.block_ms])

    monkeypatch.setattr(lut, "measure_lut", flat)
    with pytest.raises(SystemExit, match="no latency to trade"):
        latency_aware.main(["--quick", "--out", str(tmp_path / "la.json")])
    assert not (tmp_path / "la.json").exists()


def test_noise_floor_quick(tmp_path):
    out = tmp_path / "nf.json"
    doc = noise_floor.main(["--quick", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(doc["rows"]))
    for r in doc["rows"]:
        rounds = r["comparison"]["candidates"]["A again"]["ratio"]["rounds"]
        assert len(rounds) == 3 and r["ratio"]["median"] == pytest.approx(statistics.median(rounds))
        assert r["median_off_by"] == pytest.approx(abs(r["ratio"]["median"] - 1))
    assert doc["worst"]["max"] == max(r["ratio"]["max"] for r in doc["rows"])


def test_accuracy_best_tp_is_chosen_among_variants_that_reached_the_target():
    """A Torch-Pruning variant more than 2% over the FLOPs target on a seed is reported, not called the best."""
    import accuracy

    def run(method, seed, top1, flops=0.3):
        return {"seed": seed, "target": 0.3, "method": method, "top1": top1, "top1_pruned": top1, "flops_ratio": flops,
                "params_ratio": 0.3, "tool": "vitopt" if method == "vitopt" else "torch-pruning"}

    runs = [run("vitopt", 0, 90.0, 0.299), run("vitopt", 1, 92.0, 0.298),
            run("tp-a", 0, 89.0, 0.305), run("tp-a", 1, 90.0, 0.29),       # within 2% over the budget
            run("tp-b", 0, 99.0, 0.3065), run("tp-b", 1, 99.0)]             # 2.2% over on seed 0
    summary = accuracy.summarize(runs, ["vitopt", "tp-a", "tp-b"], [0.3])
    assert [s["reached_target"] for s in summary] == [True, True, False]
    (paired,) = accuracy.paired_differences(runs, summary, [0.3])
    assert paired["best_tp"] == "tp-a"
    assert paired["diff"]["values"] == [1.0, 2.0] and paired["wins"] == 2


def test_accuracy_recovery_curve_is_the_per_epoch_mean_placed_after_the_iterative_recovery():
    """The summary's recovery curve: epoch 0 of a curve is the one-shot top-1, then one point per fine-tune
    epoch, averaged over seeds epoch by epoch; an iterative run's curve starts after the recovery epochs
    its prune spent. Curves that cannot be averaged (missing, or of different lengths) give None."""
    import accuracy

    def run(seed, oneshot, curve, before=0, method="vitopt"):
        return {"seed": seed, "target": 0.5, "method": method, "tool": "vitopt", "top1": curve[-1],
                "top1_pruned": oneshot, "flops_ratio": 0.49, "params_ratio": 0.5, "top1_by_epoch": curve,
                "epochs_before_finetune": before}

    runs = [run(0, 70.0, [80.0, 90.0]), run(1, 60.0, [84.0, 88.0]),
            run(0, 75.0, [85.0], 1, "vitopt-iterative"), run(1, 77.0, [91.0], 1, "vitopt-iterative")]
    by = {s["method"]: s["recovery"] for s in accuracy.summarize(runs, ["vitopt", "vitopt-iterative"], [0.5])}
    assert by["vitopt"] == {"epochs": [0, 1, 2], "top1": [65.0, 82.0, 89.0], "std": [5.0, 2.0, 1.0], "n": 2}
    assert by["vitopt-iterative"]["epochs"] == [1, 2] and by["vitopt-iterative"]["top1"] == [76.0, 88.0]
    assert accuracy.recovery_cells(by["vitopt-iterative"], 3) == ["-", "76.0", "88.0"]
    assert accuracy.recovery([runs[0], run(1, 60.0, [84.0])]) is None                  # lengths differ
    assert accuracy.recovery([runs[0], {k: v for k, v in runs[1].items() if k != "top1_by_epoch"}]) is None


def _earlier_accuracy_file(tmp_path, defaults=None):
    import accuracy

    args = accuracy.resolve_args(["--threads", "1"])
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    runs = [{"seed": s, "target": t, "method": m, "tool": "torch-pruning" if m.startswith("tp-") else "vitopt",
             "top1": 90.0 + s, "top1_pruned": 80.0, "flops_ratio": t, "params_ratio": t}
            for s in (0, 1, 2) for t in (0.5, 0.3, 0.15) for m in ("vitopt", "tp-magnitude", "tp-taylor")]
    doc = {"config": config, "dense": [{"seed": s, "top1": 95.0 + s, "flops": 1000} for s in (0, 1, 2)], "runs": runs}
    if defaults is not None:
        doc["defaults"] = defaults
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(doc))
    return accuracy, args, path


def test_accuracy_reuse_takes_other_methods_only_from_a_reproduced_dense_model(tmp_path):
    """--reuse: runs of methods not rerun come back for a seed whose dense model reproduces exactly; a
    different dense model, different settings, or a 'vitopt' written under other library defaults do not."""
    accuracy, args, path = _earlier_accuracy_file(tmp_path)
    doc = accuracy.load_reuse(path, args)
    got = accuracy.reused_runs(doc, path, 1, {"top1": 96.0, "flops": 1000}, ["vitopt", "tp-taylor"], [0.5, 0.3])
    assert sorted((r["method"], r["target"]) for r in got) == [("tp-magnitude", 0.3), ("tp-magnitude", 0.5)]
    assert all(r["seed"] == 1 and r["reused_from"] == str(path) for r in got)
    # 'vitopt' of a file without recorded defaults is never reused: its meaning may have changed
    got = accuracy.reused_runs(doc, path, 1, {"top1": 96.0, "flops": 1000}, ["tp-taylor"], [0.5])
    assert [r["method"] for r in got] == ["tp-magnitude"]
    with pytest.raises(SystemExit, match="dense model of seed 1 does not reproduce"):
        accuracy.reused_runs(doc, path, 1, {"top1": 96.0 + 1e-9, "flops": 1000}, ["vitopt"], [0.5])
    other = accuracy.resolve_args(["--threads", "1", "--finetune-epochs", "3"])
    with pytest.raises(SystemExit, match="finetune_epochs"):
        accuracy.load_reuse(path, other)
    with pytest.raises(SystemExit, match="seed 7"):
        accuracy.load_reuse(path, accuracy.resolve_args(["--threads", "1", "--seeds", "7"]))
    _, _, same = _earlier_accuracy_file(tmp_path, defaults=accuracy.library_defaults())
    got = accuracy.reused_runs(accuracy.load_reuse(same, args), same, 0, {"top1": 95.0, "flops": 1000},
                               ["tp-taylor"], [0.5])
    assert sorted(r["method"] for r in got) == ["tp-magnitude", "vitopt"]
    # a file from before 'reconstruct' existed had it off: the same meaning as now only while it is off
    older = {k: v for k, v in accuracy.library_defaults().items() if k != "reconstruct"}
    _, _, before = _earlier_accuracy_file(tmp_path, defaults=older)
    got = accuracy.reused_runs(accuracy.load_reuse(before, args), before, 0, {"top1": 95.0, "flops": 1000},
                               ["tp-taylor"], [0.5])
    assert ("vitopt" in {r["method"] for r in got}) is (accuracy.library_defaults()["reconstruct"] is False)
    # a method run here that the earlier file also has is compared with it, run by run
    again = {"seed": 0, "target": 0.5, "method": "tp-magnitude", "top1": 90.5}
    same_again = {"seed": 0, "target": 0.3, "method": "tp-magnitude", "top1": 90.0}
    check, ok = accuracy.reproduced(doc, [*got, again, same_again])
    assert ok["equal"] is True
    assert check["equal"] is False and check["top1_here"] == check["top1_there"] + 0.5


def test_accuracy_merge_unions_runs_of_the_same_dense_models_and_refuses_others(tmp_path):
    accuracy, args, path = _earlier_accuracy_file(tmp_path)
    doc = json.loads(path.read_text())
    extra = {**doc, "runs": [{**r, "method": "kl:calibrated", "top1": r["top1"] + 1}
                             for r in doc["runs"] if r["method"] == "vitopt"]}
    b = tmp_path / "b.json"
    b.write_text(json.dumps(extra))
    out = tmp_path / "merged.json"
    merged = accuracy.merge([path, b], out, [])
    assert [m["path"] for m in json.loads(out.read_text())["merged_from"]] == [str(path), str(b)]
    assert len(merged["runs"]) == len(doc["runs"]) + 9
    kl = next(s for s in merged["summary"] if s["method"] == "kl:calibrated" and s["target"] == 0.5)
    assert kl["top1"]["values"] == [91.0, 92.0, 93.0]
    assert {p["target"] for p in merged["paired"]} == {0.5, 0.3, 0.15}
    other_dense = tmp_path / "c.json"
    other_dense.write_text(json.dumps({**extra, "dense": [{**d, "top1": d["top1"] + 0.1} for d in extra["dense"]]}))
    with pytest.raises(SystemExit, match="dense model of seed 0 differs"):
        accuracy.merge([path, other_dense], out, [])
    other_defaults = tmp_path / "e.json"
    other_defaults.write_text(json.dumps({**extra, "defaults": {"criterion": "l1", "compare": "raw"}}))
    both_vitopt = tmp_path / "f.json"
    both_vitopt.write_text(json.dumps({**doc, "runs": [{**r, "seed": r["seed"]} for r in doc["runs"]][:1],
                                       "defaults": {"criterion": "l1", "compare": "raw"}}))
    with pytest.raises(SystemExit, match="other library defaults"):
        accuracy.merge([path, both_vitopt], out, [])                    # both have 'vitopt' runs
    # a file without vitopt runs may come from other defaults; the merge records those of the vitopt runs
    merged = accuracy.merge([other_defaults, path], out, [])
    assert merged["defaults"] == accuracy.recorded_defaults(doc)
    clash = tmp_path / "d.json"
    clash.write_text(json.dumps({**doc, "runs": [{**doc["runs"][0], "top1": 1.0}]}))
    with pytest.raises(SystemExit, match="has another result"):
        accuracy.merge([path, clash], out, [])


def test_accuracy_merge_keeps_the_run_a_file_made_over_the_copy_another_reused(tmp_path):
    """Two reruns split by method each reuse the other's methods from the old file; the merge must keep
    the runs that were made again (with their per-epoch curves), whichever file comes first."""
    accuracy, _, path = _earlier_accuracy_file(tmp_path)
    doc = json.loads(path.read_text())
    made = [{**r, "top1_by_epoch": [r["top1"]], "epochs_before_finetune": 0} for r in doc["runs"]]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**doc, "runs": [{**r, "reused_from": "old.json"} for r in doc["runs"]]}))
    b.write_text(json.dumps({**doc, "runs": made}))
    for order in ([a, b], [b, a]):
        merged = accuracy.merge(order, tmp_path / "m.json", [])
        assert all("top1_by_epoch" in r and "reused_from" not in r for r in merged["runs"])
        assert len(merged["runs"]) == len(doc["runs"])


# ---------------------------------------------------------------------------------- depth vs width
import depth_width  # noqa: E402


def test_depth_width_quick(tmp_path):
    out = tmp_path / "dw.json"
    depth_width.main(["--quick", "--out", str(out)])
    doc = json.loads(out.read_text())
    rows = doc["result"]["rows"]
    assert set(rows) == {"dense", *depth_width.VARIANTS}
    target = doc["config"]["flops"]
    for label, (_, groups, match) in depth_width.VARIANTS.items():
        r = rows[label]
        assert r["flops_ratio"] <= r["flops_target"] + 1e-9
        assert r["flops_target"] == (target if match is None else rows[match]["flops_ratio"])
        assert "top1" in r and "top1_one_shot" in r and r["ms"] > 0
        if groups == ["blocks"]:           # depth only: whole blocks go, the width stays
            assert r["blocks"] < rows["dense"]["blocks"] and r["embed"] == 128
            assert len(r["kept_blocks"]) == r["blocks"]
        if "blocks" not in groups:
            assert r["blocks"] == rows["dense"]["blocks"]
    cands = doc["result"]["final_timing"]["candidates"]
    assert all(len(c["rounds_ms"]) == doc["config"]["final_rounds"] for c in cands.values())
    assert depth_width.speed_per_point(1.5, 2.0) == 0.25 and depth_width.speed_per_point(1.2, 0.0) == float("inf")


def test_accuracy_paired_interval_is_the_student_t_interval_of_the_mean():
    """se uses the sample standard deviation (n - 1) and the interval the t quantile with n - 1 degrees of
    freedom: for 1, 2, 3, 4 the mean is 2.5, s = sqrt(5/3), se = s / 2, t(0.975, 3) = 3.182446."""
    import accuracy

    got = accuracy.mean_interval([1.0, 2.0, 3.0, 4.0])
    se = (5 / 3) ** 0.5 / 2
    assert got["se"] == pytest.approx(se, rel=1e-12)
    assert got["ci95"] == pytest.approx([2.5 - 3.182446305 * se, 2.5 + 3.182446305 * se], rel=1e-9)
    assert accuracy.mean_interval([1.0]) == {"se": None, "ci95": None}


def test_accuracy_fixed_reference_replaces_the_best_on_the_mean():
    """--reference: the paired differences are against the named variant even when another has the better
    mean, and say so; without it the best on the mean is taken."""
    import accuracy

    def run(method, seed, top1):
        return {"seed": seed, "target": 0.5, "method": method, "top1": top1, "top1_pruned": top1, "flops_ratio": 0.5,
                "params_ratio": 0.5, "tool": "vitopt" if method == "vitopt" else "torch-pruning"}

    runs = [run("vitopt", 0, 90.0), run("vitopt", 1, 92.0), run("vitopt", 2, 91.0),
            run("tp-taylor", 0, 95.0), run("tp-taylor", 1, 95.0), run("tp-taylor", 2, 95.0),
            run("tp-magnitude", 0, 89.0), run("tp-magnitude", 1, 90.0), run("tp-magnitude", 2, 91.0)]
    summary = accuracy.summarize(runs, ["vitopt", "tp-taylor", "tp-magnitude"], [0.5])
    (best,) = accuracy.paired_differences(runs, summary, [0.5])
    assert best["best_tp"] == "tp-taylor" and not best["reference_fixed"]
    (fixed,) = accuracy.paired_differences(runs, summary, [0.5], reference="tp-magnitude")
    assert fixed["best_tp"] == "tp-magnitude" and fixed["reference_fixed"]
    assert fixed["diff"]["values"] == [1.0, 2.0, 0.0] and fixed["diff"]["se"] == pytest.approx(1 / 3 ** 0.5)


def test_accuracy_paired_each_lists_every_method_on_common_seeds():
    """paired_each: ours minus every other method at each target, over the seeds both ran (a method missing
    a seed is paired on the rest), including a variant that did not reach the target."""
    import accuracy

    def run(method, seed, top1, target=0.5):
        return {"seed": seed, "target": target, "method": method, "top1": top1}

    runs = [run("vitopt", 0, 90.0), run("vitopt", 1, 92.0), run("vitopt", 2, 91.0),
            run("tp-a", 0, 89.0), run("tp-a", 1, 93.0), run("tp-b", 0, 85.0), run("tp-b", 2, 95.0),
            run("vitopt", 0, 80.0, 0.3), run("tp-a", 0, 70.0, 0.3)]
    each = {(p["target"], p["other"]): p for p in accuracy.paired_each(runs, [0.5, 0.3])}
    assert set(each) == {(0.5, "tp-a"), (0.5, "tp-b"), (0.3, "tp-a")}
    assert each[0.5, "tp-a"]["seeds"] == [0, 1] and each[0.5, "tp-a"]["diff"]["values"] == [1.0, -1.0]
    assert each[0.5, "tp-b"]["seeds"] == [0, 2] and each[0.5, "tp-b"]["diff"]["values"] == [5.0, -4.0]
    assert each[0.3, "tp-a"]["diff"]["values"] == [10.0] and each[0.3, "tp-a"]["diff"]["ci95"] is None


def test_accuracy_method_names_parse_to_prune_options():
    """A configuration name maps to vitopt.prune's options: ':noembed' / ':noheads' drop that kind from the
    groups (both may be given), ':perkind' the scope; a malformed option is refused."""
    import accuracy

    cfg = accuracy.vitopt_config("taylor:isomorphic:noheads")
    assert (cfg["criterion"], cfg["compare"], cfg["groups"]) == ("taylor", "isomorphic", ("embed", "head_dim", "mlp"))
    assert accuracy.vitopt_config("l1:normalized:noembed:noheads")["groups"] == ("head_dim", "mlp")
    assert accuracy.vitopt_config("taylor:calibrated:perkind")["scope"] == "per_kind"
    with pytest.raises(ValueError, match="nohead"):
        accuracy.vitopt_config("taylor:calibrated:nohead")
