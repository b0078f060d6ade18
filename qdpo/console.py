"""What the user sees and what is written down: rich progress, tables, messages, metric sinks.

Metrics always go to `metrics.jsonl` (one JSON object per logged step); TensorBoard too when
asked for and installed. The live display falls back to plain lines when stdout is not a
terminal (CI, `nohup`, pipes), so logs stay readable.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

# Logs (CI, pipes) get a wide virtual terminal so tables are not squeezed into 80 columns.
_WIDTH = None if sys.stdout.isatty() else 150
console = Console(stderr=False, highlight=False, soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=_WIDTH)


def info(msg: str) -> None:
    console.print(msg)


def warn(msg: str) -> None:
    err_console.print(f"[yellow]warning:[/] {msg}")


def error(msg: str) -> None:
    err_console.print(f"[bold red]error:[/] {msg}")


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


def open_sinks(run_dir: Path, tensorboard: bool) -> list[Any]:
    sinks: list[Any] = [JsonlSink(run_dir / "metrics.jsonl")]
    if tensorboard:
        try:
            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        except ImportError:
            warn("output.tensorboard is on but tensorboard is not installed "
                 "(pip install 'qdpo[tensorboard]'); writing metrics.jsonl only.")
    return sinks


class _Stats(ProgressColumn):
    def render(self, task: Any) -> Text:
        s = task.fields.get("stats", "")
        return Text(s, style="cyan")


class TrainDisplay:
    """Progress bar with ETA and the latest loss, reward accuracy, margin, tokens/s, memory."""

    def __init__(self, total_steps: int, start_step: int = 0, live: bool | None = None):
        self.total = total_steps
        self.live = sys.stdout.isatty() if live is None else live
        self.last_print = 0.0
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), _Stats(),
                console=console, transient=False)
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
            console.print(f"step {step}/{self.total}  {line}")

    def message(self, msg: str) -> None:
        (self.progress.console if self.progress else console).print(msg)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@contextlib.contextmanager
def task_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar for a one-off pass (reference log-probs, tokenization)."""
    if not sys.stdout.isatty():
        yield lambda k: None
        return
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as prog:
        task = prog.add_task(label, total=total or None)
        yield lambda k: prog.advance(task, k)


def metrics_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, fmt(v, k))
    return t
