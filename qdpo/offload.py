"""Gradient checkpointing whose saved layer inputs wait in CPU memory (`model.offload_activations`).

With checkpointing, what a micro-batch holds on the GPU until its backward is mostly each
decoder layer's input: layers x hidden x 2 bytes per token, 256 KiB a token on an 8B model,
2 GiB of an 8k-token micro-batch. Here each layer runs without gradients in the forward, its
input is copied to pinned host memory (asynchronously, on the compute stream), and the
backward copies it back, recomputes the layer with gradients and back-propagates through it:
reentrant checkpointing with the saved input off the card. The copies cost two PCIe transfers
of that input per layer; the GPU then holds one layer's input at a time.

transformers calls the layer's checkpoint function as `func(partial(forward, layer, **kwargs),
hidden_states, ...)`; `offloaded_checkpoint` takes that place. The LoRA weights inside the
layer get their gradients from the recompute's backward, as with torch's reentrant checkpoint,
so the first layer's input must require gradients (`enable_input_require_grads`, which
qdpo turns on with checkpointing).

The frozen input embedding table can wait in host memory too (`model.embeddings_on_host`):
`HostEmbedding`, below.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.utils.checkpoint


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in host memory: pinned and asynchronous from a GPU."""
    if t.device.type == "cpu":
        return t.detach().clone()  # the CPU "offload" (tests): the logic without a GPU
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Any], hidden: torch.Tensor, *rest: Any) -> Any:
        ctx.fn, ctx.rest, ctx.device = fn, rest, hidden.device
        kind = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        # the recompute must draw the same dropout masks as this pass
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(hidden.device) if kind == "cuda" else None
        ctx.hidden = _to_host(hidden)
        ctx.input_needs_grad = hidden.requires_grad
        out = fn(hidden, *rest)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"offloaded checkpointing needs a layer that returns one tensor, "
                            f"not {type(out).__name__}")
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        hidden = ctx.hidden.to(ctx.device, non_blocking=True).requires_grad_(ctx.input_needs_grad)
        ctx.hidden = None  # the host copy can go once the copy back is queued
        devices = [ctx.device] if ctx.device_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(ctx.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, ctx.device)
            out = ctx.fn(hidden, *ctx.rest)
        torch.autograd.backward(out, grad_out)
        return (None, hidden.grad) + (None,) * len(ctx.rest)


def offloaded_checkpoint(fn: Callable[..., Any], hidden: torch.Tensor, *rest: Any) -> Any:
    """A layer's checkpoint function (transformers' signature) that offloads its input."""
    return _OffloadedLayer.apply(fn, hidden, *rest)


def use_offloaded_checkpointing(model: Any, enabled: bool = True) -> int:
    """Make every checkpointed decoder layer offload its input, or (`enabled` False) keep it on
    the card again with torch's non-reentrant checkpoint, as qdpo turns checkpointing on;
    returns how many layers."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")
              and type(m).__name__.endswith("DecoderLayer")]
    func = offloaded_checkpoint if enabled else \
        functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for layer in layers:
        layer._gradient_checkpointing_func = func
    return len(layers)


# ---------------------------------------------------------------------------------------
# The input embedding table in host memory (`model.embeddings_on_host`)
# ---------------------------------------------------------------------------------------

# the module state that holds hooks on a module's forward: shared with the replacement, so a
# hook registered on the device embedding (enable_input_require_grads) fires on the host one,
# and its handle still removes it
_FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                       "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class HostEmbedding(torch.nn.Module):
    """A frozen input embedding whose table stays in host memory; only looked-up rows travel.

    On an untied model the input embedding table sits on the GPU for nothing but a row lookup
    (1 GiB in bf16 on Llama-3.1-8B). LoRA never trains it, so here it waits in host memory,
    the lookup runs on the CPU into a pinned buffer, and only tokens x hidden values
    are copied, asynchronously, to the compute `device`. The table is a plain attribute, no
    parameter or buffer: `model.to(...)`, `model.parameters()`, state dicts and transformers'
    `model.device` do not see it, so nothing moves it back or saves it. `.to()` on the module
    moves its compute `device` (and casts the table on the host).

    Ids already on the GPU (generation, transformers' own forward) are copied to the host
    first, a synchronisation; qdpo's log-prob passes hand over the batch's host copy of the
    ids instead (`PackedBatch.host_input_ids`), so training does not wait for the GPU.
    """

    def __init__(self, table: torch.Tensor, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        self._set_table(table)

    def _set_table(self, table: torch.Tensor) -> None:
        # ordinary host memory: the copy to the GPU reads the pinned buffer of looked-up rows,
        # never the table, and pinning it would lock up to twice its size (torch's pinned
        # allocator rounds to a power of two) for nothing
        self.table = table.detach().to("cpu")  # a plain attribute: not registered, never moved

    @property
    def weight(self) -> torch.Tensor:
        """The host table (read-only use: shape, dtype), as code that reads
        `get_input_embeddings().weight` expects."""
        return self.table

    @property
    def num_embeddings(self) -> int:
        return int(self.table.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        host = ids if ids.device.type == "cpu" else ids.to("cpu")
        if self.device.type != "cuda":
            out = torch.nn.functional.embedding(host, self.table)
            return out if self.device.type == "cpu" else out.to(self.device)
        # gathered straight into pinned memory, so the copy to the GPU is asynchronous
        flat = host.reshape(-1)
        out = torch.empty((flat.numel(), self.embedding_dim), dtype=self.table.dtype,
                          pin_memory=True)
        torch.index_select(self.table, 0, flat, out=out)
        return out.view(*host.shape, self.embedding_dim).to(self.device, non_blocking=True)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "HostEmbedding":
        # what `fn` would do to a tensor of this module: the compute device follows, the
        # table only takes a new dtype, and stays on the host
        probe = fn(torch.empty(0, dtype=self.table.dtype, device=self.device))
        self.device = probe.device
        self._set_table(self.table.to(probe.dtype) if probe.dtype != self.table.dtype
                        else self.table)
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, table in host memory "
                f"({self.table.dtype}), output on {self.device}")


def _causal_lm(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def embeddings_stay_because(model: Any) -> str | None:
    """Why the input embedding of `model` (a causal LM, or peft's wrapper of one) cannot move
    to host memory, or None when it can (or already has)."""
    lm = _causal_lm(model)
    emb = lm.get_input_embeddings()
    if isinstance(emb, HostEmbedding):
        return None
    if type(emb) is not torch.nn.Embedding:
        # a subclass may scale or otherwise change the lookup (Gemma's scaled embeddings)
        return (f"the input embedding is a {type(emb).__name__}, not a plain "
                "torch.nn.Embedding")
    if hasattr(emb, "_hf_hook"):
        return "the input embedding is dispatched by accelerate (device_map)"
    head = lm.get_output_embeddings()
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(head, "weight", None) is emb.weight or \
            getattr(cfg, "tie_word_embeddings", False) or \
            getattr(lm.config, "tie_word_embeddings", False):
        return "the output head shares its table (tied embeddings) and needs it on the device"
    if emb.weight.device.type == "meta":
        return "the input embedding has no weights yet (meta device)"
    return None


def host_embedding(model: Any) -> HostEmbedding | None:
    """The model's input embedding when it lives in host memory, else None."""
    emb = _causal_lm(model).get_input_embeddings()
    return emb if isinstance(emb, HostEmbedding) else None


def embeddings_to_host(model: Any) -> bool:
    """Move the input embedding table of `model` (a causal LM, or peft's wrapper of one) to host
    memory behind a `HostEmbedding`; the device copy is freed. False, with the model untouched,
    where that cannot be done (see `embeddings_stay_because`). Hooks on the old module's
    forward carry over, so this works before or after peft wraps the model and
    `enable_input_require_grads` registers its hook."""
    if host_embedding(model) is not None:
        return True
    if embeddings_stay_because(model) is not None:
        return False
    lm = _causal_lm(model)
    emb = lm.get_input_embeddings()
    device = emb.weight.device
    host = HostEmbedding(emb.weight, device)
    host.train(emb.training)
    for name in _FORWARD_HOOK_DICTS:
        if hasattr(emb, name):
            setattr(host, name, getattr(emb, name))
    lm.set_input_embeddings(host)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    if lm.get_input_embeddings() is not host or decoder.get_input_embeddings() is not host:
        lm.set_input_embeddings(emb)  # the decoder looks its embedding up some other way
        return False
    del emb
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return True
