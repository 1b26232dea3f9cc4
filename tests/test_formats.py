"""Every input format: good rows give exact canonical records, bad rows give errors naming file, line and field."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from zhiling.data.convert import iter_records
from zhiling.data.formats import all_formats, get_format
from zhiling.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def convert(tmp_path, fmt, rows, options=None, name="data.jsonl"):
    path = write_jsonl(tmp_path / name, rows)
    return list(iter_records(str(path), fmt, options, announce=None))


def convert_error(tmp_path, fmt, rows, options=None) -> DataError:
    with pytest.raises(DataError) as info:
        convert(tmp_path, fmt, rows, options)
    return info.value


def chat(*texts, system="", id="x", source="x", **extra):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    return {"id": id, "system": system, "messages": messages, "source": source, **extra}


# ----- alpaca -------------------------------------------------------------------------------------------------------
def test_alpaca_rows(tmp_path):
    rows = [{"instruction": "翻译成英文", "input": "你好", "output": "Hello"},
            {"instruction": "再说一遍", "input": "", "output": "好的", "system": "你是助手",
             "history": [["第一问", "第一答"]]}]
    assert convert(tmp_path, "alpaca", rows) == [
        chat("翻译成英文\n你好", "Hello", id="alpaca-000001", source="alpaca"),
        chat("第一问", "第一答", "再说一遍", "好的", system="你是助手", id="alpaca-000002", source="alpaca"),
    ]


def test_alpaca_json_array_reports_line_of_bad_row(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "问", "output": "答"},\n  {"instruction": "问二", "output": ""}\n]\n',
                    encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(iter_records(str(path), "alpaca", announce=None))
    err = info.value
    assert (err.path, err.line, err.field, err.reason) == (str(path), 3, "output", "is empty")


@pytest.mark.parametrize("row, field, reason", [
    ({"input": "x", "output": "y"}, "instruction", "missing field 'instruction'"),
    ({"instruction": ["a"], "output": "y"}, "instruction", "expected a string, got array"),
    ({"instruction": "a", "output": "  "}, "output", "is empty"),
    ({"instruction": "a", "output": "b", "history": [["q"]]}, "history[0]", "pair"),
])
def test_alpaca_bad_rows(tmp_path, row, field, reason):
    err = convert_error(tmp_path, "alpaca", [{"instruction": "好", "output": "好"}, row])
    assert err.line == 2 and err.field == field and reason in err.reason


# ----- belle --------------------------------------------------------------------------------------------------------
def test_belle_rows(tmp_path):
    rows = [{"input": "写一句问候", "target": "你好呀"},
            {"instruction": "判断情感", "input": "好开心", "output": "积极"},
            {"instruction": "Human: 推荐一本书\nAssistant: 《红楼梦》\nHuman：为什么？\nAssistant:", "input": "",
             "output": "人物刻画细腻。"}]
    assert convert(tmp_path, "belle", rows) == [
        chat("写一句问候", "你好呀", id="belle-000001", source="belle"),
        chat("判断情感\n好开心", "积极", id="belle-000002", source="belle"),
        chat("推荐一本书", "《红楼梦》", "为什么？", "人物刻画细腻。", id="belle-000003", source="belle"),
    ]


def test_belle_dialogue_ending_with_human_turn(tmp_path):
    rows = [{"instruction": "Human: 你好\nAssistant: 你好！\nHuman: 今天星期几？", "output": "星期三。"}]
    assert convert(tmp_path, "belle", rows)[0]["messages"][-2:] == [
        {"role": "user", "content": "今天星期几？"}, {"role": "assistant", "content": "星期三。"}]


@pytest.mark.parametrize("instruction, reason", [
    ("Human: 问\nHuman: 又问\nAssistant:", "turn 2 is 'Human:'"),
    ("Human: 问\nAssistant: 答了\n", "already has text"),
    ("Human: \nAssistant: 答\nHuman: 问\nAssistant:", "turn 1 ('Human:') is empty"),
])
def test_belle_bad_dialogues(tmp_path, instruction, reason):
    err = convert_error(tmp_path, "belle", [{"instruction": instruction, "output": "答"}])
    assert err.field == "instruction" and reason in err.reason


def test_belle_missing_target(tmp_path):
    err = convert_error(tmp_path, "belle", [{"input": "问", "target": None}])
    assert err.field == "target" and "missing" in err.reason


# ----- instruct -----------------------------------------------------------------------------------------------------
def test_instruct_default_columns(tmp_path):
    rows = [{"instruct": "找出人名", "query": "张三去了北京。", "answer": "张三_人名"}]
    assert convert(tmp_path, "instruct", rows) == [
        chat("找出人名\n张三去了北京。", "张三_人名", id="instruct-000001", source="instruct")]


def test_instruct_custom_columns(tmp_path):
    rows = [{"问题": "一加一等于几？", "回答": "二", "背景": "你是数学老师"}]
    options = {"columns": "instruction=,input=问题,output=回答,system=背景"}
    assert convert(tmp_path, "instruct", rows, options) == [
        chat("一加一等于几？", "二", system="你是数学老师", id="instruct-000001", source="instruct")]


def test_instruct_columns_as_mapping(tmp_path):
    rows = [{"task": "分类", "text": "这部电影很好看", "label": "正面"}]
    options = {"columns": {"instruction": "task", "input": "text", "output": "label"}}
    assert convert(tmp_path, "instruct", rows, options)[0]["messages"][0]["content"] == "分类\n这部电影很好看"


@pytest.mark.parametrize("columns, reason", [
    ("instrucion=a", "did you mean 'instruction'"),
    ("output=", "'output' must name"),
    ("oops", "not of the form name=column"),
])
def test_instruct_bad_columns_option(tmp_path, columns, reason):
    err = convert_error(tmp_path, "instruct", [{"instruct": "a", "answer": "b"}], {"columns": columns})
    assert reason in err.reason


def test_instruct_wrong_typed_answer(tmp_path):
    err = convert_error(tmp_path, "instruct", [{"instruct": "a", "query": "b", "answer": {"x": 1}}])
    assert (err.line, err.field) == (1, "answer") and "got object" in err.reason


# ----- sharegpt -----------------------------------------------------------------------------------------------------
def test_sharegpt_rows(tmp_path):
    rows = [{"id": "c1", "conversations": [{"from": "system", "value": "你是导游"}, {"from": "human", "value": "去哪玩"},
                                           {"from": "gpt", "value": "去西湖"}]},
            {"conversations": [{"from": "user", "value": "一"}, {"from": "bot", "value": "二"},
                               {"from": "Human", "value": "三"}, {"from": "assistant", "value": "四"}]},
            {"conversations": [{"role": "user", "content": "甲"}, {"role": "assistant", "content": "乙"}]}]
    assert convert(tmp_path, "sharegpt", rows) == [
        chat("去哪玩", "去西湖", system="你是导游", id="c1", source="sharegpt"),
        chat("一", "二", "三", "四", id="sharegpt-000002", source="sharegpt"),
        chat("甲", "乙", id="sharegpt-000003", source="sharegpt"),
    ]


def test_sharegpt_trailing_user(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"},
                               {"from": "human", "value": "还有吗"}]}]
    assert "last turn" in convert_error(tmp_path, "sharegpt", rows).reason
    assert convert(tmp_path, "sharegpt", rows, {"trailing_user": "drop"})[0]["messages"][-1]["content"] == "答"


@pytest.mark.parametrize("turns, field, reason", [
    ([{"from": "alien", "value": "x"}], "conversations[0].from", "unknown speaker"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "conversations[1]", "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], "conversations[1].value", "is empty"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "conversations[0].value", "got number"),
])
def test_sharegpt_bad_rows(tmp_path, turns, field, reason):
    err = convert_error(tmp_path, "sharegpt", [{"conversations": turns}])
    assert err.field == field and reason in err.reason


# ----- messages (canonical / OpenAI) --------------------------------------------------------------------------------
def test_messages_rows_keep_ids_and_extra_keys(tmp_path):
    rows = [{"id": "r1", "messages": [{"role": "system", "content": "简洁"}, {"role": "user", "content": "问"},
                                      {"role": "assistant", "content": "答"}], "task": "qa"}]
    assert convert(tmp_path, "messages", rows) == [chat("问", "答", system="简洁", id="r1", source="messages",
                                                        task="qa")]


def test_messages_prompt_only_rows_need_option(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "问"}]}]
    assert "last turn" in convert_error(tmp_path, "messages", rows).reason
    records = convert(tmp_path, "messages", rows, {"require_answer": "false"})
    assert records[0]["messages"] == [{"role": "user", "content": "问"}]


# ----- vicuna_chat --------------------------------------------------------------------------------------------------
def test_vicuna_chat_rows(tmp_path):
    rows = [{"input": ["你好", "讲个笑话"], "output": ["你好！", "从前有座山。"]},
            {"instruction": "你是老师", "input": ["一"], "output": ["二"]}]
    assert convert(tmp_path, "vicuna_chat", rows) == [
        chat("你好", "你好！", "讲个笑话", "从前有座山。", id="vicuna_chat-000001", source="vicuna_chat"),
        chat("一", "二", system="你是老师", id="vicuna_chat-000002", source="vicuna_chat"),
    ]


@pytest.mark.parametrize("row, field, reason", [
    ({"input": ["a", "b"], "output": ["c"]}, "output", "'input' has 2 turns but 'output' has 1"),
    ({"input": ["a"], "output": [""]}, "output[0]", "is empty"),
    ({"input": ["a"], "output": [1]}, "output[0]", "got number"),
    ({"input": [], "output": []}, "input", "empty array"),
])
def test_vicuna_chat_bad_rows(tmp_path, row, field, reason):
    err = convert_error(tmp_path, "vicuna_chat", [row])
    assert err.field == field and reason in err.reason


# ----- vicuna_chitchat ----------------------------------------------------------------------------------------------
def test_vicuna_chitchat_rows(tmp_path):
    rows = [{"history": [{"input": "你好", "output": "你好呀"}, {"input": "在忙吗", "output": "不忙"}],
             "input": "聊聊天吧", "output": "好啊"},
            {"history": [], "input": "只问一句", "output": "只答一句"}]
    assert convert(tmp_path, "vicuna_chitchat", rows) == [
        chat("你好", "你好呀", "在忙吗", "不忙", "聊聊天吧", "好啊", id="vicuna_chitchat-000001",
             source="vicuna_chitchat"),
        chat("只问一句", "只答一句", id="vicuna_chitchat-000002", source="vicuna_chitchat"),
    ]
    assert convert(tmp_path, "auto", rows) == convert(tmp_path, "vicuna_chitchat", rows)
    prompt = [{"history": [{"input": "一", "output": "二"}], "input": "三"}]
    assert convert(tmp_path, "vicuna_chitchat", prompt, {"require_answer": "false"})[0]["messages"][-1] == {
        "role": "user", "content": "三"}


@pytest.mark.parametrize("row, field, reason", [
    ({"history": [{"input": "a"}], "input": "b", "output": "c"}, "history[0].output", "missing field 'output'"),
    ({"history": [["a", "b"]], "input": "b", "output": "c"}, "history[0]", "got array"),
    ({"history": [{"input": "a", "output": " "}], "input": "b", "output": "c"}, "history[0].output", "is empty"),
    ({"history": "a", "input": "b", "output": "c"}, "history", "expected an array, got string"),
    ({"history": [], "input": "b"}, "output", "missing field 'output'"),
])
def test_vicuna_chitchat_bad_rows(tmp_path, row, field, reason):
    err = convert_error(tmp_path, "vicuna_chitchat", [row])
    assert (err.line, err.field) == (1, field) and reason in err.reason


# ----- firefly ------------------------------------------------------------------------------------------------------
def test_firefly_rows_keep_kind(tmp_path):
    rows = [{"kind": "Couplet", "input": "对下联：春风", "target": "秋雨"}]
    assert convert(tmp_path, "firefly", rows) == [chat("对下联：春风", "秋雨", id="firefly-000001", source="firefly",
                                                       kind="Couplet")]


def test_firefly_missing_kind(tmp_path):
    err = convert_error(tmp_path, "firefly", [{"input": "a", "target": "b"}])
    assert err.field == "kind"


# ----- psyqa --------------------------------------------------------------------------------------------------------
PSYQA = {"questionID": 7, "question": "总是失眠怎么办？", "description": "最近压力大，晚上睡不着。", "keywords": "睡眠",
         "answers": [{"answer_text": "试着固定作息。"}, {"answer_text": "睡前少看手机。"}]}


@pytest.mark.parametrize("description, prompt", [
    ("append", "总是失眠怎么办？\n最近压力大，晚上睡不着。"),
    ("input", "总是失眠怎么办？\n\n最近压力大，晚上睡不着。"),
    ("drop", "总是失眠怎么办？"),
])
def test_psyqa_description_modes(tmp_path, description, prompt):
    records = convert(tmp_path, "psyqa", [PSYQA], {"description": description})
    assert records == [chat(prompt, "试着固定作息。", id="psyqa-000001", source="psyqa", question_id=7,
                            keywords="睡眠")]


def test_psyqa_all_answers(tmp_path):
    records = convert(tmp_path, "psyqa", [PSYQA], {"answers": "all", "description": "drop"})
    assert [r["messages"][1]["content"] for r in records] == ["试着固定作息。", "睡前少看手机。"]
    assert [r["id"] for r in records] == ["psyqa-000001", "psyqa-000002"]


def test_psyqa_empty_description_leaves_question(tmp_path):
    row = {**PSYQA, "description": ""}
    assert convert(tmp_path, "psyqa", [row], {"description": "input"})[0]["messages"][0]["content"] == "总是失眠怎么办？"


@pytest.mark.parametrize("answers, field, reason", [
    ([], "answers", "empty array"),
    ([{"answer_text": ""}], "answers[0].answer_text", "is empty"),
    (["文本"], "answers[0]", "expected an object"),
])
def test_psyqa_bad_answers(tmp_path, answers, field, reason):
    err = convert_error(tmp_path, "psyqa", [{**PSYQA, "answers": answers}], {"answers": "all"})
    assert err.field == field and reason in err.reason


def test_psyqa_bad_option_value(tmp_path):
    err = convert_error(tmp_path, "psyqa", [PSYQA], {"answers": "every"})
    assert "answers='every' is not one of: first, all" in err.reason


# ----- couplets -----------------------------------------------------------------------------------------------------
def write_couplets(folder, upper, lower):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in.txt").write_text(upper, encoding="utf-8")
    (folder / "out.txt").write_text(lower, encoding="utf-8")
    return folder


def test_couplets_folder_and_file_pair(tmp_path):
    folder = write_couplets(tmp_path / "c", "春 风 暖\n 夏 日 长 \n\n", "秋 月 明\n冬 雪 白\n")
    expected = [chat("请为下面的上联对出下联。\n上联：春风暖", "秋月明", id="couplets-000001", source="couplets"),
                chat("请为下面的上联对出下联。\n上联：夏日长", "冬雪白", id="couplets-000002", source="couplets")]
    assert list(iter_records(str(folder), "couplets", announce=None)) == expected
    files = [str(folder / "in.txt"), str(folder / "out.txt")]
    assert list(iter_records(files, "couplets", announce=None)) == expected


def test_couplets_prompt_option(tmp_path):
    folder = write_couplets(tmp_path / "c", "山 高\n", "水 长\n")
    records = list(iter_records(str(folder), "couplets", {"prompt": "对下联：{first}"}, announce=None))
    assert records[0]["messages"][0]["content"] == "对下联：山高"
    with pytest.raises(DataError, match="must contain"):
        list(iter_records(str(folder), "couplets", {"prompt": "对下联"}, announce=None))


def test_couplets_mismatched_line_counts(tmp_path):
    folder = write_couplets(tmp_path / "c", "一\n二\n三\n", "四\n五\n")
    with pytest.raises(DataError) as info:
        list(iter_records(str(folder), "couplets", announce=None))
    message = str(info.value)
    assert str(folder / "in.txt") in message and str(folder / "out.txt") in message
    assert "has 3 lines" in message and "has 2" in message


def test_couplets_empty_line_and_wrong_order(tmp_path):
    folder = write_couplets(tmp_path / "c", "一\n\n三\n", "四\n五\n六\n")
    with pytest.raises(DataError) as info:
        list(iter_records(str(folder), "couplets", announce=None))
    assert (info.value.line, info.value.field) == (2, "in.txt")
    with pytest.raises(DataError, match="before the 下联 file"):
        list(iter_records([str(folder / "out.txt"), str(folder / "in.txt")], "couplets", announce=None))
    with pytest.raises(DataError, match="in pairs"):
        list(iter_records([str(folder / "in.txt")], "couplets", announce=None))


def test_couplets_folder_without_out_txt(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "in.txt").write_text("一\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing out.txt"):
        list(iter_records(str(tmp_path / "c"), "couplets", announce=None))


# ----- baize --------------------------------------------------------------------------------------------------------
HEADER = "The conversation between human and AI assistant.\n"


def test_baize_rows(tmp_path):
    rows = [{"topic": "学习", "input": HEADER + "[|Human|] 怎么背单词？\n[|AI|] 每天复习。\n[|Human|] 多久？\n[|AI|] 半小时。\n"
                                                 "[|Human|] "}]
    assert convert(tmp_path, "baize", rows) == [chat("怎么背单词？", "每天复习。", "多久？", "半小时。", id="baize-000001",
                                                     source="baize", topic="学习")]


@pytest.mark.parametrize("text, reason", [
    (HEADER + "[|Human|] ", "no complete"),
    (HEADER + "没有标记", "no complete"),
    (HEADER + "[|Human|] 问\n[|Human|] 又问\n[|AI|] 答\n[|Human|] ", "turn 2 is [|Human|]"),
    (HEADER + "[|Human|] 问\n[|AI|] \n[|Human|] 再问\n[|AI|] 答", "turn 2 ([|AI|]) is empty"),
    (HEADER + "[|Human|] 问\n[|AI|] 答\n[|Human|] 没人回答", "unanswered"),
])
def test_baize_bad_transcripts(tmp_path, text, reason):
    err = convert_error(tmp_path, "baize", [{"topic": "t", "input": text}])
    assert err.field == "input" and reason in err.reason


# ----- coig ---------------------------------------------------------------------------------------------------------
def test_coig_subsets(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "Hi", "trans_instruction": "打个招呼",
             "trans_input": "对老师", "trans_output": "老师好"},
            {"textbox_q_instruction": "选择题", "textbox_q_context": "", "textbox_question": "一加一？A.1 B.2",
             "textbox_answer": "B", "textbox_answer_analysis": "一加一等于二。"},
            {"instruction": "写一个函数", "input": "", "output": "def f(): pass"},
            {"round_1": {"response": '```json\n{"Q": "再问", "A": "再答"}\n```'},
             "round_0": {"response": '{"Q": "先问", "A": "先答"}'}}]
    assert convert(tmp_path, "coig", rows) == [
        chat("打个招呼\n对老师", "老师好", id="coig-000001", source="coig", subset="translated"),
        chat("选择题\n一加一？A.1 B.2", "B\n\n一加一等于二。", id="coig-000002", source="coig", subset="exam"),
        chat("写一个函数", "def f(): pass", id="coig-000003", source="coig", subset="instructions"),
        chat("先问", "先答", "再问", "再答", id="coig-000004", source="coig", subset="counterfactual"),
    ]


@pytest.mark.parametrize("analysis, output", [("prepend", "解析\n\nB"), ("drop", "B")])
def test_coig_exam_analysis_option(tmp_path, analysis, output):
    row = {"textbox_question": "问", "textbox_answer": "B", "textbox_answer_analysis": "解析"}
    assert convert(tmp_path, "coig", [row], {"analysis": analysis})[0]["messages"][1]["content"] == output


@pytest.mark.parametrize("row, field, reason", [
    ({"round_0": {"response": "不是 JSON"}}, "round_0.response", "not valid JSON"),
    ({"round_0": {"response": '{"Q": "问"}'}}, "round_0.response.A", "missing field 'A'"),
    ({"textbox_question": "问", "textbox_answer": ""}, "textbox_answer", "is empty"),
    ({"trans_instruction": "问", "trans_output": ""}, "trans_output", "is empty"),
])
def test_coig_bad_rows(tmp_path, row, field, reason):
    err = convert_error(tmp_path, "coig", [row])
    assert err.field == field and reason in err.reason


def test_coig_counterfactual_archive_and_folder(tmp_path):
    dialogue = {"round_0": {"response": json.dumps({"Q": "地球是平的吗？", "A": "不是，地球近似球体。"}, ensure_ascii=False)}}
    text = json.dumps(dialogue, ensure_ascii=False, indent=2).encode("utf-8")
    archive = tmp_path / "chats.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("chats/0001.json")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    expected = [chat("地球是平的吗？", "不是，地球近似球体。", id="coig-000001", source="coig", subset="counterfactual")]
    assert list(iter_records(str(archive), announce=None)) == expected  # detected from the archive
    folder = tmp_path / "unpacked"
    folder.mkdir()
    (folder / "0001.json").write_bytes(text)
    assert list(iter_records(str(folder), "coig", announce=None)) == expected


def tar_gz(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_coig_archive_jsonl_member_gives_one_row_per_line(tmp_path):
    exam = {"textbox_question": "一加一等于几？", "textbox_answer": "二"}
    trans = {"trans_instruction": "翻译", "trans_input": "hello", "trans_output": "你好"}
    lines = [json.dumps(exam, ensure_ascii=False), json.dumps(trans, ensure_ascii=False), "{broken"]
    path = tar_gz(tmp_path / "coig.tar.gz", {"part/exam.jsonl": "\n".join(lines).encode("utf-8") + b"\n"})
    rejected = []
    records = list(iter_records(str(path), "coig", skip_invalid=True, rejected=rejected.append, announce=None))
    assert [r["subset"] for r in records] == ["exam", "translated"]
    assert [(item.file, item.line) for item in rejected] == [(f"{path}:part/exam.jsonl", 3)]


def test_coig_damaged_archive_is_a_clear_error(tmp_path):
    dialogue = json.dumps({"round_0": {"response": json.dumps({"Q": "问", "A": "答"})}}).encode()
    whole = tar_gz(tmp_path / "whole.tar.gz", {f"{i}.json": dialogue for i in range(50)}).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[:len(whole) * 2 // 3])
    with pytest.raises(DataError) as info:
        list(iter_records(str(cut), skip_invalid=True, rejected=lambda r: None, announce=None))
    assert info.value.path == str(cut) and "cannot read the archive" in info.value.reason


def test_coig_dialogue_file_that_is_not_utf8_is_an_error(tmp_path):
    folder = tmp_path / "chats"
    folder.mkdir()
    text = json.dumps({"round_0": {"response": json.dumps({"Q": "问题", "A": "回答"}, ensure_ascii=False)}},
                      ensure_ascii=False, indent=2)
    (folder / "0001.json").write_bytes(text.encode("utf-8").replace("回答".encode("utf-8"), "回答".encode("gbk")))
    with pytest.raises(DataError) as info:
        list(iter_records(str(folder), "coig", announce=None))
    assert info.value.path == str(folder / "0001.json") and "not valid UTF-8" in info.value.reason


# ----- registry of formats ------------------------------------------------------------------------------------------
def test_every_format_has_an_example_that_converts():
    for name, spec in all_formats().items():
        assert spec.example_path is not None and spec.example_path.exists(), name
        records = list(iter_records(str(spec.example_path), name, announce=None))
        assert records and all(r["source"] == name for r in records), name
        detected = list(iter_records(str(spec.example_path), announce=None))
        assert detected == records, f"auto-detection of {spec.example_path.name} is not {name}"


def test_unknown_format_and_option():
    with pytest.raises(DataError, match="unknown format 'alpacca'; did you mean 'alpaca'"):
        get_format("alpacca")
    with pytest.raises(DataError, match="unknown option 'answer' for format 'psyqa'; did you mean 'answers'"):
        get_format("psyqa").check_options({"answer": "all"})
    with pytest.raises(DataError, match="it takes no options"):
        get_format("vicuna_chat").check_options({"x": "1"})


def test_folder_of_plain_json_is_not_taken_for_coig(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"instruction": "问", "output": "答"}])
    with pytest.raises(DataError, match="is a folder"):
        list(iter_records(str(folder), announce=None))


def test_alpaca_prompt_only_rows_with_require_answer_false(tmp_path):
    from zhiling.data.convert import iter_records
    from zhiling.errors import DataError

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"instruction": "判断情感：很好吃", "input": ""}\n'
                    '{"instruction": "翻译", "input": "你好", "output": "hello"}\n', encoding="utf-8")
    records = list(iter_records([str(path)], "alpaca", {"require_answer": "false"}, announce=None))
    assert records[0]["messages"] == [{"role": "user", "content": "判断情感：很好吃"}]
    assert records[1]["messages"][-1] == {"role": "assistant", "content": "hello"}
    with pytest.raises(DataError, match="line 1, field 'output': missing field 'output'"):
        list(iter_records([str(path)], "alpaca", announce=None))
