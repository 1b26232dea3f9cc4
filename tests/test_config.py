"""The config system: YAML + key=value, errors that name the key, the value and what is allowed."""

import pytest

from zhiling.cli import main
from zhiling.config import ZhilingConfig, load_config, parse_override
from zhiling.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model: Qwen/Qwen2.5-0.5B\ntraining:\n  learning_rate: 1e-4\n  num_epochs: 2\n"
                           "data:\n  datasets: [a, b]\n  cutoff_len: 256\n")
    cfg = load_config(path, ["training.num_epochs=5", "lora.rank=16", "data.datasets=x,y", "template=chatml"])
    assert isinstance(cfg, ZhilingConfig)
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B"
    assert cfg.training.learning_rate == 1e-4  # yaml "1e-4" is a string; pydantic parses it
    assert cfg.training.num_epochs == 5
    assert cfg.lora.rank == 16
    assert cfg.data.datasets == ["x", "y"] and cfg.data.cutoff_len == 256
    assert cfg.template.name == "chatml"


def test_override_without_file_and_override_parsing():
    assert load_config(None, ["output.dir=runs/a"]).output.dir == "runs/a"
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("x=") == (["x"], None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("training.learning_rate")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("a..b=1")


@pytest.mark.parametrize("text, message", [
    ("trainig:\n  learning_rate: 1\n", "unknown key 'trainig'; did you mean 'training'?"),
    ("training:\n  lr: 1\n", "unknown key 'training.lr'; did you mean 'training.learning_rate'?"),
    ("lora:\n  zzz: 1\n", "unknown key 'lora.zzz'; valid keys here: rank, alpha"),
    ("training:\n  learning_rate: fast\n", "training.learning_rate = 'fast': Input should be a valid number"),
    ("training:\n  method: lorax\n", "training.method = 'lorax': Input should be 'lora', 'dora'"),
    ("data:\n  cutoff_len: 2\n", "data.cutoff_len = 2: Input should be greater than or equal to 8"),
    ("model:\n  dtype: fp8\n", "model.dtype = 'fp8': Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
])
def test_errors_name_key_value_and_allowed(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_override_errors_name_the_command_line():
    with pytest.raises(ConfigError, match="command line: training.epochs=3") as info:
        load_config(None, ["training.epochs=3"])
    assert "did you mean 'training.num_epochs'" in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "top level must be a mapping"),
    ("a: [1, 2\n", "not valid YAML"),
])
def test_bad_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "gbk.yaml"
    path.write_bytes("model: 模型\n".encode("gbk"))
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


def test_empty_file_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == ZhilingConfig()


def test_config_show_command(tmp_path, capsys):
    path = write(tmp_path, "training:\n  learning_rate: 0.001\n")
    assert main(["config", "show", str(path), "lora.rank=4"]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 0.001" in out and "rank: 4" in out and "cutoff_len: 1024" in out
    assert main(["config", "show", "lora.rank=4"]) == 0
    assert main(["config", "show", str(path), "lora.rnak=4"]) == 1
    assert "did you mean 'lora.rank'" in capsys.readouterr().err


def test_overrides_may_follow_flags(tmp_path, capsys):
    path = write(tmp_path, "lora:\n  rank: 8\n")
    assert main(["config", "show", str(path), "lora.rank=4"]) == 0
    assert "rank: 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["config", "show", str(path), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
