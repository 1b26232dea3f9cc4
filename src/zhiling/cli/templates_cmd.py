"""``zhiling templates``: list the prompt templates and show how one renders a conversation."""

from __future__ import annotations

from zhiling.cli.common import add_command

_EXAMPLE = [("请找出句子中的人名：李雷在上海工作。", "李雷_人名"), ("再找出地名。", "上海_地名")]


def _run(args) -> int:
    from zhiling.data.templates import TEMPLATES, get_template

    if not args.name:
        width = max(map(len, TEMPLATES))
        for name, template in TEMPLATES.items():
            print(f"{name:<{width}}  {template.description}")
        print(f"{'auto':<{width}}  the tokenizer's own chat template (models that ship one)")
        return 0
    template = get_template(args.name, system=args.system)
    if args.jinja:
        print(template.to_jinja())
        return 0
    print(template.render(template.default_system if args.system is None else args.system, _EXAMPLE,
                          eos="<eos>", bos="<bos>"))
    print(f"\n[stop strings: {', '.join(map(repr, template.stop_strings())) or 'EOS only'}]")
    return 0


def register(sub) -> None:
    parser = add_command(sub, "templates", help="list prompt templates or show one", func=_run,
                         description="List the prompt templates, or render a two-turn example conversation through "
                                     "one (with <bos>/<eos> standing for the tokenizer's tokens).",
                         examples="""
                         zhiling templates
                         zhiling templates chatglm
                         zhiling templates gemma --system 你是一个乐于助人的助手。
                         zhiling templates chatml --jinja       # the chat template written into the tokenizer
                         """)
    parser.add_argument("name", nargs="?", help="template name")
    parser.add_argument("--system", help="system prompt to render with")
    parser.add_argument("--jinja", action="store_true", help="print the Jinja chat template instead")
