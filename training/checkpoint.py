"""Training checkpoints on disk: model and optimiser tensors in safetensors, the rest in JSON.

A checkpoint is a folder ``checkpoint/`` inside the model package being trained:
``model.safetensors`` (every parameter and buffer), ``optimizer.safetensors`` (Adam's
moments), and ``state.json`` (step counters, stage, learning-curve rows, optimiser
hyper-parameters). Nothing is pickled. Files are written to temporary names and renamed,
so a kill during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dle_stream.errors import DleStreamError

STATE_VERSION = 1


def _atomic_write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser's state dict into tensors (for safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_tensors(model.state_dict(), folder / "model.safetensors")
    opt_meta = {}
    for name, opt in optimizers.items():
        tensors, rest = optimizer_tensors(opt)
        if tensors:
            _atomic_write_tensors(tensors, folder / f"optimizer-{name}.safetensors")
        opt_meta[name] = rest
    _atomic_write_text(json.dumps({"version": STATE_VERSION, "optimizers": opt_meta, **state}, indent=1),
                       folder / "state.json")


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model tensors, state dict) of a checkpoint folder; a clear error when unusable."""
    state_path, model_path = folder / "state.json", folder / "model.safetensors"
    if not state_path.is_file() or not model_path.is_file():
        raise DleStreamError(
            f"{folder}: no training checkpoint here (need state.json and model.safetensors); "
            f"pass --resume a model folder written by `dle-stream train`"
        )
    try:
        state = json.loads(state_path.read_text())
        tensors = load_file(str(model_path))
    except Exception as exc:  # corrupt files: say which
        raise DleStreamError(f"{folder}: checkpoint unreadable ({type(exc).__name__}); train afresh or use an older copy") from None
    if state.get("version") != STATE_VERSION:
        raise DleStreamError(f"{state_path}: checkpoint version {state.get('version')!r} is not {STATE_VERSION}; train afresh")
    return tensors, state


def optimizer_state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = folder / f"optimizer-{name}.safetensors"
    return load_file(str(path)) if path.is_file() else {}
