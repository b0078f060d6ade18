"""Bad input at scale: a fixed seeded sample of tests/fuzz_corpus.py's malformed recipes, data
files and command lines. None may end in a traceback or "this is a bug in qdpo", or run past its
time limit; `python tests/fuzz_corpus.py` runs the whole corpus."""

from __future__ import annotations

import pytest

from fuzz_corpus import PROBLEMS, Runner, build_corpus, sample

SEED = 0
SAMPLE_SIZE = 40
TIMEOUT_S = 15.0

# Cases of the sample that end as bugs today (the first error line says what escapes); each
# passes once qdpo turns that input into a clean message, and then strict xfail says so.
KNOWN_BUGS: dict[str, str] = {}

CASES = sample(build_corpus(SEED), SAMPLE_SIZE, SEED)


def _param(case):
    marks = []
    if case.name in KNOWN_BUGS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case.name]))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    with Runner(tmp_path_factory.mktemp("fuzz"), timeout=TIMEOUT_S) as r:
        yield r


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_fuzz_case_is_no_bug_and_no_hang(runner, case):
    o = runner.run(case)
    assert o.category not in PROBLEMS, (
        f"{case.name} ended as {o.category} (exit {o.returncode}): {o.first_error}\n"
        f"argv: {case.argv}\n--- stdout ---\n{o.stdout[-3000:]}\n--- stderr ---\n"
        f"{o.stderr[-3000:]}")
    if case.expect:
        assert o.category == case.expect, (case.name, o.category, o.first_error)


def test_corpus_is_big_deterministic_and_covers_every_command():
    a, b = build_corpus(SEED), build_corpus(SEED)
    assert len(a) >= 300
    assert [c.name for c in a] == [c.name for c in b]
    assert [c.argv for c in a] == [c.argv for c in b]
    same = [n for n in ("base.yaml", "good.jsonl") if a[0].files[n] != b[0].files[n]]
    assert not same
    commands = {c.argv[0] for c in a if c.argv}
    assert commands >= {"train", "data", "eval", "generate", "merge", "export", "chat", "plan",
                        "bench", "sweep", "report", "pairs", "init"}
    suffixes = {n.rsplit(".", 1)[-1] for c in a for n in c.files if "." in n}
    assert suffixes >= {"jsonl", "json", "csv", "parquet", "yaml"}
