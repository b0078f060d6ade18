"""Attention: which kernel the model runs, and the mask a micro-batch gives it.

One room decides, so the loader, the batch layouts and the log-prob pass cannot disagree:
- `kernel_for` picks the `attn_implementation` a model is loaded with;
- `supports_layout_masks` and `row_cap` tell the batch plan what the kernel can take;
- `build_mask` turns a PackedBatch's plain tensors (segment and side of every token) into the
  mask that kernel wants, once per micro-batch, so the reference and policy passes share it.

Masks by kernel and layout:
- padded layout: the plain [R, T] padding mask; the model adds causality itself.
- packed and shared-prefix layouts: a 4-D mask [R, 1, T, T] of what each token may see (its own
  segment, causally, and a rejected token never sees the chosen tokens of its pair); boolean for
  sdpa, additive for eager, or a FlexAttention BlockMask that lets the kernel skip masked blocks.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from qdpo.errors import ModelError

# Side of each token in a segment (PackedBatch.sides); the shared-prefix mask uses it.
PROMPT, CHOSEN, REJECTED = 0, 1, 2

KERNELS = ("sdpa", "eager", "flex_attention", "flash_attention_2")
# Kernels that take a custom 4-D or block mask, which packed and shared-prefix rows need.
LAYOUT_MASK_KERNELS = ("sdpa", "eager", "flex_attention")

# FlexAttention skips masked blocks, but its block mask is built per row: keep rows bounded.
FLEX_ROW_TOKENS = 16384
FLEX_BLOCK = 128  # FlexAttention's block; also the CUDA row bucket


def kernel_for(setting: str, device: torch.device) -> str:
    """The attention implementation to load the model with.

    `auto` is sdpa on every device. On CUDA it was measured against FlexAttention (H200,
    2026-11-27, Llama-3.2-1B shape, shared-prefix rows bucketed to 128 tokens, 8 steps of 8
    pairs): sdpa trained at 19.0k tokens/s steady and 10.2k end to end, FlexAttention at 17.8k
    steady but 2.7k end to end, since compiling its kernels (eval and train) took 26 s of the
    run. FlexAttention uses less memory (3.04 against 3.56 GiB) and stays a choice for long
    runs and long rows.
    """
    if setting != "auto":
        return setting
    return "sdpa"  # every device, until FlexAttention is measured faster on CUDA


def check_can_train(kernel: str, device: torch.device) -> None:
    if kernel == "flex_attention" and device.type == "cpu":
        raise ModelError("FlexAttention cannot train on the CPU (torch has no backward pass for "
                         "it there). Set model.attn_implementation: auto (sdpa) to train on the "
                         "CPU; FlexAttention is for CUDA.")


def model_kernel(model: Any) -> str:
    """The kernel a loaded model actually runs (peft wrapper or plain causal LM)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(lm.config, "_attn_implementation", None) or "sdpa"


def supports_layout_masks(kernel: str) -> bool:
    return kernel in LAYOUT_MASK_KERNELS


def row_cap(kernel: str, hidden_size: int) -> int:
    """Longest packed row a kernel should get.

    SDPA with a dense mask computes every query against every key of a row, so a row of T
    tokens wastes attention work that grows with T; per token that work is ~4*T*d FLOPs against
    ~24*d^2 for the linear layers, so rows of about d/2 tokens keep the waste under a few
    percent (2048 for an 8B model, the 256 floor for tiny ones). FlexAttention skips masked
    blocks and is bounded only by the size of its block mask.
    """
    if kernel == "flex_attention":
        return FLEX_ROW_TOKENS
    return max(256, min(4096, hidden_size // 2))


def row_multiple(kernel: str, device: torch.device | str) -> int:
    """Rows are padded to a multiple of this many tokens.

    On CUDA every kernel is set up per shape: FlexAttention compiles per row length, and SDPA
    with a mask runs cuDNN, which builds an execution plan for each new shape. Measured on an
    H200 (2026-11-27, Llama-3.2-1B shape, shared-prefix rows, 8 steps of 8 pairs): rows bucketed
    to 128 tokens trained at 19.0k tokens/s steady and 10.2k end to end, against 12.1k and 6.5k
    with exact lengths. The CPU has no per-shape setup, so rows stay exact there (FlexAttention
    keeps its 128-token blocks). QDPO_ROW_MULTIPLE overrides it, to measure other buckets.
    """
    if os.environ.get("QDPO_ROW_MULTIPLE"):
        return max(1, int(os.environ["QDPO_ROW_MULTIPLE"]))
    if kernel == "flex_attention" or torch.device(device).type == "cuda":
        return FLEX_BLOCK
    return 1


def mask_dtype(model: Any, device: torch.device) -> torch.dtype:
    """The dtype an additive (eager) mask must have: the autocast dtype, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return next((p.dtype for p in lm.parameters() if p.is_floating_point()), torch.float32)


def build_mask(batch: Any, kernel: str, dtype: torch.dtype = torch.float32) -> Any:
    """The attention mask of one micro-batch in the form `kernel` takes."""
    if batch.layout == "padded":
        return (batch.segments >= 0).long()
    if kernel == "flex_attention":
        return _block_mask(batch.segments, batch.sides)
    allowed = allowed_matrix(batch.segments, batch.sides)
    if kernel == "eager":
        neg = torch.finfo(dtype).min
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, neg)
    return allowed


def allowed_matrix(segments: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] bool: may query token q see key token k."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    hidden = (sides[:, :, None] == REJECTED) & (sides[:, None, :] == CHOSEN)
    allowed = same & causal & ~hidden
    # every token sees itself, so no softmax row is empty (no NaN); padding (segment -1) may
    # also see earlier padding of its row, never a real token, and no real token sees it
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def _block_mask(seg: torch.Tensor, side: torch.Tensor) -> Any:
    """A FlexAttention BlockMask built from the segments directly, without compiling.

    torch's `create_block_mask` compiles (or, eagerly, evaluates every query-key pair of) the
    mask function for each new shape; with rows of varying length that compile dominated the
    step on an H200. Segments are contiguous runs, so which 128x128 blocks matter follows from
    each block's lowest and highest segment id: a block is skipped when the id ranges of its
    query and key tokens do not meet (or it is above the diagonal), "full" (no mask function
    needed) when both hold one and the same segment strictly below the diagonal and no rejected
    query meets a chosen key, and partial otherwise. The block choice only needs to be a
    superset of the blocks with a visible pair; `mask_mod` decides every partial block exactly.
    """
    from torch.nn.attention.flex_attention import BlockMask

    r, t = seg.shape
    n = -(-t // FLEX_BLOCK)
    pad = n * FLEX_BLOCK - t
    seg = torch.nn.functional.pad(seg, (0, pad), value=-1)
    side = torch.nn.functional.pad(side, (0, pad), value=PROMPT)

    def mask_mod(b, h, q, kv):
        return ((seg[b, q] == seg[b, kv]) & (kv <= q)
                & ~((side[b, q] == REJECTED) & (side[b, kv] == CHOSEN))) | (q == kv)

    blocks, sides = seg.view(r, n, FLEX_BLOCK), side.view(r, n, FLEX_BLOCK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)  # [R, n]
    below = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
    meets = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None]) & below
    one = lo == hi
    hidden = (sides == REJECTED).any(-1)[:, :, None] & (sides == CHOSEN).any(-1)[:, None, :]
    full = (meets & below.tril(-1) & one[:, :, None] & one[:, None, :]
            & (lo[:, :, None] == lo[:, None, :]) & ~hidden)
    partial = meets & ~full

    def counts_and_indices(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the blocks in use first, in index order, per query block; [R, 1, n] and [R, 1, n, n]
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    return BlockMask.from_kv_blocks(*counts_and_indices(partial), *counts_and_indices(full),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(t, t))
