from __future__ import annotations

from zhiling.cli.common import add_command, add_group


def _show(args) -> int:
    from zhiling.config import config_to_yaml, load_config

    overrides = list(args.overrides)
    path = args.config
    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):
        overrides.insert(0, path)
        path = None
    print(config_to_yaml(load_config(path, overrides)), end="")
    return 0


def register(sub) -> None:
    group = add_group(sub, "config", help="show and check configs",
                      description="Show the resolved config: defaults, then the YAML file, then key=value overrides.")
    parser = add_command(group, "show", help="print the resolved config", func=_show,
                         description="Validate a config and print it with every default filled in.",
                         examples="""
                         zhiling config show examples/qwen2.5-7b-qlora-belle.yaml
                         zhiling config show my.yaml training.learning_rate=1e-4 data.cutoff_len=512
                         zhiling config show model=Qwen/Qwen2.5-0.5B      # no file: defaults + overrides
                         """)
    parser.add_argument("config", metavar="CONFIG.yaml", nargs="?", help="YAML config file (optional)")
    parser.add_argument("overrides", metavar="key=value", nargs="*", help="overrides, dotted for nesting")
