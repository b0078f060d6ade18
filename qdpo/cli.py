"""The `qdpo` command: a thin typer shell over the library.

Each command parses its arguments, calls the library and prints. User mistakes (QdpoError) end
with one message and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from qdpo import __version__
from qdpo.errors import QdpoError, interrupted_while_starting

# The command shows its own progress: the hub's, transformers' and datasets' bars ("Writing
# model shards", "Generating train split") would interleave with it. Read when they import.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _flags_without_type(option_class: Any) -> None:
    """Help lists `--overwrite`, not `--overwrite <bool>`: a flag takes no value."""
    shown = getattr(option_class, "display_type_rich", None)
    if shown is None:  # typer before 0.2x shows no type for flags: nothing to hide
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    option_class.display_type_rich = display_type_rich


_flags_without_type(typer.core.TyperOption)
app = typer.Typer(
    name="qdpo", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="QLoRA Direct Preference Optimization on one GPU: train, then merge, export, chat.")

_state = {"debug": False, "interrupt_reported": False, "signalled": False}

EXAMPLE_RECIPE = "recipes/quickstart.yaml"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qdpo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug or os.environ.get("QDPO_DEBUG") == "1"
    from qdpo import console as ui

    ui.install_cli_handler()  # the library logs; the command prints what it logs


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see `qdpo init`)."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="Recipe overrides as key.sub=value, e.g. train.learning_rate=1e-5 lora.r=32",
        show_default=False),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="[auto|PATH]",
        help="Continue the run in output.dir from its last checkpoint (plain --resume or "
             "--resume auto), or from a checkpoint directory.", show_default=False),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an existing run in output.dir."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Run directory (overrides output.dir)."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Train data-parallel on this many GPUs "
                             "of this machine (starts torchrun; the same result as one GPU)."),
) -> None:
    """Train LoRA adapters with DPO (or a relative) on a 4-bit base, as the recipe says."""
    from qdpo.recipe import load_recipe

    ov = list(overrides or [])
    if output is not None:
        ov.append(f"output.dir={output}")
    r = load_recipe(recipe, ov)  # a bad recipe stops here, before any process starts
    if gpus > 1:
        raise typer.Exit(_torchrun(gpus))
    from qdpo.train import train as run_train

    result = run_train(r, resume=resume, overwrite=overwrite)
    if result.interrupted:
        from qdpo import console as ui

        ui.info(f"resume with: {_continue_command(sys.argv[1:], result.run_dir)}")
        _state["interrupt_reported"] = True
        raise typer.Exit(130)


def _torchrun(gpus: int) -> int:
    """`qdpo train ... --gpus N` as `torchrun --standalone --nproc-per-node N -m qdpo train ...`:
    PyTorch's launcher starts the ranks, and stops them all if one fails."""
    import subprocess

    import torch

    from qdpo.distributed import launched

    if launched().active:
        raise QdpoError("--gpus starts torchrun itself; under torchrun, leave --gpus out.")
    found = torch.cuda.device_count()
    if found < gpus:
        raise QdpoError(f"--gpus {gpus}: this machine has {found} CUDA GPU(s). Use --gpus "
                        f"{max(found, 1)}, or torchrun directly (several nodes, or CPU "
                        "processes with gloo).")
    argv = sys.argv[1:]
    for i, a in enumerate(argv):  # the same command, without --gpus
        if a == "--gpus":
            del argv[i:i + 2]
            break
        if a.startswith("--gpus="):
            del argv[i]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={gpus}", "-m", "qdpo", *argv]
    return subprocess.call(cmd)


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    grid: Optional[list[str]] = typer.Argument(
        None, help="key=v1,v2,... is swept (the grid is the product, in the order given); plain "
                   "key=value applies to every run. A comma inside \\[...], {...} or quotes, or "
                   "written \\, (quote it for the shell), does not split: "
                   "loss.type=\\[sigmoid,sft],sigmoid is two values.", show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Sweep directory (default: the recipe's output.dir + '-sweep', "
                            "i.e. runs/<recipe name>-sweep).", show_default=False),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="", show_default=False,
        help="Finish an interrupted sweep: skip finished runs, continue the others from their "
             "checkpoints."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an existing sweep directory (only one holding "
                                        "a sweep.json and qdpo's run directories)."),
) -> None:
    """Train a grid of overrides one run after another (e.g. loss.beta=0.05,0.1,0.3
    train.learning_rate=5e-6,1e-5), sharing tokenization and the reference pass, then rank the
    runs by held-out reward accuracy and margin. Each run is a normal run directory; sweep.json
    records the grid, every run's status and metrics, and the best run."""
    from qdpo.sweep import run_sweep

    if resume not in (None, "auto"):
        raise QdpoError(f"--resume takes no value (got '{resume}'); the sweep directory is "
                        "--out or the default.")
    result = run_sweep(recipe, list(grid or []), out=out, resume=resume is not None,
                       overwrite=overwrite)
    if result.interrupted:
        import shlex

        from qdpo import console as ui

        ui.info("resume with: " + shlex.join(["qdpo", "sweep", str(recipe), *(grid or []),
                                              "--out", str(result.sweep_dir), "--resume"]))
        _state["interrupt_reported"] = True
        raise typer.Exit(130)


@app.command()
def init(
    path: Path = typer.Argument(Path("recipe.yaml"), help="Where to write the starter recipe."),
    model: str = typer.Option("meta-llama/Llama-3.1-8B-Instruct", help="model.name_or_path"),
    data: str = typer.Option("HuggingFaceH4/ultrafeedback_binarized", help="data.train"),
    overwrite: bool = typer.Option(False, "--overwrite", "--force",
                                   help="Replace an existing file."),
) -> None:
    """Write a commented starter recipe with every key, its default and its meaning."""
    from qdpo.recipe import starter_values, starter_yaml

    if path.exists() and not overwrite:
        raise QdpoError(f"'{path}' already exists; pass --overwrite to replace it or choose "
                        "another path.")
    text = starter_yaml(starter_values(model, data))
    path.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {path}; edit it, then run: qdpo train {path}")


def _optional_resume_value(argv: list[str]) -> list[str]:
    """Let `--resume` stand alone (meaning 'auto'), as in `qdpo train r.yaml --resume`."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("-") or "=" in nxt or nxt.endswith((".yaml", ".yml")):
                out.append("auto")
    return out


def _expand_home(argv: list[str]) -> list[str]:
    """`~/x` as the home folder where the shell left it alone: quoted (`-o '~/x'`) or after
    an option's `=` (`--out=~/x`), as recipe paths are; it used to make a folder named `~`."""
    out = []
    for a in argv:
        if a.startswith("~"):
            a = os.path.expanduser(a)
        elif len(a) > 2 and a[0] == "-" and a[1].isalpha() and a[2] == "~":  # -o~/x
            a = a[:2] + os.path.expanduser(a[2:])
        elif a.startswith("--") and "=~" in a:
            key, value = a.split("=", 1)
            a = f"{key}={os.path.expanduser(value)}"
        out.append(a)
    return out


@app.command()
def data(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Recipe overrides key.sub=value",
                                                    show_default=False),
    n: int = typer.Option(3, "-n", min=0, help="Rendered examples to show."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Tokenize again even if cached."),
) -> None:
    """Show what training will see: rendered examples with prompt/response boundaries, token
    length statistics, truncated, dropped and skipped pairs, tokens per epoch."""
    import time

    from rich.table import Table

    from qdpo import console as ui
    from qdpo.data import length_stats, prepare
    from qdpo.model import load_tokenizer
    from qdpo.recipe import load_recipe

    r = load_recipe(recipe, list(overrides or []))
    tok = load_tokenizer(r)
    t0 = time.monotonic()
    with ui.task_progress("tokenize", 0) as advance:
        d = prepare(r, tok, use_cache=not no_cache, progress=advance)
    dt = time.monotonic() - t0
    rep = d.train_report
    ui.info(f"train: {rep.summary()}")
    if not rep.cached:
        ui.info(f"tokenized {rep.pairs} pairs in {dt:.1f} s ({rep.pairs / max(dt, 1e-9):,.0f} "
                "pairs/s)")
    for ex in rep.example_lines():
        ui.info(f"  skipped {ex}")
    if d.eval_report is not None:
        ui.info(f"eval: {len(d.eval)} pairs")
    cuts = {tuple(c["prompt_ids"]): c for c in rep.cuts}  # the first pairs' cuts, marked
    for i, p in enumerate(d.train[:n]):
        t = _prompt_text(tok, p.prompt_ids, cuts.get(tuple(p.prompt_ids)))
        t.append("⟦chosen⟧", style="bold green")
        t.append(tok.decode(p.chosen_ids), style="green")
        t.append("\n")
        t.append("⟦rejected⟧", style="bold red")
        t.append(tok.decode(p.rejected_ids), style="red")
        ui.console.rule(f"example {i + 1}: {len(p.prompt_ids)} prompt, {len(p.chosen_ids)} "
                        f"chosen, {len(p.rejected_ids)} rejected tokens")
        ui.console.print(t)
    for i, cut in enumerate(rep.cuts):
        _show_cut(tok, i + 1, len(rep.cuts), cut)
    stats = length_stats(d.train)
    table = Table(title="token lengths (after truncation)", title_justify="left")
    for col in ("", "p50", "p95", "max"):
        table.add_column(col, justify="right")
    for name, v in stats.items():
        table.add_row(name, str(v["p50"]), str(v["p95"]), str(v["max"]))
    ui.console.print(table)
    per_epoch = sum(p.num_tokens for p in d.train)
    ui.console.print(ui.metrics_table("data summary", [
        ("train pairs", rep.pairs), ("eval pairs", len(d.eval)),
        ("rows skipped", sum(rep.skipped.values())),
        ("prompts cut (oldest content, head kept)",
         rep.prompt_truncated - rep.prompt_head_lost),
        ("prompts cut from the start (head too long to keep)", rep.prompt_head_lost),
        ("responses cut (max_length)", rep.response_truncated),
        ("pairs dropped (no room for a response)", rep.dropped_too_long),
        ("tokens per epoch (prompt+chosen + prompt+rejected)", per_epoch),
        ("optimizer steps per epoch", -(-rep.pairs // r.train.pairs_per_step)),
    ]))


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise QdpoError(f"{name} '{text}' is not a range like 128-512.") from None
    if not 1 <= a <= b <= MAX_BENCH_TOKENS:
        raise QdpoError(f"{name} '{text}' must be MIN-MAX with 1 <= MIN <= MAX <= "
                        f"{MAX_BENCH_TOKENS:,} (more than any model's context).")
    return a, b


MAX_BENCH_TOKENS = 131_072


def _check_output(path: Optional[Path], option: str, folder: bool) -> None:
    """An output path that cannot be written is said before the work, not after it."""
    if path is None:
        return
    if path.exists():
        if path.is_dir() != folder:
            raise QdpoError(f"{option} '{path}' is a {'file' if folder else 'folder'}; give "
                            f"{'a folder' if folder else 'a file name'}.")
    elif not folder and not path.parent.is_dir():
        raise QdpoError(f"{option} '{path}': the folder '{path.parent}' does not exist.")


def _device(text: str) -> str:
    """--device: cpu, cuda or cuda:N, checked before any work."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise QdpoError(f"--device '{text[:50]}': use cpu, cuda or cuda:N.")
    if text.startswith("cuda"):
        import torch

        have = torch.cuda.device_count()
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= have:
            raise QdpoError(f"--device {text}: this machine has {have} CUDA GPU(s) that torch "
                            "can use; use --device cpu" + (f" or cuda:0..{have - 1}" if have
                                                           else "") + ".")
    return text


@app.command()
def bench(
    recipe: Path = typer.Argument(..., help="Recipe YAML to benchmark."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Recipe overrides key.sub=value",
                                                    show_default=False),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Build the architecture from its config with random "
                                        "weights (quantized as usual): nothing to download."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Built-in architecture: "
                                        "llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, llama-3.1-70b, "
                                        "qwen2.5-7b, qwen2.5-1.5b, mistral-7b (implies random "
                                        "weights)."),
    steps: int = typer.Option(8, "--steps", help="Optimizer steps to run."),
    warmup: int = typer.Option(2, "--warmup", help="First steps not timed."),
    prompt_len: str = typer.Option("128-512", "--prompt-len", help="Prompt tokens, MIN-MAX."),
    response_len: str = typer.Option("64-512", "--response-len",
                                     help="Tokens of each response, MIN-MAX."),
    layouts: Optional[str] = typer.Option(
        None, "--layouts", help="Comma list of layouts to compare in one run, e.g. "
                                "padded,packed,shared_prefix (default: the recipe's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
    profile: Optional[Path] = typer.Option(
        None, "--profile", help="Profile the last step into this folder: profile.txt (time by "
                                "kernel) and trace.json.gz (open in ui.perfetto.dev)."),
    against: Optional[str] = typer.Option(
        None, "--against", help="trl: first run TRL's DPOTrainer on the same pairs, model and "
                                "settings, then print the ratios (pip install 'qdpo\\[compare]')."),
    match_memory: bool = typer.Option(
        False, "--match-memory", help="With --against trl: give qdpo the largest token budget "
                                      "per micro-batch that qdpo plan predicts to stay within "
                                      "TRL's measured peak memory (a CUDA device)."),
) -> None:
    """Time real training steps on synthetic pairs: tokens/s, step time, reference pass, memory,
    MFU."""
    from qdpo import console as ui
    from qdpo.bench import results_table, run_bench, write_json
    from qdpo.recipe import load_recipe

    results, pairs = [], None
    plen, rlen = _range(prompt_len, "--prompt-len"), _range(response_len, "--response-len")
    _check_output(json_out, "--json", folder=False)  # before minutes of benchmarking
    _check_output(profile, "--profile", folder=True)
    base = load_recipe(recipe, list(overrides or []))  # checked before anything loads
    if steps <= warmup:
        raise QdpoError(f"--steps ({steps}) must be larger than --warmup ({warmup}).")
    if match_memory and not against:
        raise QdpoError("--match-memory matches TRL's memory: use it with --against trl.")
    if match_memory:
        from qdpo import compare

        if not compare.measures_memory():  # before minutes of TRL
            raise QdpoError(compare.NO_PEAK)
    if shape:
        from qdpo.bench import cpu_warning

        warning = cpu_warning(shape, steps, plen, rlen, base.train.pairs_per_step)
        if warning:
            ui.warn(warning)
    from qdpo.distributed import launched

    if against and launched().active:
        raise QdpoError("--against trl runs both tools in one process: leave torchrun out.")
    if against:
        if against != "trl":
            raise QdpoError(f"--against '{against}': the only tool to compare with is trl.")
        from qdpo.compare import trl_baseline

        trl_row, pairs = trl_baseline(base, shape, steps, warmup, plen, rlen)
        results.append(trl_row)
        random_weights = True
        if match_memory:
            from qdpo.batching import segment_cost
            from qdpo.compare import budget_within

            # the cheapest layout's cost (shared-prefix rows); other layouts cost more
            longest = max(segment_cost(p, "shared_prefix") for p in pairs)
            tokens = budget_within(base, shape, trl_row, longest)
            overrides = list(overrides or []) + [f"train.max_tokens={tokens}"]
            base = load_recipe(recipe, overrides)
    for lay in (layouts.split(",") if layouts else [None]):
        r = load_recipe(recipe, list(overrides or []) + [f"train.layout={lay.strip()}"]) \
            if lay else base
        ui.info(f"bench: {shape or r.model.name_or_path} layout {r.train.layout}, {steps} "
                f"steps of {r.train.pairs_per_step} pairs")
        results.append(run_bench(r, steps=steps, warmup=warmup, shape=shape, prompt_len=plen,
                                 response_len=rlen,
                                 random_weights=random_weights or shape is not None,
                                 profile=profile / r.train.layout if profile else None,
                                 pairs=pairs))
        import gc

        gc.collect()
    if launched().rank:  # under torchrun rank 0 reports for the job
        return
    ui.console.print(results_table(results))
    if against:
        from qdpo.compare import ratio_lines

        for line in ratio_lines(results):
            ui.info(line)
    if json_out:
        write_json(results, json_out)
        ui.info(f"wrote {json_out}")


def _prompt_text(tok: Any, ids: list[int], cut: dict[str, Any] | None) -> Any:
    """A prompt as the model sees it; where it was cut, a visible mark where tokens went."""
    from rich.text import Text

    from qdpo import console as ui

    t = Text()
    if not cut or not cut["removed"]:
        t.append(tok.decode(ids), style="cyan")
        return t
    head = cut["head"]
    t.append(tok.decode(ids[:head]), style="cyan")
    t.append(f"⟦… {ui.plural(cut['removed'], 'token')} cut …⟧", style="bold yellow")
    t.append(tok.decode(ids[head:]), style="cyan")
    return t


def _show_cut(tok: Any, i: int, n: int, cut: dict[str, Any]) -> None:
    """A cut pair's prompt as the model sees it, with a visible mark where tokens went."""

    from qdpo import console as ui

    ids, head, removed = cut["prompt_ids"], cut["head"], cut["removed"]
    where = "after the template's head" if head and cut.get("head_kept", True) else \
        "from the start (BOS kept)" if head else "from the start"
    parts = [f"{ui.plural(removed, 'prompt token')} cut {where}"] if removed else []
    parts += [f"the last {ui.plural(cut[side + '_cut'], side + ' token')} cut"
              for side in ("chosen", "rejected") if cut[side + "_cut"]]
    ui.console.rule(f"cut {i} of the first {n}: row {cut['row']}: {', '.join(parts)}")
    t = _prompt_text(tok, ids, cut)
    for side in ("chosen", "rejected"):
        if cut[f"{side}_cut"]:
            t.append(f"\n⟦{side}: … its last {ui.plural(cut[side + '_cut'], 'token')} cut "
                     "(data.max_length)⟧", style="bold yellow")
    ui.console.print(t)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML to plan."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Recipe overrides key.sub=value",
                                                    show_default=False),
    gpu_memory: str = typer.Option("24GiB", "--gpu-memory", help="The card's memory, e.g. 24GiB."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Built-in architecture instead of "
                                        "the recipe's model (as in qdpo bench)."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Cards the job runs on: with train.fsdp "
                                                      "they share the weights."),
) -> None:
    """Predict peak GPU memory from the model's config, before downloading weights: the largest
    train.max_tokens that fits, the longest pair, and what to change if it does not fit."""
    from rich.table import Table

    from qdpo import console as ui
    from qdpo.bench import bench_config
    from qdpo.memory import parse_gib, plan_for
    from qdpo.recipe import load_recipe

    try:
        gib = parse_gib(gpu_memory)
    except ValueError:
        raise QdpoError(f"--gpu-memory '{gpu_memory}' is not a size like 24GiB.") from None
    r = load_recipe(recipe, list(overrides or []))
    p = plan_for(r, bench_config(r, shape), gib, gpus)
    cards = f"each of {gpus} {gib:g} GiB cards" if gpus > 1 else f"a {gib:g} GiB card"
    if gpus > 1:
        cards += ", weights sharded (train.fsdp)" if r.train.fsdp else ", data parallel"
    table = Table(title=f"qdpo plan: {shape or r.model.name_or_path} on {cards}, "
                        f"micro-batches of {p.peak_tokens:,} tokens ({p.budget})",
                  title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part, value in p.estimate.parts_gib().items():
        table.add_row(part, f"{value:.2f}")
    ui.console.print(table)
    if p.max_tokens:
        ui.info(f"train.max_tokens up to {p.max_tokens:,} fits (auto picks it), so the longest "
                f"pair that fits has {p.max_tokens:,} tokens as train.layout counts them "
                f"(shared-prefix rows, the GPU default: prompt and both responses); the "
                f"longest pair data.max_length {r.data.max_length} allows takes "
                f"{p.longest_pair:,} tokens.")
    if p.fits:
        ui.info("fits.")
        return
    ui.warn("does not fit: " + "; ".join(p.advice(r)) + ".")
    raise typer.Exit(1)


_TRUST = typer.Option(False, "--trust-remote-code", help="Allow the model's own code from "
                                                          "its repository to run (a run's "
                                                          "recipe.yaml never implies it).")


@app.command()
def merge(
    run: Path = typer.Argument(..., help="Run directory, checkpoint, or peft adapter directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged model."),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
    from_nf4: bool = typer.Option(
        False, "--from-nf4", help="Merge onto the NF4-dequantized base the adapter was trained "
                                  "against, instead of the original base weights."),
    device: str = typer.Option("cpu", "--device", help="Where to merge: cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    trust_remote_code: bool = _TRUST,
) -> None:
    """Merge the adapter into a full-precision base: a standard transformers model."""
    from qdpo.export import merge as do_merge

    do_merge(run, out, dtype=dtype, from_nf4=from_nf4, overwrite=overwrite, device=_device(device),
             trust_remote_code=trust_remote_code)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run directory, checkpoint, or peft adapter directory."),
    fmt: str = typer.Option(..., "--format", "-f", help="peft, gguf-lora or gguf (gguf also "
                            "writes an Ollama Modelfile beside the file)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (peft) or file (gguf; "
                             "its Modelfile goes in the same folder)."),
    outtype: str = typer.Option(
        "f16", "--outtype", help="GGUF tensor type: f32, f16, bf16, q8_0, or the llama.cpp "
                                 "k-quant mixes q4_k_m, q5_k_m, q6_k (gguf only; gguf-lora "
                                 "takes f32, f16 or bf16)."),
    from_nf4: bool = typer.Option(False, "--from-nf4", help="gguf: merge onto the dequantized "
                                                            "NF4 base."),
    device: str = typer.Option("cpu", "--device", help="gguf: where to merge."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    trust_remote_code: bool = _TRUST,
) -> None:
    """Export the adapter (peft, llama.cpp GGUF LoRA) or the merged model (GGUF)."""
    from qdpo.export import export as do_export

    do_export(run, fmt, out, outtype=outtype, overwrite=overwrite, from_nf4=from_nf4,
              device=_device(device), trust_remote_code=trust_remote_code)


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int,
              repetition_penalty: float, seed: Optional[int]):
    from qdpo.chat import Sampling

    if seed is not None and not 0 <= seed < 2**63:
        raise QdpoError(f"--seed {seed}: use a number between 0 and 2**63 - 1.")
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1 or max_new_tokens < 1 \
            or not 0 < repetition_penalty < math.inf or top_k < 0:
        raise QdpoError("Sampling options: --temperature >= 0 and finite, 0 < --top-p <= 1, "
                        "--top-k >= 0, --repetition-penalty > 0, "
                        "--max-new-tokens >= 1.")
    return Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)


def _generator(run: Path, quantize: bool, compare: bool = False, trust: bool = False):
    from qdpo.chat import Generator
    from qdpo.model import load_trained
    from qdpo.rundir import open_trained

    src = open_trained(run, allow_plain=True, trust_remote_code=trust)
    if compare and not src.has_adapter:
        raise QdpoError(f"'{run}' is a plain model (no adapter_config.json), so there is no base "
                        "to compare it with: --compare needs a qdpo run, checkpoint or adapter. "
                        "Run without --compare.")
    model, tok = load_trained(src, quantize=quantize)
    return Generator(model, tok, src.recipe, source=src)


_MAX_NEW = typer.Option(256, "--max-new-tokens", help="Longest reply in tokens.")
_TEMP = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 = greedy.")
_TOP_P = typer.Option(0.9, "--top-p", help="Nucleus sampling mass.")
_TOP_K = typer.Option(0, "--top-k", help="Top-k sampling (0 = off).")
_REP = typer.Option(1.0, "--repetition-penalty", help="Repetition penalty (1 = off).")
_SEED = typer.Option(None, "--seed", help="Seed for reproducible sampling.")
_NO_Q = typer.Option(False, "--no-quantize", help="Load the base in full precision instead of "
                                                  "4-bit.")


@app.command()
def chat(
    run: Path = typer.Argument(..., help="Run directory, checkpoint, peft adapter, or "
                                          "plain (e.g. merged) model directory."),
    compare: bool = typer.Option(False, "--compare", help="Answer every turn twice, base "
                                                          "(adapters off) and tuned, each with "
                                                          "its own history, side by side."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = _MAX_NEW, temperature: float = _TEMP, top_p: float = _TOP_P,
    top_k: int = _TOP_K, repetition_penalty: float = _REP, seed: Optional[int] = _SEED,
    no_quantize: bool = _NO_Q, trust_remote_code: bool = _TRUST,
) -> None:
    """Chat with the tuned model in the terminal (/reset, /system TEXT, /exit; Ctrl-C stops a
    reply, and quits at the prompt)."""
    from qdpo.chat import chat_loop

    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    gen = _generator(run, not no_quantize, compare, trust_remote_code)
    if system:
        gen.system_prompt = system
    chat_loop(gen, sampling, compare=compare)


@app.command()
def generate(
    run: Path = typer.Argument(..., help="Run directory, checkpoint, peft adapter, or "
                                          "plain (e.g. merged) model directory."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="jsonl with a 'prompt' (text or "
                                                              "messages) per line, or a .txt "
                                                              "file, one prompt per line."),
    out: Path = typer.Option(..., "--out", "-o", help="Output jsonl."),
    compare: bool = typer.Option(False, "--compare", help="Also generate with the base "
                                                          "(base_response)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generate call."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    max_new_tokens: int = _MAX_NEW, temperature: float = _TEMP, top_p: float = _TOP_P,
    top_k: int = _TOP_K, repetition_penalty: float = _REP, seed: Optional[int] = _SEED,
    no_quantize: bool = _NO_Q, trust_remote_code: bool = _TRUST,
) -> None:
    """Generate replies for a file of prompts, to jsonl (each row keeps its other fields)."""
    from qdpo import console as ui
    from qdpo.chat import generate_file, read_prompts

    if out.exists() and not overwrite:
        raise QdpoError(f"Output '{out}' already exists; pass --overwrite to replace it.")
    read_prompts(prompts)  # fail on a bad file before loading the model
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    gen = _generator(run, not no_quantize, compare, trust_remote_code)
    n = generate_file(gen, prompts, out, sampling, compare=compare, batch_size=batch_size)
    ui.info(f"wrote {n} generations to {out}")


@app.command()
def pairs(
    prompts: Path = typer.Argument(..., help="Prompts: a text file (one per line), or jsonl "
                                             "with a 'prompt' (text or messages) per line."),
    out: Path = typer.Option(..., "--out", "-o", help="Output jsonl of prompt/chosen/rejected "
                                                      "pairs, as qdpo train reads it."),
    model: str = typer.Option(..., "--model", "-m", help="What answers: a run directory, "
                              "checkpoint, peft adapter, model directory, recipe YAML (the "
                              "model its training starts from) or hub id."),
    judge: str = typer.Option("human", "--judge", help="human (pick the better of two answers "
                              "in the terminal), or a reward model directory (a sequence "
                              "classifier with one output: its best answer against its worst)."),
    n: Optional[int] = typer.Option(None, "-n", help="Answers sampled per prompt (default 4; 2 "
                                                     "with --judge human, who compares two).",
                                    show_default=False),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generate call."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again: replace an "
                                                              "existing output and its progress."),
    max_new_tokens: int = _MAX_NEW,
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (above "
                                      "0: the answers must differ)."),
    top_p: float = _TOP_P, top_k: int = _TOP_K, repetition_penalty: float = _REP,
    seed: Optional[int] = _SEED, no_quantize: bool = _NO_Q, trust_remote_code: bool = _TRUST,
) -> None:
    """Make on-policy preference pairs: sample answers per prompt, let a human or a reward
    model pick chosen and rejected. Progress is kept after every choice; run the same command
    again to go on where it stopped."""
    from qdpo.make_pairs import make_pairs

    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
    make_pairs(prompts, out, model, judge=judge, n=n, sampling=sampling, batch_size=batch_size,
               overwrite=overwrite, quantize=not no_quantize,
               trust_remote_code=trust_remote_code)


@app.command(name="eval")
def eval_cmd(
    run: Path = typer.Argument(..., help="Run directory, checkpoint, peft adapter directory, "
                                         "or (with --reference) a merged model."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="Overrides of the run's recipe as key.sub=value, as for train, e.g. "
                   "data.columns.prompt=Question", show_default=False),
    data: list[str] = typer.Option(..., "--data", "-d", help="Data source (file, glob or hub "
                                                              "id); repeat for several."),
    split: str = typer.Option("train", "--split", help="Split: of a hub data set, or of a "
                              "local folder's files (e.g. test_prefs for data/test_prefs-*)."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", min=1,
                                            help="Evaluate at most N pairs."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    reference: Optional[str] = typer.Option(
        None, "--reference", help="Another model as the reference: the base a merged model "
                                  "came from (directory or hub id), or another run."),
    trust_remote_code: bool = _TRUST,
) -> None:
    """Preference metrics of the trained policy against its reference on a data set."""
    import json as _json

    from qdpo import console as ui
    from qdpo.recipe import DataSource
    from qdpo.evaluate import evaluate_run

    if json_out:  # keep stdout pure JSON: progress and notes go to stderr
        ui.install_cli_handler(ui.err_console)
    for d in data:  # a missing file is said before the model loads (a relative path may
        # still be found beside the run's recipe, later)
        p = Path(d).expanduser()
        if p.is_absolute() and p.suffix in (".jsonl", ".json", ".csv", ".parquet") and \
                not any(c in d for c in "*?[") and not p.exists():
            raise QdpoError(f"--data '{d}' does not exist.")
    # a path that exists from here means this file, not one beside the run's recipe
    srcs = [DataSource(path=str(Path(d).resolve()) if Path(d).exists() else d, split=split)
            for d in data]
    res = evaluate_run(run, srcs, max_pairs, overrides=overrides or [],
                       trust_remote_code=trust_remote_code, reference=reference)
    from qdpo.distributed import launched

    if launched().rank:  # under torchrun rank 0 reports for the job
        return
    if json_out:
        typer.echo(_json.dumps(res, indent=2))
        return
    order = ["pairs", "rewards/accuracies", "rewards/margins", "rewards/chosen",
             "rewards/rejected", "loss", "logps/chosen", "logps/rejected", "logps/ref_chosen",
             "logps/ref_rejected"]
    rows = [(k, res[k]) for k in order if k in res] + \
        [(k, v) for k, v in res.items() if k not in order]
    ui.console.print(ui.metrics_table(f"qdpo eval: {run}", rows))


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., metavar="RUN...",
                                      help="Run directories or sweep directories (a sweep "
                                           "counts as its runs), overlaid in one page."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file that "
                                                              "is not a qdpo report."),
) -> None:
    """Write one self-contained HTML page (no network needed to view it): training and eval
    curves of the runs overlaid, the held-out margin distribution, sample answers at each eval,
    recipes and summaries."""
    from qdpo import console as ui
    from qdpo.report import write_report

    ui.info(f"wrote {write_report(runs, out, overwrite)}")


def main() -> None:
    """Console-script entry point: runs the app and turns user errors into one message."""
    _state["interrupt_reported"] = False  # main() runs again in-process (tests, scripts)
    _state["signalled"] = False
    try:  # the first second of every command: rich, torch
        import warnings

        from qdpo import console as ui

        ui.install_cli_handler()
    except KeyboardInterrupt:
        interrupted_while_starting()
    # library deprecation chatter (transformers renames, peft internals) is not for users
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        rc = app(args=_optional_resume_value(_expand_home(sys.argv[1:])), prog_name="qdpo",
                 standalone_mode=False)
        if rc == 130 and not _state["interrupt_reported"]:  # typer's silent Ctrl-C exit
            _say_interrupted()
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except QdpoError as e:
        if _state["signalled"]:  # the error is how a library reported the interrupt
            _say_interrupted()
        if _state["debug"]:
            raise
        ui.error(_clipped(str(e)))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _say_interrupted()
    except SystemExit:
        raise
    except Exception as e:  # click's own usage errors come here in non-standalone mode
        try:
            from typer._click import exceptions as click_exc  # typer >= 0.2x vendors click
        except ImportError:
            from click import exceptions as click_exc

        if isinstance(e, typer.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click_exc.ClickException):
            _show_usage_error(e, click_exc)
            sys.exit(e.exit_code)
        if isinstance(e, typer.Abort):
            ui.error("aborted")
            sys.exit(130)
        if _state["signalled"]:
            _say_interrupted()
        if _state["debug"]:
            raise
        if _another_rank_failed(e):
            ui.error("stopped: another rank of this job failed first (its message says why)")
            sys.exit(1)
        disk = _disk_problem(e)
        if disk:
            ui.error(disk)
            sys.exit(2)
        ui.error(f"{type(e).__name__}: {_clipped(str(e))}\n(this is a bug in qdpo or an unexpected "
                 "environment; run with --debug for the traceback and report it)")
        sys.exit(1)


def _say_interrupted() -> NoReturn:
    """An interrupted command, however it reached main(): what was kept, how to go on."""
    from qdpo import console as ui

    ui.error("interrupted" + _continue_hint(sys.argv[1:]))
    sys.exit(130)


def _show_usage_error(e: Any, click_exc: Any) -> None:
    """click's errors in qdpo's own form (`error: ...`, not click's `Error: ...`), after the
    command's usage line, with where to read more."""
    from qdpo import console as ui

    ctx = getattr(e, "ctx", None)
    message = e.format_message()
    if isinstance(e, click_exc.UsageError) and ctx is not None:
        print(ctx.get_usage(), file=sys.stderr)
        message += f" (see {ctx.command_path} --help)"
    ui.error(message)


def _another_rank_failed(e: BaseException) -> bool:
    """Under torchrun: a collective broke because a peer process exited (gloo's "Connection
    closed by peer", NCCL's DistBackendError); that rank has said what went wrong."""
    import torch

    from qdpo.distributed import launched

    if not launched().active:
        return False
    text = str(e)
    return isinstance(e, torch.distributed.DistBackendError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer"))


def _clipped(message: str, limit: int = 2000) -> str:
    """A message that quotes a user's value whole (a 2 MB string, an alias bomb) stays
    readable: its head and tail, and how much was cut between."""
    if len(message) <= limit:
        return message
    cut = len(message) - limit
    return f"{message[:limit // 2]} … ({cut:,} characters cut) … {message[-limit // 2:]}"


def _terminate_like_ctrl_c() -> None:
    """SIGTERM (a scheduler, `kill`, a closing terminal) stops a command as Ctrl-C does: with
    a message, and in training after the step's checkpoint (guards.Interrupt), instead of
    killing the process mid-write with nothing said."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        # remembered: a library may turn the KeyboardInterrupt into an error of its own
        # (transformers' lazy imports raise "Could not import module ...")
        _state["signalled"] = True
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread (a library caller's own loop)
        pass


_terminate_like_ctrl_c()  # from the moment the CLI is imported


def _continue_hint(argv: list[str]) -> str:
    """What an interrupted command kept, and how to go on (for `train`)."""
    if "train" not in argv:
        return ""
    return "; checkpoints already written are kept. Continue with: " + _continue_command(argv)


def _continue_command(argv: list[str], run_dir: Path | None = None) -> str:
    """The exact command that continues an interrupted `qdpo train ARGV`: the same arguments,
    without --overwrite, with --resume (the last checkpoint, or a fresh start in the same
    directory when none was written yet), and the run's directory when the command line did
    not name it. Under torchrun, with torchrun in front."""
    import shlex

    from qdpo.distributed import launched

    args = [a for a in argv if a != "--overwrite"]
    named = any(a in ("-o", "--output") or a.startswith(("--output=", "output.dir="))
                for a in args)
    if run_dir is not None and not named:
        args += ["-o", str(run_dir)]
    if "--resume" not in args:
        args.append("--resume")
    r = launched()
    head = ["torchrun", f"--nproc-per-node={r.world}", "-m", "qdpo"] if r.active else ["qdpo"]
    return shlex.join([*head, *args])


def _disk_problem(e: BaseException) -> str | None:
    """A file system refusing a write (full, read-only, no permission) as one message saying
    what to do: not a bug, and what was saved before stays usable."""
    import errno

    fixes = {errno.ENOSPC: "the disk is full: free some space",
             errno.EDQUOT: "the disk quota is used up: free some space",
             errno.EROFS: "the file system is read-only: choose a writable output directory",
             errno.EACCES: "permission denied: choose a directory you can write to",
             errno.EPERM: "permission denied: choose a directory you can write to"}
    # a path the user gave that cannot be what it has to be: a parent that is a file, a
    # folder where a file goes, a missing folder
    paths = {errno.ENOTDIR: "a part of the path is a file, not a folder",
             errno.EISDIR: "it is a folder; give a file name",
             errno.EEXIST: "a file is in the way (a part of the path is a file, not a folder)",
             errno.ENOENT: "it, or the folder it goes in, does not exist",
             errno.ENAMETOOLONG: "the name is too long"}
    from qdpo.files import disk_full, short_error

    if disk_full(e) and not isinstance(e, OSError):  # safetensors, torch's zip writer
        from qdpo.cache import cache_dir

        return (f"Cannot write: the disk is full ({_clipped(short_error(e), 300)}). Free some "
                f"space (qdpo's cache, {cache_dir()}, can be cleared: it is rebuilt when "
                "needed) and run the command again. Earlier checkpoints and outputs are "
                "untouched; a training run continues from its last checkpoint with --resume.")
    if not isinstance(e, OSError) or e.errno not in {**fixes, **paths}:
        return None
    where = f" '{e.filename}'" if e.filename else ""
    if e.errno in paths:
        return f"Cannot use the path{where}: {paths[e.errno]}."
    return (f"Cannot write{where}: {fixes[e.errno]}. Earlier checkpoints and outputs are "
            "untouched; a training run continues from its last checkpoint with --resume.")


if __name__ == "__main__":
    main()
