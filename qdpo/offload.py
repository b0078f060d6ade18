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
"""

from __future__ import annotations

from typing import Any, Callable

import torch


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


def use_offloaded_checkpointing(model: Any) -> int:
    """Make every checkpointed decoder layer offload its input; returns how many."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")
              and type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer._gradient_checkpointing_func = offloaded_checkpoint
    return len(layers)
