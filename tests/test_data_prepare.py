"""Reading rows and the whole data step (qdpo/data/read.py, pipeline.py, store.py): local
files in every format, directories, globs and relative paths; eval split, caps, the
tokenization cache and its fingerprint, parallel tokenization, and the quickstart end to end.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from qdpo.data import (
    PairTokens,
    data_fingerprint,
    fingerprint_inputs,
    prepare,
    prepare_data,
    read_rows,
)
from qdpo.errors import DataError
from qdpo.recipe import DataConfig, DataSource, EvalConfig, load_recipe, recipe_from_dict
from tiny import QUICKSTART, QUICKSTART_RECIPE, dec, tokenize, write_jsonl

BOS, EOS = "<|begin_of_text|>", "<|im_end|>"
SEED = 42

ROW = {"prompt": "What is the capital of France?", "chosen": "Paris.",
       "rejected": "I do not know."}






def prepare_file(tok, path, seed=SEED, eval=None, use_cache=True, **data):
    """The whole data step on one local file, with these data (and eval) settings."""
    ev = dict(eval or {})
    if "data" in ev:
        ev["data"] = [DataSource(str(ev["data"]))]
    return prepare_data(DataConfig(train=[DataSource(str(path))], **data), EvalConfig(**ev), tok,
                        seed=seed, resolve=str, use_cache=use_cache)

def standard_rows(n: int) -> list[dict]:
    return [{"prompt": f"Question number {i}?", "chosen": f"A good answer {i}.",
             "rejected": f"Bad {i}.", "weight": 1.0 + i / 4} for i in range(n)]


def key(p: PairTokens):
    return tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids), p.weight


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------
def test_file_formats_give_identical_pairs(tmp_path, qs_tok, hf_cache):
    import pandas as pd

    rows = standard_rows(6)
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": tmp_path / "d.json",
        "json_wrapped": tmp_path / "wrapped.json",
        "json_lines": tmp_path / "lines.json",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
    }
    paths["json"].write_text(json.dumps(rows, indent=2))
    paths["json_wrapped"].write_text(json.dumps({"version": 1, "data": rows}))
    paths["json_lines"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(paths["csv"], index=False)
    pd.DataFrame(rows).to_parquet(paths["parquet"], index=False)
    results = {}
    for kind, path in paths.items():
        # csv has no types: every cell is read as text (numbers included), so that text
        # columns that look numeric stay text; the weight is parsed later
        expect = [{k: str(v) for k, v in r.items()} for r in rows] if kind == "csv" else rows
        assert read_rows(DataSource(str(path))) == expect, kind
        results[kind] = [key(p) for p in prepare_file(qs_tok, str(path)).train]
    assert len(results["jsonl"]) == 6
    for kind, res in results.items():
        assert res == results["jsonl"], kind


def test_conversational_parquet_matches_jsonl(tmp_path, qs_tok, hf_cache):
    import pandas as pd

    rows = read_rows(DataSource(str(QUICKSTART / "eval.jsonl")))[:5]
    path = tmp_path / "conv.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    assert read_rows(DataSource(str(path))) == rows
    a = [key(p) for p in prepare_file(qs_tok, str(path)).train]
    b = [key(p) for p in prepare_file(qs_tok, write_jsonl(tmp_path / "c.jsonl", rows)).train]
    assert a == b and len(a) == 5


def test_directories_globs_and_relative_paths(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    a, b = standard_rows(2), standard_rows(5)[2:]
    write_jsonl(d / "b.jsonl", b)
    write_jsonl(d / "a.jsonl", a)
    (d / "notes.txt").write_text("ignored")
    assert read_rows(DataSource(str(d))) == a + b  # sorted by name
    assert read_rows(DataSource(str(d / "*.jsonl"))) == a + b
    # relative to the recipe's directory
    r = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": "data/b.jsonl"}},
                         base_dir=str(tmp_path))
    assert read_rows(r.data.train[0], r.resolve_path) == b
    r = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": "data/*.jsonl"}},
                         base_dir=str(tmp_path))
    assert read_rows(r.data.train[0], r.resolve_path) == a + b
    with pytest.raises(DataError, match="matches no file"):
        read_rows(DataSource(str(d / "*.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl/.json/.parquet/.csv file"):
        read_rows(DataSource(str(tmp_path / "empty")))


def test_missing_and_unreadable_files(tmp_path, qs_tok):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as ei:
        prepare_file(qs_tok, str(missing))
    assert f"Data file '{missing}' does not exist" in str(ei.value)
    with pytest.raises(DataError, match=r"'\./nope\.jsonl' does not exist"):
        read_rows(DataSource("./nope.jsonl"))
    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="unknown extension"):
        read_rows(DataSource(str(txt)))


def test_a_bad_json_line_is_a_counted_skip_naming_its_line(tmp_path, qs_tok):
    """As a ragged CSV line: the row is skipped and counted, the rest of the file trains
    (it used to end the whole file); with data.strict it stops, naming the line."""
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n{\"prompt\": oops}\n"
                 + json.dumps(ROW) + "\n")
    data = prepare_file(qs_tok, p)
    assert len(data.train) == 3
    summary = data.train_report.summary()
    assert "1 skipped" in summary and "not valid JSON" in summary
    assert any("line 4" in ex for ex in data.train_report.example_lines())
    with pytest.raises(DataError, match=r"line 4\): not valid JSON"):
        prepare_file(qs_tok, p, strict=True)
    q = tmp_path / "bad.json"
    q.write_text("[" + json.dumps(ROW) + ",]")
    with pytest.raises(DataError, match="is not valid JSON"):
        read_rows(DataSource(str(q)))


def test_jsonl_with_unicode_line_separators_in_strings(tmp_path):
    rows = [{"prompt": "one\u2028two", "chosen": "yes\x85ok", "rejected": "no\u2029"}, ROW]
    p = tmp_path / "u.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                 encoding="utf-8")
    assert read_rows(DataSource(str(p))) == rows


def test_csv_numeric_looking_text_stays_text(tmp_path, qs_tok, hf_cache):
    path = tmp_path / "math.csv"
    path.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nWhat is 3+3?,6,7\n")
    d = prepare_file(qs_tok, str(path))
    assert sorted(dec(qs_tok, p.chosen_ids) for p in d.train) == ["4" + EOS, "6" + EOS]


# ---------------------------------------------------------------------------------------
# Eval split, caps, and the whole step
# ---------------------------------------------------------------------------------------
@pytest.fixture
def forty(tmp_path):
    return str(write_jsonl(tmp_path / "forty.jsonl", standard_rows(40)))


def test_eval_split_fraction(forty, qs_tok):
    d = prepare_file(qs_tok, forty, eval={"split_fraction": 0.25})
    assert len(d.eval) == 10 and len(d.train) == 30
    assert d.eval_report is not None and d.eval_report.pairs == 10
    train, ev = {key(p) for p in d.train}, {key(p) for p in d.eval}
    assert not train & ev and len(train | ev) == 40
    # deterministic for a seed, different for another
    again = prepare_file(qs_tok, forty, eval={"split_fraction": 0.25})
    assert [key(p) for p in again.eval] == [key(p) for p in d.eval]
    assert [key(p) for p in again.train] == [key(p) for p in d.train]
    other = prepare_file(qs_tok, forty, eval={"split_fraction": 0.25}, seed=1)
    assert {key(p) for p in other.eval} != ev
    # int(40 * 0.33) = 13 held out, not rounded up
    d = prepare_file(qs_tok, forty, eval={"split_fraction": 0.33})
    assert (len(d.eval), len(d.train)) == (13, 27)
    # a small fraction still holds one pair out
    assert len(prepare_file(qs_tok, forty, eval={"split_fraction": 0.01}).eval) == 1
    # no split: no eval
    d = prepare_file(qs_tok, forty)
    assert d.eval == [] and d.eval_report is None and len(d.train) == 40


def test_eval_split_that_leaves_nothing(tmp_path, qs_tok):
    path = write_jsonl(tmp_path / "one.jsonl", [ROW])
    with pytest.raises(DataError, match="eval.split_fraction=0.5 leaves no training pair"):
        prepare_file(qs_tok, str(path), eval={"split_fraction": 0.5})


def test_max_pairs_caps(forty, qs_tok):
    assert len(prepare_file(qs_tok, forty, max_pairs=7).train) == 7
    d = prepare_file(qs_tok, forty, max_pairs=7, eval={"split_fraction": 0.25,
                                                           "max_pairs": 3})
    assert len(d.train) == 7 and len(d.eval) == 3
    assert not {key(p) for p in d.train} & {key(p) for p in d.eval}
    assert len(prepare_file(qs_tok, forty, max_pairs=1000).train) == 40


def test_eval_data_file(forty, tmp_path, qs_tok):
    ev = write_jsonl(tmp_path / "ev.jsonl", [ROW, {"prompt": "x", "chosen": "y"}])
    d = prepare_file(qs_tok, forty, eval={"data": str(ev), "split_fraction": 0.5})
    assert len(d.train) == 40 and len(d.eval) == 1  # given eval data: no split
    assert d.eval_report.rows == 2 and sum(d.eval_report.skipped.values()) == 1
    bad = write_jsonl(tmp_path / "bad_ev.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match="No usable eval pair"):
        prepare_file(qs_tok, forty, eval={"data": str(bad)})


def test_prepare_quickstart_end_to_end(qs_tok):
    r = load_recipe(QUICKSTART_RECIPE)
    d = prepare(r, qs_tok, use_cache=False)
    assert (len(d.train), len(d.eval)) == (384, 64)
    rep = d.train_report
    assert (rep.rows, rep.pairs) == (384, 384) and not rep.skipped
    assert rep.formats == Counter(conversational=384)
    assert rep.prompt_truncated == rep.response_truncated == rep.dropped_too_long == 0
    assert rep.summary() == ("384 pairs from 384 rows; format conversational; prompts: column "
                             "'prompt'; chosen: column 'chosen'; rejected: column 'rejected'")
    assert d.eval_report.pairs == 64
    assert d.tokenizer.template == qs_tok.chat_template
    for p in d.train + d.eval:
        assert p.prompt_ids[0] == qs_tok.bos_token_id
        assert len(p.prompt_ids) <= r.data.max_prompt_length
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= r.data.max_length
        assert p.chosen_ids[-1] == p.rejected_ids[-1] == qs_tok.eos_token_id
        assert p.chosen_ids != p.rejected_ids
    # shuffled with train.seed, but the same set of pairs as the file
    rows = read_rows(r.data.train[0], r.resolve_path)
    file_order = [dec(qs_tok, t.chosen_ids) for t in tokenize(qs_tok, rows)[0]]
    got = [dec(qs_tok, p.chosen_ids) for p in d.train]
    assert got != file_order and sorted(got) == sorted(file_order)
    # eval subjects never appear in training prompts
    assert not {tuple(p.prompt_ids) for p in d.train} & {tuple(p.prompt_ids) for p in d.eval}


# ---------------------------------------------------------------------------------------
# The tokenization cache and parallel tokenization
# ---------------------------------------------------------------------------------------
def test_tokenized_data_cache(tmp_path, qs_tok, monkeypatch):
    import os
    import shutil

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "train.jsonl"
    shutil.copy(QUICKSTART / "train.jsonl", src)
    r = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": str(src)}})
    first = prepare(r, qs_tok)
    assert not first.train_report.cached
    again = prepare(r, qs_tok)
    assert again.train_report.cached and "from cache" in again.train_report.summary()
    assert [p.chosen_ids for p in again.train] == [p.chosen_ids for p in first.train]
    # the recipe's prepare() is only its settings, seed and paths: the same fingerprint
    assert prepare_file(qs_tok, src).train_report.cached
    # a data setting that changes the pairs, or an edited file, is a different fingerprint
    assert not prepare_file(qs_tok, src, max_length=40,
                            max_prompt_length=20).train_report.cached
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines[:100]) + "\n")
    os.utime(src, ns=(1, 1))
    fresh = prepare(r, qs_tok)
    assert not fresh.train_report.cached and len(fresh.train) == 100


def test_cached_report_keeps_its_counts(tmp_path, qs_tok, monkeypatch):
    """Skip reasons, formats and where each part came from read back from the cache as they
    were written (dataclasses.asdict turned a Counter into counts of its items)."""
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    rows = standard_rows(4) + [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 2
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    first = prepare_file(qs_tok, path).train_report
    again = prepare_file(qs_tok, path).train_report
    assert again.cached and not first.cached
    assert again.skipped == first.skipped == Counter({"chosen identical to rejected": 2})
    assert again.formats == first.formats and again.origins == first.origins
    assert again.summary() == first.summary().replace(
        "6 rows", "6 rows (tokenized earlier, from cache)")
    assert "weights: column 'weight'" in again.summary()


def test_parallel_tokenization_equals_serial(tmp_path, qs_tok, monkeypatch):
    import qdpo.data.encode as encode

    rows = [json.loads(x) for x in (QUICKSTART / "train.jsonl").read_text().splitlines()]
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in rows * 3))
    serial = prepare_file(qs_tok, str(src), num_proc=1, use_cache=False)
    monkeypatch.setattr(encode, "PARALLEL_MIN_PAIRS", 100)
    monkeypatch.setattr(encode, "TOKENIZE_CHUNK", 97)
    short = {"max_length": 60, "max_prompt_length": 30}
    par = prepare_file(qs_tok, str(src), num_proc=2, use_cache=False, **short)
    ser2 = prepare_file(qs_tok, str(src), num_proc=1, use_cache=False, **short)
    assert len(serial.train) == len(rows) * 3
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in par.train] == \
        [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in ser2.train]
    assert par.train_report.response_truncated == ser2.train_report.response_truncated > 0


# ---------------------------------------------------------------------------------------
# The fingerprint's inputs, and the package staying light
# ---------------------------------------------------------------------------------------

def test_fingerprint_inputs_gathered_in_one_place(tmp_path, qs_tok):
    import hashlib

    src = write_jsonl(tmp_path / "d.jsonl", standard_rows(3))
    data = DataConfig(train=[DataSource("d.jsonl"), DataSource("org/set", split="test",
                                                               revision="v1")])
    seen = []

    def resolve(p):
        seen.append(p)
        return str(tmp_path / p) if p.endswith(".jsonl") else p

    parts = fingerprint_inputs(data, EvalConfig(), qs_tok, seed=SEED, resolve=resolve)
    assert seen == ["d.jsonl", "org/set"]  # paths go through the resolver
    settings = json.loads(parts[0])
    assert settings["seed"] == SEED and settings["data"]["max_length"] == data.max_length
    assert parts[1].startswith(f"{src.resolve()}:")  # a local file: path, size, time
    assert parts[2] == "hub:org/set:test:None:v1:None"  # no commit: never downloaded
    assert parts[-1] == f"{EOS}|{BOS}" and parts[-2] == qs_tok.chat_template
    key = data_fingerprint(data, EvalConfig(), qs_tok, seed=SEED, resolve=resolve)
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
    assert key == h.hexdigest()[:24]
    assert key != data_fingerprint(data, EvalConfig(), qs_tok, seed=SEED + 1, resolve=resolve)


def test_importing_pair_tokens_stays_light():
    """batching, the reference cache and bench import PairTokens: that must not pull in the
    readers, normalisation, tokenization or `datasets`."""
    import subprocess
    import sys

    code = "import sys; from qdpo.data import PairTokens; import qdpo.data; print(*sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    loaded = set(out.split())
    assert "qdpo.data.pairs" in loaded
    heavy = {"qdpo.data.read", "qdpo.data.normalise", "qdpo.data.encode", "qdpo.data.store",
             "qdpo.data.pipeline", "qdpo.recipe", "datasets", "transformers", "tokenizers",
             "numpy", "multiprocessing", "yaml"}
    assert not heavy & loaded
    assert PairTokens([1], [2], [3]).num_tokens == 4


def test_a_file_changed_in_place_with_its_time_restored_is_tokenized_again(tmp_path, qs_tok):
    import os

    rows = [{"prompt": "Say yes.", "chosen": "Yes, gladly.", "rejected": "No way!!!!!"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    data = DataConfig(train=[DataSource(str(src))])
    before = data_fingerprint(data, EvalConfig(), qs_tok, seed=SEED, resolve=str)
    st = src.stat()
    swapped = [{"prompt": "Say yes.", "chosen": "No way!!!!!", "rejected": "Yes, gladly."}]
    write_jsonl(src, swapped)  # the same size: chosen and rejected swapped
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
    assert data_fingerprint(data, EvalConfig(), qs_tok, seed=SEED, resolve=str) != before


def test_a_template_that_drops_the_content_stops_the_run(tmp_path, qs_tok):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"A good answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"A bad one {i}."}]} for i in range(6)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    no_content = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\\n<|im_end|>{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
    data = DataConfig(train=[DataSource(str(src))], chat_template=no_content)
    with pytest.raises(DataError, match="6 of 6 training pairs have the same tokens"):
        prepare_data(data, EvalConfig(), qs_tok, seed=SEED, resolve=str, use_cache=False)
    fine = DataConfig(train=[DataSource(str(src))])
    assert len(prepare_data(fine, EvalConfig(), qs_tok, seed=SEED, resolve=str,
                            use_cache=False).train) == 6


@pytest.mark.parametrize("template, reason", [
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    ("{% for i in range(999999999) %}{{ i }}{% endfor %}", "Range too big"),
])
def test_a_template_that_cannot_render_is_one_message(tmp_path, qs_tok, template, reason):
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}],
             "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go."}]}]
    data = DataConfig(train=[DataSource(str(write_jsonl(tmp_path / "d.jsonl", rows)))],
                      chat_template=template)
    with pytest.raises(DataError, match="chat template cannot render") as e:
        prepare_data(data, EvalConfig(), qs_tok, seed=SEED, resolve=str, use_cache=False)
    assert reason in str(e.value) and "data.chat_template" in str(e.value)


# ---------------------------------------------------------------------------------------
# Issue 14: a source repeated past what can be tokenized stops at once, naming it
# ---------------------------------------------------------------------------------------
def test_a_source_weight_that_asks_for_billions_of_pairs_is_a_data_error(tmp_path):
    from qdpo.data import DataReport, load_pairs

    big = write_jsonl(tmp_path / "big.jsonl",
                      [dict(ROW, prompt=f"Q {i}?") for i in range(5001)])
    small = write_jsonl(tmp_path / "small.jsonl", [ROW, dict(ROW, prompt="Other?")])
    # within the recipe's bounds (weight 1000), but 5,001 rows times 1000 is too many
    r = recipe_from_dict({"model": {"name_or_path": "m"},
                          "data": {"train": [{"path": str(big), "weight": 1000}]}})
    with pytest.raises(DataError) as ei:
        load_pairs(r.data.train, r.data, DataReport(), seed=SEED, resolve=str)
    assert str(ei.value) == (
        "Data source 'big.jsonl' would give 5,001,000 pairs (weight 1000 times its 5,001 "
        "pairs): more than the 5,000,000 one source may give. Lower its weight, or set its "
        "samples to the number of pairs you want.")
    # a DataSource built in code, past the recipe's checks: the same message, no MemoryError
    for src, how in ((DataSource(str(small), weight=1e300), "about 2e+300 pairs (weight 1e+300 "
                      "times its 2 pairs"),
                     (DataSource(str(small), samples=10**14), "100,000,000,000,000 pairs "
                      "(samples 100,000,000,000,000")):
        with pytest.raises(DataError, match=r"^Data source 'small.jsonl' would give "
                                            rf"{re.escape(how)}\): more than the 5,000,000"):
            load_pairs([src], DataConfig(), DataReport(), seed=SEED, resolve=str)
    # the bound itself is fine
    got = load_pairs([DataSource(str(small), weight=1000)], DataConfig(), DataReport(),
                     seed=SEED, resolve=str)
    assert len(got) == 2000


def test_a_cache_on_a_full_disk_costs_the_cache_not_the_run(tmp_path, qs_tok, monkeypatch,
                                                            caplog):
    """safetensors says a full disk its own way (SafetensorError, "os error 28"): the pairs
    are still returned, with one warning; a real bug in the writer still escapes."""
    from safetensors import SafetensorError

    import qdpo.data.pipeline as pipeline

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    r = recipe_from_dict({"model": {"name_or_path": "m"},
                          "data": {"train": str(QUICKSTART / "train.jsonl")}})

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(pipeline, "write_cache", full)
    with caplog.at_level("WARNING", logger="qdpo"):
        data = prepare(r, qs_tok)
    assert len(data.train) == 384 and "could not cache the tokenized data" in caplog.text
    monkeypatch.setattr(pipeline, "write_cache", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare(r, qs_tok)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_while_tokenizing_in_parallel(tmp_path, signame):
    """Ctrl-C in a terminal, `timeout` and schedulers signal the whole process group, the
    tokenization workers included: one line, exit 130, no worker left behind (workers
    interrupted inside multiprocessing.Pool printed pages of tracebacks, and could leave the
    command waiting for ever)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, QDPO_CACHE=str(tmp_path / "cache"))
    src = f"data.train=[{{path: {QUICKSTART / 'train.jsonl'}, samples: 40000}}]"
    p = subprocess.Popen([sys.executable, "-m", "qdpo", "data", str(QUICKSTART_RECIPE), src,
                          "data.num_proc=2", "-n", "0", "--no-cache"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)

    def workers():
        try:
            return [int(x) for x in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text()
                    .split()]
        except OSError:
            return []

    deadline = time.monotonic() + 120
    while not workers() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "finished before the workers started: make the data larger"
    kids = workers()
    time.sleep(0.3)
    os.killpg(p.pid, getattr(signal, signame))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "error: interrupted" in err and "Traceback" not in err, err[-2000:]
    time.sleep(0.2)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()
                and "Z" not in Path(f"/proc/{k}/stat").read_text().split()[2]]
