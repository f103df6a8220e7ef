"""Train a DLE model for one scan timing and D prior: `dle-stream train`.

Stages (the paper's §2.4, adapted to a CPU budget by measurement):

1. **autoencoder**: the frame encoder and a decoder learn to reconstruct normalised
   simulated tile-frames (L2 loss, Adam 5e-4, as the paper).
2. **latent cache**: the encoder is frozen; simulated movies (raster-time reversal as
   the only geometric augmentation) are encoded once and kept as latents
   (:mod:`dle_stream.training.latent_cache`).
2b. **end-to-end** (optional, ``e2e_steps``/``e2e_minutes``): encoder, temporal ResNet and
   head trained together with the Gaussian NLL on raw simulated movies of ``e2e_frames``
   frames (short windows keep it affordable on a CPU; the encoder's features are
   per-frame). Measured need: at high D the information is the shape of a particle's
   streak within a frame, which an autoencoder-only encoder does not keep.
3. **predictor**: the temporal ResNet and MLP head learn D̂ and σ̂ from cached latent
   windows with the Gaussian NLL (paper Eq. 2); part of the cache is replaced by new
   movies every few steps, so the head rarely sees a movie twice.
4. **validation** on held-out movies (their own fixed seed, never used in training):
   the metrics go into the card.

A budget is ``steps`` (head steps; reproducible with ``seed``) or ``minutes`` (wall time,
split between stages). Every ``checkpoint_minutes`` and on Ctrl-C the trainer writes
a checkpoint and a usable model package to ``out``; ``resume`` continues from it.

Several processes (``torchrun``; :mod:`dle_stream.training.distributed`): each simulates its
own movies and takes its share of every global batch (``batch``, ``ae_batch``,
``e2e_batch``, the combination groups, the cache and its refreshes); the gradients are
averaged by DistributedDataParallel; rank 0 validates and writes everything.
"""

from __future__ import annotations

import csv
import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dle_stream import __version__
from dle_stream.errors import DleStreamError
from dle_stream.evaluation.metrics import json_safe, prior_baseline, summarize
from dle_stream.likelihood import posterior, window_log_likelihood
from dle_stream.model import DLEModel, GridLoss, ModelConfig, gaussian_nll, with_scan_features
from dle_stream.scan_family import REFERENCE_SCANS, SCAN_FEATURES, ScanFamily
from dle_stream.timing import ScanTiming
from dle_stream.training.augment import random_raster_augment
from dle_stream.training.checkpoint import (
    average_state,
    check_new_run_folder,
    load_checkpoint,
    load_optimizer,
    optimizer_state,
    save_checkpoint,
)
from dle_stream.training.d_sequence import EvenQuantiles
from dle_stream.training.distributed import SINGLE, Ranks
from dle_stream.training.latent_cache import LatentCache, simulate_latents
from dle_stream.training.mixture import MixedSimulator
from dle_stream.training.priors import SimulatorPriors
from dle_stream.training.simulator import Simulator

#: Seed of the held-out validation movies; training draws from its own seeded stream.
VALIDATION_SEED = 20_240_917
#: A run always takes at least this many predictor steps, however short its budget.
MIN_PREDICTOR_STEPS = 20
#: Movies of the small validation set used for the learning curve at each checkpoint.
CURVE_VALIDATION_MOVIES = 128
#: the golden ratio's fractional part: offsets one process's even D sequence from another's
GOLDEN = 0.6180339887498949
#: Share of the predictor stage over which the combination loss is phased in (0 → full weight).
GROUP_LOSS_RAMP = 0.3


@dataclass
class TrainConfig:
    """Everything a training run needs. Units: D µm²/s, times µs, minutes of wall time."""

    name: str
    priors: SimulatorPriors
    timing: ScanTiming
    out: Path
    preset: str = "custom"
    description: str = ""
    tile_height: int = 20
    tile_width: int = 20
    frames: int = 400
    architecture: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    device: str = "cpu"
    steps: int | None = None
    minutes: float | None = None
    ae_steps: int = 1500
    ae_batch: int = 256
    ae_lr: float = 5e-4
    cache_movies: int = 4096
    refresh_every: int = 2
    refresh_movies: int = 4
    batch: int = 64
    lr: float = 2e-3
    val_movies: int = 512
    checkpoint_minutes: float = 3.0
    sim_batch: int = 32
    resume: bool = False
    encoder_from: Path | None = None
    warm_from: Path | None = None
    e2e_steps: int = 0
    e2e_minutes: float = 0.0
    e2e_frames: int = 64
    e2e_batch: int = 16
    e2e_lr: float = 3e-4
    #: grid heads: groups of ``group_size`` windows of one D added per predictor step; their
    #: combined NLL (K = group_size and K = 4) joins the loss (0: single windows only)
    combine_groups: int = 2
    group_size: int = 16
    #: how the training movies' D values are drawn from the prior: "random" (independent
    #: draws) or "even" (a randomised van der Corput sequence of prior quantiles, separately
    #: for single movies and for groups: :mod:`dle_stream.training.d_sequence`). From one start,
    #: 16 windows combined from an even-draws head were biased by at most 1.0 σ before
    #: calibration, from a random-draws head by up to 2.5 σ (BENCHMARKS.md, "Honest numbers,
    #: seventh pass"); but 150-step runs on the test trainer's easy data ended worse with even
    #: draws (L1 0.33/0.35 against 0.31/0.30, two seeds), not understood yet: random stays the default
    d_draws: str = "random"
    #: held-out groups of ``group_size`` windows of one D scored at every validation (the
    #: combined part of the score that picks the kept weights)
    val_groups: int = 8
    #: the head's weights averaged exponentially over about this many predictor steps (decay
    #: 1 − 1/average_steps); validation, the kept weights and the package use the average
    #: rather than the last step's weights (0: off, the last step's weights)
    average_steps: float = 0.0
    #: a family model (:mod:`dle_stream.scan_family`): every cached movie's scan drawn from this
    #: box (``timing`` is then only the card's representative scan); None: one scan, ``timing``
    scan_family: ScanFamily | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise DleStreamError("train: give a budget, --steps N or --minutes M")
        if self.steps is not None and self.steps < 1:
            raise DleStreamError(f"train: --steps must be ≥ 1, got {self.steps}")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise DleStreamError(f"train: --minutes must be positive, got {self.minutes}")
        if self.e2e_steps < 0 or not (self.e2e_minutes >= 0 and math.isfinite(self.e2e_minutes)):
            raise DleStreamError("train: --e2e-steps and --e2e-minutes must be ≥ 0")
        if self.e2e_frames < 8 or self.e2e_batch < 2:
            raise DleStreamError("train: --e2e-frames must be ≥ 8 and the end-to-end batch ≥ 2")
        if self.combine_groups < 0 or self.group_size < 4 or self.group_size % 4:
            raise DleStreamError("train: --combine-groups must be ≥ 0 and the group size a multiple of 4")
        if self.d_draws not in ("random", "even"):
            raise DleStreamError(f"train: --d-draws must be random or even, got {self.d_draws!r}")
        if self.val_groups < 2:
            raise DleStreamError(f"train: --val-groups must be ≥ 2, got {self.val_groups}")
        if not (self.average_steps == 0 or (self.average_steps >= 2 and math.isfinite(self.average_steps))):
            raise DleStreamError(f"train: --average-steps must be 0 (off) or ≥ 2, got {self.average_steps}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise DleStreamError(f"train: unknown --device {self.device!r}; use auto, cpu or cuda")
        if self.scan_family is not None and (self.e2e_steps or self.e2e_minutes):
            raise DleStreamError("train: a family model trains its head only; leave out --e2e-steps/--e2e-minutes")
        if self.scan_family is not None and self.architecture.scan_features != SCAN_FEATURES:
            raise DleStreamError(f"train: a family model needs architecture scan_features = {SCAN_FEATURES}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise DleStreamError("train: --device cuda but no CUDA GPU is visible; use --device cpu or auto")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class _Part(torch.nn.Module):
    """The parts of the model one stage trains (``names``), as one module whose forward is
    the stage's (``forward``): what DistributedDataParallel wraps for that stage."""

    def __init__(self, model: DLEModel, names: tuple[str, ...], forward: Callable):
        super().__init__()
        for name in names:
            self.add_module(name, getattr(model, name))
        self._stage_forward = (forward,)  # a tuple: a module given as forward is not a part

    def forward(self, x: torch.Tensor):
        return self._stage_forward[0](x)


class Trainer:
    """Runs the stages of :mod:`dle_stream.training.trainer` with a live progress display.

    ``ranks``: this process's place in a multi-process run (default: a single process);
    ``on_step(trainer, stage)``: called after every optimiser step (stage "autoencoder",
    "end-to-end" or "predictor"), e.g. to watch the weights.
    """

    def __init__(self, config: TrainConfig, progress=None, log=print, ranks: Ranks = SINGLE,
                 on_step: Callable[[Trainer, str], None] | None = None):
        self.cfg = config
        self.ranks = ranks
        self.log = log if ranks.main else (lambda *a, **k: None)
        self.progress = progress if ranks.main else None
        self.on_step = on_step
        if ranks.distributed:
            small = [(flag, n) for flag, n in (("the predictor batch", config.batch),
                                               ("the autoencoder batch", config.ae_batch),
                                               ("--e2e-batch", config.e2e_batch)) if n < ranks.world]
            if small:
                raise DleStreamError(f"train: {ranks.world} processes need {small[0][0]} ≥ {ranks.world} (it is "
                                     f"{small[0][1]}, split over the processes); start fewer processes")
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        #: every rank draws its own movies (rank 0 the stream a single process draws)
        self.gen = torch.Generator(device=self.device).manual_seed(ranks.seed(config.seed))
        self.cpu_gen = torch.Generator().manual_seed(ranks.seed(config.seed + 1))
        self.model = DLEModel(config.architecture).to(self.device)
        arch = config.architecture
        self.grid_loss = GridLoss(arch.grid).to(self.device) if arch.output == "d_grid" else None
        #: training draws: for a grid head a share of D beyond the range (its prior, divided out later)
        self.train_priors = config.priors
        if self.grid_loss is not None:
            prior = arch.training_prior
            self.train_priors = config.priors.with_(d_beyond=(prior.beyond, prior.overflow), d_grid_top=arch.grid_top)
        self.sim = MixedSimulator(self.train_priors, config.timing, config.tile_height, config.tile_width,
                                  config.frames, self.device)
        #: validation: the operating range and the paper's density, as the accuracy suites
        self.val_sim = Simulator(config.priors.operating(), config.timing, config.tile_height, config.tile_width,
                                 config.frames, self.device)
        #: a family model: its validation scans (name → scan; the curve pools them) and the
        #: scan of the combination group being filled
        self.family = config.scan_family
        self.val_scans: dict[str, ScanTiming] = {}
        if self.family is not None:
            self.val_scans = {name: t for name, t in REFERENCE_SCANS.items() if self.family.contains(t)}
            if not self.val_scans:
                raise DleStreamError("train: the scan family holds none of the reference scans to validate on")
        self._group_scan: ScanTiming | None = None
        self.d_max = config.priors.d_max_um2_s
        self.state: dict = {"stage": "autoencoder", "ae_step": 0, "head_step": 0, "elapsed_s": 0.0,
                            "movies_simulated": 0, "curve": [], "runs": 0, "e2e_step": 0, "groups_made": 0}
        if config.d_draws == "even":  # [shift, next index] of each sequence; kept in the checkpoint
            shifts = torch.rand(2, generator=torch.Generator().manual_seed(config.seed + 20261130)).tolist()
            self.state["even_d"] = {"single": [shifts[0], 0], "group": [shifts[1], 0]}
        #: combination loss: groups of windows of one D (grid heads only)
        self.grouped = self.grid_loss is not None and config.combine_groups > 0
        self._group: list = []  # [D µm²/s, movies still to simulate, id] of the group being filled
        self._adds = 0
        if self.grid_loss is not None:
            self.prior_log = torch.tensor(arch.training_prior.log_density(arch.grid), dtype=torch.float32,
                                          device=self.device)
        self.val_groups: tuple[torch.Tensor, torch.Tensor] | None = None
        self.opt_ae = torch.optim.Adam(list(self.model.encoder.parameters()) + list(self.model.decoder.parameters()),
                                       lr=config.ae_lr)
        self.opt_head = torch.optim.Adam(self.model.head_parameters(), lr=config.lr)
        self.opt_e2e = torch.optim.Adam(list(self.model.encoder.parameters()) + list(self.model.temporal.parameters())
                                        + list(self.model.mlp.parameters()), lr=config.e2e_lr)
        #: the head's weights averaged over about ``average_steps`` predictor steps (None: off)
        self.head_average: torch.optim.swa_utils.AveragedModel | None = None
        if config.average_steps:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.head_average = AveragedModel(self.model.head_modules(),
                                              multi_avg_fn=get_ema_multi_avg_fn(1.0 - 1.0 / config.average_steps))
        self.checkpoint_dir = config.out / "checkpoint"
        self._t0 = time.monotonic()
        self._elapsed_before = 0.0
        self._last_ckpt = time.monotonic()
        self.cache: LatentCache | None = None
        self.val_movies = config.val_movies
        #: (validation score, weights, step) of the best validation so far in this run
        self._best: tuple[float, dict, int] | None = None
        #: movies_simulated as last summed over the ranks (each rank adds its own since)
        self._movies_synced = 0

    # ------------------------------------------------------------------ time
    def elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._t0

    def run_elapsed(self) -> float:
        return time.monotonic() - self._t0

    def budget_fraction(self, fraction: float) -> bool:
        """True while this run has used less than ``fraction`` of its minutes budget."""
        if self.cfg.minutes is None:
            return True
        return self.run_elapsed() < fraction * self.cfg.minutes * 60

    # --------------------------------------------------------------- resume
    def load(self) -> None:
        self._load()
        self._movies_synced = self.state["movies_simulated"]

    def _load(self) -> None:
        cfg = self.cfg
        if cfg.resume:
            tensors, state = load_checkpoint(self.checkpoint_dir)
            self.model.load_state_dict(tensors)
            self.state.update({k: v for k, v in state.items() if k in self.state})
            self.state["runs"] += 1
            self._elapsed_before = float(state.get("elapsed_s", 0.0))
            for name, opt in self._optimizers().items():
                tensors = optimizer_state(self.checkpoint_dir, name, state)
                if tensors and name in state.get("optimizers", {}):
                    load_optimizer(opt, tensors, state["optimizers"][name])
            if self.head_average is not None:
                average = average_state(self.checkpoint_dir, "head", state)
                if average:  # else the average starts from the resumed weights
                    self.head_average.load_state_dict(average)
            # a resumed run draws new movies: its own stream
            self.gen.manual_seed(self.ranks.seed(cfg.seed + 7919 * self.state["runs"]))
            self.log(f"resumed {self.checkpoint_dir}: stage {self.state['stage']}, "
                     f"head step {self.state['head_step']}, {self._elapsed_before / 60:.1f} min trained before")
        elif cfg.warm_from is not None:
            self._warm_start(cfg.warm_from)
        elif cfg.encoder_from is not None:
            from dle_stream.model_package import load_model_package

            donor, card = load_model_package(cfg.encoder_from)
            if donor.config.to_dict() != self.model.config.to_dict():
                raise DleStreamError(f"{cfg.encoder_from}: its architecture differs; cannot reuse its encoder")
            self.model.encoder.load_state_dict(donor.encoder.state_dict())
            self.model.decoder.load_state_dict(donor.decoder.state_dict())
            self.state["stage"] = "predictor"
            self.state["encoder_from"] = card.name
            self.log(f"encoder taken from {cfg.encoder_from} (frozen); skipping the autoencoder stage")

    def _warm_start(self, folder: Path) -> None:
        """Start from a package's weights: every tensor whose shape matches (encoder, decoder,
        temporal ResNet, the head's hidden layer); a new output layer where the shapes differ."""
        from dle_stream.model_package import load_model_package

        donor, card = load_model_package(folder)
        if donor.config.scan_features and not self.model.config.scan_features:
            from dle_stream.scan_family import specialise_to_scan

            assert card.family is not None  # a valid card: scan features only with a scan family
            if not card.family.contains(self.cfg.timing):
                raise DleStreamError(f"{folder}: family model {card.name} does not serve this scan "
                                     f"({'; '.join(card.family.outside(self.cfg.timing))}); start from another model")
            donor = specialise_to_scan(donor, card.family, self.cfg.timing, card.d_max_um2_s)
            self.log(f"warm start: family model {card.name} specialised to this scan")
        if donor.config.output == "d_grid" and not donor.config.grid_basis and self.model.config.grid_basis \
                and donor.config.grid.knots.size == self.model.config.grid.knots.size:
            from dle_stream.training.output_basis import project_output_to_spline_basis

            donor = project_output_to_spline_basis(donor, self.model.config.grid_basis)
        if donor.config.output == "d_grid" and donor.config.grid_basis and not donor.config.grid_prior_exact \
                and self.model.config.grid_prior_exact and donor.config.grid_basis == self.model.config.grid_basis:
            from dle_stream.training.output_basis import add_exact_prior

            donor = add_exact_prior(donor)
        own = self.model.state_dict()
        taken = {k: v for k, v in donor.state_dict().items() if k in own and own[k].shape == v.shape}
        self.model.load_state_dict(taken, strict=False)
        fresh = sorted(set(own) - set(taken))
        self.state["stage"] = "predictor"
        self.state["warm_from"] = card.name
        self.log(f"warm start from {folder}: {len(taken)} tensors taken"
                 + (f", new {', '.join(fresh)}" if fresh else "") + "; skipping the autoencoder stage")

    def checkpoint(self, write_package: bool = True, sync: bool = True) -> None:
        """Write the checkpoint (and the package once the head is trained). With several
        processes every rank calls it (``sync``: the movie count is summed over the ranks
        first) and rank 0 writes; ``sync=False`` (after Ctrl-C) writes without waiting for them."""
        if sync:
            self._sync_counts()
        self._last_ckpt = time.monotonic()
        if not self.ranks.main:
            return
        self.state["elapsed_s"] = self.elapsed()
        save_checkpoint(self.checkpoint_dir, self.model, self._optimizers(),
                        {**self.state, "config": _config_json(self.cfg)},
                        averages=None if self.head_average is None else {"head": self.head_average.state_dict()})
        if write_package and self.state["head_step"] > 0:
            with self._averaged_head() as swapped:
                if swapped and self.cache is not None:  # BatchNorm statistics of the averaged weights
                    self.recalibrate_batchnorm(self.cache)
                self.write_package(validation=self.state.get("validation"))
        self._last_ckpt = time.monotonic()

    @contextmanager
    def _averaged_head(self) -> Iterator[bool]:
        """Inside: the model's head holds the averaged weights (if a run keeps them and has
        averaged at least one step; yields whether that changed them); after: the weights it
        is being trained with again."""
        if self.head_average is None or int(self.head_average.n_averaged) == 0 or all(
                torch.equal(p, a) for p, a in zip(self.model.head_modules().parameters(),
                                                  self.head_average.module.parameters())):
            yield False
            return
        live = [p.detach().clone() for p in self.model.head_modules().parameters()]
        self._load_averaged_head()
        try:
            yield True
        finally:
            with torch.no_grad():
                for p, v in zip(self.model.head_modules().parameters(), live):
                    p.copy_(v)

    def _load_averaged_head(self) -> None:
        assert self.head_average is not None
        with torch.no_grad():
            for p, a in zip(self.model.head_modules().parameters(), self.head_average.module.parameters()):
                p.copy_(a)

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"ae": self.opt_ae, "head": self.opt_head, "e2e": self.opt_e2e}

    def _sync_counts(self) -> None:
        """``movies_simulated``: the movies of all ranks (each counts its own between syncs)."""
        new = self.state["movies_simulated"] - self._movies_synced
        self.state["movies_simulated"] = self._movies_synced + int(round(self.ranks.total([new])[0]))
        self._movies_synced = self.state["movies_simulated"]

    def _checkpoint_due(self) -> bool:
        return time.monotonic() - self._last_ckpt > self.cfg.checkpoint_minutes * 60

    def _rank_mean(self, values: list[float]) -> list[float]:
        """The mean over the ranks of each value (for the learning curve); every rank calls it."""
        if not self.ranks.distributed:
            return values
        return [v / self.ranks.world for v in self.ranks.total(values)]

    def _stage(self, names: tuple[str, ...], forward: Callable) -> Callable:
        """The forward pass a stage trains through: ``forward`` itself in a single process,
        else the stage's parts in DistributedDataParallel (gradients averaged over ranks)."""
        if not self.ranks.distributed:
            return forward
        return self.ranks.wrap(_Part(self.model, names, forward), self.device)

    @staticmethod
    def _end_stage() -> None:
        """Free the stage's DistributedDataParallel (its gradient hooks) before the next stage wraps
        shared parameters again."""
        gc.collect()

    def _step_done(self, stage: str) -> None:
        if self.on_step is not None:
            self.on_step(self, stage)

    # --------------------------------------------------------------- stages
    def train_autoencoder(self) -> None:
        cfg = self.cfg
        self.model.train()
        frames_pool = None
        uses = 0
        local_batch = self.ranks.share(cfg.ae_batch)
        weight = self.ranks.weight(local_batch, cfg.ae_batch)
        forward = self._stage(("encoder", "decoder"), self.model.autoencode)
        task = self._task("autoencoder", cfg.ae_steps, self.state["ae_step"])
        while self.state["ae_step"] < cfg.ae_steps:
            go, due = self.ranks.agree([self.budget_fraction(0.2), self._checkpoint_due()])
            if not go:
                break
            if frames_pool is None or uses >= 8:
                with torch.no_grad():
                    batch = self.sim.simulate(max(4, local_batch // 32), generator=self.gen)
                self.state["movies_simulated"] += len(batch)
                frames_pool = batch.movies.reshape(-1, cfg.tile_height, cfg.tile_width)
                uses = 0
            idx = torch.randint(0, frames_pool.shape[0], (local_batch,), generator=self.gen, device=self.device)
            recon, target = forward(frames_pool[idx])
            loss = torch.mean((recon - target) ** 2)
            self.opt_ae.zero_grad(set_to_none=True)
            (loss * weight if weight != 1.0 else loss).backward()
            self.opt_ae.step()
            uses += 1
            self.state["ae_step"] += 1
            self._step_done("autoencoder")
            if self.state["ae_step"] % 25 == 0:
                self._curve("autoencoder", self.state["ae_step"], self._rank_mean([loss.item()])[0], math.nan, math.nan)
            self._advance(task, f"AE loss {loss.item():.3f}")
            if due:
                self.checkpoint()
        del forward
        self._end_stage()
        self.state["stage"] = "predictor"

    def _draw_d(self, n: int, kind: str) -> torch.Tensor | None:
        """D µm²/s [n] of the next ``n`` movies (``kind`` "single") or groups ("group") from the
        training prior: even quantiles with ``d_draws`` "even"; None (the simulator draws
        them) for single movies with "random"."""
        seq = self.state.get("even_d", {}).get(kind)
        if seq is None:
            return None if kind == "single" else self.sim.draw_d(n, self.gen)
        # every process its own shift of the sequence (a resumed run shares rank 0's state)
        quantiles = EvenQuantiles((seq[0] + GOLDEN * self.ranks.rank) % 1.0, int(seq[1]))
        q = quantiles.next(n)
        seq[1] = quantiles.index
        return self.sim.d_quantile(q).to(self.device)

    def _group_labels(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(D µm²/s [n], group id [n]) for the next ``n`` training movies: groups of
        ``group_size`` movies share a D drawn from the training prior."""
        ds, ids = [], []
        for _ in range(n):
            if not self._group or self._group[1] == 0:
                group_d = self._draw_d(1, "group")
                assert group_d is not None
                d = float(group_d[0])
                self._group = [d, self.cfg.group_size, self.state["groups_made"]]
                self.state["groups_made"] += 1
            ds.append(self._group[0])
            ids.append(self._group[2])
            self._group[1] -= 1
        return torch.tensor(ds, dtype=torch.float32, device=self.device), torch.tensor(ids, dtype=torch.long)

    def add_movies(self, cache: LatentCache, n: int) -> None:
        """Simulate ``n`` training movies, encode them and add them to ``cache``: every other
        call in groups of one D (for the combination loss), else each with its own D (so
        that the single-window loss still sees as many D values as movies)."""
        grouped = self.grouped and self._adds % 2 == 0
        self._adds += 1
        if self.family is not None:
            self._add_family_movies(cache, n, grouped)
            return
        d, group = self._group_labels(n) if grouped else (self._draw_d(n, "single"), None)
        lat, d_out, vis = simulate_latents(self.sim, self.model, n, self.gen,
                                           augment=not self.cfg.timing.bidirectional, d_um2_s=d)
        self.state["movies_simulated"] += n
        cache.add(lat, d_out, vis, group)

    def _add_family_movies(self, cache: LatentCache, n: int, grouped: bool) -> None:
        """A family model's movies: each call (ungrouped) or each group of one D its own scan
        drawn from the family's box; the scan's features are appended to the latents."""
        assert self.family is not None
        left = n
        while left > 0:
            d: torch.Tensor | None
            if grouped:
                if not self._group or self._group[1] == 0 or self._group_scan is None:
                    self._group = []  # start a new group, and draw its scan
                    self._group_scan = self.family.draw(self.gen)
                k = min(left, self._group[1] if self._group else self.cfg.group_size)
                d, group = self._group_labels(k)
                timing = self._group_scan
            else:
                k, group, timing = left, None, self.family.draw(self.gen)
                d = self._draw_d(k, "single")
            sim = MixedSimulator(self.train_priors, timing, self.cfg.tile_height, self.cfg.tile_width,
                                 self.cfg.frames, self.device)
            lat, d_out, vis = simulate_latents(sim, self.model, k, self.gen, augment=not timing.bidirectional,
                                               d_um2_s=d)
            cache.add(self._with_features(lat, timing), d_out, vis, group)
            self.state["movies_simulated"] += k
            left -= k

    def _with_features(self, latents: torch.Tensor, timing: ScanTiming) -> torch.Tensor:
        """Latents [n, T, latent] with the scan's family features appended to every frame."""
        assert self.family is not None
        features = torch.from_numpy(self.family.features(timing, self.d_max))
        return with_scan_features(latents, features, self.cfg.architecture)

    def fill_cache(self, cache: LatentCache, n_movies: int, fraction: float, label: str) -> None:
        task = self._task(label, n_movies, 0)
        while cache.size < n_movies and (cache.size < 2 * self.ranks.share(self.cfg.batch)
                                         or self.budget_fraction(fraction)):
            n = min(self.cfg.sim_batch, n_movies - cache.size)
            self.add_movies(cache, n)
            self._advance(task, f"{cache.size} movies", n)

    def validation_groups(self, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out groups of ``group_size`` windows of one D (the operating range and density):
        (latents [n_groups, K, T, latent], D [n_groups])."""
        g = torch.Generator(device=self.device).manual_seed(VALIDATION_SEED + 2)
        k = self.cfg.group_size
        self.model.eval()
        lat, d = [], []
        scans = list(self.val_scans.values())
        sims = [self._validation_simulator(t) for t in scans]
        for i in range(n_groups):
            timing = scans[i % len(scans)] if scans else None
            sim = sims[i % len(sims)] if sims else self.val_sim
            dg = sim.draw_d(1, g)
            latents, _, _ = simulate_latents(sim, self.model, k, g, augment=False, d_um2_s=dg.repeat(k))
            lat.append(latents if timing is None else self._with_features(latents, timing))
            d.append(dg.cpu())
        return torch.stack(lat), torch.cat(d)

    def _combined_nll(self, outs: torch.Tensor, d_um2_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL of the true D after combining each group of window outputs [G, K, n]: all K
        windows, and 4 at a time (K a multiple of 4)."""
        assert self.grid_loss is not None  # groups only for grid heads
        n_groups, k = outs.shape[:2]
        target = (d_um2_s / self.d_max).to(self.device)
        return (self.grid_loss.combined(outs, target, self.prior_log),
                self.grid_loss.combined(outs.reshape(n_groups * k // 4, 4, -1), target.repeat_interleave(k // 4),
                                        self.prior_log))

    @torch.inference_mode()
    def group_nll(self, latents: torch.Tensor, d_um2_s: torch.Tensor) -> dict[str, float]:
        """NLL of the true D after combining each group [G, K, T, latent] (K = all, and 4 at a time)."""
        self.model.eval()
        n_groups, k = latents.shape[:2]
        out = torch.cat([self.model.head(x.to(self.device)) for x in latents.float()]).reshape(n_groups, k, -1)
        all_k, four = self._combined_nll(out, d_um2_s)
        return {f"nll_k{k}": float(all_k), "nll_k4": float(four)}

    def _validation_simulator(self, timing: ScanTiming) -> Simulator:
        """The validation movies' simulator (operating range, the run's tiles) for another scan."""
        return Simulator(self.cfg.priors.operating(), timing, self.cfg.tile_height, self.cfg.tile_width,
                         self.cfg.frames, self.device)

    def validation_latents(self, n: int, timing: ScanTiming | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` held-out movies (the validation seed) of the run's scan, or of ``timing``; a
        family model's validation without ``timing`` splits ``n`` over its validation scans."""
        if timing is None and self.family is not None:
            parts = [self.validation_latents(max(1, n // len(self.val_scans)), t) for t in self.val_scans.values()]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        g = torch.Generator(device=self.device).manual_seed(VALIDATION_SEED)
        sim = self.val_sim if timing is None else self._validation_simulator(timing)
        lat, d = [], []
        self.model.eval()
        for i in range(0, n, self.cfg.sim_batch):
            m = min(self.cfg.sim_batch, n - i)
            latents, dd, _ = simulate_latents(sim, self.model, m, g, augment=False)
            lat.append(latents if timing is None else self._with_features(latents, timing))
            d.append(dd)
        return torch.cat(lat), torch.cat(d)

    def recalibrate_batchnorm(self, cache: LatentCache, batches: int = 16) -> None:
        """Re-estimate the temporal ResNet's BatchNorm statistics as a plain average over
        ``batches`` cached batches with the current weights.

        Measured: the running (exponential) averages kept during training lag behind the
        weights, and inference with them was far worse (validation L1 0.29 µm²/s) than
        with batch statistics (0.13); after this recalibration inference matched (0.13).
        """
        if cache.size == 0:
            return
        self._recalibrate(lambda: cache.sample(self.cfg.batch, self.cpu_gen)[0], batches)

    def _recalibrate(self, latent_batch, batches: int) -> None:
        """BatchNorm statistics of the temporal ResNet as the plain average over
        ``batches`` calls of ``latent_batch()`` (→ latents [B, T, latent])."""
        bns = [m for m in self.model.temporal.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        momenta = [b.momentum for b in bns]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None  # cumulative average
        self.model.eval()
        self.model.temporal.train()
        with torch.no_grad():
            for _ in range(batches):
                self.model.head(latent_batch().to(self.device))
        for b, m in zip(bns, momenta):
            b.momentum = m
        self.model.eval()

    # ------------------------------------------------------------ end-to-end
    def _e2e_done(self, start_step: int, t_start: float) -> bool:
        cfg = self.cfg
        done = self.state["e2e_step"] - start_step
        if cfg.e2e_steps and done >= cfg.e2e_steps:
            return True
        if cfg.e2e_minutes and time.monotonic() - t_start >= cfg.e2e_minutes * 60:
            return True
        if cfg.minutes is not None and not self.budget_fraction(0.6):
            return True
        return not (cfg.e2e_steps or cfg.e2e_minutes)

    def _e2e_progress(self, start_step: int, t_start: float) -> float:
        cfg = self.cfg
        parts = []
        if cfg.e2e_steps:
            parts.append((self.state["e2e_step"] - start_step) / cfg.e2e_steps)
        if cfg.e2e_minutes:
            parts.append((time.monotonic() - t_start) / (cfg.e2e_minutes * 60))
        if cfg.minutes is not None:
            parts.append(self.run_elapsed() / (0.6 * cfg.minutes * 60))
        return min(1.0, max(parts)) if parts else 1.0

    def _e2e_movies(self, sim: Simulator | MixedSimulator, n: int, generator: torch.Generator, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            batch = sim.simulate(n, generator=generator)
        movies = batch.movies
        if augment and not self.cfg.timing.bidirectional:
            movies = random_raster_augment(movies, generator)
        return movies, batch.d_um2_s.float()

    @torch.inference_mode()
    def _e2e_evaluate(self, sim: Simulator | MixedSimulator, val: tuple[torch.Tensor, torch.Tensor]) -> dict:
        cfg = self.cfg

        def latent_batch() -> torch.Tensor:
            movies, _ = self._e2e_movies(sim, cfg.e2e_batch, self.gen, augment=True)
            b, t = movies.shape[:2]
            return self.model.encode(movies.reshape(b * t, *movies.shape[2:])).reshape(b, t, -1)

        self._recalibrate(latent_batch, 8)
        return self._score(self.model, val[0], val[1], cfg.e2e_batch)

    def train_end_to_end(self) -> None:
        """Encoder + temporal ResNet + head on raw movies of ``e2e_frames`` frames (NLL)."""
        cfg = self.cfg
        start_step, t_start = self.state["e2e_step"], time.monotonic()
        if self.ranks.agree([self._e2e_done(start_step, t_start)])[0]:
            return
        sim = MixedSimulator(self.train_priors, cfg.timing, cfg.tile_height, cfg.tile_width, cfg.e2e_frames,
                             self.device)
        val_sim = Simulator(cfg.priors.operating(), cfg.timing, cfg.tile_height, cfg.tile_width, cfg.e2e_frames,
                            self.device)
        val = None
        if self.ranks.main:  # only rank 0 validates
            val_gen = torch.Generator(device=self.device).manual_seed(VALIDATION_SEED + 1)
            val = self._e2e_movies(val_sim, CURVE_VALIDATION_MOVIES, val_gen, augment=False)
        params = [p for group in self.opt_e2e.param_groups for p in group["params"]]
        self.model.encoder.requires_grad_(True)
        local_batch = self.ranks.share(cfg.e2e_batch)
        weight = self.ranks.weight(local_batch, cfg.e2e_batch)
        forward = self._stage(("encoder", "temporal", "mlp"), self.model)
        task = self._task("end-to-end", cfg.e2e_steps or None, 0)
        recent_loss, recent_l1 = [], []
        while True:
            done, progress, due = self.ranks.agree([self._e2e_done(start_step, t_start),
                                                    self._e2e_progress(start_step, t_start), self._checkpoint_due()])
            if done:
                break
            lr = _set_cosine_lr(self.opt_e2e, cfg.e2e_lr, progress)
            movies, d = self._e2e_movies(sim, local_batch, self.gen, augment=True)
            self.state["movies_simulated"] += local_batch
            self.model.train()
            loss, l1 = self._nll_step(self.opt_e2e, params, forward(movies), d, weight=weight)
            self.state["e2e_step"] += 1
            self._step_done("end-to-end")
            recent_loss.append(loss)
            recent_l1.append(l1)
            if self.state["e2e_step"] % 25 == 0:
                mean_loss, mean_l1 = self._rank_mean([float(np.mean(recent_loss)), float(np.nanmean(recent_l1))])
                self._curve("end-to-end", self.state["e2e_step"], mean_loss, mean_l1, math.nan, lr)
                recent_loss, recent_l1 = [], []
            self._advance(task, f"step {self.state['e2e_step']} loss {np.mean(recent_loss or [loss]):.3f} "
                                f"L1 {np.nanmean(recent_l1 or [0]):.3g} µm²/s ({cfg.e2e_frames}-frame windows)")
            if due:
                self._e2e_checkpoint(sim, val, lr)
        del forward
        self._end_stage()
        self._e2e_checkpoint(sim, val, math.nan)
        self.model.encoder.requires_grad_(False)

    def _e2e_checkpoint(self, sim: Simulator | MixedSimulator, val, lr: float) -> None:
        if val is not None:  # rank 0
            metrics = self._e2e_evaluate(sim, val)
            self._curve("end-to-end-validation", self.state["e2e_step"], metrics["nll"], metrics["l1"],
                        metrics["best_half_l1"], lr)
            self.log(f"end-to-end step {self.state['e2e_step']}: validation L1 {metrics['l1']:.4g} µm²/s "
                     f"(best half {metrics['best_half_l1']:.4g}) on {len(val[1])} {self.cfg.e2e_frames}-frame movies")
        self.checkpoint(write_package=False)

    @torch.inference_mode()
    def evaluate(self, latents: torch.Tensor, d_true: torch.Tensor) -> dict:
        self.model.eval()
        return self._score(lambda x: self.model.head(x.float()), latents, d_true, 64)

    def _score(self, forward, inputs: torch.Tensor, d_true: torch.Tensor, chunk: int) -> dict:
        """Metrics of ``forward`` (→ window outputs) over ``inputs`` in chunks."""
        outs = [forward(inputs[i:i + chunk].to(self.device)).cpu() for i in range(0, inputs.shape[0], chunk)]
        d_hat, sig, interval = self._read_out(torch.cat(outs))
        metrics = summarize(d_true.cpu().numpy(), d_hat, sig)
        if self.grid_loss is not None:  # the exact NLL of the true D under the window output
            out = torch.cat(outs).float().to(self.device)
            metrics["grid_nll"] = float(self.grid_loss(out, (d_true.float() / self.d_max).to(self.device)))
        if interval is not None:
            truth = d_true.cpu().numpy()
            metrics["interval68_coverage"] = float(np.mean((interval[0] <= truth) & (truth <= interval[1])))
        return metrics

    def _read_out(self, out: torch.Tensor) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """Window outputs → (D̂, σ̂, 68 % interval or None), µm²/s; for a grid head the
        posterior median, std and highest-density interval on the operating range."""
        values = out.detach().double().cpu().numpy()
        if self.grid_loss is None:
            return values[:, 0] * self.d_max, values[:, 1] * self.d_max, None
        arch = self.cfg.architecture
        post = posterior(window_log_likelihood(values, arch.grid, arch.training_prior, arch.grid_temperature,
                                               arch.grid_warp),
                         arch.grid, self.d_max)
        return post.d, post.sigma, (post.lo68, post.hi68)

    def _nll_step(self, opt: torch.optim.Optimizer, clip: list, out: torch.Tensor,
                  d_um2_s: torch.Tensor, extra: torch.Tensor | None = None, weight: float = 1.0) -> tuple[float, float]:
        """One likelihood step (gradient norm of ``clip`` limited to 5); (loss, L1 µm²/s).

        The loss is the exact NLL of the true D under a grid output, or the paper's
        Gaussian NLL (Eq. 2) for a "gaussian" head. The L1 of a grid head counts only
        movies inside the operating range (where its number is read). ``weight``: this
        rank's factor for its part of the global batch (:meth:`Ranks.weight`); ``extra``
        comes weighted.
        """
        target = (d_um2_s / self.d_max).to(self.device)
        if self.grid_loss is not None:
            loss = self.grid_loss(out, target)
        else:
            loss = gaussian_nll(out[:, 0], out[:, 1], target)
        if weight != 1.0:
            loss = loss * weight
        if extra is not None:  # the combination loss of groups of windows
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip, 5.0)
        opt.step()
        d_hat = self._read_out(out)[0]
        truth = d_um2_s.cpu().numpy()
        inside = truth <= self.d_max
        l1 = float(np.mean(np.abs(d_hat - truth)[inside])) if inside.any() else math.nan
        return loss.item(), l1

    def train_predictor(self, cache: LatentCache, val: tuple[torch.Tensor, torch.Tensor] | None,
                        reserve_s: float) -> None:
        """The head on cached latents; ``val``: the curve's held-out latents (rank 0; None elsewhere)."""
        cfg = self.cfg
        self.model.encoder.requires_grad_(False)
        start_step = self.state["head_step"]
        total = cfg.steps
        peak_lr = cfg.lr if start_step < 100 else cfg.lr / 3  # a warm restart when resuming a trained head
        run_budget_s = None if cfg.minutes is None else cfg.minutes * 60 - reserve_s
        # this rank's part of each global batch, of the groups and of the cache refreshes
        local_batch, local_groups = self.ranks.share(cfg.batch), self.ranks.share(cfg.combine_groups)
        single_weight = self.ranks.weight(local_batch, cfg.batch)
        group_weight = self.ranks.weight(local_groups, cfg.combine_groups)
        local_refresh = self.ranks.share(cfg.refresh_movies)
        if start_step > 0 and val is not None and self._best is None:
            # a resumed head: its starting weights are the ones to beat, so that a run never
            # ends worse on the held-out curve than the package it continued
            self._validate_and_keep_best(cache, val, math.nan)
        head_parts = ("temporal", "mlp") + (("scan_film",) if self.family is not None else ())
        forward = self._stage(head_parts, lambda x: self.model.head(x))
        task = self._task("predictor", total if total else None, 0)
        recent_loss, recent_l1 = [], []
        while True:
            done = self.state["head_step"] - start_step
            if total is not None and done >= total:
                break
            out_of_time = run_budget_s is not None and self.run_elapsed() >= run_budget_s and done >= MIN_PREDICTOR_STEPS
            if total:
                progress = done / total
            else:
                assert run_budget_s is not None  # TrainConfig needs --steps (≥ 1) or --minutes
                progress = self.run_elapsed() / max(run_budget_s, 1.0)
            stop, progress, due = self.ranks.agree([out_of_time, progress, self._checkpoint_due()])
            if stop:
                break
            lr = _set_cosine_lr(self.opt_head, peak_lr, progress)
            self.model.temporal.train()
            self.model.mlp.train()
            lat, d = cache.sample(local_batch, self.cpu_gen)
            groups = (cache.sample_groups(local_groups, cfg.group_size, self.cpu_gen)
                      if self.grouped and local_groups else None)
            extra = None
            if groups is None:
                out = forward(lat.to(self.device))
            else:  # one forward pass: single windows, then the groups' windows
                g_lat, g_d = groups
                n_groups, k = g_lat.shape[:2]
                both = forward(torch.cat([lat, g_lat.reshape(n_groups * k, *g_lat.shape[2:])]).to(self.device))
                out, g_out = both[: lat.shape[0]], both[lat.shape[0]:].reshape(n_groups, k, -1)
                # phased in over the first 30 % of the stage: combining windows whose single
                # likelihoods are still poor only adds noise (measured: a 150-step run from
                # scratch ended at L1 0.32 with the full weight from step 1, 0.29 without)
                weight = min(1.0, progress / GROUP_LOSS_RAMP)
                all_k, four = self._combined_nll(g_out, g_d)
                extra = weight * (all_k + four)
                if group_weight != 1.0:
                    extra = extra * group_weight
            loss, l1 = self._nll_step(self.opt_head, self.model.head_parameters(),
                                      out, d, extra, weight=single_weight)
            self.state["head_step"] += 1
            if self.head_average is not None:
                self.head_average.update_parameters(self.model.head_modules())
            self._step_done("predictor")
            recent_loss.append(loss)
            recent_l1.append(l1)
            if self.state["head_step"] % cfg.refresh_every == 0 and local_refresh:
                self.add_movies(cache, local_refresh)
            if self.state["head_step"] % 50 == 0:
                mean_loss, mean_l1 = self._rank_mean([float(np.mean(recent_loss)), float(np.nanmean(recent_l1))])
                self._curve("predictor", self.state["head_step"], mean_loss, mean_l1, math.nan, lr)
                recent_loss, recent_l1 = [], []
            self._advance(task, f"step {self.state['head_step']} loss {np.mean(recent_loss or [loss]):.3f} "
                                f"L1 {np.nanmean(recent_l1 or [0]):.3g} µm²/s")
            if due:
                if val is not None:
                    self._validate_and_keep_best(cache, val, lr)
                self.checkpoint()
        del forward
        self._end_stage()
        if self.head_average is not None and int(self.head_average.n_averaged) > 0:
            self._load_averaged_head()  # the head ends with the averaged weights
            self.log(f"the head's weights: their average over the last ≈ {self.cfg.average_steps:g} steps")
        if self._best is not None and val is not None:
            score = self._validate_and_keep_best(cache, val, math.nan)
            best_score, best_state, best_step = self._best
            if best_score < score:
                # the held-out curve got worse since its best: the head started fitting the
                # cache (measured: validation NLL rising while the training loss fell)
                self.model.load_state_dict(best_state)
                self.state["best_step"] = best_step
                self.log(f"kept the weights of step {best_step} (validation NLL {best_score:.3f} < {score:.3f} now)")

    def _validate_and_keep_best(self, cache: LatentCache, val: tuple[torch.Tensor, torch.Tensor], lr: float) -> float:
        """Validate on the held-out curve movies; remember the best weights. Returns the score.
        With a running average of the head's weights, the average is what is validated and kept."""
        with self._averaged_head():
            return self._validate_current(cache, val, lr)

    def _validate_current(self, cache: LatentCache, val: tuple[torch.Tensor, torch.Tensor], lr: float) -> float:
        self.recalibrate_batchnorm(cache)
        metrics = self.evaluate(*val)
        score = metrics.get("grid_nll", metrics["nll"])
        combined = ""
        if self.grouped and self.val_groups is not None:
            # the numbers a user reads after combining windows count as much as single windows
            g = self.group_nll(*self.val_groups)
            score = score + sum(g.values())
            combined = ", combined " + ", ".join(f"{k} {v:.3f}" for k, v in g.items())
        self._curve("validation", self.state["head_step"], score, metrics["l1"], metrics["best_half_l1"], lr)
        self.log(f"step {self.state['head_step']}: validation L1 {metrics['l1']:.4g} µm²/s "
                 f"(best half {metrics['best_half_l1']:.4g}), NLL {score:.3f}{combined}")
        if self._best is None or score < self._best[0]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._best = (score, state, self.state["head_step"])
        return score

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        cfg = self.cfg
        if not cfg.resume:  # a new run never writes over a package or another run's files
            check_new_run_folder(cfg.out)
        cfg.out.mkdir(parents=True, exist_ok=True)
        self.load()
        try:
            if self.state["stage"] == "autoencoder":
                self.train_autoencoder()
                self.checkpoint(write_package=False)
            self.train_end_to_end()
            self.model.eval()
            val_curve = None
            if self.ranks.main:  # only rank 0 validates
                val_curve = self.validation_latents(CURVE_VALIDATION_MOVIES)
                if self.grouped:
                    self.val_groups = self.validation_groups(self.cfg.val_groups)
            # each rank caches its share of the movies (together: cache_movies)
            cache_movies = self.ranks.share(cfg.cache_movies)
            cache = self.cache = LatentCache(cache_movies, cfg.frames, cfg.architecture.head_inputs)
            t_fill = time.monotonic()
            # the cache may take 45 % of the budget, or 10 % after a long end-to-end stage
            fill_until = 0.45 if cfg.minutes is None else max(0.45, self.run_elapsed() / (cfg.minutes * 60) + 0.1)
            self.fill_cache(cache, cache_movies, fill_until, "latent cache")
            self._last_ckpt = time.monotonic()  # the first predictor checkpoint comes a full interval later
            # reserve time for the final validation, from the measured cost of a cached movie;
            # with a short budget, validate on fewer movies (at least 64) rather than not train
            per_movie = (time.monotonic() - t_fill) / max(cache.size, 1)
            if cfg.minutes is not None:
                affordable = int(0.25 * cfg.minutes * 60 / (1.3 * per_movie * max(1, len(self.val_scans))))
                if affordable < cfg.val_movies:
                    self.val_movies = max(64, affordable)
                    self.log(f"short budget: final validation on {self.val_movies} held-out movies")
            reserve = per_movie * self.val_movies * max(1, len(self.val_scans)) * 1.3 + 5
            self.train_predictor(cache, val_curve, reserve)
        except KeyboardInterrupt:
            usable = self.state["head_step"] > 0
            self.log("interrupted: writing a checkpoint" + (" and a usable model package" if usable else
                     " (no model package yet: the head has not been trained; continue with --resume)"))
            if self.cache is not None and self.ranks.main:
                self.recalibrate_batchnorm(self.cache)
            self.checkpoint(sync=False)  # the other ranks may be stopped anywhere: no collective
            raise
        self._sync_counts()
        if not self.ranks.main:  # rank 0 validates and writes the package; the others wait for it, so
            self.ranks.wait_for_all()  # that no process leaves the group while another still works
            return cfg.out
        self.recalibrate_batchnorm(cache, batches=32)
        per_scan: dict[str, dict] = {}
        if self.family is not None:  # each validation scan on its own (the movies a one-scan run validates on)
            parts = {name: self.validation_latents(self.val_movies, t) for name, t in self.val_scans.items()}
            for name, (lat, d) in parts.items():
                per_scan[name] = {"n_movies": int(d.numel()), "dle": self.evaluate(lat, d),
                                  "prior_baseline": prior_baseline(d.numpy(), cfg.priors.d_mean_um2_s,
                                                                   cfg.priors.d_std_um2_s),
                                  "scan": self.val_scans[name].to_dict()}
            val = (torch.cat([p[0] for p in parts.values()]), torch.cat([p[1] for p in parts.values()]))
        else:
            val = self.validation_latents(self.val_movies)
        metrics = self.evaluate(*val)
        baseline = prior_baseline(val[1].numpy(), cfg.priors.d_mean_um2_s, cfg.priors.d_std_um2_s)
        metrics = json_safe({"n_movies": int(val[1].numel()), "seed": VALIDATION_SEED, "dle": metrics,
                             "prior_baseline": baseline, **({"per_scan": per_scan} if per_scan else {})})
        self.state["validation"] = metrics
        self._curve("validation", self.state["head_step"], metrics["dle"]["nll"], metrics["dle"]["l1"],
                    metrics["dle"]["best_half_l1"])
        self.checkpoint(sync=False)
        self.ranks.wait_for_all()
        return cfg.out

    # ---------------------------------------------------------------- output
    def write_package(self, validation: dict | None) -> Path:
        from dle_stream.model_package import ModelCard, save_model_package

        cfg, p = self.cfg, self.cfg.priors
        card = ModelCard(
            schema_version=1, name=cfg.name, description=cfg.description or f"DLE for preset {cfg.preset}",
            tile_height=cfg.tile_height, tile_width=cfg.tile_width, window_frames=cfg.frames,
            d_min_um2_s=p.d_min_um2_s, d_max_um2_s=p.d_max_um2_s, scan_timing=cfg.timing.to_dict(),
            pixel_size_um=cfg.timing.pixel_size_um,
            psf_priors={"sigma_xy_um": list(p.psf_sigma_xy_um), "sigma_z_um": list(p.psf_sigma_z_um)},
            brightness_priors={"brightness_photons": list(p.brightness_photons),
                               "background_photons": list(p.background_photons),
                               "read_noise_photons": list(p.read_noise_photons), "gain": list(p.gain)},
            simulator={"preset": cfg.preset, "priors": p.to_dict(), "seed": cfg.seed,
                       "validation_seed": VALIDATION_SEED},
            architecture=cfg.architecture.to_dict(),
            training={
                "autoencoder_steps": self.state["ae_step"], "predictor_steps": self.state["head_step"],
                "batch": cfg.batch, "autoencoder_batch": cfg.ae_batch, "lr": cfg.lr,
                "movies_simulated": self.state["movies_simulated"], "time_s": round(self.elapsed(), 1),
                "device": _device_name(self.device), "threads": torch.get_num_threads(),
                "processes": self.ranks.world,
                "runs": self.state["runs"] + 1,
                "encoder_frozen_after_pretraining": self.state["e2e_step"] == 0,
                "end_to_end_steps": self.state["e2e_step"], "end_to_end_frames": cfg.e2e_frames,
                "end_to_end_batch": cfg.e2e_batch,
                "cache_movies": cfg.cache_movies, "curve": "training_curve.csv",
                "encoder_from": self.state.get("encoder_from"),
                "warm_from": self.state.get("warm_from"),
                "kept_weights_of_step": self.state.get("best_step"),
                "weights_averaged_over_steps": cfg.average_steps or None,
                "training_d_prior": (self.cfg.architecture.training_prior.to_dict()
                                     if self.grid_loss is not None else None),
                "steady_density_share": self.train_priors.box_fraction,
                "sample_effects_share": self.train_priors.effects_share,
                "sample_effects_prior": (self.sim.effects_prior.to_dict()
                                         if self.train_priors.effects_share > 0 else None),
                "combination_loss": ({"groups_per_step": cfg.combine_groups, "group_size": cfg.group_size}
                                     if self.grouped else None),
            },
            validation=validation or {"note": "not yet validated (checkpoint during training)"},
            scan_family={} if self.family is None else self.family.to_dict(),
            weights_sha256="", software_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return save_model_package(cfg.out, self.model, card)

    def _curve(self, stage, step, loss, l1, best_half_l1, lr=math.nan) -> None:
        row = {"stage": stage, "step": step, "elapsed_s": round(self.elapsed(), 1), "loss": _r(loss),
               "l1_um2_s": _r(l1), "best_half_l1_um2_s": _r(best_half_l1), "lr": _r(lr)}
        self.state["curve"].append(row)
        if not self.ranks.main:
            return
        path = self.cfg.out / "training_curve.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def _task(self, label: str, total, completed: int):
        if self.progress is None:
            return None
        return self.progress.add_task(label, total=total, completed=completed, info="")

    def _advance(self, task, info: str, n: int = 1) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, advance=n, info=info)


def _set_cosine_lr(opt: torch.optim.Optimizer, peak: float, progress: float) -> float:
    """Cosine decay from ``peak`` to 5 % of it over ``progress`` 0 → 1; sets and returns the rate."""
    lr = peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def _r(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _config_json(cfg: TrainConfig) -> dict:
    data = asdict(cfg)
    data["priors"] = cfg.priors.to_dict()
    data["timing"] = cfg.timing.to_dict()
    data["architecture"] = cfg.architecture.to_dict()
    data["out"] = str(cfg.out)
    data["encoder_from"] = str(cfg.encoder_from) if cfg.encoder_from else None
    data["warm_from"] = str(cfg.warm_from) if cfg.warm_from else None
    data["scan_family"] = cfg.scan_family.to_dict() if cfg.scan_family else None
    return data


def train(config: TrainConfig, progress=None, log=print, ranks: Ranks = SINGLE) -> Path:
    """Run a training and return the model package folder (``ranks``: this process's place
    in a multi-process run, :func:`dle_stream.training.distributed.start`)."""
    return Trainer(config, progress, log, ranks=ranks).run()
