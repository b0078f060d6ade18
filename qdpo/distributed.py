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
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

# A rank that dies leaves the others waiting in a collective; torchrun then stops them all,
# but a hung collective must not wait for ever either.
TIMEOUT = datetime.timedelta(minutes=30)
T = TypeVar("T")


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
    """Leave the job: after every rank got here (so no peer is still in a collective with
    this one when its connections close), the process group is destroyed."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
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
    params = [p for p in params if not _sharded(p)]  # FSDP has summed those already
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[at:at + n].view_as(g).to(p.dtype)
        at += n


def _sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


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


# ---------------------------------------------------------------------------------------
# Sharded weights (train.fsdp): for models that do not fit one device
# ---------------------------------------------------------------------------------------
#
# FSDP2 (`fully_shard`) splits each decoder layer's parameters along their first dimension
# across the ranks: the 4-bit base (bitsandbytes keeps each packed weight as a [n, 1] tensor and
# its quantization state on the module, where the layer finds it again after each gather), the
# LoRA tensors and their optimizer state (the embeddings and the head stay whole, see shard).
# A decoder layer's weights are gathered just before it runs and freed after, so each rank
# holds 1/N of the layers plus one whole layer. The gradients are reduce-scattered, summed (not
# averaged: a pair's loss is already divided by the step's total pair count, as in the
# data-parallel path).
#
# What sharding asks of the rest of qdpo:
# - every rank runs the same number of forward and backward passes, since each one gathers
#   weights from all ranks: `lockstep` pads the ranks with fewer micro-batches;
# - a checkpoint or the final adapter is gathered whole (`full_adapter_state`,
#   `full_optimizer_state`) and written by rank 0 in the one-process format, so any run
#   resumes it on any number of ranks, sharded or not (`load_adapter_state`,
#   `shard_optimizer_state` cut it up again);
# - generation (sample prompts) would need all ranks in lockstep token by token: not done.


def shard(model: Any, layers: Sequence[torch.nn.Module], device: torch.device) -> tuple[int, int]:
    """Shard `model` (a peft model, on the CPU or `device`) across the job's ranks, onto
    `device`: each of its decoder `layers` is one unit, the decoder around them (final norm)
    the root. The input embeddings and the output head stay whole on every rank: qdpo calls
    the head on its own, in chunks, outside the decoder's forward, where a sharded head would
    be gathered again for every chunk (and a tied head shares the embeddings' tensor)."""
    import bitsandbytes as bnb
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    lm = model.get_base_model()
    whole = [lm.get_input_embeddings(), lm.get_output_embeddings()]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(lm.get_decoder(), mesh=mesh,
                ignored_params={p for m in whole for p in m.parameters()})
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # summed: the losses are already divided
            m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no PREMUL_SUM)
        elif isinstance(m, bnb.nn.Linear4bit) and getattr(m, "quant_state", None) is not None:
            m.quant_state.to(device)  # small, and no parameter: FSDP leaves it where it was
    for m in whole:
        m.to(device)
    return held_bytes(model)


def held_bytes(model: Any) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters)."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        held += local.numel() * local.element_size()
        total += p.numel() * p.element_size()
    return held, total


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def lockstep(model: Any, batches: Iterable[T], filler: Callable[[], T]) -> Iterator[tuple[T, bool]]:
    """(batch, real) for each of this rank's `batches`; with sharded weights, then
    (filler(), False) until every rank is done, so all run the same number of passes (a filler
    pass gathers the same weights; its result is dropped)."""
    if not is_sharded(model):
        for b in batches:
            yield b, True
        return
    it = iter(batches)
    while True:
        b = next(it, None)
        more = torch.tensor([b is not None], dtype=torch.int32, device=_comm_device())
        torch.distributed.all_reduce(more)
        if not int(more):
            return
        yield (b, True) if b is not None else (filler(), False)


def _comm_device() -> torch.device:
    """Where a collective's tensors must live: the GPU with NCCL, the CPU with gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def whole(t: Any) -> Any:
    """A sharded tensor gathered whole (a collective); any other value as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_adapter_state(model: Any) -> dict[str, torch.Tensor] | None:
    """The trainable tensors whole, by parameter name, on every rank (a collective: every rank
    calls it); None when the model is not sharded (its own state_dict is whole)."""
    if not is_sharded(model):
        return None
    return {n: whole(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded tensor whole (a collective when sharded)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: whole(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return sd


def shard_optimizer_state(sd: dict[str, Any], params: Sequence[torch.nn.Parameter]) -> dict:
    """A whole optimizer state (as saved) cut to this rank's shards of `params`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                         src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
                    else v for k, v in s.items()}
    return {**sd, "state": state}


def load_adapter_state(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Copy whole adapter tensors (peft's names: no adapter name) into a sharded model's
    shards, each rank cutting its own from the same file."""
    from torch.distributed.tensor import distribute_tensor

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.replace(".default.", ".")  # peft's names leave out the adapter's name
        full = weights[key].to(p.device, p.dtype)
        part = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        with torch.no_grad():
            p.to_local().copy_(part.to_local())
