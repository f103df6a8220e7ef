"""Batched simulator of raster-scanned two-photon movies of diffusing nanoparticles.

Physics (docs/design.md §4), per movie:

1. Free 3D Brownian motion of every particle, *sampled at every pixel time* of the tile.
   Exactly, but cheaply: positions are first drawn at the start of every tile row
   (the "row grid": increments N(0, 2DΔt) per axis between consecutive row starts),
   then, only for rows where the particle can light a pixel, at the tile's pixel times
   inside that row by a Brownian bridge between the two row starts. A bridge sample has
   exactly the distribution of the free path given its end points, so the result is
   the Brownian path at pixel resolution, never an interpolation.
2. A 3D Gaussian PSF: the expected photons of pixel (r, c) from a particle at
   (x, y, z) µm is ``brightness / (2π s²) · exp(−((c+½−x/dx)² + (r+½−y/dx)²) / 2s²) ·
   exp(−z² / 2σz²)`` with s = σxy/dx in pixels: an in-focus particle far from the
   edges puts ``brightness`` photons into the tile.
3. Expected photons = background + Σ particles; Poisson shot noise; additive Gaussian
   read noise (std redrawn per frame); then ``gain · (counts + read − offset)``.

Coordinates: x along the line (columns), y across lines (rows), both in µm from the
tile's top-left corner (pixel (r, c) is centred at ((c+½)·dx, (r+½)·dx)); z in µm from
the focal plane. Times in µs from the first pixel of frame 0 of the full frame.

Batched and vectorised in torch; the same code runs on CPU and CUDA; one seed and one
device give identical movies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from dle_stream.errors import DleStreamError
from dle_stream.timing import ScanTiming
from dle_stream.training.priors import SimulatorPriors
from dle_stream.training.sample_effects import (
    blink_switch_times,
    draw_field_motion,
    emitting,
    field_displacement_um,
    field_reach_um,
)

#: PSF standard deviations beyond which a particle's light is ignored (e^-8 ≈ 3e-4 of peak).
CUTOFF_SIGMAS = 4.0
#: Standard deviations of within-row motion allowed for when deciding which rows a particle can light.
MOTION_SIGMAS = 5.0
#: Lit rows whose blinking state is looked up at once (memory: rows × switches × 8 bytes).
EMISSION_CHUNK = 4096


@dataclass
class SimulatedBatch:
    """Movies and their ground truth.

    Attributes:
        movies: [B, T, H, W] float32 detector values.
        d_um2_s: [B] true diffusion coefficients, µm²/s.
        n_particles: [B] particle count of each movie.
        visible_transitions: [B] Σ over frames of particles inside the tile in x, y and
            within σz of focus at the frame's mid-time (the paper's "possibly visible
            transitions").
        positions_um: [P, T, 3] true (x, y, z) of every particle at every frame's
            mid-time, µm (x, y from the tile's corner; z from focus).
        particle_movie: [P] index of the movie each particle belongs to.
        mid_times_us: [B, T] the frames' mid-times: when the scan starts the tile's
            middle row (row H // 2), µs.
        params: per-movie drawn parameters ([B] tensors): psf_sigma_xy_um,
            psf_sigma_z_um, background_photons, brightness_photons, gain, offset; with
            whole-field motion its parameters (:func:`~dle_stream.training.sample_effects.draw_field_motion`);
            with bleaching ``particle_bleach_us`` [P], when each particle goes dark (µs).
        read_noise_photons: [B, T] std of the read noise of each frame.
        offsets: [B, 2] (r0, c0) of each tile in the full frame.
    """

    movies: torch.Tensor
    d_um2_s: torch.Tensor
    n_particles: torch.Tensor
    visible_transitions: torch.Tensor
    positions_um: torch.Tensor
    particle_movie: torch.Tensor
    mid_times_us: torch.Tensor
    params: dict[str, torch.Tensor]
    read_noise_photons: torch.Tensor
    offsets: torch.Tensor
    timing: ScanTiming
    priors: SimulatorPriors
    pixel_paths: dict[str, torch.Tensor] = field(default_factory=dict)
    state: "SimulatorState | None" = None
    first_frame: int = 0

    def __len__(self) -> int:
        return self.movies.shape[0]

    def positions_of(self, movie: int) -> torch.Tensor:
        """[N, T, 3] mid-time positions (µm) of the particles of one movie."""
        return self.positions_um[self.particle_movie == movie]


#: What one microscope and sample fix for all the tiles of a recording (:meth:`Simulator.draw_instrument`).
INSTRUMENT_FIELDS = ("psf_sigma_xy_um", "psf_sigma_z_um", "background_photons", "brightness_photons", "gain", "offset")


@dataclass
class SimulatorState:
    """What a batch needs to be continued: the same movies' next frames."""

    d_um2_s: torch.Tensor
    n_particles: torch.Tensor
    params: dict[str, torch.Tensor]
    offsets: torch.Tensor
    particle_movie: torch.Tensor
    end_positions_um: torch.Tensor  # [P, 3] float64, unwrapped
    end_times_us: torch.Tensor  # [B]
    next_frame: int
    frames_per_chunk: int
    timing: ScanTiming


class Simulator:
    """Simulates batches of movies for one scan timing and one set of priors.

    Args:
        priors: what is drawn per movie.
        timing: the full-frame scan timing (tiles inherit its line and frame period).
        tile_height, tile_width: tile size in pixels.
        frames: frames per movie (T).
        device: torch device ("cpu", "cuda", ...).
    """

    def __init__(
        self, priors: SimulatorPriors, timing: ScanTiming, tile_height: int = 20, tile_width: int = 20,
        frames: int = 400, device: str | torch.device = "cpu",
    ) -> None:
        if frames < 1:
            raise DleStreamError(f"simulator: frames must be ≥ 1, got {frames}; fix --frames")
        timing.check_tile(0, 0, tile_height, tile_width)
        self.priors = priors
        self.timing = timing
        self.height = int(tile_height)
        self.width = int(tile_width)
        self.frames = int(frames)
        self.device = torch.device(device)

    # ----------------------------------------------------------------- draws
    def _uniform(self, n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, device=self.device, dtype=torch.float64)

    def _abs_normal(self, n: int, mean_std: tuple[float, float], g: torch.Generator) -> torch.Tensor:
        mean, std = mean_std
        return (mean + std * torch.randn(n, generator=g, device=self.device, dtype=torch.float64)).abs()

    def draw_instrument(self, g: torch.Generator) -> dict[str, float]:
        """One microscope and sample, as the priors draw them for a movie: PSF widths (µm),
        background and brightness (photons), gain and offset; for :meth:`simulate`'s
        ``instrument``, so that the tiles of one recording share them."""
        p = self.priors
        bg = float(self._abs_normal(1, p.background_photons, g)[0])
        values = {
            "psf_sigma_xy_um": max(float(self._abs_normal(1, p.psf_sigma_xy_um, g)[0]), 0.02),
            "psf_sigma_z_um": max(float(self._abs_normal(1, p.psf_sigma_z_um, g)[0]), 0.05),
            "background_photons": bg,
            "brightness_photons": float(self._abs_normal(1, p.brightness_photons, g)[0]),
            "gain": max(float(self._abs_normal(1, p.gain, g)[0]), 1e-3),
        }
        values["offset"] = bg * float(self._uniform(1, 0.9, 1.1, g)[0]) if p.subtract_offset else 0.0
        return values

    def draw_d(self, n: int, g: torch.Generator) -> torch.Tensor:
        p = self.priors
        if p.d_prior == "uniform":
            d = self._uniform(n, p.d_min_um2_s, p.d_max_um2_s, g)
        else:
            lo, hi = math.log(p.d_min_um2_s), math.log(p.d_max_um2_s)
            d = torch.exp(self._uniform(n, lo, hi, g))
        if sum(p.d_beyond) > 0:  # a share of movies beyond the range (training a "d_grid" head)
            top = p.d_grid_top * p.d_max_um2_s
            u = self._uniform(n, 0.0, 1.0, g)
            d = torch.where(u < p.d_beyond[0], self._uniform(n, p.d_max_um2_s, top, g), d)
            d = torch.where((u >= p.d_beyond[0]) & (u < sum(p.d_beyond)), self._uniform(n, top, 2 * top, g), d)
        return d

    def d_quantile(self, q: torch.Tensor) -> torch.Tensor:
        """D (µm²/s) at quantiles ``q`` [n] in [0, 1) of the distribution :meth:`draw_d` draws
        from (its inverse CDF): stratified or low-discrepancy ``q`` give D values spread as
        evenly as the prior allows (:mod:`dle_stream.training.d_sequence`)."""
        p = self.priors
        b_near, b_far = p.d_beyond
        inside = 1.0 - b_near - b_far
        q = torch.as_tensor(q, dtype=torch.float64, device=self.device).clamp(0.0, 1.0 - 1e-12)
        u = (q / inside).clamp(max=1.0)
        if p.d_prior == "uniform":
            d = p.d_min_um2_s + u * (p.d_max_um2_s - p.d_min_um2_s)
        else:
            lo, hi = math.log(p.d_min_um2_s), math.log(p.d_max_um2_s)
            d = torch.exp(lo + u * (hi - lo))
        top = p.d_grid_top * p.d_max_um2_s
        if b_near > 0:
            d = torch.where(q >= inside, p.d_max_um2_s + (q - inside) / b_near * (top - p.d_max_um2_s), d)
        if b_far > 0:
            d = torch.where(q >= inside + b_near, top + (q - inside - b_near) / b_far * top, d)
        return d

    def draw_particle_counts(self, n: int, g: torch.Generator) -> torch.Tensor:
        p = self.priors
        if p.particles == "fixed":
            return torch.full((n,), p.particles_max, dtype=torch.long, device=self.device)
        u = torch.rand(n, generator=g, device=self.device, dtype=torch.float64).clamp_min(1e-300)
        exp_part = 1 + torch.clamp(torch.floor(-p.particles_exp_mean * torch.log(u)), max=p.particles_max)
        uni_part = torch.floor(torch.rand(n, generator=g, device=self.device, dtype=torch.float64) * (p.particles_max + 1))
        coin = torch.rand(n, generator=g, device=self.device) < 0.5
        return torch.where(coin, exp_part, uni_part).long()

    # ---------------------------------------------------------------- timing
    def _row_grid(self, offsets: torch.Tensor, first_frame: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-start times [B, T·H + 1] (µs, one closing point) and pixel offsets [B, H, W] (µs).

        The pixel offsets are relative to the row start, i.e. to the earliest pixel of
        that tile row; for a bidirectional scan odd full-frame rows run backwards.
        """
        tm = self.timing
        H, W, T = self.height, self.width, self.frames
        r0 = offsets[:, 0].to(torch.float64)
        c0 = offsets[:, 1].to(torch.float64)
        rows = r0[:, None] + torch.arange(H, device=self.device, dtype=torch.float64)[None]  # [B, H]
        cols = c0[:, None] + torch.arange(W, device=self.device, dtype=torch.float64)[None]  # [B, W]
        col_time = cols[:, None, :] * tm.dwell_us  # [B, 1, W]
        if tm.bidirectional:
            odd = (rows.long() % 2 == 1)[:, :, None]
            col_time = torch.where(odd, (tm.width_px - 1 - cols[:, None, :]) * tm.dwell_us, col_time)
        else:
            col_time = col_time.expand(-1, H, -1)
        first = col_time.min(dim=2).values  # [B, H]
        pixel_offsets = col_time - first[:, :, None]
        k = torch.arange(first_frame, first_frame + T, device=self.device, dtype=torch.float64)
        starts = k[None, :, None] * tm.frame_period_us + (rows * tm.line_period_us + first)[:, None, :]
        starts = starts.reshape(starts.shape[0], T * H)
        closing = starts[:, -1:] + W * tm.dwell_us
        return torch.cat([starts, closing], dim=1), pixel_offsets

    # -------------------------------------------------------------- simulate
    def simulate(
        self, n_movies: int, seed: int | None = None, *, d_um2_s=None, offsets=None,
        generator: torch.Generator | None = None, keep_pixel_paths: bool = False,
        continue_from: "SimulatorState | None" = None, instrument: dict | None = None,
    ) -> SimulatedBatch:
        """Simulate ``n_movies`` movies.

        Args:
            n_movies: batch size B.
            seed: seeds a fresh generator (ignored when ``generator`` is given).
            d_um2_s: optional [B] (or scalar) D per movie, µm²/s; drawn from the prior if None.
            offsets: optional [B, 2] (r0, c0) of each tile in the full frame; (0, 0) if None.
            generator: a torch.Generator on this device to draw from.
            keep_pixel_paths: also return the pixel-time positions of every lit row
                (``pixel_paths``: movie, particle, frame, row, times_us [Q, W] and xyz_um
                [Q, W, 3]); for tests of the motion itself.
            continue_from: the ``state`` of a previous batch: simulate its next frames,
                with the same particles, D and detector (for recordings longer than
                memory); ``d_um2_s`` and ``offsets`` are then taken from the state.
            instrument: the microscope and sample shared by these movies
                (:meth:`draw_instrument`: PSF widths, background, brightness, gain, offset;
                each a number, or [B]); drawn per movie if None, as for independent
                training movies. The tiles of one recording share them.
        """
        if n_movies < 1:
            raise DleStreamError(f"simulator: need at least one movie, got {n_movies}")
        dev = self.device
        g = generator
        if g is None:
            g = torch.Generator(device=dev)
            g.manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**62))
        p = self.priors
        tm = self.timing
        B, T, H, W = n_movies, self.frames, self.height, self.width
        dx = tm.pixel_size_um

        # per-movie parameters
        if continue_from is not None:
            return self._continue(continue_from, g, keep_pixel_paths)
        if d_um2_s is None:
            d = self.draw_d(B, g)
        else:
            d = torch.as_tensor(d_um2_s, dtype=torch.float64, device=dev).reshape(-1)
            d = d.expand(B).clone() if d.numel() == 1 else d
            if d.numel() != B or not torch.isfinite(d).all() or (d < 0).any():
                raise DleStreamError("simulator: D must be one finite value ≥ 0 (µm²/s) per movie")
        counts = self.draw_particle_counts(B, g)
        if instrument is None:
            sxy = self._abs_normal(B, p.psf_sigma_xy_um, g).clamp_min(0.02)
            sz = self._abs_normal(B, p.psf_sigma_z_um, g).clamp_min(0.05)
            bg = self._abs_normal(B, p.background_photons, g)
            bright = self._abs_normal(B, p.brightness_photons, g)
            gain = self._abs_normal(B, p.gain, g).clamp_min(1e-3)
            offset = (bg * self._uniform(B, 0.9, 1.1, g) if p.subtract_offset
                      else torch.zeros(B, dtype=torch.float64, device=dev))
        else:
            sxy, sz, bg, bright, gain, offset = (
                torch.as_tensor(instrument[k], dtype=torch.float64, device=dev).reshape(-1).expand(B).clone()
                for k in INSTRUMENT_FIELDS)
        lat_std_um = self._abs_normal(B, p.cloud_lateral_std_tiles, g) * W * dx
        anchor_frame = torch.floor(self._uniform(B, 0, T, g)).long().clamp(max=T - 1)
        if offsets is None:
            offs = torch.zeros(B, 2, dtype=torch.long, device=dev)
        else:
            offs = torch.as_tensor(np.asarray(offsets), dtype=torch.long, device=dev).reshape(B, 2)
            for (r0, c0) in offs.tolist():
                tm.check_tile(r0, c0, H, W)

        params = {
            "psf_sigma_xy_um": sxy, "psf_sigma_z_um": sz, "background_photons": bg,
            "brightness_photons": bright, "gain": gain, "offset": offset,
        }
        if p.field_motion:  # drawn only when on: movies without effects stay those of their seed
            params.update(draw_field_motion(B, p, dx, g, dev))
        pm = torch.repeat_interleave(torch.arange(B, device=dev), counts)  # [P]
        P = pm.numel()
        if p.bleach_time_s > 0:
            u = torch.rand(P, generator=g, device=dev, dtype=torch.float64).clamp_min(1e-300)
            params["particle_bleach_us"] = -p.bleach_time_s * 1e6 * torch.log(u)
        centre = torch.tensor([W * dx / 2, H * dx / 2, 0.0], dtype=torch.float64, device=dev)
        if p.density == "cloud":
            start = torch.randn(P, 3, generator=g, device=dev, dtype=torch.float64)
            scale = torch.stack([lat_std_um, lat_std_um, torch.full_like(lat_std_um, p.cloud_axial_std_um)], 1)
            start = centre + start * scale[pm]
        else:
            start = (torch.rand(P, 3, generator=g, device=dev, dtype=torch.float64) - 0.5) * self._box_size(dx) + centre
        return self._run(g, d, counts, params, offs, pm, start, anchor_frame, 0, None, keep_pixel_paths)

    def _continue(self, state: "SimulatorState", g: torch.Generator, keep: bool) -> SimulatedBatch:
        if state.frames_per_chunk != self.frames or state.timing != self.timing:
            raise DleStreamError("simulator: can only continue a batch made with the same timing and frame count")
        anchor = torch.zeros(state.d_um2_s.numel(), dtype=torch.long, device=self.device)
        return self._run(g, state.d_um2_s, state.n_particles, state.params, state.offsets, state.particle_movie,
                         state.end_positions_um, anchor, state.next_frame, state.end_times_us, keep)

    def _run(self, g, d, counts, params, offs, pm, start, anchor_frame, first_frame, start_times_us, keep_pixel_paths):
        """Motion, light and detector for drawn parameters; ``start`` [P, 3] µm holds at the
        start of ``anchor_frame`` (or at ``start_times_us`` [B] when continuing)."""
        p, tm, dev = self.priors, self.timing, self.device
        B, T, H, W = d.numel(), self.frames, self.height, self.width
        dx = tm.pixel_size_um
        P = pm.numel()
        sxy, sz, bright = params["psf_sigma_xy_um"], params["psf_sigma_z_um"], params["brightness_photons"]
        bg, gain, offset = params["background_photons"], params["gain"], params["offset"]
        times, pix_off = self._row_grid(offs, first_frame)  # [B, T·H + 1], [B, H, W]
        if start_times_us is not None:  # continuing: free motion since the previous chunk's end
            gap = (times[:, 0] - start_times_us).clamp_min(0)
            start = start + torch.randn(P, 3, generator=g, device=dev, dtype=torch.float64) * torch.sqrt(
                2 * d * gap * 1e-6)[pm][:, None]

        # --- level 1: Brownian motion at each frame's first and middle row start
        # (float64 accumulation, stored float32); the path passes through its
        # starting cloud at the start of a random frame
        coarse = torch.arange(T, device=dev)[:, None] * H + torch.tensor(sorted({0, H // 2}), device=dev)[None]
        coarse = torch.cat([coarse.reshape(-1), torch.tensor([T * H], device=dev)])  # [G]
        ctimes = times[:, coarse]  # [B, G]
        step_std = torch.sqrt(2.0 * d[:, None] * torch.diff(ctimes, dim=1) * 1e-6)  # [B, G-1] µm
        anchor_idx = anchor_frame * (coarse.numel() - 1) // T  # grid point of the anchor frame's start
        steps = torch.randn(P, coarse.numel() - 1, 3, generator=g, device=dev, dtype=torch.float64)
        steps.mul_(step_std[pm][:, :, None])
        path = torch.zeros(P, coarse.numel(), 3, device=dev, dtype=torch.float64)
        torch.cumsum(steps, dim=1, out=path[:, 1:])
        path -= path[torch.arange(P, device=dev), anchor_idx[pm]][:, None, :]
        path += start[:, None, :]
        state = SimulatorState(
            d_um2_s=d, n_particles=counts, params=params, offsets=offs, particle_movie=pm,
            end_positions_um=path[:, -1].clone(), end_times_us=times[:, -1].clone(),
            next_frame=first_frame + T, frames_per_chunk=T, timing=tm,
        )
        path = path.to(torch.float32)

        # --- ground truth at frame mid-times (start of row H // 2)
        mid_times = times[:, torch.arange(T, device=dev) * H + H // 2]
        mid_pos = path[:, torch.arange(T, device=dev) * (coarse.numel() - 1) // T + (1 if H // 2 else 0)]
        positions = self._wrap(mid_pos, dx)  # [P, T, 3]
        inside = (
            (positions[..., 0] >= 0) & (positions[..., 0] < W * dx)
            & (positions[..., 1] >= 0) & (positions[..., 1] < H * dx)
            & (positions[..., 2].abs() <= sz[pm].to(torch.float32)[:, None])
        )
        visible = torch.zeros(B, dtype=torch.long, device=dev).index_add_(0, pm, inside.sum(1))

        # --- levels 2 and 3: rows, then pixels, only where a particle can light the tile
        expected = torch.zeros(B * T * H, W, dtype=torch.float32, device=dev)
        pixel_paths: dict[str, torch.Tensor] = {}
        blink = None
        if p.blinking and P:  # switch sequences of this chunk (a continued movie's restart)
            blink = blink_switch_times(times[pm, 0], times[pm, -1], p, g)
        if P:
            pixel_paths = self._render(
                g, path, coarse, pm, d, sxy, sz, bright, times, pix_off, expected, keep_pixel_paths,
                params, blink,
            )
        expected = expected.reshape(B, T, H, W)
        expected += bg.to(torch.float32)[:, None, None, None]

        # --- detector
        counts_img = torch.poisson(expected, generator=g)
        read_std = self._uniform(B * T, *p.read_noise_photons, g).reshape(B, T).to(torch.float32)
        noise = torch.randn(B, T, H, W, generator=g, device=dev, dtype=torch.float32)
        movies = counts_img.add_(noise.mul_(read_std[:, :, None, None]))
        movies.sub_(offset.to(torch.float32)[:, None, None, None]).mul_(gain.to(torch.float32)[:, None, None, None])

        return SimulatedBatch(
            movies=movies, d_um2_s=d, n_particles=counts, visible_transitions=visible,
            positions_um=positions, particle_movie=pm, mid_times_us=mid_times,
            params=params, read_noise_photons=read_std, offsets=offs, timing=tm, priors=p,
            pixel_paths=pixel_paths, state=state, first_frame=first_frame,
        )

    # ---------------------------------------------------------------- helpers
    def _box_size(self, dx: float) -> torch.Tensor:
        p = self.priors
        return torch.tensor(
            [self.width * dx + 2 * p.box_margin_um, self.height * dx + 2 * p.box_margin_um, 2 * p.box_half_depth_um],
            dtype=torch.float64, device=self.device,
        )

    def _wrap(self, xyz: torch.Tensor, dx: float) -> torch.Tensor:
        """Positions as seen by the microscope: periodic in a box (density "box"), else as is."""
        if self.priors.density != "box":
            return xyz
        box = self._box_size(dx).to(xyz.dtype)
        lo = torch.tensor([-self.priors.box_margin_um, -self.priors.box_margin_um, -self.priors.box_half_depth_um],
                          dtype=xyz.dtype, device=xyz.device)
        return torch.remainder(xyz - lo, box) + lo

    def _near(self, a, b, reach_px, reach_z_um, rows_lo, rows_hi) -> torch.Tensor:
        """Can a path between positions ``a`` and ``b`` (µm, [..., 3]) light tile rows
        [rows_lo, rows_hi] (px)? Judged on the box spanned by both ends, widened by
        ``reach_px`` laterally and ``reach_z_um`` axially."""
        dx = self.timing.pixel_size_um
        if b is a:  # one position (a row start): nothing in between
            lo = hi = self._wrap(a, dx)
        else:
            a_s, b_s = self._wrap(a, dx), self._wrap(b, dx)
            lo = torch.minimum(a_s, b_s)
            hi = torch.maximum(a_s, b_s)
        if self.priors.density == "box" and b is not a:  # wrapped around the box in between: could be anywhere
            jump = (a_s - b_s).abs() > (b - a).abs() + 1e-3
            lo = torch.where(jump, torch.full_like(lo, -torch.inf), lo)
            hi = torch.where(jump, torch.full_like(hi, torch.inf), hi)
        return (
            (hi[..., 0] / dx > -reach_px) & (lo[..., 0] / dx < self.width + reach_px)
            & (hi[..., 1] / dx > rows_lo - reach_px) & (lo[..., 1] / dx < rows_hi + reach_px)
            & (hi[..., 2] > -reach_z_um) & (lo[..., 2] < reach_z_um)
        )

    def _render(self, g, path, coarse, pm, d, sxy, sz, bright, times, pix_off, out, keep, params=None,
                blink=None) -> dict:
        """Add every particle's light to ``out`` [B·T·H, W] at pixel times.

        ``path`` [P, G, 3] holds positions at the row-grid points ``coarse`` [G]. For
        each grid interval that can reach the tile, positions at every row start inside
        it are bridged in; for each row that can be lit, positions at every pixel time.
        Whole-field motion (in ``params``) moves the row-start positions by the field's
        displacement at their times (linear within a row: ≤ 1e-5 px at 7 Hz, 2 px, 1.5 ms
        rows); blinking (``blink``) and bleaching (``params``) switch a row's light off.
        """
        params = params or {}
        moving = "drift_vx_um_s" in params
        tm = self.timing
        T, H, W = self.frames, self.height, self.width
        dx = tm.pixel_size_um
        dev = self.device
        s_px = (sxy / dx).to(torch.float32)
        psf_reach = CUTOFF_SIGMAS * s_px[pm]  # [P] px
        z_reach = CUTOFF_SIGMAS * sz.to(torch.float32)[pm]  # [P] µm
        dP = d[pm]
        field_px = (field_reach_um(params, times[:, -1])[pm] / dx).to(torch.float32) if moving else 0.0

        # level 2: intervals of the coarse grid that can reach the tile, bridged to row starts
        seg_len = torch.diff(coarse)  # rows per interval
        M = int(seg_len.max())
        seg_span = (times[:, coarse[1:]] - times[:, coarse[:-1]])  # [B, G-1] µs
        motion = MOTION_SIGMAS * torch.sqrt(2 * dP[:, None] * seg_span[pm] * 1e-6).to(torch.float32)  # [P, G-1] µm
        reach = psf_reach + field_px  # [P] px
        near = self._near(path[:, :-1], path[:, 1:], reach[:, None] + motion / dx, z_reach[:, None] + motion, 0, H)
        pi, si = torch.nonzero(near, as_tuple=True)
        if pi.numel() == 0:
            return {}
        bq = pm[pi]
        q = torch.arange(M, device=dev)
        j = coarse[si][:, None] + q[None]  # row-grid index of each row start [R, M]
        valid = q[None] < seg_len[si][:, None]
        j_end = coarse[si + 1]
        t0 = times[bq, coarse[si]]
        u = torch.where(valid, times[bq[:, None], j.clamp(max=T * H)] - t0[:, None], (times[bq, j_end] - t0)[:, None])
        span = times[bq, j_end] - t0
        a_pos, b_pos = path[pi, si], path[pi, si + 1]
        rows_pos = torch.cat([_bridge(g, a_pos, b_pos, u.to(torch.float32), span.to(torch.float32), d[bq]), b_pos[:, None]], 1)
        if moving:  # the whole field, displaced at each row start's time
            t_end = times[bq, j_end][:, None]
            t_rows = torch.cat([torch.where(valid, times[bq[:, None], j.clamp(max=T * H)], t_end), t_end], 1)
            shift = field_displacement_um(params, bq[:, None].expand_as(t_rows), t_rows).to(rows_pos.dtype)
            rows_pos = torch.cat([rows_pos[..., :2] + shift, rows_pos[..., 2:]], dim=-1)

        # level 3: rows that can be lit, bridged to pixel times
        row_span_us = float(pix_off.max()) if pix_off.numel() else 0.0
        row_motion = MOTION_SIGMAS * torch.sqrt(2 * d[bq] * row_span_us * 1e-6).to(torch.float32)[:, None]  # [R, 1]
        row_of = (j % H).to(torch.float32)
        starts = rows_pos[:, :-1]
        lit = valid & self._near(
            starts, starts, psf_reach[pi][:, None] + row_motion / dx,
            z_reach[pi][:, None] + row_motion, row_of, row_of + 1,
        )
        ri, qi = torch.nonzero(lit, as_tuple=True)
        if ri.numel() == 0:
            return {}
        b = bq[ri]
        jj = j[ri, qi]
        row = jj % H
        frame = jj // H
        span_row = (times[b, jj + 1] - times[b, jj]).to(torch.float32)
        u_row = (torch.arange(W, device=dev, dtype=torch.float32) * tm.dwell_us)[None].expand(len(b), -1)
        xyz = _bridge(g, rows_pos[ri, qi], rows_pos[ri, qi + 1], u_row, span_row, d[b])
        # columns in recording order: for a backward (bidirectional odd) row, column c is u_{W-1-c}
        backward = pix_off[b, row, 0] > pix_off[b, row, -1]
        if bool(backward.any()):
            xyz[backward] = xyz[backward].flip(1)
        # into the box as the row's start is (one shift per row, not per pixel: a particle that
        # crosses the box's face within a row is then drawn just outside it, ≥ box_margin_um
        # from the tile laterally, or at the mirror depth ±z axially, where the PSF is symmetric)
        start = rows_pos[ri, qi]
        xyz = xyz + (self._wrap(start, dx) - start)[:, None, :]
        s = s_px[b][:, None]
        cx = torch.arange(W, device=dev, dtype=torch.float32)[None] + 0.5
        dxp = cx - xyz[..., 0] / dx
        dyp = (row.to(torch.float32) + 0.5)[:, None] - xyz[..., 1] / dx
        szq = sz.to(torch.float32)[b][:, None]
        expo = -(dxp * dxp + dyp * dyp) / (2 * s * s) - xyz[..., 2] ** 2 / (2 * szq * szq)
        peak = (bright.to(torch.float32)[b] / (2 * math.pi * s_px[b] ** 2))[:, None]
        light = peak * torch.exp(expo)
        if blink is not None or "particle_bleach_us" in params:
            t_row = times[b, jj]
            on = torch.ones_like(t_row, dtype=torch.bool)
            if blink is not None:
                switch, first_on = blink
                owner = pi[ri]
                for c in range(0, owner.numel(), EMISSION_CHUNK):  # bounded memory: rows × switches
                    sl = slice(c, c + EMISSION_CHUNK)
                    on[sl] &= emitting(switch[owner[sl]], first_on[owner[sl]], t_row[sl, None])[:, 0]
            if "particle_bleach_us" in params:
                on = on & (t_row < params["particle_bleach_us"][pi[ri]])
            light = light * on[:, None]
        out.index_add_(0, (b * T + frame) * H + row, light)
        if not keep:
            return {}
        pix_times = times[b, jj][:, None] + pix_off[b, row].to(times.dtype)
        return {"movie": b, "particle": pi[ri], "frame": frame, "row": row, "times_us": pix_times, "xyz_um": xyz}


def _bridge(g: torch.Generator, a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, span: torch.Tensor,
            d_um2_s: torch.Tensor) -> torch.Tensor:
    """Brownian bridge: positions at times ``u`` [N, K] (µs after ``a``, sorted, ≤ span)
    of a free 3D Brownian path with coefficient ``d_um2_s`` [N] that is at ``a`` [N, 3]
    at time 0 and at ``b`` [N, 3] at ``span`` [N] µs. Exact in distribution. [N, K, 3]."""
    n, k = u.shape
    du = torch.diff(u, dim=1, prepend=torch.zeros_like(u[:, :1]))
    gaps = torch.cat([du, (span[:, None] - u[:, -1:])], 1).clamp_min(0)  # [N, K+1]
    inc = torch.randn(n, k + 1, 3, generator=g, device=u.device, dtype=torch.float32)
    inc.mul_(torch.sqrt(2 * d_um2_s.to(torch.float32)[:, None] * gaps * 1e-6)[:, :, None])
    walk = torch.cumsum(inc, dim=1)
    frac = (u / span.clamp_min(1e-9)[:, None])[:, :, None]
    # a + walk − frac·(walk at the end) + frac·(b − a), in place, in that order: the same floats
    # as the four-temporary expression it replaced (a seed's movies stay bit-identical)
    out = walk[:, :k].add_(a[:, None, :])
    out.sub_(frac * walk[:, k:])
    return out.add_(frac * (b - a)[:, None, :])


def simulate(priors: SimulatorPriors, timing: ScanTiming, n_movies: int, seed: int, *, tile_height: int = 20,
             tile_width: int = 20, frames: int = 400, device: str = "cpu", **kwargs) -> SimulatedBatch:
    """One-call form of :meth:`Simulator.simulate`."""
    return Simulator(priors, timing, tile_height, tile_width, frames, device).simulate(n_movies, seed, **kwargs)
