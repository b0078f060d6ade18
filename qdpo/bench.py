"""`qdpo bench`: time real training steps of a recipe on synthetic pairs.

With random weights a user learns, before downloading anything, whether a recipe fits their
card and how fast it runs: speed and memory do not depend on the weights' values. The model is
built from its config (built-in shapes for common models, so it works offline), its linear
layers quantized the way the recipe says, in memory, with no weights on disk.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from qdpo import console as ui
from qdpo import distributed
from qdpo.data import PairTokens
from qdpo.errors import ModelError, QdpoError
from qdpo.memory import GIB
from qdpo.recipe import Recipe

# Architecture shapes of common models (from their config.json), for offline benchmarks.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5),
    "llama-3.1-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192,
                          intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, tie_word_embeddings=False,
                          max_position_embeddings=131072, rope_theta=500000.0,
                          rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5),
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072,
                         intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rms_norm_eps=1e-5),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0,
                         rms_norm_eps=1e-6),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                       sliding_window=None),
}

HUB_SHAPES = {
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "meta-llama/Llama-3.3-70B-Instruct": "llama-3.1-70b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "meta-llama/Llama-3.2-3B": "llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b",
    "Qwen/Qwen2.5-1.5B": "qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5-1.5b",
    "mistralai/Mistral-7B-v0.3": "mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b",
}

# Dense bf16 tensor-core peak, for model-FLOPs utilisation; the first name found in the device's
# name wins, so the more specific names come first.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
              "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "4080": 97e12,
              "A6000": 155e12, "5090": 209e12}


def bench_config(recipe: Recipe, shape: str | None) -> Any:
    """The model config to benchmark: a named shape, a known hub id, or the model's own."""
    from transformers import AutoConfig

    name = shape or HUB_SHAPES.get(recipe.model.name_or_path)
    if name:
        if name not in SHAPES:
            raise QdpoError(f"Unknown shape '{name}'. Built-in shapes: {', '.join(SHAPES)}.")
        spec = dict(SHAPES[name])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    src = recipe.resolve_path(recipe.model.name_or_path)
    try:
        return AutoConfig.from_pretrained(src, revision=recipe.model.revision,
                                          trust_remote_code=recipe.model.trust_remote_code)
    except Exception as e:
        raise ModelError(f"Cannot read the config of '{recipe.model.name_or_path}' ({e}). Use "
                         f"--shape with one of: {', '.join(SHAPES)}.") from None


def synthetic_pairs(n: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int],
                    seed: int) -> list[PairTokens]:
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))]

    return [PairTokens(ids(*prompt), ids(*response), ids(*response)) for _ in range(n)]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_FLOPS.items():
        if key in name:
            return v
    return None


# What two CPU cores reach on a QLoRA step, roughly (4-bit dequantization included).
CPU_FLOPS = 20e9
# Seconds per weight on this kind of CPU (2 cores, measured with the llama-3.2-1b shape: 20-25 s
# steps at 8-16 token pairs, over a minute to build): dequantizing a 4-bit weight, and building
# plus quantizing one.
CPU_DEQUANT_S = 5e-9
CPU_BUILD_S = 6e-8


def cpu_warning(shape: str, steps: int, prompt_len: tuple[int, int],
                response_len: tuple[int, int], pairs_per_step: int) -> str | None:
    """On a machine without a GPU, how long a built-in (GPU-sized) shape will take."""
    if torch.cuda.is_available() or shape not in SHAPES:
        return None
    spec = dict(SHAPES[shape])
    spec.pop("model_type")
    from types import SimpleNamespace

    config = SimpleNamespace(**spec)
    tokens = pairs_per_step * (sum(prompt_len) / 2 + sum(response_len))  # shared prefix
    weights = flops_per_token(config, 0, False) / 4  # parameters
    # the matmuls, plus dequantizing every 4-bit weight in the forward, the recompute and the
    # backward, whatever the tokens (which is what dominates short pairs here)
    seconds = (flops_per_token(config, sum(prompt_len) / 2, True) * tokens / CPU_FLOPS
               + 3 * weights * CPU_DEQUANT_S)
    build = weights * CPU_BUILD_S
    short = prompt_len[1] <= 64 and response_len[1] <= 64
    return (f"{shape} is a GPU-sized model and this machine has no GPU: expect roughly "
            f"{_duration(seconds)} per step here ({steps} steps and a reference pass), after "
            f"about {_duration(build)} building and quantizing the model. "
            + ("" if short and steps <= 3 else
               "Try --steps 2 --warmup 1 with short --prompt-len/--response-len, or a GPU."))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{seconds / 60:,.0f} minutes"


def flops_per_token(config: Any, context: float, with_reference: bool) -> float:
    """Model FLOPs per processed token: LoRA training on a frozen base.

    Forward 2N, backward 2N (activation gradients only; the base gets no weight gradient), and
    2N more for the reference forward when it runs; attention adds ~12*L*d*context per token
    (forward+backward). Recomputation by checkpointing is not counted (as usual for MFU).
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head = d // config.num_attention_heads
    ff = config.intermediate_size
    n = layers * (d * d * 2 + 2 * d * kv * head + 3 * d * ff) + d * config.vocab_size
    mult = 6 if with_reference else 4
    return mult * n + 12 * layers * d * context


@dataclass
class BenchResult:
    shape: str
    layout: str
    reference: str
    device: str
    steps_timed: int
    pairs_per_step: int
    tokens_per_s: float  # steady steps
    e2e_tokens_per_s: float  # all steps plus the reference pass
    step_time_s: float
    reference_s: float
    peak_alloc_gib: float | None
    peak_reserved_gib: float | None
    mfu: float | None
    padding_fraction: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_bench(recipe: Recipe, *, steps: int = 8, warmup: int = 2, shape: str | None = None,
              prompt_len: tuple[int, int] = (128, 512), response_len: tuple[int, int] = (64, 512),
              random_weights: bool = True, quiet: bool = False,
              profile: Path | None = None, pairs: list[PairTokens] | None = None,
              built: tuple[Any, Any] | None = None) -> BenchResult:
    """Reference pass (when the recipe precomputes it) and `steps` real optimizer steps.

    `built` is a (model, config) from an earlier call, to time several settings on one model.
    """
    from qdpo import reference
    from qdpo.device import compute_dtype, default_device, reset_peak_memory
    from qdpo.guards import out_of_memory_message
    from qdpo.train import step_context

    if steps <= warmup:
        raise QdpoError(f"--steps ({steps}) must be larger than --warmup ({warmup}).")
    distributed.init()  # under torchrun each rank times its share of every step
    device = default_device()
    # what the process already held (what TRL's run left, with --against): not this run's
    held_before = torch.cuda.memory_allocated(device) / GIB \
        if device.type == "cuda" and built is None else 0.0
    if built is None:
        with out_of_memory_message(recipe, device, lambda: "while building the model"):
            built = _bench_model(recipe, shape, random_weights, device)
    model, config = built
    dtype = compute_dtype(recipe.model.compute_dtype, device)
    pps = recipe.train.pairs_per_step
    data = pairs or synthetic_pairs(steps * pps, config.vocab_size, prompt_len, response_len,
                                    recipe.train.seed)
    ctx = step_context(recipe, model, 0, device, dtype, steps)
    reset_peak_memory(device)
    ref_s = 0.0
    if ctx.objective.needs_reference and recipe.train.reference in ("auto", "precompute"):
        with out_of_memory_message(recipe, device, lambda: "in the reference pass"):
            ctx.reference, ref_s = reference.ensure(model, data, range(len(data)), ctx.plan,
                                                    device, dtype, key=None, what="bench")
    times, tokens, slots = _time_steps(recipe, ctx, data, steps, warmup, quiet, profile)
    result = _result(recipe, shape, config, ctx, data, times, tokens, slots, warmup, ref_s,
                     prompt_len, response_len)
    if held_before > 0.01 and result.peak_alloc_gib is not None:
        ui.info(f"  {held_before:.2f} GiB was allocated before this run started (what an "
                f"earlier run in this process left): not counted in its peak")
        result.peak_alloc_gib -= held_before
        result.extra["held_before_gib"] = held_before
    return result


def _bench_model(recipe: Recipe, shape: str | None, random_weights: bool,
                 device: torch.device) -> tuple[Any, Any]:
    from qdpo.model import attach_lora, load_base, random_quantized_base

    config = bench_config(recipe, shape) if (random_weights or shape) else None
    torch.manual_seed(recipe.train.seed)
    if config is not None:
        base = random_quantized_base(config, recipe, device)
    else:
        base = load_base(recipe, device)
        config = base.config
    return attach_lora(base, recipe), config


def _time_steps(recipe: Recipe, ctx: Any, data: list[PairTokens], steps: int, warmup: int,
                quiet: bool, profile: Path | None = None) -> tuple[list[float], list[int], int]:
    from qdpo.device import synchronize
    from qdpo.guards import out_of_memory_message
    from qdpo.train import train_step

    ctx.model.train()
    pps = recipe.train.pairs_per_step
    times, tokens, slots = [], [], 0
    for s in range(steps):
        idx = list(range(s * pps, (s + 1) * pps))
        # the last step is the profiled one: warm, and its time still counts (a little slower)
        with _profiled(profile if s == steps - 1 else None, ctx.device), \
                out_of_memory_message(recipe, ctx.device, lambda: f"at bench step {s + 1}"):
            t0 = time.monotonic()
            m = train_step(ctx, data, idx)
            synchronize(ctx.device)
            times.append(time.monotonic() - t0)
        tokens.append(sum(data[i].num_tokens for i in idx))
        if m is not None:
            slots += m["token_slots"]
        if not quiet:
            ui.info(f"  step {s + 1}/{steps}: {times[-1]:.2f} s, {tokens[-1] / times[-1]:,.0f} "
                    f"tok/s" + (" (warm-up, not timed)" if s < warmup else ""))
    return times, tokens, slots


@contextmanager
def _profiled(out: Path | None, device: torch.device) -> Iterator[None]:
    """Profile the enclosed step into `out`: a table of the kernels and ops by time spent on
    the device (the CPU without a GPU) and a Chrome trace (open it in ui.perfetto.dev)."""
    if out is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        t0 = time.monotonic()
        yield
        wall = time.monotonic() - t0
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = device.type == "cuda"
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    if on_gpu:  # the kernels themselves (an op's own device time repeats its kernels')
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(getattr(e, key) for e in events) / 1e6 if on_gpu else wall
    lines = [f"profiled step: {wall:.3f} s wall, {busy:.3f} s of device kernels "
             f"({busy / wall:.0%} busy)", "", f"{'ms':>9} {'share':>6} {'calls':>6}  name"]
    lines += [f"{getattr(e, key) / 1e3:9.1f} {getattr(e, key) / 1e6 / busy:6.1%} {e.count:6}  "
              f"{e.key[:90]}" for e in events[:30]]
    (out / "profile.txt").write_text("\n".join(lines) + "\n")
    prof.export_chrome_trace(str(out / "trace.json.gz"))
    ui.info(f"  profile of the last step: {out / 'profile.txt'} ({busy / wall:.0%} device busy)")


def _result(recipe: Recipe, shape: str | None, config: Any, ctx: Any, data: list[PairTokens],
            times: list[float], tokens: list[int], slots: int, warmup: int, ref_s: float,
            prompt_len: tuple[int, int], response_len: tuple[int, int]) -> BenchResult:
    from qdpo.batching import segment_cost
    from qdpo.device import memory_stats

    layout, device, pps = ctx.plan.layout, ctx.device, recipe.train.pairs_per_step
    steps = len(times)
    steady_t, steady_tok = sum(times[warmup:]), sum(tokens[warmup:])
    real = sum(segment_cost(p, layout) for p in data)
    mem = memory_stats(device)
    world = distributed.ranks().world
    one = peak_flops(device)
    peak = one * world if one else None  # all the job's devices
    mfu = None
    if peak:
        processed = sum(segment_cost(data[i], layout) for i in range(warmup * pps, len(data)))
        seq = sum(len(p.prompt_ids) + (len(p.chosen_ids) + len(p.rejected_ids)) / 2
                  for p in data) / len(data)
        online_ref = ctx.objective.needs_reference and ctx.reference is None
        mfu = flops_per_token(config, seq / 2, online_ref) * processed / steady_t / peak
    planned = _planned_peak_gib(recipe, config, ctx, data, world) \
        if device.type == "cuda" else None
    return BenchResult(
        shape=shape or HUB_SHAPES.get(recipe.model.name_or_path, recipe.model.name_or_path),
        layout=layout, reference=("precompute" if ctx.reference is not None else
                                  "online" if ctx.objective.needs_reference else "none"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        steps_timed=steps - warmup, pairs_per_step=pps,
        tokens_per_s=steady_tok / steady_t, e2e_tokens_per_s=sum(tokens) / (sum(times) + ref_s),
        step_time_s=steady_t / (steps - warmup), reference_s=ref_s,
        peak_alloc_gib=mem.get("mem/peak_alloc_gib"),
        peak_reserved_gib=mem.get("mem/peak_reserved_gib"), mfu=mfu,
        padding_fraction=max(0.0, 1 - real / slots) if slots else 0.0,
        extra={"attn": ctx.plan.kernel, "max_tokens": ctx.plan.max_tokens, "tokens": sum(tokens),
               "micro_batch_pairs": recipe.train.micro_batch_pairs,
               "prompt_len": list(prompt_len), "response_len": list(response_len),
               **({"ranks": world, "tokens_per_s_per_rank": steady_tok / steady_t / world}
                  if world > 1 else {}),
               **({"plan_peak_gib": planned} if planned is not None else {})})


def _planned_peak_gib(recipe: Recipe, config: Any, ctx: Any, data: list[PairTokens],
                      world: int) -> float | None:
    """What `qdpo plan` predicts for the largest micro-batch this run made (the budget, or a
    longer pair alone), to set beside the measured peak."""
    from qdpo.batching import segment_cost
    from qdpo.memory import Settings, Shape, estimate

    if not ctx.plan.max_tokens:
        return None
    tokens = max([ctx.plan.max_tokens] + [segment_cost(p, ctx.plan.layout) for p in data])
    return estimate(Shape.from_config(config), Settings.from_recipe(recipe, world),
                    tokens).peak / GIB


def results_table(results: list[BenchResult]) -> Any:
    from rich.table import Table

    t = Table(title="qdpo bench", title_justify="left")
    left = ("tool", "shape", "layout", "reference")
    for col in left + ("tokens/s", "e2e tokens/s", "step s", "ref s", "peak alloc GiB",
                       "plan GiB", "peak reserved GiB", "MFU", "padding"):
        t.add_column(col, justify="left" if col in left else "right")

    def g(v: float | None, f: str) -> str:
        return "-" if v is None else format(v, f)

    for r in results:
        ranks = r.extra.get("ranks", 1)
        tokens = f"{r.tokens_per_s:,.0f}" + (
            f" ({r.extra['tokens_per_s_per_rank']:,.0f} per rank)" if ranks > 1 else "")
        tool = r.extra.get("tool", "qdpo") + (f" x{ranks} ranks" if ranks > 1 else "")
        t.add_row(tool, r.shape, r.layout, r.reference, tokens,
                  f"{r.e2e_tokens_per_s:,.0f}", f"{r.step_time_s:.2f}", f"{r.reference_s:.1f}",
                  g(r.peak_alloc_gib, ".2f"), g(r.extra.get("plan_peak_gib"), ".2f"),
                  g(r.peak_reserved_gib, ".2f"),
                  g(r.mfu, ".1%"), f"{r.padding_fraction:.0%}")
    return t


def write_json(results: list[BenchResult], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in results], indent=2))
