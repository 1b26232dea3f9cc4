"""Bad input gives a clear error before any training starts: unknown config keys, missing data files, an adapter
from a different base model, an output folder that holds another run, unknown optimizer names."""

import json

import pytest
import torch

from train_support import tiny_config, write_data
from zhiling.cli import main
from zhiling.config.loader import build_config
from zhiling.errors import ConfigError, DataError, ZhilingError
from zhiling.train import trainer as trainer_module
from zhiling.train.run import train


@pytest.fixture()
def no_training(monkeypatch):
    """Fail the test if an optimizer step is ever attempted."""
    _refuse_training(monkeypatch)


@pytest.fixture()
def data_file(tmp_path):
    return write_data(tmp_path / "data.jsonl", rows=8)


def _train(tree):
    return train(build_config(tree), show_progress=False, summary=False, announce=lambda message: None)


def test_unknown_config_key_names_the_closest_key(tmp_path, tiny_model_dir, data_file, capsys, no_training):
    import yaml

    config = tmp_path / "c.yaml"
    tree = tiny_config(tiny_model_dir("llama"), data_file, tmp_path / "out", tmp_path)
    config.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(config), "training.lerning_rate=1e-4"]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'training.lerning_rate'; did you mean 'training.learning_rate'?" in err
    tree["lora"]["rnak"] = 4
    config.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(config)]) == 1
    assert "did you mean 'lora.rank'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_data_file(tmp_path, tiny_model_dir, no_training):
    tree = tiny_config(tiny_model_dir("llama"), tmp_path / "missing" / "data.jsonl", tmp_path / "out", tmp_path)
    with pytest.raises(DataError, match=r"no such file or folder exists") as info:
        _train(tree)
    assert "missing/data.jsonl" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_row_names_file_and_line(tmp_path, tiny_model_dir, no_training):
    data = write_data(tmp_path / "data.jsonl", rows=3)
    with data.open("a", encoding="utf-8") as handle:
        handle.write('{"messages": [{"role": "user", "content": "只有问题"}]}\n')
    with pytest.raises(DataError, match=r"data.jsonl, line 4"):
        _train(tiny_config(tiny_model_dir("llama"), data, tmp_path / "out", tmp_path))


def _refuse_training(monkeypatch):
    def refuse(self, group):
        raise AssertionError("training started although the input is bad")

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", refuse)


def test_adapter_from_a_different_base_model(tmp_path, tiny_model_dir, data_file, monkeypatch):
    first = tmp_path / "first"
    _train(tiny_config(tiny_model_dir("llama"), data_file, first, tmp_path, training={"max_steps": 2}))
    _refuse_training(monkeypatch)
    adapter = str(first / "adapter")
    with pytest.raises(ZhilingError, match=r"does not fit this model: it has no module .*trained on"):
        _train(tiny_config(tiny_model_dir("bloom"), data_file, tmp_path / "bloom", tmp_path,
                           training={"init_adapter": adapter}))
    wider = tmp_path / "wider-llama"
    _save_llama(wider, hidden=48)
    with pytest.raises(ZhilingError, match=r"does not fit this model: .* takes 48 inputs here but 32 in the adapter"):
        _train(tiny_config(wider, data_file, tmp_path / "wider", tmp_path, training={"init_adapter": adapter}))
    with pytest.raises(ZhilingError, match="not a PEFT adapter folder"):
        _train(tiny_config(tiny_model_dir("llama"), data_file, tmp_path / "x", tmp_path,
                           training={"init_adapter": str(tmp_path)}))


def _save_llama(path, hidden):
    from transformers import AutoModelForCausalLM

    from tiny import make_config, make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("llama", len(tokenizer), hidden=hidden)).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def test_output_folder_of_another_run(tmp_path, tiny_model_dir, data_file, monkeypatch):
    out = tmp_path / "out"
    _train(tiny_config(tiny_model_dir("llama"), data_file, out, tmp_path, training={"max_steps": 2}))
    _refuse_training(monkeypatch)
    with pytest.raises(ZhilingError, match=r"holds another run \(model .*tiny_llama.*method lora\).*output.overwrite"):
        _train(tiny_config(tiny_model_dir("qwen2"), data_file, out, tmp_path, training={"max_steps": 2}))
    with pytest.raises(ZhilingError, match=r"holds another run"):
        _train(tiny_config(tiny_model_dir("llama"), data_file, out, tmp_path,
                           training={"max_steps": 2, "method": "dora"}))
    with pytest.raises(ZhilingError, match=r"holds a finished run with different settings \(.*max_steps: 2 -> 3"):
        _train(tiny_config(tiny_model_dir("llama"), data_file, out, tmp_path, training={"max_steps": 3}))
    record = json.loads((out / "zhiling.json").read_text())
    assert record["status"] == "finished" and record["config"]["training"]["max_steps"] == 2

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ZhilingError, match=r"not empty \(notes.txt\) and holds no zhiling run"):
        _train(tiny_config(tiny_model_dir("llama"), data_file, stranger, tmp_path))


def test_overwrite_replaces_another_run(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "out"
    _train(tiny_config(tiny_model_dir("llama"), data_file, out, tmp_path, training={"max_steps": 2}))
    (out / "keep.txt").write_text("not ours")
    result = _train(tiny_config(tiny_model_dir("qwen2"), data_file, out, tmp_path, training={"max_steps": 2},
                                output={"dir": str(out), "overwrite": True}))
    record = json.loads((out / "zhiling.json").read_text())
    assert "tiny_qwen2" in record["identity"]["model"] and result.steps == 2
    assert (out / "keep.txt").read_text() == "not ours"  # only what a run writes is removed


def test_unknown_optimizer_and_scheduler(tmp_path, tiny_model_dir, data_file, no_training):
    with pytest.raises(ConfigError, match=r"training.optimizer: unknown name 'adamw_torc'; did you mean 'adamw_torch'"):
        _train(tiny_config(tiny_model_dir("llama"), data_file, tmp_path / "o", tmp_path,
                           training={"optimizer": "adamw_torc"}))
    with pytest.raises(ConfigError, match=r"training.lr_scheduler: unknown name 'cosin'"):
        _train(tiny_config(tiny_model_dir("llama"), data_file, tmp_path / "o", tmp_path,
                           training={"lr_scheduler": "cosin"}))


def test_stage_with_an_unknown_key():
    with pytest.raises(ConfigError, match=r"stage 'b': unknown key 'training.max_step'; did you mean "
                                          r"'training.max_steps'"):
        build_config({"stages": [{"name": "a"}, {"name": "b", "training": {"max_step": 3}}]})
    with pytest.raises(ConfigError, match=r"stage 'b': unknown key 'lora.zzz'; valid keys: .*rank"):
        build_config({"stages": [{"name": "a"}, {"name": "b", "lora": {"zzz": 3}}]})  # nothing close: the keys listed
    with pytest.raises(ConfigError, match=r"init_adapter is set by the stage order"):
        build_config({"stages": [{"name": "a", "training": {"init_adapter": "x"}}]})


def test_packing_forced_on_a_model_that_cannot_pack(tmp_path, tiny_model_dir, data_file, no_training):
    with pytest.raises(ConfigError, match=r"training.packing=true, but packing is not exact for this model"):
        _train(tiny_config(tiny_model_dir("bloom"), data_file, tmp_path / "o", tmp_path,
                           training={"packing": True}))
