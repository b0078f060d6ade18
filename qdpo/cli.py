"""The `qdpo` command: a thin typer shell over the library.

Each command parses its arguments, calls the library and prints. User mistakes (QdpoError) end
with one message and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from qdpo import __version__
from qdpo.errors import QdpoError

app = typer.Typer(
    name="qdpo", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="QLoRA Direct Preference Optimization on one GPU: train, then merge, export, chat.")

_state = {"debug": False}

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
) -> None:
    """Train LoRA adapters with DPO (or a relative) on a 4-bit base, as the recipe says."""
    from qdpo.recipe import load_recipe

    ov = list(overrides or [])
    if output is not None:
        ov.append(f"output.dir={output}")
    r = load_recipe(recipe, ov)
    from qdpo.train import train as run_train

    result = run_train(r, resume=resume, overwrite=overwrite)
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
def init(
    path: Path = typer.Argument(Path("recipe.yaml"), help="Where to write the starter recipe."),
    model: str = typer.Option("meta-llama/Llama-3.1-8B-Instruct", help="model.name_or_path"),
    data: str = typer.Option("HuggingFaceH4/ultrafeedback_binarized", help="data.train"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented starter recipe with every key, its default and its meaning."""
    from qdpo.recipe import starter_yaml

    if path.exists() and not force:
        raise QdpoError(f"'{path}' already exists; pass --force to overwrite it or choose "
                        "another path.")
    text = starter_yaml({"model": {"name_or_path": model}, "data": {"train": [data]}})
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


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise QdpoError(f"{name} '{text}' is not a range like 128-512.") from None
    if not 1 <= a <= b:
        raise QdpoError(f"{name} '{text}' must be MIN-MAX with 1 <= MIN <= MAX.")
    return a, b


@app.command()
def bench(
    recipe: Path = typer.Argument(..., help="Recipe YAML to benchmark."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Recipe overrides key.sub=value",
                                                    show_default=False),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="Build the architecture from its config with random "
                                        "weights (quantized as usual): nothing to download."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Built-in architecture: "
                                        "llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, qwen2.5-7b, "
                                        "qwen2.5-1.5b, mistral-7b (implies random weights)."),
    steps: int = typer.Option(8, "--steps", help="Optimizer steps to run."),
    warmup: int = typer.Option(2, "--warmup", help="First steps not timed."),
    prompt_len: str = typer.Option("128-512", "--prompt-len", help="Prompt tokens, MIN-MAX."),
    response_len: str = typer.Option("64-512", "--response-len",
                                     help="Tokens of each response, MIN-MAX."),
    layouts: Optional[str] = typer.Option(
        None, "--layouts", help="Comma list of layouts to compare in one run, e.g. "
                                "padded,packed,shared_prefix (default: the recipe's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
) -> None:
    """Time real training steps on synthetic pairs: tokens/s, step time, reference pass, memory,
    MFU."""
    from qdpo import console as ui
    from qdpo.bench import results_table, run_bench, write_json
    from qdpo.recipe import load_recipe

    results = []
    for lay in (layouts.split(",") if layouts else [None]):
        ov = list(overrides or []) + ([f"train.layout={lay.strip()}"] if lay else [])
        r = load_recipe(recipe, ov)
        ui.info(f"bench: {r.model.name_or_path} layout {r.train.layout}, {steps} steps of "
                f"{r.train.pairs_per_step} pairs")
        results.append(run_bench(r, steps=steps, warmup=warmup, shape=shape,
                                 prompt_len=_range(prompt_len, "--prompt-len"),
                                 response_len=_range(response_len, "--response-len"),
                                 random_weights=random_weights or shape is not None))
        import gc

        gc.collect()
    ui.console.print(results_table(results))
    if json_out:
        write_json(results, json_out)
        ui.info(f"wrote {json_out}")


def main() -> None:
    """Console-script entry point: runs the app and turns user errors into one message."""
    from qdpo import console as ui

    try:
        rc = app(args=_optional_resume_value(sys.argv[1:]), prog_name="qdpo",
                 standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except QdpoError as e:
        if _state["debug"]:
            raise
        ui.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        ui.error("interrupted")
        sys.exit(130)
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
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, typer.Abort):
            ui.error("aborted")
            sys.exit(130)
        if _state["debug"]:
            raise
        ui.error(f"{type(e).__name__}: {e}\n(this is a bug in qdpo or an unexpected "
                 "environment; run with --debug for the traceback and report it)")
        sys.exit(1)


if __name__ == "__main__":
    main()
