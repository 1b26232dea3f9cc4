"""``zhiling data convert``, ``zhiling data formats`` and ``zhiling data datasets``."""

from __future__ import annotations

import json
import sys
import textwrap

from zhiling.cli.common import add_command
from zhiling.errors import ZhilingError


def parse_options(items: list[str] | None) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ZhilingError(f"--option '{item}' is not of the form KEY=VALUE (for example --option answers=all)")
        key, value = item.split("=", 1)
        options[key.strip()] = value
    return options


def _convert(args) -> int:
    from zhiling.data.convert import convert_files

    if args.max_samples is not None and args.max_samples < 1:
        raise ZhilingError(f"--max-samples must be at least 1, got {args.max_samples}")
    report = convert_files(args.inputs, args.output, args.format, parse_options(args.option),
                           skip_invalid=args.skip_invalid, dedup=args.dedup, shards=args.shards, seed=args.seed,
                           source=args.source, max_samples=args.max_samples, hf_split=args.split,
                           progress=False if args.no_progress else None)
    report.check()
    print(report.summary(), file=sys.stderr)
    for path, count in zip(report.outputs, report.shard_counts):
        print(f"wrote {count} records to {path}", file=sys.stderr)
    if report.kinds and len(report.outputs) > 1:
        print("kinds: " + ", ".join(f"{kind} {count}" for kind, count in report.kinds.most_common()), file=sys.stderr)
    if report.rejected_path:
        print(f"{report.rejected} rejected rows (file, line, reason, raw text) in {report.rejected_path}",
              file=sys.stderr)
    if report.records == 0:
        print("warning: no records were written", file=sys.stderr)
    return 0


def _formats(args) -> int:
    from zhiling.data.formats import all_formats, get_format

    if not args.name:
        formats = all_formats()
        width = max(map(len, formats))
        for name, spec in formats.items():
            print(textwrap.fill(f"{name:<{width}}  {spec.description}", 110, subsequent_indent=" " * (width + 2)))
            for option, text in spec.options.items():
                print(textwrap.fill(f"--option {option}=...: {text}", 110, initial_indent=" " * (width + 4),
                                    subsequent_indent=" " * (width + 6)))
        print(f"\n{'hf:NAME':<{width}}  any input written hf:NAME or hf:NAME:SPLIT is read with datasets.load_dataset "
              f"(hub id, local dataset folder or data file); its rows use --format or auto-detection")
        print("\nAuto-detection (no --format) tries the formats in the order above. "
              "`zhiling data formats NAME` shows one format with its example.")
        return 0
    spec = get_format(args.name)
    module = sys.modules[spec.convert.__module__]
    print(f"{spec.name}: {spec.description}\n")
    print(textwrap.dedent(module.__doc__ or "").strip() + "\n")
    if spec.options:
        print("options (--option KEY=VALUE):")
        for option, text in spec.options.items():
            default = spec.defaults.get(option)
            shown = f" [default: {default!r}]" if default not in (None, "") else ""
            print(textwrap.fill(f"{option}: {text}{shown}",
                                110, initial_indent="  ", subsequent_indent="    "))
        print()
    if spec.example_path is not None:
        from zhiling.data.convert import iter_records

        print(f"example: {spec.example_path}")
        record = next(iter_records(str(spec.example_path), spec.name, announce=None), None)
        if record is not None:
            print("first record:\n" + json.dumps(record, ensure_ascii=False, indent=2))
    return 0


def _datasets(args) -> int:
    from zhiling.data.registry import load_registry

    registry = load_registry(args.registry)
    width = max(map(len, registry), default=4)
    for name, entry in registry.items():
        where = f"hf:{entry.hf}" if entry.hf else ", ".join(entry.paths)
        weight = f", weight {entry.weight:g}" if entry.weight != 1 else ""
        print(f"{name:<{width}}  [{entry.format}{weight}] {where}")
    return 0


def register(group) -> None:
    parser = add_command(
        group, "convert", help="convert raw instruction data to canonical jsonl", func=_convert,
        description="""
        Convert raw instruction data (alpaca, BELLE, instruct/query/answer, ShareGPT, Chinese-Vicuna chat and
        chit-chat, Firefly, PsyQA, couplets, Baize, COIG, OpenAI messages, or hf:NAME datasets) into canonical jsonl:
        {"id", "system", "messages": [{"role", "content"}...], "source"}.

        Without --format the format is detected from the content: the layout of each file (a JSON array or
        JSON lines, whatever its extension) and the keys of its first rows (printed with the reason).
        The first bad row stops the conversion with its file, line, field and reason; with --skip-invalid
        bad rows go to OUT.rejected.jsonl instead and are counted. Nothing is dropped without a trace: the
        summary accounts for every row ("N rows read = W written + R rejected + D duplicates").
        Output files appear only when the conversion finished.""",
        examples="""
        zhiling data convert alpaca_gpt4_data_zh.json -o data/alpaca_zh.jsonl
        zhiling data convert --format belle Belle_open_source_0.5M.json -o data/belle.jsonl --dedup
        zhiling data convert --format instruct msra_train.jsonl -o data/msra.jsonl \\
            --option columns=instruction=instruct,input=query,output=answer
        zhiling data convert --format psyqa PsyQA_full.json -o data/psyqa.jsonl --option answers=all \\
            --option description=input
        zhiling data convert --format firefly firefly-train-1.1M.jsonl -o data/firefly.jsonl --shards 4
        zhiling data convert --format couplets couplet/train -o data/couplets.jsonl   # folder with in.txt / out.txt
        zhiling data convert couplet/test/in.txt couplet/test/out.txt -o data/couplets_test.jsonl \
            --option prompt=对下联：{first}
        zhiling data convert raw.jsonl -o clean.jsonl --skip-invalid   # bad rows -> clean.rejected.jsonl
        zhiling data convert hf:BelleGroup/train_0.5M_CN -o data/belle.jsonl --max-samples 10000
        """)
    parser.add_argument("inputs", metavar="IN", nargs="+",
                        help="input files (a JSON array or JSON lines: .json, .jsonl, .txt), couplet .txt files, "
                             "folders (couplets, COIG chats), COIG .tar.gz archives, or hf:NAME[:SPLIT]")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.jsonl", help="output file")
    parser.add_argument("--format", default="auto", help="input format (see `zhiling data formats`); default: detect")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="a format option (repeatable)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="write bad rows to OUT.rejected.jsonl and go on, instead of stopping at the first")
    parser.add_argument("--dedup", action="store_true", help="remove exact duplicates (same system + messages)")
    parser.add_argument("--shards", type=int, metavar="N",
                        help="write N files OUT-0000i-of-0000N.jsonl with the same mix of 'kind' (Firefly) each")
    parser.add_argument("--seed", type=int, default=42, help="seed for --shards (default 42)")
    parser.add_argument("--source", metavar="NAME", help="'source' of every record and the prefix of generated ids")
    parser.add_argument("--max-samples", type=int, metavar="N", help="stop after N records")
    parser.add_argument("--split", help="split of hf: inputs (default train)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser = add_command(
        group, "formats", help="list the input formats and their options", func=_formats,
        description="List the input formats (in auto-detection order) with their options, or show one format: its "
                    "field layout, options and its example file converted.",
        examples="""
        zhiling data formats
        zhiling data formats psyqa
        """)
    parser.add_argument("name", nargs="?", help="a format name")

    parser = add_command(
        group, "datasets", help="list the registered datasets", func=_datasets,
        description="List the datasets a config can name in data.datasets: the built-in registry, with a user "
                    "registry file merged over it.",
        examples="""
        zhiling data datasets
        zhiling data datasets --registry my_datasets.yaml
        """)
    parser.add_argument("--registry", metavar="FILE", help="user registry YAML merged over the built-in one")
