"""The one "unknown name; did you mean ...?" helper every closed-set check uses."""

import pytest

from zhiling.errors import ConfigError, ZhilingError
from zhiling.names import closest, raise_unknown, suggestion, unknown_name


def test_suggestion_names_the_closest_choice_or_lists_them():
    assert suggestion("alpacca", ["alpaca", "sharegpt"]) == "; did you mean 'alpaca'?"
    assert suggestion("zzz", ["rank", "alpha"]) == ""
    assert suggestion("zzz", ["rank", "alpha"], otherwise="valid keys") == "; valid keys: rank, alpha"
    assert suggestion("lerning_rate", ["learning_rate"], prefix="training.") == \
        "; did you mean 'training.learning_rate'?"
    assert suggestion("/sav", ["/save", "/help"], quote="") == "; did you mean /save?"
    assert suggestion("lr", ["learning_rate"], match="learning_rate") == "; did you mean 'learning_rate'?"


def test_cutoff_decides_what_is_close():
    assert closest("tmp", ["temperature"]) is None
    assert closest("tmp", ["top_p", "temperature"], cutoff=0.5) == "top_p"


def test_unknown_name_always_lists_the_choices():
    assert unknown_name("backend", "hff", ["hf", "llamacpp"]) == \
        "unknown backend 'hff'; did you mean 'hf'? (known: hf, llamacpp)"
    assert unknown_name("format", "xyz", ["alpaca"], tail=", or auto") == "unknown format 'xyz' (known: alpaca, or auto)"
    with pytest.raises(ConfigError, match=r"unknown dataset 'belle'.*\(registered: a, b\)"):
        raise_unknown("dataset", "belle", ["a", "b"], error=ConfigError, label="registered")
    with pytest.raises(ZhilingError, match="did you mean 'chatml'"):
        raise_unknown("template", "chatm", ["chatml", "qwen"])
