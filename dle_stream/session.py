"""Set up and run a stream: a replayed recording or a live microscope.

These functions hold everything the CLI's `replay` and `run` do, so tests call them
directly: resolve the scan timing (flags > timing file > recording metadata > model
card, loudly), load the estimator and check the timing against the model, lay out the
tiles and ROIs, open the Zarr log, and drive a :class:`~dle_stream.runner.StreamRunner`
with a dashboard.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console

from dle_stream import __version__, report
from dle_stream.combine import RunningCombination
from dle_stream.dashboard import Dashboard
from dle_stream.errors import DleStreamError, EstimatorChoiceError, ParameterError, RoiError, TimingError, arg
from dle_stream.log_attrs import RunMetadata
from dle_stream.protocols import FrameSource, LiveFrameSource, StreamEstimator
from dle_stream.runner import RunStats, StreamRunner
from dle_stream.stream_estimators import calibration_note, make_stream_estimator
from dle_stream.tiling import TileLayout, grid_layout, parse_roi, read_rois, roi_layout
from dle_stream.timing import ScanTiming, TimingComparison

if TYPE_CHECKING:
    from dle_stream.zarr_log import ZarrLog

DEFAULT_MODEL = "brain-qd-low"


@dataclass
class StreamOptions:
    """What the user chose for a stream (the CLI's flags).

    ``parameter_names`` says how warnings name a parameter (e.g. a timing field) to the
    user: parameter → the CLI's flag; unnamed ones read as the Python names.
    """

    model: str = DEFAULT_MODEL
    estimator: str = "dle"
    tiles: str = "grid"
    roi: list[str] = field(default_factory=list)
    rois_file: Path | None = None
    window: int | None = None
    hop: int = 50
    log: Path | None = None
    overwrite: bool = False
    append: bool = False
    timing_flags: dict = field(default_factory=dict)
    timing_file: Path | None = None
    device: str = "cpu"
    dashboard: str = "plain"  # live | plain | quiet
    combine_windows: int = 8
    parameter_names: dict[str, str] = field(default_factory=dict)
    #: run the recording check (:func:`dle_stream.recording_check.replay_check`) before a replay
    recording_check: bool = True
    #: set when the asked model does not serve the scan and a family model does (then
    #: ``model`` is that family model's folder): the one line that says so
    model_note: str | None = None


@dataclass
class StreamResult:
    stats: RunStats
    layout: TileLayout
    timing: ScanTiming
    region_d: np.ndarray
    region_sigma: np.ndarray
    tile_d: np.ndarray
    tile_sigma: np.ndarray
    log_path: Path | None
    warnings: list[str]
    truth: dict
    combination: RunningCombination | None = None
    #: the recording check's verdict (replay; :func:`dle_stream.recording_check.replay_check`)
    recording_check: dict | None = None
    #: why a live run could not finish (the acquisition failed, or ended before any window
    #: was estimated); None when it did, or when the user stopped it
    failure: str | None = None


def make_layout(height: int, width: int, tile_shape: tuple[int, int], opts: StreamOptions) -> TileLayout:
    if opts.tiles != "grid":
        raise RoiError(f"{arg('tiles', opts.tiles)}: only 'grid' is supported (or give ROIs: {arg('roi')} or "
                       f"{arg('rois_file')})")
    regions = [parse_roi(r) for r in opts.roi]
    if opts.rois_file is not None:
        regions += read_rois(opts.rois_file)
    if regions:
        return roi_layout(height, width, *tile_shape, regions)
    return grid_layout(height, width, *tile_shape)


def model_timing_for(model: str, height: int, width: int) -> ScanTiming:
    """The model card's timing, as the fallback for a frame of this size."""
    from dle_stream.model_package import load_card, resolve_model

    t = load_card(resolve_model(model)).timing
    try:
        return ScanTiming(t.pixel_size_um, t.dwell_us, t.line_period_us, t.frame_period_us,
                          max(width, t.width_px), max(height, t.height_px), t.bidirectional)
    except DleStreamError:
        raise TimingError(
            f"the scan timing of model {model} (line {t.line_period_us:g} µs, frame {t.frame_period_us:g} µs) "
            f"cannot describe {height}×{width} px frames, and the recording does not say how it was scanned; give "
            f"{arg('dwell_us')}, {arg('line_period_us')}, {arg('frame_period_us')}, {arg('pixel_size_um')} (or "
            f"{arg('timing_file')}), and train a model for that scan with `dle-stream train --like RECORDING`"
        ) from None


def truth_for(recording_path: Path, layout: TileLayout) -> dict:
    """True D per ROI from a simulated recording's ``.truth.json`` (mean over its tiles' area)."""
    path = recording_path.with_name(recording_path.name + ".truth.json")
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        d_map = np.full((layout.frame_height, layout.frame_width), np.nan)
        for t in doc["tiles"]:
            r, c, h, w = t["bbox"]
            d_map[r:r + h, c:c + w] = t["d_um2_s"]
    except (KeyError, ValueError, TypeError, IndexError):
        return {}
    return region_truth(layout, d_map)


def region_truth(layout: TileLayout, d_map: np.ndarray) -> dict:
    """Mean true D (µm²/s) over the area of each ROI's tiles, from a map [H, W]."""
    out = {}
    for region in layout.regions:
        area = np.zeros(d_map.shape, dtype=bool)
        for i in region.tiles:
            r, c, h, w = layout.tiles[i].bbox
            area[r:r + h, c:c + w] = True
        out[region.name] = float(np.nanmean(d_map[area]))
    return out


def _open_log(opts: StreamOptions, layout: TileLayout, attrs: dict, est: StreamEstimator) -> ZarrLog | None:
    if opts.log is None:
        return None
    from dle_stream.zarr_log import ZarrLog

    return ZarrLog.create(opts.log, tile_bboxes=layout.bboxes, rois=[r.to_dict() for r in layout.regions],
                          attrs=attrs, overwrite=opts.overwrite, append=opts.append, grid=est.grid,
                          d_max_um2_s=est.d_max_um2_s)


def _run(runner: StreamRunner, events: FrameSource, dashboard: Dashboard) -> None:
    with dashboard:
        for event in events:
            runner.process(event)
            dashboard.refresh()
    runner.finish()


def _offsets(log: ZarrLog | None) -> dict[str, int]:
    """The window and frame numbers a dashboard adds to show them as the log stores them."""
    if log is None:
        return {}
    return {"window_offset": log.window_offset, "frame_offset": log.frame_offset}


def _attrs(kind: str, source: str, est: StreamEstimator, timing: ScanTiming, timing_source: str, layout: TileLayout,
           runner_window: int, hop: int, warnings: list[str], comparison: TimingComparison,
           recording_check: dict | None = None) -> dict:
    """The run's metadata for its log (:class:`dle_stream.log_attrs.RunMetadata`)."""
    card = getattr(getattr(est, "estimator", None), "card", None)
    from dataclasses import asdict, is_dataclass

    return RunMetadata(
        software=f"dle-stream {__version__}", mode=kind, source=source, estimator=est.name,
        model_card=asdict(card) if is_dataclass(card) and not isinstance(card, type) else None,
        scan_timing=timing.to_dict(), timing_source=timing_source, timing_warnings=tuple(warnings),
        tile_geometry={"frame_height_px": layout.frame_height, "frame_width_px": layout.frame_width,
                       "tile_height_px": est.tile_shape[0], "tile_width_px": est.tile_shape[1],
                       "n_tiles": len(layout.tiles), "uncovered_px": layout.uncovered_px},
        window_frames=runner_window, hop_frames=hop,
        start_time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        timing_comparison=comparison.explain(), recording_check=recording_check,
    ).to_json()


def replay(recording: Path, opts: StreamOptions, *, realtime: bool = False, channel: int | None = None,
           console: Console | None = None) -> StreamResult:
    """Replay a recording (TIFF family or Zarr) through the estimator.

    With ``opts.append`` the log of an earlier (e.g. killed) replay of the same recording
    with the same settings is continued from the first window it does not hold: no window
    or frame is logged twice."""
    from dle_stream.recording import open_recording, resolve_timing
    from dle_stream.sources.file_source import FileSource

    recording = Path(recording)
    console = console or Console()
    _check_window(opts)
    rec = open_recording(recording, channel=channel)
    try:
        try:
            fallback: ScanTiming | None = model_timing_for(opts.model, rec.height, rec.width)
            card_error = None
        except DleStreamError as exc:  # the card cannot describe this frame: the recording may
            fallback, card_error = None, exc
        try:
            resolved = resolve_timing(
                rec, flags=opts.timing_flags, timing_file=opts.timing_file, fallback=fallback,
                fallback_label=f"the model card of {opts.model}", names=opts.parameter_names,
            )
            timing, timing_source, warnings = resolved
        except DleStreamError:
            if card_error is not None:
                raise card_error from None
            raise
        if rec.truncated:
            warnings.append(f"INCOMPLETE RECORDING: {rec.truncation_note}")
        est, comparison = _estimator_for(opts, timing, recording)
        if opts.model_note:
            warnings.insert(0, opts.model_note)
        layout = make_layout(rec.height, rec.width, est.tile_shape, opts)
        window = opts.window or est.window_frames
        if (note := calibration_note(est, window)) is not None:
            warnings.append(note)
        if rec.n_frames < window:
            raise ParameterError(
                f"{recording}: {rec.n_frames} usable frames, fewer than one {window}-frame window, so nothing can be "
                f"estimated" + (f" ({rec.truncation_note})" if rec.truncated else "")
                + f"; use a shorter {arg('window')} (at most {rec.n_frames})" * (rec.n_frames > 0)
                + "; re-export or re-acquire the recording" * (rec.n_frames == 0))
        check = _recording_check(rec, recording, opts, timing)
        attrs = _attrs("replay", str(recording), est, timing, timing_source, layout, window, opts.hop, warnings,
                       comparison, check)
        log = _open_log(opts, layout, attrs, est)
        runner = StreamRunner(est, layout, timing, window=window, hop=opts.hop, live=False,
                              timing_assumed=bool(resolved.assumed), combine_windows=opts.combine_windows,
                              images_lost_before=log.images_lost_before if log is not None else 0)
        if log is not None:
            runner.attach(log)
        _warnings_to_stderr(runner, opts)
        for w in warnings:
            runner.warn(w)
        truth = truth_for(recording, layout)
        dashboard = Dashboard(runner, source=f"replay {recording.name}", model=f"{est.name} · {opts.model}",
                              mode=opts.dashboard, console=console, truth=truth, **_offsets(log))
        if opts.dashboard == "plain":
            for w in warnings:
                console.print(f"warning: {w}", highlight=False, markup=False)
        _announce_check(check, runner, opts, console)
        start = getattr(log, "resume_frame", 0) if log is not None else 0
        if start + window > rec.n_frames:  # a resumed replay with nothing left to estimate
            runner.warn(f"{opts.log} already holds every window of {recording.name}; nothing to add")
            start = rec.n_frames
        try:
            _run(runner, FileSource(rec, realtime=realtime, frame_period_s=timing.frame_period_us * 1e-6,
                                    start=start), dashboard)
        except DleStreamError as exc:
            if str(recording) in str(exc) or recording.name in str(exc):
                raise
            raise exc.with_prefix(f"{recording}: ") from None  # say which file the frame came from
        finally:
            if log is not None:
                log.close()
    finally:
        rec.close()
    c = runner.combination
    return StreamResult(runner.stats, layout, timing, c.region_d.copy(), c.region_sigma.copy(), c.tile_d.copy(),
                        c.tile_sigma.copy(), opts.log, runner.stats.warnings, truth, c, check)


def _recording_check(rec, recording: Path, opts: StreamOptions, timing: ScanTiming) -> dict:
    """The recording check's verdict for a replay (skipped with the reason where it does not apply)."""
    from dle_stream.recording_check import replay_check

    if not opts.recording_check:
        flag = opts.parameter_names.get("no_check")
        return _skipped_check(f"turned off with {flag}" if flag else "turned off (recording_check=False)")
    if opts.estimator != "dle":
        return _skipped_check(f"estimator {opts.estimator}: the check compares a recording with a DLE model's "
                              f"training")
    return replay_check(rec, opts.model, timing, label=str(recording))


class _LiveCheck:
    """The recording check of a live run, on its first full model window: the frames' crops of
    the tiles looked at are kept until the window is full (not whole frames), then checked in a
    thread so that the stream does not wait. :meth:`poll` gives the verdict once, when ready."""

    def __init__(self, opts: StreamOptions, timing: ScanTiming, height: int, width: int) -> None:
        from dle_stream.model_package import load_card, resolve_model
        from dle_stream.recording_check import REPLAY_MAX_TILES, tiles_looked_at

        self.opts, self.timing = opts, timing
        self.result: dict | None = None
        self._done: dict | None = None
        self._thread: threading.Thread | None = None
        self._crops: list[np.ndarray] = []
        self.window = 0
        if not opts.recording_check:
            flag = opts.parameter_names.get("no_check")
            self.result = _skipped_check(f"turned off with {flag}" if flag else "turned off (recording_check=False)")
            return
        if opts.estimator != "dle":
            self.result = _skipped_check(f"estimator {opts.estimator}: the check compares a recording with a DLE "
                                         f"model's training")
            return
        try:
            card = load_card(resolve_model(opts.model))
            self.window = card.window_frames
            self.tile_shape = (card.tile_height, card.tile_width)
            self.tiles = tiles_looked_at(height, width, self.tile_shape, REPLAY_MAX_TILES)
        except Exception as exc:  # the check must never stop a run
            self.result = _skipped_check(f"the check failed: {' '.join(str(exc).split()) or type(exc).__name__}")

    @property
    def collecting(self) -> bool:
        return self.result is None and self._thread is None

    def add(self, frame: np.ndarray) -> None:
        if not self.collecting:
            return
        th, tw = self.tile_shape
        try:
            frame = np.asarray(frame)
            # the tiles side by side: a mosaic whose grid is exactly the tiles looked at
            self._crops.append(np.concatenate([frame[r:r + th, c:c + tw] for r, c, _, _ in (t.bbox for t in self.tiles)],
                                              axis=1))
        except Exception as exc:  # e.g. a frame of another size: the runner reports it; the check gives up
            self.result = _skipped_check(f"the check failed: {' '.join(str(exc).split()) or type(exc).__name__}")
            self._crops = []
            return
        if len(self._crops) == self.window:
            mosaic, self._crops = np.stack(self._crops), []
            self._thread = threading.Thread(target=self._check, args=(mosaic,), daemon=True, name="recording-check")
            self._thread.start()

    def _check(self, mosaic: np.ndarray) -> None:
        from dle_stream.recording_check import replay_check

        self._done = replay_check(mosaic, self.opts.model, self.timing, windows=1, max_tiles=None)

    def poll(self) -> dict | None:
        """The verdict, the first time it is ready (None before and after)."""
        if self.result is None and self._done is not None:
            self.result = self._done
            return self.result
        return None

    def final(self, frames: int) -> dict:
        """The verdict at the end of the run (waiting for a check still running)."""
        if self._thread is not None and self.result is None:
            self._thread.join(timeout=20)
            self.poll()
        if self.result is None:
            self.result = _skipped_check(f"the run ended after {frames} frames, before one {self.window}-frame window")
        return self.result


def _skipped_check(reason: str) -> dict:
    return {"status": "skipped", "line": f"recording check: skipped ({reason})", "result": None, "reason": reason}


def _estimator_for(opts: StreamOptions, timing: ScanTiming,
                   recording: Path | None) -> tuple[StreamEstimator, TimingComparison]:
    """The stream estimator for this scan, or one line naming the nearest model and the
    train command when the chosen model does not serve it."""
    from dle_stream.model_choice import no_model_message, serving_model

    # only the default model gives way to a family model; a model the user named is kept (or refused)
    chosen = serving_model(timing, opts.model, substitute=opts.model == DEFAULT_MODEL)
    if chosen is None:
        raise EstimatorChoiceError(no_model_message(timing, recording, opts.model))
    folder, _, note = chosen
    if note is not None:  # a family model serves the scan the asked model does not: the log names it
        opts.model = str(folder)
        opts.model_note = note
    return make_stream_estimator(opts.estimator, opts.model, timing, opts.device)


def _check_window(opts: StreamOptions) -> None:
    if opts.window is not None and opts.window < 1:
        raise ParameterError(f"{arg('window', opts.window)}: must be at least 1 frame; leave it out for the "
                             f"model's window")


def _warnings_to_stderr(runner: StreamRunner, opts: StreamOptions) -> None:
    """With --quiet (no dashboard), warnings still reach the user: one line each on stderr."""
    if opts.dashboard != "quiet":
        return
    err = Console(stderr=True, soft_wrap=True)
    runner.events.warning.connect(lambda message: err.print(f"warning: {message}", highlight=False, markup=False))


def describe_result(result: StreamResult, console: Console) -> None:
    """Print the final per-ROI estimates (next to the truth where known)."""
    st = result.stats
    console.print(f"{st.frames_in} frames, {st.windows_done} windows"
                  + (f", {st.windows_skipped} skipped" if st.windows_skipped else "")
                  + (f", {st.gaps} gaps" if st.gaps else "")
                  + (f"; log: {result.log_path}" if result.log_path else ""), highlight=False, markup=False)
    if result.recording_check is not None:
        console.print(result.recording_check["line"], highlight=False, markup=False, soft_wrap=True)
    c = result.combination
    for i, region in enumerate(result.layout.regions[:30]):
        if c is None:
            continue
        text = report.estimate_text(c.region, i, spread=c.region_spread[i], truth=result.truth.get(region.name))
        console.print(f"  {region.name}: {text}", highlight=False, markup=False)


def demo_timing(model: str, height: int, width: int) -> ScanTiming:
    """The demo camera's scan: the model's timing when the frame fits in its line and
    frame period (so the model applies), else the model's dwell, retrace and flyback
    (:meth:`ScanTiming.for_frame`)."""
    return model_timing_for(model, 1, 1).for_frame(height, width)


def run_live(opts: StreamOptions, *, demo: bool = False, mm_config: Path | None = None,
             scan_properties: Path | None = None, frames: int | None = None, height: int = 40, width: int = 120,
             d_spec: str = "0.3,1.2", seed: int = 0, realtime: bool = True, stall_timeout_s: float = 5.0,
             console: Console | None = None, core=None) -> StreamResult:
    """Estimate live from a Micro-Manager acquisition (a real rig's configuration, or the
    built-in simulated two-photon camera with ``demo``)."""
    from dle_stream.sources import MicroManagerSource, SourceStalled
    from dle_stream.sources.scan_properties import DEMO_CAMERA_MAPPING, load_mapping, read_scan_properties

    console = console or Console()
    _check_window(opts)
    if core is None:
        if demo == (mm_config is not None):
            raise ParameterError(f"give either {arg('demo', True)} or {arg('mm_config')} (a Micro-Manager "
                                 f"configuration file)")
        if demo:
            from dle_stream.sources.demo_camera import create_demo_core

            core = create_demo_core(height=height, width=width, timing=demo_timing(opts.model, height, width),
                                    d_spec=d_spec, seed=seed, realtime=realtime)
        else:
            assert mm_config is not None  # checked above: exactly one of demo and mm_config
            core = _load_mm_config(Path(mm_config))
    mapping = load_mapping(scan_properties) if scan_properties else (DEMO_CAMERA_MAPPING if demo else None)
    partial: dict[str, Any] = {}
    notes: list[str] = []
    if mapping is not None:
        partial, _, notes = read_scan_properties(core, mapping)
    h, w = int(core.getImageHeight()), int(core.getImageWidth())
    from dle_stream.recording import read_timing_file, resolve_timing

    # precedence: command-line flags > timing file > device properties > model card
    layers = [{"width_px": w, "height_px": h}, partial,
              read_timing_file(opts.timing_file) if opts.timing_file else {},
              {k: v for k, v in opts.timing_flags.items() if v is not None}]
    merged = {k: v for layer in layers for k, v in layer.items()}
    resolved = resolve_timing(
        None, flags=merged, fallback=model_timing_for(opts.model, h, w),
        fallback_label=f"the model card of {opts.model}", names=opts.parameter_names)
    timing, timing_source, warnings = resolved
    warnings = notes + warnings
    est, comparison = _estimator_for(opts, timing, None)
    if opts.model_note:
        warnings.insert(0, opts.model_note)
    if demo and not opts.roi and opts.rois_file is None:  # the demo's two halves, as two ROIs
        opts.roi = [f"left=0,0,{w // 2},{h}", f"right={w // 2},0,{w - w // 2},{h}"]
    layout = make_layout(h, w, est.tile_shape, opts)
    window = opts.window or est.window_frames
    if (note := calibration_note(est, window)) is not None:
        warnings.append(note)
    if frames is not None and frames < window:
        raise ParameterError(f"{arg('frames', frames)}: fewer than one {window}-frame window, so nothing could be "
                             f"estimated; acquire at least {window} frames, or give a shorter {arg('window')}")
    source_desc = "demo camera (simulated)" if demo else f"Micro-Manager {mm_config or core.getCameraDevice()}"
    attrs = _attrs("live", source_desc, est, timing, timing_source, layout, window, opts.hop, warnings, comparison)
    log = _open_log(opts, layout, attrs, est)
    runner = StreamRunner(est, layout, timing, window=window, hop=opts.hop, live=True,
                          timing_assumed=bool(resolved.assumed), combine_windows=opts.combine_windows)
    if log is not None:
        runner.attach(log)
    _warnings_to_stderr(runner, opts)
    for x in warnings:
        runner.warn(x)
    truth = {}
    if demo:
        from dle_stream.sources.demo_camera import get_demo_camera

        truth = region_truth(layout, np.asarray(get_demo_camera(core).d_map, dtype=float))
    dashboard = Dashboard(runner, source=source_desc, model=f"{est.name} · {opts.model}", mode=opts.dashboard,
                          console=console, truth=truth, **_offsets(log))
    source: LiveFrameSource = MicroManagerSource(core, n_frames=frames, mode="mda", stall_timeout_s=stall_timeout_s)
    backlog = source.backlog
    live_check = _LiveCheck(opts, timing, h, w)
    try:
        with dashboard:
            for item in source:
                if isinstance(item, SourceStalled):
                    runner.warn(item.message)
                    dashboard.refresh(force=True)
                    continue
                runner.process(item, backlog())
                live_check.add(item.frame)
                verdict = live_check.poll()
                if verdict is not None:
                    _announce_check(verdict, runner, opts, console)
                dashboard.refresh()
    except KeyboardInterrupt:
        runner.warn("stopped by the user")
        stopped = True
    else:
        stopped = False
    finally:
        source.stop()
        if source.error:
            runner.warn(source.error)
        if log is not None:
            log.close()
    c = runner.combination
    failure = None
    if source.error:
        failure = (f"the acquisition failed ({source.error}); {runner.stats.windows_done} windows were estimated"
                   + (f" and are in the log {opts.log}" if opts.log and runner.stats.windows_done else ""))
    elif not stopped and runner.stats.windows_done == 0:
        failure = (f"the acquisition ended after {runner.stats.frames_in} frames, before a {window}-frame window "
                   f"was complete: nothing was estimated")
    return StreamResult(runner.stats, layout, timing, c.region_d.copy(), c.region_sigma.copy(), c.tile_d.copy(),
                        c.tile_sigma.copy(), opts.log, runner.stats.warnings, truth, c,
                        live_check.final(runner.stats.frames_in), failure=failure)


def _announce_check(verdict: dict, runner: StreamRunner, opts: StreamOptions, console: Console) -> None:
    """The check's line on the console (plain dashboard), and a warning when outside."""
    if opts.dashboard == "plain":
        console.print(verdict["line"], highlight=False, markup=False, soft_wrap=True)
    if verdict["status"] == "outside":
        runner.warn(verdict["line"])


def _load_mm_config(path: Path):
    if not path.is_file():
        raise ParameterError(f"{arg('mm_config', path)}: no such file; give a Micro-Manager configuration (.cfg)")
    from pymmcore_plus import CMMCorePlus

    from dle_stream.sources.demo_camera import quiet_pymmcore_logging

    quiet_pymmcore_logging()  # its own stderr lines would precede (and confuse) our one-line errors
    core = CMMCorePlus()
    try:
        core.loadSystemConfiguration(str(path))
    except Exception as exc:
        raise ParameterError(f"{arg('mm_config', path)}: Micro-Manager could not load it "
                             f"({str(exc).splitlines()[0][:160]}); check the device adapters and the file") from None
    if not core.getCameraDevice():
        raise ParameterError(f"{arg('mm_config', path)}: the configuration loaded no camera (is it empty, or not a "
                             f"Micro-Manager configuration?); give the rig's .cfg with its camera, or use "
                             f"{arg('demo', True)}")
    return core
