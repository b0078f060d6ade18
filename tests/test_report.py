"""`qdpo report`: one offline HTML page of curves, margins, samples and recipes.

A real two-run sweep on the quickstart model (a few seconds) is reported on: its content is
checked from the markup, and a real headless Chromium loads the page, which must draw every
chart without a console error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from qdpo.errors import RunDirError
from qdpo.report import write_report, write_run_report
from qdpo.report.runs import ReportRun, label_runs
from qdpo.report.svg import Line, decimate, fmt_num, histogram, line_chart, nice_ticks
from qdpo.rundir import RunDir
from tiny import QUICKSTART_RECIPE, make_pairs, qdpo, tiny_lora_model

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '"><img src=x onerror=alert(2)>'
CHARTED = ["loss", "reward accuracy", "reward margin (chosen - rejected)", "chosen reward",
           "rejected reward", "learning rate", "gradient norm (before clipping)", "tokens/s"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two real runs (loss.beta 0.1 and 0.3, 3 steps, eval at 2 and 3) whose sample prompts
    and a recipe value try to inject markup."""
    tmp = tmp_path_factory.mktemp("report")
    prompts = tmp / "prompts.txt"
    prompts.write_text(f"{ATTRIBUTE}\n", encoding="utf-8")
    out = tmp / "sweep"
    res = qdpo("sweep", QUICKSTART_RECIPE, "loss.beta=0.1,0.3", "train.max_steps=3",
               "train.pairs_per_step=4", "train.micro_batch_pairs=4", "eval.max_pairs=8",
               "eval.every_steps=2", f'eval.sample_prompts=[{prompts}, "{SCRIPT}"]',
               "eval.sample_max_new_tokens=4", "--out", out)
    assert res.returncode == 0, res.stderr
    for run in ("beta=0.1", "beta=0.3"):
        _ensure_margins(out / run)
    return out


def _ensure_margins(run: Path) -> None:
    """Until `qdpo train` stores the final eval's per-pair margins itself, write what it would
    (one margin per held-out pair at the last step) through the run directory's own writer."""
    if RunDir(run).eval_margins() is not None:
        return
    summary = json.loads((run / "summary.json").read_text())
    mean, n = summary["eval"]["rewards/margins"], int(summary["eval"]["pairs"])
    RunDir(run).write_eval_margins(summary["steps"],
                                   [mean + 0.1 * (i - n / 2) for i in range(n)])


class Markup(HTMLParser):
    """Tags with their attributes, and the text of each chart's title."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.charts: list[dict[str, str]] = []
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "svg":
            self.charts.append(dict(a, series=[]))
        if tag in ("polyline", "circle", "rect") and self.charts:
            self.charts[-1]["series"].append((tag, a))
        self._in_title = tag == "text" and a.get("class") == "title"

    def handle_data(self, data):
        if self._in_title and self.charts:
            self.charts[-1]["title"] = data
            self._in_title = False


def _report(tmp_path: Path, *runs: Path) -> tuple[str, Markup]:
    out = write_report(list(runs), tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    return text, Markup(text)


# ---------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------

def test_a_sweep_reports_its_runs_overlaid_with_every_chart_drawn(sweep, tmp_path):
    text, m = _report(tmp_path, sweep)
    titles = [c.get("title") for c in m.charts]
    assert titles[:len(CHARTED)] == CHARTED  # no memory charts: a CPU run logs none
    assert "logps/chosen" in titles and "reward margin per held-out pair" in titles
    for chart in m.charts:
        assert int(chart["data-points"]) > 0, chart.get("title")
        assert chart["series"], chart.get("title")
    loss = m.charts[0]
    lines = [a for tag, a in loss["series"] if tag == "polyline"]
    assert len(lines) == 4 and len({a["stroke"] for a in lines}) == 2  # 2 runs x train, eval
    train, evals = [a for a in lines if "stroke-dasharray" not in a], \
        [a for a in lines if "stroke-dasharray" in a]
    assert [len(a["points"].split()) for a in train] == [3, 3]  # steps 1, 2, 3
    assert [len(a["points"].split()) for a in evals] == [2, 2]  # eval at 2 and the end
    assert "beta=0.1" in text and "beta=0.3" in text and "Sweep sweep" in text
    hist = next(c for c in m.charts if c.get("title") == "reward margin per held-out pair")
    bars = [a for tag, a in hist["series"] if tag == "rect" and a.get("class") == "bar"]
    assert len({a["fill"] for a in bars}) == 2


def test_untrusted_text_is_escaped_everywhere(sweep, tmp_path):
    evil = tmp_path / f'<b>run"{SCRIPT}'
    shutil.copytree(sweep / "beta=0.1", evil)
    text, m = _report(tmp_path, sweep, evil)
    assert SCRIPT not in text and ATTRIBUTE not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the prompt, shown as text
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in text
    assert not re.search(r"<\s*(script|img|b>)", text, re.I)  # no element of theirs
    assert {tag for tag, _ in m.tags} <= {
        "html", "head", "meta", "link", "title", "style", "body", "h1", "h2", "h3", "p", "table",
        "tr", "th", "td", "div", "span", "i", "pre", "details", "summary", "svg", "text",
        "rect", "line", "polyline", "circle"}
    assert not any(k.startswith("on") for _, a in m.tags for k in a)
    assert not any(a.get("src") or a.get("href", "data:").split(":")[0] != "data"
                   for _, a in m.tags)  # nothing to fetch: works offline


def test_samples_show_base_and_tuned_answers_at_each_eval(sweep, tmp_path):
    text, _ = _report(tmp_path, sweep / "beta=0.3")
    rows = [json.loads(x) for x in (sweep / "beta=0.3" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 3, 3]
    section = text.split("Sample answers at each eval")[1].split("Recipes and summaries")[0]
    assert section.count("<th>base</th>") == 2
    assert section.count("<th>step 2</th>") == 2 and section.count("<th>step 3</th>") == 2


def test_recipes_and_summaries_and_their_differences(sweep, tmp_path):
    text, _ = _report(tmp_path, sweep)
    section = text.split("Recipes and summaries")[1]
    assert "Recipe keys that differ" in section
    assert "<td>loss.beta</td>" in section and "<td>output.dir</td>" not in section
    assert section.count("<h3>recipe.yaml</h3>") == 2 and "learning_rate" in section
    assert "eval rewards/accuracies" in section


def test_write_run_report_is_a_run_file(sweep):
    run = sweep / "beta=0.1"
    path = write_run_report(run)
    assert path == run / "report.html" and path.stat().st_size > 1000
    assert not RunDir(run).unexpected_entries()  # --overwrite still replaces the run


def test_damaged_and_odd_records_are_skipped(sweep, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(sweep / "beta=0.1", run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": NaN, "lr": "high"}\nnot json\n[1, 2]\n{"step": 5, "los')
    (run / "samples.jsonl").write_text('{"step": 2, "prompt": {"x": 1}, "response": 7}\n')
    (run / "eval_margins.json").write_text('{"step": 3, "margins": "abc"}')
    with caplog.at_level("WARNING", logger="qdpo"):
        text, m = _report(tmp_path, run)
    assert all(int(c["data-points"]) > 0 for c in m.charts)
    assert "No per-pair margins stored" in text and "{&quot;x&quot;: 1}" in text
    assert "2 damaged lines skipped" in caplog.text  # said (the unfinished last line is not)


# ---------------------------------------------------------------------------------------
# The command and its mistakes
# ---------------------------------------------------------------------------------------

def test_cli_writes_the_report(sweep, tmp_path):
    out = tmp_path / "sub" / "r.html"
    res = qdpo("report", sweep / "beta=0.1", sweep / "beta=0.3", "--out", out)
    assert res.returncode == 0, res.stderr
    assert out.read_text().startswith("<!DOCTYPE html>") and str(out) in res.stdout
    again = qdpo("report", sweep / "beta=0.1", "--out", out)  # its own page: replaced
    assert again.returncode == 0, again.stderr
    mine = tmp_path / "mine.html"
    mine.write_text("my notes")
    refused = qdpo("report", sweep / "beta=0.1", "--out", mine)
    assert refused.returncode != 0 and "not a qdpo report" in refused.stderr
    assert mine.read_text() == "my notes"
    assert qdpo("report", sweep / "beta=0.1", "--out", mine, "--overwrite").returncode == 0
    assert mine.read_text().startswith("<!DOCTYPE html>")


def test_cli_refuses_what_is_not_a_run_in_one_message(sweep, tmp_path):
    empty = tmp_path / "empty-run"
    shutil.copytree(sweep / "beta=0.1", empty)
    (empty / "metrics.jsonl").write_text("")
    (tmp_path / "file.txt").write_text("x")
    cases = [(tmp_path / "nope", "does not exist"), (tmp_path / "file.txt", "not a directory"),
             (tmp_path, "neither a qdpo run directory"), (empty, "without metrics yet")]
    for path, says in cases:
        res = qdpo("report", path, "--out", tmp_path / "r.html")
        assert res.returncode == 2, (path, res.stderr)
        assert says in res.stderr and "Traceback" not in res.stderr + res.stdout
    res = qdpo("report", sweep / "beta=0.1", "--out", tmp_path)
    assert res.returncode == 2 and "is a directory" in res.stderr
    assert not (tmp_path / "r.html").exists()


def test_a_sweep_without_any_metrics_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(
        {"runs": [{"name": "beta=0.1", "status": "failed", "error": "out of memory"}]}))
    with pytest.raises(RunDirError, match="no run with metrics yet"):
        write_report([tmp_path / "s"], tmp_path / "r.html")


# ---------------------------------------------------------------------------------------
# Charts and the stored margins
# ---------------------------------------------------------------------------------------

def test_charts_edge_cases():
    spike = [(float(i), 1.0) for i in range(10_000)]
    spike[5_000] = (5000.0, 50.0)
    kept = decimate(spike, 200)
    assert len(kept) <= 202 and (5000.0, 50.0) in kept and kept[-1] == spike[-1]
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
    assert nice_ticks(1, 4, 6, integer=True) == [1, 2, 3, 4]
    one = line_chart("one point", [Line("a", "#000", [(3.0, 2.0)]), Line("b", "#111", [])])
    assert 'data-points="1"' in one and "<circle" in one
    flat = histogram("same", [("a", "#000", [0.5] * 4)], "margin")
    assert 'data-points="1"' in flat and 'class="marker"' in flat  # zero is always in view
    assert [fmt_num(v) for v in (20000.0, 1.05e-5, 0.25)] == ["20,000", "1.05e-05", "0.25"]


def test_runs_are_told_apart_by_as_many_parent_folders_as_it_takes():
    runs = [ReportRun(Path(p), "", [], {}, None, "", [], None)
            for p in ("/x/a/beta=0.1", "/x/b/beta=0.1", "/x/b/beta=0.3")]
    label_runs(runs)
    assert [r.label for r in runs] == ["a/beta=0.1", "b/beta=0.1", "b/beta=0.3"]


def test_eval_margins_are_per_pair_in_data_order():
    import torch

    from qdpo.batching import plan_batches
    from qdpo.evaluate import evaluate_pairs, evaluate_pairs_with_margins
    from qdpo.losses import Objective
    from qdpo.recipe import LossConfig

    model, pairs = tiny_lora_model("llama"), make_pairs()
    objective, cpu = Objective.from_config(LossConfig()), torch.device("cpu")
    plan = plan_batches("padded", "sdpa", 64, 0, 2, 64)  # a token budget regroups the pairs
    ev, margins = evaluate_pairs_with_margins(model, pairs, objective, plan, cpu, torch.float32)
    assert ev == evaluate_pairs(model, pairs, objective, plan, cpu, torch.float32)
    assert sum(margins) / len(margins) == pytest.approx(ev["rewards/margins"], abs=1e-6)
    alone = [evaluate_pairs_with_margins(model, [p], objective, plan, cpu, torch.float32)[1][0]
             for p in pairs]
    assert margins == pytest.approx(alone, abs=1e-5)


# ---------------------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------------------

def _chromium() -> str | None:
    return os.environ.get("QDPO_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium found (apt-get install chromium, "
                                                "or set QDPO_CHROMIUM to its executable)")
def test_the_page_draws_in_a_headless_browser(sweep, tmp_path):
    from playwright.sync_api import sync_playwright

    out = write_report([sweep], tmp_path / "report.html")
    problems: list[str] = []
    with sync_playwright() as pw:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start
        browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: problems.append(f"{m.type}: {m.text}")
                if m.type == "error" else None)  # a blocked script or load is one too
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("request", lambda r: problems.append(f"request: {r.url}")
                if not r.url.startswith(("file:", "data:")) else None)
        page.goto(out.as_uri())
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        charts = page.evaluate("""() => [...document.querySelectorAll('svg.chart')].map(svg => {
            const box = svg.getBoundingClientRect();
            const marks = [...svg.querySelectorAll('polyline, circle, rect.bar')];
            const drawn = marks.filter(e => {
                const b = e.getBBox(); return b.width > 0 || b.height > 0; });
            const lines = [...svg.querySelectorAll('polyline')].filter(
                e => e.points.numberOfItems >= 2 && e.getTotalLength() > 0);
            return {title: svg.getAttribute('aria-label'), w: box.width, h: box.height,
                    marks: marks.length, drawn: drawn.length, lines: lines.length}; })""")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    if os.environ.get("QDPO_KEEP_ARTIFACTS"):
        keep = Path(__file__).parent / "artifacts"
        keep.mkdir(exist_ok=True)
        shutil.copy(shot, keep / "report.png")
        shutil.copy(out, keep / "report.html")
    assert problems == []
    assert len(charts) == len(CHARTED) + 5  # 4 log-prob charts under "more metrics", margins
    for c in charts:
        assert c["w"] > 200 and c["h"] > 100 and c["drawn"] > 0, c
        assert c["drawn"] == c["marks"], c  # every data mark has a size on the page
    assert all(c["lines"] >= 2 for c in charts if c["title"] != "reward margin per held-out pair")
    assert shot.stat().st_size > 10_000
