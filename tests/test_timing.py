"""ScanTiming: the pixel-time map, validation, JSON, and comparison of two scans."""

import json

import numpy as np
import pytest

from dle_stream import DleStreamError, ScanTiming


def make(**kw):
    base = dict(pixel_size_um=0.2, dwell_us=2.0, line_period_us=300.0, frame_period_us=40000.0,
                width_px=128, height_px=100)
    base.update(kw)
    return ScanTiming(**base)


def test_pixel_times_follow_the_raster_formula():
    tm = make()
    r0, c0, h, w, T = 7, 30, 5, 6, 3
    times = tm.pixel_times_us(r0, c0, h, w, n_frames=T, first_frame=2)
    assert times.shape == (T, h, w)
    for k in range(T):
        for r in range(h):
            for c in range(w):
                expected = (k + 2) * 40000.0 + (r0 + r) * 300.0 + (c0 + c) * 2.0
                assert times[k, r, c] == pytest.approx(expected)


def test_bidirectional_reverses_odd_full_frame_lines():
    uni, bi = make(), make(bidirectional=True)
    r0, c0 = 3, 10  # tile row 0 is full-frame line 3 (odd)
    tu = uni.pixel_times_us(r0, c0, 4, 5)
    tb = bi.pixel_times_us(r0, c0, 4, 5)
    for r in range(4):
        line = r0 + r
        if line % 2 == 0:
            np.testing.assert_allclose(tb[0, r], tu[0, r])
        else:
            cols = c0 + np.arange(5)
            np.testing.assert_allclose(tb[0, r], line * 300.0 + (128 - 1 - cols) * 2.0)
            assert np.all(np.diff(tb[0, r]) < 0)  # later columns earlier in time


def test_reference_timing_matches_the_reference_simulator():
    tm = ScanTiming.reference()
    assert tm.frame_rate_hz == pytest.approx(16.22, abs=0.01)
    assert tm.line_retrace_us == pytest.approx(1348.0)
    # F = start of the last line + 33 ms flyback
    assert tm.frame_period_us == pytest.approx(19 * tm.line_period_us + 33000.0)


@pytest.mark.parametrize("bad, word", [
    (dict(dwell_us=-1.0), "dwell_us"),
    (dict(pixel_size_um=float("nan")), "pixel_size_um"),
    (dict(line_period_us=200.0), "line period"),   # 128 px × 2 µs = 256 µs > 200 µs
    (dict(frame_period_us=1000.0), "frame period"),
    (dict(width_px=0), "width_px"),
])
def test_impossible_timing_is_refused_with_a_clear_message(bad, word):
    with pytest.raises(DleStreamError) as err:
        make(**bad)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_json_round_trip(tmp_path):
    tm = make(bidirectional=True)
    assert ScanTiming.from_json(tm.to_json()) == tm
    path = tmp_path / "timing.json"
    path.write_text(tm.to_json())
    assert ScanTiming.from_file(path) == tm
    with pytest.raises(DleStreamError, match="lacks"):
        ScanTiming.from_dict({"dwell_us": 1.0})
    with pytest.raises(DleStreamError, match="unknown"):
        ScanTiming.from_dict({**tm.to_dict(), "speed": 3})
    path.write_text("{not json")
    with pytest.raises(DleStreamError, match="timing.json"):
        ScanTiming.from_file(path)


def test_compare_same_ratios_gives_time_scale():
    model = ScanTiming.reference()
    slow = model.scaled(2.5)
    cmp = model.compare(slow)
    assert cmp.compatible
    assert cmp.time_scale == pytest.approx(2.5)
    assert cmp.d_scale == pytest.approx(0.4)
    assert model.compare(model).time_scale == pytest.approx(1.0)


def test_compare_different_ratios_is_incompatible_and_says_what_differs():
    model = ScanTiming.reference()
    other = ScanTiming(0.15, 8.0, 3000.0, 61652.0 * 2, 20, 20)  # line period doubled, not dwell
    cmp = model.compare(other)
    assert not cmp.compatible
    assert any("line period" in d for d in cmp.differences)
    wrong_px = ScanTiming(0.3, 8.0, 1508.0, 61652.0, 20, 20)
    assert "pixel size" in model.compare(wrong_px).explain()
    bidi = ScanTiming(0.15, 8.0, 1508.0, 61652.0, 20, 20, bidirectional=True)
    assert not model.compare(bidi).compatible


def test_tile_outside_the_frame_is_refused():
    with pytest.raises(DleStreamError, match="does not fit"):
        make().pixel_times_us(95, 0, 10, 10)


def test_timing_dict_is_plain_json():
    json.dumps(make().to_dict())


def test_for_frame_keeps_the_scan_when_the_frame_fits_else_grows_the_periods():
    """One rule for "the timing of a frame of this size" (simulate, the demo camera)."""
    ref = ScanTiming.reference()  # 20×20 px, line 1508 µs, frame 61652 µs
    small = ref.for_frame(16, 40)  # 40 px × 8 µs fit in the line, 16 lines in the frame
    assert (small.height_px, small.width_px) == (16, 40)
    assert (small.dwell_us, small.line_period_us, small.frame_period_us) == (8.0, 1508.0, 61652.0)
    assert ref.compare(small).compatible and ref.compare(small).time_scale == 1.0
    big = ref.for_frame(512, 512)  # does not fit: dwell, retrace and flyback kept
    assert big == ref.with_frame_size(512, 512)
    assert big.line_retrace_us == pytest.approx(ref.line_retrace_us)
    assert big.frame_flyback_us == pytest.approx(ref.frame_flyback_us)


def test_demo_timing_is_the_model_timing_for_the_frame():
    from dle_stream.model_package import load_card, resolve_model
    from dle_stream.session import demo_timing

    card_timing = load_card(resolve_model("brain-qd-low")).timing
    assert demo_timing("brain-qd-low", 40, 120) == card_timing.for_frame(40, 120)
    assert demo_timing("brain-qd-low", 40, 120).line_period_us == card_timing.line_period_us
