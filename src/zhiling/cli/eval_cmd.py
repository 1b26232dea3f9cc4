"""``zhiling eval ...``: reference metrics, multiple choice, the judged category suite, and comparison reports.

Only argument parsing and printing live here; the work is in ``zhiling.eval``.
"""

from __future__ import annotations

import sys

from zhiling.cli.common import add_command, add_group


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- metrics

def _run_metrics(args) -> int:
    from zhiling.eval import reference_eval as R
    from zhiling.eval.predictions import read_predictions
    from zhiling.eval.progress import progress_bar
    from zhiling.eval.tables import print_tables

    predictions = read_predictions(args.pred)
    labels = R.parse_label_specs(args.labels)
    specs = R.parse_metric_specs(args.metrics, has_labels=bool(labels))
    with progress_bar(len(predictions.rows), "scoring", enabled=not args.quiet) as advance:
        out, result, tables = R.write_metrics_run(predictions, args.output, specs, labels, args.by, args.name,
                                                  args.worst_first, progress=advance)
    print_tables(tables)
    overall = result.summary["overall"]
    if result.summary["unused_metrics"]:
        _warn(f"no row was scored with: {', '.join(result.summary['unused_metrics'])} (check the task names)")
    if overall["without_reference"]:
        _warn(f"{overall['without_reference']} row(s) have no reference and were not scored (listed in rows.jsonl)")
    if overall.get("out_of_set"):
        _warn(f"{overall['out_of_set']} prediction(s) are not in the label set (counted wrong)")
    if overall.get("entity_malformed"):
        _warn(f"{overall['entity_malformed']} malformed entity line(s) in predictions (counted as wrong entities)")
    print(f"wrote {out}/summary.json, {out}/summary.md and {out}/rows.jsonl"
          f"{' (worst rows first)' if args.worst_first else ''}")
    return 0


def _register_metrics(group) -> None:
    parser = add_command(
        group, "metrics", func=_run_metrics, help="score predictions against references",
        description="""
        Score a prediction file (jsonl rows with prompt, output and reference, as `zhiling predict` writes)
        with reference metrics: exact match (em), character-level F1 (f1), ROUGE-L (rouge_l) and BLEU-4 (bleu4),
        all on characters for Chinese and words for English; label accuracy with a closed label set (accuracy);
        entity precision / recall / F1 over 实体_类型 lines (entity); and the bundled-data task scorer (bundled).
        A metric written TASK:NAME applies only to rows of that task. Writes a RUN_DIR: run.json, summary.json,
        summary.md and rows.jsonl (per-row scores).""",
        examples="""
        zhiling eval metrics --pred preds.jsonl -o runs/eval/base
        zhiling eval metrics --pred preds.jsonl --metrics accuracy --labels 积极,消极 -o runs/eval/sent
        zhiling eval metrics --pred ner.jsonl --metrics entity,em --worst-first -o runs/eval/ner
        zhiling eval metrics --pred bundled.jsonl --by task \\
            --metrics em,f1,ner:entity,sentiment:accuracy,bundled --labels sentiment=积极,消极 -o runs/eval/lora
        """)
    parser.add_argument("--pred", required=True, metavar="PRED.jsonl", help="prediction file")
    parser.add_argument("--metrics", metavar="LIST",
                        help="comma-separated metrics, each NAME or TASK:NAME (default: em,f1,rouge_l,bleu4, "
                             "plus accuracy when --labels is given)")
    parser.add_argument("--labels", action="append", metavar="[TASK=]A,B,...",
                        help="label set for accuracy; repeat with TASK= for one set per task")
    parser.add_argument("--by", choices=["task"], help="also report every metric per task")
    parser.add_argument("--worst-first", action="store_true",
                        help="write rows.jsonl sorted by each row's mean score, lowest first")
    parser.add_argument("--name", help="run name shown in reports (default: the output folder name)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="run folder to write")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------- judge

def _parse_answer_specs(specs: list[str]) -> list[tuple[str, str]]:
    from pathlib import Path

    from zhiling.errors import ZhilingError

    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name.strip() or not path.strip():
            raise ZhilingError(f"--answers {spec!r}: expected NAME=PRED.jsonl")
        pairs.append((name.strip(), path.strip()))
    return pairs


SUITE_HELP = ("suite jsonl, or a folder of per-category JSON arrays of prompts as DreamerGPT's test_data/ "
              "(01qa.json -> category qa, ids qa-01, qa-02, ...) (default: bundled)")


def _categories(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _run_judge(args) -> int:
    from zhiling.eval.jobs import JudgeJob, run_judge_job
    from zhiling.eval.tables import print_tables

    job = JudgeJob(answers=_parse_answer_specs(args.answers), judge_url=args.judge_url, judge_model=args.judge_model,
                   output=args.output, suite=args.suite, categories=_categories(args.categories), limit=args.limit,
                   api_key_env=args.api_key_env, retries=args.retries, concurrency=args.concurrency,
                   timeout=args.timeout, http_retries=args.http_retries, cache_dir=args.cache_dir,
                   no_cache=args.no_cache, retry_unparsed=args.retry_unparsed, name=args.name,
                   human_scores=args.human_scores)
    done = run_judge_job(job, warn=_warn, note=lambda message: print(f"note: {message}", file=sys.stderr),
                         progress=not args.quiet)
    out = done.out
    print_tables(done.tables)
    print(f"{done.requests} judge request(s) sent, {done.cached} of {done.items} prompt(s) answered from the cache")
    if done.counts.get("unparsed"):
        _warn(f"{done.counts['unparsed']} prompt(s) marked unparsed: the judge never answered in the required format "
              f"(left out of the means; see rows.jsonl, re-ask with --retry-unparsed)")
    print(f"wrote {out}/summary.json, {out}/summary.md and {out}/rows.jsonl")
    done.raise_for_errors()
    return 0


def _register_judge(group) -> None:
    parser = add_command(
        group, "judge", func=_run_judge, help="have a judge model score systems on the category suite",
        description="""
        Score the answers of one or more systems on a judged category suite (the bundled one has 9 categories x
        10 Chinese prompts: knowledge, translation, writing, sentiment, reading, culture, code, safety, math).
        A judge model behind any OpenAI-compatible endpoint sees all systems' answers side by side and gives each
        an integer 0-10 under a fixed rubric. Malformed judge answers are retried, then marked unparsed (never
        guessed). Judge answers are cached per endpoint, so a re-run sends no request. Writes a RUN_DIR with the
        leaderboard (the URL without credentials). $OPENAI_API_KEY is sent only to https://api.openai.com; any other
        server gets the key in the variable named by --api-key-env, or none. --suite also takes a folder laid out
        as DreamerGPT's test_data/ (one JSON array of prompts per category file); --human-scores sets people's
        scores beside the judge's, per category, with their Spearman rank correlation.""",
        examples="""
        zhiling eval suite-prompts -o suite.jsonl
        zhiling predict --model M --input suite.jsonl --output base.jsonl
        zhiling predict --model M --adapter runs/lora --input suite.jsonl --output lora.jsonl
        export OPENAI_API_KEY=sk-...
        zhiling eval judge --answers base=base.jsonl --answers lora=lora.jsonl \\
            --judge-url https://api.openai.com/v1 --judge-model gpt-4o -o runs/judge
        zhiling eval judge --answers lora.jsonl --judge-url http://127.0.0.1:8000/v1 --judge-model qwen \\
            --categories code,math --limit 3 -o runs/judge-quick
        DEEPSEEK_KEY=sk-... zhiling eval judge --answers lora.jsonl --judge-url https://api.deepseek.com/v1 \\
            --judge-model deepseek-chat --api-key-env DEEPSEEK_KEY -o runs/judge-ds
        zhiling eval judge --suite test_data/ --answers base=base.jsonl --answers lora=lora.jsonl \\
            --human-scores human.csv --judge-url http://127.0.0.1:8000/v1 --judge-model qwen -o runs/judge-dreamer
        """)
    parser.add_argument("--suite", default="bundled", metavar="bundled|FILE|FOLDER", help=SUITE_HELP)
    parser.add_argument("--answers", action="append", required=True, metavar="NAME=PRED.jsonl",
                        help="one system's prediction file, matched to the suite by id (repeat per system)")
    parser.add_argument("--human-scores", metavar="FILE",
                        help="people's scores (CSV or jsonl: id or category + index, system, score 0-10, rater; or "
                             "category, system, total, count), shown beside the judge's with their agreement")
    parser.add_argument("--judge-url", required=True, metavar="URL",
                        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--judge-model", required=True, metavar="MODEL", help="model name at that endpoint")
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="environment variable holding this endpoint's API key (default: OPENAI_API_KEY for "
                             "https://api.openai.com, no key for any other URL)")
    parser.add_argument("--categories", metavar="LIST", help="only these comma-separated categories")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N prompts of each category")
    parser.add_argument("--retries", type=int, default=2, metavar="N",
                        help="re-ask a malformed judge answer up to N times (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, metavar="N", help="parallel requests (default 4)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds per request (default 120); a prompt still unanswered after the retries is "
                             "marked error")
    parser.add_argument("--http-retries", type=int, default=2, metavar="N",
                        help="client retries on connection / server errors and timeouts (default 2)")
    parser.add_argument("--cache-dir", metavar="DIR", help="judge cache folder (default: ~/.cache/zhiling/judge)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the judge cache")
    parser.add_argument("--retry-unparsed", action="store_true",
                        help="ask again for prompts whose cached judge answer was unparsed")
    parser.add_argument("--name", help="run name shown in reports (default: the output folder name)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="run folder to write")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _run_suite_prompts(args) -> int:
    from zhiling.eval.suite import load_suite, write_suite_prompts

    categories = _categories(args.categories)
    items = load_suite(args.suite, categories, args.limit)
    path = write_suite_prompts(items, args.output)
    print(f"wrote {len(items)} prompt(s) in {len({i.category for i in items})} categories to {path}")
    return 0


def _register_suite_prompts(group) -> None:
    parser = add_command(
        group, "suite-prompts", func=_run_suite_prompts, help="export the judged suite's prompts for predict",
        description="""
        Write the prompts of a judged suite as canonical prompt-only records (one user turn, with the suite id
        and category), ready for `zhiling predict --input`. The ids carry through to the prediction file, which
        is how `zhiling eval judge --answers` matches answers to prompts.""",
        examples="""
        zhiling eval suite-prompts -o suite.jsonl
        zhiling eval suite-prompts --categories culture,safety --limit 5 -o small.jsonl
        zhiling eval suite-prompts --suite my_suite.jsonl -o my_prompts.jsonl
        zhiling eval suite-prompts --suite DreamerGPT/test_data -o dreamer_prompts.jsonl
        """)
    parser.add_argument("--suite", default="bundled", metavar="bundled|FILE|FOLDER", help=SUITE_HELP)
    parser.add_argument("--categories", metavar="LIST", help="only these comma-separated categories")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N prompts of each category")
    parser.add_argument("-o", "--output", required=True, metavar="PROMPTS.jsonl", help="file to write")


# --------------------------------------------------------------------------------------------------- compare

def _run_compare(args) -> int:
    from zhiling.eval.report import build_report, write_report
    from zhiling.eval.rundir import read_run

    runs = [read_run(path) for path in args.runs]
    report = build_report(runs, samples=args.samples, seed=args.seed, pick=args.pick,
                          chart_metric=args.chart_metric, title=args.title)
    markdown, page = write_report(report, args.output)
    charts = sum(len(section.charts) for section in report.sections)
    print(f"compared {len(runs)} run(s): wrote {markdown}, {page} and {charts} chart(s) in {markdown.parent}/charts")
    return 0


def _register_compare(group) -> None:
    parser = add_command(
        group, "compare", func=_run_compare, help="compare eval runs in a Markdown + HTML report",
        description="""
        Read RUN_DIRs written by `zhiling eval metrics`, `eval judge` and `eval mc` and write REPORT_DIR/report.md
        (charts in REPORT_DIR/charts) and a self-contained REPORT_DIR/report.html (charts embedded): metric
        tables, per-task / per-category / per-subject bar charts, and the answers of every run (or every judged
        system) side by side for a sample of rows, matched by id. Put the base run first.""",
        examples="""
        zhiling eval compare runs/eval/base runs/eval/lora -o reports/base-vs-lora
        zhiling eval compare runs/eval/base runs/eval/lora --pick diff --samples 10 -o reports/diff
        zhiling eval compare runs/judge runs/mc-base runs/mc-lora --chart-metric f1 -o reports/all
        """)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders written by zhiling eval commands")
    parser.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="folder to write the report to")
    parser.add_argument("--samples", type=int, default=5, metavar="N",
                        help="rows shown side by side per section (default 5; 0 for none)")
    parser.add_argument("--pick", choices=["random", "diff"], default="random",
                        help="which rows: a seeded random sample, or those whose scores differ most between "
                             "runs / systems (default random)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random sample (default 0)")
    parser.add_argument("--chart-metric", metavar="KEY",
                        help="metric charted per task: em, f1, rouge_l, bleu4, entity_f1, accuracy, bundled "
                             "(default: the first the runs have)")
    parser.add_argument("--title", default="zhiling evaluation report", help="report title")


# --------------------------------------------------------------------------------------------------- mc

def _run_mc(args) -> int:
    from zhiling.eval.jobs import MCJob, mc_prompts, run_mc_job
    from zhiling.eval.tables import print_tables

    job = MCJob(data=args.data, dev=args.dev, shots=args.shots, lang=args.lang, option_text=args.option_text,
                subjects=_categories(args.subjects), limit=args.limit, batch_size=args.batch_size, model=args.model,
                adapter=args.adapter, template=args.template, chat=args.chat, output=args.output, name=args.name)
    if args.print_prompts is not None:
        for prompt in mc_prompts(job, args.print_prompts):
            print(f"===== {prompt.id} (answer {prompt.answer}; options scored: {prompt.letters})")
            print(prompt.text)
        return 0
    done = run_mc_job(job, progress=not args.quiet)
    print_tables(done.tables)
    print(f"wrote {done.out}/summary.json, {done.out}/summary.md and {done.out}/rows.jsonl")
    return 0


def _register_mc(group) -> None:
    parser = add_command(
        group, "mc", func=_run_mc, help="multiple-choice benchmarks (C-Eval, CMMLU, MMLU style)",
        description="""
        Score multiple-choice questions by the log-likelihood the model gives each option letter (and, with
        --option-text, each option's text, normalized by its length). Reads C-Eval, CMMLU and MMLU style CSV
        files or jsonl, one file per subject; reports accuracy per subject, overall, macro and per category
        (from a C-Eval style subject_mapping.json). Zero-shot by default; --shots K puts K solved examples of
        the same subject first (from --dev, else the subject's other questions). `bundled` is a small sample
        written for zhiling (5 subjects x 10 questions).""",
        examples="""
        zhiling eval mc --print-prompts 2 --shots 1            # look at the prompts, no model needed
        zhiling eval mc --model runs/merged -o runs/mc-merged   # the bundled sample
        zhiling eval mc --data ceval/val --dev ceval/dev --shots 5 --model M --adapter runs/lora -o runs/ceval
        zhiling eval mc --data mmlu/test --dev mmlu/dev --shots 5 --lang en --model M -o runs/mmlu
        """)
    parser.add_argument("--data", nargs="+", default=["bundled"], metavar="PATH",
                        help="files or folders of per-subject files, or 'bundled' (default)")
    parser.add_argument("--dev", metavar="DIR", help="folder with the few-shot examples per subject")
    parser.add_argument("--shots", type=int, default=0, metavar="K", help="few-shot examples per question")
    parser.add_argument("--lang", choices=["auto", "zh", "en"], default="auto",
                        help="instruction language (auto: Chinese when the question has Chinese characters)")
    parser.add_argument("--option-text", action="store_true", help="also score the option texts")
    parser.add_argument("--subjects", metavar="LIST", help="only these comma-separated subjects")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N questions of each subject")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="questions per scoring call")
    parser.add_argument("--print-prompts", type=int, metavar="N", help="print the first N prompts and stop")
    parser.add_argument("--model", help="model to score with (hub id, folder or GGUF; default: the default model)")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder")
    parser.add_argument("--chat", action="store_true",
                        help="ask through the chat template recorded with the adapter (or the model's own): the "
                             "question as the user turn, the option as the start of the answer")
    parser.add_argument("--template", help="ask through this chat template (implies --chat)")
    parser.add_argument("--name", help="run name shown in reports (default: the output folder name)")
    parser.add_argument("-o", "--output", metavar="OUT_DIR", help="run folder to write (required unless "
                        "--print-prompts)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------- ppl

def _run_ppl(args) -> int:
    from zhiling.eval.jobs import PplJob, run_ppl_job

    job = PplJob(data=args.data, format=args.format, registry=args.registry, model=args.model, adapter=args.adapter,
                 template=args.template, cutoff=args.cutoff, mask_history=args.mask_history, limit=args.limit,
                 batch_size=args.batch_size, output=args.output)
    done = run_ppl_job(job, announce=lambda message: print(message, file=sys.stderr), progress=not args.quiet)
    summary = done.summary
    print(f"perplexity {summary['perplexity']:.3f} (mean NLL {summary['nll']:.4f} over {summary['tokens']:,} "
          f"answer tokens of {summary['rows']:,} rows; template '{summary['template']}')")
    if done.out:
        print(f"wrote {done.out}/perplexity.json and {done.out}/perplexity_rows.jsonl")
    return 0


def _register_ppl(group) -> None:
    parser = add_command(
        group, "ppl", func=_run_ppl, help="perplexity on held-out data (training's template and masking)",
        description="""
        Perplexity of a model (with an optional adapter) on held-out conversations: the mean negative
        log-likelihood of exactly the tokens training learns (the answers and their end tokens), rendered with the
        template recorded with the adapter (or --template), then exp().""",
        examples="""
        zhiling eval ppl --data zhiling_zh_test                             # the default model
        zhiling eval ppl --data zhiling_zh_test --adapter runs/quickstart/adapter -o runs/ppl-after
        zhiling eval ppl --data belle_test.json --model Qwen/Qwen2.5-0.5B --template chatml --cutoff 1024
        """)
    parser.add_argument("--data", required=True, help="data file, registry name or hf:NAME")
    parser.add_argument("--format", default="auto", help="input format (default: detect)")
    parser.add_argument("--registry", help="extra dataset registry YAML")
    parser.add_argument("--model", help="model (hub id, folder or GGUF; default: the default model)")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder")
    parser.add_argument("--template", help="template (default: the one recorded with the adapter)")
    parser.add_argument("--cutoff", type=int, default=1024, help="cutoff_len, as in training (default 1024)")
    parser.add_argument("--mask-history", action="store_true", help="score only the last answer of each row")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N rows")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N")
    parser.add_argument("-o", "--output", metavar="OUT_DIR", help="write perplexity.json and per-row scores here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(sub) -> None:
    group = add_group(sub, "eval", help="evaluate predictions: metrics, multiple choice, judged suite, reports",
                      description="Score predictions against references, run multiple-choice benchmarks, have a "
                                  "judge model grade a bundled category suite, and compare runs in one report.")
    _register_metrics(group)
    _register_judge(group)
    _register_suite_prompts(group)
    _register_mc(group)
    _register_ppl(group)
    _register_compare(group)
