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

import difflib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from zhiling.errors import ZhilingError

Turns = list[tuple[str, "str | None"]]
Pieces = tuple[list[int], list[int]]  # (prompt ids, answer ids) of one round



BOS_SLOT, EOS_SLOT = -1, -2  # where the tokenizer's BOS / EOS id goes in a list of segments


def _batch_encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # one call into Rust: no per-text Python overhead, parallel across cores
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_segments(tokenizer, conversations: list[list[tuple[list, list]]], template_name: str = "") -> list:
    """Turn segment lists (text pieces and BOS/EOS slots) into token ids, tokenizing every text in one batch."""
    texts = [item for rounds in conversations for pair in rounds for part in pair for item in part
             if isinstance(item, str) and item]
    encoded = iter(_batch_encode(tokenizer, texts))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for rounds in conversations:
        converted = []
        for pair in rounds:
            ids_pair = []
            for part in pair:
                ids: list[int] = []
                for item in part:
                    if isinstance(item, str):
                        if item:
                            ids += next(encoded)
                    elif item == BOS_SLOT:
                        if bos is not None:
                            ids.append(bos)
                    elif eos is None:
                        raise ZhilingError(f"template '{template_name}' ends answers with EOS, but the tokenizer has no "
                                           f"eos_token; set one or choose a template with its own end marker")
                    else:
                        ids.append(eos)
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
    def _fill(self, fmt: str, content: str = "", index: int = 0, eos: str = "") -> str:
        return fmt.replace("{content}", content).replace("{index}", str(index)).replace("{eos}", eos)

    def _system_text(self, system: str | None) -> str:
        return self.default_system if system is None else system

    def prompt_pieces(self, system: str | None, turns: Turns, eos: str = "", bos: str = "") -> list[tuple[str, str]]:
        """(prompt text, answer text) per round; the last answer is '' when it is None (a generation prompt)."""
        system_text = self._system_text(system)
        pieces = []
        for number, (user, answer) in enumerate(turns, start=1):
            head = ""
            if number == 1:
                head = (bos if self.add_bos else "") + self.prefix
                if system_text and not self.system_in_first_user:
                    head += self._fill(self.system, system_text)
                if system_text and self.system_in_first_user:
                    user = self._fill(self.system, system_text) + user
            else:
                head = self.separator
            prompt = head + self._fill(self.user, user, number) + self.assistant_prefix
            reply = "" if answer is None else self._fill(self.assistant, answer) + self._fill(self.end, eos=eos)
            pieces.append((prompt, reply))
        return pieces

    def render(self, system: str | None, turns: Turns, eos: str = "", bos: str = "") -> str:
        """The whole conversation as text (a trailing ``(query, None)`` turn ends with the assistant cue)."""
        return "".join(p + r for p, r in self.prompt_pieces(system, turns, eos=eos, bos=bos))

    def render_text(self, tokenizer, system: str | None, turns: Turns) -> str:
        """``render`` with this tokenizer's BOS and EOS text (what the written chat template produces)."""
        return self.render(system, turns, eos=tokenizer.eos_token or "", bos=tokenizer.bos_token or "")

    # ----- tokens -----------------------------------------------------------------------------------------------
    def segments(self, tokenizer, system: str | None, turns: Turns) -> list[tuple[list, list]]:
        """Per round, the prompt and the answer as text pieces and special-token slots (``BOS_SLOT``, ``EOS_SLOT``),
        ready for ``encode_segments``."""
        out = []
        for number, (prompt, _) in enumerate(self.prompt_pieces(system, turns)):
            prompt_items: list = [BOS_SLOT, prompt] if number == 0 and self.add_bos else [prompt]
            answer_items: list = []
            if turns[number][1] is not None:
                answer_items.append(self._fill(self.assistant, turns[number][1]))
                if "{eos}" in self.end:
                    before, _, after = self.end.partition("{eos}")
                    answer_items += [before, EOS_SLOT, after]
                else:
                    answer_items.append(self.end)
            out.append((prompt_items, answer_items))
        return out

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
        """This template as a Hugging Face chat template (renders exactly what ``render`` does)."""

        def lit(fmt: str, content_expr: str | None = None) -> str:
            parts = []
            text = fmt
            while text:
                cut = min((text.find(p) for p in ("{content}", "{index}", "{eos}") if p in text), default=-1)
                if cut < 0:
                    parts.append(json.dumps(text))
                    break
                if cut:
                    parts.append(json.dumps(text[:cut]))
                rest = text[cut:]
                if rest.startswith("{content}"):
                    parts.append(content_expr or "''")
                    text = rest[len("{content}"):]
                elif rest.startswith("{index}"):
                    parts.append("(ns.round | string)")
                    text = rest[len("{index}"):]
                else:
                    parts.append("eos_token")
                    text = rest[len("{eos}"):]
            return "{{ " + " + ".join(parts) + " }}" if parts else ""

        bos = "{{ bos_token }}" if self.add_bos else ""
        system_block = lit(self.system, "system")
        lines = [
            "{%- set ns = namespace(round=0, system='') -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set ns.system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            "{%- set ns.system = " + json.dumps(self.default_system) + " -%}{%- set loop_messages = messages -%}",
            "{%- endif -%}",
            "{%- set system = ns.system -%}",
            bos + lit(self.prefix),
        ]
        if not self.system_in_first_user:
            lines.append("{%- if system -%}" + system_block + "{%- endif -%}")
        lines += [
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' -%}",
            "{%- set ns.round = ns.round + 1 -%}",
            "{%- if ns.round > 1 -%}" + lit(self.separator) + "{%- endif -%}",
        ]
        if self.system_in_first_user:
            lines.append("{%- if ns.round == 1 and system -%}"
                         + lit(self.user, lit_join(self.system, "system", "message['content']"))
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


def lit_join(system_fmt: str, system_expr: str, content_expr: str) -> str:
    """A Jinja expression for the system block rendered in front of the first user message."""
    pieces = []
    text = system_fmt
    if "{content}" in text:
        before, _, after = text.partition("{content}")
        if before:
            pieces.append(json.dumps(before))
        pieces.append(system_expr)
        if after:
            pieces.append(json.dumps(after))
    else:
        pieces.append(json.dumps(text))
    pieces.append(content_expr)
    return "(" + " + ".join(pieces) + ")"


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
        for prompt, reply in self.prompt_pieces(tokenizer, system, turns):
            # every supervised answer ends with EOS, whether or not the chat template writes one
            answer = [reply, EOS_SLOT] if reply and (not eos or eos not in reply) else [reply]
            out.append(([prompt], answer if reply else []))
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
        close = difflib.get_close_matches(name, template_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ZhilingError(f"unknown template '{name}'{hint} (known: {', '.join(template_names())})")
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
                     model_dir: str | Path | None = None, system: str | None = None):
    """The template for inference: an explicit name wins; else the one recorded with the adapter or merged model;
    else the model's own chat template or family default (as in training). Returns (template, where it came from)."""
    if name is not None:
        return get_template(name, tokenizer, model_type, system), f"template '{name}' (given)"
    for folder, what in ((adapter, "adapter"), (model_dir, "model")):
        template = recorded_template(folder)
        if template is not None:
            if system is not None:
                template = replace(template, default_system=system)
            return template, f"template '{template.name}' recorded with the {what}"
    template = get_template(None, tokenizer, model_type, system)
    return template, f"template '{template.name}' (default for this model)"
