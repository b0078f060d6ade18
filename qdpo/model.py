"""The model: a 4-bit base with LoRA adapters, and the reference from the same weights.

There is never a second copy of the base in memory. The reference policy is the base with the
adapters switched off, or, when training starts from an existing adapter, that adapter loaded a
second time under the name "reference" and frozen (adapters are megabytes, the base is not).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from qdpo import attention, distributed
from qdpo.cache import cache_dir
from qdpo.device import compute_dtype, default_device
from qdpo.errors import ModelError
from qdpo.files import atomic_dir, short_error
from qdpo.lora_forward import use_lean_lora
from qdpo.offload import (embeddings_stay_because, embeddings_to_host, host_embedding,
                          use_offloaded_checkpointing)
from qdpo.recipe import Recipe

REFERENCE_ADAPTER = "reference"
POLICY_ADAPTER = "default"


def _model_path(recipe: Recipe) -> str:
    """A local directory as an absolute path (adapters record it), else the hub id as given.

    A name that can only be a path (it starts with '.', '/' or '~', has more than one '/', or
    its first part is a local folder, as in `models/my-llama` beside a `models/` folder) and
    matches no folder is an error saying where it was looked for, not a hub request (which
    without network retries for a minute before failing).
    """
    name = recipe.model.name_or_path
    p = recipe.resolve_path(name)
    if Path(p).exists():
        return str(Path(p).resolve())
    first = name.split("/", 1)[0]
    in_local_folder = "/" in name and any(
        (Path(base) / first).is_dir() for base in (recipe.base_dir or ".", "."))
    if name.startswith((".", "/", "~")) or name.strip("/").count("/") > 1 or in_local_folder:
        places = [str(Path(recipe.base_dir) / name)] if recipe.base_dir else []
        places.append(str(Path.cwd() / Path(name).expanduser()))
        raise ModelError(f"model.name_or_path '{name}' is a path, and no folder is there "
                         f"(looked at {' and '.join(dict.fromkeys(places))}). Fix the path, "
                         "or give a hub id like org/name.")
    return p


def load_tokenizer(recipe: Recipe) -> Any:
    from transformers import AutoTokenizer

    src = recipe.resolve_path(recipe.model.tokenizer) if recipe.model.tokenizer \
        else _model_path(recipe)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except Exception as e:
        raise ModelError(f"Cannot load the tokenizer from '{src}': {short_error(e)}. "
                         "Check model.name_or_path "
                         "(or model.tokenizer); without network only local directories and "
                         "already-downloaded hub models load.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(path: str, recipe: Recipe | None = None) -> Any:
    """The model's config, with one clear error when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            path, trust_remote_code=bool(recipe and recipe.model.trust_remote_code))
    except Exception as e:
        raise ModelError(f"Cannot read the config of the base model '{path}': "
                         f"{short_error(e)}. Check that it exists (without network only local "
                         "directories and already-downloaded hub models load).") from None


def materialize_random(recipe: Recipe) -> str:
    """Write seeded random weights for the model's config once, and return their directory.

    The directory is keyed by the config and the seed, so a run, its merge and its chat all see
    the same "base" weights without storing them in the run directory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    src = _model_path(recipe)
    try:
        config = AutoConfig.from_pretrained(src, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except Exception as e:
        raise ModelError(f"Cannot read the model config from '{src}': {e}") from None
    key = hashlib.sha256((config.to_json_string(use_diff=False) + f"|seed={recipe.train.seed}")
                         .encode()).hexdigest()[:16]
    out = cache_dir() / "random-init" / f"{config.model_type}-{key}"
    if (out / "config.json").exists():
        return str(out)
    if distributed.ranks().rank > 0:  # transformers saves on global rank 0 only: wait for it
        return _wait_for(out / "config.json", RANK_WAIT_S)
    state = torch.random.get_rng_state()
    torch.manual_seed(recipe.train.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.random.set_rng_state(state)
    with atomic_dir(out, keep_existing=True) as tmp:  # a racing process wins
        model.save_pretrained(tmp)
    return str(out)


RANK_WAIT_S = 900  # how long another rank may take to write random-init weights


def _wait_for(path: Path, seconds: float) -> str:
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise ModelError(f"Rank 0 did not write '{path.parent}' within {seconds:.0f} s.")
        time.sleep(0.2)
    return str(path.parent)


def base_weights_path(recipe: Recipe) -> str:
    return materialize_random(recipe) if recipe.model.random_init else _model_path(recipe)


def load_base(recipe: Recipe, device: torch.device | None = None,
              quantize: bool | None = None, dtype: torch.dtype | None = None) -> Any:
    """The base causal LM, quantized per the recipe, frozen, on `device`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or default_device()
    cdtype = dtype or compute_dtype(recipe.model.compute_dtype, device)
    quant = recipe.model.quantization
    if quantize is False:
        quant = "none"
    kwargs: dict[str, Any] = {}
    if quant != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=recipe.model.double_quant,
            bnb_4bit_compute_dtype=cdtype, bnb_4bit_quant_storage=torch.uint8)
    path = base_weights_path(recipe)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    attn = attention.kernel_for(recipe.model.attn_implementation, device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                path, revision=None if recipe.model.random_init else recipe.model.revision,
                dtype=cdtype, device_map={"": str(device)},
                trust_remote_code=recipe.model.trust_remote_code,
                attn_implementation=attn, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        raise ModelError(f"Cannot load the model '{path}': {short_error(e)}. "
                         "Check model.name_or_path; "
                         "without network only local directories and already-downloaded hub "
                         "models load.") from None
    _freeze(model)
    return model


def random_quantized_base(config: Any, recipe: Recipe, device: torch.device) -> Any:
    """A model of `config`'s architecture with random weights, quantized in memory.

    Built directly on the device in the compute dtype, then every linear layer but the output
    head is swapped for a bitsandbytes Linear4bit, exactly what loading a checkpoint with the
    recipe's quantization gives, without writing or reading any weights on disk.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    cdtype = compute_dtype(recipe.model.compute_dtype, device)
    attn = attention.kernel_for(recipe.model.attn_implementation, device)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=cdtype, attn_implementation=attn)
    quant = recipe.model.quantization
    if quant != "none":
        head = model.get_output_embeddings()
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if not isinstance(child, torch.nn.Linear) or child is head:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=cdtype,
                                      compress_statistics=recipe.model.double_quant,
                                      quant_type=quant, quant_storage=torch.uint8, device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=recipe.model.double_quant,
                                             quant_type=quant, quant_storage=torch.uint8)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q.to(device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _freeze(model)
    return model


def _freeze(model: Any) -> None:
    """Base weights frozen, no KV cache, and 4-bit layers kept in their trainable format.

    bitsandbytes (0.48 and later) repacks a 4-bit weight for a faster CPU kernel the first time
    a layer runs in eval mode without gradients (on CPUs with AVX512-BF16), and keeps it
    repacked: every later training forward then goes through a kernel with no autograd
    formula, and gradients through the base are silently wrong. qdpo runs eval-mode passes
    (the reference, evaluation) between training steps, so the repacking is switched off.
    """
    import bitsandbytes as bnb

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    model.config.use_cache = False


@dataclass
class ModelInfo:
    device: torch.device
    dtype: torch.dtype
    base_path: str
    trainable_params: int
    total_params: int
    quantized_layers: int
    reference: str  # "adapters disabled" or "frozen initial adapter"
    # the LoRA that trains, as peft built it (with lora.init_adapter: the adapter's own settings)
    lora_r: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0


def _lora_config(recipe: Recipe) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha,
                      lora_dropout=recipe.lora.dropout, target_modules=recipe.lora.target_modules,
                      use_rslora=recipe.lora.use_rslora, bias="none", task_type="CAUSAL_LM")


def attach_lora(model: Any, recipe: Recipe) -> Any:
    """Wrap the base with trainable LoRA (fresh, or from `lora.init_adapter`)."""
    from peft import PeftModel, get_peft_model

    if recipe.model.embeddings_on_host:
        _embeddings_to_host(model)
    if recipe.model.gradient_checkpointing:
        with warnings.catch_warnings():  # renamed activation_checkpointing_* in transformers 5.2x
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if recipe.model.offload_activations:
            use_offloaded_checkpointing(model)
    init = recipe.lora.init_adapter
    torch.manual_seed(recipe.train.seed)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    try:
        if init:
            path = recipe.resolve_path(init)
            if not (Path(path) / "adapter_config.json").exists():
                raise ModelError(f"lora.init_adapter '{init}' is not a peft adapter directory "
                                 "(no adapter_config.json).")
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=POLICY_ADAPTER,
                                                   is_trainable=True)
            peft_model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            peft_model.set_adapter(POLICY_ADAPTER)
        else:
            peft_model = get_peft_model(model, _lora_config(recipe))
    except ModelError:
        raise
    except ValueError as e:
        raise ModelError(f"Cannot attach LoRA adapters: {e}. Check lora.target_modules.") from None
    # LoRA weights train in fp32 whatever the compute dtype: tiny, and stable under Adam.
    for n, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    check_lean_head(peft_model, compute_dtype(recipe.model.compute_dtype, _device_of(model)))
    use_lean_lora(peft_model)
    if recipe.train.compile:
        compile_decoder_layers(peft_model)
    return peft_model


def _embeddings_to_host(model: Any) -> None:
    """model.embeddings_on_host: the input embedding table to host memory, or say why not."""
    from qdpo import console as ui

    if embeddings_to_host(model):  # says False, model untouched, where it cannot
        emb = host_embedding(model)
        size = emb.table.numel() * emb.table.element_size()
        ui.info(f"model.embeddings_on_host: the input embedding table "
                f"({size / 2**20:,.0f} MiB) is in host memory; only looked-up rows go to "
                f"{emb.device.type}")
    else:
        why = embeddings_stay_because(model)
        ui.warn(f"model.embeddings_on_host has no effect: "
                f"{why or 'the decoder does not use the embedding the model exposes'}; qdpo "
                "plan and train.max_tokens: auto counted the table off the card, so set the "
                "key false for them to count it right")


def compile_decoder_layers(model: Any) -> int:
    """torch.compile every decoder layer; returns how many.

    The layers share their code, so one graph serves them all (the token count is dynamic, and
    rows are bucketed on CUDA, so new micro-batch shapes rarely recompile). What compiling wins
    is the Python and kernel-launch overhead of the many small ops around the 4-bit and LoRA
    matmuls, which decides the speed of small micro-batches. Gradient checkpointing still wraps
    each compiled layer from outside.
    """
    from qdpo import console as ui

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    if layers:
        ui.info(f"train.compile: {len(layers)} decoder layers compile on their first steps")
    else:
        ui.warn(f"train.compile: no decoder layers found in {type(model).__name__}; it runs "
                "uncompiled")
    return len(layers)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (LlamaDecoderLayer and its kin)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def _device_of(model: Any) -> torch.device:
    """Where the model computes: its input embedding's device, or, for an embedding table in
    host memory (model.embeddings_on_host), the device its rows are sent to."""
    host = host_embedding(model)
    return host.device if host is not None else model.get_input_embeddings().weight.device


@dataclass
class _CheckRow:
    """The parts of a PackedBatch that attention.build_mask reads (one packed row)."""

    segments: torch.Tensor
    sides: torch.Tensor
    layout: str = "packed"


# The lean head is checked on this many tokens at load (three targets at each position).
CHECK_TOKENS = 8


def check_lean_head(model: Any, dtype: torch.dtype | None = None) -> None:
    """Refuse a model whose forward turns its head's output into logits in a way logps.py
    does not reproduce, before it trains on silently wrong log-probs.

    logps.py never asks the model for logits: it runs the decoder and the output head itself
    and applies the transforms it knows (`logps.logits_transform`). Here a few tokens go
    through both that path and the model's own `forward(...).logits`, with the same decoder
    inputs, and the log-probs of the next token, the likeliest and the least likely token at
    each position must agree to within what the compute dtype's rounding allows. It runs
    without gradients in eval mode (no dropout) and leaves the model as it found it: each
    module's train/eval mode, and bitsandbytes' CPU repacking switched off while it runs (see
    `_freeze`), so a 4-bit weight keeps its trainable format.
    """
    import bitsandbytes as bnb

    from qdpo import logps
    from qdpo.device import autocast_for

    lm = logps.causal_lm(model)
    model_type = getattr(lm.config, "model_type", None) or type(lm).__name__
    emb = lm.get_input_embeddings().weight
    device = _device_of(lm)
    vocab = int(emb.shape[0])
    ids = torch.tensor([[(1 + 7919 * i) % vocab for i in range(CHECK_TOKENS)]], device=device)
    positions = torch.arange(CHECK_TOKENS, device=device)[None]
    modes = [(m, m.training) for m in model.modules()]
    q4 = [(m, m.support_avx512bf16_for_cpu, m.compute_dtype, m.compute_type_is_set)
          for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    autocast = autocast_for(device, dtype) if dtype is not None else contextlib.nullcontext()
    try:
        for m, *_ in q4:
            m.support_avx512bf16_for_cpu = False
        model.eval()
        with torch.no_grad(), autocast:
            mask = None
            if attention.model_kernel(model) == "flex_attention":
                # qdpo's block mask: transformers would compile one for this shape
                seg = torch.zeros_like(ids)
                mask = attention.build_mask(
                    _CheckRow(segments=seg, sides=seg), "flex_attention")
            full = lm(input_ids=ids, attention_mask=mask, position_ids=positions,
                      use_cache=False).logits[0, :-1]
            # with the host ids: a table in host memory (model.embeddings_on_host) is checked on
            # the inputs_embeds path that training takes
            hidden = logps.decoder_hidden(lm, ids, mask, positions, ids.cpu())[0, :-1]
            targets = torch.stack([ids[0, 1:], full.argmax(-1), full.argmin(-1)], -1)
            lean = logps.head_logps(lm, hidden.repeat_interleave(3, 0), targets.reshape(-1))
            ref = full.float().log_softmax(-1).gather(-1, targets).reshape(-1)
            diff = (lean - ref).abs().max().item()
            scale = full.float().abs().max().item()
            low = [d for d in (full.dtype, hidden.dtype, dtype if device.type == "cuda" else None,
                               getattr(lm.get_output_embeddings(), "weight", emb).dtype)
                   if d in (torch.bfloat16, torch.float16)]
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        raise ModelError(f"qdpo cannot compute log-probs for the '{model_type}' architecture "
                         f"(config.model_type): checking its output head failed with "
                         f"{short_error(e)}") from None
    finally:
        for m, mode in modes:
            m.training = mode
        for m, avx, cdtype, is_set in q4:
            m.support_avx512bf16_for_cpu, m.compute_dtype, m.compute_type_is_set = \
                avx, cdtype, is_set
    eps = max((torch.finfo(d).eps for d in low), default=torch.finfo(torch.float32).eps)
    # rounding of a transform done in the compute dtype moves a log-prob by at most about
    # 2 * eps/2 * |logit|; a missing scale or cap moves it by a fraction of |logit|
    if not diff <= 1e-3 + 4 * eps * scale:
        raise ModelError(
            f"qdpo does not support the logits transform of the '{model_type}' architecture "
            f"(config.model_type) yet: its forward turns the output head's values into logits "
            f"in a way qdpo's log-prob computation does not reproduce (log-probs differ by up "
            f"to {diff:.3g} on a test input), so training would use wrong log-probs. Known "
            "transforms: final_logit_softcapping (Gemma), logits_scaling (Granite), "
            "logit_scale (Cohere).")


def load_model(recipe: Recipe, device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> tuple[Any, ModelInfo]:
    device = device or default_device()
    base = load_base(recipe, device, dtype=dtype)
    model = attach_lora(base, recipe)
    import bitsandbytes as bnb

    nq = sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    host = host_embedding(model)  # no parameter any more, still part of the model
    total += host.table.numel() if host is not None else 0
    info = ModelInfo(device, dtype or compute_dtype(recipe.model.compute_dtype, device),
                     base_weights_path(recipe), trainable, total, nq,
                     "frozen initial adapter" if recipe.lora.init_adapter else
                     "adapters disabled", **_trained_lora(model))
    return model, info


def _trained_lora(model: Any) -> dict[str, Any]:
    cfg = model.peft_config[POLICY_ADAPTER]
    return {"lora_r": int(cfg.r), "lora_alpha": float(cfg.lora_alpha),
            "lora_dropout": float(cfg.lora_dropout)}


def has_reference_adapter(model: Any) -> bool:
    return REFERENCE_ADAPTER in getattr(model, "peft_config", {})


@contextlib.contextmanager
def reference_mode(model: Any) -> Iterator[None]:
    """Run the frozen reference policy with the same weights; gradients and dropout off."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if has_reference_adapter(model):
                model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
                try:
                    yield
                finally:
                    model.set_adapter(POLICY_ADAPTER)
            else:
                with model.disable_adapter():
                    yield
    finally:
        model.train(was_training)


def hidden_size(model: Any) -> int:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(getattr(lm.config, "hidden_size", 4096))


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(model: Any, tokenizer: Any, out: Path,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """The policy adapter in peft's format (loadable with PeftModel.from_pretrained).
    `state`: the trainable tensors whole, by parameter name, when the model holds only shards
    of them (train.fsdp)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), selected_adapters=[POLICY_ADAPTER], state_dict=state)
    # save_pretrained puts non-default adapters in subfolders; only the policy is written.
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    cfg = out / "adapter_config.json"
    if cfg.exists():
        data = json.loads(cfg.read_text())
        data["inference_mode"] = True
        cfg.write_text(json.dumps(data, indent=2))


def load_trained(source: Any, device: torch.device | None = None,
                 quantize: bool = True) -> tuple[Any, Any]:
    """A trained adapter on its base, as in training (4-bit unless quantize=False).

    The policy adapter is active; `reference_mode` gives the run's reference (adapters
    disabled, or the frozen starting adapter when the run had one). A source without an adapter
    (a plain or merged model directory) gives that model alone, with no reference.
    """
    from transformers import AutoTokenizer

    device = device or default_device()
    recipe = source.recipe
    _verify_source(source)
    base = load_base(recipe, device, quantize=quantize)
    adapter_dir = getattr(source, "adapter_dir", None)
    model = base if adapter_dir is None else _with_trained_adapter(base, source)
    model.eval()
    check_lean_head(model, compute_dtype(recipe.model.compute_dtype, device))
    try:
        tok = AutoTokenizer.from_pretrained(str(adapter_dir or source.base_path))
    except Exception:
        tok = load_tokenizer(recipe)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _verify_source(source: Any) -> None:
    """The adapter's files against their record (a checkpoint's checkpoint.json, a run's final
    adapter manifest) before the base is loaded: a damaged file is one message naming it, not
    numbers computed with it. The source (rundir.TrainedSource, from `open_trained`) knows
    its record and verifies itself, once."""
    verify = getattr(source, "verify", None)
    if verify is not None:
        verify()


def _with_trained_adapter(base: Any, source: Any) -> Any:
    """The source's adapter on `base` (active), and the run's starting adapter as reference."""
    from peft import PeftModel

    recipe = source.recipe
    try:
        model = PeftModel.from_pretrained(base, str(source.adapter_dir),
                                          adapter_name=POLICY_ADAPTER, is_trainable=False)
        if recipe.lora.init_adapter:
            model.load_adapter(recipe.resolve_path(recipe.lora.init_adapter),
                               adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            model.set_adapter(POLICY_ADAPTER)
    except Exception as e:
        raise ModelError(f"Cannot load the adapter in '{source.adapter_dir}' onto "
                         f"'{source.base_path}': {type(e).__name__}: {e}") from None
    return model
