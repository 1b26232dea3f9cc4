"""``zhiling eval compare``: one report over several RUN_DIRs (see ``rundir`` for their layout).

The report has one section per kind of run it was given:

* metrics runs: the headline metrics per run, per task when the runs were grouped (``--by task``), a bar chart of
  one metric per task and run, and side-by-side outputs of the runs for a sample of rows (matched by id);
* judge runs: per run the leaderboard (category x system), people's scores beside the judge's with their agreement
  (when the run was given ``--human-scores``), a bar chart of the mean scores, and side-by-side answers of its
  systems for a sample of prompts;
* multiple-choice runs: accuracy per subject and run, with a bar chart.

It is written as ``report.md`` (charts as PNG files in ``charts/``) and a self-contained ``report.html``
(the same PNGs embedded as base64, no external files or scripts).
"""

from __future__ import annotations

import base64
import html
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from zhiling.errors import ZhilingError
from zhiling.eval import judge as J
from zhiling.eval.charts import grouped_bar_chart
from zhiling.eval.human_scores import human_table
from zhiling.eval.reference_eval import COLUMN_NAMES, headline
from zhiling.eval.rundir import Run
from zhiling.eval.suite import category_title
from zhiling.eval.tables import Table

PICKS = ("random", "diff")


@dataclass
class Chart:
    name: str  # file name stem
    title: str
    png: bytes


@dataclass
class Answer:
    label: str
    text: str
    score: str


@dataclass
class Sample:
    id: str
    heading: str
    prompt: str
    reference: str | None
    answers: list[Answer]


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    title: str
    runs: list[Run]
    sections: list[Section]


def _unique_names(runs: Sequence[Run]) -> list[str]:
    names, seen = [], {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        names.append(run.name if seen[run.name] == 1 else f"{run.name}#{seen[run.name]}")
    return names


def _reference_text(reference) -> str | None:
    if reference is None:
        return None
    return reference if isinstance(reference, str) else " | ".join(reference)


def _pick(ids: list[str], count: int, seed: int, spread: dict[str, float] | None) -> list[str]:
    """``count`` ids: at random (seeded), or the ones with the largest score spread between runs/systems."""
    if count <= 0 or not ids:
        return []
    if spread is not None:
        return sorted(ids, key=lambda i: (-spread.get(i, 0.0), ids.index(i)))[:count]
    chosen = set(random.Random(seed).sample(ids, min(count, len(ids))))
    return [i for i in ids if i in chosen]


def _score_text(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------------------------------- metrics


def metrics_section(runs: Sequence[Run], names: Sequence[str], *, samples: int, seed: int, pick: str,
                    chart_metric: str | None) -> Section:
    section = Section("Reference metrics")
    heads = [headline(run.summary["overall"]) for run in runs]
    keys = [k for k in COLUMN_NAMES if any(k in h for h in heads)]
    overall = Table("Overall (%)", ["run", "rows", *[COLUMN_NAMES[k] for k in keys]])
    for name, run, head in zip(names, runs, heads):
        overall.add(name, run.summary["overall"]["rows"], *[head.get(k) for k in keys])
    section.tables.append(overall)

    groups = sorted({g for run in runs for g in run.summary.get("groups", {})})
    metric = chart_metric or (keys[0] if keys else None)
    if metric is not None and metric not in keys:
        raise ZhilingError(f"--chart-metric {metric!r}: the runs have {', '.join(keys)}")
    if groups:
        for key in keys:
            table = Table(f"By task: {COLUMN_NAMES[key]} (%)", ["task", *names])
            for group in groups:
                table.add(group, *[run.summary["groups"].get(group, {}).get(key) for run in runs])
            section.tables.append(table)
    if metric is not None:
        if groups:
            series = {name: [_pct(run.summary["groups"].get(g, {}).get(metric)) for g in groups]
                      for name, run in zip(names, runs)}
            title = f"{COLUMN_NAMES[metric]} by task"
            section.charts.append(Chart(f"metrics_{metric}_by_task", title, grouped_bar_chart(
                groups, series, title=title, ylabel=f"{COLUMN_NAMES[metric]} (%)", ymax=100)))
        else:
            series = {name: [_pct(head.get(k)) for k in keys] for name, head in zip(names, heads)}
            section.charts.append(Chart("metrics_overall", "Metrics per run", grouped_bar_chart(
                [COLUMN_NAMES[k] for k in keys], series, title="Metrics per run", ylabel="%", ymax=100)))

    by_id = [{row["id"]: row for row in run.rows} for run in runs]
    common = [row["id"] for row in runs[0].rows if all(row["id"] in rows for rows in by_id[1:])]
    if len(common) < len(runs[0].rows) and len(runs) > 1:
        section.notes.append(f"{len(runs[0].rows) - len(common)} row(s) of {names[0]} are not in every run; "
                             "samples come from the rows all runs share")
    spread = None
    if pick == "diff":
        spread = {}
        for row_id in common:
            scores = [rows[row_id].get("score") for rows in by_id]
            scores = [s for s in scores if s is not None]
            spread[row_id] = max(scores) - min(scores) if scores else 0.0
    for row_id in _pick(common, samples, seed, spread):
        first = by_id[0][row_id]
        task = f" (task: {first['task']})" if first.get("task") else ""
        section.samples.append(Sample(row_id, f"{row_id}{task}", first.get("prompt", ""),
                                      _reference_text(first.get("reference")),
                                      [Answer(name, rows[row_id].get("output", ""),
                                              _score_text(rows[row_id].get("score")))
                                       for name, rows in zip(names, by_id)]))
    return section


def _pct(value):
    return None if value is None else value * 100


# --------------------------------------------------------------------------------------------------- judge


def judge_section(run: Run, name: str, *, samples: int, seed: int, pick: str, index: int = 1) -> Section:
    summary = run.summary
    systems = [s["name"] for s in summary.get("systems", [])]
    board = summary.get("leaderboard")
    if not systems or not board:
        raise ZhilingError(f"{run.path}: summary.json has no systems / leaderboard (not written by eval judge?)")
    section = Section(f"Judge: {name} (judge model {summary.get('judge_model', '?')})")
    section.tables += [J.ranking_table(board, systems), J.leaderboard_table(board, systems)]
    if summary.get("human"):
        section.tables.append(human_table(summary["human"], systems))
    categories = list(board["categories"])
    series = {s: [board["categories"][c][s]["mean"] for c in categories] for s in systems}
    section.charts.append(Chart(f"judge_{index}_{_slug(name)}", f"Judge scores by category: {name}", grouped_bar_chart(
        categories, series, title=f"Judge scores by category ({name})", ylabel="mean score (0-10)", ymax=10)))
    counts = summary.get("counts", {})
    if counts.get("unparsed") or counts.get("error"):
        section.notes.append(f"{counts.get('unparsed', 0)} prompt(s) unparsed and {counts.get('error', 0)} failed: "
                             "left out of the means")
    rows = {row["id"]: row for row in run.rows}
    ids = list(rows)
    spread = None
    if pick == "diff":
        spread = {}
        for row_id, row in rows.items():
            values = list((row.get("scores") or {}).values())
            spread[row_id] = (max(values) - min(values)) if values else 0.0
    for row_id in _pick(ids, samples, seed, spread):
        row = rows[row_id]
        scores, human = row.get("scores") or {}, row.get("human") or {}
        section.samples.append(Sample(row_id, f"{row_id} ({category_title(row.get('category', ''))})",
                                      row.get("prompt", ""), row.get("reference"),
                                      [Answer(s, row.get("answers", {}).get(s, ""),
                                              (str(scores[s]) if s in scores else row.get("status", "-"))
                                              + (f", human {human[s]:g}" if s in human else ""))
                                       for s in systems]))
    return section


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:40] or "run"


# --------------------------------------------------------------------------------------------------- mc


def mc_section(runs: Sequence[Run], names: Sequence[str]) -> Section:
    section = Section("Multiple choice")
    subjects = sorted({s for run in runs for s in run.summary.get("subjects", {})})
    table = Table("Accuracy by subject (%)", ["subject", *names])
    for subject in subjects:
        table.add(subject, *[run.summary["subjects"].get(subject, {}).get("accuracy") for run in runs])
    table.add("overall", *[run.summary["overall"].get("accuracy") for run in runs])
    table.add("macro", *[run.summary["overall"].get("macro_accuracy") for run in runs])
    section.tables.append(table)
    series = {name: [_pct(run.summary["subjects"].get(s, {}).get("accuracy")) for s in subjects]
              for name, run in zip(names, runs)}
    section.charts.append(Chart("mc_by_subject", "Accuracy by subject", grouped_bar_chart(
        subjects, series, title="Multiple-choice accuracy by subject", ylabel="accuracy (%)", ymax=100)))
    return section


# --------------------------------------------------------------------------------------------------- building


def build_report(runs: Sequence[Run], *, samples: int = 5, seed: int = 0, pick: str = "random",
                 chart_metric: str | None = None, title: str = "zhiling evaluation report") -> Report:
    if not runs:
        raise ZhilingError("give at least one RUN_DIR")
    if pick not in PICKS:
        raise ZhilingError(f"--pick must be one of {', '.join(PICKS)}")
    names = _unique_names(runs)
    sections = []
    metric_runs = [(n, r) for n, r in zip(names, runs) if r.kind == "metrics"]
    if metric_runs:
        sections.append(metrics_section([r for _, r in metric_runs], [n for n, _ in metric_runs], samples=samples,
                                        seed=seed, pick=pick, chart_metric=chart_metric))
    for index, (name, run) in enumerate(zip(names, runs), start=1):
        if run.kind == "judge":
            sections.append(judge_section(run, name, samples=samples, seed=seed, pick=pick, index=index))
    mc_runs = [(n, r) for n, r in zip(names, runs) if r.kind == "mc"]
    if mc_runs:
        sections.append(mc_section([r for _, r in mc_runs], [n for n, _ in mc_runs]))
    return Report(title, list(runs), sections)


def runs_table(report: Report) -> Table:
    table = Table("Runs", ["run", "kind", "created", "inputs", "folder"], text_columns=5)
    for name, run in zip(_unique_names(report.runs), report.runs):
        table.add(name, run.kind, str(run.info.get("created", "")), ", ".join(map(str, run.info.get("inputs", []))),
                  str(run.path))
    return table


def _fence(text: str, info: str = "text") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{info}\n{text}\n{ticks}"


def to_markdown(report: Report, chart_dir: str = "charts") -> str:
    lines = [f"# {report.title}", "", runs_table(report).to_markdown()]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        lines += [note + "\n" for note in section.notes]
        lines += [table.to_markdown() for table in section.tables]
        lines += [f"![{chart.title}]({chart_dir}/{chart.name}.png)\n" for chart in section.charts]
        if section.samples:
            lines += ["### Side by side", ""]
        for sample in section.samples:
            lines += [f"#### {sample.heading}", "", "**Prompt**", "", _fence(sample.prompt), ""]
            if sample.reference is not None:
                lines += ["**Reference**", "", _fence(sample.reference), ""]
            for answer in sample.answers:
                lines += [f"**{answer.label}** (score {answer.score})", "", _fence(answer.text), ""]
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;
margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 10px}
td:not(:first-child){text-align:right}th{background:#f3f3f3}.note{color:#666;font-size:.9em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.sample{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.answers{display:flex;gap:1em;flex-wrap:wrap}.answer{flex:1 1 280px;min-width:0}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.5em;border-radius:4px;margin:.3em 0}
.label{font-weight:600}.score{color:#555;font-weight:400}
"""


def to_html(report: Report) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang='zh'><head><meta charset='utf-8'><title>{esc(report.title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{esc(report.title)}</h1>", runs_table(report).to_html()]
    for section in report.sections:
        parts.append(f"<h2>{esc(section.title)}</h2>")
        parts += [f"<p class='note'>{esc(note)}</p>" for note in section.notes]
        parts += [table.to_html() for table in section.tables]
        for chart in section.charts:
            data = base64.b64encode(chart.png).decode("ascii")
            parts.append(f"<img alt='{esc(chart.title)}' src='data:image/png;base64,{data}'>")
        if section.samples:
            parts.append("<h3>Side by side</h3>")
        for sample in section.samples:
            parts.append(f"<div class='sample'><h4>{esc(sample.heading)}</h4><div><b>Prompt</b>"
                         f"<pre>{esc(sample.prompt)}</pre></div>")
            if sample.reference is not None:
                parts.append(f"<div><b>Reference</b><pre>{esc(sample.reference)}</pre></div>")
            parts.append("<div class='answers'>")
            for answer in sample.answers:
                parts.append(f"<div class='answer'><span class='label'>{esc(answer.label)}</span> "
                             f"<span class='score'>(score {esc(answer.score)})</span>"
                             f"<pre>{esc(answer.text)}</pre></div>")
            parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ZhilingError(f"{out}: exists and is not a folder")
    charts = out / "charts"
    charts.mkdir(parents=True, exist_ok=True)
    for section in report.sections:
        for chart in section.charts:
            (charts / f"{chart.name}.png").write_bytes(chart.png)
    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(to_markdown(report), encoding="utf-8")
    page.write_text(to_html(report), encoding="utf-8")
    return markdown, page
