"""`qdpo pairs`: answers sampled from the quickstart model, judged by keys (the human screen
without a terminal), by a tiny reward model, and in a real terminal (tmux); the output is a
data set the trainer's reader takes, and a stopped run goes on where it stopped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from qdpo.judge_screen import LEFT, QUIT, RIGHT, TIE, Choices, split_keys
from qdpo.make_pairs import journal_path, make_pairs, open_journal

from tiny import QUICKSTART, QUICKSTART_RECIPE, REPO, qdpo, write_jsonl

FAST = dict(max_new_tokens=8, temperature=1.0, seed=0)


def _sampling():
    from qdpo.chat import Sampling

    return Sampling(**FAST)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _reader_takes(path, pairs):
    """The trainer's own reader (read, normalise, tokenize) takes every row as a pair."""
    from transformers import AutoTokenizer

    from qdpo.data import tokenize_sources
    from qdpo.recipe import DataConfig, DataSource

    tok = AutoTokenizer.from_pretrained(str(QUICKSTART / "model"))
    got, report = tokenize_sources([DataSource(path=str(path))], DataConfig(), tok, seed=0,
                                   resolve=str, what="training")
    assert len(got) == report.pairs == pairs and not sum(report.skipped.values())


@pytest.fixture(scope="module")
def prompts_txt(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("What is a good breakfast?\n\nTell me about the sea.\nHow do birds fly?\n")
    return p


# --------------------------------------------------------------------------------------
# Keys -> choices, without a terminal
# --------------------------------------------------------------------------------------

def test_keys_become_choices():
    assert split_keys("1\x1b[D\x1bOCq\x1b[1;5Dx\x1b") == [
        "1", "\x1b[D", "\x1bOC", "q", "\x1b[1;5D", "x", "\x1b"]
    # unknown keys (Ctrl-Left, letters) decide nothing; the arrows, digits and letters do
    c = Choices(["x", "\x1b[1;5D", "1", "\x1b[C", "D", " ", "Q", "\x1b"])
    assert [c.next() for _ in range(6)] == [LEFT, RIGHT, RIGHT, TIE, QUIT, QUIT]
    assert c.next() == QUIT  # no keys left (the terminal closed): stop


def test_human_judging_stops_and_resumes(tmp_path, prompts_txt, capsys, caplog):
    out = tmp_path / "pairs.jsonl"
    run = dict(sampling=_sampling(), keys=None)
    first = make_pairs(prompts_txt, out, QUICKSTART_RECIPE, **{**run, "keys": ["1", "\x1b[C",
                                                                                "q"]})
    assert first.stopped and (first.judged, first.pairs) == (2, 2)
    rows = _rows(out)
    assert [r["choice"] for r in rows] == ["left", "right"] and rows[0]["judge"] == "human"
    assert [r["prompt"] for r in rows] == ["What is a good breakfast?", "Tell me about the sea."]
    assert all(isinstance(r["chosen"], str) and r["chosen"] != r["rejected"] for r in rows)
    screen = capsys.readouterr().out
    assert "prompt 1 of 3" in screen and "prompt 2 of 3" in screen and "left is better" in screen

    again = make_pairs(prompts_txt, out, QUICKSTART_RECIPE, **{**run, "keys": ["s"]})
    screen = capsys.readouterr().out
    assert "prompt 3 of 3" in screen and "prompt 1 of 3" not in screen  # judged ones skipped
    assert not again.stopped and (again.judged, again.pairs) == (3, 2)
    assert again.outcomes == {"left": 1, "right": 1, "tie": 1}
    assert _rows(out) == rows  # a tie gives no pair
    _reader_takes(out, 2)

    caplog.set_level("INFO", logger="qdpo")
    done = make_pairs(prompts_txt, out, QUICKSTART_RECIPE, **{**run, "keys": []})
    assert (done.judged, done.pairs) == (3, 2) and "judged already" in caplog.text


def test_journal_drops_a_cut_line_and_refuses_another_job(tmp_path):
    out = tmp_path / "pairs.jsonl"
    ident = {"model": "m", "judge": "human"}
    j = open_journal(out, ident, overwrite=False)
    j.record("k-1", "left", {"prompt": "p", "chosen": "a", "rejected": "b"})
    with journal_path(out).open("a") as f:
        f.write('{"key": "k-2", "outc')  # killed mid-write
    j = open_journal(out, ident, overwrite=False)
    assert j.done == {"k-1"} and journal_path(out).read_text().endswith("\n")
    j.record("k-2", "tie", None)
    assert open_journal(out, ident, overwrite=False).done == {"k-1", "k-2"}
    from qdpo.errors import DataError

    with pytest.raises(DataError, match="started with judge 'human'"):
        open_journal(out, {"model": "m", "judge": "/rm"}, overwrite=False)
    assert open_journal(out, {"model": "m", "judge": "/rm"}, overwrite=True).done == set()


# --------------------------------------------------------------------------------------
# A reward model as the judge, through the command
# --------------------------------------------------------------------------------------

def _tiny(tmp_path, name, head):
    """A tiny random Llama with the quickstart tokenizer: a reward model (one-output
    classification head) or a causal LM (no head to score with)."""
    import torch
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    tok = AutoTokenizer.from_pretrained(str(QUICKSTART / "model"))
    cfg = LlamaConfig.from_pretrained(str(QUICKSTART / "model"), num_labels=1)
    torch.manual_seed(0)
    model = (LlamaForSequenceClassification if head else LlamaForCausalLM)(cfg)
    path = tmp_path / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("rm"), "rm", head=True)


def test_reward_model_picks_best_against_worst(tmp_path, reward_model):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": 7, "prompt": [{"role": "system", "content": "Be kind."},
                             {"role": "user", "content": "Hello!"}]},
        {"id": 8, "prompt": "What do you think about rain?"}])
    out = tmp_path / "pairs.jsonl"
    args = ["pairs", prompts, "--out", out, "--model", QUICKSTART_RECIPE, "--judge",
            reward_model, "-n", "3", "--max-new-tokens", "8", "--seed", "0"]
    res = qdpo(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = _rows(out)
    assert [r["id"] for r in rows] == [7, 8]
    # a message prompt makes the data set conversational: every prompt a message list
    assert rows[0]["prompt"][0] == {"role": "system", "content": "Be kind."}
    assert rows[1]["prompt"] == [{"role": "user", "content": "What do you think about rain?"}]
    for r in rows:
        assert r["chosen"][0]["role"] == "assistant" and r["chosen"] != r["rejected"]
        assert r["chosen_score"] > r["rejected_score"] and r["judge"] == str(reward_model)
    _reader_takes(out, 2)
    res = qdpo(*args)  # nothing left to do; the output stays
    assert res.returncode == 0 and "judged already" in res.stdout and _rows(out) == rows
    # same seed, from the start again: the same pairs
    assert qdpo(*args, "--overwrite").returncode == 0 and _rows(out) == rows


def _fails(res, *words):
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert all(w in res.stderr for w in words), res.stderr


def test_bad_inputs_get_one_message(tmp_path, prompts_txt, reward_model):
    out = tmp_path / "o.jsonl"
    base = ["--out", out, "--model", QUICKSTART_RECIPE, "--judge", reward_model]
    _fails(qdpo("pairs", tmp_path / "none.txt", *base), "does not exist")
    (tmp_path / "empty.txt").write_text("\n \n")
    _fails(qdpo("pairs", tmp_path / "empty.txt", *base), "holds no prompts")
    _fails(qdpo("pairs", prompts_txt, "--out", out, "--model", tmp_path / "no-model",
                "--judge", reward_model), "Model", "does not exist")
    causal = _tiny(tmp_path, "lm", head=False)
    _fails(qdpo("pairs", prompts_txt, "--out", out, "--model", QUICKSTART_RECIPE,
                "--judge", causal), "not a reward model", "LlamaForCausalLM")
    _fails(qdpo("pairs", prompts_txt, "--out", out, "--model", QUICKSTART_RECIPE),
           "terminal")  # --judge human, stdin not a terminal
    out.write_text("mine\n")
    _fails(qdpo("pairs", prompts_txt, *base), "already exists", "--overwrite")
    assert out.read_text() == "mine\n"


# --------------------------------------------------------------------------------------
# The real command in a real terminal (tmux)
# --------------------------------------------------------------------------------------

def _pane(sock):
    return subprocess.run(["tmux", "-L", sock, "capture-pane", "-p", "-t", "pairs"],
                          capture_output=True, text=True, check=False).stdout


def _wait_for(sock, text, timeout=90.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in _pane(sock):
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {text!r}; the terminal shows:\n{_pane(sock)}")


@pytest.mark.skipif(shutil.which("tmux") is None,
                    reason="needs tmux to run the judge screen in a real terminal "
                           "(apt-get install -y tmux)")
def test_human_judge_in_a_real_terminal(tmp_path, prompts_txt):
    import os
    import shlex

    out = tmp_path / "pairs.jsonl"
    sock = f"qdpo-pairs-{os.getpid()}"
    cmd = shlex.join([sys.executable, "-m", "qdpo", "pairs", str(prompts_txt), "--out", str(out),
                      "--model", str(QUICKSTART_RECIPE), "--max-new-tokens", "8", "--seed", "0"])
    cache = shlex.quote(os.environ["QDPO_CACHE"])
    tmux = ["tmux", "-L", sock]
    subprocess.run([*tmux, "new-session", "-d", "-s", "pairs", "-x", "120", "-y", "40",
                    f"cd {REPO} && QDPO_CACHE={cache} {cmd}; echo EXIT=$?; sleep 30"],
                   check=True)
    try:
        _wait_for(sock, "prompt 1 of 3")
        subprocess.run([*tmux, "send-keys", "-t", "pairs", "1"], check=True)
        _wait_for(sock, "prompt 2 of 3")
        subprocess.run([*tmux, "send-keys", "-t", "pairs", "Right"], check=True)
        _wait_for(sock, "prompt 3 of 3")
        subprocess.run([*tmux, "send-keys", "-t", "pairs", "q"], check=True)
        _wait_for(sock, "EXIT=0")
        assert "run the same command again" in _pane(sock)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    assert [r["choice"] for r in _rows(out)] == ["left", "right"]
    assert len(journal_path(out).read_text().splitlines()) == 3  # header + two choices


class _StubGen:
    """Answers from a table; the prompt 'long' takes more tokens than the context has."""

    context_length = 64

    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    def prompt_tokens(self, conv):
        return 100 if conv[-1]["content"] == "long" else 5

    def generate(self, convs, sampling):
        self.asked += [c[-1]["content"] for c in convs]
        return [self.answers[c[-1]["content"]].pop(0) for c in convs]


def test_prompts_without_a_pair_are_journaled_not_judged(tmp_path):
    from qdpo.make_pairs import Journal, Prompt, Verdict, judge_prompts

    def judge(p, answers, title):
        seen.append(answers)
        return Verdict("scored", answers[0], answers[1], {"chosen_score": 1.0})

    judge.name = "stub"
    seen = []
    prompts = [Prompt([{"role": "user", "content": t}], t, {}, key=t)
               for t in ("same", "long", "fine")]
    gen = _StubGen({"same": ["a", "a", " "], "fine": ["x", "", "y"]})
    journal = Journal(tmp_path / "j.progress", {"model": "m", "judge": "stub"})
    assert judge_prompts(gen, judge, prompts, journal, n=3, sampling=_sampling())
    assert gen.asked == ["same"] * 3 + ["fine"] * 3  # a prompt too long is not sampled
    assert seen == [["x", "y"]]  # empty answers and repeats are no candidates
    assert {e["key"]: e["outcome"] for e in journal.entries} == {
        "same": "same answers", "long": "too long", "fine": "scored"}
