"""The template registry: how a conversation becomes model input, for training and for inference alike.

A ``Template`` renders a conversation as

    [bos] prefix system-block round_1 sep round_2 sep ... round_n

where each round is ``user`` + ``assistant_prefix`` (the prompt, masked in training) followed by
``assistant`` + ``end`` (the answer, trained). ``end`` is the end-of-answer marker; ``{eos}`` there means the
tokenizer's own EOS token, so every supervised answer ends with an EOS the model learns to emit.

Placeholders: ``{content}`` (the message), ``{index}`` (1-based round number, in ``user``), ``{eos}``.

``encode`` cuts a conversation into (prompt ids, answer ids) pieces; training and our own inference both use it,
so the prompt the model sees at inference is token for token the one it was trained on. ``to_jinja`` writes the same
template as a Hugging Face chat template, so other tools (vLLM, llama.cpp, Ollama) render the same text.
"""

from __future__ import annotations

import copy
import json
import re
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from zhiling.errors import ZhilingError
from zhiling.names import raise_unknown

Turns = list[tuple[str, "str | None"]]
Pieces = tuple[list[int], list[int]]  # (prompt ids, answer ids) of one round



BOS_SLOT, EOS_SLOT = -1, -2  # where the tokenizer's BOS / EOS id goes in a list of segments
_PLACEHOLDER = re.compile(r"\{(content|index|eos)\}")


_ROUND = object()  # the round number in template parts written out as Jinja


class Message(str):
    """Message text inside a list of segments: tokenized as plain text, never parsed for special tokens
    (a user who types ``<eos>`` or ``<|im_end|>`` gets those characters, not the control token)."""


# ----- encoding --------------------------------------------------------------------------------------------------
# Rule: template markup is tokenized with the tokenizer's special tokens recognised; message text never is.
# A run of text between two special tokens of the markup is tokenized in one piece, exactly as a tokenizer does
# with a whole rendered prompt (it splits at special tokens first and tokenizes what lies between on its own), so
# ids are those of the rendered text whenever no message holds a special-token string.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tokenizer_cache(tokenizer) -> dict:
    """Per-tokenizer derived data (special-token table, plain-text encoder); rebuilt when the vocabulary grows."""
    size = len(tokenizer)
    try:
        cache = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: nothing cached
        return {"size": size}
    if cache is None or cache["size"] != size:
        cache = {"size": size}
        try:
            _CACHE[tokenizer] = cache
        except TypeError:
            pass
    return cache


def special_tokens(tokenizer) -> dict[str, int]:
    """The strings a tokenizer turns into one special (control) token when it parses special tokens, with ids."""
    cache = _tokenizer_cache(tokenizer)
    if "specials" not in cache:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        cache["specials"] = {token.content: int(tid) for tid, token in decoder.items()
                             if getattr(token, "special", False) and getattr(token, "content", "")}
    return cache["specials"]


class SpecialFinder:
    """Finds special-token strings in text, leftmost-longest (as tokenizers match them).

    The regex is a trie of the strings (a greedy optional tail wherever one string continues another, so the
    longest wins): a plain alternation of thousands of tokens (Gemma's vocabulary has over 6,000) tries every one
    of them at each '<' of the text, which made code-heavy rows 400 times slower."""

    def __init__(self, specials: dict[str, int]):
        self.ids = specials
        self.pattern = re.compile(_trie_pattern(specials))

    def finditer(self, text: str):
        """(start, end, token id) of each special-token string, left to right, never overlapping."""
        for match in self.pattern.finditer(text):
            yield match.start(), match.end(), self.ids[match.group()]

    def search(self, text: str) -> bool:
        return self.pattern.search(text) is not None


def _trie_pattern(words) -> str:
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return "(?:" + body + ")?" if "" in node else body

    return build(trie)


def _special_finder(tokenizer) -> SpecialFinder | None:
    cache = _tokenizer_cache(tokenizer)
    if "finder" not in cache:
        specials = special_tokens(tokenizer)
        cache["finder"] = SpecialFinder(specials) if specials else None
    return cache["finder"]


def _batch_encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Template text: special-token strings become their special tokens."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # one call into Rust: no per-text Python overhead, parallel across cores
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batch_encode_plain(tokenizer, texts: list[str]) -> list[list[int]]:
    """Text with special-token strings kept as plain text (``split_special_tokens``)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # a private copy with encode_special_tokens on: toggling the shared one (what transformers does for
        # split_special_tokens=True) would race with other threads encoding through it
        cache = _tokenizer_cache(tokenizer)
        plain = cache.get("plain")
        if plain is None:
            plain = copy.deepcopy(backend)
            plain.encode_special_tokens = True
            cache["plain"] = plain
        return [encoding.ids for encoding in plain.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _split_markup(text: str, finder: SpecialFinder) -> list:
    """Markup text cut at special-token strings: text pieces and special-token ids."""
    out: list = []
    start = 0
    for begin, end, token in finder.finditer(text):
        if begin > start:
            out.append(text[start:begin])
        out.append(token)
        start = end
    if start < len(text):
        out.append(text[start:])
    return out


def _plan_group(group: list[str], finder: SpecialFinder | None, parsed: list[str], plain: list[str]) -> list:
    """How to encode consecutive text items: ('parsed', i) / ('plain', i) entries of the two batches, or ids."""
    if finder is None or not any(isinstance(item, Message) and finder.search(item) for item in group):
        parsed.append("".join(group))
        return [("parsed", len(parsed) - 1)]
    steps: list = []
    run = ""
    for item in group:
        pieces = [item] if isinstance(item, Message) else _split_markup(item, finder)
        for piece in pieces:
            if isinstance(piece, int):
                if run:
                    plain.append(run)
                    steps.append(("plain", len(plain) - 1))
                    run = ""
                steps.append(piece)
            else:
                run += piece
    if run:
        plain.append(run)
        steps.append(("plain", len(plain) - 1))
    return steps


def encode_segments(tokenizer, conversations: list[list[tuple[list, list]]], template_name: str = "") -> list:
    """Turn segment lists into token ids, tokenizing every text in one batch.

    A segment list holds template text (``str``: special-token strings in it become special tokens), message text
    (``Message``: always plain text) and the BOS / EOS slots (``BOS_SLOT``, ``EOS_SLOT``: the tokenizer's ids)."""
    finder = _special_finder(tokenizer)
    parsed: list[str] = []
    plain: list[str] = []
    plans = []
    for rounds in conversations:
        plan_rounds = []
        for pair in rounds:
            plan_pair = []
            for part in pair:
                steps: list = []
                group: list[str] = []
                for item in [*part, None]:
                    if isinstance(item, str):
                        if item:
                            group.append(item)
                        continue
                    if group:
                        steps += _plan_group(group, finder, parsed, plain)
                        group = []
                    if item is not None:
                        steps.append(item)
                plan_pair.append(steps)
            plan_rounds.append(plan_pair)
        plans.append(plan_rounds)
    encoded = {"parsed": _batch_encode(tokenizer, parsed), "plain": _batch_encode_plain(tokenizer, plain)}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for plan_rounds in plans:
        converted = []
        for plan_pair in plan_rounds:
            ids_pair = []
            for steps in plan_pair:
                ids: list[int] = []
                for step in steps:
                    if isinstance(step, tuple):
                        ids += encoded[step[0]][step[1]]
                    elif step == BOS_SLOT:
                        if bos is not None:
                            ids.append(bos)
                    elif step == EOS_SLOT:
                        if eos is None:
                            raise ZhilingError(f"template '{template_name}' ends answers with EOS, but the tokenizer "
                                               f"has no eos_token; set one or choose a template with its own end "
                                               f"marker")
                        ids.append(eos)
                    else:
                        ids.append(step)
                ids_pair.append(ids)
            converted.append(tuple(ids_pair))
        out.append(converted)
    return out


class _Encoding:
    """Token ids from ``segments``: shared by named templates and the tokenizer's own (``auto``)."""

    name: str

    def encode_many(self, tokenizer, conversations: list[tuple[str | None, Turns]]) -> list[list[Pieces]]:
        """``encode`` for many conversations with one batched call into the tokenizer (fast, and parallel in Rust)."""
        return encode_segments(tokenizer, [self.segments(tokenizer, system, turns) for system, turns in conversations],
                               self.name)

    def encode(self, tokenizer, system: str | None, turns: Turns) -> list[Pieces]:
        """(prompt ids, answer ids) per round. BOS is the tokenizer's id; ``{eos}`` becomes the EOS id."""
        return self.encode_many(tokenizer, [(system, turns)])[0]

    def encode_prompt(self, tokenizer, system: str | None, history: list[tuple[str, str]], query: str) -> list[int]:
        """Token ids of a generation prompt: the history rounds in full, then the query and the assistant cue."""
        ids: list[int] = []
        for prompt_ids, reply_ids in self.encode(tokenizer, system, [*history, (query, None)]):
            ids += prompt_ids + reply_ids
        return ids


@dataclass(frozen=True)
class Template(_Encoding):
    name: str
    description: str
    user: str = "{content}"
    assistant_prefix: str = ""
    assistant: str = "{content}"
    end: str = "{eos}"
    separator: str = ""
    system: str = "{content}"
    default_system: str = ""
    system_in_first_user: bool = False  # models without a system role (Gemma): system text opens the first user turn
    prefix: str = ""
    add_bos: bool = True
    stop_words: tuple[str, ...] = ()

    # ----- text -------------------------------------------------------------------------------------------------
    def _parts(self, fmt: str, content: str = "", index: int | None = None, eos=EOS_SLOT) -> list:
        """A format string with its placeholders filled: literal text, ``Message(content)``, the round number
        (``_ROUND`` when ``index`` is None: the Jinja export's round counter) and ``eos`` (a slot or text).
        Only the format string is scanned for placeholders, never the message text, so a message holding
        ``{index}`` or ``{eos}`` stays as written."""
        out: list = []
        for at, piece in enumerate(_PLACEHOLDER.split(fmt)):
            if at % 2 == 0:
                if piece:
                    out.append(piece)
            elif piece == "content":
                out.append(Message(content))
            elif piece == "index":
                out.append(_ROUND if index is None else str(index))
            else:
                out.append(eos)
        return out

    def _system_text(self, system: str | None) -> str:
        return self.default_system if system is None else system

    def rounds(self, system: str | None, turns: Turns) -> list[tuple[list, list]]:
        """Per round, the prompt and the answer as template text (``str``), message text (``Message``) and the
        BOS / EOS slots; an answer that is None (a generation prompt) gives an empty answer list.

        ``{index}`` is the round number (0 before the first round: in ``prefix`` and a system block of its own)."""
        system_text = self._system_text(system)
        out = []
        for number, (user, answer) in enumerate(turns, start=1):
            prompt: list = []
            user_parts = self._parts(self.user, user, number)
            if number == 1:
                if self.add_bos:
                    prompt.append(BOS_SLOT)
                prompt += self._parts(self.prefix, index=0)
                if system_text and not self.system_in_first_user:
                    prompt += self._parts(self.system, system_text, 0)
                if system_text and self.system_in_first_user:
                    system_parts = self._parts(self.system, system_text, number)
                    # the system block opens the user's message (a user format without {content} has no room)
                    at = next((i for i, item in enumerate(user_parts) if isinstance(item, Message)), None)
                    if at is not None:
                        user_parts = user_parts[:at] + system_parts + user_parts[at:]
            else:
                prompt += self._parts(self.separator, index=number)
            prompt += user_parts + self._parts(self.assistant_prefix, index=number)
            reply: list = []
            if answer is not None:
                reply = self._parts(self.assistant, answer, number) + self._parts(self.end, index=number)
            out.append((prompt, reply))
        return out

    def prompt_pieces(self, system: str | None, turns: Turns, eos: str = "", bos: str = "") -> list[tuple[str, str]]:
        """(prompt text, answer text) per round; the last answer is '' when it is None (a generation prompt)."""

        def text(items: list) -> str:
            return "".join(bos if item == BOS_SLOT else eos if item == EOS_SLOT else item for item in items)

        return [(text(prompt), text(reply)) for prompt, reply in self.rounds(system, turns)]

    def render(self, system: str | None, turns: Turns, eos: str = "", bos: str = "") -> str:
        """The whole conversation as text (a trailing ``(query, None)`` turn ends with the assistant cue)."""
        return "".join(p + r for p, r in self.prompt_pieces(system, turns, eos=eos, bos=bos))

    def render_text(self, tokenizer, system: str | None, turns: Turns) -> str:
        """``render`` with this tokenizer's BOS and EOS text (what the written chat template produces)."""
        return self.render(system, turns, eos=tokenizer.eos_token or "", bos=tokenizer.bos_token or "")

    # ----- tokens -----------------------------------------------------------------------------------------------
    def segments(self, tokenizer, system: str | None, turns: Turns) -> list[tuple[list, list]]:
        """Per round, the prompt and the answer as segments for ``encode_segments``."""
        return self.rounds(system, turns)

    def stop_strings(self, tokenizer=None) -> list[str]:
        """Text that ends an answer: the end marker and the template's stop words."""
        stops = list(self.stop_words)
        end = self.end.replace("{eos}", (tokenizer.eos_token or "") if tokenizer is not None else "").strip()
        if end and end not in stops:
            stops.insert(0, end)
        return stops

    def stop_token_ids(self, tokenizer) -> list[int]:
        """EOS plus every stop string that is a single token of this tokenizer."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for stop in self.stop_strings(tokenizer):
            tid = tokenizer.convert_tokens_to_ids(stop)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
                if tokenizer.decode([tid]) == stop:
                    ids.append(tid)
        return ids

    # ----- Jinja ------------------------------------------------------------------------------------------------
    def to_jinja(self) -> str:
        """This template as a Hugging Face chat template (renders exactly what ``render`` does).

        Message text goes in as data (``message['content']``, ``system``), never as template source, and every
        literal of the template is a quoted Jinja string (``jinja_string``)."""

        def expr(fmt: str, content_expr: str = "''") -> str:
            return _jinja_expression(self._parts(fmt), content_expr)

        def lit(fmt: str, content_expr: str = "''") -> str:
            return _jinja_output(self._parts(fmt), content_expr)

        bos = "{{ bos_token }}" if self.add_bos else ""
        lines = [
            "{%- set ns = namespace(round=0, system='') -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set ns.system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            "{%- set ns.system = " + jinja_string(self.default_system) + " -%}{%- set loop_messages = messages -%}",
            "{%- endif -%}",
            "{%- set system = ns.system -%}",
            bos + lit(self.prefix),
        ]
        if not self.system_in_first_user:
            lines.append("{%- if system -%}" + lit(self.system, "system") + "{%- endif -%}")
        lines += [
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' -%}",
            "{%- set ns.round = ns.round + 1 -%}",
            "{%- if ns.round > 1 -%}" + lit(self.separator) + "{%- endif -%}",
        ]
        if self.system_in_first_user:
            lines.append("{%- if ns.round == 1 and system -%}"
                         + lit(self.user, "(" + expr(self.system, "system") + " + message['content'])")
                         + "{%- else -%}" + lit(self.user, "message['content']") + "{%- endif -%}")
        else:
            lines.append(lit(self.user, "message['content']"))
        lines += [
            "{%- elif message['role'] == 'assistant' -%}",
            lit(self.assistant_prefix) + lit(self.assistant, "message['content']") + lit(self.end),
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}" + lit(self.assistant_prefix) + "{%- endif -%}",
        ]
        return "".join(lines)

    def apply_to_tokenizer(self, tokenizer) -> None:
        """Write this template into the tokenizer, so that a saved tokenizer carries the training prompt."""
        tokenizer.chat_template = self.to_jinja()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop_words"] = list(self.stop_words)
        return data


_JINJA_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_JINJA_DELIMITERS = re.compile(r"(?<=\{)(?=[{%#])|(?<=[}%#])(?=\})")


def jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal that every chat-template engine reads back unchanged.

    Only backslash, double quote, newline, carriage return and tab are escaped (Jinja, llama.cpp's Jinja and
    transformers agree on those); other characters, Chinese and emoji included, are written as they are (a
    ``\\u`` escape with four hex digits is read differently by different engines). A delimiter such as ``}}`` or
    ``{%`` is cut into two concatenated strings, so that no engine can take it for the end or start of a tag."""
    pieces = _JINJA_DELIMITERS.split(text)
    quoted = ['"' + "".join(_JINJA_ESCAPES.get(ch, ch) for ch in piece) + '"' for piece in pieces]
    return quoted[0] if len(quoted) == 1 else "(" + " + ".join(quoted) + ")"


def _jinja_expression(parts: list, content_expr: str) -> str:
    """A Jinja expression for template parts (from ``Template._parts``): literals quoted, the message as
    ``content_expr``, the round number as ``ns.round``, the EOS slot as ``eos_token``."""
    pieces = []
    for item in parts:
        if isinstance(item, Message):
            pieces.append(content_expr)
        elif item == EOS_SLOT:
            pieces.append("eos_token")
        elif item is _ROUND:
            pieces.append("(ns.round | string)")
        else:
            pieces.append(jinja_string(item))
    return " + ".join(pieces) if pieces else "''"


def _jinja_output(parts: list, content_expr: str) -> str:
    return "{{ " + _jinja_expression(parts, content_expr) + " }}" if parts else ""


@dataclass(frozen=True)
class TokenizerTemplate(_Encoding):
    """``auto``: the tokenizer's own Jinja chat template, cut into prompt/answer pieces by incremental rendering."""

    chat_template: str
    name: str = "auto"
    description: str = "the tokenizer's own chat template"
    default_system: str = ""
    stop_words: tuple[str, ...] = ()

    def _messages(self, system: str | None, turns: Turns) -> list[dict]:
        messages = [{"role": "system", "content": system}] if system else []
        for user, answer in turns:
            messages.append({"role": "user", "content": user})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return messages

    def _apply(self, tokenizer, messages: list[dict], generation: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                             add_generation_prompt=generation)

    def prompt_pieces(self, tokenizer, system: str | None, turns: Turns) -> list[tuple[str, str]]:
        messages = self._messages(system or self.default_system or None, [])
        done = ""
        pieces = []
        for user, answer in turns:
            messages.append({"role": "user", "content": user})
            with_cue = self._apply(tokenizer, messages, True)
            if not with_cue.startswith(done):
                raise ZhilingError("the tokenizer's chat template does not render a conversation as a prefix of its "
                                   "continuation, so prompts cannot be separated from answers; choose a named template "
                                   "(template.name)")
            prompt, done = with_cue[len(done):], with_cue
            reply = ""
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
                full = self._apply(tokenizer, messages, False)
                if not full.startswith(done):
                    raise ZhilingError("the tokenizer's chat template renders the assistant cue differently when the "
                                       "answer follows; choose a named template (template.name)")
                reply, done = full[len(done):], full
            pieces.append((prompt, reply))
        return pieces

    def render_text(self, tokenizer, system: str | None, turns: Turns) -> str:
        return "".join(p + r for p, r in self.prompt_pieces(tokenizer, system, turns))

    def segments(self, tokenizer, system: str | None, turns: Turns) -> list[tuple[list, list]]:
        eos = tokenizer.eos_token
        out = []
        for prompt, reply in self._marked_pieces(tokenizer, system, turns):
            text = "".join(reply)
            # every supervised answer ends with EOS, whether or not the chat template writes one (an EOS string
            # in the message text is the user's, not the template's)
            written = bool(eos) and any(eos in item for item in reply if not isinstance(item, Message))
            answer = [*reply, EOS_SLOT] if text and not written else reply
            out.append((prompt, answer if text else []))
        return out

    def _marked_pieces(self, tokenizer, system: str | None, turns: Turns) -> list[tuple[list, list]]:
        """``prompt_pieces`` as segment lists, with message text marked as ``Message`` when it holds a
        special-token string (so that it stays plain text).

        The chat template is rendered a second time with each message replaced by a marker; the text between the
        markers is the template's. When the template changes message text (trims it, looks inside it), the two
        renderings disagree and the message's place cannot be known: that is an error, not a silent guess."""
        pieces = self.prompt_pieces(tokenizer, system, turns)
        finder = _special_finder(tokenizer)
        system_text = system or self.default_system or None
        texts = [system_text or ""] + [text or "" for turn in turns for text in turn]
        if finder is None or not any(finder.search(text) for text in texts):
            return [([prompt], [reply]) for prompt, reply in pieces]
        contents: list[str] = []

        def marker(text):
            if not text:
                return text
            contents.append(text)
            return f"\ue000{len(contents) - 1}\ue001"

        marked_system = marker(system_text)
        marked_turns = [(marker(user), None if answer is None else marker(answer)) for user, answer in turns]
        marked = self.prompt_pieces(tokenizer, marked_system, marked_turns)

        def split(text: str) -> list:
            items: list = []
            for at, piece in enumerate(re.split("\ue000([0-9]+)\ue001", text)):
                items.append(Message(contents[int(piece)]) if at % 2 else piece)
            return items

        out = [(split(prompt), split(reply)) for prompt, reply in marked]
        if [("".join(p), "".join(r)) for p, r in out] != pieces:
            holder = next(text for text in texts if finder.search(text))
            shown = holder if len(holder) <= 80 else holder[:77] + "..."
            raise ZhilingError(f"the message {shown!r} holds a special-token string, and the tokenizer's chat "
                               f"template (template 'auto') changes message text as it renders it, so zhiling "
                               f"cannot keep that text apart from the template's own tokens; choose a named "
                               f"template (template.name)")
        return out

    def stop_strings(self, tokenizer=None) -> list[str]:
        return list(self.stop_words)

    def stop_token_ids(self, tokenizer) -> list[int]:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def to_jinja(self) -> str:
        return self.chat_template

    def apply_to_tokenizer(self, tokenizer) -> None:
        tokenizer.chat_template = self.chat_template

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chat_template": self.chat_template, "default_system": self.default_system}


_ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.")

TEMPLATES: dict[str, Template] = {t.name: t for t in [
    Template("alpaca", "Alpaca: ### Instruction: / ### Response:",
             user="### Instruction:\n{content}\n\n", assistant_prefix="### Response:\n", separator="\n\n",
             system="{content}\n\n", default_system=_ALPACA_SYSTEM, stop_words=("### Instruction:",)),
    Template("alpaca_zh", "Alpaca with Chinese role words: ### 指令： / ### 回答：",
             user="### 指令：\n{content}\n\n", assistant_prefix="### 回答：\n", separator="\n\n",
             system="{content}\n\n", default_system="下面是一条描述任务的指令。请写出恰当完成该任务的回答。",
             stop_words=("### 指令：",)),
    Template("belle", "BELLE: Human: / Assistant:",
             user="Human: {content}\n\n", assistant_prefix="Assistant: ", separator="\n\n",
             system="{content}\n\n", stop_words=("Human:",)),
    Template("chatglm", "ChatGLM: [Round i] 问：/ 答：",
             user="[Round {index}]\n\n问：{content}\n\n", assistant_prefix="答：", separator="\n\n",
             system="{content}\n\n", stop_words=("[Round",)),
    Template("baichuan", "Baichuan chat: <reserved_102> user / <reserved_103> assistant",
             user="<reserved_102>{content}", assistant_prefix="<reserved_103>", stop_words=("<reserved_102>",)),
    Template("baichuan2", "Baichuan 2 chat: <reserved_106> user / <reserved_107> assistant",
             user="<reserved_106>{content}", assistant_prefix="<reserved_107>", stop_words=("<reserved_106>",)),
    Template("vicuna_chat", "Chinese-Vicuna chat: a conversation preamble, then User: / Assistant:",
             user="User:{content}\n\n", assistant_prefix="Assistant:", separator="\n\n", system="{content}\n\n",
             default_system=("The following is a conversation between an AI assistant called Assistant and a human "
                             "user called User. The assistant is intelligent, knowledgeable and polite to answer "
                             "questions of user."),
             stop_words=("User:",)),
    Template("chatml", "ChatML (Qwen): <|im_start|>role ... <|im_end|>",
             user="<|im_start|>user\n{content}<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
             end="<|im_end|>", separator="\n", system="<|im_start|>system\n{content}<|im_end|>\n",
             add_bos=False, stop_words=("<|im_end|>",)),
    Template("llama3", "Llama 3: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>",
             user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
             assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", end="<|eot_id|>",
             system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>", stop_words=("<|eot_id|>",)),
    Template("gemma", "Gemma: <start_of_turn>user / <start_of_turn>model ... <end_of_turn>",
             user="<start_of_turn>user\n{content}<end_of_turn>\n", assistant_prefix="<start_of_turn>model\n",
             end="<end_of_turn>", separator="\n", system="{content}\n\n", system_in_first_user=True,
             stop_words=("<end_of_turn>",)),
]}

# Family defaults when a model has no chat template of its own (keys are config.model_type values).
FAMILY_TEMPLATES = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma",
    "qwen2": "chatml", "qwen2_moe": "chatml", "qwen3": "chatml", "qwen3_moe": "chatml",
    "llama": "alpaca", "mistral": "alpaca",
    "chatglm": "chatglm", "glm": "chatglm", "glm4": "chatglm",
    "baichuan": "baichuan2", "bloom": "belle",
}


def template_names() -> list[str]:
    return [*TEMPLATES, "auto"]


def get_template(name: str | None, tokenizer=None, model_type: str | None = None, system: str | None = None):
    """A template by name; ``auto`` is the tokenizer's own chat template; ``None`` picks one for the model
    (its own chat template if it has one, else the family default, else ``alpaca``). ``system`` replaces the
    template's default system prompt."""
    if name is None:
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            template = TokenizerTemplate(tokenizer.chat_template)
        else:
            template = TEMPLATES[FAMILY_TEMPLATES.get(model_type or "", "alpaca")]
    elif name == "auto":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ZhilingError("template 'auto' uses the tokenizer's own chat template, but this tokenizer has none; "
                               f"choose one of: {', '.join(TEMPLATES)}")
        template = TokenizerTemplate(tokenizer.chat_template)
    elif name in TEMPLATES:
        template = TEMPLATES[name]
    else:
        raise_unknown("template", name, template_names())
    if system is not None:
        template = replace(template, default_system=system)
    return template


def template_from_dict(data: dict):
    """Rebuild a template recorded with an adapter (``Template.to_dict`` / ``TokenizerTemplate.to_dict``)."""
    if "chat_template" in data:
        return TokenizerTemplate(data["chat_template"], default_system=data.get("default_system", ""))
    fields = dict(data)
    fields["stop_words"] = tuple(fields.get("stop_words", ()))
    return Template(**fields)


TEMPLATE_RECORD = "zhiling_template.json"


def save_template_record(template, folder: str | Path) -> Path:
    """Record the training template beside an adapter or merged model (read back by ``recorded_template``)."""
    path = Path(folder) / TEMPLATE_RECORD
    path.write_text(json.dumps(template.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def recorded_template(folder: str | Path | None):
    """The template recorded in ``folder`` (an adapter or merged model), or None."""
    if folder is None:
        return None
    path = Path(folder) / TEMPLATE_RECORD
    if not path.is_file():
        return None
    try:
        return template_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ZhilingError(f"{path}: not a valid template record ({exc})") from None


def resolve_template(name: str | None, tokenizer, model_type: str | None, *, adapter: str | Path | None = None,
                     model_dir: str | Path | None = None, system: str | None = None,
                     recorded: tuple = ()):
    """The template for a model, the same way for training and inference: an explicit name wins; else one recorded
    with the adapter, then with the model folder, then those given in ``recorded`` as (template or None, where)
    pairs (such as a GGUF file's record); else the model's own chat template or family default. ``system`` replaces
    the chosen template's default system prompt. Returns (template, where it came from).

    Entry points call this through ``models.chat_setup.resolve_chat_setup``, which also loads the tokenizer."""
    if name is not None:
        return get_template(name, tokenizer, model_type, system), f"template '{name}' (given)"
    candidates = [(recorded_template(folder), f"recorded with the {what}")
                  for folder, what in ((adapter, "adapter"), (model_dir, "model"))]
    for template, where in [*candidates, *recorded]:
        if template is not None:
            if system is not None:
                template = replace(template, default_system=system)
            return template, f"template '{template.name}' {where}"
    template = get_template(None, tokenizer, model_type, system)
    if isinstance(template, TokenizerTemplate):
        why = "its own chat template"
    elif model_type in FAMILY_TEMPLATES:
        why = f"the family default for {model_type}"
    else:
        why = f"no chat template, and no family default for {model_type or 'an unknown model type'}"
    return template, f"template '{template.name}' (default for this model: {why})"
