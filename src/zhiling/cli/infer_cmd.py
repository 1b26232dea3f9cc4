"""``zhiling chat`` and ``zhiling predict``, plus the model / engine options every inference command shares."""

from __future__ import annotations

import argparse
import sys

from zhiling.cli.common import add_command
from zhiling.errors import ZhilingError


# ----- shared by chat, predict, serve, webui ---------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", metavar="M",
                       help="Hugging Face id, local folder, merged folder or .gguf file (default: the config's "
                            "model, else the embedded Gemma 3 270M)")
    group.add_argument("--adapter", "-a", metavar="DIR", help="LoRA adapter folder from `zhiling train`")
    group.add_argument("--backend", default="hf", metavar="NAME",
                       help="inference backend: hf (transformers) or llama.cpp (GGUF file) (default hf)")
    group.add_argument("--template", "-t", metavar="T",
                       help="prompt template; by default the one recorded with the adapter or model (what "
                            "training used), else the model's own")
    group.add_argument("--system", "-s", metavar="TEXT", help="system prompt (replaces the template's default)")
    group.add_argument("--config", "-c", metavar="CONFIG.yaml",
                       help="take model, template, quantization and generation settings from this config")
    group.add_argument("--quant", type=int, choices=(4, 8), help="load the base model in 4 or 8 bits (bitsandbytes)")
    group.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="weights dtype")


def engine_settings(args: argparse.Namespace):
    """(model config, quantization, template name, system prompt, base generation params) from a config file
    (when given) with the command-line flags on top."""
    from zhiling.config import QuantizationConfig, ZhilingConfig, load_config

    config = load_config(args.config) if args.config else ZhilingConfig()
    model_cfg = config.model.model_copy()
    updates = {}
    if args.model:
        updates["name_or_path"] = args.model
    if args.device:
        updates["device"] = args.device
    if args.dtype:
        updates["dtype"] = args.dtype
    if updates:
        model_cfg = model_cfg.model_validate({**model_cfg.model_dump(), **updates})
    quant = QuantizationConfig(bits=args.quant) if args.quant else (
        config.quantization if config.quantization.bits else None)
    template = args.template or config.template.name
    system = args.system if args.system is not None else config.template.system
    return model_cfg, quant, template, system, config.generation


def load_engine_from_args(args: argparse.Namespace, warn=None):
    """(engine, generation params) for an inference command."""
    from zhiling.infer.engine import load_engine
    from zhiling.infer.params import params_from_args

    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    model_cfg, quant, template, system, base = engine_settings(args)
    params = params_from_args(args, base, warn=warn)
    with _status(f"loading {model_cfg.name_or_path or 'the default model'}"
                 + (f" + {args.adapter}" if args.adapter else "") + f" ({args.backend})"):
        engine = load_engine(model_cfg, adapter=args.adapter, backend=args.backend, template=template, quant=quant,
                             system=system)
    engine.check_params(params)
    print(f"{engine.template_origin}; context {engine.context_length} tokens", file=sys.stderr)
    return engine, params


class _status:
    """A spinner on stderr while a model loads (nothing when stderr is not a terminal)."""

    def __init__(self, text: str):
        self.text = text
        self.status = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status(self.text)
            self.status.start()
        else:
            print(self.text + " ...", file=sys.stderr)
        return self

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.stop()


# ----- chat ------------------------------------------------------------------------------------------------------
def _chat(args) -> int:
    from zhiling.infer.chat import ChatLoop, ChatSession

    if args.max_history_tokens < 0:
        raise ZhilingError("--max-history-tokens must be 0 or more")
    engine, params = load_engine_from_args(args)
    try:
        session = ChatSession(engine, params, system=None, max_history_tokens=args.max_history_tokens)
        return ChatLoop(session).run()
    finally:
        engine.close()


# ----- predict ---------------------------------------------------------------------------------------------------
def _predict(args) -> int:
    from zhiling.cli.data_convert import parse_options
    from zhiling.infer.predict import read_items, run_predict

    if args.batch_size < 1:
        raise ZhilingError(f"--batch-size must be 1 or more, got {args.batch_size}")
    items = read_items(args.input, args.format, parse_options(args.option),
                       announce=lambda message: print(message, file=sys.stderr))
    print(f"{len(items)} prompts from {args.input}", file=sys.stderr)
    engine, params = load_engine_from_args(args)
    try:
        report = run_predict(engine, items, args.output, params, input_path=args.input, batch_size=args.batch_size,
                             overwrite=args.overwrite, progress=False if args.no_progress else None)
    finally:
        engine.close()
    print(report.summary(), file=sys.stderr)
    return 0


def register(sub) -> None:
    from zhiling.infer.params import add_generation_arguments

    chat = add_command(sub, "chat", help="chat with a model in the terminal (streaming, multi-turn)", func=_chat,
                       description="""
                       A multi-turn chat in the terminal. Answers stream as they are written; Ctrl-C stops an
                       answer without leaving the chat. The prompt is built with the template recorded with the
                       adapter (the one training used). The oldest turns are dropped from the model's view when
                       the history grows past --max-history-tokens (you are told when that happens).

                       Commands: /reset /undo /retry /system TEXT /set KEY VALUE /save FILE /help /exit.
                       Input may also be piped in (one message or command per line).""",
                       examples="""
                       zhiling chat                                         # the embedded default model
                       zhiling chat --model Qwen/Qwen2.5-0.5B-Instruct --system 你是一个乐于助人的助手。
                       zhiling chat -m google/gemma-3-270m --adapter outputs/belle-lora/adapter
                       zhiling chat -m outputs/merged --do-sample --temperature 0.8 --top-p 0.9
                       zhiling chat -m model.gguf --backend llama.cpp
                       printf '你好\\n/save chat.jsonl\\n' | zhiling chat -m outputs/merged   # scripted
                       """)
    add_model_arguments(chat)
    chat.add_argument("--max-history-tokens", type=int, default=2048, metavar="N",
                      help="tokens of earlier turns kept in the prompt; older turns are dropped first (default 2048)")
    add_generation_arguments(chat)

    predict = add_command(sub, "predict", help="batch inference over a file of prompts -> jsonl", func=_predict,
                          description="""
                          Answer every prompt of a file, in batches (left-padded), with a progress bar. The input
                          is a .txt file (one prompt per line), a JSON list of strings, or any supported data
                          format (see `zhiling data formats`); for data records the reference answer is kept.

                          Each output row holds id, prompt, output, reference (when known) and the record's own
                          keys such as task. The model, adapter, template and generation parameters are written
                          to OUT.jsonl.meta.json. Re-running the same command resumes: rows already in OUT.jsonl
                          are skipped; a different model or parameters is refused (use a new --output or
                          --overwrite).""",
                          examples="""
                          zhiling predict -m outputs/merged --input prompts.txt --output preds.jsonl
                          zhiling predict -m google/gemma-3-270m --adapter outputs/ner/adapter \\
                              --input data/msra_test.jsonl --output preds.jsonl --batch-size 16 --max-new-tokens 64
                          zhiling predict --input questions.json --output out.jsonl --do-sample --seed 42
                          zhiling predict --input belle.json --format belle --output out.jsonl --overwrite
                          """)
    add_model_arguments(predict)
    predict.add_argument("--input", "-i", required=True, metavar="FILE", help="prompts: .txt, JSON list, or data")
    predict.add_argument("--output", "-o", required=True, metavar="OUT.jsonl", help="predictions file")
    predict.add_argument("--batch-size", "-b", type=int, default=8, metavar="N", help="prompts per batch (default 8)")
    predict.add_argument("--format", default="auto", metavar="FMT",
                         help="input data format (default: detected; see `zhiling data formats`)")
    predict.add_argument("--option", action="append", metavar="KEY=VALUE", help="format option (repeatable)")
    predict.add_argument("--overwrite", action="store_true",
                         help="start again instead of resuming (replaces only an output zhiling predict wrote)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_arguments(predict)
