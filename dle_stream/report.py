"""How a (combined) estimate is put into words: the same text on the dashboard, in the
final summary and in ``dle-stream log show``.

A number is a claim, so it is shown only when the data support one: "D > x" when the
data say D is above the model's range, the range of tile values when an ROI's tiles
disagree, and a note when a window says little. Values in µm²/s.
"""

from __future__ import annotations

import math

from dle_stream.combine import Spread
from dle_stream.likelihood import Posterior

#: Marks used in the tile map (one character each).
MARK_ABOVE = "↑"
MARK_LITTLE = "?"
MARK_DISAGREE = "≠"


def _digits(value: float, scale: float) -> int:
    """Decimals that resolve ``scale`` (2–4)."""
    if not (math.isfinite(scale) and scale > 0):
        return 3
    return int(min(4, max(2, 1 - math.floor(math.log10(scale)))))


def number(value: float, scale: float) -> str:
    """``value`` with as many decimals as ``scale`` (its uncertainty) deserves."""
    return "—" if not math.isfinite(value) else f"{value:.{_digits(value, scale)}f}"


def spread_text(spread: Spread, scale: float) -> str:
    """ "tiles disagree: 0.29–1.21 µm²/s (heterogeneous; not one D)", or "windows disagree: D
    changed over time, 0.30 µm²/s, and above 1.62 µm²/s (not one D)"; ``scale`` sets the decimals."""
    lo, hi, x = spread.lo_um2_s, spread.hi_um2_s, spread.above_um2_s
    above = f"above {number(x, scale)} µm²/s" if math.isfinite(x) else ""
    if math.isfinite(lo):
        values = (number(lo, scale) if hi <= lo else f"{number(lo, scale)}–{number(hi, scale)}") + " µm²/s"
        values += f", and {above}" if above else ""
    else:
        values = f"all {above}" if above else "no values"
    if spread.what == "tiles":
        return f"tiles disagree: {values} (heterogeneous; not one D)"
    return f"windows disagree: D changed over time, {values} (not one D)"


def estimate_text(post: Posterior, i: int | tuple[()], *, spread: Spread | None = None,
                  truth: float | None = None) -> str:
    """One line for entry ``i`` of ``post``: "D = 0.302 µm²/s (68 %: 0.289–0.316; 95 %: …)",
    "D > 41.2 µm²/s: above the model's range (0–50)", or, when the parts combined disagree
    (``spread``, from :mod:`dle_stream.combine`), their values (:func:`spread_text`) and no
    combined number. ``i`` is ``()`` for a posterior of a single estimate (0-d arrays)."""
    d, s = float(post.d[i]), float(post.sigma[i])
    lo68, hi68, lo95, hi95 = (float(a[i]) for a in (post.lo68, post.hi68, post.lo95, post.hi95))
    tail = "" if truth is None or not math.isfinite(truth) else f"   (true {truth:.3g})"
    if not math.isfinite(d):
        return "no estimate yet" + tail
    if spread is not None:  # decimals of the range's scale: the combined σ means nothing here
        return spread_text(spread, 0.01 * post.d_max) + tail
    if bool(post.above_range[i]):
        x = float(post.lower95_wide[i])
        return (f"D > {number(x, s)} µm²/s: above the model's range (0–{post.d_max:g}), "
                f"P = {float(post.p_above[i]):.2f}" + tail)
    text = (f"D = {number(d, s)} µm²/s (68 %: {number(lo68, s)}–{number(hi68, s)}; "
            f"95 %: {number(lo95, s)}–{number(hi95, s)})")
    if bool(post.little_information[i]):
        text += " [little information]"
    return text + tail


def window_text(post: Posterior, i: int | tuple[()] = ()) -> str:
    """A compact "D ± σ" of one estimate (σ to two significant digits, D to the same decimal
    place), "> x (above range)" when above the range, "(little information)" added when it
    says little, "–" when there is none."""
    d, s = float(post.d[i]), float(post.sigma[i])
    if not math.isfinite(d):
        return "–"
    if bool(post.above_range[i]):
        return f"> {number(float(post.lower95_wide[i]), s)} (above range)"
    if not (math.isfinite(s) and s > 0):
        text = f"{d:.3g}"
    else:
        decimals = max(0, 1 - math.floor(math.log10(s)))
        text = f"{d:.{decimals}f} ± {s:.{decimals}f}"
    return text + (" (little information)" if bool(post.little_information[i]) else "")


def cell_text(post: Posterior, i: int, width: int, disagree: bool = False) -> str:
    """A tile-map cell of ``width`` characters: the value and a one-character mark."""
    d = float(post.d[i])
    if not math.isfinite(d):
        return "·".center(width)
    above = bool(post.above_range[i])
    body = f">{post.d_max:.3g}" if above else f"{d:.{max(0, min(3, width - 3 - len(str(int(d)))))}f}"
    # a disagreement is the first thing to say (also when the windows added read above the range)
    mark = (MARK_DISAGREE if disagree else MARK_ABOVE if above else
            MARK_LITTLE if bool(post.little_information[i]) else " ")
    return (body[: width - 1] + mark).rjust(width)


LEGEND = f"{MARK_ABOVE} above the model's range   {MARK_LITTLE} little information   {MARK_DISAGREE} windows disagree"
