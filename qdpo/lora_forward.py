"""LoRA layers whose update is added inside one GEMM instead of three passes over the output.

peft computes a LoRA linear as `result = base(x).clone(); result = result + B(A(x)) * scaling`:
for the 4-bit layers that is a copy of the output, a scaled copy of the update and an add, each
a full read and write of a [tokens, out_features] tensor, in the forward, in the recomputed
forward under gradient checkpointing, and again in the backward. On an 8B model those
elementwise passes were a third of a training step on an H200 (`qdpo bench --profile`).

Here the same sum is `addmm(base(x), A(x), B^T, alpha=scaling)`: the update is accumulated into
the base output by the matmul that makes it, in fp32 inside the GEMM, rounded once. Only the
forward changes; weights, saving, merging and the reference (adapters disabled) are peft's.
Anything the lean path does not cover (several active adapters, DoRA and other variants, mixed
adapter batches, merged weights, a LoRA bias, dtypes that peft would cast) takes peft's own
forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    peft_forward = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(self, x, *args, **kwargs)
    active = self.active_adapters
    if len(active) != 1:
        return peft_forward(self, x, *args, **kwargs)
    name = active[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
        return peft_forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if lora_b.bias is not None:  # lora_bias=True: the bias is not in the GEMM below
        return peft_forward(self, x, *args, **kwargs)
    # peft casts x to the LoRA weights' dtype unless autocast is on; take its path for that
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != lora_a.weight.dtype:
        return peft_forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    update_in = lora_a(self.lora_dropout[name](x))
    out = torch.addmm(result.reshape(-1, result.shape[-1]),
                      update_in.reshape(-1, update_in.shape[-1]), lora_b.weight.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape)


def _lean_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora.layer import Linear

    types_: list[type] = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        types_.append(Linear4bit)
    except ImportError:  # peft without bitsandbytes
        pass
    return tuple(types_)


def use_lean_lora(model: torch.nn.Module, enabled: bool = True) -> int:
    """Give every plain LoRA linear of `model` the lean forward (or peft's back); returns how
    many layers changed."""
    kinds = _lean_layer_types()
    changed = 0
    for module in model.modules():
        if type(module) not in kinds:  # exact types: subclasses may compute something else
            continue
        has_lean = "forward" in module.__dict__
        if enabled and not has_lean:
            module.forward = types.MethodType(_lean_forward, module)
            changed += 1
        elif not enabled and has_lean:
            del module.forward
            changed += 1
    return changed
