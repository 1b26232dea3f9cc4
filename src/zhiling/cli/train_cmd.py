"""``zhiling train CONFIG [key=value ...]``: fine-tune, resume, plan (--dry-run), or launch several processes."""

from __future__ import annotations

import os
import shlex
import sys

from zhiling.cli.common import add_command, add_config_arguments


def _launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _train(args) -> int:
    from zhiling.config import config_to_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    processes = args.nproc or 1
    launch = (processes > 1 or args.nnodes > 1 or args.print_command) and not _launched_by_torchrun()
    command = None
    if launch:
        from zhiling.train.launch import load_distributed_config, torchrun_command

        if cfg.training.distributed_config:
            load_distributed_config(cfg.training.distributed_config, cfg.training)
        command = torchrun_command(args.config, list(args.overrides), processes, args.nnodes, args.node_rank,
                                   args.master_addr, args.master_port)
        if args.print_command:
            print(shlex.join(command))
            return 0
    if args.dry_run:
        from zhiling.train.plan import plan, print_plans

        print(config_to_yaml(cfg), end="")
        print_plans(plan(cfg, processes=processes * args.nnodes))
        if command:
            print(f"would launch: {shlex.join(command)}")
        return 0
    if command:
        from zhiling.train.launch import run_torchrun

        print(f"launching {processes} process{'es' if processes > 1 else ''} per node: {shlex.join(command)}",
              file=sys.stderr, flush=True)
        return run_torchrun(command)
    if _launched_by_torchrun():
        from zhiling.train.launch import die_with_parent

        die_with_parent()  # torchrun starts workers in sessions of their own: without this they outlive a kill
    from zhiling.train.run import train

    train(cfg)
    return 0


def register(sub) -> None:
    parser = add_command(
        sub, "train", help="fine-tune a model (LoRA, QLoRA, DoRA, full, freeze); resumes automatically", func=_train,
        description="""
        Train as CONFIG.yaml says (any key can be overridden as key=value). The run writes OUTPUT/adapter (or
        OUTPUT/model for full and freeze), OUTPUT/zhiling.json, OUTPUT/metrics.jsonl, OUTPUT/loss.png and
        checkpoints. Running the same command again resumes from the last complete checkpoint and continues exactly
        (same data order, same losses); a setting that differs from the checkpoint's is refused (the ones listed in
        training.resume_changes are applied from there on); training.resume=false starts over. SIGTERM or Ctrl-C
        saves a checkpoint after the current step and stops (exit 143 / 130); a second run on the same output.dir
        is refused while the first lives. A config with `stages:` trains each stage on from the previous one and
        skips finished stages.

        --nproc N runs N processes through torchrun (one per GPU; DDP with gloo on CPU); add --nnodes,
        --node-rank, --master-addr and --master-port on each machine of a multi-node run. DeepSpeed ZeRO and FSDP
        come from training.distributed_config (a DeepSpeed JSON or an accelerate YAML file).""",
        examples="""
        zhiling train examples/qwen2.5-7b-qlora-belle.yaml
        zhiling train my.yaml training.learning_rate=1e-4 training.max_steps=200 output.dir=runs/try2
        zhiling train my.yaml --dry-run                     # plan: trainable parameters, tokens, steps, memory
        zhiling train my.yaml training.resume=false         # start over instead of resuming
        zhiling train my.yaml training.max_steps=2000 training.resume_changes=max_steps   # train on past the end
        zhiling train examples/deepspeed-2gpu.yaml --nproc 2
        zhiling train my.yaml --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
        """)
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the plan (parameters, tokens, steps, memory), then exit")
    parser.add_argument("--nproc", type=int, default=None, metavar="N", help="processes per node (launches torchrun)")
    parser.add_argument("--nnodes", type=int, default=1, metavar="N", help="number of machines")
    parser.add_argument("--node-rank", type=int, default=0, metavar="I", help="this machine's rank (0 .. nnodes-1)")
    parser.add_argument("--master-addr", default=None, metavar="HOST", help="address of the rank-0 machine")
    parser.add_argument("--master-port", type=int, default=None, metavar="PORT", help="port on the rank-0 machine")
    parser.add_argument("--print-command", action="store_true",
                        help="print the torchrun command line instead of running it (for job schedulers)")
