"""Stress suites (issue 14 item 3): the DLE, RICS and the classic tracker on suites with one
effect of a real sample each (steady density, motion, blinking, dim, dense, wide PSF,
bleaching; dle_stream.training.priors.STRESSES), at two strengths, beside the clean suite.

    python benchmarks/stress_suites.py --suite low --n 100 --estimators dle,rics --out benchmarks/results/stress-low.md

Every suite uses the same seed (D uniform on the preset's range; the effects' own draws
make the stressed suites' movies differ beyond the effect itself).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dle_stream.evaluation.bench import metrics, run_suite
from dle_stream.training.priors import STRESSES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="low", choices=("low", "high"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=20_241_001)
    ap.add_argument("--estimators", default="dle,rics,classic")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [e for e in args.estimators.split(",") if e]
    rows = [("clean", None)] + [(f"{k} ({s})", f"{k}:{s}") for k in STRESSES for s in ("weak", "strong")]
    head = "| suite | " + " | ".join(f"{e} L1" for e in names) + " | DLE L1 / clean | DLE \\|err\\|<σ | DLE \\|err\\|<2σ | s |"
    lines = [head, "|" + "---|" * (len(names) + 5)]
    clean = None
    t_all = time.time()
    for label, stress in rows:
        t0 = time.time()
        res = run_suite(args.suite, args.n, args.seed, names, model=args.model, stress=stress)
        m = metrics(res)
        l1 = {e: m[e]["l1"] for e in names}
        if clean is None:
            clean = l1.get("dle")
        dle = m.get("dle", {})
        ratio = f"{l1['dle'] / clean:.2f}" if "dle" in l1 and clean else "—"
        line = (f"| {label} | " + " | ".join(f"{l1[e]:.3g}" for e in names) + f" | {ratio} | "
                f"{dle.get('within_1_sigma', float('nan')):.2f} | {dle.get('within_2_sigma', float('nan')):.2f} | "
                f"{time.time() - t0:.0f} |")
        lines.append(line)
        print(line, flush=True)
    desc = [f"- **{k}**: {v[0]}" for k, v in STRESSES.items()]
    doc = [f"# Stress suites, {args.suite} (issue 14)", "",
           f"Command: `python benchmarks/stress_suites.py --suite {args.suite} --n {args.n} --estimators {args.estimators}"
           + (f" --model {args.model}" if args.model else "") + "`  ",
           f"Machine: {platform.processor() or platform.machine()}, {args.threads} torch threads; "
           f"{datetime.now(timezone.utc).isoformat(timespec='minutes')}; {time.time() - t_all:.0f} s in all.", "",
           f"{args.n} movies per suite, seed {args.seed}; L1 in µm²/s.", ""] + lines + ["", "Stresses:", ""] + desc
    text = "\n".join(doc) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
