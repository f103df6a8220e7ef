"""`dle-stream bench`: estimators side by side on a seeded simulated suite (the paper's
Table 1 and Fig. 3A/B).

The suite is simulated once from its seed (identical for every estimator), in batches.
Each estimator returns D̂ and σ̂ (µm²/s) per movie and is timed per 400-frame window.
An estimator that finds nothing usable in a movie (NaN) is scored there as the prior
mean with the prior's std as σ — what a user would have without it — and the number of
such movies is reported ("no estimate").

Outputs in ``--out``: ``results.json`` (every movie, every metric), ``table.md``, and PNG
plots: error against visible transitions, D̂ against D, and the z = (D̂ − D)/σ̂ histogram.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dle_stream import __version__
from dle_stream.errors import ParameterError, arg
from dle_stream.evaluation.bench_files import SUITE_FILES, check_replaceable, save_figure, write_text
from dle_stream.evaluation.metrics import json_safe, prior_baseline, summarize

ALL_ESTIMATORS = ("dle", "classic", "rics", "oracle")
SUITE_MODELS = {"low": "brain-qd-low", "high": "beads-high"}


@dataclass
class SuiteResult:
    suite: str
    n: int
    seed: int
    d_true: np.ndarray
    visible: np.ndarray
    n_particles: np.ndarray
    estimates: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    intervals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # 68 % (lo, hi)
    seconds: dict[str, float] = field(default_factory=dict)
    prior: tuple[float, float] = (0.0, 1.0)  # mean, std


def run_suite(suite: str, n: int, seed: int, estimators: list[str], model: str | None = None, batch: int = 32,
              progress: Callable[[int], None] | None = None, device: str = "cpu",
              stress: str | None = None) -> SuiteResult:
    """Simulate suite ``suite`` (low or high) and run ``estimators`` on it.

    ``stress`` "NAME:weak" or "NAME:strong" adds one effect of a real sample
    (:data:`dle_stream.training.priors.STRESSES`) to the suite's priors; the estimators are
    not told (the classic tracker keeps the preset's PSF width).
    """
    from dle_stream.training.priors import get_preset, stressed
    from dle_stream.training.simulator import Simulator

    bad = [e for e in estimators if e not in ALL_ESTIMATORS]
    if bad or not estimators:
        raise ParameterError(f"{arg('estimators', placeholder=','.join(estimators))}: choose from "
                             f"{','.join(ALL_ESTIMATORS)}")
    if suite not in SUITE_MODELS:
        raise ParameterError(f"{arg('suite', placeholder=suite)}: no such suite; use "
                             f"{arg('suite', placeholder=', '.join(SUITE_MODELS) + ' or combine')}")
    if n < 2:
        raise ParameterError(f"{arg('n', n)}: need at least 2 movies")
    preset = get_preset(suite)
    p, timing = preset.priors, preset.timing
    label = suite
    if stress:
        name, _, strength = stress.partition(":")
        p = stressed(p, name, strength or "weak")
        label = f"{suite}+{name}:{strength or 'weak'}"
    sim = Simulator(p, timing, preset.tile_height, preset.tile_width, preset.frames, device)
    runners: dict[str, Callable] = {}
    if "dle" in estimators:
        from dle_stream.estimator import DiffusionEstimator

        dle = DiffusionEstimator.load(model or SUITE_MODELS[suite], device=device)
        def run_dle(b):
            post = dle.estimate_posterior(b.movies.cpu().numpy(), timing)
            return post.d, post.sigma, post.lo68, post.hi68

        runners["dle"] = run_dle
    if "classic" in estimators:
        from dle_stream.classic import ClassicEstimator

        classic = ClassicEstimator(timing, psf_sigma_xy_um=preset.priors.psf_sigma_xy_um[0], d_max_um2_s=p.d_max_um2_s,
                                   d_min_um2_s=p.d_min_um2_s)
        runners["classic"] = lambda b: classic.estimate_batch(b.movies.cpu().numpy())[:2]
    if "rics" in estimators:
        from dle_stream.rics import RicsEstimator

        # σxy fitted per movie: the simulator varies it (±0.05 µm), and fixing it to the prior
        # mean was measured far worse (low-suite L1 0.39 vs 0.16)
        rics = RicsEstimator(timing, psf_sigma_xy_um=None, d_max_um2_s=p.d_max_um2_s, d_min_um2_s=p.d_min_um2_s)
        runners["rics"] = lambda b: rics.estimate_batch(b.movies.cpu().numpy())[:2]
    if "oracle" in estimators:
        from dle_stream.evaluation.oracle import oracle_batch

        runners["oracle"] = lambda b: oracle_batch(b, p.d_min_um2_s, p.d_max_um2_s)
    g = torch.Generator(device=device).manual_seed(seed)
    d_true, vis, parts = [], [], []
    est: dict[str, list] = {k: [[], [], [], []] for k in runners}
    secs = {k: 0.0 for k in runners}
    done = 0
    while done < n:
        m = min(batch, n - done)
        b = sim.simulate(m, generator=g)
        d_true.append(b.d_um2_s.cpu().numpy())
        vis.append(b.visible_transitions.cpu().numpy())
        parts.append(b.n_particles.cpu().numpy())
        for name, fn in runners.items():
            t0 = time.perf_counter()
            out = fn(b)
            secs[name] += time.perf_counter() - t0
            for i, values in enumerate(out):
                est[name][i].append(np.asarray(values, float).reshape(-1))
        done += m
        if progress:
            progress(m)
    res = SuiteResult(label, n, seed, np.concatenate(d_true), np.concatenate(vis), np.concatenate(parts),
                      prior=(p.d_mean_um2_s, p.d_std_um2_s))
    for name in runners:
        res.estimates[name] = (np.concatenate(est[name][0]), np.concatenate(est[name][1]))
        if est[name][2]:
            res.intervals[name] = (np.concatenate(est[name][2]), np.concatenate(est[name][3]))
        res.seconds[name] = secs[name]
    return res


def _filled(res: SuiteResult, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    d, s = res.estimates[name]
    bad = ~(np.isfinite(d) & np.isfinite(s) & (s > 0))
    return np.where(bad, res.prior[0], d), np.where(bad, res.prior[1], s), int(bad.sum())


def metrics(res: SuiteResult) -> dict:
    out = {"baseline": prior_baseline(res.d_true, *res.prior)}
    for name in res.estimates:
        d, s, failed = _filled(res, name)
        m: dict[str, Any] = summarize(res.d_true, d, s)
        m["no_estimate"] = failed
        m["ms_per_window"] = 1e3 * res.seconds[name] / res.n
        m["by_decile"] = decile_coverage(res, name)
        if name in res.intervals:
            lo, hi = res.intervals[name]
            m["interval68_coverage"] = float(np.mean((lo <= res.d_true) & (res.d_true <= hi)))
        out[name] = m
    return out


def decile_coverage(res: SuiteResult, name: str) -> list[dict]:
    """Per decile of the true D: L1, bias, |err| < σ̂, and the 68 % interval's coverage (where given)."""
    d, s, _ = _filled(res, name)
    edges = np.quantile(res.d_true, np.linspace(0, 1, 11))
    rows = []
    for i in range(10):
        sel = (res.d_true >= edges[i]) & ((res.d_true < edges[i + 1]) if i < 9 else (res.d_true <= edges[i + 1]))
        if not sel.any():
            continue
        err = d[sel] - res.d_true[sel]
        row = {"d_lo": float(edges[i]), "d_hi": float(edges[i + 1]), "n": int(sel.sum()),
               "l1": float(np.mean(np.abs(err))), "bias": float(np.mean(err)),
               "within_1_sigma": float(np.mean(np.abs(err) < s[sel]))}
        if name in res.intervals:
            lo, hi = (a[sel] for a in res.intervals[name])
            row["interval68_coverage"] = float(np.mean((lo <= res.d_true[sel]) & (res.d_true[sel] <= hi)))
        rows.append(row)
    return rows


def decile_table(m: dict, name: str = "dle") -> str:
    """Markdown: calibration of ``name`` per decile of the true D."""
    rows = m[name]["by_decile"]
    lines = ["| true D (µm²/s) | n | L1 | bias | \\|err\\|<σ̂ | 68 % interval holds D |", "|---|---|---|---|---|---|"]
    for r in rows:
        cov = r.get("interval68_coverage")
        lines.append(f"| {r['d_lo']:.3g}–{r['d_hi']:.3g} | {r['n']} | {_f(r['l1'])} | {_f(r['bias'])} | "
                     f"{_f(r['within_1_sigma'], 2)} | {'—' if cov is None else _f(cov, 2)} |")
    return "\n".join(lines) + "\n"


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}g}"


def markdown_table(res: SuiteResult, m: dict) -> str:
    lines = [f"**{res.suite}** suite: {res.n} movies, seed {res.seed} (D uniform, prior mean {res.prior[0]:g} µm²/s)", "",
             "| | All L1 | All L2 | All NLL | Best-half L1 | Best-half L2 | Best-half NLL | \\|err\\|<σ | \\|err\\|<2σ | no estimate | ms/window |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = ["baseline"] + [k for k in ("classic", "rics", "oracle", "dle") if k in m]
    for k in order:
        r = m[k]
        half = ("/", "/", "/") if k == "baseline" else (_f(r["best_half_l1"]), _f(r["best_half_l2"]), _f(r["best_half_nll"]))
        lines.append(f"| {k} | {_f(r['l1'])} | {_f(r['l2'])} | {_f(r['nll'])} | {half[0]} | {half[1]} | {half[2]} | "
                     f"{_f(r['within_1_sigma'], 2)} | {_f(r['within_2_sigma'], 2)} | {r.get('no_estimate', 0)} | "
                     f"{_f(r.get('ms_per_window'), 3) if k != 'baseline' else '—'} |")
    if "dle" in m and "classic" in m and m["dle"]["l1"] > 0:
        lines += ["", f"classic L1 / DLE L1 = {m['classic']['l1'] / m['dle']['l1']:.2f}; "
                      f"best half: {m['classic']['best_half_l1'] / m['dle']['best_half_l1']:.2f}"]
    if "dle" in m:
        cov = m["dle"].get("interval68_coverage")
        lines += ["", "DLE per decile of true D" + (f" (68 % interval holds D in {cov:.0%} overall)" if cov else "")
                  + ":", "", decile_table(m, "dle")]
    return "\n".join(lines) + "\n"


def plots(res: SuiteResult, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    names = list(res.estimates)
    colours = {"dle": "tab:red", "classic": "tab:blue", "rics": "tab:purple", "oracle": "tab:green"}
    # error against visible transitions (paper Fig. 3A/B)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = np.argsort(res.visible)
    x = np.maximum(res.visible[order], 1)
    win = max(5, res.n // 20)
    for name in names:
        d, s, _ = _filled(res, name)
        err = np.abs(d - res.d_true)[order]
        ax.scatter(x, err, s=4, alpha=0.25, color=colours.get(name))
        if err.size >= win:  # a rolling mean needs ``win`` movies (np.convolve would swap its arguments)
            roll = np.convolve(err, np.ones(win) / win, mode="valid")
            ax.plot(x[win // 2: win // 2 + roll.size], roll, color=colours.get(name), label=f"{name} (rolling mean)")
        best = np.argsort(s)[: res.n // 2]
        mask = np.zeros(res.n, bool)
        mask[best] = True
        e_half = np.abs(d - res.d_true)[order][mask[order]]
        if e_half.size > win:
            r2 = np.convolve(e_half, np.ones(win) / win, mode="valid")
            xh = x[mask[order]]
            ax.plot(xh[win // 2: win // 2 + r2.size], r2, color=colours.get(name), ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("visible particle transitions")
    ax.set_ylabel("|D̂ − D| (µm²/s)")
    ax.set_title(f"{res.suite} suite: error vs information (dashed: best half by σ̂)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    paths.append(save_figure(fig, out, "error_vs_transitions.png"))
    # D̂ against D
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    lim = float(res.d_true.max()) * 1.05
    for ax, name in zip(axes[0], names):
        d, s, _ = _filled(res, name)
        ax.scatter(res.d_true, d, s=4, alpha=0.4, color=colours.get(name))
        ax.plot([0, lim], [0, lim], "k--", lw=1)
        ax.set_xlim(0, lim)
        ax.set_ylim(0, lim)
        ax.set_title(name)
        ax.set_xlabel("true D (µm²/s)")
        ax.set_ylabel("D̂ (µm²/s)")
    fig.tight_layout()
    paths.append(save_figure(fig, out, "estimate_vs_truth.png"))
    # z distribution
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(-5, 5, 201)
    for name in names:
        d, s, _ = _filled(res, name)
        z = np.clip((d - res.d_true) / s, -5, 5)
        ax.hist(z, bins=50, range=(-5, 5), density=True, histtype="step", color=colours.get(name), label=name)
    ax.plot(grid, np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi), "k--", lw=1, label="N(0, 1)")
    ax.set_xlabel("z = (D̂ − D) / σ̂")
    ax.legend()
    fig.tight_layout()
    paths.append(save_figure(fig, out, "z_distribution.png"))
    return paths


def write_results(res: SuiteResult, out: Path, command: str) -> dict:
    """Write results.json, table.md and the plots into ``out`` (:data:`SUITE_FILES`; an
    earlier bench's are replaced, anyone else's refused); returns the metrics."""
    check_replaceable(out, SUITE_FILES)
    out.mkdir(parents=True, exist_ok=True)
    m = metrics(res)
    doc = {
        "software": f"dle-stream {__version__}", "command": command, "suite": res.suite, "n": res.n, "seed": res.seed,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "nan_rule": "movies without an estimate are scored as the prior mean with the prior std",
        "metrics": json_safe(m),
        "movies": {"d_true": res.d_true.tolist(), "visible_transitions": res.visible.tolist(),
                   "n_particles": res.n_particles.tolist(),
                   **{f"{k}_d": v[0].tolist() for k, v in res.estimates.items()},
                   **{f"{k}_sigma": v[1].tolist() for k, v in res.estimates.items()}},
    }
    write_text(out, "results.json", json.dumps(json_safe(doc)))
    write_text(out, "table.md", markdown_table(res, m))
    plots(res, out)
    return m
