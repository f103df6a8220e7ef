"""`dle-stream bench --suite combine`: are the *combined* numbers honest?

For true D on a grid inside the model's range (10 values, 5 %…95 % of d_max) and beyond it
(1.2, 1.5, 2 and 3 × d_max), ``n × 16`` independent movies of that D are simulated (the
range's preset otherwise: the paper's priors and scan; ``density`` "cloud", the paper's
spreading cloud, or "box", a steady density as in a sample) and turned into window
log-likelihoods by the model. They are combined in disjoint groups of K = 1, 4 and 16 —
16·n/K groups per K (n of 16, 4n of 4, 16n single windows), every movie used once per K — exactly as the runner combines independent
windows (:func:`dle_stream.likelihood.combine`). Per cell (D, K): bias of the combined D,
z = (D̂ − D)/σ̂ mean and std, how often the 68 % and 95 % intervals hold the true D, how
often the result is flagged above the range or as saying little, and how often the
disagreement test fires (false alarms: every group is homogeneous).
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dle_stream import __version__
from dle_stream.combine import DISAGREE_P, disagreement_p
from dle_stream.errors import ParameterError, arg
from dle_stream.evaluation.bench_files import COMBINE_FILES, check_replaceable, save_figure, write_text
from dle_stream.evaluation.metrics import json_safe
from dle_stream.likelihood import combine, posterior

INSIDE = tuple(np.round(np.linspace(0.05, 0.95, 10), 3))
BEYOND = (1.2, 1.5, 2.0, 3.0)
KS = (1, 4, 16)


def run_combine(model: str, n: int = 100, seed: int = 20_241_101, batch: int = 32,
                fractions: tuple[float, ...] = INSIDE + BEYOND, ks: tuple[int, ...] = KS,
                progress: Callable[[int], None] | None = None, device: str = "cpu", density: str = "cloud") -> dict:
    """Measure combined estimates of ``model``; returns the results document (see module doc)."""
    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.training.calibration import simulate_cells

    if n < 2:
        raise ParameterError(f"{arg('n', n)}: need at least 2 groups per cell")
    if density not in ("cloud", "box"):
        raise ParameterError(f"{arg('density', density)}: must be cloud (the paper's spreading cloud) or box (steady density)")
    est = DiffusionEstimator.load(model, device=device)
    card = est.card
    d_max = float(card.d_max_um2_s)
    all_cells = simulate_cells(est, tuple(fractions), n * max(ks), seed=seed, batch=batch, progress=progress,
                               density=density)
    cells = []
    for frac, ll in zip(fractions, all_cells):
        d_true = frac * d_max
        for k in ks:
            # every simulated window counts at every K: n groups of the largest K, more of smaller
            # ones (at K = 1, 16·n windows: coverage measured to ±1 % rather than ±5 %)
            n_k = n * max(ks) // k
            groups = ll[: n_k * k].reshape(n_k, k, -1)
            post = posterior(combine(groups, axis=1), est.grid, d_max, n_windows=np.full(n_k, k))
            z = (post.d - d_true) / post.sigma
            cells.append({
                "d_fraction": float(frac), "d_true_um2_s": d_true, "k": k, "n": n_k,
                "bias_um2_s": float(np.mean(post.d - d_true)),
                "median_d_um2_s": float(np.median(post.d)),
                "z_mean": float(np.mean(z)), "z_std": float(np.std(z)),
                "coverage68": float(np.mean((post.lo68 <= d_true) & (d_true <= post.hi68))),
                "coverage95": float(np.mean((post.lo95 <= d_true) & (d_true <= post.hi95))),
                "above_range": float(np.mean(post.above_range)),
                "above_or_little_information": float(np.mean(post.above_range | post.little_information)),
                "little_information": float(np.mean(post.little_information & ~post.above_range)),
                "disagree_false_alarm": (float(np.mean(disagreement_p(groups, axis=1, lr_scale=est.grid.lr_scale) < DISAGREE_P))
                                         if k > 1 else None),
            })
    return {
        "software": f"dle-stream {__version__}", "model": card.name, "d_max_um2_s": d_max, "seed": seed, "n": n,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "priors": f"the model's simulator priors, operating range and {density} density, D fixed per cell",
        "density": density,
        "cells": cells,
    }


def markdown(doc: dict) -> str:
    """Two tables: inside the range (bias, z, coverage per K) and beyond it (flag rates)."""
    cells = doc["cells"]
    ks = sorted({c["k"] for c in cells})
    head = [f"**{doc['model']}** (d_max {doc['d_max_um2_s']:g} µm²/s): n = {doc['n']} groups of 16 per cell (every window at every K), seed {doc['seed']}, "
            f"{doc.get('density', 'cloud')} density",
            "", "Inside the range: bias and z = (D̂ − D)/σ̂ of the combined estimate, 68 %/95 % interval coverage, "
            "flagged above the range, disagreement false alarms:", "",
            "| D / d_max | D (µm²/s) | K | bias | z mean | z std | 68 % | 95 % | above | disagree |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    rows, beyond = [], []
    for c in cells:
        fa = "—" if c["disagree_false_alarm"] is None else f"{c['disagree_false_alarm']:.2f}"
        if c["d_fraction"] <= 1:
            rows.append(f"| {c['d_fraction']:.2f} | {c['d_true_um2_s']:.3g} | {c['k']} | {c['bias_um2_s']:+.3g} | "
                        f"{c['z_mean']:+.2f} | {c['z_std']:.2f} | {c['coverage68']:.2f} | {c['coverage95']:.2f} | "
                        f"{c['above_range']:.2f} | {fa} |")
        else:
            beyond.append(f"| {c['d_fraction']:.1f} | {c['d_true_um2_s']:.3g} | {c['k']} | {c['above_range']:.2f} | "
                          f"{c['above_or_little_information']:.2f} | {c['median_d_um2_s']:.3g} |")
    tail = ["", "Beyond the range: share flagged above the range, and above the range or saying too little to tell:", "",
            "| D / d_max | D (µm²/s) | K | flagged above | above or little information | median D̂ (µm²/s) |",
            "|---|---|---|---|---|---|"]
    summary = _summary(cells, ks)
    return "\n".join(head + rows + tail + beyond + ["", summary]) + "\n"


def _summary(cells: list[dict], ks: list[int]) -> str:
    inside = [c for c in cells if 0.1 <= c["d_fraction"] <= 0.9]
    k16 = [c for c in inside if c["k"] == max(ks)]
    parts = []
    if k16:
        parts.append(f"K = {max(ks)} inside 10–90 %: |z mean| ≤ {max(abs(c['z_mean']) for c in k16):.2f}, "
                     f"z std {min(c['z_std'] for c in k16):.2f}–{max(c['z_std'] for c in k16):.2f}")
    if inside:
        parts.append(f"68 % coverage {min(c['coverage68'] for c in inside):.2f}–{max(c['coverage68'] for c in inside):.2f} "
                     f"(all K)")
    low = [c for c in cells if c["d_fraction"] <= 0.8]
    if low:
        parts.append(f"flagged above at D ≤ 0.8·d_max: ≤ {max(c['above_range'] for c in low):.2f}")
    high = [c for c in cells if c["d_fraction"] >= 1.2]
    if high:
        one = [c["above_or_little_information"] for c in high if c["k"] == 1]
        many = [c["above_range"] for c in high if c["k"] == max(ks)]
        if one:
            parts.append(f"D ≥ 1.2·d_max: single windows flagged (above or little information) ≥ {min(one):.2f}")
        if many:
            parts.append(f"K = {max(ks)} flagged above ≥ {min(many):.2f}")
    alarms = [c["disagree_false_alarm"] for c in cells if c["disagree_false_alarm"] is not None and c["d_fraction"] <= 1]
    if alarms:
        parts.append(f"disagreement false alarms (homogeneous groups, inside the range): mean {np.mean(alarms):.3f}, "
                     f"max {max(alarms):.2f}")
    return "; ".join(parts) + "."


def write(doc: dict, out: Path) -> None:
    """Write combine.json, combine.md and combine.png into ``out`` (:data:`COMBINE_FILES`;
    an earlier bench's are replaced, anyone else's refused)."""
    check_replaceable(out, COMBINE_FILES)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out, "combine.json", json.dumps(json_safe(doc), indent=1))
    write_text(out, "combine.md", markdown(doc))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cells = [c for c in doc["cells"] if c["d_fraction"] <= 1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted({c["k"] for c in cells}):
        sel = [c for c in cells if c["k"] == k]
        x = [c["d_fraction"] for c in sel]
        axes[0].plot(x, [c["coverage68"] for c in sel], "o-", label=f"K = {k}")
        axes[1].plot(x, [c["z_mean"] for c in sel], "o-", label=f"K = {k}")
    axes[0].axhspan(0.60, 0.76, color="0.9")
    axes[0].axhline(0.6827, color="k", lw=1, ls="--")
    axes[0].set_ylabel("68 % interval holds the true D")
    axes[1].axhspan(-0.25, 0.25, color="0.9")
    axes[1].set_ylabel("mean z of the combined estimate")
    for ax in axes:
        ax.set_xlabel("true D / d_max")
        ax.legend()
    fig.suptitle(f"{doc['model']}: combined estimates of K independent windows")
    fig.tight_layout()
    save_figure(fig, out, "combine.png")
