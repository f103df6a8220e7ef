"""A simulated two-photon "camera" for Micro-Manager: :class:`DemoScanCamera`.

The camera is a Python device for pymmcore-plus's ``UniMMCore`` (a
``SimpleCameraDevice``): the real Micro-Manager core drives it exactly like a hardware
camera (snaps, sequence and live acquisition, MDA), so ``dle-stream run`` can be tried
and tested end to end without a microscope.

Its frames come from the project's simulator (docs/design.md §4): the full frame (e.g. 128×128 px)
is covered by 20×20 px tiles, each simulated as its own movie at its raster offset with
the *full frame's* scan timing (as ``dle-stream simulate`` does), D per tile from a D map
("0.3,1.2": left half 0.3, right half 1.2 µm²/s). Frames are simulated ahead in chunks
(e.g. 50 frames) on a background thread that continues the same particles chunk after
chunk, so the stream is endless and physically continuous; each snap hands out the next
frame. With ``realtime`` on, frame n of an acquisition is handed out at (n + 1)·F after
its start (F the frame period), as a free-running scanner delivers it; off, as fast as
the simulator allows (for tests and benchmarks).

The scan timing is exposed as read-only device properties, as a real laser-scanning
device adapter would (see :mod:`dle_stream.sources.scan_properties` for reading them):

    PixelSizeUm      pixel edge in the sample, µm
    DwellTimeUs      pixel dwell time δ, µs
    LinePeriodUs     line period L, µs
    FramePeriodUs    frame period F, µs
    Bidirectional    1 if odd lines are scanned right to left, else 0

plus ``Realtime`` (0/1, settable), ``Seed``, ``DMap`` and ``Preset``. The camera's
``Exposure`` is the frame period in ms (so the MDA engine's frame timeout scales with it).
Each frame's metadata carries ``ImageNumber`` and ``ElapsedTime-ms`` (the core
overwrites both with its own in sequence acquisitions, as it does for every camera) and
``Simulated-FrameNumber`` (the frame's number in the simulated movie, counting every
frame ever simulated) and ``Simulated-ScanStart-ms`` (its start in scan time).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dle_stream.errors import DleStreamError
from dle_stream.timing import ScanTiming

#: Label under which :func:`create_demo_core` loads the camera.
DEMO_CAMERA_LABEL = "DemoScan"
#: Default D map of the demo: left half 0.3, right half 1.2 µm²/s.
DEFAULT_D_SPEC = "0.3,1.2"
#: Baseline added to uint16 frames so the (offset-subtracted) noise is not clipped at 0.
UINT16_BASELINE_ADU = 1000.0
#: Frames simulated per step.
DEFAULT_CHUNK_FRAMES = 50

_CORES_CAMERAS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_LIVE_SCANS: "weakref.WeakSet[SimulatedScan]" = weakref.WeakSet()


@atexit.register
def _close_scans() -> None:
    # a daemon thread inside torch at interpreter exit aborts the process: stop them first
    for scan in list(_LIVE_SCANS):
        scan.close()


def default_demo_timing(height: int = 128, width: int = 128) -> ScanTiming:
    """The reference scan (docs/design.md §4: 0.15 µm pixels, 8 µs dwell, 1.348 ms line retrace,
    33 ms frame flyback) for a full frame of ``height`` × ``width`` px."""
    return ScanTiming.reference().with_frame_size(height, width)


# --------------------------------------------------------------------------- frames
class SimulatedScan:
    """An endless stream of simulated full frames [H, W] (float32) for one timing and D map.

    Args:
        timing: the full frame's scan timing (its size is the frame size).
        d_map: [H, W] D in µm²/s (each tile gets the mean over its pixels); None draws D
            per tile from the preset's prior.
        preset: simulator preset name ("low", "high") giving the priors.
        seed: seeds the simulator: one seed gives the same frames, whatever the pacing.
        tile_px: tile edge, px (edge tiles are smaller when the frame size doesn't divide).
        chunk_frames: frames simulated per step (default 50; the simulator's cost per
            call is high, so much smaller chunks are much slower per frame).
        repeat_frames: simulate this many frames once and hand them out cyclically
            (frame numbers keep counting). The motion jumps at every wrap: for
            throughput benchmarks of the pipeline only, never for accuracy.
        density: override the preset's density: None keeps the preset's ("cloud", what
            the models are trained on; the cloud around each tile spreads out, so after
            minutes at high D the tiles grow sparse), "box" gives a stationary density
            (about 5× slower to simulate).
        priors: overrides of the preset's simulator priors (``SimulatorPriors`` fields),
            e.g. ``{"particles": "fixed", "particles_max": 0}`` for a noise-only camera.
        device: torch device of the simulator.
    """

    def __init__(
        self, timing: ScanTiming, d_map: np.ndarray | None, *, preset: str = "low", seed: int = 0,
        tile_px: int = 20, chunk_frames: int | None = None, repeat_frames: int | None = None,
        density: str | None = None, priors: dict | None = None, device: str = "cpu",
    ) -> None:
        from dle_stream.tiling import tile_boxes
        from dle_stream.training.priors import get_preset

        self.timing = timing
        self.height, self.width = timing.height_px, timing.width_px
        if d_map is not None and np.shape(d_map) != (self.height, self.width):
            raise DleStreamError(f"demo camera: D map is {np.shape(d_map)}, the frame {self.height}×{self.width} px")
        self.d_map = None if d_map is None else np.asarray(d_map, dtype=np.float64)
        self.preset = get_preset(preset)
        self.priors = self.preset.priors if density is None else self.preset.priors.with_(density=density)
        if priors:
            try:
                self.priors = self.priors.with_(**priors)
            except TypeError as exc:
                raise DleStreamError(f"demo camera: bad simulator prior override ({exc})") from None
        self.seed = int(seed)
        self.device = device
        self.tiles = tile_boxes(self.height, self.width, tile_px, tile_px, partial_edges=True)
        if chunk_frames is None:
            chunk_frames = DEFAULT_CHUNK_FRAMES
        if chunk_frames < 1:
            raise DleStreamError(f"demo camera: chunk_frames must be ≥ 1, got {chunk_frames}")
        if repeat_frames is not None and repeat_frames < 1:
            raise DleStreamError(f"demo camera: repeat_frames must be ≥ 1, got {repeat_frames}")
        self.chunk_frames = int(chunk_frames) if repeat_frames is None else int(min(chunk_frames, repeat_frames))
        self.repeat_frames = repeat_frames
        self._truth: list[dict[str, Any]] = [dict(bbox=list(t), d_um2_s=None, n_particles=0, visible_transitions=0) for t in self.tiles]
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._chunk: np.ndarray | None = None
        self._pos = 0
        self._repeat: list[np.ndarray] = []
        self.frames_handed_out = 0

    # ---------------------------------------------------------------- producer
    def _chunks(self) -> Iterator[np.ndarray]:
        import torch

        from dle_stream.training.simulator import Simulator

        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, h, w) in enumerate(self.tiles):
            groups.setdefault((h, w), []).append(i)
        sims = {shape: Simulator(self.priors, self.timing, shape[0], shape[1], self.chunk_frames, self.device)
                for shape in groups}
        states: dict[tuple[int, int], Any] = {}
        while not self._stop.is_set():
            block = np.zeros((self.chunk_frames, self.height, self.width), dtype=np.float32)
            for shape, idx in groups.items():
                if shape in states:
                    batch = sims[shape].simulate(len(idx), generator=gen, continue_from=states[shape])
                else:
                    offsets = [(self.tiles[i][0], self.tiles[i][1]) for i in idx]
                    d = None if self.d_map is None else [
                        float(self.d_map[r0:r0 + h, c0:c0 + w].mean()) for (r0, c0, h, w) in (self.tiles[i] for i in idx)]
                    batch = sims[shape].simulate(len(idx), generator=gen, d_um2_s=d, offsets=offsets)
                    for k, i in enumerate(idx):
                        self._truth[i].update(
                            d_um2_s=float(batch.d_um2_s[k]), n_particles=int(batch.n_particles[k]),
                            **{name: float(v[k]) for name, v in batch.params.items()},
                        )
                states[shape] = batch.state
                movies = batch.movies.cpu().numpy()
                for k, i in enumerate(idx):
                    r0, c0, h, w = self.tiles[i]
                    block[:, r0:r0 + h, c0:c0 + w] = movies[k]
                    self._truth[i]["visible_transitions"] += int(batch.visible_transitions[k])
            yield block

    def _produce(self) -> None:
        try:
            for block in self._chunks():
                while not self._stop.is_set():
                    try:
                        self._queue.put(block, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # hand the error to the consumer
            self._queue.put(exc)

    def start(self) -> None:
        """Start simulating ahead (done on the first frame otherwise)."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._produce, name="dle-demo-simulator", daemon=True)
                _LIVE_SCANS.add(self)
                self._thread.start()

    def close(self) -> None:
        """Stop the simulation thread."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=5)

    # ---------------------------------------------------------------- consumer
    def next_frame(self) -> tuple[np.ndarray, int]:
        """The next frame [H, W] float32 and its number in the simulated movie."""
        if self.repeat_frames is not None and len(self._repeat) >= self.repeat_frames:
            k = self.frames_handed_out
            self.frames_handed_out += 1
            return self._repeat[k % self.repeat_frames], k
        if self._chunk is None or self._pos >= len(self._chunk):
            self.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise DleStreamError(f"demo camera: the simulator failed ({type(item).__name__}: {item})") from item
            self._chunk, self._pos = item, 0
        frame = self._chunk[self._pos]
        self._pos += 1
        k = self.frames_handed_out
        self.frames_handed_out += 1
        if self.repeat_frames is not None:
            self._repeat.append(frame)
            if len(self._repeat) >= self.repeat_frames:
                self.close()
        return frame, k

    def ground_truth(self) -> list[dict]:
        """Per tile: bbox (r0, c0, h, w), d_um2_s, n_particles, the drawn detector and PSF
        parameters (background_photons, gain, offset, psf_sigma_xy_um, ...), and
        visible_transitions summed over the frames simulated so far."""
        return [dict(t) for t in self._truth]


# --------------------------------------------------------------------------- device
def _device_classes() -> type:
    """Build the device class lazily: importing pymmcore-plus configures logging."""
    from pymmcore_plus.experimental.unicore import SimpleCameraDevice, pymm_property

    class DemoScanCamera(SimpleCameraDevice):
        """A simulated laser-scanning camera (see the module docstring)."""

        def __init__(
            self, timing: ScanTiming, d_map: np.ndarray | None, *, d_spec: str = "", preset: str = "low",
            seed: int = 0, realtime: bool = True, dtype: str = "float32", tile_px: int = 20,
            chunk_frames: int | None = None, repeat_frames: int | None = None, density: str | None = None,
            priors: dict | None = None, device: str = "cpu",
        ) -> None:
            super().__init__()
            if dtype not in ("float32", "uint16"):
                raise DleStreamError(f"demo camera: dtype must be 'float32' or 'uint16', got {dtype!r}")
            self.timing = timing
            self.d_spec = d_spec
            self.preset_name = preset
            self.seed_value = int(seed)
            self.realtime = bool(realtime)
            self._dtype = np.dtype(dtype)
            self.scan = SimulatedScan(timing, d_map, preset=preset, seed=seed, tile_px=tile_px,
                                      chunk_frames=chunk_frames, repeat_frames=repeat_frames, density=density,
                                      priors=priors, device=device)
            self._generation = 0
            self._seq_t0 = time.perf_counter()
            self._seq_n = 0
            self._snaps = 0
            self._t_init = time.perf_counter()
            self._stall_until = 0.0
            self._stall_event = threading.Event()
            self._stall_event.set()  # set = not stalled

        # --- lifecycle
        def initialize(self) -> None:
            self.scan.start()  # simulate the first chunk while the user sets up

        def shutdown(self) -> None:
            self.scan.close()

        # --- camera API
        def sensor_shape(self) -> tuple[int, int]:
            return (self.timing.height_px, self.timing.width_px)

        def dtype(self) -> np.dtype:
            return self._dtype

        def get_exposure(self) -> float:
            """A scanner's exposure is its frame period, ms."""
            return self.timing.frame_period_us / 1000.0

        def set_exposure(self, exposure: float) -> None:
            """Ignored: the frame period is set by the scan timing."""

        # --- scan timing as properties (read-only)
        @pymm_property(property_type=float)
        def PixelSizeUm(self) -> float:  # noqa: N802 (Micro-Manager property name)
            """Pixel edge in the sample, µm."""
            return self.timing.pixel_size_um

        @pymm_property(property_type=float)
        def DwellTimeUs(self) -> float:  # noqa: N802
            """Pixel dwell time, µs."""
            return self.timing.dwell_us

        @pymm_property(property_type=float)
        def LinePeriodUs(self) -> float:  # noqa: N802
            """Line period (full line + retrace), µs."""
            return self.timing.line_period_us

        @pymm_property(property_type=float)
        def FramePeriodUs(self) -> float:  # noqa: N802
            """Frame period (all lines + flyback), µs."""
            return self.timing.frame_period_us

        @pymm_property(property_type=int)
        def Bidirectional(self) -> int:  # noqa: N802
            """1 if odd lines are scanned right to left."""
            return int(self.timing.bidirectional)

        @pymm_property(property_type=int)
        def Seed(self) -> int:  # noqa: N802
            return self.seed_value

        @pymm_property(property_type=str)
        def DMap(self) -> str:  # noqa: N802
            """The D map spec (µm²/s) of the simulation."""
            return self.d_spec

        @pymm_property(property_type=str)
        def Preset(self) -> str:  # noqa: N802
            return self.preset_name

        @pymm_property(property_type=int, limits=(0, 1))
        def Realtime(self) -> int:  # noqa: N802
            """1: frames paced at the frame period; 0: as fast as simulated."""
            return int(self.realtime)

        @Realtime.setter  # type: ignore[no-redef]  # mypy knows the setter idiom only for builtin property
        def Realtime(self, value: int) -> None:  # noqa: N802
            self.realtime = bool(round(float(value)))

        # --- test hooks
        def stall(self, seconds: float | None = None) -> None:
            """Stop delivering frames (a stuck scanner) for ``seconds`` or until :meth:`resume`."""
            self._stall_until = float("inf") if seconds is None else time.perf_counter() + float(seconds)
            self._stall_event.clear()

        def resume(self) -> None:
            """End a :meth:`stall`."""
            self._stall_until = 0.0
            self._stall_event.set()

        @property
        def d_map(self) -> np.ndarray | None:
            """Ground-truth D map [H, W], µm²/s (None: D drawn per tile from the prior)."""
            return self.scan.d_map

        def ground_truth(self) -> list[dict]:
            return self.scan.ground_truth()

        # --- acquisition
        def start_sequence(
            self, n: int | None, get_buffer: Callable[[Sequence[int], Any], np.ndarray]
        ) -> Iterator[Mapping]:
            self._generation += 1
            generation = self._generation
            self._seq_t0 = time.perf_counter()
            self._seq_n = 0
            sensor = self.sensor_shape()
            roi = self._roi
            out_shape = self.shape()
            full = np.empty(sensor, dtype=self._dtype) if roi is not None else None
            limit = n if n is not None else 2**63
            count = 0
            while count < limit:
                buf = get_buffer(out_shape, self._dtype)
                target = buf if full is None else full
                meta = self.snap(target)
                if generation != self._generation:  # a newer acquisition took over
                    return
                if full is not None and roi is not None:
                    x, y, w, h = roi
                    buf[:] = full[y:y + h, x:x + w]
                yield meta
                count += 1

        def snap(self, buffer: np.ndarray) -> Mapping:
            frame, k = self.scan.next_frame()
            self._seq_n += 1
            if self.realtime:
                deadline = self._seq_t0 + self._seq_n * self.timing.frame_period_us * 1e-6
                while (wait := deadline - time.perf_counter()) > 0:
                    time.sleep(min(wait, 0.02))
            while not self._stall_event.is_set():
                if time.perf_counter() >= self._stall_until:
                    self._stall_event.set()
                    break
                self._stall_event.wait(0.01)
            if self._dtype == np.float32:
                buffer[:] = frame
            else:
                np.clip(np.rint(frame + UINT16_BASELINE_ADU), 0, 65535, out=buffer, casting="unsafe")
            number = self._snaps
            self._snaps += 1
            return {
                "ImageNumber": str(number),
                "ElapsedTime-ms": f"{(time.perf_counter() - self._t_init) * 1000:.2f}",
                "Simulated-FrameNumber": str(k),
                "Simulated-ScanStart-ms": f"{k * self.timing.frame_period_us / 1000:.3f}",
            }

    return DemoScanCamera


_DEMO_CLASS: type | None = None


def demo_camera_class() -> type:
    """The ``DemoScanCamera`` device class (a ``SimpleCameraDevice`` subclass)."""
    global _DEMO_CLASS
    if _DEMO_CLASS is None:
        _DEMO_CLASS = _device_classes()
    return _DEMO_CLASS


def __getattr__(name: str) -> Any:  # DemoScanCamera importable without importing pymmcore-plus eagerly
    if name == "DemoScanCamera":
        return demo_camera_class()
    raise AttributeError(name)


# --------------------------------------------------------------------------- logging
def quiet_pymmcore_logging(handler: "Any | None" = None, level: str | int = "WARNING",
                           log_file: str | Path | None = None) -> None:
    """Stop pymmcore-plus printing to stderr (it would tear a live dashboard).

    pymmcore-plus installs its own stderr handler on import (docs/design.md §9); this removes
    it and, when ``handler`` is given (e.g. a ``rich.logging.RichHandler`` on the
    dashboard's console), routes its messages there at ``level``. ``log_file`` keeps a
    debug log file, if wanted.
    """
    import logging

    from pymmcore_plus import configure_logging

    configure_logging(file=log_file, log_to_stderr=False)
    if handler is not None:
        handler.setLevel(level)
        logging.getLogger("pymmcore-plus").addHandler(handler)


# --------------------------------------------------------------------------- core
def create_demo_core(
    *, height: int = 128, width: int = 128, timing: ScanTiming | None = None, d_spec: str | float | np.ndarray | None = DEFAULT_D_SPEC,
    seed: int = 0, realtime: bool = True, preset: str = "low", dtype: str = "float32", tile_px: int = 20,
    chunk_frames: int | None = None, repeat_frames: int | None = None, density: str | None = None,
    priors: dict | None = None, mm_path: str | Path | None = None, label: str = DEMO_CAMERA_LABEL, quiet_logging: bool = True,
    device: str = "cpu",
) -> Any:
    """A ``UniMMCore`` with a :class:`DemoScanCamera` loaded, initialised and selected.

    Args:
        height, width: frame size, px (ignored when ``timing`` is given: its size wins).
        timing: scan timing of the full frame; default :func:`default_demo_timing`.
        d_spec: ground-truth D map: "0.5", "0.3,1.2" (vertical bands, left to right),
            a .npy/.tif path, a number or an [H, W] array (µm²/s); None draws D per tile
            from the preset's prior.
        seed: simulator seed.
        realtime: pace frames at the frame period (False: as fast as simulated).
        preset: "low" or "high" simulator priors.
        dtype: "float32" (the simulator's values) or "uint16" (values + 1000 ADU, rounded).
        tile_px, chunk_frames, repeat_frames, density, priors, device: see :class:`SimulatedScan`.
        mm_path: folder for the core's adapter search; default ``$MICROMANAGER_PATH`` or
            this package's folder (no installed Micro-Manager needed).
        label: the camera's device label.
        quiet_logging: reconfigure pymmcore-plus logging off stderr (:func:`quiet_pymmcore_logging`).

    The camera instance (for its ground truth: ``.d_map``, ``.ground_truth()``, and the
    ``stall()`` test hook) is ``get_demo_camera(core)``.
    """
    from dle_stream.training.recording_sim import parse_d_map

    if quiet_logging:
        quiet_pymmcore_logging()
    from pymmcore_plus.experimental.unicore import UniMMCore

    if timing is None:
        timing = default_demo_timing(height, width)
    h, w = timing.height_px, timing.width_px
    d_map: np.ndarray | None
    if isinstance(d_spec, np.ndarray):
        d_map = np.asarray(d_spec, dtype=np.float64)
        if d_map.shape != (h, w) or not np.all(np.isfinite(d_map)) or np.any(d_map < 0):
            raise DleStreamError(f"demo camera: the D map must be a finite, ≥ 0 [{h}, {w}] array (µm²/s)")
        spec_text = "array"
    else:
        spec_text = "" if d_spec is None else str(d_spec)
        d_map = parse_d_map(spec_text or None, h, w, None)
    path = mm_path or os.environ.get("MICROMANAGER_PATH") or str(Path(__file__).parent)
    core = UniMMCore(mm_path=str(path))
    camera = demo_camera_class()(
        timing, d_map, d_spec=spec_text, preset=preset, seed=seed, realtime=realtime, dtype=dtype,
        tile_px=tile_px, chunk_frames=chunk_frames, repeat_frames=repeat_frames, density=density, priors=priors,
        device=device,
    )
    core.loadPyDevice(label, camera)
    core.initializeDevice(label)
    core.setCameraDevice(label)
    core.setAutoShutter(False)
    _CORES_CAMERAS[core] = camera
    return core


def get_demo_camera(core: Any, label: str | None = None) -> Any:
    """The :class:`DemoScanCamera` instance loaded in ``core`` by :func:`create_demo_core`."""
    camera = _CORES_CAMERAS.get(core)
    if camera is None or (label is not None and camera.get_label() != label):
        raise DleStreamError("no demo camera in this core; create it with create_demo_core()")
    return camera
