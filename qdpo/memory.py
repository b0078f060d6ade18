"""Peak GPU memory of a recipe, predicted from the model's config before anything is loaded.

`qdpo plan` prints the prediction and the largest token budget per micro-batch that fits a
card; `train.max_tokens: auto` uses the same arithmetic. The parts, in bytes:

- base weights: linear layers in 4-bit (half a byte per weight plus the block scales), the
  embedding (unless `model.embeddings_on_host` keeps an untied one in host memory) and an
  untied output head in the compute dtype;
- LoRA: fp32 weights and gradients plus the optimizer's two moments (fp32, or 1 byte each
  with the 8-bit optimizers);
- activations, per token of the micro-batch: with gradient checkpointing, every layer's input
  is kept, then one layer at a time is recomputed and back-propagated, holding its own
  activations and what the LoRA paths keep for their backward (counted as 6 bytes per input
  value: an empirical term, fitted with the rest to the measurements below, which had no LoRA
  dropout; with dropout each path also keeps its dropped copy and mask, 3 bytes more); without
  checkpointing every layer holds all of that; with `model.offload_activations` the layer
  inputs wait in host memory instead, bar the one or two in transit;
- fixed transients: the head's logits chunk (logits, softmax and their gradient) and one
  dequantized weight matrix;
- with `train.fsdp` over N GPUs: 1/N of the 4-bit layers, LoRA and optimizer state, plus two
  whole layers (the one running and the next being gathered); embeddings and head whole;
- the reference pass, when precomputed, runs without gradients on a 4x token budget and is
  checked separately (it rarely sets the peak).

The constants were checked against `qdpo bench` on an H200 (2026-11-27, shared-prefix rows,
sdpa): Llama-3.1-8B shape 11.53 GiB at 8k tokens and 7.07 GiB at 1.5k, Llama-3.2-1B 3.56 GiB at
8k (3.69 with rows bucketed to 128 tokens, as CUDA now runs them), then with the lean LoRA
forward the 8B shape at 2k-8k tokens (7.28-11.62 GiB); tests/test_memory.py keeps the
prediction within 10% of those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
# The head's logits chunk (logps.CHUNK_BYTES): the logits, their softmax and the gradient.
HEAD_CHUNK_BYTES = 256 * 2**20
HEAD_BUFFERS = 3
# Not in torch's allocated figure but on the card: CUDA context, cuBLAS workspace, allocator
# slack between reserved and allocated. Kept free when choosing a budget.
RESERVE_GIB = 1.5
SAFETY = 0.92  # use at most this share of what is left
REFERENCE_SCALE = 4  # batching.REFERENCE_SCALE, without importing torch
MAX_BUDGET = 131072  # tokens per micro-batch; more brings no speed, only longer steps


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder config."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: Any) -> "Shape":
        heads = c.num_attention_heads
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, ffn=c.intermediate_size,
                   heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   vocab=c.vocab_size, tied=bool(getattr(c, "tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of one layer's linear modules (Llama/Qwen/Mistral naming)."""
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.ffn
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


@dataclass(frozen=True)
class Settings:
    """The recipe's choices that change memory."""

    quantization: str = "nf4"  # nf4 / fp4 / none
    double_quant: bool = True
    dtype_bytes: int = 2
    lora_r: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"
    optimizer: str = "paged_adamw_8bit"
    checkpointing: bool = True
    offload: bool = False  # checkpointed layer inputs in host memory (model.offload_activations)
    host_embeddings: bool = False  # the input embedding table in host memory (untied models)
    precompute_reference: bool = True
    shards: int = 1  # train.fsdp over this many GPUs (1: each GPU holds the whole model)

    @classmethod
    def from_recipe(cls, recipe: Any, gpus: int = 1) -> "Settings":
        m, t = recipe.model, recipe.train
        targets = recipe.lora.target_modules
        return cls(quantization=m.quantization, double_quant=m.double_quant,
                   dtype_bytes=4 if m.compute_dtype == "fp32" else 2, lora_r=recipe.lora.r,
                   lora_dropout=recipe.lora.dropout,
                   target_modules=targets if isinstance(targets, str) else tuple(targets),
                   optimizer=t.optimizer, checkpointing=m.gradient_checkpointing,
                   offload=m.gradient_checkpointing and m.offload_activations,
                   host_embeddings=m.embeddings_on_host,
                   precompute_reference=t.reference in ("auto", "precompute"),
                   shards=gpus if t.fsdp else 1)

    def targeted(self, name: str) -> bool:
        if self.target_modules == "all-linear":
            return True
        return any(name == t or name.endswith("." + t) for t in self.target_modules)


@dataclass(frozen=True)
class Estimate:
    tokens: int
    base: float  # bytes
    lora: float
    activations: float
    transients: float
    reference_pass: float  # peak of the no-grad reference pass, over the static part

    @property
    def training_peak(self) -> float:
        return self.base + self.lora + self.activations + self.transients

    @property
    def peak(self) -> float:
        return max(self.training_peak, self.base + self.lora + self.reference_pass)

    def parts_gib(self) -> dict[str, float]:
        return {"4-bit base, embeddings, head": self.base / GIB,
                "LoRA weights, gradients, optimizer": self.lora / GIB,
                f"activations ({self.tokens:,} tokens)": self.activations / GIB,
                "head chunk and dequantized weight": self.transients / GIB,
                "peak allocated": self.peak / GIB}


def weight_bytes(quantization: str, double_quant: bool, dtype_bytes: int) -> float:
    """Bytes per weight of a quantized linear layer: 4 bits plus the scale of each 64-block
    (fp32, or 8-bit with an fp32 scale per 256 blocks under double quantization)."""
    if quantization == "none":
        return float(dtype_bytes)
    return 0.5 + ((1 + 4 / 256) / 64 if double_quant else 4 / 64)


def static_bytes(shape: Shape, s: Settings) -> tuple[float, float]:
    """(base, LoRA) bytes: what stays on the card for the whole run."""
    per_weight = weight_bytes(s.quantization, s.double_quant, s.dtype_bytes)
    lins = shape.linears()
    linear = shape.layers * sum(i * o for i, o in lins.values())
    # the input table and an untied head; a tied head keeps the one table on the card
    tables = 1 if shape.tied else (1 if s.host_embeddings else 2)
    embed = shape.vocab * shape.hidden * s.dtype_bytes * tables
    lora_params = shape.layers * sum(s.lora_r * (i + o) for n, (i, o) in lins.items()
                                     if s.targeted(n))
    moments = 2 if "8bit" in s.optimizer else 8
    lora = lora_params * (4 + 4 + moments)
    if s.shards > 1:  # 1/N of the layers, plus the one that runs and the next being gathered
        layer = linear / shape.layers * per_weight
        return linear * per_weight / s.shards + 2 * layer + embed, lora / s.shards
    return linear * per_weight + embed, lora


def bytes_per_token(shape: Shape, s: Settings) -> float:
    """Activation bytes one token of a training micro-batch holds at the peak."""
    d, f, b = shape.hidden, shape.ffn, s.dtype_bytes
    kv = shape.kv_heads * shape.head_dim
    layer = (6 * d + 2 * kv + 4 * f) * b  # norms, q/k/v, attention out, residuals, the MLP
    inputs = sum(i for n, (i, _) in shape.linears().items() if s.targeted(n))
    lora_inputs = inputs * (4 + b)
    if s.lora_dropout > 0:  # each LoRA path keeps its own dropped copy of the input and mask
        lora_inputs += inputs * (b + 1)
    one_layer = layer + lora_inputs
    if s.checkpointing:
        # offloaded, a layer's input is on the card while it is copied out or back in
        kept = 2 if s.offload else shape.layers
        return kept * d * b + one_layer
    return shape.layers * one_layer


def estimate(shape: Shape, s: Settings, tokens: int) -> Estimate:
    base, lora = static_bytes(shape, s)
    biggest = max(i * o for i, o in shape.linears().values()) * s.dtype_bytes
    head = min(HEAD_CHUNK_BYTES, tokens * shape.vocab * 4)  # fp32 logits of one chunk
    transients = HEAD_BUFFERS * head + biggest
    # no-grad: one layer's activations at a time, on a larger budget
    ref_tokens = REFERENCE_SCALE * tokens
    reference = (ref_tokens * (3 * shape.hidden + 2 * shape.ffn) * s.dtype_bytes + transients
                 if s.precompute_reference else 0.0)
    return Estimate(tokens, base, lora, tokens * bytes_per_token(shape, s), transients,
                    reference)


def usable_bytes(gpu_gib: float) -> float:
    return max(0.0, (gpu_gib - RESERVE_GIB) * SAFETY) * GIB


def fit_tokens(shape: Shape, s: Settings, gpu_gib: float, multiple: int = 128) -> int:
    """The largest token budget per micro-batch (a multiple of `multiple`, at most
    MAX_BUDGET) that fits a card of `gpu_gib`, or 0 when not even `multiple` tokens do."""
    return tokens_under(shape, s, usable_bytes(gpu_gib), multiple)


def tokens_under(shape: Shape, s: Settings, budget: float, multiple: int = 128) -> int:
    """The largest token budget (a multiple of `multiple`) whose predicted peak allocated
    memory is at most `budget` bytes, or 0."""
    lo, hi = 0, MAX_BUDGET // multiple  # in units of `multiple`; lo fits (or is 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(shape, s, mid * multiple).peak <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple


def parse_gib(text: str) -> float:
    """'24GiB', '24 GB', '24' -> GiB (GB is read as GiB, as cards are sold)."""
    t = text.strip().lower().replace(" ", "")
    for suffix in ("gib", "gb", "g"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    value = float(t)
    if not 0 < value < float("inf"):  # also nan
        raise ValueError(text)
    return value


def longest_pair(max_length: int) -> int:
    """Tokens the longest pair the data settings allow occupies in any layout: both responses
    with a one-token prompt (shared prefix), or two full sequences (packed, padded)."""
    return 2 * max_length


@dataclass(frozen=True)
class Plan:
    gpu_gib: float
    max_tokens: int  # largest budget that fits (0: not even the smallest micro-batch fits)
    peak_tokens: int  # the largest micro-batch the recipe makes (what `estimate` is for)
    estimate: Estimate
    longest_pair: int
    floor_gib: float  # the peak with the smallest micro-batch (128 tokens)
    budget: str  # how the recipe sizes micro-batches, in words
    untied: bool = False  # the input embedding is a table of its own (it can go to the host)

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= usable_bytes(self.gpu_gib)

    def advice(self, recipe: Any) -> list[str]:
        """What to change when the recipe does not fit."""
        if self.fits:
            return []
        tips = []
        usable = usable_bytes(self.gpu_gib) / GIB
        if self.max_tokens == 0:
            tips.append(f"the weights, LoRA, optimizer and the head's chunk need "
                        f"{self.floor_gib:.1f} GiB and "
                        f"{usable:.1f} GiB of this {self.gpu_gib:g} GiB card are usable "
                        f"({RESERVE_GIB} GiB go to the CUDA context, and a {1 - SAFETY:.0%} "
                        "margin): use a card with more memory or a smaller model" +
                        ("" if recipe.train.fsdp else ", or share the weights across several "
                         "cards with train.fsdp: true (check with qdpo plan --gpus N)"))
            return tips
        if self.longest_pair > self.max_tokens:
            tips.append(f"lower data.max_length to {self.max_tokens // 2} or less (now "
                        f"{recipe.data.max_length}: its longest pair needs "
                        f"{self.longest_pair:,} tokens, {self.max_tokens:,} fit)")
        else:
            tips.append(f"set train.max_tokens: auto (or at most {self.max_tokens:,})")
        if not recipe.model.gradient_checkpointing:
            tips.append("set model.gradient_checkpointing: true")
        elif not recipe.model.offload_activations and not recipe.train.fsdp:
            tips.append("set model.offload_activations: true (layer inputs in CPU memory)")
        if self.untied and not recipe.model.embeddings_on_host and not recipe.train.fsdp:
            tips.append("set model.embeddings_on_host: true (the input embedding table in CPU "
                        "memory)")
        if "8bit" not in recipe.train.optimizer and not recipe.train.fsdp:
            tips.append("set train.optimizer: paged_adamw_8bit")
        if not recipe.train.fsdp:
            tips.append("on several cards, set train.fsdp: true to share the weights (check "
                        "with qdpo plan --gpus N)")
        return tips


def plan_for(recipe: Any, config: Any, gpu_gib: float, gpus: int = 1) -> Plan:
    """The recipe's largest micro-batch on a card of `gpu_gib`: with a token budget, the
    budget (or a longer pair, which trains alone); with `auto`, the largest budget that fits;
    without one, micro_batch_pairs pairs of the longest length data.max_length allows. With
    train.fsdp, the weights are shared by `gpus` cards."""
    shape, s = Shape.from_config(config), Settings.from_recipe(recipe, gpus)
    fitted = fit_tokens(shape, s, gpu_gib)
    longest = longest_pair(recipe.data.max_length)
    setting = recipe.train.max_tokens
    if setting == "auto":
        peak, budget = max(fitted, longest), "train.max_tokens auto"
    elif setting:
        peak, budget = max(setting, longest), f"train.max_tokens {setting:,}"
    else:
        pairs = recipe.train.micro_batch_pairs
        peak, budget = pairs * longest, f"{pairs} pairs of up to {longest:,} tokens"
    return Plan(gpu_gib, fitted, peak, estimate(shape, s, peak), longest,
                estimate(shape, s, 128).peak / GIB, budget, untied=not shape.tied)


def auto_max_tokens(recipe: Any, config: Any, gpu_gib: float, gpus: int = 1) -> int:
    """`train.max_tokens: auto` on a GPU: the largest budget that fits (at least 256 tokens;
    a pair longer than the budget still trains, alone in its micro-batch)."""
    return max(plan_for(recipe, config, gpu_gib, gpus).max_tokens, 256)


def token_budget(recipe: Any, config: Any, device: Any) -> int | None:
    """train.max_tokens with `auto` resolved: the largest budget this GPU fits; on the CPU
    none (pairs per micro-batch, as without a budget)."""
    setting = recipe.train.max_tokens
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return None
    from qdpo import console as ui
    from qdpo.device import total_memory_gib
    from qdpo.distributed import ranks

    tokens = auto_max_tokens(recipe, config, total_memory_gib(device), ranks().world)
    ui.info(f"train.max_tokens auto: {tokens:,} tokens per micro-batch fit this GPU")
    return tokens
