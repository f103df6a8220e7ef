"""When each pixel of a raster-scanned movie is recorded: :class:`ScanTiming`.

A laser-scanning microscope records pixel (r, c) of frame k of the *full* frame at

    t(k, r, c) = k·F + r·L + c·δ                       (unidirectional)
    t(k, r, c) = k·F + r·L + (W_full − 1 − c)·δ        (bidirectional, odd r)

with δ the pixel dwell time, L the line period (all pixels of a full line plus the
retrace), F the frame period (all lines plus the flyback). A tile cut at offset
(r0, c0) from the full frame inherits L and F of the full frame; only its offsets change.

All times are in microseconds (µs), the pixel size in micrometres (µm).

A model trained on one timing is valid for another only when every time is scaled by
the same factor b (and the pixel size and scan direction are the same): the movie of a
particle with coefficient D at the slow timing looks exactly like the movie of a
particle with coefficient b·D at the fast one, so D scales by 1/b.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from dle_stream.errors import DleStreamError, TimingError, arg

#: Relative tolerance when comparing two timings' ratios and pixel sizes.
RATIO_TOLERANCE = 0.01


@dataclass(frozen=True)
class ScanTiming:
    """Scan timing and geometry of a raster-scanned recording.

    Attributes:
        pixel_size_um: edge of one (square) pixel in the sample, µm.
        dwell_us: pixel dwell time δ, µs.
        line_period_us: line period L (full line + retrace), µs.
        frame_period_us: frame period F (all lines + flyback), µs.
        width_px: pixels per line of the full frame.
        height_px: lines per full frame.
        bidirectional: odd lines are scanned right to left.
    """

    pixel_size_um: float
    dwell_us: float
    line_period_us: float
    frame_period_us: float
    width_px: int
    height_px: int
    bidirectional: bool = False

    def __post_init__(self) -> None:
        for name in ("pixel_size_um", "dwell_us", "line_period_us", "frame_period_us"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TimingError(f"scan timing: {arg(name)} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise TimingError(
                    f"scan timing: {arg(name)} must be a positive finite number, got {value!r}; "
                    f"check the value, timing file or metadata that set it"
                )
            object.__setattr__(self, name, float(value))
        for name in ("width_px", "height_px"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise TimingError(f"scan timing: {arg(name)} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "bidirectional", bool(self.bidirectional))
        tol = 1 + 1e-9
        if self.line_period_us * tol < self.width_px * self.dwell_us:
            raise TimingError(
                f"scan timing: line period {self.line_period_us:g} µs is shorter than "
                f"{self.width_px} px × {self.dwell_us:g} µs dwell = {self.width_px * self.dwell_us:g} µs; "
                f"fix {arg('line_period_us')}, {arg('dwell_us')} or the frame width"
            )
        if self.frame_period_us * tol < self.height_px * self.line_period_us:
            raise TimingError(
                f"scan timing: frame period {self.frame_period_us:g} µs is shorter than "
                f"{self.height_px} lines × {self.line_period_us:g} µs = "
                f"{self.height_px * self.line_period_us:g} µs; fix {arg('frame_period_us')}, "
                f"{arg('line_period_us')} or the frame height"
            )

    # ------------------------------------------------------------------ derived
    @property
    def frame_rate_hz(self) -> float:
        """Frames per second."""
        return 1e6 / self.frame_period_us

    @property
    def line_retrace_us(self) -> float:
        """Time between the last pixel of a line and the first of the next, µs."""
        return self.line_period_us - self.width_px * self.dwell_us

    @property
    def frame_flyback_us(self) -> float:
        """Time after the last line of a frame before the next frame starts, µs."""
        return self.frame_period_us - self.height_px * self.line_period_us

    # ------------------------------------------------------------- pixel times
    def column_offsets_us(self, row: int, c0: int, width: int) -> np.ndarray:
        """Time of each tile column relative to the start of full-frame line ``row``, µs."""
        cols = c0 + np.arange(width, dtype=np.float64)
        if self.bidirectional and row % 2 == 1:
            return (self.width_px - 1 - cols) * self.dwell_us
        return cols * self.dwell_us

    def pixel_times_us(
        self, r0: int = 0, c0: int = 0, height: int | None = None, width: int | None = None,
        n_frames: int = 1, first_frame: int = 0,
    ) -> np.ndarray:
        """Acquisition time (µs) of every pixel of a tile, shape [n_frames, height, width].

        The tile starts at row ``r0``, column ``c0`` of the full frame; frame indices
        run from ``first_frame``. Times count from the first pixel of frame 0.
        """
        height = self.height_px - r0 if height is None else height
        width = self.width_px - c0 if width is None else width
        self.check_tile(r0, c0, height, width)
        k = np.arange(first_frame, first_frame + n_frames, dtype=np.float64)
        rows = r0 + np.arange(height)
        line = np.stack([self.column_offsets_us(int(r), c0, width) for r in rows])  # [h, w]
        line = line + rows[:, None] * self.line_period_us
        return k[:, None, None] * self.frame_period_us + line[None]

    def check_tile(self, r0: int, c0: int, height: int, width: int) -> None:
        """Raise a clear error when a tile does not lie inside the full frame."""
        if r0 < 0 or c0 < 0 or height < 1 or width < 1 or r0 + height > self.height_px or c0 + width > self.width_px:
            raise DleStreamError(
                f"tile at row {r0}, column {c0} of size {height}×{width} px does not fit the "
                f"{self.height_px}×{self.width_px} px frame; choose tiles inside the frame"
            )

    # -------------------------------------------------------------- comparison
    def compare(self, other: "ScanTiming") -> "TimingComparison":
        """Compare this (model) timing with ``other`` (a stream's timing).

        Compatible when every time of ``other`` is this one's times × b (same ratios),
        the pixel size is the same, and the scan direction matches; then
        ``d_scale = 1/b`` converts the model's D to the stream's D.
        """
        differences: list[str] = []
        b = other.dwell_us / self.dwell_us
        for name, label in (("line_period_us", "line period"), ("frame_period_us", "frame period")):
            expected = getattr(self, name) * b
            actual = getattr(other, name)
            if abs(actual / expected - 1) > RATIO_TOLERANCE:
                differences.append(
                    f"{label} {actual:g} µs vs {expected:g} µs expected for dwell {other.dwell_us:g} µs "
                    f"(model: dwell {self.dwell_us:g} µs, {label} {getattr(self, name):g} µs)"
                )
        if abs(other.pixel_size_um / self.pixel_size_um - 1) > RATIO_TOLERANCE:
            differences.append(
                f"pixel size {other.pixel_size_um:g} µm vs the model's {self.pixel_size_um:g} µm "
                f"(the PSF in pixels differs)"
            )
        if other.bidirectional != self.bidirectional:
            differences.append(
                f"scan is {'bi' if other.bidirectional else 'uni'}directional, the model's "
                f"{'bi' if self.bidirectional else 'uni'}directional"
            )
        return TimingComparison(compatible=not differences, time_scale=b, differences=differences)

    def scaled(self, b: float) -> "ScanTiming":
        """The same scan with every time multiplied by ``b``."""
        return ScanTiming(
            self.pixel_size_um, self.dwell_us * b, self.line_period_us * b, self.frame_period_us * b,
            self.width_px, self.height_px, self.bidirectional,
        )

    def with_frame_size(self, height_px: int, width_px: int, keep_retrace: bool = True) -> "ScanTiming":
        """The same dwell for a frame of another size: line retrace and frame flyback kept."""
        line = width_px * self.dwell_us + (self.line_retrace_us if keep_retrace else 0.0)
        frame = height_px * line + (self.frame_flyback_us if keep_retrace else 0.0)
        return ScanTiming(self.pixel_size_um, self.dwell_us, line, frame, width_px, height_px, self.bidirectional)

    def for_frame(self, height_px: int, width_px: int) -> "ScanTiming":
        """This scan for a frame of ``height_px`` × ``width_px``: the same line and frame
        period when the frame fits in them (a model trained for this timing then applies);
        otherwise :meth:`with_frame_size` (the same dwell, line retrace and frame flyback,
        periods grown with the frame, which makes another scan)."""
        if width_px * self.dwell_us <= self.line_period_us and height_px * self.line_period_us <= self.frame_period_us:
            return ScanTiming(self.pixel_size_um, self.dwell_us, self.line_period_us, self.frame_period_us,
                              width_px, height_px, self.bidirectional)
        return self.with_frame_size(height_px, width_px)

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "timing") -> "ScanTiming":
        if not isinstance(data, dict):
            raise TimingError(f"{source}: scan timing must be a JSON object with fields {cls.field_names()}")
        names = cls.field_names()
        missing = [n for n in names if n not in data and n != "bidirectional"]
        if missing:
            raise TimingError(
                f"{source}: scan timing lacks {', '.join(missing)}; add them (fields: {', '.join(names)})"
            )
        unknown = [k for k in data if k not in names]
        if unknown:
            raise TimingError(f"{source}: unknown scan timing field(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
        values = {k: data[k] for k in names if k in data}
        _check_field_values(values, source)
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "timing") -> "ScanTiming":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DleStreamError(f"{source}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); fix the file") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ScanTiming":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise DleStreamError(f"{path}: cannot read the timing file ({exc.strerror}); check the path") from None
        return cls.from_json(text, source=str(path))

    @staticmethod
    def field_names() -> list[str]:
        return [f.name for f in fields(ScanTiming)]

    # ---------------------------------------------------------------- presets
    @classmethod
    def reference(cls) -> "ScanTiming":
        """The reference scan of the paper's simulator (docs/design.md §4).

        Pixel 0.15 µm, dwell 8 µs (125,000 px/s), a 20-px line with a 1.348 ms retrace
        (L = 1.508 ms), 20 lines and a 33 ms flyback after the start of the last line
        (F = 19·L + 33 ms = 61.652 ms, 16.2 frames/s).
        """
        return cls(
            pixel_size_um=0.15, dwell_us=8.0, line_period_us=1508.0, frame_period_us=61652.0,
            width_px=20, height_px=20, bidirectional=False,
        )


#: Largest frame width or height (px) a scan timing may give.
MAX_FRAME_PX = 2**31 - 1


def _check_field_values(values: dict, source: str) -> None:
    """Raise a one-line DleStreamError for a field value parsed from JSON or metadata that is
    not of its field's kind (a number that overflows a float, a string, a list, a non-flag
    ``bidirectional``), before :class:`ScanTiming` does arithmetic with it."""

    def number(value) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return None
        try:
            return float(value)
        except OverflowError:
            return math.inf

    for name in ("pixel_size_um", "dwell_us", "line_period_us", "frame_period_us"):
        if name in values:
            x = number(values[name])
            if x is None or not math.isfinite(x) or x <= 0:
                raise TimingError(
                    f"{source}: scan timing {name} must be a positive finite number, got {values[name]!r}; "
                    f"check the timing flag, file or metadata that set it")
    for name in ("width_px", "height_px"):
        if name in values:
            x = number(values[name])
            if x is None or not math.isfinite(x) or x != int(x) or not 1 <= x <= MAX_FRAME_PX:
                raise TimingError(f"{source}: scan timing {name} must be a positive integer (pixels), "
                                     f"got {values[name]!r}")
    if "bidirectional" in values:
        flag = values["bidirectional"]
        if not isinstance(flag, (bool, np.bool_)) and number(flag) not in (0.0, 1.0):
            raise TimingError(f"{source}: scan timing bidirectional must be true or false, got {flag!r}")


@dataclass(frozen=True)
class TimingComparison:
    """Result of :meth:`ScanTiming.compare`.

    ``time_scale`` is b (stream times / model times); ``d_scale`` = 1/b multiplies a
    model's D estimate to give the stream's D (µm²/s).
    """

    compatible: bool
    time_scale: float
    differences: list[str] = field(default_factory=list)

    @property
    def d_scale(self) -> float:
        return 1.0 / self.time_scale

    def explain(self) -> str:
        if self.compatible:
            if abs(self.time_scale - 1) <= RATIO_TOLERANCE:
                return "same scan timing as the model"
            return f"all times are {self.time_scale:.4g}× the model's: D estimates are scaled by {self.d_scale:.4g}"
        return "; ".join(self.differences)
