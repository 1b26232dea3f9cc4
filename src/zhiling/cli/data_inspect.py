"""``zhiling data stats`` and ``zhiling data preview``: look at a dataset's lengths and at exactly what is trained."""

from __future__ import annotations

import json
import sys

from zhiling.cli.common import add_command


def _tokenizer_and_template(model, template_name: str | None, system: str | None = None):
    """The tokenizer and template training would use for ``model`` (a name or path, or a ``ModelConfig``)."""
    from zhiling.config import ModelConfig
    from zhiling.models.chat_setup import resolve_chat_setup

    cfg = model if isinstance(model, ModelConfig) else ModelConfig(name_or_path=model)
    setup = resolve_chat_setup(cfg, template_name, system=system)
    return setup.tokenizer, setup.template


def _records(names, registry, format, max_samples=None):
    from zhiling.data.registry import iter_mixed_records

    return iter_mixed_records(names, registry, format, max_samples,
                              announce=lambda message: print(message, file=sys.stderr))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"


def _stats(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from zhiling.data.stats import PERCENTILES, collect, plot_histogram

    tokenizer = template = None
    if args.model is not None or args.template is not None:
        tokenizer, template = _tokenizer_and_template(args.model, args.template)
    records = _records(args.data, args.registry, args.format)
    stats = collect(records, tokenizer, template, args.cutoff if tokenizer is not None else None)
    summary = stats.summary()
    if template is not None:
        summary["template"] = template.name
    if args.json:
        print(json.dumps(summary, ensure_ascii=False, indent=2))
    else:
        console = Console()
        console.print(f"[bold]{', '.join(args.data)}[/]: {stats.rows:,} rows, {stats.duplicates:,} exact duplicates"
                      + (f", template '{template.name}'" if template is not None else ""), soft_wrap=True)
        table = Table(show_header=True, header_style="bold")
        columns = ["count", "mean", "std", "min", *map(str, PERCENTILES), "max"]
        table.add_column("length", no_wrap=True)
        for column in columns:
            table.add_column(column if column.isalpha() else f"p{column}", justify="right")
        for key in ("turns", "prompt_chars", "response_chars", "prompt_tokens", "response_tokens", "total_tokens"):
            if key in summary and summary[key].get("count"):
                table.add_row(key.replace("_", " "), *(_fmt(summary[key][c]) for c in columns))
        console.print(table)
        if summary.get("over_cutoff") is not None:
            share = summary["over_cutoff"] / max(stats.rows, 1)
            console.print(f"{summary['over_cutoff']:,} rows ({share:.1%}) are longer than cutoff_len="
                          f"{summary['cutoff_len']} tokens (cut, or dropped with data.drop_long=true)",
                          soft_wrap=True)
        elif tokenizer is None:
            console.print("Token lengths: add --model (and --template) to count tokens the way training does.",
                          soft_wrap=True)
    if args.plot:
        plot_histogram(stats, args.plot, title=", ".join(args.data))
        print(f"histogram written to {args.plot}", file=sys.stderr)
    return 0


def _preview(args) -> int:
    from rich.console import Console

    from zhiling.config import load_config
    from zhiling.data.preview import print_preview
    from zhiling.data.tokenize import TokenizeOptions
    from zhiling.errors import ZhilingError

    if args.config:
        cfg = load_config(args.config, args.overrides)
        names = [args.data] if args.data else cfg.data.datasets
        tokenizer, template = _tokenizer_and_template(args.model or cfg.model.name_or_path,
                                                      args.template or cfg.template.name, cfg.template.system)
        options = TokenizeOptions.from_config(cfg.data)
        registry, format = cfg.data.registry, cfg.data.format
    else:
        if not args.data:
            raise ZhilingError("give a CONFIG.yaml, or --data (with --model and --template)")
        names = [args.data]
        tokenizer, template = _tokenizer_and_template(args.model, args.template)
        options = TokenizeOptions(cutoff_len=args.cutoff or 1024)
        registry, format = args.registry, args.format
    if args.cutoff:
        options = TokenizeOptions(args.cutoff, options.train_on_prompt, options.mask_history, options.drop_long)
    color = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
    console = Console(force_terminal=color if args.color != "auto" else None, no_color=not color,
                      soft_wrap=True)
    console.print(f"template '{template.name}', cutoff_len {options.cutoff_len}"
                  + (", prompt tokens trained too" if options.train_on_prompt else "")
                  + (", only the last answer trained" if options.mask_history else ""), markup=False)
    print_preview(console, _records(names, registry, format, args.rows), tokenizer, template, options, args.rows,
                  color)
    return 0


def register(group) -> None:
    parser = add_command(group, "stats", help="rows, turns and length percentiles of a dataset", func=_stats,
                         description="""
                         Rows, turns, and character (and, with --model, token) length percentiles of prompts and
                         answers: count / mean / std / min / p25 / p50 / p75 / p90 / max; how many rows exceed
                         the cutoff; exact duplicates; and a histogram PNG with --plot.""",
                         examples="""
                         zhiling data stats data/belle.jsonl
                         zhiling data stats zhiling_zh --model default --cutoff 256 --plot lengths.png
                         zhiling data stats alpaca_data_zh.json --format alpaca --model Qwen/Qwen2.5-0.5B --json
                         """)
    parser.add_argument("data", nargs="+", help="data files, registry names or hf:NAME")
    parser.add_argument("--format", default="auto", help="input format (default: detect)")
    parser.add_argument("--registry", help="extra dataset registry YAML")
    parser.add_argument("--model", help="count tokens with this model's tokenizer ('default' = the embedded model)")
    parser.add_argument("--template", help="template for token counts (default: the model's)")
    parser.add_argument("--cutoff", type=int, default=1024, help="count rows longer than this many tokens")
    parser.add_argument("--plot", metavar="PNG", help="write a length histogram")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")

    parser = add_command(group, "preview", help="show which tokens are trained", func=_preview,
                         description="""
                         Render the first rows through the template and tokenizer exactly as training does and
                         show which tokens are learned: in colour in a terminal, inside [[ ]] when piped.""",
                         examples="""
                         zhiling data preview my-run.yaml
                         zhiling data preview my-run.yaml data.mask_history=true --rows 2
                         zhiling data preview --data zhiling_zh --model default --template gemma
                         zhiling data preview --data belle.jsonl --model Qwen/Qwen2.5-0.5B --template chatml | less
                         """)
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="training config (data, model, template)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--data", help="data file, registry name or hf:NAME (instead of the config's)")
    parser.add_argument("--model", help="model whose tokenizer to use ('default' = the embedded model)")
    parser.add_argument("--template", help="template name")
    parser.add_argument("--format", default="auto", help="input format of --data (default: detect)")
    parser.add_argument("--registry", help="extra dataset registry YAML")
    parser.add_argument("--cutoff", type=int, help="cutoff_len (default: the config's, else 1024)")
    parser.add_argument("--rows", type=int, default=3, help="how many rows to show (default 3)")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                        help="colour (default: when writing to a terminal)")
