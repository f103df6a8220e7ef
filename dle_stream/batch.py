"""Many recordings at once on a Dask cluster: ``dle-stream batch REC... --out DIR``.

Each recording is one task on a :mod:`dask.distributed` cluster (a local cluster sized to
the machine by default, or an existing one by its scheduler's address). A task replays its
recording exactly as ``dle-stream replay`` does (:func:`dle_stream.session.replay`) into a
Zarr log of its own, ``DIR/<name>.zarr`` (the crash-safe run log, docs/design.md §6), and
returns that log's estimates as rows of one table. As the tasks finish, the driver appends
their rows to ``DIR/results.csv.partial`` (recording, ROI, tile, window, time, D, intervals,
flags), which replaces ``DIR/results.csv`` when every task has finished: an earlier table stays
whole until then, and an interrupted batch leaves it and the partial table of the
recordings it finished. A recording that fails in a rerun keeps the rows the earlier table
held for it (its last finished estimates).

- A recording that fails (unreadable, a scan no model serves, ...) is reported with its
  error; the others go on.
- A worker killed mid-recording: the cluster runs the task again elsewhere, and it
  continues the recording's log after its last committed window (``--append``).
- Rerunning the same command skips every recording whose log is complete (all its frames
  logged, with the same model, estimator, window and hop); the others are continued or
  replayed. The table is rewritten from the logs, so it always holds every finished
  recording.

Needs the optional ``cluster`` extra (``pip install "dle-stream[cluster]"``). With
``scheduler``, every worker needs dle-stream installed and must see the recordings and
``DIR`` at the same paths (a shared filesystem).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dle_stream.errors import DleStreamError, ParameterError, arg
from dle_stream.session import StreamOptions

__all__ = ["TABLE_COLUMNS", "TABLE_NAME", "RecordingOutcome", "log_table", "replay_batch", "replay_one"]

#: Suffix of the table while a batch writes it (renamed to :data:`TABLE_NAME` at the end).
PARTIAL_SUFFIX = ".partial"
#: The combined table's file in the output folder.
TABLE_NAME = "results.csv"
#: Its columns: one row per recording, window and tile (D, σ and intervals in µm²/s, on the
#: model's range; ``lower95_um2_s`` the "D > x" bound of a window above the range, empty
#: elsewhere; ``time_s`` the window's middle in acquisition time; ``roi`` the ROI(s) the tile covers).
TABLE_COLUMNS = ("recording", "roi", "tile", "row", "col", "height", "width", "window", "frame_start", "frame_stop",
                 "t_start_s", "t_stop_s", "time_s", "d_um2_s", "sigma_um2_s", "lo68_um2_s", "hi68_um2_s",
                 "lo95_um2_s", "hi95_um2_s", "p_above", "lower95_um2_s", "flags", "flag_bits")
#: The columns of a table written before ``lower95_um2_s`` (2026-12-01): still taken, its
#: rows carried under the columns of the same names.
EARLIER_TABLE_COLUMNS = tuple(c for c in TABLE_COLUMNS if c != "lower95_um2_s")
_LOG_ARRAYS = {"d_um2_s": "d", "sigma_um2_s": "sigma", "lo68_um2_s": "lo68", "hi68_um2_s": "hi68",
               "lo95_um2_s": "lo95", "hi95_um2_s": "hi95", "p_above": "p_above"}


@dataclass
class RecordingOutcome:
    """What became of one recording of a batch.

    ``status``: "replayed" (from its first frame), "continued" (a partial log was
    continued), "complete" (its log was complete already: skipped) or "failed" (``error``
    says why). ``rows``: its table rows (None when failed). ``earlier_rows``: for a failed
    recording, how many of its rows the new table took over from the earlier one.
    """

    recording: str
    log: str
    status: str
    windows: int = 0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    rows: Any = None  # pandas.DataFrame
    earlier_rows: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def log_name(recording: Path) -> str:
    """The log of ``recording`` in the output folder: its name without the image suffixes, + ``.zarr``."""
    name = recording.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + ".zarr"
    return name + ".zarr"


def log_table(log: str | os.PathLike, recording: str) -> Any:
    """The committed estimates of a run log as a :data:`TABLE_COLUMNS` table (pandas), one
    row per window and tile, labelled with ``recording``."""
    import pandas as pd

    from dle_stream.log_summary import window_lower95
    from dle_stream.results import flag_text
    from dle_stream.zarr_log import open_log

    view = open_log(log)
    n_w, n_t = view.n_windows, view.n_tiles
    roi_of: list[list[str]] = [[] for _ in range(n_t)]
    for roi in view.rois:
        for t in roi.get("tiles", []):
            roi_of[int(t)].append(str(roi["name"]))
    bbox = view.tile_bbox.astype(np.int64)
    t_start, t_stop = view.t_start_s, view.t_stop_s
    flags = view.flags.reshape(-1).astype(np.uint8)
    columns: dict[str, Any] = {
        "recording": np.full(n_w * n_t, recording, dtype=object),
        "roi": np.tile(np.array([";".join(r) for r in roi_of], dtype=object), n_w),
        "tile": np.tile(np.arange(n_t), n_w),
        **{name: np.tile(bbox[:, i], n_w) for i, name in enumerate(("row", "col", "height", "width"))},
        "window": np.repeat(view.window, n_t),
        "frame_start": np.repeat(view.frame_start, n_t), "frame_stop": np.repeat(view.frame_stop, n_t),
        "t_start_s": np.repeat(t_start, n_t), "t_stop_s": np.repeat(t_stop, n_t),
        "time_s": np.repeat((t_start + t_stop) / 2, n_t),
        **{name: view.array(array).reshape(-1) for name, array in _LOG_ARRAYS.items()},
        "lower95_um2_s": window_lower95(view).reshape(-1),
        "flags": np.array([flag_text(b) for b in flags], dtype=object), "flag_bits": flags,
    }
    return pd.DataFrame(columns, columns=list(TABLE_COLUMNS))


def _complete(recording: Path, log: Path, opts: StreamOptions, channel: int | None) -> bool:
    """Whether ``log`` already holds the whole replay of ``recording`` with these settings
    (every frame logged; same source, model, estimator, window and hop). Anything else is
    left to the replay, which continues the log or says why it cannot."""
    from dle_stream.model_package import load_card, resolve_model
    from dle_stream.recording import open_recording
    from dle_stream.zarr_log import open_log

    if not (log / "zarr.json").is_file():
        return False
    try:
        view = open_log(log)
    except DleStreamError:
        return False
    run = dict(view.header.run)
    logged_card = run.get("model_card") or {}
    card = load_card(resolve_model(opts.model))
    same = (run.get("source") == str(recording) and run.get("hop_frames") == opts.hop
            and run.get("window_frames") == (opts.window or card.window_frames)
            and logged_card.get("name") == card.name and logged_card.get("weights_sha256") == card.weights_sha256)
    if not same:
        return False
    with open_recording(recording, channel=channel) as rec:
        return view.n_frames >= rec.n_frames


def replay_one(recording: str, log: str, opts: StreamOptions, channel: int | None = None,
               threads: int | None = None) -> RecordingOutcome:
    """One task of a batch (run on a worker): make ``log`` the complete replay of
    ``recording`` (replay it, continue a partial log, or skip a complete one) and return
    its rows. Errors are returned as a failed outcome, not raised."""
    from rich.console import Console

    from dle_stream.session import replay

    if threads:
        import torch

        torch.set_num_threads(int(threads))
    rec_path, log_path = Path(recording), Path(log)
    try:
        if _complete(rec_path, log_path, opts, channel):
            status, warnings = "complete", []
        else:
            existing = log_path.exists()
            run_opts = replace(opts, log=log_path, append=existing, overwrite=False, dashboard="plain")
            result = replay(rec_path, run_opts, channel=channel, console=Console(file=io.StringIO()))
            status, warnings = ("continued" if existing else "replayed"), list(result.warnings)
        rows = log_table(log_path, recording)
    except ParameterError as exc:  # a setting (named as the caller gave it: flag or keyword)
        return RecordingOutcome(recording, log, "failed", error=exc.message_for(opts.parameter_names))
    except DleStreamError as exc:
        return RecordingOutcome(recording, log, "failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a batch reports every failure and goes on with the rest
        return RecordingOutcome(recording, log, "failed", error=f"{type(exc).__name__}: {exc}")
    windows = int(rows["window"].nunique()) if len(rows) else 0
    return RecordingOutcome(recording, log, status, windows=windows, warnings=warnings, rows=rows)


def _check_table(path: Path) -> None:
    """``path`` may be (re)written: absent, or a table an earlier batch wrote (its header is ours)."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ParameterError(f"{arg('out', path.parent)}: {path.name} there is not a batch table; choose another "
                             f"{arg('out')} folder")
    if path.exists():
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
        except (UnicodeDecodeError, csv.Error):
            header = []  # not text, or not a CSV table: not ours
        except OSError as exc:
            raise ParameterError(f"{arg('out', path.parent)}: cannot read its {path.name} ({exc.strerror or exc}); "
                                 f"choose another {arg('out')} folder") from None
        if tuple(header) not in (TABLE_COLUMNS, EARLIER_TABLE_COLUMNS):
            raise ParameterError(f"{arg('out', path.parent)}: it holds a {path.name} that dle-stream batch did not "
                                 f"write; choose another {arg('out')} folder (it is never overwritten)")


def _plan(recordings: Sequence[str | os.PathLike], out: Path) -> list[tuple[str, str]]:
    """(recording, its log) for each recording; two recordings may not share a log."""
    if not recordings:
        raise ParameterError(f"{arg('recordings')}: give at least one recording")
    plan: list[tuple[str, str]] = []
    seen: dict[Path, Path] = {}
    for r in recordings:
        path = Path(r).expanduser().absolute()
        log = out / log_name(path)
        if log in seen and seen[log] != path:
            raise ParameterError(f"{arg('recordings')}: {seen[log]} and {path} would share the log {log}; rename "
                                 f"one, or run them in batches with separate {arg('out')} folders")
        if log not in seen:
            seen[log] = path
            plan.append((str(path), str(log)))
    return plan


def _local_workers(workers: int | None) -> int:
    if workers is not None:
        if workers < 1:
            raise ParameterError(f"{arg('workers', workers)}: must be at least 1")
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _client(scheduler: str | None, workers: int | None):
    """A dask client: on the cluster at ``scheduler``, or on a new local cluster of ``workers``
    single-threaded worker processes (default: one per core). Returns (client, cluster or None)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise DleStreamError('batch needs dask.distributed: pip install "dle-stream[cluster]"') from None
    import logging

    if scheduler is not None:
        if workers is not None:
            raise ParameterError(f"{arg('workers', workers)} sizes a local cluster; with {arg('scheduler')} the "
                                 f"cluster's own workers run the recordings: give only one of them")
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError, ValueError) as exc:
            raise ParameterError(f"{arg('scheduler', scheduler)}: no dask scheduler answered ({exc}); check the "
                                 f"address (tcp://HOST:8786) and that the scheduler runs") from None
    cluster = LocalCluster(n_workers=_local_workers(workers), threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    return Client(cluster), cluster


def replay_batch(recordings: Sequence[str | os.PathLike], out: str | os.PathLike, opts: StreamOptions | None = None,
                 *, channel: int | None = None, scheduler: str | None = None, workers: int | None = None,
                 on_outcome: Callable[[RecordingOutcome], None] | None = None) -> list[RecordingOutcome]:
    """Replay ``recordings`` on a Dask cluster, each into its own log in ``out``, and write the
    combined table ``out/results.csv`` as they finish. Returns one outcome per recording (in
    the order they finished).

    ``opts``: the replay settings (model, estimator, ROIs, window, hop, timing; its ``log``,
    ``append`` and ``dashboard`` are set per recording). ``scheduler``: the address of an
    existing cluster's scheduler; else a local cluster of ``workers`` processes (default:
    one per core). ``on_outcome`` is called as each recording finishes.
    """
    opts = opts or StreamOptions()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ParameterError(f"{arg('out', out)}: is a file, not a folder; give a folder path")
    plan = _plan(recordings, out)
    table = out / TABLE_NAME
    growing = out / (TABLE_NAME + PARTIAL_SUFFIX)
    _check_table(table)
    _check_table(growing)
    out.mkdir(parents=True, exist_ok=True)
    client, cluster = _client(scheduler, workers)
    outcomes: list[RecordingOutcome] = []
    try:
        from dask.distributed import as_completed

        # one core per recording: a worker runs as many recordings at once as it has threads
        futures = [client.submit(replay_one, rec, log, opts, channel, 1, key=f"dle-stream-{i}-{Path(rec).name}",
                                 pure=False) for i, (rec, log) in enumerate(plan)]
        # the table grows under a partial name and replaces the earlier one only when complete
        with growing.open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(TABLE_COLUMNS)
            fh.flush()
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - e.g. the task's workers kept dying
                    rec, log = plan[futures.index(future)]
                    outcome = RecordingOutcome(rec, log, "failed", error=f"{type(exc).__name__}: {exc}")
                if outcome.rows is not None and len(outcome.rows):
                    # one write per recording; float32 values as their shortest text that reads back the same
                    outcome.rows.to_csv(fh, header=False, index=False, float_format=None)
                    fh.flush()
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
            # a recording that failed now keeps the rows the earlier table held for it
            _carry_rows(table, {o.recording: o for o in outcomes if not o.ok}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(growing, table)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return outcomes


def _carry_rows(table: Path, failed: dict[str, RecordingOutcome], fh) -> None:
    """Append to ``fh`` the rows the earlier ``table`` holds for the ``failed`` recordings
    (their ``earlier_rows`` counted), each value under its column (a table of an earlier
    version lacks columns added since: those cells are left empty)."""
    if not failed or not table.is_file():
        return
    writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS, restval="")
    with table.open(newline="", encoding="utf-8") as old:
        for row in csv.DictReader(old):  # its header was checked at the start: ours
            name = row.get("recording")
            if name in failed:
                writer.writerow({c: row.get(c, "") for c in TABLE_COLUMNS})
                failed[name].earlier_rows += 1


def summary(outcomes: Sequence[RecordingOutcome]) -> str:
    """One line: how many recordings were replayed, continued, skipped as complete, failed."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("replayed", "continued", "complete", "failed")}
    windows = sum(o.windows for o in outcomes)
    parts = [f"{n} {s}" if s != "complete" else f"{n} already complete (skipped)" for s, n in counts.items() if n]
    return f"{len(outcomes)} recordings: {', '.join(parts)}; {windows} windows"
