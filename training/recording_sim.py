"""Simulated full-frame recordings on disk: `dle-stream simulate`.

A full frame (e.g. 128×128 px) is covered by model-sized tiles (20×20 px by default;
smaller tiles at the right and bottom edges). Each tile is simulated as its own movie
with the *full frame's* scan timing and its own offset in the frame, so every pixel is
recorded at its true raster time; D per tile comes from a D map. Long recordings are
simulated in chunks of frames that continue the same particles (no reset between
chunks) and streamed to disk, so memory stays bounded.

D maps (``--d``): one value ("0.5": everywhere), comma-separated values for vertical
bands from left to right ("0.3,1.2": left half 0.3, right half 1.2 µm²/s), or a .npy
or .tif file holding a 2-D map (µm²/s) of the frame's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from dle_stream import __version__
from dle_stream.errors import DleStreamError
from dle_stream.files import write_atomic
from dle_stream.tiling import tile_boxes
from dle_stream.timing import ScanTiming
from dle_stream.training.priors import Preset
from dle_stream.training.simulator import Simulator, SimulatorState


def parse_d_map(spec: str | None, height: int, width: int, default: float | None) -> np.ndarray | None:
    """A D map [H, W] in µm²/s from a ``--d`` spec (see module docstring); None = draw from the prior."""
    if spec is None or str(spec).strip() == "":
        return None if default is None else np.full((height, width), float(default))
    text = str(spec).strip()
    path = Path(text)
    if path.suffix.lower() in (".npy", ".tif", ".tiff"):
        if not path.is_file():
            raise DleStreamError(f"--d {text}: no such D-map file; give a .npy/.tif file or values like 0.3,1.2")
        try:
            if path.suffix.lower() == ".npy":
                arr = np.load(path, allow_pickle=False)
            else:
                import tifffile

                arr = tifffile.imread(path)
        except Exception as exc:
            raise DleStreamError(f"--d {text}: cannot read the D map ({type(exc).__name__}); save it as a 2-D .npy or .tif") from None
        arr = np.asarray(arr, dtype=np.float64)
        if arr.shape != (height, width):
            raise DleStreamError(f"--d {text}: map is {arr.shape}, the frame {height}×{width}; make them match (--size)")
    else:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise DleStreamError(f"--d {text!r}: not a number list; use e.g. --d 0.5 or --d 0.3,1.2 (µm²/s)") from None
        arr = np.empty((height, width))
        edges = np.linspace(0, width, len(values) + 1).round().astype(int)
        for v, a, b in zip(values, edges[:-1], edges[1:]):
            arr[:, a:b] = v
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise DleStreamError(f"--d {text}: D must be finite and ≥ 0 µm²/s everywhere")
    return arr


def parse_size(text: str) -> tuple[int, int]:
    """'128x128' or '128' → (height, width) in px."""
    try:
        parts = [int(p) for p in str(text).lower().replace("×", "x").split("x")]
    except ValueError:
        raise DleStreamError(f"--size {text!r}: use HxW in pixels, e.g. --size 128x128") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise DleStreamError(f"--size {text!r}: use HxW with positive pixels, e.g. --size 128x128")
    return parts[0], parts[1]


def tile_grid(height: int, width: int, tile_h: int, tile_w: int) -> list[tuple[int, int, int, int]]:
    """(r0, c0, h, w) tiles covering a frame; edge tiles are smaller when sizes don't divide
    (:func:`dle_stream.tiling.tile_boxes` with ``partial_edges``)."""
    return tile_boxes(height, width, tile_h, tile_w, partial_edges=True)


@dataclass
class SimulatedRecording:
    path: Path
    truth_path: Path
    timing: ScanTiming
    frames: int
    tiles: list[dict]


def simulate_recording(
    out: Path, preset: Preset, *, frames: int, height: int, width: int, timing: ScanTiming,
    d_spec: str | None = None, seed: int = 0, tile: int = 20, fmt: str | None = None,
    chunk_frames: int | None = None, device: str = "cpu", density: str | None = None,
    on_frames: Callable[[int], None] | None = None, overwrite: bool = False,
) -> SimulatedRecording:
    """Simulate a full-frame recording and write it (TIFF/OME-TIFF/Zarr) with its scan
    timing in the metadata, plus ``<out>.truth.json`` with the ground truth per tile.

    An existing recording or truth file is refused unless ``overwrite`` (checked before
    anything is simulated); see :func:`~dle_stream.recording.write_recording`."""
    from dle_stream.recording import write_recording
    from dle_stream.recording.formats import write_format_from_suffix
    from dle_stream.recording.writer import check_output_path

    out = Path(out).expanduser()
    check_output_path(out, fmt or write_format_from_suffix(out), overwrite)
    truth_path = out.with_name(out.name + ".truth.json")
    if truth_path.is_dir() or (truth_path.exists() and not overwrite):
        raise DleStreamError(f"{truth_path}: the ground-truth file of {out.name} already exists; pass --overwrite to "
                             f"replace it, or choose another output path")
    if frames < 1:
        raise DleStreamError(f"--frames must be ≥ 1, got {frames}")
    if timing.height_px != height or timing.width_px != width:
        raise DleStreamError(f"timing is for {timing.height_px}×{timing.width_px} px frames, --size {height}x{width}")
    priors = preset.priors if density is None else preset.priors.with_(density=density)
    d_map = parse_d_map(d_spec, height, width, None)
    tiles = tile_grid(height, width, tile, tile)
    chunk = chunk_frames or max(1, min(frames, 400, int(4e7 // max(height * width, 1))))
    gen = torch.Generator(device=device).manual_seed(seed)

    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, h, w) in enumerate(tiles):
        groups.setdefault((h, w), []).append(i)
    sims = {shape: Simulator(priors, timing, shape[0], shape[1], chunk, device) for shape in groups}
    # one microscope and sample for the whole recording: every tile has the same PSF, background,
    # brightness and gain (drawn per tile, a recording's tiles would be independent samples and
    # look more independent than a real recording's)
    instrument = next(iter(sims.values())).draw_instrument(gen)
    states: dict[tuple[int, int], SimulatorState | None] = {}
    truth: list[dict[str, Any]] = [dict(bbox=list(t), d_um2_s=None, n_particles=0, visible_transitions=0) for t in tiles]

    def chunks() -> Iterator[np.ndarray]:
        done = 0
        while done < frames:
            n = min(chunk, frames - done)
            block = np.zeros((chunk, height, width), dtype=np.float32)
            for shape, idx in groups.items():
                offsets = [(tiles[i][0], tiles[i][1]) for i in idx]
                if shape in states:
                    batch = sims[shape].simulate(len(idx), generator=gen, continue_from=states[shape])
                else:
                    d = None if d_map is None else [float(d_map[r0:r0 + h, c0:c0 + w].mean()) for (r0, c0, h, w) in (tiles[i] for i in idx)]
                    batch = sims[shape].simulate(len(idx), generator=gen, d_um2_s=d, offsets=offsets,
                                                 instrument=instrument)
                states[shape] = batch.state
                movies = batch.movies.cpu().numpy()
                for k, i in enumerate(idx):
                    r0, c0, h, w = tiles[i]
                    block[:, r0:r0 + h, c0:c0 + w] = movies[k]
                    truth[i]["d_um2_s"] = float(batch.d_um2_s[k])
                    truth[i]["n_particles"] = int(batch.n_particles[k])
                    truth[i]["visible_transitions"] += int(batch.visible_transitions[k])
            for f in range(n):
                yield block[f]
            done += n
            if on_frames:
                on_frames(n)

    extra = {"simulated": True, "preset": preset.name, "seed": seed, "d_map": d_spec, "tile_px": tile,
             "priors": priors.to_dict()}
    path = write_recording(out, chunks(), timing, format=fmt, metadata=extra, n_frames=frames, overwrite=overwrite)
    doc = {
        "software": f"dle-stream {__version__}", "recording": out.name, "frames": frames, "seed": seed,
        "preset": preset.name, "d_map": d_spec, "timing": timing.to_dict(), "priors": priors.to_dict(),
        "tile_px": tile, "instrument": instrument, "tiles": truth,
        "note": ("d_um2_s per tile; visible_transitions: Σ over frames of particles inside the tile and within σz of "
                 "focus; instrument: PSF widths (µm), background and brightness (photons), gain and offset, shared by "
                 "every tile"),
    }
    text = json.dumps(doc, indent=1)
    try:
        write_atomic(truth_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise DleStreamError(f"{truth_path}: cannot write the ground truth ({exc.strerror or exc}); the recording "
                             f"{out} was written; choose a writable folder") from None
    return SimulatedRecording(Path(path), truth_path, timing, frames, truth)
