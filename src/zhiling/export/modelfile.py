"""An Ollama ``Modelfile`` whose TEMPLATE renders exactly the training template.

Ollama templates are Go ``text/template``. The template here loops over ``.Messages`` (Ollama passes the whole
conversation; ``.System`` holds the system prompt, the Modelfile's SYSTEM line when the request has none) and
renders the same text as ``Template.render`` / the Jinja chat template, with two differences that are Ollama's,
not ours:

* No BOS text: Ollama adds the BOS token itself when the GGUF says ``tokenizer.ggml.add_bos_token`` (the exporter
  writes that flag from the template's ``add_bos``).
* ``{eos}`` in an answer's end marker is written as the tokenizer's EOS text, which Ollama tokenizes back to the
  EOS token (special tokens are parsed in prompts).

Every piece of literal text is a Go string constant (``{{ "..." }}``), so the layout whitespace of the template
can be trimmed with ``{{-`` without touching the text the model sees. Go templates have no arithmetic; the round
number (``{index}``, ChatGLM's ``[Round N]``) comes from a lookup on the message position.
"""

from __future__ import annotations

import json
from pathlib import Path

from zhiling.data.templates import Template
from zhiling.errors import ZhilingError

MODELFILE_HEADER = "# Written by zhiling export."  # the first line; --overwrite replaces only such a Modelfile
MAX_ROUNDS = 128  # rounds numbered by the ``{index}`` lookup; later rounds repeat the last number


def go_string(text: str) -> str:
    """A Go interpreted string literal (JSON escapes are valid Go escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _fill(fmt: str, content: str | None, eos: str) -> str:
    """A template piece as Go template actions: literals quoted, ``{content}`` -> the expression ``content``,
    ``{index}`` -> the round number, ``{eos}`` -> the EOS text."""
    out = []
    text = fmt.replace("{eos}", "\0eos\0")
    while text:
        cuts = [(text.find(mark), mark) for mark in ("{content}", "{index}", "\0eos\0") if mark in text]
        if not cuts:
            out.append(text)
            break
        cut, mark = min(cuts)
        if cut:
            out.append(text[:cut])
        if mark == "{content}":
            out.append(("expr", content or '""'))
        elif mark == "{index}":
            out.append(("expr", 'template "round" $i'))
        else:
            out.append(eos)
        text = text[cut + len(mark):]
    pieces = []
    for part in out:
        if isinstance(part, tuple):
            pieces.append("{{ " + part[1] + " }}")
        elif part:
            pieces.append("{{ " + go_string(part) + " }}")
    return "".join(pieces)


def _round_lookup() -> str:
    """``{{ template "round" $i }}``: the 1-based round of the user message at position $i of ``.Messages``
    (position 2r-2 without a leading system message, 2r-1 with one: both give r = $i / 2 + 1)."""
    branches = []
    for number in range(1, MAX_ROUNDS):
        keyword = "if" if number == 1 else "else if"
        branches.append(f"{{{{ {keyword} lt . {2 * number} }}}}{number}")
    return '{{- define "round" }}' + "".join(branches) + f"{{{{ else }}}}{MAX_ROUNDS}{{{{ end }}}}{{{{ end }}}}"


def go_template(template: Template, eos_text: str) -> str:
    """The Go template for a zhiling ``Template`` (see the module docstring)."""
    if not isinstance(template, Template):
        raise ZhilingError("an Ollama TEMPLATE can only be written for a named zhiling template, not for the "
                           "tokenizer's own Jinja chat template ('auto')")
    uses_index = any("{index}" in part for part in (template.user, template.system, template.prefix))
    lines = []
    if uses_index:
        lines.append(_round_lookup())
    lines.append(f"{{{{- /* zhiling template '{template.name}' */ -}}}}")
    if template.prefix:
        lines.append("{{- " + _fill(template.prefix, None, eos_text)[3:])
    if not template.system_in_first_user:
        lines.append("{{- if .System }}" + _fill(template.system, "$.System", eos_text) + "{{ end }}")
    lines += [
        "{{- range $i, $m := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- $first := or (eq $i 0) (and (eq $i 1) (eq (index $.Messages 0).Role "system")) }}',
        '{{- if eq $m.Role "user" }}',
    ]
    if template.separator:
        lines.append("{{- if not $first }}" + _fill(template.separator, None, eos_text) + "{{ end }}")
    user = _fill(template.user, "$m.Content", eos_text)
    if template.system_in_first_user:
        system_block = _fill(template.system, "$.System", eos_text)
        lines.append("{{- if and $first $.System }}" + _splice_system(template, system_block, eos_text)
                     + "{{ else }}" + user + "{{ end }}")
    else:
        lines.append("{{- " + user[3:])
    if template.assistant_prefix:
        lines.append("{{- if $last }}" + _fill(template.assistant_prefix, None, eos_text) + "{{ end }}")
    lines += [
        '{{- else if eq $m.Role "assistant" }}',
        "{{- " + (_fill(template.assistant_prefix, None, eos_text) + _fill(template.assistant, "$m.Content", eos_text)
                  + _fill(template.end, None, eos_text))[3:],
        "{{- end }}",
        "{{- end }}",
    ]
    result = "\n".join(line for line in lines if line.strip() not in ("{{-", ""))
    if '"""' in result:
        raise ZhilingError(f"template '{template.name}' contains three double quotes in a row, which an Ollama "
                           f"Modelfile cannot hold")
    return result


def _splice_system(template: Template, system_block: str, eos_text: str) -> str:
    """The first user message with the system block in front of its content (``system_in_first_user``)."""
    before, found, after = template.user.partition("{content}")
    if not found:
        return _fill(template.user, "$m.Content", eos_text)
    return (_fill(before, None, eos_text) + system_block + "{{ $m.Content }}" + _fill(after, None, eos_text))


def _quote(value: str) -> str:
    if '"""' in value:
        raise ZhilingError(f"cannot write {value!r} into a Modelfile (it contains three double quotes in a row)")
    if "\n" in value or '"' in value or value != value.strip():
        return '"""' + value + '"""'
    return '"' + value + '"'


def modelfile_text(gguf_name: str, template, tokenizer, *, system: str | None = None) -> str:
    """The Modelfile for ``gguf_name`` (a path relative to the Modelfile): FROM, TEMPLATE, SYSTEM, stop words."""
    eos_text = tokenizer.eos_token or ""
    lines = [f"{MODELFILE_HEADER} Create the model with:  ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    if isinstance(template, Template):
        lines.append(f'TEMPLATE """{go_template(template, eos_text)}"""')
    else:
        lines.append("# No TEMPLATE: the model uses the tokenizer's own chat template ('auto'), which is in the "
                     "GGUF file (tokenizer.chat_template); Ollama uses it when it recognises it.")
    default_system = template.default_system if system is None else system
    if default_system:
        lines.append(f"SYSTEM {_quote(default_system)}")
    for stop in template.stop_strings(tokenizer):
        if stop:
            lines.append(f"PARAMETER stop {_quote(stop)}")
    return "\n".join(lines) + "\n"


def write_modelfile(folder: str | Path, gguf_name: str, template, tokenizer, *, system: str | None = None) -> Path:
    path = Path(folder) / "Modelfile"
    path.write_text(modelfile_text(gguf_name, template, tokenizer, system=system), encoding="utf-8")
    return path
