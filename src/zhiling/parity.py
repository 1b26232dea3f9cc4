"""Template parity: one conversation, every place zhiling turns it into a prompt, the same text.

``check_template_parity`` renders conversations whose messages are full of literals that a template engine might
take for its own (``{index}``, ``{eos}``, ``{content}``, Jinja ``{{ x }}`` / ``{% if %}``, special-token strings
such as ``<eos>`` or ``<|im_end|>``) through every path and compares the texts:

* ``render``: the template's own rendering (the reference);
* ``training``: the token pieces training uses (``template.encode``), decoded;
* ``serve``: the generation prompt of chat / predict / serve (OpenAI messages -> ``ChatRequest`` -> the engine's
  ``request_prompt_ids``): the training ids, token for token;
* ``chat_template``: the exported Jinja chat template (what merge and export write) rendered by transformers;
* ``saved chat_template``: when given, a chat template as written to disk (a saved tokenizer's), the same way;
* ``gguf chat_template``: a GGUF file's ``tokenizer.chat_template`` rendered as zhiling's llama.cpp backend
  renders it, with the file's own BOS / EOS text;
* ``gguf record``: the template recorded in the GGUF file (``zhiling.template``, what the llama.cpp backend
  prompts with), rendered;
* ``control tokens``: message text must never become a special token: the special tokens in the training ids are
  the template's own (those of the same conversation with neutral message text).

It is an application-level module (it reads data templates, the inference prompt path and GGUF export metadata);
``zhiling doctor`` runs it for users, the tests for every registered template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zhiling.data.templates import Template, TokenizerTemplate, special_tokens
from zhiling.export.gguf_meta import read_metadata
from zhiling.infer.engine import ChatRequest, request_prompt_ids
from zhiling.infer.llamacpp_engine import render_chat_template
from zhiling.models.gguf_file import TEMPLATE_KEY, template_from_record

Turns = list[tuple[str, "str | None"]]

LITERALS = ('print(f"{index}: {eos}")', "{content}", "{system}", "{index}", "{eos}", "{0}", "{}", "{{ x }}",
            "{% if x %}y{% endif %}", "{# c #}", "{%- raw -%}", "}}", "{{", "'", '"""', "\\n", "\\", "😀",
            "<eos>", "<bos>", "<s>", "</s>", "<|im_end|>", "<|im_start|>", "<end_of_turn>", "<|eot_id|>",
            "[Round 1]", "### Instruction:", "Human:", "问：", "答：")


@dataclass(frozen=True)
class ParityMismatch:
    surface: str  # which path disagrees (see the module docstring)
    case: str  # which conversation
    expected: str
    got: str

    def __str__(self) -> str:
        """One line around the first difference (the texts can be long)."""
        at = next((i for i, (a, b) in enumerate(zip(self.expected, self.got)) if a != b),
                  min(len(self.expected), len(self.got)))
        start = max(0, at - 30)
        return (f"{self.surface} ({self.case}): at character {at}, expected {self.expected[start:at + 30]!r}, "
                f"got {self.got[start:at + 30]!r}")


def tricky_conversations(tokenizer) -> list[tuple[str, str | None, Turns]]:
    """(name, system, turns) conversations whose texts hold every literal above and the tokenizer's own
    special-token strings; each is checked whole and as a generation prompt."""
    specials = " ".join(sorted(special_tokens(tokenizer)))
    text = " ".join(LITERALS) + " " + specials
    return [
        ("system, two rounds", "系统 " + text, [("问 " + text, "答 " + text), (text + "\n", text)]),
        ("default system", None, [(text, text)]),
        ("message is a special token", "", [(sorted(special_tokens(tokenizer))[0] if specials else "<eos>",
                                             "{eos}")]),
    ]


def check_template_parity(template, tokenizer, *, gguf: str | Path | None = None, saved_chat_template: str | None = None,
                          conversations: list[tuple[str, str | None, Turns]] | None = None) -> list[ParityMismatch]:
    """Every mismatch between the paths listed in the module docstring ([] when they all agree).

    ``template``: a ``Template`` or the tokenizer's own (``TokenizerTemplate``); ``tokenizer``: the one training
    and the hf backend use; ``gguf``: an exported GGUF file to check as well; ``saved_chat_template``: a chat
    template written to disk (the ``chat_template`` of a tokenizer saved by ``zhiling train`` or ``merge``) to check
    as well; ``conversations``: (name, system, turns) to render, by default ``tricky_conversations(tokenizer)``."""
    found: list[ParityMismatch] = []
    gguf_info = _gguf_info(gguf) if gguf is not None else None
    for name, system, turns in conversations or tricky_conversations(tokenizer):
        generation = [*turns[:-1], (turns[-1][0], None)]
        for case, case_turns in ((f"{name}, whole", turns), (f"{name}, generation prompt", generation)):
            found += _check_case(template, tokenizer, system, case_turns, case, gguf_info, saved_chat_template)
    return found


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _messages(system: str | None, turns: Turns) -> list[dict]:
    """OpenAI messages; an empty system prompt is sent as one (it means: no system block, not the default)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def _control_ids(tokenizer, ids: list[int]) -> list[int]:
    specials = set(special_tokens(tokenizer).values())
    return [i for i in ids if i in specials]


def _check_case(template, tokenizer, system: str | None, turns: Turns, case: str, gguf_info,
                saved_chat_template: str | None) -> list[ParityMismatch]:
    found = []

    def compare(surface: str, expected: str, got: str) -> None:
        if expected != got:
            found.append(ParityMismatch(surface, case, expected, got))

    generation = turns[-1][1] is None
    reference = template.render_text(tokenizer, system, turns)
    pieces = template.encode(tokenizer, system, turns)
    ids = [i for prompt, answer in pieces for i in prompt + answer]
    if isinstance(template, TokenizerTemplate):  # 'auto' ends every trained answer with EOS, written or not
        eos = tokenizer.eos_token
        replies = [reply for _, reply in template.prompt_pieces(tokenizer, system, turns)]
        pieces = [(p, a[:-1] if _decode(tokenizer, a) == reply + (eos or "") != reply else a)
                  for (p, a), reply in zip(pieces, replies)]
    compare("training", reference, _decode(tokenizer, [i for p, a in pieces for i in p + a]))
    neutral = [("x", None if answer is None else "y") for _, answer in turns]
    neutral_ids = [i for p, a in template.encode(tokenizer, "s" if system else system, neutral) for i in p + a]
    compare("control tokens", _decode(tokenizer, _control_ids(tokenizer, neutral_ids)),
            _decode(tokenizer, _control_ids(tokenizer, ids)))
    if isinstance(template, TokenizerTemplate):  # 'auto' sends no system message for an empty one
        system = system or template.default_system or None
    messages = _messages(system, turns)
    if generation:  # the serve prompt is token for token the training prompt
        served = request_prompt_ids(template, tokenizer, ChatRequest.from_messages(messages))
        if served != ids:
            found.append(ParityMismatch("serve", case, _decode(tokenizer, ids), _decode(tokenizer, served)))
    compare("chat_template", reference, tokenizer.apply_chat_template(
        messages, chat_template=template.to_jinja(), tokenize=False, add_generation_prompt=generation))
    if saved_chat_template is not None:
        compare("saved chat_template", reference, tokenizer.apply_chat_template(
            messages, chat_template=saved_chat_template, tokenize=False, add_generation_prompt=generation))
    if gguf_info is not None:
        chat_template, record, bos, eos = gguf_info
        if isinstance(template, Template):
            expected = template.render(system, turns, eos=eos, bos=bos)
        else:
            expected = render_chat_template(template.to_jinja(), messages, add_generation_prompt=generation,
                                            bos_token=bos, eos_token=eos)
        if chat_template is None:
            found.append(ParityMismatch("gguf chat_template", case, expected, "(no tokenizer.chat_template)"))
        else:
            compare("gguf chat_template", expected, render_chat_template(
                chat_template, messages, add_generation_prompt=generation, bos_token=bos, eos_token=eos))
        if isinstance(template, Template):
            if record is None:
                found.append(ParityMismatch("gguf record", case, expected, f"(no {TEMPLATE_KEY})"))
            else:
                compare("gguf record", expected, record.render(system, turns, eos=eos, bos=bos))
    return found


def _gguf_info(path: str | Path):
    """(chat template, zhiling template record, BOS text, EOS text) of a GGUF file."""
    keys = ("tokenizer.chat_template", TEMPLATE_KEY, "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id")
    meta = read_metadata(path, keys)
    tokens = meta["tokenizer.ggml.tokens"] or []

    def token(key: str) -> str:
        index = meta[key]
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

    record = meta[TEMPLATE_KEY]
    return (meta["tokenizer.chat_template"], template_from_record(record, path) if record else None,
            token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))
