"""benchmarks/acceptance_odds.py: the acceptance's rule over every k-seed subset, each contestant in turn."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import acceptance_odds as O  # noqa: E402

TOP1 = {"vitopt": [90.0, 90.0, 90.0, 90.0], "tp-taylor": [90.0, 90.0, 90.0, 87.0],
        "tp-magnitude": [89.0, 93.0, 89.0, 89.0]}
#: tp-magnitude lands 4% over the 0.5 target on seed 1: outside the 2% tolerance in every subset with seed 1
FLOPS = {("tp-magnitude", 1): 0.52}


def _doc():
    runs = [{"seed": s, "target": 0.5, "method": m, "tool": "vitopt" if m == "vitopt" else "torch-pruning",
             "top1": v, "top1_pruned": v, "flops_ratio": FLOPS.get((m, s), 0.499), "params_ratio": 0.5}
            for m, vals in TOP1.items() for s, v in enumerate(vals)]
    return {"config": {"tp_over": 0.02}, "runs": runs}


def test_pass_counts_by_hand_over_the_four_3_seed_subsets():
    rows = {r["method"]: r for r in O.odds(_doc(), k=3)}
    assert {m: r["subsets"] for m, r in rows.items()} == {"vitopt": 4, "tp-taylor": 4, "tp-magnitude": 4}
    # vitopt: a tie on (0,1,2) counts as at or above; tp-magnitude's 90.33 is outside the tolerance where
    # it contains seed 1 and 89 elsewhere
    assert rows["vitopt"]["passed"] == 4
    assert rows["tp-taylor"]["passed"] == 1          # only (0,1,2), tied with vitopt
    assert rows["tp-magnitude"]["passed"] == 0       # over budget with seed 1, below vitopt without it
    assert rows["vitopt"]["rate"] == 1.0 and rows["tp-taylor"]["rate"] == 0.25


def test_too_few_shared_seeds_is_an_error():
    doc = _doc()
    doc["runs"] = [r for r in doc["runs"] if not (r["method"] == "tp-taylor" and r["seed"] >= 2)]
    with pytest.raises(ValueError, match="only 2 seeds have every contestant"):
        O.odds(doc, k=3)
