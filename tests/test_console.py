"""What a run's summary says: the verdict on held-out accuracy, average speed, plurals."""

from __future__ import annotations

import pytest

from qdpo.console import accuracy_verdict, average_tokens_per_s, chance_p_value, plural


def test_chance_p_value_is_the_binomial_tail():
    assert chance_p_value(10, 10) == pytest.approx(2 ** -10)
    assert chance_p_value(9, 10) == pytest.approx(11 / 1024)
    assert chance_p_value(0, 10) == pytest.approx(1.0)


def test_verdict_needs_enough_pairs_to_mean_something():
    assert accuracy_verdict(1.0, 64) == "clearly above chance"
    assert accuracy_verdict(1.0, 4).startswith("not distinguishable from chance with 4 pairs")
    assert accuracy_verdict(0.9, 10).startswith("above chance (p = 0.011")
    assert accuracy_verdict(0.7, 10).startswith("not distinguishable")
    assert accuracy_verdict(0.45, 400) == "near chance: the preference was not learned"


def test_average_speed_and_plurals():
    history = [{"tokens": 100, "step_time_s": 1.0}, {"tokens": 300, "step_time_s": 1.0}]
    assert average_tokens_per_s(history) == 200 and average_tokens_per_s([]) is None
    assert plural(1, "pair") == "1 pair" and plural(2, "pair") == "2 pairs"
    assert plural(1234, "step") == "1,234 steps"


def test_a_terminal_wraps_long_lines_at_word_boundaries_and_logs_do_not():
    import io

    from qdpo.console import make_console

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    line = "the reference log-probs were reused from the cache for every pair " * 2
    term, log = Terminal(), io.StringIO()
    tty = make_console(term, stderr=False)
    tty.file, tty.width = term, 40
    tty.print(line)
    rows = term.getvalue().splitlines()
    assert len(rows) > 1 and all(len(r) <= 40 for r in rows)
    assert " ".join(r.strip() for r in rows) == line.strip()  # no word cut in two
    piped = make_console(log, stderr=False)
    piped.file = log
    piped.print(line)
    assert log.getvalue().count("\n") == 1
