"""The Python API (dle_stream.api): estimates from an array, a file and a stream with the
shipped model `brain-qd-low` on a simulated 40×60 px recording whose tile columns have
D = 0.3, 0.3, 1.2 µm²/s; the tables' shape, columns and times; errors in one line that
name no command-line flag; the README's example (examples/estimate_in_python.py) runs."""

import dataclasses
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

import dle_stream as dle
from dle_stream import DleStreamError, ScanTiming
from dle_stream.model_package import list_models

pytestmark = pytest.mark.skipif(
    not any(card.name == "brain-qd-low" for _, card in list_models()), reason="shipped model brain-qd-low missing"
)

ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH, FRAMES = 40, 60, 450
TIMING = ScanTiming(0.15, 8.0, 1508.0, 61652.0, WIDTH, HEIGHT)   # the model's scan, full 40×60 frame
ROIS = {"left": (0, 0, 40, 40), "right": (40, 0, 20, 40)}        # x, y, w, h: tile columns 0–1 and 2
TRUE = {"left": 0.3, "right": 1.2}
WINDOW, HOP = 100, 50                                            # 8 windows: frames 0–100 … 350–450


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    from dle_stream.training.priors import get_preset
    from dle_stream.training.recording_sim import simulate_recording

    folder = tmp_path_factory.mktemp("api")
    return simulate_recording(folder / "rec.tif", get_preset("low"), frames=FRAMES, height=HEIGHT, width=WIDTH,
                              timing=TIMING, d_spec="0.3,0.3,1.2", seed=1).path


@pytest.fixture(scope="module")
def movie(recording):
    from dle_stream.recording import open_recording

    with open_recording(recording) as rec:
        return rec.read(0, rec.n_frames)


@pytest.fixture(scope="module")
def from_array(movie):
    return dle.estimate(movie, TIMING, rois=ROIS, window=WINDOW, hop=HOP)


def test_import_dle_stream_imports_no_torch():
    code = "import dle_stream, sys; print('torch' in sys.modules); dle_stream.estimate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # not even when the API module is loaded: only an estimate loads the model


def test_array_estimates_are_near_the_truth(from_array):
    rois = from_array.rois
    assert rois["roi"].tolist() == ["left", "right"] and rois["n_tiles"].tolist() == [4, 2]
    # windows of 100 frames, a quarter of the model's: said, since its calibration is for 400
    assert any("windows of 100 frames" in w for w in from_array.warnings)
    # an ROI reads its truth: as a number inside its 95 % interval, or — where its parts
    # disagree (then no number is given) — as the range of its parts' values
    values = {}
    for i, name in enumerate(rois["roi"].tolist()):
        tol = 0.08 if name == "left" else 0.25
        if rois["disagree"][i]:
            assert np.isnan(rois["d_um2_s"][i]) and rois["text"][i].startswith(f"{rois['disagree'][i]} disagree")
            lo, hi = rois["spread_lo_um2_s"][i], rois["spread_hi_um2_s"][i]
            assert lo - tol <= TRUE[name] <= hi + tol
            values[name] = (lo + hi) / 2
        else:
            assert rois["lo95_um2_s"][i] <= rois["d_um2_s"][i] <= rois["hi95_um2_s"][i]
            assert rois["d_um2_s"][i] == pytest.approx(TRUE[name], abs=tol)
            values[name] = rois["d_um2_s"][i]
    assert values["right"] - values["left"] > 0.6
    # every tile, its 4 independent windows combined (windows 0, 2, 4, 6 of 8 overlapping ones)
    tiles = from_array.tiles
    assert tiles["n_windows"].tolist() == [4] * 6
    truth = np.where(tiles["col"] < 40, TRUE["left"], TRUE["right"])
    # within 0.1 (left) / 0.35 (right) µm²/s, or within 3 of the tile's own σ (its claim)
    # (a tile whose windows disagree gives no number: the range of its windows instead)
    number = tiles["disagree"] == ""
    tolerance = np.maximum(np.where(truth < 1, 0.1, 0.35), 3 * tiles["sigma_um2_s"])
    assert np.all(np.abs(tiles["d_um2_s"] - truth)[number] < tolerance[number])
    assert np.all((tiles["sigma_um2_s"] < np.where(truth < 1, 0.1, 0.4))[number])  # and σ says something
    assert np.all(np.isnan(tiles["d_um2_s"][~number])) and number.sum() >= 5
    assert "D = " in rois["text"][0] and "µm²/s" in str(from_array)


def test_window_table_has_one_row_per_window_and_tile_with_times(from_array):
    w = from_array.windows
    n_windows = (FRAMES - WINDOW) // HOP + 1
    assert len(w) == n_windows * 6
    assert w.columns == ["window", "frame_start", "frame_stop", "t_start_s", "t_stop_s", "wall_time", "tile", "row",
                         "col", "height", "width", "d_um2_s", "sigma_um2_s", "lo68_um2_s", "hi68_um2_s", "lo95_um2_s",
                         "hi95_um2_s", "p_above", "lower95_um2_s", "flags", "flag_bits"]
    assert np.array_equal(w["window"], np.repeat(np.arange(n_windows), 6))
    assert np.array_equal(w["frame_start"], np.repeat(np.arange(n_windows) * HOP, 6))
    assert np.array_equal(w["frame_stop"], w["frame_start"] + WINDOW)
    np.testing.assert_allclose(w["t_start_s"], w["frame_start"] * 0.061652)
    np.testing.assert_allclose(w["t_stop_s"], w["frame_stop"] * 0.061652)
    # tiles: the left ROI's 2×2 tiles, then the right ROI's column, each with its bbox
    bbox = {(r, c, h, wd) for r, c, h, wd in zip(w["row"], w["col"], w["height"], w["width"])}
    assert bbox == {(r, c, 20, 20) for r in (0, 20) for c in (0, 20, 40)}
    assert np.all(np.isfinite(w["d_um2_s"])) and np.all(w["lo68_um2_s"] <= w["hi68_um2_s"])
    # flags are names, the same as the bits
    from dle_stream.events import flag_names

    assert [f for f in w["flags"]] == [", ".join(flag_names(int(b))) for b in w["flag_bits"]]
    df = w.to_pandas()
    assert df.shape == (n_windows * 6, 21) and df["d_um2_s"].equals(df["d_um2_s"])
    assert set(df["flags"]) <= {"", "little information", "above range"}


def test_recording_gives_the_same_estimates_with_timing_from_its_metadata(recording, from_array):
    res = dle.estimate_recording(recording, rois=ROIS, window=WINDOW, hop=HOP)
    assert res.timing == TIMING and "metadata" in res.timing_source
    assert len(res.warnings) == 1 and res.warnings[0].startswith("windows of 100 frames")  # nothing else
    np.testing.assert_allclose(res.windows["d_um2_s"], from_array.windows["d_um2_s"], rtol=1e-5)
    np.testing.assert_allclose(res.rois["d_um2_s"], from_array.rois["d_um2_s"], rtol=1e-5)
    np.testing.assert_allclose(res.rois["true_d_um2_s"], [TRUE["left"], TRUE["right"]], rtol=1e-6)
    assert "(true 0.3)" in res.describe()


def test_stream_yields_windows_as_they_are_made(recording, movie):
    got = []
    with dle.stream(recording, window=WINDOW, hop=100) as s:
        for w in s:
            got.append(w)
            assert len(w.tiles) == 6 and w.rois["roi"].tolist() == ["frame"]
            assert w.t_stop_s == pytest.approx(w.frame_stop * 0.061652)
            if len(got) == 2:
                break
        partial = s.results()
    assert [(w.window, w.frame_start, w.frame_stop) for w in got] == [(0, 0, 100), (1, 100, 200)]
    assert len(partial.windows) == 12 and partial.frames == 200
    # a plain iterable of 2-D frames (timing given) gives the array's per-window numbers
    frames = iter(list(movie[:250]))
    from_frames = dle.stream(frames, TIMING, window=WINDOW, hop=HOP).run()
    direct = dle.estimate(movie[:250], TIMING, window=WINDOW, hop=HOP)
    assert len(from_frames.windows) == len(direct.windows) == 4 * 6
    np.testing.assert_allclose(from_frames.windows["d_um2_s"], direct.windows["d_um2_s"], rtol=1e-5)


def test_a_recording_without_timing_is_estimated_with_the_model_timing_and_flagged(movie, tmp_path):
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, movie[:120])  # no scan timing in the file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = dle.estimate_recording(path, window=WINDOW, hop=HOP)
    messages = [str(w.message) for w in caught if issubclass(w.category, dle.DleStreamWarning)]
    assert len(messages) == 3 and messages == res.warnings
    assert "ASSUMED from the model card of brain-qd-low" in messages[0] and "unidirectional" in messages[1]
    assert messages[2].startswith("windows of 100 frames")
    assert all(w.filename == __file__ for w in caught)  # the warning points at the caller's line
    assert res.timing == TIMING
    assert all("timing assumed" in f for f in res.windows["flags"]) and all("timing assumed" in f for f in res.rois["flags"])
    assert not any("--" in m for m in res.warnings)


def _error(call) -> str:
    with pytest.raises(DleStreamError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and not re.search(r"(^|\s)--[a-z]", message), message  # no CLI flag named
    return message


def test_errors_are_one_line_and_name_the_argument(movie):
    assert "20×20 px frames" in _error(lambda: dle.estimate(movie, ScanTiming.reference()))
    assert "dataclasses.replace" in _error(lambda: dle.estimate(movie, ScanTiming.reference()))
    # the model's timing stretched to the frame by with_frame_size is another scan; with a pixel
    # size outside the shipped family's box no model serves it: refused clearly
    stretched = dataclasses.replace(ScanTiming.reference().with_frame_size(HEIGHT, WIDTH), pixel_size_um=0.3)
    assert "trained for another scan" in _error(lambda: dle.estimate(movie, stretched))
    assert "scan timing" in _error(lambda: dle.estimate(movie, None))
    assert "hop=0" in _error(lambda: dle.estimate(movie, TIMING, hop=0))
    assert "window=8" in _error(lambda: dle.estimate(movie, TIMING, window=8))
    assert "fewer than one 1000-frame window" in _error(lambda: dle.estimate(movie, TIMING, window=1000))
    assert "outside" in _error(lambda: dle.estimate(movie, TIMING, rois={"far": (50, 0, 20, 20)}))
    assert "(x, y, w, h)" in _error(lambda: dle.estimate(movie, TIMING, rois={"bad": (0, 0, 20)}))
    assert "estimator='fast'" in _error(lambda: dle.estimate(movie, TIMING, estimator="fast"))
    assert "[frames, height, width]" in _error(lambda: dle.estimate(movie[0], TIMING))
    bad = movie[:150].copy()
    bad[3, 5, 5] = np.nan
    assert "NaN" in _error(lambda: dle.estimate(bad, TIMING, window=WINDOW))
    # fits the frame, other ratios, and a pixel size outside the shipped family's box
    narrow = dataclasses.replace(TIMING, line_period_us=1400.0, pixel_size_um=0.3)
    assert "another scan" in _error(lambda: dle.estimate(movie, narrow))


def test_tables_convert_to_xarray_when_it_is_installed(from_array, monkeypatch):
    try:
        import xarray  # noqa: F401
    except ImportError:
        assert "xarray" in _error(from_array.windows.to_xarray)
        return
    ds = from_array.windows.to_xarray()
    assert dict(ds.sizes) == {"window": 8, "tile": 6}
    assert ds["d_um2_s"].dims == ("window", "tile") and ds["frame_start"].dims == ("window",)
    assert ds["row"].dims == ("tile",)
    np.testing.assert_allclose(ds["d_um2_s"].values.ravel(), from_array.windows["d_um2_s"])
    assert from_array.rois.to_xarray()["d_um2_s"].dims == ("roi",)
    monkeypatch.setitem(sys.modules, "xarray", None)  # as if it were not installed
    assert "pip install xarray" in _error(from_array.windows.to_xarray)


def test_readme_example_is_the_example_script_and_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):readme.index("## Layout")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    script = (ROOT / "examples" / "estimate_in_python.py").read_text()
    example = max(blocks, key=len)
    assert [ln for ln in example.splitlines() if ln.strip()] == [
        ln for ln in script[script.index("import tempfile"):].splitlines()
        if ln.strip() and ln != "import sys" and not ln.startswith(("if len(sys.argv)", "    frames = int(sys.argv"))]
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "estimate_in_python.py"), "600"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    found = dict(re.findall(r"^  (left|right): D = ([0-9.]+)", out.stdout, re.MULTILINE))
    assert "(true 0.3)" in out.stdout and "(true 1.2)" in out.stdout
    assert float(found["left"]) == pytest.approx(0.3, abs=0.1)
    assert out.stdout.count("frames ") >= 3  # one line per streamed window (the model's 400 frames every 100)
    assert "windows of" not in out.stderr  # the model's own window length: no calibration warning
