"""The ``zhiling`` command tree. Each module in ``COMMAND_MODULES`` registers its own sub-commands; the work
itself lives in the packages (data, train, infer, serve, eval, export), never here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from zhiling import __version__
from zhiling.errors import ZhilingError

COMMAND_MODULES = [
    "zhiling.cli.config_cmd",
    "zhiling.cli.data_cmd",
    "zhiling.cli.templates_cmd",
    "zhiling.cli.train_cmd",
    "zhiling.cli.quickstart_cmd",
    "zhiling.cli.infer_cmd",
    "zhiling.cli.serve_cmd",
    "zhiling.cli.eval_cmd",
    "zhiling.cli.export_cmd",
]

DESCRIPTION = """\
zhiling (指令): raw instruction data in, a fine-tuned chat model out.

Start with `zhiling quickstart`, or run `zhiling COMMAND --help` for any command below."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhiling", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"zhiling {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes suggests `pip install kernels` on AVX512-BF16 CPUs: that package fetches kernels from the hub at
    # run time, which zhiling never relies on; its 4-bit path works without it
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may follow flags (`zhiling train c.yaml --dry-run lora.rank=4`); argparse stops
        # collecting a positional list at the first flag, so gather the rest here
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        result = args.func(args)
    except ZhilingError as exc:
        code = getattr(exc, "exit_code", None)  # RunStopped: a requested stop, not an error
        print(f"{exc}" if code else f"error: {exc}", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
