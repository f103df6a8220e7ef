"""Diffusion coefficients (µm²/s) from tile movies with a trained model package.

:class:`DiffusionEstimator` wraps a :class:`~dle_stream.model.DLEModel` and its
:class:`~dle_stream.model_package.ModelCard`:

- :meth:`~DiffusionEstimator.estimate`: whole movies [T, H, W] or [B, T, H, W] → D, σ.
- :meth:`~DiffusionEstimator.encode` then :meth:`~DiffusionEstimator.estimate_latents`:
  the streaming path, where each tile-frame is encoded once as it arrives and each
  window costs only the temporal head.
- :meth:`~DiffusionEstimator.timing_check`: is the model valid for a stream's scan
  timing, and by which factor are its D values scaled (docs/design.md §3)?

A *family* model (its card has a ``scan_family``, :mod:`dle_stream.scan_family`) serves
every scan inside its box and takes the scan as an input: the methods that read windows
then need the scan (``scan=``; :meth:`estimate` and :meth:`estimate_posterior` pass their
``timing``), and its D values are never rescaled (time scale 1).

Example::

    est = DiffusionEstimator.load("brain-qd-low")
    d, sigma = est.estimate(movie, ScanTiming.reference())   # µm²/s
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dle_stream.errors import DleStreamError
from dle_stream.likelihood import DGrid, Posterior, gaussian_log_likelihood, posterior, window_log_likelihood
from dle_stream.model import DLEModel, with_scan_features
from dle_stream.model_package import ModelCard, load_model_package, resolve_model
from dle_stream.spots import flatten_unseen, frame_spot_features, particles_seen
from dle_stream.timing import ScanTiming, TimingComparison

#: Tile-frames encoded per batch (measured: chunks of 256–2048 are ≈ equally fast on
#: the CPU with a channels-last encoder; one huge batch is slower, as it leaves the cache).
ENCODE_CHUNK = 1024
#: Windows per temporal-head batch.
HEAD_CHUNK = 64
#: PSF width (σ, µm) the spot test assumes when a card has no PSF prior (the presets').
DEFAULT_PSF_SIGMA_UM = 0.21

ArrayLike = np.ndarray | torch.Tensor


class DiffusionEstimator:
    """A loaded model package, ready to estimate D (µm²/s).

    Attributes:
        model: the network (eval mode).
        card: the package's card.
        folder: the package folder, or None for an in-memory model.
    """

    def __init__(self, model: DLEModel, card: ModelCard, folder: Path | None = None,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            self.model.optimize_for_cpu_inference()
        self.card = card
        self.folder = folder
        self.d_max_um2_s = float(card.d_max_um2_s)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_threads = 0
        self._pool_pid = 0  # a forked child has no threads of its parent's pool
        self._pool_lock = threading.Lock()
        config = model.config
        if (config.tile_height, config.tile_width) != (card.tile_height, card.tile_width):
            raise DleStreamError(
                f"model {card.name}: card tile {card.tile_height}×{card.tile_width} px differs from the "
                f"network's {config.tile_height}×{config.tile_width} px; fix the card"
            )

    @classmethod
    def load(cls, name_or_path: str | Path, device: str | torch.device = "cpu") -> "DiffusionEstimator":
        """Load a package by folder path or model name (see :func:`resolve_model`)."""
        folder = resolve_model(name_or_path)
        model, card = load_model_package(folder, device=device)
        return cls(model, card, folder, device)

    # ----------------------------------------------------------------- timing
    @property
    def timing(self) -> ScanTiming:
        """The scan timing the model was trained for."""
        return self.card.timing

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(height, width) of the tiles the model reads, px."""
        return self.card.tile_height, self.card.tile_width

    def timing_check(self, timing: ScanTiming) -> TimingComparison:
        """Compare a stream's scan timing with the model's.

        Returns the comparison (``d_scale`` multiplies the model's D for this stream) or
        raises :class:`DleStreamError` listing the differences when the model is not
        valid for this scan.
        """
        family = self.card.family
        if family is not None:
            outside = family.outside(timing)
            if outside:
                raise DleStreamError(
                    f"family model {self.card.name} does not serve this scan: {'; '.join(outside)}; "
                    f"run `dle-stream train --like RECORDING` to train a model for this scan"
                )
            return TimingComparison(compatible=True, time_scale=1.0, differences=[])
        comparison = self.timing.compare(timing)
        if not comparison.compatible:
            raise DleStreamError(
                f"model {self.card.name} was trained for another scan: {comparison.explain()}; "
                f"run `dle-stream train --like RECORDING` to train a model for this scan"
            )
        return comparison

    # ------------------------------------------------------------- estimates
    def estimate(self, movie: ArrayLike, timing: ScanTiming) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
        """D and σ (µm²/s) of one movie [T, H, W] (floats) or a batch [B, T, H, W] (arrays [B]).

        ``timing`` is the scan of the movie: it is checked against the model's
        (:meth:`timing_check`) and D scaled accordingly. Any window length works; the
        tile must be the model's size.
        """
        post = self.estimate_posterior(movie, timing)
        if np.ndim(post.d) == 0:
            return float(post.d), float(post.sigma)
        return post.d, post.sigma

    def estimate_posterior(self, movie: ArrayLike, timing: ScanTiming) -> Posterior:
        """The full window output of a movie [T, H, W] or batch [B, T, H, W]: D (posterior
        median), σ, 68 %/95 % intervals, out-of-range probability (µm²/s), see
        :class:`~dle_stream.likelihood.Posterior`; arrays are 0-d for a single movie."""
        ll, scale = self.window_log_likelihoods_of_movies(movie, timing)
        post = posterior(ll, self.grid, self.d_max_for(scale))
        return post

    def window_log_likelihoods_of_movies(self, movie: ArrayLike, timing: ScanTiming) -> tuple[np.ndarray, float]:
        """(log-likelihoods [n] or [B, n] on :attr:`grid`, the stream's time scale) of movies."""
        comparison = self.timing_check(timing)
        x = self._as_tensor(movie, "movie")
        single = x.dim() == 3
        if single:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise DleStreamError(
                f"movie of shape {tuple(x.shape)}: expected [frames, height, width] or [movies, frames, height, width]"
            )
        self._check_tile(tuple(x.shape[-2:]), "movie")
        b, t = x.shape[:2]
        self._check_length(t)
        latents = self._encode_tensor(x.reshape(b * t, *x.shape[2:])).reshape(b, t, -1)
        ll = self._head(self._head_input(latents, timing))
        ll = self.flatten_unseen(ll, self.spot_features(x.cpu().numpy()))
        return (ll[0] if single else ll), comparison.time_scale

    @property
    def spot_psf_px(self) -> float:
        """Width (σ, px of the model's scan) of the spot test's filter: the card's PSF prior."""
        psf = self.card.psf_priors.get("sigma_xy_um") if isinstance(self.card.psf_priors, dict) else None
        sigma_um = float(psf[0]) if psf else DEFAULT_PSF_SIGMA_UM
        return sigma_um / float(self.card.pixel_size_um)

    def spot_features(self, frames: np.ndarray) -> np.ndarray:
        """Tile-frames [..., H, W] → the spot test's numbers per frame [..., 2]
        (:func:`dle_stream.spots.frame_spot_features`)."""
        return frame_spot_features(frames, self.spot_psf_px)

    def flatten_unseen(self, log_likelihood: np.ndarray, spot_features: np.ndarray) -> np.ndarray:
        """Window log-likelihoods [B, n] with those of windows where no particle was seen and
        that say little on their own made flat (:mod:`dle_stream.spots`); ``spot_features``
        [B, frames, 2] from :meth:`spot_features`. A "gaussian" (older) model's are kept."""
        ll = np.asarray(log_likelihood, dtype=np.float64)
        if self.model.config.output != "d_grid":
            return ll
        seen = particles_seen(spot_features)
        if bool(np.all(seen)):
            return ll
        return flatten_unseen(ll, seen, posterior(ll, self.grid, 1.0).little_information)

    def encode(self, frames: ArrayLike) -> np.ndarray:
        """Tile-frames [N, H, W] (raw intensities) → latents [N, latent] (float32).

        Each frame is normalised on its own, so frames can be encoded as they arrive
        and kept (e.g. in a ring buffer) for :meth:`estimate_latents`.
        """
        x = self._as_tensor(frames, "frames")
        if x.dim() != 3:
            raise DleStreamError(f"frames of shape {tuple(x.shape)}: expected [frames, height, width]")
        self._check_tile(tuple(x.shape[-2:]), "frames")
        return self._encode_tensor(x).cpu().numpy()

    def estimate_latents(self, latents: ArrayLike, timing_scale: float = 1.0,
                         scan: ScanTiming | None = None) -> tuple[np.ndarray, np.ndarray]:
        """D and σ (µm²/s), arrays [B], from latent windows [B, T, latent] (from :meth:`encode`).

        ``timing_scale`` is the stream's time scale b = :attr:`TimingComparison.time_scale`
        (stream times / model times, from :meth:`timing_check`); D and σ are divided by it.
        For a grid model they are the posterior median and std on the operating range.
        ``scan``: the windows' scan (needed by a family model). Latents carry no pixels, so
        the spot test (:meth:`flatten_unseen`) is not applied here.
        """
        return self._summary(self.window_log_likelihoods(latents, scan), timing_scale)

    @property
    def grid(self) -> DGrid:
        """The D grid of :meth:`window_log_likelihoods` (units of the card's d_max)."""
        return self.model.config.grid

    def d_max_for(self, timing_scale: float = 1.0) -> float:
        """Top of the model's operating range for a stream with this time scale, µm²/s."""
        return self.d_max_um2_s / timing_scale

    def window_log_likelihoods(self, latents: ArrayLike, scan: ScanTiming | None = None) -> np.ndarray:
        """Log-likelihood of D on :attr:`grid` for latent windows [B, T, latent] → [B, grid.n].

        Independent windows (and tiles) combine by adding these
        (:func:`dle_stream.likelihood.combine`). The grid is in units of d_max, so it holds
        for any time scale (D scales as 1/b). A "gaussian" (older) model's D̂ ± σ̂ is
        turned into a Gaussian log-likelihood on the same grid. ``scan``: the windows' scan
        (a family model reads it, :meth:`timing_check` having accepted it; others ignore it).
        """
        x = self._as_tensor(latents, "latents")
        latent = self.model.config.latent
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != latent:
            raise DleStreamError(f"latents of shape {tuple(x.shape)}: expected [windows, frames, {latent}]")
        self._check_length(int(x.shape[1]))
        return self._head(self._head_input(x, scan))

    @property
    def is_family(self) -> bool:
        """True for a family model (it serves a box of scans and reads the scan as an input)."""
        return self.card.family is not None

    def _head_input(self, latents: torch.Tensor, scan: ScanTiming | None) -> torch.Tensor:
        """Latent windows [B, T, latent] → the head's input (a family model: with the scan's features)."""
        family = self.card.family
        if family is None:
            return latents
        if scan is None:
            raise DleStreamError(f"family model {self.card.name} reads the scan with the windows: pass scan=TIMING")
        features = torch.from_numpy(family.features(scan, self.d_max_um2_s))
        return with_scan_features(latents, features, self.model.config)

    # --------------------------------------------------------------- helpers
    def _as_tensor(self, data: ArrayLike, what: str) -> torch.Tensor:
        if isinstance(data, torch.Tensor):
            x = data.detach()
        else:
            arr = np.asarray(data)
            if arr.dtype.kind not in "biuf":
                raise DleStreamError(f"{what}: expected numbers, got an array of {arr.dtype}")
            if arr.dtype != np.float32 or any(s < 0 or s % arr.itemsize for s in arr.strides):
                arr = np.ascontiguousarray(arr, dtype=np.float32)
            # float32 with any positive strides (a stream's window: a view into its ring buffer)
            # is shared, not copied; torch copies what a kernel needs contiguous, chunk by chunk
            x = torch.from_numpy(arr)
        if not x.is_floating_point() or x.dtype != torch.float32:
            x = x.float()
        return x.to(self.device)

    def _check_tile(self, shape: tuple[int, ...], what: str) -> None:
        if shape != self.tile_shape:
            h, w = self.tile_shape
            raise DleStreamError(
                f"{what}: tiles of {shape[0]}×{shape[1]} px, but model {self.card.name} reads {h}×{w} px tiles; "
                f"cut {h}×{w} px tiles (or train a model for this tile size)"
            )

    def _check_length(self, frames: int) -> None:
        minimum = self.model.config.min_frames
        if frames < minimum:
            raise DleStreamError(
                f"a window of {frames} frames is too short for model {self.card.name} "
                f"(at least {minimum}; trained on {self.card.window_frames}); use longer windows"
            )

    def _encode_tensor(self, frames: torch.Tensor) -> torch.Tensor:
        workers = self._workers()
        chunks = max(1, math.ceil(frames.shape[0] / ENCODE_CHUNK))
        chunks = math.ceil(chunks / workers) * workers  # equal shares for the workers
        size = max(1, math.ceil(frames.shape[0] / chunks))
        return torch.cat(self._map(self.model.encode, frames.split(size), workers)).float()

    def _head(self, latents: torch.Tensor) -> np.ndarray:
        """Window log-likelihoods [B, grid.n] on :attr:`grid`."""
        parts = self._map(self.model.head, latents.split(HEAD_CHUNK), self._workers())
        out = torch.cat(parts).double().cpu().numpy()
        config = self.model.config
        if config.output == "d_grid":
            return window_log_likelihood(out, config.grid, config.training_prior, config.grid_temperature,
                                         config.grid_warp, config.grid_smooth_knots, config.grid_temperature_profile)
        return gaussian_log_likelihood(out[:, 0], out[:, 1], config.grid)

    # ------------------------------------------------------- CPU parallelism
    def _workers(self) -> int:
        """Worker threads for chunks of tile-frames or windows: torch's thread count on the CPU."""
        return max(1, torch.get_num_threads()) if self.device.type == "cpu" else 1

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], chunks: Sequence[torch.Tensor],
             workers: int) -> list[torch.Tensor]:
        """``fn`` (inference mode) of each chunk, in order; on the CPU, ``workers`` chunks at
        once, each in its own thread with single-threaded torch ops.

        Measured on 2 cores (benchmarks/results/stream_speed.md): one op of this small
        network on 2 intra-op threads is hardly faster than on one, and ~6× slower when the
        cores are busy with other work, while two chunks side by side on one thread each
        use both cores. Each tile-frame and window is computed alone, so the results agree
        with the single-threaded ones (to float32 rounding, which torch's kernels vary with
        batch size and thread count)."""

        def run(chunk: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return fn(chunk)

        if workers < 2 or len(chunks) < 2:
            return [run(c) for c in chunks]
        return list(self._worker_pool(workers).map(run, chunks))

    def _worker_pool(self, workers: int) -> ThreadPoolExecutor:
        """The pool of ``workers`` threads, each set to single-threaded torch ops; the
        process-wide thread count (which a new thread inherits) is put back afterwards."""
        with self._pool_lock:
            if self._pool is not None and self._pool_threads == workers and self._pool_pid == os.getpid():
                return self._pool
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.shutdown(wait=True)
            ready = threading.Barrier(workers)
            pool = ThreadPoolExecutor(workers, thread_name_prefix="dle-estimator",
                                      initializer=torch.set_num_threads, initargs=(1,))
            for f in [pool.submit(ready.wait) for _ in range(workers)]:  # start every thread now
                f.result()
            torch.set_num_threads(workers)  # the process-wide value, as the caller set it
            self._pool, self._pool_threads, self._pool_pid = pool, workers, os.getpid()
            return pool

    def _summary(self, log_likelihood: np.ndarray, time_scale: float) -> tuple[np.ndarray, np.ndarray]:
        if not time_scale > 0:
            raise DleStreamError(f"timing_scale {time_scale!r}: must be a positive number (stream / model times)")
        post = posterior(log_likelihood, self.grid, self.d_max_for(time_scale))
        return post.d, post.sigma
