"""The judged suite: strict score parsing, retry, marking, caching, and the leaderboard, with the real openai client
talking to a scripted judge server started by the test."""

import json
import re
import threading

import pytest
from judge_server import JudgeServer, answers_in

from zhiling.errors import DataError, ZhilingError
from zhiling.eval import judge as J
from zhiling.eval.predictions import read_predictions
from zhiling.eval.suite import (SuiteItem, answers_from_generate, answers_from_predictions, load_suite,
                                suite_records)

import openai

# ------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text", ['{"A": 7, "B": 0}', ' {"B": 0, "A": 7}\n', '```json\n{"A": 7, "B": 0}\n```',
                                  '```\n{"A":7,"B":0}\n```'])
def test_parse_scores_accepts_exactly_one_object(text):
    assert J.parse_scores(text, ["A", "B"]) == {"A": 7, "B": 0}


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    (None, "empty"),
    ("A 更好，给 8 分", "not a JSON object"),
    ('评分如下：{"A": 7, "B": 5}', "not a JSON object"),
    ('{"A": 7, "B": 5} 理由：A 更完整', "not a JSON object"),
    ("[7, 5]", "not an object"),
    ('{"A": 7}', "missing B"),
    ('{"A": 7, "B": 5, "C": 1}', "unexpected C"),
    ('{"A": 7.5, "B": 5}', "must be an integer"),
    ('{"A": "7", "B": 5}', "must be an integer"),
    ('{"A": true, "B": 5}', "must be an integer"),
    ('{"A": 11, "B": 5}', "between 0 and 10"),
    ('{"A": -1, "B": 5}', "between 0 and 10"),
])
def test_parse_scores_rejects_everything_else(text, reason):
    with pytest.raises(J.ScoreParseError, match=reason):
        J.parse_scores(text, ["A", "B"])


def test_prompt_shows_rubric_reference_and_labelled_answers():
    item = SuiteItem("culture-04", "culture", "上联是“海阔凭鱼跃”，请对出下联。", "天高任鸟飞")
    system, user = J.build_messages(item, ["天高任鸟飞", ""])
    assert system["content"] == J.RUBRIC
    assert "[参考答案]\n天高任鸟飞" in user["content"]
    assert "[回答 A]\n天高任鸟飞\n[回答 A 结束]" in user["content"]
    assert "[回答 B]\n（空白）\n[回答 B 结束]" in user["content"]
    assert "语言与文化" in user["content"]


def test_system_order_is_a_deterministic_permutation():
    systems = ["base", "lora", "full"]
    orders = {tuple(J.system_order(f"item-{i}", systems)) for i in range(30)}
    assert all(sorted(order) == sorted(systems) for order in orders)
    assert len(orders) > 1  # shuffled per prompt
    assert J.system_order("item-3", systems) == J.system_order("item-3", list(reversed(systems)))


# ------------------------------------------------------------------------------------------- suite


def test_bundled_suite_has_eight_categories_of_ten_chinese_prompts():
    items = load_suite()
    by_category = {}
    for item in items:
        by_category.setdefault(item.category, []).append(item)
    assert len(by_category) >= 8
    assert all(len(rows) >= 10 for rows in by_category.values())
    assert {"knowledge", "translation", "writing", "sentiment", "reading", "culture", "code", "safety"} <= \
        set(by_category)
    assert len({item.id for item in items}) == len(items)
    assert all(re.search(r"[\u4e00-\u9fff]", item.prompt) for item in items)
    assert load_suite(categories=["code"], limit=3) == by_category["code"][:3]


def test_suite_errors_name_file_line_field(tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text('{"id": "a", "category": "x", "prompt": "问"}\n{"id": "b", "prompt": "问"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_suite(path)
    assert (err.value.line, err.value.field) == (2, "category")
    path.write_text('{"id": "a", "category": "x", "prompt": "问"}\n{"id": "a", "category": "x", "prompt": "答"}\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match="duplicate id 'a'"):
        load_suite(path)
    with pytest.raises(ZhilingError, match="not in the suite"):
        load_suite(categories=["poetry"])


def _write_predictions(path, items, answer):
    with open(path, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps({"id": item.id, "prompt": item.prompt, "output": answer(item)},
                                    ensure_ascii=False) + "\n")
    return path


def test_answers_are_matched_by_id(tmp_path):
    items = load_suite(limit=1)
    path = _write_predictions(tmp_path / "p.jsonl", items[:-1], lambda item: "答")
    with pytest.raises(DataError, match=f"no answer for 1 suite prompt.*{items[-1].id}"):
        answers_from_predictions("lora", read_predictions(path), items)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": items[-1].id, "prompt": "另一个问题", "output": "答"}, ensure_ascii=False) + "\n")
        handle.write(json.dumps({"id": "extra-1", "prompt": "多余", "output": "答"}, ensure_ascii=False) + "\n")
    answers = answers_from_predictions("lora", read_predictions(path), items)
    assert set(answers.answers) == {item.id for item in items}
    assert any("different prompt text" in w and items[-1].id in w for w in answers.warnings)
    assert any("not in the suite" in w for w in answers.warnings)


def test_generate_seam():
    items = load_suite(limit=1)
    answers = answers_from_generate("echo", items, lambda prompts: [p[::-1] for p in prompts])
    assert answers.answers[items[0].id] == items[0].prompt[::-1]
    with pytest.raises(ZhilingError, match="returned 1 answers"):
        answers_from_generate("short", items, lambda prompts: ["x"])


def test_suite_records_are_prompt_only_canonical_records():
    from zhiling.data.records import validate_record

    for record in suite_records(load_suite(limit=1)):
        validate_record(record, require_answer=False)
        assert record["category"]


# ------------------------------------------------------------------------------------------- against a server


SUITE = [SuiteItem("k-1", "knowledge", "中国最长的河流是哪条？", "长江"),
         SuiteItem("k-2", "knowledge", "世界上最大的大洋是哪个？", "太平洋"),
         SuiteItem("m-1", "math", "1 到 100 的和是多少？坏格式一次", "5050"),
         SuiteItem("m-2", "math", "3x + 7 = 22，x 是多少？总是坏格式", "5"),
         SuiteItem("m-3", "math", "8 乘 5 等于多少？用代码块回答", "40")]


def scripted_judge(body: dict) -> str:
    """Score each answer by the SCORE=N it carries; misbehave on the marked prompts."""
    user = body["messages"][1]["content"]
    scores = {label: int(re.search(r"SCORE=(\d+)", text).group(1)) for label, text in answers_in(body).items()}
    if "总是坏格式" in user:
        return "A 比 B 好：A 9 分，B 3 分"
    if "坏格式一次" in user and len(body["messages"]) == 2:
        return "我认为 A 更好。"
    if "用代码块回答" in user:
        return "```json\n" + json.dumps(scores) + "\n```"
    return json.dumps(scores)


def _systems(good=9, bad=3):
    return [answers_from_generate("good", SUITE, lambda ps: [f"SCORE={good} 好答案" for _ in ps]),
            answers_from_generate("bad", SUITE, lambda ps: [f"SCORE={bad} 差答案" for _ in ps])]


def _client(server, key="test-key", **kwargs):
    return J.OpenAIJudge(server.url, "judge-test", key, **{"timeout": 10, **kwargs})


def test_judge_retries_marks_and_caches(tmp_path):
    with JudgeServer(scripted_judge) as server:
        cache = J.JudgeCache(tmp_path / "cache")
        run = J.run_judge(_client(server), SUITE, _systems(), cache=cache, retries=2, concurrency=3)
        by_id = {row["id"]: row for row in run.items}
        # plain and fenced answers parse; scores follow the answers whatever order they were shown in
        for item_id in ("k-1", "k-2", "m-3"):
            assert by_id[item_id]["status"] == "ok"
            assert by_id[item_id]["scores"] == {"good": 9, "bad": 3}
        # malformed once: retried with the reason, then accepted
        assert by_id["m-1"]["status"] == "ok" and len(by_id["m-1"]["judge_raw"]) == 2
        retry_request = next(r for r in server.requests if "坏格式一次" in r["messages"][1]["content"]
                             and len(r["messages"]) == 4)
        assert retry_request["messages"][2] == {"role": "assistant", "content": "我认为 A 更好。"}
        assert "无法使用" in retry_request["messages"][3]["content"]
        # always malformed: 1 + 2 retries, then marked, never guessed
        assert by_id["m-2"]["status"] == "unparsed" and by_id["m-2"]["scores"] is None
        assert len(by_id["m-2"]["judge_raw"]) == 3 and "not a JSON object" in by_id["m-2"]["reason"]
        assert run.requests == len(server.requests) == 3 + 2 + 3
        assert run.counts == {"ok": 4, "unparsed": 1}
        assert all(r["temperature"] == 0 and r["model"] == "judge-test" for r in server.requests)

        board = J.leaderboard(run.items, run.systems)
        assert board["categories"]["knowledge"]["good"] == {"mean": 9, "n": 2, "unparsed": 0, "error": 0}
        assert board["categories"]["math"]["bad"] == {"mean": 3, "n": 2, "unparsed": 1, "error": 0}
        assert board["overall"]["good"]["mean"] == 9 and board["macro"]["bad"] == 3

        # second run: everything from the cache (a fresh cache object reads the file), zero requests
        sent = len(server.requests)
        again = J.run_judge(_client(server), SUITE, _systems(), cache=J.JudgeCache(tmp_path / "cache"), retries=2)
        assert len(server.requests) == sent and again.requests == 0 and again.cached == len(SUITE)
        assert again.items == run.items

        # --retry-unparsed asks only for the unparsed prompt again
        J.run_judge(_client(server), SUITE, _systems(), cache=J.JudgeCache(tmp_path / "cache"), retries=0,
                    retry_unparsed=True)
        assert len(server.requests) == sent + 1

        # a changed answer is a new cache key: only the prompts whose answers changed are judged
        changed = _systems(good=8)
        third = J.run_judge(_client(server), SUITE, changed, cache=J.JudgeCache(tmp_path / "cache"), retries=0)
        assert third.cached == 0 and third.requests == len(SUITE)


def test_judge_leaderboard_tables():
    items = [{"id": "1", "category": "code", "status": "ok", "scores": {"a": 8, "b": 4}},
             {"id": "2", "category": "code", "status": "ok", "scores": {"a": 6, "b": 4}},
             {"id": "3", "category": "math", "status": "unparsed", "scores": None},
             {"id": "4", "category": "math", "status": "ok", "scores": {"a": 2, "b": 9}}]
    board = J.leaderboard(items, ["a", "b"])
    # overall a = (8 + 6 + 2) / 3; macro a = (7 + 2) / 2
    assert board["overall"]["a"]["mean"] == pytest.approx(16 / 3)
    assert board["macro"]["a"] == pytest.approx(4.5)
    table = J.leaderboard_table(board, ["a", "b"])
    assert table.rows[0] == ["code (代码)", "7.00", "4.00", "2/2"]
    assert table.rows[1] == ["math (数学)", "2.00", "9.00", "1/2"]
    ranking = J.ranking_table(board, ["a", "b"])
    assert [row[1] for row in ranking.rows] == ["b", "a"]  # b: (4 + 4 + 9) / 3 > 16 / 3
    markdown = table.to_markdown()
    assert "| code (代码) | 7.00 | 4.00 | 2/2 |" in markdown


def test_server_errors_are_marked_not_cached(tmp_path):
    failing = {"k-2"}

    def respond(body):
        user = body["messages"][1]["content"]
        if "最大的大洋" in user and failing:
            return 500, {"error": {"message": "overloaded", "type": "server_error"}}
        return json.dumps({label: 5 for label in answers_in(body)})

    with JudgeServer(respond) as server:
        run = J.run_judge(_client(server, max_retries=0), SUITE[:2], _systems(), cache=J.JudgeCache(tmp_path),
                          retries=0)
        by_id = {row["id"]: row for row in run.items}
        assert by_id["k-2"]["status"] == "error" and "overloaded" in by_id["k-2"]["reason"]
        assert by_id["k-1"]["status"] == "ok"
        failing.clear()
        again = J.run_judge(_client(server, max_retries=0), SUITE[:2], _systems(), cache=J.JudgeCache(tmp_path),
                            retries=0)
        assert again.requests == 1 and again.cached == 1 and again.counts == {"ok": 2}


def test_bad_key_wrong_url_and_no_server_stop_the_run(tmp_path):
    with JudgeServer(scripted_judge) as server:
        with pytest.raises(ZhilingError, match="rejected the API key"):
            J.run_judge(_client(server, key="wrong"), SUITE[:1], _systems(), cache=J.JudgeCache(None))
        wrong_url = J.OpenAIJudge(server.url.replace("/v1", "/api"), "judge-test", "test-key", max_retries=0)
        with pytest.raises(ZhilingError, match="404"):
            J.run_judge(wrong_url, SUITE[:1], _systems(), cache=J.JudgeCache(None))
        url = server.url
    closed = J.OpenAIJudge(url, "judge-test", "test-key", timeout=5, max_retries=0)
    with pytest.raises(ZhilingError, match="cannot reach the judge"):
        J.run_judge(closed, SUITE[:1], _systems(), cache=J.JudgeCache(None))


def test_cache_survives_a_cut_off_last_line(tmp_path):
    with JudgeServer(scripted_judge) as server:
        J.run_judge(_client(server), SUITE[:2], _systems(), cache=J.JudgeCache(tmp_path))
        path = tmp_path / J.CACHE_FILE
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2], encoding="utf-8")
        run = J.run_judge(_client(server), SUITE[:2], _systems(), cache=J.JudgeCache(tmp_path))
        assert run.cached == 1 and run.requests == 1
        # the entry written after the cut-off line is readable
        assert J.run_judge(_client(server), SUITE[:2], _systems(), cache=J.JudgeCache(tmp_path)).cached == 2


def test_duplicate_system_names_are_refused():
    systems = _systems()
    systems[1].name = "good"
    with pytest.raises(ZhilingError, match="unique"):
        J.run_judge(J.OpenAIJudge("http://127.0.0.1:9/v1", "m", "k"), SUITE, systems, cache=J.JudgeCache(None))


# ------------------------------------------------------------------------------------------- keys and endpoints

SECRETS = {"OPENAI_API_KEY": "sk-secret-openai", "OPENAI_ORG_ID": "org-secret", "OPENAI_PROJECT_ID": "proj-secret",
           "OPENAI_CUSTOM_HEADERS": "Authorization: Bearer sk-secret-custom\nX-Api-Key: sk-secret-x"}


def _judge_cli(tmp_path, url, *extra):
    """`zhiling eval judge` on a two-prompt suite file with one system; returns the exit code."""
    from zhiling.cli import main

    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": i.id, "category": i.category, "prompt": i.prompt}, ensure_ascii=False)
                             + "\n" for i in SUITE[:2]), encoding="utf-8")
    _write_predictions(tmp_path / "lora.jsonl", SUITE[:2], lambda item: "SCORE=6 答")
    return main(["eval", "judge", "--suite", str(suite), "--answers", f"lora={tmp_path / 'lora.jsonl'}",
                 "--judge-url", url, "--judge-model", "judge-test", "--cache-dir", str(tmp_path / "cache"),
                 "-q", *extra])


def _fives(body):
    return json.dumps({label: 5 for label in answers_in(body)})


def test_openai_key_is_sent_to_another_endpoint_only_when_named(tmp_path, monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JUDGE_KEY", "test-key")
    with JudgeServer(_fives, key=None) as server:
        assert _judge_cli(tmp_path, server.url, "--no-cache", "-o", str(tmp_path / "a")) == 0
        sent = list(server.headers)
        assert len(sent) == 2
        # no key, and nothing else the openai client would take from OPENAI_* variables
        assert all(h["authorization"] == "Bearer EMPTY" for h in sent)
        assert not any("secret" in value for h in sent for value in h.values()), sent
        assert "not sending $OPENAI_API_KEY" in capsys.readouterr().err

        # named: that variable's key, and still none of the other OPENAI_* values
        assert _judge_cli(tmp_path, server.url, "--no-cache", "--api-key-env", "OPENAI_API_KEY",
                          "-o", str(tmp_path / "b")) == 0
        named = server.headers[2:]
        assert all(h["authorization"] == "Bearer sk-secret-openai" for h in named)
        assert not any("secret" in value for h in named for value in h.values() if value != "Bearer sk-secret-openai")
        assert _judge_cli(tmp_path, server.url, "--no-cache", "--api-key-env", "JUDGE_KEY",
                          "-o", str(tmp_path / "c")) == 0
        assert all(h["authorization"] == "Bearer test-key" for h in server.headers[4:])


def test_which_key_goes_where(monkeypatch):
    from zhiling.eval.endpoint import api_key_for, is_official_openai

    env = {"OPENAI_API_KEY": "sk-o", "OTHER": "sk-x"}
    assert is_official_openai("https://api.openai.com/v1") and is_official_openai("https://API.openai.com:443/v1")
    for url in ("http://api.openai.com/v1", "https://api.openai.com.evil.example/v1", "https://evil.example/v1",
                "https://u:p@api.openai.com/v1", "https://api.openai.com:8443/v1", "https://xapi.openai.com/v1"):
        assert not is_official_openai(url), url
        assert api_key_for(url, None, env)[0] is None, url
        assert api_key_for(url, "OTHER", env)[0] == "sk-x"
    key, note = api_key_for("https://api.openai.com/v1", None, env)
    assert key == "sk-o" and "sending $OPENAI_API_KEY" in note
    assert api_key_for("https://api.openai.com/v1", "OTHER", env)[0] == "sk-x"
    assert api_key_for("http://127.0.0.1:8000/v1", "UNSET", env) == (None, "$UNSET is not set; sending no API key "
                                                                           "to http://127.0.0.1:8000/v1")
    # the official endpoint keeps the headers the client takes from OPENAI_* variables; any other gets them omitted
    monkeypatch.setenv("OPENAI_ORG_ID", "org-1")
    assert J.OpenAIJudge("https://api.openai.com/v1", "m", "k").client.default_headers["OpenAI-Organization"] == "org-1"
    assert isinstance(J.OpenAIJudge("https://judge.example/v1", "m", "k").client.default_headers["OpenAI-Organization"],
                      openai.Omit)


def test_plain_http_to_another_host_is_warned(tmp_path, monkeypatch, capsys):
    from zhiling.eval import endpoint

    warn = endpoint.plain_http_warning
    assert "the API key, prompts and answers" in warn("http://10.0.0.5:8000/v1", sends_key=True)
    assert "prompts and answers cross the network unencrypted" in warn("http://judge.lan/v1", sends_key=False)
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1",
                "http://127.8.0.1/v1", "https://judge.example/v1"):
        assert warn(url, sends_key=True) is None, url
    monkeypatch.setenv("JUDGE_KEY", "test-key")
    with JudgeServer(_fives) as server:
        assert _judge_cli(tmp_path, server.url, "--api-key-env", "JUDGE_KEY", "-o", str(tmp_path / "a")) == 0
        assert "unencrypted" not in capsys.readouterr().err
        monkeypatch.setattr(endpoint, "is_loopback_host", lambda host: False)  # as if the server were on another host
        assert _judge_cli(tmp_path, server.url, "--api-key-env", "JUDGE_KEY", "-o", str(tmp_path / "b")) == 0
        assert "the API key, prompts and answers cross the network unencrypted" in capsys.readouterr().err


def test_run_files_and_cache_hold_no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with JudgeServer(_fives, key=None) as server:
        url = server.url.replace("http://", "http://judge-user:pw-secret@")
        assert _judge_cli(tmp_path, url, "-o", str(tmp_path / "run")) == 0
        assert len(server.requests) == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["judge_url"] == server.url
    written = [p for folder in ("run", "cache") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert written and not any("pw-secret" in p.read_text(encoding="utf-8") for p in written)

    from zhiling.eval.endpoint import redact_url

    assert redact_url("https://u:pw@judge.example:8443/v1?api_key=s1&api-version=2024&token=s2&X-Goog-Api-Key=s3#f") \
        == "https://judge.example:8443/v1?api_key=REDACTED&api-version=2024&token=REDACTED&X-Goog-Api-Key=REDACTED"


def test_cache_is_keyed_by_endpoint(tmp_path):
    with JudgeServer(scripted_judge) as first, JudgeServer(scripted_judge) as second:
        J.run_judge(_client(first), SUITE[:2], _systems(), cache=J.JudgeCache(tmp_path))
        again = J.run_judge(_client(first), SUITE[:2], _systems(), cache=J.JudgeCache(tmp_path))
        assert again.cached == 2 and again.requests == 0
        elsewhere = J.run_judge(_client(second), SUITE[:2], _systems(), cache=J.JudgeCache(tmp_path))
        assert elsewhere.cached == 0 and elsewhere.requests == 2 and len(second.requests) == 2
    # a trailing slash or credentials in the URL do not make another endpoint
    assert J.OpenAIJudge(first.url + "/", "m", "k").endpoint == J.OpenAIJudge(
        first.url.replace("http://", "http://u:p@"), "m", "k").endpoint == first.url


def test_a_request_that_times_out_marks_the_item_error(tmp_path):
    release = threading.Event()

    def slow_on_k2(body):
        if "最大的大洋" in body["messages"][1]["content"]:
            release.wait(10)  # longer than the client's timeout; released when the test ends
        return _fives(body)

    try:
        with JudgeServer(slow_on_k2) as server:
            run = J.run_judge(_client(server, timeout=0.3, max_retries=1), SUITE[:3], _systems(),
                              cache=J.JudgeCache(tmp_path), retries=0)
            release.set()
            by_id = {row["id"]: row for row in run.items}
            assert by_id["k-2"]["status"] == "error" and "no answer from the judge within 0.3 s" in \
                by_id["k-2"]["reason"] and "2 attempt(s)" in by_id["k-2"]["reason"]
            assert by_id["k-1"]["status"] == by_id["m-1"]["status"] == "ok"
            assert sum("最大的大洋" in r["messages"][1]["content"] for r in server.requests) == 2
            # not cached: the next run asks again for that prompt only
            again = J.run_judge(_client(server), SUITE[:3], _systems(), cache=J.JudgeCache(tmp_path), retries=0)
            assert again.requests == 1 and again.counts == {"ok": 3}
    finally:
        release.set()
