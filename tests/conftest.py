import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tokenizer(path)
    return path


@pytest.fixture()
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A function family -> folder with a saved random tiny model and the tiny tokenizer (built once per family)."""
    from transformers import AutoTokenizer

    built = {}

    def build(family: str = "llama"):
        if family not in built:
            path = tmp_path_factory.mktemp(f"tiny_{family}")
            make_model(family, AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), path=path)
            built[family] = path
        return built[family]

    return build
