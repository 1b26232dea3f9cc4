"""Model-side evaluation: option log-likelihoods (multiple choice) and perplexity."""

import json
import math

import pytest
import torch

from zhiling.cli import main
from zhiling.data.templates import TEMPLATES
from zhiling.data.tokenize import TokenizeOptions, build_example
from zhiling.eval import mc
from zhiling.eval.likelihood import target_logprobs
from zhiling.eval.perplexity import perplexity
from zhiling.eval.scoring import OptionScorer


def _reference(model, sequence, flags):
    logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    picked = [float(logprobs[i - 1, sequence[i]].detach()) for i, flag in enumerate(flags) if flag]
    return sum(picked), len(picked)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_target_logprobs_match_full_logits(tiny_model_dir, family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir(family)))
    if family == "gemma3":
        model.config.final_logit_softcapping = 5.0  # exercise the softcap path
    sequences = [[1, 5, 9, 13, 17], [1, 7, 8], [1, 4, 4, 4, 4, 4, 4, 9], [1, 2]]
    flags = [[False, False, True, True, True], [False, True, True], [False] * 5 + [True] * 3, [False, False]]
    got = target_logprobs(model, sequences, flags, pad_id=0, batch_size=3)
    for sequence, flag, (total, count) in zip(sequences, flags, got):
        want_total, want_count = _reference(model, sequence, flag)
        assert count == want_count and total == pytest.approx(want_total, abs=1e-4)


def _questions():
    subject = mc.Subject("demo", [
        mc.Question(f"q{i}", "demo", text, (("A", "甲"), ("B", "乙"), ("C", "丙"), ("D", "丁")), "ABCD"[i])
        for i, text in enumerate(["今天天气很好吗？", "春眠不觉晓的下一句？", "上海在哪里？", "hello world 是什么？"])],
        title_zh="示例")
    return {"demo": subject}


def test_multiple_choice_picks_the_option_a_model_was_trained_to_prefer(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    scorer = OptionScorer(model, tiny_tokenizer)
    subjects = _questions()
    before = mc.evaluate_mc(subjects, scorer).summary
    # teach the model each question's answer letter
    prompts = [mc.build_prompt(q, subjects["demo"], [], "zh") for q in subjects["demo"].questions]
    batch = [scorer._prompt_ids(p) + tiny_tokenizer.encode(q.answer, add_special_tokens=False)
             for p, q in zip(prompts, subjects["demo"].questions)]
    width = max(map(len, batch))
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in batch])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
    labels = torch.tensor([[-100] * (len(ids) - 1) + [ids[-1]] + [-100] * (width - len(ids)) for ids in batch])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(30):
        model(input_ids=input_ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = mc.evaluate_mc(subjects, scorer).summary
    assert after["overall"]["accuracy"] == 1.0
    assert after["overall"]["accuracy"] > before["overall"]["accuracy"]


def test_chat_template_wraps_the_question(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")))
    scorer = OptionScorer(model, tiny_tokenizer, TEMPLATES["chatml"])
    assert scorer._prompt_ids("问题") == TEMPLATES["chatml"].encode_prompt(tiny_tokenizer, None, [], "问题")
    scores = scorer(["问题一", "问题二"], [["A", "B"], ["A", "B", "C"]])
    assert [len(s) for s in scores] == [2, 3] and all(s < 0 for row in scores for s in row)


def test_perplexity_equals_exp_of_the_training_loss(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("qwen2")))
    records = [{"id": f"r{i}", "system": "", "messages": [{"role": "user", "content": f"问题{i}" * (i + 1)},
                                                          {"role": "assistant", "content": "回答" * (i + 1)}]}
               for i in range(5)]
    options = TokenizeOptions(cutoff_len=64)
    result = perplexity(model, tiny_tokenizer, TEMPLATES["chatml"], records, options, batch_size=2)
    nll_sum, count = 0.0, 0
    for record in records:
        example = build_example(TEMPLATES["chatml"], tiny_tokenizer, record, options)
        out = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]]))
        trained = sum(1 for label in example["labels"][1:] if label != -100)
        nll_sum += float(out.loss) * trained
        count += trained
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll_sum / count), rel=1e-4)
    assert [row["id"] for row in result["per_row"]] == [r["id"] for r in records]


def test_ppl_and_mc_commands(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "held.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"问题{i}", "input": "", "output": f"回答{i}"},
                                         ensure_ascii=False) for i in range(4)), encoding="utf-8")
    model = str(tiny_model_dir("llama"))
    assert main(["eval", "ppl", "--data", str(data), "--model", model, "--template", "alpaca_zh", "-q",
                 "-o", str(tmp_path / "ppl")]) == 0
    summary = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())
    assert summary["rows"] == 4 and summary["perplexity"] > 1 and summary["template"] == "alpaca_zh"
    assert len((tmp_path / "ppl" / "perplexity_rows.jsonl").read_text().splitlines()) == 4
    assert main(["eval", "mc", "--model", model, "--limit", "2", "-q", "-o", str(tmp_path / "mc")]) == 0
    mc_summary = json.loads((tmp_path / "mc" / "summary.json").read_text())
    assert 0.0 <= mc_summary["overall"]["accuracy"] <= 1.0 and mc_summary["overall"]["questions"] == 10
    assert main(["eval", "ppl", "--data", str(tmp_path / "missing.jsonl"), "--model", model]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_a_bad_template_fails_before_any_weights_load(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`eval mc` and `eval ppl` resolve the template the same way, before the (slow) model load: a typo in
    --template used to cost `eval mc` a full model load first."""
    def no_weights(*args, **kwargs):
        raise AssertionError("the model was loaded before the template was checked")

    monkeypatch.setattr("zhiling.models.load_model", no_weights)
    model = str(tiny_model_dir("llama"))
    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps({"instruction": "问题", "input": "", "output": "回答"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    for command in (["eval", "mc", "--limit", "1", "-o", str(tmp_path / "mc")], ["eval", "ppl", "--data", str(data)]):
        assert main([*command, "--model", model, "--template", "chatmll", "-q"]) == 1
        assert "unknown template 'chatmll'; did you mean 'chatml'?" in capsys.readouterr().err
