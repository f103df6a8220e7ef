"""Training checkpoints (issue 15, item 8): a run killed while its checkpoint state was being
written resumes from a whole checkpoint (weights, optimiser and step counters of one step),
so ``--resume`` does not train the step budget again; version-1 checkpoints still load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dle_stream.model import ModelConfig
from dle_stream.training.checkpoint import load_checkpoint, load_optimizer, optimizer_state, save_checkpoint
from dle_stream.training.priors import SimulatorPriors, get_preset
from dle_stream.training.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands for SIGKILL inside the test process: nothing after it runs, no handler catches it."""


def kill_at_state_write(monkeypatch, armed=lambda: True) -> None:
    """Make the next write of a checkpoint's state.json die (while ``armed()``)."""
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name == "state.json" and armed():
            raise Killed(f"killed while writing {dst}")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


def tiny(value: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def adam_steps(opt: torch.optim.Optimizer) -> int:
    """The step count Adam keeps for its parameters (they all step together)."""
    counts = {int(s["step"]) for s in opt.state.values()}
    assert len(counts) == 1, counts
    return counts.pop()


def train_steps(model, opt, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        opt.step()


# ------------------------------------------------------------ the checkpoint
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_checkpoint import tiny, train_steps
    from dle_stream.training.checkpoint import save_checkpoint
    folder = Path({folder!r})
    model, opt = tiny(1.0)
    train_steps(model, opt, 10)
    save_checkpoint(folder, model, {{"head": opt}}, {{"head_step": 10}})
    train_steps(model, opt, 10)
    real_replace = os.replace
    def replace(src, dst, *a, **kw):   # SIGKILL while state.json is being written
        if Path(dst).name == "state.json":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **kw)
    os.replace = replace
    save_checkpoint(folder, model, {{"head": opt}}, {{"head_step": 20}})
""")


def test_a_kill_while_the_state_is_written_leaves_the_previous_checkpoint_whole(tmp_path):
    folder = tmp_path / "checkpoint"
    code = CHILD.format(tests=str(Path(__file__).parent), folder=str(folder))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == -9, proc.stderr
    tensors, state = load_checkpoint(folder)
    assert state["head_step"] == 10
    # the weights and the optimiser are those of step 10 too, not of the save that was killed
    model, opt = tiny(1.0)
    train_steps(model, opt, 10)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(tensors[name], value)
    fresh_model, fresh_opt = tiny(0.0)
    load_optimizer(fresh_opt, optimizer_state(folder, "head"), state["optimizers"]["head"])
    assert adam_steps(fresh_opt) == 10


def test_a_committed_save_removes_only_the_older_generations(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    model, opt = tiny(1.0)
    train_steps(model, opt, 1)
    for step in (1, 2, 3):
        save_checkpoint(folder, model, {"head": opt}, {"head_step": step})
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model-3.safetensors", "notes.txt", "optimizer-head-3.safetensors", "state.json"]
    assert load_checkpoint(folder)[1]["head_step"] == 3


def test_a_version_1_checkpoint_still_loads_and_the_next_save_replaces_it(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    model, opt = tiny(0.5)
    train_steps(model, opt, 4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    from dle_stream.training.checkpoint import optimizer_tensors

    tensors, rest = optimizer_tensors(opt)
    save_file(tensors, str(folder / "optimizer-head.safetensors"))
    (folder / "state.json").write_text(json.dumps({"version": 1, "optimizers": {"head": rest}, "head_step": 4}))

    loaded, state = load_checkpoint(folder)
    assert state["head_step"] == 4
    torch.testing.assert_close(loaded["weight"], model.weight.detach())
    _, fresh = tiny(0.0)
    load_optimizer(fresh, optimizer_state(folder, "head"), state["optimizers"]["head"])
    assert adam_steps(fresh) == 4
    save_checkpoint(folder, model, {"head": opt}, {"head_step": 5})
    assert not (folder / "model.safetensors").exists() and not (folder / "optimizer-head.safetensors").exists()
    assert load_checkpoint(folder)[1]["head_step"] == 5


# --------------------------------------------------------------- the trainer
def easy_config(out: Path, **kw) -> TrainConfig:
    """A seconds-long training (as tests/test_trainer.py): bright particles, 100-frame windows."""
    priors = SimulatorPriors(
        d_min_um2_s=0.0, d_max_um2_s=1.5, particles="fixed", particles_max=40, density="box",
        brightness_photons=(1500.0, 0.0), background_photons=(20.0, 0.0), read_noise_photons=(0.5, 0.5),
        psf_sigma_xy_um=(0.21, 0.0), psf_sigma_z_um=(1.36, 0.0),
    )
    base = dict(name="easy", priors=priors, timing=get_preset("low").timing, out=out, frames=100,
                architecture=ModelConfig(temporal_channels=16, head_hidden=32), seed=0, steps=6, ae_steps=10,
                ae_batch=64, cache_movies=64, refresh_movies=0, batch=16, lr=3e-3, val_movies=32, sim_batch=32,
                checkpoint_minutes=60)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow  # two short trainings: 40-80 s on the loaded 2-core machine
def test_resume_after_a_kill_at_the_state_write_does_not_train_the_budget_again(tmp_path, monkeypatch):
    """The last checkpoint of a 6-step run is killed while its state is written; resuming with
    the same --steps 6 gives a head trained for exactly the steps its card counts."""
    torch.set_num_threads(1)
    first = Trainer(easy_config(tmp_path), log=lambda *a: None)
    kill_at_state_write(monkeypatch, armed=lambda: first.state["head_step"] > 0)
    with pytest.raises(Killed):
        first.run()
    assert first.state["head_step"] == 6
    monkeypatch.undo()

    resumed = Trainer(easy_config(tmp_path, resume=True), log=lambda *a: None)
    resumed.load()
    # what was loaded belongs together: the head optimiser's steps are the counted head steps
    loaded_steps = adam_steps(resumed.opt_head) if resumed.opt_head.state else 0
    assert loaded_steps == resumed.state["head_step"]
    resumed = Trainer(easy_config(tmp_path, resume=True), log=lambda *a: None)
    resumed.run()
    assert adam_steps(resumed.opt_head) == resumed.state["head_step"] == 6
    assert json.loads((tmp_path / "card.json").read_text())["training"]["predictor_steps"] == 6
