"""Simulator speed and memory: movies/s of 400×20×20 at a preset, peak memory of a batch.

    python benchmarks/simulator_speed.py --preset low --batch 64 --repeats 3 --threads 2

Prints one line per repeat and a summary (median movies/s; peak resident memory of
this process, which holds the batch being simulated).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from dle_stream.training.priors import get_preset
from dle_stream.training.simulator import Simulator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="low")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = get_preset(args.preset)
    sim = Simulator(p.priors, p.timing, p.tile_height, p.tile_width, p.frames, args.device)
    sim.simulate(4, seed=0)  # warm-up
    rates = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        batch = sim.simulate(args.batch, seed=100 + i)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rates.append(args.batch / dt)
        print(f"repeat {i}: {args.batch} movies in {dt:.2f} s = {rates[-1]:.1f} movies/s "
              f"(mean visible transitions {batch.visible_transitions.float().mean():.0f})")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"preset {args.preset}, {p.frames}×{p.tile_height}×{p.tile_width}, batch {args.batch}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"median {statistics.median(rates):.1f} movies/s; peak resident memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
