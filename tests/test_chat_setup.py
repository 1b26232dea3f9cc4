"""One resolver of tokenizer, model type and template (``models.chat_setup.resolve_chat_setup``).

Its order (a given name, the adapter's record, the model folder's record, the model's own chat template, the family
default), the adapter's saved tokenizer, the system prompt, and ``trust_remote_code`` / ``revision`` on every load;
then the entry points that used to carry their own copy of it (chat, scoring, merge, GGUF export, data stats and
preview) checked to give the same template and token ids for the same model + adapter, so they cannot drift again."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from zhiling.config import ModelConfig
from zhiling.data.templates import TEMPLATE_RECORD, TEMPLATES, save_template_record
from zhiling.models.chat_setup import resolve_chat_setup

PROMPT = "张三丰在北京大学读书。"
NEW_TOKEN = "张三丰"  # added to the adapter's tokenizer only: its id shows which tokenizer encoded a prompt
SYSTEM = "你是一个乐于助人的助手。"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny qwen2 (family default: chatml) whose embedding has room for tokens an adapter's tokenizer adds."""
    import torch
    from tiny import make_config, make_tokenizer
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("chat_setup_base")
    tokenizer = make_tokenizer(path)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("qwen2", len(tokenizer) + 8)).save_pretrained(str(path))
    return path


def adapter_tokenizer(base_dir, folder: Path):
    """The base tokenizer plus NEW_TOKEN, saved into ``folder`` as training saves it beside an adapter."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.add_tokens([NEW_TOKEN])
    tokenizer.save_pretrained(str(folder))
    return tokenizer


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    """A real LoRA adapter (non-zero B) with its own tokenizer and the template 'alpaca_zh' recorded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("chat_setup_adapter")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(str(path))
    adapter_tokenizer(base_dir, path)
    save_template_record(TEMPLATES["alpaca_zh"], path)
    return path


def model_copy(base_dir, folder: Path, record: str | None = None, chat_template: str | None = None) -> Path:
    """A copy of the base model folder, with a template recorded in it (a merged model) and/or a chat template."""
    shutil.copytree(base_dir, folder)
    if record:
        save_template_record(TEMPLATES[record], folder)
    if chat_template:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        tokenizer.chat_template = TEMPLATES[chat_template].to_jinja()
        tokenizer.save_pretrained(str(folder))
    return folder


def record_only(folder: Path, template: str) -> Path:
    """An adapter folder holding just a template record (the resolver reads no weights)."""
    folder.mkdir()
    save_template_record(TEMPLATES[template], folder)
    return folder


# ----- the order ------------------------------------------------------------------------------------------------
def test_order_given_adapter_record_model_record_chat_template_family_default(base_dir, tmp_path):
    model = model_copy(base_dir, tmp_path / "model", record="baichuan2", chat_template="belle")
    adapter = record_only(tmp_path / "adapter", "alpaca_zh")
    cfg = ModelConfig(name_or_path=str(model))

    def pick(**kwargs):
        setup = resolve_chat_setup(cfg, **kwargs)
        return setup.template.name, setup.template_origin

    assert pick(template="gemma", adapter=adapter) == ("gemma", "template 'gemma' (given)")
    assert pick(adapter=adapter) == ("alpaca_zh", "template 'alpaca_zh' recorded with the adapter")
    assert pick() == ("baichuan2", "template 'baichuan2' recorded with the model")
    (model / TEMPLATE_RECORD).unlink()
    name, origin = pick()
    assert name == "auto" and "its own chat template" in origin
    plain = resolve_chat_setup(ModelConfig(name_or_path=str(base_dir)))
    assert plain.model_type == "qwen2" and plain.template == TEMPLATES["chatml"]
    assert plain.template_origin == "template 'chatml' (default for this model: the family default for qwen2)"
    assert plain.source.kind == "folder" and plain.source.path == str(base_dir)


def test_system_replaces_the_default_system_prompt_at_every_step(base_dir, tmp_path):
    model = model_copy(base_dir, tmp_path / "model", record="baichuan2")
    adapter = record_only(tmp_path / "adapter", "alpaca_zh")
    cfg, plain = ModelConfig(name_or_path=str(model)), ModelConfig(name_or_path=str(base_dir))
    setups = [resolve_chat_setup(cfg, "belle", system=SYSTEM), resolve_chat_setup(cfg, adapter=adapter, system=SYSTEM),
              resolve_chat_setup(cfg, system=SYSTEM), resolve_chat_setup(plain, system=SYSTEM)]
    assert [setup.template.name for setup in setups] == ["belle", "alpaca_zh", "baichuan2", "chatml"]
    assert all(setup.template.default_system == SYSTEM for setup in setups)
    assert resolve_chat_setup(cfg, adapter=adapter).template == TEMPLATES["alpaca_zh"]  # no system: as recorded


def test_the_adapters_saved_tokenizer_is_used(base_dir, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    added = adapter_tokenizer(base_dir, folder)
    setup = resolve_chat_setup(ModelConfig(name_or_path=str(base_dir)), adapter=folder)
    assert len(setup.tokenizer) == len(added) and NEW_TOKEN in setup.tokenizer.get_vocab()
    assert setup.source.path == str(base_dir)  # the model is still the base; only the tokenizer is the adapter's


def test_a_stray_tokenizer_file_without_its_config_is_not_the_adapters_tokenizer(base_dir, tmp_path):
    """Drift: merge took any of tokenizer_config.json / tokenizer.json / tokenizer.model as the adapter's tokenizer,
    chat only tokenizer_config.json. Without it transformers loads a tokenizer with no EOS; the base's is used."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    adapter_tokenizer(base_dir, folder)
    (folder / "tokenizer_config.json").unlink()
    setup = resolve_chat_setup(ModelConfig(name_or_path=str(base_dir)), adapter=folder)
    assert setup.tokenizer.eos_token == "<eos>" and NEW_TOKEN not in setup.tokenizer.get_vocab()


# ----- trust_remote_code and revision reach every load ------------------------------------------------------------
@pytest.fixture()
def loads(monkeypatch):
    """Every AutoTokenizer / AutoConfig.from_pretrained call as (what, path, kwargs), passed on to the real one."""
    from transformers import AutoConfig, AutoTokenizer

    calls = []

    def recorder(cls, what):
        real = cls.from_pretrained

        def from_pretrained(path, *args, **kwargs):
            calls.append((what, str(path), kwargs))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    recorder(AutoTokenizer, "tokenizer")
    recorder(AutoConfig, "config")
    return calls


def test_revision_and_trust_remote_code_reach_the_tokenizer_and_the_config(monkeypatch, tiny_tokenizer):
    """Drift: the model type (which picks the family default) was read from the hub's main branch, whatever
    model.revision pinned, while the tokenizer came from the pinned revision."""
    from transformers import AutoConfig, AutoTokenizer

    calls = []

    def fake(what, result):
        def from_pretrained(path, *args, **kwargs):
            calls.append((what, str(path), kwargs))
            return result

        return from_pretrained

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake("tokenizer", tiny_tokenizer))
    monkeypatch.setattr(AutoConfig, "from_pretrained", fake("config", AutoConfig.for_model("gemma3_text")))
    setup = resolve_chat_setup(ModelConfig(name_or_path="some-org/some-model", revision="v1.2",
                                           trust_remote_code=True))
    assert setup.source.kind == "hub" and setup.model_type == "gemma3_text" and setup.template.name == "gemma"
    assert {what for what, _, _ in calls} == {"tokenizer", "config"}
    for what, path, kwargs in calls:
        assert path == "some-org/some-model"
        assert kwargs.get("trust_remote_code") is True and kwargs.get("revision") == "v1.2", (what, kwargs)


def test_trust_remote_code_reaches_every_load_of_every_entry_point(base_dir, adapter_dir, tmp_path, loads):
    """Drift: four copies read the model type without trust_remote_code, and GGUF export loaded the merged
    folder's tokenizer without it."""
    from test_export import fake_converter

    from zhiling.cli.data_inspect import _tokenizer_and_template
    from zhiling.export.gguf_export import export_gguf
    from zhiling.export.merge import write_model_folder
    from zhiling.infer.hf_engine import load_hf_engine

    cfg = ModelConfig(name_or_path=str(base_dir), trust_remote_code=True)
    load_hf_engine(cfg, adapter=str(adapter_dir)).close()
    write_model_folder(cfg, tmp_path / "merged", adapter=adapter_dir)
    export_gguf(cfg, tmp_path / "out" / "m.gguf", adapter=adapter_dir, converter=fake_converter(tmp_path))
    assert {what for what, _, _ in loads} == {"tokenizer", "config"} and len(loads) >= 8
    assert [call for call in loads if call[2].get("trust_remote_code") is not True] == []
    loads.clear()
    _tokenizer_and_template(cfg, None)  # data stats / preview take the whole ModelConfig too
    assert loads and [call for call in loads if call[2].get("trust_remote_code") is not True] == []


# ----- the entry points agree -----------------------------------------------------------------------------------
def test_entry_points_give_the_same_template_and_token_ids(base_dir, adapter_dir, tmp_path, capsys):
    """Chat (hf engine), scoring (eval mc / ppl) and merge on base + adapter, then chat, scoring and data stats /
    preview on the merged folder: one template, one tokenizer, the same prompt ids."""
    from zhiling.cli import main
    from zhiling.cli.data_inspect import _tokenizer_and_template
    from zhiling.eval.scoring import OptionScorer, prepare_scoring_model
    from zhiling.export.merge import write_model_folder
    from zhiling.infer.engine import ChatRequest
    from zhiling.infer.hf_engine import load_hf_engine

    base = ModelConfig(name_or_path=str(base_dir))
    want = TEMPLATES["alpaca_zh"]
    engine = load_hf_engine(base, adapter=str(adapter_dir))
    expected = engine.prompt_ids(ChatRequest(PROMPT))
    new_id = engine.tokenizer.convert_tokens_to_ids(NEW_TOKEN)
    assert new_id in expected  # the adapter's tokenizer encoded it
    engine.close()

    def check(template, tokenizer):
        assert template == want
        assert template.encode_prompt(tokenizer, None, [], PROMPT) == expected

    scoring = prepare_scoring_model(str(base_dir), str(adapter_dir))
    check(scoring.template, scoring.tokenizer)
    assert OptionScorer(None, scoring.tokenizer, scoring.template)._prompt_ids(PROMPT) == expected

    merged = write_model_folder(base, tmp_path / "merged", adapter=adapter_dir)
    assert merged.template == want and "recorded with the adapter" in merged.template_origin
    merged_engine = load_hf_engine(ModelConfig(name_or_path=str(merged.folder)))
    assert merged_engine.prompt_ids(ChatRequest(PROMPT)) == expected
    assert "recorded with the model" in merged_engine.template_origin
    merged_engine.close()
    merged_scoring = prepare_scoring_model(str(merged.folder))
    check(merged_scoring.template, merged_scoring.tokenizer)
    data_tokenizer, data_template = _tokenizer_and_template(str(merged.folder), None)
    check(data_template, data_tokenizer)

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": PROMPT, "output": "张三丰_人名"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert main(["data", "stats", str(data), "--model", str(merged.folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "alpaca_zh"
    assert main(["data", "preview", "--data", str(data), "--model", str(merged.folder), "--color", "never"]) == 0
    assert "template 'alpaca_zh'" in capsys.readouterr().out


# ----- drift bugs, one test each (each failed on the copy it replaces) ----------------------------------------------
def test_data_stats_and_preview_read_the_template_recorded_in_the_model_folder(base_dir, tmp_path, capsys):
    """Drift: ``data stats --model`` and ``data preview --data --model`` ignored a merged model's recorded template
    (they showed the family default) while chat, eval and export used it."""
    from zhiling.cli import main

    model = model_copy(base_dir, tmp_path / "merged", record="alpaca_zh")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": PROMPT, "output": "好"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert main(["data", "stats", str(data), "--model", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "alpaca_zh"
    assert main(["data", "preview", "--data", str(data), "--model", str(model), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "template 'alpaca_zh'" in out and "### 指令：" in out


def test_scoring_uses_the_adapters_saved_tokenizer(base_dir, adapter_dir):
    """Drift: eval mc / ppl tokenized with the base model's tokenizer while chat and merge used the one saved with
    the adapter, so a prompt holding an added token was scored as different ids than the model was trained on."""
    from zhiling.eval.scoring import prepare_scoring_model

    prepared = prepare_scoring_model(str(base_dir), str(adapter_dir), use_template=False)
    assert NEW_TOKEN in prepared.tokenizer.get_vocab() and prepared.template is None
    new_id = prepared.tokenizer.convert_tokens_to_ids(NEW_TOKEN)
    assert new_id in prepared.tokenizer.encode(PROMPT, add_special_tokens=False)


def test_merge_ignores_a_stray_tokenizer_file_in_the_adapter(base_dir, adapter_dir, tmp_path):
    """Drift: merge took a lone tokenizer.json beside the adapter as its tokenizer and wrote a merged folder whose
    tokenizer had no EOS (chat ignored such a file)."""
    from transformers import AutoTokenizer

    from zhiling.export.merge import write_model_folder

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    (adapter / "tokenizer_config.json").unlink()
    result = write_model_folder(ModelConfig(name_or_path=str(base_dir)), tmp_path / "merged", adapter=adapter)
    assert AutoTokenizer.from_pretrained(str(result.folder)).eos_token == "<eos>"


# ----- no new copies --------------------------------------------------------------------------------------------
SRC = Path(__file__).resolve().parent.parent
RESOLVER = "src/zhiling/models/chat_setup.py"
ALLOWED = {RESOLVER,
           # converted to the resolver by the run-setup work of the same redesign (issue 11)
           "src/zhiling/train/trainer.py", "src/zhiling/train/plan.py"}


def _called_names(tree: ast.AST) -> dict[str, int]:
    """Function name -> first line where a function is called by that name (plain or attribute call)."""
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name and name not in found:
                found[name] = node.lineno
    return found


def test_no_module_but_the_resolver_pairs_a_tokenizer_load_with_a_template_choice():
    """A function that calls load_tokenizer and then get_template / resolve_template is a new hand-written copy of
    ``resolve_chat_setup``; every entry point calls that instead."""
    copies = []
    for path in sorted([*(SRC / "src" / "zhiling").rglob("*.py"), *(SRC / "bench").glob("*.py")]):
        relative = path.relative_to(SRC).as_posix()
        if relative in ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            called = _called_names(function)
            if "load_tokenizer" in called and {"get_template", "resolve_template"} & called.keys():
                copies.append(f"{relative}:{function.lineno} {function.name}")
    assert copies == []
