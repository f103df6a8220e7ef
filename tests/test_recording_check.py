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
    assert {r["name"] for r in doc["rows"]} == {"brightness", "psf_width_um", "density", "motion"}
    wide, _ = simulate_recording(stressed(ONE_SAMPLE, "wide-psf", "strong"), seed=5)
    path2 = tmp_path / "wide.tif"
    write_recording(path2, wide.astype(np.float32), timing)
    out = cli("check", path2, "--windows", "1")
    assert out.exit_code == 1, out.output
    text = " ".join(out.output.split())
    assert "OUTSIDE what the model was trained for: PSF width σxy" in text


def test_check_bad_input_is_one_line_naming_the_flag(cli, write_movie):
    path = write_movie("short.tif", frames=50, height=20, width=20)
    assert "--windows 0: must be at least 1" in cli.error("check", path, "--windows", "0")
    assert "fewer than one 400-frame window" in cli.error("check", path)
