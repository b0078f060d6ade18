"""The training loop: `setup` builds the runtime objects once, the loop runs, `finish` saves.

An optimizer step is defined in pairs (train.pairs_per_step) whatever the micro-batching, and
the loss is the mean of per-pair losses over the step, so changing micro_batch_pairs or
max_tokens changes memory and speed, never the optimisation.

The recipe is read here, in `setup`, and nowhere below it: the loop and the step see the
runtime objects it builds (an Objective, a BatchPlan, the model, the optimizer).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from qdpo import callable_module, checkpoint, distributed
from qdpo import console as ui
from qdpo import reference
from qdpo.attention import check_can_train, model_kernel
from qdpo.batching import BatchPlan, pairs_used, plan_batches, step_pairs
from qdpo.data import PairTokens, PreparedData, prepare
from qdpo.device import (autocast_for, compute_dtype, default_device, memory_stats,
                         reset_peak_memory)
from qdpo.errors import QdpoError
from qdpo.evaluate import eval_plan, evaluate_pairs_with_margins, write_training_fingerprints
from qdpo.export.card import write_run_card
from qdpo.files import short_error
from qdpo.forward import MetricAccumulator, forward_pair_batch
from qdpo.guards import Interrupt, nonfinite_error, out_of_memory_message
from qdpo.logps import causal_lm
from qdpo.losses import Objective
from qdpo.memory import token_budget
from qdpo.model import (ModelInfo, decoder_layers, hidden_size, load_model, load_tokenizer,
                        save_adapter, trainable_parameters)
from qdpo.recipe import Recipe
from qdpo.rundir import RunDir
from qdpo.samples import Samples

NONFINITE_LIMIT = 5  # optimizer steps in a row with a non-finite loss before giving up


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_eval: dict[str, float]
    last_train: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    reference_seconds: float = 0.0
    reference_reused: bool = False  # every reference log-prob came from the cache


# ---------------------------------------------------------------------------------------
# One optimizer step (shared with `qdpo bench`)
# ---------------------------------------------------------------------------------------

@dataclass
class StepContext:
    """What one optimizer step needs."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler with fp16, else None
    params: list[torch.nn.Parameter]
    objective: Objective
    plan: BatchPlan
    device: torch.device
    dtype: torch.dtype
    max_grad_norm: float
    reference: reference.ReferenceTable | None = None  # precomputed, else online


def train_step(ctx: StepContext, data: list[PairTokens], idx: list[int]) -> dict[str, Any] | None:
    """Forward/backward over the step's micro-batches, clip, optimizer step.

    Returns the step's metrics, or None when the loss or gradient was not finite (the step is
    then skipped: gradients dropped, optimizer and schedule untouched).
    """
    acc = MetricAccumulator()
    # with several ranks, this one's share of the step; the loss is still over all its pairs
    mine = distributed.share(idx, [data[i].num_tokens for i in idx], distributed.ranks())
    # sharded weights: every rank runs as many passes as the busiest (fillers add nothing)
    batches = distributed.lockstep(ctx.model, ctx.plan.micro_batches(mine, data),
                                   lambda: next(ctx.plan.micro_batches(idx[:1], data)))
    with autocast_for(ctx.device, ctx.dtype):
        for batch, real in batches:
            batch.to(ctx.device)
            ref = ctx.reference.get(batch.pair_ids, ctx.device) if ctx.reference else None
            pol, ref, out = forward_pair_batch(ctx.model, batch, ctx.objective, ref)
            loss = out.losses.sum() / len(idx) * (1.0 if real else 0.0)
            (ctx.scaler.scale(loss) if ctx.scaler else loss).backward()
            if real:
                acc.add(pol, ref, out)
                acc.count(tokens=batch.num_tokens, token_slots=batch.slots)
    distributed.sum_gradients(ctx.params)  # several ranks: the one-process gradient
    if ctx.scaler:
        ctx.scaler.unscale_(ctx.optimizer)
    grad_norm = float(distributed.whole(torch.nn.utils.clip_grad_norm_(
        ctx.params, ctx.max_grad_norm or float("inf"))))
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
    ctx.objective.observe(metrics, len(idx))
    metrics.update({"lr": lr, "grad_norm": grad_norm})
    return metrics


# ---------------------------------------------------------------------------------------
# Setup: the recipe becomes runtime objects, once
# ---------------------------------------------------------------------------------------

@dataclass
class Setup:
    recipe: Recipe
    run: RunDir
    tokenizer: Any
    data: PreparedData
    minfo: ModelInfo
    ctx: StepContext
    steps: int
    start_step: int
    eval_plan: BatchPlan
    eval_reference: reference.ReferenceTable | None
    reference_seconds: float


def total_steps(recipe: Recipe, n: int) -> int:
    if recipe.train.max_steps:
        return recipe.train.max_steps
    return max(1, math.ceil(recipe.train.epochs * n / recipe.train.pairs_per_step))


def make_optimizer(t: Any, params: list[torch.nn.Parameter],
                   device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer (`t` is its train section) over the LoRA parameters."""
    kw = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
              weight_decay=t.weight_decay)
    if t.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        import bitsandbytes as bnb

        if t.optimizer == "paged_adamw_8bit" and device.type == "cuda":
            return bnb.optim.PagedAdamW8bit(params, **kw)
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def make_scheduler(t: Any, optimizer: torch.optim.Optimizer,
                   steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then linear / cosine decay or constant, over `steps` optimizer steps."""
    warm = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * steps))
    kind = t.lr_scheduler

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - warm) / max(1, steps - warm)))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_context(recipe: Recipe, model: Any, pad_id: int, device: torch.device,
                 dtype: torch.dtype, steps: int) -> StepContext:
    """Objective, batch plan, optimizer, schedule and scaler for `model` (train and bench)."""
    t = recipe.train
    params = trainable_parameters(model)
    optimizer = make_optimizer(t, params, device)
    check_can_train(model_kernel(model), device)
    budget = token_budget(recipe, causal_lm(model).config, device)
    plan = plan_batches(t.layout, model_kernel(model), hidden_size(model), pad_id,
                        t.micro_batch_pairs, budget, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return StepContext(model, optimizer, make_scheduler(t, optimizer, steps), scaler, params,
                       Objective.from_config(recipe.loss), plan, device, dtype,
                       t.max_grad_norm)


def setup(recipe: Recipe, resume: str | None, overwrite: bool) -> Setup:
    main = distributed.ranks().is_main  # rank 0 alone writes the run directory
    run = RunDir(Path(recipe.output.dir).expanduser())  # `~/runs/x`, as input paths are
    resume_from = run.prepare_for_training(recipe, resume=resume, overwrite=overwrite) \
        if main else None
    resume_from = distributed.broadcast(resume_from)
    torch.manual_seed(recipe.train.seed)
    random.seed(recipe.train.seed)
    tokenizer = load_tokenizer(recipe)
    if not main:  # rank 0 tokenizes into the cache first; the others then read it
        distributed.barrier()
    data = prepare(recipe, tokenizer)
    if main:
        distributed.barrier()
    ui.data_report(data)
    steps = total_steps(recipe, len(data.train))
    _refuse_shorter_than(resume_from, steps)
    model, minfo = load_training_model(recipe)
    ui.model_banner(recipe, minfo)
    reset_peak_memory(minfo.device)
    ctx = step_context(recipe, model, tokenizer.pad_token_id, minfo.device, minfo.dtype, steps)
    start = 0
    if resume_from is not None:
        start = checkpoint.restore(resume_from, model, ctx.optimizer, ctx.scheduler, ctx.scaler,
                                   ctx.objective)
        if main:
            run.truncate_metrics(start, steps)
        ui.info(f"resumed from {resume_from} at step {start}/{steps}")
    if main:
        run.write_run_info(recipe, minfo, data, steps)
        write_training_fingerprints(run.path, data.train)  # for qdpo eval's overlap check
    ui.plan_banner(ctx.plan, recipe.train.pairs_per_step, steps)
    ev_plan = eval_plan(ctx.plan, recipe.eval.micro_batch_pairs)
    eval_ref, ref_seconds = None, 0.0
    if ctx.objective.needs_reference and recipe.train.reference in ("auto", "precompute"):
        with out_of_memory_message(recipe, minfo.device, lambda: "in the reference pass"):
            ctx.reference, eval_ref, ref_seconds = _precompute_reference(
                recipe, ctx, data, minfo.base_path, start, steps)
    return Setup(recipe, run, tokenizer, data, minfo, ctx, steps, start, ev_plan, eval_ref,
                 ref_seconds)


def _refuse_shorter_than(resume_from: Path | None, steps: int) -> None:
    """Resuming past the recipe's end would train nothing and record the run as shorter than
    its adapter is."""
    at = checkpoint.step_of(resume_from) if resume_from is not None else None
    if at is not None and at > steps:
        raise QdpoError(
            f"Cannot resume: the checkpoint {resume_from} is at step {at}, but this recipe's "
            f"run ends at step {steps} (train.max_steps or train.epochs). Give it more than "
            f"{at} steps to train further, or start a new run.")


def load_training_model(recipe: Recipe) -> tuple[Any, ModelInfo]:
    """The model to train: whole on this process's device, or with train.fsdp under torchrun
    built in host memory and sharded onto each rank's device (no device holds it whole)."""
    r = distributed.ranks()
    if not recipe.train.fsdp or not r.active:
        if recipe.train.fsdp:
            ui.info("train.fsdp: one process, nothing to shard (start it with torchrun or "
                    "--gpus N)")
        return load_model(recipe)
    device = default_device()
    model, minfo = load_model(recipe, torch.device("cpu"),
                              compute_dtype(recipe.model.compute_dtype, device))
    held, total = distributed.shard(model, decoder_layers(model), device)
    ui.info(f"train.fsdp: {len(decoder_layers(model))} decoder layers sharded across "
            f"{r.world} ranks; each holds {held / 2**20:,.2f} of the model's "
            f"{total / 2**20:,.2f} MiB of weights (embeddings and head whole)")
    return model, replace(minfo, device=device)


def _precompute_reference(recipe: Recipe, ctx: StepContext, data: PreparedData, base_path: str,
                          start: int, steps: int) -> tuple[Any, Any, float]:
    """Reference log-probs of the pairs the remaining steps use, and of the eval pairs."""
    t = recipe.train
    used = pairs_used(len(data.train), t.pairs_per_step, t.seed, start, steps)
    sets = [("train", data.train, used)]
    if data.eval:
        sets.append(("eval", data.eval, list(range(len(data.eval)))))
    tables, seconds = [], 0.0
    for what, pairs, ids in sets:
        key = reference.cache_key(recipe, base_path, pairs, ctx.dtype)
        table, dt = reference.ensure(ctx.model, pairs, ids, ctx.plan, ctx.device, ctx.dtype,
                                     key, what)
        tables.append(table)
        seconds += dt
    return tables[0], (tables[1] if data.eval else None), seconds


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

def train(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False,
          live: bool | None = None,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run DPO (or a relative) as the recipe says; returns the final metrics and run dir."""
    t_start = time.monotonic()
    main = distributed.init().is_main  # under torchrun: join the job (one process: nothing)
    s = setup(recipe, resume, overwrite)
    ctx, data, out = s.ctx, s.data, recipe.output
    n, pps, seed = len(data.train), recipe.train.pairs_per_step, recipe.train.seed
    evaluate_every, evaluate_at_start = recipe.eval.every_steps, recipe.eval.at_start
    history: list[dict[str, Any]] = []
    final_eval: dict[str, float] = {}
    bad_steps, done, interrupted = 0, s.start_step, False

    # sharded weights: generating would need every rank in step token by token
    sharded = distributed.is_sharded(ctx.model)
    samples = Samples(recipe, ctx.model, s.tokenizer, s.run.path, answer=main and not sharded)
    if sharded and samples.prompts:
        ui.info("train.fsdp: the sample prompts are not answered while the weights are sharded")
    samples.truncate(s.start_step)

    def run_eval(step: int, label: str | None = None, final: bool = False) -> dict[str, float]:
        ev: dict[str, float] = {}
        if data.eval:
            ev, margins = evaluate_pairs_with_margins(ctx.model, data.eval, ctx.objective,
                                                      s.eval_plan, ctx.device, ctx.dtype,
                                                      s.eval_reference)
            sinks.write({"step": step, **{f"eval/{k}": v for k, v in ev.items()}})
            if final and main:  # the report's histogram of held-out margins
                s.run.write_eval_margins(step, margins)
            if label:
                display.message(ui.eval_line(label, ev))
        said = samples.record(step)
        if said:
            display.message(said)
        return ev

    evaluating = bool(data.eval) or bool(samples.prompts)

    sinks_of_run = ui.metric_sinks(s.run.path, out.tensorboard, out.wandb, recipe.to_dict()) \
        if main else contextlib.nullcontext(ui.MetricSinks([]))
    with sinks_of_run as sinks, \
            ui.TrainDisplay(s.steps, s.start_step, live=live) as display, \
            Interrupt() as intr, \
            out_of_memory_message(recipe, ctx.device, lambda: f"at step {done + 1}"):
        if evaluating and evaluate_at_start and s.start_step == 0:
            run_eval(0, "eval before training")
        ctx.model.train()
        for step in range(s.start_step, s.steps):
            t0 = time.monotonic()
            idx, epoch = step_pairs(n, pps, seed, step)
            metrics = train_step(ctx, data.train, idx)
            if metrics is None:
                bad_steps += 1
                ui.warn(f"step {step + 1}: non-finite loss or gradient, step skipped "
                        f"({bad_steps} in a row)")
                if bad_steps >= NONFINITE_LIMIT:
                    raise nonfinite_error(bad_steps, step, s.run.path)
                continue
            bad_steps, done = 0, step + 1
            dt = time.monotonic() - t0
            metrics.update({"step": done, "epoch": round(epoch, 4), "step_time_s": dt,
                            "tokens_per_s": metrics["tokens"] / dt, **memory_stats(ctx.device)})
            if done % recipe.train.log_every_steps == 0 or done == s.steps:
                sinks.write(metrics)
            history.append(metrics)
            display.update(done, metrics)
            if on_step:
                on_step(done, metrics)
            if evaluating and evaluate_every and done % evaluate_every == 0 and done != s.steps:
                run_eval(done, f"eval @ step {done}")
            if out.save_every_steps and done % out.save_every_steps == 0 and done != s.steps:
                save(s, done)
            if any(distributed.gather(intr.requested)):  # all ranks stop at the same step
                interrupted = True
                display.message(f"checkpoint saved to {save(s, done)}; continue with "
                                f"`qdpo train ... --resume`")
                break
        else:
            done = s.steps
        if not history and not interrupted and s.steps > s.start_step:
            # every step was skipped: there is no training to save or report
            raise nonfinite_error(bad_steps, s.steps - 1, s.run.path)
        if not interrupted and evaluating:
            final_eval = run_eval(done, final=True)
    last = history[-1] if history else {}
    return finish(s, done, final_eval, last, history, interrupted, time.monotonic() - t_start)


def save(s: Setup, step: int) -> Path:
    """A checkpoint of `step`, written by rank 0 (the other ranks hold the same state, or,
    with sharded weights, give it their shards first)."""
    c = s.ctx
    whole = None
    if distributed.is_sharded(c.model):  # every rank takes part in gathering
        whole = (distributed.full_adapter_state(c.model),
                 distributed.full_optimizer_state(c.optimizer))
    if not distributed.ranks().is_main:
        return checkpoint.checkpoint_path(s.run.path, step)
    return checkpoint.save(s.run.path, step, c.model, s.tokenizer, c.optimizer, c.scheduler,
                           c.scaler, c.objective, s.recipe.output.keep_last, whole)


def finish(s: Setup, done: int, final_eval: dict[str, float], last: dict[str, float],
           history: list[dict[str, Any]], interrupted: bool, seconds: float) -> TrainResult:
    """Save the final checkpoint and adapter (unless interrupted), write and show the summary."""
    tables = [t for t in (s.ctx.reference, s.eval_reference) if t is not None]
    result = TrainResult(s.run.path, done, final_eval, last, history, interrupted,
                         s.reference_seconds,
                         reference_reused=bool(tables) and not any(t.computed for t in tables))
    main = distributed.ranks().is_main
    if not interrupted:
        if done > s.start_step:  # lets a later run extend this one (more steps or epochs)
            save(s, done)
        adapter = distributed.full_adapter_state(s.ctx.model)  # sharded: all ranks gather
        if main:
            s.run.save_final(lambda d: save_adapter(s.ctx.model, s.tokenizer, d, adapter))
    if not main:  # rank 0 writes the run; this one is done
        distributed.shutdown()
        return result
    s.run.write_summary(result, seconds, s.recipe)
    if not result.interrupted:
        write_run_card(s.run, s.recipe)
    write_report(s.run.path)
    s.run.unlock()
    distributed.shutdown()
    ui.run_summary(result, s.recipe, seconds)
    return result


def write_report(run_dir: Path) -> None:
    """report.html in the run directory; a run is not lost for want of its page."""
    from qdpo.report import write_run_report

    try:
        write_run_report(run_dir)
    except (QdpoError, OSError) as e:
        ui.warn(f"could not write report.html ({short_error(e)})")


# `qdpo.train(recipe)` calls train(), though qdpo.train is this module
callable_module(__name__, train)
