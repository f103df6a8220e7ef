"""Estimate D from Python: a movie array, a recording on disk, and a stream of windows.

    python examples/estimate_in_python.py          # 1200 frames (about half a minute on 2 cores)
    python examples/estimate_in_python.py 450      # fewer frames (the test does this)

Simulates a 40×80 px recording whose left and right halves have D = 0.3 and 1.2 µm²/s,
scanned with the reference scan of the shipped model `brain-qd-low` (dwell 8 µs, line
1.508 ms, frame 61.652 ms), then estimates D three ways with that model: windows of 200
frames every 100, the independent ones combined per ROI. The README's Python example is
this file without the frame-count override (tests/test_api.py checks and runs it).
"""

import sys
import tempfile
from pathlib import Path

import dle_stream as dle
from dle_stream import ScanTiming
from dle_stream.recording import open_recording
from dle_stream.training.priors import get_preset
from dle_stream.training.recording_sim import simulate_recording

frames = 1200
if len(sys.argv) > 1:
    frames = int(sys.argv[1])

# a recording with known D (left half 0.3, right half 1.2 µm²/s); the timing is that of
# the full 40×80 px frame: every 20×20 px tile keeps its raster offsets in it
timing = ScanTiming(pixel_size_um=0.15, dwell_us=8.0, line_period_us=1508.0, frame_period_us=61652.0,
                    width_px=80, height_px=40)
rec = simulate_recording(Path(tempfile.mkdtemp()) / "rec.tif", get_preset("low"), frames=frames, height=40,
                         width=80, timing=timing, d_spec="0.3,1.2", seed=1)
with open_recording(rec.path) as recording:
    movie = recording.read(0, recording.n_frames)    # [frames, 40, 80]
rois = {"left": (0, 0, 40, 40), "right": (40, 0, 40, 40)}   # name: (x, y, w, h) px

# 1. a movie array and its scan timing
res = dle.estimate(movie, timing, rois=rois, hop=100)
print(res.rois.to_pandas()[["roi", "d_um2_s", "lo95_um2_s", "hi95_um2_s", "flags", "text"]])
per_window = res.windows.to_pandas()                  # one row per window and tile
print(per_window[["window", "t_stop_s", "tile", "row", "col", "d_um2_s", "sigma_um2_s"]].head(8))

# 2. the recording on disk: its scan timing is read from the file's metadata
res = dle.estimate_recording(rec.path, rois=rois, hop=100)
print(res)                                            # in words, next to the truth

# 3. window by window, as they are made
for w in dle.stream(rec.path, rois=rois, hop=100):
    left, right = w.rois["text"]          # the running estimate in words (a range when the parts disagree)
    print(f"frames {w.frame_start}-{w.frame_stop} ({w.t_stop_s:.1f} s): left {left}; right {right}")
