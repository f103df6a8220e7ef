"""Streaming speed: replay a recording through the runner, as a ratio to the acquisition rate.

    python benchmarks/stream_speed.py --size 512 --tiles 625 --frames 600 --threads 2
    python benchmarks/stream_speed.py --size 512 --tiles 64 --frames 600
    python benchmarks/stream_speed.py --size 512 --tiles 64 --frames 600 --estimator classic
    python benchmarks/stream_speed.py --size 160 --tiles 64 --frames 100000 --log --samples 40   # long run

Writes a uint16 TIFF of Poisson background of the given frame size
once (``--recording``), then replays it through :class:`~dle_stream.runner.StreamRunner`
(reading, tiling, encoding each tile-frame once, a batched estimate every hop, the Zarr
log), and reports processing frames/s and its ratio to the acquisition rate of the
reference scan (16.2 frames/s), plus peak resident memory. The DLE's compute per frame
does not depend on the pixel values or the scan timing, so the model's timing check is
bypassed here (a 512-line frame cannot have the reference line and frame period); the
classic tracker's cost does depend on content, so treat its figure as indicative.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dle_stream.recording import open_recording, write_recording
from dle_stream.runner import StreamRunner
from dle_stream.sources.file_source import FileSource
from dle_stream.tiling import Region, Tile, TileLayout
from dle_stream.timing import ScanTiming

REFERENCE_FPS = 1e6 / ScanTiming.reference().frame_period_us


def make_recording(path: Path, size: int, frames: int, seed: int = 0) -> None:
    """Poisson background (100 photons/px), uint16: the cost of the DLE does not depend on content."""
    rng = np.random.default_rng(seed)
    timing = ScanTiming(0.15, 0.2, 120.0, 61652.0, size, size)
    frames_iter = (rng.poisson(100.0, (size, size)).astype(np.uint16) for _ in range(frames))
    write_recording(path, frames_iter, timing, format="tiff", n_frames=frames)


def layout_for(size: int, n_tiles: int, tile: int = 20) -> TileLayout:
    per_row = size // tile
    all_tiles = [Tile(r * tile, c * tile, tile, tile) for r in range(per_row) for c in range(per_row)]
    if n_tiles < len(all_tiles):
        idx = np.linspace(0, len(all_tiles) - 1, n_tiles).round().astype(int)
        all_tiles = [all_tiles[i] for i in idx]
    return TileLayout(size, size, all_tiles, [Region("frame", (0, 0, size, size), list(range(len(all_tiles))))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tiles", type=int, default=625)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--window", type=int, default=400)
    ap.add_argument("--hop", type=int, default=50)
    ap.add_argument("--estimator", default="dle", choices=["dle", "classic"])
    ap.add_argument("--model", default="brain-qd-low")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recording", type=Path, default=None)
    ap.add_argument("--log", action="store_true", help="also write the Zarr log")
    ap.add_argument("--log-path", type=Path, default=None, help="where to write the log (default: a temporary folder)")
    ap.add_argument("--samples", type=int, default=8, help="resident-memory samples over the run")
    ap.add_argument("--warmup", type=int, default=2000, help="frames counted as warm-up for the memory growth")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rec_path = args.recording or Path(tempfile.gettempdir()) / f"dle-bench-{args.size}-{args.frames}.tif"
    if not rec_path.exists():
        t0 = time.perf_counter()
        make_recording(rec_path, args.size, args.frames)
        print(f"wrote {rec_path} in {time.perf_counter() - t0:.1f} s")
    from dle_stream.estimator import DiffusionEstimator
    from dle_stream.stream_estimators import ClassicStream, DLEStream

    dle = DiffusionEstimator.load(args.model)
    if args.estimator == "dle":
        est = DLEStream(dle, 1.0)
    else:
        from dle_stream.classic import ClassicEstimator

        c = dle.card
        est = ClassicStream(ClassicEstimator(c.timing, 0.21, c.d_max_um2_s), (20, 20), 400, (0.0, c.d_max_um2_s))
    layout = layout_for(args.size, args.tiles)
    rec = open_recording(rec_path)
    timing = ScanTiming(**{**dle.card.timing.to_dict(), "width_px": args.size, "height_px": args.size,
                           "line_period_us": 120.0, "dwell_us": 0.2})
    log = None
    if args.log:
        from dle_stream.zarr_log import ZarrLog

        log_path = args.log_path or Path(tempfile.mkdtemp()) / "bench.zarr"
        log = ZarrLog.create(log_path, tile_bboxes=layout.bboxes, attrs={})
    runner = StreamRunner(est, layout, timing, window=args.window, hop=args.hop)
    if log is not None:
        runner.attach(log)
    rss = []

    def sample(est_) -> None:  # resident memory after every few windows (Linux /proc), MB
        if est_.window % max(1, args.frames // args.hop // args.samples) == 0:
            with open("/proc/self/status") as fh:
                kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in fh) if k in ("RssAnon", "RssFile")}
            rss.append((est_.frame_stop, kb.get("RssAnon", 0) / 1024, kb.get("RssFile", 0) / 1024))

    runner.events.estimated.connect(sample)
    t0, cpu0 = time.perf_counter(), time.process_time()
    runner.run(FileSource(rec))
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    fps = runner.stats.frames_in / dt
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.estimator}: {args.size}×{args.size} px, {len(layout.tiles)} tiles, window {args.window}, hop {args.hop}, "
          f"{args.threads} threads: {runner.stats.frames_in} frames in {dt:.1f} s = {fps:.1f} frames/s = "
          f"{fps / REFERENCE_FPS:.2f}× the 16.2 frames/s acquisition; {runner.stats.windows_done} windows "
          f"({runner.stats.windows_done * len(layout.tiles)} tile-windows); peak RSS {peak:.0f} MB")
    # CPU time of all threads of this process over the replay: on a machine shared with other
    # work the wall time grows, the CPU time much less; frames / (CPU s / threads) is the rate
    # the replay could reach on that many idle cores if it kept them all busy (an upper bound)
    bound = runner.stats.frames_in / (cpu / args.threads) if cpu > 0 else float("nan")
    print(f"CPU time {cpu:.1f} s ({cpu / max(dt, 1e-9):.2f} cores busy on average); on {args.threads} idle cores at "
          f"most {bound:.1f} frames/s = {bound / REFERENCE_FPS:.2f}× the acquisition")
    expected = max(0, (runner.stats.frames_in - args.window) // args.hop + 1)
    print(f"windows: {runner.stats.windows_done} done, {runner.stats.windows_skipped} skipped, "
          f"{expected} expected from {runner.stats.frames_in} frames; gaps {runner.stats.gaps}")
    if rss:
        print("resident memory at frame: anonymous MB (file-backed MB, e.g. the memory-mapped recording): "
              + ", ".join(f"{f}: {a:.0f} ({b:.0f})" for f, a, b in rss))
        after = [(f, a + b) for f, a, b in rss if f >= args.warmup]
        if after:
            total = [t for _, t in after]
            print(f"RSS after warm-up (frame ≥ {args.warmup}): first {total[0]:.0f} MB, max {max(total):.0f} MB, "
                  f"last {total[-1]:.0f} MB; growth {max(total) - total[0]:.0f} MB")
    if log is not None:
        log.close()
        size = sum(f.stat().st_size for f in log_path.rglob("*") if f.is_file())
        hours = runner.stats.frames_in / REFERENCE_FPS / 3600
        print(f"log {log_path}: {size / 1e6:.1f} MB for {hours:.2f} h of acquisition at 16.2 frames/s "
              f"= {size / 1e6 / hours:.1f} MB per hour ({len(layout.tiles)} tiles, hop {args.hop})")


if __name__ == "__main__":
    main()
