"""Talking to what was trained: batch generation and the interactive chat, base vs tuned.

"Base" is the same loaded weights with the adapters disabled (or the run's frozen starting
adapter), so a comparison costs no extra memory and differs only by what training changed.
A plain model directory (a merged model, any transformers model) has no adapter and so no base
to compare with.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qdpo import console as ui
from qdpo.data import Tokenizer
from qdpo.errors import DataError, QdpoError
from qdpo.files import write_atomically
from qdpo.model import reference_mode

Messages = list[dict[str, str]]


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


def context_length(model: Any) -> int | None:
    """The longest sequence the model takes (config max_position_embeddings), if it says."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


class Generator:
    """Renders conversations with the run's chat template and generates from them."""

    def __init__(self, model: Any, tokenizer: Any, recipe: Any, source: Any = None):
        self.model = model
        self.tok = tokenizer
        self.recipe = recipe
        self.source = source  # the TrainedSource it was loaded from, for the chat's banner
        # the same prompt rendering as training (template, system prompt)
        self.format = Tokenizer(tokenizer, recipe, conversational=False)
        self.device = next(model.parameters()).device
        self.has_adapter = hasattr(model, "peft_config")  # a plain model has no base to compare
        self.context_length = context_length(model)
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

    def prompt_tokens(self, conversation: Messages) -> int:
        """How many tokens the rendered prompt (system prompt included) takes."""
        text = self.format.render_prompt(conversation)
        return len(self.tok(text, add_special_tokens=self.format.template is None,
                            verbose=False)["input_ids"])

    def describe(self) -> list[str]:
        """What was loaded, for the chat's banner."""
        from qdpo.device import compute_dtype

        src = self.source
        lines = []
        if src is not None and getattr(src, "adapter_dir", None) is not None:
            lines.append(f"base {src.base_path} + adapter {src.adapter_dir}")
        elif src is not None:
            lines.append(f"model {src.base_path} (no adapter: a plain or merged model)")
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        qcfg = getattr(getattr(lm, "config", None), "quantization_config", None)
        weights = (f"4-bit {getattr(qcfg, 'bnb_4bit_quant_type', 'nf4')} weights"
                   if getattr(lm, "is_loaded_in_4bit", False) else "unquantized weights")
        dtype = str(compute_dtype(self.recipe.model.compute_dtype, self.device))
        ctx = f", context {self.context_length} tokens" if self.context_length else ""
        lines.append(f"device {self.device}, compute dtype {dtype.removeprefix('torch.')}, "
                     f"{weights}{ctx}")
        return lines

    def _inputs(self, conversations: list[Messages]) -> dict[str, torch.Tensor]:
        rendered = [self.format.render_prompt(c) for c in conversations]
        self.tok.padding_side = "left"
        enc = self.tok(rendered, return_tensors="pt", padding=True,
                       add_special_tokens=self.format.template is None)
        return {k: v.to(self.device) for k, v in enc.items()}

    def generate(self, conversations: list[Messages], sampling: Sampling,
                 base: bool = False, streamer: Any = None) -> list[str]:
        if base and not self.has_adapter:
            raise QdpoError("This is a plain model (no adapter), so there is no base to compare "
                            "it with; generate without the base.")
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


# ---------------------------------------------------------------------------------------
# The interactive chat
# ---------------------------------------------------------------------------------------

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt and "
        "reset), /exit (or Ctrl-C, Ctrl-D at the prompt); Ctrl-C during a reply stops it")
# below this many columns the compare view shows base, then tuned, instead of two columns
SIDE_BY_SIDE_MIN_WIDTH = 100


def fit_history(history: Messages, count: Callable[[Messages], int],
                limit: int) -> tuple[Messages, int]:
    """Drop the oldest turns (a user message and its replies) until `count` is within `limit`.

    System messages and the last message stay; returns the kept messages and how many turns
    went. The result can still be over the limit when the last message alone is.
    """
    msgs = list(history)
    dropped = 0
    while count(msgs) > limit:
        turn = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
        if not turn:
            break
        end = turn[0] + 1
        while end < len(msgs) - 1 and msgs[end]["role"] not in ("user", "system"):
            end += 1
        del msgs[turn[0]:end]
        dropped += 1
    return msgs, dropped


def enable_line_editing(stdin: Any = None) -> bool:
    """In a terminal, `input()` gets line editing and history (Up for earlier messages) from
    the readline module, when Python has it. Returns whether it is on."""
    stdin = stdin or sys.stdin
    try:
        if not stdin.isatty():
            return False
        import readline  # noqa: F401  (importing it is what hooks input())
    except (ImportError, AttributeError, ValueError):
        return False
    return True


def _note(text: str) -> None:
    from rich.text import Text

    ui.console.print(Text(text, style="dim"))


def _write(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


class ChatSession:
    """One conversation per side shown (tuned; base and tuned with compare), each side with
    its own history, trimmed to the model's context. A reply stopped with Ctrl-C leaves the
    conversation as it was before the message that asked for it."""

    def __init__(self, gen: Generator, sampling: Sampling, compare: bool = False):
        self.gen = gen
        self.sampling = sampling
        self.sides = ("base", "tuned") if compare else ("tuned",)
        # a plain model's replies are not "tuned" ones
        self.label = "tuned" if getattr(gen, "has_adapter", True) else "model"
        self.histories: dict[str, Messages] = {s: [] for s in self.sides}

    def reset(self) -> None:
        self.histories = {s: [] for s in self.sides}

    def command(self, text: str) -> bool:
        """Run a slash command; False means quit."""
        if text in ("/exit", "/quit"):
            return False
        if text == "/reset":
            self.reset()
            _note("(conversation reset)")
        elif text.startswith("/system") and text[len("/system"):][:1] in ("", " ", "\t"):
            self.gen.system_prompt = text[len("/system"):].strip() or None  # render() adds it
            self.reset()
            _note(f"(system prompt {'set' if self.gen.system_prompt else 'cleared'}; "
                  "conversation reset)")
        else:
            _note(f"unknown command {text.split()[0]}; {HELP}")
        return True

    def turn(self, text: str) -> None:
        """Ask every side `text`, show the replies, and keep them in each side's history."""
        convs = {}
        for side in self.sides:
            conv = self._fit(side, self.histories[side] + [{"role": "user", "content": text}])
            if conv is None:
                return
            convs[side] = conv
        try:
            replies = self._compare(convs) if len(self.sides) > 1 else \
                {"tuned": self._stream(convs["tuned"])}
        except KeyboardInterrupt:
            _write("\n")
            _note("(reply stopped; this message and the partial reply are left out of the "
                  "conversation)")
            return
        for side in self.sides:
            self.histories[side] = convs[side] + [{"role": "assistant", "content": replies[side]}]

    def _fit(self, side: str, conv: Messages) -> Messages | None:
        ctx = getattr(self.gen, "context_length", None)
        if not ctx:
            return conv
        limit = ctx - self.sampling.max_new_tokens
        conv, dropped = fit_history(conv, self.gen.prompt_tokens, limit)
        if self.gen.prompt_tokens(conv) > limit:
            _note(f"(this message is too long: with --max-new-tokens "
                  f"{self.sampling.max_new_tokens}, a prompt may take {limit} of the model's "
                  f"{ctx} tokens of context; shorten it)")
            return None
        if dropped:
            whose = f"the {side} conversation" if len(self.sides) > 1 else "the conversation"
            _note(f"(dropped the {ui.plural(dropped, 'oldest turn')} of {whose} to fit the "
                  f"model's context of {ctx} tokens)")
        return conv

    def _stream(self, conv: Messages) -> str:
        _write(f"{self.label}> ")
        return self.gen.generate([conv], self.sampling,
                                 streamer=_PrintStreamer(self.gen.tok, _write))[0]

    def _compare(self, convs: dict[str, Messages]) -> dict[str, str]:
        """Base, then tuned, each filling its panel as its tokens come: two columns side by
        side when the terminal is wide enough, else one panel after the other. The two are
        generated one after the other because base and tuned are the same weights, switched
        (reference_mode), so they cannot run at once."""
        wide = ui.console.width >= SIDE_BY_SIDE_MIN_WIDTH
        shown = {s: "" for s in self.sides}  # the text so far, the reply once it is complete
        replies: dict[str, str] = {}
        for group in [self.sides] if wide else [(s,) for s in self.sides]:
            with _LiveView(group, shown) as view:
                for side in group:
                    streamer = _PrintStreamer(self.gen.tok, view.writer(side))
                    replies[side] = shown[side] = self.gen.generate(
                        [convs[side]], self.sampling, base=side == "base", streamer=streamer)[0]
                    view.refresh()
        return replies


# at most this many redraws a second: each redraws the whole view, and a fast GPU gives tokens
# faster than a terminal shows them without flicker
LIVE_REDRAWS_PER_SECOND = 20


class _Tail:
    """The last lines of a text that fit the terminal: a live view taller than the terminal
    cannot be redrawn in place, and rich would cut off its bottom, where the new tokens are."""

    def __init__(self, text: Any):
        self.text = text

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.segment import Segment

        room = max(1, options.size.height - 3)  # the panel's two borders, the cursor's line
        for line in console.render_lines(self.text, options, pad=False)[-room:]:
            yield from line
            yield Segment.line()


class _LiveView:
    """Compare panels redrawn as text streams into them (rich Live). In a terminal only; a
    pipe or a file gets the finished panels once. On the way out (done, or Ctrl-C) the panels
    are drawn in full, however tall."""

    def __init__(self, sides: tuple[str, ...], shown: dict[str, str]):
        from rich.live import Live

        self.sides = sides
        self.shown = shown
        self.full = False
        self.last = 0.0
        self.live = Live(console=ui.console, auto_refresh=False, get_renderable=self.render)

    def __enter__(self) -> "_LiveView":
        self.live.start(refresh=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.full = True
        self.live.stop()

    def writer(self, side: str) -> Callable[[str], None]:
        def write(text: str) -> None:
            self.shown[side] += text
            if time.monotonic() - self.last >= 1 / LIVE_REDRAWS_PER_SECOND:
                self.refresh()
        return write

    def refresh(self) -> None:
        self.last = time.monotonic()
        self.live.refresh()

    def render(self) -> Any:
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        # Text: a reply is shown as written, never read as rich markup
        texts = [Text(self.shown[s].strip()) for s in self.sides]
        panels = [Panel(t if self.full else _Tail(t), title=s, expand=True)
                  for s, t in zip(self.sides, texts)]
        if len(panels) == 1:
            return panels[0]
        grid = Table.grid(expand=True, padding=(0, 1))  # two columns, half the width each
        for _ in panels:
            grid.add_column(ratio=1)
        grid.add_row(*panels)
        return grid


def chat_loop(gen: Generator, sampling: Sampling, compare: bool = False,
              read: Callable[[str], str] | None = None) -> None:
    """The interactive chat: a banner, then turns and slash commands until /exit, Ctrl-C or
    Ctrl-D at the prompt."""
    ctx = getattr(gen, "context_length", None)
    if ctx and sampling.max_new_tokens >= ctx:
        raise QdpoError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for the "
                        f"conversation in the model's context of {ctx} tokens; use fewer.")
    if compare and not getattr(gen, "has_adapter", True):
        raise QdpoError("This is a plain model (no adapter), so there is no base to compare it "
                        "with; chat without --compare.")
    if read is None:
        enable_line_editing()
        read = input
    session = ChatSession(gen, sampling, compare)
    for line in (["qdpo chat"] + gen.describe() if hasattr(gen, "describe") else []) + [HELP]:
        _note(line)
    while True:
        try:
            # bytes that are not UTF-8 arrive as lone surrogates, which tokenizers refuse
            text = read("you> ").strip().encode("utf-8", "replace").decode("utf-8")
        except (EOFError, KeyboardInterrupt):
            _write("\n")
            return
        if not text:
            continue
        if text.startswith("/"):
            if not session.command(text):
                return
            continue
        session.turn(text)


# ---------------------------------------------------------------------------------------
# Generation for a file of prompts
# ---------------------------------------------------------------------------------------

CHARS_PER_TOKEN_MAX = 16  # no tokenizer packs more characters of text into a token
MAX_PROMPT_CHARS = 1_000_000  # longer than any model's context: tokenizing it would crawl


def _prompt_problem(conv: Messages) -> str | None:
    """Why a conversation cannot be a prompt: text that is not valid Unicode (a lone
    surrogate, which tokenizers refuse), or more characters than any context holds."""
    from qdpo.data import NOT_UNICODE, invalid_unicode

    if invalid_unicode(m["content"] for m in conv):
        return NOT_UNICODE
    chars = sum(len(m["content"]) for m in conv)
    if chars > MAX_PROMPT_CHARS:
        return (f"the prompt is {chars:,} characters, more than any model's context "
                f"(at most {MAX_PROMPT_CHARS:,})")
    return None


def _prompt_row(row: Any, path: Path, i: int) -> tuple[Messages, dict[str, Any]]:
    """One jsonl row -> (conversation, the row's other fields)."""
    p = row.get("prompt", row.get("messages")) if isinstance(row, dict) else row
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")} \
        if isinstance(row, dict) else {}
    if isinstance(p, str) and p.strip():
        return [{"role": "user", "content": p}], extra
    if isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(
            m.get("content"), str) and m.get("role") for m in p):
        return (p[:-1] if p[-1]["role"] == "assistant" else p), extra
    raise DataError(f"'{path}' line {i}: expected a 'prompt' (text or a list of "
                    "messages) or 'messages'.")


def read_prompt_rows(path: Path) -> list[tuple[Messages, dict[str, Any]]]:
    """jsonl rows with `prompt` (text or messages) or `messages` -> (conversation, other
    fields such as id or category, kept for the output)."""
    if not path.is_file():
        raise DataError(f"Prompts file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"Prompts file '{path}' is not UTF-8 text ({e.reason} at byte "
                        f"{e.start}).") from None
    rows = []
    plain = path.suffix not in (".jsonl", ".json")  # a text file: one prompt per line
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if plain:
            row: Any = {"prompt": line.strip()}
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"'{path}' line {i} is not valid JSON ({e.msg}); a file of "
                                "plain prompts, one per line, is read as such when its name "
                                "ends in .txt.") from None
        conv, extra = _prompt_row(row, path, i)
        problem = _prompt_problem(conv)
        if problem:
            raise DataError(f"'{path}' line {i}: {problem}.")
        rows.append((conv, extra))
    if not rows:
        raise DataError(f"'{path}' holds no prompts.")
    return rows


def read_prompts(path: Path) -> list[Messages]:
    """jsonl rows with `prompt` (text or messages) or `messages` -> conversations."""
    return [conv for conv, _ in read_prompt_rows(path)]


def generate_file(gen: Generator, prompts: Path, out: Path, sampling: Sampling,
                  compare: bool = False, batch_size: int = 8) -> int:
    """Replies for every prompt row, written as jsonl: the row's own fields (id, category,
    ...), then prompt, response and, with compare, base_response."""
    rows = read_prompt_rows(prompts)
    ctx = getattr(gen, "context_length", None)
    if ctx and sampling.max_new_tokens >= ctx:
        raise QdpoError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a "
                        f"prompt in the model's context of {ctx} tokens; use fewer.")
    for n, (conv, _) in enumerate(rows, 1):  # tokenizing megabytes of one word would crawl
        chars = sum(len(m["content"]) for m in conv)
        if ctx and chars > CHARS_PER_TOKEN_MAX * ctx:
            raise DataError(f"Prompt {n} of '{prompts}' is {chars:,} characters: more than "
                            f"the model's context of {ctx:,} tokens can hold.")
    ours = {"response", "base_response"} if compare else {"response"}
    clash = sorted({k for _, extra in rows for k in extra} & ours)
    if clash:
        ui.warn(f"the prompts file has {', '.join(clash)} fields; the output replaces them with "
                "the generated replies")
    # the file appears complete or not at all (the previous one stays until then)
    with write_atomically(out) as tmp, ui.task_progress("generate", len(rows)) as advance, \
            tmp.open("w") as f:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            convs = [conv for conv, _ in chunk]
            tuned = gen.generate(convs, sampling)
            base = gen.generate(convs, sampling, base=True) if compare else [None] * len(chunk)
            for (conv, extra), t, b in zip(chunk, tuned, base):
                row: dict[str, Any] = {**extra, "prompt": conv, "response": t}
                if compare:
                    row["base_response"] = b
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            advance(len(chunk))
    return len(rows)
