"""Measure a calibrated package's card validation again with its calibration (what
`calibrate` now does after fitting), for packages calibrated before it did so.

    python benchmarks/revalidate.py PACKAGE [N]

Writes the new ``validation`` into PACKAGE's card (weights untouched) and keeps the
earlier one as ``training.validation_before_calibration`` (unless one is kept already).
"""
import json
import sys
import time
from pathlib import Path

import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.files import write_atomic
from dle_stream.training.validation import measure_validation

folder = Path(sys.argv[1])
torch.set_num_threads(1)
t = time.time()
card_path = folder / "card.json"
card = json.loads(card_path.read_text(encoding="utf-8"))
if "likelihood_calibration" not in card.get("training", {}):
    raise SystemExit(f"{folder}: not calibrated; its validation already describes it")
n = int(sys.argv[2]) if len(sys.argv) > 2 else int(card.get("validation", {}).get("n_movies", 512))
if n < 2:
    raise SystemExit(f"N={n}: give at least 2 movies")
v = measure_validation(DiffusionEstimator.load(folder), n)
card["training"].setdefault("validation_before_calibration", card.get("validation", {}))
card["validation"] = v
text = json.dumps(card, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
write_atomic(card_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
d = v["dle"]
print(f"{folder}: {n} movies, L1 {d['l1']:.4g}, best half {d['best_half_l1']:.4g}, within 1σ {d['within_1_sigma']:.2f}, "
      f"2σ {d['within_2_sigma']:.2f}, 68 % interval {d['interval68_coverage']:.2f} ({time.time() - t:.0f} s)")
