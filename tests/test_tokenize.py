"""Tokenization: which label positions are trained, how long rows are cut, and the cache key."""

import pytest

from tiny import make_tokenizer
from zhiling.data.templates import TEMPLATES
from zhiling.data.tokenize import (IGNORE_INDEX, TokenizeOptions, build_example, cache_key, cut_pieces,
                                   tokenize_records, tokenizer_fingerprint)


def record(*pairs, system=""):
    messages = []
    for user, answer in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"system": system, "messages": messages}


TWO_TURNS = record(("你好", "你好！"), ("今天天气如何？", "很好。"))


def test_prompt_masked_and_every_answer_trained_with_eos(tiny_tokenizer):
    template = TEMPLATES["belle"]
    pieces = template.encode(tiny_tokenizer, None, [("你好", "你好！"), ("今天天气如何？", "很好。")])
    example = build_example(template, tiny_tokenizer, TWO_TURNS, TokenizeOptions())
    expected_labels = []
    for prompt, answer in pieces:
        expected_labels += [IGNORE_INDEX] * len(prompt) + answer
    assert example["labels"] == expected_labels
    assert example["input_ids"] == [t for p, a in pieces for t in p + a]
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert trained.count(tiny_tokenizer.eos_token_id) == 2  # EOS closes each answer
    assert tiny_tokenizer.decode(trained, skip_special_tokens=True) == "你好！很好。"


def test_mask_history_trains_only_the_last_answer(tiny_tokenizer):
    example = build_example(TEMPLATES["belle"], tiny_tokenizer, TWO_TURNS, TokenizeOptions(mask_history=True))
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(trained, skip_special_tokens=True) == "很好。"
    assert trained[-1] == tiny_tokenizer.eos_token_id


def test_train_on_prompt_trains_every_token(tiny_tokenizer):
    example = build_example(TEMPLATES["alpaca"], tiny_tokenizer, TWO_TURNS, TokenizeOptions(train_on_prompt=True))
    assert example["labels"] == example["input_ids"]


def test_cut_prompt_first_keeping_head_and_tail():
    prompt, answer = list(range(100)), list(range(1000, 1010))
    (kept_prompt, kept_answer), = cut_pieces([(prompt, answer)], 50)[0]
    assert kept_answer == answer  # the answer is whole
    assert len(kept_prompt) == 40
    assert kept_prompt[:24] == prompt[:24] and kept_prompt[24:] == prompt[-16:]  # head + the cue at the end


def test_cut_answer_after_prompt_reaches_its_floor():
    prompt, answer = list(range(40)), list(range(1000, 1100))
    pieces, truncated = cut_pieces([(prompt, answer)], 40)
    (kept_prompt, kept_answer), = pieces
    assert truncated and len(kept_prompt) == 10 and kept_answer == answer[:30]


def test_cut_multi_turn_keeps_early_rounds_and_drops_later():
    rounds = [(list(range(10)), list(range(10))), (list(range(10)), list(range(10))), (list(range(10)), [1] * 10)]
    pieces, truncated = cut_pieces(rounds, 45)
    assert truncated and len(pieces) == 3 and sum(len(p) + len(a) for p, a in pieces) == 45
    pieces, _ = cut_pieces(rounds, 40)
    assert len(pieces) == 2  # the third round has no room left
    assert cut_pieces(rounds, 60) == (rounds, False)


def test_tokenize_records_report_cache_and_drop_long(tiny_tokenizer, tmp_path):
    records = [record(("你好" * (i % 9 + 1), "好的" * (i % 4 + 1))) for i in range(200)]
    template = TEMPLATES["chatml"]
    options = TokenizeOptions(cutoff_len=24)
    first = tokenize_records(lambda: iter(records), "fp-1", template, tiny_tokenizer, options, cache_dir=tmp_path)
    assert not first.from_cache and first.report["rows"] == 200 and first.report["kept"] == 200
    assert first.report["truncated"] > 0 and max(first.dataset["length"]) <= 24
    again = tokenize_records(lambda: iter(records), "fp-1", template, tiny_tokenizer, options, cache_dir=tmp_path)
    assert again.from_cache and again.report == first.report
    assert again.dataset["input_ids"] == first.dataset["input_ids"]

    dropping = tokenize_records(lambda: iter(records), "fp-1", template, tiny_tokenizer,
                                TokenizeOptions(cutoff_len=24, drop_long=True), cache_dir=tmp_path)
    assert dropping.report["dropped_long"] == first.report["truncated"]
    assert dropping.report["kept"] == 200 - first.report["truncated"]
    assert len(dropping.dataset) == dropping.report["kept"] and not any(dropping.dataset["truncated"])


def test_two_processes_give_the_same_rows(tiny_tokenizer, tmp_path):
    records = [record((f"问题{i}", f"回答{i}")) for i in range(300)]
    template = TEMPLATES["alpaca_zh"]
    one = tokenize_records(lambda: iter(records), None, template, tiny_tokenizer, TokenizeOptions(),
                           cache_dir=tmp_path / "a")
    two = tokenize_records(lambda: iter(records), None, template, tiny_tokenizer, TokenizeOptions(), num_proc=2,
                           cache_dir=tmp_path / "b")
    assert one.dataset["input_ids"] == two.dataset["input_ids"]
    assert one.dataset["labels"] == two.dataset["labels"]


def test_cache_key_changes_with_every_input(tiny_tokenizer):
    base = cache_key("data", TEMPLATES["chatml"], tiny_tokenizer, TokenizeOptions())
    assert base == cache_key("data", TEMPLATES["chatml"], tiny_tokenizer, TokenizeOptions())
    assert base != cache_key("other", TEMPLATES["chatml"], tiny_tokenizer, TokenizeOptions())
    assert base != cache_key("data", TEMPLATES["alpaca"], tiny_tokenizer, TokenizeOptions())
    assert base != cache_key("data", TEMPLATES["chatml"], tiny_tokenizer, TokenizeOptions(cutoff_len=512))
    assert base != cache_key("data", TEMPLATES["chatml"], tiny_tokenizer, TokenizeOptions(mask_history=True))
    changed = make_tokenizer(vocab_size=500)  # a different vocabulary never reuses a stale cache
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(tiny_tokenizer)
    assert base != cache_key("data", TEMPLATES["chatml"], changed, TokenizeOptions())


def test_changed_tokenizer_does_not_reuse_cache(tiny_tokenizer, tmp_path):
    records = [record(("你好", "好的"))]
    first = tokenize_records(lambda: iter(records), "fp", TEMPLATES["belle"], tiny_tokenizer, TokenizeOptions(),
                             cache_dir=tmp_path)
    other = make_tokenizer(vocab_size=450)
    second = tokenize_records(lambda: iter(records), "fp", TEMPLATES["belle"], other, TokenizeOptions(),
                              cache_dir=tmp_path)
    assert not second.from_cache and second.cache_path != first.cache_path


def test_all_rows_too_long_is_an_error(tiny_tokenizer, tmp_path):
    from zhiling.errors import ZhilingError

    records = [record(("很长的问题" * 20, "回答"))]
    with pytest.raises(ZhilingError, match="every row is longer than cutoff_len=8"):
        tokenize_records(lambda: iter(records), "fp", TEMPLATES["belle"], tiny_tokenizer,
                         TokenizeOptions(cutoff_len=8, drop_long=True), cache_dir=tmp_path)


def test_a_bad_row_surfaces_as_the_data_error_itself(tiny_tokenizer, tmp_path):
    from zhiling.errors import DataError

    def records():
        yield record(("你好", "好的"))
        raise DataError("missing field 'output'", "data.jsonl", 2, "output")

    with pytest.raises(DataError, match="data.jsonl, line 2, field 'output': missing field"):
        tokenize_records(records, "fp-bad", TEMPLATES["belle"], tiny_tokenizer, TokenizeOptions(), cache_dir=tmp_path)


def test_records_source_may_hold_unpicklable_things(tiny_tokenizer, tmp_path):
    """The record generator is a closure (over a console, a lock ...); datasets must not need to pickle it."""
    import threading

    from rich.console import Console

    console, lock = Console(), threading.Lock()

    def records():
        with lock:
            console.log  # noqa: B018 - the closure holds both
            yield record(("你好", "好的"))

    out = tokenize_records(records, "fp-closure", TEMPLATES["belle"], tiny_tokenizer, TokenizeOptions(),
                           cache_dir=tmp_path)
    assert out.report["rows"] == 1


def test_tokenize_benchmark_runs_and_reports(tiny_model_dir, tmp_path):
    """bench/tokenize_scale.py end to end on a few rows (its numbers are measured on the real model, see bench/)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "tokenize_scale.py"
    done = subprocess.run([sys.executable, str(script), "--rows", "300", "--model", str(tiny_model_dir("llama")),
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["rows"] == 300 and report["tokens"] > 300
    assert report["peak_anonymous_all_processes_gib"] > 0
