"""Simulated movies, encoded once by a frozen encoder, kept as latent sequences.

With the frame encoder frozen after its autoencoder pretraining, the temporal head only
ever sees latents, so each simulated movie is encoded once (400 tile-frames) and its
latents [T, latent] kept in memory as float16 (100 KB per movie at latent 128). Training
the head then costs only the head: measured on 2 CPU cores, simulating a movie costs
~60–80 ms, encoding it ~11 ms, and one head training step on 64 cached windows a few
hundred ms, so a cache that is partly refreshed with new movies keeps the data fresh at
a fraction of the cost of simulating every batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dle_stream.training.augment import random_raster_augment
from dle_stream.training.simulator import Simulator

if TYPE_CHECKING:
    from dle_stream.training.mixture import MixedSimulator


class LatentCache:
    """A ring buffer of (latents [T, latent] float16, D µm²/s, group) of simulated movies.

    Movies of one *group* share their D (and nothing else): groups of windows of one D are
    what the trainer's combination loss adds up, as the runner adds a tile's windows.
    Group −1: a movie of its own.
    """

    def __init__(self, capacity: int, frames: int, latent: int):
        self.capacity = int(capacity)
        self.latents = torch.zeros(self.capacity, frames, latent, dtype=torch.float16)
        self.d_um2_s = torch.zeros(self.capacity, dtype=torch.float32)
        self.visible = torch.zeros(self.capacity, dtype=torch.long)
        self.group = torch.full((self.capacity,), -1, dtype=torch.long)
        self.size = 0
        self._next = 0
        self.movies_added = 0

    def add(self, latents: torch.Tensor, d_um2_s: torch.Tensor, visible: torch.Tensor,
            group: torch.Tensor | None = None) -> None:
        for i in range(latents.shape[0]):
            self.latents[self._next] = latents[i].to(torch.float16)
            self.d_um2_s[self._next] = float(d_um2_s[i])
            self.visible[self._next] = int(visible[i])
            self.group[self._next] = -1 if group is None else int(group[i])
            self._next = (self._next + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)
            self.movies_added += 1

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.size, (batch,), generator=generator)
        return self.latents[idx].float(), self.d_um2_s[idx]

    def sample_groups(self, n_groups: int, k: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``n_groups`` groups of ``k`` movies of one D each: (latents [n_groups, k, T, latent],
        D [n_groups]); None while fewer than ``n_groups`` groups hold ``k`` movies."""
        ids, counts = torch.unique(self.group[: self.size], return_counts=True)
        full = ids[(counts >= k) & (ids >= 0)]
        if full.numel() < n_groups:
            return None
        chosen = full[torch.randperm(full.numel(), generator=generator)[:n_groups]]
        rows = []
        for gid in chosen.tolist():
            members = torch.nonzero(self.group[: self.size] == gid)[:, 0]
            rows.append(members[torch.randperm(members.numel(), generator=generator)[:k]])
        idx = torch.stack(rows)
        return self.latents[idx].float(), self.d_um2_s[idx[:, 0]]

    @property
    def full(self) -> bool:
        return self.size >= self.capacity


@torch.inference_mode()
def simulate_latents(simulator: Simulator | MixedSimulator, model, n_movies: int, generator: torch.Generator,
                     augment: bool = True, encode_batch_movies: int = 16, d_um2_s: torch.Tensor | None = None):
    """Simulate ``n_movies`` movies (of D ``d_um2_s`` [n] if given) and encode them:
    (latents [n, T, latent], D [n], visible [n])."""
    batch = simulator.simulate(n_movies, generator=generator, d_um2_s=d_um2_s)
    movies = batch.movies
    if augment:
        movies = random_raster_augment(movies, generator)
    out = []
    for i in range(0, n_movies, encode_batch_movies):
        chunk = movies[i:i + encode_batch_movies]
        b, t = chunk.shape[:2]
        out.append(model.encode(chunk.reshape(b * t, *chunk.shape[2:])).reshape(b, t, -1).cpu())
    return torch.cat(out), batch.d_um2_s.float().cpu(), batch.visible_transitions.cpu()
