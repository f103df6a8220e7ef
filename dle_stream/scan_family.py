"""A family of scans one model serves: the box of scan parameters it was trained over, and
the numbers (features) that tell the network which scan a movie comes from.

A model trained for one scan is valid for every scan with the same *ratios* (line period /
dwell, frame period / line period), pixel size and direction, up to a common time scale
(:meth:`dle_stream.timing.ScanTiming.compare`). A *family* model instead takes the scan as
an input and is valid for every scan inside its box (:class:`ScanFamily`):

- line period / dwell and frame period / line period (log-uniform between their bounds),
- the dwell time, µs (log-uniform): with the D range fixed in µm²/s, the absolute time scale
  matters (a particle at the top of the range spreads D·t per frame, whatever the ratios),
- the frame period, µs (a box constraint: scans outside [min, max] are not drawn),
- the pixel size relative to the PSF's lateral σ (here the box's one pixel size),
- the scan direction (the share of bidirectional scans drawn in training).

:func:`ScanFamily.features` turns a scan into the network's conditioning vector (all
dimensionless; each centred on the box and divided by its half-width, so that the box is
[-1, 1] in every varying feature):

1. ln(line period / dwell),
2. ln(frame period / line period),
3. ln(d_max · frame period / pixel²): how far (px², as a variance) a particle at the top
   of the range spreads between frames; this carries the absolute time scale,
4. ln(pixel size / PSF σxy),
5. 1 for a bidirectional scan, else 0 (not scaled).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dle_stream.errors import DleStreamError
from dle_stream.timing import ScanTiming

#: Number of conditioning features (:meth:`ScanFamily.features`).
SCAN_FEATURES = 5
#: Share of a line's period that is its active pixels when the family draws a scan (a galvo
#: scan's fill fraction; the rest is the fly-back), and of a frame's period that is its lines.
LINE_FILL = 0.8
FRAME_FILL = 0.9
#: A scan counts as inside the box when every bound holds within this relative tolerance.
BOX_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ScanFamily:
    """The box of scans a family model is trained over and valid for (times in µs).

    Attributes:
        line_per_dwell: (min, max) of line period / dwell.
        frame_per_line: (min, max) of frame period / line period.
        dwell_us: (min, max) dwell time, µs.
        frame_period_us: (min, max) frame period, µs (scans outside are not drawn or served).
        pixel_size_um: (min, max) pixel edge in the sample, µm.
        psf_sigma_xy_um: the lateral PSF σ the pixel size is measured against, µm (the
            centre of the training prior's PSF range).
        bidirectional_share: share of bidirectional scans drawn in training (0: the family
            serves unidirectional scans only; 1: bidirectional only).
    """

    line_per_dwell: tuple[float, float]
    frame_per_line: tuple[float, float]
    dwell_us: tuple[float, float]
    frame_period_us: tuple[float, float]
    pixel_size_um: tuple[float, float]
    psf_sigma_xy_um: float
    bidirectional_share: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("line_per_dwell", "frame_per_line", "dwell_us", "frame_period_us", "pixel_size_um"):
            lo, hi = (float(v) for v in getattr(self, name))
            object.__setattr__(self, name, (lo, hi))
            if not (0 < lo <= hi and math.isfinite(hi)):
                problems.append(f"{name} needs 0 < min ≤ max (got {lo:g}, {hi:g})")
        if not self.psf_sigma_xy_um > 0:
            problems.append("psf_sigma_xy_um must be > 0")
        if not 0.0 <= self.bidirectional_share <= 1.0:
            problems.append("bidirectional_share must be in [0, 1]")
        if not problems and self.line_per_dwell[0] < 1 / LINE_FILL * 20:
            problems.append(f"line_per_dwell must allow a 20 px tile (min ≥ {20 / LINE_FILL:g})")
        if problems:
            raise DleStreamError(f"scan family: {'; '.join(problems)}")

    # ------------------------------------------------------------- features
    def _centres(self, d_max_um2_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(centre, half-width) of the log features over the box (half-width 1 where fixed)."""
        spread_lo = d_max_um2_s * self.frame_period_us[0] * 1e-6 / self.pixel_size_um[1] ** 2
        spread_hi = d_max_um2_s * self.frame_period_us[1] * 1e-6 / self.pixel_size_um[0] ** 2
        bounds = [self.line_per_dwell, self.frame_per_line, (spread_lo, spread_hi),
                  (self.pixel_size_um[0] / self.psf_sigma_xy_um, self.pixel_size_um[1] / self.psf_sigma_xy_um)]
        logs = np.log(np.asarray(bounds, dtype=np.float64))
        centre = logs.mean(axis=1)
        half = (logs[:, 1] - logs[:, 0]) / 2
        return centre, np.where(half > 1e-9, half, 1.0)

    def features(self, timing: ScanTiming, d_max_um2_s: float) -> np.ndarray:
        """The network's conditioning vector [SCAN_FEATURES] for a scan (float32; see the module doc)."""
        raw = np.log(np.array([
            timing.line_period_us / timing.dwell_us,
            timing.frame_period_us / timing.line_period_us,
            d_max_um2_s * timing.frame_period_us * 1e-6 / timing.pixel_size_um ** 2,
            timing.pixel_size_um / self.psf_sigma_xy_um,
        ], dtype=np.float64))
        centre, half = self._centres(d_max_um2_s)
        scaled = (raw - centre) / half
        return np.concatenate([scaled, [1.0 if timing.bidirectional else 0.0]]).astype(np.float32)

    # ------------------------------------------------------------ membership
    def outside(self, timing: ScanTiming) -> list[str]:
        """What of a scan lies outside the box (empty: the family serves it)."""
        values = {
            "line period / dwell": (timing.line_period_us / timing.dwell_us, self.line_per_dwell),
            "frame period / line period": (timing.frame_period_us / timing.line_period_us, self.frame_per_line),
            "dwell (µs)": (timing.dwell_us, self.dwell_us),
            "frame period (µs)": (timing.frame_period_us, self.frame_period_us),
            "pixel size (µm)": (timing.pixel_size_um, self.pixel_size_um),
        }
        out = [f"{name} {v:.4g} not in [{lo:.4g}, {hi:.4g}]" for name, (v, (lo, hi)) in values.items()
               if not (lo * (1 - BOX_TOLERANCE) <= v <= hi * (1 + BOX_TOLERANCE))]
        if timing.bidirectional and self.bidirectional_share == 0:
            out.append("bidirectional scan (the family was trained on unidirectional scans only)")
        if not timing.bidirectional and self.bidirectional_share == 1:
            out.append("unidirectional scan (the family was trained on bidirectional scans only)")
        return out

    def contains(self, timing: ScanTiming) -> bool:
        return not self.outside(timing)

    # --------------------------------------------------------------- drawing
    def draw(self, generator: torch.Generator, max_tries: int = 1000) -> ScanTiming:
        """A scan drawn from the box: each ratio and the dwell log-uniform, redrawn until the
        frame period is inside its bounds; the frame is the whole line's active pixels
        (:data:`LINE_FILL` of the line) × :data:`FRAME_FILL` of the frame's lines."""
        for _ in range(max_tries):
            u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()

            def log_uniform(bounds: tuple[float, float], x: float) -> float:
                return math.exp(math.log(bounds[0]) + x * (math.log(bounds[1]) - math.log(bounds[0])))

            dwell = log_uniform(self.dwell_us, u[0])
            lpd = log_uniform(self.line_per_dwell, u[1])
            fpl = log_uniform(self.frame_per_line, u[2])
            line, frame = dwell * lpd, dwell * lpd * fpl
            if not self.frame_period_us[0] <= frame <= self.frame_period_us[1]:
                continue
            pixel = log_uniform(self.pixel_size_um, u[3])
            bidirectional = u[4] < self.bidirectional_share
            width = max(20, int(lpd * LINE_FILL))
            height = max(20, int(fpl * FRAME_FILL))
            return ScanTiming(pixel, dwell, line, frame, width, height, bidirectional)
        raise DleStreamError("scan family: no scan of the box has a frame period inside its bounds; widen the box")

    # ----------------------------------------------------------- serialising
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_file(cls, path: str | Path) -> "ScanFamily":
        """A box from a JSON file of :class:`ScanFamily` fields (errors name the file)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DleStreamError(f"{path}: no such file; give the family box as a JSON file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DleStreamError(f"{path}: not a readable JSON file ({exc}); fix the family box file") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "scan_family") -> "ScanFamily":
        if not isinstance(data, dict):
            raise DleStreamError(f"{source}: a scan family must be a JSON object of ScanFamily fields")
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(n for n in names - set(data) if n != "bidirectional_share")
        if unknown or missing:
            raise DleStreamError(f"{source}: " + "; ".join(
                ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
                + ([f"missing field(s) {', '.join(missing)}"] if missing else [])))
        try:
            values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise DleStreamError(f"{source}: invalid scan family ({exc})") from None


#: The box of the shipped family models: it holds the paper's scan (dwell 8 µs, line/dwell
#: 188.5, frame/line 40.9, frame 61.7 ms) and the three scans of issue 16's measurements
#: (64×64 px at 8 µs, 128×128 at 2 µs, 512×512 at 1 µs, fill 0.8), with frame periods of
#: 20–400 ms, unidirectional, at the shipped models' pixel size 0.15 µm.
DEFAULT_FAMILY = ScanFamily(line_per_dwell=(64.0, 800.0), frame_per_line=(32.0, 640.0), dwell_us=(1.0, 10.0),
                            frame_period_us=(20_000.0, 400_000.0), pixel_size_um=(0.15, 0.15),
                            psf_sigma_xy_um=0.21, bidirectional_share=0.0)


def _square_scan(size_px: int, dwell_us: float) -> ScanTiming:
    """A size × size px unidirectional scan at ``dwell_us``, fill fraction 0.8, pixel 0.15 µm."""
    line = size_px * dwell_us / LINE_FILL
    return ScanTiming(0.15, dwell_us, line, size_px * line, size_px, size_px, False)


#: Scans a family is validated on (those inside its box): the paper's (that of both shipped
#: models) and the three of issue 16's measurements (benchmarks/new_scans.py).
REFERENCE_SCANS: dict[str, ScanTiming] = {
    "paper": ScanTiming(0.15, 8.0, 1508.0, 61652.0, 20, 20, False),
    "64x64-8us": _square_scan(64, 8.0),
    "128x128-2us": _square_scan(128, 2.0),
    "512x512-1us": _square_scan(512, 1.0),
}


def specialise_to_scan(model, family: ScanFamily, timing: ScanTiming, d_max_um2_s: float):
    """The one-scan model a family model is at ``timing``: its FiLM read once at the scan's
    features and folded into the stem's BatchNorm (scale and shift per channel) and the MLP's
    first layer (the pooled features' scale and shift), the FiLM removed. Same outputs as the
    family model with that scan's features (up to float rounding); the start of a one-scan
    training warm-started from a family (:meth:`~dle_stream.training.trainer.Trainer._warm_start`).

    Args:
        model: a :class:`~dle_stream.model.DLEModel` with ``scan_features`` (not changed).
        family: its box (``timing`` must be inside it).
        timing: the scan to specialise to.
        d_max_um2_s: the model's D range top (µm²/s), as in :meth:`ScanFamily.features`.
    """
    from dataclasses import replace as dc_replace

    from dle_stream.model import DLEModel

    if model.scan_film is None:
        raise DleStreamError("specialise_to_scan: the model is not a family model")
    outside = family.outside(timing)
    if outside:
        raise DleStreamError(f"specialise_to_scan: the scan is outside the family's box ({'; '.join(outside)})")
    one = DLEModel(dc_replace(model.config, scan_features=0))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("scan_film.")}
    one.load_state_dict(state)
    with torch.no_grad():
        features = torch.from_numpy(family.features(timing, d_max_um2_s))[None]
        g1, b1, g2, b2 = (t[0] for t in model.scan_film(features))
        bn = one.temporal.stem_bn
        bn.weight.mul_(1 + g1)
        bn.bias.mul_(1 + g1).add_(b1)
        first = one.mlp[0]
        assert isinstance(first, torch.nn.Linear)  # the MLP's first layer (DLEModel)
        first.bias.add_(first.weight @ b2)
        first.weight.mul_((1 + g2)[None, :])
    return one.train(model.training)
