"""The live terminal dashboard (rich) and its plain-text fallback.

The dashboard shows: a header (source, model, frames in, acquisition and processing
frames/s, windows done and skipped, gaps, latency); a map of the frame's tiles coloured
by their running D; a table per ROI with D ± σ and a trend sparkline; recent warnings.
When the output is not a terminal (or with ``--no-dashboard``) it prints one plain line
per window estimate instead; ``quiet`` prints nothing. Estimates are put into words by
:mod:`dle_stream.report` (intervals, "D > x" above the range, disagreeing tiles).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.live import Live

    from dle_stream.events import RunnerEvents, WindowEstimate
    from dle_stream.runner import StreamRunner

from dle_stream import report

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values, lo: float | None = None, hi: float | None = None) -> str:
    """A text sparkline of finite values (NaN shown as a space)."""
    vals = np.asarray(list(values), dtype=float)
    finite = vals[np.isfinite(vals)]
    if finite.size == 0:
        return ""
    lo = finite.min() if lo is None else lo
    hi = finite.max() if hi is None else hi
    span = hi - lo if hi > lo else 1.0
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append(" ")
        else:
            out.append(SPARK[int(np.clip((v - lo) / span * (len(SPARK) - 1), 0, len(SPARK) - 1) + 0.5)])
    return "".join(out)


def _colour(fraction: float) -> str:
    """A perceptually ordered colour (dark blue → green → yellow) for 0…1."""
    if not math.isfinite(fraction):
        return "grey30"
    f = float(np.clip(fraction, 0, 1))
    stops = [(0.0, (68, 1, 84)), (0.33, (49, 104, 142)), (0.66, (53, 183, 121)), (1.0, (253, 231, 37))]
    for (f0, c0), (f1, c1) in zip(stops[:-1], stops[1:]):
        if f <= f1:
            t = (f - f0) / (f1 - f0)
            r, g, b = (int(a + (b_ - a) * t) for a, b_ in zip(c0, c1))
            return f"rgb({r},{g},{b})"
    return "rgb(253,231,37)"


class Dashboard:
    """Shows a :class:`~dle_stream.runner.StreamRunner`'s progress.

    A sink (:class:`dle_stream.protocols.Sink`) like the Zarr log: it attaches itself to
    ``runner`` (:meth:`~dle_stream.runner.StreamRunner.attach`) and shows each ``estimated``
    and ``warning`` event; the running combination, layout and statistics it reads from
    the runner.

    Args:
        runner: the runner to watch.
        source: a one-line description of the source.
        model: a one-line description of the estimator/model.
        mode: "live" (rich live display), "plain" (a line per window) or "quiet".
        console: where to draw (default: stdout).
        truth: optional {roi name: true D µm²/s} shown next to the estimates (demo, replay of simulations).
        window_offset, frame_offset: added to the window and frame numbers shown, as the log
            stores them (a run that appends to a log continues its numbering:
            :attr:`dle_stream.zarr_log.ZarrLog.window_offset`).
    """

    def __init__(self, runner: StreamRunner, *, source: str, model: str, mode: str = "live",
                 console: Console | None = None, refresh_s: float = 0.5, truth: dict | None = None,
                 window_offset: int = 0, frame_offset: int = 0):
        self.runner = runner
        self.source = source
        self.model = model
        self.mode = mode
        self.console = console or Console()
        self.refresh_s = refresh_s
        self.truth = truth or {}
        self.history: list[deque[float]] = [deque(maxlen=40) for _ in runner.layout.regions]
        self.window_offset = int(window_offset)
        self.frame_offset = int(frame_offset)
        self._live: Live | None = None
        self._last = 0.0
        runner.attach(self)

    def attach(self, events: RunnerEvents) -> None:
        """Subscribe to the runner's estimates and warnings (:class:`dle_stream.protocols.Sink`)."""
        events.estimated.connect(self._on_estimate)
        events.warning.connect(self._on_warning)

    # ------------------------------------------------------------ callbacks
    def _on_estimate(self, est: WindowEstimate) -> None:
        comb = self.runner.combination
        for i, h in enumerate(self.history):  # the trend of a number shown: none when it is not
            shown = comb.region_spread[i] is None and not comb.region.above_range[i]
            h.append(comb.region_d[i] if shown else math.nan)
        if self.mode == "plain":
            parts = []
            for i, region in enumerate(self.runner.layout.regions[:6]):
                parts.append(f"{region.name}: " + report.estimate_text(comb.region, i, spread=comb.region_spread[i]))
            more = "" if len(self.runner.layout.regions) <= 6 else f" (+{len(self.runner.layout.regions) - 6} ROIs)"
            fo = self.frame_offset
            self.console.print(f"window {est.window + self.window_offset} frames {est.frame_start + fo}–{est.frame_stop + fo}: "
                               + " | ".join(parts) + more, highlight=False, markup=False)
        self.refresh(force=True)

    def _on_warning(self, message: str) -> None:
        if self.mode == "plain":
            self.console.print(f"warning: {message}", highlight=False, markup=False)
        self.refresh(force=True)

    # -------------------------------------------------------------- drawing
    def header(self) -> Panel:
        st = self.runner.stats
        lat = f"{st.last_latency_s * 1e3:.0f} ms" if math.isfinite(st.last_latency_s) else "—"
        acq = f"{st.acquisition_fps:.1f}" if math.isfinite(st.acquisition_fps) else "—"
        text = Text.assemble(
            ("source ", "dim"), self.source, ("   model ", "dim"), self.model, "\n",
            ("frames ", "dim"), f"{st.frames_in}", ("   acquisition ", "dim"), f"{acq} fr/s",
            ("   processing ", "dim"), f"{st.processing_fps:.1f} fr/s", ("   windows ", "dim"),
            f"{st.windows_done}", ("   skipped ", "dim"), (f"{st.windows_skipped}", "bold red" if st.windows_skipped else ""),
            ("   gaps ", "dim"), (f"{st.gaps}", "bold red" if st.gaps else ""), ("   latency ", "dim"), lat,
        )
        if self.window_offset or self.frame_offset:
            text.append(f"\nappending to the log: this run's windows are logged from window {self.window_offset}, "
                        f"frames from {self.frame_offset}", style="dim")
        return Panel(text, title="dle-stream", border_style="blue")

    def tile_map(self) -> Panel:
        """Tiles coloured by their running D; with room, each shows its value and a mark
        (↑ above range, ? little information, ≠ windows disagree); sized to the terminal."""
        layout = self.runner.layout
        comb = self.runner.combination
        lo, hi = self.runner.est.d_range
        rows = sorted({t.row for t in layout.tiles})
        cols = sorted({t.col for t in layout.tiles})
        cell = {(t.row, t.col): i for i, t in enumerate(layout.tiles)}
        width = self.console.width - 4
        cell_w = 6 if len(cols) * 6 <= width else 2
        max_cols = max(1, width // cell_w)
        max_rows = max(2, self.console.height - 22) if self.mode == "live" else 40
        text = Text()
        for r in rows[:max_rows]:
            for c in cols[:max_cols]:
                i = cell.get((r, c))
                if i is None:
                    text.append(" " * cell_w)
                    continue
                frac = (comb.tile_d[i] - lo) / (hi - lo)
                style = f"black on {_colour(frac)}" if frac > 0.5 else f"white on {_colour(frac)}"
                if cell_w == 2:
                    mark = (report.MARK_DISAGREE if comb.tile_disagree[i] else
                            report.MARK_ABOVE if comb.tile.above_range[i] else " ")
                    text.append(mark.ljust(2), style=style)
                else:
                    text.append(report.cell_text(comb.tile, i, cell_w, bool(comb.tile_disagree[i])), style=style)
            text.append("\n")
        hidden = []
        if len(rows) > max_rows:
            hidden.append(f"{len(rows) - max_rows} more tile rows")
        if len(cols) > max_cols:
            hidden.append(f"{len(cols) - max_cols} more tile columns")
        if hidden:
            text.append(f"(+{', '.join(hidden)}: enlarge the terminal)\n", style="dim")
        text.append(f"{lo:g} ", style="dim")
        for f in np.linspace(0, 1, 12):
            text.append("█", style=_colour(f))
        text.append(f" {hi:g} µm²/s   ", style="dim")
        text.append(report.LEGEND, style="dim")
        windows = int(np.max(comb.tile_windows)) if comb.tile_windows.size else 0
        return Panel(text, title=f"D per tile (µm²/s; {windows} independent windows combined)",
                     border_style="blue", expand=False)

    def roi_table(self) -> Table:
        comb = self.runner.combination
        table = Table(title="regions (running, independent windows and disjoint tiles combined)", expand=False)
        table.add_column("ROI", overflow="fold")
        table.add_column("tiles", justify="right")
        table.add_column("estimate", overflow="fold")
        table.add_column("trend")
        limit = max(1, self.console.height - 18) if self.mode == "live" else 20
        for i, region in enumerate(self.runner.layout.regions[:limit]):
            text = report.estimate_text(comb.region, i, spread=comb.region_spread[i], truth=self.truth.get(region.name))
            # user text and notes in brackets are printed literally, never read as rich markup
            table.add_row(Text(region.name), str(len(region.tiles)), Text(text), sparkline(self.history[i]))
        return table

    def warnings(self) -> Text:
        recent = self.runner.stats.warnings[-4:]
        return Text("\n".join(f"⚠ {w}" for w in recent), style="yellow") if recent else Text("no warnings", style="dim")

    def renderable(self) -> Group:
        return Group(self.header(), self.tile_map(), self.roi_table(), self.warnings())

    # ------------------------------------------------------------- lifecycle
    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._live is not None and (force or now - self._last >= self.refresh_s):
            self._live.update(self.renderable(), refresh=True)
            self._last = now

    def __enter__(self) -> "Dashboard":
        if self.mode == "live":
            from rich.live import Live

            self._live = Live(self.renderable(), console=self.console, auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self.renderable(), refresh=True)
            self._live.__exit__(*exc)
            self._live = None
