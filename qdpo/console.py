"""What the user sees and what is written down: messages, rich progress, tables, metric sinks.

The library never prints: `info`, `warn` and `error` log through `logging.getLogger("qdpo")`.
The CLI installs `ConsoleHandler` (`install_cli_handler`), which prints them with rich, and only
then do progress bars and the live training display appear; a Python user sees what their
logging configuration shows (warnings by default, `logging.basicConfig(level=logging.INFO)`
for the rest). Metrics always go to `metrics.jsonl` (one JSON object per logged step);
TensorBoard too when asked for and installed. The live display falls back to plain lines when
stdout is not a terminal (CI, `nohup`, pipes), so logs stay readable.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

def make_console(stream: Any, stderr: bool) -> Console:
    """A terminal wraps long lines at word boundaries to its width; logs (CI, pipes) get one
    line per message and a wide virtual width, so tables are not squeezed into 80 columns."""
    tty = stream.isatty()
    return Console(stderr=stderr, highlight=False, soft_wrap=not tty,
                   width=None if tty else 150)


console = make_console(sys.stdout, stderr=False)
err_console = make_console(sys.stderr, stderr=True)

log = logging.getLogger("qdpo")


def info(msg: str) -> None:
    log.info(msg)


def warn(msg: str) -> None:
    log.warning(msg)


def error(msg: str) -> None:
    log.error(msg)


class ConsoleHandler(logging.Handler):
    """The CLI's handler: messages on `output` (stdout, or stderr when stdout carries JSON),
    warnings and errors on stderr. Messages are plain text, never rich markup."""

    def __init__(self, output: Console):
        super().__init__(logging.INFO)
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        msg = escape(record.getMessage())
        if record.levelno >= logging.ERROR:
            err_console.print(f"[bold red]error:[/] {msg}")
        elif record.levelno >= logging.WARNING:
            err_console.print(f"[yellow]warning:[/] {msg}")
        else:
            self.output.print(msg)


class RankErrors(logging.StreamHandler):
    """Under torchrun, ranks other than 0 say only what went wrong, and which rank they are."""

    def __init__(self, rank: int):
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(f"rank {rank}: %(message)s"))


def install_cli_handler(output: Console | None = None) -> None:
    """Let the CLI own the terminal: messages printed by rich, progress bars and the live
    display on `output` (stdout by default). Calling it again replaces the handler. Under
    torchrun only rank 0 talks (the others print errors only, and no progress)."""
    from qdpo.distributed import launched

    for h in [h for h in log.handlers if isinstance(h, (ConsoleHandler, RankErrors))]:
        log.removeHandler(h)
    rank = launched().rank
    log.addHandler(ConsoleHandler(output or console) if rank == 0 else RankErrors(rank))
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    log.propagate = False  # a root handler the user configured would print everything twice


def _cli_output() -> Console | None:
    """The console the CLI prints to, or None when qdpo runs as a library."""
    return next((h.output for h in log.handlers if isinstance(h, ConsoleHandler)), None)


def show(renderable: Any) -> None:
    """A table or other rich renderable: printed by the CLI, logged as text by the library."""
    out = _cli_output()
    if out is not None:
        out.print(renderable)
        return
    buf = io.StringIO()
    Console(file=buf, width=150, highlight=False).print(renderable)
    log.info(buf.getvalue().rstrip())


def fmt(v: Any, key: str = "") -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if key.endswith(("lr", "learning_rate")):
            return f"{v:.2e}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


class JsonlSink:
    def __init__(self, path: Path):
        self.path = path
        self.f = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class TensorBoardSink:
    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.w = SummaryWriter(str(path))

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.w.add_scalar(k, v, step)

    def close(self) -> None:
        self.w.close()


class WandbSink:
    """Weights & Biases: one W&B run per qdpo run, named after its directory, with the recipe
    as its config; its files go into the run directory. WANDB_MODE=offline needs no network
    (`wandb sync` uploads later)."""

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]):
        import wandb  # needs the wandb package

        from qdpo.errors import QdpoError

        try:
            self.run = wandb.init(project=str(project), name=run_dir.name, dir=str(run_dir),
                                  config=config, reinit="finish_previous")
        except Exception as e:  # not logged in, no network, a bad project name
            raise QdpoError(f"Weights & Biases did not start a run for output.wandb "
                            f"'{project}': {type(e).__name__}: {str(e)[:300]}. Log in with "
                            "`wandb login`, set WANDB_MODE=offline to log without network, or "
                            "leave output.wandb unset.") from None

    def write(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """Every metric record goes to each sink: metrics.jsonl, and TensorBoard and W&B when
    asked for."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for s in self.sinks:
            s.write(record)


@contextlib.contextmanager
def metric_sinks(run_dir: Path, tensorboard: bool, wandb_project: str | None = None,
                 config: dict[str, Any] | None = None) -> Iterator[MetricSinks]:
    """The run's metric files, closed however the run ends."""
    sinks: list[Any] = [JsonlSink(run_dir / "metrics.jsonl")]
    if tensorboard:
        try:
            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        except ImportError:
            warn("output.tensorboard is on but tensorboard is not installed "
                 "(pip install 'qdpo[tensorboard]'); writing metrics.jsonl only.")
    if wandb_project:
        try:
            sinks.append(WandbSink(run_dir, wandb_project, config or {}))
        except ImportError:
            warn("output.wandb is set but wandb is not installed (pip install 'qdpo[wandb]'); "
                 "writing metrics.jsonl only.")
    try:
        yield MetricSinks(sinks)
    finally:
        for s in sinks:
            s.close()


class _Stats(ProgressColumn):
    def render(self, task: Any) -> Text:
        s = task.fields.get("stats", "")
        return Text(s, style="cyan")


class TrainDisplay:
    """Progress bar with ETA and the latest loss, reward accuracy, margin, tokens/s, memory."""

    def __init__(self, total_steps: int, start_step: int = 0, live: bool | None = None):
        self.total = total_steps
        out = _cli_output()
        self.live = (out is not None and out.is_terminal) if live is None else live
        self.last_print = 0.0
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), _Stats(),
                console=out or console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               stats="")
            self.progress.start()

    @staticmethod
    def stats_line(m: dict[str, Any]) -> str:
        parts = [f"loss {m.get('loss', float('nan')):.4f}"]
        if "rewards/accuracies" in m:
            parts.append(f"acc {m['rewards/accuracies']:.2f}")
        if "rewards/margins" in m:
            parts.append(f"margin {m['rewards/margins']:.3f}")
        if "tokens_per_s" in m:
            parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
        if m.get("mem/peak_alloc_gib"):
            parts.append(f"{m['mem/peak_alloc_gib']:.1f} GiB")
        return "  ".join(parts)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        line = self.stats_line(metrics)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=line)
            return
        now = time.monotonic()
        if now - self.last_print >= 5 or step in (1, self.total):
            self.last_print = now
            info(f"step {step}/{self.total}  {line}")

    def message(self, msg: str) -> None:
        info(msg)  # the handler prints above a live bar

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __enter__(self) -> "TrainDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:  # the terminal is left clean however the run ends
        self.close()


@contextlib.contextmanager
def task_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar for a one-off pass (reference log-probs, tokenization), shown
    only by the CLI on a terminal."""
    out = _cli_output()
    if out is None or not out.is_terminal:
        yield lambda k: None
        return
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=out, transient=True) as prog:
        task = prog.add_task(label, total=total or None)
        yield lambda k: prog.advance(task, k)


def metrics_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, fmt(v, k))
    return t


# ---------------------------------------------------------------------------------------
# What a training run says: data, model, plan, evals, the summary
# ---------------------------------------------------------------------------------------

def data_report(data: Any) -> None:
    info(f"data: {data.train_report.summary()}")
    for ex in data.train_report.example_lines()[:3]:
        info(f"  skipped {ex}")
    if data.eval:
        info(f"eval: {plural(len(data.eval), 'held-out pair')}")


def model_banner(recipe: Any, minfo: Any) -> None:
    q = recipe.model.quantization
    info(f"model: {recipe.model.name_or_path} ({q if q != 'none' else 'not quantized'}, "
         f"{minfo.quantized_layers} 4-bit layers) on {minfo.device.type}, compute "
         f"{str(minfo.dtype).removeprefix('torch.')}; LoRA r={minfo.lora_r} alpha "
         f"{minfo.lora_alpha:g} dropout {minfo.lora_dropout:g}"
         + (f" (from {recipe.lora.init_adapter})" if recipe.lora.init_adapter else "") + ": "
         f"{minfo.trainable_params:,} trainable of {minfo.total_params:,} params")
    if recipe.needs_reference:
        info(f"reference: same weights, {minfo.reference} (no second copy)")
    else:
        info(f"reference: none needed by {', '.join(recipe.loss_types)} (no reference pass)")


def plan_banner(plan: Any, pairs_per_step: int, steps: int) -> None:
    size = (f"{plural(plan.max_tokens, 'token')} per micro-batch" if plan.max_tokens else
            f"{plural(plan.pairs_per_micro, 'pair')} per micro-batch")
    info(f"layout: {plan.layout} ({plan.kernel} attention), {size}, "
         f"{plural(pairs_per_step, 'pair')} per step, {plural(steps, 'step')}")


def eval_line(label: str, ev: dict[str, float]) -> str:
    return (f"{label}: acc {ev['rewards/accuracies']:.3f}  margin {ev['rewards/margins']:.3f}  "
            f"loss {ev['loss']:.4f}")


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def chance_p_value(correct: int, n: int) -> float:
    """One-sided binomial test: the probability of `correct` or more right out of `n` by coin
    flips (what a held-out accuracy must beat to mean something)."""
    if n <= 0:
        return 1.0

    def log_pmf(k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)

    return min(1.0, sum(math.exp(log_pmf(k)) for k in range(max(0, correct), n + 1)))


def accuracy_verdict(acc: float, n: int) -> str:
    p = chance_p_value(round(acc * n), n)
    if p < 1e-3 and acc >= 0.9:
        return "clearly above chance"
    if p < 0.05:
        return f"above chance (p = {p:.2g})"
    if acc > 0.5:
        return (f"not distinguishable from chance with {plural(n, 'pair')} (p = {p:.2g}); "
                "evaluate on more pairs")
    return "near chance: the preference was not learned"


def _reference_row(result: Any, recipe: Any) -> str:
    if not recipe.needs_reference:
        return f"none ({', '.join(recipe.loss_types)} is reference-free)"
    if recipe.train.reference == "online":
        return "online, every step"
    if getattr(result, "reference_reused", False):
        return "reused from cache"
    return f"precomputed once, {result.reference_seconds:.1f} s"


def average_tokens_per_s(history: list[dict[str, Any]]) -> float | None:
    """The run's throughput: all tokens over all step time (not the last step's)."""
    seconds = sum(h.get("step_time_s", 0.0) for h in history)
    return sum(h.get("tokens", 0) for h in history) / seconds if seconds else None


def run_summary(result: Any, recipe: Any, seconds: float) -> None:
    """The table at the end of a run, and what to make of it."""
    rows: list[tuple[str, Any]] = [("steps", result.steps), ("time", f"{seconds:.0f} s"),
                                   ("reference pass", _reference_row(result, recipe))]
    for k in ("loss", "rewards/accuracies", "rewards/margins"):
        if k in result.last_train:
            rows.append((f"train {k}", result.last_train[k]))
    speed = average_tokens_per_s(result.history)
    if speed:
        rows.append(("train tokens/s (average)", speed))
    if "mem/peak_alloc_gib" in result.last_train:
        rows.append(("train mem/peak_alloc_gib", result.last_train["mem/peak_alloc_gib"]))
    for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
              "rewards/rejected"):
        if k in result.final_eval:
            rows.append((f"eval {k}", result.final_eval[k]))
    show(metrics_table("qdpo run summary", rows))
    if result.interrupted:
        warn(f"interrupted at step {result.steps}; the checkpoint is in {result.run_dir}")
        return
    acc = result.final_eval.get("rewards/accuracies")
    if acc is not None:
        n = int(result.final_eval["pairs"])
        info(f"held-out reward accuracy {acc:.3f} over {plural(n, 'pair')}: "
             f"{accuracy_verdict(acc, n)}")
    info(f"adapter saved to {result.run_dir} (peft format; "
         f"PeftModel.from_pretrained(base, '{result.run_dir}'))")
