"""Measure a calibrated package's card validation again with its calibration (what
`calibrate` now does after fitting), for packages calibrated before it did so.

    python benchmarks/revalidate.py PACKAGE [N]

Writes the new ``validation`` into PACKAGE's card (weights untouched) and keeps the
earlier one as ``training.validation_before_calibration`` (unless one is kept already).
"""
import sys
import time
from pathlib import Path

import torch

from dle_stream.estimator import DiffusionEstimator
from dle_stream.files import write_atomic
from dle_stream.model_package import CARD_FILE, load_card
from dle_stream.training.validation import record_validation

folder = Path(sys.argv[1])
torch.set_num_threads(1)
t = time.time()
card = load_card(folder)
if "likelihood_calibration" not in card.training:
    raise SystemExit(f"{folder}: not calibrated; its validation already describes it")
n = int(sys.argv[2]) if len(sys.argv) > 2 else int(card.validation.get("n_movies", 512))
if n < 2:
    raise SystemExit(f"N={n}: give at least 2 movies")
d = record_validation(card, DiffusionEstimator.load(folder), n)["dle"]
text = card.to_json()
write_atomic(folder / CARD_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
print(f"{folder}: {n} movies, L1 {d['l1']:.4g}, best half {d['best_half_l1']:.4g}, within 1σ {d['within_1_sigma']:.2f}, "
      f"2σ {d['within_2_sigma']:.2f}, 68 % interval {d['interval68_coverage']:.2f} ({time.time() - t:.0f} s)")
