"""Training on several processes or machines: ``torch.distributed`` and DistributedDataParallel.

``torchrun --nproc-per-node N -m dle_stream train ...`` starts N copies of ``dle-stream
train``; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address
in each one's environment, and :func:`start` joins them in one process group (backend
``nccl`` on CUDA GPUs, ``gloo`` on CPUs). Without torchrun (or with one process) nothing
changes: :func:`start` returns :data:`SINGLE` and the trainer runs as it always did.

How the trainer uses it:

- every rank simulates its own movies, from its own seed stream (:meth:`Ranks.seed`), on
  its own device: no movie is simulated twice;
- a step is one *global* batch: each rank takes its share (:meth:`Ranks.share`) and
  DistributedDataParallel averages the gradients, so the step budget and the
  learning-rate schedule mean the same for any number of processes;
- decisions that depend on a clock (a ``--minutes`` budget, when to checkpoint, the
  schedule's progress in a timed run) are rank 0's, broadcast to the others
  (:meth:`Ranks.agree`), so every rank takes the same number of steps at the same rate;
- only rank 0 validates and writes checkpoints, the learning curve and the package.
  A checkpoint holds no per-rank state, so ``--resume`` works with any number of
  processes (the latent cache is rebuilt, as after any resume).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dle_stream.errors import DleStreamError


@dataclass(frozen=True)
class Ranks:
    """This process's place in a training run: ``rank`` of ``world`` processes
    (``local_rank`` on its machine). ``world == 1``: a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: where the small control tensors of collectives live (nccl needs them on the GPU)
    comm_device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates and writes the checkpoint, curve and package."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, total: int) -> int:
        """This rank's part of ``total`` items (a global batch, the cache): the parts of all
        ranks add up to ``total`` and differ by at most one."""
        return total // self.world + (1 if self.rank < total % self.world else 0)

    def weight(self, part: int, total: int) -> float:
        """Factor for the mean loss over this rank's ``part`` of ``total`` items, such that
        the gradients DistributedDataParallel averages over the ranks are those of the mean
        over all ``total`` (1.0 when the parts are equal)."""
        return part * self.world / total if total else 0.0

    def seed(self, seed: int) -> int:
        """This rank's seed for a stream that a single process seeds with ``seed``: rank 0
        keeps ``seed`` (a one-process run is unchanged), the others get independent streams."""
        if self.rank == 0:
            return int(seed)
        return int(np.random.SeedSequence([int(seed) % 2**63, self.rank]).generate_state(1)[0])

    def agree(self, values: Sequence[float]) -> list[float]:
        """Rank 0's ``values`` on every rank (a clock-based decision all must take alike)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        torch.distributed.broadcast(t, src=0)
        return t.cpu().tolist()

    def total(self, values: Sequence[float]) -> list[float]:
        """The sum over all ranks of each of ``values``."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def wait_for_all(self) -> None:
        """Return when every rank has come here (an all-reduce of nothing: works on any backend)."""
        if self.distributed:
            self.total([0.0])

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged over the ranks; rank 0's
        weights and buffers copied to all at construction); itself when single."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else self.local_rank] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)


#: A single process (no torchrun): everything as before.
SINGLE = Ranks()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DleStreamError(f"environment variable {name}={value!r} is not a number; start several processes with "
                             f"torchrun (it sets RANK, WORLD_SIZE and LOCAL_RANK)") from None


def start(device: str) -> tuple[Ranks, str]:
    """Join the process group torchrun set up, if any: (this process's :class:`Ranks`, the
    device it trains on). ``device`` is "cpu" or "cuda" (with several processes per machine,
    each takes the GPU ``cuda:LOCAL_RANK``). One process: (:data:`SINGLE`, ``device``)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE, device
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = device.startswith("cuda")
    if cuda:
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise DleStreamError(f"torchrun started process {local_rank} on a machine with {n_gpus} GPU(s); give "
                                 f"--nproc-per-node {n_gpus} or less, or --device cpu")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        atexit.register(_leave)
    return Ranks(rank=rank, world=world, local_rank=local_rank, comm_device=device if cuda else "cpu"), device


def _leave() -> None:
    """Leave the process group (at exit of a process that joined one)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
