"""The recording check (issue 14 item 4) on the stress suites: how often it warns, per
stress and strength, and on clean movies of the model's own suite.

    python benchmarks/recording_check.py --suite low --n 100 --out benchmarks/results/check-low.md

Every movie is one model tile of one window (as in `dle-stream bench` and
benchmarks/stress_suites.py, same seed and batches, so the same movies), checked alone
against the model's reference ranges (dle_stream.recording_check.reference). A real
recording has many tiles and the check takes their median, so its values scatter less.
The per-movie values are written beside the table (``.json``) so that other ranges can be
evaluated without simulating again.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dle_stream.evaluation.bench import SUITE_MODELS
from dle_stream.recording_check import NAMES, QUANTITIES, compare, movie_statistics, reference, training_priors
from dle_stream.training.priors import STRESSES, get_preset, stressed
from dle_stream.training.simulator import Simulator


def measure(suite: str, stress: str | None, n: int, seed: int, psf_guess_um: float) -> dict[str, list[float]]:
    preset = get_preset(suite)
    p = preset.priors
    if stress:
        name, _, strength = stress.partition(":")
        p = stressed(p, name, strength)
    sim = Simulator(p, preset.timing, preset.tile_height, preset.tile_width, preset.frames)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {k: [] for k in (*NAMES, "motion_hz", "d_true")}
    done = 0
    while done < n:
        m = min(32, n - done)
        b = sim.simulate(m, generator=g)
        for movie, d in zip(b.movies.cpu().numpy(), b.d_um2_s.cpu().numpy()):
            st = movie_statistics(movie, preset.timing.pixel_size_um, preset.timing.frame_period_us * 1e-6,
                                  psf_guess_um)
            for k, v in st.items():
                out[k].append(v)
            out["d_true"].append(float(d))
        done += m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="low", choices=("low", "high"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20_241_001)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or SUITE_MODELS[args.suite]
    t_all = time.time()
    ref = reference(model)
    t_ref = time.time() - t_all
    from dle_stream.model_package import load_card, resolve_model

    psf = training_priors(load_card(resolve_model(model))).psf_sigma_xy_um[0]
    rows = [("clean", None)] + [(f"{k} ({s})", f"{k}:{s}") for k in STRESSES for s in ("weak", "strong")]
    ranges = {q.name: ref.range_of(q.name) for q in QUANTITIES}
    head = ("| suite | warns | " + " | ".join(f"{q.label}" for q in QUANTITIES) + " | median "
            + " / ".join(q.name for q in QUANTITIES) + " | s |")
    lines = [head, "|" + "---|" * (len(QUANTITIES) + 4)]
    raw: dict[str, dict[str, list[float]]] = {}
    for label, stress in rows:
        t0 = time.time()
        vals = measure(args.suite, stress, args.n, args.seed, psf)
        raw[label] = vals
        per_q = {q.name: 0 for q in QUANTITIES}
        warned = 0
        for i in range(args.n):
            res = compare({k: np.array([vals[k][i]]) for k in (*NAMES, "motion_hz")}, ref)
            warned += not res.ok
            for r in res.outside:
                per_q[r.name] += 1
        med = [np.nanmedian(np.asarray(vals[q.name], float)) if np.isfinite(vals[q.name]).any() else math.nan
               for q in QUANTITIES]
        line = (f"| {label} | **{100 * warned / args.n:.0f} %** | "
                + " | ".join(f"{100 * per_q[q.name] / args.n:.0f} %" for q in QUANTITIES)
                + " | " + " / ".join(f"{m:.3g}" for m in med) + f" | {time.time() - t0:.0f} |")
        lines.append(line)
        print(line, flush=True)

    def rng(name: str) -> str:
        lo, hi = ranges[name]
        return (f"≤ {hi:.3g}" if lo is None else f"{lo:.3g}–{hi:.3g}") if hi is not None else "—"

    trained = [f"- {q.label} ({q.unit}): {rng(q.name)}" for q in QUANTITIES]
    doc = [f"# Recording check on the stress suites, {args.suite} ({model})", "",
           f"Command: `python benchmarks/recording_check.py --suite {args.suite} --n {args.n}"
           + (f" --model {args.model}" if args.model else "") + "`  ",
           f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch thread(s); "
           f"{datetime.now(timezone.utc).isoformat(timespec='minutes')}; {time.time() - t_all:.0f} s in all "
           f"(reference {t_ref:.0f} s, {ref.n_tiles} tiles, cached after the first run).", "",
           f"{args.n} movies per suite (one tile, {ref.frames} frames each), seed {args.seed}. "
           "Columns: share of movies the check warns on, and per quantity; then the median value per quantity.",
           "", "Trained ranges (reference percentiles):", ""] + trained + [""] + lines
    text = "\n".join(doc) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(raw).replace("NaN", "null"))
    print(text)


if __name__ == "__main__":
    main()
