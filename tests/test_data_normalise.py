"""Normalising rows to pairs (qdpo/data/normalise.py, shapes.py): every preference-data shape
qdpo reads, each as a realistic row of the public data set it comes from (written from those
sets' schemas), through normalisation and tokenization with the quickstart tokenizer's chat
template; several sources mixed; bad rows skipped and counted (or, with data.strict, a
DataError naming them); property tests that a malformed row is always a counted skip and a kept
pair is never silently wrong.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qdpo.data import (
    DataReport,
    Tokenizer,
    normalise_rows,
    prepare,
    prepare_data,
    prepare_sources,
    tokenize_sources,
)
from qdpo.errors import DataError, QdpoError, RecipeError
from qdpo.recipe import DataConfig, DataSource, EvalConfig, recipe_from_dict
from tiny import QUICKSTART, asst, chat, dec, enc, system, tokenize, user, write_jsonl

BOS, EOS = "<|begin_of_text|>", "<|im_end|>"
GEN = "<|im_start|>assistant\n"
SEED = 42








def normalise(rows, seed=SEED, **data):
    report = DataReport(strict=data.get("strict", False))
    return normalise_rows(rows, DataConfig(**data), report, seed=seed, source="rows"), report




def prepare_file(tok, path, seed=SEED, **data):
    """The whole data step on one local file, with these data settings."""
    return prepare_data(DataConfig(train=[DataSource(str(path))], **data), EvalConfig(), tok,
                        seed=seed, resolve=str)


ROW = {"prompt": "What is the capital of France?", "chosen": "Paris.",
       "rejected": "I do not know."}


def assert_valid(tok, p, chosen: str, rejected: str, prompt_msgs=None):
    """A kept pair: prompt is the rendered prompt, each side is its own reply + eos."""
    assert p.prompt_ids and p.chosen_ids and p.rejected_ids
    if prompt_msgs is not None:
        assert dec(tok, p.prompt_ids) == chat(tok, prompt_msgs)
    assert dec(tok, p.chosen_ids) == chosen + EOS
    assert dec(tok, p.rejected_ids) == rejected + EOS
    assert p.chosen_ids[-1] == p.rejected_ids[-1] == tok.eos_token_id



# ---------------------------------------------------------------------------------------
# 1. Standard rows: prompt / chosen / rejected strings (Intel/orca_dpo_pairs)
# ---------------------------------------------------------------------------------------
ORCA_SYSTEM = ("You are an AI assistant. User will you give you a task. Your goal is to complete "
               "the task as faithfully as you can. While performing the task think step-by-step "
               "and justify your steps.")


ORCA = {
    "system": ORCA_SYSTEM,
    "question": "Generate an approximately fifteen-word sentence that describes all this data: "
                "Midsummer House eatType restaurant; Midsummer House food Chinese; Midsummer "
                "House priceRange moderate; Midsummer House customer rating 3 out of 5; "
                "Midsummer House near All Bar One",
    "chosen": "Midsummer House is a moderately priced Chinese restaurant with a 3/5 customer "
              "rating, located near All Bar One.",
    "rejected": " Sure! Here's a sentence that describes all the data you provided:\n\n"
                "\"Midsummer House is a moderately priced Chinese restaurant with a customer "
                "rating of 3 out of 5, located near All Bar One, offering a variety of delicious "
                "dishes.\"",
}


def test_orca_dpo_pairs_with_prompt_column_mapping(qs_tok):
    (p,), report, _, (pair,) = tokenize(qs_tok, [ORCA], columns={"prompt": "question"})
    assert (pair.prompt, pair.chosen, pair.rejected) == (ORCA["question"], ORCA["chosen"],
                                                         ORCA["rejected"])
    assert report.formats == Counter(standard=1) and not report.skipped
    # the leading space of orca's rejected replies is kept as the data has it; its "system"
    # column is the row's system message without being mapped
    assert pair.system == ORCA_SYSTEM
    assert_valid(qs_tok, p, ORCA["chosen"], ORCA["rejected"],
                 [system(ORCA_SYSTEM), user(ORCA["question"])])
    assert dec(qs_tok, p.prompt_ids).startswith(BOS + "<|im_start|>system\nYou are an AI")
    assert p.prompt_ids.count(qs_tok.bos_token_id) == 1
    # without the mapping, "question" is found as the prompt all the same
    (q,), _, _, _ = tokenize(qs_tok, [ORCA])
    assert (q.prompt_ids, q.chosen_ids, q.rejected_ids) == (p.prompt_ids, p.chosen_ids,
                                                            p.rejected_ids)


def test_orca_style_standard_row_with_column_mapping():
    row = {"system": "You are an AI assistant.", "question": "Translate 'hello' to French.",
           "chosen": "Bonjour.", "rejected": "Hola."}
    (p,), rep = normalise([row], columns={"prompt": "question"})
    assert (p.prompt, p.chosen, p.rejected) == ("Translate 'hello' to French.", "Bonjour.",
                                                "Hola.")
    assert rep.formats["standard"] == 1


def test_orca_system_column_mapped(qs_tok):
    """A mapped system column is that row's system message; the row stays a standard row."""
    row = {"system": "You are an AI assistant.", "question": "Translate 'hello' to French.",
           "chosen": "Bonjour.", "rejected": "Hola."}
    cols = {"prompt": "question", "system": "system"}
    (p,), rep = normalise([row], columns=cols)
    assert (p.prompt, p.system) == ("Translate 'hello' to French.", "You are an AI assistant.")
    assert rep.formats == Counter(standard=1)
    (pt,), _, t, _ = tokenize(qs_tok, [row], columns=cols, system_prompt="Recipe-wide.")
    assert not t.conversational
    # it wins over data.system_prompt, as a system message of the prompt would
    assert dec(qs_tok, pt.prompt_ids) == chat(qs_tok, [system("You are an AI assistant."),
                                                       user("Translate 'hello' to French.")])
    (q,), _ = normalise([dict(row, system="")], columns=cols)
    assert (q.prompt, q.system) == ("Translate 'hello' to French.", None)
    # a conversation with its own system message keeps it
    conv = {"system": "Column.", "prompt": [system("Own."), user("Hi")],
            "chosen": [asst("Hello!")], "rejected": [asst("Go away.")]}
    (c,), _ = normalise([conv], columns={"system": "system"})
    assert c.system is None and c.prompt[0] == system("Own.")
    conv = dict(conv, prompt=[user("Hi")])
    (pt,), _, _, (c,) = tokenize(qs_tok, [conv], columns={"system": "system"})
    assert c.system == "Column."
    assert dec(qs_tok, pt.prompt_ids) == chat(qs_tok, [system("Column."), user("Hi")])


# ---------------------------------------------------------------------------------------
# 2. Conversational rows
# ---------------------------------------------------------------------------------------
def test_multi_turn_prompt_is_every_turn_before_the_final_reply(qs_tok):
    prompt = [system("You are a concise travel assistant."),
              user("I have two days in Lisbon. Where should I start?"),
              asst("Start in Alfama: walk up to the Castelo de São Jorge for the views."),
              user("And on the second day?")]
    row = {"prompt": prompt,
           "chosen": [asst("Take the train to Sintra and visit the Pena Palace.")],
           "rejected": [asst("Lisbon is the capital of Portugal.")]}
    (p,), report, _, (pair,) = tokenize(qs_tok, [row])
    assert pair.prompt == prompt and report.formats == Counter(conversational=1)
    assert_valid(qs_tok, p, "Take the train to Sintra and visit the Pena Palace.",
                 "Lisbon is the capital of Portugal.", prompt)
    assert dec(qs_tok, p.prompt_ids).endswith("And on the second day?" + EOS + "\n" + GEN)
    # prompt + completion is token for token the whole conversation (up to the template's
    # trailing newline)
    full = qs_tok.apply_chat_template(prompt + row["chosen"], tokenize=False)
    assert p.prompt_ids + p.chosen_ids + enc(qs_tok, "\n") == enc(qs_tok, full)


def test_multi_turn_prompt_is_every_turn_before_the_last_reply(qs_tok):
    row = {"prompt": [{"role": "system", "content": "Be terse."}, user("Hi"), asst("Hello."),
                      user("Capital of France?")],
           "chosen": [asst("Paris.")], "rejected": [asst("Lyon.")]}
    (p,), _ = normalise([row])
    assert len(p.prompt) == 4 and p.prompt[-1] == user("Capital of France?")
    t = Tokenizer(qs_tok, DataConfig(), True)
    (pt,) = t([p], DataReport())
    assert qs_tok.decode(pt.prompt_ids).endswith("Capital of France?<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    assert qs_tok.decode(pt.chosen_ids) == "Paris.<|im_end|>"


UFB_PROMPT = "how can i develop a habit of drawing daily"


UFB_CHOSEN = ("Developing a daily habit of drawing can be challenging but with consistent "
              "practice and a few tips, it can become an enjoyable and rewarding part of your "
              "daily routine.\n\n1. Set a specific time: allocate a time each day for drawing.")


UFB_REJECTED = ("As an AI language model, I cannot personally develop habits for you. But, here "
                "are some tips for developing a habit of drawing daily.")


UFB = {
    "prompt": UFB_PROMPT,
    "prompt_id": "086b3e24f29b8956a01059f79c56db35d118a06fb6b844b095737d042795cd43",
    "chosen": [user(UFB_PROMPT), asst(UFB_CHOSEN)],
    "rejected": [user(UFB_PROMPT), asst(UFB_REJECTED)],
    "messages": [user(UFB_PROMPT), asst(UFB_CHOSEN)],
    "score_chosen": 8.5,
    "score_rejected": 6.0,
}


def test_ultrafeedback_binarized_full_conversations(qs_tok):
    (p,), report, _, (pair,) = tokenize(qs_tok, [UFB])
    assert pair.prompt == [user(UFB_PROMPT)]  # the shared message prefix
    assert (pair.chosen, pair.rejected) == (UFB_CHOSEN, UFB_REJECTED)
    assert report.formats == Counter(conversational=1)
    assert_valid(qs_tok, p, UFB_CHOSEN, UFB_REJECTED, [user(UFB_PROMPT)])
    # the "messages" and score columns are not mistaken for anything
    assert "Developing" not in dec(qs_tok, p.prompt_ids)


def test_ultrafeedback_binarized_row_full_conversations():
    row = {"prompt": "How do I boil an egg?", "prompt_id": "ab12",
           "chosen": [user("How do I boil an egg?"), asst("Simmer it for 9 minutes.")],
           "rejected": [user("How do I boil an egg?"), asst("Eggs are round.")],
           "messages": [user("How do I boil an egg?"), asst("Simmer it for 9 minutes.")],
           "score_chosen": 8.5, "score_rejected": 3.0}
    (p,), _ = normalise([row])
    assert p.prompt == [user("How do I boil an egg?")]
    assert (p.chosen, p.rejected) == ("Simmer it for 9 minutes.", "Eggs are round.")


def test_multi_turn_full_conversations_beside_a_prompt_string(qs_tok):
    """argilla/distilabel-capybara-dpo style: the prompt string is the first turn only; the
    conversations carry the real multi-turn context, which becomes the prompt."""
    turns = [user("Write a haiku about autumn."),
             asst("Crimson leaves falling\nwhispers of the cooling wind\nthe year exhales slow"),
             user("Now make it about winter.")]
    row = {"source": "Dove", "prompt": "Write a haiku about autumn.",
           "chosen": turns + [asst("Silent snow settles\nthe pine holds its breath in white\n"
                                   "footprints fill by dawn")],
           "rejected": turns + [asst("Winter is cold.")],
           "chosen_rating": 5, "rejected_rating": 2}
    (p,), _, _, (pair,) = tokenize(qs_tok, [row])
    assert pair.prompt == turns
    assert_valid(qs_tok, p, row["chosen"][-1]["content"], "Winter is cold.", turns)


def test_implicit_prompt_from_conversations_only(qs_tok):
    turns = [system("Answer in one sentence."), user("Why is the sky blue?")]
    row = {"chosen": turns + [asst("Air molecules scatter blue light more than red.")],
           "rejected": turns + [asst("Because the ocean reflects onto it.")]}
    (p,), _, _, (pair,) = tokenize(qs_tok, [row])
    assert pair.prompt == turns
    assert_valid(qs_tok, p, "Air molecules scatter blue light more than red.",
                 "Because the ocean reflects onto it.", turns)


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
    out, report, t, _ = tokenize(qs_tok, rows)
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
    (p,), _, _, _ = tokenize(qs_tok, [row])
    assert dec(qs_tok, p.prompt_ids) == qs_tok.apply_chat_template(
        [user("Hi"), asst("Hello."), user("More?")], tokenize=False, add_generation_prompt=True)
    assert dec(qs_tok, p.chosen_ids) == "Sure!" + EOS


def test_data_format_restricts_rows(qs_tok):
    conv = {"prompt": [user("Hi")], "chosen": [asst("Hello!")], "rejected": [asst("No.")]}
    out, report, _, _ = tokenize(qs_tok, [conv, ROW], format="standard")
    assert len(out) == 1 and report.skipped == Counter(
        {"prompt is a message list but data.format is standard": 1})
    out, report, _, _ = tokenize(qs_tok, [conv, ROW], format="conversational")
    assert len(out) == 1 and report.skipped == Counter(
        {"prompt is text but data.format is conversational": 1})
    out, report, _, _ = tokenize(qs_tok, [conv, ROW])
    assert len(out) == 2 and report.formats == Counter(conversational=1, standard=1)


# ---------------------------------------------------------------------------------------
# 3. Implicit prompt: Anthropic HH-RLHF texts
# ---------------------------------------------------------------------------------------
HH_SHARED = ("\n\nHuman: What is a good way to learn guitar?\n\nAssistant: Start with a few open "
             "chords like G, C and D, and practice switching between them slowly."
             "\n\nHuman: And then?\n\nAssistant:")


HH = {"chosen": HH_SHARED + " Practice daily, even fifteen minutes, and learn songs you like.",
      "rejected": HH_SHARED + " I don't know, maybe just buy a more expensive guitar."}


HH_PROMPT = [user("What is a good way to learn guitar?"),
             asst("Start with a few open chords like G, C and D, and practice switching between "
                  "them slowly."),
             user("And then?")]


def test_hh_rlhf_multi_turn_texts(qs_tok):
    (p,), report, _, (pair,) = tokenize(qs_tok, [HH])
    assert pair.prompt == HH_PROMPT  # every turn up to the last Human turn
    assert (pair.chosen, pair.rejected) == (
        "Practice daily, even fifteen minutes, and learn songs you like.",
        "I don't know, maybe just buy a more expensive guitar.")
    assert report.formats == Counter({"implicit (HH dialogue)": 1, "conversational": 1})
    assert_valid(qs_tok, p, pair.chosen, pair.rejected, HH_PROMPT)
    text = dec(qs_tok, p.prompt_ids)
    assert "Human:" not in text and "Assistant:" not in text  # markers became turns
    assert text.count("<|im_start|>user") == 2 and text.count("<|im_start|>assistant") == 2


def test_hh_rlhf_texts_become_a_dialogue(qs_tok):
    shared = ("\n\nHuman: What is a good way to learn guitar?\n\nAssistant: Start with a few "
              "chords.\n\nHuman: And then?\n\nAssistant:")
    row = {"chosen": shared + " Practice a little every day.",
           "rejected": shared + " Give up, it is hard."}
    (p,), rep = normalise([row])
    assert p.prompt == [user("What is a good way to learn guitar?"),
                        asst("Start with a few chords."), user("And then?")]
    assert (p.chosen, p.rejected) == ("Practice a little every day.", "Give up, it is hard.")
    assert rep.formats["implicit (HH dialogue)"] == 1
    (pt,) = Tokenizer(qs_tok, DataConfig(), True)([p], DataReport())
    assert qs_tok.decode(pt.prompt_ids) == qs_tok.apply_chat_template(p.prompt, tokenize=False,
                                                                add_generation_prompt=True)


def test_hh_rlhf_single_turn_and_inconsistent_rows(qs_tok):
    single = {"chosen": "\n\nHuman: How do I make a cup of tea?\n\nAssistant: Boil water, pour it "
                        "over a tea bag and steep for three minutes.",
              "rejected": "\n\nHuman: How do I make a cup of tea?\n\nAssistant: Why would you "
                          "want tea?"}
    differ = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye!",
              "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Bye\n\nAssistant: Ok."}
    empty = {"chosen": "\n\nHuman: Are you there?\n\nAssistant: Yes, I am here.",
             "rejected": "\n\nHuman: Are you there?\n\nAssistant:"}
    out, report, _, pairs = tokenize(qs_tok, [single, differ, empty])
    assert len(out) == 1 and pairs[0].prompt == [user("How do I make a cup of tea?")]
    assert_valid(qs_tok, out[0], "Boil water, pour it over a tea bag and steep for three "
                                 "minutes.", "Why would you want tea?",
                 [user("How do I make a cup of tea?")])
    assert report.skipped == Counter({
        "missing prompt (and chosen/rejected do not share a conversation prefix)": 1,
        "empty chosen or rejected": 1})
    assert report.examples == [
        "rows row 2: missing prompt (and chosen/rejected do not share a conversation prefix)",
        "rows row 3: empty chosen or rejected"]


# ---------------------------------------------------------------------------------------
# 4. Implicit prompt: plain texts sharing a prefix
# ---------------------------------------------------------------------------------------
def test_plain_texts_sharing_a_prefix_cut_at_whitespace(qs_tok):
    post = ("SUBREDDIT: r/relationships\nTITLE: My boyfriend forgot our anniversary\nPOST: We "
            "have been together for three years and he forgot it completely.\nTL;DR:")
    row = {"chosen": post + " Boyfriend forgot our third anniversary; how do I bring it up?",
           "rejected": post + " Bad boyfriend."}
    mid_word = {"chosen": "The sky is blue because of Rayleigh scattering.",
                "rejected": "The sky is blueish because it reflects the sea."}
    none = {"chosen": "Yes.", "rejected": "No."}
    out, report, _, pairs = tokenize(qs_tok, [row, mid_word, none])
    assert len(out) == 2
    assert report.formats == Counter({"implicit (shared text prefix)": 2, "standard": 2})
    assert report.skipped == Counter({"missing prompt (and chosen/rejected share no prefix)": 1})
    a, b = pairs
    assert a.prompt == post + " " and a.prompt[-1].isspace()
    assert (a.chosen, a.rejected) == ("Boyfriend forgot our third anniversary; how do I bring "
                                      "it up?", "Bad boyfriend.")
    # diverging inside a word: cut back to the previous space, never mid-word
    assert b.prompt == "The sky is "
    assert (b.chosen, b.rejected) == ("blue because of Rayleigh scattering.",
                                      "blueish because it reflects the sea.")
    for pair in pairs:
        assert pair.prompt + pair.chosen in (row["chosen"], mid_word["chosen"])
    assert_valid(qs_tok, out[0], a.chosen, a.rejected, [user(a.prompt)])
    # without a template the pieces concatenate back to the original texts
    (p, _), _, _, _ = tokenize(qs_tok, [row, mid_word], chat_template="none")
    assert dec(qs_tok, p.prompt_ids + p.chosen_ids) == BOS + row["chosen"] + EOS
    assert dec(qs_tok, p.prompt_ids + p.rejected_ids) == BOS + row["rejected"] + EOS


def test_texts_sharing_a_prefix_split_at_a_word():
    row = {"chosen": "The sky is blue because of Rayleigh scattering.",
           "rejected": "The sky is blueish because it reflects the sea."}
    (p,), _ = normalise([row])
    assert p.prompt == "The sky is "
    assert (p.chosen, p.rejected) == ("blue because of Rayleigh scattering.",
                                      "blueish because it reflects the sea.")


# ---------------------------------------------------------------------------------------
# 5. Ranked / scored responses (openbmb/UltraFeedback raw)
# ---------------------------------------------------------------------------------------
def uf_completion(model: str, response: str, overall: float, fine: float, rating: int) -> dict:
    aspect = {"Rating": str(rating), "Rationale": "The text is mostly aligned with the task."}
    return {"annotations": {"helpfulness": dict(aspect, **{"Type": ["1", "2"]}),
                            "honesty": aspect, "instruction_following": aspect,
                            "truthfulness": dict(aspect, **{"Type": ["0"]})},
            "critique": f"The response from {model} is clear but could be more detailed.",
            "custom_system_prompt": "As an AI assistant, provide accurate answers.",
            "fine-grained_score": fine, "model": model, "overall_score": overall,
            "principle": "helpfulness", "response": response}


UF_INSTRUCTION = ("Can you write a C++ program that prompts the user to enter the name of a "
                  "country and checks if it borders the Mediterranean Sea?")


UF_A = "Here's a C++ program using a set of bordering countries and std::getline."


UF_B = "The Mediterranean Sea borders many countries."


UF_C = "Sure, here is some Python code instead."


UF_D = "Use an if statement comparing the input against a list of countries."


UF_RAW = {"source": "evol_instruct", "instruction": UF_INSTRUCTION,
          "models": ["gpt-4", "alpaca-7b", "pythia-12b", "starchat"],
          "completions": [uf_completion("gpt-4", UF_A, 8.5, 4.25, 5),
                          uf_completion("alpaca-7b", UF_B, 4.0, 3.5, 2),
                          uf_completion("pythia-12b", UF_C, 6.0, 1.75, 1),
                          uf_completion("starchat", UF_D, 7.0, 4.5, 4)],
          "correct_answers": ["None"], "incorrect_answers": ["None"]}


def test_ultrafeedback_raw_best_vs_worst_by_default(qs_tok):
    (p,), report, _, (pair,) = tokenize(qs_tok, [UF_RAW])
    assert pair.prompt == UF_INSTRUCTION  # found in "instruction"
    assert (pair.chosen, pair.rejected) == (UF_A, UF_B)
    assert report.formats == Counter(ranked=1, standard=1)
    assert_valid(qs_tok, p, UF_A, UF_B, [user(UF_INSTRUCTION)])


def test_ultrafeedback_raw_best_vs_second(qs_tok):
    (pair,), _ = normalise([UF_RAW], pair_selection="best_vs_second")
    assert (pair.chosen, pair.rejected) == (UF_A, UF_D)


def test_best_vs_random_is_seeded_never_the_best_nor_a_tie():
    tie_with_best = uf_completion("wizardlm", "A tie with the best answer.", 8.5, 4.0, 5)
    row = dict(UF_RAW, completions=UF_RAW["completions"] + [tie_with_best])
    rows = [row] * 40

    def picks(seed):
        rep = DataReport()
        pairs = normalise_rows(rows, DataConfig(pair_selection="best_vs_random"), rep,
                               seed=seed, source="rows")
        assert len(pairs) == 40 and not rep.skipped
        assert all(p.chosen == UF_A for p in pairs)  # the first of the tied best
        return [p.rejected for p in pairs]

    first = picks(42)
    assert set(first) <= {UF_B, UF_C, UF_D}  # never the best, never the one tied with it
    assert len(set(first)) == 3  # really random: all three worse ones drawn
    assert picks(42) == first  # deterministic for the seed
    assert picks(7) != first  # another seed, another draw


def test_rows_whose_scores_all_tie_are_skipped_and_counted():
    tied = dict(UF_RAW, completions=[dict(c, overall_score=7.0) for c in UF_RAW["completions"]])
    one = dict(UF_RAW, completions=UF_RAW["completions"][:1])
    unscored = {"prompt": "Pick one", "responses": ["a", "b"], "scores": [1.0]}
    pairs, report = normalise([tied, UF_RAW, one, unscored], pair_selection="best_vs_second")
    assert len(pairs) == 1 and pairs[0].row == 2
    assert report.skipped == Counter({
        "all responses have the same score": 1,
        "needs chosen/rejected, or at least two scored responses": 1,
        "response 2 has no numeric score": 1})
    assert report.examples[0] == "rows row 1: all responses have the same score"
    assert report.rows == 4 and report.formats["ranked"] == 1
    assert "3 skipped" in report.summary()


def test_responses_and_scores_parallel_lists(qs_tok):
    row = {"prompt": "Summarise: The meeting moved from Tuesday to Thursday at 3pm.",
           "responses": ["The meeting is now Thursday at 3pm.",
                         "There is a meeting.",
                         "Tuesday's meeting moved to Thursday, 3pm.",
                         "Meetings are important."],
           "scores": [9, 3, 7.5, "1"]}  # text scores are numbers too
    (p,), report, _, (pair,) = tokenize(qs_tok, [row])
    assert (pair.chosen, pair.rejected) == (row["responses"][0], row["responses"][3])
    assert report.formats["ranked"] == 1
    assert_valid(qs_tok, p, pair.chosen, pair.rejected, [user(row["prompt"])])
    (second,), _ = normalise([row], pair_selection="best_vs_second")
    assert second.rejected == row["responses"][2]


def test_ranked_columns_mapped_globally_and_per_source(tmp_path, qs_tok):
    rows = [{"question": f"What is {i} + {i}?",
             "candidates": [f"It is {2 * i}.", f"It is {2 * i + 1}.", "I cannot do math."],
             "ratings": [5, 2, 1]} for i in range(3)]
    cols = {"prompt": "question", "responses": "candidates", "scores": "ratings"}
    pairs, report = normalise(rows, columns=cols)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (f"What is {i} + {i}?", f"It is {2 * i}.", "I cannot do math.") for i in range(3)]
    assert report.formats["ranked"] == 3
    # unmapped, the row is a counted skip that names the columns it has
    _, report = normalise(rows[:1])
    (reason,) = report.skipped
    assert "missing column 'chosen', 'rejected'" in reason and "candidates" in reason
    # the same mapping on one source of a recipe
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    src = DataSource(str(path), columns=cols)
    out, rep = tokenize_sources([src], DataConfig(), qs_tok, seed=SEED, resolve=str,
                                what="training")
    assert len(out) == 3 and rep.formats["ranked"] == 3
    assert dec(qs_tok, out[1].chosen_ids) == "It is 2." + EOS
    assert dec(qs_tok, out[1].rejected_ids) == "I cannot do math." + EOS


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
    (worst,), rep = normalise([row])
    assert worst.prompt == "Name a prime number." and (worst.chosen, worst.rejected) == ("7", "9")
    assert rep.formats["ranked"] == 1
    (second,), _ = normalise([row], pair_selection="best_vs_second")
    assert (second.chosen, second.rejected) == ("7", "11")
    picks = {normalise([row], pair_selection="best_vs_random")[0][0].rejected for _ in range(3)}
    assert len(picks) == 1 and picks <= {"9", "4", "11"}  # deterministic, never the best
    tie = dict(row, completions=[dict(c, overall_score=5.0) for c in row["completions"]])
    kept, rep = normalise([tie])
    assert not kept and rep.skipped["all responses have the same score"] == 1


def test_responses_and_scores_lists_with_mapping():
    row = {"q": "2+2?", "answers": ["4", "5", "22"], "ratings": [10, 1, 3]}
    (p,), _ = normalise([row], columns={"prompt": "q", "responses": "answers",
                                       "scores": "ratings"})
    assert (p.prompt, p.chosen, p.rejected) == ("2+2?", "4", "5")


# ---------------------------------------------------------------------------------------
# 6. Several sources mixed in one recipe
# ---------------------------------------------------------------------------------------
@pytest.fixture
def sources(tmp_path):
    ufb = [dict(UFB, prompt_id=str(i),
                chosen=[user(f"Question {i}?"), asst(f"Helpful answer {i}.")],
                rejected=[user(f"Question {i}?"), asst(f"Curt {i}.")]) for i in range(20)]
    orca = [dict(ORCA, question=f"Orca task {i}", chosen=f"Orca good {i}.",
                 rejected=f"Orca bad {i}.") for i in range(6)]
    hh = [{"chosen": f"\n\nHuman: HH question {i}?\n\nAssistant: Kind reply {i}.",
           "rejected": f"\n\nHuman: HH question {i}?\n\nAssistant: Rude reply {i}."}
          for i in range(12)]
    tiny = [{"prompt": f"Tiny {i}", "chosen": f"tiny good {i}", "rejected": f"tiny bad {i}"}
            for i in range(2)]
    return {name: str(write_jsonl(tmp_path / f"{name}.jsonl", rows))
            for name, rows in (("ufb", ufb), ("orca", orca), ("hh", hh), ("tiny", tiny))}


def mixed_recipe(sources, seed=42):
    return recipe_from_dict({"model": {"name_or_path": "m"}, "train": {"seed": seed},
                             "data": {"train": [
                                 {"path": sources["ufb"], "weight": 0.5},
                                 {"path": sources["orca"], "weight": 2.0,
                                  "columns": {"prompt": "question"}},
                                 {"path": sources["hh"], "samples": 7},
                                 {"path": sources["tiny"], "samples": 5}]}})


def test_sources_mixed_with_columns_weights_and_samples(sources, qs_tok):
    r = mixed_recipe(sources)
    assert [s.weight for s in r.data.train] == [0.5, 2.0, 1.0, 1.0]
    assert r.data.train[1].columns == {"prompt": "question"}
    out, report = prepare_sources(r.data.train, r, qs_tok, what="training")
    assert report.rows == 20 + 6 + 12 + 2 and not report.skipped
    assert report.mixed == {"ufb.jsonl": 10, "orca.jsonl": 12, "hh.jsonl": 7, "tiny.jsonl": 5}
    assert len(out) == report.pairs == 10 + 12 + 7 + 5
    assert "mixed 10 from ufb.jsonl, 12 from orca.jsonl, 7 from hh.jsonl, 5 from tiny.jsonl" \
        in report.summary()
    chosen = [dec(qs_tok, p.chosen_ids).removesuffix(EOS) for p in out]
    groups = {k: [c for c in chosen if c.startswith(pre)] for k, pre in
              (("ufb", "Helpful"), ("orca", "Orca"), ("hh", "Kind"), ("tiny", "tiny"))}
    assert len(set(groups["ufb"])) == 10  # half, without repeats
    assert Counter(groups["orca"]) == Counter({f"Orca good {i}.": 2 for i in range(6)})  # doubled
    assert len(set(groups["hh"])) == 7  # exactly seven distinct
    # more samples than rows: every row as often as fits, the rest drawn at random
    assert sorted(Counter(groups["tiny"]).values()) == [2, 3]
    # the orca source's own mapping put "question" in the prompt
    orca_prompts = [dec(qs_tok, p.prompt_ids) for p in out if
                    dec(qs_tok, p.chosen_ids).startswith("Orca")]
    assert all("Orca task" in t for t in orca_prompts)


def test_source_sampling_is_deterministic_for_a_seed(sources, qs_tok):
    def draw(seed):
        r = mixed_recipe(sources, seed)
        out, _ = prepare_sources(r.data.train, r, qs_tok, what="training")
        return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in out]

    a = draw(42)
    assert draw(42) == a
    b = draw(3)
    assert len(b) == len(a) and b != a


def test_sources_mixed_with_weights_and_samples(tmp_path, qs_tok):
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
    d = prepare(r, qs_tok, use_cache=False)
    assert len(d.train) == 20 + 50
    assert d.train_report.mixed == {"a.jsonl": 20, "b.jsonl": 50}
    for bad in ({"path": "x", "weight": 0}, {"path": "x", "samples": 0}):
        with pytest.raises(QdpoError, match="'x'"):
            recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": [bad]}})


@pytest.mark.parametrize("bad, key", [
    ({"weight": 0}, "weight"), ({"weight": -0.5}, "weight"), ({"samples": 0}, "samples"),
    ({"samples": -3}, "samples")])
@pytest.mark.parametrize("section", ["data", "eval"])
def test_source_weight_and_samples_are_validated(bad, key, section):
    src = {"path": "data/helpsteer.jsonl", **bad}
    raw = {"model": {"name_or_path": "m"}, "data": {"train": ["ok.jsonl"]}}
    if section == "data":
        raw["data"]["train"].append(src)
    else:
        raw["eval"] = {"data": [src]}
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict(raw)
    msg = str(ei.value)
    assert "'data/helpsteer.jsonl'" in msg and key in msg
    assert ("must be > 0" if key == "weight" else "must be between 1 and") in msg


def test_source_samples_must_be_an_integer():
    with pytest.raises(RecipeError, match=r"'data\.train\[0\]\.samples' has the value 2\.5"):
        recipe_from_dict({"model": {"name_or_path": "m"},
                          "data": {"train": [{"path": "a.jsonl", "samples": 2.5}]}})


def test_mixed_counts_keep_sources_with_the_same_file_name_apart(tmp_path, qs_tok):
    paths = []
    for name, n in (("orca", 10), ("hh", 10)):
        (tmp_path / name).mkdir()
        paths.append(str(write_jsonl(tmp_path / name / "train.jsonl",
                                     [dict(ORCA, question=f"{name} {i}") for i in range(n)])))
    r = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": [
        {"path": paths[0], "samples": 3}, {"path": paths[1], "samples": 5}]}})
    out, report = prepare_sources(r.data.train, r, qs_tok, what="training")
    assert len(out) == 8
    assert sorted(report.mixed.values()) == [3, 5]


def test_eval_source_columns_are_validated():
    with pytest.raises(RecipeError, match="promt"):
        recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": "a.jsonl"},
                          "eval": {"data": [{"path": "e.jsonl",
                                             "columns": {"promt": "question"}}]}})


# ---------------------------------------------------------------------------------------
# 7. data.system_prompt across row shapes
# ---------------------------------------------------------------------------------------
def test_system_prompt_for_standard_conversational_and_hh_rows(qs_tok):
    conv = {"prompt": [user("Hi there")], "chosen": [asst("Hello!")], "rejected": [asst("What.")]}
    own = {"prompt": [system("You are a pirate."), user("Hi there")],
           "chosen": [asst("Ahoy!")], "rejected": [asst("Hello.")]}
    out, _, t, _ = tokenize(qs_tok, [ORCA, conv, own, HH], system_prompt=ORCA_SYSTEM)
    expected = [[system(ORCA_SYSTEM), user(ORCA["question"])],
                [system(ORCA_SYSTEM), user("Hi there")],
                [system("You are a pirate."), user("Hi there")],  # kept, not duplicated
                [system(ORCA_SYSTEM)] + HH_PROMPT]
    for p, msgs in zip(out, expected):
        text = dec(qs_tok, p.prompt_ids)
        assert text == chat(qs_tok, msgs)
        assert text.count("<|im_start|>system") == 1
    assert ORCA_SYSTEM not in dec(qs_tok, out[2].prompt_ids)
    assert dec(qs_tok, out[2].chosen_ids) == "Ahoy!" + EOS
    assert t.render_prompt(ORCA["question"]) == dec(qs_tok, out[0].prompt_ids)


# ---------------------------------------------------------------------------------------
# 8. Columns, weights and bad rows: skipped and counted, or fatal with data.strict
# ---------------------------------------------------------------------------------------

def test_columns_mapping_and_weight_column(tmp_path, qs_tok):
    rows = [{"question": "Q one?", "good": "Yes.", "bad": "No.", "score": 0.5},
            {"question": "Q two?", "good": "Sure.", "bad": "Nope.", "score": "2"},
            {"question": "Q three?", "good": "Ok.", "bad": "Bad.", "score": None}]
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad", "weight": "score"}
    out, report, _, _ = tokenize(qs_tok, rows, columns=cols)
    assert [p.weight for p in out] == [0.5, 2.0, 1.0]
    assert dec(qs_tok, out[1].chosen_ids) == "Sure." + EOS
    assert "Q two?" in dec(qs_tok, out[1].prompt_ids)
    # the default weight column is "weight"
    out, _, _, _ = tokenize(qs_tok, [{**ROW, "weight": 3}])
    assert out[0].weight == 3.0
    # through prepare() and the recipe key itself
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    r = recipe_from_dict({"model": {"name_or_path": "m"}, "data": {"train": str(path)}},
                         [f"data.columns.{k}={v}" for k, v in cols.items()])
    assert sorted(p.weight for p in prepare(r, qs_tok).train) == [0.5, 1.0, 2.0]


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
    d = prepare_file(qs_tok, path)
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
        prepare_file(qs_tok, path, strict=True)
    msg = str(ei.value)
    assert "Bad row (train.jsonl row 3): missing column 'rejected'" in msg
    assert "data.strict: false" in msg
    # not strict: the same file gives three pairs
    assert len(prepare_file(qs_tok, path).train) == 3


def test_all_rows_bad_says_why(tmp_path, qs_tok):
    path = write_jsonl(tmp_path / "train.jsonl",
                       [{"question": "q", "good": "a", "bad": "b"}] * 3)
    with pytest.raises(DataError) as ei:
        prepare_file(qs_tok, path)
    msg = str(ei.value)
    assert msg.startswith("No usable training pair in the data (3 rows read).")
    assert "train.jsonl row 1: missing column 'chosen', 'rejected' (columns: question, good, bad" \
        in msg
    assert "data.columns" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"\(0 rows read\).*the sources hold no rows"):
        prepare_file(qs_tok, empty)


# ---------------------------------------------------------------------------------------
# Property tests: malformed rows are counted skips, kept pairs are valid and right
# ---------------------------------------------------------------------------------------
_WORDS = st.sampled_from([
    "Hi", "Paris", "yes", "no", "The sky is blue", "The sky is blueish", "  ", "", "\n",
    "café ☕", "日本語", "🎸 guitar", "\n\nHuman: hi", "\n\nAssistant: ok", "<|im_end|>",
    "\n\nHuman: Hi\n\nAssistant: A", "\n\nHuman: Hi\n\nAssistant: B", "5", "nan"])


_TEXT = _WORDS | st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)


_SCALAR = (st.none() | st.booleans() | st.integers(-5, 5) | _TEXT
           | st.floats(-10, 10, allow_nan=False))


_KEYS = ["prompt", "chosen", "rejected", "weight", "completions", "responses", "scores",
         "instruction", "question", "input", "messages", "role", "content", "extra"]


_JSONISH = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3),
                        max_leaves=6)


_ROLE = st.sampled_from(["system", "user", "assistant", "tool", "bot", "Human", ""]) | _SCALAR


_MESSAGE = (st.fixed_dictionaries({"role": _ROLE, "content": _SCALAR})
            | st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                     "content": _TEXT})
            | st.dictionaries(st.sampled_from(["role", "content", "name"]), _SCALAR,
                              max_size=3))


_COMPLETION = st.fixed_dictionaries(
    {"response": _SCALAR},
    optional={"overall_score": _SCALAR, "fine-grained_score": _SCALAR,
              "annotations": _JSONISH, "model": _TEXT})


_FIELD = (_JSONISH | _TEXT | st.lists(_MESSAGE, max_size=4) | st.lists(_COMPLETION, max_size=4)
          | st.lists(_SCALAR, max_size=4))


_ROW = _JSONISH | st.dictionaries(st.sampled_from(_KEYS), _FIELD, max_size=6)


def _strings(v):
    """Every string inside a JSON-like value."""
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)


def _from_side(text: str, row: dict, side: str) -> bool:
    """The reply text comes from this side of the row (or its scored responses)."""
    sources = [row.get(side), row.get("completions"), row.get("responses")]
    return any(text in s for src in sources for s in _strings(src))


_VOCAB = ["the", "guitar", "Paris", "chords", "practice", "café", "日本", "🎸", "42", "why?",
          "daily,", "slowly.", "Sure!", "no", "blue", "sky", "tea"]


_PHRASE = st.lists(st.sampled_from(_VOCAB), min_size=1, max_size=5).map(" ".join)


FORMATS = ["standard", "orca", "conversational", "implicit_conversation", "ultrafeedback",
           "hh", "shared_text", "ranked_completions", "ranked_lists"]


@st.composite
def _known_rows(draw):
    """A valid row of a random format, with the prompt and replies it must give."""
    fmt = draw(st.sampled_from(FORMATS))
    q = draw(_PHRASE)
    c, rj = draw(_PHRASE), draw(_PHRASE)
    assume(c != rj)
    earlier = draw(st.lists(st.tuples(_PHRASE, _PHRASE), max_size=2))
    turns = [m for u, a in earlier for m in (user(u), asst(a))] + [user(q)]
    if draw(st.booleans()):
        turns = [system(draw(_PHRASE))] + turns
    if fmt == "standard":
        return {"prompt": q, "chosen": c, "rejected": rj}, [user(q)], c, rj
    if fmt == "orca":
        return ({"system": "You are helpful.", "question": q, "chosen": c, "rejected": rj},
                [system("You are helpful."), user(q)], c, rj)
    if fmt == "conversational":
        return {"prompt": turns, "chosen": [asst(c)], "rejected": [asst(rj)]}, turns, c, rj
    if fmt == "implicit_conversation":
        return ({"chosen": turns + [asst(c)], "rejected": turns + [asst(rj)]}, turns, c, rj)
    if fmt == "ultrafeedback":
        return ({"prompt": q, "prompt_id": "x", "chosen": turns + [asst(c)],
                 "rejected": turns + [asst(rj)], "messages": turns + [asst(c)],
                 "score_chosen": 8.0, "score_rejected": 2.0}, turns, c, rj)
    if fmt == "hh":
        hh_turns = [m for m in turns if m["role"] != "system"]
        text = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                       for m in hh_turns) + "\n\nAssistant: "
        return {"chosen": text + c, "rejected": text + rj}, hh_turns, c, rj
    if fmt == "shared_text":
        assume(c[0] != rj[0])
        return {"chosen": q + " " + c, "rejected": q + " " + rj}, [user(q + " ")], c, rj
    others = draw(st.lists(_PHRASE, max_size=2))
    texts = [c, rj] + others
    assume(len(set(texts)) == len(texts))
    rank = [len(texts), 0] + list(range(1, len(others) + 1))  # c best, rj worst
    order = draw(st.permutations(list(range(len(texts)))))
    texts, scores = [texts[k] for k in order], [rank[k] for k in order]
    if fmt == "ranked_completions":
        row = {"instruction": q, "completions": [
            {"response": t, "overall_score": float(s), "model": "m"} for t, s in
            zip(texts, scores)]}
    else:
        row = {"prompt": q, "responses": texts, "scores": scores}
    return row, [user(q)], c, rj


@st.composite
def _mutated_rows(draw):
    """A valid row of a known format with up to three random defects (a key dropped, a field
    replaced by junk, an extra key, a message's role or content broken, a message added)."""
    row = copy.deepcopy(draw(_known_rows())[0])
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "replace", "extra", "message"]))
        keys = sorted(row)
        if op == "drop" and keys:
            del row[draw(st.sampled_from(keys))]
        elif op == "replace" and keys:
            row[draw(st.sampled_from(keys))] = draw(_FIELD)
        elif op == "extra":
            row[draw(st.sampled_from(_KEYS + ["source", "id"]))] = draw(_FIELD)
        else:
            lists = [k for k in keys if isinstance(row[k], list) and row[k]
                     and all(isinstance(m, dict) for m in row[k])]
            if not lists:
                continue
            msgs = row[draw(st.sampled_from(lists))]
            k = draw(st.integers(0, len(msgs) - 1))
            how = draw(st.sampled_from(["role", "content", "del", "append"]))
            if how == "role":
                msgs[k]["role"] = draw(_ROLE)
            elif how == "content":
                msgs[k]["content"] = draw(_SCALAR)
            elif how == "del":
                msgs[k].pop(draw(st.sampled_from(sorted(msgs[k]) or ["role"])), None)
            else:
                msgs.append(draw(_MESSAGE))
    return row


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_mutated_rows() | _mutated_rows() | _ROW, min_size=1, max_size=5))
def test_malformed_rows_are_counted_skips_or_valid_pairs(qs_tok, rows):
    r = DataConfig()
    report = DataReport()
    try:
        pairs = normalise_rows(rows, r, report, seed=SEED, source="rows")
        out = Tokenizer(qs_tok, r, any(not isinstance(p.prompt, str) for p in pairs))(
            pairs, report) if pairs else []
    except DataError:
        return  # one clear error is allowed; anything else fails the test
    # every row is accounted for: a pair, or a counted skip
    assert report.rows == len(rows)
    assert len(out) + sum(report.skipped.values()) + report.dropped_too_long == len(rows)
    assert report.pairs == len(out)
    kept = {p.row for p in pairs}
    for ex in report.examples:
        where, _, reason = ex.partition(": ")
        assert where.startswith("rows row ") and reason
        assert int(where.removeprefix("rows row ")) not in kept  # names a skipped row
    assert len(report.examples) == min(5, len(report.skipped))  # one example per problem
    assert len(out) == len(pairs)  # default limits: nothing dropped
    for p, pair in zip(out, pairs):
        row = rows[pair.row - 1]
        assert p.prompt_ids and p.chosen_ids and p.rejected_ids
        assert p.chosen_ids[-1] == p.rejected_ids[-1] == qs_tok.eos_token_id
        assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
        assert math.isfinite(p.weight)
        # each side is its own reply, taken from that side of the row
        assert _from_side(pair.chosen, row, "chosen")
        assert _from_side(pair.rejected, row, "rejected")
        assert dec(qs_tok, p.chosen_ids) == pair.chosen + EOS
        assert dec(qs_tok, p.rejected_ids) == pair.rejected + EOS
        rendered = Tokenizer(qs_tok, r, True).render_prompt(pair.prompt, pair.system)
        assert dec(qs_tok, p.prompt_ids) == rendered
    # data.strict: the first bad row is a DataError that names it
    strict = DataConfig(strict=True)
    if report.skipped:
        where, _, reason = report.examples[0].partition(": ")
        with pytest.raises(DataError) as ei:
            normalise_rows(rows, strict, DataReport(strict=True), seed=SEED,
                           source="rows")
        assert f"Bad row ({where}): {reason}" in str(ei.value)
    else:
        again = normalise_rows(rows, strict, DataReport(strict=True), seed=SEED,
                           source="rows")
        assert len(again) == len(pairs)


@settings(max_examples=100, deadline=None, database=None)
@given(known=st.lists(_known_rows(), min_size=1, max_size=4),
       system_prompt=st.none() | st.just("Be brief."))
def test_kept_pairs_are_never_silently_wrong(qs_tok, known, system_prompt):
    rows = [k[0] for k in known]
    data = {"system_prompt": system_prompt} if system_prompt else {}
    out, report, t, pairs = tokenize(qs_tok, rows, **data)
    assert len(out) == len(rows) and not report.skipped
    for p, (_, msgs, chosen, rejected) in zip(out, known):
        expect = list(msgs)
        if system_prompt and expect[0]["role"] != "system":
            expect = [system(system_prompt)] + expect
        assert dec(qs_tok, p.prompt_ids) == chat(qs_tok, expect)
        got_c, got_r = dec(qs_tok, p.chosen_ids), dec(qs_tok, p.rejected_ids)
        assert got_c == chosen + EOS and got_r == rejected + EOS
        if rejected not in chosen:
            assert rejected not in got_c
        if chosen not in rejected:
            assert chosen not in got_r


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "content", "prompt", "chosen", "rejected", "x"]), inner,
        max_size=3), max_leaves=8)


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot", "system"]),
                                 "content": st.one_of(st.text(max_size=12), st.integers())})


FIELD = st.one_of(JSONISH, st.text(max_size=20), st.lists(MESSAGE, max_size=3))


ANY_ROW = st.one_of(JSONISH, st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected",
                                                          "weight", "extra"]), FIELD,
                                         max_size=5))


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ANY_ROW, min_size=1, max_size=6))
def test_malformed_rows_are_skipped_or_valid(qs_tok, rows):
    r = DataConfig()
    rep = DataReport()
    try:
        pairs = normalise_rows(rows, r, rep, seed=SEED)
        conv = any(not isinstance(p.prompt, str) for p in pairs)
        out = Tokenizer(qs_tok, r, conv)(pairs, rep) if pairs else []
    except DataError:
        return  # one clear error is allowed (e.g. a template needed and missing)
    assert len(out) + sum(rep.skipped.values()) + rep.dropped_too_long == len(rows)
    for p in out:
        assert p.prompt_ids and p.chosen_ids and p.rejected_ids
        assert p.chosen_ids[-1] == qs_tok.eos_token_id
        assert p.rejected_ids[-1] == qs_tok.eos_token_id
    if len(out) == len(pairs):  # never a silently wrong pair: each side is its own reply
        for p, src in zip(out, pairs):
            assert src.chosen != src.rejected
            assert qs_tok.decode(p.chosen_ids) == src.chosen + qs_tok.eos_token
            assert qs_tok.decode(p.rejected_ids) == src.rejected + qs_tok.eos_token
    strict = DataConfig(strict=True)
    if rep.skipped:
        with pytest.raises(DataError, match="row"):
            normalise_rows(rows, strict, DataReport(strict=True), seed=SEED)


# ---------------------------------------------------------------------------------------
# Bugs found while writing these tests (fixed)
# ---------------------------------------------------------------------------------------
def test_nan_score_never_gives_a_worse_chosen():
    nan = float("nan")
    rows = [{"prompt": "q1", "responses": ["s3", "snan", "s1", "s5"], "scores": [3, nan, 1, 5]},
            {"prompt": "q2", "responses": ["s1", "snan", "s5"], "scores": [1, nan, 5]},
            dict(UF_RAW, completions=[dict(UF_RAW["completions"][0], overall_score=nan)]
                 + UF_RAW["completions"][1:])]
    pairs, report = normalise(rows)
    for p in pairs:  # kept (NaN ignored) or skipped, but never a worse response as chosen
        assert p.chosen in ("s5", UF_D)
    assert "all responses have the same score" not in report.skipped


def test_non_finite_row_weight_is_a_counted_skip():
    rows = [dict(ORCA, weight=w) for w in ("nan", float("nan"), float("inf"), "-Infinity")]
    pairs, report = normalise(rows)
    assert all(math.isfinite(p.weight) for p in pairs)
    assert len(pairs) + sum(report.skipped.values()) == 4


def test_huge_integer_weight_or_score_is_a_counted_skip():
    rows = [dict(ORCA, weight=10 ** 400),
            {"prompt": "q", "responses": ["a", "b"], "scores": [10 ** 400, 1]},
            ORCA]
    try:
        pairs, report = normalise(rows)
    except DataError:
        return
    assert len(pairs) + sum(report.skipped.values()) == 3
    assert all(math.isfinite(p.weight) for p in pairs)


def test_lone_surrogate_in_text_is_not_a_crash(tmp_path, qs_tok):
    rows = [ORCA,
            dict(ORCA, question="Describe this emoji: \ud83d"),
            {"prompt": [user("Hi")], "chosen": [asst("Hello \ud83d")], "rejected": [asst("No.")]}]
    path = tmp_path / "scraped.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert "\\ud83d" in path.read_text()  # valid JSON, read back as a lone surrogate
    try:
        out, report = tokenize_sources([DataSource(str(path))], DataConfig(), qs_tok,
                                       seed=SEED, resolve=str, what="training")
    except DataError:
        return
    assert len(out) + sum(report.skipped.values()) == 3
    for p in out:
        assert p.chosen_ids[-1] == qs_tok.eos_token_id


def test_chosen_and_rejected_with_different_conversations_are_skipped():
    rows = [
        {"prompt": [user("Hi")],
         "chosen": [user("Hi"), asst("Hello."), user("More?"), asst("Sure!")],
         "rejected": [user("Hi"), asst("No.")]},
        {"prompt": "Hi",
         "chosen": [user("Hi"), asst("Hello."), user("More?"), asst("Sure!")],
         "rejected": [user("Hi"), asst("No.")]},
    ]
    pairs, report = normalise(rows)
    assert pairs == [] and sum(report.skipped.values()) == 2


# ---------------------------------------------------------------------------------------
# Issue 11: a named column must exist; the system column; where each part came from
# ---------------------------------------------------------------------------------------
def test_named_prompt_column_that_is_not_there_stops(tmp_path, qs_tok):
    rows = [{"question": f"Q {i}?", "chosen": f"The answer {i}.", "rejected": f"The answer no {i}."}
            for i in range(3)]
    with pytest.raises(DataError) as ei:
        normalise(rows, columns={"prompt": "questoin"})
    assert str(ei.value) == (
        "Column 'questoin' (data.columns.prompt) is not in rows (data.columns applies to every "
        "source; a source's own `columns:` maps only that one). Its columns: question, chosen, "
        "rejected. Did you mean 'question'?")
    # a source's own mapping, through the whole data step
    path = write_jsonl(tmp_path / "orca.jsonl", rows)
    src = DataSource(str(path), columns={"prompt": "questoin"})
    with pytest.raises(DataError) as ei:
        tokenize_sources([src], DataConfig(), qs_tok, seed=SEED, resolve=str, what="training")
    assert str(ei.value).startswith("Column 'questoin' (the source's columns.prompt) is not "
                                    "in orca.jsonl. Its columns: question, chosen, rejected.")
    # every named field, with no close match
    with pytest.raises(DataError, match=r"^Column 'score' \(data.columns.weight\).*rejected\.$"):
        normalise(rows, columns={"weight": "score"})


def test_named_prompt_column_is_never_guessed():
    rows = [{"q": "Why?", "chosen": "Because it is so.", "rejected": "Because no."},
            {"chosen": "Because it is so.", "rejected": "Because no."},
            {"q": None, "chosen": "Because it is so.", "rejected": "Because no."}]
    pairs, rep = normalise(rows, columns={"prompt": "q"})
    assert [p.prompt for p in pairs] == ["Why?"]
    assert rep.skipped == Counter({
        "missing column 'q' (columns: chosen, rejected; map yours with data.columns)": 1,
        "prompt column 'q' is null": 1})
    # unnamed, the shared start is still the prompt, and the report says so
    (p,), rep = normalise(rows[1:2])
    assert p.prompt == "Because " and rep.origins_summary()[0] == \
        "prompts: shared start of chosen and rejected (no prompt column)"


def test_system_column_used_without_mapping_and_origins_reported(qs_tok):
    row = {"system": "You are an AI assistant.", "question": "Translate 'hello' to French.",
           "chosen": "Bonjour.", "rejected": "Hola.", "score": 2}
    (pt,), rep, _, (p,) = tokenize(qs_tok, [row], columns={"weight": "score"})
    assert p.system == "You are an AI assistant." and p.weight == 2.0
    assert dec(qs_tok, pt.prompt_ids) == chat(qs_tok, [system("You are an AI assistant."),
                                                       user("Translate 'hello' to French.")])
    assert rep.origins_summary() == [
        "prompts: column 'question'", "chosen: column 'chosen'", "rejected: column 'rejected'",
        "system: column 'system'", "weights: column 'score'"]
    assert "prompts: column 'question'; chosen: column 'chosen'" in rep.summary()
    # a mapped system column wins; rows without one are counted apart
    _, rep = normalise([row, dict(row, system=""), dict(row, sys="Be brief.")],
                       columns={"system": "sys", "prompt": "question"})
    assert rep.origins_summary()[3] == "system: column 'sys' (1 row)"


def test_origins_of_every_row_shape():
    conv = {"chosen": [user("Hi"), asst("Hello!")], "rejected": [user("Hi"), asst("Go.")]}
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}
    ranked = {"instruction": "Pick", "completions": [
        {"response": "A", "overall_score": 2.0}, {"response": "B", "overall_score": 1.0}]}
    uf = {"prompt": "Hi", "chosen": conv["chosen"], "rejected": conv["rejected"]}
    pairs, rep = normalise([conv, hh, ranked, uf])
    assert len(pairs) == 4
    assert dict(rep.origins) == {
        ("prompt", "conversation before the reply in chosen and rejected (no prompt column)"): 1,
        ("prompt", "Human/Assistant turns of chosen and rejected (no prompt column)"): 1,
        ("prompt", "column 'instruction'"): 1,
        ("prompt", "conversation before the reply in chosen and rejected (beside column "
                   "'prompt')"): 1,
        ("chosen", "column 'chosen'"): 3, ("rejected", "column 'rejected'"): 3,
        ("chosen", "column 'completions' (ranked by score)"): 1,
        ("rejected", "column 'completions' (ranked by score)"): 1}


def test_a_null_prompt_is_skipped_and_a_capitalised_prompt_column_is_used():
    rows = [{"prompt": None, "chosen": "Hello there friend", "rejected": "Hello there enemy"},
            {"Prompt": "Hi?", "chosen": "Yes ok", "rejected": "No"}]
    report = DataReport(strict=False)
    out = normalise_rows(rows, DataConfig(), report, seed=0, source="x", columns={})
    assert [(p.prompt, p.chosen) for p in out] == [("Hi?", "Yes ok")]  # never a guessed prompt
    assert report.skipped["prompt column 'prompt' is null"] == 1
    assert "prompts: column 'Prompt'" in report.summary()
    with pytest.raises(DataError, match="is null"):
        normalise_rows(rows[:1], DataConfig(strict=True), DataReport(strict=True), seed=0,
                       source="x", columns={})


def test_a_problem_on_many_rows_is_listed_once_with_its_count():
    rows = [{"prompt": "Hi?", "chosen": "", "rejected": "No."} for _ in range(7)]
    rows.append({"prompt": "Ok?", "chosen": "Same.", "rejected": "Same."})
    report = DataReport(strict=False)
    normalise_rows(rows, DataConfig(), report, seed=0, source="d.jsonl", columns={})
    assert report.example_lines() == [
        "d.jsonl row 1: empty chosen or rejected (and 6 more rows like it)",
        "d.jsonl row 8: chosen identical to rejected"]


# ---------------------------------------------------------------------------------------
# Issue 14: a prompt column that is there is the prompt, in every format; null is a skip
# ---------------------------------------------------------------------------------------
CONV = {"chosen": [user("Hi"), asst("Hello!")], "rejected": [user("Hi"), asst("Go away.")]}


@pytest.mark.parametrize("strict", [False, True])
def test_a_null_prompt_beside_message_lists_is_skipped_never_guessed(strict):
    rows = [dict(CONV, prompt=None), dict(CONV, prompt=[user("Hi")])]
    if strict:
        with pytest.raises(DataError, match=r"^Bad row \(rows row 1\): prompt column 'prompt' "
                                            r"is null"):
            normalise(rows, strict=True)
        return
    pairs, rep = normalise(rows)
    assert [p.row for p in pairs] == [2]
    assert rep.skipped == Counter({"prompt column 'prompt' is null": 1})


@pytest.mark.parametrize("name", ["Prompt", "PROMPT"])
def test_a_prompt_column_in_another_case_is_the_prompt_of_message_lists(name):
    # the column's prompt, not the one the conversation would guess
    own = {name: [user("Bonjour")], "chosen": [asst("Salut !")], "rejected": [asst("Non.")]}
    (p,), rep = normalise([own])
    assert p.prompt == [user("Bonjour")] and rep.origins_summary()[0] == \
        f"prompts: column '{name}'"
    # null there: skipped like a null `prompt`, in every format
    pairs, rep = normalise([dict(CONV, **{name: None}), dict(own, **{name: None}),
                            {name: None, "chosen": "Hello there", "rejected": "Hello you"}])
    assert pairs == [] and rep.skipped == Counter({f"prompt column '{name}' is null": 3})


def test_two_prompt_columns_in_different_cases_are_reported():
    pairs, rep = normalise([dict(CONV, Prompt=[user("Hi")], PROMPT=[user("Hey")])])
    assert pairs == [] and rep.skipped == Counter({
        "several prompt columns ('Prompt', 'PROMPT'; map one with data.columns.prompt)": 1})
    # mapped, the user has said which
    (p,), _ = normalise([dict(CONV, Prompt=[user("Hi")], PROMPT=[user("Hey")])],
                        columns={"prompt": "PROMPT"})
    assert p.prompt == [user("Hey")]


def test_the_conversation_is_guessed_only_without_any_prompt_column():
    (p,), rep = normalise([CONV])
    assert p.prompt == [user("Hi")] and rep.origins_summary()[0] == \
        "prompts: conversation before the reply in chosen and rejected (no prompt column)"
    question = {"question": "Bonjour ?", "chosen": [asst("Salut !")], "rejected": [asst("Non.")]}
    (p,), rep = normalise([question])
    assert p.prompt == "Bonjour ?" and rep.origins_summary()[0] == "prompts: column 'question'"


def test_the_summary_counts_in_words_one_pair_one_row():
    from qdpo.data.report import DataReport

    one = DataReport(rows=1)
    one.pairs = 1
    assert one.summary().startswith("1 pair from 1 row")
    many = DataReport(rows=2000)
    many.pairs = 1500
    assert many.summary().startswith("1,500 pairs from 2,000 rows")
