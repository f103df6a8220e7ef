"""Training checkpoints on disk: model and optimiser tensors in safetensors, the rest in JSON.

A checkpoint is a folder ``checkpoint/`` inside the model package being trained. Each save
is one *generation* ``g``: ``model-g.safetensors`` (every parameter and buffer),
``optimizer-NAME-g.safetensors`` (Adam's moments and step counts), ``average-NAME-g.safetensors``
(running averages of weights, when a run keeps them) and then ``state.json``
(step counters, stage, learning-curve rows, optimiser hyper-parameters, and the names of
that generation's tensor files). Nothing is pickled.

``state.json`` is the commit: it is written last (temporary name, then rename) and names
the tensor files it belongs to, and files of older generations are removed only after it.
So a run killed at any moment of a save, even while ``state.json`` is being written, leaves
the previous checkpoint whole: its weights, optimiser moments and step counters are those
of one and the same step, and ``--resume`` neither repeats nor skips training steps
(weights newer than their counters would be trained for the step budget again).

Checkpoints of version 1 (one ``model.safetensors`` and ``optimizer-NAME.safetensors``,
overwritten in place) still load; the next save writes version 2 and removes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dle_stream.errors import DleStreamError
from dle_stream.files import write_atomic
from dle_stream.model_package import CARD_FILE, WEIGHTS_FILE
from dle_stream.recording_check import REFERENCE_FILE

STATE_VERSION = 2
#: versions this code loads (1: tensor files without a generation, overwritten in place)
READABLE_VERSIONS = (1, 2)
STATE_FILE = "state.json"
#: files a checkpoint writes that a later save may remove: tensor files of any generation or
#: version, and temporary files left by a kill (``x.tmp``, or ``.x.<random>.tmp`` of write_atomic)
_OWN_FILE = re.compile(r"^(model|optimizer-[A-Za-z0-9_]+|average-[A-Za-z0-9_]+)(-\d+)?\.safetensors(\.tmp)?$"
                       r"|^\.((model|optimizer-[A-Za-z0-9_]+|average-[A-Za-z0-9_]+)(-\d+)?\.safetensors|state\.json)\..+\.tmp$"
                       r"|^state\.json\.tmp$")


#: What a training run writes into its --out folder: a new run (no --resume) starts only
#: where none of them is, so that a forgotten flag never writes over hours of training.
RUN_FILES = (CARD_FILE, WEIGHTS_FILE, "checkpoint", "training_curve.csv", REFERENCE_FILE)


def check_new_run_folder(out: Path) -> None:
    """One-line refusal if ``out`` already holds a model package or a run (see :data:`RUN_FILES`):
    a new run (not resumed) starts only in a folder without them, whoever starts it (the CLI,
    :func:`~dle_stream.training.trainer.train`)."""
    held = [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    if not held:
        return
    what = "a model package" if CARD_FILE in held else "a training run's files"
    raise DleStreamError(f"--out {out}: it already holds {what} ({held[0]}); continue that run with --resume, "
                         f"or give a new --out folder (a trained model is never replaced)")


def _atomic_write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def _atomic_write_text(text: str, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


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


def _committed_generation(folder: Path) -> int:
    """The generation named by the checkpoint's state.json (0 when there is none, or it is of version 1)."""
    try:
        return int(json.loads((folder / STATE_FILE).read_text()).get("generation", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    state: dict, averages: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write a new generation of the checkpoint in ``folder``; ``state.json`` last (the commit).
    ``averages``: name → tensors of running weight averages kept beside the model."""
    folder.mkdir(parents=True, exist_ok=True)
    generation = _committed_generation(folder) + 1
    model_file = f"model-{generation}.safetensors"
    _atomic_write_tensors(model.state_dict(), folder / model_file)
    opt_files: dict[str, str] = {}
    opt_meta = {}
    for name, opt in optimizers.items():
        tensors, rest = optimizer_tensors(opt)
        if tensors:
            opt_files[name] = f"optimizer-{name}-{generation}.safetensors"
            _atomic_write_tensors(tensors, folder / opt_files[name])
        opt_meta[name] = rest
    avg_files: dict[str, str] = {}
    for name, tensors in (averages or {}).items():
        avg_files[name] = f"average-{name}-{generation}.safetensors"
        _atomic_write_tensors(tensors, folder / avg_files[name])
    doc = {**state, "version": STATE_VERSION, "generation": generation,
           "files": {"model": model_file, "optimizers": opt_files, "averages": avg_files}, "optimizers": opt_meta}
    _atomic_write_text(json.dumps(doc, indent=1), folder / STATE_FILE)
    _remove_other_generations(folder, {model_file, *opt_files.values(), *avg_files.values()})


def _remove_other_generations(folder: Path, keep: set[str]) -> None:
    """Remove the tensor files of other generations (and of version 1) and temporary files
    left by a killed save; nothing else."""
    for path in folder.iterdir():
        if path.name not in keep and _OWN_FILE.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _tensor_files(folder: Path, state: dict) -> tuple[Path, dict[str, Path]]:
    """(model file, optimiser name → file) of the committed generation."""
    if state.get("version") == 1:
        names = {p.name.removeprefix("optimizer-").removesuffix(".safetensors"): p
                 for p in folder.glob("optimizer-*.safetensors")}
        return folder / "model.safetensors", names
    files = state.get("files") or {}
    return folder / str(files.get("model", "")), {k: folder / v for k, v in (files.get("optimizers") or {}).items()}


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model tensors, state dict) of a checkpoint folder; a clear error when unusable."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise DleStreamError(
            f"{folder}: no training checkpoint here (need {STATE_FILE} and its model file); "
            f"pass --resume a model folder written by `dle-stream train`"
        )
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as exc:
        raise DleStreamError(f"{state_path}: checkpoint unreadable ({type(exc).__name__}); train afresh or use an "
                             f"older copy") from None
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        version = state.get("version") if isinstance(state, dict) else None
        raise DleStreamError(f"{state_path}: checkpoint version {version!r} is not one of "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; train afresh")
    model_path, _ = _tensor_files(folder, state)
    if not model_path.is_file():
        raise DleStreamError(f"{folder}: the checkpoint's model file {model_path.name} is missing; "
                             f"train afresh or use an older copy")
    try:
        tensors = load_file(str(model_path))
    except Exception as exc:  # corrupt files: say which
        raise DleStreamError(f"{model_path}: checkpoint unreadable ({type(exc).__name__}); train afresh or use an "
                             f"older copy") from None
    return tensors, state


def optimizer_state(folder: Path, name: str, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of optimiser ``name`` in the committed checkpoint ({} when it saved none).

    ``state``: the checkpoint's state (as :func:`load_checkpoint` returns it); read from
    ``state.json`` when not given.
    """
    if state is None:
        state = json.loads((folder / STATE_FILE).read_text())
    _, optimizers = _tensor_files(folder, state)
    path = optimizers.get(name)
    return load_file(str(path)) if path is not None and path.is_file() else {}


def average_state(folder: Path, name: str, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the running weight average ``name`` in the committed checkpoint ({} when it
    kept none); ``state`` as for :func:`optimizer_state`."""
    if state is None:
        state = json.loads((folder / STATE_FILE).read_text())
    name_file = ((state.get("files") or {}).get("averages") or {}).get(name)
    path = folder / str(name_file) if name_file else None
    return load_file(str(path)) if path is not None and path.is_file() else {}
