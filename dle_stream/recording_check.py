"""The recording check: does a recording look like what the model was trained on?

A model is trained on simulated movies (docs/design.md §4) whose particles, PSF, noise and
motion come from the priors in its card. ``dle-stream check RECORDING`` measures, from the
data alone, the quantities the network depends on and compares each with the range the
model saw in training; a recording outside that range gets a warning that names the
quantity, its measured value and the trained range.

What is measured, per tile of the model's size and per window of the model's length (a
few windows spread over the recording), then the median over tiles and windows:

- **brightness** (noise σ): the in-focus spot's brightness above the local background, in
  units of the background's noise. Frames are normalised as the classic tracker does
  (:mod:`dle_stream.classic`: each frame's median subtracted, divided by the movie's
  robust noise σ_n), spots are located with ``trackpy.locate`` (same diameter from the
  PSF prior, same band pass, same noise-calibrated ``minmass``), and the value is the 90th
  percentile of the spots' masses (the in-focus ones; blurred or out-of-focus spots are
  dimmer). Gain- and offset-free, as the network is (it normalises frames by median and
  MAD). The background level itself cannot be told apart from the detector's gain and
  offset in one recording; it reaches the network only through the noise it adds, i.e.
  through this ratio.
- **PSF width** σxy (µm): from the autocorrelation of each frame *along the scan line*
  at lags 1 and 3 px. A pixel's noise is independent of its neighbours', so these lags
  hold the particles' light only; the line is scanned in tens of µs, so the particles
  do not move while the PSF is drawn (across lines they do: that is the motion blur the
  network reads). A Gaussian PSF of std s px gives C(k) ∝ exp(−k²/4s²), so
  s² = 2 / ln(C(1)/C(3)); σxy = s · pixel size. Not measured where the lag-3
  correlation is not clearly above its noise (a tile without particles) or where the
  noise of the two lags leaves s uncertain by more than :data:`PSF_MAX_REL_ERROR`.
- **density** (spots per frame per 100 µm²): located spots per frame per area.
- **whole-field motion** (× noise): every pair of consecutive frames is cross-correlated
  (FFT); the centroid of the correlation's positive part within ±5 px is the frame-to-
  frame shift. Diffusing particles step independently from frame to frame, so the
  shifts' spectrum is flat; periodic whole-field motion (heartbeat, breathing) puts a
  peak in it. The value is the largest power of the shifts' periodogram (x and y added)
  over its median power; its frequency is reported beside it. On a recording of several
  tiles the motion is the whole field's: the tiles' correlation maps are added before the
  shifts are taken (every tile's particles register the same displacement), which finds
  motion that a single tile's few particles do not show (on 16 simulated tiles with 2-px
  motion, scores 10–400 against 4–8 per tile's median). The statistic's null distribution
  does not depend on how many tiles are added (one shift series either way), so the
  single-tile reference bounds it too.
- **blinking** (light kept from line to line): the particles' light correlation *across*
  the scan lines over that *along* the lines, each summed over lags 1–:data:`BLINK_LAGS` px
  (products of distinct pixels: the noise, independent from pixel to pixel, adds nothing).
  Along a line neighbouring pixels are 8 µs apart; across, a line period (1.5 ms) per lag.
  An emitting dot is drawn over a few lines; with an isotropic PSF the two sums are equal. A
  dot that moves while its lines are drawn changes the shape of the across-line correlation
  but hardly its sum over lags (diffusion spreads a dot's light, it does not remove it, as
  long as the dot moves less than the lags summed: at the low range's D ≤ 1.5 µm²/s about
  0.4 px per line, ratio ≈ 0.98–1); a dot that switches off or on between its lines (quantum-
  dot blinking has dwell times from a millisecond) removes the product: the ratio is about
  the chance that an emitting dot still emits a few ms later (power-law blinking with 27 %
  on-time: ≈ 0.9). Noise and shot noise do not lower it. The sums are pooled over a
  recording's tiles and windows (added, as the motion's correlation maps), because one tile's
  few dots leave the ratio uncertain by ± 0.1; the trained range of a pooled value is the
  0.5 percentile of the same pooling over as many reference tiles, drawn at random from
  reference tiles as bright as the recording's (along-line light per tile within a factor 2)
  and, among those, from the :data:`POOL_NEIGHBOURS` nearest in D to a random one
  (:meth:`Reference.pooled_blinking`): a recording is one sample, whose tiles share brightness
  and D; a dim recording's pooled ratio is noisier than a group's in which a few bright tiles
  dominate the sums, and dots at the top of the low range move enough while their lines are
  drawn to lower the ratio by ≈ 0.03, which groups of tiles of all D would average away. Measured only where the along-line sum is clearly above the
  noise (:data:`BLINK_MIN_Z`; not in dim or empty tiles). Where it cannot tell: at high D
  (beads-high's range reaches 50 µm²/s, ≈ 2.6 px per line) the dots' own motion lowers the
  ratio as much as blinking: the ratio is not measured for a model whose fastest dots move
  more than :data:`BLINK_MAX_LINE_STEP_PX` rms per line (√(2·D_max·line period); low 0.45 px,
  high 2.6 px; otherwise fast steady-density beads would be called blinking); slower blinking (dwells of many
  frames) switches few spots within their lines; detector noise correlated along the line
  (an amplifier's bandwidth) or an anisotropic PSF would shift the ratio.

What is not measured well: **dim dots**. The brightness above is the located spots' mass; a
dot a quarter as bright as the prior's mean (150 photons of its 600 ± 200) lies inside the
prior's 0.5–99.5 % range, at about its 1st percentile (|N(600, 200)|): no measurement of
brightness, however precise, puts such a recording outside the trained range as this check
defines it. Per tile (brightness drawn per tile, |N(150, 50)|), the true brightness over the
noise lies below the prior's 0.5 percentile in about 11 % of the dim suite's tiles, which the
brightness above already reaches (benchmarks/results/check-dim-blinking.md).

The trained ranges come from the model itself: :func:`reference` simulates tiles from the
card's simulator priors and scan timing (seeded; the steady-density share included, D in
the operating range), measures each quantity the same way and keeps the
:data:`LOW_PERCENTILE`–:data:`HIGH_PERCENTILE` percentiles (motion: only the upper one).
The measurements are cached per model (``$XDG_CACHE_HOME/dle-stream/recording-check``), and
a model package may ship them (:data:`REFERENCE_FILE` in its folder, written by
:func:`write_reference` / ``dle-stream check --write-reference MODEL``). Both are keyed on
what the simulated tiles depend on — the card's simulator priors (``simulator.priors``;
the D range where a card has none), scan timing (``scan_timing``), tile size and window
length, and the check's version, tile count and seed — never on the weights or the
calibration, so a package retrained or recalibrated with the same priors and scan keeps a
valid file. A shipped file whose key differs from the card's is stale and ignored.

``replay`` runs the check on a few tiles and windows (:func:`replay_check`), ``run`` on its
first full window (in a thread); neither simulates: without a shipped or cached reference
they say the check was skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dle_stream.errors import DleStreamError, ParameterError, arg
from dle_stream.files import write_atomic
from dle_stream.timing import ScanTiming

#: Version of the measurements (a change invalidates cached references).
CHECK_VERSION = 6
#: Percentiles of the reference tiles that bound the trained range.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
#: Reference tiles simulated per model, and their seed.
REFERENCE_TILES = 384
REFERENCE_SEED = 20_251_214
#: Quantile of the located spots' masses taken as the in-focus brightness; fewest spots.
BRIGHT_QUANTILE = 0.9
MIN_SPOTS = 5
#: Largest frame-to-frame shift looked at, px.
SHIFT_RADIUS_PX = 5
#: The lag-3 autocorrelation must exceed this many standard errors of noise for a PSF width.
PSF_MIN_Z = 8.0
#: Largest relative error of the PSF width (from the noise of the two lags) still reported.
PSF_MAX_REL_ERROR = 0.2
#: Lags (px) summed for the blinking ratio, along and across the scan lines.
BLINK_LAGS = 3
#: Not measured for a model whose fastest dots move more than this rms distance per line, px.
BLINK_MAX_LINE_STEP_PX = 1.0
#: The along-line sum must exceed this many standard errors of noise for a blinking ratio.
BLINK_MIN_Z = 20.0
#: Random groups of reference tiles drawn for the trained range of a pooled blinking ratio, and
#: the reference tiles nearest in D a group is drawn from (a recording is one sample, one D).
POOL_DRAWS = 2000
POOL_NEIGHBOURS = 48
#: Windows per recording the check looks at (evenly spread).
DEFAULT_WINDOWS = 4
#: What ``replay`` looks at: windows, and tiles at most (spread over the frame), ~0.1 s each.
REPLAY_WINDOWS = 2
REPLAY_MAX_TILES = 16
#: Frames read at a time from a recording (only the tiles looked at are kept).
READ_BLOCK_FRAMES = 32
#: The reference ranges a model package ships (in its folder).
REFERENCE_FILE = "recording_check.json"
REFERENCE_KIND = "dle-stream recording-check reference"


@dataclass(frozen=True)
class Quantity:
    name: str
    label: str
    unit: str
    fmt: str
    two_sided: bool = True
    low_only: bool = False


QUANTITIES: tuple[Quantity, ...] = (
    Quantity("brightness", "brightness above background", "noise σ", "{:.3g}"),
    Quantity("psf_width_um", "PSF width σxy", "µm", "{:.3g}"),
    Quantity("density", "spot density", "per frame per 100 µm²", "{:.3g}"),
    Quantity("motion", "whole-field motion", "× noise", "{:.3g}", two_sided=False),
    Quantity("blinking", "blinking (light kept from line to line)", "× along the line", "{:.3g}", low_only=True),
)
NAMES = tuple(q.name for q in QUANTITIES)
#: Per-tile sums behind the pooled blinking ratio (along, across the lines; noise-σ² units).
BLINK_SUMS = ("blink_along", "blink_across")
#: Everything a tile's measurement returns and a reference keeps.
VALUE_KEYS = (*NAMES, "motion_hz", *BLINK_SUMS)


# ------------------------------------------------------------------ measuring
def _normalise(movie: np.ndarray) -> np.ndarray:
    """Each frame's median subtracted, divided by the movie's robust noise σ (as classic.py)."""
    from dle_stream.classic import MAD_TO_STD

    m = np.asarray(movie, dtype=np.float64)
    m = m - np.median(m.reshape(m.shape[0], -1), axis=1)[:, None, None]
    s = MAD_TO_STD * float(np.median(np.abs(m)))
    return m / s if s > 0 else m


def psf_width_px(norm: np.ndarray) -> float:
    """σxy in px from the along-line autocorrelation at lags 1 and 3 of a normalised movie; NaN
    when the particles' light is not clearly above the noise."""
    c1 = float(np.mean(norm[:, :, 1:] * norm[:, :, :-1]))
    prod3 = norm[:, :, 3:] * norm[:, :, :-3]
    c3 = float(np.mean(prod3))
    se = 1.0 / math.sqrt(prod3.size)  # of unit-variance independent noise
    if not (c3 > PSF_MIN_Z * se and c1 > c3):
        return math.nan
    log_ratio = math.log(c1 / c3)
    # relative error of s from the noise in c1 and c3: too uncertain widths are not measured
    if math.hypot(se / c1, se / c3) / (2 * log_ratio) > PSF_MAX_REL_ERROR:
        return math.nan
    return math.sqrt(2.0 / log_ratio)


def line_light_sums(norm: np.ndarray, lags: int = BLINK_LAGS) -> tuple[float, float, float]:
    """(along, across, standard error): the light's correlation along and across the scan lines
    of a normalised movie, each the sum over lags 1..``lags`` px of the mean product of pixel
    pairs (frame means removed), and the standard error of such a sum for unit-variance
    independent noise (per tile; pooled sums add, and so do their variances)."""
    z = norm - norm.mean(axis=(1, 2), keepdims=True)
    T, H, W = z.shape
    k_max = int(min(lags, H - 1, W - 1))
    along = sum(float(np.mean(z[:, :, k:] * z[:, :, :-k])) for k in range(1, k_max + 1))
    across = sum(float(np.mean(z[:, k:, :] * z[:, :-k, :])) for k in range(1, k_max + 1))
    se = math.sqrt(sum(1.0 / (T * H * (W - k)) for k in range(1, k_max + 1)))
    return along, across, se


def blinking_ratio(along: np.ndarray, across: np.ndarray, se: float) -> float:
    """Across- over along-line light, pooled (summed) over tiles; NaN unless the along-line sum
    exceeds :data:`BLINK_MIN_Z` standard errors (``se`` of one tile; n tiles: √n·se)."""
    a, c = np.asarray(along, float), np.asarray(across, float)
    ok = np.isfinite(a) & np.isfinite(c)
    if not ok.any():
        return math.nan
    sa = float(a[ok].sum())
    if not sa > BLINK_MIN_Z * se * math.sqrt(int(ok.sum())):
        return math.nan
    return float(c[ok].sum()) / sa


def shift_correlation(norm: np.ndarray, radius: int = SHIFT_RADIUS_PX) -> np.ndarray:
    """Cross-correlation of each frame with the next within ±radius px (shifts −r..r on each
    axis; radius capped by the frame): [T − 1, 2r + 1, 2r + 1]. Tiles' maps add up to the whole
    field's (:func:`shifts_from_correlation` of their sum)."""
    T, H, W = norm.shape
    z = norm - norm.mean(axis=(1, 2), keepdims=True)
    f = np.fft.rfft2(z, s=(2 * H, 2 * W))
    cc = np.fft.irfft2(f[:-1].conj() * f[1:], s=(2 * H, 2 * W))
    r = int(min(radius, H - 1, W - 1))
    rows = np.r_[2 * H - r:2 * H, 0:r + 1]
    cols = np.r_[2 * W - r:2 * W, 0:r + 1]
    return cc[:, rows][:, :, cols]


def shifts_from_correlation(cc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shift (x, y) px per frame pair: the centroid of the correlation's positive part."""
    r = (cc.shape[-1] - 1) // 2
    win = np.clip(cc, 0.0, None)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    tot = win.sum(axis=(1, 2))
    tot = np.where(tot > 0, tot, 1.0)
    return (win * xx).sum(axis=(1, 2)) / tot, (win * yy).sum(axis=(1, 2)) / tot


def frame_shifts(norm: np.ndarray, radius: int = SHIFT_RADIUS_PX) -> tuple[np.ndarray, np.ndarray]:
    """Shift (x, y) px from each frame to the next: the centroid of the positive part of
    their cross-correlation within ±radius px. [T − 1] each."""
    return shifts_from_correlation(shift_correlation(norm, radius))


def motion_score(sx: np.ndarray, sy: np.ndarray, frame_period_s: float) -> tuple[float, float]:
    """(largest periodogram power of the shifts over its median, its frequency in Hz)."""
    n = sx.size
    if n < 8:
        return math.nan, math.nan
    p = np.abs(np.fft.rfft(sx - sx.mean())) ** 2 + np.abs(np.fft.rfft(sy - sy.mean())) ** 2
    p = p[1:]
    med = float(np.median(p))
    if not med > 0:
        return math.nan, math.nan
    k = int(np.argmax(p))
    return float(p[k] / med), float((k + 1) / (n * frame_period_s))


def movie_statistics(movie: np.ndarray, pixel_size_um: float, frame_period_s: float,
                     psf_guess_um: float, correlation: list | None = None) -> dict[str, float]:
    """The check's quantities for one tile's movie [T, H, W] (detector values).

    ``psf_guess_um`` sets trackpy's feature diameter (the model's PSF prior, as the classic
    tracker takes it). Returns {quantity: value} plus ``motion_hz``; NaN where not measurable.
    ``correlation``: a list to which the tile's frame-to-frame correlation maps
    (:func:`shift_correlation`) are appended, for the whole field's motion.
    """
    from dle_stream.classic import _locate, diameter_px, noise_minmass

    movie = np.asarray(movie)
    if movie.ndim != 3 or min(movie.shape) < 3:
        raise DleStreamError(f"recording check: need a movie [frames, height, width] of at least 3 each, got {movie.shape}")
    T, H, W = movie.shape
    norm = _normalise(movie)
    d = diameter_px(psf_guess_um, pixel_size_um)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, _, mass = _locate(norm, d, noise_minmass(H, W, d))
    area_100um2 = H * W * pixel_size_um**2 / 100.0
    s = psf_width_px(norm)
    cc = shift_correlation(norm)
    if correlation is not None:
        correlation.append(cc)
    score, hz = motion_score(*shifts_from_correlation(cc), frame_period_s)
    along, across, se = line_light_sums(norm)
    return {
        "brightness": float(np.quantile(mass, BRIGHT_QUANTILE)) if mass.size >= MIN_SPOTS else math.nan,
        "psf_width_um": s * pixel_size_um,
        "density": mass.size / T / area_100um2,
        "motion": score,
        "motion_hz": hz,
        "blinking": blinking_ratio(np.array([along]), np.array([across]), se),
        "blink_along": along / se,
        "blink_across": across / se,
    }


# ------------------------------------------------------------------ reference
@dataclass
class Reference:
    """Each quantity measured on tiles simulated from a model's training priors."""

    model: str
    values: dict[str, list[float]]
    n_tiles: int
    frames: int
    seed: int

    def range_of(self, name: str, pooled: int = 1, light: float | None = None) -> tuple[float | None, float | None]:
        """(low, high) bound of the trained range (None: that side unbounded). ``pooled``: for the
        blinking ratio, the range of the ratio pooled over that many tiles, as a recording's is
        (:meth:`pooled_blinking`; ``light``: the recording's median along-line light per tile)."""
        q = next(q for q in QUANTITIES if q.name == name)
        if name == "blinking" and pooled > 1 and all(k in self.values for k in BLINK_SUMS):
            v = self.pooled_blinking(pooled, light)
        else:
            v = np.asarray(self.values[name], dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return None, None
        lo = float(np.percentile(v, LOW_PERCENTILE)) if q.two_sided else None
        return lo, (None if q.low_only else float(np.percentile(v, HIGH_PERCENTILE)))

    def pooled_blinking(self, n: int, light: float | None = None) -> np.ndarray:
        """The blinking ratio pooled over groups of ``n`` reference tiles that are a recording of one
        sample would be: tiles as bright as the recording's (along-line light per tile within a
        factor 2 of ``light``, else the :data:`POOL_NEIGHBOURS` nearest in it: a dim recording's
        pooled ratio is noisier than one of bright tiles) and of one D (the
        :data:`POOL_NEIGHBOURS` of those nearest in D to a random one). :data:`POOL_DRAWS`
        groups, seeded; cached per (n, light band)."""
        band = None if light is None or not light > 0 else int(round(4 * math.log2(light)))
        cache = self.__dict__.setdefault("_pooled", {})  # not a field: never written out
        if (n, band) not in cache:
            cache[(n, band)] = self._draw_pooled_blinking(n, None if band is None else 2 ** (band / 4))
        return cache[(n, band)]

    def _draw_pooled_blinking(self, n: int, light: float | None) -> np.ndarray:
        a = np.asarray(self.values[BLINK_SUMS[0]], dtype=float)
        c = np.asarray(self.values[BLINK_SUMS[1]], dtype=float)
        d = np.asarray(self.values.get("d_um2_s", [math.nan] * a.size), dtype=float)
        ok = np.isfinite(a) & np.isfinite(c)
        a, c, d = a[ok], c[ok], d[ok]
        if a.size == 0:
            return np.array([])
        rng = np.random.default_rng(REFERENCE_SEED + n)
        k = min(POOL_NEIGHBOURS, a.size)
        if light is not None:  # tiles as bright as the recording's
            like = np.flatnonzero((a > light / 2) & (a < light * 2))
            if like.size < k:
                like = np.argsort(np.abs(np.log(np.clip(a, 1e-3, None) / light)), kind="stable")[:k]
            a, c, d = a[like], c[like], d[like]
        order = np.argsort(d, kind="stable") if np.isfinite(d).all() else rng.permutation(a.size)
        k = min(POOL_NEIGHBOURS, a.size)
        out = np.empty(POOL_DRAWS)
        for i in range(POOL_DRAWS):
            # the k tiles nearest in D to a random tile (a window of the D-sorted tiles), n of them
            at = int(rng.integers(a.size))
            first = min(max(at - k // 2, 0), a.size - k)
            g = rng.choice(order[first:first + k], size=n, replace=n > k)
            out[i] = blinking_ratio(a[g], c[g], 1.0)
        return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dle-stream" / "recording-check"


#: What each field of the reference's key is, in words (for a stale shipped reference).
KEY_FIELDS = {"v": "the check's version", "priors": "the card's simulator priors (simulator.priors)",
              "d_range": "the card's D range", "timing": "the card's scan timing (scan_timing)",
              "tile": "the card's tile size", "frames": "the card's window length (window_frames)",
              "n": "the number of reference tiles", "seed": "the reference seed"}


def reference_timing(card, timing: ScanTiming | None = None) -> ScanTiming:
    """The scan a model's reference tiles are simulated with: the card's, or for a family model
    the recording's scan ``timing`` (its quantities, e.g. the light kept from line to line,
    depend on the scan), cut to one tile (a unidirectional scan's tiles all look alike)."""
    if card.family is None or timing is None:
        return card.timing
    return ScanTiming(timing.pixel_size_um, timing.dwell_us, timing.line_period_us, timing.frame_period_us,
                      card.tile_width, card.tile_height, timing.bidirectional)


def reference_key_doc(card, n_tiles: int | None = None, seed: int = REFERENCE_SEED,
                      timing: ScanTiming | None = None) -> dict[str, Any]:
    """What a model's reference depends on: the card's simulator priors and scan timing (a family
    model's: the scan checked, :func:`reference_timing`), tile size,
    window length (plus the D range when the card has no priors), the check's version, tile count
    (default :data:`REFERENCE_TILES`) and seed. Not the weights, calibration, validation or name."""
    n_tiles = REFERENCE_TILES if n_tiles is None else n_tiles
    priors = card.simulator.get("priors") if isinstance(card.simulator, dict) else None
    doc = {"v": CHECK_VERSION, "priors": priors, "timing": reference_timing(card, timing).to_dict(),
           "tile": [card.tile_height, card.tile_width], "frames": card.window_frames, "n": int(n_tiles),
           "seed": int(seed)}
    if not priors:
        doc["d_range"] = [card.d_min_um2_s, card.d_max_um2_s]
    return json.loads(json.dumps(doc))  # plain JSON types, as read back from a file


def _reference_key(card, n_tiles: int, seed: int, timing: ScanTiming | None = None) -> str:
    doc = reference_key_doc(card, n_tiles, seed, timing)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class ReferenceUnavailable(DleStreamError):
    """No reference ranges without simulating them (nothing shipped or cached)."""


def shipped_reference(folder: str | Path, card) -> tuple[Reference | None, str]:
    """The reference ranges shipped in a package folder (:data:`REFERENCE_FILE`) when they match
    the card (:func:`reference_key_doc` with the default tile count and seed); else None and why
    (a short reason; :func:`write_reference` writes the file again)."""
    path = Path(folder) / REFERENCE_FILE
    if card.family is not None:
        return None, f"family model {card.name}: its reference ranges depend on the scan (simulated per scan)"
    if not path.is_file():
        return None, f"model {card.name} ships no reference ranges ({REFERENCE_FILE})"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        keyed_on = doc["keyed_on"]
        values = {k: [math.nan if x is None else float(x) for x in doc["values"][k]] for k in (*VALUE_KEYS, "d_um2_s")}
        ref = Reference(str(doc.get("model", card.name)), values, int(doc["n_tiles"]), int(doc["frames"]),
                        int(doc["seed"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None, f"the reference ranges shipped with model {card.name} are damaged"
    want = reference_key_doc(card)
    differ = [KEY_FIELDS.get(k, k) for k in sorted(set(want) | set(keyed_on)) if want.get(k) != keyed_on.get(k)]
    if differ:
        return None, f"the reference ranges shipped with model {card.name} are stale ({', '.join(differ)} changed)"
    return ref, f"shipped with model {card.name}"


def training_priors(card):
    """The card's simulator priors (D in the operating range), or the preset's by the card's D range."""
    from dle_stream.training.priors import SimulatorPriors, get_preset

    data = card.simulator.get("priors") if isinstance(card.simulator, dict) else None
    if data:
        return SimulatorPriors.from_dict(data).with_(d_beyond=(0.0, 0.0))
    preset = get_preset("high" if card.d_max_um2_s > 5 else "low")
    return preset.priors.with_(d_min_um2_s=card.d_min_um2_s, d_max_um2_s=card.d_max_um2_s)


def reference(model: str | Path, *, n_tiles: int | None = None, seed: int = REFERENCE_SEED, cache: bool = True,
              progress=None, simulate: bool = True, shipped: bool = True,
              timing: ScanTiming | None = None) -> Reference:
    """The quantities on ``n_tiles`` (default :data:`REFERENCE_TILES`) tiles simulated from
    ``model``'s card (priors, timing, tile size, window length): the package's shipped
    :data:`REFERENCE_FILE` when it matches the card, else the disk cache, else simulated (and
    cached). With ``simulate=False`` a missing reference raises :class:`ReferenceUnavailable`
    (its message says why) instead of being simulated. ``timing``: the scan checked (a family
    model's reference is simulated with it, :func:`reference_timing`; others ignore it)."""
    import torch

    from dle_stream.model_package import load_card, resolve_model
    from dle_stream.training.mixture import MixedSimulator

    n_tiles = int(n_tiles or REFERENCE_TILES)
    folder = resolve_model(model)
    card = load_card(folder)
    why = ""
    if shipped and n_tiles == REFERENCE_TILES and seed == REFERENCE_SEED:
        found, why = shipped_reference(folder, card)
        if found is not None:
            return found
    path = _cache_dir() / f"{card.name}-{_reference_key(card, n_tiles, seed, timing)}.json"
    if cache and path.is_file():
        try:
            doc = json.loads(path.read_text())
            ref = Reference(**doc)
            ref.values = {k: [math.nan if x is None else x for x in v] for k, v in ref.values.items()}
            return ref
        except (ValueError, TypeError):
            pass  # a damaged cache file is simply recomputed
    if not simulate:
        raise ReferenceUnavailable(
            f"{why or f'model {card.name}: no reference ranges shipped'} and none cached; `dle-stream check "
            f"RECORDING --model {model}` simulates them once (about a minute) for later runs")
    priors = training_priors(card)
    timing = reference_timing(card, timing)
    sim = MixedSimulator(priors, timing, card.tile_height, card.tile_width, card.window_frames)
    g = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {k: [] for k in (*VALUE_KEYS, "d_um2_s")}
    done = 0
    while done < n_tiles:
        m = min(16, n_tiles - done)
        batch = sim.simulate(m, generator=g)
        values["d_um2_s"].extend(float(x) for x in batch.d_um2_s.cpu().numpy())
        for movie in batch.movies.cpu().numpy():
            st = movie_statistics(movie, timing.pixel_size_um, timing.frame_period_us * 1e-6,
                                  priors.psf_sigma_xy_um[0])
            for k, v in st.items():
                values[k].append(v if math.isfinite(v) else math.nan)
        done += m
        if progress:
            progress(m)
    step_px = math.sqrt(2 * priors.d_max_um2_s * timing.line_period_us * 1e-6) / timing.pixel_size_um
    if step_px > BLINK_MAX_LINE_STEP_PX:  # fast dots lower the ratio as blinking does: not measured
        for k in ("blinking", *BLINK_SUMS):
            values[k] = [math.nan] * len(values[k])
    ref = Reference(card.name, values, n_tiles, card.window_frames, seed)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(asdict(ref)).replace("NaN", "null")
            write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except OSError:
            pass  # no writable cache: the reference is simulated again next time
    ref.values = {k: [math.nan if x is None else x for x in v] for k, v in ref.values.items()}
    return ref


def write_reference(model: str | Path, *, progress=None) -> Path:
    """Write ``model``'s reference ranges into its package folder (:data:`REFERENCE_FILE`),
    keyed on what they depend on (:func:`reference_key_doc`); simulated unless cached."""
    from dle_stream.model_package import load_card, resolve_model

    folder = resolve_model(model)
    card = load_card(folder)
    if card.family is not None:
        raise DleStreamError(f"{card.name} is a family model: its reference ranges depend on the scan; "
                             f"`dle-stream check RECORDING --model {model}` simulates and caches them for its scan")
    ref = reference(folder, progress=progress, shipped=False)

    def num(x: float) -> float | None:
        return None if not math.isfinite(x) else float(f"{x:.6g}")

    doc = {"kind": REFERENCE_KIND, "model": card.name, "keyed_on": reference_key_doc(card),
           "n_tiles": ref.n_tiles, "frames": ref.frames, "seed": ref.seed,
           "percentiles": [LOW_PERCENTILE, HIGH_PERCENTILE],
           "ranges": {q.name: list(ref.range_of(q.name)) for q in QUANTITIES},
           "values": {k: [num(x) for x in v] for k, v in ref.values.items()}}
    path = folder / REFERENCE_FILE
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))  # whole or not at all
    return path


# ------------------------------------------------------------------ checking
@dataclass
class CheckRow:
    """One quantity: the recording's value, the trained range and the verdict."""

    name: str
    label: str
    unit: str
    value: float | None
    low: float | None
    high: float | None
    status: str  # "ok", "low", "high" or "not measured"
    tiles_measured: int
    note: str = ""

    @property
    def outside(self) -> bool:
        return self.status in ("low", "high")

    def text(self) -> str:
        q = next(q for q in QUANTITIES if q.name == self.name)

        def f(x: float | None) -> str:
            return "—" if x is None else q.fmt.format(x)

        trained = (f"≤ {f(self.high)}" if self.low is None else f"≥ {f(self.low)}" if self.high is None
                   else f"{f(self.low)}–{f(self.high)}")
        if self.status == "not measured":
            return f"{self.label}: not measured ({self.note or 'no particles seen'})"
        word = {"low": "below", "high": "above", "ok": "within"}[self.status]
        extra = f" ({self.note})" if self.note else ""
        return f"{self.label} {f(self.value)} {self.unit}{extra} {word} the trained {trained} {self.unit}"


@dataclass
class CheckResult:
    """The recording check of one recording against one model."""

    recording: str
    model: str
    tiles: int
    windows: int
    frames: int
    rows: list[CheckRow]
    warnings: list[str] = field(default_factory=list)

    @property
    def outside(self) -> list[CheckRow]:
        return [r for r in self.rows if r.outside]

    @property
    def ok(self) -> bool:
        return not self.outside

    def summary_line(self) -> str:
        if self.ok:
            measured = [r.label for r in self.rows if r.status == "ok"]
            return ("recording check: within what the model was trained for (" + ", ".join(measured) + ")"
                    if measured else "recording check: nothing measurable (no particles seen)")
        return "recording check: OUTSIDE what the model was trained for: " + "; ".join(r.text() for r in self.outside)

    def replay_line(self, command: str = "") -> str:
        """One line for ``replay``: inside, or each quantity outside with its value and range."""
        if self.ok:
            measured = [r.label for r in self.rows if r.status == "ok"]
            missing = [r.label for r in self.rows if r.status == "not measured"]
            if not measured:
                return "recording check: nothing measurable (no particles seen)"
            return ("recording check: inside the trained range (" + ", ".join(measured)
                    + (f"; not measured: {', '.join(missing)}" if missing else "") + ")")
        see = f"; see `{command}`" if command else ""
        return ("recording check: " + "; ".join(r.text() for r in self.outside)
                + f" — estimates may be off{see}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["percentiles"] = [LOW_PERCENTILE, HIGH_PERCENTILE]
        return d


def compare(values: dict[str, np.ndarray], ref: Reference, *, recording: str = "", tiles: int = 0, windows: int = 0,
            frames: int = 0) -> CheckResult:
    """The check's verdict for per-tile values (each quantity's median over its finite values; the
    blinking ratio pooled over the tiles' line sums, :data:`BLINK_SUMS`, where given)."""
    rows = []
    for q in QUANTITIES:
        v = np.asarray(values.get(q.name, []), dtype=float)
        ok = np.isfinite(v)
        note = ""
        pooled = 0
        if q.name == "blinking" and all(k in values for k in BLINK_SUMS):
            a = np.asarray(values[BLINK_SUMS[0]], dtype=float)
            c = np.asarray(values[BLINK_SUMS[1]], dtype=float)
            pooled = int((np.isfinite(a) & np.isfinite(c)).sum())
            v = np.array([blinking_ratio(a, c, 1.0)])
            ok = np.isfinite(v)
        light = None
        if pooled:
            a_ok = a[np.isfinite(a) & np.isfinite(c)]
            light = float(np.median(a_ok)) if a_ok.size else None
        lo, hi = ref.range_of(q.name, max(pooled, 1), light)
        if not ok.any() or (hi is None and lo is None):
            why = ""
            if q.name == "blinking":
                why = ("dots too dim or too few to tell" if not ok.any() else
                       f"model {ref.model}: its fastest dots move too far while a spot's lines are drawn")
            rows.append(CheckRow(q.name, q.label, q.unit, None, lo, hi, "not measured", 0, why))
            continue
        value = float(np.median(v[ok]))
        if pooled:
            note = f"{pooled} tiles pooled" if pooled > 1 else ""
        if q.name == "motion":
            hz = np.asarray(values.get("motion_hz", []), dtype=float)
            hz = hz[np.isfinite(hz)]
            if hz.size:
                note = f"peak at {float(np.median(hz)):.2g} Hz"
        status = "low" if lo is not None and value < lo else "high" if hi is not None and value > hi else "ok"
        rows.append(CheckRow(q.name, q.label, q.unit, value, lo, hi, status, pooled or int(ok.sum()),
                             note if status != "ok" else ""))
    return CheckResult(recording, ref.model, tiles, windows, frames, rows)


def tiles_looked_at(height: int, width: int, tile_shape: tuple[int, int], max_tiles: int | None = None) -> list:
    """The grid's tiles of a height×width frame, at most ``max_tiles`` of them spread evenly."""
    from dle_stream.tiling import grid_layout

    tiles = grid_layout(height, width, *tile_shape).tiles
    if max_tiles is not None and len(tiles) > max_tiles:
        tiles = [tiles[int(i)] for i in np.unique(np.round(np.linspace(0, len(tiles) - 1, max_tiles)))]
    return list(tiles)


def check_movie(movie, timing: ScanTiming, ref: Reference, psf_guess_um: float,
                tile_shape: tuple[int, int] = (20, 20), windows: int = DEFAULT_WINDOWS,
                window_frames: int | None = None, label: str = "movie", max_tiles: int | None = None) -> CheckResult:
    """Check a movie [T, H, W] (the full frame; ``timing`` its scan): an array, or an open
    recording (only the windows looked at are read). ``max_tiles``: at most this many tiles,
    spread evenly over the frame's grid (default: every tile)."""
    if isinstance(movie, np.ndarray) or not hasattr(movie, "read"):
        movie = np.asarray(movie)
        T, H, W = movie.shape
    else:
        T, H, W = movie.n_frames, movie.height, movie.width
    wf = int(window_frames or ref.frames)
    if windows < 1:
        raise ParameterError(f"{arg('windows', windows)}: must be at least 1")
    if T < wf:
        raise ParameterError(f"{label}: {T} frames, fewer than one {wf}-frame window of the model; the check needs "
                             f"at least {wf} frames")
    tiles = tiles_looked_at(H, W, tile_shape, max_tiles)
    starts = sorted({int(round(x)) for x in np.linspace(0, T - wf, min(windows, T - wf + 1))})
    values: dict[str, list[float]] = {k: [] for k in VALUE_KEYS}
    field_motion: list[tuple[float, float]] = []
    for s in starts:
        if isinstance(movie, np.ndarray):
            crops = [movie[s:s + wf, r:r + h, c:c + w] for r, c, h, w in (t.bbox for t in tiles)]
        else:  # a recording: read in blocks, keeping the tiles looked at only (not whole frames)
            parts: list[list[np.ndarray]] = [[] for _ in tiles]
            for first in range(s, s + wf, READ_BLOCK_FRAMES):
                block = movie.read(first, min(first + READ_BLOCK_FRAMES, s + wf))
                for i, tile in enumerate(tiles):
                    r, c, h, w = tile.bbox
                    parts[i].append(np.array(block[:, r:r + h, c:c + w]))
            crops = [np.concatenate(x) for x in parts]
        maps: list[np.ndarray] = []
        for crop in crops:
            st = movie_statistics(crop, timing.pixel_size_um, timing.frame_period_us * 1e-6, psf_guess_um,
                                  correlation=maps)
            for k, v in st.items():
                values[k].append(v)
        # whole-field motion moves every tile alike: the tiles' correlation maps add up (the
        # particles of every tile register the shift) before the shifts and their periodogram
        if maps and len({m.shape for m in maps}) == 1:
            field_motion.append(motion_score(*shifts_from_correlation(np.sum(maps, axis=0)),
                                             timing.frame_period_us * 1e-6))
    if field_motion and len(tiles) > 1:
        values["motion"] = [m for m, _ in field_motion]
        values["motion_hz"] = [hz for _, hz in field_motion]
    return compare({k: np.asarray(v) for k, v in values.items()}, ref, recording=label, tiles=len(tiles),
                   windows=len(starts), frames=wf)


def check_recording(path: str | Path, *, model: str = "brain-qd-low", windows: int = DEFAULT_WINDOWS,
                    channel: int | None = None, timing_flags: dict[str, Any] | None = None,
                    timing_file: str | Path | None = None, names: dict[str, str] | None = None,
                    progress=None) -> CheckResult:
    """Check a recording on disk against ``model`` (its scan timing as ``replay`` takes it)."""
    from dle_stream.model_package import load_card, resolve_model
    from dle_stream.recording import open_recording, resolve_timing

    if windows < 1:
        raise ParameterError(f"{arg('windows', windows)}: must be at least 1")
    card = load_card(resolve_model(model))
    path = Path(path)
    with open_recording(path, channel=channel) as rec:
        t = card.timing
        fallback = ScanTiming(t.pixel_size_um, t.dwell_us, t.line_period_us, t.frame_period_us,
                              max(rec.width, t.width_px), max(rec.height, t.height_px), t.bidirectional)
        timing, _, notes = resolve_timing(rec, flags=timing_flags, timing_file=timing_file, fallback=fallback,
                                          fallback_label=f"the model card of {model}", names=names)
        from dle_stream.model_choice import serving_model
        from dle_stream.session import DEFAULT_MODEL

        chosen = serving_model(timing, model, substitute=str(model) == DEFAULT_MODEL)  # only the default gives way
        if chosen is not None and chosen[2] is not None:  # replay would use this family model: check against it
            model, card, notes = str(chosen[0]), chosen[1], [chosen[2], *notes]
        if rec.height < card.tile_height or rec.width < card.tile_width:
            raise DleStreamError(f"{path}: frames of {rec.height}×{rec.width} px are smaller than the model's "
                                 f"{card.tile_height}×{card.tile_width}-px tile; use a larger recording")
        if rec.n_frames < card.window_frames:
            raise DleStreamError(f"{path}: {rec.n_frames} frames, fewer than one {card.window_frames}-frame window of "
                                 f"model {card.name}; the check needs at least {card.window_frames} frames")
        _, why = shipped_reference(resolve_model(model), card)
        if "stale" in why or "damaged" in why:
            notes = [*notes, f"{why}: simulated or cached ranges are used; `dle-stream check --write-reference "
                             f"{model}` writes them again"]
        ref = reference(model, progress=progress, timing=timing)
        psf = training_priors(card).psf_sigma_xy_um[0]
        res = check_movie(rec, timing, ref, psf, (card.tile_height, card.tile_width), windows, card.window_frames,
                          label=str(path))
    res.warnings = list(notes)
    return res


def replay_check(rec, model: str | Path, timing: ScanTiming, *, label: str = "", windows: int = REPLAY_WINDOWS,
                 max_tiles: int | None = REPLAY_MAX_TILES) -> dict[str, Any]:
    """The recording check as ``replay`` runs it, on an open recording (or a movie array
    [T, H, W]) whose scan is ``timing``: a few windows and tiles, the reference shipped or
    cached only (never simulated here).

    Never raises for the recording's sake: returns {"status": "inside" | "outside" | "skipped",
    "line": one line for the user, "result": :meth:`CheckResult.to_dict` (None when skipped),
    "reference": where the ranges came from or "reason": why skipped}."""
    from dle_stream.model_package import load_card, resolve_model

    def skipped(reason: str) -> dict[str, Any]:
        return {"status": "skipped", "line": f"recording check: skipped ({reason})", "result": None,
                "reason": reason}

    try:
        folder = resolve_model(model)
        card = load_card(folder)
        n_frames, height, width = rec.shape if isinstance(rec, np.ndarray) else (rec.n_frames, rec.height, rec.width)
        if n_frames < card.window_frames:
            return skipped(f"{n_frames} frames, fewer than one {card.window_frames}-frame window of model "
                           f"{card.name}")
        if height < card.tile_height or width < card.tile_width:
            return skipped(f"frames of {height}×{width} px are smaller than the model's "
                           f"{card.tile_height}×{card.tile_width}-px tile")
        found, where = shipped_reference(folder, card)
        if found is None:
            try:
                found = reference(folder, simulate=False, shipped=False, timing=timing)
            except ReferenceUnavailable:
                if card.family is not None:
                    return skipped(f"{where}, and none cached for this scan; `dle-stream check RECORDING --model "
                                   f"{model}` simulates them once (about a minute)")
                return skipped(f"{where}, and none cached; `dle-stream check --write-reference {model}` writes them "
                               f"(about a minute)")
            where = "cached"
        ref = found
        psf = training_priors(card).psf_sigma_xy_um[0]
        res = check_movie(rec, timing, ref, psf, (card.tile_height, card.tile_width), windows, card.window_frames,
                          label=label or str(getattr(rec, "path", "recording")), max_tiles=max_tiles)
    except ReferenceUnavailable as exc:
        return skipped(str(exc))
    except Exception as exc:  # the check must never stop a replay
        text = " ".join(str(exc).split()) or type(exc).__name__
        return skipped(f"the check failed: {text}")
    import shlex

    command = (f"dle-stream check {shlex.quote(label)}" + (f" --model {shlex.quote(str(model))}"
                                                           if str(model) != "brain-qd-low" else "")) if label else ""
    return {"status": "inside" if res.ok else "outside", "line": res.replay_line(command),
            "result": res.to_dict(), "reference": where}
