"""PackedBatch + model -> per-sequence summed log-probs of the completion tokens.

Only the positions that predict a completion token go through the output head, in chunks, and
each chunk is recomputed in backward instead of keeping its logits, so memory never holds a
[tokens, vocab] tensor for the whole batch. This module does not know which loss is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from qdpo import attention
from qdpo.batching import PackedBatch

# Bytes of fp32 logits one chunk may hold (the peak of the head's part of a step).
CHUNK_BYTES = 256 * 2**20


@dataclass
class SequenceLogps:
    chosen: torch.Tensor  # [P] summed log-probs
    rejected: torch.Tensor  # [P]
    chosen_public: torch.Tensor  # [P] over the first min(len_c, len_r) tokens (LD-DPO)
    rejected_public: torch.Tensor  # [P]


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_fn(head: torch.nn.Module, softcap: float | None):
    def fn(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)

    return fn


def batch_mask(model: Any, batch: PackedBatch) -> Any:
    """The attention mask of `batch` for this model's kernel (build once, use for both passes)."""
    device = batch.input_ids.device
    return attention.build_mask(batch, attention.model_kernel(model),
                                attention.mask_dtype(model, device))


def token_logps(model: Any, batch: PackedBatch, mask: Any = None) -> torch.Tensor:
    """log p(target | prefix) for every scored token, shape [N] float32."""
    lm = causal_lm(model)
    decoder = lm.get_decoder()
    if mask is None:
        mask = batch_mask(model, batch)
    out = decoder(input_ids=batch.input_ids, attention_mask=mask,
                  position_ids=batch.position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.pred_index)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    fn = _head_fn(head, softcap)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else lm.config.vocab_size
    chunk = max(16, CHUNK_BYTES // (4 * vocab))
    parts = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], batch.targets[s:s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(fn, h, t, use_reentrant=False))
        else:
            parts.append(fn(h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model: Any, batch: PackedBatch, mask: Any = None) -> SequenceLogps:
    tok = token_logps(model, batch, mask)
    p = batch.num_pairs
    sums = tok.new_zeros(2 * p).index_add(0, batch.seq_index, tok)
    public_len = torch.minimum(batch.chosen_lengths, batch.rejected_lengths).repeat(2)
    keep = batch.token_offset < public_len[batch.seq_index]
    public = tok.new_zeros(2 * p).index_add(0, batch.seq_index[keep], tok[keep])
    return SequenceLogps(sums[:p], sums[p:], public[:p], public[p:])
