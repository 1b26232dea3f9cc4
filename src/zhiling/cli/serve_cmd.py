"""``zhiling serve`` (OpenAI-compatible HTTP API) and ``zhiling webui`` (browser chat)."""

from __future__ import annotations

import os
import sys

from zhiling.cli.common import add_command
from zhiling.cli.infer_cmd import add_model_arguments, load_engine_from_args
from zhiling.errors import ZhilingError

API_KEY_ENV = "ZHILING_API_KEY"
WEBUI_AUTH_ENV = "ZHILING_WEBUI_AUTH"


def _need(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ZhilingError(f"this command needs {module}: pip install 'zhiling[{extra}]'") from None


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ZhilingError(f"--port must be between 0 and 65535, got {port}")


def _check_exposure(host: str, secret: bool, allowed: bool, secret_flag: str, allow_flag: str) -> None:
    """A non-loopback address without a secret opens the model to the network: refused unless asked for."""
    from zhiling.hosts import is_loopback_host

    if not secret and not allowed and not is_loopback_host(host):
        raise ZhilingError(f"--host {host} lets other machines reach the model, and no {secret_flag} is set: set "
                           f"{secret_flag}, or pass {allow_flag} to serve without one")


def _serve(args) -> int:
    _need("fastapi", "serve")
    _need("uvicorn", "serve")
    _check_port(args.port)
    if args.max_body_mb <= 0:
        raise ZhilingError(f"--max-body-mb must be above 0, got {args.max_body_mb}")
    if args.max_concurrency < 1:
        raise ZhilingError(f"--max-concurrency must be 1 or more, got {args.max_concurrency}")
    if args.max_queue < 0:
        raise ZhilingError(f"--max-queue must be 0 or more, got {args.max_queue}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    _check_exposure(args.host, bool(api_key), args.allow_no_key, "--api-key", "--allow-no-key")
    from zhiling.serve.app import create_app
    from zhiling.serve.runner import serve_forever

    engine, params = load_engine_from_args(args)
    app = create_app(engine, params, api_key=api_key, max_concurrency=args.max_concurrency,
                     max_queue=args.max_queue, model_name=args.model_name, host=args.host,
                     max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    print(f"serving '{app.state.model_name}' at http://{args.host}:{args.port}/v1 "
          f"({'API key required' if api_key else 'no API key: anyone who can reach the port may use it'})",
          file=sys.stderr)
    try:
        serve_forever(app, args.host, args.port)
    finally:
        engine.close()
    return 0


def _webui(args) -> int:
    _need("gradio", "webui")
    _check_port(args.port)
    if args.max_history_tokens < 0:
        raise ZhilingError("--max-history-tokens must be 0 or more")
    auth = _parse_auth(args.auth or os.environ.get(WEBUI_AUTH_ENV) or None)
    _check_exposure(args.host, auth is not None, args.allow_no_auth, "--auth", "--allow-no-auth")
    from zhiling.serve.webui import build_webui, launch_webui

    engine, params = load_engine_from_args(args)
    demo = build_webui(engine, params, max_history_tokens=args.max_history_tokens, save_to=args.save_to,
                       concurrency_limit=args.max_concurrency)
    try:
        launch_webui(demo, args.host, args.port, auth=auth)
    finally:
        engine.close()
    return 0


def _parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ZhilingError("--auth must be USER:PASSWORD (both non-empty)")
    return user, password


def register(sub) -> None:
    from zhiling.infer.params import add_generation_arguments

    serve = add_command(sub, "serve", help="OpenAI-compatible HTTP API (chat, completions, streaming)", func=_serve,
                        description=f"""
                        Serve the model over an OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions
                        (with "stream": true for server-sent events), POST /v1/completions, GET /health. Any
                        OpenAI client works (base_url=http://HOST:PORT/v1). Chat prompts are built with the
                        template recorded with the adapter, exactly as in training.

                        With --api-key (or ${API_KEY_ENV}) every request but GET /health (the API docs
                        included) needs "Authorization: Bearer KEY". A --host other than a loopback address
                        (127.0.0.1, localhost, ::1) needs a key, or --allow-no-key; on a loopback address only
                        requests for localhost / 127.0.0.1 / [::1] are answered (DNS rebinding protection).
                        Bodies over --max-body-mb get 413; a request has at most 1024 messages and 4 stop
                        strings. At most --max-concurrency answers are generated at once and --max-queue
                        requests wait; more get 503 with Retry-After. The generation flags set the defaults;
                        requests can override them (temperature, top_p, max_tokens, stop, seed, and zhiling's
                        top_k, repetition_penalty, min_tokens, num_beams, no_repeat_ngram_size).""",
                        examples="""
                        zhiling serve -m outputs/merged --api-key sk-local-123
                        ZHILING_API_KEY=sk-local-123 zhiling serve -m google/gemma-3-270m --adapter outputs/lora/adapter
                        zhiling serve -m model.gguf --backend llama.cpp --host 0.0.0.0 --port 8080 --api-key sk-lan-456
                        curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer sk-local-123" \\
                            -H "Content-Type: application/json" \\
                            -d '{"model": "merged", "messages": [{"role": "user", "content": "你好"}]}'
                        """)
    add_model_arguments(serve)
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument("--api-key", metavar="K", help=f"required bearer key (default: ${API_KEY_ENV}, else none)")
    group.add_argument("--allow-no-key", action="store_true",
                       help="serve without a key on a non-loopback --host (anyone who reaches the port may use it)")
    group.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB",
                       help="largest request body in MiB; larger ones get 413 (default 8)")
    group.add_argument("--model-name", metavar="NAME",
                       help="model id clients use (default: the adapter's or model's folder name)")
    group.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                       help="answers generated at the same time (default 1)")
    group.add_argument("--max-queue", type=int, default=16, metavar="N",
                       help="requests that may wait for a slot; more get 503 (default 16)")
    add_generation_arguments(serve)

    webui = add_command(sub, "webui", help="chat with a model in the browser (Gradio)", func=_webui,
                        description=f"""
                        A browser chat page: answers stream in, Stop interrupts one, Undo removes the last turn,
                        Clear starts over and Save chat downloads the conversation (with its parameters) as a
                        canonical jsonl row. The system prompt and every generation parameter are in the
                        settings panel. A --host other than a loopback address needs --auth (or
                        ${WEBUI_AUTH_ENV}=USER:PASSWORD), or --allow-no-auth. Needs: pip install 'zhiling[webui]'.""",
                        examples="""
                        zhiling webui -m outputs/merged
                        zhiling webui -m google/gemma-3-270m --adapter outputs/lora/adapter --port 7861
                        zhiling webui -m Qwen/Qwen2.5-0.5B-Instruct --system 你是一个乐于助人的助手。 --save-to chats.jsonl
                        zhiling webui -m outputs/merged --host 0.0.0.0 --auth alice:long-secret
                        """)
    add_model_arguments(webui)
    group = webui.add_argument_group("web page")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    group.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    group.add_argument("--auth", metavar="USER:PASSWORD",
                       help=f"log-in needed to open the page (default: ${WEBUI_AUTH_ENV}, else none)")
    group.add_argument("--allow-no-auth", action="store_true",
                       help="open the page without a log-in on a non-loopback --host")
    group.add_argument("--max-history-tokens", type=int, default=2048, metavar="N",
                       help="tokens of earlier turns kept in the prompt (default 2048)")
    group.add_argument("--save-to", metavar="FILE", help="also append every saved chat to this jsonl file")
    group.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                       help="answers generated at the same time across browser tabs (default 1)")
    add_generation_arguments(webui)
