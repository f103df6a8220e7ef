"""The recording check (dle_stream/recording_check.py): physics of its measurements, its
verdicts on recordings that leave the trained range in one known way, and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dle_stream import ScanTiming
from dle_stream.recording_check import check_movie, movie_statistics, reference
from dle_stream.training.priors import get_preset, stressed
from dle_stream.training.simulator import Simulator

PRESET = get_preset("low")
DX = PRESET.timing.pixel_size_um
F_S = PRESET.timing.frame_period_us * 1e-6
PSF = PRESET.priors.psf_sigma_xy_um[0]
#: One sample seen through one microscope: every tile of a recording shares PSF, brightness,
#: background and detector (the training prior draws them per tile).
ONE_SAMPLE = PRESET.priors.with_(psf_sigma_xy_um=(0.21, 0.0), psf_sigma_z_um=(1.36, 0.0),
                                 brightness_photons=(600.0, 0.0), background_photons=(100.0, 0.0), gain=(1.0, 0.0))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private cache for the reference ranges (restored afterwards)."""
    old = os.environ.get("XDG_CACHE_HOME")
    path = tmp_path_factory.mktemp("cache")
    os.environ["XDG_CACHE_HOME"] = str(path)
    yield path
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def ref(cache_dir):
    """brain-qd-low's reference from 48 tiles (the check itself uses more)."""
    torch.set_num_threads(1)
    return reference("brain-qd-low", n_tiles=48)


def simulate_recording(priors, seed: int, frames: int = 400) -> tuple[np.ndarray, ScanTiming]:
    """A 40×40-px recording: four 20×20 tiles at their raster offsets in the reference scan."""
    timing = ScanTiming(**{**PRESET.timing.to_dict(), "width_px": 40, "height_px": 40})
    sim = Simulator(priors, timing, 20, 20, frames)
    offsets = np.array([[0, 0], [0, 20], [20, 0], [20, 20]])
    b = sim.simulate(4, seed=seed, offsets=offsets)
    m = b.movies.numpy()
    movie = np.concatenate([np.concatenate([m[0], m[1]], axis=2), np.concatenate([m[2], m[3]], axis=2)], axis=1)
    return movie, timing


def test_psf_width_from_the_along_line_autocorrelation_is_the_simulated_psf():
    """Movies with a known σxy: the measured width follows it (median ratio ≈ 1), and doubling
    the PSF doubles the measurement."""
    torch.set_num_threads(1)
    b = Simulator(PRESET.priors, PRESET.timing, 20, 20, 200).simulate(16, seed=11)
    w = np.array([movie_statistics(m, DX, F_S, PSF)["psf_width_um"] for m in b.movies.numpy()])
    true = b.params["psf_sigma_xy_um"].numpy()
    ok = np.isfinite(w)
    assert ok.sum() >= 5  # tiles with particles in view
    assert 0.85 < np.median(w[ok] / true[ok]) < 1.15
    assert np.corrcoef(w[ok], true[ok])[0, 1] > 0.7
    wide = Simulator(stressed(PRESET.priors, "wide-psf", "strong"), PRESET.timing, 20, 20, 200).simulate(16, seed=11)
    w2 = np.array([movie_statistics(m, DX, F_S, PSF)["psf_width_um"] for m in wide.movies.numpy()])
    assert 1.6 < np.nanmedian(w2) / np.nanmedian(w) < 2.4


def test_an_empty_movie_has_no_psf_width_and_no_brightness():
    noise = np.random.default_rng(0).normal(100, 10, (400, 20, 20))
    st = movie_statistics(noise, DX, F_S, PSF)
    assert np.isnan(st["psf_width_um"]) and np.isnan(st["brightness"])
    assert st["density"] < 0.1


def test_clean_recording_is_within_and_a_twice_wider_psf_is_flagged_for_psf_width(ref):
    movie, timing = simulate_recording(ONE_SAMPLE, seed=5)
    clean = check_movie(movie, timing, ref, PSF, windows=1)
    assert clean.ok, clean.summary_line()
    movie, timing = simulate_recording(stressed(ONE_SAMPLE, "wide-psf", "strong"), seed=5)
    wide = check_movie(movie, timing, ref, PSF, windows=1)
    psf = next(r for r in wide.rows if r.name == "psf_width_um")
    assert psf.status == "high" and psf.value > 1.6 * 0.21
    assert "PSF width" in wide.summary_line() and "above the trained" in wide.summary_line()


def test_check_command_table_json_and_exit_status(ref, cli, tmp_path, monkeypatch):
    import dle_stream.recording_check as rc
    from dle_stream.recording import write_recording

    monkeypatch.setattr(rc, "REFERENCE_TILES", ref.n_tiles)  # the fixture's cached reference
    movie, timing = simulate_recording(ONE_SAMPLE, seed=5)
    path = tmp_path / "rec.tif"
    write_recording(path, movie.astype(np.float32), timing)
    out = cli("check", path, "--windows", "1", "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["ok"] is True and doc["tiles"] == 4
    assert {r["name"] for r in doc["rows"]} == {"brightness", "psf_width_um", "density", "motion", "blinking"}
    wide, _ = simulate_recording(stressed(ONE_SAMPLE, "wide-psf", "strong"), seed=5)
    path2 = tmp_path / "wide.tif"
    write_recording(path2, wide.astype(np.float32), timing)
    out = cli("check", path2, "--windows", "1")
    assert out.exit_code == 1, out.output
    text = " ".join(out.output.split())
    assert "OUTSIDE what the model was trained for: PSF width σxy" in text
    assert "–—" not in text and "—–" not in text  # a one-sided range reads "≥ x" / "≤ x", not "x–—"


def test_check_bad_input_is_one_line_naming_the_flag(cli, write_movie):
    path = write_movie("short.tif", frames=50, height=20, width=20)
    assert "--windows 0: must be at least 1" in cli.error("check", path, "--windows", "0")
    assert "fewer than one 400-frame window" in cli.error("check", path)


# ------------------------------------------------------------- replay's line
@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A clean 40×40-px, 400-frame recording of one sample and the same with a twice wider PSF."""
    from dle_stream.recording import write_recording

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("recordings")
    out = {}
    for name, priors in (("clean", ONE_SAMPLE), ("wide", stressed(ONE_SAMPLE, "wide-psf", "strong"))):
        movie, timing = simulate_recording(priors, seed=5)
        out[name] = write_recording(folder / f"{name}.tif", movie.astype(np.float32), timing)
    return out


def _replay(recording, tmp_path, **opts):
    """``session.replay`` in plain mode with a log; (result, printed text on one line)."""
    import io

    from rich.console import Console

    from dle_stream.session import StreamOptions, describe_result, replay

    buf = io.StringIO()
    console = Console(file=buf, width=400)
    result = replay(recording, StreamOptions(log=tmp_path / "run.zarr", dashboard="plain", **opts), console=console)
    describe_result(result, console)
    return result, " ".join(buf.getvalue().split())


def test_replay_says_inside_for_a_clean_recording_and_keeps_it_in_the_log(recordings, tmp_path):
    from dle_stream.zarr_log import open_log

    result, text = _replay(recordings["clean"], tmp_path)
    line = "recording check: inside the trained range (brightness above background, PSF width σxy"
    assert text.count(line) == 2  # before the windows, and in the end summary
    assert result.recording_check["status"] == "inside"
    meta = open_log(tmp_path / "run.zarr").header.metadata
    assert meta.recording_check["status"] == "inside" and meta.recording_check["line"].startswith(line)
    assert meta.recording_check["reference"] == "shipped with model brain-qd-low"
    assert {r["name"] for r in meta.recording_check["result"]["rows"]} == {"brightness", "psf_width_um", "density",
                                                                             "motion", "blinking"}
    from typer.testing import CliRunner

    from dle_stream.cli import app

    shown = " ".join(CliRunner().invoke(app, ["log", "show", str(tmp_path / "run.zarr")]).output.split())
    assert "recording check inside the trained range (brightness above background" in shown


def test_replay_names_the_psf_width_of_a_twice_wider_psf(recordings, tmp_path):
    from dle_stream.zarr_log import open_log

    result, text = _replay(recordings["wide"], tmp_path)
    assert "recording check: PSF width σxy" in text and "µm above the trained" in text
    assert "estimates may be off; see `dle-stream check" in text and "wide.tif`" in text
    assert any(w.startswith("recording check: PSF width σxy") for w in result.stats.warnings)  # a warning too
    meta = open_log(tmp_path / "run.zarr").header.metadata
    assert meta.recording_check["status"] == "outside" and "PSF width σxy" in meta.recording_check["line"]
    rows = {r["name"]: r for r in meta.recording_check["result"]["rows"]}
    assert rows["psf_width_um"]["status"] == "high" and rows["psf_width_um"]["value"] > 1.6 * 0.21


def test_replay_skips_the_check_with_a_reason_and_still_estimates(cli, write_movie):
    short = write_movie("short.tif", frames=100, height=20, width=20)
    out = cli("replay", short, "--window", "40", "--hop", "40")
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "recording check: skipped (100 frames, fewer than one 400-frame window of model brain-qd-low)" in text
    assert "100 frames, 2 windows" in text
    out = cli("replay", short, "--window", "40", "--hop", "40", "--no-check")
    assert out.exit_code == 0 and "recording check: skipped (turned off with --no-check)" in " ".join(out.output.split())


# ------------------------------------------------- the reference a package ships
def _copy_package(src: str, dst, weights: bool = False):
    import shutil

    from dle_stream.model_package import resolve_model

    dst.mkdir(parents=True)
    for name in ("card.json", "recording_check.json") + (("weights.safetensors",) if weights else ()):
        shutil.copy(resolve_model(src) / name, dst / name)
    return dst


@pytest.mark.parametrize("model", ["brain-qd-low", "beads-high"])
def test_shipped_reference_matches_the_card_and_survives_new_weights_and_calibration(model, tmp_path):
    from dle_stream.model_package import load_card, resolve_model
    from dle_stream.recording_check import REFERENCE_TILES, shipped_reference

    ref, where = shipped_reference(resolve_model(model), load_card(resolve_model(model)))
    assert ref is not None, where
    assert ref.n_tiles == REFERENCE_TILES and ref.frames == 400
    lo, hi = ref.range_of("psf_width_um")
    assert lo is not None and hi is not None and lo < 0.21 < hi
    # retrained / recalibrated: weights, calibration, validation, name change; priors and scan do not
    folder = _copy_package(model, tmp_path / "pkg")
    card = json.loads((folder / "card.json").read_text())
    card.update(weights_sha256="0" * 64, validation={}, name=f"{model}-v2", description="retrained",
                training={**card["training"], "likelihood_calibration": {
                    **card["training"]["likelihood_calibration"], "temperature": 0.5}, "end_to_end_steps": 99})
    (folder / "card.json").write_text(json.dumps(card))
    ref2, where = shipped_reference(folder, load_card(folder))
    assert ref2 is not None, where
    # a different training prior or scan: stale, and the message says what changed
    card["simulator"]["priors"]["brightness_photons"] = [300.0, 100.0]
    (folder / "card.json").write_text(json.dumps(card))
    ref3, why = shipped_reference(folder, load_card(folder))
    assert ref3 is None and "stale (the card's simulator priors (simulator.priors) changed)" in why


def test_a_missing_or_stale_shipped_reference_falls_back_to_the_cache(ref, recordings, tmp_path, monkeypatch):
    import dle_stream.recording_check as rc
    from dle_stream.model_package import load_card
    from dle_stream.recording import open_recording

    folder = _copy_package("brain-qd-low", tmp_path / "brain-qd-low", weights=True)
    (folder / "recording_check.json").rename(tmp_path / "shipped.json")
    with open_recording(recordings["clean"]) as rec:
        timing = ScanTiming(**{**PRESET.timing.to_dict(), "width_px": 40, "height_px": 40})
        # missing and nothing cached under this tile count: skipped, saying how to get the ranges
        monkeypatch.setattr(rc, "REFERENCE_TILES", 1000)
        out = rc.replay_check(rec, folder, timing)
        assert out["status"] == "skipped" and "ships no reference ranges" in out["line"]
        assert "none cached; `dle-stream check --write-reference" in out["line"] and out["result"] is None
        # missing, cached (the module's 48-tile reference of the same card): the cache is used
        monkeypatch.setattr(rc, "REFERENCE_TILES", ref.n_tiles)
        out = rc.replay_check(rec, folder, timing)
        assert out["status"] == "inside" and out["reference"] == "cached", out["line"]
        # stale (written by an older check): ignored, the cache is used
        doc = json.loads((tmp_path / "shipped.json").read_text())
        doc["keyed_on"]["n"] = ref.n_tiles
        doc["keyed_on"]["v"] = rc.CHECK_VERSION - 1
        (folder / "recording_check.json").write_text(json.dumps(doc))
        assert "stale (the check's version changed)" in rc.shipped_reference(folder, load_card(folder))[1]
        out = rc.replay_check(rec, folder, timing)
        assert out["status"] == "inside" and out["reference"] == "cached", out["line"]


def test_write_reference_writes_a_file_the_check_reads(ref, tmp_path, monkeypatch, cli):
    import dle_stream.recording_check as rc
    from dle_stream.model_package import load_card

    folder = _copy_package("brain-qd-low", tmp_path / "pkg")
    (folder / "recording_check.json").unlink()
    monkeypatch.setattr(rc, "REFERENCE_TILES", ref.n_tiles)  # the module's cached reference: no simulation
    out = cli("check", "--write-reference", folder)
    assert out.exit_code == 0, out.output
    assert (folder / "recording_check.json").is_file()
    got, where = rc.shipped_reference(folder, load_card(folder))
    assert got is not None, where
    for name in ("brightness", "psf_width_um", "density", "motion"):
        for a, b in zip(got.range_of(name), ref.range_of(name)):
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-5)
    assert "give a RECORDING to check" in cli.error("check")


def test_whole_field_motion_is_found_from_all_tiles_together(ref):
    """0.5-px motion at 6.5 Hz on four tiles: one tile of the four shows it (scores 5.4, 5.8,
    5.0, 32.6; the old check took their median, 5.6, inside the trained ≤ 8.2), the tiles'
    correlation maps added show it (13.5)."""
    from dataclasses import replace

    moving = replace(stressed(ONE_SAMPLE, "motion", "strong"), heartbeat_px=(0.5, 0.5), heartbeat_hz=(6.5, 6.5))
    movie, timing = simulate_recording(moving, seed=3)
    res = check_movie(movie, timing, ref, PSF, windows=1)
    motion = next(r for r in res.rows if r.name == "motion")
    assert motion.status == "high", res.summary_line()
    assert "whole-field motion" in res.summary_line() and "peak at 6.5 Hz" in res.summary_line()
    still, timing = simulate_recording(ONE_SAMPLE, seed=3)
    assert next(r for r in check_movie(still, timing, ref, PSF, windows=1).rows if r.name == "motion").status == "ok"


def test_an_open_recording_is_checked_as_its_array_reading_only_the_tiles_looked_at(ref, recordings, monkeypatch):
    import dle_stream.recording_check as rc
    from dle_stream.recording import open_recording

    monkeypatch.setattr(rc, "READ_BLOCK_FRAMES", 7)  # blocks that do not divide the window
    with open_recording(recordings["wide"]) as rec:
        movie = rec.read(0, rec.n_frames)
        timing = ScanTiming(**{**PRESET.timing.to_dict(), "width_px": 40, "height_px": 40})
        a = check_movie(rec, timing, ref, PSF, windows=1, max_tiles=3)
    b = check_movie(movie, timing, ref, PSF, windows=1, max_tiles=3)
    assert a.tiles == b.tiles == 3
    assert [(r.name, r.value, r.status) for r in a.rows] == [(r.name, r.value, r.status) for r in b.rows]


# ------------------------------------------------------------------ live runs
def test_live_run_checks_its_first_full_window_and_says_so_in_the_summary(tmp_path, cli):
    import io

    from rich.console import Console

    from dle_stream.session import StreamOptions, describe_result, run_live

    buf = io.StringIO()
    console = Console(file=buf, width=400)
    result = run_live(StreamOptions(dashboard="quiet"), demo=True, frames=410, height=40, width=40, realtime=False,
                      console=console)
    assert result.recording_check is not None
    assert result.recording_check["status"] == "inside", result.recording_check["line"]
    assert result.recording_check["result"]["tiles"] == 4 and result.recording_check["result"]["frames"] == 400
    describe_result(result, console)
    assert "recording check: inside the trained range" in " ".join(buf.getvalue().split())
    # shorter than one model window: skipped, saying so
    short = run_live(StreamOptions(dashboard="quiet", window=40), demo=True, frames=60, height=20, width=20,
                     realtime=False, console=console)
    assert short.recording_check["line"] == ("recording check: skipped (the run ended after 60 frames, before one "
                                             "400-frame window)")
    out = cli("run", "--demo", "--fast", "--frames", "60", "--size", "20x20", "--window", "40", "--no-check")
    assert out.exit_code == 0 and "recording check: skipped (turned off with --no-check)" in " ".join(out.output.split())


# ------------------------------------------------------- blinking and dim dots
def simulate_field(priors, seed: int, d_um2_s: float = 0.3) -> tuple[np.ndarray, ScanTiming]:
    """A 40×160-px recording (2 × 8 tiles of 20×20 px at their raster offsets; the reference scan
    has 40 lines of 188 px), every tile's D the same."""
    timing = ScanTiming(**{**PRESET.timing.to_dict(), "width_px": 160, "height_px": 40})
    sim = Simulator(priors, timing, 20, 20, 400)
    offsets = np.array([[20 * r, 20 * c] for r in range(2) for c in range(8)])
    m = sim.simulate(16, seed=seed, offsets=offsets, d_um2_s=torch.full((16,), d_um2_s, dtype=torch.float64)).movies
    m = m.numpy()
    return np.concatenate([np.concatenate(list(m[8 * r:8 * r + 8]), axis=2) for r in range(2)], axis=1), timing


def test_line_light_sums_hold_no_noise_and_are_equal_along_and_across_for_still_dots():
    """Pure noise: both sums within a few standard errors of 0. Slow dots that do not blink,
    drawn with an isotropic PSF: the light's correlation across the lines equals that along
    them (ratio 1 within its noise; they move ≈ 0.2 px per line)."""
    from dle_stream.recording_check import _normalise, line_light_sums

    rng = np.random.default_rng(1)
    along, across, se = line_light_sums(_normalise(rng.normal(100, 10, (400, 20, 20))))
    assert abs(along) < 5 * se and abs(across) < 5 * se
    b = Simulator(stressed(ONE_SAMPLE, "dense", "weak"), PRESET.timing, 20, 20, 400).simulate(
        8, seed=2, d_um2_s=torch.full((8,), 0.3, dtype=torch.float64))
    a = c = 0.0
    for m in b.movies.numpy():
        x, y, se = line_light_sums(_normalise(m))
        a, c = a + x, c + y
    assert a > 100 * se * np.sqrt(8)
    assert 0.95 < c / a < 1.05


def test_a_blinking_recording_is_told_from_a_steady_one_of_the_same_d_and_density(ref):
    """Two 16-tile recordings of one sample, the same seed, D and particles; the quantum dots of
    one blink (power-law dwells, ≈ 27 % on-time). Dots that switch within the lines they are
    drawn on lower the across-line light: the pooled ratio falls, and the check names it."""
    blinking = stressed(ONE_SAMPLE, "blinking", "strong")
    still, timing = simulate_field(ONE_SAMPLE, seed=7)
    blink, _ = simulate_field(blinking, seed=7)
    clean = check_movie(still, timing, ref, PSF, windows=1)
    flagged = check_movie(blink, timing, ref, PSF, windows=1)
    row_clean = next(r for r in clean.rows if r.name == "blinking")
    row_blink = next(r for r in flagged.rows if r.name == "blinking")
    assert row_clean.status == "ok", clean.summary_line()
    assert row_blink.value < row_clean.value - 0.04
    assert row_blink.status == "low", flagged.summary_line()
    assert "blinking (light kept from line to line)" in flagged.summary_line()
    assert "below the trained ≥" in flagged.summary_line() and "16 tiles pooled" in flagged.summary_line()


def test_pooling_tiles_narrows_the_trained_blinking_range(ref):
    """One tile's few dots leave the ratio uncertain; the range for 16 pooled reference tiles is
    narrower (its lower end higher) and still holds the still dots' ratio of 1."""
    lo1, hi1 = ref.range_of("blinking")
    lo16, hi16 = ref.range_of("blinking", 16)
    assert hi1 is None and hi16 is None and lo1 is not None and lo16 is not None
    assert lo1 < lo16 < 1.0


def test_an_empty_movie_has_no_blinking_ratio():
    noise = np.random.default_rng(3).normal(100, 10, (400, 20, 20))
    assert np.isnan(movie_statistics(noise, DX, F_S, PSF)["blinking"])


def test_blinking_is_not_measured_for_a_model_whose_dots_move_pixels_per_line():
    """beads-high reaches D = 50 µm²/s: its dots move ≈ 2.6 px rms while one line is drawn, which
    lowers the across-line light as blinking does; the check says it cannot tell, and why."""
    from dle_stream.model_package import load_card, resolve_model
    from dle_stream.recording_check import compare, shipped_reference

    high, _ = shipped_reference(resolve_model("beads-high"), load_card(resolve_model("beads-high")))
    assert high is not None and high.range_of("blinking") == (None, None)
    values = {k: np.array([v]) for k, v in movie_statistics(
        simulate_recording(stressed(ONE_SAMPLE, "blinking", "strong"), seed=5)[0], DX, F_S, PSF).items()}
    row = next(r for r in compare(values, high).rows if r.name == "blinking")
    assert row.status == "not measured" and "fastest dots move too far" in row.text()
    low, _ = shipped_reference(resolve_model("brain-qd-low"), load_card(resolve_model("brain-qd-low")))
    assert low is not None and low.range_of("blinking")[0] is not None  # 0.45 px per line: measured
