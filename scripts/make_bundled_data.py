#!/usr/bin/env python
"""Generate the bundled Chinese instruction data (zhiling_zh) from templates and word lists.

    python scripts/make_bundled_data.py                  # rewrites src/zhiling/resources/data/zhiling_zh_*.jsonl
    python scripts/make_bundled_data.py --out-dir /tmp/x # writes somewhere else (same bytes)
    python scripts/make_bundled_data.py --tokenizer ~/.cache/zhiling/models/gemma-3-270m   # also token stats

Every sentence is built from the lists in ``zhiling.data.bundled_words``; nothing is copied from an existing
dataset. The output is deterministic: a fixed seed, no set or dict-order randomness, so re-running gives the same
bytes. Train and test are drawn from one pool of unique prompts, so no test prompt appears in training.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from zhiling.data import bundled_words as W
from zhiling.data.bundled import BUNDLED_SOURCE, bundled_task_names, score_bundled
from zhiling.data.records import validate_record

SEED = 20261117
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "src" / "zhiling" / "resources" / "data"
TRAIN_FILE = f"{BUNDLED_SOURCE}_train.jsonl"
TEST_FILE = f"{BUNDLED_SOURCE}_test.jsonl"

# Rows per task and stratum: (train, test). Mix: ner 35%, sentiment 25%, list 15%, one_word 10%, rewrite 15%.
PLAN = {
    "ner": {"entities": (168, 34), "none": (42, 8)},
    "sentiment": {"积极": (75, 15), "消极": (75, 15)},
    "list": {"all": (90, 18)},
    "one_word": {"all": (60, 12)},
    "rewrite": {"question": (45, 9), "negation": (45, 9)},
}

NER_PROMPT = "找出下面句子中的人名、地名和机构名：{sentence}"
SENTIMENT_PROMPT = "判断这条评论的情感倾向，只回答积极或消极：{review}"
LIST_PROMPTS = ("列出{n}{measure}{category}，用顿号分隔。", "请列举{n}{measure}{category}，用顿号分隔。")
ONE_WORD_PROMPT = "用一个词回答：{question}"
REWRITE_PROMPTS = {"question": "把这句话改成疑问句：{sentence}", "negation": "把这句话改成否定句：{sentence}"}
CHINESE_NUMBERS = {2: "两", 3: "三", 4: "四", 5: "五", 6: "六"}
NO_ENTITY = "没有"


# ----------------------------------------------------------------------------------------------- tasks
# Each maker takes (rng, stratum) and returns one candidate (prompt, answer, extra keys); the caller keeps
# drawing until it has enough unique prompts.

def person_name(rng: random.Random) -> str:
    return rng.choice(W.SURNAMES) + rng.choice(W.GIVEN_NAMES)


def entity_value(rng: random.Random, slot: str) -> str:
    if slot == "P":
        return person_name(rng)
    if slot == "COMP":
        return rng.choice(W.COMPANY_PREFIXES) + rng.choice(W.COMPANY_KINDS)
    pools = {"CITY": W.CITIES, "PROV": W.PROVINCES, "UNI": W.UNIVERSITIES, "HOSP": W.HOSPITALS,
             "INST": W.INSTITUTIONS}
    return rng.choice(pools[slot])


def everyday_sentence(rng: random.Random) -> str:
    return rng.choice(W.SUBJECTS) + rng.choice(W.TIME_WORDS) + rng.choice(W.ACTIVITIES) + "。"


def fill_ner_template(rng: random.Random, template: str) -> tuple[str, list[str]]:
    """Fill <SLOT> markers left to right with distinct entities; return the sentence and its answer lines."""
    text = template.replace("{T}", rng.choice(W.TIME_WORDS)).replace("{A}", rng.choice(W.ACTIVITIES))
    text = text.replace("{S}", rng.choice(W.SUBJECTS))
    sentence, lines, used = "", [], set()
    while "<" in text:
        before, rest = text.split("<", 1)
        slot, text = rest.split(">", 1)
        value = entity_value(rng, slot)
        while value in used:
            value = entity_value(rng, slot)
        used.add(value)
        sentence += before + value
        lines.append(f"{value}_{W.SLOT_TYPES[slot]}")
    return sentence + text, lines


def make_ner(rng: random.Random, stratum: str) -> tuple[str, str, dict]:
    if stratum == "none":
        sentence, answer = everyday_sentence(rng), NO_ENTITY
    else:
        sentence, lines = fill_ner_template(rng, rng.choice(W.NER_TEMPLATES))
        answer = "\n".join(lines)
    return NER_PROMPT.format(sentence=sentence), answer, {}


def make_sentiment(rng: random.Random, label: str) -> tuple[str, str, dict]:
    domain = W.SENTIMENT_DOMAINS[rng.choice(sorted(W.SENTIMENT_DOMAINS))]
    polarity = "positive" if label == "积极" else "negative"
    phrases = rng.sample(domain[polarity], rng.choice((1, 2)))
    review = rng.choice(domain["items"]) + "，".join(phrases) + "，" + rng.choice(domain[polarity + "_end"]) + "。"
    return SENTIMENT_PROMPT.format(review=review), label, {}


def make_list(rng: random.Random, _stratum: str) -> tuple[str, str, dict]:
    category = rng.choice(sorted(W.LIST_CATEGORIES))
    measure, items = W.LIST_CATEGORIES[category]
    n = rng.choice(sorted(CHINESE_NUMBERS))
    prompt = rng.choice(LIST_PROMPTS).format(n=CHINESE_NUMBERS[n], measure=measure, category=category)
    return prompt, "、".join(rng.sample(items, n)), {"check": {"category": category, "n": n}}


def one_word_questions() -> list[tuple[str, str]]:
    """Every (question, answer) the fact tables give, in a fixed order."""
    questions = [(f"{province}省的省会是哪座城市？", capital) for province, capital in W.PROVINCE_CAPITALS]
    for country, capital in W.COUNTRY_CAPITALS:
        questions.append((f"{country}的首都是哪座城市？", capital))
        questions.append((f"{capital}是哪个国家的首都？", country))
    for first, second in W.ANTONYMS:
        questions.append((f"“{first}”的反义词是什么？", second))
        questions.append((f"“{second}”的反义词是什么？", first))
    questions += [(f"{thing}是什么颜色的？", colour) for thing, colour in W.THING_COLOURS]
    return questions


def make_one_word(rng: random.Random, _stratum: str) -> tuple[str, str, dict]:
    question, answer = rng.choice(one_word_questions())
    return ONE_WORD_PROMPT.format(question=question), answer, {}


def make_rewrite(rng: random.Random, rule: str) -> tuple[str, str, dict]:
    subject, verb = rng.choice(W.SUBJECTS), rng.choice(W.NEGATABLE_VERBS)
    obj = rng.choice(W.VERB_OBJECTS[verb])
    if rule == "negation":
        sentence, answer = f"{subject}{verb}{obj}。", f"{subject}不{verb}{obj}。"
    else:
        sentence = everyday_sentence(rng) if rng.random() < 0.6 else f"{subject}{verb}{obj}。"
        answer = sentence[:-1] + "吗？"
    return REWRITE_PROMPTS[rule].format(sentence=sentence), answer, {}


MAKERS = {"ner": make_ner, "sentiment": make_sentiment, "list": make_list, "one_word": make_one_word,
          "rewrite": make_rewrite}


# ----------------------------------------------------------------------------------------------- assembly

def draw_unique(rng: random.Random, task: str, stratum: str, count: int, seen: set[str]) -> list[dict]:
    """``count`` rows of one stratum whose prompts appear nowhere else in the data set."""
    rows, attempts = [], 0
    while len(rows) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise SystemExit(f"error: could not draw {count} unique '{task}/{stratum}' prompts; "
                             f"the word lists are too small for the plan")
        prompt, answer, extra = MAKERS[task](rng, stratum)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"system": "", "messages": [{"role": "user", "content": prompt},
                                                {"role": "assistant", "content": answer}],
                     "source": BUNDLED_SOURCE, "task": task, **extra})
    return rows


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    train, test = [], []
    for task in bundled_task_names():
        for stratum, (n_train, n_test) in PLAN[task].items():
            rows = draw_unique(rng, task, stratum, n_train + n_test, seen)
            test += rows[:n_test]
            train += rows[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    for number, row in enumerate(train + test, start=1):
        row["id"] = f"{BUNDLED_SOURCE}-{number:06d}"
    ordered = lambda row: {key: row[key] for key in ("id", "system", "messages", "source", "task", "check")
                           if key in row}
    return [ordered(row) for row in train], [ordered(row) for row in test]


def check(train: list[dict], test: list[dict]) -> None:
    """Fail loudly if the generated data breaks its own contract."""
    for row in train + test:
        validate_record(row)
        reference = row["messages"][-1]["content"]
        if score_bundled(row["task"], reference, reference, row.get("check")) != 1.0:
            raise SystemExit(f"error: {row['id']}: the reference answer does not score 1.0 against itself")
    overlap = {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in test}
    if overlap:
        raise SystemExit(f"error: {len(overlap)} test prompts also appear in training, e.g. {sorted(overlap)[0]}")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(text.encode("utf-8"))


def print_stats(name: str, rows: list[dict], tokenizer=None) -> None:
    print(f"{name}: {len(rows)} rows")
    header = f"  {'task':<10}{'rows':>6}{'share':>7}  {'prompt chars med/max':>21}  {'answer chars med/max':>21}"
    if tokenizer is not None:
        header += f"  {'prompt tok med/max':>19}  {'answer tok med/max':>19}"
    print(header)
    for task in bundled_task_names():
        task_rows = [row for row in rows if row["task"] == task]
        prompts = [row["messages"][0]["content"] for row in task_rows]
        answers = [row["messages"][1]["content"] for row in task_rows]
        line = (f"  {task:<10}{len(task_rows):>6}{len(task_rows) / len(rows):>7.0%}  "
                f"{med_max([len(p) for p in prompts]):>21}  {med_max([len(a) for a in answers]):>21}")
        if tokenizer is not None:
            count = lambda texts: [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            line += f"  {med_max(count(prompts)):>19}  {med_max(count(answers)):>19}"
        print(line)


def med_max(values: list[int]) -> str:
    return f"{statistics.median(values):g}/{max(values)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help=f"where to write {TRAIN_FILE} and {TEST_FILE} (default: the package's resources)")
    parser.add_argument("--tokenizer", help="optional tokenizer folder or hub id; adds token-length stats")
    args = parser.parse_args(argv)

    train, test = build()
    check(train, test)
    write_jsonl(args.out_dir / TRAIN_FILE, train)
    write_jsonl(args.out_dir / TEST_FILE, test)

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print_stats(str(args.out_dir / TRAIN_FILE), train, tokenizer)
    print_stats(str(args.out_dir / TEST_FILE), test, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
