"""A seeded corpus of malformed inputs, and a runner that feeds each one to the `qdpo` command.

Nothing is stored: `build_corpus(seed)` makes every case from a seeded `random.Random`, so the
same seed gives the same cases, byte for byte. A case is a name, the files to write in a fresh
temporary directory (bytes, or a function of that directory), the command line, and optionally
the category it should end in.

`run_case` runs one case in-process (tests/tiny.py's `qdpo(...)`), with the temporary directory
as the current directory, and classifies the outcome:

  clean_error   exit 2 and exactly one `error: ...` line, no traceback
  usage_error   exit 2 with the usage text and no `error:` line (bare `qdpo`), no traceback
  unclean_error exit 2 otherwise (several `error:` lines, or none)
  skip          exit 0 and the output counts skipped rows
  success       exit 0
  other_exit    any other exit status without a traceback (e.g. `plan`'s 1 for "does not fit")
  traceback     a Python traceback
  bug           "this is a bug in qdpo" (an unexpected exception, caught)
  hang          the case ran past its time limit

Placeholders in argv, replaced when the case runs: {tmp} the case's directory (also the current
directory), {run} a tiny trained run shared by all cases (built once; never overwritten),
{model} the quickstart model directory. Every case directory holds `base.yaml` (a fast recipe:
the quickstart model, 4-bit, one optimizer step, relative paths next to it), `good.jsonl` (8
valid pairs), `afile` (a plain file), `adir/` (an empty directory).

    python tests/fuzz_corpus.py [--seed N] [--only SUBSTRING] [--timeout S] [-v]

runs every case and prints the counts per category, then each bug / hang with its first error
line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from tiny import QUICKSTART, qdpo  # noqa: E402

MODEL = QUICKSTART / "model"
FileSpec = Union[bytes, str, Callable[[Path], Any]]

CATEGORIES = ("clean_error", "usage_error", "unclean_error", "skip", "success", "other_exit",
              "traceback", "bug", "hang")
PROBLEMS = ("traceback", "bug", "hang")


@dataclass
class Case:
    name: str
    argv: list[str]
    files: dict[str, FileSpec] = field(default_factory=dict)
    expect: str | None = None  # a category, when the outcome is known for sure
    needs_run: bool = False  # uses {run}, the shared trained run
    heavy: bool = False  # may load a model or train: seconds rather than milliseconds
    stdin: str | None = None


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

BASE_RECIPE: dict[str, Any] = {
    "model": {"name_or_path": str(MODEL), "random_init": True, "quantization": "nf4"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "data": {"train": "good.jsonl", "max_length": 64, "max_prompt_length": 32, "num_proc": 1},
    "loss": {"type": "sigmoid", "beta": 0.1},
    "train": {"pairs_per_step": 4, "micro_batch_pairs": 4, "max_steps": 1,
              "learning_rate": 1.0e-3, "seed": 0},
    "eval": {"sample_max_new_tokens": 2},
    "output": {"dir": "out"},
}

WORDS = ("sun", "river", "lamp", "quiet", "music", "garden", "stone", "cloud", "bread", "tea",
         "winter", "book", "friend", "road", "apple", "sea", "light", "morning")


def _dump(obj: Any) -> bytes:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).encode("utf-8")


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _good_rows(rng: random.Random, n: int = 8, conversational: bool = False) -> list[dict]:
    rows = []
    for _ in range(n):
        p, c, r = _sentence(rng), _sentence(rng, 8), _sentence(rng, 3)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": p}],
                         "chosen": [{"role": "assistant", "content": c}],
                         "rejected": [{"role": "assistant", "content": r}]})
        else:
            rows.append({"prompt": p, "chosen": c, "rejected": r})
    return rows


def _jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def _csv(rows: list[dict]) -> bytes:
    import csv

    cols: list[str] = []
    for r in rows:
        for k in (r if isinstance(r, dict) else {}):
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (r[c] if isinstance(r[c], str)
                                                 else json.dumps(r[c])) for c in cols])
    return buf.getvalue().encode("utf-8", "surrogatepass")


def _parquet(rows: list[dict] | Callable[[], Any]) -> Callable[[Path], None]:
    """A writer of a parquet file: from rows (pyarrow infers the types), or a pyarrow table."""

    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = rows() if callable(rows) else pa.Table.from_pylist(rows)
        pq.write_table(table, path)

    return write


def _nested(rng: random.Random, depth: int) -> Any:
    """Junk nested `depth` levels deep: lists and dicts of mixed scalars."""
    node: Any = rng.choice([1, "x", None, 2.5, True])
    for _ in range(depth):
        node = rng.choice([[node, 1], {"k": node, "n": None}, [node]])
    return node


def _garbage(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _common_files(rng: random.Random) -> dict[str, FileSpec]:
    return {"base.yaml": _dump(BASE_RECIPE), "good.jsonl": _jsonl(_good_rows(rng)),
            "afile": b"just a file\n", "adir/": b""}


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------

# (key path, values that are wrong for it); the runner tries a seeded selection of each
RECIPE_KEYS: dict[str, list[Any]] = {
    "lora.r": [0, -1, 10**9, 2.5, "sixteen", float("nan"), [4], None, True],
    "lora.alpha": [0, -8, float("inf"), float("nan"), "x", {"a": 1}],
    "lora.dropout": [1.0, -0.1, float("nan"), 5, "0.1x"],
    "lora.target_modules": [5, [], [1, 2], {"q": 1}, "", "no_such_module"],
    "lora.use_rslora": ["maybe", 2, [True]],
    "lora.init_adapter": ["/no/such/adapter", 7, "afile", "adir"],
    "model.quantization": ["nf3", 4, None, ["nf4"]],
    "model.compute_dtype": ["fp8", 16, ""],
    "model.name_or_path": ["", "/no/such/model/dir", "afile", "adir", 42, ["x"]],
    "model.tokenizer": ["/no/such/tokenizer", "afile", 3],
    "model.random_init": ["yes please", 2],
    "data.train": [[], 5, {"path": 3}, [{"path": "good.jsonl", "weight": -1}],
                   [{"path": "good.jsonl", "weight": float("nan")}],
                   [{"path": "good.jsonl", "samples": 0}], [{"nope": 1}], "missing.jsonl",
                   "adir", "afile", [{"path": "good.jsonl", "columns": {"bogus": "x"}}],
                   [{"path": "good.jsonl", "weight": float("inf")}]],
    "data.max_length": [0, 1, -5, 10**12, float("nan"), "long"],
    "data.max_prompt_length": [0, 64, 1000, -1, float("inf")],
    "data.max_pairs": [0, -1, 1.5, "all"],
    "data.num_proc": [0, -2, 10**6, "many"],
    "data.format": ["xml", 1, None],
    "data.columns": [5, ["prompt"], {"prompt": 3}, {"nothing": "x"}, {"prompt": "nope"}],
    "data.chat_template": ["bogus", 5, "{% for %}", "{{ unclosed"],
    "data.system_prompt": [5, ["a"], {"x": 1}],
    "data.strict": ["sometimes", 3],
    "data.pair_selection": ["worst", 0],
    "loss.type": ["", [], "bogus", ["sigmoid", "bogus"], 3, {"sigmoid": 1}],
    "loss.weights": [[float("nan")], [-1], [1, 2, 3], "1"],
    "loss.beta": [0, -0.1, float("nan"), float("inf"), 1e300, "0.1.2"],
    "loss.label_smoothing": [0.5, -0.1, float("nan"), 2],
    "loss.simpo_gamma": [float("nan"), float("-inf"), "g"],
    "loss.ld_alpha": [2, -1, float("nan")],
    "train.pairs_per_step": [0, -4, 10**15, 3.5, float("nan")],
    "train.micro_batch_pairs": [0, -1, 10**15, 5, "auto"],
    "train.max_tokens": [0, -1, 1, "lots", float("inf")],
    "train.layout": ["diagonal", 0],
    "train.reference": ["offline", False],
    "train.epochs": [0, -1, float("nan"), float("inf"), 1e300],
    "train.max_steps": [0, -1, 10**20, float("nan"), "1"],
    "train.learning_rate": [0, -1e-3, float("nan"), float("inf"), 1e300, "fast"],
    "train.lr_scheduler": ["exp", 1],
    "train.warmup_ratio": [-0.1, 1.5, float("nan")],
    "train.warmup_steps": [-1, 10**20, 0.5],
    "train.optimizer": ["sgd", None],
    "train.weight_decay": [-1, float("nan"), float("inf")],
    "train.adam_beta1": [1.0, -0.5, float("nan")],
    "train.adam_beta2": [1.5, float("nan")],
    "train.max_grad_norm": [-1, float("nan"), float("inf")],
    "train.seed": [-1, 2**70, 1.5, "s"],
    "train.log_every_steps": [0, -1],
    "train.compile": ["fast"],
    "eval.data": [5, "missing.jsonl", [{"path": "afile.jsonl"}], "adir"],
    "eval.split_fraction": [1.0, -0.5, float("nan"), 0.9999],
    "eval.every_steps": [-1, float("nan")],
    "eval.max_pairs": [0, -3],
    "eval.micro_batch_pairs": [0, -1],
    "eval.sample_prompts": ["one prompt", [1, 2], [{"role": 3}], [""]],
    "eval.sample_max_new_tokens": [0, -1, 10**9],
    "output.dir": ["", "afile", "afile/run", 5, ["x"]],
    "output.save_every_steps": [-1, float("nan")],
    "output.keep_last": [0, -1],
    "output.wandb": [5, ""],
}

# values that pass the type but could still reach training: these cases run `train`
_TRAIN_KEYS = {k for k in RECIPE_KEYS if k.split(".")[0] in ("lora", "loss", "train", "model",
                                                            "eval", "output")}


def _set(d: dict, dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for h in head:
        d = d.setdefault(h, {})
    d[last] = value


def _recipe_value_cases(rng: random.Random) -> list[Case]:
    import copy

    cases = []
    for key, values in RECIPE_KEYS.items():
        for i, v in enumerate(values):
            r = copy.deepcopy(BASE_RECIPE)
            _set(r, key, v)
            if key in _TRAIN_KEYS:
                argv = ["train", "{tmp}/r.yaml", "-o", "{tmp}/out"]
            else:
                argv = ["data", "{tmp}/r.yaml", "-n", "1"]
            cases.append(Case(f"recipe-value/{key}/{i}", argv, {"r.yaml": _dump(r)}, heavy=True))
    return cases


def _recipe_text_cases(rng: random.Random) -> list[Case]:
    """Recipes broken as text: YAML structure, encodings, aliases."""
    base = _dump(BASE_RECIPE).decode()
    bomb = "a0: &a0 [x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
        for i in range(1, 6))  # 5**6 = 15,625 leaves: big enough to notice, small to finish
    texts: dict[str, bytes | str] = {
        "empty": b"",
        "only-comments": "# nothing here\n# at all\n",
        "whitespace": "   \n\t\n",
        "scalar": "42\n",
        "string": "hello world\n",
        "list": "- model\n- data\n",
        "null-doc": "~\n",
        "binary": _garbage(rng, 400),
        "binary-nul": b"\x00" * 64,
        "invalid-utf8": base.encode() + b"\n# \xff\xfe\xc3\x28 broken\n",
        "invalid-utf8-value": base.replace("sigmoid", "sig\udcffmoid").encode(
            "utf-8", "surrogateescape"),
        "utf16": base.encode("utf-16"),
        "bom": b"\xef\xbb\xbf" + base.encode(),
        "tabs": base.replace("  ", "\t"),
        "dup-top": base + "train:\n  max_steps: 3\n",
        "dup-nested": base.replace("  max_steps: 1\n", "  max_steps: 1\n  max_steps: 2\n"),
        "dup-section-empty": base + "model:\n",
        "unknown-section": base + "optimizer:\n  lr: 1\n",
        "unknown-key": base.replace("  max_steps: 1\n", "  max_step: 1\n"),
        "section-list": base.replace("loss:\n  type: sigmoid\n  beta: 0.1\n",
                                     "loss:\n- sigmoid\n- 0.1\n"),
        "section-scalar": base + "eval: 3\n",
        "section-string": base.replace("output:\n  dir: out\n", "output: out\n"),
        "alias-bomb": bomb + base,
        "alias-bomb-value": base + "eval:\n  sample_prompts: [" + ", ".join(
            ["&b0 [x, x, x, x, x]"] + [f"&b{i} [*b{i-1}, *b{i-1}, *b{i-1}, *b{i-1}, *b{i-1}]"
                                       for i in range(1, 6)]) + "]\n",
        "recursive-alias": base + "eval:\n  sample_prompts: &r [a, *r]\n",
        "recursive-map": base.replace("loss:\n  type: sigmoid\n", "loss: &l\n  type: sigmoid\n"
                                      "  weights: *l\n"),
        "merge-key": base + "x: &x {max_steps: 2}\ntrain2:\n  <<: *x\n",
        "deep-list-50": base + "eval:\n  sample_prompts: " + "[" * 50 + "a" + "]" * 50 + "\n",
        "deep-list-3000": base + "eval:\n  sample_prompts: " + "[" * 3000 + "]" * 3000 + "\n",
        "deep-map-500": base + "eval:\n  data: " + "{a: " * 500 + "1" + "}" * 500 + "\n",
        "unclosed-bracket": base + "eval:\n  sample_prompts: [a, b\n",
        "unclosed-quote": base + "data:\n  system_prompt: \"never ends\n",
        "bad-indent": base.replace("  r: 4", "     r: 4"),
        "document-stream": base + "---\n" + base,
        "python-tag": base + "x: !!python/object/apply:os.system ['echo hi']\n",
        "custom-tag": base.replace("beta: 0.1", "beta: !float 0.1"),
        "binary-tag": base.replace("beta: 0.1", "beta: !!binary aGVsbG8="),
        "timestamp": base.replace("seed: 0", "seed: 2001-12-14t21:59:43.10-05:00"),
        "huge-int": base.replace("seed: 0", "seed: " + "9" * 5000),
        "huge-float": base.replace("beta: 0.1", "beta: 1e99999"),
        "nan-everywhere": base.replace("0.1", ".nan").replace("1.0e-3", ".nan")
        .replace("max_steps: 1", "max_steps: .nan"),
        "inf-steps": base.replace("max_steps: 1", "max_steps: .inf"),
        "neg-inf-lr": base.replace("learning_rate: 0.001", "learning_rate: -.inf"),
        "octal-hex": base.replace("max_steps: 1", "max_steps: 0x1").replace("r: 4", "r: 0o4"),
        "bool-words": base.replace("random_init: true", "random_init: off")
        .replace("max_steps: 1", "max_steps: yes"),
        "null-section-values": "model:\ndata:\ntrain:\n",
        "null-keys": base + "~: 1\n",
        "int-keys": base + "1: 2\n",
        "list-key": base + "? [a, b]\n: 1\n",
        "long-line": base + "# " + "x" * 1_000_000 + "\n",
        "huge-system-prompt": base.replace("  num_proc: 1\n", "  num_proc: 1\n  system_prompt: "
                                           + "y" * 500_000 + "\n"),
        "nul-in-string": base.replace("dir: out", "dir: \"o\\0ut\""),
        "control-chars": base.replace("dir: out", "dir: \"o\\x07\\x1bu\\x7ft\""),
        "crlf": base.replace("\n", "\r\n"),
        "cr-only": base.replace("\n", "\r"),
    }
    cases = []
    for name, text in texts.items():
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        cases.append(Case(f"recipe-text/{name}", ["data", "{tmp}/r.yaml", "-n", "1"],
                          {"r.yaml": data}, heavy=True))
    # a handful through `train` and `plan` and `bench` too: they read the recipe on their own
    for name in ("empty", "binary", "dup-nested", "alias-bomb", "recursive-alias",
                 "deep-list-3000", "invalid-utf8", "huge-int"):
        data = texts[name]
        data = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
        for cmd in (["train", "{tmp}/r.yaml"], ["plan", "{tmp}/r.yaml"],
                    ["sweep", "{tmp}/r.yaml", "loss.beta=0.1,0.2", "--out", "{tmp}/sw"]):
            cases.append(Case(f"recipe-text/{name}/{cmd[0]}", cmd, {"r.yaml": data}))
    return cases


BAD_OVERRIDES = [
    "=1", "train", "train.=1", ".max_steps=1", "..=1", "train..max_steps=1", "train.max_steps",
    "train.max_steps==3", "nope.x=1", "train.nope=1", "model=3", "train=5", "train.max_steps.x=1",
    "data.columns=5", "data.columns.prompt={a: 1}", "data.columns.bogus=x", "data.columns.=x",
    "loss.type=[]", "loss.type=[sigmoid, bogus]", "loss.type=[sigmoid", "loss.weights=[nan]",
    "loss.type=[sigmoid,ipo]", "train.learning_rate=nan", "train.learning_rate=-1",
    "train.learning_rate=.inf", "train.epochs=0", "train.warmup_ratio=2", "lora.dropout=1",
    "data.max_length=1", "train.max_tokens=-5", "train.max_steps=1e400", "train.max_steps=abc",
    "train.max_steps=[1]", "train.max_steps={}", "train.max_steps=", "lora.r=" + "9" * 400,
    "data.train=", "data.train=[]", "data.train={path: 3}", "data.train=missing.jsonl",
    "eval.data=afile", "output.dir=", "model.name_or_path=", "data.chat_template={{",
    "train.seed=" + "1" * 30, "data.system_prompt=" + "z" * 200_000, "lora.r=&a [*a]",
    "data.train=!!python/name:os.system", "train.max_steps=\x00", "loss.beta=\udcff",
]


def _override_cases(rng: random.Random) -> list[Case]:
    cases = []
    for i, ov in enumerate(BAD_OVERRIDES):
        cmd = rng.choice(["train", "data", "plan"])
        argv = [cmd, "{tmp}/base.yaml", ov] + (["-o", "{tmp}/out"] if cmd == "train" else [])
        cases.append(Case(f"override/{i}:{ov[:30]!r}", argv, heavy=True))
    return cases


# ---------------------------------------------------------------------------------------------
# Data files, every format
# ---------------------------------------------------------------------------------------------

def _row_mutations(rng: random.Random) -> dict[str, list[Any]]:
    """Row lists, each wrong in its own way (most as standard text rows)."""
    g = _good_rows(rng)
    conv = _good_rows(rng, conversational=True)

    def each(fn: Callable[[dict], Any], rows: list[dict] | None = None) -> list[Any]:
        out = []
        for r in (rows or g):
            r = dict(r)
            out.append(fn(r))
        return out

    def drop(k: str) -> Callable[[dict], dict]:
        return lambda r: {a: b for a, b in r.items() if a != k}

    def put(k: str, v: Any) -> Callable[[dict], dict]:
        return lambda r: {**r, k: v}

    huge = "w" * 1_500_000
    return {
        "missing-chosen": each(drop("chosen")),
        "missing-prompt": each(drop("prompt")),
        "missing-all": [{"other": 1} for _ in g],
        "missing-in-some": [r if i % 2 else drop("rejected")(r) for i, r in enumerate(g)],
        "chosen-int": each(put("chosen", 7)),
        "chosen-null": each(put("chosen", None)),
        "chosen-float": each(put("chosen", 1.5)),
        "chosen-bool": each(put("chosen", True)),
        "chosen-list-ints": each(put("chosen", [1, 2, 3])),
        "chosen-dict": each(put("chosen", {"a": "b"})),
        "prompt-int": each(put("prompt", 12)),
        "prompt-nested": [{**r, "prompt": _nested(rng, 8)} for r in g],
        "rejected-nested": [{**r, "rejected": _nested(rng, 30)} for r in g],
        "mixed-types": [put(rng.choice(["prompt", "chosen", "rejected"]),
                            rng.choice([1, None, [], {}, 2.5, [None]]))(r) for r in g],
        "one-good-row": g[:1],
        "one-bad-row": [{"prompt": 1}],
        "all-equal": [{**r, "rejected": r["chosen"]} for r in g],
        "all-empty-strings": [{"prompt": "", "chosen": "", "rejected": ""} for _ in g],
        "empty-responses": each(put("chosen", "")),
        "whitespace-only": [{"prompt": " ", "chosen": "\n", "rejected": "\t"} for _ in g],
        "huge-prompt": [{**g[0], "prompt": huge}] + g[1:],
        "huge-chosen": [{**g[0], "chosen": huge}] + g[1:],
        "duplicate-pairs": [g[0]] * 60,
        "nul-chars": [{k: v.replace(" ", "\x00") for k, v in r.items()} for r in g],
        "lone-surrogates": [{**r, "chosen": r["chosen"] + "\ud800"} for r in g],
        "control-chars": [{**r, "prompt": "\x1b[31m\x07" + r["prompt"] + "\x7f\x08"} for r in g],
        "unicode-exotic": [{**r, "prompt": "\u202e\u2028\ufeff" + r["prompt"] + "\U0001F600"}
                           for r in g],
        "special-tokens": [{**r, "chosen": "<|im_end|><|begin_of_text|>" + r["chosen"]
                            + "<|pad|>"} for r in g],
        "extra-columns": [{**r, **{f"c{i}": i for i in range(300)}} for r in g],
        "conv-good-mixed-standard": conv[:4] + g[4:],
        "conv-bad-role": [{**r, "prompt": [{"role": "wizard", "content": "hi"}]} for r in conv],
        "conv-no-content": [{**r, "chosen": [{"role": "assistant"}]} for r in conv],
        "conv-content-int": [{**r, "chosen": [{"role": "assistant", "content": 5}]}
                             for r in conv],
        "conv-empty-list": [{**r, "prompt": []} for r in conv],
        "conv-message-str": [{**r, "chosen": ["just text"]} for r in conv],
        "conv-assistant-prompt": [{**r, "prompt": [{"role": "assistant", "content": "x"}]}
                                  for r in conv],
        "conv-content-parts": [{**r, "prompt": [{"role": "user", "content": [
            {"type": "image", "url": "x"}]}]} for r in conv],
        "conv-messages-junk": [{"messages": _nested(rng, 5)} for _ in conv],
        "chosen-list-of-scores": [{"prompt": r["prompt"], "completions": [
            {"text": "a", "score": float("nan")}, {"text": "b", "score": "high"}]} for r in g],
        "weight-column-bad": [{**r, "weight": rng.choice([-1, float("nan"), "x", None])}
                              for r in g],
        "weight-column-inf": [{**r, "weight": float("inf")} for r in g],
        "score-columns": [{**r, "score_chosen": "x", "score_rejected": float("nan")} for r in g],
        "rows-are-lists": [[r["prompt"], r["chosen"], r["rejected"]] for r in g],
        "rows-are-scalars": [1, "two", None, 3.5],
        "rows-mixed": [g[0], 5, None, [1], g[1], "x"],
    }


def _data_file_cases(rng: random.Random) -> list[Case]:
    muts = _row_mutations(rng)
    cases = []
    for name, rows in muts.items():
        dict_rows = [r for r in rows if isinstance(r, dict)]
        big = name.startswith("huge")
        fmts = ["jsonl", "json", "csv", "parquet"]
        if big or not dict_rows or len(dict_rows) != len(rows):
            fmts = ["jsonl", "json"]  # lists and scalars as rows: JSON only
        for fmt in fmts:
            if fmt == "jsonl":
                spec: FileSpec = _jsonl(rows)
            elif fmt == "json":
                spec = json.dumps(rows).encode()
            elif fmt == "csv":
                spec = _csv(dict_rows)
            else:
                def fix(rows: list[dict] = dict_rows) -> Any:
                    import pyarrow as pa

                    try:
                        return pa.Table.from_pylist(rows)
                    except Exception:
                        # mixed types arrow will not infer: every cell as JSON text
                        return pa.Table.from_pylist([{k: json.dumps(v) for k, v in r.items()}
                                                     for r in rows])
                spec = _parquet(fix)
            cases.append(_data_case(rng, f"data/{name}.{fmt}", f"d.{fmt}", spec))
    return cases


def _data_case(rng: random.Random, name: str, fname: str, spec: FileSpec,
               how: str | None = None) -> Case:
    """A data file through one of the commands that read data (mostly `qdpo data`)."""
    how = how or rng.choices(["data", "strict", "eval-src", "train", "eval"],
                             weights=[10, 2, 1, 1, 1])[0]
    if how == "data":
        argv = ["data", "{tmp}/base.yaml", f"data.train={{tmp}}/{fname}", "-n", "1"]
    elif how == "strict":
        argv = ["data", "{tmp}/base.yaml", f"data.train={{tmp}}/{fname}", "data.strict=true",
                "-n", "1"]
    elif how == "eval-src":
        argv = ["data", "{tmp}/base.yaml", f"eval.data={{tmp}}/{fname}", "-n", "0"]
    elif how == "train":
        argv = ["train", "{tmp}/base.yaml", f"data.train={{tmp}}/{fname}", "-o", "{tmp}/out"]
    else:
        argv = ["eval", "{run}", "--data", f"{{tmp}}/{fname}", "--max-pairs", "4"]
    return Case(f"{name}@{how}", argv, {fname: spec}, needs_run=how == "eval", heavy=True)


def _raw_data_cases(rng: random.Random) -> list[Case]:
    """Files broken below the row level: bytes, encodings, layout."""
    g = _good_rows(rng)
    good_jsonl = _jsonl(g)
    good_csv = _csv(g)
    raw: dict[str, tuple[str, FileSpec]] = {
        "empty.jsonl": ("jsonl", b""),
        "empty.json": ("json", b""),
        "empty.csv": ("csv", b""),
        "empty.parquet": ("parquet", b""),
        "blank-lines.jsonl": ("jsonl", b"\n\n  \n\r\n"),
        "binary.jsonl": ("jsonl", _garbage(rng, 2000)),
        "binary.json": ("json", _garbage(rng, 2000)),
        "binary.csv": ("csv", _garbage(rng, 2000)),
        "binary.parquet": ("parquet", _garbage(rng, 2000)),
        "parquet-magic-garbage.parquet": ("parquet", b"PAR1" + _garbage(rng, 500) + b"PAR1"),
        "invalid-utf8.jsonl": ("jsonl", good_jsonl[:40] + b"\xff\xfe\xc3\x28" + good_jsonl[40:]),
        "invalid-utf8.json": ("json", json.dumps(g).encode()[:30] + b"\x80\x81"
                              + json.dumps(g).encode()[30:]),
        "invalid-utf8.csv": ("csv", good_csv[:60] + b"\xc0\xaf\xed\xa0\x80" + good_csv[60:]),
        "latin1.csv": ("csv", good_csv.decode().replace("Sun", "Sün").encode("latin-1")),
        "utf16.jsonl": ("jsonl", good_jsonl.decode().encode("utf-16")),
        "bom.jsonl": ("jsonl", b"\xef\xbb\xbf" + good_jsonl),
        "bom.csv": ("csv", b"\xef\xbb\xbf" + good_csv),
        "nul-bytes.jsonl": ("jsonl", good_jsonl.replace(b"\n", b"\x00\n")),
        "nul-bytes.csv": ("csv", good_csv.replace(b",", b"\x00,", 3)),
        "truncated.jsonl": ("jsonl", good_jsonl[:-25]),
        "truncated-midline.jsonl": ("jsonl", good_jsonl[: len(good_jsonl) // 2]),
        "one-bad-line.jsonl": ("jsonl", good_jsonl + b"{not json}\n" + good_jsonl),
        "trailing-comma.json": ("json", json.dumps(g).encode()[:-1] + b",]"),
        "json-scalar.json": ("json", b"42"),
        "json-string.json": ("json", b'"prompt"'),
        "json-null.json": ("json", b"null"),
        "json-true.json": ("json", b"true"),
        "json-empty-list.json": ("json", b"[]"),
        "json-empty-dict.json": ("json", b"{}"),
        "json-list-of-lists.json": ("json", b"[[1,2],[3]]"),
        "json-dict-rows.json": ("json", json.dumps({"data": g}).encode()),
        "json-dict-rows-other-key.json": ("json", json.dumps({"meta": {"v": 1},
                                                              "rows": g}).encode()),
        "json-dict-empty-rows.json": ("json", json.dumps({"data": []}).encode()),
        "json-dict-int-list.json": ("json", json.dumps({"data": [1, 2, 3]}).encode()),
        "json-dict-nested-rows.json": ("json", json.dumps({"a": {"b": g}}).encode()),
        "json-dict-two-lists.json": ("json", json.dumps({"x": [], "y": g}).encode()),
        "json-dict-of-columns.json": ("json", json.dumps(
            {k: [r[k] for r in g] for k in ("prompt", "chosen", "rejected")}).encode()),
        "json-deep.json": ("json", b"[" * 5000 + b"]" * 5000),
        "jsonl-deep.jsonl": ("jsonl", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"),
        "jsonl-nan.jsonl": ("jsonl", b'{"prompt": NaN, "chosen": Infinity, "rejected": -Infinity}'
                            b"\n" * 3),
        "jsonl-huge-number.jsonl": ("jsonl", b'{"prompt": "a", "chosen": ' + b"9" * 5000
                                    + b', "rejected": "b"}\n'),
        "jsonl-dup-keys.jsonl": ("jsonl", b'{"prompt": "a", "prompt": 3, "chosen": "x", '
                                 b'"rejected": "y"}\n' * 4),
        "jsonl-cr-only.jsonl": ("jsonl", good_jsonl.replace(b"\n", b"\r")),
        "jsonl-as-json.json": ("json", good_jsonl),
        "json-as-jsonl.jsonl": ("jsonl", json.dumps(g, indent=2).encode()),
        "csv-ragged.csv": ("csv", b"prompt,chosen,rejected\na,b,c\nd,e\nf,g,h,i,j\nk\n"),
        "csv-header-only.csv": ("csv", b"prompt,chosen,rejected\n"),
        "csv-no-header.csv": ("csv", b"a,b,c\nd,e,f\n"),
        "csv-dup-columns.csv": ("csv", b"prompt,prompt,chosen,rejected\na,b,c,d\ne,f,g,h\n"),
        "csv-unclosed-quote.csv": ("csv", b'prompt,chosen,rejected\n"a,b,c\nd,e,f\n'),
        "csv-semicolon.csv": ("csv", b"prompt;chosen;rejected\na;b;c\n"),
        "csv-json-cells.csv": ("csv", b'prompt,chosen,rejected\n"[{""role"": ""user""}]",'
                               b'"{}","[]"\n'),
        "csv-empty-header.csv": ("csv", b",,\na,b,c\n"),
        "csv-huge-field.csv": ("csv", b"prompt,chosen,rejected\n" + b"q" * 1_500_000
                               + b",b,c\nx,y,z\n"),
        "csv-many-columns.csv": ("csv", b",".join(b"c%d" % i for i in range(5000)) + b"\n"
                                 + b",".join(b"v" for _ in range(5000)) + b"\n"),
        "csv-only-newlines.csv": ("csv", b"\n\n\n"),
        "parquet-truncated.parquet": ("parquet", None),  # filled below
        "parquet-zero-rows.parquet": ("parquet", _parquet(lambda: _pa_table(
            {"prompt": [], "chosen": [], "rejected": []}, "string"))),
        "parquet-int-columns.parquet": ("parquet", _parquet(lambda: _pa_table(
            {"prompt": [1, 2], "chosen": [3, 4], "rejected": [5, 6]}))),
        "parquet-null-columns.parquet": ("parquet", _parquet(lambda: _pa_table(
            {"prompt": [None, None], "chosen": [None, None], "rejected": [None, None]}))),
        "parquet-list-ints.parquet": ("parquet", _parquet(lambda: _pa_table(
            {"prompt": [[1, 2]], "chosen": [[3]], "rejected": [[]]}))),
        "parquet-struct.parquet": ("parquet", _parquet(lambda: _pa_table(
            {"prompt": [{"a": 1}], "chosen": [{"b": "x"}], "rejected": [{"c": None}]}))),
        "parquet-binary-col.parquet": ("parquet", _parquet(lambda: _pa_table(
            {"prompt": [b"\xff\x00"], "chosen": [b"a"], "rejected": [b"b"]}))),
        "parquet-no-columns.parquet": ("parquet", _parquet(lambda: _pa_table({}))),
        "parquet-wrong-columns.parquet": ("parquet", _parquet(lambda: _pa_table(
            {"question": ["a"], "good": ["b"], "bad": ["c"]}))),
        "unknown-ext.txt": ("txt", good_jsonl),
        "no-ext": ("", good_jsonl),
    }
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(g), buf)
    pbytes = buf.getvalue()
    raw["parquet-truncated.parquet"] = ("parquet", pbytes[: len(pbytes) // 2])
    raw["parquet-tail-cut.parquet"] = ("parquet", pbytes[:-10])
    raw["parquet-flipped.parquet"] = ("parquet", pbytes[:100] + bytes(
        b ^ 0xFF for b in pbytes[100:140]) + pbytes[140:])
    cases = []
    for fname, (_, spec) in raw.items():
        cases.append(_data_case(rng, f"raw/{fname}", fname, spec))
    # a few as directory sources and globs
    cases.append(Case("raw/dir-of-junk@data", ["data", "{tmp}/base.yaml", "data.train={tmp}/dd",
                                               "-n", "1"],
                      {"dd/a.jsonl": _garbage(rng, 100), "dd/b.csv": b"x\n"}, heavy=True))
    cases.append(Case("raw/dir-empty@data", ["data", "{tmp}/base.yaml", "data.train={tmp}/adir"],
                      heavy=True))
    cases.append(Case("raw/glob-none@data", ["data", "{tmp}/base.yaml",
                                             "data.train={tmp}/*.nothing"], heavy=True))
    cases.append(Case("raw/glob-bracket@data", ["data", "{tmp}/base.yaml",
                                                "data.train={tmp}/[unclosed.jsonl"], heavy=True))
    cases.append(Case("raw/data-is-dir-named-jsonl@data",
                      ["data", "{tmp}/base.yaml", "data.train={tmp}/d.jsonl"],
                      {"d.jsonl/": b""}, heavy=True))
    cases.append(Case("raw/split-missing@data",
                      ["data", "{tmp}/base.yaml", "data.train=[{path: good.jsonl, split: nope}]"],
                      heavy=True))
    return cases


def _pa_table(cols: dict[str, list], typ: str | None = None) -> Any:
    import pyarrow as pa

    if typ == "string":
        return pa.table({k: pa.array(v, type=pa.string()) for k, v in cols.items()})
    return pa.table(cols) if cols else pa.table({})


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------

def _prompt_files(rng: random.Random) -> dict[str, bytes]:
    return {
        "good": b'{"prompt": "hi"}\n{"prompt": [{"role": "user", "content": "hello"}]}\n',
        "empty": b"",
        "binary": _garbage(rng, 300),
        "invalid-utf8": b'{"prompt": "h\xffi"}\n',
        "no-prompt": b'{"question": "hi"}\n',
        "prompt-int": b'{"prompt": 5}\n',
        "prompt-null": b'{"prompt": null}\n',
        "prompt-nested": json.dumps({"prompt": _nested(rng, 10)}).encode() + b"\n",
        "prompt-empty": b'{"prompt": ""}\n',
        "messages-bad": b'{"messages": [{"role": 1, "content": []}]}\n',
        "messages-assistant-last": b'{"messages": [{"role": "user", "content": "a"}, '
                                   b'{"role": "assistant", "content": "b"}]}\n',
        "nul": b'{"prompt": "a\\u0000b"}\n',
        "lone-surrogate": b'{"prompt": "a\\ud800b"}\n',
        "not-json": b"hello there\nsecond line\n",
        "json-list": b'[{"prompt": "hi"}]\n',
        "scalar-line": b"5\n",
        "huge": json.dumps({"prompt": "z" * 1_000_000}).encode() + b"\n",
        "fields-clash": b'{"prompt": "hi", "response": 3}\n',
    }


def _sampling_bad() -> list[list[str]]:
    return [["--max-new-tokens", "0"], ["--max-new-tokens", "-1"], ["--max-new-tokens", "nan"],
            ["--max-new-tokens", "1e9"], ["--max-new-tokens", "99999999999999999999999"],
            ["--temperature", "-1"], ["--temperature", "nan"], ["--temperature", "inf"],
            ["--temperature", "x"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-p", "nan"],
            ["--top-p", "-inf"], ["--top-k", "-1"], ["--top-k", "1e3"],
            ["--repetition-penalty", "0"], ["--repetition-penalty", "nan"],
            ["--repetition-penalty", "-2"], ["--seed", "-1"], ["--seed", "nan"],
            ["--seed", "99999999999999999999999"], ["--seed", str(2**64)]]


def _cli_cases(rng: random.Random) -> list[Case]:
    C = Case
    cases: list[Case] = []
    prompts = _prompt_files(rng)
    gen = ["generate", "{run}", "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/o.jsonl",
           "--max-new-tokens", "2"]
    pgood = {"p.jsonl": prompts["good"]}

    # train
    cases += [
        C("train/missing-recipe", ["train", "{tmp}/missing.yaml"], expect="clean_error"),
        C("train/recipe-is-dir", ["train", "{tmp}/adir"], expect="clean_error"),
        C("train/recipe-is-plain-file", ["train", "{tmp}/afile"]),
        C("train/gpus-0", ["train", "{tmp}/base.yaml", "--gpus", "0"], expect="clean_error"),
        C("train/gpus-neg", ["train", "{tmp}/base.yaml", "--gpus", "-1"], expect="clean_error"),
        C("train/gpus-nan", ["train", "{tmp}/base.yaml", "--gpus", "nan"], expect="clean_error"),
        C("train/gpus-2", ["train", "{tmp}/base.yaml", "--gpus", "2"]),
        C("train/gpus-huge", ["train", "{tmp}/base.yaml", "--gpus", "9" * 30]),
        C("train/out-under-file", ["train", "{tmp}/base.yaml", "-o", "{tmp}/afile/run"],
          heavy=True),
        C("train/out-is-file", ["train", "{tmp}/base.yaml", "-o", "{tmp}/afile"], heavy=True),
        C("train/out-is-file-overwrite", ["train", "{tmp}/base.yaml", "-o", "{tmp}/afile",
                                          "--overwrite"], heavy=True),
        C("train/out-missing-parents", ["train", "{tmp}/base.yaml", "-o", "{tmp}/a/b/c/run"],
          heavy=True),
        C("train/out-empty", ["train", "{tmp}/base.yaml", "-o", ""], heavy=True),
        C("train/out-existing-run", ["train", "{tmp}/base.yaml", "-o", "{run}"],
          needs_run=True, heavy=True, expect="clean_error"),
        C("train/resume-missing", ["train", "{tmp}/base.yaml", "--resume", "{tmp}/nockpt"],
          heavy=True),
        C("train/resume-file", ["train", "{tmp}/base.yaml", "--resume", "{tmp}/afile"],
          heavy=True),
        C("train/resume-empty-dir", ["train", "{tmp}/base.yaml", "--resume", "{tmp}/adir"],
          heavy=True),
        C("train/resume-auto-nothing", ["train", "{tmp}/base.yaml", "--resume"], heavy=True),
        C("train/resume-and-overwrite", ["train", "{tmp}/base.yaml", "--resume", "--overwrite"],
          heavy=True),
        C("train/resume-junk-ckpt", ["train", "{tmp}/base.yaml", "--resume", "{tmp}/ck"],
          {"ck/trainer_state.json": b"\xff\x00junk", "ck/adapter_config.json": b"{"},
          heavy=True),
        C("train/unknown-option", ["train", "{tmp}/base.yaml", "--bogus"],
          expect="clean_error"),
        C("train/no-args", ["train"], expect="clean_error"),
    ]
    # data
    cases += [
        C("data/n-neg", ["data", "{tmp}/base.yaml", "-n", "-1"], expect="clean_error"),
        C("data/n-nan", ["data", "{tmp}/base.yaml", "-n", "nan"], expect="clean_error"),
        C("data/n-huge", ["data", "{tmp}/base.yaml", "-n", "99999999"], heavy=True),
        C("data/n-bigint", ["data", "{tmp}/base.yaml", "-n", "9" * 40]),
        C("data/missing-recipe", ["data", "{tmp}/nope.yaml"], expect="clean_error"),
        C("data/no-cache", ["data", "{tmp}/base.yaml", "--no-cache", "-n", "0"], heavy=True),
    ]
    # eval
    ev = ["eval", "{run}", "--data", "{tmp}/good.jsonl"]
    cases += [
        C("eval/run-missing", ["eval", "{tmp}/norun", "--data", "{tmp}/good.jsonl"]),
        C("eval/run-is-file", ["eval", "{tmp}/afile", "--data", "{tmp}/good.jsonl"]),
        C("eval/run-empty-dir", ["eval", "{tmp}/adir", "--data", "{tmp}/good.jsonl"]),
        C("eval/run-is-model-dir", ["eval", "{model}", "--data", "{tmp}/good.jsonl"]),
        C("eval/data-missing", ["eval", "{run}", "--data", "{tmp}/missing.jsonl"],
          needs_run=True, heavy=True),
        C("eval/data-empty-str", ["eval", "{run}", "--data", ""], needs_run=True, heavy=True),
        C("eval/data-dir", ["eval", "{run}", "--data", "{tmp}/adir"], needs_run=True,
          heavy=True),
        C("eval/data-is-the-run", ["eval", "{run}", "--data", "{run}"], needs_run=True,
          heavy=True),
        C("eval/max-pairs-0", ev + ["--max-pairs", "0"], needs_run=True, expect="clean_error"),
        C("eval/max-pairs-neg", ev + ["--max-pairs", "-1"], needs_run=True,
          expect="clean_error"),
        C("eval/max-pairs-nan", ev + ["--max-pairs", "nan"], needs_run=True,
          expect="clean_error"),
        C("eval/max-pairs-huge", ev + ["--max-pairs", "9" * 25], needs_run=True, heavy=True),
        C("eval/split-empty", ev + ["--split", "", "--max-pairs", "2"], needs_run=True,
          heavy=True),
        C("eval/bad-override", ev + ["train.nope=1"], needs_run=True, heavy=True),
        C("eval/override-nan-beta", ev + ["loss.beta=nan", "--max-pairs", "2"], needs_run=True,
          heavy=True),
        C("eval/override-columns", ev + ["data.columns.prompt=nope", "--max-pairs", "2"],
          needs_run=True, heavy=True),
        C("eval/override-max-length", ev + ["data.max_length=2", "--max-pairs", "2"],
          needs_run=True, heavy=True),
        C("eval/json-out", ev + ["--json", "--max-pairs", "1"], needs_run=True, heavy=True),
        C("eval/run-is-adapter-file", ["eval", "{run}/adapter_model.safetensors", "--data",
                                       "{tmp}/good.jsonl"], needs_run=True, heavy=True),
    ]
    # generate
    for name, content in prompts.items():
        cases.append(C(f"generate/prompts-{name}", gen, {"p.jsonl": content}, needs_run=True,
                       heavy=True))
    for opt in _sampling_bad():
        cases.append(C(f"generate/{opt[0][2:]}={opt[1][:12]}", gen + opt, pgood,
                       needs_run=True, heavy=True))
    cases += [
        C("generate/prompts-missing", gen[:3] + ["{tmp}/missing.jsonl"] + gen[4:],
          needs_run=True),
        C("generate/prompts-dir", gen[:3] + ["{tmp}/adir"] + gen[4:], needs_run=True),
        C("generate/out-missing-parent", gen[:5] + ["{tmp}/no/such/o.jsonl"] + gen[6:], pgood,
          needs_run=True, heavy=True),
        C("generate/out-under-file", gen[:5] + ["{tmp}/afile/o.jsonl"] + gen[6:], pgood,
          needs_run=True, heavy=True),
        C("generate/out-is-dir", gen[:5] + ["{tmp}/adir"] + gen[6:], pgood, needs_run=True),
        C("generate/out-is-dir-overwrite", gen[:5] + ["{tmp}/adir"] + gen[6:] + ["--overwrite"],
          pgood, needs_run=True, heavy=True),
        C("generate/out-is-prompts", gen[:5] + ["{tmp}/p.jsonl", "--overwrite"] + gen[6:],
          pgood, needs_run=True, heavy=True),
        C("generate/batch-0", gen + ["--batch-size", "0"], pgood, needs_run=True,
          expect="clean_error"),
        C("generate/batch-huge", gen + ["--batch-size", "9" * 20], pgood, needs_run=True,
          heavy=True),
        C("generate/run-missing", ["generate", "{tmp}/norun", *gen[2:]], pgood),
        C("generate/run-is-file", ["generate", "{tmp}/afile", *gen[2:]], pgood),
        C("generate/run-empty-dir", ["generate", "{tmp}/adir", *gen[2:]], pgood),
        C("generate/compare-plain-model", ["generate", "{model}", *gen[2:], "--compare"], pgood,
          heavy=True),
    ]
    # chat
    chat = ["chat", "{run}", "--max-new-tokens", "2"]
    for opt in _sampling_bad()[::2]:
        cases.append(C(f"chat/{opt[0][2:]}={opt[1][:12]}", chat + opt, needs_run=True,
                       heavy=True, stdin="hi\n"))
    for i, stdin in enumerate(["", "hi\n/exit\n", "/system\n/reset\n/bogus\n\x00\n",
                               "/system " + "s" * 100_000 + "\nhi\n", "\udcff\n",
                               "\x1b[A\x1b[B\x03\x04\n"]):
        cases.append(C(f"chat/stdin-{i}", chat, needs_run=True, heavy=True, stdin=stdin))
    cases += [
        C("chat/run-missing", ["chat", "{tmp}/norun"]),
        C("chat/run-is-file", ["chat", "{tmp}/afile"]),
        C("chat/compare-plain-model", ["chat", "{model}", "--compare"], heavy=True),
        C("chat/system-empty", chat + ["--system", ""], needs_run=True, heavy=True, stdin="a\n"),
    ]
    # merge
    mg = ["merge", "{run}", "--out", "{tmp}/m"]
    cases += [
        C("merge/dtype-bogus", mg + ["--dtype", "bf17"], needs_run=True),
        C("merge/dtype-empty", mg + ["--dtype", ""], needs_run=True),
        C("merge/device-bogus", mg + ["--device", "tpu"], needs_run=True),
        C("merge/device-cuda", mg + ["--device", "cuda"], needs_run=True, heavy=True),
        C("merge/device-cuda-99", mg + ["--device", "cuda:99"], needs_run=True, heavy=True),
        C("merge/out-is-file", ["merge", "{run}", "--out", "{tmp}/afile"], needs_run=True),
        C("merge/out-is-file-overwrite", ["merge", "{run}", "--out", "{tmp}/afile",
                                          "--overwrite"], needs_run=True, heavy=True),
        C("merge/out-under-file", ["merge", "{run}", "--out", "{tmp}/afile/m"], needs_run=True,
          heavy=True),
        C("merge/out-missing-parents", ["merge", "{run}", "--out", "{tmp}/x/y/m"],
          needs_run=True, heavy=True),
        C("merge/out-is-run", ["merge", "{run}", "--out", "{run}"], needs_run=True),
        C("merge/run-missing", ["merge", "{tmp}/norun", "--out", "{tmp}/m"]),
        C("merge/run-is-file", ["merge", "{tmp}/afile", "--out", "{tmp}/m"]),
        C("merge/run-empty-dir", ["merge", "{tmp}/adir", "--out", "{tmp}/m"]),
        C("merge/run-is-model", ["merge", "{model}", "--out", "{tmp}/m"]),
        C("merge/no-out", ["merge", "{run}"], needs_run=True, expect="clean_error"),
    ]
    # export
    ex = ["export", "{run}", "--format"]
    cases += [
        C("export/format-bogus", ex + ["onnx", "--out", "{tmp}/e"], needs_run=True),
        C("export/format-empty", ex + ["", "--out", "{tmp}/e"], needs_run=True),
        C("export/outtype-bogus", ex + ["gguf", "--out", "{tmp}/e.gguf", "--outtype", "q1"],
          needs_run=True),
        C("export/lora-kquant", ex + ["gguf-lora", "--out", "{tmp}/e.gguf", "--outtype",
                                      "q4_k_m"], needs_run=True),
        C("export/outtype-empty", ex + ["gguf", "--out", "{tmp}/e.gguf", "--outtype", ""],
          needs_run=True),
        C("export/peft-out-file", ex + ["peft", "--out", "{tmp}/afile"], needs_run=True),
        C("export/peft-out-under-file", ex + ["peft", "--out", "{tmp}/afile/x"],
          needs_run=True, heavy=True),
        C("export/gguf-out-dir", ex + ["gguf", "--out", "{tmp}/adir"], needs_run=True),
        C("export/gguf-lora-out-under-file", ex + ["gguf-lora", "--out", "{tmp}/afile/x.gguf"],
          needs_run=True, heavy=True),
        C("export/gguf-lora-out-missing-parents", ex + ["gguf-lora", "--out",
                                                        "{tmp}/p/q/x.gguf"], needs_run=True,
          heavy=True),
        C("export/gguf-lora-out-dir-overwrite", ex + ["gguf-lora", "--out", "{tmp}/adir",
                                                      "--overwrite"], needs_run=True, heavy=True),
        C("export/device-bogus", ex + ["gguf", "--out", "{tmp}/e.gguf", "--device", "quantum"],
          needs_run=True, heavy=True),
        C("export/run-missing", ["export", "{tmp}/norun", "--format", "peft", "--out",
                                 "{tmp}/e"]),
        C("export/run-is-file", ["export", "{tmp}/afile", "--format", "peft", "--out",
                                 "{tmp}/e"]),
        C("export/run-empty-dir", ["export", "{tmp}/adir", "--format", "gguf-lora", "--out",
                                   "{tmp}/e.gguf"]),
        C("export/no-format", ["export", "{run}", "--out", "{tmp}/e"], needs_run=True,
          expect="clean_error"),
    ]
    # plan
    for i, mem in enumerate(["", "-1GiB", "0", "0GiB", "nan", "nanGiB", "infGiB", "inf",
                             "1e400GiB", "24XB", "GiB", "24 GiB", "0.0001GiB", "1e30GiB",
                             "24gib", "24GB", "24G", "-0", "9" * 400, "24GiBGiB"]):
        cases.append(C(f"plan/gpu-memory-{i}:{mem[:12]}", ["plan", "{tmp}/base.yaml",
                                                           "--gpu-memory", mem]))
    cases += [
        C("plan/shape-bogus", ["plan", "{tmp}/base.yaml", "--shape", "llama-99b"]),
        C("plan/shape-empty", ["plan", "{tmp}/base.yaml", "--shape", ""]),
        C("plan/missing-recipe", ["plan", "{tmp}/nope.yaml"], expect="clean_error"),
        C("plan/model-missing", ["plan", "{tmp}/base.yaml", "model.name_or_path={tmp}/nomodel"]),
        C("plan/model-is-file", ["plan", "{tmp}/base.yaml", "model.name_or_path={tmp}/afile"]),
        C("plan/model-bad-config", ["plan", "{tmp}/base.yaml", "model.name_or_path={tmp}/bm"],
          {"bm/config.json": b'{"model_type": "llama", "hidden_size": -1, '
                             b'"num_hidden_layers": "x"}'}),
        C("plan/model-junk-config", ["plan", "{tmp}/base.yaml", "model.name_or_path={tmp}/bm"],
          {"bm/config.json": _garbage(rng, 200)}),
        C("plan/model-config-not-dict", ["plan", "{tmp}/base.yaml",
                                         "model.name_or_path={tmp}/bm"],
          {"bm/config.json": b"[1, 2]"}),
        C("plan/model-config-unknown-type", ["plan", "{tmp}/base.yaml",
                                             "model.name_or_path={tmp}/bm"],
          {"bm/config.json": b'{"model_type": "nonexistent-arch"}'}),
        C("plan/max-tokens-huge", ["plan", "{tmp}/base.yaml", "train.max_tokens=" + "9" * 30]),
    ]
    # bench (always tiny: one step, short pairs)
    bq = ["bench", "{tmp}/base.yaml", "--random-weights", "--steps", "1", "--warmup", "0",
          "--prompt-len", "4-8", "--response-len", "4-8"]

    def bench(opt: str, value: str) -> list[str]:
        argv = list(bq)
        if opt in argv:
            argv[argv.index(opt) + 1] = value
        else:
            argv += [opt, value]
        return argv

    for opt, values in [("--steps", ["0", "-1", "nan", "1.5"]),
                        ("--warmup", ["-1", "5", "nan"]),
                        ("--prompt-len", ["0-5", "5-1", "abc", "1-2-3", "-5", "", "0", "1-",
                                          "9" * 30, "1-" + "9" * 30]),
                        ("--response-len", ["0", "8-4", "x-y", " "]),
                        ("--layouts", ["bogus", ",", "", "padded,,packed", "padded,bogus"]),
                        ("--shape", ["bogus", ""]), ("--against", ["bogus", ""])]:
        for v in values:
            cases.append(C(f"bench/{opt[2:]}={v[:12]!r}", bench(opt, v), heavy=True))
    cases += [
        C("bench/json-missing-parent", bq + ["--json", "{tmp}/no/such/b.json"], heavy=True),
        C("bench/json-is-dir", bq + ["--json", "{tmp}/adir"], heavy=True),
        C("bench/json-under-file", bq + ["--json", "{tmp}/afile/b.json"], heavy=True),
        C("bench/profile-is-file", bq + ["--profile", "{tmp}/afile"], heavy=True),
        C("bench/missing-recipe", ["bench", "{tmp}/nope.yaml"], expect="clean_error"),
    ]
    # sweep
    sw = ["sweep", "{tmp}/base.yaml"]
    for i, grid in enumerate([["loss.beta="], ["loss.beta=,"], ["=1,2"], ["nope=1,2"],
                              ["loss.beta=a,b"], ["loss.beta=nan,0.1"], ["loss.beta=0.1,-1"],
                              ["loss.type=[sigmoid,bogus"], ["loss.beta"], [","],
                              ["loss.beta=0.1,0.1"], ["train.max_steps=0,1"],
                              ["lora.r=" + ",".join(str(x) for x in range(2000))],
                              ["loss.beta=0.1,0.2", "loss.beta=0.3,0.4"],
                              ["data.train=missing.jsonl,afile"],
                              ["output.dir=x,y"]]):
        cases.append(C(f"sweep/grid-{i}:{grid[0][:20]}", sw + grid + ["--out", "{tmp}/sw"],
                       heavy=True))
    cases += [
        C("sweep/resume-value", sw + ["loss.beta=0.1,0.2", "--resume", "x"]),
        C("sweep/resume-nothing", sw + ["loss.beta=0.1,0.2", "--resume", "--out", "{tmp}/sw"],
          heavy=True),
        C("sweep/out-is-file", sw + ["loss.beta=0.1,0.2", "--out", "{tmp}/afile"], heavy=True),
        C("sweep/out-is-run", sw + ["loss.beta=0.1,0.2", "--out", "{run}"], needs_run=True,
          heavy=True),
        C("sweep/out-is-run-overwrite", sw + ["loss.beta=0.1,0.2", "--out", "{tmp}/fake",
                                              "--overwrite"],
          {"fake/sweep.json": b"{not json", "fake/r1/run.json": b"\xff"}, heavy=True),
        C("sweep/out-under-file", sw + ["loss.beta=0.1,0.2", "--out", "{tmp}/afile/s"],
          heavy=True),
        C("sweep/resume-junk-sweep", sw + ["loss.beta=0.1,0.2", "--resume", "--out",
                                           "{tmp}/js"],
          {"js/sweep.json": _garbage(rng, 64)}, heavy=True),
        C("sweep/resume-sweep-json-list", sw + ["loss.beta=0.1,0.2", "--resume", "--out",
                                                "{tmp}/js"],
          {"js/sweep.json": b"[1, 2, 3]"}, heavy=True),
        C("sweep/missing-recipe", ["sweep", "{tmp}/nope.yaml", "loss.beta=0.1,0.2"],
          expect="clean_error"),
    ]
    # report
    cases += [
        C("report/run-missing", ["report", "{tmp}/norun", "--out", "{tmp}/r.html"]),
        C("report/run-is-file", ["report", "{tmp}/afile", "--out", "{tmp}/r.html"]),
        C("report/run-empty-dir", ["report", "{tmp}/adir", "--out", "{tmp}/r.html"]),
        C("report/out-missing-parent", ["report", "{run}", "--out", "{tmp}/no/such/r.html"],
          needs_run=True),
        C("report/out-under-file", ["report", "{run}", "--out", "{tmp}/afile/r.html"],
          needs_run=True),
        C("report/out-is-dir", ["report", "{run}", "--out", "{tmp}/adir"], needs_run=True),
        C("report/same-run-twice", ["report", "{run}", "{run}", "--out", "{tmp}/r.html"],
          needs_run=True),
        C("report/no-runs", ["report"], expect="clean_error"),
        C("report/junk-sweep", ["report", "{tmp}/js", "--out", "{tmp}/r.html"],
          {"js/sweep.json": b'{"runs": 5}'}),
        C("report/junk-sweep-binary", ["report", "{tmp}/js", "--out", "{tmp}/r.html"],
          {"js/sweep.json": _garbage(rng, 100)}),
    ]
    # init
    cases += [
        C("init/missing-parent", ["init", "{tmp}/no/such/r.yaml"]),
        C("init/under-file", ["init", "{tmp}/afile/r.yaml"]),
        C("init/is-dir", ["init", "{tmp}/adir"], expect="clean_error"),
        C("init/is-dir-overwrite", ["init", "{tmp}/adir", "--overwrite"]),
        C("init/empty-path", ["init", ""]),
        C("init/model-empty", ["init", "{tmp}/r.yaml", "--model", ""]),
        C("init/model-newline", ["init", "{tmp}/r.yaml", "--model", "a\nb: [1"]),
        C("init/data-yaml-junk", ["init", "{tmp}/r.yaml", "--data", "x: [1, {"]),
        C("init/model-quotes", ["init", "{tmp}/r.yaml", "--model", "'\"\\"]),
        C("init/model-surrogate", ["init", "{tmp}/r.yaml", "--model", "m\udcff"]),
        C("init/model-huge", ["init", "{tmp}/r.yaml", "--model", "m" * 100_000]),
    ]
    # pairs
    pq = ["pairs", "{tmp}/p.jsonl", "--out", "{tmp}/pairs.jsonl", "--model", "{run}",
          "--max-new-tokens", "2"]
    for name in ("empty", "binary", "invalid-utf8", "no-prompt", "prompt-int", "nul",
                 "not-json", "huge"):
        cases.append(C(f"pairs/prompts-{name}", pq + ["-n", "2"], {"p.jsonl": prompts[name]},
                       needs_run=True, heavy=True, stdin=""))
    for opt in (["-n", "0"], ["-n", "1"], ["-n", "-3"], ["-n", "nan"],
                ["--judge", "{tmp}/missing"], ["--judge", "{tmp}/afile"],
                ["--judge", "{tmp}/adir"], ["--judge", "{run}"], ["--temperature", "0"],
                ["--batch-size", "0"], ["--top-p", "2"]):
        value = opt[1].replace("{tmp}/", "").replace("{run}", "RUN")
        cases.append(C(f"pairs/{opt[0].strip('-')}={value}", pq + opt, pgood,
                       needs_run=True, heavy=True, stdin=""))
    cases += [
        C("pairs/prompts-missing", ["pairs", "{tmp}/nope.txt", "--out", "{tmp}/o.jsonl",
                                    "--model", "{run}"], needs_run=True),
        C("pairs/prompts-dir", ["pairs", "{tmp}/adir", "--out", "{tmp}/o.jsonl", "--model",
                                "{run}"], needs_run=True),
        C("pairs/model-missing", ["pairs", "{tmp}/p.jsonl", "--out", "{tmp}/o.jsonl",
                                  "--model", "{tmp}/nomodel"], pgood),
        C("pairs/model-empty", ["pairs", "{tmp}/p.jsonl", "--out", "{tmp}/o.jsonl",
                                "--model", ""], pgood),
        C("pairs/model-is-file", ["pairs", "{tmp}/p.jsonl", "--out", "{tmp}/o.jsonl",
                                  "--model", "{tmp}/afile"], pgood),
        C("pairs/model-junk-recipe", ["pairs", "{tmp}/p.jsonl", "--out", "{tmp}/o.jsonl",
                                      "--model", "{tmp}/j.yaml"],
          {**pgood, "j.yaml": _garbage(rng, 80)}),
        C("pairs/out-is-dir", ["pairs", "{tmp}/p.jsonl", "--out", "{tmp}/adir", "--model",
                               "{run}", "--max-new-tokens", "2"], pgood, needs_run=True,
          heavy=True, stdin=""),
        C("pairs/out-under-file", ["pairs", "{tmp}/p.jsonl", "--out", "{tmp}/afile/o.jsonl",
                                   "--model", "{run}", "--max-new-tokens", "2"], pgood,
          needs_run=True, heavy=True, stdin=""),
        C("pairs/progress-junk", ["pairs", "{tmp}/p.jsonl", "--out", "{tmp}/o.jsonl",
                                  "--model", "{run}", "--max-new-tokens", "2"],
          {**pgood, "o.jsonl": _garbage(rng, 50)}, needs_run=True, heavy=True, stdin=""),
    ]
    # the top level
    cases += [
        C("top/no-command", [], expect="clean_error"),
        C("top/unknown-command", ["bogus"], expect="clean_error"),
        C("top/debug-after", ["train", "--debug"], expect="clean_error"),
    ]
    return cases


def _damaged_run_cases(rng: random.Random) -> list[Case]:
    """A copy of the shared run with one of its files broken, through the commands that read a
    run."""
    files = ["adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "run.json",
             "tokenizer.json", "tokenizer_config.json", "metrics.jsonl", "summary.json"]
    damage = ["delete", "empty", "garbage", "truncate", "json-list", "invalid-utf8"]
    commands = {
        "eval": ["eval", "{tmp}/run", "--data", "{tmp}/good.jsonl", "--max-pairs", "2"],
        "generate": ["generate", "{tmp}/run", "--prompts", "{tmp}/p.jsonl", "--out",
                     "{tmp}/o.jsonl", "--max-new-tokens", "2"],
        "report": ["report", "{tmp}/run", "--out", "{tmp}/r.html"],
        "export": ["export", "{tmp}/run", "--format", "peft", "--out", "{tmp}/e"],
        "merge": ["merge", "{tmp}/run", "--out", "{tmp}/m"],
        "chat": ["chat", "{tmp}/run", "--max-new-tokens", "2"],
        "resume": ["train", "{tmp}/base.yaml", "-o", "{tmp}/run", "--resume"],
    }
    cases = []
    for f in files:
        for how in rng.sample(damage, 3):
            cmd = rng.choice(sorted(commands))
            seed = rng.randrange(2**31)

            def breaker(tmp: Path, f: str = f, how: str = how, seed: int = seed) -> None:
                _damage(tmp / "run" / f, how, random.Random(seed))

            cases.append(Case(f"damaged/{f}/{how}@{cmd}", commands[cmd],
                              {"run@": "copy-run", f"run/{f}@": breaker, "p.jsonl":
                               b'{"prompt": "hi"}\n'}, needs_run=True, heavy=True, stdin=""))
    return cases


def _damage(path: Path, how: str, rng: random.Random) -> None:
    if not path.exists() and how != "delete":
        path.write_bytes(b"")
    if how == "delete":
        if path.exists():
            path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(_garbage(rng, 256))
    elif how == "truncate":
        b = path.read_bytes()
        path.write_bytes(b[: len(b) // 3])
    elif how == "json-list":
        path.write_bytes(b"[1, 2, 3]\n")
    elif how == "invalid-utf8":
        path.write_bytes(b"\xff\xfe" + path.read_bytes()[:100] + b"\xc3\x28")


def build_corpus(seed: int = 0) -> list[Case]:
    """Every case, the same for the same seed."""
    rng = random.Random(seed)
    common_rng = random.Random(seed + 1)
    common = _common_files(common_rng)
    cases = (_recipe_value_cases(rng) + _recipe_text_cases(rng) + _override_cases(rng)
             + _data_file_cases(rng) + _raw_data_cases(rng) + _cli_cases(rng)
             + _damaged_run_cases(rng))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    for c in cases:
        c.files = {**common, **c.files}
        if any("{run}" in a for a in c.argv):
            c.needs_run = True
    return cases


def sample(cases: list[Case], n: int, seed: int = 0) -> list[Case]:
    """A seeded sample of n cases that spreads over the groups (the name up to its first '/':
    recipe-value, data, raw, generate, ...): one case from each group in turn."""
    rng = random.Random(seed)
    groups: dict[str, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.name.split("/")[0], []).append(c)
    pools = {g: rng.sample(cs, len(cs)) for g, cs in sorted(groups.items())}
    order = sorted(pools)
    rng.shuffle(order)
    picked: list[Case] = []
    while len(picked) < min(n, len(cases)):
        for g in order:
            if pools[g] and len(picked) < n:
                picked.append(pools[g].pop())
    return picked


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    case: Case
    category: str
    returncode: int
    seconds: float
    stdout: str
    stderr: str

    @property
    def first_error(self) -> str:
        text = self.stderr + "\n" + self.stdout
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if "Traceback (most recent call last)" in text:
            tb = text[text.index("Traceback (most recent call last)"):].splitlines()
            last = [ln for ln in tb if ln and not ln.startswith((" ", "Traceback"))]
            return last[0] if last else tb[-1]
        for ln in lines:
            if ln.startswith("error:") or ln.startswith("Error:"):
                return ln
        return lines[0] if lines else ""


class _CaseTimeout(BaseException):
    """Raised in the main thread when a case runs past its limit (a BaseException, so that
    `except Exception` in the code under test cannot swallow it)."""


_SKIPPED = re.compile(r"\b[1-9][0-9,]* (?:rows? )?skipped\b|skipped [1-9]", re.IGNORECASE)


def classify(rc: int, stdout: str, stderr: str, timed_out: bool) -> str:
    text = stdout + "\n" + stderr
    if timed_out:
        return "hang"
    if "Traceback (most recent call last)" in text:
        return "traceback"
    if "this is a bug in qdpo" in text:
        return "bug"
    if rc == 2:
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        if len(errors) == 1:
            return "clean_error"
        if not errors and "Usage:" in text:  # click's usage errors, and bare `qdpo`'s help
            return "usage_error"
        return "unclean_error"
    if rc == 0:
        return "skip" if _SKIPPED.search(text) else "success"
    return "other_exit"


class Runner:
    """Runs cases in-process, one fresh directory each; builds the shared run on first need."""

    def __init__(self, workdir: Path | None = None, timeout: float = 15.0,
                 on_stuck: Callable[[Case | None], None] | None = None):
        self._own = workdir is None
        self.on_stuck = on_stuck
        self._case: Case | None = None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="qdpo-fuzz-"))
        self.timeout = timeout
        self._run: Path | None = None
        self._n = 0
        self._saved_env: dict[str, str | None] = {}

    # environment ------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_CACHE": str(self.workdir / "hf_datasets")}
        if "QDPO_CACHE" not in os.environ:
            env["QDPO_CACHE"] = str(self.workdir / "qdpo_cache")
        for k, v in env.items():
            self._saved_env[k] = os.environ.get(k)
            os.environ[k] = v
        self._patched: list[tuple[Any, str, Any]] = []
        with contextlib.suppress(ImportError):
            import huggingface_hub.constants as hc

            self._patch(hc, "HF_HUB_OFFLINE", True)
        with contextlib.suppress(ImportError):
            import datasets

            self._patch(datasets.config, "HF_HUB_OFFLINE", True)
            self._patch(datasets.config, "HF_DATASETS_CACHE", str(self.workdir / "hf_datasets"))
            datasets.disable_progress_bars()
        return self

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        if hasattr(obj, name):
            self._patched.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    def __exit__(self, *exc: Any) -> None:
        for obj, name, value in reversed(self._patched):
            setattr(obj, name, value)
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # the shared run ---------------------------------------------------------------------
    def shared_run(self) -> Path:
        done = self.workdir / "shared" / "run" / "adapter_model.safetensors"
        if self._run is None and done.exists():  # built before a restart (see main)
            self._run = done.parent
        if self._run is None:
            d = self.workdir / "shared"
            d.mkdir(parents=True, exist_ok=True)
            _write_files(d, _common_files(random.Random(1)))
            res = self._call(d, ["train", str(d / "base.yaml"), "-o", str(d / "run")], None,
                             timeout=300)[0]
            if res.returncode != 0:
                raise RuntimeError("building the shared run failed:\n" + res.stdout + res.stderr)
            self._run = d / "run"
        return self._run

    # one case ---------------------------------------------------------------------------
    def run(self, case: Case) -> Outcome:
        self._n += 1
        self._case = case
        tmp = self.workdir / f"case{self._n:04d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run = self.shared_run() if case.needs_run else None
        _write_files(tmp, case.files, run)
        subs = {"{tmp}": str(tmp), "{run}": str(run or tmp / "norun"), "{model}": str(MODEL),
                "{tmp_name}": tmp.name}
        argv = []
        for a in case.argv:
            for k, v in subs.items():
                a = a.replace(k, v)
            argv.append(a)
        t0 = time.monotonic()
        res, timed_out = self._call(tmp, argv, case.stdin, self.timeout)
        dt = time.monotonic() - t0
        cat = classify(res.returncode, res.stdout, res.stderr, timed_out)
        shutil.rmtree(tmp, ignore_errors=True)
        return Outcome(case, cat, res.returncode, dt, res.stdout, res.stderr)

    def _call(self, cwd: Path, argv: list[str], stdin: str | None, timeout: float) -> Any:
        fired = threading.Event()
        done = threading.Event()

        def on_alarm(signum: int, frame: Any) -> None:
            fired.set()
            raise _CaseTimeout(f"case ran past {timeout:g} s")

        def watchdog() -> None:  # the alarm cannot stop C code that never returns
            if not done.wait(timeout * 2 + 15):
                sys.__stderr__.write(f"\nfuzz: {argv} still runs {timeout * 2 + 15:g} s after "
                                     "the alarm could stop it\n")
                sys.__stderr__.flush()
                if self.on_stuck is not None:
                    self.on_stuck(self._case)  # main: records a hang, starts again after it
                os._exit(3)

        use_alarm = threading.current_thread() is threading.main_thread()
        old_cwd = os.getcwd()
        old = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
        threading.Thread(target=watchdog, daemon=True).start()
        try:
            os.chdir(cwd)
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            res = qdpo(*argv, stdin=stdin)
        except _CaseTimeout:  # raised outside the command's own handler
            from types import SimpleNamespace

            res = SimpleNamespace(returncode=1, stdout="", stderr="timeout")
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
            done.set()
            os.chdir(old_cwd)
        return res, fired.is_set()


def _write_files(tmp: Path, files: dict[str, FileSpec], run: Path | None = None) -> None:
    # copies first (name ending "@" with value "copy-run"), then plain files, then breakers
    order = sorted(files.items(), key=lambda kv: (kv[1] != "copy-run", callable(kv[1])
                                                   and kv[0].endswith("@")))
    for rel, spec in order:
        if spec == "copy-run":
            if run is not None:
                shutil.copytree(run, tmp / rel.rstrip("@"))
            continue
        if rel.endswith("/"):
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            continue
        path = tmp / rel.rstrip("@")
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(spec):
            if rel.endswith("@"):
                spec(tmp)
            else:
                spec(path)
        else:
            path.write_bytes(spec if isinstance(spec, bytes) else spec.encode())


def run_cases(cases: list[Case], timeout: float = 15.0, verbose: bool = False,
              workdir: Path | None = None) -> list[Outcome]:
    out = []
    with Runner(workdir, timeout) as runner:
        for i, c in enumerate(cases, 1):
            o = runner.run(c)
            out.append(o)
            if verbose or o.category in PROBLEMS:
                print(f"[{i}/{len(cases)}] {o.category:13s} {o.seconds:5.1f}s {c.name}: "
                      f"{o.first_error[:150]}", flush=True)
    return out


def _record(o: Outcome) -> dict[str, Any]:
    return {"name": o.case.name, "argv": o.case.argv, "category": o.category,
            "returncode": o.returncode, "seconds": round(o.seconds, 2),
            "first_error": o.first_error[:400], "expect": o.case.expect}


def main(argv: list[str] | None = None) -> int:
    """Runs the corpus in this process. A case stuck in C code (which no alarm interrupts) is
    recorded as a hang, and the script starts itself again after it, keeping what was done in
    --workdir."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="run the cases whose name holds this")
    ap.add_argument("--sample", type=int, default=None, help="run the suite's sample of N")
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds per case")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = build_corpus(args.seed)
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    if args.sample:
        cases = sample(cases, args.sample, args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qdpo-fuzz-"))
    state = workdir / "outcomes.jsonl"
    if args.start == 0:
        print(f"fuzz: {len(cases)} cases (seed {args.seed}) in {workdir}", flush=True)
        state.write_text("")
        (workdir / "started").write_text(str(time.time()))
    t0 = float((workdir / "started").read_text())
    base_args = [a for a in argv if not a.startswith(("--workdir", "--start"))]
    current = {"i": args.start}

    def on_stuck(case: Case | None) -> None:
        i = current["i"]
        with state.open("a") as f:
            f.write(json.dumps({"name": cases[i].name, "argv": cases[i].argv,
                                "category": "hang", "returncode": None, "seconds": None,
                                "first_error": "stuck: the alarm could not stop it",
                                "expect": cases[i].expect}) + "\n")
        out = sys.__stdout__ or sys.stdout  # sys.stdout is the command's, captured
        out.write(f"[{i + 1}/{len(cases)}] hang          {cases[i].name}: stuck; restarting\n")
        out.flush()
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *base_args,
                                  f"--workdir={workdir}", f"--start={i + 1}"])

    with Runner(workdir, args.timeout, on_stuck=on_stuck) as runner:
        runner._own = False
        for i in range(args.start, len(cases)):
            current["i"] = i
            runner._n = i
            o = runner.run(cases[i])
            with state.open("a") as f:
                f.write(json.dumps(_record(o)) + "\n")
            if args.verbose or o.category in PROBLEMS:
                print(f"[{i + 1}/{len(cases)}] {o.category:13s} {o.seconds:5.1f}s "
                      f"{cases[i].name}: {o.first_error[:150]}", flush=True)
    records = [json.loads(line) for line in state.read_text().splitlines() if line.strip()]
    shutil.rmtree(workdir, ignore_errors=True)
    return summarise(records, time.time() - t0)


def summarise(records: list[dict[str, Any]], seconds: float) -> int:
    counts = {cat: sum(r["category"] == cat for r in records) for cat in CATEGORIES}
    print(f"\nfuzz: {len(records)} cases in {seconds:.0f} s")
    for cat, n in counts.items():
        print(f"  {cat:14s} {n}")
    wrong = [r for r in records if r["expect"] and r["category"] != r["expect"]
             and r["category"] not in PROBLEMS]
    if wrong:
        print("\nunexpected categories:")
        for r in wrong:
            print(f"  {r['name']}: expected {r['expect']}, got {r['category']}: "
                  f"{r['first_error'][:200]}")
    timed = [r for r in records if r["seconds"] is not None]
    slow = sorted(timed, key=lambda r: -r["seconds"])[:5]
    print("\nslowest: " + ", ".join(f"{r['name']} {r['seconds']:.1f}s" for r in slow))
    bad = [r for r in records if r["category"] in PROBLEMS]
    if bad:
        print(f"\n{len(bad)} bug/hang cases:")
        for r in bad:
            print(f"  [{r['category']}] {r['name']}\n      argv: {r['argv']}\n"
                  f"      {r['first_error'][:300]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
