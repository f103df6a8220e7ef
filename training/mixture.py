"""A training prior that mixes particle densities: the paper's spreading cloud and a steady density.

The paper's simulator starts particles in a Gaussian cloud around the tile; at high D the
cloud disperses within a few frames, so most windows are nearly empty. A real sample
(beads in water, dots in the extracellular space) has a steady density: particles always
enter and leave. :class:`MixedSimulator` draws, per batch, a binomial share
``priors.box_fraction`` of the movies with a stationary density (a periodic box much
larger than the tile, see :class:`~dle_stream.training.priors.SimulatorPriors`) and the
rest as clouds (priors whose density is already "box" give only steady movies).

**Sample effects.** A binomial share ``priors.effects_share`` of each batch is simulated
with effects of a real sample (whole-field motion, blinking, bleaching, brightness, PSF
width, density). Every such movie gets its own independent draw of effects
(:meth:`~dle_stream.training.effects_prior.EffectsPrior.draw`) and is simulated on its own
(a sub-batch of one movie: the effects are settings of the simulator's priors), cloud or
steady by the steady share as any other movie. The D prior is the same for all movies.
With ``effects_share`` 0 nothing more is drawn: a seed's batches are those without it.

For a **bidirectional** scan every tile position has its own row-to-row time gaps (odd
lines run backwards), so the movies are simulated at random tile offsets (r0, c0) in the
full frame, and the model learns every position (a unidirectional scan's tiles all share
one pattern: they are simulated at (0, 0)).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dle_stream.timing import ScanTiming
from dle_stream.training.effects_prior import EFFECTS_PRIOR, EffectSettings, EffectsPrior
from dle_stream.training.priors import SimulatorPriors
from dle_stream.training.simulator import Simulator


@dataclass
class MixedBatch:
    """Movies [B, T, H, W], true D [B] µm²/s and visible transitions [B] of a mixed batch."""

    movies: torch.Tensor
    d_um2_s: torch.Tensor
    visible_transitions: torch.Tensor
    steady: torch.Tensor  # [B] bool: simulated with a steady density
    offsets: torch.Tensor  # [B, 2] (r0, c0) of each tile in the full frame
    effects: list[EffectSettings | None]  # [B] each movie's sample effects (None: an ordinary movie)

    def __len__(self) -> int:
        return int(self.d_um2_s.numel())


class MixedSimulator:
    """Cloud and steady-density movies in one batch (``priors.box_fraction`` of them steady), a share
    ``priors.effects_share`` of them with sample effects drawn from ``effects_prior``."""

    def __init__(self, priors: SimulatorPriors, timing: ScanTiming, tile_height: int = 20, tile_width: int = 20,
                 frames: int = 400, device: str | torch.device = "cpu", effects_prior: EffectsPrior = EFFECTS_PRIOR):
        self.priors = priors
        self.effects_prior = effects_prior
        self.frames = int(frames)
        self.device = torch.device(device)
        #: the priors' own density; with a "cloud" density, a share ``box_fraction`` is steady
        self.main = Simulator(priors, timing, tile_height, tile_width, frames, device)
        self.box = Simulator(replace(priors, density="box"), timing, tile_height, tile_width, frames, device)
        self.share = priors.box_fraction if priors.density == "cloud" else 0.0
        self.timing = timing
        self.tile = (int(tile_height), int(tile_width))

    def draw_offsets(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """[n, 2] random tile offsets (r0, c0) for a bidirectional scan; None otherwise."""
        if not self.timing.bidirectional:
            return None
        rows = self.timing.height_px - self.tile[0] + 1
        cols = self.timing.width_px - self.tile[1] + 1
        r0 = torch.randint(0, rows, (n,), generator=generator, device=self.device)
        c0 = torch.randint(0, cols, (n,), generator=generator, device=self.device)
        return torch.stack([r0, c0], dim=1).cpu()

    def draw_d(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n] D from the training prior, µm²/s (the same for cloud and steady movies)."""
        return self.main.draw_d(n, generator)

    def d_quantile(self, q: torch.Tensor) -> torch.Tensor:
        """D (µm²/s) at quantiles ``q`` of the training prior (see :meth:`Simulator.d_quantile`)."""
        return self.main.d_quantile(q)

    def simulate(self, n_movies: int, generator: torch.Generator, d_um2_s: torch.Tensor | None = None) -> MixedBatch:
        """``n_movies`` movies; ``d_um2_s`` [n] fixes their D (drawn from the prior if None).
        The batch lists cloud movies first, then steady ones, then the movies with sample
        effects (each cloud or steady), each with its own D."""
        n_fx = 0
        if self.priors.effects_share > 0:
            n_fx = int((torch.rand(n_movies, generator=generator, device=self.device)
                        < self.priors.effects_share).sum())
        n_plain = n_movies - n_fx
        n_box = 0
        if self.share > 0:
            n_box = int((torch.rand(n_plain, generator=generator, device=self.device) < self.share).sum())
        parts: list[tuple] = []  # (batch, steady, effects)
        if n_plain - n_box:
            offsets = self.draw_offsets(n_plain - n_box, generator)
            d = None if d_um2_s is None else d_um2_s[: n_plain - n_box]
            parts.append((self.main.simulate(n_plain - n_box, generator=generator, offsets=offsets, d_um2_s=d),
                          self.priors.density == "box", None))
        if n_box:
            offsets = self.draw_offsets(n_box, generator)
            d = None if d_um2_s is None else d_um2_s[n_plain - n_box: n_plain]
            parts.append((self.box.simulate(n_box, generator=generator, offsets=offsets, d_um2_s=d), True, None))
        for i in range(n_plain, n_movies):
            effects = self.effects_prior.draw(generator, self.device)
            steady = self.share > 0 and bool(torch.rand((), generator=generator, device=self.device) < self.share)
            base = self.box if steady else self.main
            sim = Simulator(effects.apply(base.priors), self.timing, *self.tile, self.frames, self.device)
            d = None if d_um2_s is None else d_um2_s[i: i + 1]
            batch = sim.simulate(1, generator=generator, offsets=self.draw_offsets(1, generator), d_um2_s=d)
            parts.append((batch, steady or self.priors.density == "box", effects))
        return MixedBatch(
            movies=torch.cat([b.movies for b, _, _ in parts]),
            d_um2_s=torch.cat([b.d_um2_s for b, _, _ in parts]),
            visible_transitions=torch.cat([b.visible_transitions for b, _, _ in parts]),
            steady=torch.cat([torch.full((len(b.d_um2_s),), s, device=self.device) for b, s, _ in parts]),
            offsets=torch.cat([b.offsets for b, _, _ in parts]),
            effects=[fx for b, _, fx in parts for _ in range(len(b.d_um2_s))],
        )
