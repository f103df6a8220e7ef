"""Training throughput on one process or several (torchrun): issue 13.

Times the two parts of a training step budget that scale with processes, with the real
trainer and the preset's movies (400 frames, 20×20 px) and model:

- filling the latent cache: movies simulated and encoded per second (all ranks together);
- the predictor stage: global steps per second (global batch 64 windows, 2 groups of 16
  for the combination loss) and the movies simulated for the cache refreshes.

    python benchmarks/train_throughput.py --movies 128 --steps 30 --threads 2
    torchrun --standalone --nproc-per-node 2 benchmarks/train_throughput.py --movies 128 --steps 30 --threads 1
    torchrun --nproc-per-node 8 benchmarks/train_throughput.py --device cuda --movies 4096 --steps 500   # 8 GPUs

Rank 0 prints one JSON line. The encoder is untrained (its cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dle_stream.training import distributed
from dle_stream.training.latent_cache import LatentCache
from dle_stream.training.priors import get_preset
from dle_stream.training.trainer import TrainConfig, Trainer


def barrier(ranks: distributed.Ranks) -> None:
    if ranks.distributed:
        torch.distributed.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="low")
    ap.add_argument("--movies", type=int, default=128, help="movies in the latent cache (all ranks together)")
    ap.add_argument("--steps", type=int, default=30, help="predictor steps (global batches)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ranks, device = distributed.start(args.device)
    preset = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(name="bench", priors=preset.priors, timing=preset.timing, out=Path(tmp), frames=preset.frames,
                          device=device, steps=args.steps, cache_movies=args.movies, checkpoint_minutes=1e9)
        trainer = Trainer(cfg, log=lambda *a: None, ranks=ranks)
        trainer.model.eval()
        local = ranks.share(args.movies)
        cache = LatentCache(local, cfg.frames, cfg.architecture.latent)
        barrier(ranks)
        t0 = time.perf_counter()
        trainer.fill_cache(cache, local, 1.0, "cache")
        barrier(ranks)
        t_fill = time.perf_counter() - t0
        movies_before = trainer.state["movies_simulated"]
        t0 = time.perf_counter()
        trainer.train_predictor(cache, None, 0.0)
        barrier(ranks)
        t_steps = time.perf_counter() - t0
        refreshed = ranks.total([trainer.state["movies_simulated"] - movies_before])[0]
    if ranks.main:
        print(json.dumps({
            "processes": ranks.world, "threads_per_process": torch.get_num_threads(), "device": device,
            "preset": args.preset, "cache_movies": args.movies, "fill_s": round(t_fill, 2),
            "movies_per_s": round(args.movies / t_fill, 2), "predictor_steps": args.steps,
            "predictor_s": round(t_steps, 2), "steps_per_s": round(args.steps / t_steps, 3),
            "windows_per_s": round(args.steps * cfg.batch / t_steps, 1),
            "refresh_movies_per_s": round(refreshed / t_steps, 2)}))


if __name__ == "__main__":
    main()
