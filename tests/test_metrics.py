"""Reference metrics against values worked out by hand (the arithmetic is in the comments)."""

import math
import random

import pytest

from zhiling.eval import metrics as M


def test_tokenize_mixed_text():
    assert M.tokenize("我用Python 3.12写了don't，state-of-the-art！") == [
        "我", "用", "python", "3.12", "写", "了", "don't", "state-of-the-art"]
    # full-width letters/digits fold to ASCII, punctuation and spaces go
    assert M.tokenize("ＡＢＣ１２， 你好。") == ["abc12", "你", "好"]
    assert M.tokenize("。！？ ...") == []


def test_exact_match_normalizes_case_width_spacing_punctuation():
    assert M.exact_match("积极。", "积极") == 1.0
    assert M.exact_match("Hello,  World!", "hello world") == 1.0
    assert M.exact_match("积极", "消极") == 0.0
    assert M.exact_match("消极", ["积极", "消极"]) == 1.0
    assert M.exact_match("", "。") == 1.0  # both have no tokens


def test_char_f1():
    # 北京大学 vs 北京: overlap 2, P = 2/4, R = 2/2 -> F1 = 2/3
    assert M.char_f1("北京大学", "北京") == pytest.approx(2 / 3)
    # words for English: P = 2/3, R = 1 -> 0.8
    assert M.char_f1("the cat sat", "The cat") == pytest.approx(0.8)
    # mixed: [我 爱 python] vs [我 爱 python 语 言]: P = 1, R = 3/5 -> 0.75
    assert M.char_f1("我爱Python", "我爱python语言") == pytest.approx(0.75)
    # repeated characters are counted as a multiset: 哈哈哈 vs 哈 -> P = 1/3, R = 1 -> 0.5
    assert M.char_f1("哈哈哈", "哈") == pytest.approx(0.5)
    assert M.char_f1("", "北京") == 0.0
    assert M.char_f1("北京", ["上海", "北京大学"]) == pytest.approx(2 / 3)


def test_lcs_bit_parallel_matches_dynamic_programming():
    def dp(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("甲乙丙丁") for _ in range(rng.randint(0, 20))]
        b = [rng.choice("甲乙丙丁") for _ in range(rng.randint(0, 20))]
        assert M.lcs_length(a, b) == dp(a, b)


def test_rouge_l_chinese_characters():
    # LCS(北京是中国的首都, 北京是中国首都) = 7; P = 7/8, R = 7/7 -> F = 14/15
    assert M.rouge_l("北京是中国的首都", "北京是中国首都") == pytest.approx(14 / 15)
    # LCS(我爱北京天安门, 天安门我爱) = 3 (天安门); P = 3/7, R = 3/5 -> F = 2*(9/35)/(36/35) = 0.5
    assert M.rouge_l("我爱北京天安门", "天安门我爱") == pytest.approx(0.5)
    assert M.rouge_l("完全不同", "毫无关系") == 0.0
    assert M.rouge_l("", "") == 1.0
    # beta weighs recall: P = 3/7, R = 3/5, beta = 2 -> 5PR / (R + 4P)
    p, r = 3 / 7, 3 / 5
    assert M.rouge_l("我爱北京天安门", "天安门我爱", beta=2.0) == pytest.approx(5 * p * r / (r + 4 * p))


def test_bleu4_chinese_characters():
    # hyp 北京是中国的首都 (8) vs ref 北京是中国首都 (7)
    # 1-grams 7/8, 2-grams 5/7 (北京 京是 是中 中国 首都), 3-grams 3/6, 4-grams 2/5; BP = 1 (8 > 7)
    expected = (7 / 8 * 5 / 7 * 3 / 6 * 2 / 5) ** 0.25
    assert M.bleu4("北京是中国的首都", "北京是中国首都") == pytest.approx(expected)
    assert expected == pytest.approx(0.125 ** 0.25)


def test_bleu4_brevity_penalty_and_short_texts():
    # 北京 vs 北京大学: p1 = 1, p2 = 1, effective order 2; BP = exp(1 - 4/2)
    assert M.bleu4("北京", "北京大学") == pytest.approx(math.exp(-1))
    # one character, identical: order 1 only -> 1
    assert M.bleu4("是", "是") == 1.0
    # 积极 vs 消极: p1 = 1/2; 2-grams 0 of 1 -> smoothed 1 / (2^1 * 1); sqrt(1/2 * 1/2) = 0.5
    assert M.bleu4("积极", "消极") == pytest.approx(0.5)
    # smoothing counts zero-match orders: 甲乙丙丁 vs 甲丁乙丙 -> p1 = 4/4, p2 = 1/3 (乙丙),
    # p3 = 0/2 -> 1/(2*2), p4 = 0/1 -> 1/(4*1)
    assert M.bleu4("甲乙丙丁", "甲丁乙丙") == pytest.approx((1 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)
    assert M.bleu4("", "北京") == 0.0
    assert M.bleu4("", "") == 1.0
    assert M.bleu4("上海", "北京") == 0.0


def test_bleu4_multiple_references_clip_against_the_best_count():
    # hyp 哈哈哈 ; refs 哈 and 哈哈: unigram clip = max(1, 2) = 2 -> 2/3; bigrams 哈哈 x2, ref max 1 -> 1/2;
    # trigram 0/1 -> 1/(2*1); closest ref length to 3 is 2 -> BP = 1
    assert M.bleu4("哈哈哈", ["哈", "哈哈"]) == pytest.approx((2 / 3 * 1 / 2 * 1 / 2) ** (1 / 3))


def test_corpus_bleu4_sums_counts():
    # row 1: matches [7,5,3,2] of [8,7,6,5]; row 2 identical 7 chars: [7,6,5,4] of [7,6,5,4]
    # total hyp 15 > ref 14 -> BP = 1
    expected = (14 / 15 * 11 / 13 * 8 / 11 * 6 / 9) ** 0.25
    assert M.corpus_bleu4(["北京是中国的首都", "我爱北京天安门"], ["北京是中国首都", "我爱北京天安门"]) == \
        pytest.approx(expected)


def test_label_accuracy_with_out_of_set_predictions():
    result = M.label_accuracy(["积极。", "消极", "中性", " Positive "], ["积极", "积极", "消极", "positive"],
                              ["积极", "消极", "positive"])
    assert (result.correct, result.total, result.out_of_set) == (2, 4, 1)
    assert result.accuracy == 0.5
    # 积极: tp 1, predicted 1, gold 2 -> P 1, R 1/2, F 2/3; 消极: predicted once wrongly, gold once -> 0
    assert result.per_label["积极"]["f1"] == pytest.approx(2 / 3)
    assert result.per_label["消极"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result.macro_f1 == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_label_accuracy_rejects_bad_label_sets_and_references():
    with pytest.raises(ValueError, match="not one of the labels"):
        M.label_accuracy(["积极"], ["中性"], ["积极", "消极"])
    with pytest.raises(ValueError, match="same after normalization"):
        M.label_lookup(["积极", "积极。"])
    with pytest.raises(ValueError, match="at least two"):
        M.label_lookup(["积极"])


def test_parse_entities_edge_cases():
    assert M.parse_entities("没有").items == set()
    assert M.parse_entities(" 没有 \n").malformed == []
    parsed = M.parse_entities("李雷_人名\n\n李雷_人名\n上海_地名\n没有\n李雷_\n_人名\n上海\n上海")
    assert parsed.items == {("李雷", "人名"), ("上海", "地名")}
    assert parsed.malformed == ["没有", "李雷_", "_人名", "上海"]  # each once
    # split at the last underscore; full-width underscore folds to ASCII
    assert M.parse_entities("A_B_机构名").items == {("A_B", "机构名")}
    assert M.parse_entities("韩梅梅＿人名").items == {("韩梅梅", "人名")}


def test_entity_micro_prf_over_dataset():
    predictions = ["李雷_人名\n上海_地名\n李雷_人名",  # duplicate counted once: tp 1, pred 2, gold 2
                   "没有",                          # 没有 vs 没有: 0 / 0 / 0
                   "韩梅梅\n韩梅梅_人名",            # one malformed line = one wrong prediction: tp 1, pred 2, gold 1
                   "没有",                          # missed: tp 0, pred 0, gold 1
                   "王芳_人名",                      # invented: tp 0, pred 1, gold 0
                   "上海_地名\n李雷_人名"]            # order ignored: tp 2, pred 2, gold 2
    references = ["李雷_人名\n北京_地名", "没有", "韩梅梅_人名", "清华大学_机构名", "没有", "李雷_人名\n上海_地名"]
    result = M.entity_prf(predictions, references)
    # tp 4, predicted 7, gold 6 -> P 4/7, R 2/3, F1 = 16/26
    assert (result["true_positive"], result["predicted"], result["gold"], result["malformed"]) == (4, 7, 6, 1)
    assert result["precision"] == pytest.approx(4 / 7)
    assert result["recall"] == pytest.approx(4 / 6)
    assert result["f1"] == pytest.approx(16 / 26)
    per_type = result["per_type"]
    assert (per_type["人名"]["true_positive"], per_type["人名"]["predicted"], per_type["人名"]["gold"]) == (3, 4, 3)
    assert (per_type["地名"]["true_positive"], per_type["地名"]["predicted"], per_type["地名"]["gold"]) == (1, 2, 2)
    assert per_type["机构名"]["recall"] == 0.0 and per_type["机构名"]["gold"] == 1


def test_entity_row_level_and_empty_conventions():
    counts, _ = M.entity_counts("没有", "没有")
    assert counts.scores()["f1"] == 1.0
    counts, _ = M.entity_counts("没有", "李雷_人名")
    assert counts.scores()["f1"] == 0.0 and counts.scores()["precision"] == 0.0
    with pytest.raises(ValueError, match="malformed"):
        M.entity_counts("李雷_人名", "李雷人名")
    with pytest.raises(ValueError, match="row 2"):
        M.entity_prf(["没有", "没有"], ["没有", "上海"])


# --- scoring a prediction file (reference_eval) ----------------------------------------------------------------

def _predictions(tmp_path, rows):
    import json

    from zhiling.eval.predictions import read_predictions

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return read_predictions(path)


def test_metric_specs_and_label_specs():
    from zhiling.errors import ZhilingError
    from zhiling.eval import reference_eval as R

    assert [str(s) for s in R.parse_metric_specs(None)] == ["em", "f1", "rouge_l", "bleu4"]
    assert [str(s) for s in R.parse_metric_specs(None, has_labels=True)][-1] == "accuracy"
    assert [str(s) for s in R.parse_metric_specs("em, ner:entity,em")] == ["em", "ner:entity"]
    assert R.parse_label_specs(["积极,消极", "topic=体育,财经,科技"]) == {None: ["积极", "消极"],
                                                                     "topic": ["体育", "财经", "科技"]}
    with pytest.raises(ZhilingError, match="given twice"):
        R.parse_label_specs(["a,b", "c,d"])


def test_evaluate_summary_values(tmp_path):
    from zhiling.eval import reference_eval as R

    predictions = _predictions(tmp_path, [
        {"id": "1", "task": "qa", "prompt": "首都？", "output": "北京是中国的首都", "reference": "北京是中国首都"},
        {"id": "2", "task": "qa", "prompt": "河流？", "output": "长江", "reference": ["长江", "扬子江"]},
        {"id": "3", "task": "topic", "prompt": "分类", "output": "体育。", "reference": "体育"},
    ])
    specs = R.parse_metric_specs("em,rouge_l,bleu4,topic:accuracy")
    result = R.evaluate(predictions, specs, R.parse_label_specs(["topic=体育,财经"]), by="task")
    qa = result.summary["groups"]["qa"]
    assert qa["em"] == 0.5
    assert qa["rouge_l"] == pytest.approx((14 / 15 + 1) / 2)
    assert qa["bleu4"] == pytest.approx((0.125 ** 0.25 + 1) / 2)
    assert result.summary["groups"]["topic"]["accuracy"] == 1.0
    assert "accuracy" not in qa
    assert result.summary["overall"]["accuracy_rows"] == 1 and result.summary["overall"]["em_rows"] == 3
    assert result.rows[0]["scores"]["rouge_l"] == pytest.approx(14 / 15)
    assert result.summary["unused_metrics"] == []
    unused = R.evaluate(predictions, R.parse_metric_specs("em,ner:entity"))
    assert unused.summary["unused_metrics"] == ["ner:entity"]
