"""`dle-stream batch` on 1 and 2 local Dask workers, and a worker killed mid-batch (issue 13).

    python benchmarks/batch_speed.py --recordings 8 --size 40x60 --frames 800 --out /tmp/batch-bench

1. simulates ``--recordings`` recordings (D 0.3 | 1.2 µm²/s, seeds 0, 1, ...), unless there;
2. replays them with :func:`dle_stream.batch.replay_batch` on a local cluster of 1 worker,
   then of 2 (fresh output folders; wall time including the cluster's start);
3. ``--kill-after S``: again on 2 workers of a cluster started here, SIGKILLs one worker
   process S seconds in, then checks that every recording finished and that the table
   equals the undisturbed one value for value; then reruns, which must skip them all.

Prints one JSON line. The model is the shipped ``brain-qd-low`` (400-frame windows, hop 50).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd

from dle_stream.batch import TABLE_NAME, replay_batch
from dle_stream.session import StreamOptions
from dle_stream.training.priors import get_preset
from dle_stream.training.recording_sim import parse_size, simulate_recording


def recordings(folder: Path, n: int, height: int, width: int, frames: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    preset = get_preset("low")
    timing = preset.timing.for_frame(height, width)
    paths = []
    for i in range(n):
        path = folder / f"rec{i:02d}.tif"
        if not path.exists():
            simulate_recording(path, preset, frames=frames, height=height, width=width, timing=timing,
                               d_spec="0.3,1.2", seed=i)
        paths.append(path)
    return paths


def table(out: Path) -> pd.DataFrame:
    t = pd.read_csv(out / TABLE_NAME, keep_default_na=False, na_values=[""])
    return t.sort_values(["recording", "window", "tile"]).reset_index(drop=True)


def timed(recs: list[Path], out: Path, **kw) -> tuple[float, list]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    outcomes = replay_batch(recs, out, StreamOptions(), **kw)
    return time.perf_counter() - t0, outcomes


def killed_run(recs: list[Path], out: Path, kill_after: float) -> dict:
    """2 workers of a cluster started here; one is SIGKILLed ``kill_after`` s into the batch."""
    import logging

    from dask.distributed import Client, LocalCluster

    shutil.rmtree(out, ignore_errors=True)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    killed: list[float] = []

    def kill() -> None:
        time.sleep(kill_after)
        os.kill(victim, signal.SIGKILL)
        killed.append(kill_after)

    threading.Thread(target=kill, daemon=True).start()
    t0 = time.perf_counter()
    try:
        outcomes = replay_batch(recs, out, StreamOptions(), scheduler=cluster.scheduler_address)
        wall = time.perf_counter() - t0
        rerun = replay_batch(recs, out, StreamOptions(), scheduler=cluster.scheduler_address)
    finally:
        client.close()
        cluster.close()
    return {"killed_worker_pid": victim, "killed_at_s": killed[0] if killed else None, "wall_s": round(wall, 1),
            "statuses": sorted(o.status for o in outcomes), "rerun_statuses": sorted(o.status for o in rerun)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recordings", type=int, default=8)
    ap.add_argument("--size", default="40x60")
    ap.add_argument("--frames", type=int, default=800)
    ap.add_argument("--out", type=Path, default=Path("/tmp/batch-bench"))
    ap.add_argument("--kill-after", type=float, default=None, help="seconds into a 2-worker batch to kill a worker")
    args = ap.parse_args()
    height, width = parse_size(args.size)
    recs = recordings(args.out / "recordings", args.recordings, height, width, args.frames)
    t1, o1 = timed(recs, args.out / "w1", workers=1)
    t2, o2 = timed(recs, args.out / "w2", workers=2)
    a, b = table(args.out / "w1"), table(args.out / "w2")
    result = {"recordings": len(recs), "size": args.size, "frames": args.frames, "windows": int(sum(o.windows for o in o1)),
              "wall_s_1_worker": round(t1, 1), "wall_s_2_workers": round(t2, 1), "speed_ratio": round(t1 / t2, 2),
              "failed": sum(not o.ok for o in o1 + o2),
              "tables_equal": bool(a.drop(columns="recording").equals(b.drop(columns="recording")))}
    if args.kill_after is not None:
        result["kill"] = killed_run(recs, args.out / "killed", args.kill_after)
        k = table(args.out / "killed")
        result["kill"]["table_equals_undisturbed"] = bool(k.drop(columns="recording").equals(b.drop(columns="recording")))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
