"""The one timing method (vitopt.deploy.timing): interleaved rounds, per-round ratios, warm-up, threads, load.

A fake clock makes the measurements exact: each candidate advances it by a known cost, and the
machine's "load" multiplies every cost of a round by a drifting factor, which the per-round ratio
must cancel and a back-to-back measurement would not.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from vitopt.deploy import timing
from vitopt.deploy.timing import Candidate, LoadWarning, compare, compare_runtimes, format_ratio
from vitopt.errors import VitoptError


class FakeMachine:
    """A clock advanced only by the candidates; ``factor`` (the load) changes from round to round."""

    def __init__(self):
        self.now = 0.0
        self.factor = 1.0
        self.log: list[str] = []

    def clock(self):
        return self.now

    def work(self, name, seconds):
        def fn(*_):
            self.log.append(name)
            self.now += seconds * self.factor
        return fn


@pytest.fixture
def machine(monkeypatch):
    m = FakeMachine()
    monkeypatch.setattr(timing, "_clock", m.clock)
    monkeypatch.setattr(timing, "_cpu_clock", m.clock)
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    return m


def test_per_round_ratio_cancels_a_drifting_load(machine, monkeypatch):
    gc_calls = {"n": 0}
    a, b = machine.work("A", 1e-3), machine.work("B", 2e-3)
    factors = iter([1.0, 3.0, 0.5, 5.0, 1.5, 2.0, 1.0, 4.0])

    def drift(_gen=None):                 # gc.collect() runs once before every round: change the load there
        gc_calls["n"] += 1
        machine.factor = next(factors)
        return 0

    monkeypatch.setattr(timing.gc, "collect", drift)
    res = compare({"A": a, "B": b}, rounds=8, warmup=2, calls=3)
    assert gc_calls["n"] == 8
    # warm-up interleaved (A, B, A, B), then rounds of 3 calls each, interleaved A A A B B B
    assert machine.log[:4] == ["A", "B", "A", "B"]
    assert machine.log[4:] == (["A"] * 3 + ["B"] * 3) * 8
    r = res.ratio("B")
    assert r["rounds"] == pytest.approx([2.0] * 8, rel=1e-12)
    assert (r["median"], r["min"], r["max"], r["q1"], r["q3"]) == pytest.approx((2.0,) * 5, rel=1e-12)
    assert res.ratio("A")["median"] == 1.0 and res.reference == "A"
    assert res.pair_ratio("A", "B")["rounds"] == pytest.approx([0.5] * 8, rel=1e-12)
    # the per-candidate times do drift with the load; their median is over rounds
    assert res.candidates["A"]["rounds_ms"] == pytest.approx([1.0, 3.0, 0.5, 5.0, 1.5, 2.0, 1.0, 4.0])
    assert res.candidates["A"]["ms"] == pytest.approx(np.median([1.0, 3.0, 0.5, 5.0, 1.5, 2.0, 1.0, 4.0]))
    assert res.candidates["B"]["calls"] == 3 and len(res.candidates["B"]["rounds_ms"]) == 8
    assert res.candidates["B"]["p50_ms"] == pytest.approx(2 * np.median([1.0, 3.0, 0.5, 5.0, 1.5, 2.0, 1.0, 4.0]))


def test_spread_is_reported_when_rounds_disagree(machine):
    costs = iter([1.0, 1.0, 1.0, 1.2, 1.0, 0.9, 1.0, 1.1, 1.0, 1.0])   # A, B alternately, 5 rounds

    def fn_a():
        machine.now += 1e-3 * next(costs)

    def fn_b():
        machine.now += 1e-3 * next(costs)

    res = compare({"A": fn_a, "B": fn_b}, rounds=4, warmup=1, calls=1)
    r = res.ratio("B")
    assert r["rounds"] == pytest.approx([1.2, 0.9, 1.1, 1.0])
    assert (r["min"], r["max"]) == pytest.approx((0.9, 1.2))
    assert r["median"] == pytest.approx(1.05) and (r["q1"], r["q3"]) == pytest.approx((0.975, 1.125))
    assert format_ratio(r) == "1.05x (0.90-1.20)"


def test_auto_calls_fill_the_round(machine):
    res = compare({"fast": machine.work("f", 1e-4), "slow": machine.work("s", 20e-3)}, rounds=2, warmup=1,
                  round_ms=10.0)
    assert res.candidates["fast"]["calls"] == 100 and res.candidates["slow"]["calls"] == 1
    capped = compare({"fast": machine.work("f", 1e-6)}, rounds=1, warmup=1, round_ms=10.0, max_calls=50)
    assert capped.candidates["fast"]["calls"] == 50


def test_setup_is_not_timed_and_sync_is(machine):
    made = []

    def setup():
        machine.now += 1.0                      # an expensive copy: must not count
        made.append(1)
        return "copy"

    seen = []
    c = Candidate(lambda arg: (seen.append(arg), machine.work("f", 1e-3)()), setup=setup,
                  sync=lambda: setattr(machine, "now", machine.now + 1e-3))   # device work finishing: counts
    res = compare({"prune": c}, rounds=3, warmup=1, calls=2)
    assert res.candidates["prune"]["ms"] == pytest.approx(2.0) and res.candidates["prune"]["max_ms"] == pytest.approx(2.0)
    assert len(made) == 1 + 3 * 2 and set(seen) == {"copy"}


def test_threads_are_fixed_during_timing_and_restored(machine):
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen = []
    res = compare({"a": lambda: (seen.append(torch.get_num_threads()), machine.work("a", 1e-3)())}, rounds=2,
                  warmup=1, calls=1, threads=want)
    assert set(seen) == {want} and res.threads == want
    assert torch.get_num_threads() == before


def test_load_above_core_count_warns_and_is_recorded(machine, monkeypatch):
    cores = timing.os.cpu_count()
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (cores + 0.5, 1.0, 1.0))
    with pytest.warns(LoadWarning, match=f"above the {cores} cores"):
        res = compare({"a": machine.work("a", 1e-3)}, rounds=1, warmup=0, calls=1)
    assert res.load_warning and res.load_before["loadavg"][0] == cores + 0.5
    assert res.to_json()["load_warning"] == res.load_warning
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (cores - 0.5, 1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = compare({"a": machine.work("a", 1e-3)}, rounds=1, warmup=0, calls=1)
    assert quiet.load_warning is None and quiet.load_after["cpu_count"] == cores


def test_compare_runtimes_feeds_one_fixed_batch(machine):
    shapes, arrays = [], []

    def rt(x):
        shapes.append(x.shape)
        arrays.append(x)
        machine.now += 1e-3 * x.shape[0]

    res = compare_runtimes({"a": rt, "b": rt}, (1, 4, 4), 8, rounds=2, warmup=1, calls=1)
    assert set(shapes) == {(8, 1, 4, 4)} and all(a is arrays[0] for a in arrays)
    assert res.candidates["a"]["throughput_img_s"] == pytest.approx(8 / 8e-3)
    assert res.ratio("b")["median"] == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"rounds": 0}, "rounds"), ({"warmup": -1}, "warmup"), ({"calls": 0}, "calls"), ({"round_ms": 0}, "round_ms"),
    ({"reference": "nope"}, "reference"), ({"threads": 0}, "threads")])
def test_bad_settings_are_one_sentence(kwargs, match):
    with pytest.raises(VitoptError, match=match):
        compare({"a": lambda: None}, **kwargs)
    with pytest.raises(VitoptError, match="at least one candidate"):
        compare({})
