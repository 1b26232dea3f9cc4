"""Staged runs: a list of stages, each with its own data and steps, each starting from the previous stage's result.

Stage ``NAME`` trains into ``OUTPUT/NAME`` with ``training.init_adapter`` = the previous stage's adapter (adapter
methods) or ``model.name_or_path`` = the previous stage's model (full / freeze). The first stage starts from the
root config's ``init_adapter`` if it has one. Every stage is an ordinary run with its own checkpoints, so a re-run
skips finished stages and resumes the unfinished one. ``OUTPUT/zhiling.json`` lists the stages and where the final
result is.
"""

from __future__ import annotations

import copy
from pathlib import Path

from zhiling.config import ZhilingConfig
from zhiling.config.loader import build_config
from zhiling.train.methods import ADAPTER_METHODS
from zhiling.models.loader import resolve_source
from zhiling.train.outputs import claim_output_dir, model_id, now, read_record, write_record
from zhiling.train.progress import print_summary
from zhiling.train.runlock import RunLock
from zhiling.train.trainer import Trainer

STAGE_SECTIONS = ("data", "training", "lora", "template")


def stage_configs(cfg: ZhilingConfig) -> list[tuple[str, ZhilingConfig]]:
    """(name, full config) for every stage, with output folders and starting points chained."""
    base = cfg.model_dump(mode="json")
    base["stages"] = []
    names = [stage.name for stage in cfg.stages]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        from zhiling.errors import ConfigError

        raise ConfigError(f"stages: the name '{duplicate}' is used twice; each stage needs its own name")
    previous_adapter = cfg.training.init_adapter
    previous_model = None
    out = []
    for stage in cfg.stages:
        tree = copy.deepcopy(base)
        for section in STAGE_SECTIONS:
            tree[section].update(copy.deepcopy(getattr(stage, section)))
        tree["output"]["dir"] = str(Path(cfg.output.dir) / stage.name)
        method = tree["training"]["method"]
        if method in ADAPTER_METHODS:
            tree["training"]["init_adapter"] = previous_adapter
            previous_adapter = str(Path(tree["output"]["dir"]) / "adapter")
        else:
            if previous_model is not None:
                tree["model"]["name_or_path"] = previous_model
            previous_model = str(Path(tree["output"]["dir"]) / "model")
        out.append((stage.name, build_config(tree, source=f"stage '{stage.name}'")))
    return out


def stages_identity(cfg: ZhilingConfig) -> dict:
    return {"model": model_id(cfg, resolve_source(cfg.model)), "method": cfg.training.method,
            "stages": [stage.name for stage in cfg.stages]}


def run_stages(cfg: ZhilingConfig, *, show_progress: bool = True, summary: bool = True, announce=None):
    """Every stage in turn, holding the root folder's run lock throughout (each stage also locks its own)."""
    from accelerate import PartialState

    lock = RunLock(cfg.output.dir)
    if PartialState().is_main_process:
        claim_output_dir(cfg.output.dir, stages_identity(cfg), cfg.output.overwrite, cfg.training.resume,
                         check_only=True)  # refuse a folder that is not this run's before writing a lock into it
        lock.acquire()
    try:
        return _run_stages(cfg, show_progress=show_progress, summary=summary, announce=announce)
    finally:
        lock.release()


def _run_stages(cfg: ZhilingConfig, *, show_progress: bool, summary: bool, announce):
    from accelerate import PartialState

    configs = stage_configs(cfg)
    out = Path(cfg.output.dir)
    identity = stages_identity(cfg)
    state = PartialState()
    say = announce or (lambda message: print(message, flush=True))
    if state.is_main_process:
        claim_output_dir(out, identity, cfg.output.overwrite, cfg.training.resume)
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    record = {"kind": "stages", "status": "running", "identity": identity, "config": cfg.model_dump(mode="json"),
              "started_at": (read_record(out) or {}).get("started_at") or now(), "stages": []}
    results = []
    for index, (name, stage_cfg) in enumerate(configs, start=1):
        if state.is_main_process:
            say(f"── stage {index}/{len(configs)}: {name} ({', '.join(stage_cfg.data.datasets)}) ──")
        trainer = Trainer(stage_cfg, show_progress=show_progress, announce=announce)
        result = trainer.run()
        if result.skipped and state.is_main_process:
            say(f"stage {name} already finished; skipped")
        results.append(result)
        record["stages"].append({"name": name, "dir": str(result.output_dir), "final": str(result.final_dir),
                                 "skipped": result.skipped, "metrics": result.to_json()})
        if state.is_main_process:
            write_record(out, record)
    final = results[-1]
    final.stages = results
    record.update(status="finished", finished_at=now(), final=str(final.final_dir), chat_command=final.chat_command)
    if state.is_main_process:
        write_record(out, record)
        if summary:
            for name, result in zip((n for n, _ in configs), results):
                status = "skipped (finished before)" if result.skipped else f"{result.steps} steps"
                loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
                say(f"stage {name}: {status}{loss} -> {result.final_dir}")
            print_summary(final)
    return final
