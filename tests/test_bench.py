"""`dle-stream bench` end to end on a tiny suite, and the metrics against hand-computed values."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from dle_stream import DleStreamError
from dle_stream.cli import app
from dle_stream.evaluation.metrics import calibration, prior_baseline, summarize


def test_metrics_against_hand_computed_values():
    d = np.array([1.0, 2.0, 3.0, 4.0])
    d_hat = np.array([1.5, 2.0, 2.0, 4.0])
    sigma = np.array([0.5, 1.0, 2.0, 4.0])
    m = summarize(d, d_hat, sigma)
    assert m["l1"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    assert m["l2"] == pytest.approx((0.25 + 0 + 1 + 0) / 4)
    nll = np.mean([0.25 / 0.5 + math.log(0.5), 0 + math.log(1.0), 1 / 8 + math.log(2.0), 0 + math.log(4.0)])
    assert m["nll"] == pytest.approx(nll)
    # best half = the two smallest σ̂: movies 0 and 1
    assert m["best_half_l1"] == pytest.approx(0.25)
    assert m["best_half_l2"] == pytest.approx(0.125)
    c = calibration(d, d_hat, sigma)
    # |z| = 1, 0, 0.5, 0 → < 1: three of four; < 2: all
    assert c["within_1_sigma"] == pytest.approx(0.75) and c["within_2_sigma"] == pytest.approx(1.0)
    nan = summarize(d, np.array([1.0, np.nan, 3.0, 4.0]), sigma)
    assert nan["n_failed"] == 1 and nan["l1"] == pytest.approx(0.0)


def test_prior_baseline_matches_the_paper_for_the_low_suite():
    # the paper's Table 1 baseline row for D ~ U(0, 1.5): L1 0.375, L2 0.187, NLL −0.33
    d = np.linspace(0, 1.5, 200001)
    b = prior_baseline(d, 0.75, 1.5 / math.sqrt(12))
    assert b["l1"] == pytest.approx(0.375, abs=1e-3)
    assert b["l2"] == pytest.approx(0.1875, abs=1e-3)
    assert b["nll"] == pytest.approx(-0.337, abs=0.01)


def test_bench_runs_end_to_end_on_a_tiny_suite(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--suite", "low", "--n", "6", "--estimators", "classic,rics,oracle",
                                      "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["n"] == 6 and len(doc["movies"]["d_true"]) == 6
    assert set(doc["metrics"]) == {"baseline", "classic", "rics", "oracle"}
    assert doc["metrics"]["oracle"]["ms_per_window"] > 0
    table = (out / "table.md").read_text()
    assert "| oracle |" in table and "| classic |" in table and "| rics |" in table and "| baseline |" in table
    for png in ("error_vs_transitions.png", "estimate_vs_truth.png", "z_distribution.png"):
        assert (out / png).stat().st_size > 1000
    # the same seed gives the same suite
    again = tmp_path / "again"
    CliRunner().invoke(app, ["bench", "--suite", "low", "--n", "6", "--estimators", "oracle", "--out", str(again),
                             "--seed", "3"])
    assert json.loads((again / "results.json").read_text())["movies"]["d_true"] == doc["movies"]["d_true"]


def test_bench_refuses_unknown_estimators(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--estimators", "magic", "--n", "4", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--estimators" in result.output


def test_a_stressed_suite_names_its_stress_and_refuses_an_unknown_one():
    from dle_stream.evaluation.bench import run_suite

    res = run_suite("low", 4, 3, ["rics"], stress="dim:strong", batch=4)
    assert res.suite == "low+dim:strong" and len(res.estimates["rics"][0]) == 4
    with pytest.raises(DleStreamError, match="unknown stress"):
        run_suite("low", 4, 3, ["rics"], stress="fog:weak")
