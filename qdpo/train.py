"""The training loop, written out: data, model, then step after step, top to bottom.

An optimizer step is defined in pairs (train.pairs_per_step) whatever the micro-batching, and
the loss is the mean of per-pair losses over the step, so changing micro_batch_pairs changes
memory and speed, never the optimisation.
"""

from __future__ import annotations

import functools
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qdpo import console as ui
from qdpo.batching import PackedBatch, micro_batches
from qdpo.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from qdpo.data import PairTokens, prepare
from qdpo.errors import QdpoError
from qdpo.losses import LossParams, PreferenceBatch, compute_loss
from qdpo.model import (Layout, ModelInfo, default_device, load_model, load_tokenizer,
                        reference_mode, resolve_layout, save_adapter, trainable_parameters)
from qdpo import reference as refcache
from qdpo.logps import SequenceLogps, sequence_logps
from qdpo.recipe import Recipe
from qdpo.rundir import RunDir

NONFINITE_LIMIT = 5


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: dict[str, float]
    last_train: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    reference_seconds: float = 0.0


# ---------------------------------------------------------------------------------------
# Pieces the loop (and `qdpo eval`, `qdpo bench`) use
# ---------------------------------------------------------------------------------------

def loss_params(recipe: Recipe) -> LossParams:
    lc = recipe.loss
    return LossParams(beta=lc.beta, label_smoothing=lc.label_smoothing,
                      simpo_gamma=lc.simpo_gamma, orpo_lambda=lc.orpo_lambda,
                      dpop_lambda=lc.dpop_lambda, ld_alpha=lc.ld_alpha,
                      discopop_tau=lc.discopop_tau)


def autocast_for(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def forward_pair_batch(model: Any, batch: PackedBatch, recipe: Recipe, params: LossParams,
                       reference: SequenceLogps | None = None):
    """Policy log-probs, reference log-probs (online unless given), and the loss output."""
    need_ref = recipe.needs_reference
    if need_ref and reference is None:
        with reference_mode(model):
            reference = sequence_logps(model, batch)
    pol = sequence_logps(model, batch)
    pb = PreferenceBatch(
        policy_chosen_logps=pol.chosen, policy_rejected_logps=pol.rejected,
        chosen_lengths=batch.chosen_lengths, rejected_lengths=batch.rejected_lengths,
        reference_chosen_logps=reference.chosen if need_ref else None,
        reference_rejected_logps=reference.rejected if need_ref else None,
        weights=batch.weights,
        policy_chosen_public_logps=pol.chosen_public,
        policy_rejected_public_logps=pol.rejected_public,
        reference_chosen_public_logps=reference.chosen_public if need_ref else None,
        reference_rejected_public_logps=reference.rejected_public if need_ref else None)
    out = compute_loss(recipe.loss_types, pb, params, recipe.loss.weights)
    return pol, reference, out


class MetricAccumulator:
    """Sums per-pair values over a step (or an eval pass) and reports the field's names."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}  # device tensors: no GPU sync per micro-batch
        self.n = 0

    def add(self, pol: SequenceLogps, ref: SequenceLogps | None, out: Any) -> None:
        p = pol.chosen.shape[0]
        self.n += p
        vals = {
            "loss": out.losses.detach().float().sum(),
            "rewards/chosen": out.chosen_rewards.float().sum(),
            "rewards/rejected": out.rejected_rewards.float().sum(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).float().sum(),
            "logps/chosen": pol.chosen.detach().float().sum(),
            "logps/rejected": pol.rejected.detach().float().sum(),
        }
        if ref is not None:
            vals["logps/ref_chosen"] = ref.chosen.float().sum()
            vals["logps/ref_rejected"] = ref.rejected.float().sum()
        for k, v in out.metrics.items():
            vals[k] = v.detach().float().sum()
        for k, v in vals.items():
            self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach()

    def result(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: float(v) / max(1, self.n) for k, v in self.sums.items()}


def evaluate(model: Any, data: list[PairTokens], recipe: Recipe, pad_id: int,
             device: torch.device, dtype: torch.dtype, layout: Layout,
             reference: refcache.ReferenceTable | None = None) -> dict[str, float]:
    """Preference metrics of the policy against its reference on held-out pairs."""
    params = loss_params(recipe)
    acc = MetricAccumulator()
    was_training = model.training
    model.eval()
    mb = recipe.eval.micro_batch_pairs or 2 * recipe.train.micro_batch_pairs
    budget = 2 * recipe.train.max_tokens if recipe.train.max_tokens else None
    with torch.no_grad(), autocast_for(device, dtype):
        for batch in micro_batches(range(len(data)), data, mb, pad_id, layout.name, budget,
                                   layout.row_tokens):
            batch.to(device)
            ref = reference.get(batch.pair_ids, device) if reference is not None else None
            pol, ref, out = forward_pair_batch(model, batch, recipe, params, ref)
            acc.add(pol, ref, out)
    if was_training:
        model.train()
    res = acc.result()
    res["pairs"] = acc.n
    return res


def eval_trained(path: str | Path, sources: list[Any], max_pairs: int | None = None,
                 micro_batch_pairs: int | None = None) -> dict[str, float]:
    """`qdpo eval`: a trained adapter against its reference on any data source."""
    from qdpo.data import prepare_sources
    from qdpo.model import load_trained
    from qdpo.rundir import open_trained

    src = open_trained(path)
    device = default_device()
    model, tok = load_trained(src, device)
    recipe = src.recipe
    if micro_batch_pairs:
        recipe.eval.micro_batch_pairs = micro_batch_pairs
    pairs, report = prepare_sources(sources, recipe, tok)
    if max_pairs:
        pairs = pairs[:max_pairs]
    ui.info(f"eval data: {report.summary()}")
    layout = resolve_layout(recipe, model, device)
    from qdpo.model import compute_dtype

    res = evaluate(model, pairs, recipe, tok.pad_token_id, device,
                   compute_dtype(recipe.model.compute_dtype, device), layout)
    return res


def build_reference(model: Any, recipe: Recipe, data: list[PairTokens], ids: list[int],
                    base_path: str, pad_id: int, device: torch.device, dtype: torch.dtype,
                    layout: Layout, what: str) -> tuple[refcache.ReferenceTable, float]:
    """Load or compute the reference log-probs of `ids`; returns the table and seconds spent."""
    t0 = time.monotonic()
    key = refcache.cache_key(recipe, base_path, data, dtype)
    table = refcache.load_cached(key, len(data))
    missing = table.missing(sorted(set(ids)))
    if not missing:
        ui.info(f"reference: {what} log-probs reused from cache ({len(set(ids))} pairs, "
                f"{refcache.cache_path(key)})")
        return table, time.monotonic() - t0
    reused = len(set(ids)) - len(missing)
    budget = 4 * recipe.train.max_tokens if recipe.train.max_tokens else None
    with ui.task_progress(f"reference pass ({what})", len(missing)) as advance:
        refcache.precompute(model, table, missing, data, pad_id, device, layout.name, budget,
                            4 * recipe.train.micro_batch_pairs, layout.row_tokens,
                            autocast_for(device, dtype), advance)
    refcache.save_cached(key, table)
    dt = time.monotonic() - t0
    ui.info(f"reference: {what} log-probs for {len(missing)} pairs computed in {dt:.1f} s"
            + (f" ({reused} reused from cache)" if reused else "") + "; cached for later runs")
    return table, dt


@dataclass
class StepContext:
    """What one optimizer step needs; shared by `train` and `qdpo bench`."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    params: list[torch.nn.Parameter]
    recipe: Recipe
    loss_params: LossParams
    device: torch.device
    dtype: torch.dtype
    layout: Layout
    pad_id: int
    reference: refcache.ReferenceTable | None = None


def train_step(ctx: StepContext, data: list[PairTokens], idx: list[int]) -> dict[str, Any] | None:
    """Forward/backward over the step's micro-batches, clip, optimizer step.

    Returns the step's metrics, or None when the loss or gradient was not finite (the step is
    then skipped: gradients dropped, optimizer and schedule untouched).
    """
    r = ctx.recipe
    acc = MetricAccumulator()
    tokens = slots = 0
    with autocast_for(ctx.device, ctx.dtype):
        for batch in micro_batches(idx, data, r.train.micro_batch_pairs, ctx.pad_id,
                                   ctx.layout.name, r.train.max_tokens, ctx.layout.row_tokens):
            batch.to(ctx.device)
            ref = ctx.reference.get(batch.pair_ids, ctx.device) if ctx.reference else None
            pol, ref, out = forward_pair_batch(ctx.model, batch, r, ctx.loss_params, ref)
            loss = out.losses.sum() / len(idx)
            (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
            acc.add(pol, ref, out)
            tokens += batch.num_tokens
            slots += batch.slots
    if ctx.scaler:
        ctx.scaler.unscale_(ctx.optimizer)
    clip = r.train.max_grad_norm or float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(ctx.params, clip))
    metrics = acc.result()
    # With fp16 the loss scaler expects overflowing gradients now and then: it skips that
    # optimizer step and lowers the scale itself. Only a non-finite loss is our problem.
    bad_grad = not math.isfinite(grad_norm) and ctx.scaler is None
    if bad_grad or not math.isfinite(metrics["loss"]):
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.scaler:
            ctx.scaler.update()
        return None
    lr = ctx.scheduler.get_last_lr()[0]
    if ctx.scaler:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    metrics.update({"lr": lr, "grad_norm": grad_norm, "tokens": tokens, "token_slots": slots})
    return metrics


@functools.lru_cache(maxsize=4)
def pair_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of epoch `epoch`; cached, since every step of the epoch reads it."""
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return tuple(order)


def step_pairs(n: int, pairs_per_step: int, seed: int, step: int) -> tuple[list[int], float]:
    """The data indices of optimizer step `step` (0-based) and the epoch position after it.

    A pure function of the step number, so a resumed run sees exactly the pairs an
    uninterrupted one would have seen.
    """
    start = step * pairs_per_step
    out = []
    for pos in range(start, start + pairs_per_step):
        epoch, i = divmod(pos, n)
        out.append(pair_order(n, seed, epoch)[i])
    return out, (start + pairs_per_step) / n


def total_steps(recipe: Recipe, n: int) -> int:
    if recipe.train.max_steps:
        return recipe.train.max_steps
    return max(1, math.ceil(recipe.train.epochs * n / recipe.train.pairs_per_step))


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter],
                   device: torch.device) -> torch.optim.Optimizer:
    t = recipe.train
    kw = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
              weight_decay=t.weight_decay)
    if t.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        import bitsandbytes as bnb

        if t.optimizer == "paged_adamw_8bit" and device.type == "cuda":
            return bnb.optim.PagedAdamW8bit(params, **kw)
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer,
                   steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    t = recipe.train
    warm = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * steps))
    kind = t.lr_scheduler

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warm) / max(1, steps - warm)
        progress = min(1.0, max(0.0, progress))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    gib = 2**30
    return {"mem/peak_alloc_gib": torch.cuda.max_memory_allocated() / gib,
            "mem/peak_reserved_gib": torch.cuda.max_memory_reserved() / gib}


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

class _Interrupt:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. Second: exit at once."""

    def __init__(self) -> None:
        self.requested = False
        self.old: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass
        return self

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        ui.warn("interrupt: saving a checkpoint after this step (press Ctrl-C again to quit "
                "now)")

    def __exit__(self, *exc: Any) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)


def train(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False,
          live: bool | None = None,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run DPO (or a relative) as the recipe says; returns the final metrics and run dir."""
    t_start = time.monotonic()
    run = RunDir(Path(recipe.output.dir))
    resume_from = run.prepare_for_training(recipe, resume=resume, overwrite=overwrite)
    torch.manual_seed(recipe.train.seed)
    random.seed(recipe.train.seed)

    tokenizer = load_tokenizer(recipe)
    data = prepare(recipe, tokenizer)
    ui.info(f"data: {data.train_report.summary()}")
    for ex in data.train_report.examples[:3]:
        ui.info(f"  skipped {ex}")
    if data.eval:
        ui.info(f"eval: {len(data.eval)} held-out pairs")

    device = default_device()
    model, minfo = load_model(recipe, device)
    dtype = minfo.dtype
    _announce_model(recipe, minfo)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    layout = resolve_layout(recipe, model, device)
    params = trainable_parameters(model)
    n = len(data.train)
    steps = total_steps(recipe, n)
    optimizer = make_optimizer(recipe, params, device)
    scheduler = make_scheduler(recipe, optimizer, steps)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    lparams = loss_params(recipe)
    pad_id = tokenizer.pad_token_id
    start_step = 0
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _load_adapter_weights(model, resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["trainer"]["step"]
        run.truncate_metrics(start_step)
        ui.info(f"resumed from {resume_from} at step {start_step}/{steps}")
    run.write_run_info(recipe, minfo, data, steps)
    budget = recipe.train.max_tokens
    ui.info(f"layout: {layout.name} ({layout.attn} attention), "
            + (f"{budget} tokens per micro-batch" if budget else
               f"{recipe.train.micro_batch_pairs} pairs per micro-batch")
            + f", {recipe.train.pairs_per_step} pairs per step, {steps} steps")
    ref_table = eval_ref = None
    ref_seconds = 0.0
    if recipe.needs_reference and recipe.train.reference in ("auto", "precompute"):
        used = sorted({i for s in range(start_step, steps)
                       for i in step_pairs(n, recipe.train.pairs_per_step, recipe.train.seed,
                                           s)[0]})
        try:
            ref_table, ref_seconds = build_reference(model, recipe, data.train, used,
                                                     minfo.base_path, pad_id, device, dtype,
                                                     layout, "train")
            if data.eval:
                eval_ref, dt = build_reference(model, recipe, data.eval,
                                               list(range(len(data.eval))), minfo.base_path,
                                               pad_id, device, dtype, layout, "eval")
                ref_seconds += dt
        except torch.cuda.OutOfMemoryError:
            raise _oom_error(recipe, device, start_step, "the reference pass") from None
    sinks = ui.open_sinks(run.path, recipe.output.tensorboard)

    def save(step: int) -> Path:
        return save_checkpoint(run.path, step, lambda d: save_adapter(model, tokenizer, d),
                               optimizer, scheduler, {"step": step}, recipe.output.keep_last)

    def log(record: dict[str, Any]) -> None:
        for s in sinks:
            s.write(record)

    ctx = StepContext(model, optimizer, scheduler, scaler, params, recipe, lparams, device,
                      dtype, layout, pad_id, ref_table)
    if data.eval and recipe.eval.at_start and start_step == 0:
        ev0 = evaluate(model, data.eval, recipe, pad_id, device, dtype, layout, eval_ref)
        log({"step": 0, **{f"eval/{k}": v for k, v in ev0.items()}})
        ui.info(f"eval before training: acc {ev0['rewards/accuracies']:.3f}  "
                f"margin {ev0['rewards/margins']:.3f}  loss {ev0['loss']:.4f}")
    display = ui.TrainDisplay(steps, start_step, live=live)
    model.train()
    last: dict[str, float] = {}
    final_eval: dict[str, float] = {}
    bad_steps = 0
    interrupted = False
    step = start_step
    try:
        with _Interrupt() as intr:
            for step in range(start_step, steps):
                t0 = time.monotonic()
                idx, epoch = step_pairs(n, recipe.train.pairs_per_step, recipe.train.seed, step)
                metrics = train_step(ctx, data.train, idx)
                if metrics is None:
                    bad_steps += 1
                    display.message(f"[yellow]step {step + 1}: non-finite loss or gradient, "
                                    f"step skipped ({bad_steps} in a row)[/]")
                    if bad_steps >= NONFINITE_LIMIT:
                        raise QdpoError(
                            f"{bad_steps} optimizer steps in a row had a non-finite loss or "
                            f"gradient (last at step {step + 1}). Lower train.learning_rate, "
                            "check the data, or use compute_dtype: bf16 instead of fp16. The "
                            f"last good checkpoint in {run.path / 'checkpoints'} is kept.")
                    continue
                bad_steps = 0
                dt = time.monotonic() - t0
                metrics.update({"step": step + 1, "epoch": round(epoch, 4),
                                "tokens_per_s": metrics["tokens"] / dt, "step_time_s": dt})
                metrics.update(memory_stats(device))
                last = metrics
                done = step + 1
                if done % recipe.train.log_every_steps == 0 or done == steps:
                    log(metrics)
                history.append(metrics)
                display.update(done, metrics)
                if on_step:
                    on_step(done, metrics)
                if data.eval and recipe.eval.every_steps and done % recipe.eval.every_steps == 0 \
                        and done != steps:
                    ev = evaluate(model, data.eval, recipe, pad_id, device, dtype, layout,
                                  eval_ref)
                    log({"step": done, **{f"eval/{k}": v for k, v in ev.items()}})
                    display.message(f"eval @ step {done}: acc {ev['rewards/accuracies']:.3f}  "
                                    f"margin {ev['rewards/margins']:.3f}  loss {ev['loss']:.4f}")
                if recipe.output.save_every_steps and done % recipe.output.save_every_steps == 0 \
                        and done != steps:
                    save(done)
                if intr.requested:
                    interrupted = True
                    path = save(done)
                    display.message(f"checkpoint saved to {path}; continue with "
                                    f"`qdpo train ... --resume`")
                    break
            else:
                step = steps
    except torch.cuda.OutOfMemoryError:
        raise _oom_error(recipe, device, step) from None
    finally:  # whatever ends the loop, the terminal and the metric files are left clean
        display.close()
        if sys.exc_info()[0] is not None:
            for s in sinks:
                s.close()
    done = step if not interrupted else step + 1
    try:
        if not interrupted:
            if data.eval:
                final_eval = evaluate(model, data.eval, recipe, pad_id, device, dtype, layout,
                                      eval_ref)
                log({"step": done, **{f"eval/{k}": v for k, v in final_eval.items()}})
            if done > start_step:  # lets a later run extend this one (more steps or epochs)
                save(done)
            run.save_final(lambda d: save_adapter(model, tokenizer, d))
    finally:
        for s in sinks:
            s.close()
    result = TrainResult(run.path, done, final_eval, last, history, interrupted, ref_seconds)
    run.write_summary(result, time.monotonic() - t_start, recipe)
    _print_summary(result, recipe, time.monotonic() - t_start)
    return result


def _load_adapter_weights(model: Any, ckpt: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = ckpt / "adapter_model.safetensors"
    set_peft_model_state_dict(model, load_file(str(f)), adapter_name="default")


def _announce_model(recipe: Recipe, info: ModelInfo) -> None:
    q = recipe.model.quantization
    ui.info(f"model: {recipe.model.name_or_path} ({q if q != 'none' else 'not quantized'}, "
            f"{info.quantized_layers} 4-bit layers) on {info.device.type}, compute "
            f"{str(info.dtype).removeprefix('torch.')}; LoRA r={recipe.lora.r}: "
            f"{info.trainable_params:,} trainable of {info.total_params:,} params")
    if recipe.needs_reference:
        ui.info(f"reference: same weights, {info.reference} (no second copy)")
    else:
        ui.info(f"reference: none needed by {', '.join(recipe.loss_types)} (no reference pass)")


def _oom_error(recipe: Recipe, device: torch.device, step: int,
               where: str | None = None) -> QdpoError:
    stats = memory_stats(device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 \
        if device.type == "cuda" else 0
    return QdpoError(
        f"Out of GPU memory {'in ' + where if where else f'at step {step + 1}'} "
        f"(max_length {recipe.data.max_length}, max_tokens {recipe.train.max_tokens}, "
        f"{recipe.train.micro_batch_pairs} pairs per micro-batch; peak allocated "
        f"{stats.get('mem/peak_alloc_gib', 0):.1f} GiB of {total:.1f} GiB). Lower "
        "train.micro_batch_pairs (gradient accumulation keeps the step size), lower "
        "data.max_length, keep model.gradient_checkpointing on, or use optimizer "
        "paged_adamw_8bit. Resume from the last checkpoint with --resume.")


def _print_summary(result: TrainResult, recipe: Recipe, seconds: float) -> None:
    rows: list[tuple[str, Any]] = [("steps", result.steps), ("time", f"{seconds:.0f} s")]
    if not recipe.needs_reference:
        rows.append(("reference pass", f"none ({', '.join(recipe.loss_types)} is "
                                       "reference-free)"))
    elif recipe.train.reference == "online":
        rows.append(("reference pass", "online, every step"))
    else:
        rows.append(("reference pass", f"precomputed once, {result.reference_seconds:.1f} s"))
    for k in ("loss", "rewards/accuracies", "rewards/margins", "tokens_per_s",
              "mem/peak_alloc_gib"):
        if k in result.last_train:
            rows.append((f"train {k}", result.last_train[k]))
    for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
              "rewards/rejected"):
        if k in result.final_eval:
            rows.append((f"eval {k}", result.final_eval[k]))
    ui.console.print(ui.metrics_table("qdpo run summary", rows))
    if result.interrupted:
        ui.info(f"[yellow]interrupted[/] at step {result.steps}; resume with "
                f"`qdpo train <recipe> --resume`")
        return
    acc = result.final_eval.get("rewards/accuracies")
    if acc is not None:
        verdict = "clearly above chance" if acc >= 0.9 else \
            "above chance" if acc > 0.6 else "near chance: the preference was not learned"
        ui.info(f"held-out reward accuracy {acc:.3f} over {int(result.final_eval['pairs'])} "
                f"pairs: {verdict}")
    ui.info(f"adapter saved to {result.run_dir} (peft format; "
            f"PeftModel.from_pretrained(base, '{result.run_dir}'))")
