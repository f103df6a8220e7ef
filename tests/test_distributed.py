"""Training on two processes with torch.distributed (gloo, CPU), as torchrun runs it.

A tiny run of the real trainer on 2 processes (tests/ddp_worker.py under torchrun) takes
every stage (autoencoder, end-to-end, predictor with the combination loss): both ranks
must hold identical weights after every step, their movies must differ, and rank 0 alone
must write one package. That package is then resumed by a 1-process ``dle-stream train
--resume``, and that one again by ``torchrun ... -m dle_stream train --resume`` on 2.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dle_stream.estimator import DiffusionEstimator
from dle_stream.training.distributed import SINGLE, Ranks

HERE = Path(__file__).parent


def torchrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def card(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text())


def state(folder: Path) -> dict:
    return json.loads((folder / "checkpoint" / "state.json").read_text())


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "model"
    out.mkdir()
    torchrun(str(HERE / "ddp_worker.py"), str(out), cwd=out)
    return out


def test_both_ranks_hold_identical_weights_after_every_step(two_process_run):
    ranks = [json.loads((two_process_run / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    # every stage ran, with the same steps on both ranks: 4 autoencoder, 3 end-to-end, 6 predictor
    assert [s[:2] for s in steps0] == [s[:2] for s in steps1]
    assert [s[0] for s in steps0] == ["autoencoder"] * 4 + ["end-to-end"] * 3 + ["predictor"] * 6
    for (stage, step, w0), (_, _, w1) in zip(steps0, steps1):
        assert w0 == w1, f"the ranks' weights differ after {stage} step {step}"
    assert len({s[2] for s in steps0}) == len(steps0)  # and every step changed them


def test_the_ranks_simulated_different_movies_and_split_the_cache(two_process_run):
    ranks = [json.loads((two_process_run / f"rank-{r}.json").read_text()) for r in (0, 1)]
    # the global cache of 48 movies is split over the ranks, and no movie is in both
    assert [r["cache_size"] for r in ranks] == [24, 24]
    d0, d1 = set(ranks[0]["cache_d"]), set(ranks[1]["cache_d"])
    assert len(d0) > 5 and len(d1) > 5 and not d0 & d1
    # the movie count in the card is that of both ranks
    assert ranks[0]["movies_simulated"] == ranks[1]["movies_simulated"] == card(two_process_run)["training"]["movies_simulated"]


def test_rank_0_alone_writes_one_package_that_loads(two_process_run):
    c = card(two_process_run)
    assert c["training"]["processes"] == 2 and c["training"]["predictor_steps"] == 6
    assert c["validation"]["n_movies"] == 16
    est = DiffusionEstimator.load(two_process_run)  # card and weights consistent (sha256)
    assert est.card.name == "ddp"
    rows = list(csv.DictReader((two_process_run / "training_curve.csv").open()))
    keys = [(r["stage"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)) and ("validation", "6") in keys  # written once, not per rank
    assert sorted(p.name for p in two_process_run.glob("*.safetensors")) == ["weights.safetensors"]


def test_a_two_process_checkpoint_resumes_on_one_process_and_back_on_two(two_process_run, tmp_path, cli):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(two_process_run, out)
    import torch

    threads = torch.get_num_threads()
    try:  # one thread, as each torchrun process has (two contend badly on a loaded machine)
        result = cli("train", "--resume", "--out", out, "--steps", "3", "--cache-movies", "32", "--val-movies", "16",
                     "--device", "cpu", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert state(out)["head_step"] == 9 and card(out)["training"]["runs"] == 2
    assert card(out)["training"]["processes"] == 1
    # and the real command line under torchrun continues that one on 2 processes
    torchrun("-m", "dle_stream", "train", "--resume", "--out", str(out), "--steps", "2", "--cache-movies", "32",
             "--val-movies", "16", "--device", "cpu", cwd=tmp_path)
    c = card(out)
    assert state(out)["head_step"] == 11 and c["training"]["runs"] == 3 and c["training"]["processes"] == 2
    DiffusionEstimator.load(out)


def test_global_batches_are_split_so_that_the_mean_loss_is_that_of_the_whole_batch():
    import numpy as np

    losses = np.random.default_rng(0).random(64)  # per-item losses of one global batch
    for world, total in ((2, 64), (3, 64), (4, 2), (5, 16)):
        ranks = [Ranks(rank=r, world=world) for r in range(world)]
        parts = [r.share(total) for r in ranks]
        assert sum(parts) == total and max(parts) - min(parts) <= 1
        # each rank's weighted mean loss, averaged over the ranks as DDP averages gradients,
        # is the mean over the whole global batch
        edges = np.cumsum([0, *parts])
        averaged = np.mean([r.weight(p, total) * (losses[a:b].mean() if p else 0.0)
                            for r, p, a, b in zip(ranks, parts, edges[:-1], edges[1:])])
        assert averaged == pytest.approx(losses[:total].mean())
    assert SINGLE.share(64) == 64 and SINGLE.weight(64, 64) == 1.0
    # rank 0 keeps a single process's seed; the others get streams of their own
    seeds = [Ranks(rank=r, world=4).seed(7) for r in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
