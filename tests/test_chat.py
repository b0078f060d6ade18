"""The chat loop shows replies and commands as written: nothing is read as rich markup."""

from __future__ import annotations

from qdpo.chat import Sampling, chat_loop


class EchoGenerator:
    system_prompt = None

    def generate(self, convs, sampling, base=False, streamer=None):
        return ["[bold]base[/bold] [x]" if base else "[red]tuned[/red] [1, 2]" for _ in convs]


def test_compare_and_unknown_commands_print_text_verbatim(capsys):
    lines = iter(["/[bold]oops", "hello", "/exit"])
    chat_loop(EchoGenerator(), Sampling(), compare=True, read=lambda prompt: next(lines))
    out = capsys.readouterr().out
    assert "unknown command /[bold]oops" in out
    assert "[bold]base[/bold] [x]" in out and "[red]tuned[/red] [1, 2]" in out
