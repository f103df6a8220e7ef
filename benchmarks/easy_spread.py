"""Held-out L1 over the prior-mean guess's L1 of tests/test_trainer.py's shared easy run, for
one seed and budget (how far from the test's 0.8 the fixture lands; BENCHMARKS session 12).

    python benchmarks/easy_spread.py SEED CACHE_MOVIES HEAD_STEPS OUT_DIR [LR AVERAGE_STEPS]
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_trainer import easy_config  # noqa: E402

from dle_stream.training.trainer import train  # noqa: E402

torch.set_num_threads(1)
seed, cache, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
extra = {"lr": float(sys.argv[5]), "average_steps": float(sys.argv[6])} if len(sys.argv) > 6 else {}
train(easy_config(out, seed=seed, cache_movies=cache, steps=steps, **extra), log=lambda *a: None)
v = json.loads((out / "card.json").read_text())["validation"]
print(f"seed {seed}, cache {cache}, {steps} steps {extra}: L1 {v['dle']['l1']:.4f}, "
      f"ratio to the prior mean's {v['dle']['l1'] / v['prior_baseline']['l1']:.3f}")
