"""Kills (issue 6, item 2): a replay or a live run killed at any moment leaves a log that
opens and holds every window it reported; ``--append`` continues a killed run's log;
SIGINT and SIGTERM stop a replay without damaging the log.

Each trial runs the real command line in a subprocess (``python -m dle_stream``) with
``--no-dashboard``, so every window estimate prints one line
``window N frames a–b: ...``, and the runner commits each estimate to the log before it
is printed (DESIGN §6). The trial then kills the process and checks the log against the
lines that reached the pipe. Kill moments are drawn from a seeded generator and spread
over the whole run: during start-up (before the log exists, while it is being created),
at random times over a reference run's duration, and just after the k-th window line.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dle_stream.errors import DleStreamError
from dle_stream.model_package import list_models
from dle_stream.timing import ScanTiming
from dle_stream.training.priors import get_preset
from dle_stream.training.recording_sim import simulate_recording
from dle_stream.zarr_log import open_log

pytestmark = pytest.mark.skipif(
    not any(card.name == "brain-qd-low" for _, card in list_models()), reason="shipped model brain-qd-low missing"
)

REPO = Path(__file__).resolve().parents[1]
FRAMES, HEIGHT, WIDTH = 200, 40, 60          # 6 tiles of 20×20 px
WINDOW, HOP = 40, 10
N_WINDOWS = (FRAMES - WINDOW) // HOP + 1     # 17 windows in a full replay
WINDOW_LINE = re.compile(r"^window (\d+) frames (\d+)\D(\d+):")
REPLAY_TRIALS = 20
LIVE_TRIALS = 6
TRIAL_TIMEOUT_S = 120


def _env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", COLUMNS="200", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dle_stream", *args]


def _replay_args(rec: Path, log: Path, *extra: str) -> list[str]:
    return _command("replay", str(rec), "--log", str(log), "--window", str(WINDOW), "--hop", str(HOP),
                    "--no-dashboard", *extra)


def _live_args(log: Path, *extra: str) -> list[str]:
    return _command("run", "--demo", "--fast", "--frames", "300", "--size", f"{HEIGHT}x{WIDTH}", "--window",
                    str(WINDOW), "--hop", str(HOP), "--log", str(log), "--no-dashboard", *extra)


def _windows(stdout: str) -> list[tuple[int, int, int]]:
    """(window, frame_start, frame_stop) of every window line printed."""
    return [tuple(int(g) for g in m.groups()) for m in map(WINDOW_LINE.match, stdout.splitlines()) if m]


class Trial:
    """One subprocess, stopped with ``sig`` at a chosen moment; its output and exit code."""

    def __init__(self, args: list[str], cwd: Path):
        # SIGINT at its default in the child, as at a terminal, even when the test run
        # itself was started in the background (where the shell makes SIGINT ignored)
        self.proc = subprocess.Popen(args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, encoding="utf-8", errors="replace",
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.started = time.monotonic()
        self._watchdog = threading.Timer(TRIAL_TIMEOUT_S, self.proc.kill)  # never hang the suite
        self._watchdog.start()
        self.lines: list[str] = []

    def wait_for_window(self, k: int) -> bool:
        """Read stdout until the k-th window line (0-based) arrived; False if the run ended first."""
        seen = 0
        for line in self.proc.stdout:
            self.lines.append(line)
            if WINDOW_LINE.match(line):
                if seen == k:
                    return True
                seen += 1
        return False

    def stop(self, sig: int) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=TRIAL_TIMEOUT_S)
        self._watchdog.cancel()
        return self.proc.returncode, "".join(self.lines) + out, err

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=TRIAL_TIMEOUT_S)
        self._watchdog.cancel()
        self.duration = time.monotonic() - self.started
        return self.proc.returncode, "".join(self.lines) + out, err


def check_log(log: Path, reported: list[tuple[int, int, int]], *, replay: bool, allow_missing: bool):
    """The log opens and holds every reported window with the reported frames and finite D.

    Returns the LogView, or None when the process died before the log was a log (only
    allowed when no window was reported)."""
    if not reported and allow_missing:
        try:
            view = open_log(log)
        except DleStreamError as exc:      # killed before or while the store was created
            assert len(str(exc).splitlines()) == 1
            return None
    else:
        view = open_log(log)
    if replay:  # the whole frame in 20-px tiles
        assert view.n_tiles == (HEIGHT // 20) * (WIDTH // 20)
    else:  # the demo camera's left and right halves as two ROIs of disjoint 20-px tiles
        assert [r["name"] for r in view.rois] == ["left", "right"]
        assert view.n_tiles == 2 * (HEIGHT // 20) * ((WIDTH // 2) // 20)
    n = view.n_windows
    window = np.asarray(view.window)
    d, sigma = np.asarray(view.d), np.asarray(view.sigma)
    assert window.shape == (n,) and d.shape == (n, view.n_tiles) and sigma.shape == d.shape
    if replay:   # replay never skips: rows are windows 0..n-1 at hop spacing
        np.testing.assert_array_equal(window, np.arange(n))
        np.testing.assert_array_equal(view.frame_start, HOP * np.arange(n))
        np.testing.assert_array_equal(view.frame_stop, HOP * np.arange(n) + WINDOW)
    else:
        assert (np.diff(window) > 0).all()
    row = {int(w): i for i, w in enumerate(window)}
    for w, start, stop in reported:
        assert w in row, f"window {w} was reported but is not in the log (log windows {window.tolist()})"
        i = row[w]
        assert (int(view.frame_start[i]), int(view.frame_stop[i])) == (start, stop)
        assert np.isfinite(d[i]).all() and np.isfinite(sigma[i]).all() and (sigma[i] > 0).all()
    # frames are committed with (or before) the windows that end on them
    frame_index = np.asarray(view.frame_index)
    np.testing.assert_array_equal(frame_index, np.arange(view.n_frames))
    if n:
        assert view.n_frames >= int(np.max(view.frame_stop))
    return view


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill")
    base = get_preset("low").timing
    timing = ScanTiming(**{**base.to_dict(), "width_px": WIDTH, "height_px": HEIGHT})
    rec = simulate_recording(folder / "rec.tif", get_preset("low"), frames=FRAMES, height=HEIGHT, width=WIDTH,
                             timing=timing, d_spec="0.3,1.2", seed=1)
    return rec.path


@pytest.fixture(scope="module")
def reference_duration(recording, tmp_path_factory) -> float:
    """A complete replay: its duration sets the span of the random kill times."""
    folder = tmp_path_factory.mktemp("ref")
    trial = Trial(_replay_args(recording, folder / "ref.zarr"), folder)
    rc, out, err = trial.finish()
    assert rc == 0, err
    reported = _windows(out)
    assert [w for w, _, _ in reported] == list(range(N_WINDOWS))
    view = check_log(folder / "ref.zarr", reported, replay=True, allow_missing=False)
    assert view.n_windows == N_WINDOWS and view.n_frames == FRAMES
    return trial.duration


def _kill_plan(rng: random.Random, n_trials: int, duration: float, n_windows: int) -> list[tuple[str, float, int]]:
    """(kind, delay s, window k) per trial: a quarter during start-up, a quarter at a
    uniformly random time of the run, half just after a random window line."""
    plan = []
    for i in range(n_trials):
        if i % 4 == 0:
            plan.append(("time", rng.uniform(0.0, min(1.5, duration)), -1))
        elif i % 4 == 1:
            plan.append(("time", rng.uniform(0.0, duration * 1.1), -1))
        else:
            plan.append(("window", rng.uniform(0.0, 0.15), rng.randrange(n_windows)))
    return plan


def _run_killed(args: list[str], cwd: Path, kind: str, delay: float, k: int) -> tuple[int, str, str]:
    trial = Trial(args, cwd)
    if kind == "time":
        time.sleep(delay)
    elif trial.wait_for_window(k):
        time.sleep(delay)
    return trial.stop(signal.SIGKILL)


# -------------------------------------------------------------------------------- tests
def test_replay_killed_at_random_moments_keeps_every_reported_window(recording, reference_duration, tmp_path):
    rng = random.Random(20240606)
    plan = _kill_plan(rng, REPLAY_TRIALS, reference_duration, N_WINDOWS)
    partial: list[tuple[Path, int]] = []   # logs killed mid-run, for --append
    outcomes = []
    for trial, (kind, delay, k) in enumerate(plan):
        log = tmp_path / f"run{trial}.zarr"
        rc, out, err = _run_killed(_replay_args(recording, log), tmp_path, kind, delay, k)
        reported = _windows(out)
        assert "Traceback" not in err, err
        if rc == 0:   # the run finished before the kill: everything is there
            assert len(reported) == N_WINDOWS
        else:
            assert rc == -signal.SIGKILL, (rc, err)
        view = check_log(log, reported, replay=True, allow_missing=True)
        n = -1 if view is None else view.n_windows
        outcomes.append((kind, round(delay, 2), k, rc, len(reported), n))
        if view is not None and 0 < n < N_WINDOWS and rc != 0:
            partial.append((log, n))
    print("replay kills (kind, delay s, k, rc, windows reported, windows in log):", *outcomes, sep="\n  ")
    # the plan really spread the kills: some before any window, some mid-run
    assert any(o[4] == 0 for o in outcomes), outcomes
    assert any(0 < o[4] < N_WINDOWS for o in outcomes), outcomes
    assert partial, outcomes

    # --append resumes each killed run (up to 10): the log ends up holding every window of the
    # recording exactly once, in order, and every frame once; the old rows are untouched
    for log, n in partial[:10]:
        before = open_log(log)
        d_before = np.asarray(before.d).copy()
        rc, out, err = Trial(_replay_args(recording, log, "--append"), tmp_path).finish()
        assert rc == 0, err
        reported = _windows(out)
        # the screen numbers windows and frames as the log does: on from the killed run's last window
        assert [w for w, _, _ in reported] == list(range(n, N_WINDOWS))
        view = open_log(log)
        assert view.n_windows == N_WINDOWS
        np.testing.assert_array_equal(view.window, np.arange(N_WINDOWS))
        np.testing.assert_array_equal(view.frame_start, HOP * np.arange(N_WINDOWS))   # none twice, none missing
        np.testing.assert_array_equal(np.asarray(view.d)[:n], d_before)
        assert np.isfinite(np.asarray(view.d)).all()
        np.testing.assert_array_equal(view.frame_index, np.arange(FRAMES))
        assert len(view.attrs["segments"]) == 2
    # a log of this recording cannot be continued with other settings or another recording
    log, _ = partial[0]
    rc, out, err = Trial(_command("replay", str(recording), "--log", str(log), "--window", str(WINDOW), "--hop", "20",
                                  "--no-dashboard", "--append"), tmp_path).finish()
    assert rc == 2 and "other settings" in err and "--hop" in err and "Traceback" not in err


def test_live_demo_killed_at_random_moments_keeps_every_reported_window(tmp_path):
    rng = random.Random(7)
    outcomes = []
    for trial in range(LIVE_TRIALS):
        log = tmp_path / f"live{trial}.zarr"
        if trial % 3 == 0:
            kind, delay, k = "time", rng.uniform(0.3, 4.0), -1
        else:
            kind, delay, k = "window", rng.uniform(0.0, 0.1), rng.randrange(2)
        rc, out, err = _run_killed(_live_args(log), tmp_path, kind, delay, k)
        reported = _windows(out)
        assert "Traceback" not in err, err
        assert rc in (0, -signal.SIGKILL), (rc, err)
        view = check_log(log, reported, replay=False, allow_missing=True)
        outcomes.append((kind, round(delay, 2), k, rc, len(reported), None if view is None else view.n_windows))
    print("live kills (kind, delay s, k, rc, windows reported, windows in log):", *outcomes, sep="\n  ")
    assert any(o[4] > 0 and o[3] != 0 for o in outcomes), outcomes


def test_sigint_stops_a_replay_cleanly_and_closes_the_log(recording, tmp_path):
    log = tmp_path / "int.zarr"
    trial = Trial(_replay_args(recording, log), tmp_path)
    assert trial.wait_for_window(2)
    rc, out, err = trial.stop(signal.SIGINT)
    assert rc == 130, (rc, err)
    assert "Traceback" not in err and "interrupted" in err
    reported = _windows(out)
    assert len(reported) < N_WINDOWS        # it really stopped early
    view = check_log(log, reported, replay=True, allow_missing=False)
    assert view.n_windows >= 3


def test_sigterm_stops_a_replay_and_leaves_the_log_intact(recording, tmp_path):
    log = tmp_path / "term.zarr"
    trial = Trial(_replay_args(recording, log), tmp_path)
    assert trial.wait_for_window(2)
    rc, out, err = trial.stop(signal.SIGTERM)
    # SIGTERM unwinds like Ctrl-C (the handler ran: "terminated", exit 143), closing the log
    assert rc == 128 + signal.SIGTERM, (rc, err)
    assert "Traceback" not in err and "terminated" in err
    reported = _windows(out)
    view = check_log(log, reported, replay=True, allow_missing=False)
    assert view.n_windows >= 3


def test_sigint_stops_a_live_run_and_closes_the_log(tmp_path):
    log = tmp_path / "live-int.zarr"
    # an endless run at the camera's real pace (16 frames/s), stopped with Ctrl-C after its first window
    trial = Trial(_command("run", "--demo", "--size", f"{HEIGHT}x{WIDTH}", "--window", str(WINDOW),
                           "--hop", str(HOP), "--log", str(log), "--no-dashboard"), tmp_path)
    assert trial.wait_for_window(0)
    rc, out, err = trial.stop(signal.SIGINT)
    assert "Traceback" not in err, err
    assert rc in (0, 130), (rc, err)
    reported = _windows(out)
    view = check_log(log, reported, replay=False, allow_missing=False)
    summary = re.search(r"^(\d+) frames, (\d+) windows", out, re.M)
    if summary:   # the summary is printed after the log was closed: every frame counted is in it
        assert view.n_frames == int(summary.group(1))
        assert view.n_windows == int(summary.group(2))
