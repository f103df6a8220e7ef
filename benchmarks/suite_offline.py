"""Table 1 and the per-decile coverage of a model's calibration, offline, on raw windows
saved by benchmarks/suite_raw_windows.py (the same numbers as ``dle-stream bench`` with
that model, without simulating again).

    python benchmarks/suite_offline.py MODEL RAW.npz
"""
import sys

import numpy as np

from dle_stream.evaluation.metrics import summarize
from dle_stream.likelihood import posterior

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from combine_offline import calibrated  # noqa: E402


def evaluate(path, cfg) -> dict:
    d = np.load(path)
    raw, d_true, d_max = d["raw"], d["d_true"], float(d["d_max"])
    post = posterior(calibrated(raw, cfg), cfg.grid, d_max)
    out = summarize(d_true, post.d, post.sigma)
    out["interval68_coverage"] = float(np.mean((post.lo68 <= d_true) & (d_true <= post.hi68)))
    edges = np.quantile(d_true, np.linspace(0, 1, 11))
    out["deciles"] = []
    for i in range(10):
        sel = (d_true >= edges[i]) & ((d_true < edges[i + 1]) if i < 9 else (d_true <= edges[i + 1]))
        err = post.d[sel] - d_true[sel]
        out["deciles"].append(dict(lo=float(edges[i]), hi=float(edges[i + 1]), n=int(sel.sum()),
                                   l1=float(np.mean(np.abs(err))), bias=float(np.mean(err)),
                                   c68=float(np.mean((post.lo68[sel] <= d_true[sel]) & (d_true[sel] <= post.hi68[sel])))))
    return out


def report(m: dict) -> str:
    lines = [f"L1 {m['l1']:.4g}, best half {m['best_half_l1']:.4g}, 68 % interval holds D {m['interval68_coverage']:.2f}"]
    for r in m["deciles"]:
        lines.append(f"  {r['lo']:8.4g}–{r['hi']:<8.4g} n {r['n']:4d} L1 {r['l1']:.4g} bias {r['bias']:+.4g} c68 {r['c68']:.2f}")
    c = [r["c68"] for r in m["deciles"]]
    lines.append(f"decile 68 % coverage {min(c):.2f}–{max(c):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from dle_stream.model_package import load_model_package

    model, _ = load_model_package(sys.argv[1])
    print(report(evaluate(sys.argv[2], model.config)))
