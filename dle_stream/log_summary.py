"""What a run log says: per-tile and per-ROI D ± σ, a CSV export, a table for the terminal.

Estimates are combined by inverse-variance weighting: with w = 1/σ², the combined
D = Σ w·D / Σ w and σ = (Σ w)^(-1/2), over the finite estimates with σ > 0 (NaN, i.e. no
estimate, is ignored). Note that overlapping windows of one tile share frames, so their
estimates are correlated and the combined σ over all windows is optimistic: read it as
the spread of a running estimate, not as an independent-sample error bar.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from dle_stream.errors import DleStreamError
from dle_stream.zarr_log import WINDOW_CHUNK, LogView, open_log

__all__ = ["inverse_variance_mean", "summarize_log", "export_csv", "render_summary", "CSV_COLUMNS"]

CSV_COLUMNS = ["window", "frame_start", "frame_stop", "t_start_s", "t_stop_s", "wall_time",
               "tile", "row", "col", "d_um2_s", "sigma_um2_s", "flags"]


def inverse_variance_mean(d: np.ndarray, sigma: np.ndarray) -> tuple[float, float, int]:
    """Inverse-variance weighted mean of estimates ``d`` ± ``sigma`` (µm²/s).

    Returns (mean D, combined σ, number of estimates used); (NaN, NaN, 0) if none is
    usable (finite D, finite σ > 0).
    """
    d = np.asarray(d, dtype=np.float64).ravel()
    s = np.asarray(sigma, dtype=np.float64).ravel()
    ok = np.isfinite(d) & np.isfinite(s) & (s > 0)
    n = int(ok.sum())
    if n == 0:
        return math.nan, math.nan, 0
    w = 1.0 / s[ok] ** 2
    return float(np.sum(w * d[ok]) / np.sum(w)), float(np.sum(w) ** -0.5), n


def _usable(d: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.isfinite(d) & np.isfinite(s) & (s > 0)


def _summary_row(kind: str, name: str, tiles: list[int], bbox: list[int],
                 d: np.ndarray, s: np.ndarray, f: np.ndarray) -> dict:
    """Summary of the [window, tile-subset] block ``d``, ``s``, ``f``."""
    ok = _usable(d, s)
    has = ok.any(axis=1)                       # windows with at least one estimate
    last_d = last_s = math.nan
    last_window_row = -1
    if has.any():
        last_window_row = int(np.flatnonzero(has)[-1])
        last_d, last_s, _ = inverse_variance_mean(d[last_window_row], s[last_window_row])
    mean_d, mean_s, n_est = inverse_variance_mean(d, s)
    n_total = f.size
    return {
        "kind": kind,
        "name": name,
        "tiles": tiles,
        "bbox": bbox,
        "n_windows": int(has.sum()),
        "n_estimates": n_est,
        "last_window_row": last_window_row,
        "last_d_um2_s": last_d,
        "last_sigma_um2_s": last_s,
        "mean_d_um2_s": mean_d,
        "mean_sigma_um2_s": mean_s,
        "flagged_share": float(np.count_nonzero(f) / n_total) if n_total else math.nan,
    }


def _summarize(view: LogView) -> list[dict]:
    d, s, f = view.d, view.sigma, view.flags
    rows = []
    for t in range(view.n_tiles):
        rows.append(_summary_row("tile", f"tile {t}", [t], [int(v) for v in view.tile_bbox[t]],
                                 d[:, t:t + 1], s[:, t:t + 1], f[:, t:t + 1]))
    for roi in view.rois:
        tiles = [int(t) for t in roi["tiles"]]
        rows.append(_summary_row("roi", str(roi["name"]), tiles, [int(v) for v in roi["bbox"]],
                                 d[:, tiles], s[:, tiles], f[:, tiles]))
    return rows


def summarize_log(path: str | os.PathLike) -> list[dict]:
    """Per-tile, then per-ROI summary of the committed windows of the log at ``path``.

    Each dict: ``kind`` ("tile" or "roi"), ``name``, ``tiles``, ``bbox`` [row, col, h, w],
    ``n_windows`` (windows with at least one usable estimate), ``n_estimates`` (usable
    tile-window estimates), ``last_window_row`` (-1 if none), ``last_d_um2_s`` ±
    ``last_sigma_um2_s`` (the last window with an estimate; for an ROI its tiles combined
    by inverse variance), ``mean_d_um2_s`` ± ``mean_sigma_um2_s`` (inverse-variance
    combination over all windows, and for an ROI all its tiles), ``flagged_share``
    (share of tile-windows with any :class:`~dle_stream.events.EstimateFlag` set, out of
    all committed windows). Values are µm²/s; NaN where there is nothing to combine.
    """
    return _summarize(open_log(path))


def _fmt(x: float) -> str:
    """Shortest text that reads back as the same float32/float64 value; "" for NaN."""
    return "" if not math.isfinite(x) else repr(x)


def export_csv(path: str | os.PathLike, csv_path: str | os.PathLike) -> int:
    """Write one CSV row per (window, tile) of the log at ``path``; returns the row count.

    Columns: :data:`CSV_COLUMNS` (``window`` is the stored window number, ``row``/``col``
    the tile's top-left pixel, D and σ in µm²/s). Missing values (NaN) are empty cells.
    """
    view = open_log(path)
    csv_path = Path(csv_path)
    n_rows = 0
    try:
        with csv_path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            rows_px = view.tile_bbox[:, 0].tolist()
            cols_px = view.tile_bbox[:, 1].tolist()
            for start in range(0, view.n_windows, WINDOW_CHUNK):
                stop = min(start + WINDOW_CHUNK, view.n_windows)
                block = {name: view.array(name, start, stop) for name in
                         ("window", "frame_start", "frame_stop", "t_start_s", "t_stop_s", "wall_time",
                          "d", "sigma", "flags")}
                for i in range(stop - start):
                    head = [int(block["window"][i]), int(block["frame_start"][i]), int(block["frame_stop"][i]),
                            _fmt(float(block["t_start_s"][i])), _fmt(float(block["t_stop_s"][i])),
                            _fmt(float(block["wall_time"][i]))]
                    # str() of a float32 is its shortest round-trip text (0.3, not 0.30000001)
                    d_txt = ["" if not np.isfinite(v) else str(v) for v in block["d"][i]]
                    s_txt = ["" if not np.isfinite(v) else str(v) for v in block["sigma"][i]]
                    fl = block["flags"][i].tolist()
                    for t in range(view.n_tiles):
                        writer.writerow([*head, t, rows_px[t], cols_px[t], d_txt[t], s_txt[t], fl[t]])
                    n_rows += view.n_tiles
    except OSError as exc:
        raise DleStreamError(f"cannot write the CSV file {csv_path} ({exc.strerror or exc}); "
                             f"choose a writable path") from exc
    return n_rows


def _pm(d: float, s: float) -> str:
    """``D ± σ`` with σ to two significant digits and D to the same decimal place."""
    if not math.isfinite(d):
        return "–"
    if not (math.isfinite(s) and s > 0):
        return f"{d:.3g}"
    decimals = max(0, 1 - math.floor(math.log10(s)))
    return f"{d:.{decimals}f} ± {s:.{decimals}f}"


def render_summary(path: str | os.PathLike):
    """A rich renderable for ``dle-stream log show``: run facts, then tiles and ROIs."""
    from rich.console import Group
    from rich.table import Table

    view = open_log(path)
    rows = _summarize(view)
    attrs = view.attrs

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("log", str(view.path))
    for key, label in (("start_time", "started"), ("estimator", "estimator"),
                       ("software_version", "software"), ("source", "source")):
        if key in attrs:
            value = attrs[key]
            facts.add_row(label, value if isinstance(value, str) else str(value))
    span = ""
    if view.n_windows:
        span = f", frames {int(view.frame_start.min())}–{int(view.frame_stop.max())}"
    facts.add_row("windows", f"{view.n_windows} committed × {view.n_tiles} tiles{span}")
    facts.add_row("frames", f"{view.n_frames} logged")
    if view.n_gaps:
        gaps = view.gap_records()
        lost = sum(g["n_lost"] for g in gaps if g["n_lost"] > 0)
        facts.add_row("gaps", f"{view.n_gaps} ({lost} frames lost)")
    else:
        facts.add_row("gaps", "none")
    segments = attrs.get("segments", [])
    if len(segments) > 1:
        facts.add_row("appended", f"{len(segments) - 1} time(s)")

    def table(kind: str, title: str) -> Table:
        t = Table(title=title, title_justify="left")
        t.add_column(kind.upper() if kind == "roi" else "tile")
        t.add_column("bbox (r, c, h, w)")
        t.add_column("windows", justify="right")
        t.add_column("last D ± σ (µm²/s)", justify="right")
        t.add_column("mean D ± σ (µm²/s)", justify="right")
        t.add_column("flagged", justify="right")
        for r in rows:
            if r["kind"] != kind:
                continue
            name = r["name"] if kind == "roi" else str(r["tiles"][0])
            flagged = "–" if not math.isfinite(r["flagged_share"]) else f"{100 * r['flagged_share']:.0f}%"
            t.add_row(name, ", ".join(str(v) for v in r["bbox"]), str(r["n_windows"]),
                      _pm(r["last_d_um2_s"], r["last_sigma_um2_s"]),
                      _pm(r["mean_d_um2_s"], r["mean_sigma_um2_s"]), flagged)
        return t

    parts = [facts]
    if view.rois:
        parts.append(table("roi", "ROIs (tiles combined by inverse variance)"))
    parts.append(table("tile", "Tiles"))
    return Group(*parts)
