"""Which model serves a scan, and what to say when none does.

A model is valid for one scan up to a common time scale (docs/design.md §3): what must match
are the scan's *ratios* (line period / dwell, frame period / line period), its pixel size and
its direction. :func:`scan_distance` measures how far two scans are in those terms (0: the
model serves the scan), :func:`rank_models` orders the available packages by it, and
:func:`no_model_message` is the one-line answer for a scan no model serves: the nearest
model, how far its ratios are, and the exact command that trains one (warm-started from it).
"""

from __future__ import annotations

import math
from pathlib import Path

from dle_stream.model_package import ModelCard, list_models
from dle_stream.timing import ScanTiming


def scan_ratios(timing: ScanTiming) -> dict[str, float]:
    """The numbers a model must share with a scan: line/dwell, frame/line, pixel size (µm)."""
    return {"line_per_dwell": timing.line_period_us / timing.dwell_us,
            "frame_per_line": timing.frame_period_us / timing.line_period_us,
            "pixel_size_um": timing.pixel_size_um}


def scan_distance(model: ScanTiming, scan: ScanTiming) -> float:
    """Sum of |log ratio| of the three numbers of :func:`scan_ratios`, + 1 if the direction differs."""
    a, b = scan_ratios(model), scan_ratios(scan)
    d = sum(abs(math.log(b[k] / a[k])) for k in a)
    return d + (1.0 if model.bidirectional != scan.bidirectional else 0.0)


def rank_models(scan: ScanTiming, prefer: str | None = None) -> list[tuple[float, Path, ModelCard]]:
    """Available packages ordered by :func:`scan_distance` to ``scan`` (nearest first; among
    equally near ones, the model named ``prefer`` first)."""
    ranked = []
    for folder, card in list_models():
        try:
            timing = card.timing
        except Exception:  # noqa: BLE001 - a package with an unreadable timing serves nothing
            continue
        ranked.append((scan_distance(timing, scan), folder, card))
    ranked.sort(key=lambda r: (round(r[0], 9), r[2].name != prefer))
    return ranked


def no_model_message(scan: ScanTiming, recording: str | Path | None, asked: str) -> str:
    """One line: the scan, why ``asked`` does not serve it, the nearest model and the train command."""
    r = scan_ratios(scan)
    here = (f"line/dwell {r['line_per_dwell']:.4g}, frame/line {r['frame_per_line']:.4g}, pixel "
            f"{r['pixel_size_um']:g} µm, {'bi' if scan.bidirectional else 'uni'}directional")
    ranked = rank_models(scan, prefer=Path(str(asked)).name)
    like = f"--like {recording}" if recording is not None else "--dwell-us … --line-period-us … --frame-period-us …"
    if not ranked:
        return (f"no model serves this scan ({here}); train one: dle-stream train {like} --out models/my-scope "
                f"--minutes 30")
    _, folder, card = ranked[0]
    m = scan_ratios(card.timing)
    nearest = (f"nearest: {card.name} (line/dwell {m['line_per_dwell']:.4g}, frame/line {m['frame_per_line']:.4g}, "
               f"pixel {m['pixel_size_um']:g} µm)")
    return (f"model {asked} does not serve this scan ({here}) and no available model does; {nearest}; "
            f"train one for it, starting from that model: dle-stream train {like} --warm-from {card.name} "
            f"--out models/my-scope --minutes 30")
