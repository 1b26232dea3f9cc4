"""Reference metrics: pure functions from (prediction, reference) to scores in [0, 1].

Tokenization (used by every token-based metric: exact match, F1, ROUGE-L, BLEU-4)
-------------------------------------------------------------------------------
Text is first normalized with Unicode NFKC (full-width letters, digits and punctuation become their ASCII forms)
and lower-cased. Then, scanning left to right:

* every CJK character (Han ideographs incl. extensions, kana, hangul) is one token: ``"北京大学"`` -> 北 京 大 学;
* every run of other letters and digits is one word token; an apostrophe, period or hyphen *between* two such
  characters stays inside the word, so ``don't``, ``3.14`` and ``state-of-the-art`` are single tokens;
* whitespace, punctuation and symbols are dropped (``"你好，world!"`` -> 你 好 world).

So Chinese is scored at character level, English at word level, and mixed text gets both in one sequence
(``"我用Python 3.12"`` -> 我 用 python 3.12).

Conventions
-----------
* Two texts that both have no tokens count as identical (score 1); one empty and one not scores 0.
* A reference may be a list of strings (several acceptable answers): exact match, F1 and ROUGE-L take the best
  reference; BLEU-4 clips n-gram counts against all references together (standard multi-reference BLEU).
* BLEU-4 is sentence-level with brevity penalty, geometric mean over orders 1..min(4, hypothesis length)
  ("effective order", so a one-character answer is not scored against 4-grams it cannot have), and for an order
  with no matching n-gram the precision is replaced by ``1 / (2**k * total)`` where k counts the zero-match
  orders so far (the geometric "exp" smoothing of Chen & Cherry 2014, method 3). ``corpus_bleu4`` sums counts
  over a dataset instead and is unsmoothed.
* Label accuracy: prediction and labels are compared after NFKC, lower-casing and stripping surrounding
  whitespace and punctuation (``"积极。"`` -> ``积极``). A prediction that is not one of the labels is wrong and
  counted as out of set.
* Entities: one ``实体_类型`` per line (split at the *last* ``_``); blank lines are ignored; a text that is just
  ``没有`` is the empty set; duplicates count once per row; order is ignored. A line without ``_``, with an empty
  entity or an empty type (a stray ``没有`` among entities included) is malformed: it counts as one wrong
  prediction and is reported.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

Reference = str | Sequence[str]

_CJK = ("\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
        "\U00020000-\U0002ebef\U00030000-\U0003134f")
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+(?:['’.\-][^\W_{_CJK}]+)*")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")

NO_ENTITY = "没有"


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def tokenize(text: str) -> list[str]:
    """Characters for CJK, words for latin text, punctuation and whitespace dropped (see the module docstring)."""
    return _TOKEN.findall(normalize(text))


def _references(reference: Reference) -> list[str]:
    if isinstance(reference, str):
        return [reference]
    refs = list(reference)
    if not refs:
        raise ValueError("reference list is empty")
    return refs


# --- exact match, F1 ------------------------------------------------------------------------------------------

def exact_match(prediction: str, reference: Reference) -> float:
    """1.0 when the token sequences are equal (so case, width, spacing and punctuation do not matter)."""
    tokens = tokenize(prediction)
    return float(any(tokens == tokenize(ref) for ref in _references(reference)))


def _f1_tokens(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(not pred and not ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def char_f1(prediction: str, reference: Reference) -> float:
    """Bag-of-tokens F1 (characters for Chinese, words for English), best over references."""
    pred = tokenize(prediction)
    return max(_f1_tokens(pred, tokenize(ref)) for ref in _references(reference))


# --- ROUGE-L --------------------------------------------------------------------------------------------------

def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (bit-parallel, Hyyro 2004: O(len(b)) big-int steps)."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def _rouge_l_tokens(pred: list[str], ref: list[str], beta: float) -> float:
    if not pred or not ref:
        return float(not pred and not ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def rouge_l(prediction: str, reference: Reference, beta: float = 1.0) -> float:
    """LCS-based F-measure; ``beta`` = 1 weighs precision and recall equally. Best over references."""
    pred = tokenize(prediction)
    return max(_rouge_l_tokens(pred, tokenize(ref), beta) for ref in _references(reference))


# --- BLEU-4 ---------------------------------------------------------------------------------------------------

def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


@dataclass
class BleuStats:
    """Clipped n-gram matches and totals for orders 1..4, hypothesis length and closest reference length."""

    matches: list[int] = field(default_factory=lambda: [0] * 4)
    totals: list[int] = field(default_factory=lambda: [0] * 4)
    hyp_len: int = 0
    ref_len: int = 0

    def __iadd__(self, other: "BleuStats") -> "BleuStats":
        self.matches = [a + b for a, b in zip(self.matches, other.matches)]
        self.totals = [a + b for a, b in zip(self.totals, other.totals)]
        self.hyp_len += other.hyp_len
        self.ref_len += other.ref_len
        return self


def bleu_stats(prediction: str, reference: Reference) -> BleuStats:
    hyp = tokenize(prediction)
    refs = [tokenize(r) for r in _references(reference)]
    stats = BleuStats(hyp_len=len(hyp))
    # closest reference length, the shorter one on a tie
    stats.ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    for n in range(1, 5):
        hyp_counts = _ngrams(hyp, n)
        max_ref: Counter = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n)
        stats.matches[n - 1] = sum(min(count, max_ref[gram]) for gram, count in hyp_counts.items())
        stats.totals[n - 1] = max(len(hyp) - n + 1, 0)
    return stats


def _brevity_penalty(hyp_len: int, ref_len: int) -> float:
    if hyp_len == 0:
        return 0.0
    return 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)


def bleu4(prediction: str, reference: Reference) -> float:
    """Sentence-level BLEU-4 with brevity penalty, effective order and exp smoothing (see module docstring)."""
    stats = bleu_stats(prediction, reference)
    if stats.hyp_len == 0:
        return float(stats.ref_len == 0)
    if stats.matches[0] == 0:
        return 0.0
    log_sum, orders, zeros = 0.0, 0, 0
    for matched, total in zip(stats.matches, stats.totals):
        if total == 0:
            break
        if matched == 0:
            zeros += 1
            precision = 1.0 / (2 ** zeros * total)
        else:
            precision = matched / total
        log_sum += math.log(precision)
        orders += 1
    return _brevity_penalty(stats.hyp_len, stats.ref_len) * math.exp(log_sum / orders)


def corpus_bleu4(predictions: Iterable[str], references: Iterable[Reference]) -> float:
    """Corpus BLEU-4: n-gram counts and lengths summed over all rows first, no smoothing."""
    total = BleuStats()
    for prediction, reference in zip(predictions, references, strict=True):
        total += bleu_stats(prediction, reference)
    if min(total.matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(total.matches, total.totals)) / 4
    return _brevity_penalty(total.hyp_len, total.ref_len) * math.exp(log_precision)


# --- labels ---------------------------------------------------------------------------------------------------

def normalize_label(text: str) -> str:
    return _EDGE_PUNCT.sub("", normalize(text).strip())


@dataclass
class LabelResult:
    accuracy: float
    correct: int
    total: int
    out_of_set: int
    per_label: dict[str, dict[str, float]]
    macro_f1: float

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "out_of_set": self.out_of_set, "macro_f1": self.macro_f1, "per_label": self.per_label}


def label_lookup(labels: Sequence[str]) -> dict[str, str]:
    """Normalized form -> label as given; two labels that normalize alike are an error."""
    lookup: dict[str, str] = {}
    for label in labels:
        key = normalize_label(label)
        if not key:
            raise ValueError(f"label {label!r} is empty after normalization")
        if key in lookup:
            raise ValueError(f"labels {lookup[key]!r} and {label!r} are the same after normalization")
        lookup[key] = label
    if len(lookup) < 2:
        raise ValueError("a label set needs at least two labels")
    return lookup


def match_label(text: str, lookup: dict[str, str]) -> str | None:
    """The label ``text`` names, or None when it is not in the label set."""
    return lookup.get(normalize_label(text))


def label_accuracy(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> LabelResult:
    """Accuracy against a closed label set, with out-of-set count, per-label P/R/F1 and macro F1.

    Raises ValueError when a reference is not in the label set (that is a data problem, not a model error).
    """
    lookup = label_lookup(labels)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    counts = {label: {"tp": 0, "pred": 0, "gold": 0} for label in labels}
    correct = out_of_set = 0
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        gold = match_label(reference, lookup)
        if gold is None:
            raise ValueError(f"reference {reference!r} (row {index + 1}) is not one of the labels "
                             f"{', '.join(labels)}")
        guess = match_label(prediction, lookup)
        counts[gold]["gold"] += 1
        if guess is None:
            out_of_set += 1
            continue
        counts[guess]["pred"] += 1
        if guess == gold:
            correct += 1
            counts[gold]["tp"] += 1
    per_label = {}
    for label, c in counts.items():
        p, r, f = prf(c["tp"], c["pred"], c["gold"])
        per_label[label] = {"precision": p, "recall": r, "f1": f, "support": c["gold"]}
    total = len(references)
    macro = sum(v["f1"] for v in per_label.values()) / len(per_label)
    return LabelResult(correct / total if total else 0.0, correct, total, out_of_set, per_label, macro)


# --- entities -------------------------------------------------------------------------------------------------

@dataclass
class Entities:
    """Parsed ``实体_类型`` lines: a set of (entity, type) pairs and the malformed lines, each once."""

    items: set[tuple[str, str]]
    malformed: list[str]


def parse_entities(text: str) -> Entities:
    stripped = text.strip()
    if normalize(stripped) == NO_ENTITY:
        return Entities(set(), [])
    items: set[tuple[str, str]] = set()
    malformed: list[str] = []
    for line in stripped.splitlines():
        line = unicodedata.normalize("NFKC", line).strip()
        if not line:
            continue
        name, sep, kind = line.rpartition("_")
        name, kind = name.strip(), kind.strip()
        if not sep or not name or not kind:
            if line not in malformed:
                malformed.append(line)
            continue
        items.add((name, kind))
    return Entities(items, malformed)


def prf(true_positive: int, predicted: int, gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1; with nothing predicted and nothing to find, all three are 1."""
    if predicted == 0 and gold == 0:
        return 1.0, 1.0, 1.0
    precision = true_positive / predicted if predicted else 0.0
    recall = true_positive / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


@dataclass
class EntityCounts:
    true_positive: int = 0
    predicted: int = 0
    gold: int = 0
    malformed: int = 0

    def add(self, other: "EntityCounts") -> None:
        self.true_positive += other.true_positive
        self.predicted += other.predicted
        self.gold += other.gold
        self.malformed += other.malformed

    def scores(self) -> dict:
        p, r, f = prf(self.true_positive, self.predicted, self.gold)
        return {"precision": p, "recall": r, "f1": f, "true_positive": self.true_positive,
                "predicted": self.predicted, "gold": self.gold, "malformed": self.malformed}


def entity_counts(prediction: str, reference: str) -> tuple[EntityCounts, dict[str, EntityCounts]]:
    """Counts for one row, overall and per entity type. Raises ValueError on a malformed reference."""
    gold = parse_entities(reference)
    if gold.malformed:
        raise ValueError(f"reference has malformed entity line(s): {', '.join(map(repr, gold.malformed))} "
                         f"(expected 实体_类型 per line, or {NO_ENTITY})")
    pred = parse_entities(prediction)
    hits = pred.items & gold.items
    counts = EntityCounts(len(hits), len(pred.items) + len(pred.malformed), len(gold.items), len(pred.malformed))
    by_type: dict[str, EntityCounts] = {}
    for source, attr in ((hits, "true_positive"), (pred.items, "predicted"), (gold.items, "gold")):
        for _, kind in source:
            entry = by_type.setdefault(kind, EntityCounts())
            setattr(entry, attr, getattr(entry, attr) + 1)
    return counts, by_type


def entity_prf(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Micro precision / recall / F1 over the dataset, plus per-type scores and the malformed-line count."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    total = EntityCounts()
    per_type: dict[str, EntityCounts] = {}
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        try:
            counts, by_type = entity_counts(prediction, reference)
        except ValueError as exc:
            raise ValueError(f"row {index + 1}: {exc}") from None
        total.add(counts)
        for kind, c in by_type.items():
            per_type.setdefault(kind, EntityCounts()).add(c)
    result = total.scores()
    result["per_type"] = {kind: c.scores() for kind, c in sorted(per_type.items())}
    return result
