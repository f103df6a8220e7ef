"""What the spot test (dle_stream/spots.py) costs per tile-frame, against the encoder, in one run.

    python benchmarks/spot_cost.py [MODEL] [FRAMES]

One torch thread; Poisson tile-frames of the model's tile size; three repeats, each timed
for the encoder and for the spot numbers, printed with their ratio (this machine is noisy:
read the ratios).
"""
import sys
import time

import numpy as np
import torch

from dle_stream.estimator import DiffusionEstimator

torch.set_num_threads(1)
model = sys.argv[1] if len(sys.argv) > 1 else "brain-qd-low"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
est = DiffusionEstimator.load(model)
h, w = est.tile_shape
x = np.random.default_rng(0).poisson(100, (n, h, w)).astype(np.float32)
est.encode(x[:100])
est.spot_features(x[:100])
for _ in range(3):
    t = time.perf_counter()
    est.encode(x)
    enc = time.perf_counter() - t
    t = time.perf_counter()
    est.spot_features(x)
    spot = time.perf_counter() - t
    print(f"{model}, {n} tile-frames of {h}×{w} px: encoder {enc:.3f} s, spot numbers {spot:.3f} s, ratio {spot / enc:.2f}")
