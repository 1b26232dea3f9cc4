"""The Ollama Modelfile: its Go TEMPLATE renders what the Jinja chat template (the training prompt) renders.

Rendered with a small interpreter for the subset of Go text/template the exporter writes (below), and, when a Go
toolchain is installed, with Go's own text/template too.
"""

import json
import re
import subprocess

import pytest

from zhiling.data.templates import TEMPLATES, TokenizerTemplate, get_template
from zhiling.errors import ZhilingError
from zhiling.export.modelfile import MAX_ROUNDS, go_template, modelfile_text


# ----- a Go text/template subset ---------------------------------------------------------------------------------
_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|:=|=|,|-?\d+|\$?[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*|\$(?:\.[A-Za-z_]\w*)*'
                    r'|\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|\.')


def _lex(source):
    """Text and action items, with Go's trim markers applied to the text around them."""
    items, pos = [], 0
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        if items and items[-1][0] == "trim_next":
            items.pop()
            text = text.lstrip(" \t\r\n")
        items.append(("text", text))
        body = match.group(2)
        if not body.startswith("/*"):
            items.append(("action", body))
        if match.group(3):
            items.append(("trim_next", None))
        pos = match.end()
    text = source[pos:]
    if items and items[-1][0] == "trim_next":
        items.pop()
        text = text.lstrip(" \t\r\n")
    items.append(("text", text))
    return [item for item in items if item[0] == "action" or item[1]]


def _parse(items, start=0, stop=("end",)):
    """Nodes until one of ``stop`` keywords; returns (nodes, index of the stopping action, its body)."""
    nodes, index = [], start
    while index < len(items):
        kind, value = items[index]
        if kind == "text":
            nodes.append(("text", value))
            index += 1
            continue
        keyword = value.split()[0] if value.split() else ""
        if keyword in stop or value.startswith("else"):
            return nodes, index, value
        if keyword == "if":
            branches, index = _parse_if(items, index, value[2:].strip())
            nodes.append(("if", branches))
        elif keyword == "range":
            match = re.fullmatch(r"range\s+\$(\w+)\s*,\s*\$(\w+)\s*:=\s*(.+)", value, re.S)
            body, index, _ = _parse(items, index + 1)
            nodes.append(("range", match.group(1), match.group(2), match.group(3), body))
            index += 1
        elif keyword == "define":
            name = json.loads(value.split(None, 1)[1])
            body, index, _ = _parse(items, index + 1)
            nodes.append(("define", name, body))
            index += 1
        else:
            nodes.append(("action", value))
            index += 1
    return nodes, index, None


def _parse_if(items, index, condition):
    branches = []
    while True:
        body, index, ender = _parse(items, index + 1)
        branches.append((condition, body))
        if ender == "end":
            return branches, index + 1
        rest = ender[4:].strip()
        condition = rest[2:].strip() if rest.startswith("if") else None


def _truth(value):
    return bool(value) if value is not None else False


class GoSubset:
    FUNCS = {
        "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
        "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
        "not": lambda a: not _truth(a), "len": len, "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
        "or": lambda *a: next((x for x in a if _truth(x)), a[-1]), "index": lambda a, *keys: _index(a, keys),
        "slice": lambda a, *bounds: a[bounds[0]:bounds[1]] if len(bounds) == 2 else a[bounds[0]:] if bounds else a,
    }

    def __init__(self, source):
        self.nodes, _, _ = _parse(_lex(source))
        self.defines = {}

    def render(self, data):
        out = []
        self._run(self.nodes, data, {"$": data}, out)
        return "".join(out)

    def _run(self, nodes, dot, scope, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "define":
                self.defines[node[1]] = node[2]
            elif kind == "if":
                for condition, body in node[1]:
                    if condition is None or _truth(self._eval(condition, dot, scope)):
                        self._run(body, dot, dict(scope), out)
                        break
            elif kind == "range":
                _, index_name, item_name, source, body = node
                for position, item in enumerate(self._eval(source, dot, scope)):
                    self._run(body, dot, {**scope, "$" + index_name: position, "$" + item_name: item}, out)
            else:
                self._action(node[1], dot, scope, out)

    def _action(self, body, dot, scope, out):
        declaration = re.fullmatch(r"\$(\w+)\s*:=\s*(.+)", body, re.S)
        if declaration:
            scope["$" + declaration.group(1)] = self._eval(declaration.group(2), dot, scope)
            return
        if body.startswith("template "):
            name, _, argument = body[len("template "):].partition(" ")
            inner = []
            self._run(self.defines[json.loads(name)], self._eval(argument, dot, scope), {"$": scope["$"]}, inner)
            out.append("".join(inner))
            return
        value = self._eval(body, dot, scope)
        out.append(("true" if value else "false") if isinstance(value, bool) else str(value))

    def _eval(self, expression, dot, scope):
        tokens = _TOKEN.findall(expression)
        value, rest = self._command(tokens, dot, scope)
        assert not rest, f"unparsed: {rest}"
        return value

    def _command(self, tokens, dot, scope):
        """A command up to ')' or the end: a function call or a single operand."""
        operands = []
        while tokens and tokens[0] != ")":
            operand, tokens = self._operand(tokens, dot, scope)
            operands.append(operand)
        head = operands[0]
        if isinstance(head, tuple) and head[0] == "func":
            return self.FUNCS[head[1]](*operands[1:]), tokens
        assert len(operands) == 1, operands
        return head, tokens

    def _operand(self, tokens, dot, scope):
        token, tokens = tokens[0], tokens[1:]
        if token == "(":
            value, tokens = self._command(tokens, dot, scope)
            tokens = tokens[1:]  # ')'
            while tokens and tokens[0].startswith(".") and tokens[0] != ".":
                value = _fields(value, tokens[0][1:].split("."))
                tokens = tokens[1:]
            return value, tokens
        if token.startswith('"'):
            return json.loads(token), tokens
        if re.fullmatch(r"-?\d+", token):
            return int(token), tokens
        if token == ".":
            return dot, tokens
        if token.startswith("$"):
            name, _, path = token.partition(".")
            return _fields(scope[name], path.split(".") if path else []), tokens
        if token.startswith("."):
            return _fields(dot, token[1:].split(".")), tokens
        if token in self.FUNCS:
            return ("func", token), tokens
        raise AssertionError(f"unknown token {token}")


def _fields(value, names):
    for name in names:
        value = value[name]
    return value


def _index(value, keys):
    for key in keys:
        value = value[key]
    return value


# ----- what Ollama passes and what Jinja renders -----------------------------------------------------------------
CONVERSATIONS = {
    "single": (None, [("请找出句子中的人名：李雷在上海工作。", None)]),
    "system": ("你是一个乐于助人的助手。", [("你好", None)]),
    "history": ("请用中文回答。", [("1+1等于几？", "等于2。"), ("再加3呢？", "等于5。"), ("谢谢！", None)]),
    "no_system_history": (None, [("第一句", "回答一"), ("第二句", "回答二"), ("第三句", None)]),
    "quotes_and_braces": (None, [('他说："{{ 你好 }}" \\ 然后走了。', None)]),
}


def ollama_data(template, system, turns):
    """Ollama's template input: the Modelfile SYSTEM (the template's default) unless the request has one, as
    ``.System`` and as a leading system message; then the conversation."""
    system_text = template.default_system if system is None else system
    messages = [{"Role": "system", "Content": system_text}] if system_text else []
    for user, answer in turns:
        messages.append({"Role": "user", "Content": user})
        if answer is not None:
            messages.append({"Role": "assistant", "Content": answer})
    return {"System": system_text, "Messages": messages, "Response": ""}


def jinja_text(template, tokenizer, system, turns):
    """The Jinja chat template's text, without the BOS text Ollama adds as a token itself."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    text = tokenizer.apply_chat_template(messages, chat_template=template.to_jinja(), tokenize=False,
                                         add_generation_prompt=True)
    if template.add_bos:
        assert text.startswith(tokenizer.bos_token)
        text = text[len(tokenizer.bos_token):]
    return text


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_go_template_renders_the_jinja_template(name, conversation, tiny_tokenizer):
    template = TEMPLATES[name]
    system, turns = CONVERSATIONS[conversation]
    rendered = GoSubset(go_template(template, tiny_tokenizer.eos_token)).render(ollama_data(template, system, turns))
    assert rendered == jinja_text(template, tiny_tokenizer, system, turns)


def test_round_numbers_for_long_chats(tiny_tokenizer):
    """ChatGLM's [Round N] comes from a lookup on the message position (Go templates have no arithmetic)."""
    template = TEMPLATES["chatglm"]
    turns = [(f"问题{n}", f"回答{n}") for n in range(1, 40)] + [("最后", None)]
    go = GoSubset(go_template(template, "<eos>"))
    for system in (None, "系统提示"):
        rendered = go.render(ollama_data(template, system, turns))
        assert rendered == jinja_text(template, tiny_tokenizer, system, turns)
        assert "[Round 40]" in rendered
    assert MAX_ROUNDS >= 100


def test_system_prompt_override_reaches_the_template(tiny_tokenizer):
    template = get_template("alpaca_zh", system="你是翻译。")
    rendered = GoSubset(go_template(template, "<eos>")).render(ollama_data(template, None, [("翻译：你好", None)]))
    assert rendered.startswith("你是翻译。\n\n### 指令：\n翻译：你好")


def parse_modelfile(text):
    """Commands of a Modelfile the way Ollama's parser reads them (values in \"\"\" or \" quotes, or bare)."""
    commands = []
    pattern = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)\s+(?:(\w+)\s+)?("""(.*?)"""|"([^"\n]*)"|(\S+))',
                         re.S | re.M)
    for match in pattern.finditer(text):
        name, parameter = match.group(1), match.group(2)
        value = next(group for group in match.groups()[3:] if group is not None)
        if name != "PARAMETER" and parameter is not None:  # a bare word value was taken as parameter name
            value = parameter + " " + value if value else parameter
        commands.append((name, parameter if name == "PARAMETER" else None, value))
    return commands


def test_modelfile_text(tiny_tokenizer):
    template = TEMPLATES["alpaca"]
    text = modelfile_text("model-q8_0.gguf", template, tiny_tokenizer)
    commands = parse_modelfile(text)
    assert ("FROM", None, "./model-q8_0.gguf") in commands
    templates = [value for name, _, value in commands if name == "TEMPLATE"]
    assert templates == [go_template(template, tiny_tokenizer.eos_token)]
    assert ("SYSTEM", None, template.default_system) in commands
    stops = [value for name, parameter, value in commands if name == "PARAMETER" and parameter == "stop"]
    assert stops == template.stop_strings(tiny_tokenizer) == ["<eos>", "### Instruction:"]


def test_modelfile_without_default_system_and_with_gemma_stops(tiny_tokenizer):
    commands = parse_modelfile(modelfile_text("m.gguf", TEMPLATES["gemma"], tiny_tokenizer))
    assert not [c for c in commands if c[0] == "SYSTEM"]
    assert [value for name, _, value in commands if name == "PARAMETER"] == ["<end_of_turn>"]


def test_auto_template_gets_no_go_template(tiny_tokenizer):
    auto = TokenizerTemplate("{{ messages[0]['content'] }}")
    text = modelfile_text("m.gguf", auto, tiny_tokenizer)
    assert "TEMPLATE" not in [c[0] for c in parse_modelfile(text)]
    assert "tokenizer.chat_template" in text
    with pytest.raises(ZhilingError, match="named zhiling template"):
        go_template(auto, "<eos>")


def test_triple_quotes_are_refused(tiny_tokenizer):
    from dataclasses import replace

    bad = replace(TEMPLATES["belle"], name="bad", default_system='say """hi"""')
    with pytest.raises(ZhilingError, match="three double quotes"):
        modelfile_text("m.gguf", bad, tiny_tokenizer)


# ----- Go's own text/template, when a Go toolchain is installed ---------------------------------------------------
_GO_PROGRAM = """
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	System   string
	Messages []Message
	Response string
}

func main() {
	var cases []struct {
		Template string
		Data     Values
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		var b stringsBuilder
		if err := t.Execute(&b, c.Data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type stringsBuilder struct{ buf []byte }

func (s *stringsBuilder) Write(p []byte) (int, error) { s.buf = append(s.buf, p...); return len(p), nil }
func (s *stringsBuilder) String() string              { return string(s.buf) }
"""


def test_real_go_text_template_agrees(tiny_tokenizer, tmp_path):
    cases, expected = [], []
    for name, template in TEMPLATES.items():
        for system, turns in CONVERSATIONS.values():
            cases.append({"Template": go_template(template, tiny_tokenizer.eos_token),
                          "Data": ollama_data(template, system, turns)})
            expected.append(jinja_text(template, tiny_tokenizer, system, turns))
    (tmp_path / "main.go").write_text(_GO_PROGRAM)
    env_home = {"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "gocache"), "GO111MODULE": "off",
                "PATH": "/usr/bin:/bin:/usr/local/go/bin", "GOFLAGS": ""}
    done = subprocess.run(["go", "run", str(tmp_path / "main.go")], input=json.dumps(cases), capture_output=True,
                          text=True, env=env_home, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected
