"""eval.sample_prompts: what the policy says at every evaluation, beside the base."""

from __future__ import annotations

import html
import json

from tiny import QUICKSTART_RECIPE, qdpo


def test_sample_prompts_are_answered_at_every_eval_beside_the_base(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is tea?\n\nHow do I boil an egg?\n")
    run = tmp_path / "run"
    res = qdpo("train", QUICKSTART_RECIPE, "train.max_steps=4", "eval.every_steps=2",
               f"eval.sample_prompts=[{prompts}, Say hello.]", "eval.sample_max_new_tokens=6",
               "-o", run)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2, 2, 4, 4, 4]
    assert [r["prompt"][0]["content"] for r in rows[:3]] == [
        "What is tea?", "How do I boil an egg?", "Say hello."]
    assert all(isinstance(r["response"], str) and isinstance(r["base_response"], str)
               for r in rows)
    assert [r["base_response"] for r in rows[:3]] == [r["base_response"] for r in rows[3:]]
    assert "sample @ step 2:" in res.stdout
    # the run's own report.html shows them too, with the held-out margins of the final eval
    page = (run / "report.html").read_text()
    assert "How do I boil an egg?" in page
    assert html.escape(rows[3]["response"][:20].strip(), quote=True) in page
    margins = json.loads((run / "eval_margins.json").read_text())
    assert margins["step"] == 4 and margins["pairs"] == len(margins["margins"]) > 0


def test_samples_without_eval_data_and_after_a_resume(tmp_path):
    run = tmp_path / "run"
    args = ["train", QUICKSTART_RECIPE, "eval.data=[]", "eval.every_steps=2",
            "eval.sample_prompts=[Say hello.]", "eval.sample_max_new_tokens=4",
            "output.save_every_steps=2", "-o", run]
    assert qdpo(*args, "train.max_steps=2").returncode == 0
    res = qdpo(*args, "train.max_steps=4", "--resume")
    assert res.returncode == 0, res.stderr
    steps = [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # step 2 once: the resumed run drops what it answers again
