"""Is any particle in view? A spot test on the raw tile-frames of a window.

Why: a window in which no particle is seen carries no information about D — in a sample
at a steady density the chance that a tile holds no visible particle does not depend on
D — yet a network's output for it is never exactly flat. Measured on the shipped models
(pure-background windows): brain-qd-low's log-likelihood tilts by 1.2–2.1 nats over its
range, beads-high's by 2.2–7.2 nats, the same way every time, so 32 such windows added
(background 100 photons) gave D = 0.020 ± 0.002 µm²/s (brain-qd-low) and "above the range"
(beads-high) for a region without a single particle. A window without a seen spot is
therefore given a flat likelihood when its own posterior says little too
(:func:`flatten_unseen`): it adds nothing, and a region made only of such windows says
"little information" instead of a number. Not fixed: on a very dark background (5 photons)
both models read an empty window as *above* the range, and such windows are kept (a window
above the range may hold particles too fast to be seen as spots: at 2–3·d_max only 56–62 %
of beads-high's steady-density windows hold spots), so 32 of them still say "D > x".

The test, per frame: the frame smoothed by a Gaussian of the PSF's width (the matched
filter of a spot); a spot is seen where the smoothed frame exceeds its median by
:data:`SPOT_Z` times the noise of the smoothed background. That noise is the median over
the window's frames of each frame's robust spread (1.4826 × median absolute deviation)
of its smoothed values: particles are sparse, so the median over frames is the
background's. A window counts as seeing particles when at least :data:`MIN_SPOT_FRAMES`
of its frames hold a spot. Per frame only two numbers are kept (:func:`frame_spot_features`:
the smoothed maximum and spread), so a stream can compute them as frames arrive.

Errors go one way only: a window with particles that this test misses is flattened and
merely loses its information (a steady density's emptiness says nothing about D, so
dropping empty-looking windows does not pull the combination); an empty window that looks
occupied (a hot pixel, an uneven background) is kept, as before.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

#: Spot threshold, in noise σ of the smoothed background. Measured on pure Poisson noise
#: (backgrounds 2–100 photons, 64 windows of 400 frames of 20×20 px, σ 1.4 px): a frame's
#: largest smoothed value exceeds 5.2–5.9σ in 1 % of frames and 7.1–8.5σ in 0.01 %, and the
#: third largest of a window's frames reached 6.4–7.9σ; at 8σ with 3 frames needed, 0 of 128
#: noise windows counted as seeing particles at backgrounds 5 and 100 (2 of 128 at 1).
SPOT_Z = 8.0
#: Frames with a spot a window needs to count as seeing particles.
MIN_SPOT_FRAMES = 3
#: The robust spread (MAD × 1.4826) of a normal variable is its σ.
MAD_TO_SIGMA = 1.4826


def frame_spot_features(frames: np.ndarray, psf_sigma_px: float) -> np.ndarray:
    """Tile-frames [..., H, W] (raw intensities) → [..., 2]: the frame smoothed by a Gaussian of
    ``psf_sigma_px`` pixels, its maximum above its median, and the robust spread of its values."""
    x = np.asarray(frames, dtype=np.float32)
    lead = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])  # (a frame's level drops out: max and spread are read from the smoothed median)
    s = gaussian_filter(x, sigma=(0.0, float(psf_sigma_px), float(psf_sigma_px)), mode="reflect")
    flat = s.reshape(len(s), -1)
    centre = np.median(flat, axis=1, keepdims=True)
    spread = MAD_TO_SIGMA * np.median(np.abs(flat - centre), axis=1)
    peak = flat.max(axis=1) - centre[:, 0]
    return np.stack([peak, spread], axis=-1).reshape(*lead, 2)


def particles_seen(features: np.ndarray, z: float = SPOT_Z, min_frames: int = MIN_SPOT_FRAMES) -> np.ndarray:
    """Per window [..., frames, 2] of :func:`frame_spot_features` → bool [...]: at least
    ``min_frames`` frames hold a spot above ``z`` times the window's background noise."""
    f = np.asarray(features, dtype=np.float64)
    noise = np.median(f[..., 1], axis=-1, keepdims=True)
    spots = f[..., 0] > z * np.maximum(noise, 1e-12)
    return np.sum(spots, axis=-1) >= min_frames


def flatten_unseen(log_likelihood: np.ndarray, seen: np.ndarray, little_information: np.ndarray) -> np.ndarray:
    """Window log-likelihoods [..., n] with the windows where no particle was seen *and*
    whose own posterior says little (``little_information``, from
    :attr:`~dle_stream.likelihood.Posterior.little_information`) set flat: zero everywhere,
    no information about D nor about whether D is above the range.

    Both, because the spot test misses dim particles that the network still reads (measured
    on brain-qd-low, steady density: 8–16 % of windows with particles had no spot above
    :data:`SPOT_Z`, many of them read to ±0.02·d_max), and because a window said to be
    *above* the range may be one whose particles streak too fast to be seen as spots."""
    ll = np.array(log_likelihood, dtype=np.float64, copy=True)
    flat = (~np.asarray(seen, dtype=bool) & np.asarray(little_information, dtype=bool)
            & np.all(np.isfinite(ll), axis=-1))  # a window with no estimate stays so
    ll[flat] = 0.0
    return ll
