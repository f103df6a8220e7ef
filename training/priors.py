"""Priors of the two-photon movie simulator, and the `low` / `high` presets.

Every number that the simulator draws per movie (D, particle count, PSF, brightness,
background, noise, detector gain) comes from a :class:`SimulatorPriors`. The presets
carry the numbers of the paper's reference simulator (docs/design.md §4).

Units: D in µm²/s, lengths in µm, intensities in photons per pixel (background) or
photons integrated over the in-plane PSF (brightness). ``(mean, std)`` pairs are
normal distributions whose absolute value is taken; ``(low, high)`` pairs are uniform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from dle_stream.errors import DleStreamError
from dle_stream.timing import ScanTiming

D_PRIORS = ("uniform", "log-uniform")
PARTICLE_PRIORS = ("reference", "fixed")
DENSITIES = ("cloud", "box")


@dataclass(frozen=True)
class SimulatorPriors:
    """What the simulator draws for each movie.

    Attributes:
        d_min_um2_s, d_max_um2_s: range of the diffusion coefficient D, µm²/s.
        d_prior: "uniform" or "log-uniform" on that range (log-uniform needs d_min > 0).
        particles: "reference" (1 + Exp(mean) capped, or uniform on 0..max, with equal
            chance) or "fixed" (exactly ``particles_max`` particles).
        particles_exp_mean: mean of the exponential part of the reference prior.
        particles_max: cap on the particle count (the reference prior gives at most max + 1).
        density: "cloud" (a Gaussian cloud around the tile that spreads out; its densest
            moment at a random frame) or "box" (uniform, stationary density in a periodic
            box much larger than the PSF around the tile).
        cloud_lateral_std_tiles: (mean, std) of the cloud's lateral std, in tile widths.
        cloud_axial_std_um: the cloud's axial std, µm.
        box_margin_um: lateral margin of the periodic box around the tile, µm.
        box_half_depth_um: half thickness of the periodic box along z, µm.
        psf_sigma_xy_um, psf_sigma_z_um: (mean, std) of the 3D Gaussian PSF widths, µm.
        background_photons: (mean, std) background photons per pixel.
        brightness_photons: (mean, std) photons of one in-focus particle, summed over pixels.
        read_noise_photons: (low, high) std of the additive Gaussian noise, redrawn per frame.
        gain: (mean, std) detector gain, fixed per movie.
        subtract_offset: subtract an offset near the background (as a detector's baseline).
        d_beyond: (share in [d_max, top·d_max], share in [top·d_max, 2·top·d_max]) of movies
            whose D is drawn beyond the range, uniformly (training a "d_grid" head, so
            that out-of-range D is recognised); the rest follow ``d_prior``.
        d_grid_top: top of that grid, units of d_max.
        box_fraction: share of movies simulated with a steady density ("box") while
            ``density`` is "cloud" (a mixed training prior); used by
            :class:`dle_stream.training.mixture.MixedSimulator`.
        effects_share: share of training movies, in [0, 1], simulated with effects of a real
            sample (whole-field motion, blinking, bleaching, brightness, PSF width, density),
            each present with a probability and a random strength drawn per movie by
            :class:`dle_stream.training.effects_prior.EffectsPrior`; used by
            :class:`dle_stream.training.mixture.MixedSimulator` (0: none, the batches of a
            seed as without it). Combines with ``box_fraction``.
        blink_alpha_on, blink_alpha_off: quantum-dot blinking (0, 0: none): every particle
            switches between emitting and dark with dwell times drawn from power laws
            P(τ) ∝ τ^−α on [blink_min_ms, blink_max_ms] (α > 1; measured QDs: 1.4–2.0);
            equal exponents give 50 % on-time. Each particle's blinking began at a random
            time up to ``blink_max_ms`` before the movie (QD blinking ages; it has no
            steady state).
        bleach_time_s: mean time to irreversible photobleaching of a particle, s (each
            particle goes dark at an exponential random time; 0: none).
        drift_um_s: largest whole-field drift speed, µm/s (each movie: speed uniform on
            [0, drift_um_s], direction uniform; 0: none).
        heartbeat_px, heartbeat_hz, breathing_px, breathing_hz: periodic whole-field
            displacement, e.g. of the brain with heartbeat and breathing: per movie and
            component an amplitude (pixels) and a frequency (Hz), uniform on the given
            (low, high), a random phase and direction. Field motion is applied at every
            pixel's own scan time, so it also shears a frame; ground-truth positions stay
            those of the particles in the tissue.
    """

    d_min_um2_s: float = 0.0
    d_max_um2_s: float = 1.5
    d_prior: str = "uniform"
    particles: str = "reference"
    particles_exp_mean: float = 24.0
    particles_max: int = 97
    density: str = "cloud"
    cloud_lateral_std_tiles: tuple[float, float] = (2.0, 0.5)
    cloud_axial_std_um: float = 1.0
    box_margin_um: float = 2.0
    box_half_depth_um: float = 4.0
    psf_sigma_xy_um: tuple[float, float] = (0.21, 0.05)
    psf_sigma_z_um: tuple[float, float] = (1.36, 0.2)
    background_photons: tuple[float, float] = (100.0, 20.0)
    brightness_photons: tuple[float, float] = (600.0, 200.0)
    read_noise_photons: tuple[float, float] = (0.5, 2.5)
    gain: tuple[float, float] = (1.0, 0.1)
    subtract_offset: bool = True
    d_beyond: tuple[float, float] = (0.0, 0.0)
    d_grid_top: float = 2.0
    box_fraction: float = 0.0
    effects_share: float = 0.0
    blink_alpha_on: float = 0.0
    blink_alpha_off: float = 0.0
    blink_min_ms: float = 1.0
    blink_max_ms: float = 10_000.0
    bleach_time_s: float = 0.0
    drift_um_s: float = 0.0
    heartbeat_px: tuple[float, float] = (0.0, 0.0)
    heartbeat_hz: tuple[float, float] = (4.0, 7.0)
    breathing_px: tuple[float, float] = (0.0, 0.0)
    breathing_hz: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> DleStreamError:
            return DleStreamError(f"simulator priors: {name} {why}")

        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                    raise bad(f.name, f"must be finite, got {value!r}")
        if self.d_min_um2_s < 0 or self.d_max_um2_s <= self.d_min_um2_s:
            raise bad("D range", f"must satisfy 0 ≤ d_min < d_max, got {self.d_min_um2_s}–{self.d_max_um2_s} µm²/s")
        if self.d_prior not in D_PRIORS:
            raise bad("d_prior", f"must be one of {D_PRIORS}, got {self.d_prior!r}")
        if self.d_prior == "log-uniform" and self.d_min_um2_s <= 0:
            raise bad("d_min_um2_s", "must be > 0 for a log-uniform D prior")
        if self.particles not in PARTICLE_PRIORS:
            raise bad("particles", f"must be one of {PARTICLE_PRIORS}, got {self.particles!r}")
        if self.density not in DENSITIES:
            raise bad("density", f"must be one of {DENSITIES}, got {self.density!r}")
        if self.particles_max < 0 or self.particles_exp_mean <= 0:
            raise bad("particle count", "needs particles_max ≥ 0 and particles_exp_mean > 0")
        for name in ("psf_sigma_xy_um", "psf_sigma_z_um", "brightness_photons", "gain", "cloud_lateral_std_tiles"):
            mean, std = getattr(self, name)
            if mean <= 0 or std < 0:
                raise bad(name, f"needs a positive mean and non-negative std, got {(mean, std)}")
        mean, std = self.background_photons
        if mean < 0 or std < 0:
            raise bad("background_photons", f"needs non-negative mean and std, got {(mean, std)}")
        lo, hi = self.read_noise_photons
        if lo < 0 or hi < lo:
            raise bad("read_noise_photons", f"needs 0 ≤ low ≤ high, got {(lo, hi)}")
        if min(self.d_beyond) < 0 or sum(self.d_beyond) >= 1 or not self.d_grid_top > 1:
            raise bad("d_beyond", f"needs shares ≥ 0 summing below 1 and d_grid_top > 1, got {self.d_beyond}, {self.d_grid_top}")
        if not 0 <= self.box_fraction <= 1:
            raise bad("box_fraction", f"must be in [0, 1], got {self.box_fraction}")
        if not 0 <= self.effects_share <= 1:
            raise bad("effects_share", f"must be in [0, 1], got {self.effects_share}")
        if self.cloud_axial_std_um <= 0 or self.box_margin_um < 0 or self.box_half_depth_um <= 0:
            raise bad("density geometry", "needs positive cloud_axial_std_um and box_half_depth_um, non-negative box_margin_um")
        alphas = (self.blink_alpha_on, self.blink_alpha_off)
        if alphas != (0.0, 0.0) and not min(alphas) > 1:
            raise bad("blinking", f"needs both exponents > 1 (or both 0: no blinking), got {alphas}")
        if not 0 < self.blink_min_ms < self.blink_max_ms:
            raise bad("blinking", f"needs 0 < blink_min_ms < blink_max_ms, got {self.blink_min_ms}, {self.blink_max_ms}")
        if self.bleach_time_s < 0 or self.drift_um_s < 0:
            raise bad("bleach_time_s and drift_um_s", "must be ≥ 0")
        for name in ("heartbeat_px", "breathing_px", "heartbeat_hz", "breathing_hz"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi < lo or (name.endswith("hz") and lo <= 0):
                raise bad(name, f"needs 0 ≤ low ≤ high (frequencies > 0), got {(lo, hi)}")

    @property
    def d_mean_um2_s(self) -> float:
        """Mean of the D prior (the 'guess the prior mean' baseline), µm²/s."""
        if self.d_prior == "uniform":
            return 0.5 * (self.d_min_um2_s + self.d_max_um2_s)
        lo, hi = self.d_min_um2_s, self.d_max_um2_s
        return (hi - lo) / math.log(hi / lo)

    @property
    def d_std_um2_s(self) -> float:
        """Standard deviation of the D prior, µm²/s."""
        lo, hi = self.d_min_um2_s, self.d_max_um2_s
        if self.d_prior == "uniform":
            return (hi - lo) / math.sqrt(12)
        second = (hi**2 - lo**2) / (2 * math.log(hi / lo))
        return math.sqrt(max(second - self.d_mean_um2_s**2, 0.0))

    @property
    def blinking(self) -> bool:
        return self.blink_alpha_on > 0

    @property
    def field_motion(self) -> bool:
        return self.drift_um_s > 0 or self.heartbeat_px[1] > 0 or self.breathing_px[1] > 0

    def operating(self) -> "SimulatorPriors":
        """The same priors with D only in the operating range, the paper's cloud density and no
        share of sample-effects movies (what validation and the accuracy suites use)."""
        return replace(self, d_beyond=(0.0, 0.0), box_fraction=0.0, effects_share=0.0)

    def with_(self, **changes) -> "SimulatorPriors":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "SimulatorPriors":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DleStreamError(f"simulator priors: unknown field(s) {', '.join(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


@dataclass(frozen=True)
class Preset:
    """A named simulation setting: priors, scan timing, tile and window size."""

    name: str
    priors: SimulatorPriors
    timing: ScanTiming
    tile_height: int = 20
    tile_width: int = 20
    frames: int = 400
    description: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name, "priors": self.priors.to_dict(), "timing": self.timing.to_dict(),
            "tile_height": self.tile_height, "tile_width": self.tile_width, "frames": self.frames,
            "description": self.description,
        }


def _presets() -> dict[str, Preset]:
    ref = ScanTiming.reference()
    return {
        "low": Preset(
            "low", SimulatorPriors(d_max_um2_s=1.5), ref,
            description="quantum dots in brain tissue: D uniform on 0–1.5 µm²/s, reference scan",
        ),
        "high": Preset(
            "high", SimulatorPriors(d_max_um2_s=50.0), ref,
            description="nanobeads in water: D uniform on 0–50 µm²/s, reference scan",
        ),
    }


PRESETS: dict[str, Preset] = _presets()

#: What a real sample adds to the paper's simulation, at two strengths each (issue 14):
#: changes to a preset's priors, with what they stand for.
STRESSES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "steady": ("steady particle density (particles entering and leaving) instead of the spreading cloud",
               {"density": "box"}, {"density": "box", "particles_exp_mean": 72.0, "particles_max": 291}),
    "motion": ("whole-field motion: heartbeat-like displacement 0.5 / 2 px at 1–7 Hz plus a slow drift",
               {"heartbeat_px": (0.5, 0.5), "heartbeat_hz": (1.0, 7.0), "drift_um_s": 0.005},
               {"heartbeat_px": (2.0, 2.0), "heartbeat_hz": (1.0, 7.0), "drift_um_s": 0.02}),
    "blinking": ("quantum-dot blinking, power-law dwells from 1 ms to 10 s: 50 % / ≈ 27 % on-time (measured)",
                 {"blink_alpha_on": 1.7, "blink_alpha_off": 1.7},
                 {"blink_alpha_on": 1.8, "blink_alpha_off": 1.6}),
    "dim": ("dots half / a quarter as bright", {"brightness_factor": 0.5}, {"brightness_factor": 0.25}),
    "dense": ("3× / 10× the particles", {"density_factor": 3.0}, {"density_factor": 10.0}),
    "wide-psf": ("PSF 1.5× / 2× wider (deeper in tissue)", {"psf_factor": 1.5}, {"psf_factor": 2.0}),
    "bleaching": ("photobleaching with a mean lifetime of 60 s / 10 s", {"bleach_time_s": 60.0}, {"bleach_time_s": 10.0}),
}


def stressed(priors: SimulatorPriors, stress: str, strength: str) -> SimulatorPriors:
    """``priors`` with one effect of :data:`STRESSES` at ``strength`` "weak" or "strong"."""
    if stress not in STRESSES or strength not in ("weak", "strong"):
        raise DleStreamError(f"unknown stress {stress!r} / {strength!r}: use one of {', '.join(STRESSES)} "
                             f"with weak or strong")
    _, weak, strong = STRESSES[stress]
    changes = dict(weak if strength == "weak" else strong)
    if "brightness_factor" in changes:
        k = changes.pop("brightness_factor")
        changes["brightness_photons"] = tuple(k * v for v in priors.brightness_photons)
    if "density_factor" in changes:
        k = changes.pop("density_factor")
        changes["particles_exp_mean"] = k * priors.particles_exp_mean
        changes["particles_max"] = int(round(k * (priors.particles_max + 1))) - 1
    if "psf_factor" in changes:
        k = changes.pop("psf_factor")
        changes["psf_sigma_xy_um"] = tuple(k * v for v in priors.psf_sigma_xy_um)
        changes["psf_sigma_z_um"] = tuple(k * v for v in priors.psf_sigma_z_um)
    return replace(priors, **changes)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise DleStreamError(f"unknown preset {name!r}; use --preset {' or '.join(PRESETS)}") from None

