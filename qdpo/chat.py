"""Talking to what was trained: batch generation and the interactive chat, base vs tuned.

"Base" is the same loaded weights with the adapters disabled (or the run's frozen starting
adapter), so a comparison costs no extra memory and differs only by what training changed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qdpo import console as ui
from qdpo.data import Tokenizer
from qdpo.errors import DataError
from qdpo.files import write_atomically
from qdpo.model import reference_mode


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                      top_k=self.top_k or None)
        else:
            kw.update(do_sample=False)
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw


class Generator:
    """Renders conversations with the run's chat template and generates from them."""

    def __init__(self, model: Any, tokenizer: Any, recipe: Any):
        self.model = model
        self.tok = tokenizer
        # the same prompt rendering as training (template, system prompt)
        self.format = Tokenizer(tokenizer, recipe, conversational=False)
        self.device = next(model.parameters()).device
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos.update(gen_eos)
        self.eos = sorted(e for e in eos if e is not None)

    @property
    def system_prompt(self) -> str | None:
        return self.format.system_prompt

    @system_prompt.setter
    def system_prompt(self, text: str | None) -> None:
        self.format.system_prompt = text

    def _inputs(self, conversations: list[list[dict[str, str]]]) -> dict[str, torch.Tensor]:
        rendered = [self.format.render_prompt(c) for c in conversations]
        self.tok.padding_side = "left"
        enc = self.tok(rendered, return_tensors="pt", padding=True,
                       add_special_tokens=self.format.template is None)
        return {k: v.to(self.device) for k, v in enc.items()}

    def generate(self, conversations: list[list[dict[str, str]]], sampling: Sampling,
                 base: bool = False, streamer: Any = None) -> list[str]:
        inputs = self._inputs(conversations)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kw = dict(sampling.kwargs(), eos_token_id=self.eos, pad_token_id=self.tok.pad_token_id,
                  streamer=streamer)
        self.model.eval()
        with torch.no_grad():
            if base:
                with reference_mode(self.model):
                    out = self.model.generate(**inputs, **kw)
            else:
                out = self.model.generate(**inputs, **kw)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]


class _PrintStreamer:
    """Prints tokens as they come (transformers' streamer protocol)."""

    def __init__(self, tok: Any, write: Callable[[str], None]):
        self.tok = tok
        self.write = write
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
            self.write(text[self.printed:])
            self.printed = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.write(text[self.printed:] + "\n")


HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt and "
        "reset), /exit")


def chat_loop(gen: Generator, sampling: Sampling, compare: bool = False,
              read: Callable[[str], str] = input) -> None:
    """The interactive chat: history, slash commands, streaming (or side by side)."""
    from rich.columns import Columns
    from rich.markup import escape
    from rich.panel import Panel
    from rich.text import Text

    history: list[dict[str, str]] = []
    ui.console.print(f"[dim]{HELP}[/]")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            ui.info("")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            ui.console.print("[dim](conversation reset)[/]")
            continue
        if text.startswith("/system"):
            gen.system_prompt = text[len("/system"):].strip() or None  # render() adds it
            history = []
            ui.console.print(f"[dim](system prompt {'set' if gen.system_prompt else 'cleared'}; "
                             "conversation reset)[/]")
            continue
        if text.startswith("/"):
            ui.console.print(f"[dim]unknown command {escape(text.split()[0])}; {HELP}[/]")
            continue
        history.append({"role": "user", "content": text})
        conv = list(history)
        if compare:
            base = gen.generate([conv], sampling, base=True)[0]
            tuned = gen.generate([conv], sampling)[0]
            # Text: a reply is shown as written, never read as rich markup
            ui.console.print(Columns([Panel(Text(base), title="base", expand=True),
                                      Panel(Text(tuned), title="tuned", expand=True)],
                                     equal=True, expand=True))
            reply = tuned
        else:
            sys.stdout.write("tuned> ")
            sys.stdout.flush()

            def write(s: str) -> None:
                sys.stdout.write(s)
                sys.stdout.flush()

            reply = gen.generate([conv], sampling, streamer=_PrintStreamer(gen.tok, write))[0]
        history.append({"role": "assistant", "content": reply})


def read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """jsonl rows with `prompt` (text or messages) or `messages` -> conversations."""
    if not path.is_file():
        raise DataError(f"Prompts file '{path}' does not exist.")
    convs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"'{path}' line {i} is not valid JSON ({e.msg}).") from None
        p = row.get("prompt", row.get("messages")) if isinstance(row, dict) else row
        if isinstance(p, str) and p.strip():
            convs.append([{"role": "user", "content": p}])
        elif isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(
                m.get("content"), str) and m.get("role") for m in p):
            if p[-1]["role"] == "assistant":
                p = p[:-1]
            convs.append(p)
        else:
            raise DataError(f"'{path}' line {i}: expected a 'prompt' (text or a list of "
                            "messages) or 'messages'.")
    if not convs:
        raise DataError(f"'{path}' holds no prompts.")
    return convs


def generate_file(gen: Generator, prompts: Path, out: Path, sampling: Sampling,
                  compare: bool = False, batch_size: int = 8) -> int:
    convs = read_prompts(prompts)
    # the file appears complete or not at all (the previous one stays until then)
    with write_atomically(out) as tmp, ui.task_progress("generate", len(convs)) as advance, \
            tmp.open("w") as f:
        for s in range(0, len(convs), batch_size):
            chunk = convs[s:s + batch_size]
            tuned = gen.generate(chunk, sampling)
            base = gen.generate(chunk, sampling, base=True) if compare else [None] * len(chunk)
            for conv, t, b in zip(chunk, tuned, base):
                row: dict[str, Any] = {"prompt": conv, "response": t}
                if compare:
                    row["base_response"] = b
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            advance(len(chunk))
    return len(convs)
