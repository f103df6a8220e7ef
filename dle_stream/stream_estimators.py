"""Estimators as the stream runner uses them: features per tile-frame, D per window.

A stream estimator has two steps, so that each tile-frame is processed exactly once:
``features(tiles [N, h, w]) -> [N, ...]`` runs as frames arrive, and
``estimate(windows [B, T, ...]) -> log-likelihood [B, grid.n]`` runs every hop frames on
the rolling windows of features. The log-likelihood is of D on ``grid`` (units of
``d_max_um2_s``, the top of the operating range in this stream's units): independent
windows and tiles combine by adding it (:mod:`dle_stream.likelihood`); the contract is
:class:`dle_stream.protocols.StreamEstimator`. For the DLE the feature is the encoder's latent vector and
the estimate costs only the temporal head; an estimator that needs pixels (the classic
tracker) keeps the raw tile as its feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dle_stream.errors import EstimatorChoiceError, arg
from dle_stream.likelihood import DGrid, gaussian_log_likelihood
from dle_stream.protocols import StreamEstimator
from dle_stream.timing import ScanTiming, TimingComparison

if TYPE_CHECKING:  # imports torch; loaded lazily by make_stream_estimator
    from dle_stream.estimator import DiffusionEstimator

ESTIMATORS = ("dle", "classic", "rics")


@dataclass
class DLEStream:
    """The deep-learning estimator in a stream (timing already checked)."""

    estimator: DiffusionEstimator
    timing_scale: float = 1.0
    name: str = "dle"
    #: the stream's scan (a family model reads it with every window)
    scan: ScanTiming | None = None

    @property
    def tile_shape(self) -> tuple[int, int]:
        c = self.estimator.card
        return c.tile_height, c.tile_width

    @property
    def window_frames(self) -> int:
        return int(self.estimator.card.window_frames)

    @property
    def min_frames(self) -> int:
        return int(self.estimator.model.config.min_frames)

    @property
    def d_range(self) -> tuple[float, float]:
        c = self.estimator.card
        return c.d_min_um2_s / self.timing_scale, c.d_max_um2_s / self.timing_scale

    @property
    def d_max_um2_s(self) -> float:
        return self.d_range[1]

    @property
    def grid(self) -> DGrid:
        return self.estimator.grid

    def features(self, tiles: np.ndarray) -> np.ndarray:
        """Per tile-frame: the encoder's latent vector, then the spot test's two numbers
        (:mod:`dle_stream.spots`), float32."""
        latents = np.asarray(self.estimator.encode(tiles), dtype=np.float32)
        spots = np.asarray(self.estimator.spot_features(tiles), dtype=np.float32)
        return np.concatenate([latents, spots], axis=-1)

    def estimate(self, windows: np.ndarray) -> np.ndarray:
        """Window log-likelihoods; flat for windows where no particle was seen and that say little."""
        windows = np.asarray(windows)
        ll = self.estimator.window_log_likelihoods(windows[..., :-2], self.scan)
        return self.estimator.flatten_unseen(ll, windows[..., -2:])


class PixelEstimator(Protocol):
    """What :class:`ClassicStream` needs of a pixel-based estimator (:class:`~dle_stream.classic.ClassicEstimator`,
    :class:`~dle_stream.rics.RicsEstimator`)."""

    def estimate_batch(self, movies: Any) -> tuple[np.ndarray, np.ndarray, list[set[str]]]:
        """D̂ [B], σ [B] (µm²/s) and flags of movies [B, T, H, W]."""
        ...


@dataclass
class ClassicStream:
    """A pixel-based estimator (classic trackpy + CVE, or RICS) in a stream: raw tiles as features."""

    estimator: PixelEstimator
    tile_shape: tuple[int, int]
    window_frames: int
    d_range: tuple[float, float]
    grid: DGrid = DGrid()
    min_frames: int = 10
    name: str = "classic"

    @property
    def d_max_um2_s(self) -> float:
        return self.d_range[1]

    def features(self, tiles: np.ndarray) -> np.ndarray:
        return np.asarray(tiles, dtype=np.float32)

    def estimate(self, windows: np.ndarray) -> np.ndarray:
        """D ± σ of the pixel-based estimator as a Gaussian log-likelihood on the grid."""
        d, s, _ = self.estimator.estimate_batch(windows)
        scale = self.d_max_um2_s
        return gaussian_log_likelihood(np.asarray(d, float) / scale, np.asarray(s, float) / scale, self.grid)


def calibration_note(est: StreamEstimator, window: int) -> str | None:
    """A warning when a stream's intervals are not measured: the classic tracker's and RICS's
    D ± σ are read as exact Gaussians, which they are not (measured: their combined 68 %
    intervals missed the truth in about half of the halves of simulated recordings, and
    homogeneous halves were called inconsistent; BENCHMARKS.md, session 14); and a model's
    likelihood calibration (intervals, information of windows combined, the disagreement
    tests' scale) was measured on windows of its own length only."""
    if est.name != "dle":
        return (f"estimator {est.name}: its D ± σ are not calibrated, so its intervals and its tests of "
                f"disagreement are not measured (use the DLE for intervals that hold)")
    if int(window) == int(est.window_frames):
        return None
    return (f"windows of {window} frames: the model was trained and calibrated on {est.window_frames}-frame "
            f"windows, so its intervals and its tests of disagreement are not measured for these")


def make_stream_estimator(estimator: str, model: str, timing: ScanTiming,
                          device: str = "cpu") -> tuple[StreamEstimator, TimingComparison]:
    """Load the estimator ``estimator`` ("dle", "classic" or "rics") for a stream with this timing.

    The model package gives the tile size, window length and D prior for every kind
    (the classic tracker uses the model's PSF prior and D range for its parameters; RICS
    fits the PSF width itself).
    Returns (stream estimator, timing comparison).
    """
    from dle_stream.estimator import DiffusionEstimator

    if estimator not in ESTIMATORS:
        raise EstimatorChoiceError(f"{arg('estimator', estimator)}: use one of {', '.join(ESTIMATORS)}")
    kind = estimator
    dle = DiffusionEstimator.load(model, device=device)
    comparison = dle.timing_check(timing)
    if kind == "dle":
        return DLEStream(dle, comparison.time_scale, scan=timing), comparison
    card = dle.card
    psf = card.psf_priors.get("sigma_xy_um", [0.21])[0] if isinstance(card.psf_priors, dict) else 0.21
    d_range = (card.d_min_um2_s / comparison.time_scale, card.d_max_um2_s / comparison.time_scale)
    if kind == "rics":
        from dle_stream.rics import RicsEstimator

        pixel_est: PixelEstimator = RicsEstimator(timing, psf_sigma_xy_um=None, d_max_um2_s=d_range[1], d_min_um2_s=d_range[0])
    else:
        from dle_stream.classic import ClassicEstimator

        pixel_est = ClassicEstimator(timing, psf_sigma_xy_um=float(psf), d_max_um2_s=d_range[1], d_min_um2_s=d_range[0])
    # the model's grid, without its calibration: that describes the network's windows, and
    # these estimators' D ± σ become exact Gaussian likelihoods
    plain = DGrid(intervals=dle.grid.intervals, top=dle.grid.top)
    return ClassicStream(pixel_est, (card.tile_height, card.tile_width), int(card.window_frames), d_range,
                         grid=plain, name=kind), comparison
