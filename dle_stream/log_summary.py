"""What a run log says: per-tile and per-ROI D with intervals, a CSV export, a table for the terminal.

Estimates are combined as the live runner combines them (:mod:`dle_stream.combine`): by
adding the windows' log-likelihoods of D, and only over *independent* data: for each tile
the non-overlapping windows (going back from its last window, every window whose frames
do not overlap the one taken after it), and for an ROI its (disjoint) tiles. D, σ and the
68 %/95 % intervals are read from the sum (:func:`dle_stream.likelihood.posterior`); a tile
whose windows disagree (D changed) or an ROI whose tiles disagree (heterogeneous) is
flagged rather than averaged. A window logged without a likelihood (a log from before
likelihoods were logged, or written by hand) enters as a Gaussian of its D ± σ.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from dle_stream import report
from dle_stream.combine import DISAGREE_P, Spread, disagreement_p, spread_of, window_spread
from dle_stream.errors import DleStreamError
from dle_stream.likelihood import DGrid, combine, gaussian_log_likelihood, posterior
from dle_stream.zarr_log import WINDOW_CHUNK, LogView, open_log

__all__ = ["inverse_variance_mean", "summarize_log", "export_csv", "render_summary", "CSV_COLUMNS"]

CSV_COLUMNS = ["window", "frame_start", "frame_stop", "t_start_s", "t_stop_s", "wall_time",
               "tile", "row", "col", "d_um2_s", "sigma_um2_s", "lo68_um2_s", "hi68_um2_s", "lo95_um2_s",
               "hi95_um2_s", "p_above", "lower95_um2_s", "flags"]


def inverse_variance_mean(d: np.ndarray, sigma: np.ndarray) -> tuple[float, float, int]:
    """Inverse-variance weighted mean of Gaussian estimates ``d`` ± ``sigma`` (µm²/s).

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


def window_lower95(view: LogView, start: int = 0, stop: int | None = None) -> np.ndarray:
    """[window, tile] the "D > x" bound x (µm²/s) of the windows flagged above the model's
    range, read from their logged log-likelihoods; NaN elsewhere (there D, σ and the
    intervals on the range are the estimate)."""
    from dle_stream.events import EstimateFlag

    flags = view.array("flags", start, stop)
    out = np.full(flags.shape, np.nan)
    above = (flags & np.uint8(EstimateFlag.ABOVE_RANGE)) != 0
    if above.any():
        grid, d_max = view.grid()
        out[above] = posterior(_log_likelihoods(view, grid, d_max, start, stop)[above], grid, d_max).lower95_wide
    return out


def _log_likelihoods(view: LogView, grid: DGrid, d_max: float, start: int = 0, stop: int | None = None) -> np.ndarray:
    """[window, tile, n] log-likelihoods of windows [start, stop); rows logged without one as
    a Gaussian of D ± σ."""
    ll = view.array("log_likelihood", start, stop).astype(np.float64)
    missing = ~np.all(np.isfinite(ll), axis=-1)
    if missing.any():
        d, sigma = (view.array(name, start, stop).astype(np.float64) / d_max for name in ("d", "sigma"))
        gauss = gaussian_log_likelihood(d, sigma, grid)
        ll = np.where(missing[..., None], gauss, ll)
    return ll


def independent_windows(frame_start: np.ndarray, frame_stop: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Rows of non-overlapping windows, going back from the last usable one (a bool mask)."""
    keep = np.zeros(usable.shape, dtype=bool)
    next_start = np.inf
    for row in np.flatnonzero(usable)[::-1]:
        if frame_stop[row] <= next_start:
            keep[row] = True
            next_start = frame_start[row]
    return keep


def _summary_row(kind: str, name: str, tiles: list[int], bbox: list[int], ll: np.ndarray, flags: np.ndarray,
                 windows: int, last_ll: np.ndarray, tile_range: tuple[float, float], spread: Spread | None,
                 disagree_p: float, grid: DGrid, d_max: float, added: int, last_added: int = 1) -> dict:
    """``added`` / ``last_added``: windows summed into ``ll`` / ``last_ll`` (all tiles' for an
    ROI), for the model's information weight (:func:`dle_stream.likelihood.information_weight`).
    ``spread``: the parts' values when they disagree (then no combined number is reported)."""
    post = posterior(ll, grid, d_max, n_windows=max(added, 1))
    last = posterior(last_ll, grid, d_max, n_windows=max(last_added, 1))
    n_total = flags.size
    return {
        "kind": kind, "name": name, "tiles": tiles, "bbox": bbox,
        "n_windows": windows,
        "last_d_um2_s": float(last.d), "last_sigma_um2_s": float(last.sigma),
        "d_um2_s": float(post.d), "sigma_um2_s": float(post.sigma),
        "lo68_um2_s": float(post.lo68), "hi68_um2_s": float(post.hi68),
        "lo95_um2_s": float(post.lo95), "hi95_um2_s": float(post.hi95),
        "p_above": float(post.p_above), "above_range": bool(post.above_range),
        "lower95_um2_s": float(post.lower95_wide),
        "little_information": bool(post.little_information) and math.isfinite(float(post.d)),
        "disagree_p": float(disagree_p), "disagree": spread is not None,
        "disagree_what": "" if spread is None else spread.what, "spread": spread,
        "tile_range_um2_s": [float(v) for v in tile_range],
        "flagged_share": float(np.count_nonzero(flags) / n_total) if n_total else math.nan,
        "posterior": post, "last_posterior": last,
    }


def _windows_test(parts: np.ndarray, used: np.ndarray, grid: DGrid, d_max: float) -> tuple[float, Spread | None]:
    """p of "these successive windows [K, n] share one D", and their spread when they do not.
    ``used`` [K]: windows (tiles) added into each part."""
    p = float(disagreement_p(parts, lr_scale=grid.lr_scale)) if len(parts) else 1.0
    if p >= DISAGREE_P:
        return p, None
    return p, window_spread(parts, used, grid, d_max)


def _summarize(view: LogView) -> list[dict]:
    grid, d_max = view.grid()
    ll = _log_likelihoods(view, grid, d_max)  # [W, T, n]
    f = view.flags
    start, stop = view.frame_start, view.frame_stop
    usable = np.all(np.isfinite(ll), axis=-1)  # [W, T]
    tile_ll = np.full((view.n_tiles, grid.n), np.nan)
    tile_n = np.zeros(view.n_tiles, dtype=int)
    rows = []
    for t in range(view.n_tiles):
        keep = independent_windows(start, stop, usable[:, t])
        tile_n[t] = int(keep.sum())
        chosen = ll[keep, t]
        tile_ll[t] = combine(chosen, axis=0) if keep.any() else np.nan
        last = ll[np.flatnonzero(usable[:, t])[-1], t] if usable[:, t].any() else np.full(grid.n, np.nan)
        p, changed = _windows_test(chosen, np.ones(len(chosen), dtype=int), grid, d_max)
        rows.append(_summary_row("tile", f"tile {t}", [t], [int(v) for v in view.tile_bbox[t]], tile_ll[t], f[:, t],
                                 int(keep.sum()), last, (math.nan, math.nan), changed, p, grid, d_max, int(tile_n[t])))
    tile_post = posterior(tile_ll, grid, d_max, n_windows=np.maximum(tile_n, 1))
    for roi in view.rois:
        tiles = [int(t) for t in roi["tiles"]]
        own = tile_ll[tiles]
        any_usable = usable[:, tiles].any(axis=1)
        last_rows = np.flatnonzero(any_usable)
        last = combine(ll[last_rows[-1], tiles], axis=0) if len(last_rows) else np.full(grid.n, np.nan)
        by_tile = spread_of(tile_post.take(tiles), "tiles")
        p = float(disagreement_p(own, lr_scale=grid.lr_scale))
        spread: Spread | None = by_tile if p < DISAGREE_P else None
        if spread is None:  # the ROI's successive independent windows, its tiles added in each
            keep = independent_windows(start, stop, any_usable)
            p, spread = _windows_test(combine(ll[keep][:, tiles], axis=1), usable[keep][:, tiles].sum(axis=1),
                                      grid, d_max)
        rows.append(_summary_row("roi", str(roi["name"]), tiles, [int(v) for v in roi["bbox"]], combine(own, axis=0),
                                 f[:, tiles], max((r["n_windows"] for r in rows if r["tiles"][0] in tiles), default=0),
                                 last, (by_tile.lo_um2_s, by_tile.hi_um2_s), spread, p, grid, d_max,
                                 int(tile_n[tiles].sum()),
                                 int(usable[last_rows[-1], tiles].sum()) if len(last_rows) else 1))
    return rows


def summarize_log(path: str | os.PathLike) -> list[dict]:
    """Per-tile, then per-ROI summary of the committed windows of the log at ``path``.

    Each dict: ``kind`` ("tile" or "roi"), ``name``, ``tiles``, ``bbox`` [row, col, h, w],
    ``n_windows`` (independent windows combined; for an ROI, the most of any of its
    tiles), ``last_d_um2_s`` ± ``last_sigma_um2_s`` (the last window alone; for an ROI its
    tiles combined), ``d_um2_s`` ± ``sigma_um2_s`` with ``lo68/hi68/lo95/hi95_um2_s``
    (independent windows, and for an ROI its tiles, combined), ``p_above``,
    ``above_range`` and ``lower95_um2_s`` (report "D > lower95" when above the range),
    ``little_information``, ``disagree`` and ``disagree_p`` (a tile's windows, an ROI's
    tiles, or else an ROI's windows with its tiles added, inconsistent with one D: then
    ``disagree_what`` is "windows" or "tiles" and ``spread`` the parts' values, reported
    instead of a combined number), ``tile_range_um2_s`` (an ROI's smallest and largest
    tile D inside the range), ``flagged_share`` (share of tile-windows with any
    :class:`~dle_stream.events.EstimateFlag` set), ``posterior``
    and ``last_posterior`` (:class:`~dle_stream.likelihood.Posterior`). Values are µm²/s; NaN where there is
    nothing to combine.
    """
    return _summarize(open_log(path))


def _fmt(x: float) -> str:
    """Shortest text that reads back as the same float32/float64 value; "" for NaN."""
    return "" if not math.isfinite(x) else repr(x)


def export_csv(path: str | os.PathLike, csv_path: str | os.PathLike, shown: str | None = None) -> int:
    """Write one CSV row per (window, tile) of the log at ``path``; returns the row count.
    A write error names ``shown`` (default: ``csv_path``), e.g. the file the user asked for
    when ``csv_path`` is a temporary file beside it.

    Columns: :data:`CSV_COLUMNS` (``window`` is the stored window number, ``row``/``col``
    the tile's top-left pixel, D, σ and the intervals in µm²/s, on the model's range;
    ``lower95_um2_s``: for a window above the range, report "D > lower95" instead, see
    :func:`window_lower95`). Missing values (NaN) are empty cells.
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
                          "d", "sigma", "lo68", "hi68", "lo95", "hi95", "p_above", "flags")}
                block["lower95"] = window_lower95(view, start, stop).astype(np.float32)
                for i in range(stop - start):
                    head = [int(block["window"][i]), int(block["frame_start"][i]), int(block["frame_stop"][i]),
                            _fmt(float(block["t_start_s"][i])), _fmt(float(block["t_stop_s"][i])),
                            _fmt(float(block["wall_time"][i]))]
                    # str() of a float32 is its shortest round-trip text (0.3, not 0.30000001)
                    values = [["" if not np.isfinite(v) else str(v) for v in block[name][i]]
                              for name in ("d", "sigma", "lo68", "hi68", "lo95", "hi95", "p_above", "lower95")]
                    fl = block["flags"][i].tolist()
                    for t in range(view.n_tiles):
                        writer.writerow([*head, t, rows_px[t], cols_px[t], *(v[t] for v in values), fl[t]])
                    n_rows += view.n_tiles
    except OSError as exc:
        raise DleStreamError(f"{shown or csv_path}: cannot write the CSV file ({exc.strerror or exc}); "
                             f"choose a writable path") from None
    return n_rows


def render_summary(path: str | os.PathLike):
    """A rich renderable for ``dle-stream log show``: run facts, then tiles and ROIs."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text  # user text (paths, ROI names) is printed literally, never as markup

    view = open_log(path)
    rows = _summarize(view)
    attrs = view.attrs

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("log", Text(str(view.path)))
    # runs record "software" ("dle-stream X.Y"); logs written by hand may say "software_version"
    for key, label in (("start_time", "started"), ("estimator", "estimator"), ("software", "software"),
                       ("software_version", "software"), ("source", "source")):
        if key in attrs and not (key == "software_version" and "software" in attrs):
            value = attrs[key]
            facts.add_row(label, Text(value if isinstance(value, str) else str(value)))
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
    check = attrs.get("recording_check")
    if isinstance(check, dict) and isinstance(check.get("line"), str):  # replay's recording check
        facts.add_row("recording check", Text(check["line"].removeprefix("recording check: ")))
    segments = attrs.get("segments", [])
    if len(segments) > 1:
        facts.add_row("appended", f"{len(segments) - 1} time(s)")

    def table(kind: str, title: str) -> Table:
        t = Table(title=title, title_justify="left")
        t.add_column(kind.upper() if kind == "roi" else "tile")
        t.add_column("bbox (r, c, h, w)")
        t.add_column("windows", justify="right")
        t.add_column("last window D ± σ (µm²/s)", justify="right")
        t.add_column("combined (independent windows" + (", tiles)" if kind == "roi" else ")"), overflow="fold")
        t.add_column("flagged", justify="right")
        for r in rows:
            if r["kind"] != kind:
                continue
            name = r["name"] if kind == "roi" else str(r["tiles"][0])
            flagged = "–" if not math.isfinite(r["flagged_share"]) else f"{100 * r['flagged_share']:.0f}%"
            combined = report.estimate_text(r["posterior"], (), spread=r["spread"])
            t.add_row(Text(name), ", ".join(str(v) for v in r["bbox"]), str(r["n_windows"]),
                      Text(report.window_text(r["last_posterior"])), Text(combined), flagged)
        return t

    parts = [facts]
    if view.rois:
        parts.append(table("roi", "ROIs (disjoint tiles' likelihoods combined)"))
    parts.append(table("tile", "Tiles"))
    return Group(*parts)
