"""Chat formats and encoding (qdpo/data/encode.py): chat templates (the tokenizer's, built-in,
Jinja strings, none), system prompts, the prefix and EOS guarantees of the token ids, and
truncation.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qdpo.data import (
    CHAT_TEMPLATES,
    DataReport,
    Tokenizer,
    normalise_rows,
    prepare,
    prepare_data,
    read_rows,
)
from qdpo.errors import DataError, QdpoError, RecipeError
from qdpo.recipe import DataConfig, DataSource, EvalConfig, recipe_from_dict
from tiny import QUICKSTART, asst, chat, dec, enc, system, tokenize, user, write_jsonl

BOS, EOS = "<|begin_of_text|>", "<|im_end|>"
GEN = "<|im_start|>assistant\n"
SEED = 42

ROW = {"prompt": "What is the capital of France?", "chosen": "Paris.",
       "rejected": "I do not know."}
SHORT = {"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}










def prepare_file(tok, path, seed=SEED, use_cache=True, **data):
    """The whole data step on one local file, with these data settings."""
    return prepare_data(DataConfig(train=[DataSource(str(path))], **data), EvalConfig(), tok,
                        seed=seed, resolve=str, use_cache=use_cache)



# ---------------------------------------------------------------------------------------
# Conversational rows with the tokenizer's chat template
# ---------------------------------------------------------------------------------------
def test_conversational_rows_follow_the_chat_template(qs_tok):
    rows = read_rows(DataSource(str(QUICKSTART / "train.jsonl")))[:6]
    out, report, _, _ = tokenize(qs_tok, rows)
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
    out, report, _, _ = tokenize(qs_tok, rows)
    assert len(out) == len(rows) == 384 and not report.skipped
    newline = enc(qs_tok, "\n")
    for row, p in zip(rows, out):
        for ids, side in ((p.chosen_ids, "chosen"), (p.rejected_ids, "rejected")):
            full = qs_tok.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            assert full.endswith(EOS + "\n")
            assert p.prompt_ids + ids + newline == enc(qs_tok, full)


# no lone surrogates or NULs: rows holding them are skipped (test_data_normalise)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>|\x00"),
                min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_TEXT, chosen=_TEXT, rejected=_TEXT, system=st.none() | _TEXT)
def test_prefix_and_eos_property(qs_tok, prompt, chosen, rejected, system):
    assume(prompt.strip() and chosen.strip() and rejected.strip() and chosen != rejected)
    data = {"system_prompt": system} if system else {}
    out, _, t, _ = tokenize(qs_tok, [{"prompt": [user(prompt)], "chosen": [asst(chosen)],
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
# Standard (string) rows, plain text, built-in and Jinja templates
# ---------------------------------------------------------------------------------------
def test_standard_rows_use_the_template_when_auto(qs_tok):
    (p,), report, _, _ = tokenize(qs_tok, [ROW])
    assert report.formats == Counter(standard=1)
    assert dec(qs_tok, p.prompt_ids) == (BOS + "<|im_start|>user\nWhat is the capital of France?"
                                         "<|im_end|>\n<|im_start|>assistant\n")
    assert dec(qs_tok, p.chosen_ids) == "Paris." + EOS
    assert dec(qs_tok, p.rejected_ids) == "I do not know." + EOS


def test_chat_template_none_gives_plain_text(qs_tok):
    (p,), _, t, _ = tokenize(qs_tok, [ROW], chat_template="none")
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


def test_standard_rows_plain_text_without_template(qs_tok):
    row = {"prompt": "Human: What is the boiling point of water at sea level?\nAssistant:",
           "chosen": " 100 degrees Celsius.", "rejected": " It depends on the kettle."}
    (p,), report, t, _ = tokenize(qs_tok, [row], chat_template="none")
    assert t.template is None and report.formats == Counter(standard=1)
    assert p.prompt_ids == enc(qs_tok, row["prompt"], special=True)  # bos, no chat wrapping
    assert p.chosen_ids == enc(qs_tok, row["chosen"] + EOS)
    assert p.rejected_ids == enc(qs_tok, row["rejected"] + EOS)
    assert dec(qs_tok, p.prompt_ids + p.chosen_ids) == BOS + row["prompt"] + row["chosen"] + EOS


def test_builtin_chatml_when_the_tokenizer_has_none(plain_tok):
    conv = {"prompt": [user("Hi")], "chosen": [asst("Hello!")], "rejected": [asst("No.")]}
    with pytest.raises(DataError, match="tokenizer has no chat template"):
        tokenize(plain_tok, [conv])
    (p,), _, t, _ = tokenize(plain_tok, [conv], chat_template="chatml")
    assert t.template == CHAT_TEMPLATES["chatml"]
    # templated prompts get no extra special tokens: chatml has no bos
    assert dec(plain_tok, p.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert dec(plain_tok, p.chosen_ids) == "Hello!" + EOS
    assert p.chosen_ids[-1] == plain_tok.eos_token_id
    # standard rows are rendered through it too
    (p,), _, _, _ = tokenize(plain_tok, [ROW], chat_template="chatml")
    assert dec(plain_tok, p.prompt_ids).startswith("<|im_start|>user\nWhat is the capital")


def test_builtin_zephyr_template(bpe_tok):
    row = {"prompt": [user("What is the capital of France?")], "chosen": [asst("Paris.")],
           "rejected": [asst("I do not know.")]}
    (p,), _, t, _ = tokenize(bpe_tok, [row], chat_template="zephyr")
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
    (p,), _, _, _ = tokenize(bpe_tok, [ROW], chat_template=tpl)
    assert dec(bpe_tok, p.prompt_ids) == "[user] What is the capital of France?\n[assistant] "
    assert dec(bpe_tok, p.chosen_ids) == "Paris.\n</s>"  # eos appended when the template has none


def test_conversational_data_with_chat_template_none(tmp_path, qs_tok):
    with pytest.raises(DataError, match="conversational but data.chat_template is 'none'"):
        prepare_file(qs_tok, QUICKSTART / "train.jsonl", chat_template="none")


def test_misspelt_chat_template_name_is_an_error(qs_tok):
    with pytest.raises(QdpoError, match="chatlm"):
        prepare(recipe_from_dict({"model": {"name_or_path": "m"},
                                  "data": {"train": str(QUICKSTART / "train.jsonl"),
                                           "chat_template": "chatlm"}}), qs_tok)


def test_tokenizer_without_eos_is_a_data_error(bpe_tok):
    import copy

    tok = copy.deepcopy(bpe_tok)
    tok.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        tokenize(tok, [ROW])


# ---------------------------------------------------------------------------------------
# System prompts: data.system_prompt and a row's system column
# ---------------------------------------------------------------------------------------
def test_system_prompt_is_inserted(qs_tok):
    (p,), _, _, _ = tokenize(qs_tok, [ROW], system_prompt="Be brief.")
    assert dec(qs_tok, p.prompt_ids) == (
        BOS + "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    # a conversation that has its own system message keeps it, without a second one
    row = {"prompt": [{"role": "system", "content": "Own system."}, user("Hi")],
           "chosen": [asst("Hello!")], "rejected": [asst("Go away.")]}
    (p,), _, _, _ = tokenize(qs_tok, [row], system_prompt="Be brief.")
    text = dec(qs_tok, p.prompt_ids)
    assert "Own system." in text and "Be brief." not in text
    assert text.count("<|im_start|>system") == 1


def test_system_prompt_added_once(qs_tok):
    t = Tokenizer(qs_tok, DataConfig(system_prompt="Be kind."), True)
    assert t.prompt_messages([user("hi")])[0] == {"role": "system", "content": "Be kind."}
    own = [{"role": "system", "content": "Mine."}, user("hi")]
    assert t.prompt_messages(own) == own
    assert t.prompt_messages("hi")[0]["content"] == "Be kind."


def test_tokenizer_without_template_uses_plain_text_for_standard_rows(bpe_tok):
    (p,), report, t, _ = tokenize(bpe_tok, [ROW])
    assert t.template is None
    assert p.prompt_ids[0] == bpe_tok.bos_token_id
    assert dec(bpe_tok, p.prompt_ids) == "<s>" + ROW["prompt"]
    assert dec(bpe_tok, p.chosen_ids) == "Paris.</s>"
    assert p.chosen_ids[-1] == bpe_tok.eos_token_id
    assert report.notes == [] and t.render_prompt(ROW["prompt"]) == ROW["prompt"]


PLAIN_NOTE = "system prompt put before each prompt as plain text"


def test_system_prompt_without_a_chat_template_is_kept_as_plain_text(bpe_tok, qs_tok):
    """data.system_prompt was silently dropped when there was no chat template: now its text,
    a newline, then the prompt, in training and in generation alike, and the report says so."""
    (p, q), report, t, _ = tokenize(bpe_tok, [ROW, SHORT], system_prompt="Be brief.")
    assert t.template is None
    assert dec(bpe_tok, p.prompt_ids) == "<s>Be brief.\n" + ROW["prompt"]
    assert dec(bpe_tok, q.prompt_ids) == "<s>Be brief.\n" + SHORT["prompt"]
    assert dec(bpe_tok, p.chosen_ids) == "Paris.</s>"  # replies untouched
    assert t.render_prompt(ROW["prompt"]) == "Be brief.\n" + ROW["prompt"]
    assert t.encode_prompt(t.render_prompt(ROW["prompt"]), templated=False) == p.prompt_ids
    assert len(report.notes) == 1 and report.notes[0].startswith(PLAIN_NOTE)
    assert report.summary().count(PLAIN_NOTE) == 1
    # chat_template: none on a tokenizer that has a template: the same rule
    (p,), report, t, _ = tokenize(qs_tok, [ROW], system_prompt="Be brief.",
                                  chat_template="none")
    assert t.template is None and PLAIN_NOTE in report.summary()
    assert p.prompt_ids == enc(qs_tok, "Be brief.\n" + ROW["prompt"], special=True)
    # a generation from messages (chat, generate) sees the same text
    assert t.render_prompt([user(ROW["prompt"])]) == "Be brief.\n" + ROW["prompt"]


def test_row_system_column_without_a_chat_template(tmp_path, bpe_tok):
    """A mapped system column used to turn standard rows into a conversational set, which
    then failed without a chat template; each row's system text now goes before its prompt."""
    rows = [{"system": "You are a geographer.", "question": ROW["prompt"],
             "chosen": "Paris.", "rejected": "I do not know."},
            {"system": "", "question": SHORT["prompt"], "chosen": "Yes.", "rejected": "No."}]
    cols = {"prompt": "question", "system": "system"}
    out, report, t, pairs = tokenize(bpe_tok, rows, columns=cols)
    assert not t.conversational and report.formats == Counter(standard=2)
    assert [x.system for x in pairs] == ["You are a geographer.", None]
    assert dec(bpe_tok, out[0].prompt_ids) == "<s>You are a geographer.\n" + ROW["prompt"]
    assert dec(bpe_tok, out[1].prompt_ids) == "<s>" + SHORT["prompt"]  # no system text
    assert PLAIN_NOTE in report.summary()
    # the row's own system text wins over data.system_prompt; rows without one get it
    out, _, _, _ = tokenize(bpe_tok, rows, columns=cols, system_prompt="Be brief.")
    assert dec(bpe_tok, out[0].prompt_ids) == "<s>You are a geographer.\n" + ROW["prompt"]
    assert dec(bpe_tok, out[1].prompt_ids) == "<s>Be brief.\n" + SHORT["prompt"]
    # the whole step, with data.format: standard
    path = write_jsonl(tmp_path / "orca.jsonl", rows)
    d = prepare_file(bpe_tok, path, columns=cols, format="standard", use_cache=False)
    assert len(d.train) == 2 and d.train_report.formats == Counter(standard=2)
    assert sorted(dec(bpe_tok, x.prompt_ids) for x in d.train) == [
        "<s>" + SHORT["prompt"], "<s>You are a geographer.\n" + ROW["prompt"]]


def test_tokenizer_takes_the_data_settings_or_a_whole_recipe(qs_tok):
    """chat and generate hand the run's recipe; the data code needs only its data section."""
    r = recipe_from_dict({"model": {"name_or_path": "m"},
                          "data": {"train": "a.jsonl", "system_prompt": "Be kind."}})
    a, b = Tokenizer(qs_tok, r, False), Tokenizer(qs_tok, r.data, False)
    assert a.settings is r.data and a.system_prompt == b.system_prompt == "Be kind."
    assert a.render_prompt("hi") == b.render_prompt("hi") == chat(qs_tok, [system("Be kind."),
                                                                            user("hi")])


# ---------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------
def test_long_prompts_keep_their_end(qs_tok):
    long = {"prompt": " ".join(f"w{i}" for i in range(60)) + " END", "chosen": "yes",
            "rejected": "no"}
    full = enc(qs_tok, long["prompt"], special=True)
    assert len(full) > 8
    (p, q), report, _, _ = tokenize(qs_tok, [long, SHORT], chat_template="none", max_length=40,
                                 max_prompt_length=8)
    assert p.prompt_ids == full[:1] + full[-7:]  # BOS kept, then the end
    assert dec(qs_tok, p.prompt_ids).endswith("END") and p.prompt_ids[0] == qs_tok.bos_token_id
    assert q.prompt_ids == enc(qs_tok, SHORT["prompt"], special=True)  # short: untouched
    assert report.prompt_truncated == 1 and report.response_truncated == 0
    assert "1 prompt cut (the oldest content" in report.summary()


def test_long_responses_are_cut_from_the_right(qs_tok):
    longc = " ".join(f"c{i}" for i in range(40))
    longr = " ".join(f"r{i}" for i in range(40))
    rows = [{"prompt": "Q?", "chosen": longc, "rejected": "short"},
            {"prompt": "Q?", "chosen": longc, "rejected": longr},
            SHORT]
    out, report, _, _ = tokenize(qs_tok, rows, chat_template="none", max_length=20,
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
    d = prepare_file(qs_tok, QUICKSTART / "train.jsonl", max_length=24, max_prompt_length=16)
    assert d.train_report.prompt_truncated > 0 and d.train_report.response_truncated > 0
    for p in d.train:
        assert len(p.prompt_ids) <= 16
        assert len(p.prompt_ids) + len(p.chosen_ids) <= 24
        assert len(p.prompt_ids) + len(p.rejected_ids) <= 24
        # left truncation keeps the generation prompt at the end
        assert dec(qs_tok, p.prompt_ids).endswith("<|im_start|>assistant\n")


def test_prompt_cut_from_the_left_responses_from_the_right(qs_tok):
    long_prompt = "Context: " + " ".join(f"fact{i}" for i in range(80)) + " QUESTION: why?"
    long_reply = " ".join(f"because{i}" for i in range(60))
    rows = [{"prompt": long_prompt, "chosen": long_reply, "rejected": "No idea."},
            {"prompt": "Short?", "chosen": "Yes.", "rejected": "No."}]
    out, report, _, _ = tokenize(qs_tok, rows, chat_template="none", max_length=40,
                                 max_prompt_length=16)
    p, q = out
    full_prompt = enc(qs_tok, long_prompt, special=True)
    assert p.prompt_ids == full_prompt[:1] + full_prompt[-15:]  # BOS and the end are kept
    assert dec(qs_tok, p.prompt_ids).endswith("QUESTION: why?")
    room = 40 - 16
    assert p.chosen_ids == enc(qs_tok, long_reply + EOS)[:room]  # the start is kept
    assert dec(qs_tok, p.chosen_ids).startswith("because0 because1")
    assert p.rejected_ids == enc(qs_tok, "No idea." + EOS)  # short: untouched, eos kept
    assert q.prompt_ids == enc(qs_tok, "Short?", special=True)
    assert (report.prompt_truncated, report.response_truncated, report.dropped_too_long) == \
        (1, 1, 0)
    assert "1 prompt cut (the oldest content" in report.summary()
    assert "1 response cut" in report.summary()


def test_templated_prompt_keeps_the_generation_prompt_when_cut(qs_tok):
    turns = [user(" ".join(f"history{i}" for i in range(50))), asst("Noted."),
             user("Final question?")]
    row = {"prompt": turns, "chosen": [asst("Answer.")], "rejected": [asst("Nope.")]}
    (p,), report, _, _ = tokenize(qs_tok, [row], max_length=40, max_prompt_length=20)
    full = enc(qs_tok, chat(qs_tok, turns))
    head = len(enc(qs_tok, BOS + "<|im_start|>user\n"))  # kept: BOS and the first header
    assert len(full) > 20 and p.prompt_ids == full[:head] + full[-(20 - head):]
    assert dec(qs_tok, p.prompt_ids).endswith("Final question?" + EOS + "\n" + GEN)
    assert p.chosen_ids[-1] == qs_tok.eos_token_id  # fits: not cut
    assert (report.prompt_truncated, report.response_truncated) == (1, 0)


def test_pair_dropped_only_when_no_room_is_left(qs_tok):
    # a validated recipe always leaves room: the prompt limit is below the total limit
    with pytest.raises(RecipeError, match="max_prompt_length"):
        recipe_from_dict({"model": {"name_or_path": "m"},
                          "data": {"train": "a.jsonl", "max_length": 16,
                                   "max_prompt_length": 16}})
    long = {"prompt": " ".join(f"w{i}" for i in range(40)), "chosen": "yes " * 30,
            "rejected": "no"}
    out, report, _, _ = tokenize(qs_tok, [long], chat_template="none", max_length=16,
                                 max_prompt_length=15)
    assert len(out) == 1 and len(out[0].prompt_ids) == 15  # one token of room: still kept
    assert len(out[0].chosen_ids) == len(out[0].rejected_ids) == 1
    assert report.dropped_too_long == 0 and report.response_truncated == 2
    # a prompt that fills the whole budget (only reachable with settings a recipe would
    # refuse) drops the pair and counts it; others are kept
    r = DataConfig(chat_template="none", max_length=16, max_prompt_length=16)
    rep = DataReport()
    pairs = normalise_rows([long, {"prompt": "Hi", "chosen": "a", "rejected": "b"}], r, rep,
                           seed=SEED)
    out = Tokenizer(qs_tok, r, False)(pairs, rep)
    assert len(out) == 1 and rep.dropped_too_long == 1 and rep.pairs == 1
    assert "1 dropped (no room for a response)" in rep.summary()


def test_truncation_keeps_prompt_end_and_counts(qs_tok):
    long_prompt = " ".join(f"w{i}" for i in range(200)) + " FINAL"
    rows = [{"prompt": long_prompt, "chosen": "yes " * 80, "rejected": "no"}]
    r = DataConfig(max_length=60, max_prompt_length=30, chat_template="none")
    rep = DataReport()
    pairs = normalise_rows(rows, r, rep, seed=SEED)
    (pt,) = Tokenizer(qs_tok, r, False)(pairs, rep)
    assert len(pt.prompt_ids) == 30 and qs_tok.decode(pt.prompt_ids).endswith("FINAL")
    assert len(pt.prompt_ids) + len(pt.chosen_ids) == 60
    assert rep.prompt_truncated == 1 and rep.response_truncated == 1


def test_a_cut_prompt_keeps_its_template_head_and_the_newest_content(qs_tok):
    long = "Rinse the rice under running water until it runs clear. " * 20
    rows = [{"prompt": [system("Be brief."), user(long)], "chosen": [asst("Yes.")],
             "rejected": [asst("No.")]}]
    (p,), report, _, _ = tokenize(qs_tok, rows, max_prompt_length=40, max_length=80)
    text = dec(qs_tok, p.prompt_ids)
    assert report.prompt_truncated == 1 and len(p.prompt_ids) == 40
    head = f"{BOS}<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert text.startswith(head)  # BOS, the system turn and the role header survive the cut
    assert text.endswith(f"runs clear. {EOS}\n{GEN}")  # the newest text and the reply header
    plain_rows = [{"prompt": long, "chosen": "Yes.", "rejected": "No."}]
    (q,), _, _, _ = tokenize(qs_tok, plain_rows, max_prompt_length=30, max_length=60,
                             chat_template="none")
    assert q.prompt_ids[0] == qs_tok.bos_token_id and len(q.prompt_ids) == 30


def test_a_system_turn_too_long_to_keep_keeps_its_role_header(qs_tok):
    # the Orca shape: a system turn longer than the room a cut leaves; the prompt still starts
    # as a conversation does (it used to keep BOS alone, then a fragment of the system text)
    sys_text = "You are an AI assistant. You will be given a task. Answer in detail. " * 3
    long = "Rinse the rice under running water until it runs clear. " * 20
    rows = [{"prompt": [system(sys_text), user(long)], "chosen": [asst("Yes.")],
             "rejected": [asst("No.")]}]
    (full,), _, _, _ = tokenize(qs_tok, rows, max_prompt_length=4096, max_length=4200)
    (p,), report, _, _ = tokenize(qs_tok, rows, max_prompt_length=40, max_length=80)
    head = report.cuts[0]["head"]
    assert len(p.prompt_ids) == 40 and 1 < head < 10
    assert dec(qs_tok, p.prompt_ids[:head]).endswith("<|im_start|>system\n")
    assert p.prompt_ids[:head] == full.prompt_ids[:head]
    assert p.prompt_ids[-10:] == full.prompt_ids[-10:]  # the newest content
    assert report.prompt_truncated == 1 and report.prompt_head_lost == 0


def test_a_long_head_is_kept_when_the_newest_content_still_fits_beside_it(qs_tok):
    """The Orca shape with a prompt a little too long: the system turn is over half of
    max_prompt_length, but cutting the oldest user words is enough; cutting the head instead
    took the system turn's role header with it."""
    sys_text = "You are a pirate. Answer every question as a pirate would, with gusto. "
    long = "Rinse the rice under running water until it runs clear."
    rows = [{"prompt": [system(sys_text), user(long)], "chosen": [asst("Yes.")],
             "rejected": [asst("No.")]}]
    (full,), _, _, _ = tokenize(qs_tok, rows, max_prompt_length=4096, max_length=4200)
    n = len(full.prompt_ids)
    (p,), report, _, _ = tokenize(qs_tok, rows, max_prompt_length=n - 5, max_length=n + 40)
    assert report.prompt_truncated == 1 and report.prompt_head_lost == 0
    assert report.cuts[0]["head_kept"] is True
    head = report.cuts[0]["head"]
    assert head > (n - 5) // 2  # the case the old rule cut (a head over half the room)
    assert p.prompt_ids[:head] == full.prompt_ids[:head]  # the system turn, headers and all
    assert p.prompt_ids[-10:] == full.prompt_ids[-10:]  # the newest content


def test_a_head_that_cannot_fit_at_all_keeps_bos_and_says_so(qs_tok):
    rows = [{"prompt": [user("Rinse the rice under running water until it runs clear.")],
             "chosen": [asst("Yes.")], "rejected": [asst("No.")]}]
    (p,), report, _, _ = tokenize(qs_tok, rows, max_prompt_length=4, max_length=40)
    assert len(p.prompt_ids) == 4 and p.prompt_ids[0] == qs_tok.bos_token_id
    assert report.prompt_head_lost == 1 and report.cuts[0]["head_kept"] is False
    assert "1 prompt cut from the start, only BOS kept" in report.summary()
