"""Chat formats and encoding: the chat template to use, and `Tokenizer`, which turns `Pair`s
into `PairTokens`.

What leaves here keeps two guarantees: `prompt_ids` are exactly the prefix of both training
sequences (each completion is tokenized on its own and appended, so no BPE merge can cross
the boundary), and each completion ends with the end-of-turn token the chat format expects.

Without a chat template a prompt is plain text: a system prompt (the row's own, else
data.system_prompt) and the prompt's turns are joined with a newline, in training and in
generation alike.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
from typing import TYPE_CHECKING, Any

from qdpo.data.pairs import Pair, PairTokens
from qdpo.data.report import DataReport
from qdpo.errors import DataError

if TYPE_CHECKING:
    from qdpo.recipe import DataConfig, Recipe

# Built-in chat templates, for tokenizers that have none (base models) or on request.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
        "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
        "eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
        "{% endif %}"
    ),
}
# Holds what templates like to transform (quotes, backslash, newline, &, <, non-ASCII,
# braces, edge spaces): if it does not come back verbatim, the shortcut is off for that pair.
_SENTINEL = "\u2063 qdpo \"reply\" \\ & <é>\n{{x}} \u2063"
PLAIN_SEPARATOR = "\n"
PLAIN_SYSTEM_NOTE = ("system prompt put before each prompt as plain text (no chat template is "
                     "in use)")
TOKENIZE_CHUNK = 500
PARALLEL_MIN_PAIRS = 4000
_WORKER: Tokenizer | None = None


def resolve_chat_template(tokenizer: Any, setting: str, need: bool) -> str | None:
    """The Jinja template to use, or None for plain text."""
    if setting == "none":
        if need:
            raise DataError("The data is conversational but data.chat_template is 'none'. Set it "
                            "to 'auto', 'chatml', 'llama3', 'zephyr' or a Jinja template.")
        return None
    if setting == "auto":
        tpl = getattr(tokenizer, "chat_template", None)
        if tpl:
            return tpl
        if need:
            raise DataError("The data is conversational but the tokenizer has no chat template. "
                            "Set data.chat_template to 'chatml', 'llama3', 'zephyr' or a Jinja "
                            "template string.")
        return None
    return CHAT_TEMPLATES.get(setting, setting)


def _strip_after_eos(text: str, eos: str | None) -> str:
    if eos and text.rstrip("\n").endswith(eos):
        return text.rstrip("\n")
    return text


def _data_settings(settings: DataConfig | Recipe) -> DataConfig:
    """The data section; a whole recipe is accepted where callers have one (chat)."""
    from qdpo.recipe import Recipe

    return settings.data if isinstance(settings, Recipe) else settings


def _compile(tokenizer: Any, template: str) -> tuple[Any, dict[str, Any]]:
    """transformers' own compiled template and its variables, to render without its per-call
    overhead; (None, {}) when it does not render exactly as apply_chat_template does."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)
        variables = dict(getattr(tokenizer, "special_tokens_map", {}))
        probe = [{"role": "user", "content": "hi"}]
        if compiled.render(messages=probe, add_generation_prompt=True, **variables) != \
                tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False,
                                              add_generation_prompt=True):
            return None, {}
        return compiled, variables
    except Exception:
        return None, {}


class Tokenizer:
    """Turns `Pair`s into `PairTokens` with the prefix and EOS guarantees."""

    def __init__(self, tokenizer: Any, settings: DataConfig | Recipe, conversational: bool):
        self.tok = tokenizer
        self.settings = _data_settings(settings)
        self.conversational = conversational
        self.system_prompt = self.settings.system_prompt  # chat's /system changes it
        self.template = resolve_chat_template(tokenizer, self.settings.chat_template,
                                              conversational)
        self.eos = tokenizer.eos_token
        if self.eos is None:
            raise DataError("The tokenizer has no EOS token; qdpo needs one to end responses.")
        self._shortcut = True
        self._checks_left = 32
        self._compiled, self._template_vars = (
            _compile(tokenizer, self.template) if self.template is not None else (None, {}))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast_encode = getattr(backend, "encode_batch_fast", None)

    def encode(self, texts: list[str], special: bool) -> list[list[int]]:
        """Token ids of many texts (the Rust tokenizer directly when there is one)."""
        if self._fast_encode is not None:
            return [e.ids for e in self._fast_encode(texts, add_special_tokens=special)]
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if self._compiled is not None:
            try:
                return self._compiled.render(messages=messages,
                                             add_generation_prompt=generation_prompt,
                                             **self._template_vars)
            except Exception:
                self._compiled = None  # the template needs transformers' full context
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template,
                                                tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as e:  # a template's own error (raise_exception), syntax, a huge range
            from qdpo.files import short_error

            raise DataError(f"The chat template cannot render a conversation: "
                            f"{short_error(e).rstrip('.')}. Fix data.chat_template, or set it to "
                            "chatml, llama3 or zephyr.") from None

    def prompt_messages(self, prompt: list[dict[str, str]] | str,
                        system: str | None = None) -> list[dict[str, str]]:
        """The prompt as messages, with a system message first: the prompt's own, else
        `system` (a row's), else data.system_prompt."""
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        system = system or self.system_prompt
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        return msgs

    def plain_prompt(self, prompt: list[dict[str, str]] | str,
                     system: str | None = None) -> str:
        """A prompt without a chat template: every message's text, the system first, joined
        with a newline (a plain string prompt with no system prompt stays as it is)."""
        return PLAIN_SEPARATOR.join(m["content"] for m in self.prompt_messages(prompt, system))

    def _completion(self, msgs: list[dict[str, str]], prompt_text: str, reply: str) -> str:
        full = self._render(msgs + [{"role": "assistant", "content": reply}], False)
        if full.startswith(prompt_text):
            completion = full[len(prompt_text):]
        else:  # templates that rewrite earlier turns: fall back to the reply itself
            completion = reply
        completion = _strip_after_eos(completion, self.eos)
        return completion if completion.endswith(self.eos) else completion + self.eos

    def _fast_completion(self, wrap: tuple[str, str], msgs: list[dict[str, str]],
                         prompt_text: str, reply: str) -> str:
        """The reply put into the template's wrapping; the first pairs are checked against
        the exact path, and any difference turns the shortcut off for the whole data set."""
        fast = _strip_after_eos(wrap[0] + reply + wrap[1], self.eos)
        fast = fast if fast.endswith(self.eos) else fast + self.eos
        if self._checks_left > 0:
            self._checks_left -= 1
            if fast != self._completion(msgs, prompt_text, reply):
                self._shortcut = False
                fast = self._completion(msgs, prompt_text, reply)
        return fast

    def texts(self, pair: Pair) -> tuple[str, str, str, bool]:
        """(prompt text, chosen text, rejected text, prompt_has_special_tokens).

        The reply's chat wrapping (e.g. "...<|im_end|>") is found once per pair by rendering a
        sentinel reply and substituting both replies into it: one template render per pair
        instead of two. Replies a template might transform (surrounding whitespace, tags)
        take the exact path.
        """
        if self.template is None:
            prompt = self.plain_prompt(pair.prompt, pair.system) \
                if isinstance(pair.prompt, str) else ""
            return prompt, pair.chosen + self.eos, pair.rejected + self.eos, False
        msgs = self.prompt_messages(pair.prompt, pair.system)
        prompt_text = self._render(msgs, True)
        wrap = self._wrapper(msgs, prompt_text) if self._shortcut else None
        out = []
        for reply in (pair.chosen, pair.rejected):
            if wrap is not None and reply == reply.strip() and "<" not in reply:
                out.append(self._fast_completion(wrap, msgs, prompt_text, reply))
            else:
                out.append(self._completion(msgs, prompt_text, reply))
        return prompt_text, out[0], out[1], True

    def _wrapper(self, msgs: list[dict[str, str]], prompt_text: str) -> tuple[str, str] | None:
        full = self._render(msgs + [{"role": "assistant", "content": _SENTINEL}], False)
        if not full.startswith(prompt_text) or full.count(_SENTINEL) != 1:
            return None
        pre, post = full[len(prompt_text):].split(_SENTINEL)
        return pre, post

    def render_prompt(self, prompt: list[dict[str, str]] | str,
                      system: str | None = None) -> str:
        """The text a generation for this prompt starts from (chat and generate use it)."""
        if self.template is None:
            return self.plain_prompt(prompt, system)
        return self._render(self.prompt_messages(prompt, system), True)

    def encode_prompt(self, text: str, templated: bool) -> list[int]:
        return self.tok(text, add_special_tokens=not templated)["input_ids"]

    def _head_len(self, pair: Pair, p: list[int]) -> int:
        """Tokens at the start of a prompt that a cut must keep: BOS, the system turn and the
        first role header (everything before the first message's content), so a prompt cut
        from the left is still a well-formed conversation. 0 when they cannot be told apart."""
        if self.template is None:
            return 1 if p and p[0] == self.tok.bos_token_id else 0
        msgs = self.prompt_messages(pair.prompt, pair.system)
        first = next((m["content"] for m in msgs if m["role"] != "system" and m["content"]),
                     None)
        return self._tokens_before(msgs, first, p)

    def _system_header_len(self, pair: Pair, p: list[int]) -> int:
        """Tokens before the system message's content (BOS and the system turn's role header):
        what a cut keeps when the whole system turn is too long to, so that the prompt still
        starts as a conversation does. 0 without a system message."""
        if self.template is None:
            return 0
        msgs = self.prompt_messages(pair.prompt, pair.system)
        system = next((m["content"] for m in msgs if m["role"] == "system" and m["content"]),
                      None)
        return self._tokens_before(msgs, system, p)

    def _tokens_before(self, msgs: list[dict[str, str]], content: str | None,
                       p: list[int]) -> int:
        text = self._render(msgs, True)
        at = text.find(content) if content else -1
        if at <= 0:
            return 0
        head = self.encode_prompt(text[:at], templated=True)
        return len(head) if p[:len(head)] == head else 0

    def _fit(self, pair: Pair, p: list[int], c: list[int], r: list[int],
             report: DataReport) -> PairTokens | None:
        """One pair cut to data.max_prompt_length (the oldest content, keeping the template's
        head) and data.max_length (the responses from the right), or None when it is dropped
        or skipped."""
        max_len, max_prompt = self.settings.max_length, self.settings.max_prompt_length
        head = removed = 0
        head_kept = True
        if len(p) > max_prompt:
            head = self._head_len(pair, p)
            # the head stays whenever some of the newest content still fits beside it: a
            # conversation without its role headers is not one the model was trained to read
            room = max_prompt - max(1, max_prompt // 8)
            if not 0 < head <= room:  # a system turn too long: its header at least
                head = self._system_header_len(pair, p)
            if not 0 < head <= room:  # else BOS at least
                head = 1 if p and p[0] == self.tok.bos_token_id else 0
                head_kept = False
                report.prompt_head_lost += 1
            removed = len(p) - max_prompt
            p = p[:head] + p[head + removed:]
            report.prompt_truncated += 1
        room = max_len - len(p)
        if room < 1:
            report.dropped_too_long += 1
            return None
        chosen_cut, rejected_cut = max(0, len(c) - room), max(0, len(r) - room)
        if chosen_cut or rejected_cut:
            report.response_truncated += bool(chosen_cut) + bool(rejected_cut)
            c, r = c[:room], r[:room]
        if not c or not r:
            report.skip("empty response after tokenization", f"row {pair.row}")
            return None
        if removed or chosen_cut or rejected_cut:
            report.record_cut(pair.row, p, head, removed, chosen_cut, rejected_cut, head_kept)
        return PairTokens(list(p), list(c), list(r), pair.weight)

    def tokenize_chunk(self, pairs: list[Pair], report: DataReport) -> list[PairTokens]:
        texts = [self.texts(p) for p in pairs]
        if not texts:
            return []
        templated = texts[0][3]
        prompts = self.encode([t[0] for t in texts], not templated)
        chosen = self.encode([t[1] for t in texts], False)
        rejected = self.encode([t[2] for t in texts], False)
        fitted = (self._fit(*x, report) for x in zip(pairs, prompts, chosen, rejected))
        return [t for t in fitted if t is not None]

    def __call__(self, pairs: list[Pair], report: DataReport,
                 progress: Any = None) -> list[PairTokens]:
        """Tokenize in chunks; large data sets in parallel processes (fork)."""
        if self.template is None and (self.system_prompt or any(p.system for p in pairs)):
            report.note(PLAIN_SYSTEM_NOTE)
        chunks = [pairs[s:s + TOKENIZE_CHUNK] for s in range(0, len(pairs), TOKENIZE_CHUNK)]
        procs = self.settings.num_proc or min(os.cpu_count() or 1, 8)
        if procs > 1 and len(pairs) >= PARALLEL_MIN_PAIRS and \
                "fork" in multiprocessing.get_all_start_methods():
            out = self._tokenize_in_processes(chunks, procs, report, progress)
        else:
            out = []
            for chunk in chunks:
                out.extend(self.tokenize_chunk(chunk, report))
                if progress:
                    progress(len(chunk))
        report.pairs += len(out)
        return out

    def _tokenize_in_processes(self, chunks: list[list[Pair]], procs: int, report: DataReport,
                               progress: Any) -> list[PairTokens]:
        """The chunks tokenized by `procs` forked workers, in order.

        Each worker takes every procs-th chunk from the memory it inherited and sends its
        results back through a pipe of its own, so nothing is shared between processes but
        those pipes. That is what makes an interruption clean: Ctrl-C in a terminal (and
        `timeout`, most schedulers) signals the whole process group; the workers ignore it,
        and the main process kills them and goes on to its message. (multiprocessing.Pool
        could not be stopped safely there: its workers printed pages of tracebacks, and its
        terminate() waited for ever on a task queue that dead workers had stopped reading.)
        """
        global _WORKER
        _WORKER = self
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = multiprocessing.get_context("fork")
        n = min(procs, len(chunks))
        workers: list[tuple[Any, Any]] = []
        results: dict[int, tuple[list[PairTokens], DataReport]] = {}
        try:
            for w in range(n):
                reader, writer = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_tokenize_worker, args=(chunks, w, n, writer),
                                daemon=True)
                p.start()
                writer.close()  # the worker's end: EOF here once it is done or dead
                workers.append((p, reader))
            open_ends = [r for _, r in workers]
            while open_ends:
                for r in multiprocessing.connection.wait(open_ends):
                    try:
                        i, part, rep = r.recv()
                    except EOFError:
                        open_ends.remove(r)
                        continue
                    results[i] = (part, rep)
                    if progress:
                        progress(len(chunks[i]))
        finally:
            _WORKER = None
            for p, r in workers:
                if p.is_alive():
                    p.kill()  # interrupted (or failed): no worker outlives the command
                p.join()
                r.close()
        missing = len(chunks) - len(results)
        if missing:
            raise RuntimeError(f"tokenization workers ended with {missing} chunks undone "
                               f"(exit codes {[p.exitcode for p, _ in workers]})")
        out: list[PairTokens] = []
        for i in range(len(chunks)):
            part, rep = results[i]
            out.extend(part)
            report.merge(rep)
        return out


def _tokenize_worker(chunks: list[list[Pair]], first: int, step: int, conn: Any) -> None:
    """A forked worker: chunks first, first + step, ... sent back one by one. Signals are the
    main process's to handle (it kills the workers when it stops)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tok = _WORKER
    assert tok is not None
    for i in range(first, len(chunks), step):
        rep = DataReport(strict=tok.settings.strict)
        conn.send((i, tok.tokenize_chunk(chunks[i], rep), rep))
    conn.close()
