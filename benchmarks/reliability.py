"""Reliability of the command line: bad inputs across every command, and replays killed at random.

Two measurements, each on the real command line in subprocesses (``python -m dle_stream``,
the entry point of ``dle-stream``):

1. **Bad inputs.** A fixed list of mistakes a user makes (missing files, wrong suffixes,
   truncated TIFF and Zarr files, read-only or impossible output paths, existing outputs
   without ``--overwrite``, absurd flags) across ``simulate``, ``replay``, ``run``,
   ``train``, ``bench``, ``demo``, ``log``, ``calibrate``. Each must end with a *clean
   error*: exit status ≠ 0 and no Python traceback; it is *one line* when stderr holds a
   single ``error: ...`` line (usage errors of the argument parser print typer's box and
   are counted apart). Where an existing file is at stake, its bytes are compared before
   and after. A few incomplete recordings that still hold whole windows must instead be
   analysed as far as they are valid, exit 0 and say INCOMPLETE on stderr.
2. **Kill trials.** ``dle-stream replay REC --log L`` is killed (SIGKILL) at a random
   moment of its run, then ``dle-stream replay REC --log L --append`` finishes it; the log
   is compared with that of an uninterrupted replay: windows lost, windows duplicated,
   windows whose D differs, and windows the killed run had printed but the log lacks.

Run it from the repository root (about 6–9 minutes on 2 busy cores)::

    python benchmarks/reliability.py --out benchmarks/results/reliability.md

It writes a Markdown report (the command, the machine, the totals and every case) to
``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASE_TIMEOUT_S = 90          # a bad input that is wrongly accepted (e.g. starts training) is stopped here
FRAMES, SIZE = 200, "40x60"  # the kill trials' recording: 6 tiles of 20×20 px
WINDOW, HOP = 40, 10         # 17 windows of 40 frames every 10
WINDOW_LINE = re.compile(r"^window (\d+) frames (\d+)\D(\d+):")


# ------------------------------------------------------------------ running
def env() -> dict:
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", COLUMNS="200",
             PYTHONPATH=os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]))
    return e


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dle_stream", *args]


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


def run(args: list[str], cwd: Path, timeout_s: float = CASE_TIMEOUT_S, extra_env: dict | None = None) -> Outcome:
    t0 = time.monotonic()
    try:
        p = subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                           env={**env(), **(extra_env or {})}, stdin=subprocess.DEVNULL)
        return Outcome(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Outcome(-1, out, err, time.monotonic() - t0, timed_out=True)


# --------------------------------------------------------------- the inputs
def digest(path: Path) -> str:
    """A hash of a file's bytes, or of a folder's names and bytes."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            h.update(str(p.relative_to(path)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


class Workspace:
    """The files the bad inputs use, made once in a temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self.readonly_note = ""

    def path(self, name: str) -> str:
        return str(self.root / name)

    def prepare(self) -> None:
        import tifffile
        import zarr

        r = self.root
        ok = run(["simulate", "rec.tif", "--frames", str(FRAMES), "--size", SIZE, "--seed", "1"], r, 300)
        assert ok.rc == 0, ok.stderr
        ok = run(["simulate", "rec.zarr", "--frames", str(FRAMES), "--size", SIZE, "--seed", "1"], r, 300)
        assert ok.rc == 0, ok.stderr
        ok = run(["replay", "rec.tif", "--log", "log.zarr", "--window", str(WINDOW), "--hop", str(HOP),
                  "--no-dashboard", "--quiet"], r, 300)
        assert ok.rc == 0, ok.stderr
        data = (r / "rec.tif").read_bytes()
        (r / "half.tif").write_bytes(data[: len(data) // 2])          # holds whole windows: analyse, warn
        (r / "head.tif").write_bytes(data[:1000])                     # the header only: nothing to analyse
        (r / "empty.tif").write_bytes(b"")
        (r / "junk.tif").write_text("this is not a TIFF\n")
        (r / "rec.avi").write_bytes(data[:4096])
        (r / "notes.txt").write_text("a user's notes\n")
        (r / "existing.csv").write_text("a user's table\n")
        (r / "junk.json").write_text("{not json")
        (r / "empty.cfg").write_text("")
        (r / "junk.cfg").write_text("junk line\n")
        (r / "folder").mkdir()
        (r / "folder" / "keep.txt").write_text("keep me\n")
        (r / "x.ome.tif").mkdir()
        (r / "empty-dir").mkdir()
        tifffile.imwrite(r / "single.tif", np.zeros((40, 60), dtype=np.uint16))
        tifffile.imwrite(r / "tiny.tif", np.zeros((100, 10, 10), dtype=np.uint16))
        nan = np.random.default_rng(0).poisson(50, (100, 40, 60)).astype(np.float32)
        nan[5, 3, 3] = np.nan
        tifffile.imwrite(r / "nan.tif", nan)
        # a Zarr recording whose writer died halfway, as dle-stream's writer leaves it (its progress
        # marker says 100 of 200 frames written, not complete)
        shutil.copytree(r / "rec.zarr", r / "cut.zarr")
        group = zarr.open_group(str(r / "cut.zarr"), mode="r+")
        group.attrs["dle_stream"] = {**dict(group.attrs["dle_stream"]), "frames_written": FRAMES // 2,
                                     "complete": False}
        # another program's Zarr acquisition that stopped early: 120 of 200 frames, later chunks unwritten
        h, wd = (int(v) for v in SIZE.split("x"))
        acq = zarr.create_array(str(r / "acq.zarr"), shape=(FRAMES, h, wd), chunks=(10, h, wd), dtype="uint16",
                                fill_value=0, dimension_names=("t", "y", "x"))
        acq[:120] = np.random.default_rng(2).poisson(50, (120, h, wd)).astype(np.uint16)
        # a Zarr store with its array metadata gone
        shutil.copytree(r / "rec.zarr", r / "nometa.zarr")
        for p in (r / "nometa.zarr").rglob("zarr.json"):
            if p.parent != r / "nometa.zarr":
                p.unlink()
        # a run log whose root document is gone
        shutil.copytree(r / "log.zarr", r / "broken-log.zarr")
        (r / "broken-log.zarr" / "zarr.json").unlink()
        zarr.open_group(str(r / "plain.zarr"), mode="w").create_array("x", shape=(3,), dtype="int8")
        # a read-only folder: chmod 555, and the immutable attribute when root (root ignores modes)
        ro = r / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        if os.geteuid() == 0:
            made = subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
            self.readonly_note = ("chmod 555 + chattr +i (run as root)" if made
                                  else "chmod 555 only: run as root without chattr, so writable")
        else:
            self.readonly_note = "chmod 555"

    def cleanup(self) -> None:
        ro = self.root / "readonly"
        if os.geteuid() == 0 and ro.exists():
            subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        if ro.exists():
            ro.chmod(0o755)


@dataclass
class Case:
    command: str                 # the arguments after "dle-stream", as a user types them
    what: str                    # the mistake, in words
    expect: str = "error"        # "error", or "warn": analyse what is valid, exit 0, say INCOMPLETE
    guard: str | None = None     # a file or folder that must be left as it was
    extra_env: dict = field(default_factory=dict)


def cases(w: Workspace) -> list[Case]:
    sim = "--frames 20 --size 20x20"
    rp = f"--window {WINDOW} --hop {HOP} --no-dashboard"
    tr = "--steps 2 --cache-movies 64 --val-movies 64"
    return [
        # simulate
        Case(f"simulate rec.tif {sim}", "existing recording, no --overwrite", guard="rec.tif"),
        Case(f"simulate folder {sim}", "existing folder of a user's files", guard="folder"),
        Case(f"simulate log.zarr {sim} --overwrite", "a run log as output, even with --overwrite", guard="log.zarr"),
        Case(f"simulate out.avi {sim}", "unknown suffix"),
        Case(f"simulate out.tif {sim} --format bogus", "unknown --format"),
        Case("simulate out.tif --frames 0 --size 20x20", "--frames 0"),
        Case("simulate out.tif --frames 20 --size 0x0", "--size 0x0"),
        Case("simulate out.tif --frames 20 --size abc", "--size abc"),
        Case(f"simulate out.tif {sim} --tile 0", "--tile 0"),
        Case(f"simulate out.tif {sim} --d -1", "negative D"),
        Case(f"simulate out.tif {sim} --d missing.npy", "D map file missing"),
        Case(f"simulate out.tif {sim} --preset mid", "unknown --preset"),
        Case(f"simulate out.tif {sim} --density fog", "unknown --density"),
        Case(f"simulate readonly/out.tif {sim}", "read-only folder"),
        Case(f"simulate notes.txt/out.tif {sim}", "output under a file", guard="notes.txt"),
        Case(f"simulate x.ome.tif {sim}", "a folder named like a TIFF", guard="x.ome.tif"),
        Case(f"simulate out.tif {sim} --frame-period-us 0", "zero frame period"),
        Case(f"simulate out.tif {sim} --timing missing.json", "timing file missing"),
        Case(f"simulate out.tif {sim} --timing junk.json", "timing file not JSON"),
        # replay: the recording
        Case(f"replay missing.tif {rp}", "recording missing"),
        Case(f"replay junk.tif {rp}", "text named .tif"),
        Case(f"replay empty.tif {rp}", "empty file"),
        Case(f"replay head.tif {rp}", "TIFF cut after its header"),
        Case(f"replay half.tif {rp}", "TIFF cut in half (whole windows left)", expect="warn"),
        Case(f"replay cut.zarr {rp}", "Zarr recording whose writer died halfway", expect="warn"),
        Case(f"replay acq.zarr {rp}", "another program's Zarr, stopped at 120 of 200 frames", expect="warn"),
        Case(f"replay nometa.zarr {rp}", "Zarr store without its array metadata"),
        Case(f"replay plain.zarr {rp}", "a Zarr store that is no recording"),
        Case(f"replay single.tif {rp}", "a single 2-D image"),
        Case(f"replay tiny.tif {rp}", "frames smaller than a tile"),
        Case(f"replay nan.tif {rp}", "NaN pixels"),
        Case(f"replay rec.avi {rp}", "unsupported suffix"),
        Case(f"replay notes.txt {rp}", "a text file"),
        Case(f"replay folder {rp}", "a folder of other files"),
        Case(f"replay 'nope[/]x.tif' {rp}", "a path that looks like markup"),
        Case(f"replay rec.tif {rp} --channel 5", "channel out of range"),
        # replay: the flags
        Case("replay rec.tif --window 0 --no-dashboard", "--window 0"),
        Case("replay rec.tif --window 5000 --no-dashboard", "--window longer than the recording"),
        Case(f"replay rec.tif --window {WINDOW} --hop 0 --no-dashboard", "--hop 0"),
        Case(f"replay rec.tif {rp} --roi 0.5,0,20,20", "fractional ROI"),
        Case(f"replay rec.tif {rp} --roi 0,0,500,500", "ROI outside the frame"),
        Case(f"replay rec.tif {rp} --roi a=0,0,20,20 --roi a=20,0,20,20", "duplicate ROI names"),
        Case(f"replay rec.tif {rp} --roi garbage", "ROI not x,y,w,h"),
        Case(f"replay rec.tif {rp} --rois missing.json", "ROI file missing"),
        Case(f"replay rec.tif {rp} --rois junk.json", "ROI file not JSON"),
        Case(f"replay rec.tif {rp} --model nope", "unknown model"),
        Case(f"replay rec.tif {rp} --estimator nope", "unknown estimator"),
        Case(f"replay rec.tif {rp} --tiles nope", "unknown --tiles"),
        Case(f"replay rec.tif {rp} --dwell-us -3", "negative dwell time"),
        Case(f"replay rec.tif {rp} --frame-period-us 1e12", "absurd frame period"),
        Case(f"replay rec.tif {rp} --pixel-size-um 0", "zero pixel size"),
        # replay: the log
        Case(f"replay rec.tif {rp} --log log.zarr", "existing log, no --overwrite", guard="log.zarr"),
        Case(f"replay rec.tif {rp} --log notes.txt", "a file as --log", guard="notes.txt"),
        Case(f"replay rec.tif {rp} --log folder --overwrite", "a user's folder as --log", guard="folder"),
        Case(f"replay rec.tif {rp} --append", "--append without --log"),
        Case(f"replay rec.tif {rp} --log new.zarr --overwrite --append", "--overwrite with --append"),
        Case(f"replay rec.tif --window 80 --hop {HOP} --no-dashboard --log log.zarr --append",
             "--append with another --window", guard="log.zarr"),
        Case(f"replay rec.zarr {rp} --log log.zarr --append", "--append of another recording", guard="log.zarr"),
        Case(f"replay rec.tif {rp} --log notes.txt/run.zarr", "--log under a file"),
        Case(f"replay rec.tif {rp} --log readonly/run.zarr", "--log in a read-only folder"),
        # run
        Case("run --no-dashboard", "no source"),
        Case("run --mm-config missing.cfg --no-dashboard", "Micro-Manager configuration missing"),
        Case("run --mm-config empty.cfg --no-dashboard --frames 10", "empty Micro-Manager configuration"),
        Case("run --mm-config junk.cfg --no-dashboard --frames 10", "junk Micro-Manager configuration"),
        Case("run --demo --fast --frames 0 --no-dashboard", "--frames 0"),
        Case("run --demo --fast --frames 50 --size 5x5 --no-dashboard", "frames smaller than a tile"),
        Case("run --demo --fast --frames 50 --d abc --no-dashboard", "--d not a number"),
        Case("run --demo --fast --frames 50 --scan-properties missing.json --no-dashboard",
             "scan-properties file missing"),
        # train
        Case("train --out m1", "no budget"),
        Case("train --out m2 --steps 0", "--steps 0"),
        Case("train --out m3 --minutes -1", "--minutes -1"),
        Case(f"train --out notes.txt {tr}", "--out an existing file", guard="notes.txt"),
        Case(f"train --out notes.txt/m {tr}", "--out under a file"),
        Case(f"train --out readonly/m {tr}", "--out in a read-only folder"),
        Case(f"train --out m4 {tr} --like missing.tif", "--like missing"),
        Case(f"train --out m5 {tr} --like junk.tif", "--like not a TIFF"),
        Case(f"train --out m6 {tr} --frame-period-us 1e12", "absurd frame period"),
        Case(f"train --out empty-dir {tr} --resume", "--resume without a checkpoint"),
        Case(f"train --out m7 {tr} --device tpu", "unknown device"),
        Case(f"train --out m9 {tr} --d-max -1", "negative --d-max"),
        Case(f"train --out m10 {tr} --steady-share 2", "--steady-share above 1"),
        Case(f"train --out m11 {tr} --output nope", "unknown --output"),
        Case(f"train --out m12 {tr} --warm-from nope", "unknown --warm-from model"),
        Case(f"train --out m13 {tr} --encoder-from missing", "--encoder-from missing"),
        Case(f"train --out m14 {tr} --refresh-every 0", "--refresh-every 0"),
        # bench, demo, calibrate
        Case("bench --suite mid --n 2 --out b1", "unknown --suite"),
        Case("bench --n 1 --out b2", "--n 1"),
        Case("bench --n 2 --estimators nope --out b3", "unknown estimator"),
        Case("bench --n 2 --out notes.txt", "--out an existing file", guard="notes.txt"),
        Case("bench --n 2 --out readonly/b", "--out in a read-only folder"),
        Case("demo --out notes.txt --no-dashboard", "--out an existing file", guard="notes.txt"),
        Case("demo --out d1 --frames 0 --no-dashboard", "--frames 0"),
        Case("demo --out d2 --frames 10 --no-dashboard", "too few frames for a window"),
        Case("demo --out d3 --model nope --no-dashboard", "unknown model"),
        Case("calibrate missing", "model folder missing"),
        Case("calibrate notes.txt", "a file as the model"),
        # log
        Case("log show missing.zarr", "log missing"),
        Case("log show notes.txt", "a text file as the log"),
        Case("log show rec.zarr", "a recording, not a log"),
        Case("log show broken-log.zarr", "a log without its root document"),
        Case("log export log.zarr --csv existing.csv", "existing CSV, no --overwrite", guard="existing.csv"),
        Case("log export log.zarr --csv folder", "--csv a folder", guard="folder"),
        Case("log export log.zarr --csv nowhere/out.csv", "--csv in a missing folder"),
        Case("log export log.zarr --csv readonly/out.csv", "--csv in a read-only folder"),
        Case("log export missing.zarr --csv out.csv", "log missing"),
        # the command line itself
        Case("nope", "unknown command"),
        Case("replay", "missing argument"),
        Case("replay rec.tif --window abc", "--window not a number"),
    ]


@dataclass
class Verdict:
    case: Case
    outcome: Outcome
    clean: bool
    one_line: bool
    usage: bool
    safe: bool | None
    note: str


def judge(case: Case, out: Outcome, before: str | None, w: Workspace) -> Verdict:
    text = out.stdout + out.stderr
    traceback = "Traceback" in text
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    error_lines = [ln for ln in lines if ln.startswith("error:")]
    usage = not error_lines and any("Usage:" in ln for ln in lines)
    safe = None if case.guard is None else digest(w.root / case.guard) == before
    if case.expect == "warn":
        warned = [ln.strip() for ln in text.splitlines() if "INCOMPLETE" in ln.upper()]
        clean = out.rc == 0 and not traceback and bool(warned)
        one_line = clean
        if clean:
            where = "stderr" if "INCOMPLETE" in out.stderr.upper() else "stdout only"
            note = f"exit 0, warned on {where}: {warned[0][:200]}"
        else:
            note = f"exit {out.rc}" + (", no INCOMPLETE warning" if out.rc == 0 else "")
    else:
        clean = out.rc != 0 and not traceback and not out.timed_out
        one_line = clean and len(error_lines) == 1 and len(lines) == 1
        if out.timed_out:
            note = f"still running after {CASE_TIMEOUT_S} s (accepted)"
        elif traceback:
            note = "traceback"
        elif out.rc == 0:
            note = "exit 0 (accepted)"
        elif one_line:
            note = ""
        elif usage:
            note = "usage box"
        else:
            note = f"{len(lines)} lines on stderr"
    boxed = " ".join(ln.strip("│ ").strip() for ln in lines if ln.startswith("│"))
    last = boxed if usage and boxed else (error_lines or lines or [""])[-1]
    if not note:
        note = last[:220]
    elif case.expect == "error" and last and not out.timed_out:
        note += ": " + last[:200]
    return Verdict(case, out, clean, one_line, usage, safe, note)


def try_case(case: Case, w: Workspace) -> Verdict:
    before = digest(w.root / case.guard) if case.guard else None
    out = run(shlex.split(case.command), w.root, extra_env=case.extra_env)
    return judge(case, out, before, w)


# --------------------------------------------------------------- kill trials
@dataclass
class KillTrial:
    moment: str              # when it was killed, in words
    printed: int             # window lines the killed run printed
    committed: int           # windows in the log after the kill
    final: int               # windows in the log after --append
    lost: int                # reference windows missing from the final log
    duplicated: int          # window positions logged more than once
    differ: int              # windows whose D differs from the reference by > 1e-4 µm²/s
    printed_lost: int        # windows printed by the killed run but missing from its log
    append_rc: int


def log_windows(path: Path) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(frame_start, frame_stop) of every committed window, and D [window, tile]."""
    sys.path.insert(0, str(REPO))
    from dle_stream.errors import DleStreamError
    from dle_stream.zarr_log import open_log

    try:
        view = open_log(path)
    except DleStreamError:
        return [], np.zeros((0, 0))
    return list(zip(view.frame_start.tolist(), view.frame_stop.tolist())), view.d


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command(*args), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1)


def timeline(args: list[str], cwd: Path) -> tuple[float, float, float, int]:
    """Run to the end: (s to the first window line, s to the last, s to the exit, windows printed)."""
    t0 = time.monotonic()
    proc = start(args, cwd)
    assert proc.stdout is not None
    stamps = [time.monotonic() - t0 for line in proc.stdout if WINDOW_LINE.match(line)]
    rc = proc.wait()
    assert rc == 0 and stamps, f"reference replay failed (exit {rc})"
    return stamps[0], stamps[-1], time.monotonic() - t0, len(stamps)


def kill_trials(root: Path, n: int, rng: random.Random) -> tuple[str, int, list[KillTrial]]:
    """A fifth of the kills fall at random in the start-up (before the first window), the rest
    just after a random window line, plus a random part of the time between two windows.
    Returns (the reference run's timeline in words, its windows, trials)."""
    rec = root / "rec.tif"
    args = ["replay", str(rec), "--window", str(WINDOW), "--hop", str(HOP), "--no-dashboard"]
    first, last, end, n_lines = timeline([*args, "--log", str(root / "ref.zarr")], root)
    gap = (last - first) / max(1, n_lines - 1)
    ref_windows, ref_d = log_windows(root / "ref.zarr")
    ref_index = {win: i for i, win in enumerate(ref_windows)}
    trials = []
    for k in range(n):
        log = root / f"kill{k}.zarr"
        proc = start([*args, "--log", str(log)], root)
        assert proc.stdout is not None
        printed: list[tuple[int, int]] = []
        if k < max(1, n // 5):
            after = rng.uniform(0.05, 1.0) * first
            moment = f"start-up, {after:.1f} s"
            time.sleep(after)
        else:
            target, extra = rng.randrange(n_lines), rng.uniform(0.0, gap)
            moment = f"{extra * 1000:.0f} ms after window line {target + 1}"
            for line in proc.stdout:
                m = WINDOW_LINE.match(line)
                if m:
                    printed.append((int(m.group(2)), int(m.group(3))))
                    if len(printed) > target:
                        break
            time.sleep(extra)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        printed += [(int(m.group(2)), int(m.group(3))) for m in map(WINDOW_LINE.match, rest.splitlines()) if m]
        committed, _ = log_windows(log)
        resumed = run([*args, "--log", str(log), "--append"], root, 300)
        final, final_d = log_windows(log)
        counts: dict[tuple[int, int], int] = {}
        for win in final:
            counts[win] = counts.get(win, 0) + 1
        differ = 0
        for row, win in enumerate(final):
            if win in ref_index and not np.allclose(final_d[row], ref_d[ref_index[win]], atol=1e-4, equal_nan=True):
                differ += 1
        trials.append(KillTrial(
            moment=moment, printed=len(printed), committed=len(committed), final=len(final),
            lost=sum(1 for win in ref_windows if win not in counts),
            duplicated=sum(c - 1 for c in counts.values() if c > 1), differ=differ,
            printed_lost=sum(1 for win in printed if win not in set(committed)), append_rc=resumed.rc))
        print(f"kill {k + 1}/{n} ({moment}): {len(printed)} printed, {len(committed)} committed, "
              f"{len(final)} after --append (rc {resumed.rc})", file=sys.stderr, flush=True)
    words = (f"first window line after {first:.1f} s, last after {last:.1f} s, exit after {end:.1f} s, "
             f"{n_lines} windows")
    return words, len(ref_windows), trials


# ------------------------------------------------------------------ report
def machine() -> str:
    cores = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{platform.system()} {platform.machine()}, {cores} cores, Python {platform.python_version()}, "
            f"load average {load[0]:.1f} at the end")


def report(cmdline: str, note: str, verdicts: list[Verdict], ref_timeline: str, n_ref: int,
           trials: list[KillTrial], seconds: float, readonly: str) -> str:
    errors = [v for v in verdicts if v.case.expect == "error"]
    warns = [v for v in verdicts if v.case.expect == "warn"]
    guarded = [v for v in verdicts if v.safe is not None]
    lines = [
        "# Reliability: bad inputs and killed replays",
        "",
        f"Command: `{cmdline}`  ",
        f"Machine: {machine()}{'; ' + note if note else ''}.  ",
        f"Took {seconds / 60:.1f} min. Read-only folder: {readonly}.",
        "",
        "## Summary",
        "",
        "| measurement | result |",
        "| --- | --- |",
        f"| bad inputs that must be refused | {len(errors)} tried, **{sum(v.clean for v in errors)} clean errors** "
        f"(exit ≠ 0, no traceback), {sum(v.one_line for v in errors)} of them one `error:` line, "
        f"{sum(v.usage for v in errors)} the argument parser's usage box |",
        f"| incomplete recordings with whole windows left | {len(warns)} tried, {sum(v.clean for v in warns)} analysed "
        f"as far as valid with an INCOMPLETE warning |",
        f"| existing files at stake | {len(guarded)} cases, {sum(bool(v.safe) for v in guarded)} left unchanged |",
        f"| kill trials (`replay` SIGKILLed at random, then `--append`) | {len(trials)} trials: "
        f"**{sum(t.lost for t in trials)} windows lost, {sum(t.duplicated for t in trials)} duplicated**, "
        f"{sum(t.differ for t in trials)} with another D, {sum(t.printed_lost for t in trials)} printed but not "
        f"logged; {sum(t.append_rc != 0 for t in trials)} `--append` runs failed |",
        "",
        "## Bad inputs",
        "",
        "Each row: `dle-stream` + the arguments, run in a folder with a valid recording (`rec.tif`, `rec.zarr`,",
        f"{FRAMES} frames of {SIZE} px), a run log of it (`log.zarr`) and the broken files named.",
        "",
        "| command | mistake | exit | s | clean | one line | file kept | message |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in verdicts:
        rc = "timeout" if v.outcome.timed_out else str(v.outcome.rc)
        kept = "" if v.safe is None else ("yes" if v.safe else "**NO**")
        msg = v.note.replace("|", "\\|").replace("`", "'")
        lines.append(f"| `{v.case.command}` | {v.case.what} | {rc} | {v.outcome.seconds:.1f} | "
                     f"{'yes' if v.clean else '**no**'} | "
                     f"{'yes' if v.one_line else 'no'} | {kept} | {msg} |")
    lines += [
        "",
        "## Kill trials",
        "",
        f"`dle-stream replay rec.tif --window {WINDOW} --hop {HOP} --no-dashboard --log kill.zarr` is SIGKILLed "
        "(a fifth of the trials at a random moment of the start-up, the others just after a random window line "
        "plus a random part of the time between two windows), then the same command with `--append` finishes "
        f"it; the final log is compared with an uninterrupted run's ({ref_timeline}; {n_ref} windows logged).",
        "",
        "| killed | printed | committed | after --append | lost | duplicated | other D | printed, not logged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in trials:
        lines.append(f"| {t.moment} | {t.printed} | {t.committed} | {t.final} | {t.lost} | {t.duplicated} "
                     f"| {t.differ} | {t.printed_lost} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="Markdown report to write (default: print only).")
    ap.add_argument("--kills", type=int, default=10, help="Kill trials (default 10).")
    ap.add_argument("--jobs", type=int, default=2, help="Bad-input cases run at once (default 2).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    ap.add_argument("--note", default="", help="Words about the machine's load, for the report.")
    ap.add_argument("--only", default=None, help="Run only the cases whose command contains this text.")
    args = ap.parse_args(argv)
    cmdline = "python benchmarks/reliability.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="dle-reliability-"))
    w = Workspace(root)
    try:
        w.prepare()
        todo = [c for c in cases(w) if args.only is None or args.only in c.command]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            verdicts = list(pool.map(lambda c: try_case(c, w), todo))
        for v in verdicts:
            mark = "ok " if v.clean else "BAD"
            print(f"{mark} {v.case.command}: {v.note}", file=sys.stderr, flush=True)
        ref_timeline, n_ref, trials = (kill_trials(root, args.kills, random.Random(args.seed)) if args.kills
                                       else ("", 0, []))
        text = report(cmdline, args.note, verdicts, ref_timeline, n_ref, trials, time.monotonic() - t0,
                      w.readonly_note)
    finally:
        w.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
