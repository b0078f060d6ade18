"""A local directory's `split` (qdpo/data/read.py): files picked the way `datasets` picks them
for a local folder, or one error naming the splits there are; and eval pairs that are also
training pairs counted and said (issue 11)."""

from __future__ import annotations

import logging

import pytest

from qdpo.data import local_files, prepare_data, read_rows
from qdpo.errors import DataError
from qdpo.recipe import DataConfig, DataSource, EvalConfig
from tiny import dec, write_jsonl

SEED = 42


def rows(tag: str, n: int = 4) -> list[dict]:
    return [{"prompt": f"{tag} question {i}?", "chosen": f"{tag} good {i}.",
             "rejected": f"{tag} bad {i}."} for i in range(n)]


def layout(root, names: dict[str, str]):
    """Files under root, each holding the rows tagged with its value."""
    for name, tag in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(root / name, rows(tag))
    return root


def picked(root, split: str) -> list[str]:
    return [f.relative_to(root).as_posix() for f in local_files(str(root), split)]


HUB = {"data/train_prefs-00000-of-00001.jsonl": "train_prefs",
       "data/test_prefs-00000-of-00001.jsonl": "test_prefs",
       "data/train_sft-00000-of-00001.jsonl": "train_sft"}


def test_downloaded_hub_layout_reads_only_its_split(tmp_path):
    root = layout(tmp_path / "ultrafeedback", HUB)
    (root / "README.md").write_text("# card")
    assert picked(root, "train_prefs") == ["data/train_prefs-00000-of-00001.jsonl"]
    assert picked(root, "test_prefs") == ["data/test_prefs-00000-of-00001.jsonl"]
    assert read_rows(DataSource(str(root), split="test_prefs")) == rows("test_prefs")
    # the data/ folder itself, as some users point at it
    assert picked(root / "data", "train_sft") == ["train_sft-00000-of-00001.jsonl"]
    # the default split is not there: one error naming the splits that are
    with pytest.raises(DataError) as ei:
        read_rows(DataSource(str(root)))
    assert str(ei.value) == (f"Data directory '{root}' has no file for split 'train'. Splits "
                             "found: test_prefs, train_prefs, train_sft. Set the source's split "
                             "to one of them.")


def test_split_in_file_and_folder_names(tmp_path):
    flat = layout(tmp_path / "flat", {"train_prefs.jsonl": "a", "test_prefs.jsonl": "b",
                                      "train_sft.jsonl": "c"})
    assert picked(flat, "train_prefs") == ["train_prefs.jsonl"]
    assert picked(flat, "test_prefs") == ["test_prefs.jsonl"]
    # "train" fits two different splits: never both read silently
    with pytest.raises(DataError, match=r"Split 'train' of data directory .* matches the files "
                                        r"of several splits: train_prefs, train_sft\."):
        local_files(str(flat), "train")
    keywords = layout(tmp_path / "kw", {"train-0.jsonl": "a", "train-1.jsonl": "b",
                                        "dev.jsonl": "c", "hh_test.jsonl": "d"})
    assert picked(keywords, "train") == ["train-0.jsonl", "train-1.jsonl"]
    assert picked(keywords, "validation") == ["dev.jsonl"]  # datasets' keywords
    assert picked(keywords, "test") == ["hh_test.jsonl"]
    folders = layout(tmp_path / "folders", {"train/a.jsonl": "a", "test/b.jsonl": "b",
                                            "prefs/c.jsonl": "c"})
    assert picked(folders, "train") == ["train/a.jsonl"]
    assert picked(folders, "test") == ["test/b.jsonl"]
    assert picked(folders, "prefs") == ["prefs/c.jsonl"]


def test_folder_without_splits_is_all_train(tmp_path):
    root = layout(tmp_path / "plain", {"b.jsonl": "b", "a.jsonl": "a"})
    assert picked(root, "train") == ["a.jsonl", "b.jsonl"]  # as before: every file
    with pytest.raises(DataError) as ei:
        local_files(str(root), "test_prefs")
    assert str(ei.value) == (
        f"Data directory '{root}' has no file for split 'test_prefs': its file names carry no "
        "split. Name the files after it (test_prefs.jsonl, test_prefs-00000-of-00001.parquet "
        "or a folder test_prefs/), or point the source at the file and leave split out.")


def prepare_dir(tok, root, train_split: str, eval_split: str, caplog):
    settings = DataConfig(train=[DataSource(str(root), split=train_split)])
    ev = EvalConfig(data=[DataSource(str(root), split=eval_split)])
    with caplog.at_level(logging.WARNING, logger="qdpo"):
        return prepare_data(settings, ev, tok, seed=SEED, resolve=str, use_cache=False)


def test_train_and_eval_splits_of_one_directory(tmp_path, qs_tok, caplog):
    root = layout(tmp_path / "uf", HUB)
    d = prepare_dir(qs_tok, root, "train_prefs", "test_prefs", caplog)
    assert (len(d.train), len(d.eval)) == (4, 4)  # not 12 and 12
    decoded = {qs_tok.decode(p.chosen_ids) for p in d.train}
    assert all("train_prefs good" in t for t in decoded)
    assert d.train_report.eval_overlap == 0 and "also training" not in d.train_report.summary()
    assert not caplog.records


def test_eval_pairs_that_are_training_pairs_are_said(tmp_path, qs_tok, caplog):
    root = layout(tmp_path / "uf", HUB)
    d = prepare_dir(qs_tok, root, "train_prefs", "train_prefs", caplog)
    note = ("4 of 4 eval pairs are also training pairs (same prompt and responses): eval "
            "metrics overstate how well the model generalises")
    assert d.train_report.eval_overlap == 4 and note in d.train_report.summary()
    assert [r.getMessage() for r in caplog.records] == [note]
    assert caplog.records[0].levelno == logging.WARNING


def test_overlap_is_said_again_from_the_cache(tmp_path, qs_tok, caplog, monkeypatch):
    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    root = layout(tmp_path / "uf", HUB)
    settings = DataConfig(train=[DataSource(str(root), split="train_prefs")])
    ev = EvalConfig(data=[DataSource(str(root), split="train_prefs")])
    with caplog.at_level(logging.WARNING, logger="qdpo"):
        prepare_data(settings, ev, qs_tok, seed=SEED, resolve=str)
        again = prepare_data(settings, ev, qs_tok, seed=SEED, resolve=str)
    assert again.train_report.cached and again.train_report.eval_overlap == 4
    assert len(caplog.records) == 2


def test_overlap_with_split_fraction_duplicates(tmp_path, qs_tok, caplog):
    path = write_jsonl(tmp_path / "dup.jsonl", rows("x", 10) + rows("x", 10))
    with caplog.at_level(logging.WARNING, logger="qdpo"):
        d = prepare_data(DataConfig(train=[DataSource(str(path))]),
                         EvalConfig(split_fraction=0.5), qs_tok, seed=SEED, resolve=str,
                         use_cache=False)
    rep = d.train_report
    assert rep.eval_pairs == 10 and 0 < rep.eval_overlap <= 10
    assert f"{rep.eval_overlap} of 10 eval pairs are also training pairs" in rep.summary()
    assert caplog.records


# ---------------------------------------------------------------------------------------
# Issue 14: bad lines and NUL characters are counted skips, the same in every format
# ---------------------------------------------------------------------------------------
def test_a_ragged_csv_line_is_a_counted_skip_and_the_rest_trains(tmp_path, qs_tok):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n"
                    + "".join(f"Question {i}?,Good {i}.,Bad {i}.\n" for i in range(5))
                    + "Question 5?,Good, really 5.,Bad 5.,extra\n"  # line 7: 5 fields
                    + "Question 6?,Good 6.,Bad 6.\n", encoding="utf-8")
    data = prepare_data(DataConfig(train=[DataSource(str(path))]), EvalConfig(), qs_tok,
                        seed=SEED, resolve=str, use_cache=False)
    rep = data.train_report
    assert (rep.rows, rep.pairs, len(data.train)) == (7, 6, 6)
    assert rep.skipped == {"more fields than the CSV header (a comma outside quotes?)": 1}
    assert rep.example_lines() == ["d.csv row 6, line 7: more fields than the CSV header (a "
                                   "comma outside quotes?)"]
    trained = sorted(next(f"Question {i}?" for i in range(7) if f"Question {i}?" in
                          dec(qs_tok, p.prompt_ids)) for p in data.train)
    assert trained == [f"Question {i}?" for i in (0, 1, 2, 3, 4, 6)]
    # data.strict names the line
    with pytest.raises(DataError, match=r"^Bad row \(d\.csv row 6, line 7\): more fields "
                                        r"than the CSV header"):
        prepare_data(DataConfig(train=[DataSource(str(path))], strict=True), EvalConfig(),
                     qs_tok, seed=SEED, resolve=str, use_cache=False)


def _nul_rows() -> list[dict]:
    good = [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."}
            for i in range(4)]
    return good + [dict(good[0], prompt="Quest\x00ion?"), dict(good[1], chosen="Go\x00od."),
                   dict(good[2], rejected="\x00")]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_nul_characters_are_counted_skips_in_every_format(tmp_path, qs_tok, hf_cache, kind):
    import json

    import pandas as pd

    rows, path = _nul_rows(), tmp_path / f"d.{kind}"
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    data = prepare_data(DataConfig(train=[DataSource(str(path))]), EvalConfig(), qs_tok,
                        seed=SEED, resolve=str, use_cache=False)
    rep = data.train_report
    assert (rep.rows, rep.pairs) == (7, 4)
    assert rep.skipped == {"text holds a NUL character (\\x00)": 3}
    assert rep.example_lines() == [f"d.{kind} row 5: text holds a NUL character (\\x00) "
                                   "(and 2 more rows like it)"]


def test_nul_in_a_message_is_a_counted_skip(tmp_path, qs_tok):
    conv = {"prompt": [{"role": "user", "content": "Hi\x00"}],
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go."}]}
    path = write_jsonl(tmp_path / "c.jsonl", [conv, dict(conv, prompt=[
        {"role": "user", "content": "Hi"}])])
    data = prepare_data(DataConfig(train=[DataSource(str(path))]), EvalConfig(), qs_tok,
                        seed=SEED, resolve=str, use_cache=False)
    assert data.train_report.skipped == {"text holds a NUL character (\\x00)": 1}
    assert len(data.train) == 1
