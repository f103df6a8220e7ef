"""What a real sample adds to the ideal movie: blinking, bleaching and whole-field motion.

Each effect is an option of :class:`~dle_stream.training.priors.SimulatorPriors` (off by
default, and then draws nothing from the random stream, so movies of a seed stay the same)
with a physical parameterisation (docs/design.md §4):

- **blinking** (quantum dots): two-state on/off switching with power-law dwell times,
  P(τ) ∝ τ^−α on [τ_min, τ_max], drawn by inverting the truncated Pareto distribution;
- **bleaching**: each particle goes dark for good at an exponential random time;
- **whole-field motion** (heartbeat, breathing, drift of the brain or the stage): a
  displacement of the whole sample in x and y, a function of time evaluated at every
  pixel's scan time by the renderer, so that it also shears a frame.

Times are µs on the simulator's clock (0 = first pixel of frame 0 of the full frame);
lengths µm.
"""

from __future__ import annotations

import math

import torch

from dle_stream.training.priors import SimulatorPriors

#: Dwell times drawn per round while some particle's switch sequence is still too short.
BLINK_ROUND = 256


def truncated_power_law(shape: tuple[int, ...], alpha: float, lo: float, hi: float, g: torch.Generator,
                        device: torch.device) -> torch.Tensor:
    """Samples of P(τ) ∝ τ^−alpha on [lo, hi] (alpha > 1), float64."""
    u = torch.rand(shape, generator=g, device=device, dtype=torch.float64)
    a = 1.0 - alpha
    return (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)


def blink_switch_times(starts_us: torch.Tensor, ends_us: torch.Tensor, priors: SimulatorPriors,
                       g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """On/off switching of particles that must be known over [starts_us, ends_us] ([P] µm).

    Returns (switch times [P, N] µs, increasing; state at the first switch's start [P] bool,
    True = emitting). Each sequence starts a uniform random time up to ``blink_max_ms``
    before ``starts_us`` and runs past ``ends_us``; padding switches lie beyond the end.
    """
    dev = starts_us.device
    n = starts_us.numel()
    lo, hi = priors.blink_min_ms * 1e3, priors.blink_max_ms * 1e3
    begin = starts_us - torch.rand(n, generator=g, device=dev, dtype=torch.float64) * hi
    first_on = torch.rand(n, generator=g, device=dev) < 0.5
    parts: list[torch.Tensor] = []
    reached = begin.clone()
    while bool((reached <= ends_us).any()) and n:
        on = truncated_power_law((n, BLINK_ROUND // 2), priors.blink_alpha_on, lo, hi, g, dev)
        off = truncated_power_law((n, BLINK_ROUND // 2), priors.blink_alpha_off, lo, hi, g, dev)
        # dwells alternate; which comes first depends on the starting state
        first = torch.where(first_on[:, None], on, off)
        second = torch.where(first_on[:, None], off, on)
        parts.append(torch.stack([first, second], dim=2).reshape(n, BLINK_ROUND))
        reached = begin + torch.cat(parts, dim=1).sum(dim=1)
    if not parts:
        return begin[:, None], first_on
    switches = begin[:, None] + torch.cumsum(torch.cat(parts, dim=1), dim=1)
    return torch.cat([begin[:, None], switches], dim=1), first_on


def emitting(switch_us: torch.Tensor, first_on: torch.Tensor, times_us: torch.Tensor) -> torch.Tensor:
    """Is each particle on at ``times_us`` [P, K] (µs)? From :func:`blink_switch_times`. [P, K] bool."""
    k = torch.searchsorted(switch_us.contiguous(), times_us.contiguous(), right=True)  # switches passed, incl. begin
    return first_on[:, None] ^ ((k - 1) % 2 == 1)


def draw_field_motion(n_movies: int, priors: SimulatorPriors, pixel_size_um: float, g: torch.Generator,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """Per-movie whole-field motion parameters ([n] float64 tensors, µm, µm/s, Hz, radians)."""
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n_movies, generator=g, device=device, dtype=torch.float64)

    out: dict[str, torch.Tensor] = {}
    speed, angle = uniform(0.0, priors.drift_um_s), uniform(0.0, 2 * math.pi)
    out["drift_vx_um_s"], out["drift_vy_um_s"] = speed * torch.cos(angle), speed * torch.sin(angle)
    for name in ("heartbeat", "breathing"):
        amp = uniform(*getattr(priors, f"{name}_px")) * pixel_size_um
        angle = uniform(0.0, 2 * math.pi)
        out[f"{name}_ax_um"], out[f"{name}_ay_um"] = amp * torch.cos(angle), amp * torch.sin(angle)
        out[f"{name}_hz"] = uniform(*getattr(priors, f"{name}_hz"))
        out[f"{name}_phase"] = uniform(0.0, 2 * math.pi)
    return out


def field_displacement_um(params: dict[str, torch.Tensor], movie: torch.Tensor, times_us: torch.Tensor) -> torch.Tensor:
    """Whole-field (x, y) displacement, µm, of movies ``movie`` [...] at ``times_us`` [...]: [..., 2]."""
    t = times_us.to(torch.float64) * 1e-6
    dx = params["drift_vx_um_s"][movie] * t
    dy = params["drift_vy_um_s"][movie] * t
    for name in ("heartbeat", "breathing"):
        wave = torch.sin(2 * math.pi * params[f"{name}_hz"][movie] * t + params[f"{name}_phase"][movie])
        dx = dx + params[f"{name}_ax_um"][movie] * wave
        dy = dy + params[f"{name}_ay_um"][movie] * wave
    return torch.stack([dx, dy], dim=-1)


def field_reach_um(params: dict[str, torch.Tensor], duration_us: torch.Tensor) -> torch.Tensor:
    """Largest whole-field displacement of each movie over ``duration_us`` [n] µs (µm): how far a
    particle outside the tile can be carried into it."""
    drift = torch.hypot(params["drift_vx_um_s"], params["drift_vy_um_s"]) * duration_us * 1e-6
    waves = sum(torch.hypot(params[f"{n}_ax_um"], params[f"{n}_ay_um"]) for n in ("heartbeat", "breathing"))
    return drift + waves
