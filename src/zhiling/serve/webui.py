"""The browser chat behind ``zhiling webui`` (Gradio): streaming answers, system prompt, every generation
parameter, Stop, Undo, Clear and Save chat.

Each browser tab keeps its own conversation (``gr.State``: the turns and how many of the oldest are out of the
model's view), and answers go through ``ChatSession`` like ``zhiling chat``: the same template, the same history
budget, the same parameters. The answer streams from a worker thread; Stop cancels the generation (the partial
answer stays in the conversation, as in the terminal chat).

Several people may use one page: each saved chat gets a file name of its own (time plus a random part), appends to
``--save-to`` are serialised, the folder of saved chats is removed when the process exits, and a failure shows the
user a plain sentence while the details go to the log.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from zhiling.config import GenerationConfig
from zhiling.errors import ZhilingError
from zhiling.infer.chat import DEFAULT_HISTORY_TOKENS, ChatSession
from zhiling.infer.engine import FINISH_LENGTH, Engine
from zhiling.infer.params import update_params
from zhiling.serve.streaming import AsyncTextStream

log = logging.getLogger("zhiling.webui")
FAILED = "error: the answer failed; the details are in the server log"
_SAVE_LOCK = threading.Lock()  # appends to --save-to from several browser sessions

# the generation parameters shown in the form, in order (each is a GenerationConfig field)
FORM_PARAMS = ["max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams",
               "repetition_penalty", "no_repeat_ngram_size", "seed"]


def new_state() -> dict:
    return {"turns": [], "first_kept": 0}


def chat_messages(turns: list[list[str]]) -> list[dict]:
    messages = []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def form_params(base: GenerationConfig, values: dict[str, Any], stop_text: str) -> GenerationConfig:
    """The form's values as a validated GenerationConfig (numbers from sliders may come as floats)."""
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name == "seed":
            value = None if value in (None, "", -1) else int(value)
        elif name in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams", "no_repeat_ngram_size"):
            value = int(value)
        changes[name] = value
    changes["stop"] = [line for line in (stop_text or "").splitlines() if line]
    return update_params(base, **changes)


def session_for(engine: Engine, state: dict, params: GenerationConfig, system: str,
                max_history_tokens: int) -> ChatSession:
    session = ChatSession(engine, params, system=system if system.strip() else None,
                          max_history_tokens=int(max_history_tokens))
    session.turns = [tuple(turn) for turn in state["turns"]]
    session.first_kept = state["first_kept"]
    return session


def save_chat(engine: Engine, state: dict, params: GenerationConfig, system: str, folder: Path,
              save_to: Path | None) -> Path:
    session = session_for(engine, state, params, system, DEFAULT_HISTORY_TOKENS)
    if not session.turns:
        raise ZhilingError("nothing to save yet: the conversation is empty")
    # two people saving in the same second must not overwrite (or download) each other's chat
    target = folder / f"zhiling-chat-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.jsonl"
    with open(target, "x", encoding="utf-8") as handle:
        handle.write(json.dumps(session.to_record(), ensure_ascii=False) + "\n")
    if save_to is not None:
        with _SAVE_LOCK:
            session.save(save_to)
    return target


def build_webui(engine: Engine, params: GenerationConfig | None = None, *, system: str | None = None,
                max_history_tokens: int = DEFAULT_HISTORY_TOKENS, save_to: str | None = None,
                concurrency_limit: int = 1):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    defaults = params or GenerationConfig()
    save_folder = Path(tempfile.mkdtemp(prefix="zhiling-webui-"))
    save_path = Path(save_to).expanduser() if save_to else None
    info = engine.describe()
    default_system = system if system is not None else getattr(engine.template, "default_system", "") or ""
    title = f"zhiling · {Path(engine.adapter_id or engine.model_id or 'model').name}"

    # delete_cache: Gradio's copies of downloaded chats are removed after an hour and when the server stops
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"### {title}\n{info['model']}" + (f" + adapter {info['adapter']}" if info["adapter"] else "")
                    + f" · {info['backend']} backend · {engine.template_origin} · context {engine.context_length}")
        state = gr.State(new_state())
        chatbot = gr.Chatbot(label="对话 / chat", height=460, elem_id="zhiling-chat")
        with gr.Row():
            message = gr.Textbox(placeholder="输入消息，回车发送 (Enter sends)", show_label=False, scale=8,
                                 elem_id="zhiling-message", lines=1, max_lines=8)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="zhiling-send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="zhiling-stop")
        with gr.Row():
            undo = gr.Button("Undo", elem_id="zhiling-undo")
            clear = gr.Button("Clear", elem_id="zhiling-clear")
            save = gr.Button("Save chat", elem_id="zhiling-save")
        status = gr.Markdown("", elem_id="zhiling-status")
        saved = gr.File(label="saved chat (canonical jsonl)", visible=False, elem_id="zhiling-saved")
        with gr.Accordion("System prompt and generation parameters", open=False):
            system_box = gr.Textbox(value=default_system, label="system prompt", lines=2, elem_id="zhiling-system")
            with gr.Row():
                max_new = gr.Slider(1, max(2048, defaults.max_new_tokens), value=defaults.max_new_tokens, step=1,
                                    label="max_new_tokens")
                min_new = gr.Slider(0, 512, value=defaults.min_new_tokens, step=1, label="min_new_tokens")
                history = gr.Number(value=max_history_tokens, precision=0, minimum=0, label="max_history_tokens")
            with gr.Row():
                do_sample = gr.Checkbox(value=defaults.do_sample, label="do_sample (sample instead of greedy)")
                temperature = gr.Slider(0.01, 2.0, value=defaults.temperature, step=0.01, label="temperature")
                top_p = gr.Slider(0.01, 1.0, value=defaults.top_p, step=0.01, label="top_p")
                top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="top_k (0 = off)")
            with gr.Row():
                num_beams = gr.Slider(1, 8, value=defaults.num_beams, step=1, label="num_beams (hf)")
                repetition = gr.Slider(0.5, 2.0, value=defaults.repetition_penalty, step=0.01,
                                       label="repetition_penalty")
                no_repeat = gr.Slider(0, 10, value=defaults.no_repeat_ngram_size, step=1,
                                      label="no_repeat_ngram_size (hf)")
                seed = gr.Number(value=defaults.seed if defaults.seed is not None else -1, precision=0,
                                 label="seed (-1 = none)")
            stop_box = gr.Textbox(value="\n".join(defaults.stop), label="extra stop strings (one per line)", lines=2)
        param_inputs = [max_new, min_new, do_sample, temperature, top_p, top_k, num_beams, repetition, no_repeat, seed]

        def read_params(values, stop_text) -> GenerationConfig:
            params = form_params(defaults, dict(zip(FORM_PARAMS, values)), stop_text)
            engine.check_params(params)
            return params

        async def respond(text, chat_state, system_text, history_tokens, stop_text, *values):
            text = (text or "").strip()
            turns = [list(t) for t in chat_state["turns"]]
            if not text:
                yield chat_messages(turns), chat_state, "", "type a message first"
                return
            try:
                params = read_params(values, stop_text)
                session = session_for(engine, chat_state, params, system_text or "", history_tokens or 0)
                prepared = session.prepare(text)
            except ZhilingError as exc:
                yield chat_messages(turns), chat_state, text, f"error: {exc}"
                return
            note = (f"dropped the {prepared.dropped} oldest turn(s) from the model's view "
                    f"(max_history_tokens={session.max_history_tokens})" if prepared.dropped else "")
            answer = ""
            current = {"turns": turns + [[text, answer]], "first_kept": session.first_kept}
            yield chat_messages(current["turns"]), current, "", note or "…"
            stream = AsyncTextStream(engine, prepared.request, params)
            try:
                async for delta in stream:
                    answer += delta
                    current = {"turns": turns + [[text, answer]], "first_kept": session.first_kept}
                    yield chat_messages(current["turns"]), current, "", note
            except ZhilingError as exc:
                yield chat_messages(turns), chat_state, text, f"error: {exc}"
                return
            except Exception:  # noqa: BLE001 - the page shows a sentence, the log the details
                log.exception("web UI answer failed")
                yield chat_messages(turns), chat_state, text, FAILED
                return
            finally:
                stream.close()
            if stream.result is not None and stream.result.finish_reason == FINISH_LENGTH:
                note = (note + "; " if note else "") + f"the answer reached max_new_tokens={params.max_new_tokens}"
            yield chat_messages(current["turns"]), current, "", note

        inputs = [message, state, system_box, history, stop_box, *param_inputs]
        outputs = [chatbot, state, message, status]
        submitted = message.submit(respond, inputs, outputs, concurrency_limit=concurrency_limit)
        clicked = send.click(respond, inputs, outputs, concurrency_limit=concurrency_limit)
        stop.click(lambda: "stopped", None, status, cancels=[submitted, clicked])

        def undo_turn(chat_state):
            turns = [list(t) for t in chat_state["turns"]]
            if not turns:
                return chat_messages(turns), chat_state, "", "nothing to undo"
            user, _ = turns.pop()
            new = {"turns": turns, "first_kept": min(chat_state["first_kept"], len(turns))}
            return chat_messages(turns), new, user, "removed the last turn (its question is back in the box)"

        undo.click(undo_turn, [state], [chatbot, state, message, status])
        clear.click(lambda: ([], new_state(), "", "conversation cleared", gr.update(value=None, visible=False)), None,
                    [chatbot, state, message, status, saved])

        def save_turns(chat_state, system_text, stop_text, *values):
            try:
                params = read_params(values, stop_text)
                path = save_chat(engine, chat_state, params, system_text or "", save_folder, save_path)
            except ZhilingError as exc:
                return gr.update(visible=False), f"error: {exc}"
            except Exception:  # noqa: BLE001
                log.exception("web UI save failed")
                return gr.update(visible=False), FAILED.replace("answer", "save")
            where = f" and appended to {save_path}" if save_path else ""
            return gr.update(value=str(path), visible=True), f"saved {path.name}{where}"

        save.click(save_turns, [state, system_box, stop_box, *param_inputs], [saved, status])
    demo.queue(default_concurrency_limit=concurrency_limit)
    demo.zhiling_save_folder = save_folder
    # removed when the page is garbage-collected or, at the latest, when the process exits
    weakref.finalize(demo, shutil.rmtree, str(save_folder), True)
    return demo


def launch_webui(demo, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True,
                 auth: tuple[str, str] | None = None):
    """Serve the page (behind a log-in when ``auth`` is given); returns (app, local url) when ``block`` is False.
    Unexpected errors are not shown in the page (``show_error=False``): they are logged."""
    app, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                              footer_links=[], show_error=False, auth=auth)
    return app, url
