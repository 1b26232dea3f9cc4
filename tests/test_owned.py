"""zhiling deletes and replaces only what it wrote: a user's folders and files in the way of a run, a merge or an
export are refused with ``NotOwnedError`` and are still there byte for byte; stage names are plain folder names, in
the config and when read back from a run record; a merge or export never writes over its inputs."""

import json
import shutil
from pathlib import Path

import pytest

from zhiling.config import ModelConfig
from zhiling.config.loader import build_config
from zhiling.errors import ConfigError, ZhilingError
from zhiling.owned import NotOwnedError, check_not_input, check_replaceable, plain_name_problem, record_file
from zhiling.train.outputs import claim_output_dir

IDENTITY = {"model": "tiny", "method": "lora"}


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its bytes (None for folders): equal snapshots mean nothing changed."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def users_folder(path: Path) -> Path:
    """A folder of the user's own, with entries named like a run's (model/, runs/, adapter/, metrics.jsonl)."""
    (path / "model").mkdir(parents=True)
    (path / "model" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (path / "runs").mkdir()
    (path / "runs" / "notes.md").write_text("我的实验记录\n", encoding="utf-8")
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text('{"mine": true}')
    (path / "metrics.jsonl").write_text('{"my": 1}\n')
    return path


def zhiling_run(path: Path, record: dict | None = None) -> Path:
    """A folder as a finished run leaves it (record, adapter, checkpoints, metrics)."""
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "zhiling.json").write_text(json.dumps(record or {"status": "finished", "identity": IDENTITY}))
    return path


# ----- training: output.overwrite ----------------------------------------------------------------------------------
@pytest.mark.parametrize("resume", [True, False])
def test_overwrite_never_deletes_a_users_folder_without_a_run(tmp_path, resume):
    folder = users_folder(tmp_path / "project")
    before = snapshot(folder)
    with pytest.raises(NotOwnedError, match=r"holds no zhiling run \(zhiling.json\), so its adapter, model, "
                                            r"metrics.jsonl, runs are not zhiling's"):
        claim_output_dir(folder, IDENTITY, overwrite=True, resume=resume)
    assert snapshot(folder) == before


def test_overwrite_writes_beside_other_files_when_none_is_in_the_way(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    state = claim_output_dir(folder, IDENTITY, overwrite=True, resume=True)
    assert state.fresh and (folder / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_the_runs_entries(tmp_path):
    folder = zhiling_run(tmp_path / "out")
    (folder / "notes.txt").write_text("mine")
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text("{}\n")
    claim_output_dir(folder, {"model": "other", "method": "lora"}, overwrite=True, resume=True)
    assert sorted(p.name for p in folder.iterdir()) == ["data", "notes.txt"]
    assert (folder / "data" / "train.jsonl").read_text() == "{}\n"


def test_a_link_among_a_runs_entries_is_refused_before_anything_is_deleted(tmp_path):
    folder = zhiling_run(tmp_path / "out")
    elsewhere = users_folder(tmp_path / "elsewhere")
    (folder / "runs").symlink_to(elsewhere / "runs")  # the user's TensorBoard logs, linked in
    before, elsewhere_before = snapshot(folder), snapshot(elsewhere)
    with pytest.raises(NotOwnedError, match=r"output.dir entry .*runs is a link"):
        claim_output_dir(folder, {"model": "other", "method": "lora"}, overwrite=True, resume=True)
    assert snapshot(folder) == before and snapshot(elsewhere) == elsewhere_before


def test_a_zhiling_json_that_is_no_run_record_protects_the_folder(tmp_path):
    folder = users_folder(tmp_path / "project")
    (folder / "zhiling.json").write_text('{"project": "我的项目"}')
    before = snapshot(folder)
    with pytest.raises(NotOwnedError, match=r"zhiling.json is not a zhiling run record"):
        claim_output_dir(folder, IDENTITY, overwrite=True, resume=True)
    assert snapshot(folder) == before


# ----- training: stage names read back from zhiling.json -----------------------------------------------------------
def _staged(folder: Path, names: list[str]) -> Path:
    return zhiling_run(folder, {"kind": "stages", "status": "finished", "identity": {**IDENTITY, "stages": names},
                                "stages": [{"name": name} for name in names]})


@pytest.mark.parametrize("how", ["relative", "absolute"])
@pytest.mark.parametrize("resume", [True, False])
def test_stage_names_from_the_record_are_never_paths(tmp_path, how, resume):
    victim = users_folder(tmp_path / "victim")
    name = "../victim" if how == "relative" else str(victim)
    folder = _staged(tmp_path / "out", ["one", name])
    victim_before, folder_before = snapshot(victim), snapshot(folder)
    identity = {**IDENTITY, "stages": ["one", name]} if resume is False else {"model": "other"}
    with pytest.raises(NotOwnedError, match=r"zhiling.json: stages\[1\].name .* is not a stage folder name"):
        claim_output_dir(folder, identity, overwrite=True, resume=resume)
    assert snapshot(victim) == victim_before
    assert snapshot(folder) == folder_before  # nothing at all was deleted: every check comes first


def test_a_stage_folder_without_a_run_is_not_deleted(tmp_path):
    folder = _staged(tmp_path / "out", ["one", "two"])
    zhiling_run(folder / "one")
    users_folder(folder / "two")  # named like a stage, but holds no run
    before = snapshot(folder)
    with pytest.raises(NotOwnedError, match=r"stage folder .*two exists and was not written by zhiling "
                                            r"\(no zhiling.json in it\)"):
        claim_output_dir(folder, {"model": "other"}, overwrite=True, resume=True)
    assert snapshot(folder) == before


def test_replacing_a_staged_run_keeps_files_the_user_put_in_a_stage_folder(tmp_path):
    folder = _staged(tmp_path / "out", ["one", "two"])
    zhiling_run(folder / "one")
    zhiling_run(folder / "two")
    (folder / "two" / "notes.txt").write_text("mine")
    claim_output_dir(folder, {"model": "other"}, overwrite=True, resume=True)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["two", "two/notes.txt"]


@pytest.mark.parametrize("name", ["zhiling.json", "runs", "metrics.jsonl", "loss.png", "Adapter", "..", " one",
                                  "a\tb", "x" * 300, "a/b", "C:x"])
def test_stage_names_are_checked_in_the_config(name):
    with pytest.raises(ConfigError, match=r"stages.*must be a plain folder name"):
        build_config({"stages": [{"name": name}]})


def test_dry_run_checks_delete_nothing(tmp_path):
    folder = _staged(tmp_path / "out", ["one"])
    zhiling_run(folder / "one")
    before = snapshot(folder)
    claim_output_dir(folder, {"model": "other"}, overwrite=True, resume=True, check_only=True)
    assert snapshot(folder) == before


# ----- merge / export --format hf ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, tiny_model_dir):
    from test_merge import make_adapter

    root = tmp_path_factory.mktemp("inputs")
    base = root / "base"
    shutil.copytree(tiny_model_dir("llama"), base)
    adapter = make_adapter(base, root / "run" / "adapter")
    return base, adapter


def test_merge_overwrite_never_replaces_a_users_folder(tmp_path, base_and_adapter):
    from zhiling.export.merge import merge_adapter

    base, adapter = base_and_adapter
    folder = users_folder(tmp_path / "merged")
    before = snapshot(folder)
    with pytest.raises(NotOwnedError, match=r"exists and was not written by zhiling \(no zhiling_merge.json in it\);"
                                            r" zhiling will not replace or delete it, even with --overwrite"):
        merge_adapter(ModelConfig(name_or_path=str(base)), adapter, folder, overwrite=True)
    assert snapshot(folder) == before


@pytest.mark.parametrize("where, relation", [("run/adapter", "is the adapter"), ("run", "holds the adapter"),
                                             ("run/adapter/merged", "is inside the adapter"),
                                             ("base", "is the base model"), ("base/merged", "is inside the base")])
def test_merge_never_writes_over_its_inputs(where, relation, base_and_adapter):
    from zhiling.export.merge import merge_adapter

    base, adapter = base_and_adapter
    root = base.parent
    before = snapshot(root)
    with pytest.raises(NotOwnedError, match=relation):
        merge_adapter(ModelConfig(name_or_path=str(base)), adapter, root / where, overwrite=True)
    assert snapshot(root) == before


def test_merge_replaces_its_own_folder_but_not_when_it_is_the_base(tmp_path, base_and_adapter):
    from zhiling.export.gguf_export import export_hf
    from zhiling.export.merge import merge_adapter

    base, adapter = base_and_adapter
    merged = tmp_path / "merged"
    merge_adapter(ModelConfig(name_or_path=str(base)), adapter, merged)
    export_hf(ModelConfig(name_or_path=str(base)), merged, adapter=adapter, dtype="float16", overwrite=True)
    assert json.loads((merged / "zhiling_merge.json").read_text())["dtype"] == "float16"
    before = snapshot(merged)
    with pytest.raises(NotOwnedError, match="is the base model"):  # merging again into the folder it reads
        merge_adapter(ModelConfig(name_or_path=str(merged)), adapter, merged, overwrite=True)
    assert snapshot(merged) == before


# ----- export --format gguf ----------------------------------------------------------------------------------------
def test_export_overwrite_replaces_only_what_export_wrote(tmp_path, base_and_adapter):
    from test_export import fake_converter

    from zhiling.export.gguf_export import export_gguf

    base, adapter = base_and_adapter
    converter = fake_converter(tmp_path)
    cfg = ModelConfig(name_or_path=str(base))
    out = tmp_path / "out" / "model.gguf"
    export_gguf(cfg, out, adapter=adapter, ollama=True, converter=converter)
    export_gguf(cfg, out, adapter=adapter, ollama=True, converter=converter, overwrite=True)  # its own: replaced

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    (mine / "Modelfile").write_text("FROM ./llama3.gguf\nSYSTEM 我的\n")
    before = snapshot(mine)
    with pytest.raises(NotOwnedError, match=r"model.gguf exists and was not written by zhiling \(no zhiling.template "
                                            r"key in its metadata\)"):
        export_gguf(cfg, mine / "model.gguf", adapter=adapter, converter=converter, overwrite=True)
    with pytest.raises(NotOwnedError, match=r"Modelfile exists and was not written by zhiling \(its first line"):
        export_gguf(cfg, mine / "new.gguf", adapter=adapter, ollama=True, converter=converter, overwrite=True)
    assert snapshot(mine) == before


def test_export_never_writes_over_the_gguf_it_reads(tmp_path, monkeypatch):
    from test_export import fake_converter
    from tiny_gguf import write_tiny_gguf

    from zhiling.export import gguf_export
    from zhiling.export.gguf_export import export_gguf

    monkeypatch.setattr(gguf_export, "check_vocabulary", lambda *args: None)  # the stand-in writes no vocabulary

    model = tmp_path / "models" / "tiny.gguf"
    model.parent.mkdir()
    write_tiny_gguf(model)
    before = snapshot(model.parent)
    with pytest.raises(NotOwnedError, match=r"tiny.gguf is the base model"):
        export_gguf(ModelConfig(name_or_path=str(model), cache_dir=str(tmp_path / "cache")), model,
                    template="chatml", converter=fake_converter(tmp_path), overwrite=True)
    assert snapshot(model.parent) == before


# ----- elsewhere: caches, predictions, the converter ----------------------------------------------------------------
def test_predict_overwrite_removes_only_predictions(tmp_path):
    from zhiling.infer.predict import meta_path, prepare_output

    output = tmp_path / "answers.jsonl"
    output.write_text('{"id": "1", "我的": "数据"}\n', encoding="utf-8")
    with pytest.raises(NotOwnedError, match=r"answers.jsonl exists and was not written by zhiling \(no .meta.json"):
        prepare_output(output, {"model": "m"}, overwrite=True)
    assert output.read_text(encoding="utf-8") == '{"id": "1", "我的": "数据"}\n'
    meta_path(output).write_text('{"run": {"model": "old"}}')
    assert prepare_output(output, {"model": "m"}, overwrite=True) == set()
    assert not output.exists() and json.loads(meta_path(output).read_text())["run"] == {"model": "m"}


def test_gguf_conversion_never_replaces_a_users_folder(tmp_path):
    from tiny_gguf import write_tiny_gguf

    from zhiling.models.gguf_convert import convert_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = users_folder(tmp_path / "models" / "gemma-3-270m")  # model.cache_dir: models, with a folder of one's own
    before = snapshot(folder)
    with pytest.raises(NotOwnedError, match=r"converted model folder .* was not written by zhiling "
                                            r"\(no zhiling-converted.txt in it\); zhiling will not replace or delete "
                                            r"it\. "):
        convert_gguf(tmp_path / "tiny.gguf", folder)
    assert snapshot(folder) == before


def test_tokenized_cache_never_replaces_a_users_folder(tmp_path, tiny_tokenizer, monkeypatch):
    from zhiling.data import tokenize
    from zhiling.data.templates import TEMPLATES

    monkeypatch.setattr(tokenize, "cache_key", lambda *args: "mine")  # data.cache_dir holds a folder of that name
    folder = users_folder(tmp_path / "mine")
    before = snapshot(folder)
    rows = [{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}]}]
    with pytest.raises(NotOwnedError, match=r"tokenized-data cache folder .*mine exists and was not written"):
        tokenize.tokenize_records(lambda: iter(rows), "fp", TEMPLATES["chatml"], tiny_tokenizer,
                                  tokenize.TokenizeOptions(), cache_dir=tmp_path)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no work or staging folder left


def test_reinstalling_the_converter_never_replaces_a_users_folder(tmp_path, monkeypatch):
    from zhiling.export import converter as converter_module

    monkeypatch.setenv("ZHILING_CACHE", str(tmp_path / "cache"))
    folder = users_folder(converter_module.private_dir())

    def fake_installer(target: Path) -> None:
        (target / converter_module.SCRIPT).write_text("# stand-in\n")

    before = snapshot(folder)
    with pytest.raises(NotOwnedError, match=r"converter folder .* was not written by zhiling"):
        converter_module.install_converter(force=True, installer=fake_installer)
    assert snapshot(folder) == before


# ----- the shared checks -------------------------------------------------------------------------------------------
def test_check_not_input_relations(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    inputs = {"the adapter": tmp_path / "a", "a missing one": tmp_path / "nope", "none": None}
    for target, relation in ((tmp_path / "a", "is"), (tmp_path / "a" / "b" / "c", "is inside"), (tmp_path, "holds")):
        with pytest.raises(NotOwnedError, match=rf" {relation} the adapter "):
            check_not_input(target, inputs)
    check_not_input(tmp_path / "sibling", inputs)
    check_not_input(tmp_path / "nope" / "x", inputs)


def test_check_replaceable(tmp_path):
    mark = record_file("zhiling_merge.json")
    assert check_replaceable(tmp_path / "absent", mark) == tmp_path / "absent"
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", mark, overwrite=False)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "zhiling_merge.json").write_text("{}")
    check_replaceable(tmp_path / "ours", mark)
    with pytest.raises(ZhilingError, match="exists; choose another name or pass --overwrite"):
        check_replaceable(tmp_path / "ours", mark, overwrite=False)
    (tmp_path / "link").symlink_to(tmp_path / "ours")
    with pytest.raises(NotOwnedError, match="is a link"):
        check_replaceable(tmp_path / "link", mark)


def test_plain_name_problem():
    assert plain_name_problem("第一阶段") is None and plain_name_problem("stage-1") is None
    for bad in ("", ".", "..", ".hidden", "a/b", "a\\b", "c:", "a\x00b", " a", "a ", "x" * 256, None, 3):
        assert plain_name_problem(bad), bad
