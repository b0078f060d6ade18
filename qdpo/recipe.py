"""The recipe: a typed, validated description of one run.

Every key has a default and help text here, so `qdpo init`, the README's reference and the
error messages all come from one place. This module never imports torch: validating a recipe
must be instant and work on a machine without a GPU stack.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from qdpo.errors import RecipeError

# Kept here (not imported from losses.py) so that recipe validation needs no torch; a test
# checks it matches the registry in qdpo.losses.
LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "aot", "aot_unpaired", "discopop", "sigmoid_norm", "dpop", "sft",
    "simpo", "orpo",
)
REFERENCE_FREE_LOSSES = ("simpo", "orpo", "sft")
COLUMN_FIELDS = ("prompt", "chosen", "rejected", "weight", "responses", "scores", "system")
# Names other tools use, for the "did you mean" hint.
_LOSS_ALIASES = {"dpo": "sigmoid", "cdpo": "sigmoid", "slic": "hinge", "rso": "hinge",
                 "nll": "sft", "rpo": "sigmoid", "exo": "exo_pair", "nca": "nca_pair",
                 "bco": "bco_pair", "sppo": "sppo_hard", "smaug": "dpop", "dpo_positive": "dpop"}


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None, **kw: Any) -> Any:
    meta = {"help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSource:
    """One data source: a local file (or glob, or directory) or a hub dataset id."""

    path: str = _f(help="Local .jsonl/.json/.parquet/.csv file (or glob), or a Hugging Face hub "
                        "dataset id")
    split: str = _f("train", help="Split to read (hub datasets and local files alike)")
    name: str | None = _f(None, help="Hub dataset configuration name")
    revision: str | None = _f(None, help="Hub dataset revision")
    columns: dict[str, str] = _f(factory=dict, help="Column mapping for this source only "
                                                    "(overrides data.columns)")
    weight: float = _f(1.0, help="Scale this source's share: 0.5 takes half its pairs, 2 "
                                 "repeats each twice")
    samples: int | None = _f(None, help="Take exactly this many pairs from this source "
                                        "(sampled with train.seed)")


@dataclass
class ModelConfig:
    name_or_path: str = _f("", help="Hub model id or local directory of a causal LM")
    revision: str | None = _f(None, help="Hub revision (branch, tag or commit)")
    tokenizer: str | None = _f(None, help="Tokenizer id/dir if not the model's own")
    trust_remote_code: bool = _f(False, help="Allow the model repo's own Python code to run")
    quantization: Literal["nf4", "fp4", "none"] = _f(
        "nf4", help="4-bit quantization of the frozen base (bitsandbytes), or none")
    double_quant: bool = _f(True, help="Quantize the quantization constants too (saves ~0.4 "
                                       "bit/param)")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", help="auto = bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2",
                                 "flex_attention"] = _f(
        "auto", help="Attention kernel; auto = sdpa (measured faster end to end than "
                     "FlexAttention on CUDA)")
    gradient_checkpointing: bool = _f(True, help="Recompute activations in backward "
                                                 "(non-reentrant); needed for 7-8B in 24 GB")
    offload_activations: bool = _f(False, help="With checkpointing, keep each layer's saved "
                                               "input in pinned CPU memory: 256 KiB less GPU "
                                               "memory per token on an 8B model")
    embeddings_on_host: bool = _f(False, help="Keep the frozen input embedding table in CPU "
                                              "memory; only the looked-up rows go to the "
                                              "GPU: 1 GiB less on Llama-3.1-8B (no effect on "
                                              "models whose head shares the table)")
    random_init: bool = _f(False, help="Build the model from its config with random weights "
                                       "(seeded by train.seed): for tests, demos and benchmarks")


@dataclass
class LoraConfig:
    r: int = _f(16, help="LoRA rank")
    alpha: float = _f(32.0, help="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) "
                               "with rslora)")
    dropout: float = _f(0.05, help="Dropout on the LoRA input")
    target_modules: str | list[str] = _f(
        "all-linear", help="'all-linear' (every linear layer but the output head) or a list of "
                           "module names")
    use_rslora: bool = _f(False, help="Rank-stabilised LoRA scaling alpha / sqrt(r)")
    init_adapter: str | None = _f(
        None, help="Start from this existing adapter (e.g. an SFT adapter); it also becomes the "
                   "frozen reference")


@dataclass
class DataConfig:
    train: list[DataSource] = _f(factory=list, help="Training sources: a path/id, or a list of "
                                                    "them, or mappings with path/split/name")
    format: Literal["auto", "standard", "conversational"] = _f(
        "auto", help="standard = prompt/chosen/rejected strings; conversational = message lists; "
                     "auto = detect per data set")
    columns: dict[str, str] = _f(factory=dict, help="Map qdpo's fields (prompt, chosen, "
                                                    "rejected) to your column names")
    chat_template: str = _f(
        "auto", help="auto = the tokenizer's template (required for conversational data, used "
                     "for standard data when present); none; chatml; llama3; zephyr; or a Jinja "
                     "template string")
    system_prompt: str | None = _f(None, help="System message put before every prompt (without "
                                              "a chat template: its text and a newline)")
    max_length: int = _f(1024, help="Max tokens of prompt + one response")
    max_prompt_length: int = _f(512, help="Max prompt tokens; longer prompts keep their "
                                          "template head and their end")
    max_pairs: int | None = _f(None, help="Use at most this many training pairs (after "
                                          "shuffling with train.seed)")
    strict: bool = _f(False, help="Stop at the first bad row instead of skipping and counting it")
    pair_selection: Literal["best_vs_worst", "best_vs_random", "best_vs_second"] = _f(
        "best_vs_worst", help="Rows with several scored responses (UltraFeedback-style): which "
                              "worse response becomes 'rejected'")
    num_proc: int | None = _f(None, help="Tokenization processes (default: one per core for "
                                         "large data sets)")


@dataclass
class LossConfig:
    type: str | list[str] = _f("sigmoid", help="Loss name, or a list combined with weights: "
                                               + ", ".join(LOSS_TYPES))
    weights: list[float] | None = _f(None, help="Weight of each loss when type is a list")
    beta: float = _f(0.1, help="Temperature of the implicit reward (DPO beta)")
    label_smoothing: float = _f(0.0, help="cDPO / robust label noise epsilon, in [0, 0.5)")
    simpo_gamma: float = _f(0.5, help="SimPO target reward margin")
    orpo_lambda: float = _f(0.1, help="ORPO weight of the odds-ratio term")
    dpop_lambda: float = _f(50.0, help="DPO-Positive penalty weight")
    ld_alpha: float | None = _f(None, help="LD-DPO length-desensitisation alpha in [0, 1]")
    discopop_tau: float = _f(0.05, help="DiscoPOP temperature")


@dataclass
class TrainConfig:
    pairs_per_step: int = _f(8, help="Preference pairs per optimizer step (the batch size)")
    micro_batch_pairs: int = _f(2, help="Pairs per forward/backward (gradient accumulation "
                                        "fills the step)")
    max_tokens: int | Literal["auto"] | None = _f(
        None, help="Token budget per micro-batch (prompt counted once with shared_prefix); "
                   "replaces micro_batch_pairs; auto = the largest that fits the GPU (qdpo plan)")
    layout: Literal["auto", "padded", "packed", "shared_prefix"] = _f(
        "auto", help="How pairs are laid out in rows: auto picks the fastest the attention "
                     "supports; padded = chosen and rejected rows padded (the fallback)")
    reference: Literal["auto", "online", "precompute"] = _f(
        "auto", help="Reference log-probs every step (online) or once before training, cached "
                     "on disk (precompute); auto = precompute")
    epochs: float = _f(1.0, help="Passes over the training pairs (ignored when max_steps is set)")
    max_steps: int | None = _f(None, help="Stop after this many optimizer steps")
    learning_rate: float = _f(5e-6, help="Peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = _f(
        "cosine", help="Decay after warmup")
    warmup_ratio: float = _f(0.1, help="Fraction of steps spent warming up linearly")
    warmup_steps: int | None = _f(None, help="Warmup steps (overrides warmup_ratio)")
    optimizer: Literal["adamw", "paged_adamw_8bit", "adamw_8bit"] = _f(
        "adamw", help="torch AdamW, or bitsandbytes 8-bit AdamW (paged on CUDA)")
    weight_decay: float = _f(0.0, help="AdamW weight decay")
    adam_beta1: float = _f(0.9, help="AdamW beta1")
    adam_beta2: float = _f(0.999, help="AdamW beta2")
    max_grad_norm: float = _f(1.0, help="Clip the gradient norm to this (0 = off)")
    seed: int = _f(42, help="Seed for data order, LoRA init and random_init models")
    log_every_steps: int = _f(1, help="Write metrics every N optimizer steps")
    compile: bool = _f(False, help="torch.compile each decoder layer: faster steps after ~20 s "
                                   "of compiling (on an 8B model 1.2x at 8k tokens per "
                                   "micro-batch, 2x at 2k); worth it for runs of 100+ steps")
    fsdp: bool = _f(False, help="Under torchrun, shard the 4-bit base, the adapters and the "
                                "optimizer state across the ranks (FSDP2), for models that do "
                                "not fit one GPU; needs optimizer adamw")


@dataclass
class EvalConfig:
    data: list[DataSource] = _f(factory=list, help="Held-out sources (same forms as data.train)")
    split_fraction: float = _f(0.0, help="Hold out this fraction of the training pairs when no "
                                         "eval data is given")
    every_steps: int = _f(0, help="Evaluate every N optimizer steps (0 = only at the end)")
    at_start: bool = _f(False, help="Also evaluate before the first step (a baseline to compare "
                                    "with)")
    max_pairs: int | None = _f(None, help="Evaluate on at most this many pairs")
    micro_batch_pairs: int | None = _f(None, help="Pairs per eval forward (default: 2x train)")
    sample_prompts: list[str] = _f(factory=list, help="Prompts the policy answers (greedy) at "
                                                      "every eval, beside the base's answers, "
                                                      "in samples.jsonl: texts, or .jsonl/.txt "
                                                      "files of prompts")
    sample_max_new_tokens: int = _f(48, help="Longest sample answer in tokens")


@dataclass
class OutputConfig:
    dir: str = _f("", help="Run directory (default runs/<recipe file name>)")
    save_every_steps: int = _f(0, help="Save a checkpoint every N optimizer steps (0 = only at "
                                       "the end)")
    keep_last: int = _f(2, help="Checkpoints to keep on disk")
    tensorboard: bool = _f(False, help="Also write TensorBoard event files (needs tensorboard)")
    wandb: str | None = _f(None, help="Also log to Weights & Biases under this project (needs "
                                      "wandb; WANDB_MODE=offline works without network)")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # Where the recipe came from: relative input paths are looked up next to it first.
    base_dir: str = field(default="", metadata={"help": "", "internal": True})

    @classmethod
    def for_adapter(cls, base_model: str) -> "Recipe":
        """The defaults around a bare peft adapter's base model (it came with no recipe): what
        loading, merging and chatting need. Not a training recipe: it names no data."""
        return cls(model=ModelConfig(name_or_path=base_model))

    # -- conveniences used by the rest of qdpo -------------------------------------------
    @property
    def loss_types(self) -> list[str]:
        return [self.loss.type] if isinstance(self.loss.type, str) else list(self.loss.type)

    @property
    def needs_reference(self) -> bool:
        return any(t not in REFERENCE_FREE_LOSSES for t in self.loss_types)

    def resolve_path(self, p: str) -> str:
        """A relative input path, looked up next to the recipe file first, then in the cwd."""
        path = Path(p).expanduser()
        if path.is_absolute():
            return str(path)
        if self.base_dir:
            cand = Path(self.base_dir) / path
            if cand.exists() or any(ch in p for ch in "*?[") and cand.parent.exists():
                return str(cand)
        return str(path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir", None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name != "base_dir"}


# ---------------------------------------------------------------------------------------
# Coercion: plain YAML values -> the declared types, with messages that name the key.
# ---------------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}
        return f"a list of {plural[item]}" if item in plural else f"a list of {_type_name(item)}"
    if origin is dict:  # data.columns and a source's columns: names to names
        return "a mapping of field names to column names"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping" if tp is not DataSource else "a path/id or a mapping with path"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class _Bad(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (a field's annotation), or _Bad."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        if isinstance(value, str) and value.lower() in allowed:
            return value.lower()
        raise _Bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list) and inner is not DataSource:
            raise _Bad
        items = value if isinstance(value, list) else [value]  # one source may stand alone
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        # scalars only: str() of a list would spell out every value an alias bomb shares
        if not isinstance(value, dict) or not all(
                isinstance(v, (str, int, float)) for v in value.values()):
            raise _Bad
        return {str(k): str(v) for k, v in value.items()}
    if tp is DataSource and isinstance(value, str):
        return DataSource(path=value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Bad
        return _build(tp, value, key)
    return _coerce_scalar(value, tp)


def _coerce_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _Bad
    # Try the more specific alternatives first (a string stays a string for str | list).
    for a in sorted((a for a in args if a is not type(None)),
                    key=lambda a: 0 if a is str and isinstance(value, str) else 1):
        try:
            return _coerce(value, a, key)
        except (_Bad, RecipeError):
            continue
    raise _Bad


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce_scalar(value: Any, tp: Any) -> Any:
    """bool, int, float or str from YAML values and `key=value` override strings."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise _Bad
    if isinstance(value, bool):  # never a number
        raise _Bad
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value.replace("_", ""))
            except ValueError:
                raise _Bad from None
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        raise _Bad
    if tp is float:
        try:
            f = float(value) if isinstance(value, (str, int, float)) else None
        except (ValueError, OverflowError):
            raise _Bad from None
        if f is not None and math.isfinite(f):
            return f
        raise _Bad
    if tp is str and isinstance(value, (str, int, float)):
        return str(value)
    raise _Bad


# What other tools call a key or a value, for did-you-mean hints.
KEY_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
               "target": "target_modules", "lr": "learning_rate", "batch_size": "pairs_per_step",
               "per_device_train_batch_size": "micro_batch_pairs",
               "gradient_accumulation_steps": "pairs_per_step", "max_seq_length": "max_length",
               "model": "name_or_path", "model_name": "name_or_path", "loss_type": "type",
               "optim": "optimizer", "num_train_epochs": "epochs", "warmup": "warmup_ratio"}
VALUE_ALIASES = {"adam8bit": "adamw_8bit", "adam_8bit": "adamw_8bit", "adamw8bit": "adamw_8bit",
                 "adamw_bnb_8bit": "adamw_8bit", "paged_adamw": "paged_adamw_8bit",
                 "paged_adam_8bit": "paged_adamw_8bit", "adam": "adamw", "adamw_torch": "adamw",
                 "bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16",
                 "flash_attention": "flash_attention_2", "flex": "flex_attention",
                 "cos": "cosine"}


def _quoted(value: Any) -> str:
    """A user's value as a message quotes it: its repr, cut to a few lines. A 2 MB string,
    or a few lines of YAML aliases that nest a billion values, must not be spelt out whole
    (building that message alone would take minutes and gigabytes)."""
    text = _REPR.repr(value)  # visits a bounded number of values, however deep the nesting
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."


MAX_QUOTED = 300
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 200, 200, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def _key_text(key: Any) -> str:
    """A key as the user wrote it, cut like a value when it is absurdly long."""
    text = str(key)
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."


def _unknown_key(key: str, name: str, allowed: list[str]) -> RecipeError:
    alias = KEY_ALIASES.get(name.lower())
    close = [alias] if alias in allowed else difflib.get_close_matches(name, allowed, n=1,
                                                                       cutoff=0.6)
    hint = f" Did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?" \
        if close else ""
    return RecipeError(f"Unknown recipe key '{_key_text(key)}'.{hint} Allowed here: "
                       f"{', '.join(allowed)}.")


def _value_hint(value: Any, tp: Any) -> str:
    """' (did you mean X?)' for a choice written another tool's way or misspelt."""
    allowed = [a for t in (typing.get_args(tp) if typing.get_origin(tp) in (Union,
               types.UnionType) else (tp,)) if typing.get_origin(t) is Literal
               for a in typing.get_args(t) if isinstance(a, str)]
    if not allowed or not isinstance(value, str):
        return ""
    alias = VALUE_ALIASES.get(value.lower())
    close = [alias] if alias in allowed else difflib.get_close_matches(value.lower(), allowed,
                                                                       n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key, str(name), list(fields))
        tp = hints[name]
        try:
            kwargs[name] = _coerce(value, tp, key)
        except _Bad:
            raise RecipeError(
                f"Recipe key '{key}' has the value {_quoted(value)}{_value_hint(value, tp)}, "
                f"but it must be {_type_name(tp)}.") from None
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without default (DataSource.path)
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in kwargs]
        raise RecipeError(f"Recipe key '{prefix}' needs {', '.join(missing) or str(e)}.") from None


# ---------------------------------------------------------------------------------------
# Overrides and validation
# ---------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"Override '{_key_text(text)}' is not of the form key.sub=value "
                          "(e.g. train.learning_rate=1e-5).")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError(f"Override '{_key_text(text)}' has no key before '='.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(raw: dict[str, Any], text: str) -> None:
    parts, value = parse_override(text)
    node: dict[str, Any] = raw
    cls: Any = Recipe
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        dotted = ".".join(parts[: i + 1])
        if part not in fields:
            raise _unknown_key(dotted, part, list(fields))
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            if typing.get_origin(tp) is dict:  # data.columns.prompt=question
                sub = node.get(part)
                if not isinstance(sub, dict):  # absent, or a bad value the override replaces
                    sub = {}
                node[part] = sub
                sub[".".join(parts[i + 1:])] = value
                return
            raise RecipeError(f"Override key '{'.'.join(parts)}': '{dotted}' is not a section.")
        sub = node.get(part)
        if not isinstance(sub, dict):
            sub = {}
            node[part] = sub
        node, cls = sub, tp


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise RecipeError(f"Recipe key '{key}' has the value {_quoted(value)}; {allowed}.")


def validate(r: Recipe) -> Recipe:
    """Checks that need more than a type: ranges and combinations, section by section."""
    for check in (_validate_model, _validate_data, _validate_loss, _validate_train,
                  _validate_eval_and_output):
        check(r)
    return r


# Bounds beyond which a value is a typo or cannot finish (and would fail deep inside torch)
MAX_LORA_RANK = 4096
MAX_BETA = 1000.0
MAX_PAIRS_PER_STEP = 1_000_000
MAX_STEPS = 10_000_000
MAX_EPOCHS = 10_000
# A data source repeated by its weight or samples: more pairs than this cannot be tokenized in
# any sensible time (a weight of 1e300 or samples of 1e14 ran out of memory)
MAX_SOURCE_PAIRS = 5_000_000
MAX_SOURCE_WEIGHT = 1000.0
# Values a recipe may hold once YAML aliases are expanded: a real recipe holds a few hundred
MAX_RECIPE_VALUES = 100_000


def _validate_model(r: Recipe) -> None:
    _check(bool(r.model.name_or_path), "model.name_or_path", r.model.name_or_path,
           "set it to a hub model id or a local model directory")
    _check(r.lora.r >= 1, "lora.r", r.lora.r, "it must be a positive integer")
    _check(r.lora.r <= MAX_LORA_RANK, "lora.r", r.lora.r,
           f"it must be at most {MAX_LORA_RANK} (ranks of 8-64 are usual)")
    _check(0 < r.lora.alpha < math.inf, "lora.alpha", r.lora.alpha, "it must be > 0 and finite")
    _check(0 <= r.lora.dropout < 1, "lora.dropout", r.lora.dropout, "it must be in [0, 1)")
    _check(r.model.gradient_checkpointing or not r.model.offload_activations,
           "model.offload_activations", r.model.offload_activations,
           "it offloads what gradient checkpointing saves: set model.gradient_checkpointing: "
           "true too, or leave offload_activations false")


def _validate_data(r: Recipe) -> None:
    _check(bool(r.data.train), "data.train", r.data.train,
           "give at least one training source (a file path or a hub dataset id)")
    for key, cols in [("data.columns", r.data.columns)] + [
            (f"data.train[{i}].columns", s.columns) for i, s in enumerate(r.data.train)] + [
            (f"eval.data[{i}].columns", s.columns) for i, s in enumerate(r.eval.data)]:
        for k in cols:
            _check(k in COLUMN_FIELDS, f"{key}.{k}", k,
                   f"the fields that can be mapped are {', '.join(COLUMN_FIELDS)}")
    for i, src in enumerate(r.data.train + r.eval.data):
        name = f"data source {_quoted(src.path)}"
        _check(0 < src.weight <= MAX_SOURCE_WEIGHT, f"{name} weight", src.weight,
               f"it must be > 0 and at most {MAX_SOURCE_WEIGHT:,g} (2 repeats each pair twice; "
               f"use samples to take an exact number of pairs)")
        _check(src.samples is None or 1 <= src.samples <= MAX_SOURCE_PAIRS, f"{name} samples",
               src.samples, f"it must be between 1 and {MAX_SOURCE_PAIRS:,} (more pairs than "
                            "any run tokenizes), or null")
    _check(r.data.num_proc is None or r.data.num_proc >= 1, "data.num_proc", r.data.num_proc,
           "it must be >= 1 or null")
    _check(r.data.max_length >= 2, "data.max_length", r.data.max_length, "it must be >= 2")
    _check(1 <= r.data.max_prompt_length < r.data.max_length, "data.max_prompt_length",
           r.data.max_prompt_length, f"it must be >= 1 and below data.max_length "
                                     f"({r.data.max_length}) to leave room for the response")
    _check(r.data.max_pairs is None or r.data.max_pairs >= 1, "data.max_pairs",
           r.data.max_pairs, "it must be >= 1 or null")
    ct = r.data.chat_template
    _check(ct in ("auto", "none", "chatml", "llama3", "zephyr") or "{{" in ct or "{%" in ct,
           "data.chat_template", ct, "use auto, none, chatml, llama3, zephyr, or a Jinja "
                                     "template string")


def _validate_loss(r: Recipe) -> None:
    types_ = r.loss_types
    _check(len(types_) >= 1, "loss.type", r.loss.type, "give at least one loss name")
    for t in types_:
        if t not in LOSS_TYPES:
            close = [_LOSS_ALIASES[t.lower()]] if t.lower() in _LOSS_ALIASES else \
                difflib.get_close_matches(t, LOSS_TYPES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"Recipe key 'loss.type' has the value {_quoted(t)}{hint}; "
                              f"allowed: {', '.join(LOSS_TYPES)}.")
    if r.loss.weights is not None:
        _check(len(r.loss.weights) == len(types_), "loss.weights", r.loss.weights,
               f"it needs one weight per loss in loss.type ({len(types_)})")
        _check(all(0 <= w < math.inf for w in r.loss.weights) and sum(r.loss.weights) > 0,
               "loss.weights", r.loss.weights, "each must be >= 0 and finite, not all 0")
    _check(0 < r.loss.beta <= MAX_BETA, "loss.beta", r.loss.beta,
           f"it must be > 0 and at most {MAX_BETA:g} (0.01-1 are usual; a huge beta makes "
           "every loss non-finite)")
    for key in ("simpo_gamma", "orpo_lambda", "dpop_lambda", "discopop_tau"):
        value = getattr(r.loss, key)
        _check(0 <= value < math.inf, f"loss.{key}", value, "it must be >= 0 and finite")
    _check(0 <= r.loss.label_smoothing < 0.5, "loss.label_smoothing", r.loss.label_smoothing,
           "it must be in [0, 0.5)")
    _check(r.loss.ld_alpha is None or 0 <= r.loss.ld_alpha <= 1, "loss.ld_alpha",
           r.loss.ld_alpha, "it must be in [0, 1] or null")


def _validate_train(r: Recipe) -> None:
    t = r.train
    _check(1 <= t.pairs_per_step <= MAX_PAIRS_PER_STEP, "train.pairs_per_step",
           t.pairs_per_step, f"it must be between 1 and {MAX_PAIRS_PER_STEP:,}")
    _check(1 <= t.micro_batch_pairs <= t.pairs_per_step, "train.micro_batch_pairs",
           t.micro_batch_pairs, f"it must be between 1 and train.pairs_per_step "
                                f"({t.pairs_per_step})")
    sorting = [x for x in r.loss_types if x in ("aot", "aot_unpaired")]
    if sorting and (t.micro_batch_pairs != t.pairs_per_step or t.max_tokens):
        raise RecipeError(
            f"loss.type {sorting[0]} sorts log-ratios across the pairs of a batch, so splitting "
            f"an optimizer step into micro-batches would change what it optimises. Set "
            f"train.micro_batch_pairs to train.pairs_per_step ({t.pairs_per_step}) and leave "
            f"train.max_tokens unset (now micro_batch_pairs {t.micro_batch_pairs}, max_tokens "
            f"{t.max_tokens}).")
    _check(0 < t.epochs <= MAX_EPOCHS, "train.epochs", t.epochs,
           f"it must be > 0 and at most {MAX_EPOCHS:,}")
    _check(t.max_steps is None or 1 <= t.max_steps <= MAX_STEPS, "train.max_steps",
           t.max_steps, f"it must be between 1 and {MAX_STEPS:,} (more than any run "
                        "finishes), or null")
    _check(0 < t.learning_rate <= 1, "train.learning_rate", t.learning_rate,
           "it must be > 0 and at most 1 (1e-6 to 1e-4 are usual for LoRA DPO)")
    _check(0 <= t.weight_decay < math.inf, "train.weight_decay", t.weight_decay,
           "it must be >= 0 and finite")
    for key in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(t, key) < 1, f"train.{key}", getattr(t, key), "it must be in [0, 1)")
    _check(0 <= t.seed < 2**63, "train.seed", t.seed, "it must be between 0 and 2**63 - 1")
    _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "it must be in [0, 1)")
    _check(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps,
           "it must be >= 0")
    _check(0 <= t.max_grad_norm < math.inf, "train.max_grad_norm", t.max_grad_norm,
           "it must be >= 0 and finite (0 = off)")
    _check(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, "it must be >= 1")
    _check(t.max_tokens in (None, "auto") or t.max_tokens >= 16, "train.max_tokens",
           t.max_tokens, "it must be >= 16, auto or null")
    if t.fsdp:
        _check(t.optimizer == "adamw", "train.optimizer", t.optimizer,
               "with train.fsdp: true it must be adamw (bitsandbytes' 8-bit optimizers cannot "
               "update sharded tensors; AdamW's state is sharded across the ranks instead)")
        _check(not t.compile, "train.compile", t.compile,
               "train.fsdp and train.compile together are untested: set one of them false")
        _check(not r.model.offload_activations, "model.offload_activations",
               r.model.offload_activations,
               "train.fsdp and offloaded activations together are untested: set one false")
        _check(not r.model.embeddings_on_host, "model.embeddings_on_host",
               r.model.embeddings_on_host,
               "train.fsdp keeps the input embeddings whole on every rank's device, and the two "
               "together are untested: set one of them false")


def _validate_eval_and_output(r: Recipe) -> None:
    _check(r.eval.max_pairs is None or r.eval.max_pairs >= 1, "eval.max_pairs",
           r.eval.max_pairs, "it must be >= 1 or null")
    _check(r.eval.micro_batch_pairs is None or r.eval.micro_batch_pairs >= 1,
           "eval.micro_batch_pairs", r.eval.micro_batch_pairs, "it must be >= 1 or null")
    _check(0 <= r.eval.split_fraction <= 0.5, "eval.split_fraction", r.eval.split_fraction,
           "it must be in [0, 0.5]: the rest of the pairs train")
    _check(r.eval.every_steps >= 0, "eval.every_steps", r.eval.every_steps, "it must be >= 0")
    _check(r.eval.sample_max_new_tokens >= 1, "eval.sample_max_new_tokens",
           r.eval.sample_max_new_tokens, "it must be >= 1")
    _check(r.output.save_every_steps >= 0, "output.save_every_steps", r.output.save_every_steps,
           "it must be >= 0")
    _check(r.output.keep_last >= 1, "output.keep_last", r.output.keep_last, "it must be >= 1")


def recipe_from_dict(raw: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = (),
                     base_dir: str = "") -> Recipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError("A recipe must be a YAML mapping with sections such as model:, data:.")
    raw = copy.deepcopy(raw)  # overrides must not write into the caller's dicts
    for o in overrides:
        apply_override(raw, o)
    _refuse_alias_bombs(raw)
    for section, value in raw.items():
        if section not in SECTIONS:
            raise _unknown_key(str(section), str(section), list(SECTIONS))
        if value is not None and not isinstance(value, dict):
            raise RecipeError(f"Recipe section '{section}' must be a mapping of keys, "
                              f"not {_quoted(value)}.")
    r = _build(Recipe, {k: v or {} for k, v in raw.items()}, "")
    r.base_dir = base_dir
    return validate(r)


class _SelfReference(Exception):
    pass


def _expanded_size(value: Any, memo: dict[int, int], active: set[int]) -> int:
    """How many values `value` holds with YAML aliases spelt out: a list or mapping that an
    alias shares counts at every place it appears, yet each is visited once (`memo`), so this
    is instant on a few lines that nest a billion values. _SelfReference for an alias inside
    its own anchor."""
    if not isinstance(value, (list, dict)):
        return 1
    key = id(value)
    if key in memo:
        return memo[key]
    if key in active:
        raise _SelfReference
    active.add(key)
    items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
    memo[key] = 1 + sum(_expanded_size(x, memo, active) for x in items)
    active.discard(key)
    return memo[key]


def _refuse_alias_bombs(raw: dict[str, Any]) -> None:
    """A recipe whose YAML aliases (*name) expand to more values than any recipe holds, or
    refer to themselves, is refused here, naming the key, before anything walks or quotes it
    (every step after this may then treat the values as plain, small data)."""
    memo: dict[int, int] = {}
    for section, value in raw.items():
        entries = value.items() if isinstance(value, dict) else [(None, value)]
        for name, sub in entries:
            key = _key_text(section if name is None else f"{section}.{name}")
            try:
                n = _expanded_size(sub, memo, set())
            except _SelfReference:
                raise RecipeError(f"Recipe key '{key}' holds a YAML alias (*name) inside its "
                                  "own anchor (&name), a value without end: write the values "
                                  "out.") from None
            if n > MAX_RECIPE_VALUES:
                raise RecipeError(
                    f"Recipe key '{key}' expands to {n:,} values through YAML aliases "
                    f"(*name), more than the {MAX_RECIPE_VALUES:,} any recipe holds: write "
                    "the values out instead of nesting aliases.")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML where a key given twice in one mapping is an error, not a silent replacement (a
    second `train:` block would otherwise reset the first one's keys to defaults)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys given here
                continue  # override the merged ones, as YAML means them to
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(f"Recipe key '{_key_text(key)}' is given twice, at lines "
                                  f"{seen[key]} and {line}: keep one (YAML would silently "
                                  "use the last).")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"Recipe file '{path}' does not exist. Write one with `qdpo init "
                          f"{path}` or pass the path of an existing YAML recipe.")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"Recipe file '{path}' is not valid YAML{where}: "
                          f"{getattr(e, 'problem', e)}.") from None
    except (UnicodeDecodeError, OSError) as e:
        raise RecipeError(f"Recipe file '{path}' cannot be read: {e}.") from None
    except RecursionError:
        raise RecipeError(f"Recipe file '{path}' nests lists or mappings too deep to be a "
                          "recipe.") from None
    except (ValueError, TypeError) as e:  # a 5000-digit number, a list used as a key
        raise RecipeError(f"Recipe file '{path}' holds a value YAML cannot turn into a "
                          f"recipe value: {str(e)[:200]}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe file '{path}' must hold a YAML mapping with sections such as "
                          "model:, data:, train: (it holds a "
                          f"{type(raw).__name__}).")
    try:
        r = recipe_from_dict(raw, overrides, base_dir=str(p.resolve().parent))
    except RecursionError:
        raise RecipeError(f"Recipe file '{path}' nests lists or mappings too deep to be a "
                          "recipe.") from None
    if not r.output.dir:
        r.output.dir = str(Path("runs") / p.stem)
    return r


# ---------------------------------------------------------------------------------------
# Documentation generated from the schema: `qdpo init` and the README's reference.
# ---------------------------------------------------------------------------------------

def _yaml_value(v: Any) -> str:
    if dataclasses.is_dataclass(v):
        v = dataclasses.asdict(v)
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix(
        "\n...").removesuffix("...").strip()


def reference_rows() -> list[tuple[str, str, str]]:
    """(key, default, help) for every key, in schema order."""
    rows = []
    for section, cls in SECTIONS.items():
        cls = _hints(Recipe)[section]
        inst = cls()
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", _yaml_value(getattr(inst, f.name)),
                         f.metadata.get("help", "")))
    return rows


# Splits of well-known preference sets on the hub (train, held-out), so a starter recipe that
# names one works as written; None: no held-out split, a fraction of train is held out.
KNOWN_SPLITS: dict[str, tuple[str, str | None]] = {
    "HuggingFaceH4/ultrafeedback_binarized": ("train_prefs", "test_prefs"),
    "argilla/ultrafeedback-binarized-preferences-cleaned": ("train", None),
    "Anthropic/hh-rlhf": ("train", "test"),
    "Intel/orca_dpo_pairs": ("train", None),
    "argilla/distilabel-intel-orca-dpo-pairs": ("train", None),
    "trl-lib/ultrafeedback_binarized": ("train", "test"),
    "mlabonne/orpo-dpo-mix-40k": ("train", None),
}


def starter_values(model: str, data: str) -> dict[str, dict[str, Any]]:
    """What `qdpo init` fills in: the data set's real splits and a held-out set, periodic
    checkpoints, and the paged 8-bit optimizer the 24 GB recipes use."""
    train_split, eval_split = KNOWN_SPLITS.get(data, ("train", None))
    held_out: dict[str, Any] = ({"data": [{"path": data, "split": eval_split}], "max_pairs": 500}
                                if eval_split else {"split_fraction": 0.02})
    return {"model": {"name_or_path": model},
            "data": {"train": [{"path": data, "split": train_split}]},
            "train": {"optimizer": "paged_adamw_8bit"},
            "eval": {**held_out, "every_steps": 200},
            "output": {"save_every_steps": 200, "keep_last": 2}}


def starter_yaml(values: dict[str, dict[str, Any]] | None = None) -> str:
    """A commented recipe with every key, its default (or the given value) and its help."""
    values = values or {}
    lines = ["# qdpo recipe. Every key is optional except model.name_or_path and data.train;",
             "# a value that is not the default says so in its comment. Override any key on",
             "# the command line:",
             "#   qdpo train this.yaml train.learning_rate=1e-5 lora.r=32", ""]
    for section in SECTIONS:
        cls = _hints(Recipe)[section]
        inst = cls()
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = getattr(inst, f.name)
            v = values.get(section, {}).get(f.name, default)
            note = "" if v == default else f" (default: {_yaml_value(default)})"
            lines.append(f"  # {f.metadata.get('help', '')}{note}")
            lines.append(f"  {f.name}: {_yaml_value(v)}")
        lines.append("")
    return "\n".join(lines)
