"""The Python API: D (µm²/s) from a movie array, a recording on disk, or a stream of frames.

Three lines in a notebook::

    import dle_stream as dle
    res = dle.estimate(movie, timing)              # movie [T, H, W], timing of the full frame
    res.rois.to_pandas()                           # combined D per ROI ("frame" by default)

- :func:`estimate`: a movie array [frames, height, width] of any frame size with its
  :class:`~dle_stream.timing.ScanTiming` (which must describe that full frame: every tile
  keeps its raster offsets in it, docs/design.md §3);
- :func:`estimate_recording`: a recording on disk (TIFF family or Zarr), its scan timing
  read from its metadata as ``dle-stream replay`` does (or given);
- :func:`stream`: an iterator over any source (a path, an array, a Micro-Manager source,
  any iterable of frames) that yields a :class:`WindowResult` as each window is
  estimated; :meth:`EstimateStream.results` gives the :class:`Estimates` so far.

It is a thin layer over the streaming runner (docs/design.md §2): the frames are cut into
the model's tiles (:mod:`dle_stream.tiling`), each tile-frame is encoded once, every
``hop`` frames a window of ``window`` frames is estimated for every tile
(:class:`~dle_stream.runner.StreamRunner`), and independent windows and disjoint tiles
are combined (:class:`~dle_stream.combine.RunningCombination`, docs/design.md §7b).
Results are :class:`~dle_stream.results.ResultTable` objects (``.to_pandas()``,
``.to_xarray()``): per window and tile, per tile combined, per ROI combined.

Problems raise :class:`~dle_stream.errors.DleStreamError` (one line, naming the argument
and the fix); things the caller must know but that do not stop the estimate (a scan
timing assumed from the model card, a gap in the frames) are issued as
:class:`DleStreamWarning` and kept in ``warnings`` of the results.
"""

from __future__ import annotations

import math
import os
import sys
import warnings as _warnings
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from dle_stream import report
from dle_stream.combine import RunningCombination
from dle_stream.errors import DleStreamError
from dle_stream.events import EstimateFlag, FrameEvent, WindowEstimate
from dle_stream.protocols import StreamEstimator
from dle_stream.recording import Recording
from dle_stream.results import ResultTable, flag_text
from dle_stream.runner import RunStats, StreamRunner
from dle_stream.stream_estimators import ESTIMATORS, calibration_note
from dle_stream.tiling import Region, TileLayout, grid_layout, roi_layout
from dle_stream.timing import ScanTiming

__all__ = [
    "DEFAULT_MODEL",
    "DleStreamWarning",
    "EstimateStream",
    "Estimates",
    "WindowResult",
    "estimate",
    "estimate_recording",
    "open_log",
    "stream",
]

#: The model used when none is named (the shipped quantum-dot model, D 0–1.5 µm²/s).
DEFAULT_MODEL = "brain-qd-low"

#: Non-overlapping windows in the running estimate of an endless source.
RUNNING_WINDOWS = 8

#: Columns of the per-window table (:attr:`Estimates.windows`, :attr:`WindowResult.tiles`).
WINDOW_COLUMNS = ("window", "frame_start", "frame_stop", "t_start_s", "t_stop_s", "wall_time", "tile", "row", "col",
                  "height", "width", "d_um2_s", "sigma_um2_s", "lo68_um2_s", "hi68_um2_s", "lo95_um2_s",
                  "hi95_um2_s", "p_above", "lower95_um2_s", "flags", "flag_bits")

#: Columns of the per-window table that label the window or the tile only.
WINDOW_COORDS = {**{c: ("window",) for c in ("frame_start", "frame_stop", "t_start_s", "t_stop_s", "wall_time")},
                 **{c: ("tile",) for c in ("row", "col", "height", "width")}}

ROI = tuple[int, int, int, int]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class DleStreamWarning(UserWarning):
    """Something the caller must know about an estimate that still went ahead
    (scan timing assumed from the model card, a gap in the frames, a truncated file)."""


# --------------------------------------------------------------------------- results
@dataclass
class WindowResult:
    """One window position, estimated for every tile (what :func:`stream` yields).

    Attributes:
        window: running number of the window (0-based).
        frame_start, frame_stop: the frames [start, stop) it covers.
        t_start_s, t_stop_s: its span in acquisition time, s (frame periods since the first frame, images lost in gaps included).
        tiles: this window's estimates, one row per tile (columns as :attr:`Estimates.windows`).
        rois: the running combined estimate per ROI after this window (as :attr:`Estimates.rois`).
        estimate: the runner's raw record (log-likelihoods on the D grid included).
    """

    window: int
    frame_start: int
    frame_stop: int
    t_start_s: float
    t_stop_s: float
    tiles: ResultTable
    rois: ResultTable
    estimate: WindowEstimate = field(repr=False)


@dataclass
class Estimates:
    """Everything estimated from a movie, a recording or a stream.

    Attributes:
        windows: per window and tile (dims ``window``, ``tile``): window number, frames
            [frame_start, frame_stop), t_start_s/t_stop_s, tile index and bbox
            (row, col, height, width px), D (``d_um2_s``: posterior median), σ, 68 % and
            95 % intervals (on the model's range), ``p_above`` (probability that D is above
            the model's range), ``lower95_um2_s`` (where the data say D is above the range:
            report "D > lower95" instead of D; NaN elsewhere), ``flags`` (names) and
            ``flag_bits``.
        tiles: per tile (dim ``tile``), its independent (non-overlapping) windows combined:
            ``n_windows`` and the same estimate columns — no number (NaN) where those windows
            disagree (``disagree`` "windows", their values in ``spread_lo_um2_s`` …
            ``spread_hi_um2_s``, ``spread_above_um2_s`` for those above the range).
        rois: per ROI (dim ``roi``; one ROI "frame" when none were given), its disjoint
            tiles combined: ROI bbox, ``n_tiles``, the estimate columns (NaN, and
            ``disagree`` "tiles" or "windows" with the ``spread_*`` columns, as for tiles),
            ``tile_d_min_um2_s``/``tile_d_max_um2_s`` (the range of its tiles' values
            inside the model's range), ``text`` (the estimate in words, as the dashboard
            shows it: when ``flags`` says "disagree" — its tiles, or its successive windows,
            are not consistent with one D — the values of those parts, not a number) and, for a simulated recording,
            ``true_d_um2_s``.
        timing: the scan timing used; timing_source: where it came from.
        d_max_um2_s: top of the model's operating range for this timing, µm²/s.
        layout: the tiles and ROIs; frames: frames processed; stats: the runner's counters.
        warnings: every warning issued (also raised as :class:`DleStreamWarning`).
        combination: the runner's running combination (log-likelihoods per tile and ROI).
    """

    windows: ResultTable
    tiles: ResultTable
    rois: ResultTable
    timing: ScanTiming
    timing_source: str
    model: str
    estimator: str
    window_frames: int
    hop_frames: int
    d_max_um2_s: float
    frames: int
    layout: TileLayout = field(repr=False)
    stats: RunStats = field(repr=False)
    warnings: list[str] = field(default_factory=list)
    combination: RunningCombination | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The per-ROI estimates in words, one line each (as ``dle-stream replay`` prints them)."""
        lines = [f"{self.frames} frames, {self.stats.windows_done} windows of {self.window_frames} frames every "
                 f"{self.hop_frames}, {len(self.layout.tiles)} tiles ({self.estimator} · {self.model})"
                 + (f", {self.stats.gaps} gaps" if self.stats.gaps else "")]
        texts = self.rois["text"]
        truth = self.rois["true_d_um2_s"] if "true_d_um2_s" in self.rois.columns else None
        for i, name in enumerate(self.rois["roi"].tolist()):
            tail = "" if truth is None or not np.isfinite(truth[i]) else f"   (true {truth[i]:.3g})"
            lines.append(f"  {name}: {texts[i]}{tail}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


# ------------------------------------------------------------------------ the stream
class EstimateStream:
    """Frames in, :class:`WindowResult` out, as each window is estimated (see :func:`stream`).

    Iterate it once; :meth:`results` gives the :class:`Estimates` of the windows so far,
    :meth:`run` consumes the rest and returns them. Use it as a context manager (or call
    :meth:`close`) to release a recording it opened when you stop early.
    """

    def __init__(self, source: Any, timing: ScanTiming | None = None, *, model: str = DEFAULT_MODEL,
                 rois: Mapping[str, ROI] | Sequence[ROI] | None = None, window: int | None = None, hop: int = 50,
                 combine_windows: int | None = None, estimator: str = "dle", device: str = "cpu",
                 channel: int | None = None, realtime: bool = False):
        self.model = str(model)
        self.estimator = _check_choice(estimator)
        self.window = _check_count("window", window, allow_none=True)
        self.hop = _check_count("hop", hop)
        self.combine_windows = _check_count("combine_windows", combine_windows, allow_none=True)
        self.device = device
        self._rois = _parse_rois(rois)
        self.warnings: list[str] = []
        self.truth: dict[str, float] = {}
        self.timing_assumed = False
        self.runner: StreamRunner | None = None
        self._est: StreamEstimator | None = None
        self._recording: Recording | None = None
        self._owns_recording = False
        self._label = ""  # what to name in errors about frames (a file)
        self._results: list[WindowResult] = []
        self._iterator: Generator[WindowResult, None, None] | None = None
        self._finished = False
        self.n_frames: int | None = None

        if isinstance(source, (str, os.PathLike, Recording)):
            rec = self._init_recording(source, timing, channel, realtime)
            self._start(rec.height, rec.width)
        elif _is_movie(source):
            movie = self._init_movie(source, timing)
            self._label = "the movie"
            self._start(movie.shape[1], movie.shape[2])
        else:
            if not isinstance(source, Iterable):
                raise DleStreamError(f"source {type(source).__name__}: give a movie array [frames, height, width], a "
                                     f"recording path, or an iterable of frames (FrameEvent or 2-D arrays)")
            self.timing = _check_timing(timing, "a stream of frames")
            self.timing_source = "given"
            self._frames = iter(source)

    # ----------------------------------------------------------------- set-up
    def _init_recording(self, source: Any, timing: ScanTiming | None, channel: int | None,
                        realtime: bool) -> Recording:
        from dle_stream.recording import open_recording, resolve_timing
        from dle_stream.sources.file_source import FileSource

        if isinstance(source, Recording):
            rec = source
        else:
            rec = open_recording(Path(source).expanduser(), channel=channel)
            self._owns_recording = True
        self._recording = rec
        self._label = str(rec.path)
        try:
            name = rec.path.name
            if timing is not None:
                self.timing = _check_timing(timing, f"the frames of {name}", rec.height, rec.width)
                self.timing_source = "given"
            else:
                known = {"width_px": rec.width, "height_px": rec.height, **rec.timing_fields}
                missing = [n for n in ScanTiming.field_names() if n not in known]
                assumed: dict[str, Any] = {}
                if [n for n in missing if n != "bidirectional"]:
                    fallback = self._model_timing(rec, missing)
                    assumed = {n: getattr(fallback, n) for n in missing if n != "bidirectional"}
                    self.timing_assumed = True
                    self._warn(f"scan timing {', '.join(f'{k}={v:g}' for k, v in assumed.items())} ASSUMED from the "
                               f"model card of {self.model}: {name} does not say how it was scanned; D estimates are "
                               f"wrong unless the microscope used this timing; pass timing=ScanTiming(...) to give it")
                if "bidirectional" in missing:
                    assumed["bidirectional"] = False
                    self._warn(f"{name}: scan direction unknown, assumed unidirectional; pass timing=ScanTiming(..., "
                               f"bidirectional=True) if odd lines run backwards")
                self.timing, _, notes = resolve_timing(rec, flags=assumed)
                for note in notes:
                    self._warn(note)
                self.timing_source = f"{name} metadata ({rec.timing_source or 'none'})" + (
                    f"; {', '.join(n for n in assumed)} assumed" if assumed else "")
            if rec.truncated:
                self._warn(f"INCOMPLETE RECORDING: {rec.truncation_note}")
            self.n_frames = rec.n_frames
            self._frames = iter(FileSource(rec, realtime=realtime, frame_period_s=self.timing.frame_period_us * 1e-6))
        except BaseException:
            self._release()
            raise
        return rec

    def _model_timing(self, rec: Recording, missing: list[str]) -> ScanTiming:
        from dle_stream.session import model_timing_for

        try:
            return model_timing_for(self.model, rec.height, rec.width)
        except DleStreamError:
            raise DleStreamError(
                f"{rec.path.name}: the recording does not give its scan timing ({', '.join(missing)} missing) and the "
                f"timing of model {self.model} cannot describe its {rec.height}×{rec.width} px frames; pass "
                f"timing=ScanTiming(...) with the scan's timing") from None

    def _init_movie(self, source: Any, timing: ScanTiming | None) -> np.ndarray:
        movie = np.asarray(source)
        if movie.ndim != 3:
            raise DleStreamError(f"movie of shape {movie.shape}: expected [frames, height, width]")
        if movie.dtype.kind not in "biuf":
            raise DleStreamError(f"movie: expected numbers, got an array of {movie.dtype}")
        self.timing = _check_timing(timing, "the movie's frames", movie.shape[1], movie.shape[2])
        self.timing_source = "given"
        self.n_frames = int(movie.shape[0])
        period_s = self.timing.frame_period_us * 1e-6
        self._frames = (FrameEvent(frame=movie[k], index=k, timestamp_s=k * period_s) for k in range(movie.shape[0]))
        return movie

    def _start(self, height: int, width: int) -> None:
        """Load the estimator, lay out the tiles and set up the runner for frames of this size."""
        from dle_stream.model_package import load_card, resolve_model
        from dle_stream.session import truth_for
        from dle_stream.stream_estimators import make_stream_estimator

        try:
            if (self.timing.height_px, self.timing.width_px) != (height, width):
                raise DleStreamError(_size_message(self.timing, "the source's frames", height, width))
            from dle_stream.model_choice import serving_model

            card = load_card(resolve_model(self.model))
            comparison = card.timing.compare(self.timing)
            chosen = serving_model(self.timing, self.model, substitute=self.model == DEFAULT_MODEL)
            if chosen is not None and chosen[2] is not None:  # a family model serves this scan (as in replay)
                self._warn(chosen[2])
                self.model = str(chosen[0])
            elif chosen is None:
                from dle_stream.model_choice import family_for

                family = family_for(self.timing, card.d_min_um2_s, card.d_max_um2_s)
                raise DleStreamError(
                    f"model {self.model} was trained for another scan ({comparison.explain()}), so it cannot estimate "
                    f"D for this timing; " + (f"the family model {family[1].name} serves it: pass "
                                               f"model='{family[1].name}'" if family is not None else
                    "give the timing the movie was scanned with (line and frame period of the "
                    "full frame), or train a model for this scan with the `dle-stream train` command"))
            est, _ = make_stream_estimator(self.estimator, self.model, self.timing, self.device)
            window = self.window or est.window_frames
            if window < est.min_frames:
                raise DleStreamError(f"window={window}: the {est.name} estimator needs at least {est.min_frames} "
                                     f"frames per window (model {self.model} was trained on {est.window_frames}); "
                                     f"leave window=None for the model's window")
            if self.n_frames is not None and self.n_frames < window:
                raise DleStreamError(f"{self._label}: {self.n_frames} frames, fewer than one "
                                     f"{window}-frame window, so nothing can be estimated; pass a shorter window "
                                     f"(window={max(self.n_frames, 1)} or less, at least {est.min_frames})")
            layout = _layout(height, width, est.tile_shape, self._rois)
            apart = math.ceil(window / self.hop)
            keep = self.combine_windows
            if keep is None:
                if self.n_frames is None:
                    keep = RUNNING_WINDOWS
                else:  # every non-overlapping window of a movie of known length
                    keep = max(1, math.ceil(((self.n_frames - window) // self.hop + 1) / apart))
            self.runner = StreamRunner(est, layout, self.timing, window=window, hop=self.hop, live=False,
                                       timing_assumed=self.timing_assumed, combine_windows=keep)
        except BaseException:
            self._release()
            raise
        self._est = est
        self.layout = layout
        self.window = window
        self.runner.events.warning.connect(self._warn)
        if (note := calibration_note(est, window)) is not None:
            self._warn(note)
        if self._recording is not None:
            self.truth = truth_for(self._recording.path, layout)

    # ------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[WindowResult]:
        if self._iterator is None:
            self._iterator = self._generate()
        return self._iterator

    def __enter__(self) -> EstimateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop: end the iteration and close a recording this stream opened."""
        if self._iterator is not None:
            self._iterator.close()
        self._release()

    def _release(self) -> None:
        if self._recording is not None and self._owns_recording:
            self._recording.close()
            self._owns_recording = False

    def _generate(self) -> Generator[WindowResult, None, None]:
        index = 0
        try:
            for item in self._frames:
                if not isinstance(item, FrameEvent) and isinstance(getattr(item, "message", None), str):
                    self._warn(item.message)  # a live source's notice (no frame for a while)
                    continue
                event = item if isinstance(item, FrameEvent) else FrameEvent(frame=np.asarray(item), index=index)
                index += 1
                if self.runner is None:
                    shape = np.shape(event.frame)
                    if len(shape) != 2:
                        raise DleStreamError(f"frame {event.index} of shape {shape}: expected a 2-D frame [height, width]")
                    self._start(*shape)
                for est in self._process(event):
                    result = self._window_result(est)
                    self._results.append(result)
                    yield result
            self._finished = True
        finally:
            self._release()

    def _process(self, event: FrameEvent) -> list[WindowEstimate]:
        assert self.runner is not None
        try:
            return self.runner.process(event)
        except DleStreamError as exc:
            if not self._label or self._label in str(exc):
                raise
            raise DleStreamError(f"{self._label}: {exc}") from None

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        _warnings.warn(message, DleStreamWarning, stacklevel=_caller_level())

    # --------------------------------------------------------------- results
    def run(self) -> Estimates:
        """Estimate every remaining frame and return all the results."""
        for _ in self:
            pass
        return self.results()

    def results(self) -> Estimates:
        """The :class:`Estimates` of the windows estimated so far."""
        if self.runner is None:
            raise DleStreamError("no frames have been estimated yet: the source gave no frame")
        windows = ResultTable.concat([r.tiles for r in self._results], dims=("window", "tile"),
                                     name="estimates per window and tile", columns=WINDOW_COLUMNS)
        return Estimates(
            windows=windows, tiles=self._tile_table(), rois=self._roi_table(), timing=self.timing,
            timing_source=self.timing_source, model=self.model, estimator=self.runner.est.name,
            window_frames=self.runner.window, hop_frames=self.hop, d_max_um2_s=float(self.runner.est.d_max_um2_s),
            frames=self.runner.stats.frames_in, layout=self.layout, stats=self.runner.stats,
            warnings=list(self.warnings), combination=self.runner.combination)

    def _window_result(self, est: WindowEstimate) -> WindowResult:
        n = len(self.layout.tiles)
        bbox = self.layout.bboxes
        i68 = est.interval68_um2_s if est.interval68_um2_s is not None else np.full((n, 2), np.nan)
        i95 = est.interval95_um2_s if est.interval95_um2_s is not None else np.full((n, 2), np.nan)
        p_above = est.p_above if est.p_above is not None else np.full(n, np.nan)
        above = (np.asarray(est.flags, dtype=np.uint8) & np.uint8(EstimateFlag.ABOVE_RANGE)) != 0
        lower95 = np.where(above, est.lower95_um2_s if est.lower95_um2_s is not None else np.nan, np.nan)
        tiles = ResultTable({
            "window": np.full(n, est.window), "frame_start": np.full(n, est.frame_start),
            "frame_stop": np.full(n, est.frame_stop), "t_start_s": np.full(n, est.t_start_s),
            "t_stop_s": np.full(n, est.t_stop_s), "wall_time": np.full(n, est.wall_time),
            "tile": np.arange(n), "row": bbox[:, 0], "col": bbox[:, 1], "height": bbox[:, 2], "width": bbox[:, 3],
            "d_um2_s": est.d_um2_s, "sigma_um2_s": est.sigma_um2_s, "lo68_um2_s": i68[:, 0], "hi68_um2_s": i68[:, 1],
            "lo95_um2_s": i95[:, 0], "hi95_um2_s": i95[:, 1], "p_above": p_above, "lower95_um2_s": lower95,
            "flags": np.array([flag_text(b) for b in est.flags], dtype=object),
            "flag_bits": np.asarray(est.flags, dtype=np.uint8),
        }, dims=("window", "tile"), name=f"window {est.window} per tile", coords=WINDOW_COORDS)
        return WindowResult(est.window, est.frame_start, est.frame_stop, est.t_start_s, est.t_stop_s, tiles,
                            self._roi_table(), est)

    def _flags(self, post, i: np.ndarray | slice, disagree: np.ndarray) -> np.ndarray:
        d = post.d[i]
        bits = np.zeros(np.shape(d), dtype=np.uint8)
        finite = np.isfinite(d)
        bits[~finite] |= np.uint8(EstimateFlag.NO_ESTIMATE)
        bits[post.above_range[i] & finite] |= np.uint8(EstimateFlag.ABOVE_RANGE)
        bits[post.little_information[i] & finite] |= np.uint8(EstimateFlag.LITTLE_INFORMATION)
        bits[np.asarray(disagree, dtype=bool) & finite] |= np.uint8(EstimateFlag.DISAGREE)
        if self.timing_assumed:
            bits |= np.uint8(EstimateFlag.TIMING_ASSUMED)
        return bits

    @staticmethod
    def _estimate_columns(post, bits: np.ndarray, spreads: list | None = None) -> dict[str, np.ndarray]:
        """The estimate columns; with ``spreads`` (combined estimates: a
        :class:`~dle_stream.combine.Spread` where the parts disagree), no number where they
        disagree, and what disagrees (``disagree``: "tiles", "windows" or "") with the parts'
        values (``spread_lo_um2_s``, ``spread_hi_um2_s``, ``spread_above_um2_s``: the "D > x"
        of parts above the range)."""
        cols = {"d_um2_s": post.d, "sigma_um2_s": post.sigma, "lo68_um2_s": post.lo68, "hi68_um2_s": post.hi68,
                "lo95_um2_s": post.lo95, "hi95_um2_s": post.hi95, "p_above": post.p_above,
                "lower95_um2_s": np.where(post.above_range, post.lower95_wide, np.nan),
                "flags": np.array([flag_text(b) for b in bits], dtype=object), "flag_bits": bits}
        if spreads is None:
            return cols
        flagged = np.array([sp is not None for sp in spreads], dtype=bool)
        for name in ("d_um2_s", "sigma_um2_s", "lo68_um2_s", "hi68_um2_s", "lo95_um2_s", "hi95_um2_s", "lower95_um2_s"):
            cols[name] = np.where(flagged, np.nan, cols[name])
        cols["disagree"] = np.array(["" if sp is None else sp.what for sp in spreads], dtype=object)
        for name, attr in (("spread_lo_um2_s", "lo_um2_s"), ("spread_hi_um2_s", "hi_um2_s"),
                            ("spread_above_um2_s", "above_um2_s")):
            cols[name] = np.array([np.nan if sp is None else getattr(sp, attr) for sp in spreads], dtype=float)
        return cols

    def _tile_table(self) -> ResultTable:
        assert self.runner is not None
        c = self.runner.combination
        bbox = self.layout.bboxes
        bits = self._flags(c.tile, slice(None), c.tile_disagree)
        return ResultTable({"tile": np.arange(len(bbox)), "row": bbox[:, 0], "col": bbox[:, 1],
                            "height": bbox[:, 2], "width": bbox[:, 3], "n_windows": np.asarray(c.tile_windows),
                            **self._estimate_columns(c.tile, bits, c.tile_spread)}, dims=("tile",),
                           name="combined estimates per tile",
                           coords={c: ("tile",) for c in ("row", "col", "height", "width")})

    def _roi_table(self) -> ResultTable:
        assert self.runner is not None
        c = self.runner.combination
        regions = self.layout.regions
        bbox = np.array([r.bbox for r in regions], dtype=np.int64).reshape(-1, 4)
        bits = self._flags(c.region, slice(None), np.array([s is not None for s in c.region_spread], dtype=bool))
        text = [report.estimate_text(c.region, i, spread=c.region_spread[i]) for i in range(len(regions))]
        n_windows = [int(np.min(c.tile_windows[r.tiles])) if r.tiles else 0 for r in regions]
        columns = {"roi": np.array([r.name for r in regions], dtype=object), "row": bbox[:, 0], "col": bbox[:, 1],
                   "height": bbox[:, 2], "width": bbox[:, 3], "n_tiles": np.array([len(r.tiles) for r in regions]),
                   "n_windows": np.array(n_windows), **self._estimate_columns(c.region, bits, c.region_spread),
                   "tile_d_min_um2_s": c.region_tile_range[:, 0].copy(),
                   "tile_d_max_um2_s": c.region_tile_range[:, 1].copy(), "text": np.array(text, dtype=object)}
        if self.truth:
            columns["true_d_um2_s"] = np.array([self.truth.get(r.name, np.nan) for r in regions], dtype=float)
        return ResultTable(columns, dims=("roi",), name="combined estimates per ROI",
                           coords={c: ("roi",) for c in ("row", "col", "height", "width", "n_tiles")})


# ------------------------------------------------------------------ the functions
def estimate(movie: Any, timing: ScanTiming, *, model: str = DEFAULT_MODEL,
             rois: Mapping[str, ROI] | Sequence[ROI] | None = None, window: int | None = None, hop: int = 50,
             combine_windows: int | None = None, estimator: str = "dle", device: str = "cpu") -> Estimates:
    """Estimate D (µm²/s) for a movie array [frames, height, width] of any frame size.

    Args:
        movie: raw intensities (any numeric dtype), frames in acquisition order.
        timing: the scan timing of the *full* frame (``width_px``, ``height_px`` = the
            movie's frame size): each 20×20 px tile is read at its raster offsets in it.
            A timing whose ratios differ from the model's is refused.
        model: a model package name or folder (default: the shipped ``brain-qd-low``).
        rois: regions of interest, ``{name: (x, y, w, h)}`` in pixels (x = column,
            y = row, as image viewers), or a list of (x, y, w, h); each is covered by
            disjoint model tiles. Default: the whole frame as a grid of tiles (ROI "frame").
        window: frames per window (default: the model's, 400); hop: frames between windows.
        combine_windows: non-overlapping windows combined per tile (default: all of them).
        estimator: "dle" (the model), "classic" (trackpy + CVE) or "rics".
        device: "cpu" or "cuda".

    Returns:
        :class:`Estimates`: ``.windows`` (per window and tile), ``.tiles`` and ``.rois``
        (combined), each a table with ``.to_pandas()`` and ``.to_xarray()``.
    """
    with EstimateStream(movie, _require_timing(timing), model=model, rois=rois, window=window, hop=hop,
                        combine_windows=combine_windows, estimator=estimator, device=device) as s:
        return s.run()


def estimate_recording(path: str | os.PathLike | Recording, *, timing: ScanTiming | None = None,
                       model: str = DEFAULT_MODEL, rois: Mapping[str, ROI] | Sequence[ROI] | None = None,
                       window: int | None = None, hop: int = 50, combine_windows: int | None = None,
                       estimator: str = "dle", device: str = "cpu", channel: int | None = None) -> Estimates:
    """Estimate D (µm²/s) for a recording on disk (TIFF, OME-TIFF, ImageJ, ScanImage, Zarr).

    The scan timing is read from the recording's metadata; fields it lacks are taken
    from the model card with a :class:`DleStreamWarning` and the estimates flagged
    "timing assumed" (as ``dle-stream replay`` does); ``timing`` overrides it all. The
    other arguments are those of :func:`estimate`; ``channel`` picks one channel of a
    multi-channel file. A simulated recording's truth (``.truth.json``) appears as the
    ``true_d_um2_s`` column of ``.rois``.
    """
    with EstimateStream(path, timing, model=model, rois=rois, window=window, hop=hop,
                        combine_windows=combine_windows, estimator=estimator, device=device, channel=channel) as s:
        return s.run()


def stream(source: Any, timing: ScanTiming | None = None, *, model: str = DEFAULT_MODEL,
           rois: Mapping[str, ROI] | Sequence[ROI] | None = None, window: int | None = None, hop: int = 50,
           combine_windows: int | None = None, estimator: str = "dle", device: str = "cpu",
           channel: int | None = None, realtime: bool = False) -> EstimateStream:
    """An iterator of :class:`WindowResult`, one as each window is estimated.

    ``source``: a recording path (its timing from the metadata unless ``timing`` is
    given; ``realtime`` paces it by the recorded times), a movie array [T, H, W], or any
    iterable of frames: :class:`~dle_stream.events.FrameEvent` (e.g. a
    :class:`~dle_stream.sources.MicroManagerSource`, whose stall notices become
    warnings) or 2-D arrays, which then need ``timing``. ``combine_windows`` defaults
    to all windows for a source of known length and to the latest 8 non-overlapping
    windows for an endless one. Other arguments as :func:`estimate`.

    Example::

        for w in dle.stream("rec.tif", window=200, hop=100):
            print(w.t_stop_s, w.rois["d_um2_s"])
    """
    return EstimateStream(source, timing, model=model, rois=rois, window=window, hop=hop,
                          combine_windows=combine_windows, estimator=estimator, device=device, channel=channel,
                          realtime=realtime)


def open_log(path: str | os.PathLike) -> Any:
    """A run log (``--log RUN.zarr``) as an :class:`xarray.Dataset` of its committed windows.

    Only windows the writer committed are there: a log whose run was killed, or is still
    running, shows every window it reported and no half-written one. D and its intervals
    are in µm²/s: ``d``, ``sigma``, ``lo68``, ``hi68``, ``lo95``, ``hi95`` [window, tile],
    with ``p_above`` and ``flags`` (:class:`~dle_stream.events.EstimateFlag` bits). The
    coordinates are the window's frames and times (``time_s``, the middle of the window in
    acquisition time, s, is indexed), each tile's box in pixels (``row``, ``col``,
    ``height``, ``width``) and ROI membership (``in_roi`` [roi, tile])::

        ds = dle.open_log("run.zarr")
        ds.d.sel(tile=3)                                   # one tile's D over time
        ds.d.sel(tile=ds.in_roi.sel(roi="vessel"))         # the tiles of an ROI

    Needs xarray (``pip install xarray``). The low-level reader is
    :func:`dle_stream.zarr_log.open_log` (numpy arrays, no xarray).

    Raises:
        DleStreamError: ``path`` is missing or not a run log, or xarray is not installed.
    """
    from dle_stream.results import require_xarray
    from dle_stream.zarr_log import open_log as open_log_view

    require_xarray("open_log")
    return open_log_view(Path(path).expanduser()).to_xarray()


# ------------------------------------------------------------------- checks
def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside dle-stream (and psygnal, which relays
    the runner's warnings), so that a warning points at the caller's line."""
    frame: FrameType | None = sys._getframe(2)
    level = 2  # _warn is level 1, its caller 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or f"{os.sep}psygnal{os.sep}" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _is_movie(source: Any) -> bool:
    if isinstance(source, np.ndarray):
        return True
    shape = getattr(source, "shape", None)
    return shape is not None and len(shape) == 3 and hasattr(source, "__array__")


def _require_timing(timing: Any) -> ScanTiming:
    if timing is None:
        raise DleStreamError("estimate: a movie array needs its scan timing: pass timing=ScanTiming(...) describing "
                             "the full frame (or use estimate_recording for a file whose metadata holds it)")
    return timing


def _check_timing(timing: Any, what: str, height: int | None = None, width: int | None = None) -> ScanTiming:
    if timing is None:
        raise DleStreamError(f"{what} need a scan timing: pass timing=ScanTiming(...) describing the full frame")
    if not isinstance(timing, ScanTiming):
        raise DleStreamError(f"timing: expected a dle_stream.ScanTiming, got {type(timing).__name__}")
    if height is not None and width is not None and (timing.height_px, timing.width_px) != (height, width):
        raise DleStreamError(_size_message(timing, what, height, width))
    return timing


def _size_message(timing: ScanTiming, what: str, height: int, width: int) -> str:
    return (f"timing describes {timing.height_px}×{timing.width_px} px frames but {what} are {height}×{width} px: "
            f"give the timing of the full {height}×{width} frame as it was scanned (if its line and frame periods "
            f"are those of this frame, dataclasses.replace(timing, height_px={height}, width_px={width}); "
            f"ScanTiming.with_frame_size changes the line and frame periods, which makes another scan)")


def _check_choice(estimator: Any) -> str:
    if estimator not in ESTIMATORS:
        raise DleStreamError(f"estimator={estimator!r}: use one of {', '.join(repr(e) for e in ESTIMATORS)}")
    return str(estimator)


def _check_count(name: str, value: Any, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DleStreamError(f"{name}={value!r}: must be a whole number of at least 1"
                             + (" (or None for the default)" if allow_none else ""))
    return int(value)


def _parse_rois(rois: Any) -> list[Region] | None:
    if rois is None:
        return None
    if isinstance(rois, Mapping):
        items = [(str(k), v) for k, v in rois.items()]
    elif isinstance(rois, Sequence) and not isinstance(rois, str):
        items = [(f"roi{i}", v) for i, v in enumerate(rois)]
    else:
        raise DleStreamError(f"rois: give {{name: (x, y, w, h)}} or a list of (x, y, w, h) in pixels, got "
                             f"{type(rois).__name__}")
    if not items:
        raise DleStreamError("rois: holds no ROI; give at least one (x, y, w, h) or leave rois=None for the whole frame")
    regions = []
    for name, box in items:
        try:
            values = [v for v in box]
            ok = len(values) == 4 and all(not isinstance(v, bool) and float(v).is_integer() for v in values)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DleStreamError(f"rois: ROI {name!r} is {box!r}; give (x, y, w, h) in whole pixels "
                                 f"(x = column, y = row)")
        x, y, w, h = (int(v) for v in values)
        regions.append(Region(name, (y, x, h, w)))
    return regions


def _layout(height: int, width: int, tile_shape: tuple[int, int], rois: list[Region] | None) -> TileLayout:
    if rois is None:
        return grid_layout(height, width, *tile_shape)
    for roi in rois:
        r, c, h, w = roi.bbox
        if h < 1 or w < 1 or r < 0 or c < 0 or r + h > height or c + w > width:
            raise DleStreamError(f"rois: ROI {roi.name!r} (x={c}, y={r}, w={w}, h={h}) lies outside the "
                                 f"{width}×{height} px frame (width × height); give ROIs inside it")
    return roi_layout(height, width, *tile_shape, rois)
