"""Speed of the DLE network on this machine: encoder tile-frames/s, head ms per tile-window.

Usage::

    .venv/bin/python benchmarks/model_speed.py --threads 2
    .venv/bin/python benchmarks/model_speed.py --threads 2 --model brain-qd-low
    .venv/bin/python benchmarks/model_speed.py --threads 1 --cpu-time --sweep

Measured through :class:`dle_stream.estimator.DiffusionEstimator` (the path a stream
uses: chunked, channels-last encoder, ``inference_mode``, float32) on random 20×20
Poisson frames, at batch 1 (one tile: 400 frames / one window) and batch 64 (64 tiles:
25,600 frames / 64 windows). Wall-clock times are the median (and best) of repeats;
with ``--cpu-time`` (use with ``--threads 1``) the calling thread's CPU time is used
instead, which other processes on a busy machine do not disturb.

Targets (DESIGN §7; live full-frame use): encoder ≥ 30,000 tile-frames/s and head
≤ 2.5 ms per 400-frame window at batch 64 on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.model import DLEModel, ModelConfig
from dle_stream.model_package import ModelCard
from dle_stream.timing import ScanTiming

#: Candidate architectures compared with ``--sweep`` (overrides of :class:`ModelConfig`).
SWEEP: list[tuple[str, dict]] = [
    ("default", {}),
    ("enc 16-32-32-64 s2,2,1,1", {"encoder_strides": (2, 2, 1, 1)}),
    ("enc 16-32-64-64 s2,2,2,1", {"encoder_channels": (16, 32, 64, 64), "encoder_strides": (2, 2, 2, 1)}),
    ("enc 32-32-64-64 s2,1,2,1", {"encoder_channels": (32, 32, 64, 64)}),
    ("temporal 32, no time stride", {"temporal_strides": (1,) * 7}),
    ("temporal 32, s1,2,1,2,1,2,1", {"temporal_strides": (1, 2, 1, 2, 1, 2, 1)}),
    ("temporal 48", {"temporal_channels": 48}),
    ("temporal 64", {"temporal_channels": 64}),
    ("temporal 16", {"temporal_channels": 16}),
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timer(fn: Callable[[], object], repeats: int, cpu_time: bool) -> tuple[float, float]:
    """(median, best) seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    clock = time.thread_time if cpu_time else time.perf_counter
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times), min(times)


def estimator_for(config: ModelConfig) -> DiffusionEstimator:
    timing = ScanTiming.reference()
    card = ModelCard(
        name="benchmark", tile_height=config.tile_height, tile_width=config.tile_width, window_frames=400,
        d_min_um2_s=0.0, d_max_um2_s=1.5, scan_timing=timing.to_dict(), pixel_size_um=timing.pixel_size_um,
        architecture=config.to_dict(),
    )
    return DiffusionEstimator(DLEModel(config), card)


def measure(est: DiffusionEstimator, frames: int, repeats: int, cpu_time: bool) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(0)
    h, w = est.tile_shape
    out: dict[str, tuple[float, float]] = {}
    for batch in (1, 64):
        tiles = rng.poisson(100.0, size=(batch * frames, h, w)).astype(np.float32)
        med, best = timer(lambda tiles=tiles: est.encode(tiles), repeats, cpu_time)
        out[f"enc{batch}"] = (batch * frames / med, batch * frames / best)
        latents = est.encode(tiles).reshape(batch, frames, -1)
        med, best = timer(lambda latents=latents: est.estimate_latents(latents), repeats, cpu_time)
        out[f"head{batch}"] = (med / batch * 1e3, best / batch * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--model", default=None, help="model package name or folder (default: random default network)")
    parser.add_argument("--frames", type=int, default=400, help="frames per tile-window (default 400)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (default 7)")
    parser.add_argument("--cpu-time", action="store_true", help="time with the thread's CPU time (use --threads 1)")
    parser.add_argument("--sweep", action="store_true", help="compare the candidate architectures in SWEEP")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    clock = "thread CPU time" if args.cpu_time else "wall clock"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float32, inference_mode; {clock}; load average {load}")
    print(f"window {args.frames} frames; median of {args.repeats} (best in parentheses)\n")

    if args.model:
        runs = [(args.model, DiffusionEstimator.load(args.model))]
    elif args.sweep:
        base = ModelConfig().to_dict()
        runs = [(label, estimator_for(ModelConfig.from_dict({**base, **changes}))) for label, changes in SWEEP]
    else:
        runs = [("default", estimator_for(ModelConfig()))]

    header = (f"{'model':<30} {'enc frames/s b=1':>20} {'enc frames/s b=64':>20} "
              f"{'head ms/win b=1':>18} {'head ms/win b=64':>18}")
    print(header)
    print("-" * len(header))
    for label, est in runs:
        r = measure(est, args.frames, args.repeats, args.cpu_time)
        print(f"{label:<30} {r['enc1'][0]:>10,.0f} ({r['enc1'][1]:>7,.0f}) {r['enc64'][0]:>10,.0f} ({r['enc64'][1]:>7,.0f})"
              f" {r['head1'][0]:>8.2f} ({r['head1'][1]:>6.2f}) {r['head64'][0]:>8.2f} ({r['head64'][1]:>6.2f})",
              flush=True)
    if not args.sweep and not args.model:
        print(f"\narchitecture: {ModelConfig().to_dict()}")


if __name__ == "__main__":
    main()
