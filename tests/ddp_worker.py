"""A tiny training run under torchrun, for tests/test_distributed.py (not a test module).

``torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT`` trains a small model
in OUT with the real trainer (every stage: autoencoder, end-to-end, predictor with the
combination loss) and writes, per rank, ``OUT/rank-R.json``: a digest of every weight after
each optimiser step, and the D of every movie in the rank's latent cache.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from dle_stream.model import ModelConfig
from dle_stream.training import distributed
from dle_stream.training.priors import SimulatorPriors, get_preset
from dle_stream.training.trainer import TrainConfig, Trainer


def small_config(out: Path, device: str) -> TrainConfig:
    priors = SimulatorPriors(
        d_min_um2_s=0.0, d_max_um2_s=1.5, particles="fixed", particles_max=20, density="box",
        brightness_photons=(1500.0, 0.0), background_photons=(20.0, 0.0), read_noise_photons=(0.5, 0.5),
        psf_sigma_xy_um=(0.21, 0.0), psf_sigma_z_um=(1.36, 0.0))
    return TrainConfig(name="ddp", priors=priors, timing=get_preset("low").timing, out=out, frames=40,
                       architecture=ModelConfig(temporal_channels=16, head_hidden=16), seed=3, steps=6, ae_steps=4,
                       ae_batch=32, cache_movies=48, refresh_movies=4, refresh_every=1, batch=16, val_movies=16,
                       sim_batch=16, checkpoint_minutes=60, e2e_steps=3, e2e_frames=40, e2e_batch=4,
                       combine_groups=2, group_size=4)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if value.is_floating_point() or name.endswith(("weight", "bias")):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    ranks, device = distributed.start("cpu")
    steps: list[list] = []

    def record(trainer: Trainer, stage: str) -> None:
        step = trainer.state[{"autoencoder": "ae_step", "end-to-end": "e2e_step", "predictor": "head_step"}[stage]]
        params = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters()))
        steps.append([stage, step, params.hexdigest()])

    trainer = Trainer(small_config(out, device), log=lambda *a: None, ranks=ranks, on_step=record)
    trainer.run()
    assert trainer.cache is not None
    cache = trainer.cache
    (out / f"rank-{ranks.rank}.json").write_text(json.dumps({
        "rank": ranks.rank, "world": ranks.world, "steps": steps,
        "cache_d": cache.d_um2_s[: cache.size].tolist(), "cache_size": cache.size,
        "movies_simulated": trainer.state["movies_simulated"]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
