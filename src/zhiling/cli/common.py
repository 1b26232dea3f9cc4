"""Small helpers shared by the command modules."""

from __future__ import annotations

import argparse
import textwrap


def add_command(sub, name: str, *, help: str, description: str, examples: str, func) -> argparse.ArgumentParser:
    """Add a sub-command whose ``--help`` ends with worked examples."""
    epilog = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ")
    parser = sub.add_parser(name, help=help, description=textwrap.dedent(description).strip(), epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def add_group(sub, name: str, *, help: str, description: str):
    """Add a command group (``zhiling data ...``) and return its sub-parser collection."""
    parser = sub.add_parser(name, help=help, description=textwrap.dedent(description).strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    return group


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", nargs=None if required else "?",
                        help="YAML config file")
    parser.add_argument("overrides", metavar="key=value", nargs="*",
                        help="override any config key, dotted for nesting (training.learning_rate=1e-4)")
