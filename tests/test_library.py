"""qdpo from Python: train, evaluate, merge and export as functions, logging instead of
printing."""

from __future__ import annotations

import json
import logging

import pytest

import qdpo  # noqa: F401  (qdpo.train etc. below)
from qdpo.console import ConsoleHandler
from tiny import QUICKSTART_RECIPE, REPO


@pytest.fixture
def as_library():
    """No CLI handler on the 'qdpo' logger (an in-process CLI test may have left one)."""
    log = logging.getLogger("qdpo")
    saved = list(log.handlers), log.level, log.propagate
    for h in saved[0]:
        if isinstance(h, ConsoleHandler):
            log.removeHandler(h)
    log.propagate = True
    yield
    log.handlers[:] = saved[0]
    log.setLevel(saved[1])
    log.propagate = saved[2]


def test_train_evaluate_export_from_python_log_and_do_not_print(tmp_path, as_library, capsys,
                                                               caplog):
    import qdpo.evaluate  # noqa: F401  the modules themselves are imported first: still callable
    import qdpo.export  # noqa: F401
    import qdpo.train  # noqa: F401

    recipe = qdpo.load_recipe(QUICKSTART_RECIPE, ["train.max_steps=3", "eval.every_steps=0",
                                                  f"output.dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.INFO, logger="qdpo"):
        result = qdpo.train(recipe)
        metrics = qdpo.evaluate(tmp_path / "run", [REPO / "recipes/quickstart/eval.jsonl"],
                                max_pairs=8)
        out = qdpo.export(tmp_path / "run", "peft", tmp_path / "adapter")
    assert result.steps == 3
    assert metrics["pairs"] == 8 and 0 <= metrics["rewards/accuracies"] <= 1
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    assert capsys.readouterr().out == ""  # the library printed nothing...
    assert "model: " in caplog.text and "qdpo run summary" in caplog.text  # ...it logged
    assert callable(qdpo.merge)


def test_cli_handler_prints_messages_and_keeps_brackets(capsys):
    from qdpo import console as ui

    ui.install_cli_handler()
    ui.info("pip install 'qdpo[compare]'")
    ui.warn("rows [R, T]")
    captured = capsys.readouterr()
    assert "qdpo[compare]" in captured.out and "warning: rows [R, T]" in captured.err
    ui.install_cli_handler(ui.err_console)  # what `qdpo eval --json` does: stdout stays JSON
    ui.info("note")
    captured = capsys.readouterr()
    assert captured.out == "" and "note" in captured.err
    handlers = [h for h in logging.getLogger("qdpo").handlers if isinstance(h, ConsoleHandler)]
    assert len(handlers) == 1
