"""``zhiling quickstart``: fine-tune the embedded default model on the bundled Chinese data, before and after.

1. score the held-out bundled rows with the base model (batched greedy answers, short, stopped at the template's
   end-of-turn token); show three of its answers
2. train a LoRA adapter on the bundled training rows (packing, logits only where labels are)
3. score the same rows again with the adapter; show the same three answers
4. write OUTPUT/report.md, OUTPUT/scores.json and OUTPUT/answers.jsonl beside the run's adapter, metrics and
   loss plot; OUTPUT/eval/ holds both systems' predictions and metric runs and the `zhiling eval compare` report
   (OUTPUT/eval/report/report.html); print the command to chat with the result

Scores use ``score_bundled``: exact answer for sentiment, one-word and rewrite rows, the right number of items from the
right category for lists, entity-set F1 for entity extraction. The settings are chosen to finish within a few
minutes on two CPU cores.

An application, not a library: it orchestrates data, models, train, infer and eval, so it stands above them all
(beside the CLI, which only parses ``zhiling quickstart`` and calls ``run_quickstart``); no library module imports it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from zhiling.config.loader import build_config
from zhiling.data.bundled import BUNDLED_TASKS, bundled_data_path, score_record

SHOWN_TASKS = ("sentiment", "ner", "rewrite")


@dataclass
class QuickstartOptions:
    output_dir: str = "zhiling-quickstart"
    max_steps: int = 80  # about 1.8 epochs; measured: about 150 s of training on 2 idle CPU cores
    learning_rate: float = 1e-3
    lora_rank: int = 8
    packing_tokens: int = 512
    eval_rows: int | None = None  # held-out rows to score (None: all of them)
    batch_size: int = 128  # answers generated at once (each decoding step reads every weight: batch widely)
    max_new_tokens: int = 24
    show_progress: bool = True


@dataclass
class Scores:
    per_task: dict[str, float]
    overall: float
    exact_match: float
    char_f1: float
    rows: int
    seconds: float


@dataclass
class QuickstartReport:
    output_dir: Path
    before: Scores
    after: Scores
    examples: list[dict]
    train_seconds: float
    total_seconds: float
    final_loss: float | None
    adapter: Path
    chat_command: str
    phases: dict[str, float] = field(default_factory=dict)
    eval_report: Path | None = None


def training_config(options: QuickstartOptions):
    """The run: LoRA on every linear layer of the default model, bundled data, a short cosine schedule."""
    return build_config({
        "data": {"datasets": ["zhiling_zh"], "cutoff_len": 128},
        "training": {"method": "lora", "max_steps": options.max_steps, "learning_rate": options.learning_rate,
                     "lr_scheduler": "cosine", "warmup_steps": 5, "packing": True,
                     "packing_tokens": options.packing_tokens, "logging_steps": 1,
                     "save_steps": options.max_steps + 1, "resume": False, "seed": 42},
        "lora": {"rank": options.lora_rank, "alpha": 2 * options.lora_rank, "dropout": 0.0,
                 "target_modules": "all-linear"},
        "output": {"dir": options.output_dir},
    }, source="quickstart")


def held_out_rows(limit: int | None) -> list[dict]:
    """The bundled test rows (all, or the first ``limit`` of each task in proportion, keeping file order)."""
    rows = [json.loads(line) for line in bundled_data_path("test").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if limit is None or limit >= len(rows):
        return rows
    share = limit / len(rows)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    keep = {id(row) for task_rows in by_task.values() for row in task_rows[:max(1, round(len(task_rows) * share))]}
    return [row for row in rows if id(row) in keep]


def shown_rows(rows: list[dict]) -> list[dict]:
    """One row each of three tasks, to show answers before and after."""
    picked = []
    for task in SHOWN_TASKS:
        picked += [row for row in rows if row["task"] == task][:1]
    return picked


def answer_rows(engine, rows: list[dict], options: QuickstartOptions, label: str) -> list[str]:
    """Greedy answers for ``rows``, generated in batches of similar prompt length (left padding)."""
    from zhiling.config import GenerationConfig
    from zhiling.infer.engine import ChatRequest
    from zhiling.train.progress import TrainProgress

    params = GenerationConfig(max_new_tokens=options.max_new_tokens, do_sample=False)
    requests = [ChatRequest(query=row["messages"][0]["content"], system=row.get("system") or None) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: len(engine.prompt_ids(requests[i])))
    answers: list[str] = [""] * len(rows)
    bar = TrainProgress(len(rows), 0, enabled=options.show_progress, description=label, unit="rows")
    try:
        for start in range(0, len(order), options.batch_size):
            chunk = order[start:start + options.batch_size]
            for index, result in zip(chunk, engine.generate([requests[i] for i in chunk], params)):
                answers[index] = result.text.strip()
            bar.update(min(start + options.batch_size, len(order)))
    finally:
        bar.close()
    return answers


def score_answers(rows: list[dict], answers: list[str], seconds: float) -> tuple[Scores, list[float]]:
    from zhiling.eval.metrics import char_f1, exact_match

    per_row = [score_record(row, answer) for row, answer in zip(rows, answers)]
    by_task: dict[str, list[float]] = defaultdict(list)
    for row, score in zip(rows, per_row):
        by_task[row["task"]].append(score)
    references = [row["messages"][-1]["content"] for row in rows]
    per_task = {task: sum(by_task[task]) / len(by_task[task]) for task in BUNDLED_TASKS if by_task.get(task)}
    scores = Scores(per_task, sum(per_row) / len(per_row),
                    sum(exact_match(a, r) for a, r in zip(answers, references)) / len(rows),
                    sum(char_f1(a, r) for a, r in zip(answers, references)) / len(rows), len(rows), seconds)
    return scores, per_row


def _engine(model, tokenizer, template):
    from zhiling.infer.hf_engine import HFEngine, context_length_of

    model.eval()
    model.config.use_cache = True  # training turned the key/value cache off; generation needs it back
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    return HFEngine(model, tokenizer, template, context_length=context_length_of(model.config, tokenizer),
                    model_id="default")


def _say(console, message: str) -> None:
    console.print(message, highlight=False)


def _show_examples(console, title: str, examples: list[dict], key: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=True)
    table.add_column("task")
    table.add_column("question", overflow="fold")
    table.add_column("reference", overflow="fold")
    table.add_column("answer", overflow="fold")
    for example in examples:
        table.add_row(example["task"], example["prompt"], example["reference"], example[key] or "(empty)")
    console.print(table)


def run_quickstart(options: QuickstartOptions, console=None) -> QuickstartReport:
    from rich.console import Console

    from zhiling.models.chat_setup import resolve_chat_setup
    from zhiling.models.loader import load_model
    from zhiling.train.trainer import Trainer

    console = console or Console(stderr=True)
    started = time.perf_counter()
    phases: dict[str, float] = {}
    cfg = training_config(options)
    rows = held_out_rows(options.eval_rows)

    _say(console, f"[bold]1/4[/] base model answers on {len(rows)} held-out rows")
    clock = time.perf_counter()
    setup = resolve_chat_setup(cfg.model, cfg.template.name, adapter=cfg.training.init_adapter,
                               system=cfg.template.system)  # as the trainer resolves them
    tokenizer, template = setup.tokenizer, setup.template
    base = load_model(cfg.model, source=setup.source)
    phases["load"] = time.perf_counter() - clock
    clock = time.perf_counter()
    before_answers = answer_rows(_engine(base, tokenizer, template), rows, options, "base model")
    before, before_rows = score_answers(rows, before_answers, time.perf_counter() - clock)
    phases["score before"] = before.seconds
    del base
    examples = [{"id": row["id"], "task": row["task"], "prompt": row["messages"][0]["content"],
                 "reference": row["messages"][-1]["content"], "before": before_answers[rows.index(row)]}
                for row in shown_rows(rows)]
    _show_examples(console, "base model (before training)", examples, "before")
    _say(console, f"held-out score before training: {before.overall:.3f}")

    _say(console, f"[bold]2/4[/] training a LoRA adapter ({options.max_steps} steps)")
    clock = time.perf_counter()
    trainer = Trainer(cfg, show_progress=options.show_progress, announce=lambda message: _say(console, message))
    result = trainer.run()
    phases["train"] = time.perf_counter() - clock

    _say(console, f"[bold]3/4[/] answers with the adapter on the same {len(rows)} rows")
    clock = time.perf_counter()
    after_answers = answer_rows(_engine(trainer.model, trainer.tokenizer, trainer.template), rows, options,
                                "with adapter")
    after, after_rows = score_answers(rows, after_answers, time.perf_counter() - clock)
    phases["score after"] = after.seconds
    for example in examples:
        example["after"] = after_answers[next(i for i, row in enumerate(rows) if row["id"] == example["id"])]
    _show_examples(console, "with the adapter (after training)", examples, "after")

    out = Path(options.output_dir)
    report = QuickstartReport(out, before, after, examples, result.train_seconds, time.perf_counter() - started,
                              result.final_loss, result.final_dir, result.chat_command, phases)
    _say(console, "[bold]4/4[/] writing the report")
    write_outputs(report, rows, before_answers, after_answers, before_rows, after_rows, cfg)
    report.total_seconds = time.perf_counter() - started
    print_scores(console, report)
    return report


def write_outputs(report: QuickstartReport, rows, before_answers, after_answers, before_rows, after_rows,
                  cfg) -> None:
    out = report.output_dir
    with (out / "answers.jsonl").open("w", encoding="utf-8") as handle:
        for row, a, b, sa, sb in zip(rows, before_answers, after_answers, before_rows, after_rows):
            handle.write(json.dumps({"id": row["id"], "task": row["task"], "prompt": row["messages"][0]["content"],
                                     "reference": row["messages"][-1]["content"], "before": a, "after": b,
                                     "score_before": sa, "score_after": sb}, ensure_ascii=False) + "\n")
    summary = {"before": report.before.__dict__, "after": report.after.__dict__, "train_seconds": report.train_seconds,
               "total_seconds": report.total_seconds, "final_loss": report.final_loss, "phases": report.phases,
               "adapter": str(report.adapter), "chat_command": report.chat_command,
               "settings": {"training": cfg.training.model_dump(mode="json"), "lora": cfg.lora.model_dump(mode="json"),
                            "cutoff_len": cfg.data.cutoff_len}}
    (out / "scores.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report, cfg), encoding="utf-8")
    report.eval_report = write_eval_report(out / "eval", rows, before_answers, after_answers)


QUICKSTART_METRICS = "em,f1,rouge_l,ner:entity,sentiment:accuracy,bundled"


def write_eval_report(folder: Path, rows, before_answers, after_answers) -> Path:
    """The before/after comparison as `zhiling eval` writes it: a prediction file and a metrics run per system,
    then `eval compare`'s Markdown + self-contained HTML report (per-task chart, answers side by side)."""
    from zhiling.eval import reference_eval
    from zhiling.eval.predictions import read_predictions
    from zhiling.eval.report import build_report, write_report
    from zhiling.eval.rundir import read_run

    specs = reference_eval.parse_metric_specs(QUICKSTART_METRICS, has_labels=True)
    labels = reference_eval.parse_label_specs(["sentiment=积极,消极"])
    runs = []
    for name, answers in (("base model", before_answers), ("fine-tuned", after_answers)):
        slug = "base" if name == "base model" else "lora"
        pred = folder / f"{slug}.pred.jsonl"
        pred.parent.mkdir(parents=True, exist_ok=True)
        with pred.open("w", encoding="utf-8") as handle:
            for row, answer in zip(rows, answers):
                item = {"id": row["id"], "prompt": row["messages"][0]["content"], "output": answer,
                        "reference": row["messages"][-1]["content"], "task": row["task"]}
                if row.get("check") is not None:
                    item["check"] = row["check"]
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
        run_dir, _, _ = reference_eval.write_metrics_run(read_predictions(pred), folder / slug, specs, labels, "task",
                                                         name)
        runs.append(read_run(run_dir))
    report = build_report(runs, samples=6, pick="diff", chart_metric="bundled",
                          title="zhiling quickstart: base model vs fine-tuned")
    _, page = write_report(report, folder / "report")
    return page


def report_markdown(report: QuickstartReport, cfg) -> str:
    before, after = report.before, report.after
    lines = ["# zhiling quickstart", "",
             f"Gemma 3 270M (the embedded default model) fine-tuned with LoRA (rank {cfg.lora.rank}, every linear "
             f"layer) on the bundled Chinese instruction data (zhiling_zh, 600 rows), {cfg.training.max_steps} steps "
             f"of up to {cfg.training.packing_tokens} packed tokens, learning rate {cfg.training.learning_rate:g}. "
             f"Scored on the {before.rows} held-out rows (never trained on), greedy answers.", "",
             "| task | before | after |", "|---|---:|---:|"]
    for task in before.per_task:
        lines.append(f"| {task} | {before.per_task[task]:.3f} | {after.per_task.get(task, 0.0):.3f} |")
    lines += [f"| **overall** | **{before.overall:.3f}** | **{after.overall:.3f}** |",
              f"| exact match | {before.exact_match:.3f} | {after.exact_match:.3f} |",
              f"| character F1 | {before.char_f1:.3f} | {after.char_f1:.3f} |", "",
              "Scores: sentiment, one_word and rewrite rows need the exact answer; list rows the right number of "
              "items from the right category; entity extraction (ner) is entity-set F1.", "",
              "## Answers before and after", ""]
    for example in report.examples:
        lines += [f"**{example['task']}**: {example['prompt']}", "",
                  f"- reference: `{_inline(example['reference'])}`",
                  f"- before: `{_inline(example['before']) or '(empty)'}`",
                  f"- after: `{_inline(example['after']) or '(empty)'}`", ""]
    lines += ["## Time", "", "| phase | seconds |", "|---|---:|"]
    lines += [f"| {phase} | {seconds:.1f} |" for phase, seconds in report.phases.items()]
    lines += [f"| total | {report.total_seconds:.1f} |", "",
              f"Final training loss: {report.final_loss:.4f}." if report.final_loss is not None else "", "",
              "![loss](loss.png)", "", "## Chat with it", "", "```", report.chat_command, "```", ""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    return text.replace("\n", " / ").replace("`", "'")


def print_scores(console, report: QuickstartReport) -> None:
    from rich.table import Table

    table = Table(title="held-out score", title_justify="left")
    table.add_column("task")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for task, value in report.before.per_task.items():
        table.add_row(task, f"{value:.3f}", f"{report.after.per_task.get(task, 0.0):.3f}")
    table.add_row("[bold]overall[/]", f"[bold]{report.before.overall:.3f}[/]", f"[bold]{report.after.overall:.3f}[/]")
    console.print(table)
    console.print(f"time: {report.total_seconds:.0f} s (training {report.train_seconds:.0f} s); report: "
                  f"{report.output_dir / 'report.md'}; side by side: {report.eval_report}", highlight=False)
    console.print(f"chat with it: {report.chat_command}", highlight=False, markup=False)
