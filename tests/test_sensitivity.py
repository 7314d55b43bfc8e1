"""Sensitivity curves (``compare="calibrated_curve"``): measured marginal loss per unit of score by removal depth.

What must hold: the rates are the slopes of the lower convex hull of the measured (removed score, loss)
points, so they never decrease with depth; each unit is priced at the rate of the depth where the
probes removed it; one probe is exactly the single exchange rate of ``compare="calibrated"``; and the
prune loop records the curves and still meets its budget.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prune_helpers import noise_batches, tiny_deit

import vitopt
from vitopt.errors import VitoptError
from vitopt.pruning.sensitivity import (
    _lower_hull,
    calibrate_by_curves,
    exchange_rates,
    sensitivity_curves,
)


def _tiny(seed: int = 0) -> torch.nn.Module:
    return tiny_deit(seed)


def _batches(n: int = 2) -> list:
    return noise_batches(n, 8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 10), st.floats(-1, 10)), min_size=1, max_size=6))
def test_rates_are_the_slopes_of_the_lower_convex_hull(steps):
    """Non-decreasing slopes, a curve never above the measured points, through the last point."""
    removed, losses, r, loss = [], [], 0.0, 0.0
    for dr, dl in steps:
        r, loss = r + dr, max(loss + dl, 0.0)
        removed.append(r)
        losses.append(loss)
    slopes = _lower_hull(removed, losses)
    assert len(slopes) == len(removed)
    assert all(b >= a - 1e-12 for a, b in zip(slopes, slopes[1:])), slopes
    prev, hull = 0.0, 0.0
    for x, y, s in zip(removed, losses, slopes):
        hull += s * (x - prev)
        prev = x
        assert hull <= y + 1e-9 * max(1.0, y), (hull, y)          # a minorant of the points
    assert hull == pytest.approx(max(losses[-1], 0.0) if slopes[-1] > 0 or hull > 0 else hull, rel=1e-9, abs=1e-12)


def test_a_convex_curve_is_kept_and_a_concave_kink_is_pooled():
    assert _lower_hull([1.0, 2.0, 3.0], [1.0, 3.0, 6.0]) == [1.0, 2.0, 3.0]
    assert _lower_hull([1.0, 2.0, 3.0], [3.0, 4.0, 6.0]) == [2.0, 2.0, 2.0]
    assert _lower_hull([1.0, 2.0, 4.0], [1.0, 1.0, 5.0]) == [0.5, 0.5, 2.0]


def test_each_unit_is_priced_at_the_rate_of_its_depth():
    """Ranks (ascending score) 0-1 of 8 fall in the 25% segment, 2-3 in the 50% one, 4.. past it."""
    model = _tiny()
    structure = vitopt.structure(model)
    g = "blocks.0.mlp"
    s = torch.tensor([8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0])      # one group of 8 (shape need not match)
    out = calibrate_by_curves({g: s}, structure, {"mlp": [1.0, 10.0, 100.0]}, probes=(0.25, 0.5, 0.75))
    rate = {1.0: 1, 2.0: 1, 3.0: 10, 4.0: 10, 5.0: 100, 6.0: 100, 7.0: 100, 8.0: 100}
    assert out[g].tolist() == [v * rate[v] for v in s.tolist()]
    assert torch.equal(torch.argsort(out[g]), torch.argsort(s))      # order within the group is kept


def test_one_probe_is_the_single_exchange_rate():
    model = _tiny()
    structure = vitopt.structure(model)
    g = torch.Generator().manual_seed(3)
    scores = {grp.name: torch.rand(grp.size, generator=g) for grp in structure.of_kind("heads", "mlp", "embed")}
    batches = _batches()
    curves = sensitivity_curves(model, structure, scores, batches, probes=(0.25,))
    rates = exchange_rates(model, structure, scores, batches)
    assert set(curves) == set(rates) == {"heads", "mlp", "embed"}
    assert all(curves[k] == [rates[k]] for k in rates)
    assert all(rates[k] > 0 for k in rates)


def test_curves_are_measured_and_non_decreasing_and_leave_the_model_alone():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = vitopt.structure(model)
    g = torch.Generator().manual_seed(4)
    scores = {grp.name: torch.rand(grp.size, generator=g) for grp in structure.of_kind("heads", "mlp")}
    batches = _batches()
    curves = sensitivity_curves(model, structure, scores, batches)
    for kind, c in curves.items():
        assert len(c) == 3 and all(math.isfinite(r) and r >= 0 for r in c), (kind, c)
        assert all(b >= a for a, b in zip(c, c[1:])), (kind, c)
        # the hull ends at the loss measured at the deepest probe: sum of rate x score removed per segment
        groups = [n for n in scores if structure.groups[n].kind == kind]
        removed = [sum(float(torch.sort(scores[n]).values[:int(p * len(scores[n]))].sum()) for n in groups)
                   for p in (0.25, 0.5, 0.75)]
        deepest = exchange_rates(model, structure, scores, batches, probe=0.75)[kind] * removed[-1]
        assert deepest > 0
        area = sum(r * (b - a) for r, a, b in zip(c, [0.0, *removed], removed))
        assert area == pytest.approx(deepest, rel=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not model.training


@pytest.mark.parametrize("probes", [(), (0.5, 0.25), (0.0, 0.5), (0.5, 1.0)])
def test_bad_probes_are_one_sentence(probes):
    model = _tiny()
    structure = vitopt.structure(model)
    scores = {grp.name: torch.rand(grp.size) for grp in structure.of_kind("mlp")}
    with pytest.raises(VitoptError, match="probes must be strictly increasing"):
        sensitivity_curves(model, structure, scores, _batches(1), probes=probes)


def test_prune_with_calibrated_curve_records_the_curves_and_meets_the_budget():
    model = _tiny()
    res = vitopt.prune_with_report(model, target={"flops": 0.5}, data=_batches(), compare="calibrated_curve",
                                   round_to={"heads": 1, "head_dim": 2, "mlp": 2, "embed": 2})
    (rnd,) = res.rounds
    assert set(rnd["rate_curves"]) == {"embed", "heads", "head_dim", "mlp"}
    assert rnd["exchange_rates"] == {k: c[0] for k, c in rnd["rate_curves"].items()}
    assert 0.495 * rnd["budget"] / 0.5 <= rnd["achieved"] <= rnd["budget"]
