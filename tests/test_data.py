"""Preference data: reading files, normalising rows, chat templates, tokenization, splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qdpo.data import (
    CHAT_TEMPLATES,
    DataReport,
    PairTokens,
    Tokenizer,
    normalise_rows,
    prepare,
    read_rows,
)
from qdpo.errors import DataError, QdpoError
from qdpo.recipe import DataSource, load_recipe, recipe_from_dict
from tiny import asst, user, write_jsonl

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart"
QUICKSTART_YAML = REPO / "recipes" / "quickstart.yaml"
QS_MODEL = QUICKSTART / "model"

BOS, EOS = "<|begin_of_text|>", "<|im_end|>"


# ---------------------------------------------------------------------------------------
# Tokenizers (all offline)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qs_tok():
    """The quickstart tokenizer: byte-level BPE with a chat template, bos added by default."""
    from transformers import AutoTokenizer, PretrainedConfig

    # config= skips reading config.json, which would import the Llama model code (seconds);
    # the tokenizer built is the same.
    tok = AutoTokenizer.from_pretrained(str(QS_MODEL), config=PretrainedConfig())
    assert tok.chat_template and tok.eos_token == EOS and tok.bos_token == BOS
    return tok


@pytest.fixture(scope="module")
def plain_tok():
    """The same vocabulary, but no chat template (a base model's tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(QS_MODEL / "tokenizer.json"),
                                  bos_token=BOS, eos_token=EOS, pad_token="<|pad|>")
    assert not tok.chat_template
    return tok


@pytest.fixture(scope="module")
def bpe_tok():
    """A tiny byte-level BPE built in code, eos '</s>', bos '<s>' prepended, no chat template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator(["What is the capital of France?", "Paris is the capital.",
                           "I do not know, sorry."] * 4, trainer)
    t.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    assert not tok.chat_template
    return tok


def dec(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def enc(tok, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def recipe(train_path="unused.jsonl", data=None, **sections):
    return recipe_from_dict({"model": {"name_or_path": "m"},
                             "data": {"train": train_path, **(data or {})}, **sections})


def tokenize(tok, rows, **data):
    """normalise + tokenize in row order (prepare() shuffles)."""
    r = recipe(data=data)
    report = DataReport(strict=r.data.strict)
    pairs = normalise_rows(rows, r, report, source="rows")
    t = Tokenizer(tok, r, any(not isinstance(p.prompt, str) for p in pairs))
    return t(pairs, report), report, t


def standard_rows(n: int) -> list[dict]:
    return [{"prompt": f"Question number {i}?", "chosen": f"A good answer {i}.",
             "rejected": f"Bad {i}.", "weight": 1.0 + i / 4} for i in range(n)]


def key(p: PairTokens):
    return tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids), p.weight


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """.csv / .parquet go through `datasets`: keep its cache in tmp_path, never online."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------
# Conversational rows with the tokenizer's chat template
# ---------------------------------------------------------------------------------------

def test_conversational_rows_follow_the_chat_template(qs_tok):
    rows = read_rows(DataSource(str(QUICKSTART / "train.jsonl")))[:6]
    out, report, _ = tokenize(qs_tok, rows)
    assert len(out) == 6 and report.formats == Counter(conversational=6)
    for row, p in zip(rows, out):
        prompt_text = dec(qs_tok, p.prompt_ids)
        assert prompt_text == qs_tok.apply_chat_template(row["prompt"], tokenize=False,
                                                         add_generation_prompt=True)
        assert prompt_text.startswith(BOS + "<|im_start|>user\n")
        assert prompt_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert p.prompt_ids[0] == qs_tok.bos_token_id
        assert p.prompt_ids.count(qs_tok.bos_token_id) == 1  # template's bos only, not twice
        for ids, side in ((p.chosen_ids, "chosen"), (p.rejected_ids, "rejected")):
            assert ids[-1] == qs_tok.eos_token_id
            assert ids.count(qs_tok.eos_token_id) == 1
            assert dec(qs_tok, ids) == row[side][-1]["content"] + EOS  # no "\n" after eos
        assert p.weight == 1.0
        assert p.num_tokens == 2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def test_prompt_plus_completion_is_the_tokenized_conversation(qs_tok):
    """prompt_ids + chosen_ids is token-identical to tokenizing the whole rendered conversation
    (which only adds the template's trailing newline), for every quickstart pair."""
    rows = read_rows(DataSource(str(QUICKSTART / "train.jsonl")))
    out, report, _ = tokenize(qs_tok, rows)
    assert len(out) == len(rows) == 384 and not report.skipped
    newline = enc(qs_tok, "\n")
    for row, p in zip(rows, out):
        for ids, side in ((p.chosen_ids, "chosen"), (p.rejected_ids, "rejected")):
            full = qs_tok.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            assert full.endswith(EOS + "\n")
            assert p.prompt_ids + ids + newline == enc(qs_tok, full)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>|"),
                min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_TEXT, chosen=_TEXT, rejected=_TEXT, system=st.none() | _TEXT)
def test_prefix_and_eos_property(qs_tok, prompt, chosen, rejected, system):
    assume(prompt.strip() and chosen.strip() and rejected.strip() and chosen != rejected)
    data = {"system_prompt": system} if system else {}
    out, _, t = tokenize(qs_tok, [{"prompt": [user(prompt)], "chosen": [asst(chosen)],
                                   "rejected": [asst(rejected)]}], **data)
    (p,) = out
    msgs = t.prompt_messages([user(prompt)])
    assert dec(qs_tok, p.prompt_ids) == t.render_prompt([user(prompt)])
    assert t.encode_prompt(t.render_prompt([user(prompt)]), templated=True) == p.prompt_ids
    for ids, reply in ((p.chosen_ids, chosen), (p.rejected_ids, rejected)):
        full = qs_tok.apply_chat_template(msgs + [asst(reply)], tokenize=False)
        # the concatenation renders exactly the conversation, up to the template's last "\n"
        assert dec(qs_tok, p.prompt_ids) + dec(qs_tok, ids) + "\n" == full
        assert ids[-1] == qs_tok.eos_token_id and ids.count(qs_tok.eos_token_id) == 1


# ---------------------------------------------------------------------------------------
# Standard (string) rows, plain text, system prompts, built-in templates
# ---------------------------------------------------------------------------------------

ROW = {"prompt": "What is the capital of France?", "chosen": "Paris.",
       "rejected": "I do not know."}
SHORT = {"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}


def test_standard_rows_use_the_template_when_auto(qs_tok):
    (p,), report, _ = tokenize(qs_tok, [ROW])
    assert report.formats == Counter(standard=1)
    assert dec(qs_tok, p.prompt_ids) == (BOS + "<|im_start|>user\nWhat is the capital of France?"
                                         "<|im_end|>\n<|im_start|>assistant\n")
    assert dec(qs_tok, p.chosen_ids) == "Paris." + EOS
    assert dec(qs_tok, p.rejected_ids) == "I do not know." + EOS


def test_chat_template_none_gives_plain_text(qs_tok):
    (p,), _, t = tokenize(qs_tok, [ROW], chat_template="none")
    assert t.template is None
    # the prompt with the tokenizer's special tokens (bos), completions with eos appended
    assert p.prompt_ids == enc(qs_tok, ROW["prompt"], special=True)
    assert p.prompt_ids[0] == qs_tok.bos_token_id
    assert dec(qs_tok, p.prompt_ids) == BOS + ROW["prompt"]
    assert p.chosen_ids == enc(qs_tok, "Paris." + EOS)
    assert p.chosen_ids[-1] == p.rejected_ids[-1] == qs_tok.eos_token_id
    assert dec(qs_tok, p.rejected_ids) == "I do not know." + EOS
    assert "<|im_start|>" not in dec(qs_tok, p.prompt_ids)
    assert t.render_prompt(ROW["prompt"]) == ROW["prompt"]
    assert t.encode_prompt(t.render_prompt(ROW["prompt"]), templated=False) == p.prompt_ids


def test_tokenizer_without_template_uses_plain_text_for_standard_rows(bpe_tok):
    (p,), _, t = tokenize(bpe_tok, [ROW], system_prompt="Ignored without a template")
    assert t.template is None
    assert p.prompt_ids[0] == bpe_tok.bos_token_id
    assert dec(bpe_tok, p.prompt_ids) == "<s>" + ROW["prompt"]
    assert dec(bpe_tok, p.chosen_ids) == "Paris.</s>"
    assert p.chosen_ids[-1] == bpe_tok.eos_token_id


def test_system_prompt_is_inserted(qs_tok):
    (p,), _, _ = tokenize(qs_tok, [ROW], system_prompt="Be brief.")
    assert dec(qs_tok, p.prompt_ids) == (
        BOS + "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    # a conversation that has its own system message keeps it, without a second one
    row = {"prompt": [{"role": "system", "content": "Own system."}, user("Hi")],
           "chosen": [asst("Hello!")], "rejected": [asst("Go away.")]}
    (p,), _, _ = tokenize(qs_tok, [row], system_prompt="Be brief.")
    text = dec(qs_tok, p.prompt_ids)
    assert "Own system." in text and "Be brief." not in text
    assert text.count("<|im_start|>system") == 1


def test_builtin_chatml_when_the_tokenizer_has_none(plain_tok):
    conv = {"prompt": [user("Hi")], "chosen": [asst("Hello!")], "rejected": [asst("No.")]}
    with pytest.raises(DataError, match="tokenizer has no chat template"):
        tokenize(plain_tok, [conv])
    (p,), _, t = tokenize(plain_tok, [conv], chat_template="chatml")
    assert t.template == CHAT_TEMPLATES["chatml"]
    # templated prompts get no extra special tokens: chatml has no bos
    assert dec(plain_tok, p.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert dec(plain_tok, p.chosen_ids) == "Hello!" + EOS
    assert p.chosen_ids[-1] == plain_tok.eos_token_id
    # standard rows are rendered through it too
    (p,), _, _ = tokenize(plain_tok, [ROW], chat_template="chatml")
    assert dec(plain_tok, p.prompt_ids).startswith("<|im_start|>user\nWhat is the capital")


def test_builtin_zephyr_template(bpe_tok):
    row = {"prompt": [user("What is the capital of France?")], "chosen": [asst("Paris.")],
           "rejected": [asst("I do not know.")]}
    (p,), _, t = tokenize(bpe_tok, [row], chat_template="zephyr")
    assert t.template == CHAT_TEMPLATES["zephyr"]
    assert dec(bpe_tok, p.prompt_ids) == ("<|user|>\nWhat is the capital of France?</s>\n"
                                          "<|assistant|>\n")
    assert dec(bpe_tok, p.chosen_ids) == "Paris.</s>"  # the template's "\n" after eos is cut
    assert dec(bpe_tok, p.rejected_ids) == "I do not know.</s>"
    assert p.chosen_ids[-1] == p.rejected_ids[-1] == bpe_tok.eos_token_id
    assert p.chosen_ids.count(bpe_tok.eos_token_id) == 1


def test_jinja_template_string(bpe_tok):
    tpl = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}[assistant] {% endif %}")
    (p,), _, _ = tokenize(bpe_tok, [ROW], chat_template=tpl)
    assert dec(bpe_tok, p.prompt_ids) == "[user] What is the capital of France?\n[assistant] "
    assert dec(bpe_tok, p.chosen_ids) == "Paris.\n</s>"  # eos appended when the template has none


def test_conversational_data_with_chat_template_none(tmp_path, qs_tok):
    r = recipe(str(QUICKSTART / "train.jsonl"), data={"chat_template": "none"})
    with pytest.raises(DataError, match="conversational but data.chat_template is 'none'"):
        prepare(r, qs_tok)


def test_tokenizer_without_eos_is_a_data_error(bpe_tok):
    import copy

    tok = copy.deepcopy(bpe_tok)
    tok.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        tokenize(tok, [ROW])


# ---------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------

def test_long_prompts_keep_their_end(qs_tok):
    long = {"prompt": " ".join(f"w{i}" for i in range(60)) + " END", "chosen": "yes",
            "rejected": "no"}
    full = enc(qs_tok, long["prompt"], special=True)
    assert len(full) > 8
    (p, q), report, _ = tokenize(qs_tok, [long, SHORT], chat_template="none", max_length=40,
                                 max_prompt_length=8)
    assert p.prompt_ids == full[-8:]
    assert dec(qs_tok, p.prompt_ids).endswith("END") and p.prompt_ids[0] != qs_tok.bos_token_id
    assert q.prompt_ids == enc(qs_tok, SHORT["prompt"], special=True)  # short: untouched
    assert report.prompt_truncated == 1 and report.response_truncated == 0
    assert "1 prompts cut from the left" in report.summary()


def test_long_responses_are_cut_from_the_right(qs_tok):
    longc = " ".join(f"c{i}" for i in range(40))
    longr = " ".join(f"r{i}" for i in range(40))
    rows = [{"prompt": "Q?", "chosen": longc, "rejected": "short"},
            {"prompt": "Q?", "chosen": longc, "rejected": longr},
            SHORT]
    out, report, _ = tokenize(qs_tok, rows, chat_template="none", max_length=20,
                              max_prompt_length=10)
    room = 20 - len(enc(qs_tok, "Q?", special=True))
    assert out[0].chosen_ids == enc(qs_tok, longc + EOS)[:room]
    assert out[0].chosen_ids[-1] != qs_tok.eos_token_id  # cut: the eos is gone
    assert out[0].rejected_ids == enc(qs_tok, "short" + EOS)
    assert out[1].rejected_ids == enc(qs_tok, longr + EOS)[:room]
    assert report.response_truncated == 3 and report.prompt_truncated == 0
    for p in out:
        assert len(p.prompt_ids) <= 10
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 20
    assert out[2].chosen_ids[-1] == qs_tok.eos_token_id


def test_prepare_applies_truncation_limits(tmp_path, qs_tok):
    r = recipe(str(QUICKSTART / "train.jsonl"), data={"max_length": 24, "max_prompt_length": 16})
    d = prepare(r, qs_tok)
    assert d.train_report.prompt_truncated > 0 and d.train_report.response_truncated > 0
    for p in d.train:
        assert len(p.prompt_ids) <= 16
        assert len(p.prompt_ids) + len(p.chosen_ids) <= 24
        assert len(p.prompt_ids) + len(p.rejected_ids) <= 24
        # left truncation keeps the generation prompt at the end
        assert dec(qs_tok, p.prompt_ids).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------
# Bad rows: skipped and counted, or fatal with data.strict
# ---------------------------------------------------------------------------------------

BAD_ROWS = [
    ROW,                                                                  # 1 ok
    {"prompt": "q2", "chosen": "a"},                                      # 2
    {"prompt": "q3", "chosen": "", "rejected": "b"},                      # 3
    {"prompt": "q4", "chosen": "same", "rejected": "same"},               # 4
    {"prompt": [{"role": "user", "content": 5}], "chosen": [asst("a")],
     "rejected": [asst("b")]},                                            # 5
    {"prompt": [{"role": "bot", "content": "hi"}], "chosen": [asst("a")],
     "rejected": [asst("b")]},                                            # 6
    "just a string",                                                      # 7
    {"prompt": "q8", "chosen": "fine", "rejected": "worse"},              # 8 ok
    {"prompt": "q9", "chosen": [{"role": "assistant", "content": 1}], "rejected": "b"},  # 9
    {"prompt": "q10", "chosen": "a", "rejected": "b", "weight": "heavy"},  # 10
    {"prompt": "q11", "chosen": 5, "rejected": "b"},                      # 11
    {"chosen": "a", "rejected": "b"},                                     # 12
    {"prompt": "   ", "chosen": "a", "rejected": "b"},                    # 13
    {"prompt": "q14", "chosen": [user("a")], "rejected": "b"},            # 14
]


def test_bad_rows_are_skipped_and_counted(tmp_path, qs_tok):
    path = write_jsonl(tmp_path / "train.jsonl", BAD_ROWS)
    d = prepare(recipe(str(path)), qs_tok)
    rep = d.train_report
    assert rep.rows == 14 and rep.pairs == len(d.train) == 2
    assert sum(rep.skipped.values()) == 12
    missing = "missing column 'rejected' (columns: prompt, chosen; map yours with data.columns)"
    assert rep.skipped == Counter({
        missing: 1,
        "empty chosen or rejected": 1,
        "chosen identical to rejected": 1,
        "prompt has non-string message content": 1,
        "prompt has unknown role 'bot'": 1,
        "row is not an object": 1,
        "chosen has non-string message content": 1,
        "weight is not a finite number >= 0": 1,
        "chosen is a int, not text or messages": 1,
        "missing prompt (and chosen/rejected share no prefix)": 1,
        "empty prompt": 1,
        "chosen does not end with an assistant message": 1,
    })
    assert rep.examples == [  # the first five, with file name and 1-based row number
        f"train.jsonl row 2: {missing}",
        "train.jsonl row 3: empty chosen or rejected",
        "train.jsonl row 4: chosen identical to rejected",
        "train.jsonl row 5: prompt has non-string message content",
        "train.jsonl row 6: prompt has unknown role 'bot'",
    ]
    assert "2 pairs from 14 rows" in rep.summary() and "12 skipped" in rep.summary()


def test_strict_stops_at_the_first_bad_row(tmp_path, qs_tok):
    path = write_jsonl(tmp_path / "train.jsonl", [ROW, ROW, {"prompt": "q", "chosen": "a"}, ROW])
    with pytest.raises(DataError) as ei:
        prepare(recipe(str(path), data={"strict": True}), qs_tok)
    msg = str(ei.value)
    assert "Bad row (train.jsonl row 3): missing column 'rejected'" in msg
    assert "data.strict: false" in msg
    # not strict: the same file gives three pairs
    assert len(prepare(recipe(str(path)), qs_tok).train) == 3


def test_all_rows_bad_says_why(tmp_path, qs_tok):
    path = write_jsonl(tmp_path / "train.jsonl",
                       [{"question": "q", "good": "a", "bad": "b"}] * 3)
    with pytest.raises(DataError) as ei:
        prepare(recipe(str(path)), qs_tok)
    msg = str(ei.value)
    assert msg.startswith("No usable training pair in the data (3 rows read).")
    assert "train.jsonl row 1: missing column 'chosen', 'rejected' (columns: question, good, bad" \
        in msg
    assert "data.columns" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"\(0 rows read\).*the sources hold no rows"):
        prepare(recipe(str(empty)), qs_tok)


# ---------------------------------------------------------------------------------------
# Columns, weights, implicit prompts
# ---------------------------------------------------------------------------------------

def test_columns_mapping_and_weight_column(tmp_path, qs_tok):
    rows = [{"question": "Q one?", "good": "Yes.", "bad": "No.", "score": 0.5},
            {"question": "Q two?", "good": "Sure.", "bad": "Nope.", "score": "2"},
            {"question": "Q three?", "good": "Ok.", "bad": "Bad.", "score": None}]
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad", "weight": "score"}
    out, report, _ = tokenize(qs_tok, rows, columns=cols)
    assert [p.weight for p in out] == [0.5, 2.0, 1.0]
    assert dec(qs_tok, out[1].chosen_ids) == "Sure." + EOS
    assert "Q two?" in dec(qs_tok, out[1].prompt_ids)
    # the default weight column is "weight"
    out, _, _ = tokenize(qs_tok, [{**ROW, "weight": 3}])
    assert out[0].weight == 3.0
    # through prepare() and the recipe key itself
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    r = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": str(path)}},
                         [f"data.columns.{k}={v}" for k, v in cols.items()])
    assert sorted(p.weight for p in prepare(r, qs_tok).train) == [0.5, 1.0, 2.0]


def test_implicit_prompt_is_the_shared_prefix(qs_tok):
    convo = [{"role": "system", "content": "Be nice."}, user("Hi"), asst("Hello! How can I help?"),
             user("Tell me a joke.")]
    rows = [
        {"chosen": [user("Hi"), asst("Hello!")], "rejected": [user("Hi"), asst("Go away.")]},
        {"chosen": convo + [asst("Why did the chicken...")],
         "rejected": convo + [asst("No.")]},
        {"prompt": "", "chosen": [user("Yo"), asst("Hey!")],
         "rejected": [user("Yo"), asst("Meh.")]},
        {"chosen": [user("A"), asst("x")], "rejected": [user("B"), asst("y")]},  # no shared prefix
    ]
    out, report, t = tokenize(qs_tok, rows)
    assert len(out) == 3
    assert report.skipped == Counter(
        {"missing prompt (and chosen/rejected do not share a conversation prefix)": 1})
    expected_prompts = [[user("Hi")], convo, [user("Yo")]]
    for p, msgs in zip(out, expected_prompts):
        assert dec(qs_tok, p.prompt_ids) == qs_tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True)
    assert dec(qs_tok, out[0].chosen_ids) == "Hello!" + EOS
    assert dec(qs_tok, out[0].rejected_ids) == "Go away." + EOS
    assert dec(qs_tok, out[1].chosen_ids) == "Why did the chicken..." + EOS


def test_explicit_prompt_with_chosen_carrying_the_conversation(qs_tok):
    row = {"prompt": [user("Hi")],
           "chosen": [user("Hi"), asst("Hello."), user("More?"), asst("Sure!")],
           "rejected": [asst("No.")]}
    (p,), _, _ = tokenize(qs_tok, [row])
    assert dec(qs_tok, p.prompt_ids) == qs_tok.apply_chat_template(
        [user("Hi"), asst("Hello."), user("More?")], tokenize=False, add_generation_prompt=True)
    assert dec(qs_tok, p.chosen_ids) == "Sure!" + EOS


def test_data_format_restricts_rows(qs_tok):
    conv = {"prompt": [user("Hi")], "chosen": [asst("Hello!")], "rejected": [asst("No.")]}
    out, report, _ = tokenize(qs_tok, [conv, ROW], format="standard")
    assert len(out) == 1 and report.skipped == Counter(
        {"prompt is a message list but data.format is standard": 1})
    out, report, _ = tokenize(qs_tok, [conv, ROW], format="conversational")
    assert len(out) == 1 and report.skipped == Counter(
        {"prompt is text but data.format is conversational": 1})
    out, report, _ = tokenize(qs_tok, [conv, ROW])
    assert len(out) == 2 and report.formats == Counter(conversational=1, standard=1)


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
        results[kind] = [key(p) for p in prepare(recipe(str(path)), qs_tok).train]
    assert len(results["jsonl"]) == 6
    for kind, res in results.items():
        assert res == results["jsonl"], kind


def test_conversational_parquet_matches_jsonl(tmp_path, qs_tok, hf_cache):
    import pandas as pd

    rows = read_rows(DataSource(str(QUICKSTART / "eval.jsonl")))[:5]
    path = tmp_path / "conv.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    assert read_rows(DataSource(str(path))) == rows
    a = [key(p) for p in prepare(recipe(str(path)), qs_tok).train]
    b = [key(p) for p in prepare(recipe(str(write_jsonl(tmp_path / "c.jsonl", rows))),
                                 qs_tok).train]
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
    assert read_rows(r.data.train[0], r) == b
    r = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": "data/*.jsonl"}},
                         base_dir=str(tmp_path))
    assert read_rows(r.data.train[0], r) == a + b
    with pytest.raises(DataError, match="matches no file"):
        read_rows(DataSource(str(d / "*.parquet")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl/.json/.parquet/.csv file"):
        read_rows(DataSource(str(tmp_path / "empty")))


def test_missing_and_unreadable_files(tmp_path, qs_tok):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as ei:
        prepare(recipe(str(missing)), qs_tok)
    assert f"Data file '{missing}' does not exist" in str(ei.value)
    with pytest.raises(DataError, match=r"'\./nope\.jsonl' does not exist"):
        read_rows(DataSource("./nope.jsonl"))
    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="unknown extension"):
        read_rows(DataSource(str(txt)))


def test_bad_json_line_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n{\"prompt\": oops}\n")
    with pytest.raises(DataError) as ei:
        read_rows(DataSource(str(p)))
    assert f"'{p}' line 4 is not valid JSON" in str(ei.value)
    q = tmp_path / "bad.json"
    q.write_text("[" + json.dumps(ROW) + ",]")
    with pytest.raises(DataError, match="is not valid JSON"):
        read_rows(DataSource(str(q)))


# ---------------------------------------------------------------------------------------
# Eval split, caps, and the whole step
# ---------------------------------------------------------------------------------------

@pytest.fixture
def forty(tmp_path):
    return str(write_jsonl(tmp_path / "forty.jsonl", standard_rows(40)))


def test_eval_split_fraction(forty, qs_tok):
    r = recipe(forty, eval={"split_fraction": 0.25})
    d = prepare(r, qs_tok)
    assert len(d.eval) == 10 and len(d.train) == 30
    assert d.eval_report is not None and d.eval_report.pairs == 10
    train, ev = {key(p) for p in d.train}, {key(p) for p in d.eval}
    assert not train & ev and len(train | ev) == 40
    # deterministic for a seed, different for another
    again = prepare(recipe(forty, eval={"split_fraction": 0.25}), qs_tok)
    assert [key(p) for p in again.eval] == [key(p) for p in d.eval]
    assert [key(p) for p in again.train] == [key(p) for p in d.train]
    other = prepare(recipe(forty, eval={"split_fraction": 0.25}, train={"seed": 1}), qs_tok)
    assert {key(p) for p in other.eval} != ev
    # int(40 * 0.33) = 13 held out, not rounded up
    d = prepare(recipe(forty, eval={"split_fraction": 0.33}), qs_tok)
    assert (len(d.eval), len(d.train)) == (13, 27)
    # a small fraction still holds one pair out
    assert len(prepare(recipe(forty, eval={"split_fraction": 0.01}), qs_tok).eval) == 1
    # no split: no eval
    d = prepare(recipe(forty), qs_tok)
    assert d.eval == [] and d.eval_report is None and len(d.train) == 40


def test_eval_split_that_leaves_nothing(tmp_path, qs_tok):
    path = write_jsonl(tmp_path / "one.jsonl", [ROW])
    with pytest.raises(DataError, match="eval.split_fraction=0.5 leaves no training pair"):
        prepare(recipe(str(path), eval={"split_fraction": 0.5}), qs_tok)


def test_max_pairs_caps(forty, qs_tok):
    assert len(prepare(recipe(forty, data={"max_pairs": 7}), qs_tok).train) == 7
    d = prepare(recipe(forty, data={"max_pairs": 7}, eval={"split_fraction": 0.25,
                                                           "max_pairs": 3}), qs_tok)
    assert len(d.train) == 7 and len(d.eval) == 3
    assert not {key(p) for p in d.train} & {key(p) for p in d.eval}
    assert len(prepare(recipe(forty, data={"max_pairs": 1000}), qs_tok).train) == 40


def test_eval_data_file(forty, tmp_path, qs_tok):
    ev = write_jsonl(tmp_path / "ev.jsonl", [ROW, {"prompt": "x", "chosen": "y"}])
    d = prepare(recipe(forty, eval={"data": str(ev), "split_fraction": 0.5}), qs_tok)
    assert len(d.train) == 40 and len(d.eval) == 1  # given eval data: no split
    assert d.eval_report.rows == 2 and sum(d.eval_report.skipped.values()) == 1
    bad = write_jsonl(tmp_path / "bad_ev.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match="No usable eval pair"):
        prepare(recipe(forty, eval={"data": str(bad)}), qs_tok)


def test_prepare_quickstart_end_to_end(qs_tok):
    r = load_recipe(QUICKSTART_YAML)
    d = prepare(r, qs_tok, use_cache=False)
    assert (len(d.train), len(d.eval)) == (384, 64)
    rep = d.train_report
    assert (rep.rows, rep.pairs) == (384, 384) and not rep.skipped
    assert rep.formats == Counter(conversational=384)
    assert rep.prompt_truncated == rep.response_truncated == rep.dropped_too_long == 0
    assert rep.summary() == "384 pairs from 384 rows; format conversational"
    assert d.eval_report.pairs == 64
    assert d.tokenizer.template == qs_tok.chat_template
    for p in d.train + d.eval:
        assert p.prompt_ids[0] == qs_tok.bos_token_id
        assert len(p.prompt_ids) <= r.data.max_prompt_length
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= r.data.max_length
        assert p.chosen_ids[-1] == p.rejected_ids[-1] == qs_tok.eos_token_id
        assert p.chosen_ids != p.rejected_ids
    # shuffled with train.seed, but the same set of pairs as the file
    rows = read_rows(r.data.train[0], r)
    file_order = [dec(qs_tok, t.chosen_ids) for t in tokenize(qs_tok, rows)[0]]
    got = [dec(qs_tok, p.chosen_ids) for p in d.train]
    assert got != file_order and sorted(got) == sorted(file_order)
    # eval subjects never appear in training prompts
    assert not {tuple(p.prompt_ids) for p in d.train} & {tuple(p.prompt_ids) for p in d.eval}


# ---------------------------------------------------------------------------------------
# Bugs found while writing these tests (strict xfail: they pass once fixed)
# ---------------------------------------------------------------------------------------

def test_jsonl_with_unicode_line_separators_in_strings(tmp_path):
    rows = [{"prompt": "one\u2028two", "chosen": "yes\x85ok", "rejected": "no\u2029"}, ROW]
    p = tmp_path / "u.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                 encoding="utf-8")
    assert read_rows(DataSource(str(p))) == rows


def test_misspelt_chat_template_name_is_an_error(qs_tok):
    with pytest.raises(QdpoError, match="chatlm"):
        prepare(recipe(str(QUICKSTART / "train.jsonl"), data={"chat_template": "chatlm"}),
                qs_tok)


def test_csv_numeric_looking_text_stays_text(tmp_path, qs_tok, hf_cache):
    path = tmp_path / "math.csv"
    path.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nWhat is 3+3?,6,7\n")
    d = prepare(recipe(str(path)), qs_tok)
    assert sorted(dec(qs_tok, p.chosen_ids) for p in d.train) == ["4" + EOS, "6" + EOS]


def test_tokenized_data_cache(tmp_path, qs_tok, monkeypatch):
    import os
    import shutil

    monkeypatch.setenv("QDPO_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "train.jsonl"
    shutil.copy(QUICKSTART / "train.jsonl", src)
    r = recipe(str(src))
    first = prepare(r, qs_tok)
    assert not first.train_report.cached
    again = prepare(r, qs_tok)
    assert again.train_report.cached and "from cache" in again.train_report.summary()
    assert [p.chosen_ids for p in again.train] == [p.chosen_ids for p in first.train]
    # a data setting that changes the pairs, or an edited file, is a different fingerprint
    assert not prepare(recipe(str(src), data={"max_length": 40, "max_prompt_length": 20}),
                          qs_tok).train_report.cached
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines[:100]) + "\n")
    os.utime(src, ns=(1, 1))
    fresh = prepare(r, qs_tok)
    assert not fresh.train_report.cached and len(fresh.train) == 100


def test_parallel_tokenization_equals_serial(tmp_path, qs_tok, monkeypatch):
    import qdpo.data as data_mod

    rows = [json.loads(x) for x in (QUICKSTART / "train.jsonl").read_text().splitlines()]
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in rows * 3))
    serial = prepare(recipe(str(src), data={"num_proc": 1}), qs_tok, use_cache=False)
    monkeypatch.setattr(data_mod, "PARALLEL_MIN_PAIRS", 100)
    monkeypatch.setattr(data_mod, "TOKENIZE_CHUNK", 97)
    short = {"max_length": 60, "max_prompt_length": 30}
    par = prepare(recipe(str(src), data={"num_proc": 2, **short}), qs_tok, use_cache=False)
    ser2 = prepare(recipe(str(src), data={"num_proc": 1, **short}), qs_tok, use_cache=False)
    assert len(serial.train) == len(rows) * 3
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in par.train] == \
        [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in ser2.train]
    assert par.train_report.response_truncated == ser2.train_report.response_truncated > 0
