"""Shared helpers for tests: tiny models and recipes, all offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart"
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart.yaml"


def quickstart_recipe(tmp_path: Path, *overrides: str) -> Any:
    """The quickstart recipe, writing into tmp_path, with overrides applied."""
    from qdpo.recipe import load_recipe

    return load_recipe(QUICKSTART_RECIPE, [f"output.dir={tmp_path / 'run'}", *overrides])


def qdpo(*args: Any, stdin: str | None = None, subprocess: bool = False, timeout: int = 600):
    """Run the `qdpo` command; returns an object with returncode, stdout, stderr.

    In-process by default (the command's own `main`, with argv, stdin, stdout and stderr
    swapped), which saves the ~6 s of imports a fresh interpreter pays per call;
    `subprocess=True` runs `python -m qdpo` for real.
    """
    import contextlib
    import io
    import os
    import subprocess as sp
    import sys
    import traceback
    from types import SimpleNamespace

    argv = [str(a) for a in args]
    if subprocess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return sp.run([sys.executable, "-m", "qdpo", *argv], capture_output=True, text=True,
                      cwd=REPO, env=env, timeout=timeout, input=stdin, check=False)
    from qdpo.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, sys.stdin
    sys.argv = ["qdpo", *argv]
    sys.stdin = io.StringIO(stdin or "")
    rc = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the interpreter would print, and its exit status
                traceback.print_exc()
                rc = 1
    finally:
        sys.argv, sys.stdin = saved
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def write_jsonl(path: Path, rows: Any) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def asst(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def make_pairs(seed: int = 0) -> list[Any]:
    """Five token pairs of very different prompt and response lengths, a single-token response
    on each side, one of weight 0.5."""
    import torch

    from qdpo.data import PairTokens

    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(3, 250, (n,), generator=g).tolist()

    return [PairTokens(rand(9), rand(15), rand(4)), PairTokens(rand(40), rand(1), rand(22)),
            PairTokens(rand(2), rand(37), rand(33)), PairTokens(rand(5), rand(3), rand(1)),
            PairTokens(rand(1), rand(6), rand(11), weight=0.5)]


def tiny_lora_model(arch: str, impl: str = "sdpa") -> Any:
    """A 2-layer model of the llama / qwen2 / mistral architecture with LoRA on all linear
    layers, B initialised away from zero so the adapter changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    cfg = configs[arch](vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def dec(tok: Any, ids: Any) -> str:
    """Token ids back to text, special tokens and spaces as they are."""
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def enc(tok: Any, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def chat(tok: Any, msgs: Any) -> str:
    """The tokenizer's own rendering of a prompt (generation prompt appended)."""
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def tokenize(tok: Any, rows: Any, seed: int = 42, **data: Any) -> tuple[Any, Any, Any, Any]:
    """normalise + tokenize in row order: (tokenized pairs, report, Tokenizer, normalised pairs)."""
    from qdpo.data import DataReport, Tokenizer, normalise_rows
    from qdpo.recipe import DataConfig

    s = DataConfig(**data)
    report = DataReport(strict=s.strict)
    pairs = normalise_rows(rows, s, report, seed=seed, source="rows")
    t = Tokenizer(tok, s, any(not isinstance(p.prompt, str) for p in pairs))
    return t(pairs, report), report, t, pairs
