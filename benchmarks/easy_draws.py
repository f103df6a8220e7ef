"""The trainer's unit-test training (tests/test_trainer.py ``easy_config``: 150 head steps on a
256-movie cache of easy data) with independent or even training D values: its held-out L1
against the prior-mean L1 (issue 11, BENCHMARKS.md "Honest numbers, seventh pass").

    python benchmarks/easy_draws.py even|random SEED OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dle_stream.training.trainer import train  # noqa: E402
from tests.test_trainer import easy_config  # noqa: E402

mode, seed, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
if out.exists():
    raise SystemExit(f"{out}: exists; choose another folder")
torch.set_num_threads(1)
train(easy_config(out, d_draws=mode, seed=seed), log=lambda *a: None)
v = json.loads((out / "card.json").read_text())["validation"]
print(mode, seed, f"L1 {v['dle']['l1']:.4f}", f"prior-mean L1 {v['prior_baseline']['l1']:.4f}")
