"""The work behind ``zhiling eval judge``, ``eval mc`` and ``eval ppl``: read the inputs, load what scores them,
run, and write the run folder. Each takes a small job dataclass of plain values (what the command line says) and
returns what the caller prints; the CLI only parses arguments and prints.

Messages meant for the user while the job runs (notes, warnings, which data was read) go to the ``warn`` /
``note`` / ``announce`` callbacks, in the order they happen; heavy imports (models, torch) stay inside the
functions so that ``zhiling eval metrics`` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from zhiling.errors import ZhilingError
from zhiling.eval.progress import progress_bar
from zhiling.eval.tables import Table, markdown_document

Say = Callable[[str], object]


def _silent(message: str) -> None:
    return None


# --------------------------------------------------------------------------------------------------- judge

@dataclass
class JudgeJob:
    answers: list[tuple[str, str]]  # (system name, prediction file)
    judge_url: str
    judge_model: str
    output: str | Path
    suite: str | Path = "bundled"
    categories: list[str] | None = None
    limit: int | None = None
    api_key_env: str | None = None
    retries: int = 2
    concurrency: int = 4
    timeout: float = 120.0
    http_retries: int = 2
    cache_dir: str | Path | None = None  # None: ~/.cache/zhiling/judge
    no_cache: bool = False
    retry_unparsed: bool = False
    name: str | None = None
    human_scores: str | Path | None = None  # CSV / jsonl of people's scores, shown beside the judge's


@dataclass
class JudgeOutcome:
    out: Path
    tables: list[Table]
    items: int
    requests: int
    cached: int
    counts: dict[str, int] = field(default_factory=dict)

    def raise_for_errors(self) -> None:
        """Fail when some judge requests never got an answer (the run folder is written; a re-run retries them)."""
        if self.counts.get("error"):
            raise ZhilingError(f"{self.counts['error']} judge request(s) failed (see 'reason' in "
                               f"{self.out}/rows.jsonl); run the same command again to retry them, judged prompts "
                               "come from the cache")


def run_judge_job(job: JudgeJob, *, warn: Say = _silent, note: Say = _silent, progress: bool = True) -> JudgeOutcome:
    """Judge every system's answers on the suite and write the run folder (leaderboard in summary.json)."""
    from zhiling.eval import human_scores as H
    from zhiling.eval import judge as J
    from zhiling.eval.endpoint import api_key_for, plain_http_warning, redact_url
    from zhiling.eval.predictions import read_predictions
    from zhiling.eval.rundir import write_run
    from zhiling.eval.suite import answers_from_predictions, load_suite
    from zhiling.paths import cache_root

    suite = load_suite(job.suite, job.categories, job.limit)
    # checked before any judge request: ids against the whole suite, systems against --answers
    human = (H.read_human_scores(job.human_scores, load_suite(job.suite), [name for name, _ in job.answers])
             if job.human_scores else None)
    systems = []
    for name, path in job.answers:
        answers = answers_from_predictions(name, read_predictions(path), suite)
        for message in answers.warnings:
            warn(message)
        systems.append(answers)
    api_key, key_note = api_key_for(job.judge_url, job.api_key_env)
    note(key_note)
    insecure = plain_http_warning(job.judge_url, sends_key=api_key is not None)
    if insecure:
        warn(insecure)
    client = J.OpenAIJudge(job.judge_url, job.judge_model, api_key, timeout=job.timeout,
                           max_retries=job.http_retries)
    cache_dir = None if job.no_cache else (job.cache_dir or cache_root() / "judge")
    cache = J.JudgeCache(cache_dir)
    with progress_bar(len(suite), "judging", enabled=progress) as advance:
        run = J.run_judge(client, suite, systems, cache=cache, retries=job.retries, concurrency=job.concurrency,
                          retry_unparsed=job.retry_unparsed, progress=advance)
    board = J.leaderboard(run.items, run.systems)
    tables = [J.ranking_table(board, run.systems), J.leaderboard_table(board, run.systems)]
    counts = {"items": len(run.items), "requests": run.requests, "cached": run.cached, **run.counts}
    summary = {"judge_model": job.judge_model, "judge_url": redact_url(job.judge_url),
               "rubric_version": J.RUBRIC_VERSION,
               "suite": str(job.suite), "systems": [{"name": s.name, "source": s.source} for s in systems],
               "leaderboard": board, "counts": counts}
    if human is not None:
        summary["human"] = H.compare_with_judge(human, run.items, board, run.systems)
        tables.append(H.human_table(summary["human"], run.systems))
        by_id = {row["id"]: row for row in run.items}
        for row_id, scores in H.human_rows(human, run.items).items():
            by_id[row_id]["human"] = scores
    out = write_run(job.output, "judge", summary=summary, rows=run.items, name=job.name,
                    markdown=markdown_document(f"Judge: {job.judge_model} on suite {job.suite}", tables),
                    inputs=[s.source for s in systems] + ([str(job.human_scores)] if human else []),
                    options={"categories": job.categories, "limit": job.limit, "retries": job.retries,
                             "cache_dir": str(cache_dir) if cache_dir else None,
                             **({"human_scores": str(job.human_scores)} if human else {})})
    return JudgeOutcome(out, tables, len(run.items), run.requests, run.cached, dict(run.counts))


# --------------------------------------------------------------------------------------------------- mc

@dataclass
class MCJob:
    data: list[str] = field(default_factory=lambda: ["bundled"])  # files / folders, or "bundled"
    dev: str | None = None
    shots: int = 0
    lang: str = "auto"
    option_text: bool = False
    subjects: list[str] | None = None
    limit: int | None = None
    batch_size: int = 16
    model: str | None = None
    adapter: str | None = None
    template: str | None = None
    chat: bool = False
    output: str | Path | None = None
    name: str | None = None

    def data_paths(self) -> list:
        from zhiling.eval import mc

        return [mc.bundled_sample_dir() if item == "bundled" else item for item in self.data]


@dataclass
class MCPrompt:
    id: str
    answer: str
    letters: list[str]  # the continuations scored for the option letters
    text: str


def mc_prompts(job: MCJob, count: int) -> list[MCPrompt]:
    """The first ``count`` prompts the job would score (no model needed)."""
    from zhiling.eval import mc

    subjects = mc.read_mc(job.data_paths(), job.subjects, job.limit)
    dev = mc.read_mc([job.dev]) if job.dev else None
    prompts: list[MCPrompt] = []
    for name, subject in subjects.items():
        for question in subject.questions:
            if len(prompts) >= count:
                return prompts
            lang = mc.question_lang(question, job.lang)
            shots = mc.pick_shots(question, job.shots, dev.get(name) if dev else None, subject)
            letters = [mc.letter_continuation(letter, lang) for letter in question.letters]
            prompts.append(MCPrompt(question.id, question.answer, letters, mc.build_prompt(question, subject, shots,
                                                                                           lang)))
    return prompts


@dataclass
class MCOutcome:
    out: Path
    tables: list[Table]


def run_mc_job(job: MCJob, *, progress: bool = True) -> MCOutcome:
    """Score every question by option log-likelihood and write the run folder."""
    from zhiling.eval import mc
    from zhiling.eval.rundir import write_run
    from zhiling.eval.scoring import load_option_scorer

    data = job.data_paths()
    subjects = mc.read_mc(data, job.subjects, job.limit)
    dev = mc.read_mc([job.dev]) if job.dev else None
    if not job.output:
        raise ZhilingError("-o OUT_DIR is required (unless --print-prompts)")
    scorer = load_option_scorer(model=job.model, adapter=job.adapter, template=job.template, chat=job.chat)
    total = sum(len(s.questions) for s in subjects.values())
    with progress_bar(total, "scoring options", enabled=progress) as advance:
        result = mc.evaluate_mc(subjects, scorer, shots=job.shots, dev=dev, lang=job.lang,
                                option_text=job.option_text, batch_size=job.batch_size, progress=advance)
    options = {"shots": job.shots, "lang": job.lang, "option_text": job.option_text, "model": job.model,
               "adapter": job.adapter, "dev": job.dev}
    tables = mc.mc_tables(result.summary)
    out = write_run(job.output, "mc", summary={**result.summary, **options}, rows=result.rows, name=job.name,
                    markdown=markdown_document("Multiple choice", tables), inputs=[str(p) for p in data],
                    options=options)
    return MCOutcome(out, tables)


# --------------------------------------------------------------------------------------------------- ppl

@dataclass
class PplJob:
    data: str  # data file, registry name or hf:NAME
    format: str = "auto"
    registry: str | None = None
    model: str | None = None
    adapter: str | None = None
    template: str | None = None
    cutoff: int = 1024
    mask_history: bool = False
    limit: int | None = None
    batch_size: int = 8
    output: str | Path | None = None


@dataclass
class PplOutcome:
    summary: dict  # perplexity, nll, tokens, rows, model, adapter, template, data
    out: Path | None  # where perplexity.json and perplexity_rows.jsonl were written, if anywhere


def run_ppl_job(job: PplJob, *, announce: Say = _silent, progress: bool = True) -> PplOutcome:
    """Perplexity over the tokens training learns, with the template recorded with the adapter (or ``template``)."""
    import json

    from zhiling.data.registry import iter_mixed_records
    from zhiling.data.tokenize import TokenizeOptions
    from zhiling.eval.perplexity import perplexity
    from zhiling.eval.rundir import write_jsonl
    from zhiling.eval.scoring import prepare_scoring_model

    prepared = prepare_scoring_model(job.model, job.adapter, job.template)
    announce(f"using {prepared.where}")
    records = list(iter_mixed_records([job.data], job.registry, job.format, job.limit, announce=announce))
    model = prepared.load()
    options = TokenizeOptions(cutoff_len=job.cutoff, mask_history=job.mask_history)
    with progress_bar(len(records), "perplexity", enabled=progress) as advance:
        result = perplexity(model, prepared.tokenizer, prepared.template, records, options, job.batch_size, advance)
    summary = {key: value for key, value in result.items() if key != "per_row"}
    summary.update(model=prepared.source.origin, adapter=job.adapter, template=prepared.template.name, data=job.data)
    out = None
    if job.output:
        out = Path(job.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "perplexity.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
        write_jsonl(out / "perplexity_rows.jsonl", result["per_row"])
    return PplOutcome(summary, out)
