"""The recording check (issue 14 item 4) on the stress suites: how often it warns, per
stress and strength, and on clean movies of the model's own suite.

    python benchmarks/recording_check.py --suite low --n 100 --out benchmarks/results/check-low.md

Every movie is one model tile of one window (as in `dle-stream bench` and
benchmarks/stress_suites.py, same seed and batches, so the same movies), checked alone
against the model's reference ranges (dle_stream.recording_check.reference). A real
recording has many tiles and the check takes their median, so its values scatter less:
the column "warns, 16 tiles" is the share of 200 random groups of 16 movies of the suite
(drawn without replacement, seeded) that the check warns on when it takes each quantity's
median over the group, as it does over a recording's tiles (the tiles of one stressed suite
still draw brightness, PSF, background and motion phase independently, so a real recording
of one sample scatters less than such a group).
The per-movie values are written beside the table (``.json``) so that other ranges can be
evaluated without simulating again.

    python benchmarks/recording_check.py --suite low --field-motion 30

instead simulates 30 recordings of 16 tiles per row (clean, motion weak, motion strong) in
which every tile moves at the recording's one heartbeat frequency (drawn from the stress's
1–7 Hz), and reports how often the check's whole-field motion (the tiles' correlation maps
added, as ``check_movie`` does) and the older median of the tiles' scores exceed the trained
range. The simulator draws each tile's motion phase and direction itself, so the tiles do not
move together as a real field does: the whole-field sum is, if anything, understated.

    python benchmarks/recording_check.py --suite low --recordings 100

instead simulates 100 recordings of 16 tiles of ONE sample per row (clean, blinking and dim,
weak and strong, and motion strong, whose frames the motion shears): brightness, background, PSF widths and gain drawn once per recording from
the suite's (stressed) prior and shared by its tiles, D drawn once and shared too, as in a
real sample; the check takes its values as ``check_movie`` does (medians over the tiles, the
blinking ratio pooled over them, the motion from the tiles' correlation maps added). The
column "oracle" is the share of recordings whose true brightness over the noise,
B / √(background + read noise²) in photons, lies below the 0.5 percentile of the same
quantity under the model card's prior: what a perfect brightness measurement would flag.
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
from dle_stream.recording_check import (
    QUANTITIES,
    VALUE_KEYS,
    compare,
    motion_score,
    movie_statistics,
    reference,
    shifts_from_correlation,
    training_priors,
)
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
    out: dict[str, list[float]] = {k: [] for k in (*VALUE_KEYS, "d_true", "snr_true")}
    lo_r, hi_r = p.read_noise_photons
    read2 = (lo_r * lo_r + lo_r * hi_r + hi_r * hi_r) / 3
    done = 0
    while done < n:
        m = min(32, n - done)
        b = sim.simulate(m, generator=g)
        snr = (b.params["brightness_photons"] / torch.sqrt(b.params["background_photons"] + read2)).cpu().numpy()
        for movie, d, q in zip(b.movies.cpu().numpy(), b.d_um2_s.cpu().numpy(), snr):
            st = movie_statistics(movie, preset.timing.pixel_size_um, preset.timing.frame_period_us * 1e-6,
                                  psf_guess_um)
            for k, v in st.items():
                out[k].append(v)
            out["d_true"].append(float(d))
            out["snr_true"].append(float(q))
        done += m
    return out


def field_motion(suite: str, n: int, tiles: int, seed: int, psf_guess_um: float, high: float) -> list[str]:
    """Rows of the whole-field motion table (see the module docstring)."""
    from dataclasses import replace

    preset = get_preset(suite)
    t = preset.timing
    fp = t.frame_period_us * 1e-6
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    lines = [f"| recordings of {tiles} tiles | n | warns (whole field) | warns (median of tiles) | median score, whole "
             "field / of tiles | s |", "|---|---|---|---|---|---|"]
    for label, strength in (("clean", None), ("motion (weak)", "weak"), ("motion (strong)", "strong")):
        t0 = time.time()
        field, median = [], []
        for _ in range(n):
            p = preset.priors
            if strength:
                f = float(rng.uniform(*stressed(p, "motion", strength).heartbeat_hz))
                p = replace(stressed(p, "motion", strength), heartbeat_hz=(f, f))
            b = Simulator(p, t, preset.tile_height, preset.tile_width, preset.frames).simulate(tiles, generator=g)
            maps: list[np.ndarray] = []
            scores = [movie_statistics(m, t.pixel_size_um, fp, psf_guess_um, correlation=maps)["motion"]
                      for m in b.movies.cpu().numpy()]
            field.append(motion_score(*shifts_from_correlation(np.sum(maps, axis=0)), fp)[0])
            median.append(float(np.nanmedian(scores)))
        fa, ma = np.asarray(field), np.asarray(median)
        line = (f"| {label} | {n} | **{100 * np.mean(fa > high):.0f} %** | {100 * np.mean(ma > high):.0f} % | "
                f"{np.median(fa):.3g} / {np.median(ma):.3g} | {time.time() - t0:.0f} |")
        print(line, flush=True)
        lines.append(line)
    return lines


def snr_low_bound(priors, n: int = 200_000, seed: int = 1) -> float:
    """0.5 percentile of B / √(background + E[read²]) (photons) under ``priors`` (Monte Carlo)."""
    rng = np.random.default_rng(seed)
    b = np.abs(rng.normal(*priors.brightness_photons, n))
    bg = np.abs(rng.normal(*priors.background_photons, n))
    lo, hi = priors.read_noise_photons
    return float(np.percentile(b / np.sqrt(bg + (lo * lo + lo * hi + hi * hi) / 3), 0.5))


def recordings(suite: str, n: int, tiles: int, seed: int, psf_guess_um: float, ref, card_priors) -> list[str]:
    """Rows of the one-sample recordings table (see the module docstring)."""
    from dataclasses import replace

    preset = get_preset(suite)
    t = preset.timing
    fp = t.frame_period_us * 1e-6
    low_snr = snr_low_bound(card_priors)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    names = [q.name for q in QUANTITIES]
    lines = [f"| recordings of {tiles} tiles, one sample | n | warns | " + " | ".join(q.label for q in QUANTITIES)
             + " | oracle (true brightness below trained) | median " + " / ".join(names) + " | s |",
             "|" + "---|" * (len(QUANTITIES) + 6)]
    rows = ([("clean", None)] + [(f"{k} ({s})", f"{k}:{s}") for k in ("blinking", "dim") for s in ("weak", "strong")]
            + [("motion (strong)", "motion:strong")])  # motion: does the blinking ratio stay quiet?
    for label, stress in rows:
        t0 = time.time()
        p0 = preset.priors if stress is None else stressed(preset.priors, *stress.split(":"))
        warned, oracle = 0, 0
        per_q = {k: 0 for k in names}
        meds: dict[str, list[float]] = {k: [] for k in names}
        for _ in range(n):
            draw = {k: abs(float(rng.normal(*getattr(p0, k)))) for k in
                    ("brightness_photons", "background_photons", "psf_sigma_xy_um", "psf_sigma_z_um", "gain")}
            p = replace(p0, **{k: (v, 0.0) for k, v in draw.items()})
            d = float(rng.uniform(p0.d_min_um2_s, p0.d_max_um2_s))
            b = Simulator(p, t, preset.tile_height, preset.tile_width, preset.frames).simulate(
                tiles, generator=g, d_um2_s=torch.full((tiles,), d, dtype=torch.float64))
            lo_r, hi_r = p.read_noise_photons
            oracle += draw["brightness_photons"] / math.sqrt(
                draw["background_photons"] + (lo_r * lo_r + lo_r * hi_r + hi_r * hi_r) / 3) < low_snr
            maps: list[np.ndarray] = []
            vals: dict[str, list[float]] = {k: [] for k in VALUE_KEYS}
            for m in b.movies.cpu().numpy():
                for k, v in movie_statistics(m, t.pixel_size_um, fp, psf_guess_um, correlation=maps).items():
                    vals[k].append(v)
            score, hz = motion_score(*shifts_from_correlation(np.sum(maps, axis=0)), fp)
            vals["motion"], vals["motion_hz"] = [score], [hz]
            res = compare({k: np.asarray(v, float) for k, v in vals.items()}, ref, tiles=tiles)
            warned += not res.ok
            for r in res.rows:
                per_q[r.name] += r.outside
                meds[r.name].append(math.nan if r.value is None else r.value)
        med = [float(np.nanmedian(meds[k])) if np.isfinite(meds[k]).any() else math.nan for k in names]
        line = (f"| {label} | {n} | **{100 * warned / n:.0f} %** | "
                + " | ".join(f"{100 * per_q[k] / n:.0f} %" for k in names)
                + f" | {100 * oracle / n:.0f} % | " + " / ".join(f"{m:.3g}" for m in med) + f" | {time.time() - t0:.0f} |")
        print(line, flush=True)
        lines.append(line)
    return lines


def table_head(args, flag: str, t_all: float, extra: str = "") -> list[str]:
    """The command and machine lines above a one-table report (``flag``: the mode's option)."""
    return [f"Command: `python benchmarks/recording_check.py --suite {args.suite} {flag}`  ",
            f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch thread(s); "
            f"{datetime.now(timezone.utc).isoformat(timespec='minutes')}; {time.time() - t_all:.0f} s in all.{extra}", ""]


def report(out: Path | None, text: str, raw: dict | None = None) -> None:
    """Print ``text``; with ``out`` also write it there (and ``raw`` beside it as .json), each
    file written whole (atomically) so that an interrupted run leaves the previous report.
    An existing ``out`` is replaced only when it is an earlier report of this script (its
    first lines name it); any other file is left alone and the run says so."""
    if out:
        from dle_stream.files import write_atomic

        if out.exists() and "benchmarks/recording_check.py" not in out.read_text(errors="replace")[:400]:
            print(text)
            raise SystemExit(f"--out {out}: exists and is not a report of this script; give a new file "
                             "(the report is printed above)")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda tmp: tmp.write_text(text))
        if raw is not None:
            write_atomic(out.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(raw).replace("NaN", "null")))
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="low", choices=("low", "high"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=20_241_001)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--group", type=int, default=16, help="tiles per simulated recording (the median's group)")
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--field-motion", type=int, default=0, metavar="N",
                    help="only the whole-field motion table, N recordings per row")
    ap.add_argument("--recordings", type=int, default=0, metavar="N",
                    help="only the one-sample recordings table (clean, blinking, dim), N recordings per row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or SUITE_MODELS[args.suite]
    t_all = time.time()
    ref = reference(model)
    t_ref = time.time() - t_all
    from dle_stream.model_package import load_card, resolve_model

    card_priors = training_priors(load_card(resolve_model(model)))
    psf = card_priors.psf_sigma_xy_um[0]
    if args.recordings:
        lines = recordings(args.suite, args.recordings, args.group, args.seed, psf, ref, card_priors)
        report(args.out, "\n".join(table_head(args, f"--recordings {args.recordings}", t_all) + lines) + "\n")
        return
    if args.field_motion:
        hi = ref.range_of("motion")[1]
        assert hi is not None
        lines = field_motion(args.suite, args.field_motion, args.group, args.seed, psf, hi)
        head = table_head(args, f"--field-motion {args.field_motion}", t_all,
                          f" Trained whole-field motion: ≤ {hi:.3g}.")
        report(args.out, "\n".join(head + lines) + "\n")
        return
    rows = [("clean", None)] + [(f"{k} ({s})", f"{k}:{s}") for k in STRESSES for s in ("weak", "strong")]
    ranges = {q.name: ref.range_of(q.name) for q in QUANTITIES}
    head = ("| suite | warns | " + " | ".join(f"{q.label}" for q in QUANTITIES) + f" | warns, {args.group} tiles | "
            + "median " + " / ".join(q.name for q in QUANTITIES) + " | s |")
    lines = [head, "|" + "---|" * (len(QUANTITIES) + 5)]
    raw: dict[str, dict[str, list[float]]] = {}
    low_snr = snr_low_bound(card_priors)
    oracle: list[str] = []
    for label, stress in rows:
        t0 = time.time()
        vals = measure(args.suite, stress, args.n, args.seed, psf)
        raw[label] = vals
        per_q = {q.name: 0 for q in QUANTITIES}
        warned = 0
        for i in range(args.n):
            res = compare({k: np.array([vals[k][i]]) for k in VALUE_KEYS}, ref)
            warned += not res.ok
            for r in res.outside:
                per_q[r.name] += 1
        rng = np.random.default_rng(args.seed)
        group_warned = 0
        for _ in range(args.groups):
            idx = rng.choice(args.n, size=min(args.group, args.n), replace=False)
            res = compare({k: np.asarray(vals[k], float)[idx] for k in VALUE_KEYS}, ref)
            group_warned += not res.ok
        med = [np.nanmedian(np.asarray(vals[q.name], float)) if np.isfinite(vals[q.name]).any() else math.nan
               for q in QUANTITIES]
        line = (f"| {label} | **{100 * warned / args.n:.0f} %** | "
                + " | ".join(f"{100 * per_q[q.name] / args.n:.0f} %" for q in QUANTITIES)
                + f" | {100 * group_warned / args.groups:.0f} %"
                + " | " + " / ".join(f"{m:.3g}" for m in med) + f" | {time.time() - t0:.0f} |")
        lines.append(line)
        print(line, flush=True)
        oracle.append(f"{label} {100 * np.mean(np.asarray(vals['snr_true']) < low_snr):.0f} %")

    def rng(name: str) -> str:
        lo, hi = ranges[name]
        if hi is None:
            lo16 = ref.range_of(name, args.group)[0]
            return "—" if lo is None else f"≥ {lo:.3g} (one tile), ≥ {lo16:.3g} ({args.group} tiles pooled)"
        return f"≤ {hi:.3g}" if lo is None else f"{lo:.3g}–{hi:.3g}"

    trained = [f"- {q.label} ({q.unit}): {rng(q.name)}" for q in QUANTITIES]
    doc = [f"# Recording check on the stress suites, {args.suite} ({model})", "",
           f"Command: `python benchmarks/recording_check.py --suite {args.suite} --n {args.n}"
           + (f" --model {args.model}" if args.model else "") + "`  ",
           f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch thread(s); "
           f"{datetime.now(timezone.utc).isoformat(timespec='minutes')}; {time.time() - t_all:.0f} s in all "
           f"(reference {t_ref:.0f} s, {ref.n_tiles} tiles, cached after the first run).", "",
           f"{args.n} movies per suite (one tile, {ref.frames} frames each), seed {args.seed}. "
           "Columns: share of movies the check warns on, and per quantity; then the median value per quantity.",
           "", "Trained ranges (reference percentiles):", ""] + trained + [""] + lines + [
           "", "Oracle: share of movies whose true brightness over the noise, B / √(background + read²) in "
           f"photons, lies below the card prior's 0.5 percentile ({low_snr:.3g}): " + ", ".join(oracle) + "."]
    report(args.out, "\n".join(doc) + "\n", raw)


if __name__ == "__main__":
    main()
