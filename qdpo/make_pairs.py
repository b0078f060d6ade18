"""On-policy preference pairs (`qdpo pairs`): sample several answers per prompt from a model,
let a judge pick the chosen and the rejected one, and write a data set `qdpo train` reads as
it is.

Judges: a human at the terminal (judge_screen.py) compares two answers of each prompt; a
reward model (a sequence classifier with one output) scores every answer, and its best and
worst become the pair (equal scores: no pair).

Every decision is appended to a journal, `<out>.progress`, and flushed to disk before the next
prompt, so a run stopped at any moment (q, Ctrl-C, a kill) goes on where it stopped when the
same command runs again: prompts already judged are skipped. The output is rewritten whole
from the journal (atomically) when a run ends or stops, so it is always a complete data set.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from qdpo import console as ui
from qdpo.chat import Messages, Sampling, context_length, read_prompt_rows
from qdpo.errors import DataError, ModelError, QdpoError
from qdpo.files import short_error, write_atomically

HUMAN = "human"
JOURNAL_FORMAT = "qdpo-pairs-progress"
PAIR_OUTCOMES = ("left", "right", "scored")
NO_PAIR = {  # why a prompt gave no pair, as the summary counts them
    "tie": "tie or skip",
    "same answers": "fewer than two different answers",
    "too long": "prompt too long for the model's context",
}


@dataclass
class Prompt:
    conv: Messages
    text: str | None  # the prompt as written when it was text: the output keeps it text
    extra: dict[str, Any]  # the row's other fields (id, category, ...), kept in the output
    key: str = ""  # names the prompt in the journal


@dataclass
class Verdict:
    """A judge's decision on one prompt: a pair, or the outcome that says why there is none."""

    outcome: str  # left / right (human), scored (reward model), tie
    chosen: str | None = None
    rejected: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # kept in the row: scores, choice


@dataclass
class PairsResult:
    out: Path
    prompts: int
    judged: int  # prompts judged so far, this run and earlier ones
    pairs: int
    outcomes: dict[str, int]
    stopped: bool  # the human quit before the end

    def summary(self) -> str:
        none = [f"{NO_PAIR.get(o, o)} {k}" for o, k in self.outcomes.items()
                if o not in PAIR_OUTCOMES]
        why = f" (no pair: {', '.join(none)})" if none else ""
        pairs = ui.plural(self.pairs, "pair")
        return f"{self.judged} of {self.prompts} prompts judged, {pairs}{why}"


# ---------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------

def _text_of(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"Prompts file '{path}' does not exist.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"Prompts file '{path}' is not UTF-8 text ({e.reason} at byte "
                        f"{e.start}).") from None


def _written_as_text(text: str) -> list[bool]:
    """For each jsonl row, whether its prompt was text: chat's reader turns text into a user
    message, and a data set of text prompts should stay standard."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [isinstance(r.get("prompt", r.get("messages")) if isinstance(r, dict) else r, str)
            for r in rows]


def read_prompts(path: Path) -> list[Prompt]:
    """A .jsonl/.json file of rows with a `prompt` (text or messages), as `qdpo generate`
    reads them; any other file is text, one prompt per line (blank lines skipped)."""
    text = _text_of(path)
    if path.suffix in (".jsonl", ".json"):
        rows = read_prompt_rows(path)  # says which line is wrong, and that the file is empty
        prompts = [Prompt(conv, conv[-1]["content"] if was_text else None, extra)
                   for (conv, extra), was_text in zip(rows, _written_as_text(text))]
    else:
        prompts = [Prompt([{"role": "user", "content": line.strip()}], line.strip(), {})
                   for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"Prompts file '{path}' holds no prompts.")
    seen: collections.Counter[str] = collections.Counter()
    for p in prompts:  # the same prompt twice is two prompts, judged twice
        digest = hashlib.sha256(json.dumps(p.conv, sort_keys=True).encode()).hexdigest()[:16]
        seen[digest] += 1
        p.key = f"{digest}-{seen[digest]}"
    return prompts


# ---------------------------------------------------------------------------------------
# The journal: what was decided, so that a stopped run goes on where it stopped
# ---------------------------------------------------------------------------------------

def journal_path(out: Path) -> Path:
    # not *.jsonl: a data directory or glob of *.jsonl files must not read it as pairs
    return out.with_name(out.name + ".progress")


class Journal:
    """`<out>.progress`: a header naming the model and the judge, then one line per judged
    prompt ({"key", "outcome", "row"}), each on disk before the next prompt is shown."""

    def __init__(self, path: Path, identity: dict[str, Any],
                 entries: list[dict[str, Any]] | None = None):
        self.path = path
        self.identity = identity
        self.entries = entries or []
        self.fresh = entries is None  # the first record (re)starts the file

    @property
    def done(self) -> set[str]:
        return {e["key"] for e in self.entries}

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [e["row"] for e in self.entries if e.get("row")]

    def outcomes(self) -> dict[str, int]:
        return dict(collections.Counter(e["outcome"] for e in self.entries))

    def record(self, key: str, outcome: str, row: dict[str, Any] | None) -> None:
        entry = {"key": key, "outcome": outcome, "row": row}
        with self.path.open("w" if self.fresh else "a", encoding="utf-8") as f:
            if self.fresh:
                f.write(json.dumps({"format": JOURNAL_FORMAT, **self.identity}) + "\n")
                self.fresh = False
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, entries). A last line a kill cut short is dropped from the file, so that the
    next record starts on a line of its own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(data))
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if not records or not isinstance(records[0], dict) or \
            records[0].get("format") != JOURNAL_FORMAT:
        return None, []
    return records[0], [r for r in records[1:] if isinstance(r, dict) and "key" in r]


def open_journal(out: Path, identity: dict[str, Any], overwrite: bool) -> Journal:
    """The journal to go on with, or a new one. An existing output is replaced only with
    --overwrite, or when its journal shows it is this same unfinished job."""
    path = journal_path(out)
    if out.is_dir():
        raise DataError(f"Output '{out}' is a directory; give a file name such as pairs.jsonl.")
    if overwrite or not path.exists():
        if out.exists() and not overwrite:
            raise DataError(f"Output '{out}' already exists; pass --overwrite to replace it, "
                            "or choose another --out.")
        return Journal(path, identity)
    header, entries = _read_journal(path)
    if header is None:
        raise DataError(f"'{path}' is not a qdpo pairs progress file, so '{out}' cannot be "
                        "continued; move it away, or pass --overwrite to start again.")
    for k, v in identity.items():
        if header.get(k) != v:
            raise DataError(f"'{out}' was started with {k} '{header.get(k)}', not '{v}': run "
                            f"with the same {k} to continue it, pass --overwrite to start "
                            "again, or choose another --out.")
    return Journal(path, identity, entries)


def write_pairs(out: Path, rows: list[dict[str, Any]]) -> None:
    with write_atomically(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------

Judge = Callable[[Prompt, list[str], str], "Verdict | None"]  # None: the human quit


class HumanJudge:
    """Two answers on the screen, the person's key decides; None when they quit."""

    name = HUMAN

    def __init__(self, screen: Any):
        self.screen = screen

    def __call__(self, prompt: Prompt, answers: list[str], title: str) -> Verdict | None:
        from qdpo.judge_screen import LEFT, QUIT, TIE

        left, right = answers[0], answers[1]
        choice = self.screen.ask(prompt.conv, left, right, title)
        if choice == QUIT:
            return None
        if choice == TIE:
            return Verdict("tie")
        chosen, rejected = (left, right) if choice == LEFT else (right, left)
        return Verdict(choice, chosen, rejected, {"choice": choice})

    def waiting(self, text: str) -> None:
        self.screen.waiting(text)


class RewardJudge:
    """A reward model scores every answer; its best and worst answers become the pair."""

    def __init__(self, path: str | Path, device: Any = None, trust_remote_code: bool = False):
        self.name = str(Path(path).resolve())
        self.model, self.tok = load_reward_model(Path(path), device, trust_remote_code)
        self.device = next(self.model.parameters()).device
        self.max_length = context_length(self.model)

    def _text(self, conv: Messages, answer: str) -> str:
        if self.tok.chat_template:  # reward models are trained on chat-rendered text
            try:
                return self.tok.apply_chat_template(
                    conv + [{"role": "assistant", "content": answer}], tokenize=False)
            except Exception as e:
                raise ModelError(f"The reward model's chat template cannot render a prompt: "
                                 f"{short_error(e)}.") from None
        return "\n\n".join([m["content"] for m in conv] + [answer])

    def scores(self, conv: Messages, answers: list[str]) -> list[float]:
        import torch

        enc = self.tok([self._text(conv, a) for a in answers], return_tensors="pt",
                       padding=True, truncation=self.max_length is not None,
                       max_length=self.max_length,
                       add_special_tokens=not self.tok.chat_template)
        with torch.no_grad():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
        return [float(x) for x in logits[:, 0].float().cpu()]

    def __call__(self, prompt: Prompt, answers: list[str], title: str) -> Verdict:
        s = self.scores(prompt.conv, answers)
        best, worst = s.index(max(s)), s.index(min(s))
        if s[best] == s[worst]:
            return Verdict("tie")
        return Verdict("scored", answers[best], answers[worst],
                       {"chosen_score": s[best], "rejected_score": s[worst]})


def _check_reward_config(path: Path, trust_remote_code: bool) -> None:
    """Before anything loads: a directory whose config names a model with a classification
    head. A causal LM loaded as a classifier gets a random head and scores noise."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ModelError(f"Reward model '{path}' is not a model directory (no config.json). "
                         "--judge takes 'human' or the directory of a reward model.")
    try:
        cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"Cannot read the config of reward model '{path}': "
                         f"{short_error(e)}.") from None
    archs = getattr(cfg, "architectures", None) or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelError(f"'{path}' is not a reward model: it is a {', '.join(archs)}, with no "
                         "classification head to score answers. Pass a model saved as "
                         "...ForSequenceClassification with one output (num_labels 1).")


def load_reward_model(path: Path, device: Any = None,
                      trust_remote_code: bool = False) -> tuple[Any, Any]:
    import warnings

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qdpo.device import compute_dtype, default_device

    _check_reward_config(path, trust_remote_code)
    device = device or default_device()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized weights" is said below, as an error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), dtype=compute_dtype("auto", device), device_map={"": str(device)},
                trust_remote_code=trust_remote_code, output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"Cannot load reward model '{path}': "
                         f"{short_error(e).rstrip('.')}.") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = info.get("missing_keys") or []
    if missing:
        raise ModelError(f"'{path}' has no trained classification head (its weights lack "
                         f"{', '.join(sorted(missing)[:3])}): it would score answers at "
                         "random. Pass a trained reward model.")
    if model.config.num_labels != 1:
        raise ModelError(f"Reward model '{path}' gives {model.config.num_labels} outputs per "
                         "text; a reward model gives one score (num_labels 1).")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:  # it finds each text's last token by the padding
        model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    model.eval()
    return model, tok


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

def distinct_answers(answers: list[str]) -> list[str]:
    """Answers worth comparing: non-empty (training skips an empty side), each text once."""
    return list(dict.fromkeys(a for a in answers if a.strip()))


def pair_row(p: Prompt, v: Verdict, conversational: bool, judge: str) -> dict[str, Any]:
    """A row as `qdpo train` reads it: text prompt and answers (standard), or message lists
    (conversational); the row's own fields and the judge's first, ours last."""
    if conversational:
        sides = {"prompt": p.conv, "chosen": [{"role": "assistant", "content": v.chosen}],
                 "rejected": [{"role": "assistant", "content": v.rejected}]}
    else:
        sides = {"prompt": p.text, "chosen": v.chosen, "rejected": v.rejected}
    return {**p.extra, **sides, "judge": judge, **v.fields}


def _model_id(model: str | Path) -> str:
    """How the journal names a model or judge: a path absolute, anything else as given."""
    return str(Path(model).resolve()) if str(model) != HUMAN and Path(model).exists() \
        else str(model)


def _sample(gen: Any, batch: list[tuple[int, Prompt]], n: int,
            sampling: Sampling) -> list[list[str]]:
    """n answers for each prompt of the batch, in one generate call. With a seed, each batch
    is seeded by its first prompt's place in the file, so a run that goes on after a stop
    draws what it would have drawn from there."""
    if sampling.seed is not None:
        sampling = dataclasses.replace(sampling, seed=sampling.seed + batch[0][0])
    flat = gen.generate([p.conv for _, p in batch for _ in range(n)], sampling)
    return [flat[i * n:(i + 1) * n] for i in range(len(batch))]


def _fitting(gen: Any, batch: list[tuple[int, Prompt]], sampling: Sampling,
             journal: Journal) -> list[tuple[int, Prompt]]:
    """The prompts that leave room for an answer in the model's context; the others are
    journaled as too long (generating past the context fails or produces noise)."""
    ctx = getattr(gen, "context_length", None)
    keep = []
    for i, p in batch:
        if ctx and gen.prompt_tokens(p.conv) + sampling.max_new_tokens > ctx:
            journal.record(p.key, "too long", None)
        else:
            keep.append((i, p))
    return keep


def _judge_one(judge: Judge, p: Prompt, answers: list[str], title: str, journal: Journal,
               conversational: bool) -> bool:
    """Judge one prompt's answers and journal the outcome; False when the judge quit."""
    cands = distinct_answers(answers)
    if len(cands) < 2:
        journal.record(p.key, "same answers", None)
        return True
    v = judge(p, cands, title)
    if v is None:
        return False
    journal.record(p.key, v.outcome,
                   pair_row(p, v, conversational, judge.name) if v.chosen else None)
    return True


def judge_prompts(gen: Any, judge: Judge, prompts: list[Prompt], journal: Journal, n: int,
                  sampling: Sampling, batch_size: int = 8) -> bool:
    """Sample, judge and journal every prompt the journal does not have; False when the
    judge quit before the end."""
    conversational = any(p.text is None for p in prompts)
    todo = [(i, p) for i, p in enumerate(prompts) if p.key not in journal.done]
    waiting = getattr(judge, "waiting", None)  # the human's screen says what it waits for
    bar = contextlib.nullcontext(lambda k: None) if waiting else \
        ui.task_progress("pairs", len(todo))
    with bar as advance:
        for s in range(0, len(todo), batch_size):
            batch = _fitting(gen, todo[s:s + batch_size], sampling, journal)
            if waiting and batch:
                waiting(f"sampling {n} answers for each of prompts {batch[0][0] + 1} to "
                        f"{batch[-1][0] + 1} of {len(prompts)}...")
            for (i, p), answers in zip(batch, _sample(gen, batch, n, sampling) if batch else []):
                title = (f"qdpo pairs · prompt {i + 1} of {len(prompts)} · "
                         f"{ui.plural(len(journal.rows), 'pair')} so far")
                if not _judge_one(judge, p, answers, title, journal, conversational):
                    return False
            advance(len(todo[s:s + batch_size]))
    return True


def make_pairs(prompts: str | Path, out: str | Path, model: str | Path, judge: str = HUMAN,
               n: int | None = None, sampling: Sampling | None = None, batch_size: int = 8,
               overwrite: bool = False, quantize: bool = True, trust_remote_code: bool = False,
               keys: Iterable[str] | None = None) -> PairsResult:
    """Sample n answers per prompt from `model` (a run, checkpoint, adapter, model directory,
    recipe YAML or hub id), judge them (`human`, or a reward model directory), and write the
    pairs to `out` as jsonl. n defaults to 4 (2 for a human, who compares two at a time;
    more gives spares for when samples repeat). `keys` drives the human judge without a
    terminal (tests, scripts)."""
    prompts, out = Path(prompts), Path(out)
    sampling = sampling or Sampling(temperature=1.0)
    n = n if n is not None else (2 if judge == HUMAN else 4)
    _check_settings(n, batch_size, sampling, prompts, out)
    rows = read_prompts(prompts)
    _check_judge(judge, keys, trust_remote_code)  # before any model loads
    identity = {"model": _model_id(model), "judge": _model_id(judge)}
    journal = open_journal(out, identity, overwrite)
    if all(p.key in journal.done for p in rows):
        ui.info(f"every prompt of {prompts} is judged already ({journal_path(out)}); pass "
                "--overwrite to start again")
        return _finish(journal, out, rows, stopped=False)
    gen = load_generator(model, quantize, trust_remote_code)
    finished = False
    try:
        with _open_judge(judge, gen, keys, trust_remote_code) as the_judge:
            finished = judge_prompts(gen, the_judge, rows, journal, n, sampling, batch_size)
    finally:  # however it ends (q, Ctrl-C, an error): what was judged is in the output
        result = _finish(journal, out, rows, stopped=not finished)
    return result


def _check_settings(n: int, batch_size: int, sampling: Sampling, prompts: Path,
                    out: Path) -> None:
    if n < 2:
        raise QdpoError(f"-n {n}: a pair needs at least 2 answers per prompt.")
    if batch_size < 1:
        raise QdpoError(f"--batch-size {batch_size}: at least 1 prompt per generate call.")
    if sampling.temperature <= 0:
        raise QdpoError("--temperature 0 (greedy) gives the same answer every time; sample "
                        "with a temperature above 0.")
    if out.resolve() == prompts.resolve():
        raise QdpoError(f"--out '{out}' is the prompts file; choose another output.")


def _check_judge(judge: str, keys: Iterable[str] | None, trust_remote_code: bool) -> None:
    """A human needs a terminal (unless keys are given); a reward model must be one."""
    import sys

    if judge == HUMAN:
        if keys is None and not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise QdpoError("--judge human shows answers in a terminal and reads keys from "
                            "it; run it in a terminal, or judge with a reward model "
                            "(--judge DIR).")
        return
    if not Path(judge).exists():
        raise ModelError(f"Reward model '{judge}' does not exist. --judge takes 'human' or the "
                         "directory of a reward model (a sequence classifier).")
    _check_reward_config(Path(judge), trust_remote_code)


@contextlib.contextmanager
def _open_judge(judge: str, gen: Any, keys: Iterable[str] | None,
                trust_remote_code: bool) -> Iterator[Judge]:
    """The reward model on the policy's device, or the screen with keys from the terminal
    (left as it was found however judging ends) or from `keys`."""
    if judge != HUMAN:
        yield RewardJudge(judge, gen.device, trust_remote_code)
        return
    from qdpo.judge_screen import Choices, JudgeScreen, terminal_keys

    source = contextlib.nullcontext(Choices(keys)) if keys is not None else terminal_keys()
    with source as choices:
        yield HumanJudge(JudgeScreen(ui.console, choices))


def load_generator(model: str | Path, quantize: bool = True,
                   trust_remote_code: bool = False) -> Any:
    """The model to sample from, loaded as `qdpo chat` and `qdpo generate` load theirs."""
    from qdpo.chat import Generator
    from qdpo.model import load_trained
    from qdpo.rundir import open_model_source

    src = open_model_source(model, trust_remote_code=trust_remote_code)
    mdl, tok = load_trained(src, quantize=quantize)
    return Generator(mdl, tok, src.recipe, source=src)


def _finish(journal: Journal, out: Path, prompts: list[Prompt], stopped: bool) -> PairsResult:
    """The output mirrors the journal, once it has anything (even no pair yet: an output an
    --overwrite started again must not keep the old pairs)."""
    rows = journal.rows
    if journal.entries:
        write_pairs(out, rows)
    keys = {p.key for p in prompts}
    result = PairsResult(out, len(prompts), len(journal.done & keys), len(rows),
                         journal.outcomes(), stopped)
    wrote = f"wrote {ui.plural(len(rows), 'pair')} to {out}" if journal.entries else \
        "nothing judged yet, so no output written"
    ui.info(f"{result.summary()}; {wrote}")
    if result.judged < result.prompts:
        ui.info(f"run the same command again to go on ({journal_path(out)} keeps the progress)")
    return result
