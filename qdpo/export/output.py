"""Where an export may write: never into the run it is made from, never over an existing output
unless asked. The writing itself goes through `qdpo.files` (temporary name, then rename)."""

from __future__ import annotations

from pathlib import Path

from qdpo.errors import RunDirError, listed
from qdpo.rundir import TrainedSource


def source_root(src: TrainedSource) -> Path:
    """The directory an output must stay out of: the run, or the bare adapter directory."""
    return src.run.path if src.run else src.adapter_dir


def run_name(src: TrainedSource) -> str:
    """What an export is called inside (GGUF general.name, the Ollama model): the run
    directory's name, or the adapter directory's for a bare adapter."""
    return source_root(src).resolve().name


def check_out(out: Path, overwrite: bool, source: Path | None = None) -> None:
    if source is not None:
        o, src = out.resolve(), source.resolve()
        if o == src or o in src.parents or src in o.parents:
            raise RunDirError(f"Output '{out}' overlaps the run or adapter it is made from "
                              f"('{source}'); choose a path outside it.")
    _check_writable(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise RunDirError(f"Output '{out}' already exists; pass --overwrite to replace it or "
                              "choose another path.")
        foreign = foreign_entries(out)
        if foreign:
            raise RunDirError(
                f"Refusing to --overwrite '{out}': it holds what a merge or export does not "
                f"write: {listed(foreign)}. Move them out, or choose another path.")


def _check_writable(out: Path) -> None:
    """Before minutes of merging: the output's folder exists (or can be made) and takes files
    (a read-only disk, no permission, a parent that is a file fail here, not at the end)."""
    import os
    import tempfile

    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(f"Cannot write into '{parent}' for --out '{out}': "
                          f"{e.strerror or e}. Choose a folder you can write to.") from None


# What merges and exports write (a model or adapter folder, or a GGUF file): only such an
# output is replaced by --overwrite, so it can never delete a user's own folder or file.
OUTPUT_NAMES = {"config.json", "generation_config.json", "model.safetensors.index.json",
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                "added_tokens.json", "README.md", "Modelfile"}
OUTPUT_PREFIXES = ("model", "adapter_", "tokenizer")


def foreign_entries(out: Path) -> list[str]:
    """The names at `out` that no merge or export writes (empty: safe to replace)."""
    if out.is_file():  # a GGUF file by its content (magic bytes), not only its name
        return [] if out.suffix == ".gguf" and _is_gguf(out) else [out.name]
    return sorted(e.name for e in out.iterdir()
                  if not (e.is_file() and (e.name in OUTPUT_NAMES
                                           or e.name.startswith(OUTPUT_PREFIXES))))


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
