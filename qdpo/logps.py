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
from qdpo.offload import host_embedding

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


def _text_config(lm: Any) -> Any:
    cfg = lm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


# model types whose forward multiplies the head's output by config.logits_scaling (Granite and
# the others that have it divide)
_MULTIPLIES_BY_LOGITS_SCALING = ("hyperclovax",)


def logits_transform(lm: Any) -> tuple[float | None, float | None]:
    """(scale, soft cap): what the causal-LM forward does to its head's output, as
    `tanh(logits * scale / cap) * cap`.

    transformers applies these after `lm_head` and before the softmax, so log-probs differ
    without them: Granite divides by `logits_scaling` (HyperCLOVA X multiplies by it, MiniCPM3
    divides the hidden states, which is the same), Cohere multiplies by `logit_scale`, Gemma 2
    and later cap with `final_logit_softcapping`. Config names alone are not enough (MPT has
    an unused `logit_scale`), hence the model types. `check_lean_head` in model.py refuses,
    at load, a model whose forward does something else.
    """
    cfg = _text_config(lm)
    types = {str(getattr(c, "model_type", "") or "") for c in (lm.config, cfg)}

    def value(name: str) -> float | None:
        for c in (cfg, lm.config):
            v = getattr(c, name, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return None

    scale = 1.0
    scaling = value("logits_scaling")
    if scaling:
        scale = scale * scaling if types & set(_MULTIPLIES_BY_LOGITS_SCALING) else scale / scaling
    logit_scale = value("logit_scale")
    if logit_scale is not None and any(t.startswith("cohere") for t in types):
        scale *= logit_scale
    return (scale if scale != 1.0 else None), (value("final_logit_softcapping") or None)


def _head_fn(head: torch.nn.Module, transform: tuple[float | None, float | None]):
    scale, softcap = transform

    def fn(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)

    return fn


def batch_mask(model: Any, batch: PackedBatch) -> Any:
    """The attention mask of `batch` for this model's kernel (build once, use for both passes)."""
    device = batch.input_ids.device
    return attention.build_mask(batch, attention.model_kernel(model),
                                attention.mask_dtype(model, device))


def decoder_hidden(lm: Any, input_ids: torch.Tensor, mask: Any = None,
                   position_ids: torch.Tensor | None = None,
                   host_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H]: what the causal LM feeds its output head.

    `host_ids`: the same ids in host memory. A model whose input embedding lives there
    (`offload.HostEmbedding`) looks them up without first copying `input_ids` back from the
    GPU; the embedding module itself is called, so its hooks (enable_input_require_grads) fire.
    """
    kw: dict[str, Any] = {"input_ids": input_ids}
    if host_ids is not None and host_embedding(lm) is not None:
        assert host_ids.shape == input_ids.shape, "host ids of another batch"
        kw = {"inputs_embeds": lm.get_input_embeddings()(host_ids)}
    out = lm.get_decoder()(**kw, attention_mask=mask, position_ids=position_ids,
                           use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logps(lm: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) through the output head in chunks, shape [N] float32.

    Each chunk is recomputed in backward (when it needs gradients) instead of keeping its
    logits.
    """
    head = lm.get_output_embeddings()
    fn = _head_fn(head, logits_transform(lm))
    vocab = head.weight.shape[0] if hasattr(head, "weight") else lm.config.vocab_size
    chunk = max(16, CHUNK_BYTES // (4 * vocab))
    parts = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(fn, h, t, use_reentrant=False))
        else:
            parts.append(fn(h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def token_logps(model: Any, batch: PackedBatch, mask: Any = None) -> torch.Tensor:
    """log p(target | prefix) for every scored token, shape [N] float32."""
    lm = causal_lm(model)
    if mask is None:
        mask = batch_mask(model, batch)
    hidden = decoder_hidden(lm, batch.input_ids, mask, batch.position_ids,
                            batch.host_input_ids)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.pred_index)
    return head_logps(lm, hidden, batch.targets)


def sequence_logps(model: Any, batch: PackedBatch, mask: Any = None) -> SequenceLogps:
    tok = token_logps(model, batch, mask)
    p = batch.num_pairs
    sums = tok.new_zeros(2 * p).index_add(0, batch.seq_index, tok)
    public_len = torch.minimum(batch.chosen_lengths, batch.rejected_lengths).repeat(2)
    keep = batch.token_offset < public_len[batch.seq_index]
    public = tok.new_zeros(2 * p).index_add(0, batch.seq_index[keep], tok[keep])
    return SequenceLogps(sums[:p], sums[p:], public[:p], public[p:])
