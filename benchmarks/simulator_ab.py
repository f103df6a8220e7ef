"""A/B speed of the simulator against an older commit's, in one process (ratios, not times).

The older ``training/simulator.py`` is read with ``git show REV:training/simulator.py`` and
loaded beside the current one; both simulate the same seeded batches of a model's operating
priors and scan (steady "box" or "cloud" density, D fixed), alternating, in one thread.
Prints CPU seconds of each and their ratio, and the largest difference of the noise-free
images (Poisson draws replaced by their means) so a speed-up that changes the physics shows.

    python benchmarks/simulator_ab.py --rev fe935d3 --model beads-high --density box
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dle_stream.training.simulator as current
from dle_stream.estimator import DiffusionEstimator
from dle_stream.training.calibration import _operating_simulator


def load_old(rev: str):
    text = subprocess.run(["git", "show", f"{rev}:training/simulator.py"], check=True, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    path = Path(tempfile.mkdtemp()) / "simulator_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("dle_stream.training.simulator_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="older commit whose simulator is the A side")
    ap.add_argument("--model", default="beads-high")
    ap.add_argument("--density", default="box", choices=("box", "cloud"))
    ap.add_argument("--d-fraction", type=float, default=0.5, help="true D, units of the model's d_max")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = load_old(args.rev)
    est = DiffusionEstimator.load(args.model)
    sim, d_max = _operating_simulator(est, density=args.density)
    sims = {"old": old.Simulator(sim.priors, sim.timing, sim.height, sim.width, sim.frames),
            "new": current.Simulator(sim.priors, sim.timing, sim.height, sim.width, sim.frames)}
    cpu = {"old": 0.0, "new": 0.0}
    for rep in range(args.repeats):
        for name, s in sims.items():
            t = time.process_time()
            s.simulate(args.batch, generator=torch.Generator().manual_seed(rep), d_um2_s=args.d_fraction * d_max)
            cpu[name] += time.process_time() - t
    poisson = torch.poisson
    torch.poisson = lambda x, generator=None: x.clone()  # noise-free images: compare the light itself
    try:
        a, b = (s.simulate(args.batch, generator=torch.Generator().manual_seed(99), d_um2_s=args.d_fraction * d_max).movies
                for s in sims.values())
    finally:
        torch.poisson = poisson
    diff = (a - b).abs()
    print(f"{args.model}, {args.density} density, D = {args.d_fraction:g}·d_max, {args.repeats} × {args.batch} movies, "
          f"1 thread, {platform.processor() or platform.machine()}")
    print(f"CPU s: {args.rev} {cpu['old']:.2f}, now {cpu['new']:.2f}; ratio now/old {cpu['new'] / cpu['old']:.2f}")
    print(f"noise-free images: largest difference {float(diff.max()):.3g} photons (peak {float(a.max()):.0f}); "
          f"pixels differing by > 0.01 photons: {int((diff > 0.01).sum())} of {diff.numel()}")


if __name__ == "__main__":
    main()
