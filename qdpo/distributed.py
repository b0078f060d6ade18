"""Data parallelism over the processes torchrun starts (`torchrun --nproc-per-node N -m qdpo
train`, or `qdpo train --gpus N`).

Every rank holds the 4-bit base and the adapters; an optimizer step's pairs are shared out by
token count (`share`), each rank runs its micro-batches, and the LoRA gradients are summed
across ranks (`sum_gradients`, one all-reduce of one flat buffer: the trainable tensors are
few and small, so DDP's buckets buy nothing). The loss of a pair is divided by the step's total
pair count on whichever rank computes it, so the summed gradient is the one-process gradient
and a run on N ranks ends with the same adapter as on one. Metrics are summed the same way.
Rank 0 alone writes the run directory (metrics, checkpoints, the final adapter, the report)
and talks to the terminal; every rank reads checkpoints to resume.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op on one rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

# A rank that dies leaves the others waiting in a collective; torchrun then stops them all,
# but a hung collective must not wait for ever either.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> Ranks:
    """The ranks torchrun launched (from its environment), joined or not."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def ranks() -> Ranks:
    """This process's place in the job: torchrun's ranks once `init` joined them (a command
    that did not, e.g. `qdpo chat` under torchrun, works alone on each rank)."""
    return launched() if torch.distributed.is_initialized() else Ranks()


def init() -> Ranks:
    """Join the job's process group (NCCL between GPUs, gloo on CPUs) once; one rank: nothing."""
    r = launched()
    if r.active and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(r.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return ranks()


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def share(ids: Sequence[int], costs: Sequence[int], r: Ranks) -> list[int]:
    """This rank's part of `ids`, balanced by cost (tokens): the longest first, each to the
    least loaded rank, so no rank waits long for another. The same on every rank."""
    if not r.active:
        return list(ids)
    load = [0] * r.world
    mine = []
    for cost, i in sorted(zip(costs, ids), key=lambda x: (-x[0], x[1])):
        target = min(range(r.world), key=lambda k: (load[k], k))
        load[target] += cost
        if target == r.rank:
            mine.append(i)
    order = {i: n for n, i in enumerate(ids)}
    return sorted(mine, key=order.__getitem__)


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over the ranks, in place (a rank that had no pairs
    contributes zeros)."""
    if not torch.distributed.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[at:at + n].view_as(g).to(p.dtype)
        at += n


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (small Python values: metric sums, flags, ids), rank order."""
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
