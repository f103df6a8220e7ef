"""A new microscope in minutes (issue 16 item 2): warm-started training against training from
scratch, for scans no shipped model serves.

For each scan and D range this runs ``dle-stream train`` twice with the same budget, threads
and seed: once as a new user would (no ``--from``: the default warm start from the nearest
available model of the same D range) and once with ``--scratch``; one run at a time. It then
reads each run's ``training_curve.csv`` (the held-out validation rows, written at every
checkpoint of the head stage) and the card's final validation, and reports validation L1
against wall and CPU minutes, also relative to the prior-mean baseline of the range (D uniform
on [0, d_max]: predicting the mean gives L1 = d_max / 4), next to the shipped model's own-suite
relative L1 and the issue's target (warm-started ≤ 1.3× it).

The scans (unidirectional, pixel 0.15 µm as the shipped models; a line is the active pixels
plus a fly-back of a quarter of them, i.e. a fill fraction of 0.8 as a galvo scan; the frame
period is lines × line period):

- ``64x64-8us``: 64×64 px, dwell 8 µs, line 640 µs, frame 40.96 ms
- ``128x128-2us``: 128×128 px, dwell 2 µs, line 320 µs, frame 40.96 ms
- ``512x512-1us``: 512×512 px, dwell 1 µs, line 640 µs, frame 327.68 ms

Tiles are 20×20 px of the full frame: the simulator gives a tile's pixel (r, c) of frame k the
time k·F + (r0 + r)·L + (c0 + c)·δ, so the line and frame periods of the full frame are what
the tile sees; for a unidirectional scan every tile offset has the same time differences, and
the trainer simulates them at (0, 0) (bidirectional scans: at random offsets).

Usage (runs are written under ``--out``, one folder per range/scan/start; a finished run,
its card holding a validation, is not run again)::

    python benchmarks/new_scans.py --ranges low --out runs/new-scans
    python benchmarks/new_scans.py --ranges low --out runs/new-scans --report-only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name → (width = height px, dwell µs); line = width·dwell / 0.8, frame = height·line
SCANS: dict[str, tuple[int, float]] = {"64x64-8us": (64, 8.0), "128x128-2us": (128, 2.0), "512x512-1us": (512, 1.0)}
FILL_FRACTION = 0.8
PIXEL_UM = 0.15

#: range → (preset, d_max µm²/s, shipped model, its own-suite L1 µm²/s and where that was measured)
RANGES: dict[str, tuple[str, float, str, float, str]] = {
    "low": ("low", 1.5, "brain-qd-low", 0.114, "1000-movie low suite, BENCHMARKS.md (Table 1 with the shipped brain-qd-low)"),
    "high": ("high", 50.0, "beads-high", 6.77, "1000-movie high suite, BENCHMARKS.md (Table 1 with the calibrated models)"),
}
TARGET_FACTOR = 1.3
MARKS_MIN = (5, 10, 15)


def scan_timing(name: str) -> dict:
    size, dwell = SCANS[name]
    line = size * dwell / FILL_FRACTION
    return {"pixel_size_um": PIXEL_UM, "dwell_us": dwell, "line_period_us": line, "frame_period_us": size * line,
            "width_px": size, "height_px": size, "bidirectional": False}


def run_folder(out: Path, rng: str, scan: str, start: str) -> Path:
    return out / rng / f"{scan}-{start}"


def train_command(timing_file: Path, folder: Path, preset: str, start: str, minutes: float, threads: int,
                  seed: int) -> list[str]:
    cmd = ["dle-stream", "train", "--timing", str(timing_file), "--preset", preset, "--minutes", f"{minutes:g}",
           "--threads", str(threads), "--seed", str(seed), "--out", str(folder)]
    return cmd + (["--scratch"] if start == "scratch" else [])


def finished(folder: Path) -> bool:
    card = folder / "card.json"
    return card.is_file() and "dle" in json.loads(card.read_text()).get("validation", {})


def run_one(cmd: list[str], folder: Path) -> dict:
    """Run ``dle-stream train`` (as ``python -m dle_stream``) to the end; wall and CPU seconds."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(f"{folder}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "dle_stream", *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                              cwd=ROOT, env={**os.environ, "COLUMNS": "160"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = {"command": " ".join(cmd), "started_utc": started, "exit_status": proc.returncode,
            "wall_s": round(time.monotonic() - t0, 1),
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1),
            "load_avg_at_end": os.getloadavg()}
    (folder.parent / f"{folder.name}.run.json").write_text(json.dumps(info, indent=1))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {folder}.log")
    return info


def curve_rows(folder: Path) -> list[tuple[float, float]]:
    """(elapsed minutes, L1 µm²/s) of the validation rows of the run's curve (the last is the final validation)."""
    path = folder / "training_curve.csv"
    if not path.is_file():
        return []
    with path.open() as fh:
        return [(float(r["elapsed_s"]) / 60, float(r["l1_um2_s"])) for r in csv.DictReader(fh)
                if r["stage"] == "validation" and r["l1_um2_s"] not in ("", "nan")]


def l1_at(rows: list[tuple[float, float]], minute: float) -> float:
    """L1 of the latest validation at or before ``minute`` (NaN: no model validated yet)."""
    before = [l1 for t, l1 in rows if t <= minute + 1e-9]
    return before[-1] if before else math.nan


def summarise(out: Path, rng: str, minutes: float) -> list[dict]:
    preset, d_max, shipped, shipped_l1, _ = RANGES[rng]
    base = d_max / 4
    rows = []
    for scan in SCANS:
        for start in ("warm", "scratch"):
            folder = run_folder(out, rng, scan, start)
            if not finished(folder):
                continue
            card = json.loads((folder / "card.json").read_text())
            run = json.loads((folder.parent / f"{folder.name}.run.json").read_text())
            curve = curve_rows(folder)
            final = card["validation"]["dle"]["l1"]
            marks = {m: l1_at(curve, m) for m in MARKS_MIN if m < minutes}
            marks[minutes] = final  # the budget's end: the card's validation (its own, larger set)
            rows.append({"range": rng, "scan": scan, "start": start,
                         "parent": card["training"].get("warm_from") or "—",
                         "marks": marks, "final_l1": final, "final_rel": final / base,
                         "target_rel": TARGET_FACTOR * shipped_l1 / base,
                         "n_val": card["validation"]["n_movies"], "wall_min": run["wall_s"] / 60,
                         "cpu_min": run["cpu_s"] / 60, "curve": curve,
                         "head_steps": card["training"]["predictor_steps"],
                         "ae_steps": card["training"]["autoencoder_steps"],
                         "movies": card["training"]["movies_simulated"]})
    return rows


def fmt(x: float, digits: int = 3) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}g}"


def report(out: Path, rng: str, minutes: float) -> str:
    preset, d_max, shipped, shipped_l1, where = RANGES[rng]
    base = d_max / 4
    rows = summarise(out, rng, minutes)
    marks = [m for m in MARKS_MIN if m < minutes] + [minutes]
    lines = [f"**{rng}** range (preset {preset}, D uniform on [0, {d_max:g}] µm²/s; prior-mean baseline L1 "
             f"{base:g}); shipped {shipped}: L1 {shipped_l1:g} on its {where} → relative "
             f"{shipped_l1 / base:.3f}; target: warm-started ≤ {TARGET_FACTOR:g}× → relative ≤ "
             f"{TARGET_FACTOR * shipped_l1 / base:.3f} (L1 ≤ {TARGET_FACTOR * shipped_l1:.3g})", "",
             "| scan | start | " + " | ".join(f"L1 at {m:g} min" for m in marks)
             + " | relative L1 (final) | vs target | wall / CPU min | AE / head steps | validation movies |",
             "|---|---|" + "---|" * (len(marks) + 5)]
    for r in rows:
        verdict = "meets" if r["final_rel"] <= r["target_rel"] else f"{r['final_rel'] / r['target_rel']:.2f}× the target"
        start = f"warm ({r['parent']})" if r["start"] == "warm" else "scratch"
        lines.append(f"| {r['scan']} | {start} | " + " | ".join(fmt(r["marks"][m]) for m in marks)
                     + f" | {r['final_rel']:.3f} | {verdict} | {r['wall_min']:.1f} / {r['cpu_min']:.1f} | "
                       f"{r['ae_steps']} / {r['head_steps']} | {r['n_val']} |")
    lines += ["", "Validation curves (the last point of each run is the final validation; CPU minutes at a point "
              "≈ its wall minutes × the run's CPU/wall share, i.e. assuming the run's wait for the core was "
              "spread evenly):", "",
              "```", "range,scan,start,wall_min,approx_cpu_min,l1_um2_s,relative_l1"]
    for r in rows:
        share = r["cpu_min"] / r["wall_min"]
        lines += [f"{rng},{r['scan']},{r['start']},{t:.2f},{t * share:.2f},{l1:.4g},{l1 / base:.3f}"
                  for t, l1 in r["curve"]]
    lines.append("```")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranges", default="low", help="comma-separated: low, high")
    ap.add_argument("--scans", default=",".join(SCANS), help="comma-separated: " + ", ".join(SCANS))
    ap.add_argument("--starts", default="warm,scratch", help="comma-separated: warm, scratch")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "new-scans")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = args.out.resolve()
    for rng in args.ranges.split(","):
        preset = RANGES[rng][0]
        if not args.report_only:
            for scan in args.scans.split(","):
                timing_file = out / rng / f"{scan}.timing.json"
                timing_file.parent.mkdir(parents=True, exist_ok=True)
                timing_file.write_text(json.dumps(scan_timing(scan), indent=1))
                for start in args.starts.split(","):
                    folder = run_folder(out, rng, scan, start)
                    if finished(folder):
                        print(f"{folder}: done already", flush=True)
                        continue
                    if folder.exists():
                        raise SystemExit(f"{folder}: an unfinished run; remove it to run again")
                    cmd = train_command(timing_file, folder, preset, start, args.minutes, args.threads, args.seed)
                    print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC: {' '.join(cmd)}", flush=True)
                    info = run_one(cmd, folder)
                    print(f"  wall {info['wall_s'] / 60:.1f} min, CPU {info['cpu_s'] / 60:.1f} min", flush=True)
        text = report(out, rng, args.minutes)
        (out / f"summary-{rng}.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
