"""The training prior of sample effects: which effects of a real sample a training movie carries, and how strong.

A share ``SimulatorPriors.effects_share`` of training movies
(:class:`~dle_stream.training.mixture.MixedSimulator`) is simulated with effects of a real
sample. For each such movie, :meth:`EffectsPrior.draw` decides every effect independently
(present with its probability ``p_*``) and draws its strength; :meth:`EffectSettings.apply`
turns the draw into that movie's :class:`~dle_stream.training.priors.SimulatorPriors`, in the
same way as the stress suites (:func:`~dle_stream.training.priors.stressed`) do. The D prior
is never changed.

The default ranges (:data:`EFFECTS_PRIOR`) reach the stress suites' strong strengths
(:data:`~dle_stream.training.priors.STRESSES`) and a little beyond where that is physical:

============  ===========  ==================================================================
effect        probability  strength when present
============  ===========  ==================================================================
motion        0.4          heartbeat amplitude uniform 0–2.5 px at uniform 1–7 Hz; breathing
                           0–2 px at 0.2–2 Hz; drift speed uniform 0–0.025 µm/s (drawn per
                           movie by the simulator below that cap); random directions, phases
blinking      0.4          power-law on and off exponents, each uniform on 1.4–2.0 (measured
                           quantum dots), dwells 1 ms–10 s (the priors' blink_min/max_ms)
bleaching     0.4          mean photobleaching lifetime log-uniform on 5–120 s
brightness    0.4          dots' brightness × a factor log-uniform on 0.25–2
psf           0.4          PSF widths (xy and z together) × a factor uniform on 1–2
density       0.4          particle count prior × a factor log-uniform on 1–10
============  ===========  ==================================================================

With six effects at 0.4 an effects movie carries 2.4 effects on average; 0.6⁶ ≈ 5 % carry
none (such a movie is an ordinary one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from dle_stream.errors import DleStreamError
from dle_stream.training.priors import SimulatorPriors

#: The effects, in the order their presence is drawn.
EFFECTS = ("motion", "blinking", "bleaching", "brightness", "psf", "density")
#: Uniform numbers one draw takes from the generator, whatever is present (so that the
#: movies after it do not depend on which effects were drawn).
DRAWS_PER_MOVIE = len(EFFECTS) + 10


@dataclass(frozen=True)
class EffectSettings:
    """The sample effects of one training movie (drawn by :meth:`EffectsPrior.draw`).

    Attributes:
        present: names of the effects the movie carries (from :data:`EFFECTS`); the
            numbers of the absent ones are drawn but not applied.
        heartbeat_px, heartbeat_hz: heartbeat-like displacement amplitude (pixels) and
            frequency (Hz).
        breathing_px, breathing_hz: breathing-like displacement amplitude (pixels) and
            frequency (Hz).
        drift_cap_um_s: largest drift speed, µm/s (the simulator draws the movie's speed
            uniform below it, direction uniform).
        blink_alpha_on, blink_alpha_off: power-law exponents of the on and off dwell times.
        bleach_time_s: mean photobleaching lifetime of a particle, s.
        brightness_factor: factor on the dots' brightness prior (mean and std).
        psf_factor: factor on the PSF width priors, xy and z together.
        density_factor: factor on the particle count prior (mean and cap).
    """

    present: frozenset[str]
    heartbeat_px: float
    heartbeat_hz: float
    breathing_px: float
    breathing_hz: float
    drift_cap_um_s: float
    blink_alpha_on: float
    blink_alpha_off: float
    bleach_time_s: float
    brightness_factor: float
    psf_factor: float
    density_factor: float

    def apply(self, priors: SimulatorPriors) -> SimulatorPriors:
        """``priors`` with the present effects (absent ones leave ``priors`` as they are)."""
        c: dict = {"box_fraction": 0.0, "effects_share": 0.0}  # one movie's priors: no mixing left
        if "motion" in self.present:
            c.update(heartbeat_px=(self.heartbeat_px,) * 2, heartbeat_hz=(self.heartbeat_hz,) * 2,
                     breathing_px=(self.breathing_px,) * 2, breathing_hz=(self.breathing_hz,) * 2,
                     drift_um_s=self.drift_cap_um_s)
        if "blinking" in self.present:
            c.update(blink_alpha_on=self.blink_alpha_on, blink_alpha_off=self.blink_alpha_off)
        if "bleaching" in self.present:
            c["bleach_time_s"] = self.bleach_time_s
        if "brightness" in self.present:
            c["brightness_photons"] = tuple(self.brightness_factor * v for v in priors.brightness_photons)
        if "psf" in self.present:
            c["psf_sigma_xy_um"] = tuple(self.psf_factor * v for v in priors.psf_sigma_xy_um)
            c["psf_sigma_z_um"] = tuple(self.psf_factor * v for v in priors.psf_sigma_z_um)
        if "density" in self.present:
            k = self.density_factor
            c["particles_exp_mean"] = k * priors.particles_exp_mean
            c["particles_max"] = int(round(k * (priors.particles_max + 1))) - 1
        return replace(priors, **c)

    def to_dict(self) -> dict:
        return {**asdict(self), "present": sorted(self.present)}


@dataclass(frozen=True)
class EffectsPrior:
    """Probabilities (``p_*``, each in [0, 1]) and strength ranges ((low, high)) of the sample
    effects of a training movie; see the module's table for the defaults."""

    p_motion: float = 0.4
    heartbeat_px: tuple[float, float] = (0.0, 2.5)
    heartbeat_hz: tuple[float, float] = (1.0, 7.0)
    breathing_px: tuple[float, float] = (0.0, 2.0)
    breathing_hz: tuple[float, float] = (0.2, 2.0)
    drift_cap_um_s: float = 0.025
    p_blinking: float = 0.4
    blink_alpha: tuple[float, float] = (1.4, 2.0)
    p_bleaching: float = 0.4
    bleach_time_s: tuple[float, float] = (5.0, 120.0)
    p_brightness: float = 0.4
    brightness_factor: tuple[float, float] = (0.25, 2.0)
    p_psf: float = 0.4
    psf_factor: tuple[float, float] = (1.0, 2.0)
    p_density: float = 0.4
    density_factor: tuple[float, float] = (1.0, 10.0)

    def __post_init__(self) -> None:
        def bad(what: str) -> DleStreamError:
            return DleStreamError(f"sample effects prior: {what}")

        for name in EFFECTS:
            p = getattr(self, f"p_{name}")
            if not 0 <= p <= 1:
                raise bad(f"p_{name} must be in [0, 1], got {p}")
        for name, floor in (("heartbeat_px", 0.0), ("breathing_px", 0.0), ("heartbeat_hz", 1e-9),
                            ("breathing_hz", 1e-9), ("blink_alpha", 1.0 + 1e-9), ("bleach_time_s", 1e-9),
                            ("brightness_factor", 1e-9), ("psf_factor", 1e-9), ("density_factor", 1e-9)):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi) and floor <= lo <= hi):
                raise bad(f"{name} needs finite {floor:g} ≤ low ≤ high, got {(lo, hi)}")
        if not 0 <= self.drift_cap_um_s < math.inf:
            raise bad(f"drift_cap_um_s must be finite and ≥ 0, got {self.drift_cap_um_s}")

    def draw(self, generator: torch.Generator, device: str | torch.device = "cpu") -> EffectSettings:
        """The effects of one movie, from :data:`DRAWS_PER_MOVIE` uniforms of ``generator`` (on ``device``)."""
        u = torch.rand(DRAWS_PER_MOVIE, generator=generator, device=torch.device(device), dtype=torch.float64).tolist()
        coins, v = u[: len(EFFECTS)], u[len(EFFECTS):]

        def uniform(r: tuple[float, float], x: float) -> float:
            return r[0] + (r[1] - r[0]) * x

        def log_uniform(r: tuple[float, float], x: float) -> float:
            return math.exp(uniform((math.log(r[0]), math.log(r[1])), x))

        present = frozenset(name for name, x in zip(EFFECTS, coins) if x < getattr(self, f"p_{name}"))
        return EffectSettings(
            present=present,
            heartbeat_px=uniform(self.heartbeat_px, v[0]), heartbeat_hz=uniform(self.heartbeat_hz, v[1]),
            breathing_px=uniform(self.breathing_px, v[2]), breathing_hz=uniform(self.breathing_hz, v[3]),
            drift_cap_um_s=self.drift_cap_um_s,
            blink_alpha_on=uniform(self.blink_alpha, v[4]), blink_alpha_off=uniform(self.blink_alpha, v[5]),
            bleach_time_s=log_uniform(self.bleach_time_s, v[6]),
            brightness_factor=log_uniform(self.brightness_factor, v[7]),
            psf_factor=uniform(self.psf_factor, v[8]),
            density_factor=log_uniform(self.density_factor, v[9]),
        )

    def to_dict(self) -> dict:
        """Probabilities and ranges, for the model card (with the distribution of each range)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["distributions"] = {"log-uniform": ["bleach_time_s", "brightness_factor", "density_factor"],
                                "uniform": ["heartbeat_px", "heartbeat_hz", "breathing_px", "breathing_hz",
                                            "blink_alpha (on and off each)", "psf_factor",
                                            "drift speed (0 to drift_cap_um_s, by the simulator)"]}
        out["units"] = {"heartbeat_px": "px", "breathing_px": "px", "heartbeat_hz": "Hz", "breathing_hz": "Hz",
                        "drift_cap_um_s": "µm/s", "bleach_time_s": "s"}
        return out


#: The effects prior of training (its ranges are recorded in the model card).
EFFECTS_PRIOR = EffectsPrior()
