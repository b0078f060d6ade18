"""Each public data set shape, as a realistic row, and malformed rows never slipping through."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PretrainedConfig

from qdpo.data import DataReport, Tokenizer, normalise_rows, prepare
from qdpo.errors import DataError, QdpoError
from qdpo.recipe import recipe_from_dict
from tiny import QUICKSTART, asst, user


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(QUICKSTART / "model", config=PretrainedConfig())


def recipe(train="unused.jsonl", **data):
    return recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": train, **data}})


def pairs_of(rows, **data):
    r = recipe(**data)
    rep = DataReport(strict=r.data.strict)
    return normalise_rows(rows, r, rep, source="rows"), rep


def test_orca_style_standard_row_with_column_mapping():
    row = {"system": "You are an AI assistant.", "question": "Translate 'hello' to French.",
           "chosen": "Bonjour.", "rejected": "Hola."}
    (p,), rep = pairs_of([row], columns={"prompt": "question"})
    assert (p.prompt, p.chosen, p.rejected) == ("Translate 'hello' to French.", "Bonjour.",
                                                "Hola.")
    assert rep.formats["standard"] == 1


def test_orca_system_column_mapped():
    row = {"system": "You are an AI assistant.", "question": "Translate 'hello' to French.",
           "chosen": "Bonjour.", "rejected": "Hola."}
    (p,), _ = pairs_of([row], columns={"prompt": "question", "system": "system"})
    assert p.prompt == [{"role": "system", "content": "You are an AI assistant."},
                        user("Translate 'hello' to French.")]
    (q,), _ = pairs_of([dict(row, system="")], columns={"prompt": "question",
                                                         "system": "system"})
    assert q.prompt == "Translate 'hello' to French."


def test_ultrafeedback_binarized_row_full_conversations():
    row = {"prompt": "How do I boil an egg?", "prompt_id": "ab12",
           "chosen": [user("How do I boil an egg?"), asst("Simmer it for 9 minutes.")],
           "rejected": [user("How do I boil an egg?"), asst("Eggs are round.")],
           "messages": [user("How do I boil an egg?"), asst("Simmer it for 9 minutes.")],
           "score_chosen": 8.5, "score_rejected": 3.0}
    (p,), _ = pairs_of([row])
    assert p.prompt == [user("How do I boil an egg?")]
    assert (p.chosen, p.rejected) == ("Simmer it for 9 minutes.", "Eggs are round.")


def test_multi_turn_prompt_is_every_turn_before_the_last_reply(tok):
    row = {"prompt": [{"role": "system", "content": "Be terse."}, user("Hi"), asst("Hello."),
                      user("Capital of France?")],
           "chosen": [asst("Paris.")], "rejected": [asst("Lyon.")]}
    (p,), _ = pairs_of([row])
    assert len(p.prompt) == 4 and p.prompt[-1] == user("Capital of France?")
    t = Tokenizer(tok, recipe(), True)
    (pt,) = t([p], DataReport())
    assert tok.decode(pt.prompt_ids).endswith("Capital of France?<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    assert tok.decode(pt.chosen_ids) == "Paris.<|im_end|>"


def test_hh_rlhf_texts_become_a_dialogue(tok):
    shared = ("\n\nHuman: What is a good way to learn guitar?\n\nAssistant: Start with a few "
              "chords.\n\nHuman: And then?\n\nAssistant:")
    row = {"chosen": shared + " Practice a little every day.",
           "rejected": shared + " Give up, it is hard."}
    (p,), rep = pairs_of([row])
    assert p.prompt == [user("What is a good way to learn guitar?"),
                        asst("Start with a few chords."), user("And then?")]
    assert (p.chosen, p.rejected) == ("Practice a little every day.", "Give up, it is hard.")
    assert rep.formats["implicit (HH dialogue)"] == 1
    (pt,) = Tokenizer(tok, recipe(), True)([p], DataReport())
    assert tok.decode(pt.prompt_ids) == tok.apply_chat_template(p.prompt, tokenize=False,
                                                                add_generation_prompt=True)


def test_texts_sharing_a_prefix_split_at_a_word():
    row = {"chosen": "The sky is blue because of Rayleigh scattering.",
           "rejected": "The sky is blueish because it reflects the sea."}
    (p,), _ = pairs_of([row])
    assert p.prompt == "The sky is "
    assert (p.chosen, p.rejected) == ("blue because of Rayleigh scattering.",
                                      "blueish because it reflects the sea.")


def test_ultrafeedback_raw_scored_completions():
    row = {"source": "evol_instruct", "instruction": "Name a prime number.",
           "models": ["a", "b", "c", "d"],
           "completions": [
               {"model": "a", "response": "7", "overall_score": 9.0,
                "fine-grained_score": 4.75, "annotations": {}},
               {"model": "b", "response": "9", "overall_score": 2.0,
                "fine-grained_score": 1.5, "annotations": {}},
               {"model": "c", "response": "4", "overall_score": 3.0,
                "fine-grained_score": 2.0, "annotations": {}},
               {"model": "d", "response": "11", "overall_score": 8.0,
                "fine-grained_score": 4.5, "annotations": {}}]}
    (worst,), rep = pairs_of([row])
    assert worst.prompt == "Name a prime number." and (worst.chosen, worst.rejected) == ("7", "9")
    assert rep.formats["ranked"] == 1
    (second,), _ = pairs_of([row], pair_selection="best_vs_second")
    assert (second.chosen, second.rejected) == ("7", "11")
    picks = {pairs_of([row], pair_selection="best_vs_random")[0][0].rejected for _ in range(3)}
    assert len(picks) == 1 and picks <= {"9", "4", "11"}  # deterministic, never the best
    tie = dict(row, completions=[dict(c, overall_score=5.0) for c in row["completions"]])
    kept, rep = pairs_of([tie])
    assert not kept and rep.skipped["all responses have the same score"] == 1


def test_responses_and_scores_lists_with_mapping():
    row = {"q": "2+2?", "answers": ["4", "5", "22"], "ratings": [10, 1, 3]}
    (p,), _ = pairs_of([row], columns={"prompt": "q", "responses": "answers",
                                       "scores": "ratings"})
    assert (p.prompt, p.chosen, p.rejected) == ("2+2?", "4", "5")


def test_sources_mixed_with_weights_and_samples(tmp_path, tok):
    rows = [json.loads(x) for x in (QUICKSTART / "train.jsonl").read_text().splitlines()]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    b.write_text("".join(json.dumps({"question": r["prompt"][0]["content"],
                                     "good": r["chosen"][0]["content"],
                                     "bad": r["rejected"][0]["content"]}) + "\n"
                         for r in rows[40:60]))
    r = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": [
        {"path": str(a), "weight": 0.5},
        {"path": str(b), "samples": 50,
         "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}}]}})
    d = prepare(r, tok, use_cache=False)
    assert len(d.train) == 20 + 50
    assert d.train_report.mixed == {"a.jsonl": 20, "b.jsonl": 50}
    for bad in ({"path": "x", "weight": 0}, {"path": "x", "samples": 0}):
        with pytest.raises(QdpoError, match="'x'"):
            recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": [bad]}})


def test_system_prompt_added_once(tok):
    t = Tokenizer(tok, recipe(system_prompt="Be kind."), True)
    assert t.prompt_messages([user("hi")])[0] == {"role": "system", "content": "Be kind."}
    own = [{"role": "system", "content": "Mine."}, user("hi")]
    assert t.prompt_messages(own) == own
    assert t.prompt_messages("hi")[0]["content"] == "Be kind."


def test_truncation_keeps_prompt_end_and_counts(tok):
    long_prompt = " ".join(f"w{i}" for i in range(200)) + " FINAL"
    rows = [{"prompt": long_prompt, "chosen": "yes " * 80, "rejected": "no"}]
    r = recipe(max_length=60, max_prompt_length=30, chat_template="none")
    rep = DataReport()
    pairs = normalise_rows(rows, r, rep)
    (pt,) = Tokenizer(tok, r, False)(pairs, rep)
    assert len(pt.prompt_ids) == 30 and tok.decode(pt.prompt_ids).endswith("FINAL")
    assert len(pt.prompt_ids) + len(pt.chosen_ids) == 60
    assert rep.prompt_truncated == 1 and rep.response_truncated == 1


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "content", "prompt", "chosen", "rejected", "x"]), inner,
        max_size=3), max_leaves=8)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot", "system"]),
                                 "content": st.one_of(st.text(max_size=12), st.integers())})
FIELD = st.one_of(JSONISH, st.text(max_size=20), st.lists(MESSAGE, max_size=3))
ROW = st.one_of(JSONISH, st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected",
                                                          "weight", "extra"]), FIELD,
                                         max_size=5))


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=1, max_size=6))
def test_malformed_rows_are_skipped_or_valid(tok, rows):
    r = recipe()
    rep = DataReport()
    try:
        pairs = normalise_rows(rows, r, rep)
        conv = any(not isinstance(p.prompt, str) for p in pairs)
        out = Tokenizer(tok, r, conv)(pairs, rep) if pairs else []
    except DataError:
        return  # one clear error is allowed (e.g. a template needed and missing)
    assert len(out) + sum(rep.skipped.values()) + rep.dropped_too_long == len(rows)
    for p in out:
        assert p.prompt_ids and p.chosen_ids and p.rejected_ids
        assert p.chosen_ids[-1] == tok.eos_token_id and p.rejected_ids[-1] == tok.eos_token_id
    if len(out) == len(pairs):  # never a silently wrong pair: each side is its own reply
        for p, src in zip(out, pairs):
            assert src.chosen != src.rejected
            assert tok.decode(p.chosen_ids) == src.chosen + tok.eos_token
            assert tok.decode(p.rejected_ids) == src.rejected + tok.eos_token
    strict = recipe(strict=True)
    if rep.skipped:
        with pytest.raises(DataError, match="row"):
            normalise_rows(rows, strict, DataReport(strict=True))
