"""Score a prediction file against its references (what ``zhiling eval metrics`` runs).

Metrics are chosen by name; ``TASK:NAME`` limits one to the rows of one task (``ner:entity``), so one call can
score a mixed file (``--by task``) with the right metric for each task. Label sets work the same way:
``积极,消极`` applies to every ``accuracy`` row, ``sentiment=积极,消极`` to the rows of one task.

Every row gets a ``score`` (the mean of its metric values, used for worst-first sorting) and its per-metric
values; rows without a reference are counted, never silently dropped.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from statistics import fmean
from typing import Callable

from zhiling.errors import DataError, ZhilingError
from zhiling.eval import metrics as M
from zhiling.eval.predictions import Prediction, PredictionFile
from zhiling.eval.tables import Table
from zhiling.names import suggestion

TEXT_METRICS: dict[str, Callable[[str, M.Reference], float]] = {
    "em": M.exact_match, "f1": M.char_f1, "rouge_l": M.rouge_l, "bleu4": M.bleu4,
}
METRIC_NAMES = ("em", "f1", "rouge_l", "bleu4", "entity", "accuracy", "bundled")
DEFAULT_METRICS = ("em", "f1", "rouge_l", "bleu4")
# summary key shown in tables for each metric
HEADLINE = {"em": "em", "f1": "f1", "rouge_l": "rouge_l", "bleu4": "bleu4", "entity": "entity_f1",
            "accuracy": "accuracy", "bundled": "bundled"}


def bundled_scorer() -> Callable[..., float] | None:
    """``zhiling.data.bundled.score_bundled`` when that module is installed, else None."""
    if importlib.util.find_spec("zhiling.data.bundled") is None:
        return None
    from zhiling.data.bundled import score_bundled

    return score_bundled


@dataclass(frozen=True)
class MetricSpec:
    name: str
    task: str | None = None  # None: every row

    def applies(self, row: Prediction) -> bool:
        return self.task is None or row.task == self.task

    def __str__(self) -> str:
        return f"{self.task}:{self.name}" if self.task else self.name


def parse_metric_specs(text: str | None, has_labels: bool = False) -> list[MetricSpec]:
    if not text:
        names = list(DEFAULT_METRICS) + (["accuracy"] if has_labels else [])
        return [MetricSpec(n) for n in names]
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        task, _, name = item.rpartition(":")
        if name not in METRIC_NAMES:
            raise ZhilingError(f"--metrics: unknown metric {name!r}{suggestion(name, METRIC_NAMES)} (choose from {', '.join(METRIC_NAMES)}; "
                               f"TASK:NAME limits one to a task)")
        spec = MetricSpec(name, task.strip() or None)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ZhilingError("--metrics: no metric named")
    return specs


def parse_label_specs(values: list[str] | None) -> dict[str | None, list[str]]:
    """``["积极,消极"]`` -> {None: [...]}; ``["sentiment=积极,消极"]`` -> {"sentiment": [...]}."""
    result: dict[str | None, list[str]] = {}
    for value in values or []:
        task, sep, labels = value.partition("=")
        key = task.strip() if sep else None
        items = [label.strip() for label in (labels if sep else value).split(",") if label.strip()]
        try:
            M.label_lookup(items)
        except ValueError as exc:
            raise ZhilingError(f"--labels {value!r}: {exc}") from None
        if key in result:
            raise ZhilingError(f"--labels given twice for {'task ' + key if key else 'all rows'}")
        result[key] = items
    return result


@dataclass
class _Group:
    """The rows of one group (overall, or one task): per-row values and the (prediction, reference) pairs that
    dataset-level metrics (corpus BLEU, micro entity F1, label accuracy) are computed from."""

    rows: int = 0
    without_reference: int = 0
    values: dict[str, list[float]] = field(default_factory=dict)
    pairs: dict[str, list[tuple[str, M.Reference]]] = field(default_factory=dict)
    label_pairs: dict[str | None, list[tuple[str, str]]] = field(default_factory=dict)

    def summary(self, label_sets: dict[str | None, list[str]]) -> dict:
        out: dict = {"rows": self.rows, "without_reference": self.without_reference}
        for name, values in self.values.items():
            out[f"{name}_rows"] = len(values)
            if name in TEXT_METRICS or name == "bundled":
                out[name] = fmean(values)
        if "bleu4" in self.pairs:
            preds, refs = zip(*self.pairs["bleu4"])
            out["bleu4_corpus"] = M.corpus_bleu4(preds, refs)
        if "entity" in self.pairs:
            preds, refs = zip(*self.pairs["entity"])
            scores = M.entity_prf(preds, refs)
            out.update({"entity_precision": scores["precision"], "entity_recall": scores["recall"],
                        "entity_f1": scores["f1"], "entity_malformed": scores["malformed"],
                        "entity_per_type": scores["per_type"]})
        if self.label_pairs:
            correct = total = out_of_set = 0
            per_label: dict[str, dict] = {}
            for key, pairs in self.label_pairs.items():
                preds, refs = zip(*pairs)
                result = M.label_accuracy(preds, refs, label_sets[key])
                correct, total, out_of_set = (correct + result.correct, total + result.total,
                                              out_of_set + result.out_of_set)
                prefix = f"{key}:" if key is not None and len(self.label_pairs) > 1 else ""
                per_label.update({prefix + label: v for label, v in result.per_label.items()})
            out.update({"accuracy": correct / total, "out_of_set": out_of_set, "per_label": per_label})
        return out


@dataclass
class MetricsResult:
    summary: dict
    rows: list[dict]


class _Scorer:
    def __init__(self, specs: list[MetricSpec], labels: dict[str | None, list[str]]):
        self.specs = specs
        self.labels = labels
        self.lookups = {key: M.label_lookup(items) for key, items in labels.items()}
        self.bundled = None
        if any(spec.name == "bundled" for spec in specs):
            self.bundled = bundled_scorer()
            if self.bundled is None:
                raise ZhilingError("metric 'bundled' needs zhiling.data.bundled, which this install does not have")
        if any(spec.name == "accuracy" for spec in specs) and not labels:
            raise ZhilingError("metric 'accuracy' needs a label set: --labels 积极,消极 (or TASK=LABEL,...)")

    def label_key(self, row: Prediction) -> str | None:
        if row.task is not None and row.task in self.labels:
            return row.task
        if None in self.labels:
            return None
        raise ValueError(f"no label set for task {row.task!r} (give --labels {row.task or 'TASK'}=A,B,...)")

    def score(self, row: Prediction, groups: list[_Group]) -> dict:
        """Per-row values and notes; the row's pairs are added to every group it belongs to."""
        specs = [spec for spec in self.specs if spec.applies(row)]
        if row.reference is None:
            for group in groups:
                group.without_reference += 1
            return {"scores": {}, "notes": ["no reference"] if specs else []}
        scores: dict[str, float] = {}
        notes: list[str] = []
        for spec in specs:
            name, value = spec.name, None
            try:
                if name in TEXT_METRICS:
                    value = TEXT_METRICS[name](row.output, row.reference)
                elif name == "entity":
                    counts, _ = M.entity_counts(row.output, _single(row.reference, name))
                    value = counts.scores()["f1"]
                    if counts.malformed:
                        notes.append("malformed entity line(s): " + ", ".join(M.parse_entities(row.output).malformed))
                elif name == "accuracy":
                    key = self.label_key(row)
                    reference = _single(row.reference, name)
                    if M.match_label(reference, self.lookups[key]) is None:
                        raise ValueError(f"reference {reference!r} is not one of the labels "
                                         f"{', '.join(self.labels[key])}")
                    guess = M.match_label(row.output, self.lookups[key])
                    if guess is None:
                        notes.append("prediction is not in the label set")
                    value = float(guess == M.match_label(reference, self.lookups[key]))
                    for group in groups:
                        group.label_pairs.setdefault(key, []).append((row.output, reference))
                elif name == "bundled":
                    value = float(self.bundled(row.task or "", row.output, _single(row.reference, name),
                                               row.extra.get("check")))
            except ValueError as exc:
                raise DataError(str(exc), field="reference") from None
            scores[HEADLINE[name]] = value
            for group in groups:
                group.values.setdefault(name, []).append(value)
                if name in ("bleu4", "entity"):
                    group.pairs.setdefault(name, []).append((row.output, row.reference if name == "bleu4"
                                                             else _single(row.reference, name)))
        return {"scores": scores, "notes": notes}


def _single(reference: M.Reference, metric: str) -> str:
    if isinstance(reference, str):
        return reference
    if len(reference) == 1:
        return reference[0]
    raise ValueError(f"metric '{metric}' needs a single reference string, got a list of {len(reference)}")


def evaluate(predictions: PredictionFile, specs: list[MetricSpec], labels: dict[str | None, list[str]] | None = None,
             by: str | None = None, progress: Callable[[], None] | None = None) -> MetricsResult:
    """Score every row; ``by="task"`` adds one group per task (rows without a task go to ``(none)``)."""
    if by not in (None, "task"):
        raise ZhilingError(f"--by: can group by 'task' only, not {by!r}")
    scorer = _Scorer(specs, labels or {})
    overall = _Group()
    groups: dict[str, _Group] = {}
    out_rows = []
    for row in predictions.rows:
        targets = [overall]
        if by == "task":
            targets.append(groups.setdefault(row.task or "(none)", _Group()))
        for group in targets:
            group.rows += 1
        try:
            result = scorer.score(row, targets)
        except DataError as err:
            raise err.located(predictions.path, row.line) from None
        values = list(result["scores"].values())
        out_rows.append({**row.as_dict(), "line": row.line,
                         "score": fmean(values) if values else None, **result})
        if progress:
            progress()
    if overall.rows == overall.without_reference:
        raise ZhilingError(f"{predictions.path}: no row has a 'reference', so there is nothing to score against")
    unused = [str(spec) for spec in specs if spec.name not in overall.values]
    summary = {"file": predictions.path, "metrics": [str(s) for s in specs], "labels": {(k or "*"): v for k, v in
               (labels or {}).items()}, "by": by, "overall": overall.summary(labels or {}),
               "groups": {name: g.summary(labels or {}) for name, g in sorted(groups.items())}, "unused_metrics": unused,
               "meta": predictions.meta}
    return MetricsResult(summary, out_rows)


def sort_worst_first(rows: list[dict]) -> list[dict]:
    """Rows with the lowest mean score first; unscored rows (no reference) last, file order kept on ties."""
    return sorted(rows, key=lambda r: (r["score"] is None, r["score"] if r["score"] is not None else 0.0))


def headline(summary_part: dict) -> dict[str, float]:
    """The one number per metric that tables and charts show."""
    keys = ("em", "f1", "rouge_l", "bleu4", "entity_f1", "accuracy", "bundled")
    return {k: summary_part[k] for k in keys if k in summary_part}


COLUMN_NAMES = {"em": "EM", "f1": "F1", "rouge_l": "ROUGE-L", "bleu4": "BLEU-4", "entity_f1": "entity F1",
                 "accuracy": "accuracy", "bundled": "bundled"}


def metrics_tables(summary: dict) -> list[Table]:
    """Headline table (overall and one line per group), then per-type and per-label detail when present."""
    parts = [("overall", summary["overall"])] + list(summary["groups"].items())
    keys = [k for k in COLUMN_NAMES if any(k in part for _, part in parts)]
    extras = [k for k in ("entity_malformed", "out_of_set") if any(k in part for _, part in parts)]
    extra_names = {"entity_malformed": "malformed", "out_of_set": "out of set"}
    main = Table("Reference metrics (%)", ["group", "rows", "no ref"] + [COLUMN_NAMES[k] for k in keys]
                 + [extra_names[k] for k in extras],
                 note="scores are percentages; entity F1 is micro over all rows; BLEU-4 is the mean sentence BLEU")
    for name, part in parts:
        main.add(name, part["rows"], part["without_reference"], *[part.get(k) for k in keys],
                 *[part.get(k) for k in extras])
    tables = [main]
    overall = summary["overall"]
    if overall.get("entity_per_type"):
        table = Table("Entities by type (%)", ["type", "precision", "recall", "F1", "predicted", "gold"])
        for kind, s in overall["entity_per_type"].items():
            table.add(kind, s["precision"], s["recall"], s["f1"], s["predicted"], s["gold"])
        tables.append(table)
    if overall.get("per_label"):
        table = Table("Labels (%)", ["label", "precision", "recall", "F1", "support"])
        for label, s in overall["per_label"].items():
            table.add(label, s["precision"], s["recall"], s["f1"], s["support"])
        tables.append(table)
    return tables


def write_metrics_run(predictions: PredictionFile, out_dir, specs: list[MetricSpec],
                      labels: dict[str | None, list[str]] | None = None, by: str | None = None,
                      name: str | None = None, worst_first: bool = False, progress=None):
    """Score a prediction file and write a metrics RUN_DIR (what `zhiling eval metrics` does).
    Returns (run folder, MetricsResult, tables)."""
    from zhiling.eval.rundir import write_run
    from zhiling.eval.tables import markdown_document

    pred_path = predictions.path
    result = evaluate(predictions, specs, labels, by, progress=progress)
    rows = sort_worst_first(result.rows) if worst_first else result.rows
    tables = metrics_tables(result.summary)
    out = write_run(out_dir, "metrics", summary=result.summary, rows=rows,
                    markdown=markdown_document(f"Reference metrics: {pred_path}", tables),
                    inputs=[str(pred_path)], name=name,
                    options={"metrics": [str(s) for s in specs], "labels": result.summary["labels"], "by": by,
                             "worst_first": worst_first})
    return out, result, tables
