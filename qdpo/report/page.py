"""The report page: sections of HTML around the charts.

Text from a run (prompts, answers, recipe values, run names, error messages) is untrusted: a
run directory can come from anyone. All of it goes through `esc`, and the page carries a
Content-Security-Policy that forbids scripts and every network load, so even a mistake here
could not run code or call home. The page needs no script: tooltips are SVG `<title>`s and the
long sections fold with `<details>`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any

from qdpo import __version__
from qdpo.report.runs import ReportRun, SweepInfo, usable
from qdpo.report.svg import Line, esc, histogram, line_chart

# Tableau 10: distinguishable, and readable for the common colour-vision deficiencies
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac"]
# The charts a reader looks for first, in this order; any other numeric metric follows under
# "more metrics". Each draws the train key and, where logged, its eval/ twin.
MAIN_CHARTS = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"),
               ("rewards/margins", "reward margin (chosen - rejected)"),
               ("rewards/chosen", "chosen reward"), ("rewards/rejected", "rejected reward"),
               ("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"),
               ("tokens_per_s", "tokens/s"), ("mem/peak_alloc_gib", "peak memory allocated, GiB"),
               ("mem/peak_reserved_gib", "peak memory reserved, GiB")]
NOT_CHARTED = {"step", "epoch", "tokens", "token_slots", "step_time_s", "pairs"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1500px;
padding:0 20px 40px;color:#222;background:#fff}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}.muted{color:#666}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f6f6f6}td.num{text-align:right;
font-variant-numeric:tabular-nums}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:10px}
svg.chart{width:100%;height:auto;background:#fff;border:1px solid #e4e4e4;border-radius:4px}
svg .title{font-size:13px;font-weight:600;fill:#222}svg .tick{font-size:10px;fill:#666}
svg .axis{font-size:11px;fill:#444}svg .plot{fill:none;stroke:#ccc}svg .grid{stroke:#eee}
svg .series{fill:none;stroke-width:1.6;stroke-linejoin:round}svg .pt{opacity:0}
svg .pt.eval{opacity:1}svg .pt:hover{opacity:1;stroke:#000}svg .bar{opacity:.8}
svg .bar:hover{opacity:1}svg .marker{stroke:#444;stroke-dasharray:4 3}
.legend span{display:inline-block;margin:2px 14px 2px 0}.swatch{display:inline-block;
width:22px;height:4px;vertical-align:middle;margin-right:5px;border-radius:2px}
pre,.answer{white-space:pre-wrap;word-break:break-word;font:12px/1.4 ui-monospace,monospace;
background:#f8f8f8;border:1px solid #eee;padding:6px 8px;margin:2px 0}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
table.samples{width:100%}table.samples th{width:70px;white-space:nowrap}
"""
# No scripts, no network: styles inline, images only as data: URLs (the favicon below, so
# the browser does not ask the network for one).
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
# marks a page as qdpo's, so that a later `qdpo report` may replace it without --overwrite
GENERATOR = "qdpo report"


def page(runs: list[ReportRun], sweeps: list[SweepInfo]) -> str:
    colors = {r.label: PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}
    title = "qdpo report: " + ", ".join(r.label for r in runs[:4]) + (
        f" and {len(runs) - 4} more" if len(runs) > 4 else "")
    body = [f"<h1>{esc(title)}</h1>",
            f'<p class="muted">written {time.strftime("%Y-%m-%d %H:%M:%S")} by qdpo '
            f"{esc(__version__)}; hover a point for its value</p>",
            overview(runs), *[sweep_section(s) for s in sweeps],
            curves(runs, colors), margins_section(runs, colors), samples_section(runs),
            recipes_section(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="generator" content="{GENERATOR}">'
            '<link rel="icon" href="data:,">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------

def cell(v: Any) -> str:
    if v is None:  # not measured (a run without eval data): a dash, not "None"
        return "<td>-</td>"
    if isinstance(v, bool):
        return f"<td>{esc(v)}</td>"
    if isinstance(v, float):
        text = f"{v:.4g}" if math.isfinite(v) else str(v)
        return f'<td class="num">{esc(text)}</td>'
    if isinstance(v, int):
        return f'<td class="num">{v:,}</td>'
    if isinstance(v, (dict, list)):
        return f"<td>{esc(json.dumps(v, ensure_ascii=False))}</td>"
    return f"<td>{esc(v)}</td>"


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _final(run: ReportRun, part: str, key: str) -> Any:
    d = (run.summary or {}).get(part)
    return d.get(key) if isinstance(d, dict) else None


def overview(runs: list[ReportRun]) -> str:
    rows = []
    for r in runs:
        steps = (r.summary or {}).get("steps", max((x.get("step", 0) for x in r.records),
                                                   default=0))
        total = r.info.get("total_steps")
        rows.append([r.label, r.status(), f"{steps}" + (f" / {total}" if total else ""),
                     _final(r, "eval", "rewards/accuracies"), _final(r, "eval", "rewards/margins"),
                     _final(r, "eval", "loss"), _final(r, "train", "loss"),
                     (r.summary or {}).get("seconds"), str(r.path)])
    return "<h2>Runs</h2>" + table(
        ["run", "status", "steps", "eval accuracy", "eval margin", "eval loss", "train loss",
         "seconds", "directory"], rows)


def sweep_section(s: SweepInfo) -> str:
    rec = s.record
    runs = [x for x in rec.get("runs") or [] if isinstance(x, dict)]
    ev = [x.get("eval") if isinstance(x.get("eval"), dict) else {} for x in runs]
    rows = [[x.get("name"), x.get("status"), ("best" if x.get("name") == rec.get("best") else ""),
             e.get("rewards/accuracies"), e.get("rewards/margins"), e.get("loss"),
             x.get("error") or ""] for x, e in zip(runs, ev)]
    grid = rec.get("grid") if isinstance(rec.get("grid"), dict) else {}
    out = [f"<h2>Sweep {esc(s.path.name)}</h2>",
           f"<p>swept: {esc(json.dumps(grid.get('swept'), ensure_ascii=False))}; fixed: "
           f"{esc(json.dumps(grid.get('fixed'), ensure_ascii=False))}; ranked by "
           f"{esc(rec.get('ranked_by'))}</p>",
           table(["run", "status", "", "eval accuracy", "eval margin", "eval loss", "error"],
                 rows)]
    if s.skipped:
        out.append('<p class="muted">not charted: ' + esc("; ".join(s.skipped)) + "</p>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------

def legend(runs: list[ReportRun], colors: dict[str, str]) -> str:
    items = [f'<span><i class="swatch" style="background:{colors[r.label]}"></i>{esc(r.label)}'
             "</span>" for r in runs]
    return ('<p class="legend">' + "".join(items) + '<span class="muted">solid: train '
            "(per logged step); dashed with dots: held-out eval</span></p>")


def metric_chart(runs: list[ReportRun], colors: dict[str, str], key: str, title: str) -> str:
    lines = []
    for r in runs:
        lines.append(Line(f"{r.label} train {key}", colors[r.label], r.series(key)))
        lines.append(Line(f"{r.label} eval {key}", colors[r.label], r.series(f"eval/{key}"),
                          dashed=True))
    return line_chart(title, lines) if any(ln.points for ln in lines) else ""


def curves(runs: list[ReportRun], colors: dict[str, str]) -> str:
    main = [metric_chart(runs, colors, k, t) for k, t in MAIN_CHARTS]
    known = {k for k, _ in MAIN_CHARTS} | NOT_CHARTED
    rest: dict[str, None] = {}
    for r in runs:
        for k in r.keys():
            base = k.removeprefix("eval/")
            if base not in known:
                rest.setdefault(base, None)
    more = [metric_chart(runs, colors, k, k) for k in rest]
    out = ["<h2>Training and eval curves</h2>", legend(runs, colors),
           '<div class="charts">' + "".join(c for c in main if c) + "</div>"]
    if any(more):
        out.append("<details><summary>more metrics</summary><div class=\"charts\">"
                   + "".join(c for c in more if c) + "</div></details>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Held-out margins at the end
# ---------------------------------------------------------------------------------------

def margins_section(runs: list[ReportRun], colors: dict[str, str]) -> str:
    head = "<h2>Held-out reward margins at the end</h2>"
    have = [(r, [m for m in r.margins[1] if usable(m)]) for r in runs if r.margins]
    have = [(r, m) for r, m in have if m]
    if not have:
        return head + ('<p class="muted">No per-pair margins stored (eval_margins.json is '
                       "written by the final eval of runs with eval data).</p>")
    groups = [(f"{r.label} (step {r.margins[0]})", colors[r.label], m) for r, m in have]
    chart = histogram("reward margin per held-out pair", groups, "reward margin")
    rows = [[r.label, r.margins[0], len(m), statistics.fmean(m), statistics.median(m),
             sum(x > 0 for x in m) / len(m), min(m), max(m)] for r, m in have]
    return (head + '<p class="muted">chosen minus rejected implicit reward of each held-out pair '
            "at the final eval; right of the dashed line the pair is ranked correctly</p>"
            f'<div class="charts">{chart}</div>'
            + table(["run", "step", "pairs", "mean", "median", "fraction > 0", "min", "max"],
                    rows))


# ---------------------------------------------------------------------------------------
# Samples: base vs tuned answers at each eval
# ---------------------------------------------------------------------------------------

def prompt_text(prompt: Any) -> str:
    """A prompt as stored: plain text, or chat messages shown as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict)
                         else str(m) for m in prompt)
    return json.dumps(prompt, ensure_ascii=False)


def _answer(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def run_samples(r: ReportRun) -> str:
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in r.samples:
        by_prompt.setdefault(prompt_text(row.get("prompt")), []).append(row)
    out = []
    for i, (prompt, rows) in enumerate(by_prompt.items()):
        base = next((x["base_response"] for x in rows if x.get("base_response") is not None),
                    None)
        answers = [("base", base)] if base is not None else []
        answers += [(f"step {x.get('step')}", x.get("response")) for x in rows]
        cells = "".join(f"<tr><th>{esc(who)}</th><td><div class=\"answer\">"
                        f"{esc(_answer(text))}</div></td></tr>" for who, text in answers)
        out.append(f"<h3>prompt {i + 1}</h3><pre>{esc(prompt)}</pre>"
                   f'<table class="samples"><tr><th></th><th>answer (base: adapters off; '
                   f"step N: the policy at that eval)</th></tr>{cells}</table>")
    return "\n".join(out)


def samples_section(runs: list[ReportRun]) -> str:
    head = "<h2>Sample answers at each eval</h2>"
    with_samples = [r for r in runs if r.samples]
    if not with_samples:
        return head + ('<p class="muted">No samples (set eval.sample_prompts to have the policy '
                       "answer prompts at every eval, beside the base).</p>")
    return head + "\n".join(
        f"<details{' open' if i == 0 else ''}><summary>{esc(r.label)}</summary>"
        f"{run_samples(r)}</details>" for i, r in enumerate(with_samples))


# ---------------------------------------------------------------------------------------
# Recipes and summaries
# ---------------------------------------------------------------------------------------

def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else
                   {f"{prefix}{k}": v})
    return out


def recipe_differences(runs: list[ReportRun]) -> str:
    flat = [flatten(r.recipe()) for r in runs]
    keys = sorted({k for f in flat for k in f} - {"output.dir"})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str)
                                       for f in flat}) > 1]
    if not differ:
        return "<p>The recipes are the same (output.dir aside).</p>"
    rows = [[k] + [f.get(k) for f in flat] for k in differ]
    return "<h3>Recipe keys that differ</h3>" + table(["key"] + [r.label for r in runs], rows)


def summary_rows(r: ReportRun) -> list[list[Any]]:
    s = r.summary or {}
    rows = [[k, s[k]] for k in ("steps", "seconds", "interrupted", "loss", "reference",
                                "reference_seconds", "reference_reused", "tokens_per_s_average")
            if k in s]
    for part in ("eval", "train"):
        if isinstance(s.get(part), dict):
            rows += [[f"{part} {k}", v] for k, v in s[part].items()]
    return rows


def recipes_section(runs: list[ReportRun]) -> str:
    out = ["<h2>Recipes and summaries</h2>"]
    if len(runs) > 1:
        out.append(recipe_differences(runs))
    for r in runs:
        info = [[k, v] for k, v in r.info.items()]
        out.append(f"<details><summary>{esc(r.label)}</summary>"
                   "<h3>summary</h3>" + (table(["", "value"], summary_rows(r)) if r.summary else
                                         '<p class="muted">no summary.json yet</p>')
                   + "<h3>run.json</h3>" + table(["", "value"], info)
                   + f"<h3>recipe.yaml</h3><pre>{esc(r.recipe_text)}</pre></details>")
    return "\n".join(out)
