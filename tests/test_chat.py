"""The chat loop: replies and commands shown as written, Ctrl-C, per-side histories and both
sides streaming in compare mode, trimming to the model's context, the banner, and line editing
in a real terminal."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console

from qdpo import console as ui
from qdpo.chat import (LIVE_REDRAWS_PER_SECOND, SIDE_BY_SIDE_MIN_WIDTH, Sampling, _LiveView,
                       chat_loop, enable_line_editing, fit_history)

from tiny import REPO


class EchoGenerator:
    system_prompt = None
    tok = None  # never streams

    def generate(self, convs, sampling, base=False, streamer=None):
        return ["[bold]base[/bold] [x]" if base else "[red]tuned[/red] [1, 2]" for _ in convs]


def _script(*lines):
    it = iter(lines)
    return lambda prompt: next(it)


def test_compare_and_unknown_commands_print_text_verbatim(capsys):
    chat_loop(EchoGenerator(), Sampling(), compare=True,
              read=_script("/[bold]oops", "hello", "/exit"))
    out = capsys.readouterr().out
    assert "unknown command /[bold]oops" in out
    assert "[bold]base[/bold] [x]" in out and "[red]tuned[/red] [1, 2]" in out


class WordTok:
    """Token i decodes to the word `w<i>`."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" w{i}" for i in ids)


class StubGenerator:
    """Records what each side was asked; streams `reply` word by word, and stops (as Ctrl-C
    would) in the middle of the reply to any message in `interrupt`."""

    system_prompt = None
    has_adapter = True
    tok = WordTok()

    def __init__(self, interrupt=(), context_length=None, words=lambda conv: 0):
        self.interrupt = set(interrupt)
        self.context_length = context_length
        self.words = words
        self.asked = []  # (base, conversation)

    def prompt_tokens(self, conv):
        return self.words(conv)

    def describe(self):
        return ["base BASE-PATH + adapter ADAPTER-PATH", "device cpu, float32, 4-bit nf4"]

    def generate(self, convs, sampling, base=False, streamer=None):
        conv = convs[0]
        self.asked.append((base, [dict(m) for m in conv]))
        n = len(self.asked)
        if streamer is not None:
            streamer.put(torch.tensor([[0, 0]]))  # the prompt
            for i in range(3):
                streamer.put(torch.tensor([i]))
            if conv[-1]["content"] in self.interrupt:
                raise KeyboardInterrupt
            streamer.end()
        elif conv[-1]["content"] in self.interrupt:
            raise KeyboardInterrupt
        return [f"{'base' if base else 'tuned'} reply {n}"]


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def test_ctrl_c_during_a_reply_stops_it_and_keeps_the_conversation(capsys):
    gen = StubGenerator(interrupt={"second"})
    chat_loop(gen, Sampling(), read=_script("first", "second", "third", "/exit"))
    out = capsys.readouterr().out
    assert "tuned>  w0 w1 w2\n" in out  # the partial reply was shown, then a new line
    assert "reply stopped" in out
    # the stopped turn (message and partial reply) is not part of the conversation
    assert gen.asked[-1] == (False, [_u("first"), _a("tuned reply 1"), _u("third")])


def test_ctrl_c_during_a_compare_reply_drops_the_turn_on_both_sides(capsys):
    gen = StubGenerator(interrupt={"second"})
    chat_loop(gen, Sampling(), compare=True, read=_script("first", "second", "third", "/exit"))
    assert "reply stopped" in capsys.readouterr().out
    base = [c for b, c in gen.asked if b]
    assert base[-1] == [_u("first"), _a("base reply 1"), _u("third")]


def test_ctrl_c_or_eof_at_the_prompt_quits(capsys):
    for stop in (KeyboardInterrupt, EOFError):
        def read(prompt, stop=stop):
            raise stop
        chat_loop(StubGenerator(), Sampling(), read=read)  # returns, raises nothing


def test_compare_keeps_a_history_per_side(capsys):
    gen = StubGenerator()
    chat_loop(gen, Sampling(), compare=True, read=_script("one", "two", "/exit"))
    asked = dict(((b, len(c)), c) for b, c in gen.asked)
    assert asked[(True, 3)] == [_u("one"), _a("base reply 1"), _u("two")]
    assert asked[(False, 3)] == [_u("one"), _a("tuned reply 2"), _u("two")]


@pytest.mark.parametrize("width,side_by_side", [(140, True), (60, False)])
def test_compare_is_side_by_side_only_when_wide_enough(capsys, monkeypatch, width,
                                                       side_by_side):
    monkeypatch.setattr(ui.console, "width", width)
    chat_loop(StubGenerator(), Sampling(), compare=True, read=_script("one", "/exit"))
    lines = capsys.readouterr().out.splitlines()
    both = [x for x in lines if "base reply" in x and "tuned reply" in x]
    assert bool(both) == side_by_side
    assert max(len(x) for x in lines if "base reply" in x or "tuned reply" in x) <= width
    if not side_by_side:  # base first, then tuned
        at = [i for i, x in enumerate(lines) if "base reply" in x or "tuned reply" in x]
        assert "base reply" in lines[at[0]] and "tuned reply" in lines[at[1]]


def _screen_lines(screen):
    """What a terminal was sent so far, as lines, without the escape codes that move the
    cursor."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", screen.getvalue()).splitlines()


class SlowGenerator:
    """Streams three tokens a side (base w0-w2, tuned w10-w12), each a redraw's interval after
    the last, and notes what the terminal was sent by the time each token was given."""

    system_prompt = None
    has_adapter = True
    context_length = None
    tok = WordTok()

    def __init__(self, screen):
        self.screen = screen
        self.seen = {}  # (base, token) -> the terminal's lines then

    def generate(self, convs, sampling, base=False, streamer=None):
        ids = range(0, 3) if base else range(10, 13)
        if streamer is not None:
            streamer.put(torch.tensor([[0]]))  # the prompt
        for i in ids:
            time.sleep(1.2 / LIVE_REDRAWS_PER_SECOND)
            if streamer is not None:
                streamer.put(torch.tensor([i]))
            self.seen[(base, i)] = _screen_lines(self.screen)
        if streamer is not None:
            streamer.end()
        return [self.tok.decode(ids).strip()]


@pytest.mark.parametrize("width", [140, 60])
def test_compare_streams_both_sides_as_they_are_generated(monkeypatch, width):
    screen = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=screen, force_terminal=True, width=width,
                                               height=24))
    gen = SlowGenerator(screen)
    chat_loop(gen, Sampling(), compare=True, read=_script("hi", "/exit"))
    # each side's reply is on the screen while it is being generated, not only at the end
    assert any("w0 w1" in x for x in gen.seen[(True, 1)])
    assert any("w10 w11" in x for x in gen.seen[(False, 11)])
    # side by side: the finished base reply next to the tuned one as it comes
    next_to = any("w0 w1 w2" in x and "w10 w11" in x for x in gen.seen[(False, 11)])
    assert next_to == (width >= SIDE_BY_SIDE_MIN_WIDTH)
    assert any("w10 w11 w12" in x for x in _screen_lines(screen))


def test_a_streaming_reply_taller_than_the_terminal_shows_its_end():
    screen = io.StringIO()
    console = Console(file=screen, width=60, height=10)
    view = _LiveView(("base",), {"base": WordTok().decode(range(200))})
    console.print(view.render())  # while streaming: the newest lines, within the terminal
    lines = screen.getvalue().splitlines()
    assert len(lines) <= 9 and "w199" in lines[-2] and " w0 " not in screen.getvalue()
    view.full = True  # finished (or stopped): all of it
    console.print(view.render())
    assert " w0 " in screen.getvalue() and len(screen.getvalue().splitlines()) > 20


def _count_words(conv):
    return sum(len(m["content"].split()) for m in conv)


def test_fit_history_drops_oldest_turns_and_keeps_the_system_prompt():
    conv = [{"role": "system", "content": "be kind"}, _u("a b c"), _a("d e f"),
            _u("g h"), _a("i j"), _u("k l m")]
    kept, dropped = fit_history(conv, _count_words, 9)
    assert dropped == 1 and kept == [conv[0]] + conv[3:]
    kept, dropped = fit_history(conv, _count_words, 5)
    assert dropped == 2 and kept == [conv[0], conv[-1]]
    kept, dropped = fit_history(conv, _count_words, 1)  # the last message alone is too long
    assert kept == [conv[0], conv[-1]]
    assert fit_history(conv, _count_words, 100) == (conv, 0)


def test_chat_history_is_trimmed_to_the_context_and_the_user_is_told(capsys):
    # context 20 tokens, replies up to 10: a prompt may take 10 (one token per word)
    gen = StubGenerator(context_length=20, words=_count_words)
    chat_loop(gen, Sampling(max_new_tokens=10),
              read=_script("one two three", "four five", "six seven", "/exit"))
    out = capsys.readouterr().out
    assert "dropped the 1 oldest turn of the conversation to fit the model's context of 20" \
        in out
    for _, conv in gen.asked:
        assert _count_words(conv) <= 10
    assert gen.asked[-1][1][-1] == _u("six seven") and gen.asked[-1][1][0] != _u("one two three")
    # a message too long by itself is refused, and the conversation goes on
    capsys.readouterr()
    n = len(gen.asked)
    chat_loop(gen, Sampling(max_new_tokens=10),
              read=_script(" ".join(["w"] * 11), "ok", "/exit"))
    out = capsys.readouterr().out
    assert "this message is too long" in out and len(gen.asked) == n + 1


def test_banner_says_what_was_loaded_and_the_commands(capsys):
    chat_loop(StubGenerator(), Sampling(), read=_script("/exit"))
    out = capsys.readouterr().out
    assert "adapter ADAPTER-PATH" in out and "device cpu" in out
    assert "/reset" in out and "/system" in out and "/exit" in out and "Ctrl-C" in out


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_line_editing_only_in_a_terminal():
    assert enable_line_editing(io.StringIO()) is False
    pytest.importorskip("readline")
    assert enable_line_editing(_Terminal()) is True


# --------------------------------------------------------------------------------------
# In a real terminal (tmux): Ctrl-C mid-reply, Up for the last message, Ctrl-C to quit
# --------------------------------------------------------------------------------------

SLOW_CHAT = """
import json, sys, time
import torch
from qdpo.chat import Sampling, chat_loop

class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" w{i}" for i in ids)

class Slow:
    system_prompt = None
    has_adapter = True
    context_length = None
    tok = Tok()
    def describe(self):
        return ["stub model"]
    def generate(self, convs, sampling, base=False, streamer=None):
        with open(sys.argv[1], "a") as f:
            f.write(json.dumps(convs[0]) + "\\n")
        said = convs[0][-1]["content"]
        slow = said == "slow" or said == "slow tuned" and not base
        streamer.put(torch.tensor([[0]]))
        for i in range(2000 if slow else 3):
            streamer.put(torch.tensor([i]))
            time.sleep(0.02 if slow else 0)
        streamer.end()
        return ["done"]

chat_loop(Slow(), Sampling(), compare="--compare" in sys.argv)
print("CHAT ENDED")
"""


class Tmux:
    def __init__(self, tmp_path):
        self.sock = f"qdpo-test-{id(self)}"
        self.tmp = tmp_path

    def __call__(self, *args):
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True,
                              check=False).stdout

    def pane(self):
        return self("capture-pane", "-p", "-t", "chat")

    def wait_for(self, test, what, timeout=60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if test(self.pane()):
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; the terminal shows:\n{self.pane()}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_in_a_real_terminal(tmp_path):
    script, asked = tmp_path / "slow_chat.py", tmp_path / "asked.jsonl"
    script.write_text(SLOW_CHAT)
    t = Tmux(tmp_path)
    cmd = f"cd {REPO} && {sys.executable} {script} {asked}; sleep 30"
    t("new-session", "-d", "-s", "chat", "-x", "120", "-y", "40", cmd)
    try:
        t.wait_for(lambda p: p.rstrip().endswith("you>"), "the prompt")
        t("send-keys", "-t", "chat", "first", "Enter")
        t.wait_for(lambda p: p.count("you>") == 2, "the first reply")
        t("send-keys", "-t", "chat", "slow", "Enter")
        t.wait_for(lambda p: " w20 " in p, "the slow reply to stream")
        t("send-keys", "-t", "chat", "C-c")
        t.wait_for(lambda p: "reply stopped" in p and p.rstrip().endswith("you>"),
                   "the prompt after Ctrl-C")
        t("send-keys", "-t", "chat", "third", "Enter")
        t.wait_for(lambda p: p.count("you>") == 4, "the third reply")
        t("send-keys", "-t", "chat", "Up")  # readline: the last message comes back
        t.wait_for(lambda p: p.rstrip().endswith("you> third"), "Up to recall 'third'")
        t("send-keys", "-t", "chat", "C-u", "C-c")  # clear the line, then quit
        t.wait_for(lambda p: "CHAT ENDED" in p, "the chat to end")
    finally:
        t("kill-server")
    convs = [json.loads(x) for x in asked.read_text().splitlines()]
    assert [c[-1]["content"] for c in convs] == ["first", "slow", "third"]
    assert convs[-1] == [_u("first"), _a("done"), _u("third")]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_compare_streams_in_a_real_terminal_and_ctrl_c_stops_it(tmp_path):
    script, asked = tmp_path / "slow_chat.py", tmp_path / "asked.jsonl"
    script.write_text(SLOW_CHAT)
    t = Tmux(tmp_path)
    # readline, imported by an earlier test, exports this process's COLUMNS=80 to children;
    # the chat should size itself by the terminal it runs in
    cmd = f"cd {REPO} && env -u COLUMNS -u LINES {sys.executable} {script} {asked} --compare; " \
        "sleep 30"
    t("new-session", "-d", "-s", "chat", "-x", "120", "-y", "40", cmd)
    try:
        t.wait_for(lambda p: p.rstrip().endswith("you>"), "the prompt")
        t("send-keys", "-t", "chat", "first", "Enter")
        t.wait_for(lambda p: p.count("you>") == 2, "the first replies")
        t("send-keys", "-t", "chat", "slow tuned", "Enter")  # base is quick, tuned slow
        t.wait_for(lambda p: " w20 " in p and any("done" in x and " w0 " in x
                                                   for x in p.splitlines()),
                   "the tuned reply to stream next to the finished base one")
        t("send-keys", "-t", "chat", "C-c")
        t.wait_for(lambda p: "reply stopped" in p and p.rstrip().endswith("you>"),
                   "the prompt after Ctrl-C")
        t("send-keys", "-t", "chat", "third", "Enter")
        t.wait_for(lambda p: "you> third" in p and p.rstrip().endswith("you>"),
                   "the third replies")
        t("send-keys", "-t", "chat", "C-c")
        t.wait_for(lambda p: "CHAT ENDED" in p, "the chat to end")
    finally:
        t("kill-server")
    convs = [json.loads(x) for x in asked.read_text().splitlines()]
    assert [c[-1]["content"] for c in convs] == ["first"] * 2 + ["slow tuned"] * 2 + ["third"] * 2
    # the stopped turn is left out on both sides
    assert convs[-2] == convs[-1] == [_u("first"), _a("done"), _u("third")]
