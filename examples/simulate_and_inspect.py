"""Simulate a few raster-scanned movies and look at what the simulator knows.

    python examples/simulate_and_inspect.py

Prints, per movie, the true D, the number of particles, the visible transitions (the
paper's measure of how much a movie shows), and checks the frame-to-frame MSD of the
true positions against 2·D·Δt per axis.
"""

import numpy as np

from dle_stream.training.priors import get_preset
from dle_stream.training.simulator import Simulator

preset = get_preset("low")
sim = Simulator(preset.priors, preset.timing, frames=400)
batch = sim.simulate(6, seed=0)
dt_s = preset.timing.frame_period_us * 1e-6
for i in range(len(batch)):
    pos = batch.positions_of(i).double().numpy()  # [N, T, 3] µm at frame mid-times
    steps = np.diff(pos, axis=1).reshape(-1, 3)
    msd_d = (steps**2).mean(axis=0) / (2 * dt_s) if steps.size else np.full(3, np.nan)
    print(f"movie {i}: D = {batch.d_um2_s[i]:.3f} µm²/s, {int(batch.n_particles[i])} particles, "
          f"{int(batch.visible_transitions[i])} visible transitions, "
          f"MSD/(2Δt) per axis = {np.round(msd_d, 3)}")
print("movies:", tuple(batch.movies.shape), "(movies, frames, rows, columns)")
