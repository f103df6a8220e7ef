"""Table 1 and the per-decile coverage of a model's calibration, offline, on raw windows
saved by benchmarks/suite_raw_windows.py (the same numbers as ``dle-stream bench`` with
that model, without simulating again).

    python benchmarks/suite_offline.py MODEL RAW.npz
"""
import sys

import numpy as np

from dle_stream.evaluation.bench import SuiteResult, metrics
from dle_stream.likelihood import posterior

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from combine_offline import calibrated  # noqa: E402


def evaluate(path, cfg) -> dict:
    """bench's own metrics (:func:`dle_stream.evaluation.bench.metrics`) of the DLE with
    calibration ``cfg`` on the saved raw windows."""
    d = np.load(path)
    d_true = d["d_true"]
    post = posterior(calibrated(d["raw"], cfg), cfg.grid, float(d["d_max"]))
    n = d_true.size
    res = SuiteResult(str(d["suite"]), n, int(d["seed"]), d_true, np.zeros(n), np.zeros(n),
                      prior=(float(d["prior_mean"]), float(d["prior_std"])))
    res.estimates["dle"] = (post.d, post.sigma)
    res.intervals["dle"] = (post.lo68, post.hi68)
    res.seconds["dle"] = 0.0
    return metrics(res)["dle"]


def report(m: dict) -> str:
    lines = [f"L1 {m['l1']:.4g}, best half {m['best_half_l1']:.4g}, 68 % interval holds D {m['interval68_coverage']:.2f}"]
    for r in m["by_decile"]:
        lines.append(f"  {r['d_lo']:8.4g}–{r['d_hi']:<8.4g} n {r['n']:4d} L1 {r['l1']:.4g} bias {r['bias']:+.4g} "
                     f"c68 {r['interval68_coverage']:.2f}")
    c = [r["interval68_coverage"] for r in m["by_decile"]]
    lines.append(f"decile 68 % coverage {min(c):.2f}–{max(c):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from dle_stream.model_package import load_model_package

    model, _ = load_model_package(sys.argv[1])
    print(report(evaluate(sys.argv[2], model.config)))
