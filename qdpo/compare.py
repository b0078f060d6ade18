"""`qdpo bench --against trl`: TRL's DPOTrainer on the same pairs, model and settings.

Both sides get the same synthetic token pairs (each response ends with EOS, as TRL appends
it), the same architecture and random weights (built and quantized by the same code), the
same LoRA, optimizer, pairs per step, micro-batch size, learning rate, beta and gradient
checkpointing, on the same device in the same process. TRL computes the reference online with
the adapters disabled, as it does for a peft model. Tokens are counted the same way for both:
the real tokens of prompt+chosen plus prompt+rejected.

TRL is an optional extra (`pip install 'qdpo[compare]'`), pinned to the tested version.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from qdpo.data import PairTokens
from qdpo.errors import QdpoError
from qdpo.recipe import Recipe

TRL_TESTED = "1.16.0"
EOS, PAD = 2, 3  # synthetic token ids are drawn from 10 up, so these never collide

# qdpo's optimizer names -> transformers' `optim` names
OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit",
              "paged_adamw_8bit": "paged_adamw_8bit"}


def require_trl() -> Any:
    try:
        import trl
    except ImportError:
        raise QdpoError("--against trl needs TRL: pip install 'qdpo[compare]' (TRL "
                        f"{TRL_TESTED}, the tested version).") from None
    return trl


def with_eos(pairs: list[PairTokens]) -> list[PairTokens]:
    """The pairs as both tools train them: each response closed by EOS."""
    return [PairTokens(p.prompt_ids, p.chosen_ids + [EOS], p.rejected_ids + [EOS], p.weight)
            for p in pairs]


def _tokenizer(vocab_size: int) -> Any:
    """One word per token id ('t123'), so TRL's text pipeline reproduces the ids exactly. The
    special tokens are spelled so that no word contains them (added tokens match inside
    words), and there is no BOS, which qdpo's pairs do not have either."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab.update({"<unk>": 0, "<eos>": EOS, "<pad>": PAD})
    del vocab["t0"], vocab[f"t{EOS}"], vocab[f"t{PAD}"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def _rows(pairs: list[PairTokens]) -> list[dict[str, str]]:
    def text(ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    # TRL appends EOS itself; the leading space keeps prompt and response words apart
    return [{"prompt": text(p.prompt_ids), "chosen": " " + text(p.chosen_ids[:-1]),
             "rejected": " " + text(p.rejected_ids[:-1])} for p in pairs]


class _StepClock(TrainerCallback):
    """The wall time when the training loop starts and at the end of every optimizer step.

    TRL's time starts at the loop, after the trainer has built its optimizer and data loader,
    as qdpo's starts after its own set-up (`step_context`), so neither side's set-up counts."""

    def __init__(self, device: torch.device):
        self.device, self.begin, self.ends = device, 0.0, []

    def _now(self) -> float:
        from qdpo.device import synchronize

        synchronize(self.device)
        return time.monotonic()

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.begin = self._now()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(self._now())


class _SlotCounter:
    """Wraps TRL's collator: token slots (real tokens plus padding) and real tokens of every
    micro-batch, in the order training takes them."""

    def __init__(self, collate: Any):
        self.collate, self.slots, self.real = collate, 0, []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        self.slots += batch["input_ids"].numel()
        self.real.append(int(batch["attention_mask"].sum()))
        return batch


NO_PEAK = ("--match-memory needs TRL's peak memory, which only a CUDA device measures. On the "
           "CPU, set train.max_tokens yourself.")

# DPOTrainer's losses (TRL 1.16), under the names qdpo uses too
TRL_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")


def _loss_types(recipe: Recipe) -> tuple[str, ...]:
    kind = recipe.loss.type
    return (kind,) if isinstance(kind, str) else tuple(kind)


def _label_smoothing(recipe: Recipe) -> float:
    """The recipe's epsilon; exo_pair reads 0 as 1e-3 in qdpo, which TRL refuses as 0."""
    eps = recipe.loss.label_smoothing
    return eps or (1e-3 if "exo_pair" in _loss_types(recipe) else 0.0)


def measures_memory() -> bool:
    """--match-memory needs TRL's peak memory, which only CUDA measures."""
    return torch.cuda.is_available()


def check_comparable(recipe: Recipe) -> None:
    """Refuse, before either tool builds a model, a recipe TRL's DPOTrainer would run
    differently: another loss (a ratio of two different computations says nothing), or
    micro-batches that do not divide a step."""
    from qdpo.losses import Objective

    t = recipe.train
    if t.pairs_per_step % t.micro_batch_pairs:
        raise QdpoError("--against trl needs train.pairs_per_step to be a multiple of "
                        "train.micro_batch_pairs (TRL accumulates whole micro-batches).")
    missing = [k for k in _loss_types(recipe) if k not in TRL_LOSSES]
    if missing:
        raise QdpoError(f"--against trl: TRL's DPOTrainer has no '{missing[0]}' loss. Compare a "
                        f"loss both have ({', '.join(TRL_LOSSES)}), e.g. loss.type=sigmoid.")
    smoothed = [k for k in _loss_types(recipe) if k not in ("robust", "exo_pair")]
    if recipe.loss.label_smoothing and smoothed:
        raise QdpoError(f"--against trl: TRL's DPOTrainer applies label smoothing only to the "
                        f"robust and exo_pair losses, not to '{smoothed[0]}'. Set "
                        f"loss.label_smoothing=0 to compare.")
    if not Objective.from_config(recipe.loss).needs_reference:
        raise QdpoError("--against trl: this loss needs no reference, so qdpo skips the "
                        "reference pass that TRL's DPOTrainer always runs. Compare a loss with "
                        "a reference, e.g. loss.type=sigmoid.")


def _config(recipe: Recipe, pairs: list[PairTokens], steps: int, cuda: bool,
            dtype: torch.dtype, out_dir: str) -> Any:
    from trl import DPOConfig

    t, loss = recipe.train, recipe.loss
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                  for p in pairs)
    return DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=t.micro_batch_pairs,
        gradient_accumulation_steps=t.pairs_per_step // t.micro_batch_pairs, max_steps=steps,
        learning_rate=t.learning_rate, beta=loss.beta, max_length=longest + 1,
        loss_type=list(_loss_types(recipe)), loss_weights=loss.weights, ld_alpha=loss.ld_alpha,
        label_smoothing=_label_smoothing(recipe), discopop_tau=loss.discopop_tau,
        bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16,
        gradient_checkpointing=recipe.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        precompute_ref_log_probs=False, logging_strategy="no", report_to="none",
        save_strategy="no", optim=OPTIMIZERS[t.optimizer], dataloader_num_workers=0,
        seed=t.seed, use_cpu=not cuda, max_grad_norm=t.max_grad_norm or None,
        lr_scheduler_type="constant", disable_tqdm=True)  # the schedule costs no time


def run_trl(recipe: Recipe, config: Any, pairs: list[PairTokens], steps: int, warmup: int,
            device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """TRL's DPOTrainer for `steps` optimizer steps on `pairs` (which end with EOS)."""
    trl = require_trl()
    from datasets import Dataset
    from peft import LoraConfig

    from qdpo.device import memory_stats, reset_peak_memory
    from qdpo.model import random_quantized_base

    torch.manual_seed(recipe.train.seed)
    model = random_quantized_base(config, recipe, device)
    if recipe.model.quantization != "none":
        model.is_loaded_in_4bit = True  # what loading with a BitsAndBytesConfig sets
    lora = recipe.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                             task_type="CAUSAL_LM")
    clock = _StepClock(device)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = trl.DPOTrainer(
            model=model, ref_model=None, train_dataset=Dataset.from_list(_rows(pairs)),
            args=_config(recipe, pairs, steps, device.type == "cuda", dtype, out_dir),
            processing_class=_tokenizer(config.vocab_size), peft_config=peft_config,
            callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # it prints a metrics dict per log call
        counter = _SlotCounter(trainer.data_collator)
        trainer.data_collator = counter
        reset_peak_memory(device)
        trainer.train()
    mem = memory_stats(device)
    times = [b - a for a, b in zip([clock.begin] + clock.ends[:-1], clock.ends)]
    total = clock.ends[-1] - clock.begin if clock.ends else 0.0
    del trainer, model
    _free(device)
    accum = recipe.train.pairs_per_step // recipe.train.micro_batch_pairs
    tokens = [sum(counter.real[s * accum:(s + 1) * accum]) for s in range(len(times))]
    return {"times": times, "tokens": tokens, "total_s": total, "slots": counter.slots,
            "peak_alloc_gib": mem.get("mem/peak_alloc_gib"),
            "peak_reserved_gib": mem.get("mem/peak_reserved_gib"), "version": trl.__version__}


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trl_result(recipe: Recipe, shape: str | None, run: dict[str, Any], warmup: int,
               config: Any = None, pairs: list[PairTokens] | None = None) -> Any:
    """TRL's run as a BenchResult row: real tokens of its micro-batches (the attention mask),
    which are prompt+chosen plus prompt+rejected, as qdpo counts its own. Its model-FLOPs
    utilisation counts those tokens with the reference forward (online), as qdpo's does."""
    from qdpo.attention import kernel_for
    from qdpo.bench import HUB_SHAPES, BenchResult, flops_per_token, peak_flops

    pps = recipe.train.pairs_per_step
    times, tokens = run["times"], run["tokens"]
    if len(times) <= warmup:
        raise QdpoError(f"TRL ran {len(times)} steps, not more than --warmup ({warmup}).")
    steady_t, steady_tok = sum(times[warmup:]), sum(tokens[warmup:])
    real = sum(tokens)
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    peak = peak_flops(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    mfu = None
    if peak and config is not None and pairs:
        seq = sum(len(p.prompt_ids) + (len(p.chosen_ids) + len(p.rejected_ids)) / 2
                  for p in pairs) / len(pairs)
        mfu = flops_per_token(config, seq / 2, True) * steady_tok / steady_t / peak
    return BenchResult(
        shape=shape or HUB_SHAPES.get(recipe.model.name_or_path, recipe.model.name_or_path),
        layout="padded", reference="online", device=device, steps_timed=len(times) - warmup,
        pairs_per_step=pps, tokens_per_s=steady_tok / steady_t,
        e2e_tokens_per_s=sum(tokens) / run["total_s"],
        step_time_s=statistics.mean(times[warmup:]), reference_s=0.0,
        peak_alloc_gib=run["peak_alloc_gib"], peak_reserved_gib=run["peak_reserved_gib"],
        mfu=mfu, padding_fraction=max(0.0, 1 - real / run["slots"]) if run["slots"] else 0.0,
        extra={"tool": f"trl {run['version']}", "tokens": real,
               "attn": kernel_for(recipe.model.attn_implementation,  # as its model was built
                                  torch.device("cuda" if torch.cuda.is_available() else "cpu")),
               "micro_batch_pairs": recipe.train.micro_batch_pairs})


def trl_baseline(recipe: Recipe, shape: str | None, steps: int, warmup: int,
                 prompt_len: tuple[int, int], response_len: tuple[int, int],
                 ) -> tuple[Any, list[PairTokens]]:
    """TRL's row, and the pairs qdpo must then train on to be compared with it."""
    from qdpo import console as ui
    from qdpo.bench import bench_config, synthetic_pairs
    from qdpo.device import compute_dtype, default_device

    require_trl()
    check_comparable(recipe)
    config = bench_config(recipe, shape)
    device = default_device()
    dtype = compute_dtype(recipe.model.compute_dtype, device)
    pps = recipe.train.pairs_per_step
    pairs = with_eos(synthetic_pairs(steps * pps, config.vocab_size, prompt_len, response_len,
                                     recipe.train.seed))
    ui.info(f"bench: TRL DPOTrainer, {steps} steps of {pps} pairs, "
            f"{recipe.train.micro_batch_pairs} per micro-batch, reference online")
    run = run_trl(recipe, config, pairs, steps, warmup, device, dtype)
    return trl_result(recipe, shape, run, warmup, config, pairs), pairs


def budget_within(recipe: Recipe, shape: str | None, trl_row: Any,
                  longest_pair: int) -> int:
    """`--match-memory`: the largest token budget per micro-batch that `qdpo plan`'s
    arithmetic keeps within TRL's measured peak allocated memory (the planner predicts 0-8%
    above what a GPU measures, so the budget errs on the safe side)."""
    from qdpo import console as ui
    from qdpo.bench import bench_config
    from qdpo.memory import GIB, Settings, Shape, estimate, tokens_under

    peak = trl_row.peak_alloc_gib
    if not peak:
        raise QdpoError(NO_PEAK)
    shape_, settings = Shape.from_config(bench_config(recipe, shape)), Settings.from_recipe(recipe)
    tokens = tokens_under(shape_, settings, peak * GIB)
    if tokens == 0:
        fixed = estimate(shape_, settings, 128).peak / GIB
        raise QdpoError(f"--match-memory: TRL peaked at {peak:.2f} GiB, and qdpo with this "
                        f"recipe is predicted at {fixed:.2f} GiB with its smallest micro-batch. "
                        f"Try model.offload_activations=true, model.embeddings_on_host=true or "
                        f"a smaller lora.r.")
    ui.info(f"--match-memory: train.max_tokens {tokens:,}, predicted peak "
            f"{estimate(shape_, settings, tokens).peak / GIB:.2f} GiB, within TRL's measured "
            f"{peak:.2f} GiB")
    if tokens < longest_pair:
        ui.warn(f"--match-memory: the longest pair takes {longest_pair:,} tokens, more than the "
                f"budget; it trains alone in its micro-batch, and may go above TRL's memory.")
    return tokens


def ratio_lines(results: list[Any]) -> list[str]:
    """qdpo against TRL, row by row: how many times faster, and the memory it used."""
    base = next((r for r in results if r.extra.get("tool", "").startswith("trl")), None)
    if base is None:
        return []
    lines = []
    for r in results:
        if r is base:
            continue
        mem = (f", peak allocated {r.peak_alloc_gib / base.peak_alloc_gib:.2f}x TRL's"
               if r.peak_alloc_gib and base.peak_alloc_gib else "")
        lines.append(f"qdpo {r.layout} against {base.extra['tool']}: "
                     f"{r.tokens_per_s / base.tokens_per_s:.2f}x tokens/s steady, "
                     f"{r.e2e_tokens_per_s / base.e2e_tokens_per_s:.2f}x end to end{mem}")
    return lines
