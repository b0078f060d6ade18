"""The human judge: a terminal screen with the prompt and two answers side by side, and keys
that pick the better one.

Keys become choices in `Choices`, a plain class fed any sequence of key names, so tests drive
it without a terminal; `terminal_keys` is the only part that reads the keyboard (cbreak mode:
single keys without Enter, Ctrl-C still interrupts).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterable, Iterator

LEFT, RIGHT, TIE, QUIT = "left", "right", "tie", "quit"

# What each key means. Arrow keys arrive as escape sequences: ESC [ D in the normal cursor
# mode, ESC O D in the "application" mode some terminals (and tmux) switch to.
KEYMAP = {
    "1": LEFT, "a": LEFT, "h": LEFT, "\x1b[D": LEFT, "\x1bOD": LEFT,
    "2": RIGHT, "d": RIGHT, "l": RIGHT, "\x1b[C": RIGHT, "\x1bOC": RIGHT,
    " ": TIE, "s": TIE, "t": TIE, "0": TIE,
    "q": QUIT, "\x1b": QUIT, "\x04": QUIT,  # Esc, Ctrl-D
}
LEGEND = ("1 / ← / a  left is better    2 / → / d  right is better    "
          "space / s  tie or skip    q / Esc  quit (progress is kept)")
# below this many columns the two answers are shown one above the other
SIDE_BY_SIDE_MIN_WIDTH = 100


def split_keys(data: str) -> list[str]:
    """What one read from the terminal holds, as keys: an escape sequence is one key (ESC [
    or ESC O, parameters, a final letter: an arrow is ESC [ D, Ctrl-Left ESC [ 1 ; 5 D, which
    must not end up as the letter D), anything else one character each."""
    keys, i = [], 0
    while i < len(data):
        end = i + 1
        if data[i] == "\x1b" and i + 1 < len(data) and data[i + 1] in "[O":
            end = i + 2
            while end < len(data) and "\x20" <= data[end] <= "\x3f":  # parameters
                end += 1
            end = min(end + 1, len(data))  # the final character
        keys.append(data[i:end])
        i = end
    return keys


class Choices:
    """Keys -> choices: unknown keys are ignored (a stray key never decides anything), and
    when the keys run out (the terminal closed) the judging stops as if quit. `discard` drops
    keys typed ahead (while answers were generated), so that only a key pressed once a
    comparison is on the screen decides it."""

    def __init__(self, keys: Iterable[str], discard: Callable[[], None] | None = None):
        self.keys = iter(keys)
        self.discard = discard or (lambda: None)

    def next(self) -> str:
        for key in self.keys:
            choice = KEYMAP.get(key.lower() if len(key) == 1 else key)
            if choice is not None:
                return choice
        return QUIT


@contextlib.contextmanager
def terminal_keys(stream: Any = None) -> Iterator[Choices]:
    """Choices from the keys pressed in a terminal, put in cbreak mode for the duration (no
    echo, no Enter needed); the terminal's settings come back however the block ends."""
    import termios
    import tty

    stream = stream or sys.stdin
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)

    def keys() -> Iterator[str]:
        while True:
            data = os.read(fd, 32)
            if not data:  # the terminal went away
                return
            yield from split_keys(data.decode("utf-8", errors="replace"))

    tty.setcbreak(fd)
    try:
        yield Choices(keys(), discard=lambda: termios.tcflush(fd, termios.TCIFLUSH))
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def conversation_text(conv: list[dict[str, str]]) -> str:
    """A prompt for the screen: a single user message as its text, a longer conversation as
    `role: text` paragraphs."""
    if len(conv) == 1 and conv[0]["role"] == "user":
        return conv[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in conv)


class JudgeScreen:
    """Shows one comparison at a time and waits for a choice."""

    def __init__(self, console: Any, choices: Choices):
        self.console = console
        self.choices = choices

    def ask(self, conv: list[dict[str, str]], left: str, right: str, title: str) -> str:
        self.choices.discard()
        self.show(conv, left, right, title)
        return self.choices.next()

    def waiting(self, text: str) -> None:
        """While answers are sampled: the last comparison must not look like it is still
        waiting for a key."""
        from rich.text import Text

        self.console.clear()
        self.console.print(Text(text, style="dim"))

    def show(self, conv: list[dict[str, str]], left: str, right: str, title: str) -> None:
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        c = self.console
        c.clear()
        c.rule(title)
        # Text: prompts and answers are shown as written, never read as rich markup
        c.print(Panel(Text(conversation_text(conv)), title="prompt", border_style="cyan"))
        panels = [Panel(Text(left), title="1  left", expand=True),
                  Panel(Text(right), title="2  right", expand=True)]
        if c.width >= SIDE_BY_SIDE_MIN_WIDTH:
            grid = Table.grid(expand=True, padding=(0, 1))
            grid.add_column(ratio=1)
            grid.add_column(ratio=1)
            grid.add_row(*panels)
            c.print(grid)
        else:
            for p in panels:
                c.print(p)
        c.print(Text(LEGEND, style="dim"))
